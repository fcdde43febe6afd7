//! The one policy for "can this update preserve these targets?", used by `nvwa update` (which
//! refuses on the first [`Refusal`]) and by `nvwa check` (which reports every one of them).
//!
//! The rules read the machine only through [`ProcView`] and [`FsView`], so every rule is
//! unit-tested with doubles; [`RealProcs`] and [`RealFs`] are the machine nvwa runs on.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::{Config, RESTORE_FILE, SERVER_FILE};
use crate::process;

/// What the policy needs to know about processes (implemented for the real /proc and by test
/// doubles).
pub trait ProcView {
    /// Whether `pid` names a live process or thread.
    fn alive(&self, pid: i32) -> bool;
    fn parent(&self, pid: i32) -> Option<i32>;
    /// The process (thread group) that the thread `pid` belongs to.
    fn tgid(&self, pid: i32) -> Option<i32>;
    fn is_kernel_thread(&self, pid: i32) -> bool;
    /// `comm (pid N)`, or `pid N` when it cannot be read, for messages.
    fn describe(&self, pid: i32) -> String;
    /// Resident memory of the process tree rooted at `pid`, in bytes: what its images will hold.
    fn tree_rss_bytes(&self, pid: i32) -> u64;
    /// The namespaces (mnt, uts, ipc, net, pid, user, cgroup) in which `pid` is apart from
    /// PID 1. Time namespaces are left out: criu gives every restored process one of its own.
    fn own_namespaces(&self, _pid: i32) -> Vec<&'static str> {
        Vec::new()
    }
}

/// The processes of this machine, read from /proc by [`crate::process`].
pub struct RealProcs;

impl ProcView for RealProcs {
    /// A zombie is not alive: it cannot be resumed, dumped or restored into.
    fn alive(&self, pid: i32) -> bool {
        process::alive(pid) && !matches!(process::state(pid), Some('Z' | 'X') | None)
    }
    fn parent(&self, pid: i32) -> Option<i32> {
        process::parent(pid)
    }
    fn tgid(&self, pid: i32) -> Option<i32> {
        process::tgid(pid)
    }
    fn is_kernel_thread(&self, pid: i32) -> bool {
        process::is_kernel_thread(pid)
    }
    fn describe(&self, pid: i32) -> String {
        process::describe(pid)
    }
    fn tree_rss_bytes(&self, pid: i32) -> u64 {
        process::tree_rss_bytes(pid)
    }
    fn own_namespaces(&self, pid: i32) -> Vec<&'static str> {
        process::own_namespaces(pid)
    }
}

/// What the policy needs to know about the filesystem that will hold the images.
pub trait FsView {
    /// Bytes available to unprivileged users on the filesystem that holds (or would hold) `path`.
    fn free_bytes(&self, path: &Path) -> io::Result<u64>;
    /// `f_type` of statfs(2) for that filesystem.
    fn fs_magic(&self, path: &Path) -> io::Result<i64>;
    /// Whether `path` is (or would be created) on the filesystem mounted at `/`.
    fn on_root_fs(&self, path: &Path) -> io::Result<bool>;
    /// Whether the file `path` exists.
    fn exists(&self, path: &Path) -> bool;
}

/// The filesystems of this machine. `criu_dir` may not exist yet (the update creates it), so
/// both questions are asked of its nearest existing ancestor, which is where it will be made.
pub struct RealFs;

impl RealFs {
    fn nearest_existing(path: &Path) -> PathBuf {
        let fallback = if path.is_absolute() { "/" } else { "." };
        path.ancestors()
            .find(|p| !p.as_os_str().is_empty() && p.exists())
            .unwrap_or(Path::new(fallback))
            .to_path_buf()
    }
}

impl FsView for RealFs {
    fn free_bytes(&self, path: &Path) -> io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(&Self::nearest_existing(path))?;
        #[allow(clippy::unnecessary_cast)] // the field types differ between libcs
        let bytes = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
        Ok(bytes)
    }

    fn fs_magic(&self, path: &Path) -> io::Result<i64> {
        let st = nix::sys::statfs::statfs(&Self::nearest_existing(path))?;
        #[allow(clippy::unnecessary_cast)] // the field type differs between libcs and arches
        Ok(st.filesystem_type().0 as i64)
    }

    fn on_root_fs(&self, path: &Path) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(Self::nearest_existing(path))?.dev();
        Ok(dev == std::fs::metadata("/")?.dev())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// statfs(2) magic numbers of the memory filesystems, whose contents a kexec discards.
pub const TMPFS_MAGIC: i64 = 0x0102_1994;
pub const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Why a target or a configuration cannot be preserved. Every message names the pid (or the
/// file or directory), says why, and ends with the fix; `check` shows [`Refusal::problem`] and
/// [`Refusal::fix`] apart.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("{}; {}", self.problem(), self.fix())]
pub enum Refusal {
    /// No such process (or it exited).
    NotRunning { pid: i32, file: PathBuf },
    /// Pid 1: criu cannot checkpoint init, only its descendants.
    Init { what: String, file: PathBuf },
    /// A kernel thread (pid 2 or PF_KTHREAD): no user memory to save, recreated by every kernel.
    KernelThread {
        pid: i32,
        what: String,
        file: PathBuf,
    },
    /// A thread id that is not a thread-group leader: criu dumps whole processes.
    NotThreadLeader {
        pid: i32,
        tgid: i32,
        what: String,
        file: PathBuf,
    },
    /// `me` itself or one of its ancestors: freezing it would freeze nvwa.
    NvwaOrAncestor {
        pid: i32,
        me: i32,
        what: String,
        file: PathBuf,
    },
    /// Inside the tree of another listed pid, whose dump already holds it.
    Nested {
        pid: i32,
        outer: i32,
        what: String,
        file: PathBuf,
    },
    /// Services are listed but `criu_dir` is not on the root filesystem, where nvwa's generator
    /// looks at boot (before other filesystems are mounted).
    ServicesNeedRootFs { dir: PathBuf },
    /// Services are listed but nvwa's systemd generator is not installed.
    GeneratorMissing { path: PathBuf },
    /// systemd could not be asked about a listed service.
    ServiceQuery { unit: String, error: String },
    /// A listed service whose main process lives in namespaces of its own (its unit's sandbox).
    ServiceSandboxed {
        unit: String,
        namespaces: Vec<&'static str>,
    },
    /// A listed pid inside a listed service's main tree (or the reverse).
    ServiceOverlap { unit: String, pid: i32 },
    /// Neither pids nor services: an update would switch kernels with nothing saved.
    NothingListed { file: PathBuf },
    /// `pre_dump` and `enable_pin_memory` both set: pin memory takes the pages at the freeze.
    PreDumpWithPinMemory { file: PathBuf },
    /// `criu_dir` is on a memory filesystem, emptied by the kernel switch.
    VolatileImageStore { dir: PathBuf, fs: &'static str },
    /// Less free space than the images need.
    NotEnoughSpace {
        dir: PathBuf,
        needed: u64,
        free: u64,
    },
    /// The filesystem of `criu_dir` cannot be measured (statfs/statvfs failed).
    ImageStoreUnknown { dir: PathBuf, error: String },
    /// A listed service name that is not a service unit name.
    ServiceName {
        error: crate::systemd::UnitNameError,
    },
    /// A listed service without a running main process.
    ServiceNotRunning {
        unit: String,
        state: String,
        file: PathBuf,
    },
    /// A service type whose main process nvwa cannot hand back to systemd.
    ServiceType {
        unit: String,
        kind: String,
        file: PathBuf,
    },
    /// Processes of the service's cgroup outside its main process's tree: a dump of that tree
    /// would lose them.
    ServiceStrays {
        unit: String,
        main: String,
        strays: Vec<String>,
    },
}

impl Refusal {
    /// What is wrong, naming the pid, the file or the directory.
    pub fn problem(&self) -> String {
        match self {
            Refusal::NotRunning { pid, file } => {
                format!("pid {pid} listed in {} is not running", file.display())
            }
            Refusal::Init { what, file } => format!(
                "{what} listed in {} is init; criu cannot checkpoint pid 1, only its descendants",
                file.display()
            ),
            Refusal::KernelThread { what, file, .. } => format!(
                "{what} listed in {} is a kernel thread; it has no user memory to save and every kernel starts its own",
                file.display()
            ),
            Refusal::NotThreadLeader {
                pid,
                tgid,
                what,
                file,
            } => format!(
                "{what} listed in {} is a thread of process {tgid}, not a process; criu checkpoints whole processes, not thread {pid}",
                file.display()
            ),
            Refusal::NvwaOrAncestor { me, what, file, .. } => format!(
                "{what} listed in {} is nvwa itself (pid {me}) or one of its ancestors; checkpointing it would freeze nvwa in the middle of the update",
                file.display()
            ),
            Refusal::Nested {
                outer, what, file, ..
            } => format!(
                "{what} listed in {} is inside the tree of pid {outer}, which is listed too and whose dump already includes it",
                file.display()
            ),
            Refusal::ServicesNeedRootFs { dir } => format!(
                "services are listed but criu_dir {} is not on the root filesystem; the next boot hands each service to nvwa from a systemd generator, which runs before other filesystems are mounted",
                dir.display()
            ),
            Refusal::GeneratorMissing { path } => format!(
                "services are listed but nvwa's systemd generator {} is missing; without it the next boot would start them afresh instead of restoring them",
                path.display()
            ),
            Refusal::ServiceQuery { unit, error } => {
                format!("cannot ask systemd about service {unit}: {error}")
            }
            Refusal::ServiceSandboxed { unit, namespaces } => format!(
                "service {unit} runs in namespaces of its own that nvwa cannot carry over ({}), made by its unit's PrivateNetwork=, PrivateIPC=, PrivatePIDs=, ProtectControlGroups=private or the like; nvwa preserves services whose own namespaces are among mount, UTS and user (PrivateTmp=, ProtectSystem=, ProtectHostname=, PrivateUsers=)",
                namespaces.join(", ")
            ),
            Refusal::ServiceOverlap { unit, pid } => format!(
                "pid {pid} is listed under `pids:` and is in the process tree of service {unit}, whose dump already includes it"
            ),
            Refusal::PreDumpWithPinMemory { file } => format!(
                "pre_dump and enable_pin_memory are both true in {}: pin memory keeps the pages in place at the freeze, so there is nothing for pre-dump passes to copy ahead",
                file.display()
            ),
            Refusal::NothingListed { file } => format!(
                "nothing to preserve: no pids and no services are listed in {}, so an update would switch kernels with nothing saved",
                file.display()
            ),
            Refusal::VolatileImageStore { dir, fs } => format!(
                "criu_dir {} is on {fs}: its contents are lost at the kernel switch",
                dir.display()
            ),
            Refusal::NotEnoughSpace { dir, needed, free } => format!(
                "not enough space for the images in {}: they need about {} (resident memory + 10% + 16 MiB) but only {} is free",
                dir.display(),
                human_bytes(*needed),
                human_bytes(*free)
            ),
            Refusal::ImageStoreUnknown { dir, error } => format!(
                "cannot measure the filesystem that holds criu_dir {}: {error}",
                dir.display()
            ),
            Refusal::ServiceName { error } => error.to_string(),
            Refusal::ServiceNotRunning { unit, state, file } => format!(
                "service {unit} listed in {} has no running main process ({state})",
                file.display()
            ),
            Refusal::ServiceType { unit, kind, file } => format!(
                "service {unit} listed in {} is Type={kind}; only simple, exec, forking and notify services have a main process to preserve",
                file.display()
            ),
            Refusal::ServiceStrays { unit, main, strays } => format!(
                "service {unit} runs processes outside the tree of its main process {main}: {}; a checkpoint of that tree would lose them",
                strays.join(", ")
            ),
        }
    }

    /// What the operator should do about it.
    pub fn fix(&self) -> String {
        match self {
            Refusal::NotRunning { .. } => {
                "start the process and list its new pid, or remove it from `pids:`; then retry"
                    .to_string()
            }
            Refusal::Init { .. } => {
                "remove 1 from `pids:` and list the processes to keep instead".to_string()
            }
            Refusal::KernelThread { pid, .. } | Refusal::NvwaOrAncestor { pid, .. } => {
                format!("remove {pid} from `pids:`")
            }
            Refusal::NotThreadLeader { pid, tgid, .. } => {
                format!("list its process, pid {tgid}, instead of {pid} under `pids:`")
            }
            Refusal::Nested { pid, .. } => {
                format!("list only the root: remove {pid} from `pids:`")
            }
            Refusal::ServicesNeedRootFs { .. } => format!(
                "point criu_dir in {SERVER_FILE} to a directory on the root filesystem (the default /var/lib/nvwa), or list the services' main pids under `pids:` instead"
            ),
            Refusal::GeneratorMissing { .. } => {
                "reinstall nvwa (its package installs the generator)".to_string()
            }
            Refusal::ServiceQuery { unit, .. } => {
                format!("make sure `systemctl show {unit}` works, then retry")
            }
            Refusal::ServiceOverlap { pid, .. } => format!("remove {pid} from `pids:`"),
            Refusal::ServiceSandboxed { unit, .. } => format!(
                "remove {unit} from `services:`, or turn those namespaces off with a drop-in (`systemctl edit {unit}`) if its confinement allows"
            ),
            Refusal::NothingListed { file } => {
                format!("list the processes to keep in {}", file.display())
            }
            Refusal::PreDumpWithPinMemory { .. } => "set one of them to false".to_string(),
            Refusal::VolatileImageStore { .. } => {
                format!("put criu_dir (in {SERVER_FILE}) on a disk or persistent memory")
            }
            Refusal::NotEnoughSpace { .. } => format!(
                "free space on that filesystem, or point criu_dir in {SERVER_FILE} to a larger one"
            ),
            Refusal::ImageStoreUnknown { dir, .. } => format!(
                "check `df {}`, or point criu_dir in {SERVER_FILE} to a reachable directory",
                dir.display()
            ),
            Refusal::ServiceName { .. } => "correct it in `services:`".to_string(),
            Refusal::ServiceNotRunning { unit, .. } => {
                format!("`systemctl start {unit}`, or remove it from `services:`")
            }
            Refusal::ServiceType { unit, .. } => format!("remove {unit} from `services:`"),
            Refusal::ServiceStrays { unit, .. } => format!(
                "stop the extra processes (`systemd-cgls -u {unit}` shows them), or remove {unit} from `services:`"
            ),
        }
    }

    /// The listed pid this refusal is about, if it is about one.
    pub fn pid(&self) -> Option<i32> {
        match self {
            Refusal::NotRunning { pid, .. }
            | Refusal::KernelThread { pid, .. }
            | Refusal::NotThreadLeader { pid, .. }
            | Refusal::NvwaOrAncestor { pid, .. }
            | Refusal::Nested { pid, .. } => Some(*pid),
            Refusal::Init { .. } => Some(1),
            _ => None,
        }
    }
}

/// The file that lists the targets, for messages.
fn restore_file(cfg: &Config) -> PathBuf {
    cfg.dir.join(RESTORE_FILE)
}

/// Every configuration-level finding, in the order `update` reports them.
pub fn config_findings(cfg: &Config) -> Vec<Refusal> {
    let file = restore_file(cfg);
    let r = &cfg.restore;
    let mut out = Vec::new();
    if r.pre_dump && r.enable_pin_memory {
        out.push(Refusal::PreDumpWithPinMemory { file: file.clone() });
    }
    if r.pids.is_empty() && r.services.is_empty() {
        out.push(Refusal::NothingListed { file });
    }
    out
}

/// Whether the configuration lists anything at all and uses only supported features: the
/// first of [`config_findings`].
pub fn judge_config(cfg: &Config) -> Result<(), Refusal> {
    config_findings(cfg).into_iter().next().map_or(Ok(()), Err)
}

/// Whether this machine can hand listed services back to systemd on the next boot: nvwa's
/// generator is installed and finds the journal before other filesystems are mounted.
pub fn judge_service_support(cfg: &Config, fs: &dyn FsView) -> Result<(), Refusal> {
    if cfg.restore.services.is_empty() {
        return Ok(());
    }
    let generator = Path::new(crate::service::GENERATOR);
    if !fs.exists(generator) {
        return Err(Refusal::GeneratorMissing {
            path: generator.to_path_buf(),
        });
    }
    let dir = &cfg.server.criu_dir;
    match fs.on_root_fs(dir) {
        Ok(true) => Ok(()),
        Ok(false) => Err(Refusal::ServicesNeedRootFs { dir: dir.clone() }),
        Err(e) => Err(Refusal::ImageStoreUnknown {
            dir: dir.clone(),
            error: e.to_string(),
        }),
    }
}

/// The namespaces of its own that a service may have: its unit's sandbox (PrivateTmp=,
/// ProtectSystem=, ProtectHostname=, PrivateUsers= and the like). criu runs inside the mount and
/// UTS namespaces and the restore joins a fresh sandbox's; net, ipc, pid and cgroup namespaces
/// would lose their state (addresses, SysV objects) or cannot be joined by criu.
pub const SANDBOX_NAMESPACES: [&str; 3] = ["mnt", "uts", "user"];

/// Whether the service `unit` (as systemd reports it, with the pids of its cgroup) has what a
/// checkpoint with its main process needs: running, a type with a main process, and nothing in
/// its cgroup outside the main process's tree.
pub fn judge_service(
    cfg: &Config,
    unit: &crate::systemd::UnitInfo,
    members: &[i32],
    procs: &dyn ProcView,
) -> Result<(), Refusal> {
    use crate::systemd::ServiceType;
    let file = restore_file(cfg);
    if unit.active_state != "active" || unit.main_pid <= 0 || !procs.alive(unit.main_pid) {
        return Err(Refusal::ServiceNotRunning {
            unit: unit.id.clone(),
            state: format!("{}/{}", unit.active_state, unit.sub_state),
            file,
        });
    }
    if let ServiceType::Other(kind) = &unit.kind {
        return Err(Refusal::ServiceType {
            unit: unit.id.clone(),
            kind: kind.clone(),
            file,
        });
    }
    let main = unit.main_pid;
    let namespaces: Vec<&'static str> = procs
        .own_namespaces(main)
        .into_iter()
        .filter(|ns| !SANDBOX_NAMESPACES.contains(ns))
        .collect();
    if !namespaces.is_empty() {
        return Err(Refusal::ServiceSandboxed {
            unit: unit.id.clone(),
            namespaces,
        });
    }
    let strays: Vec<String> = members
        .iter()
        .filter(|&&p| p != main && !ancestors(procs, p).contains(&main))
        .map(|&p| procs.describe(p))
        .collect();
    if !strays.is_empty() {
        return Err(Refusal::ServiceStrays {
            unit: unit.id.clone(),
            main: procs.describe(main),
            strays,
        });
    }
    Ok(())
}

/// Parent chains are walked at most this far: /proc can change under us, and a loop must not hang.
const MAX_DEPTH: usize = 4096;

/// `pid`'s ancestors, nearest first (not `pid` itself).
fn ancestors(procs: &dyn ProcView, pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut cur = pid;
    for _ in 0..MAX_DEPTH {
        match procs.parent(cur) {
            Some(p) if p > 0 && p != pid && !out.contains(&p) => {
                out.push(p);
                cur = p;
            }
            _ => break,
        }
    }
    out
}

/// The rules that concern `pid` alone (everything but nesting), in the order they are reported.
fn judge_alone(
    procs: &dyn ProcView,
    pid: i32,
    nvwa: &BTreeSet<i32>,
    me: i32,
    file: &Path,
) -> Result<(), Refusal> {
    let file = file.to_path_buf();
    if !procs.alive(pid) {
        return Err(Refusal::NotRunning { pid, file });
    }
    let what = procs.describe(pid);
    if pid == 1 {
        return Err(Refusal::Init { what, file });
    }
    if pid == 2 || procs.is_kernel_thread(pid) {
        return Err(Refusal::KernelThread { pid, what, file });
    }
    // An unreadable Tgid means the process is exiting; the dump will say so precisely.
    if let Some(tgid) = procs.tgid(pid).filter(|&t| t != pid) {
        return Err(Refusal::NotThreadLeader {
            pid,
            tgid,
            what,
            file,
        });
    }
    if nvwa.contains(&pid) {
        return Err(Refusal::NvwaOrAncestor {
            pid,
            me,
            what,
            file,
        });
    }
    Ok(())
}

/// Every finding, one per listed pid, sorted by pid and deduplicated (for `check`, which reports
/// all of them, not just the first). `me` is the nvwa process whose ancestors must keep running.
///
/// A pid is nested only inside a listed pid that is itself preservable: `pids: [1, 500]` refuses
/// 1 (init), not 500 (which is inside init's tree, as everything is).
pub fn judge_pids(cfg: &Config, procs: &dyn ProcView, me: i32) -> Vec<(i32, Result<(), Refusal>)> {
    let file = restore_file(cfg);
    let pids: BTreeSet<i32> = cfg.restore.pids.iter().copied().collect();
    let mut nvwa: BTreeSet<i32> = ancestors(procs, me).into_iter().collect();
    nvwa.insert(me);
    let alone: Vec<(i32, Result<(), Refusal>)> = pids
        .iter()
        .map(|&pid| (pid, judge_alone(procs, pid, &nvwa, me, &file)))
        .collect();
    let roots: BTreeSet<i32> = alone
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(p, _)| *p)
        .collect();
    alone
        .into_iter()
        .map(|(pid, res)| {
            let res = res.and_then(|()| {
                // The outermost listed ancestor: listing only it keeps the whole tree.
                match ancestors(procs, pid)
                    .into_iter()
                    .rfind(|a| roots.contains(a))
                {
                    Some(outer) => Err(Refusal::Nested {
                        pid,
                        outer,
                        what: procs.describe(pid),
                        file: file.clone(),
                    }),
                    None => Ok(()),
                }
            });
            (pid, res)
        })
        .collect()
}

/// The pids to dump, sorted and deduplicated, or the first reason why not: the configuration
/// rules ([`judge_config`]) first, then the pid rules in pid order ([`judge_pids`]).
pub fn preservable_pids(cfg: &Config, procs: &dyn ProcView, me: i32) -> Result<Vec<i32>, Refusal> {
    judge_config(cfg)?;
    judge_pids(cfg, procs, me)
        .into_iter()
        .map(|(pid, res)| res.map(|()| pid))
        .collect()
}

const MIB: u64 = 1024 * 1024;

/// The space the images of processes with `rss_total` resident bytes need in `criu_dir`.
///
/// criu writes each dumped page once (pages-*.img), and the dumped pages are at most the
/// resident ones (file-backed pages that are clean are not saved at all), so resident memory is
/// the base. 10% covers what grows with the process (page maps, memory maps, file tables) and
/// what it may allocate between this check and the freeze; 16 MiB covers what does not grow
/// with it (criu's verbose dump.log, inventory and core images, the journal) and dominates for
/// small targets.
pub fn bytes_needed(rss_total: u64) -> u64 {
    rss_total
        .saturating_add(rss_total / 10)
        .saturating_add(16 * MIB)
}

/// Where the images go: not a memory filesystem (lost at kexec), and at least `needed_bytes`
/// free (see [`bytes_needed`]).
pub fn image_store(criu_dir: &Path, needed_bytes: u64, fs: &dyn FsView) -> Result<(), Refusal> {
    let dir = criu_dir.to_path_buf();
    let unknown = |e: io::Error| Refusal::ImageStoreUnknown {
        dir: dir.clone(),
        error: e.to_string(),
    };
    // Magic numbers are 32-bit; where f_type is a signed 32-bit word RAMFS_MAGIC arrives
    // sign-extended, so only the low 32 bits are compared.
    let volatile = match fs.fs_magic(criu_dir).map_err(unknown)? & 0xffff_ffff {
        TMPFS_MAGIC => Some("tmpfs"),
        RAMFS_MAGIC => Some("ramfs"),
        _ => None,
    };
    if let Some(fs) = volatile {
        return Err(Refusal::VolatileImageStore { dir, fs });
    }
    let free = fs.free_bytes(criu_dir).map_err(unknown)?;
    if free < needed_bytes {
        return Err(Refusal::NotEnoughSpace {
            dir,
            needed: needed_bytes,
            free,
        });
    }
    Ok(())
}

/// `512 B`, `1.5 KiB`, `3.0 GiB`: sizes for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Doubles of [`ProcView`] and [`FsView`], for the tests of every module that uses the policy.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    pub struct FakeProc {
        pub comm: String,
        pub parent: i32,
        pub tgid: i32,
        pub kernel_thread: bool,
        pub rss: u64,
        /// Namespaces of its own.
        pub namespaces: Vec<&'static str>,
    }

    /// A process table: pid → process. Threads are entries whose `tgid` differs from their pid.
    #[derive(Debug, Clone, Default)]
    pub struct FakeProcs {
        pub procs: BTreeMap<i32, FakeProc>,
    }

    impl FakeProcs {
        /// init (1), kthreadd (2) and a kernel worker (3), a shell (10) and an nvwa server (20)
        /// under init.
        pub fn machine() -> Self {
            let mut f = FakeProcs::default();
            f.add(1, 0, "systemd", 0);
            f.add(2, 0, "kthreadd", 0);
            f.kernel_thread(3, "kworker/0:1");
            f.add(10, 1, "bash", 0);
            f.add(20, 1, "nvwa", 0);
            f
        }

        /// A process (its own thread-group leader).
        pub fn add(&mut self, pid: i32, parent: i32, comm: &str, rss: u64) -> &mut Self {
            self.procs.insert(
                pid,
                FakeProc {
                    comm: comm.into(),
                    parent,
                    tgid: pid,
                    kernel_thread: false,
                    rss,
                    namespaces: Vec::new(),
                },
            );
            self
        }

        /// A thread `tid` of process `tgid`.
        pub fn thread(&mut self, tid: i32, tgid: i32) -> &mut Self {
            let mut p = self.procs[&tgid].clone();
            p.tgid = tgid;
            p.rss = 0;
            self.procs.insert(tid, p);
            self
        }

        /// A child of kthreadd with PF_KTHREAD.
        pub fn kernel_thread(&mut self, pid: i32, comm: &str) -> &mut Self {
            self.add(pid, 2, comm, 0);
            self.procs.get_mut(&pid).unwrap().kernel_thread = true;
            self
        }
    }

    impl ProcView for FakeProcs {
        fn alive(&self, pid: i32) -> bool {
            self.procs.contains_key(&pid)
        }
        fn parent(&self, pid: i32) -> Option<i32> {
            self.procs.get(&pid).map(|p| p.parent)
        }
        fn tgid(&self, pid: i32) -> Option<i32> {
            self.procs.get(&pid).map(|p| p.tgid)
        }
        fn is_kernel_thread(&self, pid: i32) -> bool {
            self.procs.get(&pid).is_some_and(|p| p.kernel_thread)
        }
        fn describe(&self, pid: i32) -> String {
            match self.procs.get(&pid) {
                Some(p) => format!("{} (pid {pid})", p.comm),
                None => format!("pid {pid}"),
            }
        }
        fn own_namespaces(&self, pid: i32) -> Vec<&'static str> {
            self.procs
                .get(&pid)
                .map_or_else(Vec::new, |p| p.namespaces.clone())
        }
        fn tree_rss_bytes(&self, pid: i32) -> u64 {
            let mut tree = vec![pid];
            let mut i = 0;
            while i < tree.len() {
                let p = tree[i];
                tree.extend(
                    self.procs
                        .iter()
                        .filter(|(c, fp)| fp.parent == p && fp.tgid == **c && **c != p)
                        .map(|(c, _)| *c),
                );
                i += 1;
            }
            tree.iter()
                .filter_map(|p| self.procs.get(p))
                .map(|p| p.rss)
                .sum()
        }
    }

    /// One filesystem for every path.
    #[derive(Debug)]
    pub struct FakeFs {
        pub free: io::Result<u64>,
        pub magic: io::Result<i64>,
        /// criu_dir on a filesystem other than `/`.
        pub separate_fs: bool,
        /// nvwa's generator not installed.
        pub no_generator: bool,
    }

    pub const EXT4_MAGIC: i64 = 0xef53;

    impl FakeFs {
        pub fn disk(free: u64) -> Self {
            FakeFs {
                free: Ok(free),
                magic: Ok(EXT4_MAGIC),
                separate_fs: false,
                no_generator: false,
            }
        }
    }

    fn copy<T: Copy>(r: &io::Result<T>) -> io::Result<T> {
        match r {
            Ok(v) => Ok(*v),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    impl FsView for FakeFs {
        fn free_bytes(&self, _: &Path) -> io::Result<u64> {
            copy(&self.free)
        }
        fn fs_magic(&self, _: &Path) -> io::Result<i64> {
            copy(&self.magic)
        }
        fn on_root_fs(&self, _: &Path) -> io::Result<bool> {
            Ok(!self.separate_fs)
        }
        fn exists(&self, path: &Path) -> bool {
            path != Path::new(crate::service::GENERATOR) || !self.no_generator
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;
    use crate::config::{RestoreConfig, ServerConfig};

    const ME: i32 = 20;
    const GIB: u64 = 1024 * MIB;

    fn cfg(pids: &[i32]) -> Config {
        Config {
            dir: PathBuf::from("/etc/nvwa"),
            server: ServerConfig::default(),
            restore: RestoreConfig {
                pids: pids.to_vec(),
                ..RestoreConfig::default()
            },
        }
    }

    /// The machine plus two independent workloads, 100 (with a child 101 and a thread 102) and 200.
    fn procs() -> FakeProcs {
        let mut f = FakeProcs::machine();
        f.add(100, 1, "redis-server", GIB)
            .add(101, 100, "redis-child", GIB / 2)
            .thread(102, 100)
            .add(200, 10, "nginx", MIB);
        f
    }

    /// The refusal of `pid` in `judge_pids`, which must agree with `preservable_pids`.
    fn refusal(pids: &[i32], procs: &FakeProcs, pid: i32) -> Refusal {
        let c = cfg(pids);
        let all = judge_pids(&c, procs, ME);
        let (_, res) = all
            .iter()
            .find(|(p, _)| *p == pid)
            .unwrap_or_else(|| panic!("{pid} judged: {all:?}"));
        let r = res.clone().unwrap_err();
        assert_eq!(r.pid(), Some(pid));
        let text = r.to_string();
        assert!(text.contains("/etc/nvwa/nvwa-restore.yaml"), "{text}");
        assert!(text.contains(&format!("{pid}")), "{text}");
        assert!(preservable_pids(&c, procs, ME).is_err());
        r
    }

    #[test]
    fn preservable_pids_are_sorted_and_deduplicated() {
        let p = procs();
        assert_eq!(
            preservable_pids(&cfg(&[200, 100, 200]), &p, ME),
            Ok(vec![100, 200])
        );
        let all = judge_pids(&cfg(&[200, 100, 200]), &p, ME);
        assert_eq!(all, vec![(100, Ok(())), (200, Ok(()))]);
    }

    #[test]
    fn a_pid_that_does_not_run_is_refused() {
        let r = refusal(&[100, 555], &procs(), 555);
        assert!(matches!(r, Refusal::NotRunning { pid: 555, .. }), "{r:?}");
        assert!(r.to_string().contains("pid 555 listed in"), "{r}");
        assert!(r.fix().contains("remove it from `pids:`"));
    }

    #[test]
    fn init_is_refused() {
        let r = refusal(&[1], &procs(), 1);
        assert!(matches!(r, Refusal::Init { .. }), "{r:?}");
        assert!(r.to_string().contains("systemd (pid 1)"), "{r}");
        assert!(r.fix().contains("remove 1"));
    }

    #[test]
    fn kernel_threads_are_refused_by_pid_2_or_by_their_flag() {
        let p = procs();
        for pid in [2, 3] {
            let r = refusal(&[pid], &p, pid);
            assert!(matches!(r, Refusal::KernelThread { .. }), "{pid}: {r:?}");
            assert!(r.to_string().contains("kernel thread"), "{r}");
        }
        assert!(refusal(&[3], &p, 3)
            .to_string()
            .contains("kworker/0:1 (pid 3)"));
        // The rule is the flag, not the parent: a flagged process elsewhere is refused too.
        let mut q = procs();
        q.procs.get_mut(&200).unwrap().kernel_thread = true;
        assert!(matches!(
            refusal(&[200], &q, 200),
            Refusal::KernelThread { pid: 200, .. }
        ));
    }

    #[test]
    fn a_thread_id_is_refused_naming_its_process() {
        let r = refusal(&[102], &procs(), 102);
        assert_eq!(
            r,
            Refusal::NotThreadLeader {
                pid: 102,
                tgid: 100,
                what: "redis-server (pid 102)".into(),
                file: "/etc/nvwa/nvwa-restore.yaml".into(),
            }
        );
        assert!(r.to_string().contains("list its process, pid 100"), "{r}");
    }

    #[test]
    fn nvwa_and_its_ancestors_are_refused() {
        let mut p = procs();
        // nvwa (20) runs under a supervisor 15 under the shell 10; the shell also started 200.
        p.add(15, 10, "supervisor", 0);
        p.procs.get_mut(&ME).unwrap().parent = 15;
        for pid in [ME, 15, 10] {
            let r = refusal(&[pid], &p, pid);
            assert!(
                matches!(r, Refusal::NvwaOrAncestor { me: ME, .. }),
                "{pid}: {r:?}"
            );
            assert!(r.to_string().contains("nvwa itself (pid 20)"), "{r}");
        }
        // A sibling of an ancestor is fine.
        assert_eq!(preservable_pids(&cfg(&[200]), &p, ME), Ok(vec![200]));
    }

    #[test]
    fn a_pid_inside_another_listed_tree_is_refused_naming_the_root() {
        let mut p = procs();
        p.add(103, 101, "grandchild", 0);
        for pid in [101, 103] {
            let r = refusal(&[100, 101, 103], &p, pid);
            assert!(
                matches!(r, Refusal::Nested { outer: 100, .. }),
                "{pid}: {r:?}"
            );
            assert!(r.to_string().contains("list only the root"), "{r}");
        }
        let all = judge_pids(&cfg(&[100, 101, 103]), &p, ME);
        assert_eq!(all[0], (100, Ok(())));
        // Alone, the child is its own root.
        assert_eq!(preservable_pids(&cfg(&[101]), &p, ME), Ok(vec![101]));
    }

    #[test]
    fn nesting_counts_only_listed_pids_that_can_be_preserved() {
        // Everything is inside init's tree: listing init refuses init, not the others.
        let all = judge_pids(&cfg(&[1, 200]), &procs(), ME);
        assert!(matches!(all[0].1, Err(Refusal::Init { .. })), "{all:?}");
        assert_eq!(all[1], (200, Ok(())));
    }

    #[test]
    fn the_first_refusal_in_pid_order_is_the_one_update_gets() {
        let p = procs();
        let r = preservable_pids(&cfg(&[555, 102, 1]), &p, ME).unwrap_err();
        assert!(matches!(r, Refusal::Init { .. }), "{r:?}");
        let all = judge_pids(&cfg(&[555, 102, 1]), &p, ME);
        assert_eq!(
            all.iter()
                .map(|(p, r)| (*p, r.is_err()))
                .collect::<Vec<_>>(),
            vec![(1, true), (102, true), (555, true)]
        );
    }

    #[test]
    fn a_parent_loop_in_proc_does_not_hang() {
        let mut p = procs();
        p.add(300, 301, "a", 0).add(301, 300, "b", 0);
        let all = judge_pids(&cfg(&[300]), &p, ME);
        assert_eq!(all, vec![(300, Ok(()))]);
    }

    #[test]
    fn pre_dump_with_pin_memory_is_refused_naming_both_keys() {
        let mut c = cfg(&[100]);
        c.restore.pre_dump = true;
        assert_eq!(judge_config(&c), Ok(()));
        c.restore.enable_pin_memory = true;
        let r = judge_config(&c).unwrap_err().to_string();
        assert!(
            r.contains(
                "pre_dump and enable_pin_memory are both true in /etc/nvwa/nvwa-restore.yaml"
            ),
            "{r}"
        );
        assert!(r.ends_with("set one of them to false"), "{r}");
    }

    #[test]
    fn an_empty_list_is_refused() {
        let c = cfg(&[]);
        let r = judge_config(&c).unwrap_err();
        assert!(matches!(r, Refusal::NothingListed { .. }), "{r:?}");
        assert!(r.to_string().starts_with("nothing to preserve: "), "{r}");
        assert!(r.fix().contains("/etc/nvwa/nvwa-restore.yaml"), "{r}");
        assert_eq!(preservable_pids(&c, &procs(), ME), Err(r));
        assert!(judge_pids(&c, &procs(), ME).is_empty());
        // Services alone are something to preserve.
        let mut c = cfg(&[]);
        c.restore.services = vec!["nginx".into()];
        assert!(config_findings(&c).is_empty());
    }

    #[test]
    fn services_need_the_generator_and_images_on_the_root_filesystem() {
        let mut c = cfg(&[]);
        assert_eq!(
            judge_service_support(
                &c,
                &FakeFs {
                    no_generator: true,
                    ..FakeFs::disk(1)
                }
            ),
            Ok(())
        );
        c.restore.services = vec!["nginx".into()];
        assert_eq!(judge_service_support(&c, &FakeFs::disk(1)), Ok(()));
        let r = judge_service_support(
            &c,
            &FakeFs {
                no_generator: true,
                ..FakeFs::disk(1)
            },
        )
        .unwrap_err();
        assert!(r.to_string().contains("nvwa-generator is missing"), "{r}");
        assert!(r.to_string().contains("reinstall nvwa"), "{r}");
        let r = judge_service_support(
            &c,
            &FakeFs {
                separate_fs: true,
                ..FakeFs::disk(1)
            },
        )
        .unwrap_err();
        let text = r.to_string();
        assert!(text.contains("is not on the root filesystem"), "{text}");
        assert!(
            text.contains("before other filesystems are mounted"),
            "{text}"
        );
        assert!(text.contains("point criu_dir"), "{text}");
    }

    #[test]
    fn config_findings_lists_all_and_judge_config_the_first() {
        let mut c = cfg(&[100]);
        assert_eq!(judge_config(&c), Ok(()));
        assert!(config_findings(&c).is_empty());
        c.restore.restore_net = true;
        assert!(config_findings(&c).is_empty(), "restore_net is supported");
        c.restore.pids = vec![];
        let all = config_findings(&c);
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(judge_config(&c), Err(all[0].clone()));
    }

    #[test]
    fn images_need_resident_memory_plus_a_margin() {
        assert_eq!(bytes_needed(0), 16 * MIB);
        assert_eq!(bytes_needed(10 * GIB), 11 * GIB + 16 * MIB);
        assert_eq!(bytes_needed(u64::MAX), u64::MAX);
    }

    #[test]
    fn a_memory_filesystem_is_refused_whatever_its_space() {
        let dir = Path::new("/run/nvwa/images");
        for (magic, name) in [
            (TMPFS_MAGIC, "tmpfs"),
            (RAMFS_MAGIC, "ramfs"),
            // f_type as a sign-extended 32-bit word.
            (RAMFS_MAGIC as u32 as i32 as i64, "ramfs"),
        ] {
            let fs = FakeFs {
                free: Ok(u64::MAX),
                magic: Ok(magic),
                ..FakeFs::disk(0)
            };
            let r = image_store(dir, 0, &fs).unwrap_err();
            assert!(matches!(r, Refusal::VolatileImageStore { fs, .. } if fs == name));
            let text = r.to_string();
            assert!(text.contains("/run/nvwa/images"), "{text}");
            assert!(text.contains("lost at the kernel switch"), "{text}");
            assert!(text.contains("on a disk or persistent memory"), "{text}");
        }
    }

    #[test]
    fn too_little_space_is_refused_with_both_sizes() {
        let dir = Path::new("/var/nvwa/running");
        let needed = bytes_needed(GIB);
        assert_eq!(image_store(dir, needed, &FakeFs::disk(needed)), Ok(()));
        let r = image_store(dir, needed, &FakeFs::disk(needed - 1)).unwrap_err();
        let text = r.to_string();
        assert!(text.contains("/var/nvwa/running"), "{text}");
        assert!(text.contains("need about 1.1 GiB"), "{text}");
        assert!(text.contains("only 1.1 GiB is free"), "{text}");
        let r = image_store(dir, needed, &FakeFs::disk(300 * MIB)).unwrap_err();
        assert!(r.to_string().contains("only 300.0 MiB is free"), "{r}");
    }

    #[test]
    fn an_unmeasurable_store_is_refused() {
        let fs = FakeFs {
            free: Ok(u64::MAX),
            magic: Err(io::Error::from_raw_os_error(libc::EACCES)),
            ..FakeFs::disk(0)
        };
        let r = image_store(Path::new("/x"), 1, &fs).unwrap_err();
        assert!(matches!(r, Refusal::ImageStoreUnknown { .. }), "{r:?}");
        assert!(r.to_string().contains("df /x"), "{r}");
        let fs = FakeFs {
            free: Err(io::Error::from_raw_os_error(libc::EIO)),
            magic: Ok(EXT4_MAGIC),
            ..FakeFs::disk(0)
        };
        assert!(matches!(
            image_store(Path::new("/x"), 1, &fs),
            Err(Refusal::ImageStoreUnknown { .. })
        ));
    }

    #[test]
    fn real_procs_judge_this_process_and_its_child() {
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let cid = child.id() as i32;
        let c = cfg(&[cid, me, 1]);
        // As if the child were the nvwa server: the test process is its ancestor.
        let all = judge_pids(&c, &RealProcs, cid);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(all[0].1, Err(Refusal::Init { .. })), "{all:?}");
        let by_pid = |p: i32| all.iter().find(|(q, _)| *q == p).unwrap().1.clone();
        assert!(
            matches!(by_pid(me), Err(Refusal::NvwaOrAncestor { .. })),
            "{all:?}"
        );
        assert!(
            matches!(by_pid(cid), Err(Refusal::NvwaOrAncestor { .. })),
            "{all:?}"
        );
        assert!(RealProcs.tree_rss_bytes(me) > 0);
        assert!(RealProcs.describe(me).ends_with(&format!("(pid {me})")));
    }

    #[test]
    fn real_fs_measures_a_directory_that_does_not_exist_yet() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("not/yet/made");
        assert!(RealFs.free_bytes(&missing).unwrap() > 0);
        let magic = RealFs.fs_magic(&missing).unwrap();
        assert_eq!(magic, RealFs.fs_magic(dir.path()).unwrap());
        // /proc is procfs wherever these tests run.
        assert_eq!(RealFs.fs_magic(Path::new("/proc/self")).unwrap(), 0x9fa0);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * GIB), "3.0 GiB");
    }

    fn unit(main_pid: i32, kind: &str, state: &str) -> crate::systemd::UnitInfo {
        crate::systemd::parse_show(&format!(
            "Id=app.service\nMainPID={main_pid}\nType={kind}\nActiveState={state}\nSubState=running\nControlGroup=/system.slice/app.service\n"
        ))
    }

    #[test]
    fn a_service_is_judged_by_its_state_type_and_cgroup() {
        let c = cfg(&[]);
        let p = procs();
        assert_eq!(
            judge_service(&c, &unit(100, "notify", "active"), &[100, 101], &p),
            Ok(())
        );
        let err = judge_service(&c, &unit(0, "simple", "inactive"), &[], &p).unwrap_err();
        assert!(
            err.to_string()
                .contains("no running main process (inactive/running)"),
            "{err}"
        );
        assert!(
            err.to_string().contains("systemctl start app.service"),
            "{err}"
        );
        let err = judge_service(&c, &unit(100, "oneshot", "active"), &[100], &p).unwrap_err();
        assert!(err.to_string().contains("Type=oneshot"), "{err}");
        // 200 is not in 100's tree: a dump of 100 would lose it.
        let err = judge_service(&c, &unit(100, "forking", "active"), &[100, 101, 200], &p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("outside the tree of its main process") && err.contains("pid 200"),
            "{err}"
        );
        assert!(!err.contains("pid 101"), "101 is 100's child: {err}");
    }
}
