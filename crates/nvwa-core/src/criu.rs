//! Checkpoint and restore through the `criu` binary.
//!
//! We run the binary rather than CRIU's RPC (rust-criu): the all-or-nothing update needs
//! `--leave-stopped`, pre-dump and per-run log files, and the CLI is the interface the original
//! used and operators know how to debug (`dump.log`, `restore.log` beside the images).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::exec::{self, ExecError};

pub const DUMP_LOG: &str = "dump.log";
pub const RESTORE_LOG: &str = "restore.log";
pub const PRE_DUMP_LOG: &str = "pre-dump.log";
pub const PIDFILE: &str = "restored.pid";

/// The original's options, kept so images and behaviour match it. Its `--tcp-established` is
/// [`TCP_ESTABLISHED`], which a dump leaves out for a tree without connections
/// ([`Connections::Refused`]).
const COMMON: &[&str] = &[
    "--ext-unix-sk",
    "--file-locks",
    "--shell-job",
    "--enable-external-masters",
    "--skip-in-flight",
    "-v4",
];

/// Established TCP connections are dumped (in repair mode) and restored.
const TCP_ESTABLISHED: &str = "--tcp-established";

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot run {exe}: {source}; install criu (apt-get install criu) or set criu_exe in nvwa-server.yaml")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the namespaces of pid {pid} to run criu inside them: {source}; is the process still running?")]
    Namespaces { pid: i32, source: std::io::Error },
    #[error("cannot prepare the image directory {dir}: {source}")]
    ImageDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("criu {action} of {object} did not finish within {} s and was killed; the deadline is {key} in nvwa-server.yaml (log: {log})", .after.as_secs())]
    TimedOut {
        action: &'static str,
        object: String,
        after: Duration,
        key: &'static str,
        log: PathBuf,
    },
    #[error("criu {action} of {object} was stopped: the nvwa server is shutting down")]
    Cancelled {
        action: &'static str,
        object: String,
    },
    #[error("cannot wait for criu {action} of {object}: {source}")]
    Wait {
        action: &'static str,
        object: String,
        source: std::io::Error,
    },
    #[error("criu dumped pid {pid} with its TCP connections locked, but the lock could not be saved for the new boot: {source}")]
    NetworkLock {
        pid: i32,
        source: crate::tcp::TcpError,
    },
    #[error("cannot prepare the pre-dumped images in {dir} for a lazy restore: {source}; set lazy_restore: false to restore them in full")]
    LazyView {
        dir: PathBuf,
        source: crate::criu_image::ImageError,
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

    /// A dump without `--tcp-established` ([`Connections::Refused`]) found a connected TCP
    /// socket in the frozen tree (criu: "Connected TCP socket, consider using
    /// --tcp-established option").
    pub fn found_connection(&self) -> bool {
        matches!(self, CriuError::Failed { summary, .. }
            if summary.contains("Connected TCP socket"))
    }
}

#[derive(Debug, Clone)]
pub struct Criu {
    pub exe: PathBuf,
    /// Set when the server is asked to stop: a running dump is killed so the update can roll
    /// back. Restores are never cancelled (a half-restored tree is worse than a late one).
    pub cancel: Option<Arc<AtomicBool>>,
}

#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    pub pin_memory: bool,
    pub deadline: Duration,
    /// Inodes of unix stream sockets whose peer stays behind (a service's journald streams):
    /// dumped as external, handed in again at restore with `--inherit-fd`.
    pub external_unix: Vec<u64>,
    /// Files on mounts outside the process's mount namespace, as criu names them
    /// (`file[<mnt_id hex>:<inode hex>]`): dumped as external, inherited at restore.
    pub external_files: Vec<String>,
    /// Run criu inside this pid's mount and UTS namespaces (a sandboxed service's main
    /// process), so that only its user namespace differs from criu's: criu refuses to dump
    /// namespaces that its target's user namespace does not own (REDIS-RECIPE.md, failure 1).
    pub enter_ns_of: Option<i32>,
    /// `--manage-cgroups=ignore`: a service stays in (and is restored into) its unit's cgroup,
    /// which systemd owns.
    pub ignore_cgroups: bool,
    /// The last pre-dump's directory, relative to the dump's: only the pages dirtied since that
    /// pass are written (`--prev-images-dir` with `--track-mem`); the restore reads the rest
    /// through the `parent` links.
    pub prev_images: Option<String>,
    /// What the dump does with the tree's TCP connections.
    pub connections: Connections,
}

/// How a dump treats the TCP connections of its tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Connections {
    /// `--tcp-established`, locked with criu's default method (iptables).
    #[default]
    Locked,
    /// `--tcp-established --network-lock nftables`: locked in a table that nvwa saves and puts
    /// back on the new boot (see `tcp`).
    LockedNftables,
    /// Without `--tcp-established`: nvwa found no connection in the tree. Once criu has frozen
    /// it, criu refuses a connection that appeared meanwhile ([`CriuError::found_connection`]).
    /// criu's nftables lock creates its table, chains and sets even for a tree without
    /// connections, and its libnftables calls serialise between parallel dumps.
    Refused,
}

/// One `criu pre-dump` pass: what it wrote and how long the target was frozen for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PreDumpPass {
    /// Bytes of memory pages written (the pages-*.img files).
    pub bytes: u64,
    pub ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub deadline: Duration,
    /// `(fd of ours, socket inode in the images)`: criu gives the restored process our fd
    /// wherever it had that socket. The fd must be open and inheritable when criu starts.
    pub inherit: Vec<(i32, u64)>,
    /// `(fd of ours, criu's name of the file)`: files dumped with [`DumpOptions::external_files`],
    /// opened again by us on the same path.
    pub inherit_files: Vec<(i32, String)>,
    /// `--join-ns mnt:PID --join-ns uts:PID`: the restored tree enters this pid's mount and UTS
    /// namespaces (the holder that systemd started in the unit's fresh sandbox).
    pub join_ns_of: Option<i32>,
    /// Restore without the memory and start a `criu lazy-pages` daemon that fills it in (see
    /// [`crate::lazy_pages`]; the caller waits for it with [`crate::lazy_pages::finish`]).
    pub lazy: bool,
}

impl Criu {
    pub fn new(exe: impl Into<PathBuf>) -> Criu {
        Criu {
            exe: exe.into(),
            cancel: None,
        }
    }

    pub fn cancellable(mut self, flag: Arc<AtomicBool>) -> Criu {
        self.cancel = Some(flag);
        self
    }

    /// Checkpoints the tree rooted at `pid` into `dir` and leaves it stopped, so that a later
    /// failure elsewhere can still resume it. Returns the time spent, in milliseconds.
    pub fn dump(&self, pid: i32, dir: &Path, opts: DumpOptions) -> Result<u64, CriuError> {
        create_image_dir(dir, true)?;
        let pid_s = pid.to_string();
        let mut args: Vec<String> = ["dump", "-t", &pid_s, "--leave-stopped"]
            .map(String::from)
            .into();
        if opts.pin_memory {
            args.push("--pin-memory".into());
        }
        for ino in &opts.external_unix {
            args.extend(["--external".into(), format!("unix[{ino}]")]);
        }
        for key in &opts.external_files {
            args.extend(["--external".into(), key.clone()]);
        }
        if opts.ignore_cgroups {
            args.push("--manage-cgroups=ignore".into());
        }
        if let Some(prev) = &opts.prev_images {
            args.extend([
                "--track-mem".into(),
                "--prev-images-dir".into(),
                prev.clone(),
            ]);
        }
        if opts.connections == Connections::LockedNftables {
            args.extend(["--network-lock".into(), "nftables".into()]);
        }
        let run = Run {
            action: "dump",
            object: format!("pid {pid}"),
            log: DUMP_LOG,
            deadline: opts.deadline,
            deadline_key: "dump_timeout",
            cancellable: true,
            tcp_established: opts.connections != Connections::Refused,
        };
        self.run_for(&opts, run, dir, &args)
    }

    /// One pre-dump pass of the tree rooted at `pid` into `dir`: its memory (only what changed
    /// since the pass in `prev`, relative to `dir`, when given), with the tree running again
    /// afterwards. Memory tracking (soft-dirty bits) starts here, for the next pass and the dump.
    pub fn pre_dump(
        &self,
        pid: i32,
        dir: &Path,
        prev: Option<&str>,
        opts: &DumpOptions,
    ) -> Result<PreDumpPass, CriuError> {
        // A pass's own directory: one left behind would mix two passes' pages.
        create_image_dir(dir, false)?;
        let pid_s = pid.to_string();
        // `read`: the tree is frozen only while criu walks its mappings and clears the
        // soft-dirty bits; the pages are read with process_vm_readv once it runs again (a page
        // written meanwhile is dirty, so the next pass or the dump copies it again). criu's
        // default, `splice`, keeps the tree frozen until every page is in its pipes.
        let mut args: Vec<String> = [
            "pre-dump",
            "-t",
            &pid_s,
            "--track-mem",
            "--pre-dump-mode=read",
        ]
        .map(String::from)
        .into();
        if let Some(prev) = prev {
            args.extend(["--prev-images-dir".into(), prev.to_string()]);
        }
        if opts.ignore_cgroups {
            args.push("--manage-cgroups=ignore".into());
        }
        let run = Run {
            action: "pre-dump",
            object: format!("pid {pid}"),
            log: PRE_DUMP_LOG,
            deadline: opts.deadline,
            deadline_key: "dump_timeout",
            cancellable: true,
            tcp_established: true,
        };
        let ms = self.run_for(opts, run, dir, &args)?;
        Ok(PreDumpPass {
            bytes: page_bytes(dir),
            ms,
        })
    }

    /// Restores the image set in `dir` detached from criu; returns the restored root pid.
    pub fn restore(&self, dir: &Path, opts: &RestoreOptions) -> Result<(i32, u64), CriuError> {
        let _ = std::fs::remove_file(dir.join(PIDFILE));
        let run = Run {
            action: "restore",
            object: dir.display().to_string(),
            log: RESTORE_LOG,
            deadline: opts.deadline,
            deadline_key: "restore_timeout",
            cancellable: false,
            tcp_established: true,
        };
        // The restored tree stays in the cgroup of whoever runs criu: a service's unit (its
        // restore runs there) or nvwa.service for pid targets. The cgroups of the old boot are
        // not recreated: a session scope or a stopped unit would come back as a directory
        // systemd knows nothing about.
        let mut args: Vec<String> = [
            "restore",
            "-d",
            "--pidfile",
            PIDFILE,
            "--manage-cgroups=ignore",
        ]
        .map(String::from)
        .into();
        for (fd, ino) in &opts.inherit {
            args.extend(["--inherit-fd".into(), format!("fd[{fd}]:socket:[{ino}]")]);
        }
        for (fd, key) in &opts.inherit_files {
            args.extend(["--inherit-fd".into(), format!("fd[{fd}]:{key}")]);
        }
        if let Some(h) = opts.join_ns_of {
            args.extend(["--join-ns".into(), format!("mnt:{h}")]);
            args.extend(["--join-ns".into(), format!("uts:{h}")]);
        }
        let daemon = if opts.lazy {
            args.push("--lazy-pages".into());
            // Pre-dumped images: the daemon reads a view of them (see crate::lazy_view).
            let view = crate::lazy_view::prepare(dir).map_err(|source| CriuError::LazyView {
                dir: dir.to_path_buf(),
                source,
            })?;
            let images = view.as_ref().map_or(dir, |v| v.view.as_path());
            Some(self.start_lazy_pages(dir, images, opts.deadline)?)
        } else {
            None
        };
        let ms = self.run(run, dir, &args).inspect_err(|_| {
            // Nothing will connect to it now: it would wait forever.
            if let Some(pid) = daemon {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::SIGKILL,
                );
            }
        })?;
        let pid = std::fs::read_to_string(dir.join(PIDFILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok((pid, ms))
    }

    /// Whether criu and the running kernel support `feature` (`criu check --feature`); the
    /// error is criu's last line, or why criu could not be asked.
    pub fn check_feature(&self, feature: &str) -> Result<(), String> {
        let out = exec::run(
            Command::new(&self.exe).args(["check", "--feature", feature]),
            Duration::from_secs(60),
        )
        .map_err(|e| e.to_string())?;
        if out.status.success() {
            return Ok(());
        }
        let text = out.output_text();
        Err(text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("criu check failed")
            .trim()
            .to_string())
    }

    /// Runs criu once for its probes of the running kernel, which it caches (`/run/criu.kdat`, on
    /// tmpfs: each boot starts without it); criu runs started afterwards read the cache instead
    /// of probing again, which parallel runs would otherwise each do (0.3–0.8 s apiece under
    /// TCG). Whether the feature asked about is there does not matter here.
    pub fn cache_kernel_probes(&self) {
        let _ = self.check_feature("uffd-noncoop");
    }

    /// Starts the `criu lazy-pages` daemon for the restore of `dir`, reading its pages from
    /// `images` (`dir` itself or its lazy view), its socket, log and pid file in `dir`; returns
    /// its pid once it listens for the restore (criu's parent process exits only then).
    fn start_lazy_pages(
        &self,
        dir: &Path,
        images: &Path,
        deadline: Duration,
    ) -> Result<i32, CriuError> {
        use crate::lazy_pages::{LOG, PIDFILE};
        let _ = std::fs::remove_file(dir.join(PIDFILE));
        let run = Run {
            action: "lazy-pages",
            object: dir.display().to_string(),
            log: LOG,
            deadline,
            deadline_key: "restore_timeout",
            cancellable: false,
            tcp_established: true,
        };
        let mut cmd = Command::new(&self.exe);
        cmd.args(["lazy-pages", "-d", "--pidfile", PIDFILE])
            .arg("-D")
            .arg(images)
            .arg("-W")
            .arg(dir);
        self.finish(cmd, run, dir)?;
        std::fs::read_to_string(dir.join(PIDFILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| CriuError::Failed {
                action: "lazy-pages",
                object: dir.display().to_string(),
                code: 0,
                summary: format!("it started but wrote no {PIDFILE}"),
                log: dir.join(LOG),
            })
    }

    /// A dump-side run: inside the target's namespaces when `opts` says so.
    fn run_for(
        &self,
        opts: &DumpOptions,
        run: Run,
        dir: &Path,
        args: &[String],
    ) -> Result<u64, CriuError> {
        match opts.enter_ns_of {
            None => self.run(run, dir, args),
            Some(ns_pid) => self.run_in_ns_of(ns_pid, run, dir, args),
        }
    }

    fn run(&self, run: Run, dir: &Path, args: &[String]) -> Result<u64, CriuError> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args).arg("-D").arg(dir);
        self.finish(cmd, run, dir)
    }

    /// [`Criu::run`] with criu inside `pid`'s mount and UTS namespaces. Inside, `/` may be
    /// read-only and noexec (ProtectSystem=, NoExecPaths=) and the image directory absent, so
    /// criu's executable and the directory are opened here first and named as
    /// `/proc/self/fd/N`: each keeps its own mount.
    fn run_in_ns_of(
        &self,
        pid: i32,
        run: Run,
        dir: &Path,
        args: &[String],
    ) -> Result<u64, CriuError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let exe = std::fs::File::open(&self.exe).map_err(|source| CriuError::Spawn {
            exe: self.exe.clone(),
            source,
        })?;
        let images = std::fs::File::open(dir).map_err(|source| CriuError::ImageDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let namespace = |kind: &str| {
            std::fs::File::open(format!("/proc/{pid}/ns/{kind}"))
                .map_err(|source| CriuError::Namespaces { pid, source })
        };
        let uts = namespace("uts")?;
        let mnt = namespace("mnt")?;
        let keep = [exe.as_raw_fd(), images.as_raw_fd()];
        let ns = [
            (uts.as_raw_fd(), libc::CLONE_NEWUTS),
            (mnt.as_raw_fd(), libc::CLONE_NEWNS),
        ];
        let mut cmd = Command::new(format!("/proc/self/fd/{}", keep[0]));
        cmd.args(args)
            .arg("-D")
            .arg(format!("/proc/self/fd/{}", keep[1]));
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, setns) on fds
        // that stay open in the parent until the child has exec'd.
        unsafe {
            cmd.pre_exec(move || {
                for fd in keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (fd, kind) in ns {
                    if libc::setns(fd, kind) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let res = self.finish(cmd, run, dir);
        drop((exe, images, uts, mnt));
        res
    }

    /// Runs `cmd` (criu with its action's arguments and `-D`) with the log and common options.
    fn finish(&self, mut cmd: Command, run: Run, dir: &Path) -> Result<u64, CriuError> {
        cmd.args(["-o", run.log]);
        if run.tcp_established {
            cmd.arg(TCP_ESTABLISHED);
        }
        cmd.args(COMMON);
        let cancel = self.cancel.as_deref().filter(|_| run.cancellable);
        let log = dir.join(run.log);
        let out = exec::run_cancellable(&mut cmd, run.deadline, cancel).map_err(|e| match e {
            ExecError::Spawn { source, .. } => CriuError::Spawn {
                exe: self.exe.clone(),
                source,
            },
            ExecError::TimedOut { after, .. } => CriuError::TimedOut {
                action: run.action,
                object: run.object.clone(),
                after,
                key: run.deadline_key,
                log: log.clone(),
            },
            ExecError::Cancelled { .. } => CriuError::Cancelled {
                action: run.action,
                object: run.object.clone(),
            },
            ExecError::Wait { source, .. } => CriuError::Wait {
                action: run.action,
                object: run.object.clone(),
                source,
            },
        })?;
        if out.status.success() {
            return Ok(out.elapsed.as_millis() as u64);
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default() + &out.stderr_text();
        Err(CriuError::Failed {
            action: run.action,
            object: run.object,
            code: out.code(),
            summary: summarize(&text),
            log,
        })
    }
}

/// Creates an image directory (and, when `recursive`, its parents). Images are full memory
/// dumps: nobody but root may read them.
fn create_image_dir(dir: &Path, recursive: bool) -> Result<(), CriuError> {
    std::fs::DirBuilder::new()
        .recursive(recursive)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CriuError::ImageDir {
            dir: dir.to_path_buf(),
            source,
        })
}

/// Removes what a failed dump wrote into `dir` (its files and its `parent` link), keeping the
/// directories in it (the pre-dump passes).
pub fn clear_images(dir: &Path) -> Result<(), CriuError> {
    let failed = |source| CriuError::ImageDir {
        dir: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(failed)? {
        let entry = entry.map_err(failed)?;
        if !entry.file_type().map_err(failed)?.is_dir() {
            std::fs::remove_file(entry.path()).map_err(failed)?;
        }
    }
    Ok(())
}

/// Bytes of memory pages in an image directory (its pages-*.img files).
fn page_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("pages-") && name.ends_with(".img")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// One criu invocation: what it is called in messages, its log file and its deadline.
struct Run {
    action: &'static str,
    object: String,
    log: &'static str,
    deadline: Duration,
    /// The nvwa-server.yaml key that sets `deadline`, for the message when it passes.
    deadline_key: &'static str,
    cancellable: bool,
    /// [`TCP_ESTABLISHED`] among the options.
    tcp_established: bool,
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
    fn a_connection_found_by_a_dump_that_refuses_them_is_recognised() {
        let failed = |summary: &str| CriuError::Failed {
            action: "dump",
            object: "pid 42".into(),
            code: 1,
            summary: summary.into(),
            log: "/x".into(),
        };
        assert!(failed("Error (criu/sk-inet.c:191): inet: Connected TCP socket, consider using --tcp-established option.").found_connection());
        assert!(!failed("Error (criu/cr-dump.c:1): Can't dump pid 42").found_connection());
    }

    #[test]
    fn a_dump_treats_connections_as_asked_and_the_others_always_restore_them() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, args) = recording_criu(dir.path());
        let images = dir.path().join("svc");
        let criu = Criu::new(&fake);
        for connections in [
            Connections::Locked,
            Connections::LockedNftables,
            Connections::Refused,
        ] {
            let opts = DumpOptions {
                deadline: Duration::from_secs(5),
                connections,
                ..Default::default()
            };
            criu.dump(42, &images, opts).unwrap();
        }
        let restore = RestoreOptions {
            deadline: Duration::from_secs(5),
            ..Default::default()
        };
        criu.restore(&images, &restore).unwrap();
        let seen = std::fs::read_to_string(&args).unwrap();
        let runs: Vec<(bool, bool)> = seen
            .lines()
            .map(|l| {
                (
                    l.contains(" --tcp-established "),
                    l.contains(" --network-lock nftables "),
                )
            })
            .collect();
        assert_eq!(
            runs,
            [(true, false), (true, true), (false, false), (true, false)],
            "{seen}"
        );
    }

    /// A criu that appends its arguments to `args` (one run per line) and succeeds: a restore
    /// writes its pid file (pid 77), a pre-dump 4096 bytes of pages as criu's pages-1.img would.
    fn recording_criu(dir: &Path) -> (PathBuf, PathBuf) {
        let fake = dir.join("criu");
        let args = dir.join("args");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$*\" >>{}\nop=$1\nwhile [ $# -gt 0 ]; do [ \"$1\" = -D ] && d=$2; shift; done\n[ $op = restore ] && echo 77 >$d/restored.pid\n[ $op = pre-dump ] && head -c 4096 /dev/zero >$d/pages-1.img\nexit 0\n",
                args.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        (fake, args)
    }

    #[test]
    fn journal_streams_are_external_at_dump_and_inherited_at_restore() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, args) = recording_criu(dir.path());
        let images = dir.path().join("svc");
        let criu = Criu::new(&fake);
        let dump = DumpOptions {
            deadline: Duration::from_secs(5),
            external_unix: vec![20466],
            ..Default::default()
        };
        criu.dump(42, &images, dump).unwrap();
        let restore = RestoreOptions {
            deadline: Duration::from_secs(5),
            inherit: vec![(10, 20466)],
            ..Default::default()
        };
        let (pid, _) = criu.restore(&images, &restore).unwrap();
        let seen = std::fs::read_to_string(&args).unwrap();
        let lines: Vec<&str> = seen.lines().collect();
        assert!(
            lines[0].starts_with("dump -t 42 --leave-stopped --external unix[20466] -D"),
            "{seen}"
        );
        assert!(
            lines[1].starts_with(
                "restore -d --pidfile restored.pid --manage-cgroups=ignore --inherit-fd fd[10]:socket:[20466] -D"
            ),
            "{seen}"
        );
        assert_eq!(pid, 77);

        // A sandboxed service: its outside files external, the holder's namespaces joined.
        let dump = DumpOptions {
            deadline: Duration::from_secs(5),
            external_files: vec!["file[1a:5]".into()],
            ignore_cgroups: true,
            ..Default::default()
        };
        criu.dump(42, &images, dump).unwrap();
        let restore = RestoreOptions {
            deadline: Duration::from_secs(5),
            inherit_files: vec![(11, "file[1a:5]".into())],
            join_ns_of: Some(812),
            ..Default::default()
        };
        criu.restore(&images, &restore).unwrap();
        let seen = std::fs::read_to_string(&args).unwrap();
        let lines: Vec<&str> = seen.lines().collect();
        assert!(
            lines[2].starts_with(
                "dump -t 42 --leave-stopped --external file[1a:5] --manage-cgroups=ignore -D"
            ),
            "{seen}"
        );
        assert!(
            lines[3].starts_with(
                "restore -d --pidfile restored.pid --manage-cgroups=ignore --inherit-fd fd[11]:file[1a:5] --join-ns mnt:812 --join-ns uts:812 -D"
            ),
            "{seen}"
        );
    }

    #[test]
    fn pre_dump_passes_chain_to_the_dump_and_count_their_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, args) = recording_criu(dir.path());
        let images = dir.path().join("svc");
        std::fs::create_dir(&images).unwrap();
        let criu = Criu::new(&fake);
        let opts = DumpOptions {
            deadline: Duration::from_secs(5),
            ..Default::default()
        };
        let first = criu
            .pre_dump(42, &images.join("pre-1"), None, &opts)
            .unwrap();
        assert_eq!(first.bytes, 4096);
        criu.pre_dump(42, &images.join("pre-2"), Some("../pre-1"), &opts)
            .unwrap();
        let dump = DumpOptions {
            prev_images: Some("pre-2".into()),
            ..opts
        };
        criu.dump(42, &images, dump).unwrap();
        let seen = std::fs::read_to_string(&args).unwrap();
        let lines: Vec<&str> = seen.lines().collect();
        assert!(
            lines[0].starts_with("pre-dump -t 42 --track-mem --pre-dump-mode=read -D"),
            "{seen}"
        );
        assert!(
            lines[1].starts_with(
                "pre-dump -t 42 --track-mem --pre-dump-mode=read --prev-images-dir ../pre-1 -D"
            ),
            "{seen}"
        );
        assert!(
            lines[2]
                .starts_with("dump -t 42 --leave-stopped --track-mem --prev-images-dir pre-2 -D"),
            "{seen}"
        );
    }

    #[test]
    fn a_hung_criu_is_killed_at_its_deadline_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("criu");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 1000\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let err = Criu::new(&fake)
            .dump(
                42,
                &dir.path().join("42"),
                DumpOptions {
                    deadline: Duration::from_millis(300),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(matches!(err, CriuError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("dump_timeout"), "{err}");
        assert!(err.to_string().contains("pid 42"), "{err}");
    }

    #[test]
    fn a_missing_binary_says_how_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = Criu::new("/nonexistent/criu")
            .dump(
                1,
                dir.path(),
                DumpOptions {
                    deadline: Duration::from_secs(5),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(err.to_string().contains("apt-get install criu"), "{err}");
    }
}
