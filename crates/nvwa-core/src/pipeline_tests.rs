//! The all-or-nothing properties of the pipeline, against a recording machine that can fail any
//! call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::journal::{Journal, Phase, TargetState};
use crate::machine::PinOp;
use crate::protocol::{ErrorKind, Progress};
use crate::restore::restore_saved;
use crate::testing::{
    config, run_update, update_with_stop, Call, FakeMachine, Fault, NEW_BOOT, OLD_BOOT,
};
use crate::update::{self, Reporter, UpdateError};

fn restore(m: &FakeMachine, cfg: &crate::config::Config) -> Result<String, UpdateError> {
    let mut sink = |_p: Progress| {};
    restore_saved(m, cfg, &Reporter::new(&mut sink))
}

fn journal(cfg: &crate::config::Config) -> Journal {
    Journal::load(&cfg.server.criu_dir).unwrap().unwrap()
}

fn phases(events: &[Progress]) -> Vec<Phase> {
    events
        .iter()
        .filter_map(|e| match e {
            Progress::Phase { phase } => Some(*phase),
            _ => None,
        })
        .collect()
}

/// The journal and images an update of `pids` leaves behind when it stopped in `last`.
fn saved_on_old_boot(cfg: &crate::config::Config, pids: &[i32], last: Phase) {
    saved_with_small_targets(cfg, pids, &[], last);
}

/// [`saved_on_old_boot`], the targets `small` among `pids` with 4 MiB resident.
fn saved_with_small_targets(cfg: &crate::config::Config, pids: &[i32], small: &[i32], last: Phase) {
    let old = FakeMachine::with_pids(pids);
    for &pid in small {
        old.inject(Fault::Small(pid));
    }
    crate::testing::save_on_old_boot(cfg, crate::testing::targets(&old, pids), last);
}

fn new_boot() -> FakeMachine {
    let mut m = FakeMachine::with_pids(&[]);
    m.boot = NEW_BOOT.into();
    m
}

fn assert_all_rolled_back(m: &FakeMachine, cfg: &crate::config::Config, pids: &[i32]) {
    assert!(m.stopped().is_empty(), "still stopped: {:?}", m.stopped());
    assert!(!m.called(&Call::Kexec), "{:?}", m.calls());
    for pid in pids {
        assert!(
            !cfg.server.criu_dir.join(pid.to_string()).exists(),
            "images of {pid} left"
        );
    }
    assert_eq!(journal(cfg).phase, Phase::RolledBack);
}

#[test]
fn one_failing_dump_resumes_every_other_target_and_removes_all_images() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 200, 300]);
    let m = FakeMachine::with_pids(&[100, 200, 300]);
    m.inject(Fault::Dump(200));
    let (res, events) = run_update(&m, &cfg, "6.12-new");

    let err = res.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RolledBack);
    let err = err.to_string();
    assert!(
        err.contains("200 (pid 200) could not be checkpointed"),
        "{err}"
    );
    assert!(err.contains("every target is running again"), "{err}");
    assert_all_rolled_back(&m, &cfg, &[100, 200, 300]);
    assert!(m.called(&Call::Unload));
    let j = journal(&cfg);
    assert_eq!(j.targets[0].state, TargetState::Resumed);
    assert!(phases(&events).ends_with(&[Phase::RolledBack]));
    // The failed target's criu log outlives its image directory.
    let kept: Vec<_> = std::fs::read_dir(&cfg.server.log_dir).unwrap().collect();
    assert_eq!(kept.len(), 1);
}

#[test]
fn a_dump_that_dies_after_stopping_its_tree_is_resumed_too() {
    // Finding 8: only targets that reached Dumped used to be resumed.
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 200]);
    let m = FakeMachine::with_pids(&[100, 200]);
    m.inject(Fault::DumpLeavesStopped(200));
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res.is_err());
    assert_all_rolled_back(&m, &cfg, &[100, 200]);
    assert_eq!(journal(&cfg).targets[1].state, TargetState::Resumed);
}

#[test]
fn a_panicking_dump_thread_still_rolls_everything_back() {
    // Finding 8: a panic in a dump thread skipped the rollback.
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 200]);
    let m = FakeMachine::with_pids(&[100, 200]);
    m.inject(Fault::DumpPanics(100));
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    let err = res.unwrap_err().to_string();
    assert!(err.contains("injected panic"), "{err}");
    assert_all_rolled_back(&m, &cfg, &[100, 200]);
    assert!(m.called(&Call::Unload));
}

#[test]
fn a_panic_anywhere_in_the_run_rolls_back_through_the_guard() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[100]);
    let stop = Arc::new(AtomicBool::new(false));
    std::fs::create_dir_all(&cfg.server.criu_dir).unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sink = |_p: Progress| {};
        let r = Reporter::new(&mut sink);
        let j = Journal::new(
            "6.1-old",
            "6.12-new",
            crate::testing::targets(&m, &[100]),
            OLD_BOOT,
        );
        let mut run = update::UpdateRun::start(&m, &cfg, &r, j, OLD_BOOT.into(), &stop).unwrap();
        run.advance(Phase::KernelLoaded).unwrap();
        run.advance(Phase::Frozen).unwrap();
        m.stopped.lock().unwrap().extend([100, 101]);
        panic!("a bug between two phases");
    }));
    assert!(outcome.is_err());
    assert_all_rolled_back(&m, &cfg, &[100]);
    assert!(journal(&cfg).error.unwrap().contains("panicked"));
}

#[test]
fn a_hung_criu_ends_in_a_rollback_naming_the_deadline() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 200]);
    let m = FakeMachine::with_pids(&[100, 200]);
    m.inject(Fault::DumpHangs(200));
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    let err = res.unwrap_err().to_string();
    assert!(err.contains("dump_timeout"), "{err}");
    assert_all_rolled_back(&m, &cfg, &[100, 200]);
}

#[test]
fn images_that_cannot_be_made_durable_are_never_committed() {
    // Finding 9: sync(2) reports no errors; the commit must wait for a flush that can fail.
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[100]);
    m.inject(Fault::Durable);
    let (res, events) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().to_string().contains("made durable"));
    assert!(!phases(&events).contains(&Phase::Committed));
    assert_all_rolled_back(&m, &cfg, &[100]);
}

#[test]
fn a_stop_request_before_the_commit_rolls_back() {
    // Finding 6: SIGTERM used to kill the server with targets stopped.
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 200]);
    let mut m = FakeMachine::with_pids(&[100, 200]);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    m.on_dump = Some(Box::new(move |_| flag.store(true, Ordering::SeqCst)));
    let (res, events) = update_with_stop(&m, &cfg, "6.12-new", &stop);
    let err = res.unwrap_err().to_string();
    assert!(err.contains("asked to stop"), "{err}");
    assert!(!phases(&events).contains(&Phase::Committed));
    assert_all_rolled_back(&m, &cfg, &[100, 200]);
}

#[test]
fn an_unloadable_kernel_is_reported_by_the_rollback() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[100]);
    m.inject(Fault::Dump(100));
    m.inject(Fault::Unload);
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    let err = res.unwrap_err().to_string();
    assert!(err.contains("kexec -u"), "{err}");
}

#[test]
fn a_resume_that_fails_is_named_with_the_command_to_fix_it() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[100]);
    m.inject(Fault::Durable);
    m.inject(Fault::Resume(100));
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    let err = res.unwrap_err().to_string();
    assert!(err.contains("kill -CONT 100 101"), "{err}");
    assert!(!err.contains("every target is running again"), "{err}");
}

#[test]
fn a_kernel_that_does_not_load_freezes_nothing() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[100]);
    m.inject(Fault::Load);
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res
        .unwrap_err()
        .to_string()
        .contains("kernel could not be loaded"));
    assert_eq!(m.dumps(), 0);
    let j = journal(&cfg);
    assert!(j.stamp_of(Phase::Frozen).is_none());
    assert_eq!(j.phase, Phase::RolledBack);
}

#[test]
fn bad_versions_and_dead_pids_are_refused_before_anything_happens() {
    let dir = crate::trust::trusted_tempdir();
    let m = FakeMachine::with_pids(&[100]);
    for (v, pids, want) in [
        ("../x", vec![100], "../x"),
        ("9.9-unknown", vec![100], "9.9-unknown"),
        ("6.12-new", vec![100, 555], "pid 555"),
    ] {
        let cfg = config(dir.path(), &pids);
        let (res, _) = run_update(&m, &cfg, v);
        let err = res.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused, "{v}: {err}");
        assert!(err.to_string().contains(want), "{v}: {err}");
    }
    assert!(m.calls().is_empty(), "{:?}", m.calls());
    assert!(Journal::load(&dir.path().join("running"))
        .unwrap()
        .is_none());
}

#[test]
fn an_unreadable_boot_id_refuses_the_update() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[100]);
    m.inject(Fault::BootId);
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().to_string().contains("boot"));
    assert!(m.calls().is_empty());
}

#[test]
fn options_this_nvwa_cannot_honour_are_refused_not_ignored() {
    let dir = crate::trust::trusted_tempdir();
    let m = FakeMachine::with_pids(&[100]);
    let mut cfg = config(dir.path(), &[100]);
    cfg.restore.services = vec!["redis".into()];
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().to_string().contains("redis"));
    assert!(m.calls().is_empty(), "{:?}", m.calls());
}

#[test]
fn success_commits_durable_images_before_the_jump_and_a_failed_jump_resumes() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 300]);
    let m = FakeMachine::with_pids(&[100, 300]);
    let (res, events) = run_update(&m, &cfg, "6.12-new");
    let calls = m.calls();
    let pos = |want: &Call| calls.iter().position(|c| c == want).unwrap();
    let load = calls
        .iter()
        .position(|c| matches!(c, Call::Load { .. }))
        .unwrap();
    let first_dump = calls
        .iter()
        .position(|c| matches!(c, Call::Dump(_)))
        .unwrap();
    let durable = pos(&Call::Durable(cfg.server.criu_dir.clone()));
    let kexec = pos(&Call::Kexec);
    assert!(
        load < first_dump && first_dump < durable && durable < kexec,
        "{calls:?}"
    );
    assert_eq!(
        phases(&events),
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
    assert!(res
        .unwrap_err()
        .to_string()
        .contains("jump into the new kernel failed"));
    assert!(m.stopped().is_empty());
}

#[test]
fn image_directories_are_private_and_marked() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[100]);
    let seen = Arc::new(std::sync::Mutex::new(None));
    let (seen2, images) = (Arc::clone(&seen), cfg.server.criu_dir.join("100"));
    let mut m = m;
    m.on_dump = Some(Box::new(move |_| {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&images).unwrap().permissions().mode() & 0o777;
        let marker = std::fs::read_to_string(images.join(update::IMAGE_MARKER)).unwrap();
        *seen2.lock().unwrap() = Some((mode, marker));
    }));
    let _ = run_update(&m, &cfg, "6.12-new");
    assert_eq!(*seen.lock().unwrap(), Some((0o700, "100".to_string())));
}

#[test]
fn the_new_boot_restores_every_target_and_computes_the_downtime() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 300]);
    saved_on_old_boot(&cfg, &[100, 300], Phase::Committed);

    let new = new_boot();
    let msg = restore(&new, &cfg).unwrap();
    assert!(msg.contains("restored 2 target(s)"), "{msg}");
    let calls = new.calls();
    assert!(
        matches!(calls[0], Call::Reserve(_)),
        "pids reserved before any restore: {calls:?}"
    );
    let j = journal(&cfg);
    assert_eq!(j.phase, Phase::Restored);
    assert!(j.downtime_ms().is_some());
    assert!(!cfg.server.criu_dir.join("100").exists(), "images removed");
}

#[test]
fn targets_without_inet_sockets_do_not_wait_for_the_network_and_the_others_do() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 300]);
    saved_on_old_boot(&cfg, &[100, 300], Phase::Committed);
    let new = new_boot();
    restore(&new, &cfg).unwrap();
    assert!(!new.called(&Call::WaitNetworkOnline), "{:?}", new.calls());

    // 300 holds a TCP socket (files.img: magics, then one FileEntry of type INETSK).
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 300]);
    saved_on_old_boot(&cfg, &[100, 300], Phase::Committed);
    let mut img = vec![0u8; 8];
    img.extend_from_slice(&2u32.to_le_bytes());
    img.extend_from_slice(&[0x08, 0x04]);
    std::fs::write(cfg.server.criu_dir.join("300/files.img"), img).unwrap();
    let new = new_boot();
    restore(&new, &cfg).unwrap();
    let calls = new.calls();
    let at = |c: &Call| calls.iter().position(|x| x == c).unwrap();
    assert!(
        at(&Call::WaitNetworkOnline) < at(&Call::Restore("300".into())),
        "the target with a socket waits for the network: {calls:?}"
    );
    let j = journal(&cfg);
    assert!(j.targets.iter().all(|t| t.state == TargetState::Restored));
}

#[test]
fn images_of_an_update_that_never_committed_are_never_restored() {
    // Finding 2: after a power cut before the commit, a second server start restored them.
    for last in [Phase::Frozen, Phase::Dumped] {
        let dir = crate::trust::trusted_tempdir();
        let cfg = config(dir.path(), &[100]);
        saved_on_old_boot(&cfg, &[100], last);
        let new = new_boot();
        let err = restore(&new, &cfg).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::RolledBack);
        assert!(err.to_string().contains("abandoned"), "{err}");
        assert_eq!(journal(&cfg).phase, Phase::Abandoned);
        assert!(!cfg.server.criu_dir.join("100").exists(), "images deleted");
        // And a second start does nothing at all.
        assert_eq!(restore(&new, &cfg).unwrap(), "nothing to restore");
        assert!(
            !new.calls().iter().any(|c| matches!(c, Call::Restore(_))),
            "{:?}",
            new.calls()
        );
        // An abandoned update does not block the next one.
        update::ensure_idle(&cfg).unwrap();
    }
}

#[test]
fn a_held_pid_fails_that_target_by_name_and_keeps_its_images() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    saved_on_old_boot(&cfg, &[100], Phase::Committed);
    let d = cfg.server.criu_dir.join("100");

    let mut new = new_boot();
    new.held_pids.insert(101);
    let err = restore(&new, &cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RestoreFailed);
    let err = err.to_string();
    assert!(
        err.contains("sshd (pid 99)") && err.contains("pid 101"),
        "{err}"
    );
    assert!(d.join("inventory.img").exists(), "images kept for a retry");
    assert_eq!(journal(&cfg).phase, Phase::RestoreFailed);
    // The retry restores it once the holder is gone.
    new.held_pids.clear();
    assert!(restore(&new, &cfg).unwrap().contains("restored 1"));
}

#[test]
fn one_failed_restore_leaves_the_others_running() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 300]);
    saved_on_old_boot(&cfg, &[100, 300], Phase::Committed);
    let new = new_boot();
    new.inject(Fault::Restore(300));
    assert!(restore(&new, &cfg).is_err());
    let j = journal(&cfg);
    assert_eq!(j.targets[0].state, TargetState::Restored);
    assert!(matches!(j.targets[1].state, TargetState::Failed(_)));
    assert!(crate::policy::ProcView::alive(&new, 100));
    assert!(cfg.server.criu_dir.join("300").exists());
}

#[test]
fn a_server_restart_on_the_same_boot_resumes_instead_of_restoring() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    saved_on_old_boot(&cfg, &[100], Phase::Frozen);
    let m = FakeMachine::with_pids(&[100]);
    m.stopped.lock().unwrap().extend([100, 101]);
    let msg = restore(&m, &cfg).unwrap();
    assert!(msg.contains("resumed"), "{msg}");
    assert!(!m.calls().iter().any(|c| matches!(c, Call::Restore(_))));
    assert!(m.stopped().is_empty());
    assert!(m.called(&Call::Unload));
    assert_eq!(journal(&cfg).phase, Phase::RolledBack);
}

#[test]
fn a_committed_update_on_the_same_boot_is_resumed_not_restored() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    saved_on_old_boot(&cfg, &[100], Phase::Committed);
    let m = FakeMachine::with_pids(&[100]);
    assert!(restore(&m, &cfg).unwrap().contains("did not happen"));
    assert_eq!(journal(&cfg).phase, Phase::RolledBack);
}

#[test]
fn init_refuses_during_an_update_and_removes_only_what_nvwa_made() {
    // Finding 5: init deleted every subdirectory holding a dump.log or inventory.img.
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[]);
    saved_on_old_boot(&cfg, &[100], Phase::Frozen);
    assert!(update::init(&m, &cfg)
        .unwrap_err()
        .to_string()
        .contains("in progress"));
    let mut j = journal(&cfg);
    j.advance(Phase::RolledBack, OLD_BOOT).unwrap();
    j.save(&cfg.server.criu_dir).unwrap();
    let foreign = cfg.server.criu_dir.join("someone-elses");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("inventory.img"), "x").unwrap();
    let marked = cfg.server.criu_dir.join("4242");
    std::fs::create_dir_all(&marked).unwrap();
    std::fs::write(marked.join(update::IMAGE_MARKER), "4242").unwrap();
    let msg = update::init(&m, &cfg).unwrap();
    assert!(msg.contains("removed 2 image set"), "{msg}");
    assert!(!cfg.server.criu_dir.join("100").exists());
    assert!(!marked.exists());
    assert!(foreign.join("inventory.img").exists(), "not nvwa's: kept");
}

#[test]
fn a_journal_naming_paths_outside_criu_dir_is_refused_by_restore_and_init() {
    // Finding 4: `../x` in a journal made a resume delete a directory outside criu_dir.
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    saved_on_old_boot(&cfg, &[100], Phase::Committed);
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    let path = Journal::path(&cfg.server.criu_dir);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"name\": \"100\"", "\"name\": \"../victim\"");
    std::fs::write(&path, text).unwrap();
    let new = new_boot();
    assert!(restore(&new, &cfg)
        .unwrap_err()
        .to_string()
        .contains("not a pid or a unit name"));
    assert!(update::init(&new, &cfg).is_err());
    assert!(victim.exists());
    assert!(new.calls().is_empty());
}

#[test]
fn pin_memory_brackets_the_dumps_and_its_absence_rolls_back() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100]);
    cfg.restore.enable_pin_memory = true;
    // As parse_restore leaves it when pre_dump is not given.
    cfg.restore.pre_dump = false;
    let m = FakeMachine::with_pids(&[100]);
    let _ = run_update(&m, &cfg, "6.12-new");
    let calls = m.calls();
    let pos = |c: &Call| calls.iter().position(|x| x == c).unwrap();
    assert!(
        pos(&Call::Pin(PinOp::Clear)) < pos(&Call::Dump(100))
            && pos(&Call::Dump(100)) < pos(&Call::Pin(PinOp::Finish)),
        "{calls:?}"
    );

    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100]);
    cfg.restore.enable_pin_memory = true;
    cfg.restore.pre_dump = false;
    let m = FakeMachine::with_pids(&[100]);
    m.inject(Fault::PinClear);
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().to_string().contains("pin memory failed"));
    assert_eq!(m.dumps(), 0);
    assert!(m.called(&Call::Unload));
}

#[test]
fn too_little_room_for_the_images_or_nothing_listed_is_refused_before_anything_happens() {
    // Finding 9: free space was never checked before freezing.
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let mut m = FakeMachine::with_pids(&[100]);
    m.fs = crate::policy::fake::FakeFs::disk(1 << 20);
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    let err = res.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(err.to_string().contains("free"), "{err}");
    assert!(m.calls().is_empty(), "{:?}", m.calls());

    let cfg = config(dir.path(), &[]);
    let m = FakeMachine::with_pids(&[100]);
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    let err = res.unwrap_err().to_string();
    assert!(err.contains("nothing to preserve"), "{err}");
    assert!(m.calls().is_empty(), "{:?}", m.calls());
}

#[test]
fn a_criu_dir_others_can_write_to_is_neither_used_nor_restored_from() {
    // Finding 4: criu_dir was trusted whatever its owner and mode.
    use std::os::unix::fs::PermissionsExt;
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    saved_on_old_boot(&cfg, &[100], Phase::Committed);
    std::fs::set_permissions(&cfg.server.criu_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let new = new_boot();
    let err = restore(&new, &cfg).unwrap_err();
    assert!(err.to_string().contains("world-writable"), "{err}");
    assert!(new.calls().is_empty(), "{:?}", new.calls());

    let m = FakeMachine::with_pids(&[100]);
    std::fs::remove_file(Journal::path(&cfg.server.criu_dir)).unwrap();
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    let err = res.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Refused);
    assert!(err.to_string().contains("world-writable"), "{err}");
    assert!(m.calls().is_empty(), "{:?}", m.calls());
}

#[test]
fn a_journal_that_cannot_be_written_rolls_back_and_the_next_start_records_it() {
    // Low finding: a failed journal write left it at `frozen` forever.
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let mut m = FakeMachine::with_pids(&[100]);
    let journal_path = Journal::path(&cfg.server.criu_dir);
    let blocker = journal_path.clone();
    // Mid-dump the journal's name becomes a directory: every later save fails.
    m.on_dump = Some(Box::new(move |_| {
        std::fs::remove_file(&blocker).unwrap();
        std::fs::create_dir(&blocker).unwrap();
    }));
    let (res, events) = run_update(&m, &cfg, "6.12-new");
    let err = res.unwrap_err().to_string();
    assert!(err.contains("cannot write the update journal"), "{err}");
    assert!(m.stopped().is_empty(), "resumed even without a journal");
    assert!(events
        .iter()
        .any(|e| matches!(e, Progress::Message { text } if text.contains("next start"))));

    // The disk recovers; the journal on disk still says `frozen` from before the failure. A
    // restart on the same boot finds the targets running and records the rollback.
    std::fs::remove_dir(&journal_path).unwrap();
    saved_on_old_boot(&cfg, &[100], Phase::Frozen);
    let msg = restore(&m, &cfg).unwrap();
    assert!(msg.contains("resumed"), "{msg}");
    assert_eq!(journal(&cfg).phase, Phase::RolledBack);
}

#[test]
fn every_request_publishes_the_last_update_to_the_metrics_file() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100]);
    let prom = dir.path().join("nvwa.prom");
    cfg.server.metrics_file = Some(prom.clone());
    // The daemon reads its configuration from disk: write this one out.
    std::fs::write(
        dir.path().join(crate::config::SERVER_FILE),
        format!(
            "criu_dir: {}\ncriu_exe: /bin/true\nkexec_exe: /bin/true\nlog_dir: {}\nmetrics_file: {}\n",
            cfg.server.criu_dir.display(),
            cfg.server.log_dir.display(),
            prom.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join(crate::config::RESTORE_FILE),
        "pids: [100]\n",
    )
    .unwrap();
    let m = Arc::new(FakeMachine::with_pids(&[100]));
    m.inject(Fault::Dump(100));
    let d = crate::daemon::Daemon::with_machine(dir.path().into(), m);
    let mut sink = |_p: Progress| {};
    let err = d
        .handle(
            crate::protocol::Request::Update {
                version: "6.12-new".into(),
            },
            &mut sink,
        )
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::RolledBack);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(text.contains("phase=\"rolled_back\"} 1"), "{text}");
    assert!(text.contains("nvwa_last_update_success 0"), "{text}");
}

#[test]
fn dumps_lock_the_network_with_nftables_and_a_rollback_releases_it_before_resuming() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 200]);
    let m = FakeMachine::with_pids(&[100, 200]);
    m.inject(Fault::Dump(200));
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert_eq!(res.unwrap_err().kind(), ErrorKind::RolledBack);
    let calls = m.calls();
    assert!(m.called(&Call::DumpLocked(100)), "{calls:?}");
    let dumped = cfg.server.criu_dir.join("100");
    let release = calls
        .iter()
        .position(|c| c == &Call::ReleaseNet(dumped.clone()))
        .unwrap_or_else(|| panic!("the lock of 100 was not released: {calls:?}"));
    let resume = calls
        .iter()
        .position(|c| matches!(c, Call::Resume(ids) if ids.contains(&100)))
        .unwrap();
    assert!(release < resume, "{calls:?}");
    // 200's dump failed: criu unlocked it itself and left no lock to release.
    assert!(!calls
        .iter()
        .any(|c| matches!(c, Call::ReleaseNet(d) if d.ends_with("200"))));
    assert_all_rolled_back(&m, &cfg, &[100, 200]);
}

#[test]
fn without_criu_nftables_lock_the_dumps_use_criu_default_and_say_what_that_means() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    let m = FakeMachine::with_pids(&[100]);
    m.inject(Fault::NoNftablesLock);
    // The double's jump fails: what matters here is how the dump ran.
    let (_, events) = run_update(&m, &cfg, "6.12-new");
    assert!(m.called(&Call::Dump(100)));
    assert!(!m.called(&Call::DumpLocked(100)), "{:?}", m.calls());
    let said = events.iter().position(|e| {
        matches!(e, Progress::Message { text }
            if text.contains("cannot lock the network with nftables") && text.contains("reset"))
    });
    // criu's probe is asked before the freeze: it is no part of the downtime.
    let frozen = events
        .iter()
        .position(|e| matches!(e, Progress::Phase { phase } if *phase == Phase::Frozen));
    assert!(said.is_some() && said < frozen, "{events:?}");
}

#[test]
fn a_tree_without_connections_is_dumped_without_them_and_one_with_them_locked() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100, 200]);
    let m = FakeMachine::with_pids(&[100, 200]);
    m.inject(Fault::NoConnection(100));
    // The double's jump fails: what matters here is how the dumps ran.
    let (res, events) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().to_string().contains("jump"));
    let calls = m.calls();
    assert!(m.called(&Call::DumpRefusingConnections(100)), "{calls:?}");
    assert!(!m.called(&Call::DumpLocked(100)), "{calls:?}");
    assert!(m.called(&Call::DumpLocked(200)), "{calls:?}");
    assert!(!m.called(&Call::DumpRefusingConnections(200)), "{calls:?}");
    // The operator is told which.
    let told = |name: &str, what: &str| {
        events.iter().any(|e| {
            matches!(e, Progress::Target { target, state, detail: Some(d), .. }
                if target == name && state == "dumped" && d.ends_with(what))
        })
    };
    assert!(told("100", "ms, no TCP connection"), "{events:?}");
    assert!(told("200", "ms, its TCP connections locked"), "{events:?}");
}

#[test]
fn a_connection_that_appears_during_the_dump_gets_the_tree_dumped_again_in_full_and_locked() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100]);
    cfg.restore.pre_dump = true;
    let mut m = FakeMachine::with_pids(&[100]);
    m.inject(Fault::NoConnection(100));
    m.inject(Fault::ConnectionAppears(100));
    // What each dump found in the image directory: the failed one's pages must be gone.
    let images = cfg.server.criu_dir.join("100");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen2, images2) = (Arc::clone(&seen), images.clone());
    m.on_dump = Some(Box::new(move |_| {
        seen2.lock().unwrap().push((
            images2.join("pages-1.img").exists(),
            images2.join("pre-3").is_dir(),
        ));
    }));
    let (res, events) = run_update(&m, &cfg, "6.12-new");
    // The update went on to the (fake, failing) jump.
    assert!(res.unwrap_err().to_string().contains("jump"));
    let calls = m.calls();
    let dumps: Vec<&Call> = calls
        .iter()
        .filter(|c| {
            matches!(
                c,
                Call::DumpOnto(..) | Call::DumpRefusingConnections(_) | Call::DumpLocked(_)
            )
        })
        .collect();
    assert_eq!(
        dumps,
        [
            &Call::DumpOnto(100, "pre-3".into()),
            &Call::DumpRefusingConnections(100),
            &Call::DumpLocked(100),
        ],
        "{calls:?}"
    );
    // The passes stay (they are the journal's record); the failed dump's files do not.
    assert_eq!(*seen.lock().unwrap(), [(false, true), (false, true)]);
    let told = events.iter().any(|e| {
        matches!(e, Progress::Target { target, state, detail: Some(d), .. }
        if target == "100" && state == "dumped" && d.contains("TCP connection appeared") && d.contains("in full"))
    });
    assert!(told, "{events:?}");
}

#[test]
fn pre_dump_passes_run_before_the_freeze_and_the_dump_writes_only_what_followed() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100, 200]);
    cfg.restore.pre_dump = true;
    let m = FakeMachine::with_pids(&[100, 200]);
    let (_, events) = run_update(&m, &cfg, "6.12-new");
    let calls = m.calls();
    // 256 MiB, then 16 MiB (shrinking), then 1 MiB (small): three passes, each on the last.
    for pid in [100, 200] {
        let passes: Vec<_> = calls
            .iter()
            .filter_map(|c| match c {
                Call::PreDump(p, prev) if *p == pid => Some(prev.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            passes,
            [None, Some("../pre-1".into()), Some("../pre-2".into())],
            "{calls:?}"
        );
        assert!(m.called(&Call::DumpOnto(pid, "pre-3".into())), "{calls:?}");
    }
    let last_pass = calls
        .iter()
        .rposition(|c| matches!(c, Call::PreDump(..)))
        .unwrap();
    let first_dump = calls
        .iter()
        .position(|c| matches!(c, Call::Dump(_)))
        .unwrap();
    assert!(last_pass < first_dump, "{calls:?}");
    // Every pass happened before the freeze: the targets ran meanwhile.
    let frozen_at = events
        .iter()
        .position(|e| {
            matches!(
                e,
                Progress::Phase {
                    phase: Phase::Frozen
                }
            )
        })
        .unwrap();
    let pre_dumped_at = events
        .iter()
        .rposition(|e| matches!(e, Progress::Target { state, .. } if state == "pre-dumped"))
        .unwrap();
    assert!(pre_dumped_at < frozen_at);
    let j = journal(&cfg);
    assert_eq!(j.targets[0].pre_dump.len(), 3);
    assert_eq!(j.targets[0].pre_dump[0].bytes, 256 << 20);
}

#[test]
fn a_failing_pre_dump_costs_only_time_that_target_is_dumped_in_full() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100, 200]);
    cfg.restore.pre_dump = true;
    let m = FakeMachine::with_pids(&[100, 200]);
    m.inject(Fault::PreDump(200));
    let images = cfg.server.criu_dir.join("200");
    let seen = Arc::new(std::sync::Mutex::new(None));
    let (seen2, images2) = (Arc::clone(&seen), images.clone());
    let mut m = m;
    m.on_dump = Some(Box::new(move |pid| {
        if pid == 200 {
            *seen2.lock().unwrap() = Some(images2.join("pre-1").exists());
        }
    }));
    let (res, events) = run_update(&m, &cfg, "6.12-new");
    // The update went on to the (fake, failing) jump.
    assert!(m.called(&Call::Kexec), "{:?}", m.calls());
    assert!(res.unwrap_err().to_string().contains("jump"));
    assert!(m.called(&Call::DumpOnto(100, "pre-3".into())));
    assert!(!m
        .calls()
        .iter()
        .any(|c| matches!(c, Call::DumpOnto(200, _))));
    assert_eq!(
        *seen.lock().unwrap(),
        Some(false),
        "a failed pass was left behind"
    );
    let told = events.iter().any(|e| {
        matches!(e, Progress::Target { target, state, detail: Some(d), .. }
        if target == "200" && state == "pre-dump failed" && d.contains("dumping it in full"))
    });
    assert!(told, "{events:?}");
}

#[test]
fn a_lazy_restore_is_recorded_once_every_page_is_in_and_only_then_drops_the_images() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100, 300]);
    cfg.restore.lazy_restore = true;
    saved_on_old_boot(&cfg, &[100, 300], Phase::Committed);
    let new = new_boot();
    restore(&new, &cfg).unwrap();
    let calls = new.calls();
    let pos = |c: &Call| calls.iter().position(|x| x == c).unwrap();
    for name in ["100", "300"] {
        assert!(new.called(&Call::RestoreLazy(name.into())), "{calls:?}");
        // Every restore ran before the first wait: the daemons fill memory in in parallel.
        assert!(pos(&Call::Restore("300".into())) < pos(&Call::FinishLazy(name.into())));
        assert!(!cfg.server.criu_dir.join(name).exists(), "images removed");
    }
    let j = journal(&cfg);
    assert_eq!(j.phase, Phase::Restored);
    assert!(j.targets.iter().all(|t| t.state == TargetState::Restored));
}

#[test]
fn a_small_target_is_restored_in_full_while_the_others_come_lazily() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100, 300]);
    cfg.restore.lazy_restore = true;
    saved_with_small_targets(&cfg, &[100, 300], &[300], Phase::Committed);
    let new = new_boot();
    restore(&new, &cfg).unwrap();
    let calls = new.calls();
    assert!(new.called(&Call::RestoreLazy("100".into())), "{calls:?}");
    assert!(new.called(&Call::FinishLazy("100".into())), "{calls:?}");
    assert!(new.called(&Call::Restore("300".into())), "{calls:?}");
    assert!(!new.called(&Call::RestoreLazy("300".into())), "{calls:?}");
    assert!(!new.called(&Call::FinishLazy("300".into())), "{calls:?}");
    assert_eq!(journal(&cfg).phase, Phase::Restored);
    // The lazy check asks the kernel, not criu: the two parallel restores still need one criu
    // run that probes the kernel for them, before either starts.
    assert!(new.called(&Call::LazyPagesCheck), "{calls:?}");
    let pos = |c: &Call| calls.iter().position(|x| x == c).unwrap();
    assert!(pos(&Call::CacheCriuProbes) < pos(&Call::RestoreLazy("100".into())));
    assert!(pos(&Call::CacheCriuProbes) < pos(&Call::Restore("300".into())));
}

#[test]
fn parallel_full_restores_follow_one_criu_run_that_probes_the_kernel_for_them_all() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100, 300]);
    cfg.restore.lazy_restore = true;
    saved_with_small_targets(&cfg, &[100, 300], &[100, 300], Phase::Committed);
    let new = new_boot();
    restore(&new, &cfg).unwrap();
    let calls = new.calls();
    // No target is worth a lazy restore: the kernel is not asked about it.
    assert!(!new.called(&Call::LazyPagesCheck), "{calls:?}");
    let probed = calls.iter().position(|c| *c == Call::CacheCriuProbes);
    let first_restore = calls.iter().position(|c| matches!(c, Call::Restore(_)));
    assert!(probed.is_some() && probed < first_restore, "{calls:?}");

    // One restore alone, full or lazy, lets its own criu run probe the kernel: whether it can be
    // lazy is the kernel's answer, not criu's.
    for lazy in [false, true] {
        let dir = crate::trust::trusted_tempdir();
        let mut cfg = config(dir.path(), &[100]);
        cfg.restore.lazy_restore = lazy;
        saved_on_old_boot(&cfg, &[100], Phase::Committed);
        let new = new_boot();
        restore(&new, &cfg).unwrap();
        let calls = new.calls();
        if lazy {
            assert!(new.called(&Call::RestoreLazy("100".into())), "{calls:?}");
        }
        assert!(!new.called(&Call::CacheCriuProbes), "{calls:?}");
    }
}

#[test]
fn a_small_target_is_not_pre_dumped_and_the_operator_is_told() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100, 200]);
    cfg.restore.pre_dump = true;
    let m = FakeMachine::with_pids(&[100, 200]);
    m.inject(Fault::Small(200));
    // The double's jump fails: what matters here is how the dumps ran.
    let (res, events) = run_update(&m, &cfg, "6.12-new");
    assert!(res.unwrap_err().to_string().contains("jump"));
    let calls = m.calls();
    assert!(m.called(&Call::DumpOnto(100, "pre-3".into())), "{calls:?}");
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::PreDump(200, _) | Call::DumpOnto(200, _))),
        "{calls:?}"
    );
    assert!(m.called(&Call::Dump(200)), "{calls:?}");
    let told = |events: &[Progress]| {
        events.iter().any(|e| {
            matches!(e, Progress::Message { text }
            if text.starts_with("200 (4.0 MiB) dumped and restored in full: under 32 MiB"))
        })
    };
    assert!(told(&events), "{events:?}");

    // Without pre_dump, lazy_restore alone leaves it out too, and says so.
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100, 200]);
    cfg.restore.pre_dump = false;
    cfg.restore.lazy_restore = true;
    let (_, events) = run_update(&m, &cfg, "6.12-new");
    assert!(told(&events), "{events:?}");
}

#[test]
fn without_userfaultfd_every_target_is_restored_in_full_and_the_server_says_why() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100]);
    cfg.restore.lazy_restore = true;
    saved_on_old_boot(&cfg, &[100], Phase::Committed);
    let new = new_boot();
    new.inject(Fault::NoLazyPages);
    let mut events = Vec::new();
    let mut sink = |p: Progress| events.push(p);
    restore_saved(&new, &cfg, &update::Reporter::new(&mut sink)).unwrap();
    assert!(new.called(&Call::Restore("100".into())));
    assert!(!new
        .calls()
        .iter()
        .any(|c| matches!(c, Call::RestoreLazy(_) | Call::FinishLazy(_))));
    assert!(events.iter().any(|e| matches!(e, Progress::Message { text }
        if text.contains("UFFD is not supported") && text.contains("in full"))));
}

#[test]
fn a_process_whose_memory_stayed_incomplete_is_killed_and_lost_and_never_replayed() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100, 300]);
    cfg.restore.lazy_restore = true;
    saved_on_old_boot(&cfg, &[100, 300], Phase::Committed);
    let new = new_boot();
    new.inject(Fault::LazyIncomplete(300));
    let err = restore(&new, &cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RestoreFailed);
    assert!(err.to_string().contains("copied 40 of 100 pages"), "{err}");
    assert!(new.called(&Call::KillTree(300)));
    assert!(!new.called(&Call::KillTree(100)));
    let kept = cfg.server.criu_dir.join("300").join("inventory.img");
    assert!(kept.exists());
    assert!(!cfg.server.criu_dir.join("100").exists());
    let j = journal(&cfg);
    assert_eq!(j.phase, Phase::RestoreFailed);
    assert_eq!(j.targets[0].state, TargetState::Restored);
    assert!(
        matches!(&j.targets[1].state, TargetState::Lost(why) if why.contains("not restored again")),
        "{:?}",
        j.targets[1].state
    );
    // It ran on the new kernel since its images were taken: the next start of the server does
    // not replay them, and the update stays failed, saying so.
    let again = new_boot();
    let err = restore(&again, &cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RestoreFailed);
    assert!(
        err.to_string().contains("lost after they ran again"),
        "{err}"
    );
    assert!(!again.calls().iter().any(|c| matches!(
        c,
        Call::Restore(_) | Call::RestoreLazy(_) | Call::KillTree(_)
    )));
    assert!(kept.exists());
    assert_eq!(journal(&cfg).phase, Phase::RestoreFailed);
}
