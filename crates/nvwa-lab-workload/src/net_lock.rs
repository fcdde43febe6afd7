//! Holders of state beyond memory, for the network and lock scenarios: a TCP echo server (its
//! listening socket), and a process holding a whole-file flock and a POSIX (fcntl) write lock.
//!
//! echo:     nvwa-lab-workload echo --port P --log PATH   (serves until killed; P 0: any free
//!           port, named in its "listening" line)
//! connect:  nvwa-lab-workload connect --port P [--hold]  (a line must come back; exit 0, or with
//!           --hold say "holding pid N" and keep the connection open until killed)
//! lock:     nvwa-lab-workload lock --file F --log PATH   (holds both locks until killed)
//! try-lock: nvwa-lab-workload try-lock --file F          (exit 0 when both locks are free,
//!           1 when either is held, saying by whom)

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::{num, opt};

fn log_line(log: &str, text: &str) -> Result<(), String> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {log}: {e}"))?;
    writeln!(f, "{text}").map_err(|e| format!("cannot write {log}: {e}"))
}

pub fn echo(args: &[String]) -> Result<(), String> {
    let port = num(args, "--port", 7000)?;
    let log = opt(args, "--log").ok_or("echo needs --log PATH")?;
    let listener = TcpListener::bind(("0.0.0.0", port as u16))
        .map_err(|e| format!("cannot listen on port {port}: {e}"))?;
    // --port 0: the kernel picks a free port; the log line says which.
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    log_line(
        &log,
        &format!("listening pid {} port {port}", std::process::id()),
    )?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut out = match conn.try_clone() {
                Ok(c) => c,
                Err(_) => return,
            };
            for line in BufReader::new(conn).lines().map_while(Result::ok) {
                if writeln!(out, "{line}").is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

pub fn connect(args: &[String]) -> Result<(), String> {
    let port = num(args, "--port", 7000)?;
    let mut s = TcpStream::connect_timeout(
        &([127, 0, 0, 1], port as u16).into(),
        Duration::from_secs(10),
    )
    .map_err(|e| format!("cannot connect to port {port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let probe = format!("probe from pid {}", std::process::id());
    writeln!(s, "{probe}").map_err(|e| format!("cannot send: {e}"))?;
    let mut back = String::new();
    BufReader::new(&s)
        .read_line(&mut back)
        .map_err(|e| format!("no answer: {e}"))?;
    if back.trim_end() != probe {
        return Err(format!("sent {probe:?}, got {back:?}"));
    }
    println!("port {port} answered");
    if args.iter().any(|a| a == "--hold") {
        println!("holding pid {}", std::process::id());
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}

fn open_lock_file(path: &str) -> Result<std::fs::File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))
}

/// A POSIX write lock on the whole file, without waiting; the errno on failure.
fn posix_lock(f: &std::fs::File, cmd: libc::c_int) -> Result<libc::flock, i32> {
    // SAFETY: a zeroed flock is a valid argument; the fd is open for the whole call.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    if rc == 0 {
        Ok(fl)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

pub fn lock(args: &[String]) -> Result<(), String> {
    let path = opt(args, "--file").ok_or("lock needs --file F")?;
    let log = opt(args, "--log").ok_or("lock needs --log PATH")?;
    let f = open_lock_file(&path)?;
    // SAFETY: plain syscalls on an open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "cannot flock {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    posix_lock(&f, libc::F_SETLK).map_err(|e| format!("cannot fcntl-lock {path}: errno {e}"))?;
    log_line(
        &log,
        &format!("locked pid {} file {path}", std::process::id()),
    )?;
    loop {
        std::thread::park();
    }
}

pub fn try_lock(args: &[String]) -> Result<(), String> {
    let path = opt(args, "--file").ok_or("try-lock needs --file F")?;
    let f = open_lock_file(&path)?;
    let mut held = Vec::new();
    // The POSIX lock first: F_GETLK names its holder (and flock below would not disturb it).
    let fl = posix_lock(&f, libc::F_GETLK).map_err(|e| format!("F_GETLK: errno {e}"))?;
    if fl.l_type != libc::F_UNLCK as libc::c_short {
        held.push(format!("a POSIX write lock by pid {}", fl.l_pid));
    }
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        held.push("a flock".to_string());
    }
    if held.is_empty() {
        println!("{path}: both locks free");
        return Ok(());
    }
    println!("{path} is held: {}", held.join(", "));
    std::process::exit(1);
}
