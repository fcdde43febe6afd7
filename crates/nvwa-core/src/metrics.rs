//! The last update for monitoring: a Prometheus textfile (node_exporter's textfile collector
//! reads `*.prom` files from a directory) and a one-line summary for `systemctl status nvwa`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use crate::journal::{Journal, Phase};

/// One line for systemd's STATUS= (shown by `systemctl status nvwa`).
pub fn summary(j: &Journal) -> String {
    let downtime = j
        .downtime_ms()
        .map(|d| format!(", downtime {:.1} s", d as f64 / 1000.0))
        .unwrap_or_default();
    format!(
        "last update {} -> {}: {}{downtime}",
        j.from_kernel, j.to_kernel, j.phase
    )
}

/// A label value: backslash, quote and newline escaped, as the exposition format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn seconds(ms: u64) -> String {
    format!("{:.3}", ms as f64 / 1000.0)
}

/// The textfile for the last update, or for none.
pub fn render(j: Option<&Journal>) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, lines: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in lines {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let Some(j) = j else {
        metric(
            "nvwa_updates_recorded",
            "Whether a journal of an update exists.",
            &[(String::new(), "0".into())],
        );
        return out;
    };
    metric(
        "nvwa_updates_recorded",
        "Whether a journal of an update exists.",
        &[(String::new(), "1".into())],
    );
    metric(
        "nvwa_last_update_info",
        "The last update: its kernels and its phase (restored, rolled_back, abandoned, restore_failed, or one still in progress).",
        &[(
            format!(
                "{{from=\"{}\",to=\"{}\",phase=\"{}\"}}",
                label(&j.from_kernel),
                label(&j.to_kernel),
                j.phase
            ),
            "1".into(),
        )],
    );
    let success = match j.phase {
        Phase::Restored => "1",
        _ if j.phase.in_progress() => "NaN",
        _ => "0",
    };
    metric(
        "nvwa_last_update_success",
        "1 when the last update restored every target on the new kernel, 0 when it did not, NaN while it runs.",
        &[(String::new(), success.into())],
    );
    if let Some(last) = j.timeline.last() {
        metric(
            "nvwa_last_update_timestamp_seconds",
            "When the last update entered its current phase (Unix time).",
            &[(String::new(), seconds(last.wall_ms))],
        );
    }
    if let Some(d) = j.downtime_ms() {
        metric(
            "nvwa_last_update_downtime_seconds",
            "From the first target frozen to the last one running again.",
            &[(String::new(), seconds(d))],
        );
    }
    let per_target = |f: fn(&crate::journal::Target) -> Option<u64>| -> Vec<(String, String)> {
        j.targets
            .iter()
            .filter_map(|t| {
                f(t).map(|ms| (format!("{{target=\"{}\"}}", label(&t.name)), seconds(ms)))
            })
            .collect()
    };
    metric(
        "nvwa_target_dump_seconds",
        "How long criu took to checkpoint each target in the last update.",
        &per_target(|t| t.dump_ms),
    );
    metric(
        "nvwa_target_restore_seconds",
        "How long criu took to restore each target in the last update.",
        &per_target(|t| t.restore_ms),
    );
    out
}

/// Replaces `path` atomically (a temporary file in the same directory, then a rename), so the
/// collector never reads half a file.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(text.as_bytes())?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)
}

/// A new file `.nvwa-metrics.<pid>` in `dir`, created exclusively (never through a link).
fn tempfile_in(dir: &Path) -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join(format!(".nvwa-metrics.{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&p)?;
    Ok((p, f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Target, TargetKind, TargetState};

    const BOOT: &str = "0f5e1a8c-boot-one";

    fn restored() -> Journal {
        let t = Target {
            tree_ids: vec![1008],
            rss_bytes: 1,
            state: TargetState::Restored,
            dump_ms: Some(2618),
            restore_ms: Some(4066),
            ..Target::pending("1008", TargetKind::Pid, 1008)
        };
        let mut j = Journal::new("6.1", "6.12", vec![t], BOOT);
        j.advance_all(&Phase::path_to(Phase::Restored), BOOT)
            .unwrap();
        let frozen = j.stamp_of(Phase::Frozen).unwrap().wall_ms;
        j.targets[0].running_again_wall_ms = Some(frozen + 11_100);
        j
    }

    #[test]
    fn the_textfile_has_the_phase_result_downtime_and_per_target_times() {
        let text = render(Some(&restored()));
        for want in [
            "nvwa_last_update_info{from=\"6.1\",to=\"6.12\",phase=\"restored\"} 1",
            "nvwa_last_update_success 1",
            "nvwa_last_update_downtime_seconds 11.100",
            "nvwa_target_dump_seconds{target=\"1008\"} 2.618",
            "nvwa_target_restore_seconds{target=\"1008\"} 4.066",
            "# TYPE nvwa_last_update_success gauge",
        ] {
            assert!(text.contains(want), "missing {want}:\n{text}");
        }
        assert!(render(None).contains("nvwa_updates_recorded 0"));
        assert_eq!(
            summary(&restored()),
            "last update 6.1 -> 6.12: restored, downtime 11.1 s"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nvwa.prom");
        write(&path, "one\n").unwrap();
        write(&path, "two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporaries left"
        );
    }
}
