//! systemd services across the kernel switch.
//!
//! A listed service is dumped like a pid target, rooted at its main process, and stays stopped
//! until the jump (systemd never sees it exit, so it never restarts it). On the next boot systemd
//! must take it back as the same unit with the same main pid. Three pieces do that:
//!
//! - **the generator** (`nvwa-generator`, run by systemd before it loads units): while the
//!   journal holds a committed update that is not yet restored, it gives each saved service a
//!   drop-in ([`crate::systemd::restore_drop_in`]) whose `ExecStart=` is `nvwa restore
//!   <unit>@<pid>`. Drop-ins exist only as long as the journal says so: nothing is written to
//!   /etc, a crash or a rollback can never leave one behind, and the unit files never change;
//! - **the helper** (`nvwa restore <unit>@<pid>`, that `ExecStart=`): runs in the unit's cgroup
//!   with the unit's fresh journal stream, restores the process with criu (handing that stream to
//!   it in place of the old one), writes the pid file and exits, so systemd (`Type=forking`)
//!   adopts the restored process as the unit's main process;
//! - **the server**, restoring on the new boot: starts each saved unit (a no-op if systemd
//!   already did), checks that systemd reports the saved main pid, records the result, and once
//!   everything is restored runs `daemon-reload`, which makes the generator drop the drop-ins.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::criu::{Criu, RestoreOptions};
use crate::journal::{now, Journal, Phase, SavedService, Target, TargetKind, TargetState};
use crate::machine::Machine;
use crate::restore::{retry_collisions, RetryError, PID_WAIT};
use crate::systemd;
use crate::update::{criu_deadline, image_dir};

/// Where the package installs the generator (a two-line script that runs `nvwa generator`).
pub const GENERATOR: &str = "/usr/lib/systemd/system-generators/nvwa-generator";
/// The helper's result, beside the images, for the server's record.
const RESULT_FILE: &str = "restored.json";
/// Beyond criu's own deadline, the unit's start may wait this long for saved pids to be freed.
const START_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error(transparent)]
    Untrusted(#[from] crate::trust::TrustError),
    #[error("nothing to restore for {unit}: {why}; start the service normally with `systemctl daemon-reload && systemctl restart {unit}`")]
    NothingSaved { unit: String, why: String },
    #[error(transparent)]
    Pids(#[from] crate::pidns::PidError),
    #[error("cannot hand {unit}'s journal stream (fd {fd}) to the restored process: {source}")]
    Stream {
        unit: String,
        fd: RawFd,
        source: nix::Error,
    },
    #[error("{unit}: {source}")]
    Criu {
        unit: String,
        source: Box<crate::criu::CriuError>,
    },
    #[error("{unit} ran in a sandbox of its own but no `nvwa hold` process was found in this unit's cgroup (its ExecStartPre= in nvwa's drop-in makes one); see `journalctl -b -u {unit}`")]
    NoHolder { unit: String },
    #[error("{unit}: {source}")]
    Images {
        unit: String,
        source: crate::criu_image::ImageError,
    },
    #[error("{unit}: cannot open {path} again for the restored process: {source}")]
    ExternalFile {
        unit: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the pid file {path} for systemd: {source}")]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the helper leaves beside the images for the server.
#[derive(Debug, Serialize, Deserialize)]
struct RestoreResult {
    pid: i32,
    restore_ms: u64,
    wall_ms: u64,
}

/// Whether the journal's update is one the next boot must restore: committed on another boot
/// and not finished.
fn awaiting_restore(j: &Journal, boot: &str) -> bool {
    matches!(
        j.phase,
        Phase::Committed | Phase::Booted | Phase::RestoreFailed
    ) && !j.committed_on(boot)
}

/// The services of `j` that the next start of their unit must restore, with their drop-ins:
/// `(path relative to the generator's directory, contents)`.
pub fn drop_ins(cfg: &Config, j: &Journal, boot: &str, nvwa_exe: &Path) -> Vec<(PathBuf, String)> {
    if !awaiting_restore(j, boot) {
        return Vec::new();
    }
    // With the network saved (restore_net: true), the restore waits until the network manager
    // has configured the links: systemd-networkd drops "foreign" routes and rules when it
    // configures a link, so what nvwa puts back before that would be removed again.
    let net = crate::net::saved(&cfg.server.criu_dir);
    j.targets
        .iter()
        .filter(|t| t.kind == TargetKind::Service && t.state.awaits_restore())
        .map(|t| {
            let identifier = t.service.as_ref().map_or("", |s| s.identifier.as_str());
            let sandboxed = t.service.as_ref().is_some_and(|s| s.sandboxed());
            let timeout = criu_deadline(cfg.server.restore_timeout_s, t.rss_bytes) + START_MARGIN;
            (
                Path::new(&format!("{}.d", t.name)).join(systemd::DROP_IN),
                systemd::restore_drop_in(
                    &t.name,
                    t.pid,
                    identifier,
                    nvwa_exe,
                    timeout,
                    &j.to_kernel,
                    sandboxed,
                )
                .replacen(
                    "After=nvwa-pre.service\n",
                    if net {
                        "After=nvwa-pre.service network-online.target\nWants=network-online.target\n"
                    } else {
                        "After=nvwa-pre.service\n"
                    },
                    1,
                ),
            )
        })
        .collect()
}

/// `nvwa generator NORMAL_DIR [EARLY_DIR LATE_DIR]`: writes the drop-ins of [`drop_ins`] under
/// `normal_dir`. Returns how many were written.
pub fn generate(
    cfg: &Config,
    boot: &str,
    normal_dir: &Path,
    nvwa_exe: &Path,
) -> std::io::Result<usize> {
    let j = match Journal::load(&cfg.server.criu_dir) {
        Ok(Some(j)) => j,
        Ok(None) => return Ok(0),
        Err(e) => return Err(std::io::Error::other(e.to_string())),
    };
    let files = drop_ins(cfg, &j, boot, nvwa_exe);
    for (rel, text) in &files {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let path = normal_dir.join(rel);
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
        std::fs::write(&path, text)?;
        // Unit configuration is public; systemd warns about restricted modes at each reload.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(files.len())
}

/// On the new boot, the server's part: start the unit (its drop-in restores it; a no-op if
/// systemd already did at boot) and check that systemd reports the saved main process.
pub fn start_restored(
    m: &dyn Machine,
    cfg: &Config,
    t: &Target,
    deadline: Duration,
) -> Result<(i32, u64), String> {
    let unit = &t.name;
    let started = Instant::now();
    let see = format!("see `journalctl -b -u {unit}`");
    let info = m
        .start_service(unit, deadline + START_MARGIN)
        .map_err(|e| format!("{e}; {see}"))?;
    if info.active_state != "active" || info.main_pid != t.pid {
        return Err(format!(
            "after its restore systemd reports {unit} {}/{} with main pid {}, not the saved pid {}; {see}",
            info.active_state, info.sub_state, info.main_pid, t.pid
        ));
    }
    let ms = std::fs::read(image_dir(cfg, t).join(RESULT_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<RestoreResult>(&b).ok())
        .map_or(started.elapsed().as_millis() as u64, |r| r.restore_ms);
    Ok((t.pid, ms))
}

/// `nvwa restore <unit>@<pid>`, run by systemd as the unit's `ExecStart=` (nvwa's drop-in):
/// restores the saved service in place, inside the unit, and leaves its pid for systemd.
pub fn restore_in_unit(
    m: &dyn Machine,
    cfg: &Config,
    unit: &str,
    pid: i32,
) -> Result<(i32, u64), ServiceError> {
    let dir = &cfg.server.criu_dir;
    if std::fs::symlink_metadata(dir).is_ok() {
        crate::trust::ensure_trusted(dir, crate::trust::TrustedKind::ImageDir)?;
    }
    let nothing = |why: String| ServiceError::NothingSaved {
        unit: unit.to_string(),
        why,
    };
    let j = Journal::load(dir)?
        .ok_or_else(|| nothing(format!("no update journal in {}", dir.display())))?;
    let boot = m.boot_id()?;
    if !awaiting_restore(&j, &boot) {
        return Err(nothing(format!(
            "the last update (to {}) is {}, not waiting for a restore on this boot",
            j.to_kernel, j.phase
        )));
    }
    let t = j
        .targets
        .iter()
        .find(|t| t.kind == TargetKind::Service && t.name == unit)
        .ok_or_else(|| nothing(format!("the update to {} did not save it", j.to_kernel)))?;
    if t.pid != pid {
        return Err(nothing(format!("it was saved as pid {}, not {pid}", t.pid)));
    }
    if t.state == TargetState::Restored {
        return Err(nothing("it was restored already".into()));
    }

    if let Err(e) = m.reserve_pids(&t.tree_ids) {
        tracing::warn!("{e}");
    }
    // The unit may start before the server: the network comes back before its process does
    // (whoever comes second finds it there). What cannot be restored is the server's to record.
    if crate::net::saved(dir) {
        match crate::net::restore_saved(m, dir) {
            Ok(done) => {
                tracing::info!("{unit}: {}", done.summary());
                for p in &done.problems {
                    tracing::warn!("{unit}: network: {p}");
                }
            }
            Err(e) => tracing::warn!("{unit}: the saved network was not restored: {e}"),
        }
    }
    m.wait_pids_free(&t.tree_ids, PID_WAIT)?;
    let images = image_dir(cfg, t);
    let saved = t.service.clone().unwrap_or_default();
    let holder = if saved.sandboxed() {
        Some(m.sandbox_holder().ok_or_else(|| ServiceError::NoHolder {
            unit: unit.to_string(),
        })?)
    } else {
        None
    };
    // The holder has served its purpose once criu has run, whatever the outcome: it must not
    // stay in the unit's cgroup.
    let result = restore_with(m, cfg, unit, t, &saved, &images, holder);
    if let Some(h) = holder {
        m.kill_holder(h);
    }
    let (restored, ms) = result?;
    let restored = if restored > 0 { restored } else { pid };
    hand_pid_to_systemd(m, unit, restored, t)?;
    let result = RestoreResult {
        pid: restored,
        restore_ms: ms,
        wall_ms: now().0,
    };
    // Only the server's record depends on it; a failure here costs the figure, not the restore.
    let _ = std::fs::write(
        images.join(RESULT_FILE),
        serde_json::to_vec(&result).unwrap_or_default(),
    );
    Ok((restored, ms))
}

/// The criu restore of [`restore_in_unit`], into the holder's namespaces when there is one.
fn restore_with(
    m: &dyn Machine,
    cfg: &Config,
    unit: &str,
    t: &Target,
    saved: &SavedService,
    images: &Path,
    holder: Option<i32>,
) -> Result<(i32, u64), ServiceError> {
    if saved.own_user_ns() {
        // criu cannot restore the process into a user namespace of its own (the recipe's
        // failures 4 and 5): it comes back in ours, with its identity-mapped ids.
        let (old, new) =
            m.restore_in_own_user_ns(images, t.pid)
                .map_err(|source| ServiceError::Images {
                    unit: unit.to_string(),
                    source,
                })?;
        tracing::info!("{unit}: restored in the host's user namespace (criu's root user namespace id {old} -> {new})");
    }
    let opts = RestoreOptions {
        deadline: criu_deadline(cfg.server.restore_timeout_s, t.rss_bytes),
        inherit: inherit_streams(unit, t)?,
        inherit_files: reopen_external_files(unit, saved)?,
        join_ns_of: holder,
        // The unit's restore exits once the service runs: nothing would wait for a lazy-pages
        // daemon, which would stay in the unit's cgroup. Services are restored in full.
        lazy: false,
    };
    let criu = Criu::new(&cfg.server.criu_exe);
    let first = m.restore(&criu, images, &opts);
    retry_collisions(
        m,
        &t.tree_ids,
        first,
        || m.restore(&criu, images, &opts),
        || {},
    )
    .map_err(|e| match e {
        RetryError::Criu(source) => ServiceError::Criu {
            unit: unit.to_string(),
            source: Box::new(source),
        },
        RetryError::PidsHeld(e) => ServiceError::Pids(e),
    })
}

/// Opens again, on the host, each file the service held outside its mount namespace (stdin's
/// /dev/null, typically), with its access mode, for criu to hand in (`--inherit-fd`). The files
/// stay open (not close-on-exec) until we exit.
fn reopen_external_files(
    unit: &str,
    saved: &SavedService,
) -> Result<Vec<(RawFd, String)>, ServiceError> {
    use std::os::fd::IntoRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut out: Vec<(RawFd, String)> = Vec::new();
    for f in &saved.external_files {
        let key = f.criu_key();
        if out.iter().any(|(_, k)| *k == key) {
            continue;
        }
        let mode = f.flags & libc::O_ACCMODE as u32;
        let file = std::fs::OpenOptions::new()
            .read(mode != libc::O_WRONLY as u32)
            .write(mode != libc::O_RDONLY as u32)
            .custom_flags(libc::O_NOCTTY)
            .open(&f.path)
            .map_err(|source| ServiceError::ExternalFile {
                unit: unit.to_string(),
                path: f.path.clone(),
                source,
            })?;
        let fd = file.into_raw_fd();
        // SAFETY: fd was just opened by us; clearing close-on-exec lets criu inherit it.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(ServiceError::ExternalFile {
                unit: unit.to_string(),
                path: f.path.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        out.push((fd, key));
    }
    Ok(out)
}

/// Whether a `/proc/PID/cmdline` is nvwa's holder: `<exe> hold`, `exe` being the path the
/// generator wrote into the drop-in (nvwa's own executable, as for the helper).
pub fn is_holder_cmdline(raw: &[u8], exe: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let argv: Vec<&[u8]> = raw.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
    argv.len() == 2
        && argv[0] == exe.as_os_str().as_bytes()
        && argv[1] == systemd::HOLD_ARG.as_bytes()
}

/// `nvwa hold`, the unit's `ExecStartPre=` in nvwa's drop-in for a sandboxed service: leaves a
/// process in the unit's fresh sandbox (namespaces, mounts, credentials, filters) for the
/// helper to restore into, and exits so that systemd goes on to the helper. It runs under the
/// unit's `SystemCallFilter=` (e.g. `@system-service ~@privileged @resources`), so it uses
/// only fork, setsid and pause; the helper kills it. Called first thing in `main`.
pub fn hold() -> ! {
    // SAFETY: fork in a single-threaded process (nothing else has run yet); the child only
    // calls setsid and pause.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: plain syscalls. The new session keeps the holder out of systemd's way
            // when the ExecStartPre= process exits.
            unsafe {
                libc::setsid();
                loop {
                    libc::pause();
                }
            }
        }
        // SAFETY: _exit ends the parent without running anything else.
        n if n > 0 => unsafe { libc::_exit(0) },
        _ => unsafe { libc::_exit(1) },
    }
}

/// Copies of our standard streams that criu can inherit (no close-on-exec), one per saved
/// socket: the restored process gets the stream systemd opened to journald for this start,
/// under the unit's identifier, wherever it had the old one.
fn inherit_streams(unit: &str, t: &Target) -> Result<Vec<(RawFd, u64)>, ServiceError> {
    let mut out: Vec<(RawFd, u64)> = Vec::new();
    for s in t.service.iter().flat_map(|s| &s.streams) {
        if out.iter().any(|&(_, ino)| ino == s.inode) {
            continue;
        }
        // SAFETY: F_DUPFD only reads the descriptor number; an invalid one fails with EBADF.
        // The copy is deliberately not close-on-exec and stays open until we exit.
        let copy = unsafe { libc::fcntl(s.fd, libc::F_DUPFD, 10) };
        if copy < 0 {
            return Err(ServiceError::Stream {
                unit: unit.to_string(),
                fd: s.fd,
                source: nix::Error::last(),
            });
        }
        out.push((copy, s.inode));
    }
    Ok(out)
}

/// Writes the restored pid where nvwa's drop-in tells systemd to look, and into the unit's own
/// `PIDFile=` (it lived on /run, which the kexec emptied) when its directory exists.
fn hand_pid_to_systemd(
    m: &dyn Machine,
    unit: &str,
    pid: i32,
    t: &Target,
) -> Result<(), ServiceError> {
    let ours = systemd::restore_pid_file(unit);
    m.write_pid_file(&ours, pid)
        .map_err(|source| ServiceError::PidFile {
            path: ours.clone(),
            source,
        })?;
    if let Some(own) = t.service.as_ref().and_then(|s| s.pid_file.as_deref()) {
        if own.parent().is_some_and(Path::exists) {
            if let Err(e) = m.write_pid_file(own, pid) {
                tracing::warn!("cannot rewrite {unit}'s pid file {}: {e}", own.display());
            }
        }
    }
    Ok(())
}
