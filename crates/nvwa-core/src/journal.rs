//! The crash-safe journal of an update: a persisted state machine with a timeline.
//!
//! planned → kernel_loaded → frozen → dumped → committed → (kexec) → booted → restored
//! Any failure before `committed` ends in `rolled_back` (every target resumed on the old kernel);
//! a failure after it ends in `failed` with the images kept for a retry.
//!
//! The journal lives in `<criu_dir>/journal.json` and is replaced atomically (write, fsync, rename,
//! fsync dir) at every transition, so a crash or the kexec itself never leaves it half written.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const JOURNAL_FILE: &str = "journal.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Planned,
    KernelLoaded,
    Frozen,
    Dumped,
    Committed,
    Booted,
    Restored,
    RolledBack,
    Failed,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::KernelLoaded => "kernel_loaded",
            Phase::Frozen => "frozen",
            Phase::Dumped => "dumped",
            Phase::Committed => "committed",
            Phase::Booted => "booted",
            Phase::Restored => "restored",
            Phase::RolledBack => "rolled_back",
            Phase::Failed => "failed",
        }
    }

    /// An update in one of these phases still owns the machine: `init` and a second `update`
    /// must wait.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            Phase::Planned
                | Phase::KernelLoaded
                | Phase::Frozen
                | Phase::Dumped
                | Phase::Committed
                | Phase::Booted
        )
    }

    /// The transitions the pipeline may take; anything else is a bug caught at run time.
    pub fn may_follow(self, prev: Phase) -> bool {
        use Phase::*;
        matches!(
            (prev, self),
            (Planned, KernelLoaded)
                | (KernelLoaded, Frozen)
                | (Frozen, Dumped)
                | (Dumped, Committed)
                | (Committed, Booted)
                | (Booted, Restored)
                | (Booted, Failed)
                | (Planned | KernelLoaded | Frozen | Dumped, RolledBack)
                | (Committed, RolledBack)
                // The machine went down before the commit: the processes died with it.
                | (Planned | KernelLoaded | Frozen | Dumped, Failed)
                // A retry of a failed or interrupted restore.
                | (Failed, Booted)
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// When a phase was entered. Wall time is comparable across the kexec (it is what the downtime is
/// computed from); monotonic time only within one boot, which `boot_id` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub phase: Phase,
    pub wall_ms: u64,
    pub mono_ms: u64,
    pub boot_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    Pid,
    Service,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum TargetState {
    Pending,
    Dumped,
    Resumed,
    Restored,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Image directory name under criu_dir: the pid for pids, the unit name for services.
    pub name: String,
    pub kind: TargetKind,
    pub pid: i32,
    /// Every pid and thread id of the tree at dump time: the restore needs all of them free.
    #[serde(default)]
    pub tree_ids: Vec<i32>,
    /// Resident memory of the tree at plan time, in bytes (for the space check and the report).
    #[serde(default)]
    pub rss_bytes: u64,
    pub state: TargetState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
    /// Wall time at which the restored tree was running again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_again_wall_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    pub from_kernel: String,
    pub to_kernel: String,
    pub phase: Phase,
    pub targets: Vec<Target>,
    pub timeline: Vec<Stamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot write the update journal {path}: {source}; check that the criu_dir is on a writable file system")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the update journal {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the update journal {path} is corrupt ({source}); inspect it, then run `nvwa init` to start afresh")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("internal error: the update cannot go from {from} to {to}")]
    Transition { from: Phase, to: Phase },
}

/// Wall-clock and monotonic milliseconds, and this boot's id.
pub fn now() -> (u64, u64) {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0);
    (wall, mono)
}

pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Journal {
    pub fn new(from_kernel: &str, to_kernel: &str, targets: Vec<Target>) -> Journal {
        let mut j = Journal {
            from_kernel: from_kernel.to_string(),
            to_kernel: to_kernel.to_string(),
            phase: Phase::Planned,
            targets,
            timeline: Vec::new(),
            error: None,
        };
        j.stamp(Phase::Planned);
        j
    }

    fn stamp(&mut self, phase: Phase) {
        let (wall_ms, mono_ms) = now();
        self.timeline.push(Stamp {
            phase,
            wall_ms,
            mono_ms,
            boot_id: boot_id(),
        });
        self.phase = phase;
    }

    /// Moves to `phase`, refusing transitions the state machine does not have.
    pub fn advance(&mut self, phase: Phase) -> Result<(), JournalError> {
        if !phase.may_follow(self.phase) {
            return Err(JournalError::Transition {
                from: self.phase,
                to: phase,
            });
        }
        self.stamp(phase);
        Ok(())
    }

    pub fn stamp_of(&self, phase: Phase) -> Option<&Stamp> {
        self.timeline.iter().find(|s| s.phase == phase)
    }

    /// First freeze → last target running again, in wall-clock milliseconds (across the kexec).
    /// `None` until every target is running again.
    pub fn downtime_ms(&self) -> Option<u64> {
        let frozen = self.stamp_of(Phase::Frozen)?.wall_ms;
        let last = if self.phase == Phase::RolledBack {
            self.stamp_of(Phase::RolledBack)?.wall_ms
        } else {
            self.targets
                .iter()
                .map(|t| t.running_again_wall_ms)
                .collect::<Option<Vec<_>>>()?
                .into_iter()
                .max()?
        };
        Some(last.saturating_sub(frozen))
    }

    /// Milliseconds spent in each phase, in order: (phase, duration until the next stamp).
    pub fn phase_durations(&self) -> Vec<(Phase, u64)> {
        self.timeline
            .windows(2)
            .map(|w| (w[0].phase, w[1].wall_ms.saturating_sub(w[0].wall_ms)))
            .collect()
    }

    pub fn path(criu_dir: &Path) -> PathBuf {
        criu_dir.join(JOURNAL_FILE)
    }

    pub fn load(criu_dir: &Path) -> Result<Option<Journal>, JournalError> {
        let path = Self::path(criu_dir);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(JournalError::Read { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| JournalError::Corrupt { path, source })
    }

    /// Atomically replaces the journal on disk.
    pub fn save(&self, criu_dir: &Path) -> Result<(), JournalError> {
        let path = Self::path(criu_dir);
        let tmp = criu_dir.join(format!(".{JOURNAL_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            fs::create_dir_all(criu_dir)?;
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(self).expect("journal serializes"))?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(criu_dir)?.sync_all()
        };
        write().map_err(|source| JournalError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str) -> Target {
        Target {
            name: name.into(),
            kind: TargetKind::Pid,
            pid: name.parse().unwrap_or(1),
            tree_ids: vec![],
            rss_bytes: 0,
            state: TargetState::Pending,
            dump_ms: None,
            restore_ms: None,
            running_again_wall_ms: None,
        }
    }

    #[test]
    fn the_happy_path_is_allowed_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new("6.1", "6.12", vec![target("10")]);
        for p in [
            Phase::KernelLoaded,
            Phase::Frozen,
            Phase::Dumped,
            Phase::Committed,
            Phase::Booted,
            Phase::Restored,
        ] {
            j.advance(p).unwrap();
            j.save(dir.path()).unwrap();
        }
        let back = Journal::load(dir.path()).unwrap().unwrap();
        assert_eq!(back, j);
        assert_eq!(back.timeline.len(), 7);
        assert!(!back.phase.in_progress());
    }

    #[test]
    fn skipping_a_phase_is_refused() {
        let mut j = Journal::new("6.1", "6.12", vec![]);
        let err = j.advance(Phase::Committed).unwrap_err();
        assert!(err.to_string().contains("planned to committed"), "{err}");
        assert_eq!(j.phase, Phase::Planned);
    }

    #[test]
    fn no_commit_after_rollback() {
        let mut j = Journal::new("6.1", "6.12", vec![]);
        j.advance(Phase::KernelLoaded).unwrap();
        j.advance(Phase::RolledBack).unwrap();
        assert!(j.advance(Phase::Committed).is_err());
    }

    #[test]
    fn downtime_spans_freeze_to_last_target_running() {
        let mut j = Journal::new("6.1", "6.12", vec![target("1"), target("2")]);
        j.advance(Phase::KernelLoaded).unwrap();
        j.advance(Phase::Frozen).unwrap();
        let frozen = j.stamp_of(Phase::Frozen).unwrap().wall_ms;
        assert_eq!(j.downtime_ms(), None);
        j.targets[0].running_again_wall_ms = Some(frozen + 500);
        assert_eq!(j.downtime_ms(), None, "one target is still down");
        j.targets[1].running_again_wall_ms = Some(frozen + 1500);
        assert_eq!(j.downtime_ms(), Some(1500));
    }

    #[test]
    fn a_missing_journal_is_none_and_a_corrupt_one_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Journal::load(dir.path()).unwrap().is_none());
        fs::write(dir.path().join(JOURNAL_FILE), "{not json").unwrap();
        let err = Journal::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("journal.json") && err.contains("nvwa init"),
            "{err}"
        );
    }
}
