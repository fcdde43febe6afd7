//! A recording test double of the machine, for the pipeline's unit tests: every call is
//! recorded as a typed [`Call`], and any call can be made to fail with [`FakeMachine::inject`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::boot::{BootError, KernelFiles};
use crate::config::{Config, RestoreConfig, ServerConfig};
use crate::criu::{Connections, Criu, CriuError, DumpOptions, PreDumpPass, RestoreOptions};
use crate::journal::JournalError;
use crate::journal::{ExternalFile, StdStream};
use crate::kexec::KexecError;
use crate::machine::{Machine, PinOp};
use crate::net::{NetCmd, NetError, NetState};
use crate::pidns::PidError;
use crate::pinmem::PinMemError;
use crate::policy::fake::FakeFs;
use crate::policy::{FsView, ProcView};
use crate::systemd::{ServiceType, SystemdError, UnitInfo};

/// What the pipeline asked of the machine, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Load {
        version: String,
        quick: bool,
    },
    Unload,
    /// A pre-dump pass of this pid, onto the pass named (relative to its directory).
    PreDump(i32, Option<String>),
    Dump(i32),
    /// The dump of this pid wrote only what changed since this pre-dump pass.
    DumpOnto(i32, String),
    Resume(Vec<i32>),
    Durable(PathBuf),
    Kexec,
    Restore(String),
    /// A restore of these images without their memory, a lazy-pages daemon filling it in.
    RestoreLazy(String),
    /// The lazy-pages daemon of these images was waited for.
    FinishLazy(String),
    /// The kernel was asked whether it can serve a lazy restore (`uffd.rs`).
    LazyPagesCheck,
    /// criu ran once to probe the kernel before parallel restores.
    CacheCriuProbes,
    KillTree(i32),
    Reserve(Option<i32>),
    Pin(PinOp),
    /// The unix sockets a dump was told to treat as external.
    DumpExternal(i32, Vec<u64>),
    /// The journal-stream inodes a restore was asked to hand in.
    RestoreWith(Vec<u64>),
    /// A dump run inside this pid's namespaces, with these external files, cgroups ignored.
    DumpSandboxed {
        ns_of: i32,
        files: Vec<String>,
        ignore_cgroups: bool,
    },
    /// A restore into this holder's namespaces, handed these files.
    RestoreSandboxed {
        holder: i32,
        files: Vec<String>,
    },
    /// The inventory of these images was made to restore in the host's user namespace.
    OwnUserNs(PathBuf, i32),
    KillHolder(i32),
    StartService(String),
    DaemonReload,
    WaitNetworkOnline,
    PidFile(PathBuf, i32),
    /// An orderly kexec of these units and pid targets was handed to systemd.
    OrderlyKexec(Vec<String>, Vec<i32>),
    /// This pid was dumped with criu's nftables network lock.
    DumpLocked(i32),
    /// This pid was dumped without `--tcp-established`: nvwa found no connection in its tree.
    DumpRefusingConnections(i32),
    /// The network lock saved in this image directory was released on the old kernel.
    ReleaseNet(PathBuf),
    /// The network configuration was read.
    NetRead,
    /// A network command was run.
    Net(NetCmd),
}

/// A failure to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Load,
    Unload,
    /// criu fails on this pid after writing part of its images, leaving the tree running.
    Dump(i32),
    /// criu's pre-dump fails on this pid (the tree runs on).
    PreDump(i32),
    /// criu reports no userfaultfd: lazy restores cannot work.
    NoLazyPages,
    /// The lazy-pages daemon of this pid's images ends before copying every page.
    LazyIncomplete(i32),
    /// criu fails on this pid after it stopped the tree (it died mid-dump).
    DumpLeavesStopped(i32),
    /// The dump thread of this pid panics.
    DumpPanics(i32),
    /// criu overruns its deadline on this pid.
    DumpHangs(i32),
    Resume(i32),
    Durable,
    BootId,
    Restore(i32),
    PinClear,
    /// systemd cannot be asked about this unit.
    ServiceQuery(&'static str),
    /// After its start, systemd reports another main pid for this unit.
    ServiceStartsAfresh(&'static str),
    DaemonReload,
    OrderlyKexec,
    /// criu cannot lock the network with nftables.
    NoNftablesLock,
    /// The tree of this pid has 4 MiB resident (a small target, see
    /// `config::SMALL_TARGET_BYTES`); the others have 256 MiB.
    Small(i32),
    /// The tree of this pid holds no connected TCP socket (the double's trees hold one unless
    /// told so).
    NoConnection(i32),
    /// A connection appears in this pid's tree once nvwa has looked: a dump refusing
    /// connections fails on it.
    ConnectionAppears(i32),
    /// `ip`/`nft` cannot be run to read the network.
    NetRead,
    /// Every network command fails.
    NetApply,
    /// nft cannot read back what it printed (`nft -c -f` fails).
    NftCheck,
}

/// A service as the double's systemd runs it.
#[derive(Debug, Clone)]
pub struct FakeService {
    pub unit: String,
    pub main_pid: i32,
    pub kind: ServiceType,
    /// Pids of its cgroup besides the main tree (strays).
    pub strays: Vec<i32>,
    pub streams: Vec<StdStream>,
    /// Namespaces of its own (its unit's sandbox).
    pub namespaces: Vec<&'static str>,
    /// Files its main process holds outside its mount namespace.
    pub external_files: Vec<ExternalFile>,
}

impl FakeService {
    pub fn new(unit: &str, main_pid: i32) -> FakeService {
        FakeService {
            unit: unit.into(),
            main_pid,
            kind: ServiceType::Notify,
            strays: Vec::new(),
            streams: vec![
                StdStream { fd: 1, inode: 9001 },
                StdStream { fd: 2, inode: 9001 },
            ],
            namespaces: Vec::new(),
            external_files: Vec::new(),
        }
    }
}

pub struct FakeMachine {
    pub alive: Mutex<BTreeSet<i32>>,
    pub stopped: Mutex<BTreeSet<i32>>,
    pub faults: Mutex<BTreeSet<Fault>>,
    pub held_pids: BTreeSet<i32>,
    pub boot: String,
    pub fs: FakeFs,
    pub calls: Mutex<Vec<Call>>,
    pub services: Vec<FakeService>,
    /// The pid of `nvwa hold` in the restoring unit's cgroup.
    pub holder: Option<i32>,
    /// Bytes each pre-dump pass writes, by pass (the last repeats): a dirty set that shrinks.
    pub pre_dump_bytes: Vec<u64>,
    /// Runs at every dump (after the fault handling): lets a test act mid-update.
    #[allow(clippy::type_complexity)]
    pub on_dump: Option<Box<dyn Fn(i32) + Send + Sync>>,
    /// The network as `ip`/`nft` would show it.
    pub net: Mutex<NetState>,
    /// The interfaces that exist.
    pub links: Mutex<BTreeSet<String>>,
}

impl FakeMachine {
    pub fn with_pids(pids: &[i32]) -> FakeMachine {
        FakeMachine {
            alive: Mutex::new(pids.iter().copied().collect()),
            stopped: Mutex::default(),
            faults: Mutex::default(),
            held_pids: BTreeSet::new(),
            boot: "0f5e1a8c-boot-one".into(),
            fs: FakeFs::disk(1 << 40),
            calls: Mutex::default(),
            services: Vec::new(),
            holder: None,
            pre_dump_bytes: vec![256 << 20, 16 << 20, 1 << 20],
            on_dump: None,
            net: Mutex::default(),
            links: Mutex::new(["lo", "eth0"].map(String::from).into()),
        }
    }
    /// A machine running `services` (and their main processes) besides `pids`.
    pub fn with_services(pids: &[i32], services: Vec<FakeService>) -> FakeMachine {
        let mut m = FakeMachine::with_pids(pids);
        m.alive
            .get_mut()
            .unwrap()
            .extend(services.iter().map(|s| s.main_pid));
        m.services = services;
        m
    }
    pub fn inject(&self, f: Fault) {
        self.faults.lock().unwrap().insert(f);
    }
    fn faulty(&self, f: Fault) -> bool {
        self.faults.lock().unwrap().contains(&f)
    }
    fn log(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    pub fn called(&self, c: &Call) -> bool {
        self.calls().contains(c)
    }
    pub fn dumps(&self) -> usize {
        self.calls()
            .iter()
            .filter(|c| matches!(c, Call::Dump(_)))
            .count()
    }
    pub fn stopped(&self) -> BTreeSet<i32> {
        self.stopped.lock().unwrap().clone()
    }
}

fn criu_failure(pid: i32, dir: &Path) -> CriuError {
    dump_failure(
        pid,
        dir,
        format!("Error (criu/cr-dump.c:1): Can't dump pid {pid}"),
    )
}

/// criu's dump of `pid` into `dir` failed, its log saying `summary`.
fn dump_failure(pid: i32, dir: &Path, summary: String) -> CriuError {
    CriuError::Failed {
        action: "dump",
        object: format!("pid {pid}"),
        code: 1,
        summary,
        log: dir.join(crate::criu::DUMP_LOG),
    }
}

impl Machine for FakeMachine {
    fn running_kernel(&self) -> String {
        "6.1-old".into()
    }
    fn find_kernel(&self, version: &str) -> Result<KernelFiles, BootError> {
        crate::boot::find_kernel(Path::new("/nonexistent-root"), version).or_else(|e| {
            if version == "6.12-new" {
                Ok(KernelFiles {
                    version: version.into(),
                    image: "/boot/vmlinuz-6.12-new".into(),
                    initrd: "/boot/initrd.img-6.12-new".into(),
                })
            } else {
                Err(e)
            }
        })
    }
    fn load_kernel(&self, f: &KernelFiles, _: &Path, quick: bool) -> Result<(), KexecError> {
        self.log(Call::Load {
            version: f.version.clone(),
            quick,
        });
        if self.faulty(Fault::Load) {
            return Err(KexecError::Load {
                image: f.image.clone(),
                source: std::io::Error::from_raw_os_error(libc::ENOEXEC),
                hint: "not a kernel",
            });
        }
        Ok(())
    }
    fn unload_kernel(&self) -> Result<(), KexecError> {
        self.log(Call::Unload);
        if self.faulty(Fault::Unload) {
            return Err(KexecError::Unload(std::io::Error::from_raw_os_error(
                libc::EBUSY,
            )));
        }
        Ok(())
    }
    fn procs(&self) -> &dyn ProcView {
        self
    }
    fn fs(&self) -> &dyn FsView {
        &self.fs
    }
    fn tree_ids(&self, pid: i32) -> Vec<i32> {
        vec![pid, pid + 1]
    }
    fn pre_dump(
        &self,
        _: &Criu,
        pid: i32,
        dir: &Path,
        prev: Option<&str>,
        _: &DumpOptions,
    ) -> Result<PreDumpPass, CriuError> {
        self.log(Call::PreDump(pid, prev.map(String::from)));
        std::fs::create_dir(dir).unwrap();
        if self.faulty(Fault::PreDump(pid)) {
            return Err(CriuError::Failed {
                action: "pre-dump",
                object: format!("pid {pid}"),
                code: 1,
                summary: "Error (criu/mem.c:1): soft-dirty tracking is off".into(),
                log: dir.join(crate::criu::PRE_DUMP_LOG),
            });
        }
        let pass: usize = dir
            .to_string_lossy()
            .rsplit("pre-")
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let bytes = self.pre_dump_bytes[pass.min(self.pre_dump_bytes.len()) - 1];
        std::fs::write(dir.join("pages-1.img"), "pages").unwrap();
        Ok(PreDumpPass { bytes, ms: 5 })
    }
    fn dump(&self, _: &Criu, pid: i32, dir: &Path, o: DumpOptions) -> Result<u64, CriuError> {
        self.log(Call::Dump(pid));
        if let Some(prev) = &o.prev_images {
            self.log(Call::DumpOnto(pid, prev.clone()));
        }
        if !o.external_unix.is_empty() {
            self.log(Call::DumpExternal(pid, o.external_unix.clone()));
        }
        if let Some(ns_of) = o.enter_ns_of {
            self.log(Call::DumpSandboxed {
                ns_of,
                files: o.external_files.clone(),
                ignore_cgroups: o.ignore_cgroups,
            });
        }
        if let Some(f) = &self.on_dump {
            f(pid);
        }
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(crate::criu::DUMP_LOG), "log").unwrap();
        if self.faulty(Fault::DumpPanics(pid)) {
            self.stopped.lock().unwrap().extend(self.tree_ids(pid));
            panic!("injected panic while dumping {pid}");
        }
        if self.faulty(Fault::DumpHangs(pid)) {
            self.stopped.lock().unwrap().extend(self.tree_ids(pid));
            return Err(CriuError::TimedOut {
                action: "dump",
                object: format!("pid {pid}"),
                after: o.deadline,
                key: "dump_timeout",
                log: dir.join(crate::criu::DUMP_LOG),
            });
        }
        if self.faulty(Fault::DumpLeavesStopped(pid)) {
            self.stopped.lock().unwrap().extend(self.tree_ids(pid));
            return Err(criu_failure(pid, dir));
        }
        if self.faulty(Fault::Dump(pid)) {
            return Err(criu_failure(pid, dir));
        }
        if o.connections == Connections::Refused {
            self.log(Call::DumpRefusingConnections(pid));
            if self.faulty(Fault::ConnectionAppears(pid)) {
                std::fs::write(dir.join("pages-1.img"), "half").unwrap();
                return Err(dump_failure(
                    pid,
                    dir,
                    "Error (criu/sk-inet.c:191): inet: Connected TCP socket, consider using --tcp-established option.".into(),
                ));
            }
        }
        std::fs::write(dir.join("inventory.img"), "img").unwrap();
        if o.connections == Connections::LockedNftables {
            self.log(Call::DumpLocked(pid));
            std::fs::write(
                dir.join(crate::tcp::LOCK_FILE),
                format!("table inet CRIU-{pid} {{\n}}\n"),
            )
            .unwrap();
        }
        self.stopped.lock().unwrap().extend(self.tree_ids(pid));
        Ok(7)
    }
    fn holds_tcp_connection(&self, pid: i32) -> bool {
        !self.faulty(Fault::NoConnection(pid))
    }
    fn nftables_lock_support(&self, _: &Criu) -> Result<(), String> {
        if self.faulty(Fault::NoNftablesLock) {
            return Err(
                "Nftables based locking requires libnftables and set concatenations support".into(),
            );
        }
        Ok(())
    }
    fn release_network_lock(
        &self,
        dir: &Path,
        _: i32,
        _: &[i32],
    ) -> Result<usize, crate::tcp::TcpError> {
        if dir.join(crate::tcp::LOCK_FILE).exists() {
            self.log(Call::ReleaseNet(dir.to_path_buf()));
        }
        Ok(0)
    }
    fn resume(&self, ids: &[i32]) -> Result<(), nix::Error> {
        self.log(Call::Resume(ids.to_vec()));
        let mut s = self.stopped.lock().unwrap();
        for id in ids {
            if self.faulty(Fault::Resume(*id)) {
                return Err(nix::Error::EPERM);
            }
            s.remove(id);
        }
        Ok(())
    }
    fn make_durable(&self, dir: &Path) -> std::io::Result<()> {
        self.log(Call::Durable(dir.to_path_buf()));
        if self.faulty(Fault::Durable) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
    fn kexec(&self) -> KexecError {
        self.log(Call::Kexec);
        KexecError::Execute(std::io::Error::from_raw_os_error(libc::EPERM))
    }
    fn restore(&self, _: &Criu, dir: &Path, o: &RestoreOptions) -> Result<(i32, u64), CriuError> {
        self.log(Call::RestoreWith(
            o.inherit.iter().map(|&(_, ino)| ino).collect(),
        ));
        if let Some(holder) = o.join_ns_of {
            self.log(Call::RestoreSandboxed {
                holder,
                files: o.inherit_files.iter().map(|(_, k)| k.clone()).collect(),
            });
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        self.log(Call::Restore(name.clone()));
        if o.lazy {
            self.log(Call::RestoreLazy(name.clone()));
        }
        let pid: i32 = name.parse().unwrap_or_else(|_| {
            self.services
                .iter()
                .find(|s| s.unit == name)
                .map_or(0, |s| s.main_pid)
        });
        if self.faulty(Fault::Restore(pid)) {
            return Err(CriuError::Failed {
                action: "restore",
                object: name,
                code: 1,
                summary: "Error (criu/cr-restore.c:1): injected".into(),
                log: dir.join(crate::criu::RESTORE_LOG),
            });
        }
        self.alive.lock().unwrap().insert(pid);
        Ok((pid, 5))
    }
    fn cache_criu_probes(&self, _: &Criu) {
        self.log(Call::CacheCriuProbes);
    }
    fn lazy_pages_unsupported(&self) -> Option<String> {
        self.log(Call::LazyPagesCheck);
        self.faulty(Fault::NoLazyPages)
            .then(|| "Error: UFFD is not supported".to_string())
    }
    fn finish_lazy_pages(
        &self,
        dir: &Path,
        _: Duration,
    ) -> Result<crate::lazy_pages::Transferred, crate::lazy_pages::LazyError> {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        self.log(Call::FinishLazy(name.clone()));
        let done = crate::lazy_pages::Transferred {
            copied: 100,
            total: 100,
        };
        if self.faulty(Fault::LazyIncomplete(name.parse().unwrap_or(0))) {
            return Err(crate::lazy_pages::LazyError::Incomplete {
                done: crate::lazy_pages::Transferred { copied: 40, ..done },
                error: None,
                log: dir.join(crate::lazy_pages::LOG),
            });
        }
        Ok(done)
    }
    fn kill_tree(&self, pid: i32) {
        self.log(Call::KillTree(pid));
        self.alive.lock().unwrap().remove(&pid);
    }
    fn reserve_pids(&self, ids: &[i32]) -> Result<(), PidError> {
        self.log(Call::Reserve(ids.iter().max().copied()));
        Ok(())
    }
    fn wait_pids_free(&self, ids: &[i32], _: Duration) -> Result<(), PidError> {
        match ids.iter().find(|id| self.held_pids.contains(id)) {
            Some(&id) => Err(PidError::Held {
                id,
                holder: "sshd (pid 99)".into(),
                waited_s: 10,
            }),
            None => Ok(()),
        }
    }
    fn boot_id(&self) -> Result<String, JournalError> {
        if self.faulty(Fault::BootId) {
            return Err(JournalError::BootId("injected".into()));
        }
        Ok(self.boot.clone())
    }
    fn criu_working_on(&self, _: &Path) -> Vec<i32> {
        Vec::new()
    }
    fn pin_memory(&self, op: PinOp) -> Result<(), PinMemError> {
        self.log(Call::Pin(op));
        if op == PinOp::Clear && self.faulty(Fault::PinClear) {
            return Err(PinMemError::Open {
                path: "/dev/pinmem".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        Ok(())
    }
    fn service(&self, unit: &str) -> Result<(UnitInfo, Vec<i32>), SystemdError> {
        let unknown = || SystemdError::Failed {
            command: format!("systemctl show {unit}"),
            code: 1,
            output: format!("Unit {unit} could not be found."),
        };
        if self.faulty(Fault::ServiceQuery(leak(unit))) {
            return Err(unknown());
        }
        let s = self.fake_service(unit).ok_or_else(unknown)?;
        let mut members = vec![s.main_pid];
        members.extend(&s.strays);
        Ok((self.unit_info(s, s.main_pid), members))
    }
    fn external_files(&self, pid: i32) -> Vec<ExternalFile> {
        self.services
            .iter()
            .find(|s| s.main_pid == pid)
            .map_or_else(Vec::new, |s| s.external_files.clone())
    }
    fn sandbox_holder(&self) -> Option<i32> {
        self.holder
    }
    fn kill_holder(&self, pid: i32) {
        self.log(Call::KillHolder(pid));
    }
    fn restore_in_own_user_ns(
        &self,
        dir: &Path,
        pid: i32,
    ) -> Result<(u64, u64), crate::criu_image::ImageError> {
        self.log(Call::OwnUserNs(dir.to_path_buf(), pid));
        Ok((1, 2))
    }
    fn std_streams(&self, pid: i32) -> Vec<StdStream> {
        self.services
            .iter()
            .find(|s| s.main_pid == pid)
            .map_or_else(Vec::new, |s| s.streams.clone())
    }
    fn start_service(&self, unit: &str, _: Duration) -> Result<UnitInfo, SystemdError> {
        self.log(Call::StartService(unit.into()));
        let s = self
            .fake_service(unit)
            .ok_or_else(|| SystemdError::Failed {
                command: format!("systemctl start {unit}"),
                code: 5,
                output: format!("Unit {unit} not found."),
            })?;
        // The drop-in's helper restores the saved process; a unit that starts afresh gets a
        // new main pid.
        let main = if self.faulty(Fault::ServiceStartsAfresh(leak(unit))) {
            s.main_pid + 1000
        } else {
            s.main_pid
        };
        self.alive.lock().unwrap().insert(main);
        Ok(self.unit_info(s, main))
    }
    fn wait_network_online(&self, _deadline: Duration) -> Result<(), SystemdError> {
        self.log(Call::WaitNetworkOnline);
        Ok(())
    }
    fn daemon_reload(&self) -> Result<(), SystemdError> {
        self.log(Call::DaemonReload);
        if self.faulty(Fault::DaemonReload) {
            return Err(SystemdError::Failed {
                command: "systemctl daemon-reload".into(),
                code: 1,
                output: "Access denied".into(),
            });
        }
        Ok(())
    }
    fn write_pid_file(&self, path: &Path, pid: i32) -> std::io::Result<()> {
        self.log(Call::PidFile(path.to_path_buf(), pid));
        Ok(())
    }
    fn orderly_kexec(&self, units: &[String], pids: &[i32]) -> Result<(), SystemdError> {
        self.log(Call::OrderlyKexec(units.to_vec(), pids.to_vec()));
        // The pid targets are killed before systemd is asked; a refusal comes after that.
        for p in pids {
            for id in self.tree_ids(*p) {
                self.alive.lock().unwrap().remove(&id);
                self.stopped.lock().unwrap().remove(&id);
            }
        }
        if self.faulty(Fault::OrderlyKexec) {
            return Err(SystemdError::Failed {
                command: "systemctl kexec".into(),
                code: 1,
                output: "Failed to start kexec.target: Transaction is destructive.".into(),
            });
        }
        Ok(())
    }
    fn net_read(&self) -> Result<NetState, NetError> {
        self.log(Call::NetRead);
        if self.faulty(Fault::NetRead) {
            return Err(NetError::Missing {
                tool: "ip (iproute2, with -j)",
                package: "iproute2",
                why: "read and restore addresses, routes and rules",
            });
        }
        Ok(self.net.lock().unwrap().clone())
    }
    fn net_links(&self) -> Result<BTreeSet<String>, NetError> {
        Ok(self.links.lock().unwrap().clone())
    }
    fn net_apply(&self, cmd: &NetCmd, scratch: &Path) -> Result<(), NetError> {
        self.log(Call::Net(cmd.clone()));
        // The real machine writes scripts there.
        if !scratch.is_dir() {
            return Err(NetError::Io {
                action: "write a script into",
                path: scratch.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let check = matches!(
            cmd,
            NetCmd::Nft {
                check_only: true,
                ..
            }
        );
        if self.faulty(Fault::NetApply) || (check && self.faulty(Fault::NftCheck)) {
            return Err(NetError::Failed {
                command: cmd.describe(),
                code: 2,
                output: "Error: File exists".into(),
            });
        }
        Ok(())
    }
}

impl FakeMachine {
    pub fn pid_files(&self) -> Vec<(PathBuf, i32)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::PidFile(p, pid) => Some((p, pid)),
                _ => None,
            })
            .collect()
    }
}

/// Fault names are static; units in tests are a handful of literals.
fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

impl FakeMachine {
    fn fake_service(&self, unit: &str) -> Option<&FakeService> {
        self.services.iter().find(|s| s.unit == unit)
    }
    fn unit_info(&self, s: &FakeService, main_pid: i32) -> UnitInfo {
        let running = self.alive(main_pid);
        UnitInfo {
            id: s.unit.clone(),
            main_pid: if running { main_pid } else { 0 },
            kind: s.kind.clone(),
            pid_file: None,
            notify_access: "main".into(),
            control_group: Some(format!("/system.slice/{}", s.unit)),
            active_state: if running { "active" } else { "failed" }.into(),
            sub_state: if running { "running" } else { "failed" }.into(),
            identifier: s.unit.trim_end_matches(".service").into(),
        }
    }
}

/// Flat processes: every listed pid is a lone thread-group leader of 4 KiB.
impl ProcView for FakeMachine {
    fn alive(&self, pid: i32) -> bool {
        self.alive.lock().unwrap().contains(&pid)
    }
    fn parent(&self, _: i32) -> Option<i32> {
        None
    }
    fn tgid(&self, pid: i32) -> Option<i32> {
        Some(pid)
    }
    fn is_kernel_thread(&self, _: i32) -> bool {
        false
    }
    fn describe(&self, pid: i32) -> String {
        format!("fake (pid {pid})")
    }
    fn tree_rss_bytes(&self, pid: i32) -> u64 {
        if self.faulty(Fault::Small(pid)) {
            4 << 20
        } else {
            256 << 20
        }
    }
    fn own_namespaces(&self, pid: i32) -> Vec<&'static str> {
        self.services
            .iter()
            .find(|s| s.main_pid == pid)
            .map_or_else(Vec::new, |s| s.namespaces.clone())
    }
}

pub fn config(dir: &Path, pids: &[i32]) -> Config {
    Config {
        dir: dir.to_path_buf(),
        server: ServerConfig {
            criu_dir: dir.join("running"),
            // Programs that exist everywhere: update checks that root owns them.
            criu_exe: PathBuf::from("/bin/true"),
            kexec_exe: PathBuf::from("/bin/true"),
            systemd_etc: dir.join("systemd"),
            log_dir: dir.join("log"),
            socket: dir.join("nvwa.socket"),
            ..ServerConfig::default()
        },
        restore: RestoreConfig {
            pids: pids.to_vec(),
            ..Default::default()
        },
    }
}

/// Targets as the update plans them, for tests that start from a saved journal.
pub fn targets(m: &dyn Machine, pids: &[i32]) -> Vec<crate::journal::Target> {
    let dir = tempfile::tempdir().unwrap();
    crate::update::plan_targets(m, &config(dir.path(), pids)).unwrap()
}

/// The boot an update starts on, and the one after its jump.
pub const OLD_BOOT: &str = "0f5e1a8c-boot-one";
pub const NEW_BOOT: &str = "7c2d9b10-boot-two";

/// `update::run` to version `v`, with the progress events it reported; `stop` as the server's
/// stop flag.
pub fn update_with_stop(
    m: &FakeMachine,
    cfg: &Config,
    v: &str,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (
    Result<String, crate::update::UpdateError>,
    Vec<crate::protocol::Progress>,
) {
    let mut events = Vec::new();
    let mut sink = |p: crate::protocol::Progress| events.push(p);
    let res = crate::update::run(m, cfg, v, &crate::update::Reporter::new(&mut sink), stop);
    (res, events)
}

/// `update::run` to version `v` that nobody asks to stop.
pub fn run_update(
    m: &FakeMachine,
    cfg: &Config,
    v: &str,
) -> (
    Result<String, crate::update::UpdateError>,
    Vec<crate::protocol::Progress>,
) {
    update_with_stop(m, cfg, v, &std::sync::Arc::default())
}

/// The journal and images an update of `targets` leaves behind when it stopped in `last` on
/// [`OLD_BOOT`].
pub fn save_on_old_boot(
    cfg: &Config,
    targets: Vec<crate::journal::Target>,
    last: crate::journal::Phase,
) -> crate::journal::Journal {
    use crate::journal::{Journal, Phase};
    let mut j = Journal::new("6.1-old", "6.12-new", targets, OLD_BOOT);
    j.advance_all(&Phase::path_to(last), OLD_BOOT).unwrap();
    std::fs::create_dir_all(&cfg.server.criu_dir).unwrap();
    for t in &j.targets {
        let d = cfg.server.criu_dir.join(&t.name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("inventory.img"), "x").unwrap();
    }
    j.save(&cfg.server.criu_dir).unwrap();
    j
}
