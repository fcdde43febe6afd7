//! `nvwa update <version>`: the all-or-nothing pipeline.
//!
//! planned → kernel_loaded → frozen → dumped → committed → kexec
//!
//! The kernel is loaded before anything is frozen, so a bad kernel never costs downtime. Every
//! target is dumped with `--leave-stopped`: until the jump, each one is still a live (stopped)
//! process that can be resumed. One [`UpdateRun`] owns the journal and every transition; it rolls
//! back on every way out that is not the jump — an error, a cancellation, or a panic (its `Drop`)
//! — resuming every target's whole tree, removing the images and unloading the kernel. A failed
//! update never loses a process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::boot::{self, BootError, KernelFiles};
use crate::config::{Config, ConfigError, KexecMode};
use crate::criu::{Connections, Criu, CriuError, DumpOptions};
use crate::journal::{Journal, JournalError, Phase, SavedService, Target, TargetKind, TargetState};
use crate::kexec::KexecError;
use crate::machine::{Machine, PinOp};
use crate::policy::{self, Refusal};
use crate::pre_dump;
use crate::protocol::{ErrorKind, Progress};
use crate::trust::{self, TrustError, TrustedKind};

pub use crate::daemon::Daemon;

/// Written into every image directory nvwa creates, with the target's name: `nvwa init` without
/// a journal removes only directories that carry it.
pub const IMAGE_MARKER: &str = "nvwa-target";

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{0}")]
    Busy(String),
    #[error("the nvwa server is stopping; start it again to run {0}")]
    Stopping(&'static str),
    #[error("{0}")]
    RestoreFailed(String),
    #[error("cannot remove the image set {path}: {source}")]
    RemoveImages {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot prepare the image directory {path}: {source}; check criu_dir in nvwa-server.yaml"
    )]
    ImageDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot clear pinned memory: {0}")]
    ClearPinned(crate::pinmem::PinMemError),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    #[error("update to {version} rolled back: {cause}; {undone}")]
    RolledBack {
        version: String,
        cause: Box<Abort>,
        /// What the rollback did (or could not do).
        undone: String,
    },
    #[error("{0}")]
    Abandoned(String),
}

impl UpdateError {
    /// How the failure reads on the wire and in the CLI's exit code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            UpdateError::Busy(_) | UpdateError::Stopping(_) => ErrorKind::Busy,
            UpdateError::RolledBack { .. } | UpdateError::Abandoned(_) => ErrorKind::RolledBack,
            UpdateError::RestoreFailed(_) => ErrorKind::RestoreFailed,
            UpdateError::Config(_)
            | UpdateError::Boot(_)
            | UpdateError::Refused(_)
            | UpdateError::Untrusted(_) => ErrorKind::Refused,
            UpdateError::Journal(_)
            | UpdateError::RemoveImages { .. }
            | UpdateError::ImageDir { .. }
            | UpdateError::ClearPinned(_) => ErrorKind::Internal,
        }
    }
}

/// Why an update stopped before the kernel switch. Every one of these ends in a rollback.
#[derive(Debug, thiserror::Error)]
pub enum Abort {
    #[error("the kernel could not be loaded: {0}")]
    Kernel(KexecError),
    #[error("pin memory failed: {0}; load openEuler's pin_memory module or set enable_pin_memory: false")]
    PinMemory(crate::pinmem::PinMemError),
    #[error("{target} could not be checkpointed: {why}")]
    Dump { target: String, why: String },
    #[error("{0}")]
    Journal(#[from] JournalError),
    #[error("the images in {dir} could not be made durable: {source}; check the file system and its free space")]
    Durability {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("the nvwa server was asked to stop")]
    Cancelled,
    #[error("internal error: {0}")]
    Panicked(String),
    #[error("the jump into the new kernel failed: {0}")]
    Jump(KexecError),
    #[error("systemd did not take over the orderly kexec (kexec_mode: orderly): {0}")]
    Handover(crate::systemd::SystemdError),
    #[error("the network configuration could not be saved (restore_net: true): {0}")]
    Network(crate::net::NetError),
}

/// Streams progress events from the pipeline (possibly from several dump threads).
pub struct Reporter<'a>(Mutex<&'a mut dyn FnMut(Progress)>);

impl<'a> Reporter<'a> {
    pub fn new(f: &'a mut dyn FnMut(Progress)) -> Self {
        Reporter(Mutex::new(f))
    }
    pub fn send(&self, p: Progress) {
        let mut f = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (*f)(p)
    }
    pub fn phase(&self, phase: Phase) {
        self.send(Progress::Phase { phase })
    }
    pub fn target(&self, t: &Target, state: &str, detail: Option<String>) {
        self.send(Progress::Target {
            target: t.name.clone(),
            pid: t.pid,
            state: state.into(),
            detail,
        })
    }
    pub fn message(&self, text: impl Into<String>) {
        self.send(Progress::Message { text: text.into() })
    }
}

pub fn image_dir(cfg: &Config, t: &Target) -> PathBuf {
    cfg.server.criu_dir.join(&t.name)
}

/// The deadline of one criu run on a tree with `rss_bytes` of resident memory: a minute, plus
/// 30 s per GiB (criu writes or reads images at well over 100 MiB/s even on slow disks).
/// `configured` (seconds, from nvwa-server.yaml) wins.
pub fn criu_deadline(configured: Option<u64>, rss_bytes: u64) -> Duration {
    match configured {
        Some(s) => Duration::from_secs(s),
        None => Duration::from_secs(60 + 30 * rss_bytes.div_ceil(1 << 30)),
    }
}

/// Turns the configured pids and services into targets, refusing anything that cannot be
/// preserved (the rules are the policy's, shared with `nvwa check`), and checks that their images
/// fit where they go.
pub(crate) fn plan_targets(m: &dyn Machine, cfg: &Config) -> Result<Vec<Target>, UpdateError> {
    let procs = m.procs();
    let pids = policy::preservable_pids(cfg, procs, std::process::id() as i32)?;
    let mut targets: Vec<Target> = pids
        .into_iter()
        .map(|pid| Target {
            tree_ids: m.tree_ids(pid),
            rss_bytes: procs.tree_rss_bytes(pid),
            ..Target::pending(pid.to_string(), TargetKind::Pid, pid)
        })
        .collect();
    let services = plan_services(m, cfg)?;
    // A pid inside a service's tree would be dumped twice (criu refuses the second dump).
    for s in &services {
        if let Some(t) = targets.iter().find(|t| s.tree_ids.contains(&t.pid)) {
            return Err(Refusal::ServiceOverlap {
                unit: s.name.clone(),
                pid: t.pid,
            }
            .into());
        }
    }
    targets.extend(services);
    let rss = targets.iter().map(|t| t.rss_bytes).sum();
    policy::image_store(&cfg.server.criu_dir, policy::bytes_needed(rss), m.fs())?;
    Ok(targets)
}

/// Each listed service becomes a target rooted at its main process, with what its restore on
/// the next boot needs to know about the unit.
fn plan_services(m: &dyn Machine, cfg: &Config) -> Result<Vec<Target>, UpdateError> {
    policy::judge_service_support(cfg, m.fs())?;
    let mut out: Vec<Target> = Vec::new();
    for svc in &cfg.restore.services {
        let unit =
            crate::systemd::unit_name(svc).map_err(|error| Refusal::ServiceName { error })?;
        if out.iter().any(|t| t.name == unit) {
            continue;
        }
        let (info, members) = m.service(&unit).map_err(|e| Refusal::ServiceQuery {
            unit: unit.clone(),
            error: e.to_string(),
        })?;
        policy::judge_service(cfg, &info, &members, m.procs())?;
        let pid = info.main_pid;
        let namespaces: Vec<String> = m
            .procs()
            .own_namespaces(pid)
            .into_iter()
            .map(String::from)
            .collect();
        // Only inside a mount namespace of its own can a file's mount be missing.
        let external_files = if namespaces.iter().any(|n| n == "mnt") {
            m.external_files(pid)
        } else {
            Vec::new()
        };
        out.push(Target {
            tree_ids: m.tree_ids(pid),
            rss_bytes: m.procs().tree_rss_bytes(pid),
            service: Some(SavedService {
                identifier: info.identifier,
                pid_file: info.pid_file,
                streams: m.std_streams(pid),
                namespaces,
                external_files,
            }),
            ..Target::pending(unit, TargetKind::Service, pid)
        });
    }
    Ok(out)
}

/// Refuses to start while another update owns the machine or saved images await a restore.
pub fn ensure_idle(cfg: &Config) -> Result<(), UpdateError> {
    match Journal::load(&cfg.server.criu_dir)? {
        Some(j) if j.phase.in_progress() => Err(UpdateError::Busy(format!(
            "an update to {} is in progress (phase {}); wait for it, or check `nvwa status`",
            j.to_kernel, j.phase
        ))),
        Some(j) if j.phase == Phase::RestoreFailed => Err(UpdateError::Busy(format!(
            "the last update to {} left images that were not restored ({}); restart the nvwa server to retry the restore, or run `nvwa init` to discard them",
            j.to_kernel,
            j.error.as_deref().unwrap_or("see nvwa status")
        ))),
        _ => Ok(()),
    }
}

/// As root, nvwa runs criu_exe and kexec_exe, writes logs and restores images only from paths
/// that nobody but root can change; the image and log directories are created 0700.
pub fn ensure_trusted_paths(cfg: &Config) -> Result<(), TrustError> {
    for (_key, path, kind) in cfg.server.trusted_paths() {
        match kind {
            TrustedKind::ImageDir | TrustedKind::LogDir => trust::create_private_dir(path, kind)?,
            _ => trust::ensure_trusted(path, kind)?,
        }
    }
    Ok(())
}

pub fn run(
    m: &dyn Machine,
    cfg: &Config,
    version: &str,
    r: &Reporter,
    stop: &Arc<AtomicBool>,
) -> Result<String, UpdateError> {
    boot::validate_version(version)?;
    let files = m.find_kernel(version)?;
    ensure_idle(cfg)?;
    let targets = plan_targets(m, cfg)?;
    let boot = m.boot_id()?;
    ensure_trusted_paths(cfg)?;
    let mut run = UpdateRun::start(
        m,
        cfg,
        r,
        Journal::new(&m.running_kernel(), version, targets, &boot),
        boot,
        stop,
    )?;
    r.message(format!(
        "{} → {} ({}), {} target(s)",
        run.j.from_kernel,
        version,
        files.image.display(),
        run.j.targets.len()
    ));
    let cause = match run.switch(&files) {
        // kexec_mode: orderly: systemd stops the machine and jumps; the journal is committed,
        // so the new boot restores.
        Ok(()) => {
            run.finished = true;
            return Ok(format!(
                "systemd is stopping the other units and will switch to {version}; the targets are restored on the new boot"
            ));
        }
        Err(cause) => cause,
    };
    let undone = run.roll_back(&cause.to_string());
    Err(UpdateError::RolledBack {
        version: version.into(),
        cause: Box::new(cause),
        undone,
    })
}

/// One update in flight. It owns the journal: every transition goes through
/// [`UpdateRun::advance`], and it cannot be dropped without a rollback unless the jump happened
/// (which never returns).
pub struct UpdateRun<'a, 'r> {
    m: &'a dyn Machine,
    cfg: &'a Config,
    r: &'a Reporter<'r>,
    pub j: Journal,
    boot: String,
    stop: &'a Arc<AtomicBool>,
    finished: bool,
}

impl<'a, 'r> UpdateRun<'a, 'r> {
    /// Saves the planned journal; from here on, every way out rolls back.
    pub fn start(
        m: &'a dyn Machine,
        cfg: &'a Config,
        r: &'a Reporter<'r>,
        j: Journal,
        boot: String,
        stop: &'a Arc<AtomicBool>,
    ) -> Result<UpdateRun<'a, 'r>, UpdateError> {
        for t in &j.targets {
            // Leftovers of an older run would mix with the new images.
            let dir = image_dir(cfg, t);
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(UpdateError::RemoveImages {
                        path: dir,
                        source: e,
                    })
                }
                _ => {}
            }
        }
        // A network state left by an older update must not be restored with this one's images.
        crate::net::remove_state(&cfg.server.criu_dir).map_err(|e| UpdateError::RemoveImages {
            path: cfg.server.criu_dir.join(crate::net::NET_DIR),
            source: e,
        })?;
        j.save(&cfg.server.criu_dir)?;
        r.phase(Phase::Planned);
        Ok(UpdateRun {
            m,
            cfg,
            r,
            j,
            boot,
            stop,
            finished: false,
        })
    }

    /// Enters `phase`: recorded, made durable, reported. Before the commit, a stop request
    /// aborts instead (the caller rolls back); after it, the jump goes on.
    pub fn advance(&mut self, phase: Phase) -> Result<(), Abort> {
        if phase <= Phase::Committed && self.stop.load(Ordering::SeqCst) {
            return Err(Abort::Cancelled);
        }
        self.j.advance(phase, &self.boot)?;
        self.j.save(&self.cfg.server.criu_dir)?;
        self.r.phase(phase);
        Ok(())
    }

    /// Everything from loading the kernel to the jump. An immediate jump never returns; `Ok` means
    /// systemd took over an orderly one. `Err` means something failed, with every target still
    /// alive (stopped or running) for the rollback to resume.
    fn switch(&mut self, files: &KernelFiles) -> Result<(), Abort> {
        let (m, cfg) = (self.m, self.cfg);
        m.load_kernel(files, &cfg.server.kexec_exe, cfg.restore.enable_quick_kexec)
            .map_err(Abort::Kernel)?;
        self.advance(Phase::KernelLoaded)?;
        self.prepare_images()?;
        // Asked before the freeze: criu's probe is a run of its own, no part of the downtime.
        let nftables_lock = self.network_lock_support();
        if cfg.restore.pre_dump || cfg.restore.lazy_restore {
            self.name_small_targets();
        }
        if cfg.restore.pre_dump {
            // A stop asked for meanwhile cancels the passes and then the update, at the freeze.
            self.pre_dump_targets();
        }
        if cfg.restore.restore_net {
            // Before the freeze: a failure costs no downtime, and criu's network locks (made
            // during the dumps) are not there to be mistaken for the operator's rules. It is
            // committed with the images (same directory, same syncfs) and restored only then.
            let saved = crate::net::save(m, &cfg.server.criu_dir).map_err(Abort::Network)?;
            self.r
                .message(format!("network configuration saved: {}", saved.summary()));
        }
        if cfg.restore.enable_pin_memory {
            m.pin_memory(PinOp::Clear).map_err(Abort::PinMemory)?;
        }
        self.advance(Phase::Frozen)?;
        self.dump_targets(nftables_lock)?;
        if cfg.restore.enable_pin_memory {
            m.pin_memory(PinOp::Finish).map_err(Abort::PinMemory)?;
        }
        self.advance(Phase::Dumped)?;
        // Images that are not on stable storage must never be committed: a power cut after the
        // commit would leave a journal promising images that are not there.
        m.make_durable(&cfg.server.criu_dir)
            .map_err(|source| Abort::Durability {
                dir: cfg.server.criu_dir.clone(),
                source,
            })?;
        self.advance(Phase::Committed)?;
        match cfg.server.kexec_mode {
            KexecMode::Immediate => {
                self.r
                    .message(format!("switching to {} now", files.version));
                Err(Abort::Jump(m.kexec()))
            }
            KexecMode::Orderly => {
                self.r.message(format!(
                    "handing the switch to {} to systemd (orderly kexec)",
                    files.version
                ));
                let of = |kind| self.j.targets.iter().filter(move |t| t.kind == kind);
                let units: Vec<String> = of(TargetKind::Service).map(|t| t.name.clone()).collect();
                let pids: Vec<i32> = of(TargetKind::Pid).map(|t| t.pid).collect();
                m.orderly_kexec(&units, &pids).map_err(Abort::Handover)
            }
        }
    }

    /// Creates every target's image directory.
    fn prepare_images(&self) -> Result<(), Abort> {
        for t in &self.j.targets {
            prepare_image_dir(&image_dir(self.cfg, t), &t.name).map_err(|e| Abort::Dump {
                target: format!("{} (pid {})", t.name, t.pid),
                why: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Pre-dumps every target in parallel while they run (see [`pre_dump`]), recording each
    /// one's passes. A target whose passes fail is dumped in full: the passes only save time.
    fn pre_dump_targets(&mut self) {
        let (m, cfg, r) = (self.m, self.cfg, self.r);
        let criu = Criu::new(&cfg.server.criu_exe).cancellable(Arc::clone(self.stop));
        let passed = |t: &Target| !crate::config::small_target(t.rss_bytes);
        for t in self.j.targets.iter().filter(|t| passed(t)) {
            r.target(t, "pre-dumping", None);
        }
        let results: Vec<_> = std::thread::scope(|s| {
            let runs: Vec<_> = self
                .j
                .targets
                .iter()
                .map(|t| {
                    let criu = &criu;
                    passed(t).then(|| {
                        s.spawn(move || {
                            let opts = dump_options(cfg, t);
                            pre_dump::run(m, criu, t.pid, &image_dir(cfg, t), &opts)
                        })
                    })
                })
                .collect();
            runs.into_iter().map(|h| h.map(|h| h.join())).collect()
        });
        for (t, res) in self.j.targets.iter_mut().zip(results) {
            let Some(res) = res else { continue };
            // A panicking pass is a failed pass like any other: the passes only save time.
            match res
                .map_err(panic_text)
                .and_then(|r| r.map_err(|e| e.to_string()))
            {
                Ok(passes) => {
                    r.target(t, "pre-dumped", Some(pre_dump::describe(&passes)));
                    t.pre_dump = passes;
                }
                Err(why) => {
                    r.target(
                        t,
                        "pre-dump failed",
                        Some(format!("{why}; dumping it in full")),
                    );
                    discard_pre_dumps(&image_dir(cfg, t));
                }
            }
        }
    }

    /// Names the targets that `pre_dump` and `lazy_restore` leave out for their size
    /// ([`crate::config::SMALL_TARGET_BYTES`]).
    fn name_small_targets(&self) {
        let small: Vec<String> = (self.j.targets.iter())
            .filter(|t| crate::config::small_target(t.rss_bytes))
            .map(|t| format!("{} ({})", t.name, crate::policy::human_bytes(t.rss_bytes)))
            .collect();
        if !small.is_empty() {
            self.r.message(format!(
                "{} dumped and restored in full: under {} MiB resident, pre-dump passes and a lazy restore cost a target more than they save",
                small.join(", "),
                crate::config::SMALL_TARGET_BYTES >> 20
            ));
        }
    }

    /// Whether criu can lock the targets' connections with nftables, probed once per update:
    /// with nftables, the lock outlives the kexec (see `tcp`).
    fn network_lock_support(&self) -> bool {
        let criu = Criu::new(&self.cfg.server.criu_exe);
        match self.m.nftables_lock_support(&criu) {
            Ok(()) => true,
            Err(why) => {
                self.r.message(format!(
                    "criu cannot lock the network with nftables here ({why}): established TCP connections of the targets are locked with criu's default, iptables (the iptables program must be installed), on this kernel only; a segment a peer sends after the new kernel's network is up and before the restore gets a reset"
                ));
                false
            }
        }
    }

    /// Dumps every target, recording each result; the first failure aborts the update.
    fn dump_targets(&mut self, nftables_lock: bool) -> Result<(), Abort> {
        let cfg = self.cfg;
        let criu = Criu::new(&cfg.server.criu_exe).cancellable(Arc::clone(self.stop));
        let results = dump_all(self.m, cfg, &criu, &self.j.targets, self.r, nftables_lock);
        let mut first_failure = None;
        for (t, res) in self.j.targets.iter_mut().zip(results) {
            match res {
                Ok(dumped) => {
                    t.state = TargetState::Dumped;
                    t.dump_ms = Some(dumped.ms);
                    // The tree is stopped now: this is exactly what the restore must find free.
                    t.tree_ids = self.m.tree_ids(t.pid);
                }
                Err(why) => {
                    let why = match why {
                        DumpFailure::Criu(e) => describe_dump_failure(cfg, t, &e),
                        DumpFailure::Panicked(p) => format!("internal error: {p}"),
                    };
                    t.state = TargetState::Failed(why.clone());
                    first_failure.get_or_insert(Abort::Dump {
                        target: format!("{} (pid {})", t.name, t.pid),
                        why,
                    });
                }
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Resumes every target's whole tree, removes the images, unloads the kernel and records
    /// why. Returns what it did, for the error message. Runs once.
    pub fn roll_back(&mut self, reason: &str) -> String {
        self.finished = true;
        let mut problems = undo(self.m, self.cfg, &mut self.j, self.r);
        if self.j.phase >= Phase::KernelLoaded {
            if let Err(e) = self.m.unload_kernel() {
                problems.push(e.to_string());
            }
        }
        let resumed = self
            .j
            .targets
            .iter()
            .filter(|t| t.state == TargetState::Resumed)
            .count();
        let undone = if problems.is_empty() {
            format!(
                "every target is running again on the old kernel ({resumed} resumed) and no images were kept"
            )
        } else {
            format!("{resumed} target(s) resumed, but: {}", problems.join("; "))
        };
        self.j.error = Some(format!("{reason}; {undone}"));
        let boot = self.boot.clone();
        // A journal that cannot be written stays at its last phase: the next server start on
        // this boot resumes (harmlessly: everything already runs) and records the rollback.
        let saved = self
            .j
            .advance(Phase::RolledBack, &boot)
            .map_err(|e| e.to_string())
            .and_then(|_| {
                self.j
                    .save(&self.cfg.server.criu_dir)
                    .map_err(|e| e.to_string())
            });
        match saved {
            Ok(()) => self.r.phase(Phase::RolledBack),
            Err(e) => self.r.message(format!(
                "the rollback could not be recorded ({e}); the next start of the nvwa server records it"
            )),
        }
        undone
    }
}

impl Drop for UpdateRun<'_, '_> {
    fn drop(&mut self) {
        if !self.finished {
            let why = if std::thread::panicking() {
                "internal error: the update panicked"
            } else {
                "internal error: the update ended without a result"
            };
            tracing::error!("{why}; rolling back");
            self.roll_back(why);
        }
    }
}

/// Puts every target back into service on this kernel, whatever its recorded state: its whole
/// live tree (the ids recorded at dump time and its current ones) gets SIGCONT, after any criu
/// still working on it has finished. Then removes the images. Returns what went wrong.
pub(crate) fn undo(m: &dyn Machine, cfg: &Config, j: &mut Journal, r: &Reporter) -> Vec<String> {
    let mut problems = Vec::new();
    let committed = j.phase == Phase::Committed;
    for t in j.targets.iter_mut() {
        let dir = image_dir(cfg, t);
        wait_for_criu(m, &dir, r, t, cfg.server.dump_timeout_s);
        if m.procs().alive(t.pid) {
            let mut ids = t.tree_ids.clone();
            ids.extend(m.tree_ids(t.pid));
            ids.push(t.pid);
            ids.sort_unstable();
            ids.dedup();
            // A dumped tree's connections are still locked and in repair mode: a tree that
            // ran with them so would hang its peers.
            match m.release_network_lock(&dir, t.pid, &ids) {
                Ok(0) => {}
                Ok(n) => r.target(
                    t,
                    "unlocked",
                    Some(format!("{n} TCP connection(s) out of repair mode")),
                ),
                Err(e) => problems.push(format!(
                    "the TCP connections of {} (pid {}) may stay blocked: {e}",
                    t.name, t.pid
                )),
            }
            match m.resume(&ids) {
                Ok(()) => {
                    t.state = TargetState::Resumed;
                    r.target(t, "resumed", None);
                }
                Err(e) => {
                    let why = format!(
                        "{} (pid {}) could not be resumed: {e}; run `kill -CONT {}`",
                        t.name,
                        t.pid,
                        ids.iter().map(i32::to_string).collect::<Vec<_>>().join(" ")
                    );
                    r.target(t, "failed", Some(why.clone()));
                    problems.push(why.clone());
                    t.state = TargetState::Failed(why);
                }
            }
        } else if committed && dir.join("inventory.img").exists() {
            // Killed after the commit (an orderly jump that systemd then refused): its images
            // are complete and durable, so it comes back from them, here on the old kernel.
            let opts = crate::restore::pid_restore_options(cfg, t);
            match m.restore(&Criu::new(&cfg.server.criu_exe), &dir, &opts) {
                Ok(_) => {
                    t.state = TargetState::Resumed;
                    r.target(t, "restored on the old kernel", None);
                }
                Err(e) => {
                    let why = format!(
                        "{} (pid {}) was killed for the jump and could not be restored from its images: {e}; they are kept in {}",
                        t.name,
                        t.pid,
                        dir.display()
                    );
                    r.target(t, "failed", Some(why.clone()));
                    problems.push(why.clone());
                    t.state = TargetState::Failed(why);
                    continue;
                }
            }
        } else if t.state != TargetState::Pending {
            let why = format!("{} (pid {}) is no longer running", t.name, t.pid);
            problems.push(why.clone());
            t.state = TargetState::Failed(why);
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                problems.push(format!("cannot remove {}: {e}", dir.display()))
            }
            _ => {}
        }
    }
    if let Err(e) = crate::net::remove_state(&cfg.server.criu_dir) {
        problems.push(format!(
            "cannot remove {}: {e}",
            cfg.server.criu_dir.join(crate::net::NET_DIR).display()
        ));
    }
    problems
}

/// A criu left behind by a server that died mid-dump still has the tree seized: resuming it under
/// criu's feet would break the dump's parasite. Wait for it, within a dump deadline.
fn wait_for_criu(m: &dyn Machine, dir: &Path, r: &Reporter, t: &Target, configured: Option<u64>) {
    let deadline = std::time::Instant::now() + criu_deadline(configured, t.rss_bytes);
    let mut told = false;
    loop {
        let busy = m.criu_working_on(dir);
        if busy.is_empty() {
            return;
        }
        if std::time::Instant::now() >= deadline {
            r.message(format!(
                "criu (pid {busy:?}) still works on {} after its deadline; stopping it",
                dir.display()
            ));
            for p in busy {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return;
        }
        if !told {
            r.target(
                t,
                "waiting",
                Some(format!("criu (pid {busy:?}) is still dumping it")),
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fresh, private image directory carrying nvwa's marker.
fn prepare_image_dir(dir: &Path, name: &str) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::fs::write(dir.join(IMAGE_MARKER), name)
}

enum DumpFailure {
    Criu(CriuError),
    Panicked(String),
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a dump thread panicked".into())
}

/// Removes the passes of a target whose pre-dump failed: the dump starts from scratch.
fn discard_pre_dumps(images: &Path) {
    for n in 1..=pre_dump::MAX_PASSES {
        let _ = std::fs::remove_dir_all(pre_dump::pass_dir(images, n));
    }
}

/// How criu dumps (and pre-dumps) target `t`.
fn dump_options(cfg: &Config, t: &Target) -> DumpOptions {
    DumpOptions {
        pin_memory: cfg.restore.enable_pin_memory,
        deadline: criu_deadline(cfg.server.dump_timeout_s, t.rss_bytes),
        // stdout and stderr usually share one stream: name each socket once.
        external_unix: t
            .service
            .iter()
            .flat_map(|s| s.streams.iter().map(|st| st.inode))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        external_files: t
            .service
            .iter()
            .flat_map(|s| s.external_files.iter().map(|f| f.criu_key()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
        enter_ns_of: t.service.as_ref().filter(|s| s.sandboxed()).map(|_| t.pid),
        ignore_cgroups: t.service.as_ref().is_some_and(|s| !s.namespaces.is_empty()),
        prev_images: pre_dump::dump_parent(t.pre_dump.len()),
        // Chosen per target at the dump (`dump_one`); a pre-dump locks nothing.
        connections: Connections::Locked,
    }
}

/// A target's dump: its time, and how its TCP connections were treated.
struct Dumped {
    ms: u64,
    connections: Connections,
    /// A connection appeared in the tree between nvwa's look and criu's freeze: dumped again in
    /// full, its connections locked.
    again: bool,
}

impl Dumped {
    /// What the operator is told besides "dumped".
    fn detail(&self) -> String {
        let ms = self.ms;
        if self.again {
            return format!(
                "{ms} ms, the second time: a TCP connection appeared while criu froze the tree, so it was dumped again in full with its connections locked"
            );
        }
        match self.connections {
            Connections::LockedNftables => format!("{ms} ms, its TCP connections locked"),
            Connections::Refused => format!("{ms} ms, no TCP connection"),
            Connections::Locked => format!("{ms} ms"),
        }
    }
}

fn dump_one(
    m: &dyn Machine,
    cfg: &Config,
    criu: &Criu,
    t: &Target,
    nftables_lock: bool,
) -> Result<Dumped, DumpFailure> {
    // criu's nftables lock costs its libnftables calls even for a tree without connections, and
    // parallel dumps wait for each other's (16 parallel dumps of small processes under TCG:
    // 69 s with the lock, 7 s without). A tree without connections is dumped without them.
    let connections = if !nftables_lock {
        Connections::Locked
    } else if m.holds_tcp_connection(t.pid) {
        Connections::LockedNftables
    } else {
        Connections::Refused
    };
    let opts = DumpOptions {
        connections,
        ..dump_options(cfg, t)
    };
    let dir = image_dir(cfg, t);
    let dump = |opts: DumpOptions| {
        // A panic here must not skip the rollback of the others: it becomes this target's
        // failure.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            m.dump(criu, t.pid, &dir, opts)
        }))
        .map_err(|p| DumpFailure::Panicked(panic_text(p)))?
        .map_err(DumpFailure::Criu)
    };
    match dump(opts.clone()) {
        Err(DumpFailure::Criu(e)) if e.found_connection() => {
            // criu resumed the tree. Before it failed it may have dumped other processes of the
            // tree and cleared their soft-dirty bits: the pre-dumps no longer tell what changed
            // since, so the dump starts afresh and in full.
            crate::criu::clear_images(&dir).map_err(DumpFailure::Criu)?;
            let again = DumpOptions {
                connections: Connections::LockedNftables,
                prev_images: None,
                ..opts
            };
            dump(again).map(|ms| Dumped {
                ms,
                connections: Connections::LockedNftables,
                again: true,
            })
        }
        other => other.map(|ms| Dumped {
            ms,
            connections,
            again: false,
        }),
    }
}

fn dump_all(
    m: &dyn Machine,
    cfg: &Config,
    criu: &Criu,
    targets: &[Target],
    r: &Reporter,
    nftables_lock: bool,
) -> Vec<Result<Dumped, DumpFailure>> {
    // Pin memory is one shared area: the original dumps serially with it, and so do we.
    if cfg.restore.enable_pin_memory {
        return targets
            .iter()
            .map(|t| {
                r.target(t, "dumping", None);
                let res = dump_one(m, cfg, criu, t, nftables_lock);
                report_dump(r, t, &res);
                res
            })
            .collect();
    }
    // The reporter is not Send: threads hand their results back over a channel, and this thread
    // reports each one as it arrives.
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, t) in targets.iter().enumerate() {
            r.target(t, "dumping", None);
            let tx = tx.clone();
            s.spawn(move || {
                let _ = tx.send((i, dump_one(m, cfg, criu, t, nftables_lock)));
            });
        }
        drop(tx);
        let mut results: Vec<Option<Result<Dumped, DumpFailure>>> =
            targets.iter().map(|_| None).collect();
        for (i, res) in rx {
            report_dump(r, &targets[i], &res);
            results[i] = Some(res);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(DumpFailure::Panicked("a dump thread died".into()))))
            .collect()
    })
}

fn report_dump(r: &Reporter, t: &Target, res: &Result<Dumped, DumpFailure>) {
    match res {
        Ok(dumped) => r.target(t, "dumped", Some(dumped.detail())),
        Err(DumpFailure::Criu(e)) => r.target(t, "failed", Some(e.to_string())),
        Err(DumpFailure::Panicked(p)) => r.target(t, "failed", Some(p.clone())),
    }
}

/// The reason a dump failed, with its criu log copied out of the image directory that the
/// rollback is about to remove.
fn describe_dump_failure(cfg: &Config, t: &Target, e: &CriuError) -> String {
    let (CriuError::Failed { log, .. } | CriuError::TimedOut { log, .. }) = e else {
        return e.to_string();
    };
    let summary = match e {
        CriuError::Failed { summary, .. } => summary.clone(),
        other => other.to_string(),
    };
    match keep_log(&cfg.server.log_dir, &format!("dump-{}", t.name), log) {
        Some(path) => format!("{summary} (criu log kept at {})", path.display()),
        None => summary,
    }
}

fn keep_log(log_dir: &Path, stem: &str, log: &Path) -> Option<PathBuf> {
    let (wall, _) = crate::journal::now();
    trust::create_private_dir(log_dir, TrustedKind::LogDir).ok()?;
    let dest = log_dir.join(format!("{stem}-{wall}.log"));
    std::fs::copy(log, &dest).ok()?;
    Some(dest)
}

/// `nvwa init`: discard saved images, the journal and pinned memory. Only what nvwa made goes:
/// the journal's targets, and directories that carry nvwa's marker.
pub fn init(m: &dyn Machine, cfg: &Config) -> Result<String, UpdateError> {
    let dir = &cfg.server.criu_dir;
    let journal = Journal::load(dir)?;
    if let Some(j) = &journal {
        if j.phase.in_progress() {
            return Err(UpdateError::Busy(format!(
                "an update to {} is in progress (phase {}); `nvwa init` would destroy its images",
                j.to_kernel, j.phase
            )));
        }
    }
    let mut doomed: Vec<PathBuf> = journal
        .iter()
        .flat_map(|j| j.targets.iter().map(|t| image_dir(cfg, t)))
        .collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let marked = std::fs::read_to_string(p.join(IMAGE_MARKER))
                .is_ok_and(|name| e.file_name().to_str() == Some(name.trim()));
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && marked {
                doomed.push(p);
            }
        }
    }
    doomed.sort();
    doomed.dedup();
    let mut removed = 0;
    let mut unlocked = Vec::new();
    for p in doomed {
        // Their saved connections are gone with the images: so goes their network lock, which
        // the new boot put in place for a restore that will not happen.
        match crate::tcp::delete_saved(&p) {
            Ok(Some(table)) => unlocked.push(table),
            Ok(None) => {}
            Err(e) => unlocked.push(format!("(not {}: {e})", p.display())),
        }
        match std::fs::remove_dir_all(&p) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(UpdateError::RemoveImages { path: p, source }),
        }
    }
    let _ = std::fs::remove_file(Journal::path(dir));
    let pinned = if cfg.restore.enable_pin_memory {
        m.pin_memory(PinOp::Clear)
            .map_err(UpdateError::ClearPinned)?;
        ", cleared pinned memory"
    } else {
        ""
    };
    let unlocked = if unlocked.is_empty() {
        String::new()
    } else {
        format!(", deleted the network lock(s) {}", unlocked.join(", "))
    };
    Ok(format!(
        "removed {removed} image set(s) and the journal from {}{pinned}{unlocked}",
        dir.display()
    ))
}
