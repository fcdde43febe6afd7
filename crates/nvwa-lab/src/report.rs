//! Judging a guest run against its scenario, and its phase timeline.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::scenario::{Expect, Scenario};
use crate::vm::{Line, Outcome, Stamped};

#[derive(Debug, Clone, Serialize)]
pub struct PhaseTime {
    pub phase: String,
    pub ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub passed: bool,
    pub kernel_before: Option<String>,
    pub kernel_after: Option<String>,
    /// Measured on the host's clock from the guest's events.
    pub timeline_ms: Vec<PhaseTime>,
    /// nvwa's own downtime figure (first freeze → last target running), from its journal.
    pub nvwa_downtime_ms: Option<u64>,
    pub failures: Vec<String>,
    pub serial_log: PathBuf,
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
            _ => {}
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
        if let Some((_, v)) = f.first("before-restore") {
            if v["rc"] != 0 {
                failures.push(format!(
                    "before_restore failed (exit {}):\n{}",
                    v["rc"],
                    tail(&f.output("before_restore"), 20)
                ));
            }
        }
        let want = match s.expect_restore {
            Expect::Success => "restored",
            Expect::Failure => "failed",
        };
        if let Some((_, v)) = f.first("restored") {
            if v["phase"] != want {
                failures.push(format!(
                    "the restore ended in phase {} instead of {want}:\n{}",
                    v["phase"],
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
        kernel_before,
        kernel_after,
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
    put("restored", f.first("restored").map(|e| e.0));
    put("finish", f.events("finish").last().map(|e| e.0));

    let span = |a: &str, b: &str| marks.get(b)?.checked_sub(*marks.get(a)?);
    let rows: [(&str, Option<u64>); 9] = [
        ("boot (old kernel)", marks.get("boot_old").copied()),
        ("setup", span("boot_old", "setup")),
        ("load kernel", span("update", "kernel_loaded")),
        ("freeze", span("kernel_loaded", "frozen")),
        ("dump", span("frozen", "dumped")),
        ("commit", span("dumped", "committed")),
        ("kexec + boot", span("committed", "boot_new")),
        ("restore", span("boot_new", "restored")),
        ("downtime", span("frozen", "restored")),
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
    let mut s = format!(
        "{} {}  ({} → {})\n",
        if r.passed { "PASS" } else { "FAIL" },
        r.name,
        r.kernel_before.as_deref().unwrap_or("?"),
        r.kernel_after.as_deref().unwrap_or("?")
    );
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
