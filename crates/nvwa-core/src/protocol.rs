//! The wire protocol between `nvwa` clients and the server: one JSON object per line.
//!
//! A client sends exactly one [`Request`]; the server answers with zero or more
//! [`Response::Progress`] lines followed by exactly one final line ([`Response::Done`] or
//! [`Response::Error`]).

use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

use crate::journal::Phase;

/// Default path of the server's socket (the original's).
pub const DEFAULT_SOCKET: &str = "/run/nvwa/nvwa.socket";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Checkpoint the configured targets and kexec into `version`.
    Update { version: String },
    /// Remove saved images and systemd overrides.
    Init,
    /// Stop the server.
    Exit,
    /// Restore one service (called by the unit's ExecStart override).
    Restore { service: String, pid: i32 },
    /// Liveness probe.
    Ping,
}

/// How a request reads in the server's log.
impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Update { version } => write!(f, "update to {version}"),
            Request::Init => f.write_str("init"),
            Request::Exit => f.write_str("exit"),
            Request::Restore { service, pid } => write!(f, "restore {service}@{pid}"),
            Request::Ping => f.write_str("ping"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    /// Something happened during a long request.
    Progress(Progress),
    /// The request succeeded.
    Done { message: String },
    /// The request failed; `message` says what failed, on which object, and what to do.
    Error { kind: ErrorKind, message: String },
}

/// What kind of failure ended a request: clients (and the CLI's exit code) tell these apart
/// without reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Nothing was frozen or changed: bad input, a failed precondition, a refused client.
    Refused,
    /// Another request or an unfinished update owns the machine; try again later.
    Busy,
    /// The update failed before the kernel switch and was undone: every target runs on the old
    /// kernel (or, after a crash, the saved images were discarded).
    RolledBack,
    /// A restore on the new kernel failed for some targets; their images are kept for a retry
    /// (a target lost after it ran again is kept but not retried).
    RestoreFailed,
    /// Anything else (an I/O error, a bug); the message and the server's log say what.
    Internal,
}

impl ErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Busy => "busy",
            ErrorKind::RolledBack => "rolled_back",
            ErrorKind::RestoreFailed => "restore_failed",
            ErrorKind::Internal => "internal",
        }
    }
}

/// A request's failure: its kind and the message for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<Failure> for Response {
    fn from(f: Failure) -> Response {
        Response::Error {
            kind: f.kind,
            message: f.message,
        }
    }
}

impl Response {
    pub fn is_final(&self) -> bool {
        !matches!(self, Response::Progress(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// The update entered a phase of its state machine.
    Phase { phase: Phase },
    /// One target changed state (e.g. "dumping", "dumped", "resumed", "failed").
    Target {
        target: String,
        pid: i32,
        state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// Free text for the operator.
    Message { text: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot {action} on the nvwa socket: {source}")]
    Io {
        action: &'static str,
        source: std::io::Error,
    },
    #[error("malformed message on the nvwa socket ({source}): {line:?}")]
    Malformed {
        line: String,
        source: serde_json::Error,
    },
    #[error("the nvwa server closed the connection before answering")]
    Closed,
}

/// Writes one message as a JSON line and flushes it.
pub fn write_message<T: Serialize>(out: &mut impl Write, msg: &T) -> Result<(), ProtocolError> {
    let mut line = serde_json::to_string(msg).expect("protocol types always serialize");
    line.push('\n');
    out.write_all(line.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|source| ProtocolError::Io {
            action: "write",
            source,
        })
}

/// Reads one JSON line; `Ok(None)` at end of stream.
pub fn read_message<T: for<'de> Deserialize<'de>>(
    input: &mut impl BufRead,
) -> Result<Option<T>, ProtocolError> {
    let mut line = String::new();
    let n = input
        .read_line(&mut line)
        .map_err(|source| ProtocolError::Io {
            action: "read",
            source,
        })?;
    if n == 0 {
        return Ok(None);
    }
    serde_json::from_str(line.trim_end())
        .map(Some)
        .map_err(|source| ProtocolError::Malformed {
            line: line.trim_end().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn requests_round_trip_as_single_lines() {
        let all = [
            Request::Update {
                version: "6.12.1".into(),
            },
            Request::Init,
            Request::Exit,
            Request::Restore {
                service: "redis".into(),
                pid: 42,
            },
            Request::Ping,
        ];
        for req in all {
            let mut buf = Vec::new();
            write_message(&mut buf, &req).unwrap();
            assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 1);
            let back: Request = read_message(&mut Cursor::new(buf)).unwrap().unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn wire_format_is_stable() {
        let mut buf = Vec::new();
        write_message(
            &mut buf,
            &Request::Update {
                version: "6.12".into(),
            },
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "{\"request\":\"update\",\"version\":\"6.12\"}\n"
        );
        let mut buf = Vec::new();
        write_message(
            &mut buf,
            &Response::Progress(Progress::Phase {
                phase: Phase::Frozen,
            }),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "{\"response\":\"progress\",\"event\":\"phase\",\"phase\":\"frozen\"}\n"
        );
    }

    #[test]
    fn errors_carry_their_kind_on_the_wire() {
        let mut buf = Vec::new();
        write_message(
            &mut buf,
            &Response::from(Failure::new(ErrorKind::RolledBack, "undone")),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "{\"response\":\"error\",\"kind\":\"rolled_back\",\"message\":\"undone\"}\n"
        );
    }

    #[test]
    fn garbage_is_a_malformed_error_naming_the_line() {
        let err =
            read_message::<Request>(&mut Cursor::new(b"nvwa: update 6.1\n".to_vec())).unwrap_err();
        assert!(err.to_string().contains("nvwa: update 6.1"), "{err}");
    }

    #[test]
    fn end_of_stream_is_none() {
        assert!(read_message::<Response>(&mut Cursor::new(Vec::new()))
            .unwrap()
            .is_none());
    }
}
