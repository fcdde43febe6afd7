//! Checkpoint and restore through the `criu` binary.
//!
//! We run the binary rather than CRIU's RPC (rust-criu): the all-or-nothing update needs
//! `--leave-stopped`, pre-dump and per-run log files, and the CLI is the interface the original
//! used and operators know how to debug (`dump.log`, `restore.log` beside the images).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const DUMP_LOG: &str = "dump.log";
pub const RESTORE_LOG: &str = "restore.log";
pub const PIDFILE: &str = "restored.pid";

/// The original's options, kept so images and behaviour match it.
const COMMON: &[&str] = &[
    "--tcp-established",
    "--ext-unix-sk",
    "--file-locks",
    "--shell-job",
    "--enable-external-masters",
    "--skip-in-flight",
    "-v4",
];

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot run {exe}: {source}; install criu (apt-get install criu) or set criu_exe in nvwa-server.yaml")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare the image directory {dir}: {source}")]
    ImageDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("criu {action} of {object} failed (exit {code}): {summary}; full log: {log}")]
    Failed {
        action: &'static str,
        object: String,
        code: i32,
        summary: String,
        log: PathBuf,
    },
}

impl CriuError {
    /// The restore collided with an existing pid (EEXIST), which may clear up by itself.
    pub fn is_pid_collision(&self) -> bool {
        matches!(self, CriuError::Failed { summary, .. }
            if summary.contains("File exists") || summary.contains("-17"))
    }
}

#[derive(Debug, Clone)]
pub struct Criu {
    pub exe: PathBuf,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct DumpOptions {
    pub pin_memory: bool,
}

impl Criu {
    pub fn new(exe: impl Into<PathBuf>) -> Criu {
        Criu { exe: exe.into() }
    }

    /// Checkpoints the tree rooted at `pid` into `dir` and leaves it stopped, so that a later
    /// failure elsewhere can still resume it. Returns the time spent, in milliseconds.
    pub fn dump(&self, pid: i32, dir: &Path, opts: DumpOptions) -> Result<u64, CriuError> {
        std::fs::create_dir_all(dir).map_err(|source| CriuError::ImageDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let pid_s = pid.to_string();
        let mut args = vec!["dump", "-t", &pid_s, "--leave-stopped"];
        if opts.pin_memory {
            args.push("--pin-memory");
        }
        self.run("dump", format!("pid {pid}"), dir, DUMP_LOG, &args)
    }

    /// Restores the image set in `dir` detached from criu; returns the restored root pid.
    pub fn restore(&self, dir: &Path) -> Result<(i32, u64), CriuError> {
        let _ = std::fs::remove_file(dir.join(PIDFILE));
        let ms = self.run(
            "restore",
            dir.display().to_string(),
            dir,
            RESTORE_LOG,
            &["restore", "-d", "--pidfile", PIDFILE],
        )?;
        let pid = std::fs::read_to_string(dir.join(PIDFILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok((pid, ms))
    }

    fn run(
        &self,
        action: &'static str,
        object: String,
        dir: &Path,
        log: &str,
        args: &[&str],
    ) -> Result<u64, CriuError> {
        let start = Instant::now();
        let out = Command::new(&self.exe)
            .args(args)
            .arg("-D")
            .arg(dir)
            .args(["-o", log])
            .args(COMMON)
            .output()
            .map_err(|source| CriuError::Spawn {
                exe: self.exe.clone(),
                source,
            })?;
        let ms = start.elapsed().as_millis() as u64;
        if out.status.success() {
            return Ok(ms);
        }
        let log = dir.join(log);
        let text = std::fs::read_to_string(&log).unwrap_or_default()
            + &String::from_utf8_lossy(&out.stderr);
        Err(CriuError::Failed {
            action,
            object,
            code: out.status.code().unwrap_or(-1),
            summary: summarize(&text),
            log,
        })
    }
}

/// The lines of a criu log that say why it failed, most specific first.
pub fn summarize(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error (") || l.starts_with("Error") || l.contains("error:"))
        .map(|l| match l.find("Error (") {
            Some(i) => l[i..].trim(),
            None => l.trim(),
        })
        .collect();
    // "exited, status=1" only says that a helper criu ran failed; the specific lines say why.
    let specific: Vec<&str> = errors
        .iter()
        .copied()
        .filter(|l| !l.contains("exited, status="))
        .collect();
    let errors = if specific.is_empty() {
        errors
    } else {
        specific
    };
    let picked: Vec<&str> = if errors.is_empty() {
        log.lines()
            .rev()
            .filter(|l| !l.trim().is_empty())
            .take(2)
            .collect()
    } else {
        errors.into_iter().take(3).collect()
    };
    let s = picked.join(" | ");
    if s.is_empty() {
        "criu printed nothing".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_picks_the_error_lines() {
        let log = "(00.001) Dumping\n(00.002) Error (criu/cr-dump.c:1): Can't dump pid 7: No such process\n(00.003) Error (criu/cr-dump.c:2): Dumping FAILED.\n";
        let s = summarize(log);
        assert!(
            s.starts_with("Error (criu/cr-dump.c:1): Can't dump pid 7"),
            "{s}"
        );
        assert!(s.contains("Dumping FAILED"));
    }

    #[test]
    fn helper_exit_lines_give_way_to_specific_ones() {
        let log = "Error (criu/util.c:642): exited, status=1\nError (criu/pie/parasite.c:504): send_fds failed (-22)\n";
        assert_eq!(
            summarize(log),
            "Error (criu/pie/parasite.c:504): send_fds failed (-22)"
        );
        assert_eq!(
            summarize("Error (criu/util.c:642): exited, status=1\n"),
            "Error (criu/util.c:642): exited, status=1"
        );
    }

    #[test]
    fn without_error_lines_the_tail_is_kept() {
        assert_eq!(summarize("a\nb\nlast words\n"), "last words | b");
        assert_eq!(summarize(""), "criu printed nothing");
    }

    #[test]
    fn pid_collisions_are_recognised() {
        let e = CriuError::Failed {
            action: "restore",
            object: "x".into(),
            code: 1,
            summary: "Error (criu/cr-restore.c:1): Can't fork for 42: File exists".into(),
            log: "/x".into(),
        };
        assert!(e.is_pid_collision());
    }

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = Criu::new("/nonexistent/criu")
            .dump(1, dir.path(), DumpOptions::default())
            .unwrap_err();
        assert!(err.to_string().contains("apt-get install criu"), "{err}");
    }
}
