//! `nvwa update <version>`: the all-or-nothing pipeline.
//!
//! planned → kernel_loaded → frozen → dumped → committed → kexec
//!
//! The kernel is loaded before anything is frozen, so a bad kernel never costs downtime. Every
//! target is dumped with `--leave-stopped`: until the commit, each one is still a live (stopped)
//! process that can be resumed. Any failure before the kernel switch resumes every target,
//! removes the partial images and unloads the kernel: a failed update never loses a process.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::boot::{self, BootError, KernelFiles};
use crate::config::{Config, ConfigError};
use crate::criu::{Criu, CriuError, DumpOptions};
use crate::journal::{Journal, JournalError, Phase, Target, TargetKind, TargetState};
use crate::kexec::KexecError;
use crate::machine::{Machine, PinOp};
use crate::protocol::Progress;

pub use crate::daemon::{Daemon, DaemonError};

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
    #[error("{0}")]
    Restore(String),
    #[error("cannot remove the image set {path}: {source}")]
    RemoveImages {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot clear pinned memory: {0}")]
    ClearPinned(crate::pinmem::PinMemError),
    #[error("pid {pid} listed in {file} is not running; remove it from the file or start the process, then retry")]
    TargetGone { pid: i32, file: PathBuf },
    #[error("pid {pid} listed in {file} cannot be checkpointed: {why}")]
    BadTarget {
        pid: i32,
        file: PathBuf,
        why: String,
    },
    #[error("systemd services ({0}) are not supported by this nvwa yet; list their main pids under `pids:` or remove them from `services:`")]
    ServicesUnsupported(String),
    #[error("restore_net: true in {0} is not supported by this nvwa yet (the network configuration would not be carried over); set it to false")]
    RestoreNetUnsupported(PathBuf),
    #[error(
        "update to {version} abandoned, every target is running again on the old kernel: {cause}"
    )]
    Abandoned { version: String, cause: Abort },
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
    #[error("the jump into the new kernel failed: {0}")]
    Jump(KexecError),
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

fn advance(j: &mut Journal, cfg: &Config, phase: Phase, r: &Reporter) -> Result<(), JournalError> {
    j.advance(phase)?;
    j.save(&cfg.server.criu_dir)?;
    r.phase(phase);
    Ok(())
}

/// Turns the configured pids into targets, refusing anything that cannot be preserved.
pub(crate) fn plan_targets(m: &dyn Machine, cfg: &Config) -> Result<Vec<Target>, UpdateError> {
    let file = cfg.dir.join(crate::config::RESTORE_FILE);
    if cfg.restore.restore_net {
        return Err(UpdateError::RestoreNetUnsupported(file));
    }
    if !cfg.restore.services.is_empty() {
        return Err(UpdateError::ServicesUnsupported(
            cfg.restore.services.join(", "),
        ));
    }
    let me = std::process::id() as i32;
    let mut pids = cfg.restore.pids.clone();
    pids.sort_unstable();
    pids.dedup();
    for &pid in &pids {
        let bad = |why: String| UpdateError::BadTarget {
            pid,
            file: file.clone(),
            why,
        };
        if !m.alive(pid) {
            return Err(UpdateError::TargetGone {
                pid,
                file: file.clone(),
            });
        }
        if pid == 1 {
            return Err(bad(
                "it is init; only its descendants can be preserved".into()
            ));
        }
        if m.is_ancestor(pid, me) {
            return Err(bad(format!(
                "it is the nvwa server or one of its ancestors ({})",
                m.describe(pid)
            )));
        }
        if let Some(&outer) = pids.iter().find(|&&o| o != pid && m.is_ancestor(o, pid)) {
            return Err(bad(format!(
                "it is inside the tree of pid {outer}, which is listed too and already includes it; list only the root"
            )));
        }
    }
    Ok(pids
        .into_iter()
        .map(|pid| Target {
            name: pid.to_string(),
            kind: TargetKind::Pid,
            pid,
            tree_ids: m.tree_ids(pid),
            rss_bytes: m.tree_rss_bytes(pid),
            state: TargetState::Pending,
            dump_ms: None,
            restore_ms: None,
            running_again_wall_ms: None,
        })
        .collect())
}

/// Refuses to start while another update owns the machine or saved images await a restore.
pub fn ensure_idle(cfg: &Config) -> Result<(), UpdateError> {
    match Journal::load(&cfg.server.criu_dir)? {
        Some(j) if j.phase.in_progress() => Err(UpdateError::Busy(format!(
            "an update to {} is in progress (phase {}); wait for it, or check `nvwa status`",
            j.to_kernel, j.phase
        ))),
        Some(j) if j.phase == Phase::Failed => Err(UpdateError::Busy(format!(
            "the last update to {} left images that were not restored ({}); restart the nvwa server to retry the restore, or run `nvwa init` to discard them",
            j.to_kernel,
            j.error.as_deref().unwrap_or("see nvwa status")
        ))),
        _ => Ok(()),
    }
}

pub fn run(
    m: &dyn Machine,
    cfg: &Config,
    version: &str,
    r: &Reporter,
) -> Result<String, UpdateError> {
    boot::validate_version(version)?;
    let files = m.find_kernel(version)?;
    ensure_idle(cfg)?;
    let targets = plan_targets(m, cfg)?;
    let mut j = Journal::new(&m.running_kernel(), version, targets);
    for t in &j.targets {
        // Leftovers of an older run would mix with the new images.
        let _ = std::fs::remove_dir_all(image_dir(cfg, t));
    }
    j.save(&cfg.server.criu_dir)?;
    r.phase(Phase::Planned);
    r.message(format!(
        "{} → {} ({}), {} target(s)",
        j.from_kernel,
        version,
        files.image.display(),
        j.targets.len()
    ));

    let Err(cause) = switch(m, cfg, &mut j, &files, r);
    let err = UpdateError::Abandoned {
        version: version.into(),
        cause,
    };
    roll_back(m, cfg, &mut j, &err.to_string(), r)?;
    Err(err)
}

/// Everything from loading the kernel to the jump. It only returns if something failed, with
/// every target still alive (stopped or running) for the rollback to resume.
fn switch(
    m: &dyn Machine,
    cfg: &Config,
    j: &mut Journal,
    files: &KernelFiles,
    r: &Reporter,
) -> Result<std::convert::Infallible, Abort> {
    m.load_kernel(files, &cfg.server.kexec_exe, cfg.restore.enable_quick_kexec)
        .map_err(Abort::Kernel)?;
    advance(j, cfg, Phase::KernelLoaded, r)?;
    if cfg.restore.enable_pin_memory {
        m.pin_memory(PinOp::Clear).map_err(Abort::PinMemory)?;
    }
    advance(j, cfg, Phase::Frozen, r)?;
    dump_targets(m, cfg, j, r)?;
    if cfg.restore.enable_pin_memory {
        m.pin_memory(PinOp::Finish).map_err(Abort::PinMemory)?;
    }
    advance(j, cfg, Phase::Dumped, r)?;
    m.sync();
    advance(j, cfg, Phase::Committed, r)?;
    m.sync();
    r.message(format!("switching to {} now", files.version));
    Err(Abort::Jump(m.kexec()))
}

/// Dumps every target, recording each result; the first failure aborts the update.
fn dump_targets(m: &dyn Machine, cfg: &Config, j: &mut Journal, r: &Reporter) -> Result<(), Abort> {
    let criu = Criu::new(&cfg.server.criu_exe);
    let opts = DumpOptions {
        pin_memory: cfg.restore.enable_pin_memory,
    };
    let results = dump_all(m, cfg, &criu, opts, &j.targets, r);
    let mut first_failure = None;
    for (t, res) in j.targets.iter_mut().zip(results) {
        match res {
            Ok(ms) => {
                t.state = TargetState::Dumped;
                t.dump_ms = Some(ms);
                // The tree is stopped now: this is exactly what the restore must find free.
                t.tree_ids = m.tree_ids(t.pid);
            }
            Err(e) => {
                let why = describe_dump_failure(cfg, t, &e);
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

fn dump_all(
    m: &dyn Machine,
    cfg: &Config,
    criu: &Criu,
    opts: DumpOptions,
    targets: &[Target],
    r: &Reporter,
) -> Vec<Result<u64, CriuError>> {
    // Pin memory is one shared area: the original dumps serially with it, and so do we.
    if opts.pin_memory {
        return targets
            .iter()
            .map(|t| {
                r.target(t, "dumping", None);
                let res = m.dump(criu, t.pid, &image_dir(cfg, t), opts);
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
                let _ = tx.send((i, m.dump(criu, t.pid, &image_dir(cfg, t), opts)));
            });
        }
        drop(tx);
        let mut results: Vec<Option<Result<u64, CriuError>>> =
            targets.iter().map(|_| None).collect();
        for (i, res) in rx {
            report_dump(r, &targets[i], &res);
            results[i] = Some(res);
        }
        results
            .into_iter()
            .map(|r| r.expect("every dump thread reports"))
            .collect()
    })
}

fn report_dump(r: &Reporter, t: &Target, res: &Result<u64, CriuError>) {
    match res {
        Ok(ms) => r.target(t, "dumped", Some(format!("{ms} ms"))),
        Err(e) => r.target(t, "failed", Some(e.to_string())),
    }
}

/// The reason a dump failed, with its criu log copied out of the image directory that the
/// rollback is about to remove.
fn describe_dump_failure(cfg: &Config, t: &Target, e: &CriuError) -> String {
    let CriuError::Failed { summary, log, .. } = e else {
        return e.to_string();
    };
    let kept = keep_log(&cfg.server.log_dir, &format!("dump-{}", t.name), log);
    match kept {
        Some(path) => format!("{summary} (criu log kept at {})", path.display()),
        None => summary.clone(),
    }
}

fn keep_log(log_dir: &Path, stem: &str, log: &Path) -> Option<PathBuf> {
    let (wall, _) = crate::journal::now();
    std::fs::create_dir_all(log_dir).ok()?;
    let dest = log_dir.join(format!("{stem}-{wall}.log"));
    std::fs::copy(log, &dest).ok()?;
    Some(dest)
}

/// Resumes every stopped target, removes the images and unloads the kernel.
fn roll_back(
    m: &dyn Machine,
    cfg: &Config,
    j: &mut Journal,
    reason: &str,
    r: &Reporter,
) -> Result<(), UpdateError> {
    for t in j.targets.iter_mut() {
        if t.state == TargetState::Dumped {
            let ids = if t.tree_ids.is_empty() {
                vec![t.pid]
            } else {
                t.tree_ids.clone()
            };
            match m.resume(&ids) {
                Ok(()) => {
                    t.state = TargetState::Resumed;
                    r.target(t, "resumed", None);
                }
                Err(e) => {
                    let why = format!("could not be resumed: {e}; run `kill -CONT {}`", t.pid);
                    r.target(t, "failed", Some(why.clone()));
                    t.state = TargetState::Failed(why);
                }
            }
        }
        let _ = std::fs::remove_dir_all(image_dir(cfg, t));
    }
    m.unload_kernel();
    j.error = Some(reason.to_string());
    Ok(advance(j, cfg, Phase::RolledBack, r)?)
}

/// `nvwa init`: discard saved images, the journal and pinned memory.
pub fn init(m: &dyn Machine, cfg: &Config) -> Result<String, UpdateError> {
    let dir = &cfg.server.criu_dir;
    if let Some(j) = Journal::load(dir)? {
        if j.phase.in_progress() {
            return Err(UpdateError::Busy(format!(
                "an update to {} is in progress (phase {}); `nvwa init` would destroy its images",
                j.to_kernel, j.phase
            )));
        }
    }
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.join("inventory.img").exists() || p.join(crate::criu::DUMP_LOG).exists() {
                std::fs::remove_dir_all(&p)
                    .map_err(|source| UpdateError::RemoveImages { path: p, source })?;
                removed += 1;
            }
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
    Ok(format!(
        "removed {removed} image set(s) and the journal from {}{pinned}",
        dir.display()
    ))
}
