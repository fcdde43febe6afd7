//! The nvwa server: a unix socket on which one [`Request`] per connection is answered by a stream of
//! [`Response::Progress`] lines and one final [`Response::Done`] or [`Response::Error`].
//!
//! Every connection gets its own thread, so a long update does not keep `nvwa status`-like
//! requests from being answered; the [`Handler`] serializes whatever must be serialized.
//!
//! Nobody else may talk to it or take its place: the socket's directory must be trusted
//! ([`trust::create_private_dir`]: 0700 when the server creates it), the socket is created under
//! umask 077 and then chmodded 0600, and a client is identified with `SO_PEERCRED` before
//! anything is read from it (only root and the server's own user are obeyed). A client gets
//! [`Limits::request_timeout`] in total to send its request, and at most
//! [`Limits::max_connections`] connections are served at once, so idle connections can neither
//! pin the server nor exhaust its file descriptors.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::{umask, Mode};

use crate::protocol::{
    self as protocol, read_message, write_message, Failure, Progress, ProtocolError, Request,
    Response,
};
use crate::trust::{self, TrustError, TrustedKind};

/// How long a stopping server waits for connections still being answered.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long one progress or final line may wait for a client that does not read. A client that
/// stops reading must not stall the update: after this the server stops writing to it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// Bounds on what clients can make the server hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time from accepting a connection to having its whole request line; a client trickling
    /// bytes is dropped when it runs out.
    pub request_timeout: Duration,
    /// Connections served at once (each holds a thread and a file descriptor); one more is told
    /// the server is busy and closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: Duration::from_secs(30),
            // One descriptor each: under `ulimit -n 64` half is left for the server's own
            // files (journal, images, criu's pipes) however many clients connect.
            max_connections: 32,
        }
    }
}

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
    #[error("cannot use the directory of the socket {}: {source}", .socket.display())]
    SocketDir {
        socket: PathBuf,
        #[source]
        source: TrustError,
    },
    #[error("cannot make the socket path {path} absolute: {source}; pass an absolute --socket")]
    Absolute {
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

/// Who may talk to the server: `(peer uid, server euid) -> allowed`.
type PeerPolicy = fn(u32, u32) -> bool;

/// A bound, not yet serving, nvwa socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// Writing to `wake_tx` makes `serve` stop accepting and return.
    wake_rx: UnixStream,
    wake_tx: Arc<UnixStream>,
    /// (device, inode) of the socket file we created: only that file is removed at the end.
    identity: (u64, u64),
    limits: Limits,
    /// [`peer_allowed`]; replaceable in tests, which all run as one user.
    allow: PeerPolicy,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("path", &self.path)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Server {
    /// Binds `socket`: checks its directory is trusted or creates it 0700, replaces a stale socket
    /// file nobody answers on, refuses to steal the socket of a live server, and creates the
    /// socket so that only its owner can use it.
    pub fn bind(socket: &Path) -> Result<Server, ServerError> {
        let path = std::path::absolute(socket).map_err(|source| ServerError::Absolute {
            path: socket.to_path_buf(),
            source,
        })?;
        let dir = path.parent().unwrap_or(Path::new("/"));
        // Someone who can write to the directory could put their own socket in its place and
        // receive root's requests, or delete ours.
        trust::create_private_dir(dir, TrustedKind::SocketDir).map_err(|source| {
            ServerError::SocketDir {
                socket: path.clone(),
                source,
            }
        })?;

        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ServerError::NotASocket { path });
            }
            Ok(_) => match UnixStream::connect(&path) {
                Ok(_) => return Err(ServerError::AlreadyRunning { path }),
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound) =>
                {
                    tracing::info!(socket = %path.display(), "removing a stale socket nobody answers on");
                    match std::fs::remove_file(&path) {
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

        // bind(2) creates the socket file with 0777 & ~umask; with umask 077 it is never, even
        // for an instant, usable by others. umask is process-wide: this runs once at startup,
        // before the server starts its threads, and the old mask is restored right after.
        let old_mask = umask(Mode::from_bits_truncate(0o077));
        let bound = UnixListener::bind(&path);
        umask(old_mask);
        let listener = bound.map_err(|source| ServerError::Bind {
            path: path.clone(),
            source,
        })?;
        // A second guard, by path: the directory is trusted, so the path is still our socket.
        let meta = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .and_then(|_| std::fs::symlink_metadata(&path))
            .map_err(|source| {
                let _ = std::fs::remove_file(&path);
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
            limits: Limits::default(),
            allow: peer_allowed,
        })
    }

    /// Replaces the default [`Limits`].
    pub fn with_limits(mut self, limits: Limits) -> Server {
        self.limits = limits;
        self
    }

    /// The socket's path (made absolute).
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
        let active = Arc::new(AtomicUsize::new(0));
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
                // Let connections that are still answering (the update a SIGTERM just rolled
                // back, the `exit` itself) send their last line; idle ones are not waited for long.
                let until = Instant::now() + STOP_GRACE;
                while active.load(Ordering::SeqCst) > 0 && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Ok(());
            }
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, euid, &active, &handler, wake_tx),
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

    /// Decides, without reading anything from it, whether a new connection gets a thread: the
    /// peer must be allowed and a connection slot free. Refusals are answered and closed here.
    fn admit(
        &self,
        stream: UnixStream,
        euid: u32,
        active: &Arc<AtomicUsize>,
        handler: &Arc<dyn Handler>,
        wake: &Arc<UnixStream>,
    ) {
        let (peer_uid, peer_pid) = match getsockopt(&stream, PeerCredentials) {
            Ok(c) => (c.uid(), c.pid()),
            Err(e) => {
                return refuse(
                    stream,
                    protocol::ErrorKind::Refused,
                    format!("cannot identify the client (SO_PEERCRED: {e}); refused"),
                )
            }
        };
        if !(self.allow)(peer_uid, euid) {
            tracing::warn!(peer_uid, peer_pid, "refused a client");
            return refuse(
                stream,
                protocol::ErrorKind::Refused,
                refusal(peer_uid, peer_pid, euid),
            );
        }
        // Only this thread adds to `active`, so the check and the increment cannot race with
        // another admission; connection threads only ever lower it.
        let open = active.load(Ordering::SeqCst);
        if open >= self.limits.max_connections {
            tracing::warn!(
                peer_uid,
                peer_pid,
                open,
                "too many connections, refused one"
            );
            return refuse(stream, protocol::ErrorKind::Busy, too_many(open));
        }
        active.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(Arc::clone(active));
        let handler = Arc::clone(handler);
        let wake = Arc::clone(wake);
        let timeout = self.limits.request_timeout;
        let spawned = std::thread::Builder::new()
            .name("nvwa-conn".into())
            .spawn(move || {
                let stop = serve_connection(&stream, &*handler, peer_uid, peer_pid, timeout);
                // The slot is free before the client sees the connection end, so a client that
                // waits for that end can count on the slot.
                drop(slot);
                drop(stream);
                if stop {
                    let _ = (&*wake).write_all(b"x");
                }
            });
        if let Err(e) = spawned {
            // The closure, and with it the slot and the stream, is dropped.
            tracing::error!("cannot start a thread for a connection: {e}");
        }
    }
}

/// One counted connection; frees its place when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers a connection that will not be served with one error line and closes it. Never blocks
/// the accept loop: a client whose buffer is full just misses the explanation.
fn refuse(stream: UnixStream, kind: protocol::ErrorKind, message: String) {
    let _ = stream.set_nonblocking(true);
    let _ = write_message(&mut &stream, &error_response(kind, message));
    // Closing a unix socket with unread bytes in it (the request the client sent first) would
    // flag the client's socket as reset; read what has arrived, and end our side first.
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match (&stream).read(&mut buf) {
            Ok(n) if n > 0 => {}
            _ => break,
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

/// Every error line the server itself sends is built here, so the wire form of errors has one
/// place.
fn error_response(kind: protocol::ErrorKind, message: String) -> Response {
    Failure::new(kind, message).into()
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

/// The error for a connection beyond [`Limits::max_connections`].
fn too_many(open: usize) -> String {
    format!(
        "the nvwa server is busy: too many connections ({open} open); try again in a moment, \
         and look for clients that connect without sending a request"
    )
}

/// The error for a request line that is not a JSON request.
fn malformed(err: &ProtocolError, timeout: Duration) -> String {
    match err {
        ProtocolError::Malformed { line, .. } if line.trim_start().starts_with("nvwa:") => format!(
            "this server speaks JSON lines; upgrade the nvwa client (got the old text protocol \
             {line:?})"
        ),
        ProtocolError::Malformed { line, source } => format!(
            "malformed request {line:?} ({source}); send one JSON object per line, such as \
             {{\"request\":\"ping\"}}"
        ),
        ProtocolError::Io { source, .. }
            if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
        {
            format!(
                "no complete request within {} s of connecting; closing the connection (send \
                 one JSON line such as {{\"request\":\"ping\"}} right after connecting)",
                timeout.as_secs_f64()
            )
        }
        other => other.to_string(),
    }
}

/// Reads from a stream until a fixed instant: each read may only wait for what is left, so a
/// client sending a byte now and then cannot stretch the time it is given.
struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "request deadline passed",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

/// Writes to a client until a write fails, then drops every further line: a client that went away
/// or stopped reading must not stop the work it asked for.
struct Reply<'a> {
    stream: &'a UnixStream,
    gone: bool,
}

impl Reply<'_> {
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

/// Answers one connection from an allowed peer; returns true when the server must stop (a
/// successful Exit).
fn serve_connection(
    stream: &UnixStream,
    handler: &dyn Handler,
    peer_uid: u32,
    peer_pid: i32,
    request_timeout: Duration,
) -> bool {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut reply = Reply {
        stream,
        gone: false,
    };
    let request = {
        let deadline = DeadlineReader {
            stream,
            deadline: Instant::now() + request_timeout,
        };
        let mut reader = BufReader::new(deadline.take(MAX_REQUEST_BYTES));
        read_message::<Request>(&mut reader)
    };
    let request = match request {
        Ok(Some(r)) => r,
        Ok(None) => return false,
        Err(e) => {
            let message = malformed(&e, request_timeout);
            tracing::warn!(peer_uid, peer_pid, "{message}");
            reply.send(&error_response(protocol::ErrorKind::Refused, message));
            return false;
        }
    };
    tracing::info!("{request} requested by uid {peer_uid} (pid {peer_pid})");

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
    let what = request.to_string();
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
            tracing::info!("{what}: {message}");
            reply.send(&Response::Done { message });
        }
        Err(failure) => {
            tracing::warn!("{what} failed ({}): {failure}", failure.kind.name());
            reply.send(&failure.into());
        }
    }
    let _ = reply.stream.flush();
    stop
}

/// Sets the line `systemctl status nvwa` shows, when started by systemd.
pub fn notify_status(text: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Status(text)]) {
        tracing::warn!("cannot tell systemd the status: {e}");
    }
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
    use crate::trust::trusted_tempdir;
    use std::io::BufRead;
    use std::sync::mpsc;
    use tempfile::TempDir;

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

    fn socket_in(dir: &TempDir) -> PathBuf {
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
        let dir = trusted_tempdir();
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
        let dir = trusted_tempdir();
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
        let dir = trusted_tempdir();
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
        let dir = trusted_tempdir();
        let sock = socket_in(&dir);
        let t = start(&sock, Fake::new());
        stop(&sock, t);
        assert!(!sock.exists());
    }

    #[test]
    fn a_refused_exit_keeps_the_server_running() {
        let dir = trusted_tempdir();
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
        let dir = trusted_tempdir();
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
        let dir = trusted_tempdir();
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
        let dir = trusted_tempdir();
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
        let dir = trusted_tempdir();
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
        let dir = trusted_tempdir();
        let sock = dir.path().join("nvwa.socket");
        std::fs::write(&sock, "precious").unwrap();
        let err = Server::bind(&sock).unwrap_err().to_string();
        assert!(err.contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&sock).unwrap(), "precious");
    }

    #[test]
    fn directory_is_0700_and_socket_0600() {
        let dir = trusted_tempdir();
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

    /// Starts `server` with `limits` (and `allow`, when given) on a thread.
    fn start_with(
        socket: &Path,
        limits: Limits,
        allow: Option<PeerPolicy>,
    ) -> std::thread::JoinHandle<()> {
        let mut server = Server::bind(socket).unwrap().with_limits(limits);
        if let Some(allow) = allow {
            server.allow = allow;
        }
        let h: Arc<dyn Handler> = Fake::new();
        std::thread::spawn(move || server.serve(h).unwrap())
    }

    /// Reads one response line, failing the test if none comes within 20 s (the bound only
    /// matters when the server wrongly waits).
    fn read_one(s: &UnixStream) -> Response {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = BufReader::new(s);
        read_message::<Response>(&mut r)
            .expect("a response line in time")
            .expect("a response line, not end of stream")
    }

    /// Reads until the server closes the connection (end of stream or reset).
    fn read_to_end(s: &UnixStream) {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("the server did not close the connection: {e}"),
            }
        }
    }

    fn error_text(r: &Response) -> &str {
        match r {
            Response::Error { message, .. } => message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn ping_works(sock: &Path) {
        let r = send(sock, &Request::Ping);
        assert!(
            matches!(&r[..], [Response::Done { message }] if message.contains("running")),
            "{r:?}"
        );
    }

    #[test]
    fn an_existing_world_writable_socket_directory_is_refused() {
        // Finding 7: another user could replace the socket in a 0777 directory and receive
        // root's requests.
        let dir = trusted_tempdir();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        let sock = run.join("nvwa.socket");
        let err = Server::bind(&sock).unwrap_err();
        assert!(matches!(err, ServerError::SocketDir { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&*run.to_string_lossy())
                && msg.contains("world-writable")
                && msg.contains("chmod go-w"),
            "{msg}"
        );
        assert!(!sock.exists(), "nothing may be bound there");
        assert_eq!(
            std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
            0o777,
            "an existing directory is refused, not changed"
        );
        // A private one is accepted as it is.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let _s = Server::bind(&sock).unwrap();
        assert_eq!(
            std::fs::metadata(&run).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    fn current_umask() -> String {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .expect("Umask in /proc/self/status")
            .trim()
            .to_string()
    }

    #[test]
    fn bind_restores_the_umask() {
        let before = current_umask();
        let dir = trusted_tempdir();
        let _s = Server::bind(&socket_in(&dir)).unwrap();
        assert_eq!(current_umask(), before);
    }

    #[test]
    fn a_refused_peer_is_answered_before_anything_is_read() {
        // The client sends nothing: a server that reads first would wait for the request
        // deadline (an hour here) before refusing.
        let dir = trusted_tempdir();
        let sock = socket_in(&dir);
        let limits = Limits {
            request_timeout: Duration::from_secs(3600),
            ..Limits::default()
        };
        let _t = start_with(&sock, limits, Some(|_, _| false));
        let s = UnixStream::connect(&sock).unwrap();
        let r = read_one(&s);
        assert!(error_text(&r).starts_with("refused: uid"), "{r:?}");
        read_to_end(&s);
    }

    #[test]
    fn the_request_deadline_is_for_the_whole_line() {
        // A client trickling one byte every 50 ms would never hit a per-read timeout of 300 ms;
        // the deadline must end it anyway, long before it stops on its own (after 10 s).
        let dir = trusted_tempdir();
        let sock = socket_in(&dir);
        let limits = Limits {
            request_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let t = start_with(&sock, limits, None);
        let s = UnixStream::connect(&sock).unwrap();
        let writer = s.try_clone().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut w = &writer;
            for _ in 0..200 {
                // Leading blanks are valid JSON whitespace: the line is never complete.
                if w.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = done_tx.send(());
        });
        let r = read_one(&s);
        assert!(
            error_text(&r).contains("no complete request within 0.3 s"),
            "{r:?}"
        );
        assert!(
            done_rx.try_recv().is_err(),
            "the connection was only dropped after the client stopped sending"
        );
        read_to_end(&s);
        stop(&sock, t);
    }

    #[test]
    fn connections_beyond_the_cap_are_refused_at_once() {
        let dir = trusted_tempdir();
        let sock = socket_in(&dir);
        let limits = Limits {
            request_timeout: Duration::from_secs(3600),
            max_connections: 2,
        };
        let t = start_with(&sock, limits, None);
        // Two idle clients hold both slots (accepted in order, before the third).
        let idle: Vec<UnixStream> = (0..2)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect();
        let third = UnixStream::connect(&sock).unwrap();
        let r = read_one(&third);
        assert!(
            error_text(&r).contains("too many connections (2 open)"),
            "{r:?}"
        );
        read_to_end(&third);
        // The idle ones finish; once each sees its connection end, its slot is free again.
        for s in &idle {
            (&*s).write_all(b"{\"request\":\"ping\"}\n").unwrap();
            assert!(matches!(read_one(s), Response::Done { .. }));
            read_to_end(s);
        }
        ping_works(&sock);
        stop(&sock, t);
    }

    #[test]
    fn idle_connections_are_dropped_at_the_deadline_and_free_their_slots() {
        let dir = trusted_tempdir();
        let sock = socket_in(&dir);
        let limits = Limits {
            request_timeout: Duration::from_millis(200),
            max_connections: 3,
        };
        let t = start_with(&sock, limits, None);
        let idle: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect();
        for s in &idle {
            let r = read_one(s);
            assert!(error_text(&r).contains("no complete request"), "{r:?}");
            read_to_end(s);
        }
        ping_works(&sock);
        stop(&sock, t);
    }
}
