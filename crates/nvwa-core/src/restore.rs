//! Bringing the saved processes back, at server start on the new kernel.
//!
//! Also the crash-safety half of the journal. What a server finds at start decides what it does:
//! - an update that never committed, on the *same* boot (the server crashed or was killed): its
//!   targets are still alive, stopped or running — resume them and record `rolled_back`;
//! - an update that never committed, on *another* boot (power cut, reset): the targets died with
//!   the machine and the images were never made durable — delete them, never restore them, and
//!   record `abandoned`;
//! - a committed update on the same boot (the jump did not happen): resume, `rolled_back`;
//! - a committed update on another boot, or a failed or interrupted restore: restore.

use std::time::Duration;

use crate::config::Config;
use crate::criu::{Criu, CriuError, RestoreOptions};
use crate::journal::{now, Journal, Phase, Target, TargetKind, TargetState};
use crate::lazy_pages::LazyError;
use crate::machine::Machine;
use crate::pidns::PidError;
use crate::update::{criu_deadline, image_dir, undo, Reporter, UpdateError};

/// How long a short-lived process of the new boot may hold a saved pid before we give up.
pub const PID_WAIT: Duration = Duration::from_secs(10);
/// Restores that collide on a pid (EEXIST) are retried this many times, one at a time.
const COLLISION_RETRIES: usize = 3;
/// How long targets that need the network wait for `network-online.target` (systemd-networkd's
/// wait-online gives up after 2 minutes); they are restored then anyway, and fail on their own
/// if their address is missing.
const NETWORK_WAIT: Duration = Duration::from_secs(150);

pub fn restore_saved(m: &dyn Machine, cfg: &Config, r: &Reporter) -> Result<String, UpdateError> {
    let dir = &cfg.server.criu_dir;
    // Images restored as root must come from a directory nobody else can write to.
    if std::fs::symlink_metadata(dir).is_ok() {
        crate::trust::ensure_trusted(dir, crate::trust::TrustedKind::ImageDir)?;
    }
    let Some(mut j) = Journal::load(dir)? else {
        return Ok("nothing to restore".into());
    };
    let boot = m.boot_id()?;
    match j.phase {
        Phase::Restored | Phase::RolledBack | Phase::Abandoned => Ok("nothing to restore".into()),
        Phase::Planned | Phase::KernelLoaded | Phase::Frozen | Phase::Dumped
            if j.started_on(&boot) =>
        {
            resume_in_place(
                m,
                cfg,
                &mut j,
                &boot,
                r,
                "the nvwa server restarted during the update",
            )
        }
        Phase::Planned | Phase::KernelLoaded | Phase::Frozen | Phase::Dumped => {
            abandon(cfg, &mut j, &boot, r)
        }
        Phase::Committed if j.committed_on(&boot) => {
            resume_in_place(m, cfg, &mut j, &boot, r, "the kernel switch did not happen")
        }
        Phase::Committed | Phase::RestoreFailed => {
            j.advance(Phase::Booted, &boot)?;
            j.save(dir)?;
            r.phase(Phase::Booted);
            restore_all(m, cfg, &mut j, &boot, r)
        }
        // A restore was interrupted: carry on with what is left.
        Phase::Booted => restore_all(m, cfg, &mut j, &boot, r),
    }
}

/// The machine restarted before the update committed: its images were never promised to be
/// complete or durable, so they are deleted, never restored.
fn abandon(cfg: &Config, j: &mut Journal, boot: &str, r: &Reporter) -> Result<String, UpdateError> {
    let mut problems = Vec::new();
    for t in j.targets.iter_mut() {
        let d = image_dir(cfg, t);
        match std::fs::remove_dir_all(&d) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                problems.push(format!("cannot remove {}: {e}", d.display()))
            }
            _ => {}
        }
        t.state = TargetState::Failed("lost when the machine restarted before the commit".into());
    }
    if let Err(e) = crate::net::remove_state(&cfg.server.criu_dir) {
        problems.push(format!("cannot remove the saved network state: {e}"));
    }
    let msg = format!(
        "the update to {} was abandoned: the machine restarted (phase {}) before the update committed, so its targets did not survive and their incomplete images were deleted, not restored{}",
        j.to_kernel,
        j.phase,
        if problems.is_empty() {
            String::new()
        } else {
            format!(" ({})", problems.join("; "))
        }
    );
    j.error = Some(msg.clone());
    j.advance(Phase::Abandoned, boot)?;
    j.save(&cfg.server.criu_dir)?;
    r.phase(Phase::Abandoned);
    Err(UpdateError::Abandoned(msg))
}

/// The targets are still alive on this kernel, stopped or running: let them run again.
fn resume_in_place(
    m: &dyn Machine,
    cfg: &Config,
    j: &mut Journal,
    boot: &str,
    r: &Reporter,
    why: &str,
) -> Result<String, UpdateError> {
    let problems = undo(m, cfg, j, r);
    if let Err(e) = m.unload_kernel() {
        r.message(e.to_string());
    }
    let msg = if problems.is_empty() {
        format!("{why}; every target was resumed on the old kernel")
    } else {
        format!("{why}; resumed what was left, but: {}", problems.join("; "))
    };
    j.error = Some(msg.clone());
    j.advance(Phase::RolledBack, boot)?;
    j.save(&cfg.server.criu_dir)?;
    r.phase(Phase::RolledBack);
    if problems.is_empty() {
        Ok(msg)
    } else {
        Err(UpdateError::Abandoned(msg))
    }
}

fn restore_all(
    m: &dyn Machine,
    cfg: &Config,
    j: &mut Journal,
    boot: &str,
    r: &Reporter,
) -> Result<String, UpdateError> {
    let criu = Criu::new(&cfg.server.criu_exe);
    let pending: Vec<usize> = (0..j.targets.len())
        .filter(|&i| j.targets[i].state.awaits_restore())
        .collect();
    // Before spawning anything (criu included), push new pids above every saved one.
    let all_ids: Vec<i32> = pending
        .iter()
        .flat_map(|&i| j.targets[i].tree_ids.iter().copied())
        .collect();
    if let Err(e) = m.reserve_pids(&all_ids) {
        r.message(e.to_string());
    }
    let net_saved = crate::net::saved(&cfg.server.criu_dir);

    let mut ready = Vec::new();
    for &i in &pending {
        let t = &mut j.targets[i];
        if !image_dir(cfg, t).join("inventory.img").exists() {
            t.state = TargetState::Failed(format!(
                "no images in {}; they were removed or never written",
                image_dir(cfg, t).display()
            ));
            continue;
        }
        // A service's unit may already be restoring it (systemd starts it at boot): its own
        // restore waits for its pids.
        if t.kind == TargetKind::Service {
            ready.push(i);
            continue;
        }
        match m.wait_pids_free(&t.tree_ids, PID_WAIT) {
            Ok(()) => ready.push(i),
            Err(e) => t.state = TargetState::Failed(e.to_string()),
        }
    }
    // Early restore: what needs no network runs again at once, while the boot brings the network
    // up; the rest waits for it (nvwa.service is not ordered after network-online.target).
    let (late, early): (Vec<usize>, Vec<usize>) = ready
        .iter()
        .partition(|&&i| needs_network(cfg, &j.targets[i], net_saved));

    // Whether the pid targets worth a lazy restore (not small: see config::SMALL_TARGET_BYTES)
    // get one; the kernel is asked only if there is such a target.
    let ask_lazy = cfg.restore.lazy_restore && ready.iter().any(|&i| lazy_candidate(&j.targets[i]));
    // criu's first run on this boot probes the kernel and caches what it found: parallel
    // restores would each probe it.
    let pid_restores = (ready.iter())
        .filter(|&&i| j.targets[i].kind == TargetKind::Pid)
        .count();
    if pid_restores > 1 {
        m.cache_criu_probes(&criu);
    }
    let lazy = ask_lazy
        && match m.lazy_pages_unsupported() {
            None => true,
            Some(why) => {
                r.message(format!(
                    "lazy_restore: this kernel cannot serve a lazy restore ({why}); restoring every target in full"
                ));
                false
            }
        };
    let lazily = move |t: &Target| lazy && lazy_candidate(t);

    // In parallel first; collisions (EEXIST) are retried one at a time. Each target is stamped
    // running again when its own restore ends, not when the last one does.
    let (first, net_problems) = std::thread::scope(|s| {
        let spawn = |i: usize| {
            let t = &j.targets[i];
            r.target(t, "restoring", None);
            let criu = &criu;
            let lazy = lazily(t);
            s.spawn(move || restore_one(m, cfg, criu, t, lazy).map(|ok| (ok, now().0)))
        };
        let mut handles: Vec<(usize, _)> = early.iter().map(|&i| (i, spawn(i))).collect();
        let mut net_problems = Vec::new();
        if !late.is_empty() || net_saved {
            if !late.is_empty() {
                r.message(format!(
                    "{} target(s) restored once the network is up (restore_net, or inet sockets in their images)",
                    late.len()
                ));
            }
            if let Err(e) = m.wait_network_online(NETWORK_WAIT) {
                r.message(format!(
                    "network-online.target was not reached ({e}); restoring the targets that need the network anyway"
                ));
            }
            // Before any target that needs it: restored processes find the addresses, routes and
            // firewall they had.
            net_problems = restore_network(m, cfg, r);
            handles.extend(late.iter().map(|&i| (i, spawn(i))));
        }
        let mut first: Vec<(usize, Restored)> = handles
            .into_iter()
            .map(|(i, h)| {
                let res = h.join().unwrap_or_else(|_| {
                    Err(RestoreFailure::Other(
                        "internal error: the restore thread panicked".into(),
                    ))
                });
                (i, res)
            })
            .collect();
        first.sort_by_key(|(i, _)| ready.iter().position(|r| r == i));
        (first, net_problems)
    });
    let mut services_restored = false;
    let mut filling = Vec::new();
    for (i, first) in first {
        let res = match first {
            // Only a pid target's own criu run can collide; a service's unit retries itself.
            Err(RestoreFailure::Criu(e)) => {
                let t = &j.targets[i];
                let lazy = lazily(t);
                retry_collisions(
                    m,
                    &t.tree_ids,
                    Err(e),
                    || m.restore(&criu, &image_dir(cfg, t), &lazy_options(cfg, t, lazy)),
                    || r.target(t, "retrying", Some("a saved pid was taken".into())),
                )
                .map(|ok| (ok, now().0))
                .map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        };
        let t = &mut j.targets[i];
        match res {
            Ok(((pid, ms), running_again)) => {
                t.state = TargetState::Restored;
                t.restore_ms = Some(ms);
                t.running_again_wall_ms = Some(running_again);
                services_restored |= t.kind == TargetKind::Service;
                r.target(t, "restored", Some(format!("pid {pid}, {ms} ms")));
                if lazily(t) {
                    // Its lazy-pages daemon still reads the images.
                    filling.push(i);
                } else if !cfg.restore.enable_debug_mode {
                    let _ = std::fs::remove_dir_all(image_dir(cfg, t));
                }
            }
            Err(why) => {
                r.target(t, "failed", Some(why.clone()));
                t.state = TargetState::Failed(why);
            }
        }
    }

    for i in filling {
        finish_lazy(m, cfg, &mut j.targets[i], r);
    }

    // "name (pid P): why" for each target whose state `pick` returns a reason of.
    let listed = |pick: fn(&TargetState) -> Option<&String>| -> Vec<String> {
        j.targets
            .iter()
            .filter_map(|t| pick(&t.state).map(|why| format!("{} (pid {}): {why}", t.name, t.pid)))
            .collect()
    };
    let failed = listed(|s| match s {
        TargetState::Failed(why) => Some(why),
        _ => None,
    });
    let lost = listed(|s| match s {
        TargetState::Lost(why) => Some(why),
        _ => None,
    });
    if failed.is_empty() && lost.is_empty() && net_problems.is_empty() {
        if !cfg.restore.enable_debug_mode {
            if let Err(e) = crate::net::remove_state(&cfg.server.criu_dir) {
                r.message(format!("cannot remove the saved network state: {e}"));
            }
        }
        j.advance(Phase::Restored, boot)?;
        j.save(&cfg.server.criu_dir)?;
        r.phase(Phase::Restored);
        // With the restore recorded, nvwa's generator no longer hands these units to nvwa: the
        // reload removes the drop-ins, and the units are exactly as their files say again
        // (systemd keeps their main processes across the reload).
        if services_restored {
            if let Err(e) = m.daemon_reload() {
                r.message(format!(
                    "the restored services still carry nvwa's drop-ins: {e}; run `systemctl daemon-reload`"
                ));
            }
        }
        let downtime = j
            .downtime_ms()
            .map_or("n/a".to_string(), |d| format!("{d} ms"));
        return Ok(format!(
            "restored {} target(s) on {}; downtime {downtime}",
            j.targets.len(),
            j.to_kernel
        ));
    }
    let mut parts = Vec::new();
    if !failed.is_empty() {
        parts.push(format!(
            "{} target(s) not restored, images kept for a retry (restart the nvwa server): {}",
            failed.len(),
            failed.join("; ")
        ));
    }
    if !lost.is_empty() {
        parts.push(format!(
            "{} target(s) lost after they ran again, not restored again: {}",
            lost.len(),
            lost.join("; ")
        ));
    }
    if !net_problems.is_empty() {
        parts.push(format!(
            "{} network entr{} not restored (the saved state is kept; restarting the nvwa server retries it, and skips what is there): {}",
            net_problems.len(),
            if net_problems.len() == 1 { "y" } else { "ies" },
            net_problems.join("; ")
        ));
    }
    j.error = Some(parts.join("; "));
    j.advance(Phase::RestoreFailed, boot)?;
    j.save(&cfg.server.criu_dir)?;
    r.phase(Phase::RestoreFailed);
    Err(UpdateError::RestoreFailed(
        j.error.clone().unwrap_or_default(),
    ))
}

/// Whether `t` must wait for the network before its restore: with the network saved
/// (`restore_net`), every target does (its processes had that network, and may use it at once);
/// otherwise a pid target with an inet socket in its images (a connection, a listener, a bound
/// UDP socket: its address must be configured). A service follows its unit's own ordering.
/// Images that cannot be read are assumed to need it.
fn needs_network(cfg: &Config, t: &Target, net_saved: bool) -> bool {
    net_saved
        || (t.kind == TargetKind::Pid
            && crate::criu_image::inet_sockets(&image_dir(cfg, t)).map_or(true, |n| n > 0))
}

/// Restores the network saved by the update (`restore_net: true`), if it saved one. Returns what
/// could not be restored. These problems do not hold the targets back: their memory is what
/// would be lost, a missing route or address can be fixed on the running machine, and a target
/// that cannot work without it (a socket bound to a missing address) fails its own restore with
/// criu's reason. They make the update end `restore_failed`, so that `nvwa status` and its exit
/// code say so, and a restart of the server retries the network.
fn restore_network(m: &dyn Machine, cfg: &Config, r: &Reporter) -> Vec<String> {
    if !crate::net::saved(&cfg.server.criu_dir) {
        return Vec::new();
    }
    match crate::net::restore_saved(m, &cfg.server.criu_dir) {
        Ok(done) => {
            for what in &done.applied {
                r.message(format!("network: restored {what}"));
            }
            r.message(done.summary());
            done.problems
                .iter()
                .map(|p| {
                    r.message(format!("network: {p}"));
                    p.to_string()
                })
                .collect()
        }
        Err(e) => {
            let why = format!("the saved network configuration was not restored: {e}");
            r.message(why.clone());
            vec![why]
        }
    }
}

/// One target's first restore: `((pid, restore ms), wall ms when it was running again)`.
type Restored = Result<((i32, u64), u64), RestoreFailure>;

/// Why one target's restore failed: criu's own error (a pid collision is retried), or the
/// unit's start for a service.
#[derive(Debug, thiserror::Error)]
enum RestoreFailure {
    #[error(transparent)]
    Criu(CriuError),
    #[error("{0}")]
    Other(String),
}

/// Waits until the lazy-pages daemon of a restored pid target has filled its memory in. A
/// target whose memory stayed incomplete is killed: it would run on zero-filled pages.
///
/// Unlike a failed restore, it is not restored again at the server's next start. It has run on
/// the new kernel (answered peers, written files) since its images were taken; restoring them
/// would replay that work from the update's moment, and its TCP connections with sequence numbers
/// its peers have left behind. So it is `lost`: its images stay for the operator, who knows
/// whether a replay is acceptable.
fn finish_lazy(m: &dyn Machine, cfg: &Config, t: &mut Target, r: &Reporter) {
    let dir = image_dir(cfg, t);
    let deadline = criu_deadline(cfg.server.restore_timeout_s, t.rss_bytes);
    match m.finish_lazy_pages(&dir, deadline) {
        Ok(done) => {
            r.target(
                t,
                "memory complete",
                Some(format!("{} pages copied in", done.copied)),
            );
            if !cfg.restore.enable_debug_mode {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        // Still serving is not failing: the process is whole as long as the daemon runs.
        Err(e @ LazyError::StillServing { .. }) => {
            r.message(format!("{} (pid {}): {e}", t.name, t.pid))
        }
        Err(e) => {
            m.kill_tree(t.pid);
            let why = format!(
                "{e}; the process had run again and was killed, as its memory is incomplete. Its images in {} are kept but not restored again: they predate what it did on this kernel, and a restore would replay that. Start the application anew, or restore them with criu by hand if a replay is acceptable; set lazy_restore: false to restore every page before a process runs",
                dir.display()
            );
            r.target(t, "lost", Some(why.clone()));
            t.state = TargetState::Lost(why);
        }
    }
}

/// A pid target that is not small ([`crate::config::SMALL_TARGET_BYTES`]): restored lazily with
/// `lazy_restore`.
fn lazy_candidate(t: &Target) -> bool {
    t.kind == TargetKind::Pid && !crate::config::small_target(t.rss_bytes)
}

/// A pid target's restore options on the new boot: lazy when `lazy`.
fn lazy_options(cfg: &Config, t: &Target, lazy: bool) -> RestoreOptions {
    RestoreOptions {
        lazy,
        ..pid_restore_options(cfg, t)
    }
}

fn restore_one(
    m: &dyn Machine,
    cfg: &Config,
    criu: &Criu,
    t: &Target,
    lazy: bool,
) -> Result<(i32, u64), RestoreFailure> {
    match t.kind {
        TargetKind::Pid => m
            .restore(criu, &image_dir(cfg, t), &lazy_options(cfg, t, lazy))
            .map_err(RestoreFailure::Criu),
        TargetKind::Service => {
            let deadline = criu_deadline(cfg.server.restore_timeout_s, t.rss_bytes);
            crate::service::start_restored(m, cfg, t, deadline).map_err(RestoreFailure::Other)
        }
    }
}

/// A pid target's criu restore: nothing to hand in, only its deadline.
pub(crate) fn pid_restore_options(cfg: &Config, t: &Target) -> RestoreOptions {
    RestoreOptions {
        deadline: criu_deadline(cfg.server.restore_timeout_s, t.rss_bytes),
        ..Default::default()
    }
}

/// Why a restore failed after its retries: criu's error, or a saved pid still held.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RetryError {
    #[error(transparent)]
    Criu(CriuError),
    #[error(transparent)]
    PidsHeld(PidError),
}

/// A restore that collided on a pid (EEXIST: a process of the new boot held one of `ids` for a
/// moment) is run `again`, at most [`COLLISION_RETRIES`] times, each once `ids` are free;
/// `first` is the first attempt's result, and `retrying` is told before each retry.
pub(crate) fn retry_collisions(
    m: &dyn Machine,
    ids: &[i32],
    first: Result<(i32, u64), CriuError>,
    mut again: impl FnMut() -> Result<(i32, u64), CriuError>,
    mut retrying: impl FnMut(),
) -> Result<(i32, u64), RetryError> {
    let mut res = first;
    for _ in 0..COLLISION_RETRIES {
        match res {
            Err(e) if e.is_pid_collision() => {
                retrying();
                m.wait_pids_free(ids, PID_WAIT)
                    .map_err(RetryError::PidsHeld)?;
                res = again();
            }
            other => return other.map_err(RetryError::Criu),
        }
    }
    res.map_err(RetryError::Criu)
}
