//! Established TCP connections of the targets, across the kernel switch.
//!
//! criu dumps a connection in repair mode and, with `--network-lock nftables`, drops the
//! connection's packets in a table of its own (`table inet CRIU-<id>`) so that the peer sees
//! silence, never a reset. With `--leave-stopped` the table and the repair mode outlive the dump;
//! criu's restore deletes the table, but never creates it: on the new boot nothing would stand
//! between the peer's retransmissions and the new kernel, which answers them with a reset. So:
//! - after each dump, the table criu made is saved beside the images ([`LOCK_FILE`]);
//! - `nvwa pre` reinstalls it on the new boot, before the network comes up ([`install_saved`]);
//! - a rollback on the old kernel deletes it and turns repair mode off ([`release`]);
//! - a connection saved without window scaling is restored with `net.ipv4.tcp_window_scaling`
//!   at 0 ([`WindowScaling`]): criu (3.17 to 4.1 at least) restores it with the kernel's
//!   default receive scale, so it advertises a window of a few bytes and the peer trickles.
//!
//! The tables are handled through libnftables, the library criu itself locks with: it is there
//! wherever criu's nftables lock works, and the `nft` program often is not.

use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::criu_image::{self, ImageError};

/// The saved lock table, in nft's own syntax, beside a target's images.
pub const LOCK_FILE: &str = "nvwa-net-lock.nft";
const WINDOW_SCALING: &str = "/proc/sys/net/ipv4/tcp_window_scaling";
/// Serialises restores around [`WINDOW_SCALING`], across the server's threads and the units'
/// `nvwa restore` processes.
const RESTORE_LOCK: &str = "/run/nvwa/tcp-restore.lock";
/// The value [`WINDOW_SCALING`] had before a restore set it to 0: a restore killed before it
/// could put it back leaves it here for the next one.
const SAVED_SCALING: &str = "/run/nvwa/tcp_window_scaling.saved";

#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("cannot load libnftables.so.1 (criu's nftables network lock uses it): {0}; install libnftables1")]
    Library(String),
    #[error("nftables refused `{cmd}`: {error}")]
    Nft { cmd: String, error: String },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no nftables table (it should start with `table inet CRIU-`); remove it or run `nvwa init`")]
    NotALock { path: PathBuf },
    #[error(transparent)]
    Image(#[from] ImageError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TcpError + '_ {
    move |source| TcpError::Io {
        path: path.to_path_buf(),
        source,
    }
}

type Ctx = *mut c_void;

/// The few entry points of libnftables nvwa needs, resolved once.
struct Nftables {
    new: unsafe extern "C" fn(u32) -> Ctx,
    free: unsafe extern "C" fn(Ctx),
    buffer_output: unsafe extern "C" fn(Ctx) -> c_int,
    buffer_error: unsafe extern "C" fn(Ctx) -> c_int,
    output: unsafe extern "C" fn(Ctx) -> *const c_char,
    error: unsafe extern "C" fn(Ctx) -> *const c_char,
    run: unsafe extern "C" fn(Ctx, *const c_char) -> c_int,
}

fn library() -> Result<&'static Nftables, TcpError> {
    static LIB: OnceLock<Result<Nftables, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to the signature
        // libnftables(3) documents for it. The library is never closed.
        unsafe {
            let h = libc::dlopen(c"libnftables.so.1".as_ptr(), libc::RTLD_NOW);
            if h.is_null() {
                let e = libc::dlerror();
                return Err(if e.is_null() {
                    "dlopen failed".into()
                } else {
                    CStr::from_ptr(e).to_string_lossy().into_owned()
                });
            }
            let sym = |name: &CStr| {
                let p = libc::dlsym(h, name.as_ptr());
                if p.is_null() {
                    Err(format!("libnftables.so.1 has no {}", name.to_string_lossy()))
                } else {
                    Ok(p)
                }
            };
            Ok(Nftables {
                new: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32) -> Ctx>(sym(
                    c"nft_ctx_new",
                )?),
                free: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(Ctx)>(sym(
                    c"nft_ctx_free",
                )?),
                buffer_output: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(Ctx) -> c_int>(
                    sym(c"nft_ctx_buffer_output")?,
                ),
                buffer_error: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(Ctx) -> c_int>(
                    sym(c"nft_ctx_buffer_error")?,
                ),
                output: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(Ctx) -> *const c_char,
                >(sym(c"nft_ctx_get_output_buffer")?),
                error: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(Ctx) -> *const c_char>(
                    sym(c"nft_ctx_get_error_buffer")?,
                ),
                run: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(Ctx, *const c_char) -> c_int,
                >(sym(c"nft_run_cmd_from_buffer")?),
            })
        }
    })
    .as_ref()
    .map_err(|e| TcpError::Library(e.clone()))
}

/// Runs nft commands (one or more lines of nft's syntax); returns what they printed.
fn nft(cmds: &str) -> Result<String, TcpError> {
    let lib = library()?;
    let c = CString::new(cmds).map_err(|_| TcpError::Nft {
        cmd: cmds.into(),
        error: "the command holds a NUL byte".into(),
    })?;
    // SAFETY: a fresh context used by this thread only, freed before returning; the buffers
    // it returns are copied before the free.
    unsafe {
        let ctx = (lib.new)(0);
        if ctx.is_null() {
            return Err(TcpError::Library("nft_ctx_new failed".into()));
        }
        (lib.buffer_output)(ctx);
        (lib.buffer_error)(ctx);
        let rc = (lib.run)(ctx, c.as_ptr());
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let (out, err) = (text((lib.output)(ctx)), text((lib.error)(ctx)));
        (lib.free)(ctx);
        if rc == 0 {
            Ok(out)
        } else {
            Err(TcpError::Nft {
                cmd: cmds.lines().next().unwrap_or_default().into(),
                error: err.trim().replace('\n', " | "),
            })
        }
    }
}

fn no_such_table(e: &TcpError) -> bool {
    matches!(e, TcpError::Nft { error, .. } if error.contains("No such file or directory"))
}

/// The name of the table criu locked the dump in `dir` with: `CRIU-<run id>` (criu 4.1 and
/// newer, the id is in the inventory) or `CRIU-<root pid>` (older), cut where criu cuts it
/// (it formats `inet CRIU-…` into 32 bytes).
pub fn lock_table(dir: &Path, pid: i32) -> Result<String, TcpError> {
    let full = match criu_image::dump_run_id(dir)? {
        Some(id) => format!("CRIU-{id}"),
        None => format!("CRIU-{pid}"),
    };
    Ok(full.chars().take(31 - "inet ".len()).collect())
}

/// After criu dumped `pid` into `dir`: saves the lock table it left, if any. Returns whether
/// there was one (criu locked with iptables, or nothing, otherwise).
pub fn save_lock(dir: &Path, pid: i32) -> Result<bool, TcpError> {
    let table = lock_table(dir, pid)?;
    let text = match nft(&format!("list table inet {table}")) {
        Ok(t) => t,
        Err(e) if no_such_table(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let path = dir.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    f.write_all(text.as_bytes()).map_err(io(&path))?;
    Ok(true)
}

/// Whether a lock table (as `nft list table` prints it) holds a connection: a set with
/// elements.
fn locks_a_connection(text: &str) -> bool {
    text.lines()
        .any(|l| l.trim_start().starts_with("elements = "))
}

/// The table a saved lock file names.
fn saved_table(path: &Path) -> Result<Option<(String, String)>, TcpError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let name = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("table inet "))
        .and_then(|rest| rest.split_whitespace().next())
        .filter(|n| n.starts_with("CRIU-"))
        .ok_or_else(|| TcpError::NotALock {
            path: path.to_path_buf(),
        })?;
    Ok(Some((name.to_string(), text)))
}

/// On the new boot, before the network comes up: puts back the lock saved with the images in
/// `dir`, so the peers' segments are dropped until criu's restore deletes it. Returns the
/// table's name, or `None` when nothing was saved or the lock holds no connection. A table
/// already there is left as it is.
///
/// criu's table drops only the connections in its sets (`conns4`, `conns6`), one element per
/// established connection it dumped; with both sets empty it drops nothing, so putting it back
/// would cost the boot two libnftables calls per target for no effect (`nvwa pre` took 3–4 s
/// for the 16 targets of the lab's bench, under TCG). criu's restore deletes its table without
/// checking that it was there (`network_unlock` ignores the result).
pub fn install_saved(dir: &Path) -> Result<Option<String>, TcpError> {
    let Some((table, text)) = saved_table(&dir.join(LOCK_FILE))? else {
        return Ok(None);
    };
    if !locks_a_connection(&text) {
        return Ok(None);
    }
    match nft(&format!("list table inet {table}")) {
        Ok(_) => return Ok(Some(table)),
        Err(e) if no_such_table(&e) => {}
        Err(e) => return Err(e),
    }
    nft(&text)?;
    Ok(Some(table))
}

/// `nvwa pre` on a boot that must restore: puts back the locks of every target still to be
/// restored by a committed update made on another boot. Nothing for an update that never
/// committed (it is abandoned, its targets died with the old kernel: a lock would only keep
/// their peers waiting) or that is over. Returns one line per target with a lock.
pub fn install_for_restore(criu_dir: &Path, boot: &str) -> Result<Vec<String>, PreError> {
    use crate::journal::{Journal, Phase};
    if std::fs::symlink_metadata(criu_dir).is_err() {
        return Ok(Vec::new());
    }
    crate::trust::ensure_trusted(criu_dir, crate::trust::TrustedKind::ImageDir)?;
    let Some(j) = Journal::load(criu_dir)? else {
        return Ok(Vec::new());
    };
    let due = match j.phase {
        Phase::Committed => !j.committed_on(boot),
        Phase::Booted | Phase::RestoreFailed => true,
        _ => false,
    };
    if !due {
        return Ok(Vec::new());
    }
    let mut lines = Vec::new();
    for t in j.targets.iter().filter(|t| t.state.awaits_restore()) {
        let dir = criu_dir.join(&t.name);
        if let Some(table) = install_saved(&dir).map_err(|source| PreError::Install {
            target: t.name.clone(),
            source,
        })? {
            lines.push(format!(
                "{}: TCP connections locked (table inet {table}) until its restore",
                t.name
            ));
        }
    }
    Ok(lines)
}

#[derive(Debug, thiserror::Error)]
pub enum PreError {
    #[error(transparent)]
    Untrusted(#[from] crate::trust::TrustError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("cannot lock the saved TCP connections of {target} before the network comes up: {source}; a peer that sends before the restore gets a reset")]
    Install { target: String, source: TcpError },
}

/// Deletes the lock saved in `dir`, if it is in place. Returns the table's name when one was
/// deleted.
pub fn delete_saved(dir: &Path) -> Result<Option<String>, TcpError> {
    let Some((table, _)) = saved_table(&dir.join(LOCK_FILE))? else {
        return Ok(None);
    };
    match nft(&format!("delete table inet {table}")) {
        Ok(_) => Ok(Some(table)),
        Err(e) if no_such_table(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A rollback on the old kernel: the dump of `pid` into `dir` left its connections locked and in
/// repair mode (criu unlocks only when it resumes the tree itself). Deletes the lock (the saved
/// one, or, when the server died before it could save it, the one the images name), then turns
/// repair mode off on every TCP socket of the processes `ids` (which sends each peer a window
/// probe). Returns how many sockets left repair mode.
pub fn release(dir: &Path, pid: i32, ids: &[i32]) -> Result<usize, TcpError> {
    if !dir.join(LOCK_FILE).exists() && dir.join("inventory.img").exists() {
        let table = lock_table(dir, pid)?;
        match nft(&format!("delete table inet {table}")) {
            Err(e) if !no_such_table(&e) => return Err(e),
            _ => {}
        }
    }
    delete_saved(dir)?;
    let mut n = 0;
    for_each_tcp_socket(ids, |fd| {
        if getsockopt_int(fd, libc::SOL_TCP, libc::TCP_REPAIR) == Some(1)
            && setsockopt_int(fd, libc::SOL_TCP, libc::TCP_REPAIR, 0)
        {
            n += 1;
        }
    });
    Ok(n)
}

fn getsockopt_int(fd: i32, level: c_int, opt: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: an int-sized out buffer with its length.
    let rc = unsafe { libc::getsockopt(fd, level, opt, (&mut v as *mut c_int).cast(), &mut len) };
    (rc == 0).then_some(v)
}

fn setsockopt_int(fd: i32, level: c_int, opt: c_int, v: c_int) -> bool {
    // SAFETY: an int-sized in buffer with its length.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const c_int).cast(),
            std::mem::size_of::<c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Calls `f` with a copy (pidfd_getfd) of every TCP socket the processes `ids` hold, once per
/// process (threads share their process's descriptors).
fn for_each_tcp_socket(ids: &[i32], mut f: impl FnMut(i32)) {
    let mut seen = std::collections::BTreeSet::new();
    for &id in ids {
        let pid = crate::process::tgid(id).unwrap_or(id);
        if !seen.insert(pid) {
            continue;
        }
        // SAFETY: pidfd_open(2) returns a new descriptor or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if pidfd < 0 {
            continue;
        }
        // SAFETY: a descriptor we own from here on.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in fds.flatten() {
            let is_socket = std::fs::read_link(e.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
            let Some(target_fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if !is_socket {
                continue;
            }
            // SAFETY: pidfd_getfd(2) returns a new descriptor or -1.
            let fd =
                unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) }
                    as i32;
            if fd < 0 {
                continue;
            }
            // SAFETY: a descriptor we own from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let tcp = getsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PROTOCOL)
                == Some(libc::IPPROTO_TCP);
            if tcp {
                f(fd.as_raw_fd());
            }
        }
    }
}

/// Whether a process of the tree rooted at `root` holds a connected TCP socket (in any state
/// but listening or closed): what criu dumps only with `--tcp-established`, and locks. A
/// process whose descriptors or socket tables cannot be read counts as holding one.
pub fn tree_holds_connection(root: i32) -> bool {
    crate::process::tree_pids(root)
        .into_iter()
        .any(holds_connection)
}

fn holds_connection(pid: i32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return true;
    };
    let sockets: BTreeSet<u64> = fds
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| crate::process::socket_inode(&l.to_string_lossy()))
        .collect();
    if sockets.is_empty() {
        return false;
    }
    // The tables of the process's network namespace; one without IPv6 has no tcp6.
    ["tcp", "tcp6"].iter().any(|table| {
        match std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            Ok(text) => lists_connection(&text, &sockets),
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        }
    })
}

/// Whether a socket table (`/proc/net/tcp` or `tcp6`) lists one of `sockets` (inodes) in a state
/// other than LISTEN (`0A`) and CLOSE (`07`).
fn lists_connection(table: &str, sockets: &BTreeSet<u64>) -> bool {
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let inode = fields.get(9).and_then(|i| i.parse::<u64>().ok());
        match (fields.get(3), inode) {
            (Some(state), Some(inode)) => {
                sockets.contains(&inode) && !matches!(*state, "0A" | "07")
            }
            _ => false,
        }
    })
}

/// Held around the restore of one image set: while a set with connections saved without window
/// scaling is restored, `net.ipv4.tcp_window_scaling` is 0, and no other restore of
/// established connections runs (it would restore them with a window clamped to 64 KiB).
/// Restores without established connections do not wait. Dropping it puts the value back.
///
/// The sysctl is the machine's: a connection that anything else opens in that window is not
/// scaled either (its window is at most 64 KiB for its lifetime).
pub struct WindowScaling {
    _lock: Option<RestoreLock>,
    restore_to: Option<String>,
    places: Places,
    /// The connections saved without window scaling.
    pub unscaled: usize,
}

/// Where the sysctl, the lock and the saved value are (elsewhere in tests).
#[derive(Debug, Clone)]
struct Places {
    sysctl: PathBuf,
    lock: PathBuf,
    saved: PathBuf,
}

impl Places {
    fn real() -> Places {
        Places {
            sysctl: WINDOW_SCALING.into(),
            lock: RESTORE_LOCK.into(),
            saved: SAVED_SCALING.into(),
        }
    }

    /// A restore that was killed while it held the sysctl at 0 left its old value behind. Only
    /// a holder of the lock may tell a leftover from the value of a restore running now.
    fn put_back_leftover(&self, _held: &RestoreLock) {
        if let Ok(v) = std::fs::read_to_string(&self.saved) {
            if std::fs::write(&self.sysctl, v.trim()).is_ok() {
                tracing::warn!(
                    "{} put back to {} (left at 0 by a restore that did not finish)",
                    self.sysctl.display(),
                    v.trim()
                );
                let _ = std::fs::remove_file(&self.saved);
            }
        }
    }
}

impl WindowScaling {
    /// Waits for its turn, then sets the sysctl for the images in `dir`. Problems are logged,
    /// never fatal: the restore is still better than none.
    pub fn for_restore(dir: &Path) -> WindowScaling {
        WindowScaling::at(dir, Places::real())
    }

    fn at(dir: &Path, places: Places) -> WindowScaling {
        let streams = match criu_image::tcp_streams(dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    "cannot tell which TCP connections of {} had window scaling: {e}",
                    dir.display()
                );
                Vec::new()
            }
        };
        let unscaled = streams.iter().filter(|(_, scaled)| !scaled).count();
        let mut g = WindowScaling {
            _lock: None,
            restore_to: None,
            places,
            unscaled,
        };
        // A saved value is a leftover only when nobody holds the lock: while a parallel
        // restore holds the sysctl at 0, the saved value is its, and putting it back would
        // restore that restore's connections with tiny windows. So it is put back only under
        // the lock; a restore without connections takes it only if it is free at once. (The
        // lock must be bound to a name: a temporary in an `if` condition is dropped before the
        // block runs, which let this put the value back unlocked, under another restore.)
        if streams.is_empty() {
            if let Ok(held) = open_restore_lock(&g.places.lock, LockMode::ExclusiveIfFree) {
                g.places.put_back_leftover(&held);
            }
            return g;
        }
        let mode = if unscaled > 0 {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        };
        match open_restore_lock(&g.places.lock, mode) {
            Ok(held) => {
                // The holder of the sysctl may have been killed while we waited.
                g.places.put_back_leftover(&held);
                g._lock = Some(held);
            }
            Err(e) => tracing::warn!(
                "restoring {} without serialising restores: {e}",
                dir.display()
            ),
        }
        if unscaled > 0 {
            let sysctl = g.places.sysctl.clone();
            match std::fs::read_to_string(&sysctl) {
                Ok(v) if v.trim() != "0" => {
                    let saved = std::fs::write(&g.places.saved, v.trim());
                    match saved.and_then(|()| std::fs::write(&sysctl, "0")) {
                        Ok(()) => {
                            tracing::info!(
                                "{}: {unscaled} TCP connection(s) saved without window scaling: restoring them with {}=0 (was {})",
                                dir.display(),
                                sysctl.display(),
                                v.trim()
                            );
                            g.restore_to = Some(v.trim().to_string());
                        }
                        Err(e) => tracing::warn!(
                            "cannot set {} to 0 for the restore of {}: {e}; its {unscaled} connection(s) without window scaling will advertise tiny windows",
                            sysctl.display(),
                            dir.display()
                        ),
                    }
                }
                Ok(_) => tracing::info!(
                    "{}: {unscaled} TCP connection(s) saved without window scaling; {} is 0 already",
                    dir.display(),
                    sysctl.display()
                ),
                Err(e) => tracing::warn!("cannot read {}: {e}", sysctl.display()),
            }
        }
        g
    }
}

impl Drop for WindowScaling {
    fn drop(&mut self) {
        if let Some(v) = self.restore_to.take() {
            match std::fs::write(&self.places.sysctl, &v) {
                Ok(()) => {
                    tracing::info!("{} put back to {v}", self.places.sysctl.display());
                    let _ = std::fs::remove_file(&self.places.saved);
                }
                Err(e) => tracing::error!(
                    "cannot put {} back to {v}: {e}; run `sysctl net.ipv4.tcp_window_scaling={v}`",
                    self.places.sysctl.display()
                ),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockMode {
    /// A restore of connections without window scaling: alone.
    Exclusive,
    /// A restore of scaled connections: with others like it.
    Shared,
    /// Only if nobody holds it now (fails with EWOULDBLOCK otherwise).
    ExclusiveIfFree,
}

/// The restore lock, held while this lives (flock on its own open file description).
struct RestoreLock {
    _file: std::fs::File,
}

fn open_restore_lock(path: &Path, mode: LockMode) -> std::io::Result<RestoreLock> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(d) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    let op = match mode {
        LockMode::Exclusive => libc::LOCK_EX,
        LockMode::Shared => libc::LOCK_SH,
        LockMode::ExclusiveIfFree => libc::LOCK_EX | libc::LOCK_NB,
    };
    // SAFETY: flock(2) on a descriptor we hold; the lock goes with it.
    if unsafe { libc::flock(f.as_raw_fd(), op) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(RestoreLock { _file: f })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_any_socket_of_the_tree_neither_listening_nor_closed() {
        // /proc/net/tcp: a listener (inode 100), an established connection (200), a closed
        // socket (300), and one in TIME_WAIT, which no descriptor holds (inode 0).
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D2F4 01 00000000:00000000 00:00000000 00000000     0        0 200 1 0000000000000000 20 4 30 10 -1
   2: 00000000:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 300 1 0000000000000000 100 0 0 10 0
   3: 0100007F:D2F6 0100007F:1F90 06 00000000:00000000 03:00000D2E 00000000     0        0 0 3 0000000000000000
";
        let held = |inodes: &[u64]| inodes.iter().copied().collect::<BTreeSet<u64>>();
        assert!(!lists_connection(table, &held(&[100, 300])));
        assert!(lists_connection(table, &held(&[100, 200])));
        assert!(!lists_connection(table, &held(&[999])));
        assert!(!lists_connection("", &held(&[200])));
    }

    #[test]
    fn a_lock_without_connections_is_not_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let empty = "table inet CRIU-1008 {\n\tset conns4 {\n\t\ttype ipv4_addr . inet_service . ipv4_addr . inet_service\n\t}\n\tset conns6 {\n\t\ttype ipv6_addr . inet_service . ipv6_addr . inet_service\n\t}\n}\n";
        std::fs::write(dir.path().join(LOCK_FILE), empty).unwrap();
        // No nftables call is made (none is possible in a unit test): there is nothing to lock.
        assert_eq!(install_saved(dir.path()).unwrap(), None);
        assert!(!locks_a_connection(empty));
        let one = empty.replace(
            "inet_service\n\t}\n\tset conns6",
            "inet_service\n\t\telements = { 10.0.2.15 . 7000 . 10.0.2.2 . 41234 }\n\t}\n\tset conns6",
        );
        assert!(locks_a_connection(&one), "{one}");
    }

    #[test]
    fn a_saved_lock_names_its_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(LOCK_FILE);
        assert!(saved_table(&p).unwrap().is_none());
        std::fs::write(
            &p,
            "table inet CRIU-5b1c7a7e-0d2f-4e6a-b {\n\tset conns4 {\n\t}\n}\n",
        )
        .unwrap();
        let (name, text) = saved_table(&p).unwrap().unwrap();
        assert_eq!(name, "CRIU-5b1c7a7e-0d2f-4e6a-b");
        assert!(text.contains("conns4"));
        std::fs::write(&p, "table inet filter {\n}\n").unwrap();
        let e = saved_table(&p).unwrap_err();
        assert!(e.to_string().contains("nvwa init"), "{e}");
    }

    #[test]
    fn the_table_name_is_cut_where_criu_cuts_it() {
        let dir = tempfile::tempdir().unwrap();
        // An inventory with only img_version: criu 3.17 names the table after the pid.
        std::fs::write(
            dir.path().join("inventory.img"),
            [1, 0, 0, 0, 2, 0, 0, 0, 8, 2],
        )
        .unwrap();
        assert_eq!(lock_table(dir.path(), 4242).unwrap(), "CRIU-4242");
        // criu 4.1: "inet CRIU-<uuid>" formatted into char[32].
        let id = b"0b5e6c1e-8d7f-4a0b-9c3d-2e1f0a9b8c7d";
        let mut msg = vec![8, 2, 13 << 3 | 2, id.len() as u8];
        msg.extend_from_slice(id);
        let mut img = vec![1, 0, 0, 0];
        img.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        img.extend_from_slice(&msg);
        std::fs::write(dir.path().join("inventory.img"), img).unwrap();
        let name = lock_table(dir.path(), 4242).unwrap();
        assert_eq!(name, "CRIU-0b5e6c1e-8d7f-4a0b-9c");
        assert_eq!(format!("inet {name}").len(), 31);
    }

    #[test]
    fn only_a_committed_update_awaiting_its_restore_on_another_boot_locks_at_boot() {
        use crate::journal::Phase;
        use crate::testing::{self, FakeMachine, NEW_BOOT, OLD_BOOT};
        let dir = crate::trust::trusted_tempdir();
        let cfg = testing::config(dir.path(), &[100]);
        let criu_dir = &cfg.server.criu_dir;
        // No journal: nothing to do.
        assert!(install_for_restore(criu_dir, NEW_BOOT).unwrap().is_empty());
        for (last, boot) in [
            // Abandoned on the next boot: its targets died with the old kernel.
            (Phase::Dumped, NEW_BOOT),
            // Committed, but this is still the boot that committed: no jump happened.
            (Phase::Committed, OLD_BOOT),
            (Phase::Restored, NEW_BOOT),
            (Phase::RolledBack, NEW_BOOT),
        ] {
            let m = FakeMachine::with_pids(&[100]);
            testing::save_on_old_boot(&cfg, testing::targets(&m, &[100]), last);
            let images = criu_dir.join("100");
            std::fs::create_dir_all(&images).unwrap();
            // Not a table: reading it would fail, so an empty answer proves it was not read.
            std::fs::write(images.join(LOCK_FILE), "garbage").unwrap();
            assert!(
                install_for_restore(criu_dir, boot).unwrap().is_empty(),
                "{last:?} on {boot}"
            );
        }
        // Committed, on the new boot: the saved lock is read (and here found malformed).
        let m = FakeMachine::with_pids(&[100]);
        testing::save_on_old_boot(&cfg, testing::targets(&m, &[100]), Phase::Committed);
        let e = install_for_restore(criu_dir, NEW_BOOT).unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot lock the saved TCP connections of 100"),
            "{e}"
        );
    }

    #[test]
    fn unscaled_connections_are_restored_with_the_sysctl_at_0_and_it_is_put_back() {
        let t = tempfile::tempdir().unwrap();
        let places = Places {
            sysctl: t.path().join("tcp_window_scaling"),
            lock: t.path().join("run/tcp-restore.lock"),
            saved: t.path().join("run/saved"),
        };
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        std::fs::write(&places.sysctl, "1\n").unwrap();
        let stream = |mask: u8| {
            // magics, then an entry whose field 5 (opt_mask) is `mask`.
            let msg = [8, 0, 5 << 3, mask];
            let mut img = vec![0u8; 8];
            img.extend_from_slice(&(msg.len() as u32).to_le_bytes());
            img.extend_from_slice(&msg);
            img
        };
        // No established connections: the sysctl is not touched.
        let none = t.path().join("none");
        std::fs::create_dir(&none).unwrap();
        drop(WindowScaling::at(&none, places.clone()));
        assert_eq!(read(&places.sysctl), "1\n");

        // Scaled ones only: the lock is shared, the sysctl untouched.
        let scaled = t.path().join("scaled");
        std::fs::create_dir(&scaled).unwrap();
        std::fs::write(scaled.join("tcp-stream-1.img"), stream(0x7)).unwrap();
        let g = WindowScaling::at(&scaled, places.clone());
        assert_eq!((g.unscaled, read(&places.sysctl).as_str()), (0, "1\n"));
        drop(g);

        // One unscaled: 0 while held (its old value kept aside), put back when dropped.
        let unscaled = t.path().join("unscaled");
        std::fs::create_dir(&unscaled).unwrap();
        std::fs::write(unscaled.join("tcp-stream-1.img"), stream(0x7)).unwrap();
        std::fs::write(unscaled.join("tcp-stream-2.img"), stream(0x2)).unwrap();
        let g = WindowScaling::at(&unscaled, places.clone());
        assert_eq!(g.unscaled, 1);
        assert_eq!(read(&places.sysctl), "0");
        assert_eq!(read(&places.saved), "1");
        drop(g);
        assert_eq!(read(&places.sysctl), "1");
        assert!(!places.saved.exists());

        // A parallel restore without connections, while one holds the sysctl at 0: the saved
        // value is that restore's, not a leftover, and stays.
        let g = WindowScaling::at(&unscaled, places.clone());
        drop(WindowScaling::at(&none, places.clone()));
        assert_eq!(read(&places.sysctl), "0");
        assert_eq!(read(&places.saved), "1");
        drop(g);
        assert_eq!(read(&places.sysctl), "1");

        // A restore killed while it held the sysctl at 0: the next one puts the value back.
        std::fs::write(&places.sysctl, "0").unwrap();
        std::fs::write(&places.saved, "1").unwrap();
        drop(WindowScaling::at(&none, places.clone()));
        assert_eq!(read(&places.sysctl), "1");
        assert!(!places.saved.exists());
    }
}
