//! `nvwa-lab-workload echo|connect|lock|try-lock`: what the network and lock scenarios rely on.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_nvwa-lab-workload");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `log` has a line starting with `prefix` (the helper's "ready" line).
fn wait_for(log: &std::path::Path, prefix: &str, child: &mut Child) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l.starts_with(prefix)) {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "the helper exited");
        assert!(
            Instant::now() < until,
            "no {prefix:?} line in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_held_lock_is_reported_with_its_holder_and_freed_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (file, log) = (dir.path().join("lock"), dir.path().join("log"));
    let mut holder = Killed(
        Command::new(BIN)
            .args(["lock", "--file", file.to_str().unwrap()])
            .args(["--log", log.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    wait_for(&log, "locked", &mut holder.0);
    let out = Command::new(BIN)
        .args(["try-lock", "--file", file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("POSIX write lock by pid {}", holder.0.id()))
            && text.contains("a flock"),
        "{text}"
    );
    drop(holder);
    let out = Command::new(BIN)
        .args(["try-lock", "--file", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_echo_server_answers_connections() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    // The server takes any free port and names it: no other process can take it in between.
    let mut server = Killed(
        Command::new(BIN)
            .args(["echo", "--port", "0", "--log", log.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    wait_for(&log, "listening", &mut server.0);
    let port = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("listening ")?
                .split(" port ")
                .nth(1)
                .map(String::from)
        })
        .expect("the listening line names its port");
    for _ in 0..2 {
        let out = Command::new(BIN)
            .args(["connect", "--port", &port])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(server);
    let out = Command::new(BIN)
        .args(["connect", "--port", &port])
        .output()
        .unwrap();
    assert!(!out.status.success(), "nobody listens any more");
}
