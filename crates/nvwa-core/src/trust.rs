//! Which paths nvwa may trust: a root process must not read configuration, run programs, restore
//! images or listen on a socket that another user can replace.
//!
//! As root, a path is trusted only if it and every directory above it are owned by root and not
//! group- or world-writable; a world-writable directory with the sticky bit (like `/tmp`) is not
//! enough, because others can still create the entry nvwa would look for. Symbolic links are
//! followed one component at a time: a link is acceptable only if root owns the link itself (its
//! own mode is always 0777 and means nothing) and its target passes the same checks.
//!
//! As another user nvwa cannot do more than that user could, so only the path itself is checked:
//! it must belong to that user or to root and not be writable by anyone else.
//!
//! The ownership lookups go through [`Lookup`], so the root rules can be tested without root.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Linux gives up after 40 links (ELOOP); so do we.
const MAX_LINKS: usize = 40;

/// What a checked path is for; decides the expected file type and the wording of errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustedKind {
    ConfigFile,
    ConfigDir,
    /// `criu_dir`: images nvwa restores as root.
    ImageDir,
    /// `log_dir`.
    LogDir,
    /// `criu_exe`, `kexec_exe`.
    Executable,
    /// The directory holding the server's socket.
    SocketDir,
}

impl TrustedKind {
    fn is_dir(self) -> bool {
        !matches!(self, TrustedKind::ConfigFile | TrustedKind::Executable)
    }

    /// What someone able to replace the path could make nvwa do.
    fn consequence(self) -> &'static str {
        match self {
            TrustedKind::ConfigFile | TrustedKind::ConfigDir => {
                "rewrite the configuration nvwa obeys (and so make it run their program)"
            }
            TrustedKind::ImageDir => "plant or alter the images nvwa restores",
            TrustedKind::LogDir => "redirect or tamper with what nvwa writes there",
            TrustedKind::Executable => "replace the program nvwa runs",
            TrustedKind::SocketDir => "replace the socket and receive the requests sent to nvwa",
        }
    }
}

impl fmt::Display for TrustedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrustedKind::ConfigFile => "config file",
            TrustedKind::ConfigDir => "config directory",
            TrustedKind::ImageDir => "image directory (criu_dir)",
            TrustedKind::LogDir => "log directory (log_dir)",
            TrustedKind::Executable => "executable",
            TrustedKind::SocketDir => "socket directory",
        })
    }
}

/// The owner and `st_mode` (type and permission bits) of a path, not following a final link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub uid: u32,
    pub mode: u32,
}

impl Stat {
    fn file_type(self) -> u32 {
        self.mode & libc::S_IFMT
    }
    fn is_symlink(self) -> bool {
        self.file_type() == libc::S_IFLNK
    }
    fn is_dir(self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
    fn is_file(self) -> bool {
        self.file_type() == libc::S_IFREG
    }
    fn describe_type(self) -> &'static str {
        match self.file_type() {
            libc::S_IFDIR => "a directory",
            libc::S_IFREG => "a regular file",
            libc::S_IFLNK => "a symbolic link",
            libc::S_IFSOCK => "a socket",
            libc::S_IFIFO => "a fifo",
            libc::S_IFCHR | libc::S_IFBLK => "a device",
            _ => "an unknown kind of file",
        }
    }
}

/// The system calls the checks need, so tests can describe a machine without owning it.
pub trait Lookup {
    /// `lstat(2)`: does not follow a final symbolic link.
    fn lstat(&self, path: &Path) -> io::Result<Stat>;
    fn read_link(&self, path: &Path) -> io::Result<PathBuf>;
    /// The effective uid the checks are made for.
    fn euid(&self) -> u32;
}

/// The running system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealLookup;

impl Lookup for RealLookup {
    fn lstat(&self, path: &Path) -> io::Result<Stat> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Stat {
            uid: meta.uid(),
            mode: meta.mode(),
        })
    }
    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::read_link(path)
    }
    fn euid(&self) -> u32 {
        nix::unistd::geteuid().as_raw()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("refusing the {kind} {}: {} is {problem} (owner uid {uid}, mode {mode:04o}), so {} could {consequence}; fix: `{}`", .path.display(), .offender.display(), who(*.uid, *.mode, *.euid), fix(.offender, *.uid, *.euid), consequence = .kind.consequence())]
    Untrusted {
        kind: TrustedKind,
        /// The path nvwa was asked to trust.
        path: PathBuf,
        /// The component of it (or of a link's target) that fails the rule.
        offender: PathBuf,
        uid: u32,
        /// Permission bits only.
        mode: u32,
        problem: String,
        /// The uid the check was made for; decides the fix.
        euid: u32,
    },

    #[error("cannot check the {kind} {}: cannot inspect {}: {source}; make sure the path exists and is spelled as intended", .path.display(), .offender.display())]
    Inspect {
        kind: TrustedKind,
        path: PathBuf,
        offender: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("the {kind} {} is {found}, not {expected}; point the configuration at {expected}", .path.display())]
    WrongType {
        kind: TrustedKind,
        path: PathBuf,
        found: &'static str,
        expected: &'static str,
    },

    #[error("cannot check the {kind} {}: more than {MAX_LINKS} symbolic links to follow (a loop?); point the configuration at the real path", .path.display())]
    TooManyLinks { kind: TrustedKind, path: PathBuf },

    #[error("{path:?} {problem}; write an absolute path without `.` or `..` components or `//`, other than `/` itself")]
    BadPath {
        path: PathBuf,
        problem: &'static str,
    },

    #[error("cannot create the {kind} {} (mode {mode:04o}): {source}; create it by hand (`mkdir -m {mode:o} -p {}`) or fix the permissions of its parent", .path.display(), .path.display())]
    Create {
        kind: TrustedKind,
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
}

/// Who, besides the user nvwa runs as and root, could replace an offending component.
fn who(uid: u32, mode: u32, euid: u32) -> String {
    if uid != 0 && uid != euid {
        format!("uid {uid}")
    } else if mode & 0o002 != 0 {
        "any user".to_string()
    } else {
        "its group".to_string()
    }
}

fn fix(offender: &Path, uid: u32, euid: u32) -> String {
    let p = offender.display();
    if euid == 0 {
        format!("chown -h root:root {p} && chmod go-w {p}")
    } else if uid != 0 && uid != euid {
        // Only root could hand the path over; another place is the realistic fix.
        format!("use a path owned by uid {euid} or root instead of {p}")
    } else {
        format!("chmod go-w {p}")
    }
}

/// Checks `path` for `kind` on the running system; see the module documentation for the rules.
/// A relative path is taken relative to the current directory.
pub fn ensure_trusted(path: &Path, kind: TrustedKind) -> Result<(), TrustError> {
    let path = std::path::absolute(path).map_err(|source| TrustError::Inspect {
        kind,
        path: path.to_path_buf(),
        offender: path.to_path_buf(),
        source,
    })?;
    ensure_trusted_with(&RealLookup, &path, kind)
}

/// [`ensure_trusted`] with the ownership lookups of `lookup`; `path` must be absolute.
pub fn ensure_trusted_with(
    lookup: &dyn Lookup,
    path: &Path,
    kind: TrustedKind,
) -> Result<(), TrustError> {
    check_chain(lookup, path, path, kind)
}

/// Checks `checked`, reporting errors as about `reported` (which is `checked` or a path below it
/// that does not exist yet).
fn check_chain(
    lookup: &dyn Lookup,
    checked: &Path,
    reported: &Path,
    kind: TrustedKind,
) -> Result<(), TrustError> {
    if !checked.is_absolute() {
        return Err(TrustError::BadPath {
            path: reported.to_path_buf(),
            problem: "is not an absolute path",
        });
    }
    let euid = lookup.euid();
    let as_root = euid == 0;
    let inspect = |p: &Path| {
        lookup.lstat(p).map_err(|source| TrustError::Inspect {
            kind,
            path: reported.to_path_buf(),
            offender: p.to_path_buf(),
            source,
        })
    };
    let verdict = |p: &Path, st: Stat| judge(p, st, euid, as_root, kind, reported);

    let mut resolved = PathBuf::from("/");
    let mut current = inspect(&resolved)?;
    if as_root {
        verdict(&resolved, current)?;
    }
    let mut pending: VecDeque<OsString> = segments(checked.as_os_str()).collect();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        match name.as_bytes() {
            b"" | b"." => continue,
            b".." => {
                // `resolved` has no links in it, so dropping its last component is exact; the
                // directory above was already checked on the way down.
                resolved.pop();
                current = inspect(&resolved)?;
                continue;
            }
            _ => {}
        }
        let candidate = resolved.join(&name);
        let st = inspect(&candidate)?;
        if st.is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(TrustError::TooManyLinks {
                    kind,
                    path: reported.to_path_buf(),
                });
            }
            // Whoever owns a link can point it elsewhere; root's links are as safe as its
            // directories. The directory holding it was checked already.
            if as_root && st.uid != 0 {
                return Err(untrusted(
                    kind,
                    reported,
                    &candidate,
                    st,
                    euid,
                    format!("a symbolic link owned by uid {}, not root", st.uid),
                ));
            }
            let target = lookup
                .read_link(&candidate)
                .map_err(|source| TrustError::Inspect {
                    kind,
                    path: reported.to_path_buf(),
                    offender: candidate.clone(),
                    source,
                })?;
            if target.is_absolute() {
                resolved = PathBuf::from("/");
                current = inspect(&resolved)?;
            }
            let mut rest: VecDeque<OsString> = segments(target.as_os_str()).collect();
            rest.extend(pending);
            pending = rest;
            continue;
        }
        if as_root {
            verdict(&candidate, st)?;
        }
        resolved = candidate;
        current = st;
    }

    if !as_root {
        verdict(&resolved, current)?;
    }
    let (type_ok, expected) = if kind.is_dir() {
        (current.is_dir(), "a directory")
    } else {
        (current.is_file(), "a regular file")
    };
    if !type_ok {
        return Err(TrustError::WrongType {
            kind,
            path: reported.to_path_buf(),
            found: current.describe_type(),
            expected,
        });
    }
    Ok(())
}

/// The rule for one (non-link) component.
fn judge(
    path: &Path,
    st: Stat,
    euid: u32,
    as_root: bool,
    kind: TrustedKind,
    reported: &Path,
) -> Result<(), TrustError> {
    let problem = if st.uid != 0 && st.uid != euid {
        if as_root {
            format!("owned by uid {}, not root", st.uid)
        } else {
            format!("owned by uid {}, neither you (uid {euid}) nor root", st.uid)
        }
    } else if st.mode & 0o002 != 0 {
        if st.mode & libc::S_ISVTX != 0 {
            "world-writable (the sticky bit does not stop others from creating entries in it)"
                .to_string()
        } else {
            "world-writable".to_string()
        }
    } else if st.mode & 0o020 != 0 {
        "group-writable".to_string()
    } else {
        return Ok(());
    };
    Err(untrusted(kind, reported, path, st, euid, problem))
}

fn untrusted(
    kind: TrustedKind,
    reported: &Path,
    offender: &Path,
    st: Stat,
    euid: u32,
    problem: String,
) -> TrustError {
    TrustError::Untrusted {
        kind,
        path: reported.to_path_buf(),
        offender: offender.to_path_buf(),
        uid: st.uid,
        mode: st.mode & 0o7777,
        problem,
        euid,
    }
}

/// The `/`-separated pieces of a path as written, including empty, `.` and `..` ones
/// (`Path::components` would hide some of them).
fn segments(path: &OsStr) -> impl Iterator<Item = OsString> + '_ {
    path.as_bytes()
        .split(|&b| b == b'/')
        .map(|s| OsStr::from_bytes(s).to_os_string())
}

/// `path` if it is a plain absolute path: no `.` or `..` component, no `//`, no NUL, and not `/`
/// itself (nvwa writes into and deletes from these directories). A trailing `/` is accepted and
/// dropped from the result.
pub fn normalised_absolute(path: &Path) -> Result<PathBuf, TrustError> {
    let bytes = path.as_os_str().as_bytes();
    let bad = |problem| TrustError::BadPath {
        path: path.to_path_buf(),
        problem,
    };
    if bytes.is_empty() {
        return Err(bad("is empty"));
    }
    if bytes[0] != b'/' {
        return Err(bad("is not an absolute path"));
    }
    if bytes.contains(&0) {
        return Err(bad("contains a NUL byte"));
    }
    if bytes.windows(2).any(|w| w == b"//") {
        return Err(bad("contains `//`"));
    }
    let trimmed = bytes.strip_suffix(b"/").unwrap_or(bytes);
    let mut parts = trimmed.split(|&b| b == b'/').skip(1);
    if parts.any(|s| s == b"." || s == b"..") {
        return Err(bad("contains a `.` or `..` component"));
    }
    if trimmed.is_empty() {
        return Err(bad("is `/` itself"));
    }
    Ok(PathBuf::from(OsStr::from_bytes(trimmed)))
}

/// Makes sure `path` is a trusted directory nobody else can read: an existing one is only checked
/// with [`ensure_trusted`] (and refused if others can write to it); a missing one is created mode
/// 0700, with missing parents mode 0755, after checking that the existing part of the path is
/// trusted.
///
/// An existing directory is not tightened: it may be shared (a socket in `/run`, say), and a
/// chmod there could break other programs. Its group- and world-writable bits are refused, which
/// is what keeps others from replacing what nvwa puts there.
pub fn create_private_dir(path: &Path, kind: TrustedKind) -> Result<(), TrustError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return ensure_trusted(path, kind);
    }
    let path = normalised_absolute(path)?;
    let mut missing = Vec::new();
    let mut existing = path.clone();
    while std::fs::symlink_metadata(&existing).is_err() {
        missing.push(existing.clone());
        if !existing.pop() {
            break;
        }
    }
    // Nothing is created under a directory someone else could swap.
    check_chain(&RealLookup, &existing, &path, kind)?;
    for dir in missing.iter().rev() {
        let mode = if *dir == path { 0o700 } else { 0o755 };
        match std::fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {
                if *dir == path {
                    // The umask may have cleared bits; 0700 is wanted exactly.
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
                        |source| TrustError::Create {
                            kind,
                            path: dir.clone(),
                            mode,
                            source,
                        },
                    )?;
                }
            }
            // Created meanwhile by someone else: the final check decides whether it is fine.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(TrustError::Create {
                    kind,
                    path: dir.clone(),
                    mode,
                    source,
                })
            }
        }
    }
    ensure_trusted(&path, kind)
}

/// A directory that [`ensure_trusted`] accepts, for tests (this crate's and the CLI's) that need
/// trusted config, image or socket directories: as root, `/tmp` is not trusted (world-writable),
/// so they go next to the test binary (under the build directory) or, if that chain is not
/// root's (a checkout under /tmp), in `/run`.
pub fn trusted_scratch_base() -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    let exe = std::env::current_exe().map_err(|e| format!("the test binary's path: {e}"))?;
    // target/debug/deps/<binary> -> target/debug/nvwa-test-scratch
    let build = exe.parent().and_then(Path::parent).map(Path::to_path_buf);
    let candidates = build
        .map(|b| b.join("nvwa-test-scratch"))
        .into_iter()
        .chain([PathBuf::from("/run/nvwa-test-scratch")]);
    for base in candidates {
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&base)
            .and_then(|_| std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)));
        if let Err(e) = made {
            tried.push(format!("{}: {e}", base.display()));
            continue;
        }
        match ensure_trusted(&base, TrustedKind::SocketDir) {
            Ok(()) => return Ok(base),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(format!(
        "no trusted place for test directories: {}",
        tried.join("; ")
    ))
}

/// A temporary directory under [`trusted_scratch_base`].
#[cfg(test)]
pub(crate) fn trusted_tempdir() -> tempfile::TempDir {
    let base = trusted_scratch_base().unwrap_or_else(|e| panic!("{e}"));
    tempfile::tempdir_in(base).expect("a temporary directory")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const DIR: u32 = libc::S_IFDIR;
    const REG: u32 = libc::S_IFREG;
    const LNK: u32 = libc::S_IFLNK;

    /// A described file system: path -> (uid, st_mode), links -> target.
    struct Fake {
        euid: u32,
        nodes: HashMap<PathBuf, Stat>,
        links: HashMap<PathBuf, PathBuf>,
    }

    impl Fake {
        fn new(euid: u32) -> Fake {
            let mut f = Fake {
                euid,
                nodes: HashMap::new(),
                links: HashMap::new(),
            };
            f.node("/", 0, DIR | 0o755);
            f
        }
        fn node(&mut self, path: &str, uid: u32, mode: u32) -> &mut Fake {
            self.nodes.insert(PathBuf::from(path), Stat { uid, mode });
            self
        }
        fn link(&mut self, path: &str, uid: u32, target: &str) -> &mut Fake {
            self.node(path, uid, LNK | 0o777);
            self.links
                .insert(PathBuf::from(path), PathBuf::from(target));
            self
        }
        /// The usual root-owned /etc/nvwa with its files.
        fn etc(euid: u32) -> Fake {
            let mut f = Fake::new(euid);
            f.node("/etc", 0, DIR | 0o755)
                .node("/etc/nvwa", 0, DIR | 0o755)
                .node("/etc/nvwa/nvwa-server.yaml", 0, REG | 0o644)
                .node("/tmp", 0, DIR | 0o1777)
                .node("/home", 0, DIR | 0o755)
                .node("/home/u", 1000, DIR | 0o755)
                .node("/home/u/nvwa-server.yaml", 1000, REG | 0o644)
                .node("/usr", 0, DIR | 0o755)
                .node("/usr/sbin", 0, DIR | 0o755)
                .node("/usr/sbin/criu", 0, REG | 0o755);
            f
        }
    }

    impl Lookup for Fake {
        fn lstat(&self, path: &Path) -> io::Result<Stat> {
            self.nodes
                .get(path)
                .copied()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
            self.links
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
        }
        fn euid(&self) -> u32 {
            self.euid
        }
    }

    fn check(f: &Fake, path: &str, kind: TrustedKind) -> Result<(), TrustError> {
        ensure_trusted_with(f, Path::new(path), kind)
    }

    fn offender(e: &TrustError) -> &Path {
        match e {
            TrustError::Untrusted { offender, .. } => offender,
            other => panic!("expected Untrusted, got {other}"),
        }
    }

    #[test]
    fn root_owned_chain_is_trusted() {
        let f = Fake::etc(0);
        check(&f, "/etc/nvwa", TrustedKind::ConfigDir).unwrap();
        check(&f, "/etc/nvwa/nvwa-server.yaml", TrustedKind::ConfigFile).unwrap();
        check(&f, "/usr/sbin/criu", TrustedKind::Executable).unwrap();
        check(&f, "/etc/nvwa/", TrustedKind::ConfigDir).unwrap();
    }

    #[test]
    fn as_root_a_user_owned_dir_is_refused_with_owner_mode_and_fix() {
        let f = Fake::etc(0);
        let e = check(&f, "/home/u/nvwa-server.yaml", TrustedKind::ConfigFile).unwrap_err();
        assert_eq!(offender(&e), Path::new("/home/u"));
        let msg = e.to_string();
        for needle in [
            "config file /home/u/nvwa-server.yaml",
            "uid 1000",
            "0755",
            "chown -h root:root /home/u && chmod go-w /home/u",
            "run their program",
        ] {
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
    }

    #[test]
    fn as_root_sticky_tmp_is_not_a_trusted_parent() {
        let mut f = Fake::etc(0);
        f.node("/tmp/nvwa", 0, DIR | 0o700);
        let e = check(&f, "/tmp/nvwa", TrustedKind::ImageDir).unwrap_err();
        assert_eq!(offender(&e), Path::new("/tmp"));
        let msg = e.to_string();
        assert!(msg.contains("sticky") && msg.contains("1777"), "{msg}");
    }

    #[test]
    fn as_root_group_or_world_writable_components_are_refused() {
        for (mode, needle) in [(0o775, "group-writable"), (0o757, "world-writable")] {
            let mut f = Fake::etc(0);
            f.node("/etc/nvwa", 0, DIR | mode);
            let e = check(&f, "/etc/nvwa/nvwa-server.yaml", TrustedKind::ConfigFile).unwrap_err();
            assert_eq!(offender(&e), Path::new("/etc/nvwa"));
            assert!(e.to_string().contains(needle), "{e}");
            // The file itself too.
            let mut f = Fake::etc(0);
            f.node("/etc/nvwa/nvwa-server.yaml", 0, REG | mode);
            let e = check(&f, "/etc/nvwa/nvwa-server.yaml", TrustedKind::ConfigFile).unwrap_err();
            assert_eq!(offender(&e), Path::new("/etc/nvwa/nvwa-server.yaml"));
        }
    }

    #[test]
    fn as_root_the_root_directory_is_checked_too() {
        let mut f = Fake::etc(0);
        f.node("/", 0, DIR | 0o777);
        let e = check(&f, "/etc/nvwa", TrustedKind::ConfigDir).unwrap_err();
        assert_eq!(offender(&e), Path::new("/"));
    }

    #[test]
    fn root_owned_link_to_trusted_target_is_fine() {
        let mut f = Fake::etc(0);
        f.link("/etc/alt", 0, "nvwa") // relative target
            .link("/sbin", 0, "/usr/sbin");
        check(&f, "/etc/alt/nvwa-server.yaml", TrustedKind::ConfigFile).unwrap();
        check(&f, "/sbin/criu", TrustedKind::Executable).unwrap();
    }

    #[test]
    fn as_root_a_user_owned_link_is_refused() {
        let mut f = Fake::etc(0);
        f.link("/etc/alt", 1000, "/etc/nvwa");
        let e = check(&f, "/etc/alt", TrustedKind::ConfigDir).unwrap_err();
        assert_eq!(offender(&e), Path::new("/etc/alt"));
        assert!(
            e.to_string().contains("symbolic link owned by uid 1000"),
            "{e}"
        );
    }

    #[test]
    fn as_root_a_root_link_into_an_untrusted_place_is_refused() {
        let mut f = Fake::etc(0);
        f.link("/etc/nvwa/criu", 0, "/home/u/evil")
            .node("/home/u/evil", 1000, REG | 0o755);
        let e = check(&f, "/etc/nvwa/criu", TrustedKind::Executable).unwrap_err();
        assert_eq!(offender(&e), Path::new("/home/u"));
        assert!(e.to_string().contains("replace the program"), "{e}");
    }

    #[test]
    fn dot_dot_is_resolved_on_the_real_chain() {
        let mut f = Fake::etc(0);
        f.link("/etc/l", 0, "/home/u");
        // /etc/l/.. is /home (the link's target's parent), not /etc.
        let e = check(&f, "/etc/l/../u/nvwa-server.yaml", TrustedKind::ConfigFile).unwrap_err();
        assert_eq!(offender(&e), Path::new("/home/u"));
        check(
            &f,
            "/etc/nvwa/../nvwa/./nvwa-server.yaml",
            TrustedKind::ConfigFile,
        )
        .unwrap();
    }

    #[test]
    fn link_loops_end() {
        let mut f = Fake::etc(0);
        f.link("/etc/a", 0, "/etc/b").link("/etc/b", 0, "/etc/a");
        let e = check(&f, "/etc/a", TrustedKind::ConfigDir).unwrap_err();
        assert!(matches!(e, TrustError::TooManyLinks { .. }), "{e}");
    }

    #[test]
    fn wrong_types_and_missing_paths_are_errors() {
        let f = Fake::etc(0);
        let e = check(&f, "/etc/nvwa", TrustedKind::Executable).unwrap_err();
        assert!(
            e.to_string().contains("is a directory, not a regular file"),
            "{e}"
        );
        let e = check(&f, "/usr/sbin/criu", TrustedKind::ImageDir).unwrap_err();
        assert!(matches!(e, TrustError::WrongType { .. }), "{e}");
        let e = check(&f, "/etc/nope/x", TrustedKind::ConfigFile).unwrap_err();
        assert!(
            matches!(&e, TrustError::Inspect { offender, .. } if offender == Path::new("/etc/nope")),
            "{e}"
        );
        let e = check(&f, "etc/nvwa", TrustedKind::ConfigDir).unwrap_err();
        assert!(matches!(e, TrustError::BadPath { .. }), "{e}");
    }

    #[test]
    fn not_root_only_the_path_itself_matters() {
        let f = Fake::etc(1000);
        // Own file under a dir the user owns: fine; /tmp above does not matter.
        check(&f, "/home/u/nvwa-server.yaml", TrustedKind::ConfigFile).unwrap();
        check(&f, "/etc/nvwa", TrustedKind::ConfigDir).unwrap();
        let mut f = Fake::etc(1000);
        f.node("/tmp/mine", 1000, DIR | 0o700)
            .node("/tmp/theirs", 1001, DIR | 0o755)
            .node("/tmp/open", 1000, DIR | 0o777);
        check(&f, "/tmp/mine", TrustedKind::SocketDir).unwrap();
        let e = check(&f, "/tmp/theirs", TrustedKind::SocketDir).unwrap_err();
        assert!(
            e.to_string().contains("neither you (uid 1000) nor root"),
            "{e}"
        );
        let e = check(&f, "/tmp/open", TrustedKind::SocketDir).unwrap_err();
        assert!(e.to_string().contains("chmod go-w /tmp/open"), "{e}");
        // A link is followed to what it points at.
        f.link("/tmp/l", 1001, "/tmp/theirs");
        assert_eq!(
            offender(&check(&f, "/tmp/l", TrustedKind::SocketDir).unwrap_err()),
            Path::new("/tmp/theirs")
        );
    }

    #[test]
    fn normalised_absolute_paths() {
        for ok in [
            "/var/nvwa/running",
            "/var/nvwa/running/",
            "/a",
            "/a.b/..c/c..",
        ] {
            let p = normalised_absolute(Path::new(ok)).unwrap();
            assert_eq!(p, Path::new(ok.strip_suffix('/').unwrap_or(ok)));
        }
        for (bad, needle) in [
            ("", "empty"),
            ("var/nvwa", "absolute"),
            ("./x", "absolute"),
            ("/", "`/` itself"),
            ("/tmp/../etc/", "`..`"),
            ("/tmp/./etc", "`.`"),
            ("/tmp/..", "`..`"),
            ("/var//nvwa", "`//`"),
            ("//", "`//`"),
            ("/a\0b", "NUL"),
        ] {
            let e = normalised_absolute(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn real_tempdirs_private_dir_is_created_0700_and_trusted() {
        let base = trusted_tempdir();
        let dir = base.path().join("a").join("b");
        create_private_dir(&dir, TrustedKind::ImageDir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        // Idempotent.
        create_private_dir(&dir, TrustedKind::ImageDir).unwrap();
        ensure_trusted(&dir, TrustedKind::ImageDir).unwrap();
    }

    #[test]
    fn real_world_writable_dir_is_refused_and_left_alone() {
        let base = trusted_tempdir();
        let dir = base.path().join("open");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = create_private_dir(&dir, TrustedKind::SocketDir).unwrap_err();
        assert_eq!(offender(&e), dir.as_path());
        assert!(e.to_string().contains("world-writable"), "{e}");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777, "an existing directory is not changed");
        // Nothing is created below it either.
        let e = create_private_dir(&dir.join("sub"), TrustedKind::SocketDir).unwrap_err();
        assert_eq!(offender(&e), dir.as_path());
        assert!(!dir.join("sub").exists());
    }

    #[test]
    fn real_create_refuses_odd_paths() {
        let e = create_private_dir(Path::new("relative/dir"), TrustedKind::LogDir).unwrap_err();
        assert!(matches!(e, TrustError::BadPath { .. }), "{e}");
    }

    #[test]
    fn real_tmp_is_untrusted_for_root() {
        // Whoever runs the tests: as root /tmp (1777) must be refused; as another user a
        // world-writable directory of one's own must be.
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        if RealLookup.euid() == 0 {
            let e = ensure_trusted(dir.path(), TrustedKind::ImageDir).unwrap_err();
            assert!(e.to_string().contains("world-writable"), "{e}");
        } else {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
            let e = ensure_trusted(dir.path(), TrustedKind::ImageDir).unwrap_err();
            assert_eq!(offender(&e), dir.path());
        }
    }
}
