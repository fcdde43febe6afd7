//! The two YAML config files of the original nvwa, read with the original key names.
//!
//! Parsing is two-phase: the YAML is first read into a small, position-carrying tree
//! ([`Node`]), then every key is checked by hand. Doing the checks ourselves (instead of
//! `#[serde(deny_unknown_fields)]`) lets every error name the file, the line, the key and a fix,
//! and lets us accept the original's quirks (pids as strings, `enbale_debug_mode`).

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use crate::trust::{self, TrustError, TrustedKind};

pub const SERVER_FILE: &str = "nvwa-server.yaml";
pub const RESTORE_FILE: &str = "nvwa-restore.yaml";
/// Searched in this order when no directory is given; relative entries are relative to the cwd.
/// As root, a directory that others could write to (or whose files they could) is skipped: see
/// [`find_config_dir_with`].
pub const SEARCH_PATH: [&str; 3] = [".", "./config", "/etc/nvwa"];

/// The keys of nvwa-server.yaml.
pub const SERVER_KEYS: &[&str] = &[
    "criu_dir",
    "criu_exe",
    "kexec_exe",
    "systemd_etc",
    "log_dir",
    "socket",
    "dump_timeout",
    "restore_timeout",
    "kexec_mode",
    "metrics_file",
];
/// What each key of nvwa-server.yaml means (the man page's CONFIGURATION section).
pub const SERVER_KEY_DOCS: &[(&str, &str)] = &[
    ("criu_dir", "Directory of the images (one subdirectory per target) and of the update journal, journal.json. It must survive the kernel switch (a disk or persistent memory, never tmpfs) and, like every path here, be root's alone. Default /var/nvwa/running/."),
    ("criu_exe", "The criu binary. Default /usr/sbin/criu."),
    ("kexec_exe", "kexec-tools, used only for kernels without kexec_file_load and for openEuler's quick kexec. Default /usr/sbin/kexec."),
    ("systemd_etc", "Accepted for compatibility with the original nvwa, which wrote its service drop-ins there. This nvwa writes nothing to it: its drop-ins are generated at boot (see SERVICES). Default /etc/systemd/system/."),
    ("log_dir", "Where the criu logs of failed dumps are kept. Default /var/log/nvwa/."),
    ("socket", "The server's unix socket. Default /run/nvwa/nvwa.socket."),
    ("dump_timeout", "Seconds one target's criu dump may take before it is killed and the update rolled back. Default: 60 plus 30 per GiB of the target's resident memory."),
    ("restore_timeout", "Seconds one target's criu restore may take. Default: as for dump_timeout."),
    ("kexec_mode", "How the machine jumps into the new kernel once the images are committed: immediate (the default: nvwa jumps at once; services that are not listed die with the old kernel as in a power cut, after every filesystem was synced) or orderly (systemd stops every other unit and unmounts the filesystems first, then jumps; the listed services and pids are killed without running again). See THE JUMP."),
    ("metrics_file", "A Prometheus textfile (for node_exporter's textfile collector) that the server rewrites after every update and restore: the last update's phase, result, downtime and per-target times. Default: none."),
];

/// What each key of nvwa-restore.yaml means.
pub const RESTORE_KEY_DOCS: &[(&str, &str)] = &[
    ("pids", "The processes to preserve, by pid; each with its whole process tree."),
    ("services", "systemd services to preserve (with or without .service), each from its main process with its whole process tree; on the new boot their units take them back (see SERVICES)."),
    ("restore_net", "Carry the network configuration over: addresses, routes of every table, policy rules and the firewall (nftables tables; iptables-legacy tables where the machine has them) are saved before the targets are frozen and restored on the new boot before any target, matched to interfaces by name. Left out: what the kernel or a DHCP/RA client makes by itself, and criu's CRIU-* lock tables. What the new boot already has is skipped; an entry that conflicts or whose interface is missing is named, the targets are restored anyway, and the update ends restore_failed until a server restart restores it. Needs ip (iproute2) and, for the firewall, nft. See NETWORK STATE."),
    ("enable_quick_kexec", "Load the kernel with openEuler's quick kexec (kexec -q)."),
    ("enable_pin_memory", "Keep the targets' memory in openEuler's pinned memory across the switch."),
    ("pre_dump", "Copy the targets' memory while they still run (criu pre-dump, in passes until their dirty memory stops shrinking, at most 4), so that the freeze writes only the pages dirtied since the last pass: less downtime for applications with much memory that changes little. A target with less than 32 MiB resident is dumped in full: passes cost it more than they save. A pass that fails costs only time: that target is dumped in full. Each pass stops the targets only while criu walks their mappings (--pre-dump-mode=read: the pages are read while they run). Needs soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY); not with enable_pin_memory. Default true (false when enable_pin_memory is set)."),
    ("lazy_restore", "Restore pid targets without their memory and let a criu lazy-pages daemon fill it in from the images on demand (userfaultfd) and in the background: a process runs again before its memory is read, so the restore no longer grows with memory. The update counts as restored only once every page is in; a process whose pages could not all be copied is killed and marked lost: it ran on the new kernel since its images were taken, so they are kept but never restored again (that would replay its work). Services, and pid targets with less than 32 MiB resident (for them a daemon costs more than it saves), are always restored in full; without userfaultfd's non-cooperative events (what criu check --feature uffd-noncoop asks the kernel) every target is. With pre_dump, the pages held by the first pass come lazily too (nvwa flags them lazy in the dump's pagemaps and gives the daemon a view of the images: lazy-view/); those the dump or a later pass wrote, i.e. what changed while the passes ran, are read before the process runs. Default true."),
    ("enable_debug_mode", "Keep the images after a successful restore (also spelled enbale_debug_mode, as in the original)."),
];

/// Canonical restore keys; the original's misspelling `enbale_debug_mode` is accepted too
/// but not advertised.
pub const RESTORE_KEYS: &[&str] = &[
    "pids",
    "services",
    "restore_net",
    "enable_quick_kexec",
    "enable_pin_memory",
    "pre_dump",
    "lazy_restore",
    "enable_debug_mode",
];
const DEBUG_KEY: &str = "enable_debug_mode";
const DEBUG_KEY_ORIGINAL: &str = "enbale_debug_mode";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerConfig {
    pub criu_dir: PathBuf,
    pub criu_exe: PathBuf,
    pub kexec_exe: PathBuf,
    pub systemd_etc: PathBuf,
    pub log_dir: PathBuf,
    pub socket: PathBuf,
    /// `dump_timeout`: seconds one target's dump may take; `None` lets nvwa scale a deadline to
    /// the target's memory.
    #[serde(rename = "dump_timeout")]
    pub dump_timeout_s: Option<u64>,
    /// `restore_timeout`: the same for one target's restore.
    #[serde(rename = "restore_timeout")]
    pub restore_timeout_s: Option<u64>,
    /// `metrics_file`: where to write the Prometheus textfile, if anywhere.
    pub metrics_file: Option<PathBuf>,
    /// `kexec_mode`: how the jump happens.
    pub kexec_mode: KexecMode,
}

/// How the machine jumps into the loaded kernel after the commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KexecMode {
    /// nvwa jumps at once (`reboot(LINUX_REBOOT_CMD_KEXEC)`): the shortest downtime.
    #[default]
    Immediate,
    /// `systemctl kexec`: systemd stops the other units and unmounts filesystems first.
    Orderly,
}

/// Longest `dump_timeout` / `restore_timeout` accepted, in seconds: a day. Anything longer is
/// more likely a unit mistake (milliseconds) than a wish.
pub const MAX_TIMEOUT_S: u64 = 86_400;

impl ServerConfig {
    /// The configured paths that must be trusted before nvwa uses them as root, with their key
    /// and kind, for [`trust::ensure_trusted`] (`criu_dir` may still have to be created: see
    /// [`trust::create_private_dir`]). The socket's directory is checked by the server.
    pub fn trusted_paths(&self) -> [(&'static str, &Path, TrustedKind); 4] {
        [
            ("criu_dir", &self.criu_dir, TrustedKind::ImageDir),
            ("log_dir", &self.log_dir, TrustedKind::LogDir),
            ("criu_exe", &self.criu_exe, TrustedKind::Executable),
            ("kexec_exe", &self.kexec_exe, TrustedKind::Executable),
        ]
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            criu_dir: PathBuf::from("/var/nvwa/running/"),
            criu_exe: PathBuf::from("/usr/sbin/criu"),
            kexec_exe: PathBuf::from("/usr/sbin/kexec"),
            systemd_etc: PathBuf::from("/etc/systemd/system/"),
            log_dir: PathBuf::from("/var/log/nvwa/"),
            socket: PathBuf::from("/run/nvwa/nvwa.socket"),
            dump_timeout_s: None,
            restore_timeout_s: None,
            metrics_file: None,
            kexec_mode: KexecMode::Immediate,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RestoreConfig {
    pub pids: Vec<i32>,
    pub services: Vec<String>,
    pub restore_net: bool,
    pub enable_quick_kexec: bool,
    pub enable_pin_memory: bool,
    /// `pre_dump`: copy memory in passes before the freeze (see [`crate::pre_dump`]).
    pub pre_dump: bool,
    /// `lazy_restore`: pid targets' memory comes in after they run (see [`crate::lazy_pages`]).
    pub lazy_restore: bool,
    pub enable_debug_mode: bool,
}

/// A target with less resident memory than this is dumped and restored in full, `pre_dump` and
/// `lazy_restore` notwithstanding: their cost per target (criu's passes, a chain of images to
/// read back, a lazy-pages daemon whose filling competes with the other restores) outweighs the
/// pages they keep out of the downtime. Measured in the lab (README, "The bench"): 16 targets of
/// 4 MiB spent 25 s dumping and restoring in full, 39 s pre-dumped, 49 s also restored lazily;
/// one of 64 MiB is restored faster lazily.
pub const SMALL_TARGET_BYTES: u64 = 32 << 20;

/// Whether a target of `rss_bytes` resident memory is dumped and restored in full
/// ([`SMALL_TARGET_BYTES`]).
pub fn small_target(rss_bytes: u64) -> bool {
    rss_bytes < SMALL_TARGET_BYTES
}

impl Default for RestoreConfig {
    /// The original's defaults, except `pre_dump` and `lazy_restore`, both on: the fastest
    /// combination that stays safe on the measured data (README, "The bench"). A failed
    /// pre-dump pass only costs time; a pid target runs again before its memory is read,
    /// without userfaultfd every target is restored in full, and a process whose memory cannot
    /// be completed is killed, never replayed. Pre-dump gives way to `enable_pin_memory`.
    fn default() -> Self {
        RestoreConfig {
            pids: Vec::new(),
            services: Vec::new(),
            restore_net: false,
            enable_quick_kexec: false,
            enable_pin_memory: false,
            pre_dump: true,
            lazy_restore: true,
            enable_debug_mode: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The directory both files were read from; kept so that [`Config::reload`] re-reads the same files.
    pub dir: PathBuf,
    pub server: ServerConfig,
    pub restore: RestoreConfig,
}

impl Config {
    /// Re-read both files, so operator edits apply without restarting the server.
    pub fn reload(&self) -> Result<Config, ConfigError> {
        load(&self.dir)
    }
}

/// A place in a config file. Line 0 means the parser could not tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

impl Position {
    fn from_location(loc: Location) -> Self {
        Position {
            line: loc.line(),
            column: loc.column(),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str("unknown position")
        } else {
            write!(f, "line {}, column {}", self.line, self.column)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config directory {} does not exist or is not a directory; create it or pass an existing directory with --config-dir", .dir.display())]
    DirMissing { dir: PathBuf },

    #[error("no nvwa config found: none of {} contains {SERVER_FILE} or {RESTORE_FILE}{}; create /etc/nvwa/{SERVER_FILE} (an empty file means all defaults) or pass --config-dir <dir>", display_paths(.searched), display_skipped(.skipped))]
    NotFound {
        searched: Vec<PathBuf>,
        /// Directories holding a config file that were not used because others could write to
        /// them, with the reason.
        skipped: Vec<(PathBuf, String)>,
    },

    #[error("cannot use the config directory given with --config-dir: {source}")]
    Untrusted {
        #[source]
        source: TrustError,
    },

    #[error("cannot determine the current directory to search for config files: {source}; pass --config-dir <dir>")]
    Cwd {
        #[source]
        source: io::Error,
    },

    #[error("cannot read {}: {source}; make sure it is a regular file readable by the user running nvwa", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{}: {at}: invalid YAML: {message}; fix the syntax (the file must be a mapping of `key: value` lines)", .path.display())]
    Syntax {
        path: PathBuf,
        at: Position,
        message: String,
    },

    #[error("{}: {at}: unknown key `{key}`{hint}; valid keys are: {}", .path.display(), .valid.join(", "))]
    UnknownKey {
        path: PathBuf,
        at: Position,
        key: String,
        /// Already formatted, e.g. " (did you mean `pids`?)", or empty.
        hint: String,
        valid: &'static [&'static str],
    },

    #[error("{}: {at}: key `{key}`: {problem}", .path.display())]
    InvalidValue {
        path: PathBuf,
        at: Position,
        key: String,
        problem: String,
    },
}

fn display_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

fn display_skipped(skipped: &[(PathBuf, String)]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = skipped
        .iter()
        .map(|(dir, why)| format!("{} ({why})", dir.display()))
        .collect();
    format!(" that nvwa may trust (skipped: {})", shown.join("; "))
}

/// How a config directory or file is checked before use; [`trust::ensure_trusted`] in production,
/// a stand-in in tests.
pub type TrustCheck<'a> = &'a dyn Fn(&Path, TrustedKind) -> Result<(), TrustError>;

/// Find the config directory relative to the current directory; see [`find_config_dir_from`].
pub fn find_config_dir(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
    let cwd = std::env::current_dir().map_err(|source| ConfigError::Cwd { source })?;
    find_config_dir_from(&cwd, explicit)
}

/// [`find_config_dir_with`] checking trust on the running system.
pub fn find_config_dir_from(base: &Path, explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
    find_config_dir_with(base, explicit, &trust::ensure_trusted)
}

/// An explicit directory must exist (its files may be missing: defaults apply) and pass `trust`,
/// or it is an error. Otherwise the first [`SEARCH_PATH`] entry (relative ones joined to `base`)
/// holding either file and passing `trust` wins; one that fails it is skipped with a warning, so
/// that root running nvwa in someone else's directory does not obey their `nvwa-server.yaml`.
pub fn find_config_dir_with(
    base: &Path,
    explicit: Option<&Path>,
    trust: TrustCheck,
) -> Result<PathBuf, ConfigError> {
    if let Some(dir) = explicit {
        let dir = base.join(dir);
        if !dir.is_dir() {
            return Err(ConfigError::DirMissing { dir });
        }
        check_config_dir(&dir, trust).map_err(|source| ConfigError::Untrusted { source })?;
        return Ok(dir);
    }
    let candidates: Vec<PathBuf> = SEARCH_PATH.iter().map(|p| base.join(p)).collect();
    first_config_dir(&candidates, trust)
}

/// The directory and those of its two files that exist (a link counts, even if broken: reading
/// it would follow it).
fn check_config_dir(dir: &Path, trust: TrustCheck) -> Result<(), TrustError> {
    trust(dir, TrustedKind::ConfigDir)?;
    for file in [SERVER_FILE, RESTORE_FILE] {
        let path = dir.join(file);
        if path.symlink_metadata().is_ok() {
            trust(&path, TrustedKind::ConfigFile)?;
        }
    }
    Ok(())
}

fn first_config_dir(candidates: &[PathBuf], trust: TrustCheck) -> Result<PathBuf, ConfigError> {
    let mut skipped = Vec::new();
    for dir in candidates {
        // `exists` rather than `is_file`: an unreadable or broken file should be reported by
        // `load`, not silently skipped in favour of another directory.
        if !(dir.join(SERVER_FILE).exists() || dir.join(RESTORE_FILE).exists()) {
            continue;
        }
        match check_config_dir(dir, trust) {
            Ok(()) => return Ok(dir.clone()),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "skipping a config directory: {e}");
                skipped.push((dir.clone(), e.to_string()));
            }
        }
    }
    Err(ConfigError::NotFound {
        searched: candidates.to_vec(),
        skipped,
    })
}

/// Read both files from `dir`. A missing file means defaults for that file.
pub fn load(dir: &Path) -> Result<Config, ConfigError> {
    // Checked so that a directory removed after startup is reported on reload rather than
    // silently replaced by defaults.
    if !dir.is_dir() {
        return Err(ConfigError::DirMissing {
            dir: dir.to_path_buf(),
        });
    }
    let server_path = dir.join(SERVER_FILE);
    let restore_path = dir.join(RESTORE_FILE);
    let server = match read_optional(&server_path)? {
        Some(text) => parse_server(&text, &server_path)?,
        None => ServerConfig::default(),
    };
    let restore = match read_optional(&restore_path)? {
        Some(text) => parse_restore(&text, &restore_path)?,
        None => RestoreConfig::default(),
    };
    Ok(Config {
        dir: dir.to_path_buf(),
        server,
        restore,
    })
}

fn read_optional(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Parse `nvwa-server.yaml`; `path` is only used in error messages.
pub fn parse_server(text: &str, path: &Path) -> Result<ServerConfig, ConfigError> {
    let mut cfg = ServerConfig::default();
    for entry in parse_entries(text, path)? {
        let ctx = Ctx {
            path,
            entry: &entry,
        };
        let slot = match entry.key.as_str() {
            "dump_timeout" => {
                cfg.dump_timeout_s = ctx.seconds()?;
                continue;
            }
            "restore_timeout" => {
                cfg.restore_timeout_s = ctx.seconds()?;
                continue;
            }
            "metrics_file" => {
                cfg.metrics_file = ctx.absolute_path()?;
                continue;
            }
            "kexec_mode" => {
                cfg.kexec_mode = ctx.kexec_mode()?;
                continue;
            }
            "criu_dir" => &mut cfg.criu_dir,
            "criu_exe" => &mut cfg.criu_exe,
            "kexec_exe" => &mut cfg.kexec_exe,
            "systemd_etc" => &mut cfg.systemd_etc,
            "log_dir" => &mut cfg.log_dir,
            "socket" => &mut cfg.socket,
            _ => {
                return Err(unknown_key(
                    path,
                    &entry,
                    SERVER_KEYS,
                    RESTORE_KEYS,
                    RESTORE_FILE,
                ))
            }
        };
        if let Some(p) = ctx.absolute_path()? {
            *slot = p;
        }
    }
    Ok(cfg)
}

/// Parse `nvwa-restore.yaml`; `path` is only used in error messages.
pub fn parse_restore(text: &str, path: &Path) -> Result<RestoreConfig, ConfigError> {
    let mut cfg = RestoreConfig::default();
    // The first debug-mode spelling seen, to detect the two spellings disagreeing.
    let mut debug_seen: Option<(String, Position, bool)> = None;
    let mut pre_dump_given = false;
    for entry in parse_entries(text, path)? {
        let ctx = Ctx {
            path,
            entry: &entry,
        };
        match entry.key.as_str() {
            "pids" => cfg.pids = ctx.pids()?,
            "services" => cfg.services = ctx.services()?,
            "restore_net" => cfg.restore_net = ctx.bool()?,
            "enable_quick_kexec" => cfg.enable_quick_kexec = ctx.bool()?,
            "enable_pin_memory" => cfg.enable_pin_memory = ctx.bool()?,
            "pre_dump" => {
                cfg.pre_dump = ctx.bool()?;
                pre_dump_given = true;
            }
            "lazy_restore" => cfg.lazy_restore = ctx.bool()?,
            DEBUG_KEY | DEBUG_KEY_ORIGINAL => {
                let value = ctx.bool()?;
                if let Some((other, at, previous)) = &debug_seen {
                    if *previous != value {
                        return Err(ctx.invalid(format!(
                            "is {value} but `{other}` ({at}) is {previous}; both spellings set the same option, keep only `{DEBUG_KEY}`"
                        )));
                    }
                }
                debug_seen = Some((entry.key.clone(), entry.key_at, value));
                cfg.enable_debug_mode = value;
            }
            _ => {
                return Err(unknown_key(
                    path,
                    &entry,
                    RESTORE_KEYS,
                    SERVER_KEYS,
                    SERVER_FILE,
                ))
            }
        }
    }
    // Pin memory keeps the pages in place, leaving pre-dump nothing to copy ahead: the default
    // gives way to it. Both set to true is refused (policy::Refusal::PreDumpWithPinMemory).
    if cfg.enable_pin_memory && !pre_dump_given {
        cfg.pre_dump = false;
    }
    Ok(cfg)
}

fn unknown_key(
    path: &Path,
    entry: &Entry,
    valid: &'static [&'static str],
    other_file_keys: &[&str],
    other_file: &str,
) -> ConfigError {
    let hint = if other_file_keys.contains(&entry.key.as_str()) {
        format!(" (`{}` belongs in {other_file})", entry.key)
    } else {
        match closest_key(&entry.key, valid) {
            Some(k) => format!(" (did you mean `{k}`?)"),
            None => String::new(),
        }
    };
    ConfigError::UnknownKey {
        path: path.to_path_buf(),
        at: entry.key_at,
        key: entry.key.clone(),
        hint,
        valid,
    }
}

/// The valid key nearest to `key`, if it is close enough to be an obvious typo.
fn closest_key(key: &str, valid: &[&'static str]) -> Option<&'static str> {
    let key = key.to_ascii_lowercase();
    let limit = (key.chars().count() / 3).max(1);
    valid
        .iter()
        .map(|v| (edit_distance(&key, v), *v))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

/// Levenshtein distance; the inputs are short keys, so the simple O(n*m) version is fine.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Phase 1: YAML into a position-carrying tree.

/// A YAML value, reduced to what the config checks need to tell apart.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    /// Nested mappings are never valid in these files; their content is skipped.
    Map,
}

impl Node {
    /// How the value reads in an error message.
    fn describe(&self) -> String {
        match self {
            Node::Null => "nothing".to_string(),
            Node::Bool(b) => format!("`{b}`"),
            Node::Int(n) => format!("the number {n}"),
            Node::Float(x) => format!("the number {x}"),
            Node::Str(s) => format!("the string {s:?}"),
            Node::Seq(_) => "a list".to_string(),
            Node::Map => "a mapping".to_string(),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Node::Map)
    }
}

/// The top level of a config file: `key: value` pairs in file order.
struct Document(Vec<(Spanned<String>, Spanned<Node>)>);

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DocVisitor;
        impl<'de> Visitor<'de> for DocVisitor {
            type Value = Document;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of `key: value` lines")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Document(entries))
            }
        }
        d.deserialize_map(DocVisitor)
    }
}

struct Entry {
    key: String,
    key_at: Position,
    value: Node,
    value_at: Position,
}

fn parse_entries(text: &str, path: &Path) -> Result<Vec<Entry>, ConfigError> {
    // `Option` so that an empty or comment-only file is valid and means "all defaults".
    let doc: Option<Document> = serde_saphyr::from_str(text).map_err(|e| syntax_error(path, &e))?;
    let entries = doc.map(|d| d.0).unwrap_or_default();
    Ok(entries
        .into_iter()
        .map(|(k, v)| Entry {
            key: k.value,
            key_at: Position::from_location(k.referenced),
            value: v.value,
            value_at: Position::from_location(v.referenced),
        })
        .collect())
}

fn syntax_error(path: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let at = e
        .location()
        .map(Position::from_location)
        .unwrap_or(Position { line: 0, column: 0 });
    // The plain message ends with " at line L, column C", which we already show in front.
    let message = e.without_snippet().to_string();
    let suffix = format!(" at line {}, column {}", at.line, at.column);
    let message = message
        .strip_suffix(&suffix)
        .unwrap_or(&message)
        .to_string();
    ConfigError::Syntax {
        path: path.to_path_buf(),
        at,
        message,
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 2: typed values, each error pointing at the key.

struct Ctx<'a> {
    path: &'a Path,
    entry: &'a Entry,
}

impl Ctx<'_> {
    fn invalid(&self, problem: String) -> ConfigError {
        self.invalid_at(self.entry.value_at, problem)
    }

    fn invalid_at(&self, at: Position, problem: String) -> ConfigError {
        ConfigError::InvalidValue {
            path: self.path.to_path_buf(),
            at,
            key: self.entry.key.clone(),
            problem,
        }
    }

    /// `key:` with no value keeps the default, as the original's example files rely on it.
    fn bool(&self) -> Result<bool, ConfigError> {
        match &self.entry.value {
            Node::Null => Ok(false),
            Node::Bool(b) => Ok(*b),
            other => Err(self.invalid(format!(
                "expected true or false (unquoted), found {}",
                other.describe()
            ))),
        }
    }

    /// `None` keeps the default.
    fn absolute_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        match &self.entry.value {
            Node::Null => Ok(None),
            Node::Str(s) if s.is_empty() => Err(self.invalid(
                "is an empty path; remove the line to use the default or give an absolute path"
                    .to_string(),
            )),
            // The server runs from systemd with cwd "/", so a relative path would silently
            // point somewhere other than where the operator meant.
            Node::Str(s) if !s.starts_with('/') => Err(self.invalid(format!(
                "`{s}` is not an absolute path; write it starting with `/`"
            ))),
            // nvwa deletes below criu_dir and trusts what it finds there: `/`, or a path whose
            // `..` makes it mean something other than it reads (`/tmp/../etc`), is refused.
            Node::Str(s) => match trust::normalised_absolute(Path::new(s)) {
                Ok(_) => Ok(Some(PathBuf::from(s))),
                Err(e) => Err(self.invalid(e.to_string())),
            },
            other => Err(self.invalid(format!(
                "expected an absolute path, found {}",
                other.describe()
            ))),
        }
    }

    /// `immediate` or `orderly`; no value keeps the default.
    fn kexec_mode(&self) -> Result<KexecMode, ConfigError> {
        match &self.entry.value {
            Node::Null => Ok(KexecMode::default()),
            Node::Str(s) if s == "immediate" => Ok(KexecMode::Immediate),
            Node::Str(s) if s == "orderly" => Ok(KexecMode::Orderly),
            other => Err(self.invalid(format!(
                "expected immediate or orderly, found {}",
                other.describe()
            ))),
        }
    }

    /// A whole number of seconds in 1..=[`MAX_TIMEOUT_S`]; `None` (no value) keeps the default.
    fn seconds(&self) -> Result<Option<u64>, ConfigError> {
        let found = match &self.entry.value {
            Node::Null => return Ok(None),
            Node::Int(n) => match u64::try_from(*n) {
                Ok(s) if (1..=MAX_TIMEOUT_S).contains(&s) => return Ok(Some(s)),
                _ => format!("{n} seconds"),
            },
            other => other.describe(),
        };
        Err(self.invalid(format!(
            "expected a whole number of seconds from 1 to {MAX_TIMEOUT_S}, found {found}; \
             remove the line to let nvwa scale the deadline to the target's memory"
        )))
    }

    fn list(&self, example: &str) -> Result<&[Spanned<Node>], ConfigError> {
        match &self.entry.value {
            Node::Null => Ok(&[]),
            Node::Seq(items) => Ok(items),
            other => Err(self.invalid(format!(
                "expected a list (e.g. `{}: [{example}]` or one `- item` per line), found {}",
                self.entry.key,
                other.describe()
            ))),
        }
    }

    fn pids(&self) -> Result<Vec<i32>, ConfigError> {
        let mut pids = Vec::new();
        let mut seen = BTreeSet::new();
        for item in self.list("1234, \"5678\"")? {
            let at = Position::from_location(item.referenced);
            let pid = parse_pid(&item.value).map_err(|p| self.invalid_at(at, p))?;
            // Dumping one process twice would fail half-way through an update.
            if !seen.insert(pid) {
                return Err(self.invalid_at(at, format!("pid {pid} is listed twice")));
            }
            pids.push(pid);
        }
        Ok(pids)
    }

    fn services(&self) -> Result<Vec<String>, ConfigError> {
        let mut services = Vec::new();
        for item in self.list("nginx, redis")? {
            let at = Position::from_location(item.referenced);
            let name = parse_service(&item.value).map_err(|p| self.invalid_at(at, p))?;
            if services.contains(&name) {
                return Err(self.invalid_at(at, format!("service `{name}` is listed twice")));
            }
            services.push(name);
        }
        Ok(services)
    }
}

/// A pid as a number or a numeric string (the original accepted both).
fn parse_pid(node: &Node) -> Result<i32, String> {
    let n: i128 = match node {
        Node::Int(n) => *n,
        Node::Str(s) => {
            let digits = s.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{s:?} is not a process id; write a positive number such as 1234"
                ));
            }
            // Too many digits for i128 is out of range too.
            digits.parse().unwrap_or(i128::MAX)
        }
        other => {
            return Err(format!(
                "expected a process id (a positive number), found {}",
                other.describe()
            ))
        }
    };
    match i32::try_from(n) {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(format!(
            "{n} is not a valid process id; pids are between 1 and {}",
            i32::MAX
        )),
    }
}

/// A systemd service name; the `.service` suffix is optional.
fn parse_service(node: &Node) -> Result<String, String> {
    let Node::Str(raw) = node else {
        return Err(format!(
            "expected a service name, found {}; quote it if the name is a number",
            node.describe()
        ));
    };
    let name = raw.strip_suffix(".service").unwrap_or(raw);
    let problem = if name.is_empty() {
        Some("is empty")
    } else if name.contains('/') {
        Some("contains `/`")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace or control characters")
    } else if name.starts_with('-') {
        // Would be taken as an option by systemctl.
        Some("starts with `-`")
    } else {
        None
    };
    match problem {
        Some(why) => Err(format!(
            "service name {raw:?} {why}; write the unit name as shown by `systemctl list-units --type=service`, e.g. nginx"
        )),
        None => Ok(name.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn p() -> PathBuf {
        PathBuf::from("/etc/nvwa/test.yaml")
    }

    const ORIGINAL_SERVER: &str = "\
criu_dir: /var/nvwa/running/   # images, one subfolder per pid or service
criu_exe: /usr/sbin/criu
kexec_exe: /usr/sbin/kexec
systemd_etc: /etc/systemd/system/
log_dir: /etc/nvwa/log/
";

    const ORIGINAL_RESTORE: &str = "\
pids:            # list of pids (as strings or numbers) to checkpoint
services:        # list of systemd service names (without .service)
restore_net: false
enable_quick_kexec: false
enable_pin_memory: false
enbale_debug_mode: false   # sic
";

    #[test]
    fn the_option_texts_name_the_small_target_size() {
        let size = format!("less than {} MiB resident", SMALL_TARGET_BYTES >> 20);
        for key in ["pre_dump", "lazy_restore"] {
            let (_, text) = RESTORE_KEY_DOCS.iter().find(|(k, _)| *k == key).unwrap();
            assert!(text.contains(&size), "{key}: {text}");
        }
        assert!(small_target(SMALL_TARGET_BYTES - 1) && !small_target(SMALL_TARGET_BYTES));
    }

    #[test]
    fn original_server_file_gives_defaults() {
        let cfg = parse_server(ORIGINAL_SERVER, &p()).unwrap();
        // The original kept its logs in /etc/nvwa/log/; ours default to /var/log/nvwa/.
        let expected = ServerConfig {
            log_dir: PathBuf::from("/etc/nvwa/log/"),
            ..ServerConfig::default()
        };
        assert_eq!(cfg, expected);
        assert_eq!(cfg.socket, PathBuf::from("/run/nvwa/nvwa.socket"));
    }

    #[test]
    fn original_restore_file_gives_defaults() {
        assert_eq!(
            parse_restore(ORIGINAL_RESTORE, &p()).unwrap(),
            RestoreConfig::default()
        );
    }

    #[test]
    fn pre_dump_is_on_by_default_and_gives_way_to_pin_memory_unless_given() {
        let p = Path::new("/etc/nvwa/nvwa-restore.yaml");
        let d = parse_restore("pids: [1]\n", p).unwrap();
        assert!(d.pre_dump && d.lazy_restore);
        let pin = parse_restore("pids: [1]\nenable_pin_memory: true\n", p).unwrap();
        assert!(!pin.pre_dump);
        // Given explicitly, both stay true: the update refuses the pair, naming both keys.
        let both =
            parse_restore("pids: [1]\npre_dump: true\nenable_pin_memory: true\n", p).unwrap();
        assert!(both.pre_dump && both.enable_pin_memory);
        let late =
            parse_restore("pids: [1]\nenable_pin_memory: true\npre_dump: true\n", p).unwrap();
        assert!(late.pre_dump);
    }

    #[test]
    fn original_tutorial_restore_file() {
        let text = "pids:\nservices:\n  - nginx\nrestore_net: false\nenable_quick_kexec: false\nenable_pin_memory: false\nenbale_debug_mode: true\n";
        let cfg = parse_restore(text, &p()).unwrap();
        assert_eq!(cfg.services, vec!["nginx".to_string()]);
        assert!(cfg.enable_debug_mode);
    }

    #[test]
    fn server_overrides_and_socket_extension() {
        let text = "criu_dir: /srv/images\nsocket: /run/other.sock\n";
        let cfg = parse_server(text, &p()).unwrap();
        assert_eq!(cfg.criu_dir, PathBuf::from("/srv/images"));
        assert_eq!(cfg.socket, PathBuf::from("/run/other.sock"));
        assert_eq!(cfg.criu_exe, ServerConfig::default().criu_exe);
    }

    #[test]
    fn server_relative_path_is_refused() {
        let err = parse_server("log_dir: log/\n", &p())
            .unwrap_err()
            .to_string();
        assert!(err.contains("log_dir") && err.contains("absolute"), "{err}");
    }

    #[test]
    fn misspelled_and_correct_debug_key() {
        assert!(
            parse_restore("enbale_debug_mode: true\n", &p())
                .unwrap()
                .enable_debug_mode
        );
        assert!(
            parse_restore("enable_debug_mode: true\n", &p())
                .unwrap()
                .enable_debug_mode
        );
    }

    #[test]
    fn both_debug_spellings_agreeing_is_fine() {
        let text = "enable_debug_mode: true\nenbale_debug_mode: true\n";
        assert!(parse_restore(text, &p()).unwrap().enable_debug_mode);
    }

    #[test]
    fn both_debug_spellings_disagreeing_is_an_error() {
        let text = "enable_debug_mode: true\nenbale_debug_mode: false\n";
        let err = parse_restore(text, &p()).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("enable_debug_mode") && err.contains("enbale_debug_mode"));
    }

    #[test]
    fn pids_as_numbers_and_strings() {
        let text = "pids:\n  - 12\n  - \"34\"\n  - '56'\nservices: [nginx.service, redis]\n";
        let cfg = parse_restore(text, &p()).unwrap();
        assert_eq!(cfg.pids, vec![12, 34, 56]);
        assert_eq!(cfg.services, vec!["nginx".to_string(), "redis".to_string()]);
    }

    #[test]
    fn bad_pids_are_refused_with_their_line() {
        for (item, needle) in [
            ("abc", "\"abc\""),
            ("'12a'", "12a"),
            ("0", "0 is not a valid"),
            ("-5", "-5 is not a valid"),
            ("'-5'", "-5"),
            ("99999999999", "99999999999"),
            ("1.5", "1.5"),
            ("true", "`true`"),
        ] {
            let text = format!("pids:\n  - 1\n  - {item}\n");
            let err = parse_restore(&text, &p()).unwrap_err().to_string();
            assert!(err.contains("line 3"), "{item}: {err}");
            assert!(err.contains("`pids`"), "{item}: {err}");
            assert!(err.contains(needle), "{item}: {err}");
        }
    }

    #[test]
    fn duplicate_pid_is_refused() {
        let err = parse_restore("pids: [7, '7']\n", &p()).unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
    }

    #[test]
    fn bad_service_names_are_refused() {
        for name in ["'a/b'", "'a b'", "''", "'.service'", "'-x'", "42"] {
            let text = format!("services:\n  - {name}\n");
            let err = parse_restore(&text, &p()).unwrap_err().to_string();
            assert!(
                err.contains("line 2") && err.contains("services"),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn unknown_key_names_path_line_key_and_suggestion() {
        let text = "restore_net: true\npid:\n  - 1\n";
        let err = parse_restore(text, Path::new("/etc/nvwa/nvwa-restore.yaml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/etc/nvwa/nvwa-restore.yaml"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("`pid`"), "{msg}");
        assert!(msg.contains("did you mean `pids`"), "{msg}");
    }

    #[test]
    fn unknown_key_far_from_any_gets_no_suggestion() {
        let msg = parse_server("colour: blue\n", &p())
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("did you mean"), "{msg}");
        assert!(msg.contains("criu_dir"), "lists valid keys: {msg}");
    }

    #[test]
    fn key_from_the_other_file_says_where_it_belongs() {
        let msg = parse_restore("criu_dir: /x\n", &p())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("belongs in nvwa-server.yaml"), "{msg}");
    }

    #[test]
    fn wrong_types_are_errors_naming_the_key() {
        for (text, key, line) in [
            ("restore_net: maybe\n", "restore_net", "line 1"),
            ("services: []\npids: 5\n", "pids", "line 2"),
            ("enable_pin_memory: 'true'\n", "enable_pin_memory", "line 1"),
            ("services: {a: 1}\n", "services", "line 1"),
        ] {
            let msg = parse_restore(text, &p()).unwrap_err().to_string();
            assert!(msg.contains(key) && msg.contains(line), "{text}: {msg}");
            assert!(msg.contains("/etc/nvwa/test.yaml"), "{msg}");
        }
        let msg = parse_server("criu_exe: [a]\n", &p())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("criu_exe") && msg.contains("a list"), "{msg}");
    }

    #[test]
    fn syntax_errors_name_path_and_line() {
        for text in [
            "pids: [1,\n",
            "just a string\n",
            "- 1\n",
            "pids: []\npids: [2]\n",
        ] {
            let err = parse_restore(text, &p()).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ConfigError::Syntax { .. }), "{text}: {msg}");
            assert!(
                msg.contains("/etc/nvwa/test.yaml") && msg.contains("line "),
                "{msg}"
            );
        }
    }

    #[test]
    fn empty_and_comment_only_files_are_defaults() {
        for text in ["", "\n\n", "# nothing here\n  # indented comment\n"] {
            assert_eq!(parse_restore(text, &p()).unwrap(), RestoreConfig::default());
            assert_eq!(parse_server(text, &p()).unwrap(), ServerConfig::default());
        }
    }

    #[test]
    fn load_missing_files_are_defaults_and_reload_rereads() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = load(dir.path()).unwrap();
        assert_eq!(cfg.server, ServerConfig::default());
        assert_eq!(cfg.restore, RestoreConfig::default());
        fs::write(dir.path().join(RESTORE_FILE), "pids: [42]\n").unwrap();
        assert_eq!(cfg.reload().unwrap().restore.pids, vec![42]);
        let gone = dir.path().join("gone");
        assert!(matches!(load(&gone), Err(ConfigError::DirMissing { .. })));
    }

    #[test]
    fn load_reports_invalid_file_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(SERVER_FILE), "criu_dri: /x\n").unwrap();
        let msg = load(dir.path()).unwrap_err().to_string();
        assert!(msg.contains(&dir.path().join(SERVER_FILE).display().to_string()));
        assert!(msg.contains("did you mean `criu_dir`"), "{msg}");
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be cannot be read even by root, unlike a chmod 000
        // file, so this test also works when run as root.
        fs::create_dir(dir.path().join(RESTORE_FILE)).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.to_string().contains(RESTORE_FILE));
    }

    /// Trusts everything: for tests of the search order itself.
    fn trust_all(_: &Path, _: TrustedKind) -> Result<(), TrustError> {
        Ok(())
    }

    /// Refuses `bad` (or, with `below`, whatever lies under it), the way `ensure_trusted`
    /// refuses a user's directory.
    fn refuse(
        bad: &Path,
        below: bool,
    ) -> impl Fn(&Path, TrustedKind) -> Result<(), TrustError> + '_ {
        move |p: &Path, kind| {
            if p == bad || (below && p.starts_with(bad)) {
                Err(TrustError::Untrusted {
                    kind,
                    path: p.to_path_buf(),
                    offender: bad.to_path_buf(),
                    uid: 1000,
                    mode: 0o777,
                    problem: "owned by uid 1000, not root".into(),
                    euid: 0,
                })
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn search_path_order() {
        let base = tempfile::tempdir().unwrap();
        let b = base.path();
        fs::create_dir(b.join("config")).unwrap();
        fs::write(b.join("config").join(RESTORE_FILE), "").unwrap();
        let found = find_config_dir_with(b, None, &trust_all).unwrap();
        assert_eq!(found, b.join("./config"));
        fs::write(b.join(SERVER_FILE), "").unwrap();
        assert_eq!(
            find_config_dir_with(b, None, &trust_all).unwrap(),
            b.join(".")
        );
    }

    #[test]
    fn untrusted_candidates_are_skipped_and_the_search_goes_on() {
        // Finding 1: root running nvwa in a user's directory must not obey its config.
        let base = tempfile::tempdir().unwrap();
        let b = base.path();
        fs::create_dir(b.join("config")).unwrap();
        fs::write(b.join(SERVER_FILE), "criu_exe: /home/u/evil\n").unwrap();
        fs::write(b.join("config").join(SERVER_FILE), "").unwrap();
        // `.` refused.
        let dot = b.join(".");
        let refusing = refuse(&dot, false);
        assert_eq!(
            find_config_dir_with(b, None, &refusing).unwrap(),
            b.join("./config")
        );
        // Only the file refused: the directory is skipped as well.
        let file = b.join(".").join(SERVER_FILE);
        let refusing = refuse(&file, false);
        assert_eq!(
            find_config_dir_with(b, None, &refusing).unwrap(),
            b.join("./config")
        );
        // Every candidate refused: the error names them and why.
        let refusing = refuse(b, true);
        let err = find_config_dir_with(b, None, &refusing).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, ConfigError::NotFound { skipped, .. } if skipped.len() == 2),
            "{msg}"
        );
        assert!(msg.contains("skipped") && msg.contains("uid 1000"), "{msg}");
    }

    #[test]
    fn an_untrusted_explicit_dir_is_an_error() {
        let base = tempfile::tempdir().unwrap();
        let b = base.path();
        fs::create_dir(b.join("conf")).unwrap();
        let conf = b.join("conf");
        let refusing = refuse(&conf, false);
        let err = find_config_dir_with(b, Some(Path::new("conf")), &refusing).unwrap_err();
        assert!(matches!(err, ConfigError::Untrusted { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("--config-dir") && msg.contains(&conf.display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn explicit_dir_must_exist() {
        let base = tempfile::tempdir().unwrap();
        let b = base.path();
        fs::create_dir(b.join("conf")).unwrap();
        fs::write(b.join(SERVER_FILE), "").unwrap();
        assert_eq!(
            find_config_dir_with(b, Some(Path::new("conf")), &trust_all).unwrap(),
            b.join("conf")
        );
        let err = find_config_dir_with(b, Some(Path::new("nope")), &trust_all).unwrap_err();
        assert!(matches!(err, ConfigError::DirMissing { .. }));
        assert!(err.to_string().contains("--config-dir"));
    }

    #[test]
    fn real_world_writable_cwd_config_is_not_used() {
        // The lab's scenario on the real system, as whoever runs the tests: a world-writable
        // directory is refused for root (and for any other user, as the path itself).
        let base = crate::trust::trusted_tempdir();
        let b = base.path();
        fs::set_permissions(b, fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(b.join(SERVER_FILE), "criu_exe: /home/u/evil\n").unwrap();
        match find_config_dir_from(b, None) {
            Ok(dir) => assert!(!dir.starts_with(b), "used {}", dir.display()),
            Err(ConfigError::NotFound { skipped, .. }) => {
                assert_eq!(skipped.len(), 1, "{skipped:?}");
                assert!(skipped[0].1.contains("world-writable"), "{skipped:?}");
            }
            Err(e) => panic!("unexpected: {e}"),
        }
        let err = find_config_dir_from(b, Some(Path::new("."))).unwrap_err();
        assert!(matches!(err, ConfigError::Untrusted { .. }), "{err}");
        // The same directory made private is used.
        fs::set_permissions(b, fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(find_config_dir_from(b, None).unwrap(), b.join("."));
    }

    #[test]
    fn nothing_found_lists_searched_dirs_and_fix() {
        let base = tempfile::tempdir().unwrap();
        let dirs = vec![base.path().join("a"), base.path().join("b")];
        let msg = first_config_dir(&dirs, &trust_all).unwrap_err().to_string();
        assert!(msg.contains(&dirs[0].display().to_string()));
        assert!(msg.contains(&dirs[1].display().to_string()));
        assert!(msg.contains("/etc/nvwa/nvwa-server.yaml") && msg.contains("--config-dir"));
        assert!(!msg.contains("skipped"), "{msg}");
    }

    #[test]
    fn criu_dir_root_and_unnormalised_paths_are_refused() {
        // Finding 5: `criu_dir: /` or `/tmp/../etc/` would let init delete system directories.
        for (text, key) in [
            ("criu_dir: /\n", "criu_dir"),
            ("criu_dir: /tmp/../etc/\n", "criu_dir"),
            ("log_dir: /var/./log\n", "log_dir"),
            ("criu_exe: /usr//sbin/criu\n", "criu_exe"),
            ("kexec_exe: /usr/sbin/../../tmp/kexec\n", "kexec_exe"),
            ("socket: /\n", "socket"),
        ] {
            let err = parse_server(text, &p()).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ConfigError::InvalidValue { .. }), "{msg}");
            assert!(
                msg.contains("/etc/nvwa/test.yaml")
                    && msg.contains("line 1")
                    && msg.contains(&format!("`{key}`")),
                "{msg}"
            );
        }
    }

    #[test]
    fn the_jump_is_immediate_unless_orderly_is_asked_for() {
        assert_eq!(ServerConfig::default().kexec_mode, KexecMode::Immediate);
        let cfg = parse_server("kexec_mode: orderly\n", &p()).unwrap();
        assert_eq!(cfg.kexec_mode, KexecMode::Orderly);
        let cfg = parse_server("kexec_mode:\n", &p()).unwrap();
        assert_eq!(cfg.kexec_mode, KexecMode::Immediate);
        let msg = parse_server("kexec_mode: graceful\n", &p())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`kexec_mode`") && msg.contains("expected immediate or orderly"),
            "{msg}"
        );
    }

    #[test]
    fn timeouts_are_optional_whole_seconds() {
        let cfg = parse_server("dump_timeout: 600\nrestore_timeout: 86400\n", &p()).unwrap();
        assert_eq!(cfg.dump_timeout_s, Some(600));
        assert_eq!(cfg.restore_timeout_s, Some(86400));
        let cfg = parse_server("dump_timeout:\n", &p()).unwrap();
        assert_eq!(cfg.dump_timeout_s, None);
        assert_eq!(ServerConfig::default().restore_timeout_s, None);
        for (value, needle) in [
            ("0", "0 seconds"),
            ("-5", "-5 seconds"),
            ("86401", "86401 seconds"),
            ("1.5", "1.5"),
            ("'60'", "\"60\""),
            ("[60]", "a list"),
        ] {
            let text = format!("criu_dir: /x\nrestore_timeout: {value}\n");
            let msg = parse_server(&text, &p()).unwrap_err().to_string();
            assert!(
                msg.contains("line 2") && msg.contains("`restore_timeout`") && msg.contains(needle),
                "{value}: {msg}"
            );
            assert!(msg.contains("from 1 to 86400"), "{msg}");
        }
    }

    #[test]
    fn timeout_keys_get_suggestions_and_belong_to_the_server_file() {
        let msg = parse_server("dump_timout: 5\n", &p())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("did you mean `dump_timeout`"), "{msg}");
        let msg = parse_restore("restore_timeout: 5\n", &p())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("belongs in nvwa-server.yaml"), "{msg}");
    }

    #[test]
    fn trusted_paths_name_their_keys() {
        let cfg = ServerConfig::default();
        let keys: Vec<&str> = cfg.trusted_paths().iter().map(|(k, _, _)| *k).collect();
        assert_eq!(keys, ["criu_dir", "log_dir", "criu_exe", "kexec_exe"]);
        assert_eq!(cfg.trusted_paths()[2].1, Path::new("/usr/sbin/criu"));
    }

    #[test]
    fn closest_key_suggestions() {
        assert_eq!(closest_key("pid", RESTORE_KEYS), Some("pids"));
        assert_eq!(
            closest_key("RESTORE_NET", RESTORE_KEYS),
            Some("restore_net")
        );
        assert_eq!(closest_key("sockets", SERVER_KEYS), Some("socket"));
        assert_eq!(closest_key("zzz", RESTORE_KEYS), None);
    }

    proptest! {
        #[test]
        fn pids_round_trip(
            pids in proptest::collection::hash_set(1..i32::MAX, 0..20)
                .prop_map(|s| s.into_iter().collect::<Vec<i32>>()),
            quote in proptest::collection::vec(0u8..3, 20),
        ) {
            let mut text = String::from("pids:\n");
            for (pid, q) in pids.iter().zip(quote.iter()) {
                match q {
                    0 => text.push_str(&format!("  - {pid}\n")),
                    1 => text.push_str(&format!("  - \"{pid}\"\n")),
                    _ => text.push_str(&format!("  - '{pid}'\n")),
                }
            }
            let cfg = parse_restore(&text, &p()).unwrap();
            prop_assert_eq!(cfg.pids, pids);
        }
    }

    #[test]
    fn every_key_is_documented() {
        for (keys, docs) in [
            (SERVER_KEYS, SERVER_KEY_DOCS),
            (RESTORE_KEYS, RESTORE_KEY_DOCS),
        ] {
            let documented: Vec<&str> = docs.iter().map(|(k, _)| *k).collect();
            assert_eq!(keys, documented.as_slice());
        }
    }
}
