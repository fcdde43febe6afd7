//! The one way nvwa runs an outside program: in its own process group, with a deadline, with
//! its output captured, and cancellable.
//!
//! A hung helper must never hold the machine: while criu runs, every other dumped target is
//! stopped and the server refuses other work. When the deadline passes (or the caller cancels),
//! the whole process group (the program runs in a session of its own) gets SIGTERM, then SIGKILL
//! after [`GRACE`]: wrappers and the helpers they started die with it.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Between SIGTERM and SIGKILL of a process group that overran its deadline.
pub const GRACE: Duration = Duration::from_secs(3);
/// How often a running program's cancellation flag is looked at.
const CANCEL_POLL: Duration = Duration::from_millis(100);
/// How long output pipes may stay open after the program exited (a background grandchild may
/// hold them); after that the output read so far is returned.
const DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Finished {
    /// The exit code, or -signal when a signal ended it.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| -self.status.signal().unwrap_or(0))
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
    /// stdout followed by stderr, for messages.
    pub fn output_text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.stdout).into_owned();
        s.push_str(&String::from_utf8_lossy(&self.stderr));
        s.trim().to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {} s and was killed (with its process group)", .after.as_secs())]
    TimedOut { program: PathBuf, after: Duration },
    #[error("{program} was stopped because the update was cancelled")]
    Cancelled { program: PathBuf },
    #[error("cannot wait for {program}: {source}")]
    Wait {
        program: PathBuf,
        source: std::io::Error,
    },
}

/// Runs `cmd` to completion within `deadline`. Standard input is /dev/null.
pub fn run(cmd: &mut Command, deadline: Duration) -> Result<Finished, ExecError> {
    run_cancellable(cmd, deadline, None)
}

/// Like [`run`], and stops the program early when `cancel` becomes true.
pub fn run_cancellable(
    cmd: &mut Command,
    deadline: Duration,
    cancel: Option<&AtomicBool>,
) -> Result<Finished, ExecError> {
    let program = PathBuf::from(cmd.get_program());
    let start = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own session (and so its own process group, to kill as one). Not merely a process group:
    // if nvwa dies while something in that group is stopped (a criu held by a wrapper, or
    // stopped by an operator), the group would become orphaned and the kernel would SIGHUP it;
    // a session leader's group is orphaned from the start, so nvwa's death changes nothing and
    // a criu at work finishes its dump for the next server to find.
    // SAFETY: setsid(2) is async-signal-safe, as required between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pgid = Pid::from_raw(child.id() as i32);
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());

    // The child is waited for on its own thread so that this one can watch the clock. Until it
    // is reaped, its pid (and so the process group id) cannot be reused: killpg is safe.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let end = start + deadline;
    let mut stop_reason = None;
    let status = loop {
        let slice = end
            .saturating_duration_since(Instant::now())
            .min(CANCEL_POLL);
        match rx.recv_timeout(slice) {
            Ok(res) => break res,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(std::io::Error::other("the waiting thread died"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if stop_reason.is_none() {
            if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                stop_reason = Some(false);
            } else if Instant::now() >= end {
                stop_reason = Some(true);
            }
            if stop_reason.is_some() {
                tracing::warn!(program = %program.display(), "stopping its process group");
                let _ = killpg(pgid, Signal::SIGTERM);
                match rx.recv_timeout(GRACE) {
                    Ok(res) => break res,
                    Err(_) => {
                        let _ = killpg(pgid, Signal::SIGKILL);
                    }
                }
            }
        }
    };
    // Whatever else is left of the group (a wrapper's background helpers) goes too.
    if stop_reason.is_some() {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let status = status.map_err(|source| ExecError::Wait {
        program: program.clone(),
        source,
    })?;
    match stop_reason {
        Some(true) => Err(ExecError::TimedOut {
            program,
            after: deadline,
        }),
        Some(false) => Err(ExecError::Cancelled { program }),
        None => {
            let elapsed = start.elapsed();
            let until = Instant::now() + DRAIN;
            let (stdout, stderr) = (collect(out, until), collect(err, until));
            let drained = start.elapsed() - elapsed;
            if drained > Duration::from_millis(100) {
                tracing::warn!(
                    program = %program.display(),
                    "its output stayed open {} ms after it exited (a process it started holds it)",
                    drained.as_millis()
                );
            }
            Ok(Finished {
                status,
                stdout,
                stderr,
                elapsed,
            })
        }
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut p) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

fn collect(rx: mpsc::Receiver<Vec<u8>>, until: Instant) -> Vec<u8> {
    rx.recv_timeout(until.saturating_duration_since(Instant::now()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn output_and_exit_code_are_captured() {
        let f = run(
            &mut sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(f.code(), 3);
        assert_eq!(f.stdout, b"out\n");
        assert_eq!(f.stderr_text(), "err");
        assert_eq!(f.output_text(), "out\nerr");
    }

    #[test]
    fn a_hung_program_and_its_children_are_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child");
        let script = format!("sleep 1000 & echo $! > {}; wait", pidfile.display());
        let err = run(&mut sh(&script), Duration::from_millis(500)).unwrap_err();
        assert!(matches!(err, ExecError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("did not finish within"), "{err}");
        let child: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background sleep was in the group: it dies (signals are delivered asynchronously,
        // so give it a moment), leaving at most a zombie for its reaper.
        let gone = || {
            let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            state.is_empty() || state.contains(") Z ")
        };
        let until = Instant::now() + Duration::from_secs(10);
        while !gone() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone(), "child {child} survived");
    }

    #[test]
    fn a_program_that_ignores_sigterm_is_killed() {
        let started = Instant::now();
        let err = run(
            &mut sh("trap '' TERM; while :; do sleep 0.05; done"),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, ExecError::TimedOut { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn programs_run_in_a_session_of_their_own() {
        let f = run(&mut sh("exec cat /proc/self/stat"), Duration::from_secs(10)).unwrap();
        let stat = String::from_utf8(f.stdout).unwrap();
        // pid (comm) state ppid pgrp session ...
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let pid: &str = stat.split(' ').next().unwrap();
        assert_eq!(fields[2], pid, "process group: {stat}");
        assert_eq!(fields[3], pid, "session: {stat}");
    }

    #[test]
    fn cancellation_stops_the_program() {
        let flag = AtomicBool::new(true);
        let err = run_cancellable(&mut sh("sleep 1000"), Duration::from_secs(600), Some(&flag))
            .unwrap_err();
        assert!(matches!(err, ExecError::Cancelled { .. }), "{err}");
    }

    #[test]
    fn a_missing_program_is_named() {
        let err = run(
            &mut Command::new("/nonexistent/tool"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tool"), "{err}");
    }
}
