//! A stateful process for lab scenarios, the kind of thing an operator cannot afford to lose:
//! a counter that ticks into an open log file (its offset matters), worker threads, and a large
//! buffer of known contents. `verify` checks, from outside, that a live-upgraded instance kept
//! all of it.
//!
//! run:    nvwa-lab-workload run --log PATH [--threads N] [--buffer-mib M] [--tick-ms T]
//!         [--io-uring]  (also hold an io_uring instance, which criu 3.17 cannot checkpoint)
//! verify: nvwa-lab-workload verify --pid PID --log PATH [--threads N] [--kernel-changed]

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

static VERIFY_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    VERIFY_REQUESTED.store(true, Ordering::SeqCst);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run(&args[1..]),
        Some("verify") => verify(&args[1..]),
        _ => Err("usage: nvwa-lab-workload run|verify [options] (see the source header)".into()),
    };
    if let Err(e) = result {
        eprintln!("nvwa-lab-workload: {e}");
        std::process::exit(1);
    }
}

fn opt(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    opt(args, name).map_or(Ok(default), |v| {
        v.parse()
            .map_err(|_| format!("{name} wants a number, got {v:?}"))
    })
}

/// splitmix64: every word of the buffer is a function of its index, so any lost, moved or
/// zeroed page changes the digest.
fn word(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn digest(buf: &[u64]) -> u64 {
    buf.iter()
        .enumerate()
        .fold(0u64, |acc, (i, w)| acc.rotate_left(5) ^ w ^ i as u64)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn run(args: &[String]) -> Result<(), String> {
    let log_path = opt(args, "--log").ok_or("run needs --log PATH")?;
    let threads = num(args, "--threads", 4)?;
    let mib = num(args, "--buffer-mib", 256)?;
    let tick = Duration::from_millis(num(args, "--tick-ms", 200)?);

    let words = (mib * 1024 * 1024 / 8) as usize;
    let buffer: Vec<u64> = (0..words as u64).map(word).collect();
    let expected = digest(&buffer);

    // Not O_APPEND: the file offset is state that the restore must carry over.
    let mut log = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {log_path}: {e}"))?;
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            on_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }

    if args.iter().any(|a| a == "--io-uring") {
        hold_io_uring()?;
    }

    let spins = Arc::new(AtomicU64::new(0));
    for _ in 1..threads {
        let spins = spins.clone();
        std::thread::spawn(move || loop {
            spins.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        });
    }

    let pid = std::process::id();
    writeln!(
        log,
        "start pid {pid} threads {threads} buffer_mib {mib} digest {expected:016x}"
    )
    .map_err(|e| e.to_string())?;
    let mut n: u64 = 0;
    loop {
        n += 1;
        let line = format!("tick {n} pid {pid} kernel {}\n", kernel_release());
        log.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        if VERIFY_REQUESTED.swap(false, Ordering::SeqCst) {
            let got = digest(&buffer);
            let verdict = if got == expected { "ok" } else { "BAD" };
            writeln!(
                log,
                "verify {verdict} digest {got:016x} expected {expected:016x}"
            )
            .map_err(|e| e.to_string())?;
        }
        std::thread::sleep(tick);
    }
}

struct LogFacts {
    ticks: Vec<(u64, String)>,
    verdicts: Vec<String>,
}

fn read_log(path: &str) -> Result<LogFacts, String> {
    let f = File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
    let mut facts = LogFacts {
        ticks: vec![],
        verdicts: vec![],
    };
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["tick", n, "pid", _, "kernel", k] => facts.ticks.push((
                n.parse().map_err(|_| format!("bad tick line {line:?}"))?,
                k.to_string(),
            )),
            ["verify", verdict, ..] => facts.verdicts.push(verdict.to_string()),
            _ => {}
        }
    }
    Ok(facts)
}

fn verify(args: &[String]) -> Result<(), String> {
    let pid: i32 = opt(args, "--pid")
        .ok_or("verify needs --pid PID")?
        .parse()
        .map_err(|_| "--pid wants a number")?;
    let log_path = opt(args, "--log").ok_or("verify needs --log PATH")?;
    let threads = opt(args, "--threads");
    let kernel_changed = args.iter().any(|a| a == "--kernel-changed");

    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|_| format!("pid {pid} is not running"))?;
    if let Some(want) = threads {
        let got = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .map(str::trim)
            .unwrap_or("?");
        if got != want {
            return Err(format!("pid {pid} has {got} threads, expected {want}"));
        }
    }

    // Ask the process to check its own buffer, and wait for its answer in the log.
    let before = read_log(&log_path)?.verdicts.len();
    if unsafe { libc::kill(pid, libc::SIGUSR1) } != 0 {
        return Err(format!("cannot signal pid {pid}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let facts = loop {
        let facts = read_log(&log_path)?;
        if facts.verdicts.len() > before {
            break facts;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "pid {pid} did not answer the verify request within 60 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if facts.verdicts.last().map(String::as_str) != Some("ok") {
        return Err(format!("pid {pid}: buffer contents changed"));
    }

    // The counter never skipped or repeated: the file offset survived.
    for pair in facts.ticks.windows(2) {
        if pair[1].0 != pair[0].0 + 1 {
            return Err(format!(
                "tick {} is followed by tick {}: the log offset or counter was lost",
                pair[0].0, pair[1].0
            ));
        }
    }
    let kernels: Vec<&str> = {
        let mut k: Vec<&str> = facts.ticks.iter().map(|(_, k)| k.as_str()).collect();
        k.dedup();
        k
    };
    if kernel_changed && kernels.len() < 2 {
        return Err(format!(
            "the log shows only kernel(s) {kernels:?}; expected a change"
        ));
    }
    let pos = log_fd(pid, &log_path)
        .and_then(|fd| std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("pos:"))
                .and_then(|p| p.trim().parse::<u64>().ok())
        });
    let size = std::fs::metadata(&log_path).map(|m| m.len()).ok();
    let show = |v: Option<u64>| v.map_or("?".to_string(), |n| n.to_string());
    println!(
        "pid {pid}: buffer ok, {} ticks without a gap, kernels {}, log offset {} of {} bytes",
        facts.ticks.len(),
        kernels.join(" → "),
        show(pos),
        show(size)
    );
    Ok(())
}

/// The descriptor through which `pid` writes its log.
fn log_fd(pid: i32, log_path: &str) -> Option<String> {
    let want = std::fs::canonicalize(log_path).ok()?;
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(want.as_path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// Opens an io_uring instance and keeps its descriptor: a resource CRIU refuses to dump, which
/// lets scenarios exercise a failed checkpoint.
fn hold_io_uring() -> Result<(), String> {
    // struct io_uring_params is 120 bytes; zeroed asks for defaults.
    let mut params = [0u8; 120];
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(format!(
            "io_uring_setup failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
