//! What nvwa needs to know about live processes, read from /proc.

use std::collections::BTreeSet;
use std::fs;

/// A process (thread group) exists.
pub fn alive(pid: i32) -> bool {
    pid > 0 && fs::metadata(format!("/proc/{pid}")).is_ok()
}

pub fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// `comm (pid N)` or `pid N`, for messages.
pub fn describe(pid: i32) -> String {
    match comm(pid) {
        Some(c) => format!("{c} (pid {pid})"),
        None => format!("pid {pid}"),
    }
}

fn stat_field(pid: i32, index_after_comm: usize) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace()
        .nth(index_after_comm)
        .map(str::to_string)
}

pub fn parent(pid: i32) -> Option<i32> {
    stat_field(pid, 1)?.parse().ok()
}

/// One-letter scheduler state: R, S, D, T (stopped), t (traced), Z …
pub fn state(pid: i32) -> Option<char> {
    stat_field(pid, 0)?.chars().next()
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn threads(pid: i32) -> Vec<i32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The processes of the tree rooted at `root` (root first).
pub fn tree_pids(root: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, parent(p)?)))
        .collect();
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// Every pid and thread id of the tree: all of them must be free for a restore.
pub fn tree_ids(root: i32) -> Vec<i32> {
    let ids: BTreeSet<i32> = tree_pids(root).into_iter().flat_map(threads).collect();
    ids.into_iter().collect()
}

/// Resident memory of the tree in bytes.
pub fn tree_rss_bytes(root: i32) -> u64 {
    tree_pids(root).into_iter().map(rss_bytes).sum()
}

pub fn rss_bytes(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Whether `ancestor` is `pid` or one of its ancestors.
pub fn is_ancestor(ancestor: i32, mut pid: i32) -> bool {
    for _ in 0..4096 {
        if pid == ancestor {
            return true;
        }
        match parent(pid) {
            Some(p) if p > 0 && p != pid => pid = p,
            _ => return false,
        }
    }
    false
}

/// Resumes a tree that `criu dump --leave-stopped` left stopped.
pub fn resume(pids: &[i32]) -> Result<(), nix::Error> {
    let mut first_err = None;
    for &p in pids {
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGCONT,
        ) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Processes whose command line contains `args` as consecutive arguments (e.g. `-D DIR`).
pub fn running_with_args(args: &[&std::ffi::OsStr]) -> Vec<i32> {
    use std::os::unix::ffi::OsStrExt;
    all_pids()
        .into_iter()
        .filter(|&p| {
            let Ok(raw) = fs::read(format!("/proc/{p}/cmdline")) else {
                return false;
            };
            let argv: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
            argv.windows(args.len())
                .any(|w| w.iter().zip(args).all(|(a, b)| *a == b.as_bytes()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_described_and_its_tree_contains_its_threads() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(describe(me).contains(&format!("pid {me}")));
        let t = std::thread::spawn(|| std::thread::park_timeout(std::time::Duration::from_secs(5)));
        let ids = tree_ids(me);
        assert!(ids.contains(&me));
        assert!(ids.len() >= 2, "threads are listed: {ids:?}");
        t.thread().unpark();
        t.join().unwrap();
        assert!(rss_bytes(me) > 0);
        assert!(is_ancestor(1, me));
        assert!(!alive(0) && !alive(-5));
    }

    #[test]
    fn processes_are_found_by_their_arguments() {
        use std::io::BufRead;
        // The shell says "ready" once it runs: its command line is its own from then on.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "echo ready; read x", "nvwa-test-marker-arg", "second"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
        let found = running_with_args(&["nvwa-test-marker-arg".as_ref(), "second".as_ref()]);
        let reversed = running_with_args(&["second".as_ref(), "nvwa-test-marker-arg".as_ref()]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, vec![child.id() as i32]);
        assert!(reversed.is_empty());
    }

    #[test]
    fn a_child_process_is_in_the_tree() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let cid = child.id() as i32;
        assert!(tree_pids(me).contains(&cid));
        assert_eq!(parent(cid), Some(me));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
