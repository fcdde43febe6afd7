//! Recognising a guest kernel that died while booting, before /init ran.
//!
//! Such a death says nothing about nvwa: one full lab run failed because the kexec'd 6.12 kernel
//! hit `Oops: int3` in `sched_clock_cpu` 2.8 s into its boot, during kernel text patching under
//! multi-threaded TCG (an emulator artefact). The lab runs its guests in a way that avoids that
//! one (see `vm::TcgThreads`); as a second guard, a failed scenario whose console shows such an
//! early oops is run once more, and the report says so.

use crate::vm::{Line, Stamped};

/// Console lines that mean the kernel oopsed, hit a BUG or panicked.
const MARKERS: &[&str] = &["Oops:", "Kernel panic", "BUG:", "kernel BUG at"];

/// The kernel's own timestamp of a console line (`[    2.812345] ...`), in milliseconds since
/// that kernel started.
fn kernel_ms(text: &str) -> Option<u64> {
    let rest = text.trim_start().strip_prefix('[')?;
    let (secs, _) = rest.split_once(']')?;
    let secs: f64 = secs.trim().parse().ok()?;
    (secs >= 0.0).then_some((secs * 1000.0) as u64)
}

fn is_init(l: &Stamped) -> bool {
    matches!(&l.line, Line::Event(v) if v["event"] == "init")
}

/// The first console line showing a kernel oops, BUG or panic that happened during a boot,
/// before that boot's /init reported in (the `init` event of init.sh).
///
/// A boot is told apart from the one before it by the kernel's clock: a kernel that printed a
/// line `T` ms after it started began, on the host's clock, no later than `T` ms before the line
/// arrived, so an `init` event in that window is this boot's. TCG keeps the guest's clock on the
/// host's. A line without a kernel timestamp counts as early only when nothing at all followed
/// it: the guest died of it.
pub fn early_oops(lines: &[Stamped]) -> Option<String> {
    lines.iter().enumerate().find_map(|(i, l)| {
        let Line::Console(text) = &l.line else {
            return None;
        };
        if !MARKERS.iter().any(|m| text.contains(m)) {
            return None;
        }
        let early = match kernel_ms(text) {
            Some(up) => {
                let boot_start = l.at_ms.saturating_sub(up);
                !lines[..i]
                    .iter()
                    .any(|p| p.at_ms >= boot_start && is_init(p))
            }
            None => !lines[i + 1..]
                .iter()
                .any(|n| matches!(n.line, Line::Event(_) | Line::Output { .. })),
        };
        early.then(|| text.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::classify;

    fn at(ms: u64, raw: &str) -> Stamped {
        Stamped {
            at_ms: ms,
            line: classify(raw),
        }
    }

    /// The console of a run in which the kexec'd kernel oopsed 2.8 s into its boot.
    fn kexec_then_oops() -> Vec<Stamped> {
        vec![
            at(6_000, r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#),
            at(
                6_100,
                r#"NVWA-LAB {"event":"boot","stage":"old","kernel":"6.1"}"#,
            ),
            at(20_000, r#"NVWA-LAB {"event":"update","index":1}"#),
            at(25_000, "NVWA-LAB-OUT update1: phase committed"),
            at(
                28_300,
                "[    2.812345] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI",
            ),
            at(
                28_310,
                "[    2.812400] RIP: 0010:sched_clock_cpu+0x10/0x1c0",
            ),
            at(
                28_400,
                "[    2.900000] Kernel panic - not syncing: Attempted to kill the idle task!",
            ),
        ]
    }

    #[test]
    fn an_oops_before_init_of_the_kexecd_kernel_is_early() {
        let got = early_oops(&kexec_then_oops()).expect("an early oops");
        assert!(got.contains("Oops: int3"), "{got}");
    }

    #[test]
    fn an_oops_after_init_is_not_early() {
        // The old kernel oopses 30 s after it booted, long after its /init ran.
        let lines = vec![
            at(6_000, r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#),
            at(
                36_000,
                "[   30.000000] BUG: kernel NULL pointer dereference, address: 0",
            ),
        ];
        assert_eq!(early_oops(&lines), None);
        // The new kernel oopses after its /init reported in.
        let mut lines = kexec_then_oops();
        lines.retain(|l| matches!(l.line, Line::Event(_) | Line::Output { .. }));
        lines.push(at(40_000, r#"NVWA-LAB {"event":"init","kernel":"6.12"}"#));
        lines.push(at(41_000, "[   14.000000] Oops: general protection fault"));
        assert_eq!(early_oops(&lines), None);
    }

    #[test]
    fn a_clean_console_has_no_oops() {
        let lines = vec![
            at(6_000, r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#),
            at(30_000, "[   10.797280] reboot: Power down"),
        ];
        assert_eq!(early_oops(&lines), None);
    }

    #[test]
    fn without_a_kernel_timestamp_only_a_fatal_oops_is_early() {
        let fatal = vec![
            at(
                1_000,
                "Kernel panic - not syncing: VFS: Unable to mount root fs",
            ),
            at(1_001, "---[ end Kernel panic ]---"),
        ];
        assert!(early_oops(&fatal).is_some());
        let survived = vec![
            at(1_000, "BUG: something odd"),
            at(6_000, r#"NVWA-LAB {"event":"init","kernel":"6.1"}"#),
        ];
        assert_eq!(early_oops(&survived), None);
    }

    #[test]
    fn kernel_timestamps_are_read() {
        assert_eq!(kernel_ms("[    2.812345] Oops"), Some(2812));
        assert_eq!(kernel_ms("Oops"), None);
        assert_eq!(kernel_ms("[x] Oops"), None);
    }
}
