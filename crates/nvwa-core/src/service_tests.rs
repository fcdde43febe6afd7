//! Services across the kernel switch, against the recording machine: what the update saves
//! about a unit, the drop-ins the generator derives from the journal, the unit's own restore,
//! and the server's record of it on the new boot.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::journal::{Journal, Phase, TargetKind, TargetState};
use crate::protocol::{ErrorKind, Progress};
use crate::service::{drop_ins, generate, restore_in_unit, ServiceError};
use crate::testing::{
    config, run_update, save_on_old_boot, Call, FakeMachine, FakeService, Fault, NEW_BOOT, OLD_BOOT,
};
use crate::update::{self, Reporter};

const REDIS: &str = "redis-server.service";
const NVWA: &str = "/usr/bin/nvwa";

fn services_config(dir: &Path, services: &[&str]) -> Config {
    let mut cfg = config(dir, &[]);
    cfg.restore.services = services.iter().map(|s| s.to_string()).collect();
    cfg
}

fn redis_machine() -> FakeMachine {
    FakeMachine::with_services(&[], vec![FakeService::new(REDIS, 300)])
}

fn on_new_boot(mut m: FakeMachine) -> FakeMachine {
    m.boot = NEW_BOOT.into();
    m.alive.get_mut().unwrap().clear();
    m
}

/// What an update of `m`'s services leaves behind when it stopped in `last` on the old boot.
fn saved(cfg: &Config, m: &FakeMachine, last: Phase) -> Journal {
    save_on_old_boot(cfg, update::plan_targets(m, cfg).unwrap(), last)
}

fn restore(m: &FakeMachine, cfg: &Config) -> Result<String, update::UpdateError> {
    let mut sink = |_p: Progress| {};
    crate::restore::restore_saved(m, cfg, &Reporter::new(&mut sink))
}

fn journal(cfg: &Config) -> Journal {
    Journal::load(&cfg.server.criu_dir).unwrap().unwrap()
}

#[test]
fn a_service_is_dumped_from_its_main_process_with_its_journal_stream_external() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    let m = redis_machine();
    // The double's jump fails, so the update ends resumed; what matters is what it dumped.
    let (res, _) = run_update(&m, &cfg, "6.12-new");
    assert!(res.is_err());
    let calls = m.calls();
    assert!(calls.contains(&Call::Dump(300)), "{calls:?}");
    // stdout and stderr share one stream: named once.
    assert!(
        calls.contains(&Call::DumpExternal(300, vec![9001])),
        "{calls:?}"
    );
    assert!(calls.contains(&Call::Kexec), "{calls:?}");
    let t = &journal(&cfg).targets[0];
    assert_eq!(
        (t.kind, t.name.as_str(), t.pid),
        (TargetKind::Service, REDIS, 300)
    );
    let saved = t.service.as_ref().unwrap();
    assert_eq!(saved.identifier, "redis-server");
    assert_eq!(saved.streams.len(), 2);
    assert!(m.stopped().is_empty(), "a failed jump resumes the service");
}

#[test]
fn drop_ins_exist_only_while_a_committed_update_awaits_its_restore() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    let mut j = saved(&cfg, &redis_machine(), Phase::Committed);
    let files = drop_ins(&cfg, &j, NEW_BOOT, Path::new(NVWA));
    assert_eq!(files.len(), 1);
    assert_eq!(
        files[0].0,
        PathBuf::from("redis-server.service.d/50-nvwa-restore.conf")
    );
    let text = &files[0].1;
    for line in [
        "Type=forking\n",
        "PIDFile=/run/nvwa-restore/redis-server.service.pid\n",
        "ExecStart=\nExecStart=+/usr/bin/nvwa restore redis-server.service@300\n",
        "ExecStartPre=\n",
        "Restart=no\n",
        "SyslogIdentifier=redis-server\n",
        "After=nvwa-pre.service\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from\n{text}");
    }
    // Not on the boot that committed it (a daemon-reload before the jump), and never for an
    // update that did not commit or is finished.
    assert!(drop_ins(&cfg, &j, OLD_BOOT, Path::new(NVWA)).is_empty());
    let uncommitted = saved(&cfg, &redis_machine(), Phase::Dumped);
    assert!(drop_ins(&cfg, &uncommitted, NEW_BOOT, Path::new(NVWA)).is_empty());
    j.advance(Phase::Booted, NEW_BOOT).unwrap();
    assert_eq!(drop_ins(&cfg, &j, NEW_BOOT, Path::new(NVWA)).len(), 1);
    j.targets[0].state = TargetState::Restored;
    assert!(drop_ins(&cfg, &j, NEW_BOOT, Path::new(NVWA)).is_empty());

    // The generator writes them where systemd asks.
    let j = saved(&cfg, &redis_machine(), Phase::Committed);
    let out = tempfile::tempdir().unwrap();
    assert_eq!(
        generate(&cfg, NEW_BOOT, out.path(), Path::new(NVWA)).unwrap(),
        1
    );
    let written = std::fs::read_to_string(
        out.path()
            .join("redis-server.service.d/50-nvwa-restore.conf"),
    )
    .unwrap();
    assert_eq!(written, drop_ins(&cfg, &j, NEW_BOOT, Path::new(NVWA))[0].1);
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        generate(&cfg, OLD_BOOT, empty.path(), Path::new(NVWA)).unwrap(),
        0
    );
    assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 0);
}

#[test]
fn the_unit_restores_itself_with_the_fresh_journal_stream_and_hands_its_pid_to_systemd() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    saved(&cfg, &redis_machine(), Phase::Committed);
    let m = on_new_boot(redis_machine());
    let (pid, _) = restore_in_unit(&m, &cfg, REDIS, 300).unwrap();
    assert_eq!(pid, 300);
    assert!(m.called(&Call::RestoreWith(vec![9001])), "{:?}", m.calls());
    assert_eq!(
        m.pid_files(),
        vec![(
            PathBuf::from("/run/nvwa-restore/redis-server.service.pid"),
            300
        )]
    );
    // The helper records its figure for the server, never the journal.
    assert!(cfg
        .server
        .criu_dir
        .join(REDIS)
        .join("restored.json")
        .exists());
    assert_eq!(journal(&cfg).phase, Phase::Committed);
}

#[test]
fn the_unit_refuses_to_restore_what_was_not_saved_for_it() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    let m = on_new_boot(redis_machine());
    let nothing = |r: Result<(i32, u64), ServiceError>| match r {
        Err(e @ ServiceError::NothingSaved { .. }) => e.to_string(),
        other => panic!("{other:?}"),
    };
    let e = nothing(restore_in_unit(&m, &cfg, REDIS, 300));
    assert!(e.contains("no update journal"), "{e}");
    assert!(
        e.contains("systemctl daemon-reload && systemctl restart redis-server.service"),
        "{e}"
    );
    saved(&cfg, &redis_machine(), Phase::Committed);
    assert!(nothing(restore_in_unit(&m, &cfg, REDIS, 301)).contains("saved as pid 300, not 301"));
    assert!(nothing(restore_in_unit(&m, &cfg, "nginx.service", 300)).contains("did not save it"));
    // On the boot that committed it, the process is still alive: nothing to restore.
    let old = redis_machine();
    assert!(nothing(restore_in_unit(&old, &cfg, REDIS, 300)).contains("not waiting for a restore"));
    saved(&cfg, &redis_machine(), Phase::Dumped);
    assert!(nothing(restore_in_unit(&m, &cfg, REDIS, 300)).contains("not waiting for a restore"));
    assert!(
        !m.calls().iter().any(|c| matches!(c, Call::Restore(_))),
        "{:?}",
        m.calls()
    );
}

#[test]
fn the_new_boot_starts_each_saved_unit_checks_its_main_pid_then_drops_the_drop_ins() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    saved(&cfg, &redis_machine(), Phase::Committed);
    let m = on_new_boot(redis_machine());
    let msg = restore(&m, &cfg).unwrap();
    assert!(msg.contains("restored 1 target(s)"), "{msg}");
    let calls = m.calls();
    let start = calls
        .iter()
        .position(|c| *c == Call::StartService(REDIS.into()));
    let reload = calls.iter().position(|c| *c == Call::DaemonReload);
    assert!(start.is_some() && reload > start, "{calls:?}");
    let j = journal(&cfg);
    assert_eq!(j.phase, Phase::Restored);
    assert_eq!(j.targets[0].state, TargetState::Restored);
    assert!(drop_ins(&cfg, &j, NEW_BOOT, Path::new(NVWA)).is_empty());
    assert!(!cfg.server.criu_dir.join(REDIS).exists(), "images removed");
}

#[test]
fn a_unit_that_starts_afresh_fails_its_restore_and_keeps_its_drop_in_for_the_retry() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    saved(&cfg, &redis_machine(), Phase::Committed);
    let m = on_new_boot(redis_machine());
    m.inject(Fault::ServiceStartsAfresh(REDIS));
    let err = restore(&m, &cfg).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RestoreFailed);
    let text = err.to_string();
    assert!(
        text.contains("main pid 1300, not the saved pid 300"),
        "{text}"
    );
    assert!(
        text.contains("journalctl -b -u redis-server.service"),
        "{text}"
    );
    assert!(!m.called(&Call::DaemonReload));
    let j = journal(&cfg);
    assert_eq!(j.phase, Phase::RestoreFailed);
    assert_eq!(drop_ins(&cfg, &j, NEW_BOOT, Path::new(NVWA)).len(), 1);
    assert!(cfg
        .server
        .criu_dir
        .join(REDIS)
        .join("inventory.img")
        .exists());
}

#[test]
fn a_failing_service_dump_resumes_every_service_and_leaves_nothing_for_the_next_boot() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server", "nginx"]);
    let m = FakeMachine::with_services(
        &[],
        vec![
            FakeService::new(REDIS, 300),
            FakeService::new("nginx.service", 400),
        ],
    );
    m.inject(Fault::Dump(400));
    let err = run_update(&m, &cfg, "6.12-new").0.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RolledBack);
    assert!(err.to_string().contains("nginx.service (pid 400)"), "{err}");
    assert!(m.stopped().is_empty(), "still stopped: {:?}", m.stopped());
    assert!(!m.called(&Call::Kexec));
    let j = journal(&cfg);
    assert_eq!(j.phase, Phase::RolledBack);
    assert!(drop_ins(&cfg, &j, NEW_BOOT, Path::new(NVWA)).is_empty());
}

#[test]
fn services_that_cannot_be_handed_back_are_refused_before_anything_happens() {
    let dir = crate::trust::trusted_tempdir();
    let refused = |m: &FakeMachine, cfg: &Config| {
        let err = run_update(m, cfg, "6.12-new").0.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
        assert!(m.calls().is_empty(), "{:?}", m.calls());
        err.to_string()
    };
    let cfg = services_config(dir.path(), &["redis-server"]);

    let mut stray = FakeService::new(REDIS, 300);
    stray.strays = vec![500];
    let m = FakeMachine::with_services(&[500], vec![stray]);
    assert!(refused(&m, &cfg).contains("outside the tree of its main process"));

    let mut oneshot = FakeService::new(REDIS, 300);
    oneshot.kind = crate::systemd::ServiceType::Other("oneshot".into());
    let m = FakeMachine::with_services(&[], vec![oneshot]);
    assert!(refused(&m, &cfg).contains("Type=oneshot"));

    let mut sandboxed = FakeService::new(REDIS, 300);
    sandboxed.namespaces = vec!["mnt", "uts", "net", "user", "ipc"];
    let m = FakeMachine::with_services(&[], vec![sandboxed]);
    let text = refused(&m, &cfg);
    assert!(
        text.contains("runs in namespaces of its own that nvwa cannot carry over (net, ipc)"),
        "{text}"
    );
    assert!(
        text.contains("systemctl edit redis-server.service"),
        "{text}"
    );

    let m = redis_machine();
    m.inject(Fault::ServiceQuery(REDIS));
    assert!(refused(&m, &cfg).contains("cannot ask systemd about service redis-server.service"));

    // A listed pid inside the service's tree would be dumped twice.
    let mut cfg_both = cfg.clone();
    cfg_both.restore.pids = vec![301];
    let m = FakeMachine::with_services(&[301], vec![FakeService::new(REDIS, 300)]);
    assert!(refused(&m, &cfg_both).contains("pid 301 is listed under `pids:` and is in the process tree of service redis-server.service"));

    let mut m = redis_machine();
    m.fs.separate_fs = true;
    assert!(refused(&m, &cfg).contains("not on the root filesystem"));
}

#[test]
fn an_orderly_jump_is_handed_to_systemd_with_the_targets_held() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = services_config(dir.path(), &["redis-server"]);
    cfg.restore.pids = vec![100];
    cfg.server.kexec_mode = crate::config::KexecMode::Orderly;
    let m = FakeMachine::with_services(&[100], vec![FakeService::new(REDIS, 300)]);
    let msg = run_update(&m, &cfg, "6.12-new").0.unwrap();
    assert!(msg.contains("systemd is stopping the other units"), "{msg}");
    assert!(
        m.called(&Call::OrderlyKexec(vec![REDIS.into()], vec![100])),
        "{:?}",
        m.calls()
    );
    assert!(!m.called(&Call::Kexec));
    // Committed: the service stays stopped for systemd to kill outright, the pid target is
    // killed already; the new boot restores both.
    assert_eq!(journal(&cfg).phase, Phase::Committed);
    assert!(m.stopped().contains(&300));
    assert!(!crate::policy::ProcView::alive(&m, 100));
}

#[test]
fn an_orderly_jump_systemd_refuses_is_rolled_back() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = services_config(dir.path(), &["redis-server"]);
    cfg.restore.pids = vec![100];
    cfg.server.kexec_mode = crate::config::KexecMode::Orderly;
    let m = FakeMachine::with_services(&[100], vec![FakeService::new(REDIS, 300)]);
    m.inject(Fault::OrderlyKexec);
    let err = run_update(&m, &cfg, "6.12-new").0.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RolledBack);
    let text = err.to_string();
    assert!(
        text.contains("systemd did not take over the orderly kexec"),
        "{text}"
    );
    assert!(text.contains("Transaction is destructive"), "{text}");
    assert!(m.stopped().is_empty(), "still stopped: {:?}", m.stopped());
    assert!(m.called(&Call::Unload));
    // The service was only held: resumed. The pid target was killed for the jump: its committed
    // images bring it back on the old kernel.
    assert!(m.called(&Call::Restore("100".into())), "{:?}", m.calls());
    assert!(crate::policy::ProcView::alive(&m, 100) && crate::policy::ProcView::alive(&m, 300));
    let j = journal(&cfg);
    assert_eq!(j.phase, Phase::RolledBack);
    assert!(
        j.targets.iter().all(|t| t.state == TargetState::Resumed),
        "{:?}",
        j.targets
    );
    assert!(
        !cfg.server.criu_dir.join("100").exists(),
        "images removed once restored"
    );
}

fn sandboxed_redis() -> FakeMachine {
    let mut svc = FakeService::new(REDIS, 300);
    svc.namespaces = vec!["mnt", "uts", "user"];
    svc.external_files = vec![crate::journal::ExternalFile {
        fd: 0,
        mnt_id: 0x1a,
        inode: 0x5,
        path: "/dev/null".into(),
        flags: 0o100000,
    }];
    FakeMachine::with_services(&[], vec![svc])
}

#[test]
fn a_sandboxed_service_is_dumped_inside_its_namespaces_with_its_outside_files_external() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    let m = sandboxed_redis();
    assert!(run_update(&m, &cfg, "6.12-new").0.is_err());
    let calls = m.calls();
    assert!(
        calls.contains(&Call::DumpSandboxed {
            ns_of: 300,
            files: vec!["file[1a:5]".into()],
            ignore_cgroups: true,
        }),
        "{calls:?}"
    );
    assert!(
        calls.contains(&Call::DumpExternal(300, vec![9001])),
        "{calls:?}"
    );
    let saved = journal(&cfg).targets[0].service.clone().unwrap();
    assert_eq!(saved.namespaces, ["mnt", "uts", "user"]);
    assert!(saved.sandboxed() && saved.own_user_ns());
    assert_eq!(saved.external_files[0].path, PathBuf::from("/dev/null"));

    // A service in the host's namespaces is dumped as before.
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    let m = redis_machine();
    assert!(run_update(&m, &cfg, "6.12-new").0.is_err());
    assert!(!m
        .calls()
        .iter()
        .any(|c| matches!(c, Call::DumpSandboxed { .. })));
}

#[test]
fn a_sandboxed_units_drop_in_starts_a_holder_inside_its_sandbox() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    let j = saved(&cfg, &sandboxed_redis(), Phase::Committed);
    let text = &drop_ins(&cfg, &j, NEW_BOOT, Path::new(NVWA))[0].1;
    assert!(
        text.contains("ExecStartPre=\nExecStartPre=/usr/bin/nvwa hold\nExecPaths=/usr/bin/nvwa\n"),
        "{text}"
    );
    assert!(text.contains("ExecStart=+/usr/bin/nvwa restore redis-server.service@300\n"));
    let plain = saved(&cfg, &redis_machine(), Phase::Committed);
    let text = &drop_ins(&cfg, &plain, NEW_BOOT, Path::new(NVWA))[0].1;
    assert!(
        !text.contains("hold") && !text.contains("ExecPaths"),
        "{text}"
    );
}

#[test]
fn a_sandboxed_unit_restores_into_its_holder_and_kills_it_whatever_the_outcome() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = services_config(dir.path(), &["redis-server"]);
    saved(&cfg, &sandboxed_redis(), Phase::Committed);

    // Without a holder nothing is attempted.
    let m = on_new_boot(sandboxed_redis());
    let err = restore_in_unit(&m, &cfg, REDIS, 300).unwrap_err();
    assert!(matches!(err, ServiceError::NoHolder { .. }), "{err}");
    assert!(!m.calls().iter().any(|c| matches!(c, Call::Restore(_))));

    let mut m = on_new_boot(sandboxed_redis());
    m.holder = Some(812);
    let (pid, _) = restore_in_unit(&m, &cfg, REDIS, 300).unwrap();
    assert_eq!(pid, 300);
    let calls = m.calls();
    let images = cfg.server.criu_dir.join(REDIS);
    let at = |c: &Call| {
        calls
            .iter()
            .position(|x| x == c)
            .unwrap_or_else(|| panic!("{c:?} missing: {calls:?}"))
    };
    let rewrite = at(&Call::OwnUserNs(images, 300));
    let restore = at(&Call::RestoreSandboxed {
        holder: 812,
        files: vec!["file[1a:5]".into()],
    });
    let kill = at(&Call::KillHolder(812));
    assert!(rewrite < restore && restore < kill, "{calls:?}");
    assert!(m.called(&Call::RestoreWith(vec![9001])));

    // A failed restore still kills the holder.
    let mut m = on_new_boot(sandboxed_redis());
    m.holder = Some(813);
    m.inject(Fault::Restore(300));
    assert!(restore_in_unit(&m, &cfg, REDIS, 300).is_err());
    assert!(m.called(&Call::KillHolder(813)), "{:?}", m.calls());
}

#[test]
fn the_holder_is_recognised_by_its_command_line() {
    use crate::service::is_holder_cmdline;
    let exe = Path::new(NVWA);
    assert!(is_holder_cmdline(b"/usr/bin/nvwa\0hold\0", exe));
    assert!(!is_holder_cmdline(b"/usr/bin/nvwa\0restore\0x@1\0", exe));
    assert!(!is_holder_cmdline(b"/usr/bin/nvwa\0hold\0extra\0", exe));
    assert!(!is_holder_cmdline(b"/usr/bin/redis-server\0hold\0", exe));
    assert!(!is_holder_cmdline(b"/opt/nvwa\0hold\0", exe));
}
