//! Outside programs with a deadline: each runs in its own process group, which is killed when
//! the deadline passes, and its output is captured.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// What a finished program said.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion within `deadline`; a non-zero exit or a passed deadline is an error
/// that names the command and ends with what it wrote on stderr.
pub fn run(cmd: &mut Command, deadline: Duration) -> Result<Output> {
    use std::os::unix::process::CommandExt;
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let pgid = child.id() as i32;
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped")));
    let err = reader(Box::new(child.stderr.take().expect("piped")));
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(());
        status
    });
    let timed_out = rx.recv_timeout(deadline).is_err();
    if timed_out {
        // The whole group: a shell or apt leaves children behind otherwise.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    let status = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("waiting for {shown} panicked"))?
        .with_context(|| format!("cannot wait for {shown}"))?;
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if timed_out {
        bail!(
            "{shown} did not finish within {} s and was killed: {}",
            deadline.as_secs(),
            last_lines(&stderr, 10)
        );
    }
    if !status.success() {
        bail!("{shown} failed ({status}): {}", last_lines(&stderr, 20));
    }
    Ok(Output { stdout, stderr })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn output_is_captured() {
        let o = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2"]),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(o.stdout, "out\n");
        assert_eq!(o.stderr, "err\n");
    }

    #[test]
    fn a_failure_names_the_command_and_its_stderr() {
        let e = run(
            Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
            Duration::from_secs(30),
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("broken") && msg.contains("exit status: 3"),
            "{msg}"
        );
    }

    #[test]
    fn a_program_past_its_deadline_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child");
        let script = format!("sleep 600 & echo $! > {}; wait", pidfile.display());
        let started = Instant::now();
        let e = run(
            Command::new("sh").args(["-c", &script]),
            Duration::from_millis(500),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("did not finish within"), "{e:#}");
        assert!(started.elapsed() < Duration::from_secs(60));
        let child: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild was in the killed group: SIGKILL cannot be caught, so it dies (it may
        // take the kernel a moment to tear it down; it is then a zombie or gone).
        let dead = || {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .to_string();
            state.is_empty() || state.starts_with('Z') || state.starts_with('X')
        };
        let until = Instant::now() + Duration::from_secs(10);
        while !dead() && Instant::now() < until {
            std::thread::yield_now();
        }
        assert!(dead(), "pid {child} survived the group kill");
    }
}
