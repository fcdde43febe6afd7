//! Lazy restore (`lazy_restore: true`): a pid target runs again as soon as criu has rebuilt
//! everything but its memory; its pages come in from the images on demand, through
//! userfaultfd, served by a `criu lazy-pages` daemon that also copies the rest in the
//! background and exits once every page is in. The restore's share of the downtime then no
//! longer grows with memory.
//!
//! The price: until the daemon is done, the process's memory lives partly in the images. If the
//! daemon died early, the kernel would give the process zero-filled pages where its own were
//! still missing. So the restore is complete only when the daemon has exited having copied
//! every page; if it did not, nvwa kills the restored tree (wrong memory is worse than a
//! failed restore) and keeps the images, but does not restore them again: the process ran on
//! the new kernel since they were taken (see `restore::finish_lazy`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The daemon's log and pid file, in the target's image directory.
pub const LOG: &str = "lazy-pages.log";
pub const PIDFILE: &str = "lazy-pages.pid";

/// Pages the daemon copied into the restored processes, of those they had in the images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub copied: u64,
    pub total: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("criu lazy-pages for {dir} has no pid file: {source}; was the target restored with lazy_restore?")]
    NoDaemon {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot wait for criu lazy-pages (pid {pid}): {source}")]
    Wait { pid: i32, source: std::io::Error },
    #[error("criu lazy-pages (pid {pid}) is still copying pages from {dir} after {} s; it is left running, with the images it reads (log: {log})", .after.as_secs())]
    StillServing {
        pid: i32,
        dir: PathBuf,
        after: Duration,
        log: PathBuf,
    },
    #[error("criu lazy-pages ended before it had filled in the memory of pid {} (was it killed?); the process's memory is incomplete (log: {log})", .pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "))]
    Unfinished { pids: Vec<i32>, log: PathBuf },
    #[error("criu lazy-pages ended having copied {} of {} pages{}; the process's memory is incomplete (log: {log})", .done.copied, .done.total, .error.as_ref().map(|e| format!(", after: {e}")).unwrap_or_default())]
    Incomplete {
        done: Transferred,
        error: Option<String>,
        log: PathBuf,
    },
}

/// Waits until the daemon serving `dir` has exited (at most `deadline`), then judges from its
/// log whether every page reached its process.
pub fn finish(dir: &Path, deadline: Duration) -> Result<Transferred, LazyError> {
    let pid: i32 = std::fs::read_to_string(dir.join(PIDFILE))
        .and_then(|s| {
            s.trim()
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })
        .map_err(|source| LazyError::NoDaemon {
            dir: dir.to_path_buf(),
            source,
        })?;
    let log = dir.join(LOG);
    if !wait_exit(pid, deadline).map_err(|source| LazyError::Wait { pid, source })? {
        return Err(LazyError::StillServing {
            pid,
            dir: dir.to_path_buf(),
            after: deadline,
            log,
        });
    }
    judge(&std::fs::read_to_string(&log).unwrap_or_default(), log)
}

/// Whether the log of a finished daemon shows every page copied and no error.
///
/// The daemon logs "Received PID: P" when a restored process hands it its userfaultfd, and
/// "P-FD: UFFD transferred pages: (copied/total)" only once that process's pages are all
/// handled (criu/uffd.c: `ud_open`, `lazy_pages_summary`). So a process received but never
/// summed up is one whose memory the daemon did not finish: it was killed, or died, on the way
/// (and its log has no error line then). The daemon exits 0 either way: its log is all there is.
///
/// Only errors from the first process received on count. Before it, the daemon probes the
/// kernel when it is the boot's first criu run, and criu logs as errors what it tolerates there
/// (a missing `iptables`, which it runs to load netfilter modules: criu/kerndat.c); a daemon that
/// failed for good before it received a process never received one, which is judged below.
pub fn judge(text: &str, log: PathBuf) -> Result<Transferred, LazyError> {
    let done = transferred(text);
    let mut error = text
        .lines()
        .skip_while(|l| !l.contains(RECEIVED))
        .find(|l| l.contains("Error ("))
        .map(|l| l.trim().to_string());
    let pids = unfinished(text);
    if error.is_none() && !pids.is_empty() {
        return Err(LazyError::Unfinished { pids, log });
    }
    if error.is_none() && !text.contains(RECEIVED) {
        error = Some("the daemon never received a process to fill in".into());
    }
    if error.is_some() || done.copied != done.total {
        return Err(LazyError::Incomplete { done, error, log });
    }
    Ok(done)
}

const RECEIVED: &str = "Received PID: ";
const SUMMARY: &str = "UFFD transferred pages: (";

/// The pids the daemon received and never summed up, in the order received.
fn unfinished(text: &str) -> Vec<i32> {
    let received = text.lines().filter_map(|l| {
        let rest = l.split(RECEIVED).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit() && c != '-')
            .next()?
            .parse::<i32>()
            .ok()
    });
    // "... lazy-pages: P-FD: UFFD transferred pages: (c/t)": P is the word before the mark.
    let summed: std::collections::HashSet<i32> = text
        .lines()
        .filter_map(|l| {
            let before = l.split(SUMMARY).next().filter(|_| l.contains(SUMMARY))?;
            let word = before.trim_end().trim_end_matches(':').rsplit(' ').next()?;
            word.split('-').next()?.parse().ok()
        })
        .collect();
    received.filter(|p| !summed.contains(p)).collect()
}

/// The daemon's "UFFD transferred pages: (copied/total)" lines, one per process, summed.
fn transferred(text: &str) -> Transferred {
    let mut sum = Transferred {
        copied: 0,
        total: 0,
    };
    for line in text.lines() {
        let Some(rest) = line.split(SUMMARY).nth(1) else {
            continue;
        };
        let Some((copied, total)) = rest.trim_end().trim_end_matches(')').split_once('/') else {
            continue;
        };
        if let (Ok(c), Ok(t)) = (copied.parse::<u64>(), total.parse::<u64>()) {
            sum.copied += c;
            sum.total += t;
        }
    }
    sum
}

/// Waits for `pid` (not our child: the daemon detached) to exit, through a pidfd; false when
/// it still runs at the deadline. A pid already gone has exited.
fn wait_exit(pid: i32, deadline: Duration) -> std::io::Result<bool> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(true)
        } else {
            Err(e)
        };
    }
    // SAFETY: fd was just returned by pidfd_open and is owned here alone.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            n if n > 0 => return Ok(true),
            0 => return Ok(false),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DONE: &str = "\
(00.000050) lazy-pages: Received PID: 1010, uffd: 7
(00.000060) lazy-pages: Received PID: 1011, uffd: 8
(00.000120) lazy-pages: 1010-7: UFFD transferred pages: (65536/65536)
(00.000130) lazy-pages: 1011-8: UFFD transferred pages: (12/12)
";

    #[test]
    fn every_page_copied_and_no_error_is_complete() {
        let t = judge(DONE, "l".into()).unwrap();
        assert_eq!(
            t,
            Transferred {
                copied: 65548,
                total: 65548
            }
        );
    }

    #[test]
    fn missing_pages_or_an_error_are_incomplete_and_say_so() {
        let short = DONE.replace("(12/12)", "(3/12)");
        let e = judge(&short, "/i/lazy-pages.log".into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("copied 65539 of 65548 pages"), "{e}");
        assert!(e.contains("/i/lazy-pages.log"), "{e}");
        let failed = format!("{DONE}(00.2) Error (criu/uffd.c:1): uffd: 1010: Can't read event\n");
        let e = judge(&failed, "l".into()).unwrap_err().to_string();
        assert!(e.contains("Can't read event"), "{e}");
    }

    #[test]
    fn what_criu_tolerated_while_it_probed_the_kernel_is_no_error_of_the_transfer() {
        // The daemon as the boot's first criu run, on a machine without iptables.
        let probed = format!(
            "(00.038729) Error (criu/util.c:642): exited, status=1\n\
             (00.040100) Error (criu/util.c:642): exited, status=1\n{DONE}"
        );
        assert_eq!(judge(&probed, "l".into()).unwrap().total, 65548);
        // The same line once a process was received is the transfer's.
        let late = DONE.replace(
            "(00.000120)",
            "(00.000110) Error (criu/util.c:642): exited, status=1\n(00.000120)",
        );
        let e = judge(&late, "l".into()).unwrap_err().to_string();
        assert!(e.contains("util.c:642"), "{e}");
    }

    #[test]
    fn a_daemon_killed_before_it_summed_up_a_process_is_incomplete() {
        // Killed while filling 1011: its pages are counted nowhere, so the sums still agree.
        let killed = DONE.replace(
            "(00.000130) lazy-pages: 1011-8: UFFD transferred pages: (12/12)\n",
            "",
        );
        let e = judge(&killed, "l".into()).unwrap_err().to_string();
        assert!(
            e.contains("before it had filled in the memory of pid 1011"),
            "{e}"
        );
        // Killed before it summed up anything.
        let e = judge(
            "(00.000050) lazy-pages: Received PID: 1010, uffd: 7\n",
            "l".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pid 1010"), "{e}");
        let e = judge("", "l".into()).unwrap_err().to_string();
        assert!(e.contains("never received a process"), "{e}");
    }

    #[test]
    fn a_daemon_that_is_gone_has_finished_and_a_live_one_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        std::fs::write(dir.path().join(PIDFILE), child.id().to_string()).unwrap();
        std::fs::write(dir.path().join(LOG), DONE).unwrap();
        let e = finish(dir.path(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, LazyError::StillServing { .. }), "{e}");
        child.kill().unwrap();
        // Exited but not yet reaped: the pidfd reports it as gone.
        let t = finish(dir.path(), Duration::from_secs(10)).unwrap();
        assert_eq!(t.total, 65548);
        child.wait().unwrap();
    }
}
