//! What nvwa needs to know about live processes, read from /proc.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

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

/// PF_KTHREAD in the `flags` field of /proc/PID/stat: set for every kernel thread (pid 2,
/// kthreadd, and all its children), never for a user process. The `comm` of a kernel thread can
/// be anything, and its parent is 0 or 2 only in the initial pid namespace, so the flag is the
/// one reliable test.
pub const PF_KTHREAD: u64 = 0x0020_0000;

/// The fields of /proc/PID/stat that nvwa reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// One-letter scheduler state: R, S, D, T (stopped), t (traced), Z …
    pub state: char,
    pub ppid: i32,
    /// The kernel's `PF_*` flags (field 9).
    pub flags: u64,
}

/// Parses one /proc/PID/stat line.
pub fn parse_stat(line: &str) -> Option<Stat> {
    // comm (field 2) may contain spaces and parentheses: the other fields start after the last ')'.
    let rest = line.get(line.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    // After state and ppid come pgrp, session, tty_nr and tpgid; then flags.
    let flags = fields.nth(4)?.parse().ok()?;
    Some(Stat { state, ppid, flags })
}

/// The `Tgid:` of a /proc/PID/status text: the process a thread belongs to.
pub fn parse_tgid(status: &str) -> Option<i32> {
    status_value(status, "Tgid:")?.parse().ok()
}

/// The `VmRSS:` of a /proc/PID/status text, in bytes; kernel threads have none.
pub fn parse_rss_bytes(status: &str) -> Option<u64> {
    let kib: u64 = status_value(status, "VmRSS:")?
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib.saturating_mul(1024))
}

fn status_value<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn status(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

pub fn parent(pid: i32) -> Option<i32> {
    Some(stat(pid)?.ppid)
}

/// One-letter scheduler state: R, S, D, T (stopped), t (traced), Z …
pub fn state(pid: i32) -> Option<char> {
    Some(stat(pid)?.state)
}

/// The thread group (process) that `pid` belongs to. /proc/TID exists for every thread id
/// although `ls /proc` does not show it, so a thread id passes [`alive`]: this tells them apart.
pub fn tgid(pid: i32) -> Option<i32> {
    parse_tgid(&status(pid)?)
}

/// Whether `pid` is a kernel thread ([`PF_KTHREAD`]); false if it cannot be read.
pub fn is_kernel_thread(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.flags & PF_KTHREAD != 0)
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
    status(pid).and_then(|s| parse_rss_bytes(&s)).unwrap_or(0)
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

/// The namespaces in which `pid` is apart from PID 1 (time left out: see
/// [`crate::policy::ProcView::own_namespaces`]). Where PID 1's cannot be read (nvwa in a
/// container), nvwa's own stand for the host's; one that cannot be read counts as shared.
pub fn own_namespaces(pid: i32) -> Vec<&'static str> {
    ["mnt", "uts", "ipc", "net", "pid", "user", "cgroup"]
        .into_iter()
        .filter(|ns| {
            let of = |p: &str| fs::read_link(format!("/proc/{p}/ns/{ns}")).ok();
            let host = of("1").or_else(|| of("self"));
            matches!((host, of(&pid.to_string())), (Some(a), Some(b)) if a != b)
        })
        .collect()
}

/// The mount ids of `/proc/<pid>/mountinfo` (its mount namespace's mounts).
pub fn parse_mount_ids(mountinfo: &str) -> BTreeSet<u64> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// `(mnt_id, flags)` of a `/proc/<pid>/fdinfo/<fd>` (flags are octal).
pub fn parse_fdinfo(text: &str) -> Option<(u64, u32)> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .map(str::trim)
    };
    let mnt = field("mnt_id")?.parse().ok()?;
    let flags = u32::from_str_radix(field("flags")?, 8).ok()?;
    Some((mnt, flags))
}

/// Files (paths, not sockets, pipes or anonymous inodes) that `pid` holds open on mounts that
/// are not in its mount namespace: `(fd, mnt_id, inode, path, flags)`. systemd opens a unit's
/// stdin (/dev/null) on the host before it makes the unit's namespace; criu cannot look such a
/// mount up from inside the namespace.
pub fn foreign_mount_files(pid: i32) -> Vec<(i32, u64, u64, PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    let Ok(mountinfo) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
        return Vec::new();
    };
    let mounts = parse_mount_ids(&mountinfo);
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out: Vec<_> = fds
        .flatten()
        .filter_map(|e| {
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let link = fs::read_link(e.path()).ok()?;
            // Only real paths: sockets, pipes and anon inodes live on internal mounts that no
            // mountinfo lists, and criu handles them by other means.
            if !link.is_absolute() || link.to_string_lossy().ends_with(" (deleted)") {
                return None;
            }
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
            let (mnt, flags) = parse_fdinfo(&info)?;
            if mounts.contains(&mnt) {
                return None;
            }
            let ino = fs::metadata(e.path()).ok()?.ino();
            Some((fd, mnt, ino, link, flags))
        })
        .collect();
    out.sort();
    out
}

/// SIGKILL to every pid (stopped processes die without running again), then waits at most
/// `timeout` until none of them is alive or a zombie any more.
pub fn kill_and_reap(pids: &[i32], timeout: std::time::Duration) {
    for &p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + timeout;
    while pids.iter().any(|&p| alive(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Processes whose argument vector (`/proc/PID/cmdline`) satisfies `matches(argv, pid)`.
fn processes_with_argv(matches: impl Fn(&[&[u8]], i32) -> bool) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| {
            let Ok(raw) = fs::read(format!("/proc/{p}/cmdline")) else {
                return false;
            };
            let argv: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
            matches(&argv, p)
        })
        .collect()
}

/// Processes whose command line contains `args` as consecutive arguments (e.g. `-D DIR`).
pub fn running_with_args(args: &[&std::ffi::OsStr]) -> Vec<i32> {
    use std::os::unix::ffi::OsStrExt;
    processes_with_argv(|argv, _| {
        argv.windows(args.len())
            .any(|w| w.iter().zip(args).all(|(a, b)| *a == b.as_bytes()))
    })
}

/// Processes run with `-D /proc/self/fd/N` where their fd N is the directory `dir`: criu run
/// inside a sandboxed service's namespaces names its image directory that way
/// ([`crate::criu::Criu::dump`]), so [`running_with_args`] cannot find it by path.
pub fn running_with_dir_fd(dir: &std::path::Path) -> Vec<i32> {
    let Ok(dir) = fs::canonicalize(dir) else {
        return Vec::new();
    };
    processes_with_argv(|argv, p| {
        argv.windows(2).any(|w| {
            w[0] == b"-D"
                && std::str::from_utf8(w[1])
                    .ok()
                    .and_then(|a| a.strip_prefix("/proc/self/fd/"))
                    .and_then(|n| n.parse::<u32>().ok())
                    .and_then(|n| fs::read_link(format!("/proc/{p}/fd/{n}")).ok())
                    .is_some_and(|target| target == dir)
        })
    })
}

/// The socket inode behind a `/proc/<pid>/fd/<n>` link target (`socket:[123]`).
pub(crate) fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The inodes of the unix stream sockets in `/proc/<pid>/net/unix` (its network namespace's).
/// Columns: Num RefCount Protocol Flags Type St Inode Path; Type 0001 is SOCK_STREAM.
pub fn parse_unix_stream_inodes(table: &str) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.get(4) == Some(&"0001")).then(|| cols.get(6)?.parse().ok())?
        })
        .collect()
}

/// Standard output and error of `pid` that are unix stream sockets (a service's stream to
/// journald, typically): `(fd, socket inode)`.
pub fn std_stream_sockets(pid: i32) -> Vec<(i32, u64)> {
    let streams = fs::read_to_string(format!("/proc/{pid}/net/unix"))
        .map(|t| parse_unix_stream_inodes(&t))
        .unwrap_or_default();
    [1, 2]
        .into_iter()
        .filter_map(|fd| {
            let link = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            let ino = socket_inode(link.to_str()?)?;
            streams.contains(&ino).then_some((fd, ino))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_and_mountinfo_are_parsed() {
        let info = "pos:\t0\nflags:\t0100002\nmnt_id:\t26\nino:\t5\n";
        assert_eq!(parse_fdinfo(info), Some((26, 0o100002)));
        assert_eq!(parse_fdinfo("pos:\t0\n"), None);
        let mi = "612 590 0:23 / / ro shared:1 - ext4 /dev/vda rw\n613 612 0:5 / /dev rw - tmpfs tmpfs rw\n";
        assert_eq!(parse_mount_ids(mi), BTreeSet::from([612, 613]));
    }

    #[test]
    fn a_program_naming_its_directory_by_fd_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        // sh's own cmdline ends in `-D /proc/self/fd/7` ($0 and $1), and sh holds fd 7 on dir.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "exec 7<\"$2\"; echo ready; read x",
                "-D",
                "/proc/self/fd/7",
            ])
            .arg(dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "ready\n");
        let pid = child.id() as i32;
        assert!(running_with_dir_fd(dir.path()).contains(&pid));
        assert!(!running_with_dir_fd(other.path()).contains(&pid));
        drop(child.stdin.take());
        child.wait().unwrap();
    }

    #[test]
    fn files_on_our_own_mounts_are_not_foreign() {
        // Every file this test process holds is on a mount of its own namespace.
        let _f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(foreign_mount_files(std::process::id() as i32), vec![]);
    }

    #[test]
    fn a_process_in_a_user_namespace_of_its_own_is_told_apart() {
        assert!(own_namespaces(std::process::id() as i32).is_empty());
        let mut child = std::process::Command::new("unshare")
            .args(["--user", "sleep", "30"])
            .spawn()
            .expect("unshare (util-linux) runs");
        let pid = child.id() as i32;
        // unshare(2) happens before the exec of sleep: wait for the exec.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while comm(pid).as_deref() != Some("sleep") && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let apart = own_namespaces(pid);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(apart, vec!["user"]);
    }

    #[test]
    fn unix_stream_sockets_are_told_from_other_sockets() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 20466 /run/systemd/journal/stdout\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 1234\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 20470\n";
        assert_eq!(parse_unix_stream_inodes(table), vec![20466, 20470]);
        assert_eq!(socket_inode("socket:[20470]"), Some(20470));
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("pipe:[5]"), None);
    }

    #[test]
    fn a_socketpair_on_stdout_is_found() {
        use std::os::fd::AsRawFd;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                a.try_clone().unwrap(),
            )))
            .spawn()
            .unwrap();
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", a.as_raw_fd()))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap();
        let found = std_stream_sockets(child.id() as i32);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, vec![(1, ino)]);
    }

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

    // Field layout as in proc(5); comm with spaces and a ')' must not shift the fields.
    const KTHREADD: &str = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 22 0 0";
    const USER: &str = "4242 (my (odd) prog) T 77 4242 4242 0 -1 4194560 120 0 0 0 1 2 0 0 20 0";

    #[test]
    fn stat_lines_are_parsed_after_the_last_parenthesis() {
        let k = parse_stat(KTHREADD).unwrap();
        assert_eq!((k.state, k.ppid), ('S', 0));
        assert_ne!(k.flags & PF_KTHREAD, 0, "kthreadd has PF_KTHREAD");
        let u = parse_stat(USER).unwrap();
        assert_eq!((u.state, u.ppid, u.flags), ('T', 77, 4194560));
        assert_eq!(u.flags & PF_KTHREAD, 0);
        assert_eq!(parse_stat("12 (cut) S 1"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
        assert_eq!(parse_stat("5 (x) S notanumber 0 0 0 0 0"), None);
    }

    #[test]
    fn status_fields_are_parsed() {
        let text = "Name:\tworker\nTgid:\t300\nPid:\t301\nVmRSS:\t    2048 kB\n";
        assert_eq!(parse_tgid(text), Some(300));
        assert_eq!(parse_rss_bytes(text), Some(2048 * 1024));
        assert_eq!(parse_tgid("Name:\tx\n"), None);
        assert_eq!(parse_rss_bytes("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn a_thread_id_belongs_to_its_process_and_is_no_kernel_thread() {
        let me = std::process::id() as i32;
        assert_eq!(tgid(me), Some(me));
        assert!(!is_kernel_thread(me));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw()).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        assert_ne!(tid, me);
        assert!(alive(tid), "/proc/TID exists for a thread id");
        assert_eq!(tgid(tid), Some(me));
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(tgid(-1), None);
    }

    #[test]
    fn the_kernel_threads_of_this_machine_are_recognised() {
        // The parser is tested on strings above; this ties it to the real /proc. In the initial
        // pid namespace pid 2 is kthreadd and all its children are kernel threads; in any other
        // namespace kernel threads are invisible and pid 2, if it exists, is a user process.
        let kthreadd =
            stat(2).is_some_and(|s| s.ppid == 0) && comm(2).as_deref() == Some("kthreadd");
        assert_eq!(is_kernel_thread(2), kthreadd);
        if kthreadd {
            let children: Vec<i32> = tree_pids(2).into_iter().skip(1).collect();
            assert!(!children.is_empty(), "kthreadd has children");
            assert!(children.iter().all(|&c| is_kernel_thread(c) || !alive(c)));
        }
        assert!(!is_kernel_thread(std::process::id() as i32));
        assert!(!is_kernel_thread(1), "init is a user process");
    }
}
