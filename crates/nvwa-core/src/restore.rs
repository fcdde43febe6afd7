//! Bringing the saved processes back, at server start on the new kernel.
//!
//! Also the crash-safety half of the journal: a server that starts on the *same* boot as an
//! unfinished update (it crashed, or the jump never happened) resumes the stopped targets instead
//! of restoring them a second time.

use std::time::Duration;

use crate::config::Config;
use crate::criu::Criu;
use crate::journal::{now, Journal, Phase, TargetState};
use crate::machine::Machine;
use crate::update::{image_dir, Reporter, UpdateError};

/// How long a short-lived process of the new boot may hold a saved pid before we give up.
pub const PID_WAIT: Duration = Duration::from_secs(10);
/// Restores that collide on a pid (EEXIST) are retried this many times, one at a time.
const COLLISION_RETRIES: usize = 3;

pub fn restore_saved(m: &dyn Machine, cfg: &Config, r: &Reporter) -> Result<String, UpdateError> {
    let dir = &cfg.server.criu_dir;
    let Some(mut j) = Journal::load(dir)? else {
        return Ok("nothing to restore".into());
    };
    let committed_here = j
        .stamp_of(Phase::Committed)
        .is_some_and(|s| s.boot_id == m.boot_id());
    let started_here = j.timeline.first().is_some_and(|s| s.boot_id == m.boot_id());
    match j.phase {
        Phase::Restored | Phase::RolledBack => Ok("nothing to restore".into()),
        Phase::Planned | Phase::KernelLoaded | Phase::Frozen | Phase::Dumped if started_here => {
            resume_in_place(
                m,
                cfg,
                &mut j,
                r,
                "the nvwa server restarted during the update",
            )
        }
        Phase::Planned | Phase::KernelLoaded | Phase::Frozen | Phase::Dumped => {
            j.error = Some(
                "the machine restarted before the update committed; its targets did not survive"
                    .into(),
            );
            j.advance(Phase::Failed)?;
            j.save(dir)?;
            Err(UpdateError::Restore(j.error.clone().unwrap_or_default()))
        }
        Phase::Committed if committed_here => {
            resume_in_place(m, cfg, &mut j, r, "the kernel switch did not happen")
        }
        Phase::Committed | Phase::Failed => {
            j.advance(Phase::Booted)?;
            j.save(dir)?;
            r.phase(Phase::Booted);
            restore_all(m, cfg, &mut j, r)
        }
        // A restore was interrupted: carry on with what is left.
        Phase::Booted => restore_all(m, cfg, &mut j, r),
    }
}

/// The targets are still alive and stopped on this kernel: let them run again.
fn resume_in_place(
    m: &dyn Machine,
    cfg: &Config,
    j: &mut Journal,
    r: &Reporter,
    why: &str,
) -> Result<String, UpdateError> {
    for t in j.targets.iter_mut() {
        if m.alive(t.pid) {
            let _ = m.resume(&t.tree_ids);
            t.state = TargetState::Resumed;
            r.target(t, "resumed", None);
        }
        let _ = std::fs::remove_dir_all(image_dir(cfg, t));
    }
    m.unload_kernel();
    j.error = Some(format!("{why}; every target was resumed on the old kernel"));
    j.advance(Phase::RolledBack)?;
    j.save(&cfg.server.criu_dir)?;
    Ok(j.error.clone().unwrap_or_default())
}

fn restore_all(
    m: &dyn Machine,
    cfg: &Config,
    j: &mut Journal,
    r: &Reporter,
) -> Result<String, UpdateError> {
    let criu = Criu::new(&cfg.server.criu_exe);
    let pending: Vec<usize> = (0..j.targets.len())
        .filter(|&i| j.targets[i].state != TargetState::Restored)
        .collect();
    // Before spawning anything (criu included), push new pids above every saved one.
    let all_ids: Vec<i32> = pending
        .iter()
        .flat_map(|&i| j.targets[i].tree_ids.iter().copied())
        .collect();
    if let Err(e) = m.reserve_pids(&all_ids) {
        r.message(e.to_string());
    }

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
        match m.wait_pids_free(&t.tree_ids, PID_WAIT) {
            Ok(()) => ready.push(i),
            Err(e) => t.state = TargetState::Failed(e.to_string()),
        }
    }

    // In parallel first; collisions (EEXIST) are retried one at a time.
    let first: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ready
            .iter()
            .map(|&i| {
                let t = &j.targets[i];
                let dir = image_dir(cfg, t);
                let criu = &criu;
                r.target(t, "restoring", None);
                s.spawn(move || m.restore(criu, &dir))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("restore thread panicked"))
            .collect()
    });
    for (&i, mut res) in ready.iter().zip(first) {
        let t = &mut j.targets[i];
        let mut tries = 0;
        let res = loop {
            match res {
                Err(e) if e.is_pid_collision() && tries < COLLISION_RETRIES => {
                    tries += 1;
                    r.target(t, "retrying", Some("a saved pid was taken".into()));
                    if let Err(held) = m.wait_pids_free(&t.tree_ids, PID_WAIT) {
                        break Err(held.to_string());
                    }
                    res = m.restore(&criu, &image_dir(cfg, t));
                }
                other => break other.map_err(|e| e.to_string()),
            }
        };
        match res {
            Ok((pid, ms)) => {
                t.state = TargetState::Restored;
                t.restore_ms = Some(ms);
                t.running_again_wall_ms = Some(now().0);
                r.target(t, "restored", Some(format!("pid {pid}, {ms} ms")));
                if !cfg.restore.enable_debug_mode {
                    let _ = std::fs::remove_dir_all(image_dir(cfg, t));
                }
            }
            Err(why) => {
                r.target(t, "failed", Some(why.clone()));
                t.state = TargetState::Failed(why);
            }
        }
    }

    let failed: Vec<String> = j
        .targets
        .iter()
        .filter_map(|t| match &t.state {
            TargetState::Failed(why) => Some(format!("{} (pid {}): {why}", t.name, t.pid)),
            _ => None,
        })
        .collect();
    if failed.is_empty() {
        j.advance(Phase::Restored)?;
        j.save(&cfg.server.criu_dir)?;
        r.phase(Phase::Restored);
        let downtime = j
            .downtime_ms()
            .map_or("n/a".to_string(), |d| format!("{d} ms"));
        return Ok(format!(
            "restored {} target(s) on {}; downtime {downtime}",
            j.targets.len(),
            j.to_kernel
        ));
    }
    j.error = Some(format!(
        "{} target(s) not restored, images kept for a retry (restart the nvwa server): {}",
        failed.len(),
        failed.join("; ")
    ));
    j.advance(Phase::Failed)?;
    j.save(&cfg.server.criu_dir)?;
    r.phase(Phase::Failed);
    Err(UpdateError::Restore(j.error.clone().unwrap_or_default()))
}
