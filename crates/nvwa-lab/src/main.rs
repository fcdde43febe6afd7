//! nvwa-lab: rehearse real kernel live upgrades in a QEMU guest (Debian 6.1 → 6.12).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use nvwa_lab::prepare;
use nvwa_lab::report::{self, ScenarioResult};
use nvwa_lab::runner::Lab;
use nvwa_lab::scenario::{self, KernelPair, Scenario};
use nvwa_lab::server_guest;
use nvwa_lab::vm::{Line, Stamped};

#[derive(Parser)]
#[command(
    name = "nvwa-lab",
    version,
    about = "Rehearse kernel live upgrades with nvwa in a QEMU guest: Debian's 6.1 kernel → 6.12",
    long_about = "Rehearse kernel live upgrades with nvwa in a QEMU guest.\n\nThe lab fetches two real Debian kernels (6.1 through linux-image-cloud-amd64, 6.12 through linux-image-6.12-amd64), criu, kexec-tools and busybox into a cache (NVWA_LAB_CACHE, default ~/.cache/nvwa-lab), builds nvwa from this checkout into an initramfs, boots the old kernel under QEMU (single-threaded TCG, 2 vCPUs) and runs scenarios: set a workload up, `nvwa update` to the new kernel, check what survived.\n\nA scenario with power_cut = true cuts the guest's power itself; the lab then cold-boots the same machine (its RAM is a file, so the persistent memory keeps its contents) on the old kernel. A scenario that fails after a guest kernel oopsed or panicked before /init is run once more, and the report says so (reran_after in --json).\n\nA scenario with guest = \"server\" runs in a Debian 13 (trixie) guest built with mmdebstrap (as root) from the host's mirror: systemd as PID 1, nvwa installed from its Debian package (built by scripts/package; nvwa.service and nvwa-pre.service enabled, images in /var/lib/nvwa on its ext4 disk), its kernels installed as Debian packages. kernels = \"series\" (the previous 6.12 point release → the current one, the default), \"major\" (trixie's current kernel → the newest, from backports) or \"downgrade\" (the newest → trixie's current); `prepare` resolves them from the archive and prints them."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch and cache the kernels and packages, and build the Debian 13 server guest (idempotent:
    /// the server guest is rebuilt only when its inputs or the archive's kernels changed)
    Prepare,
    /// List the scenarios shipped in lab/scenarios
    List,
    /// Run scenarios; exits 0 only if every check of every scenario passed
    Run {
        /// Scenario names from lab/scenarios
        names: Vec<String>,
        /// Run every shipped scenario
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// A scenario file from anywhere (repeatable)
        #[arg(long = "file", value_name = "PATH")]
        files: Vec<PathBuf>,
        /// Print one JSON object per scenario (name, passed, kernels, boots, power cut, rerun, phase timeline in ms)
        #[arg(long)]
        json: bool,
        /// Stream the guest's scenario output while it runs
        #[arg(long, short)]
        verbose: bool,
    },
    /// Measure where an update's downtime goes, phase by phase, next to its floors (a bare
    /// kexec of the same kernel and initramfs, criu alone restoring the same processes); prints
    /// a table (or --json) and writes bench.json and bench.svg. Exits 1 if a run failed or a
    /// phase was not measured.
    Bench {
        /// Cases to run (repeatable or comma-separated): 64m, 256m, 1g (one process of that
        /// size), dirty (1 GiB rewriting 1 % of its pages per second), procs16 (16 targets of
        /// 4 MiB); default all
        #[arg(long = "case", value_name = "CASE", value_delimiter = ',')]
        cases: Vec<String>,
        /// Strategies to compare (repeatable or comma-separated): baseline (the original's
        /// sequence: load, dump all, kexec, restore after boot), pre-dump (pre_dump: true:
        /// memory copied in passes while the targets run), lazy (lazy_restore: true: memory
        /// filled in after the targets run), pre-dump+lazy (both, nvwa's default); default
        /// baseline and pre-dump+lazy
        #[arg(long = "strategy", value_name = "STRATEGY", value_delimiter = ',')]
        strategies: Vec<String>,
        /// Runs of each case with each strategy; the table shows median, min and max
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Print the report as JSON (every run and the summary) instead of the table
        #[arg(long)]
        json: bool,
        /// Directory for bench.json and bench.svg (default: the lab cache's runs/bench)
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Upgrade the kernel under a running stateful workload and show that it survived
    Demo,
    /// Boot the lab guest with a shell on this terminal, for debugging
    Shell {
        #[arg(long, value_enum, default_value_t = Which::Old)]
        kernel: Which,
        /// Scenario whose setup files and config the guest gets
        #[arg(long, default_value = "demo")]
        scenario: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    Old,
    New,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("nvwa-lab: error: {e:#}");
        std::process::exit(2);
    }
}

fn builtin(name: &str) -> Result<Scenario> {
    let path = scenario::builtin_dir().join(format!("{name}.toml"));
    if !path.exists() {
        let known: Vec<String> = scenario::list(&scenario::builtin_dir())?
            .into_iter()
            .map(|s| s.name)
            .collect();
        bail!(
            "no scenario named {name:?}; known: {}; or pass a file with --file PATH",
            known.join(", ")
        );
    }
    Scenario::load(&path)
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Cmd::Prepare => {
            let ing = prepare::prepare(&prepare::cache_dir(), &[])?;
            println!(
                "old kernel: {}\nnew kernel: {}\ncache: {}",
                ing.old.version,
                ing.new.version,
                ing.cache.display()
            );
            let server = server_guest::prepare(&prepare::cache_dir(), true)?;
            let server = server_guest::with_package(&server, &server_guest::package_from_env()?)?;
            let k = &server.kernels;
            println!(
                "server guest: {}\nserver kernels: {} (previous), {} (current), {} (newest)",
                server.disk.display(),
                k.previous.release(),
                k.current.release(),
                k.newest.release()
            );
            for p in [KernelPair::Series, KernelPair::Major, KernelPair::Downgrade] {
                let (a, b) = server.pair(p);
                println!(
                    "  kernels = \"{}\": {} → {}",
                    p.name(),
                    a.release(),
                    b.release()
                );
            }
            Ok(())
        }
        Cmd::List => {
            for s in scenario::list(&scenario::builtin_dir())? {
                let first = s.description.lines().next().unwrap_or_default();
                println!("{:<12} {first}", s.name);
            }
            Ok(())
        }
        Cmd::Run {
            names,
            all,
            files,
            json,
            verbose,
        } => {
            let mut scenarios = if all {
                scenario::list(&scenario::builtin_dir())?
            } else {
                names
                    .iter()
                    .map(|n| builtin(n))
                    .collect::<Result<Vec<_>>>()?
            };
            for f in &files {
                scenarios.push(Scenario::load(f)?);
            }
            if scenarios.is_empty() {
                bail!("name scenarios to run (see `nvwa-lab list`), --all, or --file PATH");
            }
            run_scenarios(&scenarios, json, verbose)
        }
        Cmd::Bench {
            cases,
            strategies,
            repeat,
            json,
            out,
        } => bench(&cases, &strategies, repeat, json, out),
        Cmd::Demo => demo(),
        Cmd::Shell { kernel, scenario } => {
            let s = builtin(&scenario)?;
            let lab = Lab::open(std::slice::from_ref(&s))?;
            let k = match kernel {
                Which::Old => lab.ingredients.old.clone(),
                Which::New => lab.ingredients.new.clone(),
            };
            lab.shell(&s, &k)
        }
    }
}

fn run_scenarios(scenarios: &[Scenario], json: bool, verbose: bool) -> Result<()> {
    let lab = Lab::open(scenarios)?;
    let mut results: Vec<ScenarioResult> = Vec::new();
    for s in scenarios {
        eprintln!("nvwa-lab: running {} ...", s.name);
        let mut live = |l: &Stamped| {
            if verbose {
                print_live(l, s)
            }
        };
        let r = lab
            .run(s, &mut live)
            .with_context(|| format!("scenario {}", s.name))?;
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            print!("{}", report::render(&r));
        }
        std::io::stdout().flush()?;
        results.push(r);
    }
    let passed = results.iter().filter(|r| r.passed).count();
    let failed = results.len() - passed;
    eprintln!("lab: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

fn print_live(l: &Stamped, s: &Scenario) {
    let t = l.at_ms as f64 / 1000.0;
    let check_name = |v: &serde_json::Value| {
        v.as_u64()
            .and_then(|n| s.check.get(n as usize - 1))
            .map_or("?", |c| c.name.as_str())
    };
    match &l.line {
        Line::Event(v) => match v["event"].as_str() {
            Some("boot") if v["stage"] == "cold" => println!(
                "[{t:7.2}s] cold boot of {} (the same machine, powered on again)",
                v["kernel"].as_str().unwrap_or("?")
            ),
            Some("boot") => println!(
                "[{t:7.2}s] booted {} ({} kernel)",
                v["kernel"].as_str().unwrap_or("?"),
                v["stage"].as_str().unwrap_or("?")
            ),
            Some("power-cut") => {
                println!("[{t:7.2}s] power cut ({})", v["by"].as_str().unwrap_or("?"))
            }
            Some("check") => println!(
                "[{t:7.2}s] {} check: {}",
                if v["rc"] == 0 { "passed" } else { "FAILED" },
                check_name(&v["index"])
            ),
            Some("update") => println!("[{t:7.2}s] nvwa update (#{})", v["index"]),
            _ => {}
        },
        Line::Output { tag, text } if tag != "server" && tag != "config" => {
            println!("[{t:7.2}s]   {tag}: {text}")
        }
        _ => {}
    }
}

fn bench(
    cases: &[String],
    strategies: &[String],
    repeat: u32,
    json: bool,
    out: Option<PathBuf>,
) -> Result<()> {
    use nvwa_lab::bench::{self, Case, Strategy};
    let cases = if cases.is_empty() {
        bench::CASES.to_vec()
    } else {
        cases
            .iter()
            .map(|c| Case::parse(c))
            .collect::<Result<_>>()?
    };
    let strategies = if strategies.is_empty() {
        Strategy::DEFAULT.to_vec()
    } else {
        strategies
            .iter()
            .map(|s| Strategy::parse(s))
            .collect::<Result<_>>()?
    };
    let scenarios = cases
        .iter()
        .flat_map(|c| strategies.iter().map(|s| c.scenario(*s)))
        .collect::<Result<Vec<_>>>()?;
    let lab = Lab::open(&scenarios)?;
    let opts = bench::Options {
        cases,
        strategies,
        repeat,
    };
    let total = opts.cases.len() * opts.strategies.len() * repeat as usize;
    let mut done = 0;
    eprintln!("nvwa-lab: bench: {total} run(s)");
    let report = bench::run(&lab, &opts, &mut |r| {
        done += 1;
        let get = |k: &str| {
            r.ms.get(k)
                .map_or("-".to_string(), |v| format!("{:.2} s", *v as f64 / 1000.0))
        };
        eprintln!(
            "nvwa-lab: bench {done}/{total}: {} {} #{}: {} downtime {}, bare kexec {}, criu restore {}",
            r.case,
            r.strategy.name(),
            r.repetition,
            if r.passed { "ok" } else { "FAILED" },
            get("downtime"),
            get("bare_kexec"),
            get("criu_restore")
        );
        for f in &r.failures {
            eprintln!("  {f}");
        }
    })?;
    let dir = out.unwrap_or_else(|| lab.runs.join("bench"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json_path = dir.join("bench.json");
    let svg_path = dir.join("bench.svg");
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&json_path, &text)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    std::fs::write(&svg_path, bench::render_svg(&report.summary, &report.note))
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    if json {
        println!("{text}");
    } else {
        print!("{}", bench::render_table(&report.summary));
        print!("{}", bench::render_ratios(&report.ratios));
        println!("{}", report.note);
    }
    eprintln!(
        "nvwa-lab: bench: wrote {} and {}",
        json_path.display(),
        svg_path.display()
    );
    if !report.complete() {
        bail!("the bench is incomplete: a run failed or a phase was not measured (see above)");
    }
    Ok(())
}

fn demo() -> Result<()> {
    let s = builtin("demo")?;
    let lab = Lab::open(std::slice::from_ref(&s))?;
    println!(
        "nvwa lab demo: a workload (4 threads, a 256 MiB buffer of known contents, an open log file)\nmoves from {} to {} with `nvwa update`, under QEMU.\n",
        lab.ingredients.old.version, lab.ingredients.new.version
    );
    let mut live = |l: &Stamped| print_live(l, &s);
    let r = lab.run(&s, &mut live)?;
    println!();
    if r.passed {
        println!(
            "The workload survived {} → {}: same PID, intact memory, continuous log.\n\nTimeline (host clock):",
            r.kernel_before.as_deref().unwrap_or("?"),
            r.kernel_after.as_deref().unwrap_or("?")
        );
        print!("{}", report::render_timeline(&r));
        Ok(())
    } else {
        print!("{}", report::render(&r));
        bail!(
            "the demo failed; the serial log is {}",
            r.serial_log.display()
        )
    }
}
