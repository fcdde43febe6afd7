//! A stateful process for lab scenarios, the kind of thing an operator cannot afford to lose:
//! a counter that ticks into an open log file (its offset matters), worker threads, and a large
//! buffer of known contents. `verify` checks, from outside, that a live-upgraded instance kept
//! all of it.
//!
//! run:    nvwa-lab-workload run --log PATH [--threads N] [--buffer-mib M] [--tick-ms T]
//!         [--io-uring]  (also hold an io_uring instance, which criu 3.17 cannot checkpoint)
//!         [--stdout]    (also write each tick line to standard output, e.g. a journal stream)
//!         [--dirty-pct P] (rewrite P % of the buffer's pages per second, in place and with the
//!                        same contents: pages a checkpoint must write again, a verify still passes)
//! verify: nvwa-lab-workload verify --pid PID --log PATH [--threads N] [--kernel-changed]
//!         [--max-gap-ms G]  (no two ticks further apart than G ms of wall time: it never stopped)
//! echo, connect, lock, try-lock: holders of sockets and file locks (see net_lock.rs)
//! tcp-client: a client on the host whose connection must survive the switch (tcp_client.rs)
//! tcp-window: the receive windows this machine advertises from a port, on the wire (tcp_window.rs)
//! load-modules: nvwa-lab-workload load-modules LIST  (the lab's kernel modules; load_modules.rs)
//! as-user: nvwa-lab-workload as-user NAME CMD [ARGS...]
//!         (run CMD as the user NAME of /etc/passwd: its uid and gid, no supplementary groups,
//!         HOME/USER/LOGNAME set; no setuid bit anywhere, so only root can use it)

mod load_modules;
mod net_lock;
mod tcp_client;
mod tcp_window;

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
        Some("as-user") => as_user(&args[1..]),
        Some("echo") => net_lock::echo(&args[1..]),
        Some("connect") => net_lock::connect(&args[1..]),
        Some("lock") => net_lock::lock(&args[1..]),
        Some("try-lock") => net_lock::try_lock(&args[1..]),
        Some("tcp-client") => tcp_client::run(&args[1..]),
        Some("tcp-window") => tcp_window::run(&args[1..]),
        Some("load-modules") => load_modules::run(&args[1..]),
        _ => Err(
            "usage: nvwa-lab-workload run|verify|echo|connect|lock|try-lock|tcp-client|tcp-window|load-modules|as-user [options] (see the source header)".into(),
        ),
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
    let to_stdout = args.iter().any(|a| a == "--stdout");
    let tick = Duration::from_millis(num(args, "--tick-ms", 200)?);
    let dirty_pct = num(args, "--dirty-pct", 0)?;

    let words = (mib * 1024 * 1024 / 8) as usize;
    let mut buffer: Vec<u64> = (0..words as u64).map(word).collect();
    let mut dirtier = Dirtier::new(words, dirty_pct, tick);
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
        let line = format!(
            "tick {n} pid {pid} kernel {} ms {}\n",
            kernel_release(),
            wall_ms()
        );
        log.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        if to_stdout {
            // A closed stream must not stop the counter: the log file is what verify reads.
            let _ = std::io::stdout().write_all(line.as_bytes());
        }
        dirtier.tick(&mut buffer);
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

const PAGE_WORDS: usize = 4096 / 8;

/// Dirties a share of the buffer's pages per tick, walking it round: one word per page is
/// written again with the value it holds, which marks the page dirty for the kernel (soft-dirty
/// bits, userfaultfd) without changing the digest.
struct Dirtier {
    pages: usize,
    /// Pages to dirty per tick, in thousandths (a fraction of a page carries to the next tick).
    per_tick_milli: u64,
    owed_milli: u64,
    next: usize,
}

impl Dirtier {
    fn new(words: usize, pct_per_s: u64, tick: Duration) -> Dirtier {
        let pages = words.div_ceil(PAGE_WORDS);
        Dirtier {
            pages,
            per_tick_milli: pages as u64 * pct_per_s * tick.as_millis() as u64 / 100,
            owed_milli: 0,
            next: 0,
        }
    }

    /// Dirties this tick's pages; returns how many.
    fn tick(&mut self, buffer: &mut [u64]) -> usize {
        if self.pages == 0 {
            return 0;
        }
        self.owed_milli += self.per_tick_milli;
        let n = (self.owed_milli / 1000) as usize;
        self.owed_milli %= 1000;
        for _ in 0..n {
            let i = self.next * PAGE_WORDS;
            // Volatile: a store of the value already there must still happen.
            unsafe {
                std::ptr::write_volatile(&mut buffer[i], std::ptr::read_volatile(&buffer[i]))
            };
            self.next = (self.next + 1) % self.pages;
        }
        n
    }
}

/// Wall-clock milliseconds: comparable across a kexec, unlike the monotonic clock.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Tick {
    n: u64,
    kernel: String,
    /// When it was written (absent in logs of older workloads).
    ms: Option<u64>,
}

struct LogFacts {
    ticks: Vec<Tick>,
    verdicts: Vec<String>,
}

/// The longest wall-clock gap between two consecutive ticks: (gap, tick before it).
fn longest_gap(ticks: &[Tick]) -> Option<(u64, u64)> {
    ticks
        .windows(2)
        .filter_map(|w| Some((w[1].ms?.saturating_sub(w[0].ms?), w[0].n)))
        .max()
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
            ["tick", n, "pid", _, "kernel", k, rest @ ..] => facts.ticks.push(Tick {
                n: n.parse().map_err(|_| format!("bad tick line {line:?}"))?,
                kernel: k.to_string(),
                ms: match rest {
                    ["ms", ms] => Some(ms.parse().map_err(|_| format!("bad tick line {line:?}"))?),
                    _ => None,
                },
            }),
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
    let max_gap = opt(args, "--max-gap-ms")
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| format!("--max-gap-ms wants a number, got {v:?}"))
        })
        .transpose()?;

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
        if pair[1].n != pair[0].n + 1 {
            return Err(format!(
                "tick {} is followed by tick {}: the log offset or counter was lost",
                pair[0].n, pair[1].n
            ));
        }
    }
    let gap = longest_gap(&facts.ticks);
    let show = |v: Option<u64>| v.map_or("?".to_string(), |n| n.to_string());
    if let Some(max) = max_gap {
        match gap {
            Some((g, after)) if g > max => {
                return Err(format!(
                    "pid {pid} stopped for {g} ms after tick {after} (more than {max} ms): it was frozen or starved"
                ))
            }
            None => return Err(format!("{log_path} has no timed ticks to measure gaps with")),
            _ => {}
        }
    }
    let kernels: Vec<&str> = {
        let mut k: Vec<&str> = facts.ticks.iter().map(|t| t.kernel.as_str()).collect();
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
    println!(
        "pid {pid}: buffer ok, {} ticks without a gap (longest pause {} ms), kernels {}, log offset {} of {} bytes",
        facts.ticks.len(),
        show(gap.map(|(g, _)| g)),
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

/// A user's entry in a passwd file: (uid, gid, home).
fn passwd_entry(passwd: &str, name: &str) -> Option<(u32, u32, String)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        match f.as_slice() {
            [n, _, uid, gid, _, home, ..] if *n == name => {
                Some((uid.parse().ok()?, gid.parse().ok()?, home.to_string()))
            }
            _ => None,
        }
    })
}

/// Drops to `name`'s uid and gid, then execs the command: what `su` does, minus the password
/// and the shell, so that arguments reach the command exactly as given.
fn as_user(args: &[String]) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let [name, cmd, rest @ ..] = args else {
        return Err("as-user needs a user name and a command".into());
    };
    let passwd = std::fs::read_to_string("/etc/passwd")
        .map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    let (uid, gid, home) =
        passwd_entry(&passwd, name).ok_or_else(|| format!("no user {name:?} in /etc/passwd"))?;
    // Groups first, then the gid, then the uid: each step needs the privilege the next drops.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(format!(
                "setgroups for {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(format!(
                "setgid {gid} for {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(format!(
                "setuid {uid} for {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let e = std::process::Command::new(cmd)
        .args(rest)
        .env("HOME", home)
        .env("USER", name)
        .env("LOGNAME", name)
        .exec();
    Err(format!("cannot run {cmd} as {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_between_timed_ticks_is_found() {
        let t = |n, ms| Tick {
            n,
            kernel: "6.1".into(),
            ms,
        };
        let ticks = [
            t(1, Some(1000)),
            t(2, Some(1100)),
            t(3, Some(2600)),
            t(4, Some(2700)),
        ];
        assert_eq!(longest_gap(&ticks), Some((1500, 2)));
        assert_eq!(longest_gap(&[t(1, None), t(2, None)]), None);
        assert_eq!(longest_gap(&[t(1, Some(5))]), None);
    }

    #[test]
    fn the_dirtier_writes_its_share_of_pages_per_second_without_changing_the_contents() {
        let words = 1000 * PAGE_WORDS;
        let mut buf: Vec<u64> = (0..words as u64).map(word).collect();
        let before = digest(&buf);
        // 1 % of 1000 pages per second at 100 ms ticks: 10 pages a second, one per tick.
        let mut d = Dirtier::new(words, 1, Duration::from_millis(100));
        let per_second: usize = (0..10).map(|_| d.tick(&mut buf)).sum();
        assert_eq!(per_second, 10);
        assert_eq!(digest(&buf), before);
        let mut none = Dirtier::new(words, 0, Duration::from_millis(100));
        assert_eq!(none.tick(&mut buf), 0);
        // 1 % of 150 pages at 200 ms: 0.3 pages per tick, carried over.
        let mut small = Dirtier::new(150 * PAGE_WORDS, 1, Duration::from_millis(200));
        let total: usize = (0..10).map(|_| small.tick(&mut buf)).sum();
        assert_eq!(total, 3);
    }

    #[test]
    fn passwd_entries_are_found_by_name() {
        let p = "root:x:0:0:root:/root:/bin/sh\nlab:x:1000:1001:lab:/home/lab:/bin/sh\n";
        assert_eq!(
            passwd_entry(p, "lab"),
            Some((1000, 1001, "/home/lab".into()))
        );
        assert_eq!(passwd_entry(p, "root"), Some((0, 0, "/root".into())));
        assert_eq!(passwd_entry(p, "la"), None);
        assert_eq!(passwd_entry("lab:x:oops:1:lab:/h:/bin/sh", "lab"), None);
    }
}
