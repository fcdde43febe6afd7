//! Judging a guest run against its scenario, and its phase timeline.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::scenario::{Expect, Guest, KernelPair, Scenario};
use crate::vm::{Line, Outcome, Stamped};

#[derive(Debug, Clone, Serialize)]
pub struct PhaseTime {
    pub phase: String,
    pub ms: u64,
}

/// One boot of the guest, as init.sh reported it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Boot {
    /// `old` (the first boot), `new` (after the kexec) or `cold` (the same machine powered on
    /// again after a power cut, old kernel, persistent memory intact).
    pub stage: String,
    pub kernel: String,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub passed: bool,
    /// The guest it ran in (`busybox` or `server`).
    pub guest: Guest,
    /// The server guest's kernel pair (`series`, `major` or `downgrade`).
    pub kernel_pair: Option<KernelPair>,
    pub kernel_before: Option<String>,
    pub kernel_after: Option<String>,
    pub boots: Vec<Boot>,
    /// When the guest cut its power (`lab_power_cut`), on the host's clock.
    pub power_cut_at_ms: Option<u64>,
    /// Set when a first run failed after its guest kernel oopsed or panicked before /init (an
    /// emulator artefact, not nvwa's doing) and this result is the one rerun: that console line.
    pub reran_after: Option<String>,
    /// Measured on the host's clock from the guest's events.
    pub timeline_ms: Vec<PhaseTime>,
    /// nvwa's own downtime figure (first freeze → last target running), from its journal.
    pub nvwa_downtime_ms: Option<u64>,
    pub failures: Vec<String>,
    pub serial_log: PathBuf,
    /// A kernel oops, BUG or panic before /init of a boot (see `oops::early_oops`).
    #[serde(skip)]
    pub early_oops: Option<String>,
}

struct Facts<'a> {
    lines: &'a [Stamped],
}

impl<'a> Facts<'a> {
    fn events(&self, name: &'a str) -> impl Iterator<Item = (u64, &'a serde_json::Value)> + 'a {
        self.lines.iter().filter_map(move |s| match &s.line {
            Line::Event(v) if v["event"] == name => Some((s.at_ms, v)),
            _ => None,
        })
    }
    fn first(&self, name: &'a str) -> Option<(u64, &'a serde_json::Value)> {
        self.events(name).next()
    }
    fn output(&self, tag: &str) -> Vec<&'a str> {
        self.lines
            .iter()
            .filter_map(|s| match &s.line {
                Line::Output { tag: t, text } if t == tag => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }
    /// When the client printed that the update entered `phase`.
    fn phase_at(&self, tag: &str, phase: &str) -> Option<u64> {
        let needle = format!("phase {phase}");
        self.lines.iter().find_map(|s| match &s.line {
            Line::Output { tag: t, text }
                if t == tag
                    && text
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .contains(&needle) =>
            {
                Some(s.at_ms)
            }
            _ => None,
        })
    }
}

fn tail(lines: &[&str], n: usize) -> String {
    let start = lines.len().saturating_sub(n);
    lines[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn judge(s: &Scenario, new_kernel: &str, out: &Outcome, serial_log: PathBuf) -> ScenarioResult {
    let f = Facts { lines: &out.lines };
    let mut failures = Vec::new();
    let boot_old = f.events("boot").find(|(_, v)| v["stage"] == "old");
    let boot_new = f.events("boot").find(|(_, v)| v["stage"] == "new");
    let boot_cold = f.events("boot").find(|(_, v)| v["stage"] == "cold");
    let power_cut = f.first("power-cut");
    let boots: Vec<Boot> = f
        .events("boot")
        .map(|(at_ms, v)| Boot {
            stage: v["stage"].as_str().unwrap_or("?").to_string(),
            kernel: v["kernel"].as_str().unwrap_or("?").to_string(),
            at_ms,
        })
        .collect();
    let kernel_before = boot_old.and_then(|(_, v)| v["kernel"].as_str().map(String::from));
    let kernel_after = f
        .events("finish")
        .last()
        .and_then(|(_, v)| v["kernel"].as_str().map(String::from));

    if out.timed_out {
        failures.push(format!("the guest did not finish within {} s", s.timeout_s));
    } else if f.first("finish").is_none() {
        let console: Vec<&str> = out
            .lines
            .iter()
            .filter_map(|l| match &l.line {
                Line::Console(c) => Some(c.as_str()),
                _ => None,
            })
            .collect();
        failures.push(format!(
            "the guest stopped without finishing; last console lines:\n{}",
            tail(&console, 15)
        ));
    }
    match (s.power_cut, power_cut, boot_cold) {
        (false, Some((at, v)), _) => failures.push(format!(
            "the guest cut its power at {:.1} s ({}), but the scenario did not ask for a power cut (power_cut = true)",
            at as f64 / 1000.0,
            v["by"].as_str().unwrap_or("lab_power_cut")
        )),
        (true, None, _) if !out.timed_out => {
            failures.push("the scenario asked for a power cut (power_cut = true), but the guest never cut its power".into())
        }
        (true, Some(_), None) if !out.timed_out => failures.push(
            "the power was cut, but the machine's cold boot never reached init.sh".into(),
        ),
        (true, Some(_), Some((_, v))) if kernel_before.is_some() && v["kernel"].as_str() != kernel_before.as_deref() => {
            failures.push(format!(
                "the cold boot after the power cut ran {} instead of the old kernel {}",
                v["kernel"],
                kernel_before.as_deref().unwrap_or("?")
            ))
        }
        _ => {}
    }
    if let Some((_, v)) = f.first("cold-boot-error") {
        failures.push(format!(
            "the cold boot after the power cut: {}",
            v["error"].as_str().unwrap_or("?")
        ));
    }

    match f.first("setup") {
        Some((_, v)) if v["rc"] != 0 => failures.push(format!(
            "setup failed (exit {}):\n{}",
            v["rc"],
            tail(&f.output("setup"), 20)
        )),
        None if !out.timed_out => failures.push("setup never finished".into()),
        _ => {}
    }

    for (i, u) in s.update.iter().enumerate() {
        let n = i + 1;
        let tag = format!("update{n}");
        let output = f.output(&tag);
        let returned = f.events("update-returned").find(|(_, v)| v["index"] == n);
        match (u.expect, returned) {
            (Expect::Failure, Some((_, v))) if v["rc"] == 0 => failures.push(format!(
                "update {n} ({}) was expected to fail but succeeded:\n{}",
                u.version,
                tail(&output, 10)
            )),
            (Expect::Failure, None) if f.first("setup").is_some() => {
                failures.push(format!("update {n} ({}) never returned", u.version))
            }
            (Expect::Success, Some((_, v))) => failures.push(format!(
                "update {n} to {} returned (exit {}) instead of switching kernels:\n{}",
                Scenario::version_of(u, new_kernel),
                v["rc"],
                tail(&output, 20)
            )),
            (Expect::PowerCut, Some((_, v))) => failures.push(format!(
                "update {n} ({}) returned (exit {}) although the power was to be cut while it ran:\n{}",
                u.version,
                v["rc"],
                tail(&output, 20)
            )),
            _ => {}
        }
        if let (Some(want), Some((_, v))) = (u.exit_code, returned) {
            if v["rc"] != want {
                failures.push(format!(
                    "update {n} ({}) exited {} instead of {want}:\n{}",
                    u.version,
                    v["rc"],
                    tail(&output, 10)
                ));
            }
        }
        let text = output.join("\n");
        for want in &u.output_contains {
            if !text.contains(want.as_str()) {
                failures.push(format!(
                    "update {n}: the client's output lacks {want:?}:\n{}",
                    tail(&output, 10)
                ));
            }
        }
    }

    if s.expects_kernel_switch() {
        match boot_new {
            Some((_, v)) if v["kernel"] == new_kernel => {}
            Some((_, v)) => failures.push(format!(
                "the guest came back on {} instead of {new_kernel}",
                v["kernel"]
            )),
            None if failures.is_empty() => failures.push("the new kernel never booted".into()),
            None => {}
        }
    }
    if s.expects_next_boot() {
        if let Some((_, v)) = f.first("before-restore") {
            if v["rc"] != 0 {
                failures.push(format!(
                    "before_restore failed (exit {}):\n{}",
                    v["rc"],
                    tail(&f.output("before_restore"), 20)
                ));
            }
        }
        let want = s.expect_restore.phases();
        if let Some((_, v)) = f.first("restored") {
            if !want.iter().any(|p| v["phase"] == *p) {
                failures.push(format!(
                    "the nvwa server of the next boot settled the update in phase {} instead of {}:\n{}",
                    v["phase"],
                    want.join(" or "),
                    tail(&f.output("server"), 30)
                ));
            }
        }
    }

    let checks: Vec<(u64, &serde_json::Value)> = f.events("check").collect();
    for (i, c) in s.check.iter().enumerate() {
        let n = i + 1;
        match checks.iter().find(|(_, v)| v["index"] == n) {
            Some((_, v)) if v["rc"] == 0 => {}
            Some((_, v)) => failures.push(format!(
                "check {n} failed (exit {}): {}\n{}",
                v["rc"],
                c.name,
                tail(&f.output(&format!("check{n}")), 25)
            )),
            None if failures.is_empty() => {
                failures.push(format!("check {n} never ran: {}", c.name))
            }
            None => {}
        }
    }

    let nvwa_downtime_ms = f
        .first("journal")
        .and_then(|(_, v)| v["journal"]["downtime_ms"].as_u64());
    ScenarioResult {
        name: s.name.clone(),
        passed: failures.is_empty(),
        guest: s.guest,
        kernel_pair: s.kernel_pair(),
        kernel_before,
        kernel_after,
        boots,
        power_cut_at_ms: power_cut.map(|(at, _)| at),
        reran_after: None,
        early_oops: crate::oops::early_oops(&out.lines),
        timeline_ms: timeline(&f, s),
        nvwa_downtime_ms,
        failures,
        serial_log,
    }
}

fn timeline(f: &Facts, s: &Scenario) -> Vec<PhaseTime> {
    let mut marks: BTreeMap<&str, u64> = BTreeMap::new();
    let mut put = |k: &'static str, v: Option<u64>| {
        if let Some(v) = v {
            marks.insert(k, v);
        }
    };
    put(
        "boot_old",
        f.events("boot")
            .find(|(_, v)| v["stage"] == "old")
            .map(|e| e.0),
    );
    put("setup", f.first("setup").map(|e| e.0));
    let n = s.update.len();
    let tag = format!("update{n}");
    put(
        "update",
        f.events("update")
            .find(|(_, v)| v["index"] == n)
            .map(|e| e.0),
    );
    for p in ["kernel_loaded", "frozen", "dumped", "committed"] {
        put(p, f.phase_at(&tag, p));
    }
    put(
        "boot_new",
        f.events("boot")
            .find(|(_, v)| v["stage"] == "new")
            .map(|e| e.0),
    );
    put("power_cut", f.first("power-cut").map(|e| e.0));
    put(
        "boot_cold",
        f.events("boot")
            .find(|(_, v)| v["stage"] == "cold")
            .map(|e| e.0),
    );
    put("restored", f.first("restored").map(|e| e.0));
    put("finish", f.events("finish").last().map(|e| e.0));

    let span = |a: &str, b: &str| marks.get(b)?.checked_sub(*marks.get(a)?);
    let rows: [(&str, Option<u64>); 11] = [
        ("boot (old kernel)", marks.get("boot_old").copied()),
        ("setup", span("boot_old", "setup")),
        ("load kernel", span("update", "kernel_loaded")),
        // The targets still run here: pre-dump passes (pre_dump: true), or nothing.
        ("until frozen", span("kernel_loaded", "frozen")),
        ("dump", span("frozen", "dumped")),
        ("commit", span("dumped", "committed")),
        ("kexec + boot", span("committed", "boot_new")),
        ("restore", span("boot_new", "restored")),
        // Only a kexec has a downtime to measure; a cold boot settles, it does not restore.
        (
            "downtime",
            marks
                .contains_key("boot_new")
                .then(|| span("frozen", "restored"))
                .flatten(),
        ),
        ("power cut → boot", span("power_cut", "boot_cold")),
        ("settle (cold boot)", span("boot_cold", "restored")),
    ];
    rows.into_iter()
        .filter_map(|(phase, ms)| {
            Some(PhaseTime {
                phase: phase.into(),
                ms: ms?,
            })
        })
        .collect()
}

pub fn render(r: &ScenarioResult) -> String {
    let guest = match (r.guest, r.kernel_pair) {
        (Guest::Server, Some(p)) => format!("  [server guest, {} kernels]", p.name()),
        (Guest::Server, None) => "  [server guest]".to_string(),
        (Guest::Busybox, _) => String::new(),
    };
    let mut s = format!(
        "{} {}  ({} → {}){guest}\n",
        if r.passed { "PASS" } else { "FAIL" },
        r.name,
        r.kernel_before.as_deref().unwrap_or("?"),
        r.kernel_after.as_deref().unwrap_or("?")
    );
    if let Some(at) = r.power_cut_at_ms {
        let cold = r.boots.iter().find(|b| b.stage == "cold");
        s.push_str(&format!(
            "  power cut at {:.1} s; {}\n",
            at as f64 / 1000.0,
            cold.map_or("the machine did not boot again".to_string(), |b| format!(
                "then a cold boot of the old kernel {} with its persistent memory",
                b.kernel
            ))
        ));
    }
    if let Some(line) = &r.reran_after {
        s.push_str(&format!(
            "  RERUN: the first run failed after its guest kernel died before /init ({line}); this is the second run\n"
        ));
    }
    if !r.timeline_ms.is_empty() {
        s.push_str(&render_timeline(r));
    }
    for f in &r.failures {
        s.push_str(&format!("  failed: {f}\n"));
    }
    if !r.passed {
        s.push_str(&format!("  serial log: {}\n", r.serial_log.display()));
    }
    s
}

pub fn render_timeline(r: &ScenarioResult) -> String {
    let mut s = String::new();
    for p in &r.timeline_ms {
        s.push_str(&format!(
            "  {:<18} {:>8.3} s\n",
            p.phase,
            p.ms as f64 / 1000.0
        ));
    }
    if let Some(d) = r.nvwa_downtime_ms {
        s.push_str(&format!(
            "  {:<18} {:>8.3} s  (nvwa's journal; wall clock, ±1 s across the kexec)\n",
            "downtime (nvwa)",
            d as f64 / 1000.0
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::classify;
    use std::path::Path;

    const POWER_CUT: &str = r#"
description = "power cut before commit"
power_cut = true
expect_restore = "abandoned"
[[update]]
expect = "power_cut"
[[check]]
name = "images gone"
run = "true"
"#;

    fn outcome(raw: &[&str]) -> Outcome {
        Outcome {
            lines: raw
                .iter()
                .enumerate()
                .map(|(i, r)| Stamped {
                    at_ms: 1000 * i as u64,
                    line: classify(r),
                })
                .collect(),
            timed_out: false,
        }
    }

    /// What a guest says when its power is cut during the update and it boots again cold.
    fn cut_and_cold_boot(settled: &str) -> Outcome {
        outcome(&[
            r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"boot","stage":"old","kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"setup","rc":0}"#,
            r#"NVWA-LAB {"event":"update","index":1}"#,
            "NVWA-LAB-OUT update1: phase frozen",
            r#"[   21.5] NVWA-LAB {"event":"power-cut","by":"criu wrapper"}"#,
            "[   21.6] reboot: Power down",
            r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"boot","stage":"cold","kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"before-restore","rc":0}"#,
            &format!(r#"NVWA-LAB {{"event":"restored","phase":"{settled}"}}"#),
            r#"NVWA-LAB {"event":"check","index":1,"rc":0,"kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"finish","kernel":"6.1","failed":0}"#,
        ])
    }

    fn scenario(text: &str) -> Scenario {
        Scenario::parse(text, Path::new("/x/power-cut.toml")).unwrap()
    }

    #[test]
    fn a_requested_power_cut_and_cold_boot_pass_without_a_kernel_switch() {
        let s = scenario(POWER_CUT);
        let r = judge(&s, "6.12", &cut_and_cold_boot("abandoned"), "log".into());
        assert!(r.passed, "{:?}", r.failures);
        assert_eq!(r.power_cut_at_ms, Some(5000));
        let stages: Vec<&str> = r.boots.iter().map(|b| b.stage.as_str()).collect();
        assert_eq!(stages, ["old", "cold"]);
        assert_eq!(r.kernel_after.as_deref(), Some("6.1"));
        let text = render(&r);
        assert!(text.contains("cold boot of the old kernel 6.1"), "{text}");
        let rows: Vec<&str> = r.timeline_ms.iter().map(|p| p.phase.as_str()).collect();
        assert!(rows.contains(&"power cut → boot"), "{rows:?}");
        assert!(!rows.contains(&"downtime"), "{rows:?}");
    }

    #[test]
    fn the_settled_phase_must_be_the_expected_one() {
        let s = scenario(POWER_CUT);
        let r = judge(&s, "6.12", &cut_and_cold_boot("restored"), "log".into());
        assert!(!r.passed);
        assert!(
            r.failures
                .iter()
                .any(|f| f.contains("instead of abandoned")),
            "{:?}",
            r.failures
        );
    }

    #[test]
    fn a_power_cut_nobody_asked_for_fails() {
        let s = scenario(
            "description = \"x\"\n[[update]]\nexpect = \"failure\"\n[[check]]\nname = \"c\"\nrun = \"true\"\n",
        );
        let r = judge(&s, "6.12", &cut_and_cold_boot("abandoned"), "log".into());
        assert!(!r.passed);
        assert!(
            r.failures
                .iter()
                .any(|f| f.contains("did not ask for a power cut")),
            "{:?}",
            r.failures
        );
    }

    #[test]
    fn a_power_cut_that_never_came_fails() {
        let s = scenario(POWER_CUT);
        let o = outcome(&[
            r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"boot","stage":"old","kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"setup","rc":0}"#,
            r#"NVWA-LAB {"event":"update","index":1}"#,
            r#"NVWA-LAB {"event":"update-returned","index":1,"rc":6}"#,
            r#"NVWA-LAB {"event":"check","index":1,"rc":0,"kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"finish","kernel":"6.1","failed":0}"#,
        ]);
        let r = judge(&s, "6.12", &o, "log".into());
        assert!(!r.passed);
        let all = r.failures.join("\n");
        assert!(all.contains("never cut its power"), "{all}");
        assert!(all.contains("returned (exit 6)"), "{all}");
    }

    #[test]
    fn a_cold_boot_that_lost_the_persistent_memory_fails() {
        let s = scenario(POWER_CUT);
        let o = outcome(&[
            r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"boot","stage":"old","kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"setup","rc":0}"#,
            r#"NVWA-LAB {"event":"update","index":1}"#,
            r#"NVWA-LAB {"event":"power-cut","by":"x"}"#,
            r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#,
            r#"NVWA-LAB {"event":"cold-boot-error","error":"/dev/pmem0 holds no file system"}"#,
            r#"NVWA-LAB {"event":"finish","kernel":"6.1","failed":1}"#,
        ]);
        let r = judge(&s, "6.12", &o, "log".into());
        assert!(!r.passed);
        let all = r.failures.join("\n");
        assert!(all.contains("holds no file system"), "{all}");
        assert!(all.contains("never reached init.sh"), "{all}");
    }

    #[test]
    fn an_update_must_exit_with_the_expected_code() {
        let s = scenario("description = \"x\"\n[[update]]\nexpect = \"failure\"\nexit_code = 6\n");
        let run = |rc: i32| {
            outcome(&[
                r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#,
                r#"NVWA-LAB {"event":"boot","stage":"old","kernel":"6.1"}"#,
                r#"NVWA-LAB {"event":"setup","rc":0}"#,
                r#"NVWA-LAB {"event":"update","index":1}"#,
                &format!(r#"NVWA-LAB {{"event":"update-returned","index":1,"rc":{rc}}}"#),
                r#"NVWA-LAB {"event":"finish","kernel":"6.1","failed":0}"#,
            ])
        };
        assert!(judge(&s, "6.12", &run(6), "log".into()).passed);
        let r = judge(&s, "6.12", &run(4), "log".into());
        assert!(
            r.failures
                .iter()
                .any(|f| f.contains("exited 4 instead of 6")),
            "{:?}",
            r.failures
        );
    }

    #[test]
    fn the_json_report_names_a_rerun() {
        let s = scenario(POWER_CUT);
        let mut r = judge(&s, "6.12", &cut_and_cold_boot("abandoned"), "log".into());
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["reran_after"].is_null(), "{v}");
        r.reran_after = Some("[ 2.8] Oops: int3".into());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["reran_after"], "[ 2.8] Oops: int3");
        assert!(render(&r).contains("RERUN"), "{}", render(&r));
        assert_eq!(v["guest"], "busybox");
        assert!(v["kernel_pair"].is_null(), "{v}");
    }

    #[test]
    fn the_report_names_the_server_guest_and_its_kernel_pair() {
        let s = scenario(
            "description = \"x\"\nguest = \"server\"\nkernels = \"major\"\n[[update]]\nexpect = \"success\"\n",
        );
        let r = judge(
            &s,
            "7.3",
            &outcome(&[
                r#"NVWA-LAB {"event":"boot","stage":"old","kernel":"6.12"}"#,
                r#"NVWA-LAB {"event":"setup","rc":0}"#,
                r#"NVWA-LAB {"event":"update","index":1}"#,
                r#"NVWA-LAB {"event":"boot","stage":"new","kernel":"7.3"}"#,
                r#"NVWA-LAB {"event":"restored","phase":"restored"}"#,
                r#"NVWA-LAB {"event":"finish","kernel":"7.3","failed":0}"#,
            ]),
            "log".into(),
        );
        assert!(r.passed, "{:?}", r.failures);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["guest"], "server");
        assert_eq!(v["kernel_pair"], "major");
        assert!(
            render(&r).contains("(6.12 → 7.3)  [server guest, major kernels]"),
            "{}",
            render(&r)
        );
    }
}
