//! Text for the operator: progress lines and the `status` report.

use std::fmt::Write as _;
use std::time::Duration;

use nvwa_core::journal::{Journal, Phase, TargetKind, TargetState};
use nvwa_core::protocol::Progress;

/// One progress event, without the time prefix.
pub fn progress(p: &Progress) -> String {
    match p {
        Progress::Phase { phase } => format!("phase {phase}"),
        Progress::Target {
            target,
            pid,
            state,
            detail,
        } => {
            let who = if *target == pid.to_string() {
                format!("{target} (pid)")
            } else {
                format!("{target} (pid {pid})")
            };
            match detail {
                Some(d) => format!("{who} {state}: {d}"),
                None => format!("{who} {state}"),
            }
        }
        Progress::Message { text } => text.clone(),
    }
}

/// `[  0.412s] ` for an elapsed time.
pub fn elapsed_prefix(elapsed: Duration) -> String {
    format!("[{:7.3}s]", elapsed.as_secs_f64())
}

fn state(s: &TargetState) -> String {
    match s {
        TargetState::Pending => "pending".into(),
        TargetState::Dumped => "dumped".into(),
        TargetState::Resumed => "resumed".into(),
        TargetState::Restored => "restored".into(),
        TargetState::Failed(why) => format!("failed: {why}"),
        TargetState::Lost(why) => format!("lost: {why}"),
    }
}

fn ms(v: Option<u64>) -> String {
    v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into())
}

/// The human-readable `nvwa status` report.
pub fn status(j: &Journal) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "update: {} -> {}", j.from_kernel, j.to_kernel);
    let ongoing = if j.phase.in_progress() {
        " (in progress)"
    } else {
        ""
    };
    let _ = writeln!(out, "phase:  {}{ongoing}", j.phase);
    if let Some(e) = &j.error {
        let _ = writeln!(out, "error:  {e}");
    }

    let _ = writeln!(out, "\ntargets:");
    if j.targets.is_empty() {
        let _ = writeln!(out, "  (none)");
    } else {
        let rows: Vec<[String; 6]> = j
            .targets
            .iter()
            .map(|t| {
                [
                    t.name.clone(),
                    match t.kind {
                        TargetKind::Pid => "pid".into(),
                        TargetKind::Service => "service".into(),
                    },
                    t.pid.to_string(),
                    state(&t.state),
                    ms(t.dump_ms),
                    ms(t.restore_ms),
                ]
            })
            .collect();
        table(
            &mut out,
            ["NAME", "KIND", "PID", "STATE", "DUMP", "RESTORE"],
            &rows,
        );
        for t in j.targets.iter().filter(|t| !t.pre_dump.is_empty()) {
            let _ = writeln!(
                out,
                "  {} pre-dump: {}",
                t.name,
                nvwa_core::pre_dump::describe(&t.pre_dump)
            );
        }
    }

    let _ = writeln!(out, "\ntimeline:");
    let start = j.timeline.first().map(|s| s.wall_ms).unwrap_or(0);
    if let Some(first) = j.timeline.first() {
        let _ = writeln!(out, "  started {}", local(first.wall_ms));
    }
    let durations = j.phase_durations();
    let rows: Vec<[String; 3]> = j
        .timeline
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let lasted = match durations.get(i) {
                Some((_, d)) => format!("{d} ms"),
                None if s.phase.in_progress() => "ongoing".into(),
                None => "-".into(),
            };
            [
                s.phase.to_string(),
                format!("+{} ms", s.wall_ms.saturating_sub(start)),
                lasted,
            ]
        })
        .collect();
    table(&mut out, ["PHASE", "AT", "LASTED"], &rows);

    let downtime = match j.downtime_ms() {
        Some(d) => format!("{d} ms"),
        None if j.stamp_of(Phase::Frozen).is_none() => "n/a (nothing was frozen)".into(),
        None => "n/a (not every target is running again)".into(),
    };
    let _ = writeln!(out, "\ndowntime: {downtime}");
    out
}

fn table<const N: usize>(out: &mut String, header: [&str; N], rows: &[[String; N]]) {
    let mut width = header.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| {
        let mut l = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                let _ = write!(l, " {c}");
            } else {
                let _ = write!(l, " {c:<w$}", w = width[i]);
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// `2025-03-01 12:00:00.123 UTC` for milliseconds since the epoch.
/// `wall_ms` in the machine's local time zone, with its offset (`2026-11-29 20:01:02.345 +0100`),
/// falling back to UTC when the zone cannot be read.
pub fn local(wall_ms: u64) -> String {
    let secs = (wall_ms / 1000) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which lives for the whole call.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&secs, &mut tm).is_null() {
            return utc(wall_ms);
        }
        tm
    };
    let off = tm.tm_gmtoff / 60;
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} {}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        wall_ms % 1000,
        if off < 0 { '-' } else { '+' },
        off.abs() / 60,
        off.abs() % 60
    )
}

pub fn utc(wall_ms: u64) -> String {
    let secs = wall_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        wall_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvwa_core::journal::{Stamp, Target};

    #[test]
    fn progress_lines() {
        assert_eq!(
            progress(&Progress::Phase {
                phase: Phase::KernelLoaded
            }),
            "phase kernel_loaded"
        );
        assert_eq!(
            progress(&Progress::Target {
                target: "1234".into(),
                pid: 1234,
                state: "dumped".into(),
                detail: Some("40 MiB in 310 ms".into())
            }),
            "1234 (pid) dumped: 40 MiB in 310 ms"
        );
        assert_eq!(
            progress(&Progress::Target {
                target: "redis".into(),
                pid: 99,
                state: "dumping".into(),
                detail: None
            }),
            "redis (pid 99) dumping"
        );
        assert_eq!(elapsed_prefix(Duration::from_millis(412)), "[  0.412s]");
        assert_eq!(elapsed_prefix(Duration::from_millis(123_456)), "[123.456s]");
    }

    #[test]
    fn local_times_carry_their_offset() {
        let t = local(1_709_294_405_000);
        assert!(t.starts_with("2024-03-0"), "{t}");
        assert_eq!(t.len(), "2024-03-01 12:00:05.000 +0000".len(), "{t}");
        let sign = t.as_bytes()[24];
        assert!(sign == b'+' || sign == b'-', "{t}");
        assert!(t[25..].bytes().all(|b| b.is_ascii_digit()), "{t}");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(utc(951_782_400_123), "2000-02-29 00:00:00.123 UTC");
        assert_eq!(utc(1_709_294_405_000), "2024-03-01 12:00:05.000 UTC");
    }

    #[test]
    fn status_report() {
        let stamp = |phase, wall_ms| Stamp {
            phase,
            wall_ms,
            mono_ms: 0,
            boot_id: String::new(),
        };
        let j = Journal {
            from_kernel: "6.1.0".into(),
            to_kernel: "6.6.0".into(),
            phase: Phase::Restored,
            targets: vec![Target {
                state: TargetState::Restored,
                dump_ms: Some(310),
                restore_ms: Some(205),
                running_again_wall_ms: Some(10_000 + 4_500),
                ..Target::pending("redis", TargetKind::Service, 4321)
            }],
            timeline: vec![
                stamp(Phase::Planned, 10_000),
                stamp(Phase::KernelLoaded, 10_100),
                stamp(Phase::Frozen, 10_300),
                stamp(Phase::Restored, 14_500),
            ],
            error: None,
        };
        let s = status(&j);
        for want in [
            "6.1.0 -> 6.6.0",
            "phase:  restored",
            "redis",
            "service",
            "4321",
            "310 ms",
            "205 ms",
            "kernel_loaded",
            "+300 ms",
            "downtime: 4200 ms",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
    }
}
