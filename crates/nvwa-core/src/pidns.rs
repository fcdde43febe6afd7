//! Keeping the saved pids free on the new kernel.
//!
//! A restore fails with EEXIST when any pid or thread id of the saved tree is taken. Right after
//! boot the pid counter is low, so fresh processes of the new boot can land on saved ids. We move
//! `ns_last_pid` past the highest saved id before spawning anything (so new processes get higher
//! ids), and wait for short-lived holders to exit.

use std::time::{Duration, Instant};

use crate::process;

const NS_LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";

/// Kernel command line parameter through which an update tells the next boot where to start
/// handing out pids. It is read by `nvwa pre` before anything else runs, since a kernel thread
/// or a boot service that lands on a saved pid holds it for good.
pub const CMDLINE_KEY: &str = "nvwa.last_pid";
/// The original's margin above the last pid in use when the update started.
pub const MARGIN: i32 = 2011;

#[derive(Debug, thiserror::Error)]
pub enum PidError {
    #[error(
        "cannot move {NS_LAST_PID} past {want}: {source}; restores may collide with new processes"
    )]
    Reserve { want: i32, source: std::io::Error },
    #[error("pid {id} of the saved tree is held by {holder}, still running after {waited_s} s; stop that process, then restart the nvwa server to retry the restore")]
    Held {
        id: i32,
        holder: String,
        waited_s: u64,
    },
}

pub fn last_pid() -> Option<i32> {
    std::fs::read_to_string(NS_LAST_PID)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Makes the next pid handed out greater than every id in `saved`.
pub fn reserve_above(saved: &[i32]) -> Result<(), PidError> {
    let Some(&want) = saved.iter().max() else {
        return Ok(());
    };
    if last_pid().is_some_and(|l| l >= want) {
        return Ok(());
    }
    std::fs::write(NS_LAST_PID, want.to_string())
        .map_err(|source| PidError::Reserve { want, source })
}

/// The command line for the next kernel: the running one with our reservation replacing any
/// earlier one (repeated updates must not pile them up).
pub fn cmdline_with_reservation(cmdline: &str, last_pid: i32) -> String {
    let prefix = format!("{CMDLINE_KEY}=");
    let mut words: Vec<&str> = cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with(&prefix))
        .collect();
    let ours = format!("{prefix}{last_pid}");
    words.push(&ours);
    words.join(" ")
}

pub fn reservation_in(cmdline: &str) -> Option<i32> {
    let prefix = format!("{CMDLINE_KEY}=");
    cmdline
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
}

/// The pid the next boot should start after: everything in use now, plus a margin for what
/// starts before the freeze. `None` if that would wrap past pid_max.
pub fn next_boot_reservation() -> Option<i32> {
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let want = last_pid()?.checked_add(MARGIN)?;
    (want < pid_max).then_some(want)
}

/// `nvwa pre`: early in boot, move ns_last_pid to the reservation the update left on the
/// command line. Returns the value applied, if any.
pub fn apply_boot_reservation() -> Result<Option<i32>, PidError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match reservation_in(&cmdline) {
        Some(want) => reserve_above(&[want]).map(|()| Some(want)),
        None => Ok(None),
    }
}

/// Which saved ids are taken now, with a description of the holding process.
pub fn holders(saved: &[i32]) -> Vec<(i32, String)> {
    saved
        .iter()
        .filter(|&&id| process::alive(id))
        .map(|&id| {
            // /proc/<tid> resolves threads too; name the thread group that owns it.
            let tgid = std::fs::read_to_string(format!("/proc/{id}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Tgid:"))
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(id);
            (id, process::describe(tgid))
        })
        .collect()
}

/// Waits until no id in `saved` is taken, or names the first holder after `timeout`.
pub fn wait_free(saved: &[i32], timeout: Duration) -> Result<(), PidError> {
    let start = Instant::now();
    loop {
        let held = holders(saved);
        let Some((id, holder)) = held.into_iter().next() else {
            return Ok(());
        };
        if start.elapsed() >= timeout {
            return Err(PidError::Held {
                id,
                holder,
                waited_s: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_id_names_its_holder_and_a_free_one_passes() {
        let me = std::process::id() as i32;
        let err = wait_free(&[me], Duration::from_millis(100)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("pid {me}")), "{msg}");
        assert!(msg.contains("restart the nvwa server"), "{msg}");
        // pid_max is at most 2^22: this id cannot exist.
        wait_free(&[i32::MAX - 1], Duration::from_millis(10)).unwrap();
    }

    #[test]
    fn a_holder_that_exits_frees_the_id() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let id = child.id() as i32;
        let waiter = std::thread::spawn(move || wait_free(&[id], Duration::from_secs(20)));
        child.wait().unwrap();
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn the_reservation_replaces_an_earlier_one_on_the_command_line() {
        let once = cmdline_with_reservation("console=ttyS0 quiet", 3000);
        assert_eq!(once, "console=ttyS0 quiet nvwa.last_pid=3000");
        let twice = cmdline_with_reservation(&once, 5000);
        assert_eq!(twice, "console=ttyS0 quiet nvwa.last_pid=5000");
        assert_eq!(reservation_in(&twice), Some(5000));
        assert_eq!(reservation_in("quiet nvwa.last_pid=x"), None);
        assert_eq!(reservation_in("quiet"), None);
    }

    #[test]
    fn reserving_nothing_is_a_no_op() {
        reserve_above(&[]).unwrap();
    }
}
