//! The crash-safe journal of an update: a persisted state machine with a timeline.
//!
//! planned → kernel_loaded → frozen → dumped → committed → (kexec) → booted → restored
//!
//! The terminal phases cannot be confused:
//! - `rolled_back`: the update stopped before the kernel switch; every target runs again on the
//!   old kernel and the images are gone.
//! - `abandoned`: the machine restarted before the update committed; the targets died with it and
//!   their images, never made durable, are deleted without ever being restored.
//! - `restore_failed`: the update committed and the kernel switched, but some targets could not be
//!   restored; their images are kept for a retry (restarting the server). A target restored
//!   lazily that was killed after it ran again (`lost`) is not retried: its images are kept for
//!   the operator.
//!
//! The journal lives in `<criu_dir>/journal.json` and is replaced atomically (write, fsync, rename,
//! fsync dir) at every transition, so a crash or the kexec itself never leaves it half written.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const JOURNAL_FILE: &str = "journal.json";

/// Ordered as the pipeline goes: every phase up to `committed` precedes the jump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
    Abandoned,
    /// Journals written before this phase got its name said `failed`.
    #[serde(alias = "failed")]
    RestoreFailed,
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
            Phase::Abandoned => "abandoned",
            Phase::RestoreFailed => "restore_failed",
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

    /// The phases after `planned` through which an update reaches `last` on its way forward,
    /// in order (`restore_failed` ends that way where `restored` would); empty for `planned` and
    /// for the phases off it (`rolled_back`, `abandoned`).
    pub fn path_to(last: Phase) -> Vec<Phase> {
        use Phase::*;
        const FORWARD: [Phase; 5] = [KernelLoaded, Frozen, Dumped, Committed, Booted];
        match last {
            Planned | RolledBack | Abandoned => Vec::new(),
            Restored | RestoreFailed => FORWARD.into_iter().chain([last]).collect(),
            _ => FORWARD.into_iter().filter(|&p| p <= last).collect(),
        }
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
                | (Booted, RestoreFailed)
                // Undone on the old kernel, up to the jump itself failing.
                | (Planned | KernelLoaded | Frozen | Dumped | Committed, RolledBack)
                // The machine went down before the commit: the processes died with it.
                | (Planned | KernelLoaded | Frozen | Dumped, Abandoned)
                // A retry of a failed or interrupted restore.
                | (RestoreFailed, Booted)
        )
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Image directories are named after their target: a pid's decimal digits, or a systemd unit
/// name. Anything else in a journal (`../x`, `/etc`) is refused before it is joined to a path.
pub fn valid_target_name(kind: TargetKind, name: &str) -> bool {
    match kind {
        TargetKind::Pid => {
            !name.is_empty()
                && name.len() <= 10
                && name.bytes().all(|b| b.is_ascii_digit())
                && !name.starts_with('0')
        }
        // Stored as systemd names it (with `.service`), by systemd's rules.
        TargetKind::Service => crate::systemd::unit_name(name).is_ok_and(|u| u == name),
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
    /// Restored lazily, it ran again, then its memory could not be completed and it was killed.
    /// Its images are older than what it did on the new kernel, so nvwa never restores them
    /// again: that would replay its work from the update's moment (see `restore::finish_lazy`).
    Lost(String),
}

impl TargetState {
    /// Whether a restore on the new kernel still has this target to do: not once it is restored,
    /// and never for one that was lost after it ran again.
    pub fn awaits_restore(&self) -> bool {
        !matches!(self, TargetState::Restored | TargetState::Lost(_))
    }
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
    /// The pre-dump passes before the freeze (`pre_dump: true`), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_dump: Vec<crate::criu::PreDumpPass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_ms: Option<u64>,
    /// Wall time at which the restored tree was running again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_again_wall_ms: Option<u64>,
    /// For a service: what its unit's restore on the next boot needs to know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<SavedService>,
}

impl Target {
    /// A target as planned: nothing done to it yet, nothing measured.
    pub fn pending(name: impl Into<String>, kind: TargetKind, pid: i32) -> Target {
        Target {
            name: name.into(),
            kind,
            pid,
            tree_ids: Vec::new(),
            rss_bytes: 0,
            state: TargetState::Pending,
            pre_dump: Vec::new(),
            dump_ms: None,
            restore_ms: None,
            running_again_wall_ms: None,
            service: None,
        }
    }
}

/// A service target's unit, as systemd ran it when it was dumped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedService {
    /// The identifier its journal lines carry (`SyslogIdentifier=`, else the executable's name):
    /// the restore's stream to journald is opened under it, so `journalctl -t` still finds them.
    pub identifier: String,
    /// The unit's own `PIDFile=`, rewritten with the restored pid (it lived on /run, which the
    /// kexec emptied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// The main process's standard output and error when they are unix stream sockets (journald's
    /// stdout streams): criu dumps them as external and the restore hands in fresh ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<StdStream>,
    /// The namespaces of its own (a subset of mnt, uts and user: the unit's sandbox) in which
    /// the main process ran. With mnt or uts, criu dumps from inside them and the restore joins
    /// those of a holder that the unit's sandbox gives the next start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Files the main process holds on mounts outside its mount namespace (systemd opens stdin
    /// before it makes the namespace): dumped as external, reopened on the host at restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_files: Vec<ExternalFile>,
}

impl SavedService {
    /// Whether criu must run inside the service's mount and UTS namespaces (and the restore
    /// join those of a holder in the unit's fresh sandbox).
    pub fn sandboxed(&self) -> bool {
        self.namespaces.iter().any(|n| n == "mnt" || n == "uts")
    }
    /// Whether the service ran in a user namespace of its own (`PrivateUsers=`).
    pub fn own_user_ns(&self) -> bool {
        self.namespaces.iter().any(|n| n == "user")
    }
}

/// An open file of a dumped process whose mount is not in its mount namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalFile {
    pub fd: i32,
    /// The mount id (`/proc/PID/fdinfo/FD`) and inode: how criu names it (`file[mnt:ino]`).
    pub mnt_id: u64,
    pub inode: u64,
    /// Its path on the host, where the restore opens it again.
    pub path: PathBuf,
    /// The open flags of fdinfo, for the access mode of the reopened file.
    pub flags: u32,
}

impl ExternalFile {
    /// criu's name for it in `--external` and `--inherit-fd`.
    pub fn criu_key(&self) -> String {
        format!("file[{:x}:{:x}]", self.mnt_id, self.inode)
    }
}

/// One standard stream of a dumped process that is a unix stream socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdStream {
    /// 1 or 2.
    pub fd: i32,
    /// The socket's inode on the old boot: how criu's images name it.
    pub inode: u64,
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
    #[error("the update journal {path} names a target {name:?} that is not a pid or a unit name; it was not written by nvwa: inspect it, then run `nvwa init`")]
    BadTarget { path: PathBuf, name: String },
    #[error("internal error: the update cannot go from {from} to {to}")]
    Transition { from: Phase, to: Phase },
    #[error("cannot read this boot's id from {BOOT_ID_PATH}: {0}; without it nvwa cannot tell a restarted server from a new boot, so it refuses to act")]
    BootId(String),
}

pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

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

/// This boot's id: a random UUID the kernel makes at boot. Crash safety depends on it, so it is
/// never guessed: an unreadable or empty one is an error.
pub fn boot_id() -> Result<String, JournalError> {
    let id = fs::read_to_string(BOOT_ID_PATH)
        .map_err(|e| JournalError::BootId(e.to_string()))?
        .trim()
        .to_string();
    if id.len() < 16 {
        return Err(JournalError::BootId(format!("{id:?} is not a boot id")));
    }
    Ok(id)
}

impl Journal {
    pub fn new(from_kernel: &str, to_kernel: &str, targets: Vec<Target>, boot_id: &str) -> Journal {
        let mut j = Journal {
            from_kernel: from_kernel.to_string(),
            to_kernel: to_kernel.to_string(),
            phase: Phase::Planned,
            targets,
            timeline: Vec::new(),
            error: None,
        };
        j.stamp(Phase::Planned, boot_id);
        j
    }

    fn stamp(&mut self, phase: Phase, boot_id: &str) {
        let (wall_ms, mono_ms) = now();
        self.timeline.push(Stamp {
            phase,
            wall_ms,
            mono_ms,
            boot_id: boot_id.to_string(),
        });
        self.phase = phase;
    }

    /// Moves to `phase` (on the boot `boot_id`), refusing transitions the state machine does not
    /// have.
    pub fn advance(&mut self, phase: Phase, boot_id: &str) -> Result<(), JournalError> {
        if !phase.may_follow(self.phase) {
            return Err(JournalError::Transition {
                from: self.phase,
                to: phase,
            });
        }
        self.stamp(phase, boot_id);
        Ok(())
    }

    /// Moves through `phases` in order (replaying an update, e.g. in tests and tools).
    pub fn advance_all(&mut self, phases: &[Phase], boot_id: &str) -> Result<(), JournalError> {
        phases.iter().try_for_each(|&p| self.advance(p, boot_id))
    }

    /// Whether the update started on the boot `boot_id` (the processes it froze may still live).
    pub fn started_on(&self, boot_id: &str) -> bool {
        self.timeline.first().is_some_and(|s| s.boot_id == boot_id)
    }

    /// Whether the update committed on the boot `boot_id` (and so the jump never happened).
    pub fn committed_on(&self, boot_id: &str) -> bool {
        self.stamp_of(Phase::Committed)
            .is_some_and(|s| s.boot_id == boot_id)
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
        let j: Journal = serde_json::from_str(&text).map_err(|source| JournalError::Corrupt {
            path: path.clone(),
            source,
        })?;
        if let Some(t) = j
            .targets
            .iter()
            .find(|t| !valid_target_name(t.kind, &t.name))
        {
            return Err(JournalError::BadTarget {
                path,
                name: t.name.clone(),
            });
        }
        Ok(Some(j))
    }

    /// Atomically replaces the journal on disk: a private temporary file created afresh (never
    /// through a link someone planted), fsynced, renamed over the journal, directory fsynced.
    pub fn save(&self, criu_dir: &Path) -> Result<(), JournalError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = Self::path(criu_dir);
        let tmp = criu_dir.join(format!(".{JOURNAL_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
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

    const BOOT: &str = "0f5e1a8c-boot-one";

    fn target(name: &str) -> Target {
        Target::pending(name, TargetKind::Pid, name.parse().unwrap_or(1))
    }

    #[test]
    fn the_way_forward_to_a_phase_is_every_step_after_planned() {
        use Phase::*;
        assert_eq!(Phase::path_to(Planned), []);
        assert_eq!(Phase::path_to(Dumped), [KernelLoaded, Frozen, Dumped]);
        assert_eq!(
            Phase::path_to(Restored),
            [KernelLoaded, Frozen, Dumped, Committed, Booted, Restored]
        );
        assert_eq!(
            Phase::path_to(RestoreFailed),
            [
                KernelLoaded,
                Frozen,
                Dumped,
                Committed,
                Booted,
                RestoreFailed
            ]
        );
        assert_eq!(Phase::path_to(RolledBack), []);
        assert_eq!(Phase::path_to(Abandoned), []);
    }

    #[test]
    fn the_happy_path_is_allowed_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new("6.1", "6.12", vec![target("10")], BOOT);
        for p in Phase::path_to(Phase::Restored) {
            j.advance(p, BOOT).unwrap();
            j.save(dir.path()).unwrap();
        }
        let back = Journal::load(dir.path()).unwrap().unwrap();
        assert_eq!(back, j);
        assert_eq!(back.timeline.len(), 7);
        assert!(!back.phase.in_progress());
    }

    #[test]
    fn skipping_a_phase_is_refused() {
        let mut j = Journal::new("6.1", "6.12", vec![], BOOT);
        let err = j.advance(Phase::Committed, BOOT).unwrap_err();
        assert!(err.to_string().contains("planned to committed"), "{err}");
        assert_eq!(j.phase, Phase::Planned);
    }

    #[test]
    fn no_commit_after_rollback() {
        let mut j = Journal::new("6.1", "6.12", vec![], BOOT);
        j.advance(Phase::KernelLoaded, BOOT).unwrap();
        j.advance(Phase::RolledBack, BOOT).unwrap();
        assert!(j.advance(Phase::Committed, BOOT).is_err());
    }

    #[test]
    fn downtime_spans_freeze_to_last_target_running() {
        let mut j = Journal::new("6.1", "6.12", vec![target("1"), target("2")], BOOT);
        j.advance(Phase::KernelLoaded, BOOT).unwrap();
        j.advance(Phase::Frozen, BOOT).unwrap();
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

    #[test]
    fn a_planted_temporary_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(".journal.json.tmp")).unwrap();
        Journal::new("6.1", "6.12", vec![target("10")], BOOT)
            .save(dir.path())
            .unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        let mode = fs::metadata(Journal::path(dir.path()))
            .unwrap()
            .permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600, "the journal is private");
    }

    #[test]
    fn target_names_that_are_not_pids_or_units_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../pubimg", "/etc", "", "12/../13", "007"] {
            let mut t = target("10");
            t.name = bad.into();
            Journal::new("6.1", "6.12", vec![t], BOOT)
                .save(dir.path())
                .unwrap();
            let err = Journal::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains("not a pid or a unit name"), "{bad}: {err}");
        }
        let mut t = target("10");
        t.kind = TargetKind::Service;
        t.name = "redis-server.service".into();
        Journal::new("6.1", "6.12", vec![t], BOOT)
            .save(dir.path())
            .unwrap();
        assert!(Journal::load(dir.path()).unwrap().is_some());
    }

    #[test]
    fn journals_of_the_previous_format_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new("6.1", "6.12", vec![target("10")], BOOT);
        j.advance_all(&Phase::path_to(Phase::RestoreFailed), BOOT)
            .unwrap();
        j.save(dir.path()).unwrap();
        let text = fs::read_to_string(Journal::path(dir.path()))
            .unwrap()
            .replace("restore_failed", "failed");
        fs::write(Journal::path(dir.path()), text).unwrap();
        let back = Journal::load(dir.path()).unwrap().unwrap();
        assert_eq!(back.phase, Phase::RestoreFailed);
    }

    #[test]
    fn an_uncommitted_update_can_only_be_abandoned_or_rolled_back() {
        let mut j = Journal::new("6.1", "6.12", vec![], BOOT);
        j.advance(Phase::KernelLoaded, BOOT).unwrap();
        j.advance(Phase::Frozen, BOOT).unwrap();
        assert!(j.clone().advance(Phase::Booted, "other").is_err());
        assert!(j.clone().advance(Phase::Restored, "other").is_err());
        j.advance(Phase::Abandoned, "other").unwrap();
        assert!(
            j.advance(Phase::Booted, "other").is_err(),
            "abandoned is final"
        );
        assert!(!j.phase.in_progress());
    }

    #[test]
    fn boot_ids_are_read_and_never_empty() {
        let id = boot_id().unwrap();
        assert!(id.len() >= 16, "{id}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever a crash, a disk error or a person leaves in journal.json, loading it gives a
        /// journal or an error naming the file: never a panic.
        #[test]
        fn loading_any_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let dir = tempfile::tempdir().unwrap();
            fs::write(Journal::path(dir.path()), &bytes).unwrap();
            if let Err(e) = Journal::load(dir.path()) {
                proptest::prop_assert!(e.to_string().contains("journal.json"), "{}", e);
            }
        }

        /// Journal-shaped JSON with arbitrary names and phases: loads only valid target names.
        #[test]
        fn only_valid_target_names_load(name in "[ -~]{0,12}", phase in 0usize..10) {
            let dir = tempfile::tempdir().unwrap();
            let phases = ["planned", "kernel_loaded", "frozen", "dumped", "committed", "booted", "restored", "rolled_back", "abandoned", "restore_failed"];
            let text = serde_json::json!({
                "from_kernel": "a", "to_kernel": "b", "phase": phases[phase], "timeline": [],
                "targets": [{"name": name, "kind": "pid", "pid": 1, "state": {"state": "pending"}}],
            });
            fs::write(Journal::path(dir.path()), text.to_string()).unwrap();
            match Journal::load(dir.path()) {
                Ok(j) => proptest::prop_assert!(valid_target_name(TargetKind::Pid, &j.unwrap().targets[0].name)),
                Err(e) => proptest::prop_assert!(matches!(e, JournalError::BadTarget { .. }), "{}", e),
            }
        }
    }
}
