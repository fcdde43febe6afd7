//! `nvwa-lab bench`: where the downtime of a live kernel upgrade goes, next to its floors.
//!
//! Each run is a busybox-guest scenario made here: the workloads of a case start on the old
//! kernel, `nvwa update` moves them to the new one, and there, once they are verified, criu alone
//! dumps and restores the same processes (the restore floor). After a case's first strategy,
//! the lab boots the same old kernel and images once more, and the guest at once kexecs
//! (kexec-tools, `kexec_file_load` as nvwa uses) into the update's kernel and initramfs with
//! nothing to save (the kexec floor, the same for every strategy of the case).
//!
//! Every figure is on the host's clock. Serial lines are stamped by the host as they arrive
//! ([`crate::vm::Stamped`]); a guest line that carries the guest's uptime places that kernel's
//! clock zero on the host clock, which maps the journal's per-phase CLOCK_MONOTONIC stamps and
//! splits the kexec into the handoff (the old kernel's last act to the new kernel's clock zero:
//! reboot, purgatory, decompression, early setup) and the boot (clock zero to /init).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::runner::Lab;
use crate::scenario::Scenario;
use crate::vm::{self, Line, Stamped};

/// How nvwa moves the targets; the bench compares them side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The original's sequence: load the kernel, dump every target, kexec, restore after boot.
    Baseline,
    /// `pre_dump: true`: criu copies the targets' memory in passes while they run; the freeze
    /// writes only what changed since the last pass.
    PreDump,
    /// `lazy_restore: true`: the targets run again before their memory is back; a criu
    /// lazy-pages daemon fills it in from the images.
    Lazy,
    /// Both (nvwa's default): a small freeze and a restore that leaves the pre-dumped pages to
    /// the daemon too.
    PreDumpLazy,
}

impl Strategy {
    pub const ALL: &'static [Strategy] = &[
        Strategy::Baseline,
        Strategy::PreDump,
        Strategy::Lazy,
        Strategy::PreDumpLazy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Baseline => "baseline",
            Strategy::PreDump => "pre-dump",
            Strategy::Lazy => "lazy",
            Strategy::PreDumpLazy => "pre-dump+lazy",
        }
    }

    pub fn parse(s: &str) -> Result<Strategy> {
        Strategy::ALL
            .iter()
            .copied()
            .find(|x| x.name() == s)
            .with_context(|| {
                format!(
                    "no strategy {s:?}; known: {}",
                    Strategy::ALL
                        .iter()
                        .map(|x| x.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// What `nvwa-lab bench` compares when no strategy is given: the original's sequence and
    /// nvwa's default (`pre_dump` and `lazy_restore` on).
    pub const DEFAULT: &'static [Strategy] = &[Strategy::Baseline, Strategy::PreDumpLazy];

    /// Lines for nvwa-restore.yaml: every key spelled out, so that a strategy means the same
    /// whatever nvwa's defaults are.
    fn config(self) -> &'static str {
        match self {
            Strategy::Baseline => "pre_dump: false\nlazy_restore: false\n",
            Strategy::PreDump => "pre_dump: true\nlazy_restore: false\n",
            Strategy::Lazy => "pre_dump: false\nlazy_restore: true\n",
            Strategy::PreDumpLazy => "pre_dump: true\nlazy_restore: true\n",
        }
    }
}

/// A workload shape: `procs` processes (each a target) of `mib` MiB resident each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Case {
    pub name: &'static str,
    pub procs: u32,
    pub mib: u32,
    /// Share of its pages each process rewrites per second.
    pub dirty_pct: u32,
    pub about: &'static str,
}

pub const CASES: &[Case] = &[
    Case {
        name: "64m",
        procs: 1,
        mib: 64,
        dirty_pct: 0,
        about: "one process, 64 MiB resident",
    },
    Case {
        name: "256m",
        procs: 1,
        mib: 256,
        dirty_pct: 0,
        about: "one process, 256 MiB resident",
    },
    Case {
        name: "1g",
        procs: 1,
        mib: 1024,
        dirty_pct: 0,
        about: "one process, 1 GiB resident",
    },
    Case {
        name: "dirty",
        procs: 1,
        mib: 1024,
        dirty_pct: 1,
        about: "one process, 1 GiB resident, rewriting 1 % of its pages per second",
    },
    Case {
        name: "procs16",
        procs: 16,
        mib: 4,
        dirty_pct: 0,
        about: "16 processes (16 targets) of 4 MiB each",
    },
];

impl Case {
    pub fn parse(s: &str) -> Result<Case> {
        CASES
            .iter()
            .copied()
            .find(|c| c.name == s)
            .with_context(|| {
                format!(
                    "no bench case {s:?}; known: {}",
                    CASES.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
                )
            })
    }

    /// Persistent memory for one set of images (nvwa's are deleted before the floor dumps its
    /// own) with room to spare: at least the lab's usual 768 MiB.
    pub fn pmem_mib(&self) -> u32 {
        let need = self.procs * self.mib * 5 / 4 + 256;
        need.div_ceil(128).max(6) * 128
    }

    /// The scenario of one run: its name says case and strategy (and so its run directory).
    pub fn scenario(&self, strategy: Strategy) -> Result<Scenario> {
        let name = format!("bench-{}-{}", self.name, strategy.name());
        let text = self.scenario_toml(strategy);
        Scenario::parse(
            &text,
            &crate::scenario::builtin_dir().join(format!("{name}.toml")),
        )
    }

    fn scenario_toml(&self, strategy: Strategy) -> String {
        let dirty = if self.dirty_pct > 0 {
            format!(" --dirty-pct {}", self.dirty_pct)
        } else {
            String::new()
        };
        format!(
            r#"description = "bench: {about}, strategy {strategy}"
timeout_s = {timeout}
pmem_mib = {pmem}
config = """
pids: [$PID_LIST]
{strategy_config}"""
setup = '''
pids=
n=0
while [ $n -lt {procs} ]; do
  n=$((n + 1))
  log=$LAB_STATE/w$n.log
  setsid nvwa-lab-workload run --log $log --threads 1 --buffer-mib {mib} --tick-ms 100{dirty} </dev/null >/dev/null 2>&1 &
  i=0
  until grep -q '^tick 2 ' $log 2>/dev/null; do sleep 0.2; i=$((i + 1)); [ $i -lt 3000 ]; done
  pids="$pids $(sed -n 's/^start pid \([0-9]*\) .*/\1/p' $log)"
done
lab_save PIDS "$pids"
lab_save PID_LIST "$(echo $pids | sed 's/ /, /g')"
echo "workloads: $pids"
# Where each log stands before the update: the pause is measured from there on.
for log in $LAB_STATE/w*.log; do wc -l < $log > $log.start; done
lab_now; echo "NVWA-LAB {{\"event\":\"bench\",\"step\":\"anchor\",\"uptime\":$LAB_NOW}}" >/dev/console
'''

[[files]]
guest = "/lab/bench"
content = ""

[[update]]
expect = "success"

[[check]]
name = "every workload kept its pid, memory and log offset"
run = '''
lab_now; echo "NVWA-LAB {{\"event\":\"bench\",\"step\":\"anchor\",\"uptime\":$LAB_NOW}}" >/dev/console
# The longest a workload stood still on the old kernel once the update began: the largest gap
# between two of its ticks there ("tick N pid P kernel K ms WALL"; the gap into the freeze
# ends on the new kernel and is not counted).
pause=0
for log in $LAB_STATE/w*.log; do
  g=$(awk -v from=$(cat $log.start) '$1 == "tick" {{ if (k == "") k = $6; if (NR > from && $6 == k && p != "" && $8 - p > m) m = $8 - p; if ($6 == k) p = $8 }} END {{ print m + 0 }}' $log)
  [ "$g" -le "$pause" ] || pause=$g
done
echo "NVWA-LAB {{\"event\":\"bench\",\"step\":\"pause\",\"ms\":$pause}}" >/dev/console
n=0
for p in $PIDS; do
  n=$((n + 1))
  nvwa-lab-workload verify --pid $p --log $LAB_STATE/w$n.log --threads 1 --kernel-changed
done
'''

[[check]]
name = "criu alone dumps and restores the same processes (the floor)"
run = '''
F=$LAB_STATE/floor
# nvwa's options (crates/nvwa-core/src/criu.rs), with its log level.
C="--tcp-established --ext-unix-sk --file-locks --shell-job --enable-external-masters --skip-in-flight -v4"
con() {{ echo "NVWA-LAB {{\"event\":\"bench\",\"step\":\"$1\"}}" >/dev/console; }}
each() {{ # runs "$1 PID" for every pid at once, as nvwa runs its targets; fails if one failed
  jobs=
  for p in $PIDS; do mkdir -p $F/img-$p; $1 $p & jobs="$jobs $!"; done
  rc=0
  for j in $jobs; do wait $j || rc=1; done
  [ $rc = 0 ] || {{ for p in $PIDS; do tail -n 5 $F/img-$p/$2; done; return 1; }}
}}
dump1() {{ criu dump -t $1 -D $F/img-$1 $C -o dump.log; }}
restore1() {{ criu restore -d -D $F/img-$1 --pidfile restored.pid --manage-cgroups=ignore $C -o restore.log; }}
con dump-start
each dump1 dump.log
con dump-done
# criu dump killed them: their pids must be free before the restore.
for p in $PIDS; do i=0; while [ -e /proc/$p ]; do sleep 0.05; i=$((i + 1)); [ $i -lt 600 ]; done; done
# As on the boot after a kexec, where nvwa's first criu run is: without criu's cache of what it
# probed of this kernel (on tmpfs, gone with the old boot), which criu probes again and saves.
rm -f /run/criu.kdat
con restore-start
# Parallel restores would each probe the kernel: with several, one criu run probes it first and
# the restores read its cache, as nvwa does (restore.rs), so that the floor is criu at its best.
[ {procs} = 1 ] || criu check --feature uffd-noncoop >/dev/null 2>&1 || true
each restore1 restore.log
con restore-done
for p in $PIDS; do kill -0 $p; done
rm -rf $F/img-*
echo "criu alone dumped and restored:$PIDS"
'''
"#,
            about = self.about,
            strategy = strategy.name(),
            strategy_config = strategy.config(),
            timeout = 600 + self.procs * self.mib / 2,
            pmem = self.pmem_mib(),
            procs = self.procs,
            mib = self.mib,
        )
    }
}

/// The measured phases, in the order of the table: (key, column title, meaning).
pub const PHASES: &[(&str, &str, &str)] = &[
    (
        "load_kernel",
        "load",
        "nvwa loads the new kernel (before anything is frozen)",
    ),
    (
        "pre_dump",
        "pre-dump",
        "criu's pre-dump passes while the targets run (kernel_loaded → frozen): not downtime",
    ),
    (
        "pause",
        "pause",
        "the longest a target stood still on the old kernel before its freeze (the largest gap between two of its ticks, 0.1 s apart when nothing stops it): criu's pre-dump passes stop it while they collect its pages",
    ),
    (
        "dump",
        "dump",
        "criu freezes each target and writes its images (frozen → dumped)",
    ),
    (
        "sync",
        "sync",
        "images made durable and the update committed (dumped → committed)",
    ),
    (
        "handoff",
        "handoff",
        "commit → the new kernel's clock starts: sync, reboot(KEXEC), purgatory, decompression, early setup",
    ),
    (
        "boot",
        "boot",
        "the new kernel's clock zero → /init (its uptime there)",
    ),
    (
        "nvwa_start",
        "nvwa start",
        "/init → the nvwa server starts restoring (modules, persistent memory, server start)",
    ),
    (
        "restore",
        "restore",
        "nvwa restores every target (booted → the last one running again)",
    ),
    (
        "memory_fill",
        "fill",
        "lazy_restore: the targets run while their memory comes in, until nvwa records the restore: not downtime",
    ),
    (
        "downtime",
        "downtime",
        "first target frozen → last target running again (the sum of dump … restore)",
    ),
    (
        "bare_kexec",
        "bare kexec",
        "floor: a fresh boot of the old kernel kexecs the update's kernel and initramfs, nothing to save: handoff + boot to /init",
    ),
    (
        "criu_restore",
        "criu restore",
        "floor: criu alone restoring the same processes (images dumped again on the new kernel), as criu's first run after a boot: it probes the kernel first (once, before restores in parallel, as nvwa does)",
    ),
    (
        "criu_dump",
        "criu dump",
        "criu alone dumping the same processes in full, all at once (on the new kernel, for the floor above): not a floor, since pre-dump makes nvwa's freeze shorter, but what of the overhead is criu's own dump when there are many small targets",
    ),
    (
        "overhead",
        "overhead",
        "downtime − bare kexec − criu restore: what nvwa's sequence adds",
    ),
];

/// Figures kept in the JSON besides the table's.
const EXTRA: &[&str] = &[
    "start_modules",
    "start_mount",
    "start_pre",
    "start_server",
    "bare_handoff",
    "bare_boot",
    "downtime_journal",
    "clock_check",
];

/// One run of one case with one strategy.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub case: &'static str,
    pub strategy: Strategy,
    pub repetition: u32,
    pub passed: bool,
    pub failures: Vec<String>,
    /// Milliseconds per phase key (see [`PHASES`]; `overhead` may be negative). Also
    /// `bare_handoff`, `bare_boot`, `downtime_journal` (nvwa's own figure, guest
    /// wall clocks, ±1 s) and `clock_check` (how far the new kernel's clock zero placed by two
    /// anchors seconds apart differs: the error of mapping guest stamps to the host clock).
    pub ms: BTreeMap<String, i64>,
    pub serial_log: PathBuf,
}

/// Reads a serial log back into stamped lines (see `vm::run`: `[   12.345] raw`).
pub fn read_serial_log(path: &Path) -> Result<Vec<Stamped>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the serial log {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let (secs, raw) = rest.split_once("] ")?;
            let secs: f64 = secs.trim().parse().ok()?;
            Some(Stamped {
                at_ms: (secs * 1000.0).round() as u64,
                line: vm::classify(raw),
            })
        })
        .collect())
}

fn uptime_ms(v: &serde_json::Value) -> Option<i64> {
    v["uptime"].as_f64().map(|s| (s * 1000.0).round() as i64)
}

/// The phases of one run, from the stamped lines of its update and of its bare kexec; the keys
/// it could not find are missing.
pub fn measure(lines: &[Stamped], bare_lines: &[Stamped]) -> BTreeMap<String, i64> {
    let events: Vec<(i64, &serde_json::Value)> = lines
        .iter()
        .filter_map(|l| match &l.line {
            Line::Event(v) => Some((l.at_ms as i64, v)),
            _ => None,
        })
        .collect();
    let bench = |step: &str| {
        events
            .iter()
            .filter(|(_, v)| v["event"] == "bench" && v["step"] == step)
            .map(|(at, v)| (*at, *v))
            .collect::<Vec<_>>()
    };
    let inits: Vec<(i64, &serde_json::Value)> = events
        .iter()
        .filter(|(_, v)| v["event"] == "init")
        .copied()
        .collect();
    let zero = |(at, v): (i64, &serde_json::Value)| uptime_ms(v).map(|u| at - u);
    let mut ms = BTreeMap::new();
    let mut put = |k: &str, v: Option<i64>| {
        if let Some(v) = v {
            ms.insert(k.to_string(), v);
        }
    };

    // The old kernel's clock zero: the anchor at the end of the setup, just before the update.
    let zero_old = bench("anchor").first().copied().and_then(zero);
    let zero_new = inits.get(1).copied().and_then(zero);
    let init_new = inits.get(1).map(|(at, _)| *at);
    let journal = events
        .iter()
        .find(|(_, v)| v["event"] == "journal")
        .map(|(_, v)| &v["journal"]);
    let stamp = |phase: &str| -> Option<(i64, &str)> {
        let t = journal?["timeline"]
            .as_array()?
            .iter()
            .find(|t| t["phase"] == phase)?;
        Some((t["mono_ms"].as_i64()?, t["boot_id"].as_str()?))
    };
    let old_boot = stamp("planned").map(|(_, b)| b);
    // A journal stamp on the host clock, through the clock zero of the boot it was taken on.
    let host = |phase: &str| -> Option<i64> {
        let (mono, boot) = stamp(phase)?;
        Some(
            mono + if Some(boot) == old_boot {
                zero_old?
            } else {
                zero_new?
            },
        )
    };
    let span = |a: Option<i64>, b: Option<i64>| Some(b? - a?);
    put("load_kernel", span(host("planned"), host("kernel_loaded")));
    put("pre_dump", span(host("kernel_loaded"), host("frozen")));
    put("dump", span(host("frozen"), host("dumped")));
    put("sync", span(host("dumped"), host("committed")));
    put("handoff", span(host("committed"), zero_new));
    put("boot", span(zero_new, init_new));
    let nvwa_start = span(init_new, host("booted"));
    put("nvwa_start", nvwa_start);
    // Where "nvwa start" went: the new kernel's init stamps the end of each step of its boot on
    // that kernel's clock (`init-step`); what the steps leave is the scenario's setup and the
    // server's start until `booted`.
    let init_new_uptime = inits.get(1).and_then(|(_, v)| uptime_ms(v));
    let step = |name: &str| -> Option<i64> {
        let from = init_new?;
        events
            .iter()
            .find(|(at, v)| *at >= from && v["event"] == "init-step" && v["step"] == name)
            .and_then(|(_, v)| uptime_ms(v))
    };
    let (modules, mount, pre) = (step("modules"), step("mount"), step("pre"));
    put("start_modules", span(init_new_uptime, modules));
    put("start_mount", span(modules, mount));
    put("start_pre", span(mount, pre));
    put("start_server", span(span(init_new_uptime, pre), nvwa_start));
    // The last target running again: the journal records it on the wall clock, placed here
    // through the `booted` stamp (both taken on the new boot). With lazy_restore it comes
    // before `restored`, which waits for the memory to be complete.
    let wall = |phase: &str| -> Option<i64> {
        journal?["timeline"]
            .as_array()?
            .iter()
            .find(|t| t["phase"] == phase)?["wall_ms"]
            .as_i64()
    };
    let last_running = journal
        .and_then(|j| j["targets"].as_array())
        .and_then(|ts| {
            ts.iter()
                .filter_map(|t| t["running_again_wall_ms"].as_i64())
                .max()
        });
    let running_again = match (host("booted"), wall("booted"), last_running) {
        (Some(h), Some(w), Some(r)) => Some(h + (r - w)),
        _ => host("restored"),
    };
    put("restore", span(host("booted"), running_again));
    put("memory_fill", span(running_again, host("restored")));
    let downtime = span(host("frozen"), running_again);
    put("downtime", downtime);
    put(
        "downtime_journal",
        journal.and_then(|j| j["downtime_ms"].as_i64()),
    );
    // The new kernel's zero again, from the anchor of the first check: both should agree.
    let zero_new_later = bench("anchor").get(1).copied().and_then(zero);
    put("clock_check", span(zero_new, zero_new_later));

    put(
        "pause",
        bench("pause").first().and_then(|(_, v)| v["ms"].as_i64()),
    );
    let at = |step: &str| bench(step).first().map(|(at, _)| *at);
    put("criu_dump", span(at("dump-start"), at("dump-done")));
    let criu_restore = span(at("restore-start"), at("restore-done"));
    put("criu_restore", criu_restore);
    // The bare kexec's boot is the init after its kexec step.
    let bare_events: Vec<(i64, &serde_json::Value)> = bare_lines
        .iter()
        .filter_map(|l| match &l.line {
            Line::Event(v) => Some((l.at_ms as i64, v)),
            _ => None,
        })
        .collect();
    let kexec = bare_events
        .iter()
        .find(|(_, v)| v["event"] == "bench" && v["step"] == "kexec")
        .map(|(at, _)| *at);
    let floor = kexec.and_then(|k| {
        bare_events
            .iter()
            .copied()
            .find(|(at, v)| *at >= k && v["event"] == "init")
    });
    let zero_floor = floor.and_then(zero);
    put("bare_handoff", span(kexec, zero_floor));
    put("bare_boot", span(zero_floor, floor.map(|(at, _)| at)));
    let bare = span(kexec, floor.map(|(at, _)| at));
    put("bare_kexec", bare);
    put(
        "overhead",
        downtime
            .zip(bare)
            .zip(criu_restore)
            .map(|((d, b), c)| d - b - c),
    );
    ms
}

/// The table's phases a run lacks.
pub fn missing(ms: &BTreeMap<String, i64>) -> Vec<&'static str> {
    PHASES
        .iter()
        .map(|(k, _, _)| *k)
        .chain(EXTRA.iter().copied())
        .filter(|k| !ms.contains_key(*k))
        .collect()
}

/// Median, min and max of some runs' figure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: i64,
    pub max: i64,
    pub n: usize,
}

pub fn stat(values: &[i64]) -> Option<Stat> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// One row of the summary: a case with a strategy, over its repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub case: &'static str,
    pub strategy: Strategy,
    /// Per figure (milliseconds), over the runs that passed.
    pub ms: BTreeMap<String, Stat>,
    /// Median overhead as a share of the median downtime, in %.
    pub overhead_pct: Option<f64>,
}

pub fn summarize(runs: &[Run]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for r in runs {
        if rows
            .iter()
            .any(|x| x.case == r.case && x.strategy == r.strategy)
        {
            continue;
        }
        let same: Vec<&Run> = runs
            .iter()
            .filter(|x| x.case == r.case && x.strategy == r.strategy && x.passed)
            .collect();
        let mut ms = BTreeMap::new();
        for k in PHASES
            .iter()
            .map(|(k, _, _)| *k)
            .chain(EXTRA.iter().copied())
        {
            let v: Vec<i64> = same.iter().filter_map(|x| x.ms.get(k).copied()).collect();
            if let Some(s) = stat(&v) {
                ms.insert(k.to_string(), s);
            }
        }
        let overhead_pct = match (ms.get("overhead"), ms.get("downtime")) {
            (Some(o), Some(d)) if d.median > 0.0 => Some(100.0 * o.median / d.median),
            _ => None,
        };
        rows.push(Row {
            case: r.case,
            strategy: r.strategy,
            ms,
            overhead_pct,
        });
    }
    rows
}

/// A ratio of two medians of the same run, as the issue's targets are stated.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ratio {
    /// What is divided by what, e.g. "downtime 1g lazy / 1g baseline".
    pub what: String,
    pub value: f64,
}

/// The ratios the downtime targets are about, from the medians of one bench: per case, each
/// strategy's downtime and freeze (`dump`) against `baseline`'s; per strategy, the downtime of
/// each larger case against `64m`'s (does the downtime grow with memory?).
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let med = |r: &Row, k: &str| r.ms.get(k).map(|s| s.median).filter(|m| *m > 0.0);
    let find = |case: &str, strategy: Strategy| {
        rows.iter()
            .find(|r| r.case == case && r.strategy == strategy)
    };
    let mut out = Vec::new();
    // `k` of `r` over `k` of `by`, named "{k} {case} {strategy} / {by_name}".
    let mut push = |k: &str, r: &Row, by: &Row, by_name: String| {
        if let (Some(a), Some(b)) = (med(r, k), med(by, k)) {
            out.push(Ratio {
                what: format!("{k} {} {} / {by_name}", r.case, r.strategy.name()),
                value: a / b,
            });
        }
    };
    for r in rows.iter().filter(|r| r.strategy != Strategy::Baseline) {
        if let Some(base) = find(r.case, Strategy::Baseline) {
            for k in ["downtime", "dump"] {
                push(k, r, base, format!("{} baseline", r.case));
            }
        }
    }
    for r in rows.iter().filter(|r| r.case != "64m") {
        if let Some(small) = find("64m", r.strategy) {
            push("downtime", r, small, format!("64m {}", r.strategy.name()));
        }
    }
    out
}

/// The ratios as lines of text, or nothing when the bench had no pair to compare.
pub fn render_ratios(ratios: &[Ratio]) -> String {
    if ratios.is_empty() {
        return String::new();
    }
    let w = ratios.iter().map(|r| r.what.len()).max().unwrap_or(0);
    let mut s = String::from("\nratios of medians, measured side by side in this run:\n");
    for r in ratios {
        s.push_str(&format!("  {:<w$}  {:.2}×\n", r.what, r.value));
    }
    s
}

fn secs(ms: f64) -> String {
    format!("{:.2}", ms / 1000.0)
}

/// The table: medians in seconds, and with several repetitions a second table of min–max.
pub fn render_table(rows: &[Row]) -> String {
    let head: Vec<&str> = ["case", "strategy"]
        .into_iter()
        .chain(PHASES.iter().map(|(_, t, _)| *t))
        .chain(["overhead %"])
        .collect();
    let cells = |f: &dyn Fn(&Stat) -> String| -> Vec<Vec<String>> {
        rows.iter()
            .map(|r| {
                let mut c = vec![r.case.to_string(), r.strategy.name().to_string()];
                for (k, _, _) in PHASES {
                    c.push(r.ms.get(*k).map_or("-".into(), f));
                }
                c.push(r.overhead_pct.map_or("-".into(), |p| format!("{p:.0}")));
                c
            })
            .collect()
    };
    let grid = |body: Vec<Vec<String>>| {
        let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
        for row in &body {
            for (i, c) in row.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |row: Vec<String>| {
            row.iter()
                .enumerate()
                .map(|(i, c)| {
                    if i < 2 {
                        format!("{c:<width$}", width = w[i])
                    } else {
                        format!("{c:>width$}", width = w[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let mut s = line(head.iter().map(|h| h.to_string()).collect());
        s.push('\n');
        for row in body {
            s.push_str(&line(row));
            s.push('\n');
        }
        s
    };
    let n = rows
        .iter()
        .filter_map(|r| r.ms.get("downtime").map(|s| s.n))
        .max()
        .unwrap_or(0);
    let mut s =
        format!("seconds, median of {n} run(s) (host clock; overhead % = overhead / downtime):\n");
    s.push_str(&grid(cells(&|st| secs(st.median))));
    if n > 1 {
        s.push_str("\nmin–max:\n");
        s.push_str(&grid(cells(&|st| {
            format!("{}–{}", secs(st.min as f64), secs(st.max as f64))
        })));
    }
    s
}

/// Colours of the stacked phases in the plot.
const STACK: &[(&str, &str)] = &[
    ("dump", "#d62728"),
    ("sync", "#ff7f0e"),
    ("handoff", "#8c564b"),
    ("boot", "#9467bd"),
    ("nvwa_start", "#1f77b4"),
    ("restore", "#2ca02c"),
];
const FLOORS: &[(&str, &str)] = &[("bare_kexec", "#7f7f7f"), ("criu_restore", "#bcbd22")];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart: per case and strategy, the downtime's phases stacked (medians), and
/// under it the floors stacked (bare kexec + criu restore alone): the gap between the two bars
/// is the overhead.
pub fn render_svg(rows: &[Row], note: &str) -> String {
    let med = |r: &Row, k: &str| r.ms.get(k).map_or(0.0, |s| s.median);
    let total = |r: &Row, keys: &[(&str, &str)]| keys.iter().map(|(k, _)| med(r, k)).sum::<f64>();
    let max_ms = rows
        .iter()
        .map(|r| total(r, STACK).max(total(r, FLOORS)))
        .fold(1000.0, f64::max);
    let (left, width, row_h, top) = (170.0, 640.0, 46.0, 70.0);
    let height = top + row_h * rows.len() as f64 + 60.0;
    let x = |ms: f64| left + width * ms / max_ms;
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="14" font-weight="bold">nvwa downtime by phase (upper bar) and its floors (lower bar), medians</text>
<text x="10" y="38" fill="#555">{note}</text>
"##,
        w = left + width + 90.0,
        note = esc(note)
    );
    let mut lx = 10.0;
    for (k, c) in STACK.iter().chain(FLOORS) {
        let title = PHASES
            .iter()
            .find(|(p, _, _)| p == k)
            .map_or(*k, |(_, t, _)| *t);
        s.push_str(&format!(
            "<rect x=\"{lx}\" y=\"48\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{}\" y=\"57\">{}</text>\n",
            lx + 13.0,
            esc(title)
        ));
        lx += 20.0 + 7.0 * title.len() as f64;
    }
    for (i, r) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        s.push_str(&format!(
            "<text x=\"10\" y=\"{}\">{} · {}</text>\n",
            y + 18.0,
            esc(r.case),
            r.strategy.name()
        ));
        for (bar, keys, h, dy) in [(0, STACK, 18.0, 4.0), (1, FLOORS, 10.0, 25.0)] {
            let mut at = 0.0;
            for (k, c) in keys {
                let d = med(r, k);
                s.push_str(&format!(
                    "<rect x=\"{:.1}\" y=\"{}\" width=\"{:.1}\" height=\"{h}\" fill=\"{c}\"><title>{k}: {} s</title></rect>\n",
                    x(at),
                    y + dy,
                    x(at + d) - x(at),
                    secs(d)
                ));
                at += d;
            }
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{}\" fill=\"#333\">{} s{}</text>\n",
                x(at) + 5.0,
                y + dy + h - 2.0,
                secs(at),
                if bar == 0 { "" } else { " floor" }
            ));
        }
    }
    let axis_y = top + row_h * rows.len() as f64 + 10.0;
    s.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"black\"/>\n",
        left + width
    ));
    let step = [1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 30000.0, 60000.0]
        .into_iter()
        .find(|s| max_ms / s <= 10.0)
        .unwrap_or(120000.0);
    let mut t = 0.0;
    while t <= max_ms {
        s.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{axis_y}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"black\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{3} s</text>\n",
            x(t),
            axis_y + 5.0,
            axis_y + 18.0,
            t / 1000.0
        ));
        t += step;
    }
    s.push_str("</svg>\n");
    s
}

pub struct Options {
    pub cases: Vec<Case>,
    pub strategies: Vec<Strategy>,
    pub repeat: u32,
}

/// What a bench produced.
#[derive(Debug, Serialize)]
pub struct Report {
    pub note: String,
    pub cases: Vec<Case>,
    pub strategies: Vec<Strategy>,
    pub repeat: u32,
    pub runs: Vec<Run>,
    pub summary: Vec<Row>,
    /// The downtime targets' ratios, from `summary` ([`ratios`]).
    pub ratios: Vec<Ratio>,
    /// What each figure means (key → meaning).
    pub phases: BTreeMap<String, String>,
}

impl Report {
    /// Whether every run passed with every phase measured.
    pub fn complete(&self) -> bool {
        self.runs.iter().all(|r| r.passed)
    }
}

/// Runs every case with every strategy `repeat` times (repetitions outermost, so that the host's
/// noise spreads over all of them). `progress` hears about each run as it ends.
pub fn run(lab: &Lab, o: &Options, progress: &mut dyn FnMut(&Run)) -> Result<Report> {
    if o.cases.is_empty() || o.strategies.is_empty() || o.repeat == 0 {
        bail!("the bench needs at least one case, one strategy and one repetition");
    }
    let mut runs = Vec::new();
    for rep in 1..=o.repeat {
        for case in &o.cases {
            // The bare kexec depends on the case's machine (memory, kernels, initramfs), not on
            // the strategy: one per case and repetition serves every strategy's row.
            let mut bare_kexec = None;
            for &strategy in &o.strategies {
                let s = case.scenario(strategy)?;
                let r = lab
                    .run(&s, &mut |_| {})
                    .with_context(|| format!("bench run {}", s.name))?;
                let lines = read_serial_log(&r.serial_log)?;
                if bare_kexec.is_none() {
                    bare_kexec = Some(
                        lab.boot_again(&s, "nvwa_lab.boot=bare")
                            .with_context(|| format!("the bare kexec of bench run {}", s.name))?,
                    );
                }
                let Some((bare, bare_log)) = &bare_kexec else {
                    unreachable!("measured just above")
                };
                let ms = measure(&lines, &bare.lines);
                let mut failures = r.failures.clone();
                if bare.timed_out {
                    failures.push(format!(
                        "the bare kexec did not finish within {} s (see {})",
                        s.timeout_s,
                        bare_log.display()
                    ));
                }
                let lacking = missing(&ms);
                if !lacking.is_empty() {
                    failures.push(format!(
                        "not measured: {} (see {})",
                        lacking.join(", "),
                        r.serial_log.display()
                    ));
                }
                let run = Run {
                    case: case.name,
                    strategy,
                    repetition: rep,
                    passed: failures.is_empty(),
                    failures,
                    ms,
                    serial_log: r.serial_log.clone(),
                };
                progress(&run);
                runs.push(run);
            }
        }
    }
    let summary = summarize(&runs);
    Ok(Report {
        note: format!(
            "QEMU TCG (single-threaded, {} MiB translation cache), 2 vCPUs; host with {} CPU(s), possibly shared; {} repetition(s)",
            vm::TB_CACHE_MIB,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            o.repeat
        ),
        cases: o.cases.clone(),
        strategies: o.strategies.clone(),
        repeat: o.repeat,
        runs,
        ratios: ratios(&summary),
        summary,
        phases: PHASES
            .iter()
            .map(|(k, _, m)| (k.to_string(), m.to_string()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(raw: &[(u64, &str)]) -> Vec<Stamped> {
        raw.iter()
            .map(|(at, r)| Stamped {
                at_ms: *at,
                line: vm::classify(r),
            })
            .collect()
    }

    /// A whole run as the guest reports it, in host milliseconds. The old kernel's zero is at
    /// host 1000, the new one's at 30000.
    fn a_run() -> Vec<Stamped> {
        let journal = r#"{"downtime_ms":9000,"timeline":[
            {"phase":"planned","mono_ms":10000,"boot_id":"a"},
            {"phase":"kernel_loaded","mono_ms":12000,"boot_id":"a"},
            {"phase":"frozen","mono_ms":12010,"boot_id":"a"},
            {"phase":"dumped","mono_ms":15010,"boot_id":"a"},
            {"phase":"committed","mono_ms":15110,"boot_id":"a"},
            {"phase":"booted","mono_ms":4000,"boot_id":"b"},
            {"phase":"restored","mono_ms":8000,"boot_id":"b"}]}"#
            .replace('\n', "");
        let journal_line = format!(r#"NVWA-LAB {{"event":"journal","journal":{journal}}}"#);
        lines(&[
            (
                2000,
                r#"NVWA-LAB {"event":"init","kernel":"6.1","uptime":1.00}"#,
            ),
            (
                2300,
                r#"NVWA-LAB {"event":"init-step","step":"modules","uptime":1.30}"#,
            ),
            (
                10500,
                r#"NVWA-LAB {"event":"bench","step":"anchor","uptime":9.50}"#,
            ),
            (11000, r#"NVWA-LAB {"event":"update","index":1}"#),
            (
                32500,
                r#"NVWA-LAB {"event":"init","kernel":"6.12","uptime":2.50}"#,
            ),
            (
                33000,
                r#"NVWA-LAB {"event":"init-step","step":"modules","uptime":3.00}"#,
            ),
            (
                33100,
                r#"NVWA-LAB {"event":"init-step","step":"mount","uptime":3.10}"#,
            ),
            (
                33300,
                r#"NVWA-LAB {"event":"init-step","step":"pre","uptime":3.30}"#,
            ),
            (39000, &journal_line),
            (
                40000,
                r#"NVWA-LAB {"event":"bench","step":"anchor","uptime":10.01}"#,
            ),
            (
                40100,
                r#"NVWA-LAB {"event":"bench","step":"pause","ms":850}"#,
            ),
            (41000, r#"NVWA-LAB {"event":"bench","step":"dump-start"}"#),
            (43000, r#"NVWA-LAB {"event":"bench","step":"dump-done"}"#),
            (
                43100,
                r#"NVWA-LAB {"event":"bench","step":"restore-start"}"#,
            ),
            (46100, r#"NVWA-LAB {"event":"bench","step":"restore-done"}"#),
            (
                47100,
                r#"NVWA-LAB {"event":"finish","kernel":"6.12","failed":0}"#,
            ),
        ])
    }

    /// The bare kexec's boot: the old kernel, then the new one with its zero at host 6000.
    fn a_bare_kexec() -> Vec<Stamped> {
        lines(&[
            (
                2000,
                r#"NVWA-LAB {"event":"init","kernel":"6.1","uptime":1.00}"#,
            ),
            (5000, r#"NVWA-LAB {"event":"bench","step":"kexec"}"#),
            (
                8000,
                r#"NVWA-LAB {"event":"init","kernel":"6.12","uptime":2.00}"#,
            ),
            (
                8100,
                r#"NVWA-LAB {"event":"finish","kernel":"6.12","failed":0}"#,
            ),
        ])
    }

    #[test]
    fn phases_are_placed_on_the_host_clock_through_each_kernels_zero() {
        let ms = measure(&a_run(), &a_bare_kexec());
        let get = |k: &str| ms.get(k).copied();
        assert_eq!(get("load_kernel"), Some(2000));
        assert_eq!(get("pre_dump"), Some(10));
        assert_eq!(get("dump"), Some(3000));
        assert_eq!(get("sync"), Some(100));
        // committed at 1000 + 15110; the new kernel's zero at 32500 − 2500.
        assert_eq!(get("handoff"), Some(30000 - 16110));
        assert_eq!(get("boot"), Some(2500));
        assert_eq!(get("nvwa_start"), Some(34000 - 32500));
        assert_eq!(get("start_modules"), Some(500));
        assert_eq!(get("start_mount"), Some(100));
        assert_eq!(get("start_pre"), Some(200));
        assert_eq!(get("start_server"), Some(1500 - 800));
        assert_eq!(get("restore"), Some(4000));
        assert_eq!(get("downtime"), Some(38000 - 13010));
        let parts: i64 = ["dump", "sync", "handoff", "boot", "nvwa_start", "restore"]
            .iter()
            .map(|k| ms[*k])
            .sum();
        assert_eq!(parts, ms["downtime"], "the phases add up to the downtime");
        assert_eq!(get("downtime_journal"), Some(9000));
        assert_eq!(get("clock_check"), Some(-10));
        assert_eq!(get("pause"), Some(850));
        assert_eq!(get("criu_dump"), Some(2000));
        assert_eq!(get("criu_restore"), Some(3000));
        assert_eq!(get("bare_handoff"), Some(1000));
        assert_eq!(get("bare_boot"), Some(2000));
        assert_eq!(get("bare_kexec"), Some(3000));
        assert_eq!(get("overhead"), Some(24990 - 3000 - 3000));
        assert!(missing(&ms).is_empty(), "{:?}", missing(&ms));
    }

    #[test]
    fn a_run_without_its_floors_lacks_them_by_name() {
        let cut: Vec<Stamped> = a_run()
            .into_iter()
            .filter(|l| !matches!(&l.line, Line::Event(v) if v["step"] == "restore-done"))
            .collect();
        let no_jump: Vec<Stamped> = a_bare_kexec().into_iter().take(2).collect();
        let ms = measure(&cut, &no_jump);
        let lacking = missing(&ms);
        for k in ["bare_kexec", "criu_restore", "overhead", "bare_boot"] {
            assert!(lacking.contains(&k), "{k} in {lacking:?}");
        }
        assert!(!lacking.contains(&"downtime"), "{lacking:?}");
    }

    #[test]
    fn the_serial_log_reads_back_into_stamped_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        std::fs::write(
            &p,
            "[    4.013] NVWA-LAB {\"event\":\"init\",\"kernel\":\"6.1\",\"uptime\":3.2}\n[   10.5] console noise\nnvwa-lab: timed out\n",
        )
        .unwrap();
        let l = read_serial_log(&p).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].at_ms, 4013);
        assert!(matches!(&l[0].line, Line::Event(v) if v["uptime"] == 3.2));
        assert!(matches!(&l[1].line, Line::Console(_)));
    }

    #[test]
    fn statistics_are_median_min_max() {
        assert_eq!(stat(&[]), None);
        let s = stat(&[5, 1, 3]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1, 5, 3));
        assert_eq!(stat(&[4, 1, 2, 3]).unwrap().median, 2.5);
    }

    fn run_of(case: &'static str, rep: u32, ms: &[(&str, i64)], passed: bool) -> Run {
        Run {
            case,
            strategy: Strategy::Baseline,
            repetition: rep,
            passed,
            failures: vec![],
            ms: ms.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            serial_log: "log".into(),
        }
    }

    #[test]
    fn the_summary_groups_by_case_and_strategy_over_passed_runs() {
        let runs = [
            run_of("64m", 1, &[("downtime", 10000), ("overhead", 1000)], true),
            run_of("1g", 1, &[("downtime", 30000)], true),
            run_of("64m", 2, &[("downtime", 12000), ("overhead", 3000)], true),
            run_of("64m", 3, &[("downtime", 99000)], false),
        ];
        let rows = summarize(&runs);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].case, "64m");
        let d = rows[0].ms["downtime"];
        assert_eq!((d.median, d.min, d.max, d.n), (11000.0, 10000, 12000, 2));
        assert_eq!(rows[0].overhead_pct, Some(100.0 * 2000.0 / 11000.0));
        assert_eq!(rows[1].overhead_pct, None);
        let table = render_table(&rows);
        assert!(table.contains("median of 2 run(s)"), "{table}");
        assert!(table.contains("10.00–12.00"), "{table}");
        assert!(table.lines().any(|l| l.starts_with("64m")), "{table}");
        // One strategy only: nothing to divide by baseline; 1g against 64m is there.
        let r = ratios(&rows);
        assert_eq!(
            r,
            vec![Ratio {
                what: "downtime 1g baseline / 64m baseline".into(),
                value: 30000.0 / 11000.0
            }]
        );
        assert!(render_ratios(&r).contains("downtime 1g baseline / 64m baseline  2.73×"));
        let svg = render_svg(&rows, "a <test>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("a &lt;test&gt;"), "{svg}");
        assert!(svg.contains("64m · baseline"), "{svg}");
    }

    #[test]
    fn ratios_compare_each_strategy_with_baseline_and_each_size_with_64m() {
        let lazy = |case: &'static str, d: i64, dump: i64| {
            let mut r = run_of(case, 1, &[("downtime", d), ("dump", dump)], true);
            r.strategy = Strategy::Lazy;
            r
        };
        let runs = [
            run_of("64m", 1, &[("downtime", 20000), ("dump", 2000)], true),
            lazy("64m", 10000, 1000),
            run_of("1g", 1, &[("downtime", 40000), ("dump", 10000)], true),
            lazy("1g", 12000, 5000),
        ];
        let got: Vec<(String, f64)> = ratios(&summarize(&runs))
            .into_iter()
            .map(|r| (r.what, r.value))
            .collect();
        assert_eq!(
            got,
            vec![
                ("downtime 64m lazy / 64m baseline".into(), 0.5),
                ("dump 64m lazy / 64m baseline".into(), 0.5),
                ("downtime 1g lazy / 1g baseline".into(), 0.3),
                ("dump 1g lazy / 1g baseline".into(), 0.5),
                ("downtime 1g baseline / 64m baseline".into(), 2.0),
                ("downtime 1g lazy / 64m lazy".into(), 1.2),
            ]
        );
    }

    #[test]
    fn every_case_makes_a_valid_scenario_with_room_for_its_images() {
        for c in CASES {
            let s = c.scenario(Strategy::Baseline).unwrap();
            assert_eq!(s.name, format!("bench-{}-baseline", c.name));
            assert!(s.expects_kernel_switch());
            assert!(c.pmem_mib() >= 768 && c.pmem_mib() % 128 == 0);
            assert!(c.pmem_mib() > c.procs * c.mib, "{}", c.name);
            let script = s.guest_script("6.1", "6.12");
            assert!(script.contains("--buffer-mib"), "{script}");
            assert!(s.files.iter().any(|f| f.guest == "/lab/bench"));
        }
        assert_eq!(Case::parse("1g").unwrap().pmem_mib(), 1536);
        assert_eq!(Case::parse("64m").unwrap().pmem_mib(), 768);
        assert!(Case::parse("2g").is_err());
        assert_eq!(Strategy::parse("baseline").unwrap(), Strategy::Baseline);
        assert_eq!(Strategy::parse("pre-dump").unwrap(), Strategy::PreDump);
        assert_eq!(
            Strategy::parse("pre-dump+lazy").unwrap(),
            Strategy::PreDumpLazy
        );
        let s = Case::parse("1g")
            .unwrap()
            .scenario(Strategy::PreDump)
            .unwrap();
        assert_eq!(s.name, "bench-1g-pre-dump");
        assert!(s.config.contains("pre_dump: true"), "{}", s.config);
        assert!(format!("{:#}", Strategy::parse("lazier").unwrap_err()).contains("lazy"));
    }

    #[test]
    fn the_guest_scripts_of_a_case_are_valid_sh() {
        let s = Case::parse("procs16")
            .unwrap()
            .scenario(Strategy::Baseline)
            .unwrap();
        let mut all = s.guest_script("6.1", "6.12");
        for f in &s.files {
            all.push_str(f.content.as_deref().unwrap_or_default());
        }
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &all])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
