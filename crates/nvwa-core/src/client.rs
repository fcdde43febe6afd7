//! The client side of the nvwa socket: send one [`Request`], stream its progress, return its
//! final answer.

use std::io::{BufReader, ErrorKind};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::protocol::{
    read_message, write_message, Failure, Progress, ProtocolError, Request, Response,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error; the message says what failed and what to do.
    #[error("{0}")]
    Server(Failure),
    #[error("no nvwa server is listening on {path} ({source}); start it with `systemctl start nvwa` or `nvwa server`")]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "permission denied on the nvwa socket {path}; run the command as root (e.g. with sudo)"
    )]
    PermissionDenied { path: PathBuf },
    #[error("cannot connect to the nvwa server on {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the nvwa server on {path} closed the connection before answering; see its log (`journalctl -u nvwa`)")]
    Closed { path: PathBuf },
    #[error("talking to the nvwa server on {path}: {source}")]
    Protocol {
        path: PathBuf,
        source: ProtocolError,
    },
}

/// Sends `req` to the server on `socket`, calls `on_progress` for every progress event, and
/// returns the final success message.
pub fn request(
    socket: &Path,
    req: &Request,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<String, ClientError> {
    let path = socket.to_path_buf();
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => ClientError::NotRunning {
            path: path.clone(),
            source,
        },
        ErrorKind::PermissionDenied => ClientError::PermissionDenied { path: path.clone() },
        _ => ClientError::Connect {
            path: path.clone(),
            source,
        },
    })?;
    let protocol = |source: ProtocolError| match source {
        ProtocolError::Closed => ClientError::Closed { path: path.clone() },
        ProtocolError::Io { ref source, .. }
            if matches!(
                source.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
            ) =>
        {
            ClientError::Closed { path: path.clone() }
        }
        source => ClientError::Protocol {
            path: path.clone(),
            source,
        },
    };
    // A server that refuses a client answers and closes at once, possibly before the request
    // is written: the write then fails, but the answer is waiting to be read.
    if let Err(e) = write_message(&mut stream, req) {
        match protocol(e) {
            ClientError::Closed { .. } => {}
            other => return Err(other),
        }
    }
    let mut reader = BufReader::new(stream);
    loop {
        match read_message::<Response>(&mut reader).map_err(protocol)? {
            None => return Err(ClientError::Closed { path }),
            Some(Response::Progress(p)) => on_progress(&p),
            Some(Response::Done { message }) => return Ok(message),
            Some(Response::Error { kind, message }) => {
                return Err(ClientError::Server(Failure { kind, message }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;

    /// A one-shot server: reads the request line, writes `lines` verbatim, closes.
    fn serve_once(listener: UnixListener, lines: &'static str) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut req = String::new();
            r.read_line(&mut req).unwrap();
            (&s).write_all(lines.as_bytes()).unwrap();
            req
        })
    }

    #[test]
    fn progress_then_done() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let t = serve_once(
            UnixListener::bind(&sock).unwrap(),
            "{\"response\":\"progress\",\"event\":\"message\",\"text\":\"one\"}\n\
             {\"response\":\"progress\",\"event\":\"message\",\"text\":\"two\"}\n\
             {\"response\":\"done\",\"message\":\"ok\"}\n",
        );
        let mut seen = Vec::new();
        let out = request(&sock, &Request::Init, &mut |p| seen.push(p.clone())).unwrap();
        assert_eq!(out, "ok");
        assert_eq!(
            seen,
            vec![
                Progress::Message { text: "one".into() },
                Progress::Message { text: "two".into() }
            ]
        );
        assert_eq!(t.join().unwrap(), "{\"request\":\"init\"}\n");
    }

    #[test]
    fn a_server_error_is_passed_through() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _t = serve_once(
            UnixListener::bind(&sock).unwrap(),
            "{\"response\":\"error\",\"kind\":\"refused\",\"message\":\"kernel 9.9 is not installed\"}\n",
        );
        let err = request(&sock, &Request::Ping, &mut |_| {}).unwrap_err();
        assert!(
            matches!(&err, ClientError::Server(f) if f.message == "kernel 9.9 is not installed" && f.kind == crate::protocol::ErrorKind::Refused),
            "{err:?}"
        );
    }

    #[test]
    fn an_early_close_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _t = serve_once(
            UnixListener::bind(&sock).unwrap(),
            "{\"response\":\"progress\",\"event\":\"message\",\"text\":\"one\"}\n",
        );
        let err = request(&sock, &Request::Ping, &mut |_| {}).unwrap_err();
        assert!(matches!(err, ClientError::Closed { .. }), "{err:?}");
        assert!(err.to_string().contains("closed the connection"), "{err}");
    }

    #[test]
    fn no_server_names_the_socket_and_how_to_start_one() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.socket");
        let err = request(&missing, &Request::Ping, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&*missing.to_string_lossy())
                && err.contains("systemctl start nvwa")
                && err.contains("nvwa server"),
            "{err}"
        );
        // A stale socket file nobody listens on says the same.
        let stale = dir.path().join("stale.socket");
        drop(UnixListener::bind(&stale).unwrap());
        let err = request(&stale, &Request::Ping, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("systemctl start nvwa"), "{err}");
    }
}
