//! `restore_net: true` through the pipeline: saved before the freeze and committed with the
//! images, restored on the new boot before any target, conflicts reported and retried.

use crate::journal::{Journal, Phase, TargetState};
use crate::net::{self, Addr, Family, NetCmd, NetState, NftTable, Route, Rule};
use crate::protocol::Progress;
use crate::restore::restore_saved;
use crate::testing::{config, run_update, Call, FakeMachine, Fault, NEW_BOOT};
use crate::update::Reporter;

fn addr(ifname: &str, local: &str, prefixlen: u8, scope: &str, flags: &[&str]) -> Addr {
    Addr {
        ifname: ifname.into(),
        family: if local.contains(':') {
            Family::Inet6
        } else {
            Family::Inet
        },
        local: local.into(),
        prefixlen,
        peer: None,
        broadcast: None,
        scope: scope.into(),
        label: None,
        flags: flags.iter().map(|f| f.to_string()).collect(),
    }
}

fn route(dst: &str, gateway: Option<&str>, table: &str, protocol: &str) -> Route {
    Route {
        family: Family::Inet,
        rtype: "unicast".into(),
        dst: dst.into(),
        table: table.into(),
        gateway: gateway.map(String::from),
        dev: Some("eth0".into()),
        protocol: protocol.into(),
        scope: None,
        prefsrc: None,
        metric: None,
        tos: None,
        onlink: false,
        unsupported: Vec::new(),
        expires: false,
    }
}

fn rule(json: &str) -> Rule {
    Rule {
        family: Family::Inet,
        rule: serde_json::from_str(json).unwrap(),
    }
}

const DEFAULT_RULES: [&str; 3] = [
    r#"{"priority":0,"src":"all","table":"local"}"#,
    r#"{"priority":32766,"src":"all","table":"main"}"#,
    r#"{"priority":32767,"src":"all","table":"default"}"#,
];
const POLICY_RULE: &str = r#"{"priority":100,"src":"10.0.3.0","srclen":24,"table":"100"}"#;
const LAB_TABLE: &str = "table inet lab {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t\ttcp dport 7001 reject with tcp reset\n\t}\n}\n";

/// What a freshly booted machine has: its boot configuration and what the kernel made.
fn booted() -> NetState {
    NetState {
        addrs: vec![
            addr("lo", "127.0.0.1", 8, "host", &[]),
            addr("eth0", "10.0.2.15", 24, "global", &[]),
            addr("eth0", "fe80::5054:ff:fe12:3456", 64, "link", &[]),
        ],
        routes: vec![
            route("default", Some("10.0.2.2"), "main", "static"),
            route("10.0.2.0/24", None, "main", "kernel"),
            route("10.0.2.15", None, "local", "kernel"),
        ],
        rules: DEFAULT_RULES.iter().map(|r| rule(r)).collect(),
        nft: Some(Vec::new()),
        iptables_legacy: Vec::new(),
    }
}

/// The old boot: the boot's configuration plus the operator's runtime additions, a DHCP
/// address and criu's lock table.
fn running() -> NetState {
    let mut s = booted();
    s.addrs.push(addr("eth0", "10.0.3.15", 24, "global", &[]));
    s.addrs
        .push(addr("eth0", "192.168.5.7", 24, "global", &["dynamic"]));
    s.routes
        .push(route("default", Some("10.0.2.2"), "100", "boot"));
    s.routes.push(route("10.0.3.0/24", None, "main", "kernel"));
    s.rules.insert(1, rule(POLICY_RULE));
    s.nft = Some(vec![
        NftTable {
            family: "inet".into(),
            name: "lab".into(),
            text: LAB_TABLE.into(),
        },
        NftTable {
            family: "inet".into(),
            name: "CRIU-4242".into(),
            text: "table inet CRIU-4242 {\n}\n".into(),
        },
    ]);
    s
}

fn ip(args: &str) -> Call {
    Call::Net(NetCmd::Ip(args.split(' ').map(String::from).collect()))
}

fn restore(m: &FakeMachine, cfg: &crate::config::Config) -> (Result<String, String>, Vec<String>) {
    let mut messages = Vec::new();
    let mut sink = |p: Progress| {
        if let Progress::Message { text } = p {
            messages.push(text)
        }
    };
    let res = restore_saved(m, cfg, &Reporter::new(&mut sink)).map_err(|e| e.to_string());
    (res, messages)
}

fn journal(cfg: &crate::config::Config) -> Journal {
    Journal::load(&cfg.server.criu_dir).unwrap().unwrap()
}

#[test]
fn the_operators_part_is_saved_before_the_freeze_and_checked_with_nft() {
    let dir = crate::trust::trusted_tempdir();
    let mut cfg = config(dir.path(), &[100]);
    cfg.restore.restore_net = true;
    let m = FakeMachine::with_pids(&[100]);
    *m.net.lock().unwrap() = running();
    // A state left by an older update goes, whatever it held.
    std::fs::create_dir_all(&cfg.server.criu_dir).unwrap();
    net::write_state(&cfg.server.criu_dir, &NetState::default()).unwrap();
    let saved_at_dump = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = std::sync::Arc::clone(&saved_at_dump);
    let criu_dir = cfg.server.criu_dir.clone();
    let mut m = m;
    m.on_dump = Some(Box::new(move |_| {
        *seen.lock().unwrap() = Some(net::read_state(&criu_dir).unwrap());
    }));
    let (res, events) = run_update(&m, &cfg, "6.12-new");

    let calls = m.calls();
    let at = |f: &dyn Fn(&Call) -> bool| calls.iter().position(f).unwrap();
    let read = at(&|c| *c == Call::NetRead);
    let load = at(&|c| matches!(c, Call::Load { .. }));
    let check = at(&|c| {
        matches!(
            c,
            Call::Net(NetCmd::Nft {
                check_only: true,
                ..
            })
        )
    });
    let dump = at(&|c| matches!(c, Call::Dump(_)));
    assert!(load < read && read < check && check < dump, "{calls:?}");
    let saved = saved_at_dump.lock().unwrap().clone().unwrap();
    assert_eq!(
        saved
            .addrs
            .iter()
            .map(|a| a.local.as_str())
            .collect::<Vec<_>>(),
        ["10.0.2.15", "10.0.3.15"],
        "no loopback, link-local or DHCP address"
    );
    assert_eq!(
        saved.routes.len(),
        2,
        "no kernel or local-table route: {saved:?}"
    );
    assert_eq!(saved.rules, vec![rule(POLICY_RULE)]);
    let tables: Vec<&str> = saved
        .nft
        .as_ref()
        .unwrap()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(tables, ["lab"], "criu's lock table is not the operator's");
    assert!(events.iter().any(|e| matches!(e, Progress::Message { text }
        if text == "network configuration saved: 2 addresses, 2 routes, 1 policy rule, nftables table inet lab")));
    // The fake's jump fails: the rollback removes the saved network with the images.
    assert!(res.is_err());
    assert!(!net::saved(&cfg.server.criu_dir));
}

#[test]
fn a_network_that_cannot_be_saved_rolls_back_before_anything_is_frozen() {
    for (fault, says) in [
        (Fault::NetRead, "install the iproute2 package"),
        (
            Fault::NftCheck,
            "nftables table inet lab cannot be restored as nft prints it",
        ),
    ] {
        let dir = crate::trust::trusted_tempdir();
        let mut cfg = config(dir.path(), &[100]);
        cfg.restore.restore_net = true;
        let m = FakeMachine::with_pids(&[100]);
        *m.net.lock().unwrap() = running();
        m.inject(fault);
        let (res, _) = run_update(&m, &cfg, "6.12-new");
        let err = res.unwrap_err().to_string();
        assert!(
            err.contains("the network configuration could not be saved (restore_net: true)"),
            "{err}"
        );
        assert!(err.contains(says), "{err}");
        assert_eq!(m.dumps(), 0, "nothing may be frozen: {:?}", m.calls());
        assert!(m.called(&Call::Unload));
        assert!(!net::saved(&cfg.server.criu_dir));
        assert_eq!(journal(&cfg).phase, Phase::RolledBack);
    }
}

/// A committed update of pid 100 that saved `running()`'s network.
fn committed_with_network(cfg: &crate::config::Config) {
    let old = FakeMachine::with_pids(&[100]);
    crate::testing::save_on_old_boot(cfg, crate::testing::targets(&old, &[100]), Phase::Committed);
    net::write_state(&cfg.server.criu_dir, &net::operator_state(&running())).unwrap();
}

fn new_boot() -> FakeMachine {
    let mut m = FakeMachine::with_pids(&[]);
    m.boot = NEW_BOOT.into();
    *m.net.lock().unwrap() = booted();
    m
}

#[test]
fn the_new_boot_restores_the_network_before_any_target_and_skips_what_it_has() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    committed_with_network(&cfg);
    let m = new_boot();
    let (res, messages) = restore(&m, &cfg);
    res.unwrap();

    let net_calls: Vec<Call> = m
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Net(_) | Call::Restore(_)))
        .collect();
    let Call::Net(NetCmd::Nft {
        script,
        check_only: false,
    }) = &net_calls[0]
    else {
        panic!("the firewall comes first: {net_calls:?}");
    };
    assert_eq!(
        *script,
        format!(
            "add table inet lab\ndelete table inet lab\n{}\n",
            LAB_TABLE.trim_end()
        )
    );
    assert_eq!(
        net_calls[1..4],
        [
            ip("-4 addr add 10.0.3.15/24 dev eth0 scope global"),
            ip("-4 route add default via 10.0.2.2 dev eth0 table 100 proto boot"),
            ip("-4 rule add priority 100 from 10.0.3.0/24 lookup 100"),
        ]
    );
    assert!(matches!(net_calls[4], Call::Restore(_)), "{net_calls:?}");
    assert_eq!(
        net_calls.len(),
        5,
        "what the boot made is not added again: {net_calls:?}"
    );
    assert!(
        messages.contains(&"network: 4 entries restored, 2 already there".to_string()),
        "{messages:?}"
    );
    assert_eq!(journal(&cfg).phase, Phase::Restored);
    assert!(!net::saved(&cfg.server.criu_dir), "removed once restored");
}

#[test]
fn a_missing_interface_is_named_the_targets_are_restored_and_a_restart_retries_the_network() {
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[100]);
    committed_with_network(&cfg);
    let mut saved = net::read_state(&cfg.server.criu_dir).unwrap();
    saved
        .addrs
        .push(addr("eth1", "10.7.0.1", 16, "global", &[]));
    net::write_state(&cfg.server.criu_dir, &saved).unwrap();
    let m = new_boot();

    let (res, _) = restore(&m, &cfg);
    let err = res.unwrap_err();
    assert!(
        err.contains("1 network entry not restored")
            && err.contains("address 10.7.0.1/16 on eth1: interface eth1 does not exist on this boot; create it, then restart the nvwa server"),
        "{err}"
    );
    let j = journal(&cfg);
    assert_eq!(j.phase, Phase::RestoreFailed);
    assert_eq!(
        j.targets[0].state,
        TargetState::Restored,
        "not held back by the network"
    );
    assert!(net::saved(&cfg.server.criu_dir), "kept for the retry");

    // The operator creates the interface and restarts the server; what is there is skipped.
    m.links.lock().unwrap().insert("eth1".into());
    *m.net.lock().unwrap() = net::operator_state(&running());
    m.calls.lock().unwrap().clear();
    let (res, _) = restore(&m, &cfg);
    res.unwrap();
    let calls: Vec<Call> = m
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Net(_) | Call::Restore(_)))
        .collect();
    assert_eq!(calls, [ip("-4 addr add 10.7.0.1/16 dev eth1 scope global")]);
    assert_eq!(journal(&cfg).phase, Phase::Restored);
}

#[test]
fn conflicts_keep_the_new_boots_entry_and_say_what_to_do() {
    let mut now = booted();
    now.addrs.push(addr("eth1", "10.0.3.15", 24, "global", &[]));
    now.routes
        .push(route("default", Some("10.0.2.99"), "100", "static"));
    let m = new_boot();
    m.links.lock().unwrap().insert("eth1".into());
    *m.net.lock().unwrap() = now;
    let dir = tempfile::tempdir().unwrap();
    let done = net::restore(&m, &net::operator_state(&running()), dir.path()).unwrap();
    let problems: Vec<String> = done.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        problems,
        [
            "address 10.0.3.15/24 on eth0: this boot already has 10.0.3.15/24 on eth1; kept it. If the saved address is the right one, remove that one (`ip addr del 10.0.3.15/24 dev eth1`) and restart the nvwa server",
            "route default (table 100): this boot routes default via 10.0.2.99 dev eth0; kept it. If the saved route is the right one, `ip route replace` it by hand",
        ]
    );
    assert_eq!(
        done.applied,
        [
            "nftables table inet lab",
            "rule priority 100 from 10.0.3.0/24 lookup 100"
        ]
    );
}

#[test]
fn a_failing_command_is_reported_with_its_entry() {
    let m = new_boot();
    m.inject(Fault::NetApply);
    let dir = tempfile::tempdir().unwrap();
    let done = net::restore(&m, &net::operator_state(&running()), dir.path()).unwrap();
    assert!(done.applied.is_empty());
    assert_eq!(done.problems.len(), 4, "{:?}", done.problems);
    assert_eq!(
        done.problems[1].to_string(),
        "address 10.0.3.15/24 on eth0: `ip -4 addr add 10.0.3.15/24 dev eth0 scope global` failed (exit 2): Error: File exists"
    );
}

#[test]
fn the_firewall_is_reported_missing_when_the_new_boot_has_no_nft() {
    let m = new_boot();
    m.net.lock().unwrap().nft = None;
    let dir = tempfile::tempdir().unwrap();
    let done = net::restore(&m, &net::operator_state(&running()), dir.path()).unwrap();
    assert!(
        done.problems[0]
            .to_string()
            .contains("nft is not installed"),
        "{:?}",
        done.problems
    );
}

#[test]
fn services_wait_for_the_network_when_it_was_saved() {
    use crate::journal::{SavedService, TargetKind};
    let dir = crate::trust::trusted_tempdir();
    let cfg = config(dir.path(), &[]);
    let m = FakeMachine::with_services(
        &[],
        vec![crate::testing::FakeService::new("app.service", 300)],
    );
    let mut cfg2 = cfg.clone();
    cfg2.restore.services = vec!["app".into()];
    let targets = crate::update::plan_targets(&m, &cfg2).unwrap();
    assert_eq!(targets[0].kind, TargetKind::Service);
    let _: Option<&SavedService> = targets[0].service.as_ref();
    let j = crate::testing::save_on_old_boot(&cfg, targets, Phase::Committed);
    let exe = std::path::Path::new("/usr/bin/nvwa");
    let plain = crate::service::drop_ins(&cfg, &j, NEW_BOOT, exe);
    assert!(
        !plain[0].1.contains("network-online.target"),
        "{}",
        plain[0].1
    );
    net::write_state(&cfg.server.criu_dir, &NetState::default()).unwrap();
    let waits = crate::service::drop_ins(&cfg, &j, NEW_BOOT, exe);
    assert!(
        waits[0].1.contains(
            "After=nvwa-pre.service network-online.target\nWants=network-online.target\n"
        ),
        "{}",
        waits[0].1
    );
}
