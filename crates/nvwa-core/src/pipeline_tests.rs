//! The all-or-nothing properties of the pipeline, against a recording machine.

use std::sync::Arc;

use crate::journal::{Journal, Phase, TargetState};
use crate::protocol::Progress;
use crate::restore::restore_saved;
use crate::testing::{config, FakeMachine};
use crate::update::{self, Reporter};

fn run_update(
    m: &FakeMachine,
    cfg: &crate::config::Config,
    v: &str,
) -> (Result<String, String>, Vec<Progress>) {
    let mut events = Vec::new();
    let mut sink = |p: Progress| events.push(p);
    let res = update::run(m, cfg, v, &Reporter::new(&mut sink)).map_err(|e| e.to_string());
    (res, events)
}

/// The journal and images an update leaves behind when it jumps into the new kernel.
fn committed_on_old_boot(cfg: &crate::config::Config, pids: &[i32]) {
    let old = FakeMachine::with_pids(pids);
    let mut j = Journal::new("6.1-old", "6.12-new", crate::testing::targets(&old, pids));
    for p in [
        Phase::KernelLoaded,
        Phase::Frozen,
        Phase::Dumped,
        Phase::Committed,
    ] {
        j.advance(p).unwrap();
    }
    for t in &j.targets {
        let d = cfg.server.criu_dir.join(&t.name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("inventory.img"), "x").unwrap();
    }
    j.save(&cfg.server.criu_dir).unwrap();
}

#[test]
fn one_failing_dump_resumes_every_other_target_and_removes_all_images() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[100, 200, 300]);
    let mut m = FakeMachine::with_pids(&[100, 200, 300]);
    m.fail_dump.insert(200);
    let (res, events) = run_update(&m, &cfg, "6.12-new");

    let err = res.unwrap_err();
    assert!(
        err.contains("200 (pid 200) could not be checkpointed"),
        "{err}"
    );
    assert!(err.contains("every target is running again"), "{err}");
    assert!(m.stopped().is_empty(), "still stopped: {:?}", m.stopped());
    assert!(!m.calls().contains(&"kexec".to_string()));
    assert!(m.calls().contains(&"unload".to_string()));
    for name in ["100", "200", "300"] {
        assert!(
            !cfg.server.criu_dir.join(name).exists(),
            "images of {name} left"
        );
    }
    let j = Journal::load(&cfg.server.criu_dir).unwrap().unwrap();
    assert_eq!(j.phase, Phase::RolledBack);
    assert_eq!(j.targets[0].state, TargetState::Resumed);
    assert!(matches!(j.targets[1].state, TargetState::Failed(_)));
    assert!(events.contains(&Progress::Phase {
        phase: Phase::RolledBack
    }));
    // The failed target's criu log outlives its image directory.
    let kept: Vec<_> = std::fs::read_dir(&cfg.server.log_dir).unwrap().collect();
    assert_eq!(kept.len(), 1);
}

#[test]
fn a_kernel_that_does_not_load_freezes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[100]);
    let mut m = FakeMachine::with_pids(&[100]);
    m.fail_load = true;
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().contains("kernel could not be loaded"));
    assert!(!m.calls().iter().any(|c| c.starts_with("dump")));
    let j = Journal::load(&cfg.server.criu_dir).unwrap().unwrap();
    assert!(j.stamp_of(Phase::Frozen).is_none());
    assert_eq!(j.phase, Phase::RolledBack);
}

#[test]
fn bad_versions_and_dead_pids_are_refused_before_anything_happens() {
    let dir = tempfile::tempdir().unwrap();
    let m = FakeMachine::with_pids(&[100]);
    for (v, pids, want) in [
        ("../x", vec![100], "../x"),
        ("9.9-unknown", vec![100], "9.9-unknown"),
        ("6.12-new", vec![100, 555], "pid 555"),
    ] {
        let cfg = config(dir.path(), &pids);
        let (res, _) = run_update(&m, &cfg, v);
        let err = res.unwrap_err();
        assert!(err.contains(want), "{v}: {err}");
    }
    assert!(m.calls().is_empty(), "{:?}", m.calls());
    assert!(Journal::load(&dir.path().join("running"))
        .unwrap()
        .is_none());
}

#[test]
fn options_this_nvwa_cannot_honour_are_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let m = FakeMachine::with_pids(&[100]);
    let mut cfg = config(dir.path(), &[100]);
    cfg.restore.restore_net = true;
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().contains("restore_net"));
    let mut cfg = config(dir.path(), &[100]);
    cfg.restore.services = vec!["redis".into()];
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().contains("redis"));
    assert!(m.calls().is_empty(), "{:?}", m.calls());
}

#[test]
fn success_commits_before_the_jump_and_a_failed_jump_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[100, 300]);
    let m = FakeMachine::with_pids(&[100, 300]);
    let (res, events) = run_update(&m, &cfg, "6.12-new");
    let calls = m.calls();
    let load = calls.iter().position(|c| c.starts_with("load")).unwrap();
    let first_dump = calls.iter().position(|c| c.starts_with("dump")).unwrap();
    let kexec = calls.iter().position(|c| c == "kexec").unwrap();
    assert!(load < first_dump && first_dump < kexec, "{calls:?}");
    let phases: Vec<Phase> = events
        .iter()
        .filter_map(|e| match e {
            Progress::Phase { phase } => Some(*phase),
            _ => None,
        })
        .collect();
    assert_eq!(
        phases,
        [
            Phase::Planned,
            Phase::KernelLoaded,
            Phase::Frozen,
            Phase::Dumped,
            Phase::Committed,
            Phase::RolledBack
        ]
    );
    // The fake's reboot fails: nothing may stay stopped.
    assert!(res.unwrap_err().contains("jump into the new kernel failed"));
    assert!(m.stopped().is_empty());
}

#[test]
fn the_new_boot_restores_every_target_and_computes_the_downtime() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[100, 300]);
    committed_on_old_boot(&cfg, &[100, 300]);

    let mut new = FakeMachine::with_pids(&[]);
    new.boot = "boot-2".into();
    let new = Arc::new(new);
    let mut sink = |_p: Progress| {};
    let msg = restore_saved(new.as_ref(), &cfg, &Reporter::new(&mut sink)).unwrap();
    assert!(msg.contains("restored 2 target(s)"), "{msg}");
    let calls = new.calls();
    assert!(
        calls[0].starts_with("reserve"),
        "pids reserved before any restore: {calls:?}"
    );
    let j = Journal::load(&cfg.server.criu_dir).unwrap().unwrap();
    assert_eq!(j.phase, Phase::Restored);
    assert!(j.downtime_ms().is_some());
    assert!(!cfg.server.criu_dir.join("100").exists(), "images removed");
}

#[test]
fn a_held_pid_fails_that_target_by_name_and_keeps_its_images() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[100]);
    committed_on_old_boot(&cfg, &[100]);
    let d = cfg.server.criu_dir.join("100");

    let mut new = FakeMachine::with_pids(&[]);
    new.boot = "boot-2".into();
    new.held_pids.insert(101);
    let mut sink = |_p: Progress| {};
    let err = restore_saved(&new, &cfg, &Reporter::new(&mut sink))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sshd (pid 99)") && err.contains("pid 101"),
        "{err}"
    );
    assert!(d.join("inventory.img").exists(), "images kept for a retry");
    assert_eq!(
        Journal::load(&cfg.server.criu_dir).unwrap().unwrap().phase,
        Phase::Failed
    );
}

#[test]
fn a_server_restart_on_the_same_boot_resumes_instead_of_restoring() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[100]);
    let mut j = Journal::new("6.1-old", "6.12-new", vec![]);
    j.targets = crate::testing::targets(&m, &[100]);
    j.timeline[0].boot_id = "boot-1".into();
    j.advance(Phase::KernelLoaded).unwrap();
    j.advance(Phase::Frozen).unwrap();
    j.save(&cfg.server.criu_dir).unwrap();
    let mut sink = |_p: Progress| {};
    let msg = restore_saved(&m, &cfg, &Reporter::new(&mut sink)).unwrap();
    assert!(msg.contains("resumed"), "{msg}");
    assert!(!m.calls().iter().any(|c| c.starts_with("restore")));
    assert_eq!(
        Journal::load(&cfg.server.criu_dir).unwrap().unwrap().phase,
        Phase::RolledBack
    );
}

#[test]
fn init_refuses_during_an_update_and_cleans_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[100]);
    let mut j = Journal::new("a", "b", vec![]);
    j.save(&cfg.server.criu_dir).unwrap();
    let m = FakeMachine::with_pids(&[]);
    assert!(update::init(&m, &cfg)
        .unwrap_err()
        .to_string()
        .contains("in progress"));
    j.advance(Phase::RolledBack).unwrap();
    j.save(&cfg.server.criu_dir).unwrap();
    let d = cfg.server.criu_dir.join("100");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("inventory.img"), "x").unwrap();
    let msg = update::init(&m, &cfg).unwrap();
    assert!(msg.contains("removed 1 image set"), "{msg}");
    assert!(!d.exists());
}

#[test]
fn pin_memory_brackets_the_dumps_and_its_absence_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &[100]);
    cfg.restore.enable_pin_memory = true;
    let m = FakeMachine::with_pids(&[100]);
    let _ = run_update(&m, &cfg, "6.12-new");
    let calls = m.calls();
    let pos = |c: &str| calls.iter().position(|x| x == c).unwrap();
    assert!(
        pos("pin Clear") < pos("dump 100") && pos("dump 100") < pos("pin Finish"),
        "{calls:?}"
    );

    let mut m = FakeMachine::with_pids(&[100]);
    m.no_pinmem = true;
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().contains("pin memory failed"));
    assert!(!m.calls().iter().any(|c| c.starts_with("dump")));
    assert!(m.calls().contains(&"unload".to_string()));
}
