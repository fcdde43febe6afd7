//! The nvwa server: a unix socket on which one [`Request`] per connection is answered by a stream of
//! [`Response::Progress`] lines and one final [`Response::Done`] or [`Response::Error`].
//!
//! Every connection gets its own thread, so a long update does not keep `nvwa status`-like
//! requests from being answered; the [`Handler`] serializes whatever must be serialized. Only root
//! and the server's own user may talk to it (checked with `SO_PEERCRED`), the socket is mode 0600
//! and its directory, when the server creates it, 0700.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::protocol::{
    self as protocol, read_message, write_message, Failure, Progress, ProtocolError, Request,
    Response,
};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one progress or final line may wait for a client that does not read. A client that
/// stops reading must not stall the update: after this the server stops writing to it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Answers requests. Called concurrently from one thread per connection.
pub trait Handler: Send + Sync + 'static {
    /// `Ok(final message)` / `Err(final error message)`; progress events are streamed to the
    /// client as they are passed to `progress`.
    ///
    /// For [`Request::Exit`], `Ok` makes the server stop after answering; `Err` (e.g. "an update
    /// is in progress") keeps it serving.
    fn handle(
        &self,
        request: Request,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, Failure>;
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the socket directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another nvwa server is already listening on {path}; stop it (`nvwa exit` or `systemctl stop nvwa`) or give this one another socket with --socket")]
    AlreadyRunning { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or give the server another socket with --socket")]
    NotASocket { path: PathBuf },
    #[error("cannot check whether the socket {path} is still in use: {source}")]
    Probe {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}; check that its directory exists and is writable by the server")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot restrict the permissions of the socket {path} to 0600: {source}")]
    Chmod {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot wait for connections on {path}: {source}")]
    Accept {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A bound, not yet serving, nvwa socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// Writing to `wake_tx` makes `serve` stop accepting and return.
    wake_rx: UnixStream,
    wake_tx: Arc<UnixStream>,
    /// (device, inode) of the socket file we created: only that file is removed at the end.
    identity: (u64, u64),
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish()
    }
}

impl Server {
    /// Binds `socket`: creates its directory (mode 0700) when missing, replaces a stale socket file
    /// nobody answers on, refuses to steal the socket of a live server, and makes the socket 0600.
    pub fn bind(socket: &Path) -> Result<Server, ServerError> {
        let path = socket.to_path_buf();
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .and_then(|_| {
                        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    })
                    .map_err(|source| ServerError::CreateDir {
                        path: dir.to_path_buf(),
                        source,
                    })?;
            }
        }

        match std::fs::symlink_metadata(socket) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ServerError::NotASocket { path });
            }
            Ok(_) => match UnixStream::connect(socket) {
                Ok(_) => return Err(ServerError::AlreadyRunning { path }),
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound) =>
                {
                    tracing::info!(socket = %socket.display(), "removing a stale socket nobody answers on");
                    match std::fs::remove_file(socket) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(source) => return Err(ServerError::RemoveStale { path, source }),
                    }
                }
                Err(source) => return Err(ServerError::Probe { path, source }),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => return Err(ServerError::Probe { path, source }),
        }

        let listener = UnixListener::bind(socket).map_err(|source| ServerError::Bind {
            path: path.clone(),
            source,
        })?;
        let meta = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
            .and_then(|_| std::fs::symlink_metadata(socket))
            .map_err(|source| {
                let _ = std::fs::remove_file(socket);
                ServerError::Chmod {
                    path: path.clone(),
                    source,
                }
            })?;
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(|source| ServerError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(Server {
            listener,
            path,
            wake_rx,
            wake_tx: Arc::new(wake_tx),
            identity: (meta.dev(), meta.ino()),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle that makes [`Server::serve`] return, from another thread (a signal handler's).
    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::clone(&self.wake_tx))
    }

    /// Accepts connections until a [`Request::Exit`] is answered successfully, then removes the
    /// socket file and returns.
    pub fn serve(self, handler: Arc<dyn Handler>) -> Result<(), ServerError> {
        let _cleanup = RemoveOnDrop {
            path: self.path.clone(),
            identity: self.identity,
        };
        let accept_err = |source| ServerError::Accept {
            path: self.path.clone(),
            source,
        };
        let (wake_rx, wake_tx) = (&self.wake_rx, &self.wake_tx);
        self.listener.set_nonblocking(true).map_err(accept_err)?;
        let euid = nix::unistd::geteuid().as_raw();
        tracing::info!(socket = %self.path.display(), "nvwa server listening");

        loop {
            let mut fds = [
                PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake_rx.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(accept_err(e.into())),
            }
            let woken = fds[1].revents().is_some_and(|r| !r.is_empty());
            if woken {
                tracing::info!(socket = %self.path.display(), "nvwa server stopping");
                return Ok(());
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let handler = Arc::clone(&handler);
                    let wake = Arc::clone(wake_tx);
                    let spawned =
                        std::thread::Builder::new()
                            .name("nvwa-conn".into())
                            .spawn(move || {
                                if serve_connection(stream, &*handler, euid) {
                                    let _ = (&*wake).write_all(b"x");
                                }
                            });
                    if let Err(e) = spawned {
                        tracing::error!("cannot start a thread for a connection: {e}");
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock
                            | ErrorKind::Interrupted
                            | ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Running out of file descriptors or similar: keep serving, but say so.
                    tracing::error!(socket = %self.path.display(), "cannot accept a connection: {e}");
                }
            }
        }
    }
}

/// Stops a serving [`Server`].
#[derive(Clone)]
pub struct Stopper(Arc<UnixStream>);

impl Stopper {
    pub fn stop(&self) {
        let _ = (&*self.0).write_all(b"x");
    }
}

/// Removes the socket file when `serve` ends, if it is still the one we bound.
struct RemoveOnDrop {
    path: PathBuf,
    identity: (u64, u64),
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Whether a peer with `peer_uid` may talk to a server running as `server_euid`.
pub fn peer_allowed(peer_uid: u32, server_euid: u32) -> bool {
    peer_uid == 0 || peer_uid == server_euid
}

/// The error for a peer that [`peer_allowed`] refuses.
fn refusal(peer_uid: u32, peer_pid: i32, server_euid: u32) -> String {
    let allowed = if server_euid == 0 {
        "root".to_string()
    } else {
        format!("root and uid {server_euid}")
    };
    format!(
        "refused: uid {peer_uid} (pid {peer_pid}) may not control the nvwa server, which only \
         obeys {allowed} because it checkpoints processes and replaces the kernel; run the command \
         as root (e.g. with sudo)"
    )
}

/// The error for a request line that is not a JSON request.
fn malformed(err: &ProtocolError) -> String {
    match err {
        ProtocolError::Malformed { line, .. } if line.trim_start().starts_with("nvwa:") => format!(
            "this server speaks JSON lines; upgrade the nvwa client (got the old text protocol \
             {line:?})"
        ),
        ProtocolError::Malformed { line, source } => format!(
            "malformed request {line:?} ({source}); send one JSON object per line, such as \
             {{\"request\":\"ping\"}}"
        ),
        other => other.to_string(),
    }
}

/// Writes to a client until a write fails, then drops every further line: a client that went away
/// or stopped reading must not stop the work it asked for.
struct Reply {
    stream: UnixStream,
    gone: bool,
}

impl Reply {
    fn send(&mut self, msg: &Response) {
        if self.gone {
            return;
        }
        if let Err(e) = write_message(&mut self.stream, msg) {
            tracing::warn!("client went away, no longer reporting to it: {e}");
            self.gone = true;
        }
    }
}

/// Answers one connection; returns true when the server must stop (a successful Exit).
fn serve_connection(stream: UnixStream, handler: &dyn Handler, euid: u32) -> bool {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let creds = getsockopt(&stream, PeerCredentials);
    let read_side = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot use a connection: {e}");
            return false;
        }
    };
    let mut reply = Reply {
        stream,
        gone: false,
    };
    let mut reader = BufReader::new(read_side.take(MAX_REQUEST_BYTES));
    let request = read_message::<Request>(&mut reader);

    let (peer_uid, peer_pid) = match creds {
        Ok(c) => (c.uid(), c.pid()),
        Err(e) => {
            reply.send(&refused(format!(
                "cannot identify the client (SO_PEERCRED: {e}); refused"
            )));
            return false;
        }
    };
    if !peer_allowed(peer_uid, euid) {
        tracing::warn!(peer_uid, peer_pid, "refused a client");
        reply.send(&refused(refusal(peer_uid, peer_pid, euid)));
        return false;
    }

    let request = match request {
        Ok(Some(r)) => r,
        Ok(None) => return false,
        Err(e) => {
            let message = malformed(&e);
            tracing::warn!(peer_uid, peer_pid, "{message}");
            reply.send(&refused(message));
            return false;
        }
    };
    drop(reader);
    tracing::info!(peer_uid, peer_pid, ?request, "request");

    if request == Request::Ping {
        reply.send(&Response::Done {
            message: format!(
                "nvwa server {} is running (pid {})",
                env!("CARGO_PKG_VERSION"),
                std::process::id()
            ),
        });
        return false;
    }

    let is_exit = request == Request::Exit;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handler.handle(request, &mut |p: Progress| {
            tracing::debug!(?p, "progress");
            reply.send(&Response::Progress(p));
        })
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(Failure::new(
            protocol::ErrorKind::Internal,
            format!(
                "internal error in the nvwa server ({what}); see its log (`journalctl -u nvwa`)"
            ),
        ))
    });
    let stop = is_exit && outcome.is_ok();
    match outcome {
        Ok(message) => {
            tracing::info!(peer_pid, "done: {message}");
            reply.send(&Response::Done { message });
        }
        Err(failure) => {
            tracing::warn!(peer_pid, kind = failure.kind.name(), "failed: {failure}");
            reply.send(&failure.into());
        }
    }
    let _ = reply.stream.flush();
    stop
}

/// The answer to a request refused before anything was done.
fn refused(message: String) -> Response {
    Failure::new(protocol::ErrorKind::Refused, message).into()
}

/// Tells systemd the server is ready (`READY=1`), only when started by it (`NOTIFY_SOCKET` set):
/// in an initramfs or by hand there is nobody to tell.
pub fn notify_ready() {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot notify systemd that the server is ready: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Answers like a tiny daemon: Update streams three events; Init fails; Exit succeeds;
    /// Restore with pid 0 refuses to exit-like; Restore waits for a go signal.
    struct Fake {
        go: std::sync::Mutex<Option<mpsc::Receiver<()>>>,
        refuse_exit: bool,
    }

    impl Fake {
        fn new() -> Arc<Fake> {
            Arc::new(Fake {
                go: std::sync::Mutex::new(None),
                refuse_exit: false,
            })
        }
    }

    impl Handler for Fake {
        fn handle(
            &self,
            request: Request,
            progress: &mut dyn FnMut(Progress),
        ) -> Result<String, Failure> {
            match request {
                Request::Update { version } => {
                    progress(Progress::Phase {
                        phase: crate::journal::Phase::Planned,
                    });
                    progress(Progress::Target {
                        target: "42".into(),
                        pid: 42,
                        state: "dumped".into(),
                        detail: Some("12 MiB".into()),
                    });
                    progress(Progress::Message {
                        text: "almost".into(),
                    });
                    Ok(format!("updated to {version}"))
                }
                Request::Init => Err(Failure::new(
                    protocol::ErrorKind::Busy,
                    "cannot remove /x: busy; try again",
                )),
                Request::Exit if self.refuse_exit => Err(Failure::new(
                    protocol::ErrorKind::Busy,
                    "an update is in progress",
                )),
                Request::Exit => Ok("bye".into()),
                Request::Restore { pid, .. } => {
                    if let Some(rx) = self.go.lock().unwrap().take() {
                        rx.recv().unwrap();
                    }
                    if pid == 0 {
                        panic!("pid zero");
                    }
                    Ok(format!("restored {pid}"))
                }
                Request::Ping => unreachable!("the server answers pings itself"),
            }
        }
    }

    fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("run").join("nvwa.socket")
    }

    fn start(socket: &Path, h: Arc<dyn Handler>) -> std::thread::JoinHandle<()> {
        let server = Server::bind(socket).unwrap();
        std::thread::spawn(move || server.serve(h).unwrap())
    }

    /// Sends a raw line, returns every response line.
    fn exchange(socket: &Path, line: &str) -> Vec<Response> {
        let mut s = UnixStream::connect(socket).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        let mut out = Vec::new();
        while let Some(resp) = read_message::<Response>(&mut r).unwrap() {
            let last = resp.is_final();
            out.push(resp);
            if last {
                break;
            }
        }
        out
    }

    fn send(socket: &Path, req: &Request) -> Vec<Response> {
        let mut line = serde_json::to_string(req).unwrap();
        line.push('\n');
        exchange(socket, &line)
    }

    fn stop(socket: &Path, t: std::thread::JoinHandle<()>) {
        let r = send(socket, &Request::Exit);
        assert_eq!(
            r,
            vec![Response::Done {
                message: "bye".into()
            }]
        );
        t.join().unwrap();
    }

    #[test]
    fn progress_is_streamed_in_order_then_done() {
        let dir = tempfile::tempdir().unwrap();
        let sock = socket_in(&dir);
        let t = start(&sock, Fake::new());
        let r = send(
            &sock,
            &Request::Update {
                version: "6.12".into(),
            },
        );
        assert_eq!(r.len(), 4, "{r:?}");
        assert!(matches!(
            r[0],
            Response::Progress(Progress::Phase {
                phase: crate::journal::Phase::Planned
            })
        ));
        assert!(matches!(
            &r[1],
            Response::Progress(Progress::Target { pid: 42, .. })
        ));
        assert!(
            matches!(&r[2], Response::Progress(Progress::Message { text }) if text == "almost")
        );
        assert_eq!(
            r[3],
            Response::Done {
                message: "updated to 6.12".into()
            }
        );
        stop(&sock, t);
    }

    #[test]
    fn handler_errors_pass_through_and_the_server_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let sock = socket_in(&dir);
        let t = start(&sock, Fake::new());
        assert_eq!(
            send(&sock, &Request::Init),
            vec![Response::Error {
                kind: protocol::ErrorKind::Busy,
                message: "cannot remove /x: busy; try again".into()
            }]
        );
        let r = send(&sock, &Request::Ping);
        assert!(
            matches!(&r[..], [Response::Done { message }] if message.contains("running")),
            "{r:?}"
        );
        stop(&sock, t);
    }

    #[test]
    fn a_panicking_handler_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let sock = socket_in(&dir);
        let t = start(&sock, Fake::new());
        let r = send(
            &sock,
            &Request::Restore {
                service: "s".into(),
                pid: 0,
            },
        );
        assert!(
            matches!(&r[..], [Response::Error { message, .. }] if message.contains("pid zero")),
            "{r:?}"
        );
        stop(&sock, t);
    }

    #[test]
    fn exit_stops_serve_and_removes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = socket_in(&dir);
        let t = start(&sock, Fake::new());
        stop(&sock, t);
        assert!(!sock.exists());
    }

    #[test]
    fn a_refused_exit_keeps_the_server_running() {
        let dir = tempfile::tempdir().unwrap();
        let sock = socket_in(&dir);
        let server = Server::bind(&sock).unwrap();
        let h = Arc::new(Fake {
            go: std::sync::Mutex::new(None),
            refuse_exit: true,
        });
        let _t = std::thread::spawn(move || server.serve(h));
        let r = send(&sock, &Request::Exit);
        assert!(matches!(&r[..], [Response::Error { .. }]), "{r:?}");
        assert!(matches!(
            &send(&sock, &Request::Ping)[..],
            [Response::Done { .. }]
        ));
        // The thread is left running; the tempdir goes away with the test.
    }

    #[test]
    fn a_long_request_does_not_block_others() {
        let dir = tempfile::tempdir().unwrap();
        let sock = socket_in(&dir);
        let (go_tx, go_rx) = mpsc::channel();
        let h = Arc::new(Fake {
            go: std::sync::Mutex::new(Some(go_rx)),
            refuse_exit: false,
        });
        let t = start(&sock, h);
        let sock2 = sock.clone();
        let slow = std::thread::spawn(move || {
            send(
                &sock2,
                &Request::Restore {
                    service: "redis".into(),
                    pid: 7,
                },
            )
        });
        // Answered while the restore is blocked (or before it even started: either way it is
        // not queued behind it).
        assert!(matches!(
            &send(&sock, &Request::Ping)[..],
            [Response::Done { .. }]
        ));
        go_tx.send(()).unwrap();
        assert_eq!(
            slow.join().unwrap(),
            vec![Response::Done {
                message: "restored 7".into()
            }]
        );
        stop(&sock, t);
    }

    #[test]
    fn the_old_text_protocol_is_told_to_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let sock = socket_in(&dir);
        let t = start(&sock, Fake::new());
        let r = exchange(&sock, "nvwa: update 5.10\n");
        assert!(
            matches!(&r[..], [Response::Error { message, .. }] if message.contains("upgrade the nvwa client")),
            "{r:?}"
        );
        let r = exchange(&sock, "{\"request\":\"reboot\"}\n");
        assert!(
            matches!(&r[..], [Response::Error { message, .. }] if message.contains("malformed request") && message.contains("reboot")),
            "{r:?}"
        );
        stop(&sock, t);
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nvwa.socket");
        drop(UnixListener::bind(&sock).unwrap());
        assert!(sock.exists());
        let t = start(&sock, Fake::new());
        assert!(matches!(
            &send(&sock, &Request::Ping)[..],
            [Response::Done { .. }]
        ));
        stop(&sock, t);
    }

    #[test]
    fn a_live_socket_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nvwa.socket");
        let _live = Server::bind(&sock).unwrap();
        let err = Server::bind(&sock).unwrap_err().to_string();
        assert!(
            err.contains("another nvwa server is already listening on")
                && err.contains(&*sock.to_string_lossy()),
            "{err}"
        );
        assert!(sock.exists(), "the live socket must stay");
    }

    #[test]
    fn a_regular_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nvwa.socket");
        std::fs::write(&sock, "precious").unwrap();
        let err = Server::bind(&sock).unwrap_err().to_string();
        assert!(err.contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&sock).unwrap(), "precious");
    }

    #[test]
    fn directory_is_0700_and_socket_0600() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a").join("run").join("nvwa.socket");
        let _s = Server::bind(&sock).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(sock.parent().unwrap()), 0o700);
        assert_eq!(mode(&sock), 0o600);
    }

    #[test]
    fn only_root_and_the_servers_user_are_obeyed() {
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(1000, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(1001, 0));
        let msg = refusal(1001, 77, 0);
        assert!(
            msg.contains("uid 1001") && msg.contains("pid 77") && msg.contains("root"),
            "{msg}"
        );
    }
}
