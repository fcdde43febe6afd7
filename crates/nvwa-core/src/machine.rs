//! Everything the update pipeline does to the machine, behind one trait, so the all-or-nothing
//! logic can be tested with a recording double and run for real with [`RealMachine`].

use std::path::Path;
use std::time::Duration;

use crate::journal::JournalError;

use crate::boot::{self, BootError, KernelFiles};
use crate::criu::{Connections, Criu, CriuError, DumpOptions, PreDumpPass, RestoreOptions};
use crate::criu_image::{self, ImageError};
use crate::journal::{ExternalFile, StdStream};
use crate::kexec::{self, KexecError};
use crate::lazy_pages::{self, LazyError, Transferred};
use crate::net::{self, NetCmd, NetError, NetState};
use crate::pidns::{self, PidError};
use crate::pinmem::{PinMem, PinMemError, DEV_ROOT, PINMEM_DEVICE};
use crate::policy::{FsView, ProcView, RealFs, RealProcs};
use crate::process;
use crate::systemd::{self, SystemdError, UnitInfo};
use crate::tcp::{self, TcpError};

/// A file's text, if it can be read.
fn read_text(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// How long killed pid targets may take to disappear (their parents reap them).
const KILL_WAIT: Duration = Duration::from_secs(5);

pub trait Machine: Send + Sync {
    fn running_kernel(&self) -> String;
    fn find_kernel(&self, version: &str) -> Result<KernelFiles, BootError>;
    /// Loads the kernel for kexec with the running command line.
    fn load_kernel(
        &self,
        files: &KernelFiles,
        kexec_exe: &Path,
        quick: bool,
    ) -> Result<(), KexecError>;
    fn unload_kernel(&self) -> Result<(), KexecError>;
    /// The processes, as the policy sees them (`/proc` on the real machine).
    fn procs(&self) -> &dyn ProcView;
    /// The file systems, as the policy sees them.
    fn fs(&self) -> &dyn FsView;
    /// Every pid and thread id of the tree rooted at `pid`.
    fn tree_ids(&self, pid: i32) -> Vec<i32>;
    /// Checkpoints and leaves the tree stopped; returns milliseconds spent. With
    /// [`Connections::LockedNftables`], the lock criu left is saved beside the images
    /// ([`crate::tcp`]).
    fn dump(&self, criu: &Criu, pid: i32, dir: &Path, opts: DumpOptions) -> Result<u64, CriuError>;
    /// Whether a process of the tree rooted at `pid` holds a connected TCP socket (when in
    /// doubt, yes).
    fn holds_tcp_connection(&self, pid: i32) -> bool;
    /// Whether criu can lock the targets' TCP connections with nftables; `Err` says why not.
    fn nftables_lock_support(&self, criu: &Criu) -> Result<(), String>;
    /// Before a dumped tree (rooted at `pid`, with `ids`) runs again on the old kernel: deletes
    /// the network lock of its dump into `dir` and turns repair mode off on its TCP sockets.
    /// Returns how many left repair mode.
    fn release_network_lock(&self, dir: &Path, pid: i32, ids: &[i32]) -> Result<usize, TcpError>;
    /// One pre-dump pass; the tree runs on afterwards (see [`Criu::pre_dump`]).
    fn pre_dump(
        &self,
        criu: &Criu,
        pid: i32,
        dir: &Path,
        prev: Option<&str>,
        opts: &DumpOptions,
    ) -> Result<PreDumpPass, CriuError>;
    /// SIGCONT to every id (a stopped tree runs again).
    fn resume(&self, ids: &[i32]) -> Result<(), nix::Error>;
    /// Makes everything written under `dir` durable before the point of no return, reporting
    /// write-back errors (sync(2) reports none; syncfs(2) does).
    fn make_durable(&self, dir: &Path) -> std::io::Result<()>;
    /// Jumps into the loaded kernel; returns only on failure.
    fn kexec(&self) -> KexecError;
    fn restore(
        &self,
        criu: &Criu,
        dir: &Path,
        opts: &RestoreOptions,
    ) -> Result<(i32, u64), CriuError>;
    /// Why lazy restores cannot work on this kernel, if they cannot ([`crate::uffd`]).
    fn lazy_pages_unsupported(&self) -> Option<String>;
    /// Lets criu probe the kernel once before parallel runs ([`Criu::cache_kernel_probes`]).
    fn cache_criu_probes(&self, criu: &Criu);
    /// Waits for the lazy-pages daemon of a restore from `dir` ([`lazy_pages::finish`]).
    fn finish_lazy_pages(&self, dir: &Path, deadline: Duration) -> Result<Transferred, LazyError>;
    /// SIGKILL to the tree rooted at `pid`, reaped or gone within a few seconds.
    fn kill_tree(&self, pid: i32);
    fn reserve_pids(&self, ids: &[i32]) -> Result<(), PidError>;
    fn wait_pids_free(&self, ids: &[i32], timeout: Duration) -> Result<(), PidError>;
    fn boot_id(&self) -> Result<String, JournalError>;
    /// Processes still running criu on the image directory `dir` (a server that died mid-dump
    /// leaves its criu behind: the tree must not be touched until it is done).
    fn criu_working_on(&self, dir: &Path) -> Vec<i32>;
    /// openEuler's pin memory (`/dev/pinmem`): keeps the targets' pages where the next kernel
    /// finds them. `Clear` before the dumps, `Finish` after them.
    fn pin_memory(&self, op: PinOp) -> Result<(), PinMemError>;
    /// What systemd says about the service `unit`, and the pids of its cgroup.
    fn service(&self, unit: &str) -> Result<(UnitInfo, Vec<i32>), SystemdError>;
    /// Standard output and error of `pid` that are unix stream sockets (journald's streams).
    fn std_streams(&self, pid: i32) -> Vec<StdStream>;
    /// Files `pid` holds on mounts outside its mount namespace ([`process::foreign_mount_files`]).
    fn external_files(&self, pid: i32) -> Vec<ExternalFile>;
    /// In `nvwa restore`: the holder (`nvwa hold`) that the unit's `ExecStartPre=` left in our
    /// cgroup, in the unit's fresh sandbox.
    fn sandbox_holder(&self) -> Option<i32>;
    /// Kills the holder once the restore is over.
    fn kill_holder(&self, pid: i32);
    /// [`crate::criu_image::restore_in_own_user_ns`].
    fn restore_in_own_user_ns(&self, dir: &Path, pid: i32) -> Result<(u64, u64), ImageError>;
    /// Starts `unit` (on the new boot: through nvwa's drop-in, i.e. its restore), waiting at
    /// most `deadline`, and returns what systemd says about it afterwards.
    fn start_service(&self, unit: &str, deadline: Duration) -> Result<UnitInfo, SystemdError>;
    /// Re-runs systemd's generators (nvwa's drop-ins disappear once restores are recorded).
    fn daemon_reload(&self) -> Result<(), SystemdError>;
    /// Under systemd, waits at most `deadline` for `network-online.target`; elsewhere (an
    /// init that configures the network before it starts nvwa) returns at once.
    fn wait_network_online(&self, deadline: Duration) -> Result<(), SystemdError>;
    /// `kexec_mode: orderly`: makes sure that systemd's shutdown cannot let a saved process run
    /// again, then asks systemd to stop the machine and jump into the loaded kernel. The listed
    /// `units` get a runtime drop-in that stops them with SIGKILL and without ExecStop=; the
    /// trees of the pid targets `pids` are killed (their units are not nvwa's to change, and
    /// systemd's SIGTERM + SIGCONT would let them run). Returns once systemd accepted the job.
    /// On error the units are released; killed pid targets are restored from their committed
    /// images by the rollback.
    fn orderly_kexec(&self, units: &[String], pids: &[i32]) -> Result<(), SystemdError>;
    /// Writes `pid` into `path` (a pid file systemd reads), creating its directory.
    fn write_pid_file(&self, path: &Path, pid: i32) -> std::io::Result<()>;
    /// The network configuration (`ip -j`, `nft`, iptables-legacy), unfiltered.
    fn net_read(&self) -> Result<NetState, NetError>;
    /// The names of the interfaces that exist now.
    fn net_links(&self) -> Result<std::collections::BTreeSet<String>, NetError>;
    /// Runs one network command; scripts are written into `scratch` first.
    fn net_apply(&self, cmd: &NetCmd, scratch: &Path) -> Result<(), NetError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinOp {
    Clear,
    Finish,
}

/// The machine nvwa runs on.
pub struct RealMachine {
    /// "/" in production; lets `nvwa` find kernels under another root.
    pub root: std::path::PathBuf,
}

impl Default for RealMachine {
    fn default() -> Self {
        RealMachine { root: "/".into() }
    }
}

impl Machine for RealMachine {
    fn running_kernel(&self) -> String {
        boot::running_kernel()
    }
    fn find_kernel(&self, version: &str) -> Result<KernelFiles, BootError> {
        boot::find_kernel(&self.root, version)
    }
    fn load_kernel(
        &self,
        files: &KernelFiles,
        kexec_exe: &Path,
        quick: bool,
    ) -> Result<(), KexecError> {
        let mut cmdline = kexec::current_cmdline()?;
        if let Some(last) = pidns::next_boot_reservation() {
            cmdline = pidns::cmdline_with_reservation(&cmdline, last);
        }
        if quick {
            return kexec::load_with_tool(kexec_exe, files, &cmdline, true);
        }
        match kexec::load_native(files, &cmdline) {
            Err(KexecError::Load { source, .. }) if source.raw_os_error() == Some(libc::ENOSYS) => {
                kexec::load_with_tool(kexec_exe, files, &cmdline, false)
            }
            other => other,
        }
    }
    fn unload_kernel(&self) -> Result<(), KexecError> {
        kexec::unload()
    }
    fn procs(&self) -> &dyn ProcView {
        &RealProcs
    }
    fn fs(&self) -> &dyn FsView {
        &RealFs
    }
    fn tree_ids(&self, pid: i32) -> Vec<i32> {
        process::tree_ids(pid)
    }
    fn dump(&self, criu: &Criu, pid: i32, dir: &Path, opts: DumpOptions) -> Result<u64, CriuError> {
        let locked = opts.connections == Connections::LockedNftables;
        let ms = criu.dump(pid, dir, opts)?;
        if locked {
            tcp::save_lock(dir, pid).map_err(|source| CriuError::NetworkLock { pid, source })?;
        }
        Ok(ms)
    }
    fn holds_tcp_connection(&self, pid: i32) -> bool {
        tcp::tree_holds_connection(pid)
    }
    fn nftables_lock_support(&self, criu: &Criu) -> Result<(), String> {
        criu.check_feature("network_lock_nftables")
    }
    fn release_network_lock(&self, dir: &Path, pid: i32, ids: &[i32]) -> Result<usize, TcpError> {
        tcp::release(dir, pid, ids)
    }
    fn pre_dump(
        &self,
        criu: &Criu,
        pid: i32,
        dir: &Path,
        prev: Option<&str>,
        opts: &DumpOptions,
    ) -> Result<PreDumpPass, CriuError> {
        criu.pre_dump(pid, dir, prev, opts)
    }
    fn resume(&self, ids: &[i32]) -> Result<(), nix::Error> {
        process::resume(ids)
    }
    fn make_durable(&self, dir: &Path) -> std::io::Result<()> {
        let d = std::fs::File::open(dir)?;
        nix::unistd::syncfs(&d)?;
        d.sync_all()
    }
    fn kexec(&self) -> KexecError {
        kexec::execute()
    }
    fn restore(
        &self,
        criu: &Criu,
        dir: &Path,
        opts: &RestoreOptions,
    ) -> Result<(i32, u64), CriuError> {
        // Held until criu is done: its connections are restored with the sysctl it needs.
        let _window = tcp::WindowScaling::for_restore(dir);
        criu.restore(dir, opts)
    }
    fn lazy_pages_unsupported(&self) -> Option<String> {
        crate::uffd::lazy_restore_unsupported()
    }
    fn cache_criu_probes(&self, criu: &Criu) {
        criu.cache_kernel_probes()
    }
    fn finish_lazy_pages(&self, dir: &Path, deadline: Duration) -> Result<Transferred, LazyError> {
        lazy_pages::finish(dir, deadline)
    }
    fn kill_tree(&self, pid: i32) {
        process::kill_and_reap(&process::tree_ids(pid), KILL_WAIT);
    }
    fn reserve_pids(&self, ids: &[i32]) -> Result<(), PidError> {
        pidns::reserve_above(ids)
    }
    fn wait_pids_free(&self, ids: &[i32], timeout: Duration) -> Result<(), PidError> {
        pidns::wait_free(ids, timeout)
    }
    fn boot_id(&self) -> Result<String, JournalError> {
        crate::journal::boot_id()
    }
    fn criu_working_on(&self, dir: &Path) -> Vec<i32> {
        let mut pids = process::running_with_args(&["-D".as_ref(), dir.as_os_str()]);
        pids.extend(process::running_with_dir_fd(dir));
        pids
    }
    fn pin_memory(&self, op: PinOp) -> Result<(), PinMemError> {
        let dev = PinMem::open(&Path::new(DEV_ROOT).join(PINMEM_DEVICE))?;
        match op {
            PinOp::Clear => dev.clear(),
            PinOp::Finish => dev.finish_dump(),
        }
    }
    fn service(&self, unit: &str) -> Result<(UnitInfo, Vec<i32>), SystemdError> {
        let info = systemd::show(unit)?;
        let members = info
            .control_group
            .as_deref()
            .and_then(|cg| systemd::cgroup_members(cg, read_text))
            .unwrap_or_default();
        Ok((info, members))
    }
    fn std_streams(&self, pid: i32) -> Vec<StdStream> {
        process::std_stream_sockets(pid)
            .into_iter()
            .map(|(fd, inode)| StdStream { fd, inode })
            .collect()
    }
    fn external_files(&self, pid: i32) -> Vec<ExternalFile> {
        process::foreign_mount_files(pid)
            .into_iter()
            .map(|(fd, mnt_id, inode, path, flags)| ExternalFile {
                fd,
                mnt_id,
                inode,
                path,
                flags,
            })
            .collect()
    }
    fn sandbox_holder(&self) -> Option<i32> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let cg = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        let members = systemd::cgroup_members(cg, read_text)?;
        let me = std::process::id() as i32;
        let exe = std::env::current_exe().ok()?;
        members.into_iter().find(|&p| {
            p != me
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| crate::service::is_holder_cmdline(&c, &exe))
        })
    }
    fn kill_holder(&self, pid: i32) {
        process::kill_and_reap(&[pid], KILL_WAIT);
    }
    fn restore_in_own_user_ns(&self, dir: &Path, pid: i32) -> Result<(u64, u64), ImageError> {
        criu_image::restore_in_own_user_ns(dir, pid)
    }
    fn start_service(&self, unit: &str, deadline: Duration) -> Result<UnitInfo, SystemdError> {
        systemd::start(unit, deadline)?;
        systemd::show(unit)
    }
    fn daemon_reload(&self) -> Result<(), SystemdError> {
        systemd::daemon_reload()
    }
    fn wait_network_online(&self, deadline: Duration) -> Result<(), SystemdError> {
        if systemd::booted() {
            systemd::wait_network_online(deadline)
        } else {
            Ok(())
        }
    }
    fn orderly_kexec(&self, units: &[String], pids: &[i32]) -> Result<(), SystemdError> {
        let held = systemd::hold(units)?;
        let processes: Vec<i32> = pids.iter().flat_map(|&p| process::tree_pids(p)).collect();
        process::kill_and_reap(&processes, KILL_WAIT);
        systemd::kexec().inspect_err(|_| systemd::release(&held))
    }
    fn write_pid_file(&self, path: &Path, pid: i32) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, format!("{pid}\n"))
    }
    fn net_read(&self) -> Result<NetState, NetError> {
        net::read_real()
    }
    fn net_links(&self) -> Result<std::collections::BTreeSet<String>, NetError> {
        net::links_real()
    }
    fn net_apply(&self, cmd: &NetCmd, scratch: &Path) -> Result<(), NetError> {
        net::apply_real(cmd, scratch)
    }
}
