//! `nvwa check [<version>]`: a preflight that says, before anything is dumped, whether an
//! update can work on this machine, and how to fix what would stop it.
//!
//! Everything read from the machine goes through [`System`], so the rules are unit-tested
//! with a double. Kernel files are the exception: they are looked up under an explicit root.
//! Whether the targets can be preserved is decided by [`crate::policy`], the same rules
//! `nvwa update` applies: where update refuses, check says FAIL (except for an empty target
//! list, which check only warns about).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::boot::{self, BootError};
use crate::config::{Config, RESTORE_FILE, SERVER_FILE};
use crate::net;
use crate::pinmem::{self, KernelFeatures};
use crate::policy::{self, FsView, ProcView, RealFs, RealProcs, Refusal};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckLine {
    pub requirement: String,
    pub verdict: Verdict,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl CheckLine {
    fn ok(requirement: impl Into<String>, detail: impl Into<String>) -> Self {
        CheckLine {
            requirement: requirement.into(),
            verdict: Verdict::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(
        requirement: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        CheckLine {
            verdict: Verdict::Warn,
            fix: Some(fix.into()),
            ..CheckLine::ok(requirement, detail)
        }
    }

    fn fail(
        requirement: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        CheckLine {
            verdict: Verdict::Fail,
            fix: Some(fix.into()),
            ..CheckLine::ok(requirement, detail)
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub lines: Vec<CheckLine>,
}

impl CheckReport {
    /// True if any requirement failed; warnings alone do not stop an update.
    pub fn failed(&self) -> bool {
        self.lines.iter().any(|l| l.verdict == Verdict::Fail)
    }

    /// One line per requirement, the verdict first so the output can be scanned or grepped.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            let verdict = match line.verdict {
                Verdict::Ok => "ok",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            out.push_str(&format!(
                "{verdict:<4} {}: {}",
                line.requirement, line.detail
            ));
            if let (Some(fix), false) = (&line.fix, line.verdict == Verdict::Ok) {
                out.push_str(&format!(" (fix: {fix})"));
            }
            out.push('\n');
        }
        let count = |v| self.lines.iter().filter(|l| l.verdict == v).count();
        let (failed, warned) = (count(Verdict::Fail), count(Verdict::Warn));
        out.push_str(&if failed > 0 {
            format!("not ready: {failed} requirement(s) failed, {warned} warning(s)\n")
        } else {
            format!("ready: every requirement is met, {warned} warning(s)\n")
        });
        out
    }
}

/// Everything `check` reads from the machine.
pub trait System {
    fn euid(&self) -> u32;
    fn read_file(&self, path: &Path) -> io::Result<String>;
    fn exists(&self, path: &Path) -> bool;
    /// Exit code (-1 if killed by a signal) and stdout followed by stderr.
    fn run(&self, program: &Path, args: &[&str]) -> io::Result<(i32, String)>;
    fn is_dir_writable(&self, path: &Path) -> bool;
    /// The processes, as the policy sees them.
    fn procs(&self) -> &dyn ProcView;
    /// The filesystems, as the policy sees them.
    fn fs(&self) -> &dyn FsView;
    /// The pid of this nvwa process: it and its ancestors cannot be targets.
    fn own_pid(&self) -> i32;
    /// Why `path` cannot be trusted (see [`crate::trust`]), or None.
    fn untrusted(&self, path: &Path, kind: crate::trust::TrustedKind) -> Option<String>;
}

/// How long `criu check` or `systemctl` may take before the check gives up on them.
const CHECK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// The machine nvwa runs on.
pub struct RealSystem;

impl System for RealSystem {
    fn euid(&self) -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn run(&self, program: &Path, args: &[&str]) -> io::Result<(i32, String)> {
        // A null stdin and a deadline: nothing here can wait for a terminal or hang the check.
        let out = crate::exec::run(Command::new(program).args(args), CHECK_DEADLINE).map_err(
            |e| match e {
                crate::exec::ExecError::Spawn { source, .. } => source,
                other => io::Error::new(io::ErrorKind::TimedOut, other.to_string()),
            },
        )?;
        Ok((out.code(), out.output_text()))
    }

    fn untrusted(&self, path: &Path, kind: crate::trust::TrustedKind) -> Option<String> {
        crate::trust::ensure_trusted(path, kind)
            .err()
            .map(|e| e.to_string())
    }

    fn is_dir_writable(&self, path: &Path) -> bool {
        use nix::unistd::{access, AccessFlags};
        // access(2) also reports a read-only filesystem, which a mode check would miss.
        path.is_dir() && access(path, AccessFlags::W_OK | AccessFlags::X_OK).is_ok()
    }

    fn procs(&self) -> &dyn ProcView {
        &RealProcs
    }

    fn fs(&self) -> &dyn FsView {
        &RealFs
    }

    fn own_pid(&self) -> i32 {
        std::process::id() as i32
    }
}

const KEXEC_LOADED: &str = "/sys/kernel/kexec_loaded";
const KEXEC_LOAD_DISABLED: &str = "/proc/sys/kernel/kexec_load_disabled";
const LOCKDOWN: &str = "/sys/kernel/security/lockdown";
const CMDLINE: &str = "/proc/cmdline";
const SYSTEMCTL: &str = "systemctl";

/// Run every preflight check. `root` is where kernel files are looked up ("/" in production).
pub fn run_checks(
    cfg: &Config,
    version: Option<&str>,
    root: &Path,
    sys: &dyn System,
) -> CheckReport {
    let mut lines = vec![
        CheckLine::ok("config", cfg.dir.display().to_string()),
        check_root(sys),
        check_kexec(sys),
        check_lockdown(sys),
    ];
    lines.extend(check_criu(cfg, sys));
    lines.push(check_kexec_exe(cfg, sys));
    if let Some(v) = version {
        lines.push(check_kernel_files(root, v));
    }

    lines.extend(policy::config_findings(cfg).iter().map(config_line));
    let mut targets = Vec::new();
    for (pid, verdict) in policy::judge_pids(cfg, sys.procs(), sys.own_pid()) {
        let req = format!("pid {pid}");
        lines.push(match verdict {
            Ok(()) => {
                targets.push(pid);
                CheckLine::ok(req, format!("running: {}", sys.procs().describe(pid)))
            }
            Err(r) => CheckLine::fail(req, r.problem(), r.fix()),
        });
    }
    for svc in &cfg.restore.services {
        lines.push(check_service(cfg, svc, sys));
    }
    if !cfg.restore.services.is_empty() {
        lines.push(match policy::judge_service_support(cfg, sys.fs()) {
            Ok(()) => CheckLine::ok(
                "services handed back at boot",
                format!(
                    "{} installed; criu_dir on the root filesystem",
                    crate::service::GENERATOR
                ),
            ),
            Err(r) => CheckLine::fail("services handed back at boot", r.problem(), r.fix()),
        });
    }

    lines.push(check_trusted_paths(cfg, sys));
    lines.push(check_criu_dir(cfg, sys));
    lines.push(check_image_storage(cfg, &targets, sys));
    lines.push(check_network(cfg, sys));

    let features = detect_features(sys);
    lines.push(check_quick_kexec(cfg, &features));
    lines.push(check_pin_memory(cfg, &features));
    lines.push(check_cpu_park(&features));
    CheckReport { lines }
}

/// A configuration-level refusal of the policy as a line. `update` refuses an empty target
/// list; check only warns, because a fresh install starts with one and the machine itself can
/// still be checked.
fn config_line(r: &Refusal) -> CheckLine {
    match r {
        Refusal::NothingListed { .. } => CheckLine::warn("targets listed", r.problem(), r.fix()),
        _ => CheckLine::fail("configuration", r.problem(), r.fix()),
    }
}

fn restore_file(cfg: &Config) -> PathBuf {
    cfg.dir.join(RESTORE_FILE)
}

fn server_file(cfg: &Config) -> PathBuf {
    cfg.dir.join(SERVER_FILE)
}

fn check_root(sys: &dyn System) -> CheckLine {
    const REQ: &str = "running as root";
    match sys.euid() {
        0 => CheckLine::ok(REQ, "euid 0"),
        uid => CheckLine::fail(
            REQ,
            format!("running as uid {uid}; criu and kexec need root"),
            "run as root, e.g. `sudo nvwa check`",
        ),
    }
}

fn check_kexec(sys: &dyn System) -> CheckLine {
    const REQ: &str = "kexec supported";
    if !sys.exists(Path::new(KEXEC_LOADED)) {
        return CheckLine::fail(
            REQ,
            format!("{KEXEC_LOADED} is missing: the running kernel was built without kexec"),
            "boot a kernel built with CONFIG_KEXEC or CONFIG_KEXEC_FILE (all distribution kernels are)",
        );
    }
    // Older kernels lack the sysctl, which then cannot be disabling anything.
    let disabled = sys
        .read_file(Path::new(KEXEC_LOAD_DISABLED))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "0".to_string());
    if disabled != "0" {
        return CheckLine::fail(
            REQ,
            format!("{KEXEC_LOAD_DISABLED} is {disabled}: kexec was disabled, and this cannot be undone without a reboot"),
            "remove kernel.kexec_load_disabled from /etc/sysctl.conf and /etc/sysctl.d/, then reboot once",
        );
    }
    CheckLine::ok(REQ, "kexec is built in and not disabled")
}

fn check_lockdown(sys: &dyn System) -> CheckLine {
    const REQ: &str = "kernel lockdown";
    let Ok(text) = sys.read_file(Path::new(LOCKDOWN)) else {
        // Without securityfs the file is absent whether or not the kernel has lockdown.
        if !sys.exists(Path::new("/sys/kernel/security/lsm")) {
            return CheckLine::warn(
                REQ,
                "cannot tell: securityfs is not mounted",
                "mount -t securityfs securityfs /sys/kernel/security",
            );
        }
        return CheckLine::ok(REQ, "no lockdown support in this kernel");
    };
    // The file lists all modes with the active one in brackets: "[none] integrity confidentiality".
    let mode = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or("unknown");
    match mode {
        "none" => CheckLine::ok(REQ, "none"),
        _ => CheckLine::warn(
            REQ,
            format!("lockdown is {mode}: kexec_file_load refuses kernel images that are not signed with a trusted key"),
            "use a signed distribution kernel, or boot with lockdown=none / disable Secure Boot",
        ),
    }
}

fn check_criu(cfg: &Config, sys: &dyn System) -> Vec<CheckLine> {
    let criu = &cfg.server.criu_exe;
    if !sys.exists(criu) {
        return vec![CheckLine::fail(
            "criu installed",
            format!("{} not found", criu.display()),
            format!(
                "install criu (`dnf install criu` or `apt install criu`), or set criu_exe in {}",
                server_file(cfg).display()
            ),
        )];
    }
    // `criu --version` prints "Version: 3.17.1" (and a GitCommitID line on builds from git).
    let version = match sys.run(criu, &["--version"]) {
        Ok((0, out)) => out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Version:"))
            .map(|v| format!(", version {}", v.trim()))
            .unwrap_or_default(),
        _ => String::new(),
    };
    let installed = CheckLine::ok("criu installed", format!("{}{version}", criu.display()));
    if sys.euid() != 0 {
        // criu check as a user fails on permissions and would hide the real answer.
        let skipped = CheckLine::warn(
            "criu check",
            "skipped: `criu check` needs root",
            "run `nvwa check` as root",
        );
        return vec![installed, skipped];
    }
    let check = match sys.run(criu, &["check"]) {
        Ok((0, _)) => CheckLine::ok("criu check", "passed"),
        Ok((code, output)) => CheckLine::fail(
            "criu check",
            format!("`{} check` exited with {code}: {}", criu.display(), last_line(&output)),
            format!("run `{} check` to see every missing kernel feature; boot a kernel with CONFIG_CHECKPOINT_RESTORE and the features it lists", criu.display()),
        ),
        Err(e) => CheckLine::fail(
            "criu check",
            format!("cannot run {}: {e}", criu.display()),
            "make sure criu_exe is an executable criu binary",
        ),
    };
    let mut lines = vec![installed, check];
    if cfg.restore.pre_dump {
        lines.push(check_criu_feature(cfg, sys, CriuFeature::DIRTY_TRACKING));
    }
    if cfg.restore.lazy_restore {
        lines.push(check_criu_feature(cfg, sys, CriuFeature::LAZY_PAGES));
    }
    lines
}

/// A kernel feature that a speed option needs. Without it nvwa falls back to the slower way,
/// so its absence is a warning.
struct CriuFeature {
    requirement: &'static str,
    /// criu's name for it (`criu check --feature NAME`).
    name: &'static str,
    key: &'static str,
    what: &'static str,
    fallback: &'static str,
    kernel: &'static str,
}

impl CriuFeature {
    const DIRTY_TRACKING: CriuFeature = CriuFeature {
        requirement: "memory tracking (pre_dump)",
        name: "mem_dirty_track",
        key: "pre_dump",
        what: "soft-dirty tracking available",
        fallback: "every target will be dumped in full",
        kernel: "CONFIG_MEM_SOFT_DIRTY",
    };
    const LAZY_PAGES: CriuFeature = CriuFeature {
        requirement: "userfaultfd (lazy_restore)",
        name: "uffd-noncoop",
        key: "lazy_restore",
        what: "userfaultfd with fork and remap events available",
        fallback: "every target will be restored in full",
        kernel: "CONFIG_USERFAULTFD",
    };
}

fn check_criu_feature(cfg: &Config, sys: &dyn System, f: CriuFeature) -> CheckLine {
    let criu = &cfg.server.criu_exe;
    match sys.run(criu, &["check", "--feature", f.name]) {
        Ok((0, _)) => CheckLine::ok(f.requirement, f.what),
        Ok((_, output)) => CheckLine::warn(
            f.requirement,
            format!(
                "{} is set but criu finds no support for it ({}): {}",
                f.key,
                last_line(&output),
                f.fallback
            ),
            format!(
                "boot a kernel with {}, or set {}: false in {}",
                f.kernel,
                f.key,
                restore_file(cfg).display()
            ),
        ),
        Err(e) => CheckLine::warn(
            f.requirement,
            format!("cannot run {}: {e}", criu.display()),
            "make sure criu_exe is an executable criu binary",
        ),
    }
}

fn last_line(output: &str) -> &str {
    output
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("(no output)")
}

fn check_kexec_exe(cfg: &Config, sys: &dyn System) -> CheckLine {
    const REQ: &str = "kexec tool";
    let kexec = &cfg.server.kexec_exe;
    if sys.exists(kexec) {
        return CheckLine::ok(REQ, kexec.display().to_string());
    }
    let detail = format!("{} not found", kexec.display());
    let fix = format!(
        "install kexec-tools, or set kexec_exe in {}",
        server_file(cfg).display()
    );
    if cfg.restore.enable_quick_kexec {
        CheckLine::fail(
            REQ,
            format!("{detail}; enable_quick_kexec needs openEuler's kexec-tools"),
            fix,
        )
    } else {
        CheckLine::warn(
            REQ,
            format!("{detail}; only needed for quick kexec and as a fallback loader"),
            fix,
        )
    }
}

fn check_kernel_files(root: &Path, version: &str) -> CheckLine {
    let req = format!("kernel {version} files");
    match boot::find_kernel(root, version) {
        Ok(k) => CheckLine::ok(
            req,
            format!("image {}, initrd {}", k.image.display(), k.initrd.display()),
        ),
        Err(e) => {
            let fix = match &e {
                BootError::InvalidVersion { .. } | BootError::ImageNotFound { .. } => {
                    "pass a version listed by `ls /boot/vmlinuz-*`, or install that kernel package".to_string()
                }
                BootError::InitrdNotFound { .. } | BootError::EmptyFile { .. } => format!(
                    "`dracut --force --kver {version}` (openEuler, RHEL) or `update-initramfs -c -k {version}` (Debian, Ubuntu)"
                ),
            };
            CheckLine::fail(req, e.to_string(), fix)
        }
    }
}

/// What would keep a listed service from being checkpointed with its main process: the policy's
/// rules, on what systemd and the service's cgroup say.
fn check_service(cfg: &Config, svc: &str, sys: &dyn System) -> CheckLine {
    let req = format!("service {svc}");
    let unit = match crate::systemd::unit_name(svc) {
        Ok(u) => u,
        Err(error) => {
            let r = crate::policy::Refusal::ServiceName { error };
            return CheckLine::fail(req, r.problem(), r.fix());
        }
    };
    let property = format!("--property={}", crate::systemd::PROPERTIES);
    let args = ["show", &property, &unit];
    let info = match sys.run(Path::new(SYSTEMCTL), &args) {
        Ok((0, out)) => crate::systemd::parse_show(&out),
        _ => {
            return CheckLine::warn(
                req,
                "cannot ask systemd about it; services are checked at update time",
                format!("make sure `systemctl show {unit}` works"),
            )
        }
    };
    let members = info
        .control_group
        .as_deref()
        .and_then(|cg| crate::systemd::cgroup_members(cg, |f| sys.read_file(f).ok()))
        .unwrap_or_default();
    match crate::policy::judge_service(cfg, &info, &members, sys.procs()) {
        Ok(()) if sys.procs().own_namespaces(info.main_pid).contains(&"user") => CheckLine::warn(
            req,
            format!(
                "running (Type={}), main process {}, in a user namespace of its own (PrivateUsers=): criu cannot restore it into one, so it comes back in the host's user namespace until the unit restarts (its uid and gid are identity-mapped and mean the same; capabilities, no_new_privs and seccomp filters are kept)",
                info.kind.name(),
                sys.procs().describe(info.main_pid)
            ),
            format!("accept it, or restart {unit} after the update to give it back its own user namespace"),
        ),
        Ok(()) => CheckLine::ok(
            req,
            format!(
                "running (Type={}), main process {}",
                info.kind.name(),
                sys.procs().describe(info.main_pid)
            ),
        ),
        Err(r) => CheckLine::fail(req, r.problem(), r.fix()),
    }
}

/// `restore_net: true`: what the update will save (the same reading and filter as the update's),
/// and whether the tools it needs are there.
fn check_network(cfg: &Config, sys: &dyn System) -> CheckLine {
    const REQ: &str = "network configuration";
    if !cfg.restore.restore_net {
        return CheckLine::ok(REQ, "not carried over (restore_net: false)");
    }
    let tool = |name: &str| {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| sys.exists(p))
    };
    let Some(ip) = tool("ip") else {
        return CheckLine::fail(
            REQ,
            "restore_net: true but ip (iproute2) is not installed",
            "install iproute2, or set restore_net: false",
        );
    };
    let json = |program: &Path, args: &[&str]| -> Result<serde_json::Value, String> {
        let cmd = format!("{} {}", program.display(), args.join(" "));
        match sys.run(program, args) {
            Ok((0, out)) if out.trim().is_empty() => Ok(serde_json::Value::Array(Vec::new())),
            Ok((0, out)) => serde_json::from_str(&out).map_err(|e| format!("`{cmd}`: {e}")),
            Ok((code, out)) => Err(format!("`{cmd}` failed (exit {code}): {}", out.trim())),
            Err(e) => Err(format!("cannot run `{cmd}`: {e}")),
        }
    };
    let read = || -> Result<net::NetState, String> {
        let mut st = net::NetState {
            addrs: net::parse_addrs(&json(&ip, &["-j", "addr", "show"])?)?,
            ..Default::default()
        };
        for (flag, fam) in [("-4", net::Family::Inet), ("-6", net::Family::Inet6)] {
            let routes = json(&ip, &["-j", flag, "route", "show", "table", "all"])?;
            st.routes.extend(net::parse_routes(fam, &routes)?);
            st.rules.extend(net::parse_rules(
                fam,
                &json(&ip, &["-j", flag, "rule", "show"])?,
            )?);
        }
        if let Some(nft) = tool("nft") {
            let tables = net::parse_nft_tables(&json(&nft, &["-j", "list", "tables"])?)?;
            st.nft = Some(
                tables
                    .into_iter()
                    .map(|(family, name)| net::NftTable {
                        family,
                        name,
                        text: String::new(),
                    })
                    .collect(),
            );
        }
        Ok(st)
    };
    let state = match read() {
        Ok(all) => net::operator_state(&all),
        Err(why) => {
            return CheckLine::fail(
                REQ,
                format!("restore_net: true but the network configuration cannot be read: {why}"),
                "install iproute2 (ip -j) and nftables, or set restore_net: false",
            )
        }
    };
    let detail = format!("restore_net: true; the update saves {}", state.summary());
    if state.nft.is_none() {
        return CheckLine::warn(
            REQ,
            format!("{detail}; nft is not installed, so an nftables firewall is not saved"),
            "install nftables if this machine has an nftables firewall",
        );
    }
    CheckLine::ok(REQ, detail)
}

/// The paths nvwa runs or writes as root must be root's alone (the rule `update` applies).
fn check_trusted_paths(cfg: &Config, sys: &dyn System) -> CheckLine {
    const REQ: &str = "trusted paths";
    let problems: Vec<String> = cfg
        .server
        .trusted_paths()
        .into_iter()
        .filter(|(_, path, _)| sys.exists(path))
        .filter_map(|(key, path, kind)| sys.untrusted(path, kind).map(|e| format!("{key}: {e}")))
        .collect();
    if problems.is_empty() {
        CheckLine::ok(
            REQ,
            "criu_dir, log_dir, criu_exe and kexec_exe cannot be changed by other users",
        )
    } else {
        CheckLine::fail(
            REQ,
            problems.join("; "),
            "make each path and the directories above it root's and not group/world-writable",
        )
    }
}

fn check_criu_dir(cfg: &Config, sys: &dyn System) -> CheckLine {
    const REQ: &str = "image directory";
    let dir = &cfg.server.criu_dir;
    if !sys.exists(dir) {
        return CheckLine::warn(
            REQ,
            format!("{} does not exist", dir.display()),
            format!("`mkdir -p {}`", dir.display()),
        );
    }
    if sys.is_dir_writable(dir) {
        CheckLine::ok(REQ, format!("{} writable", dir.display()))
    } else {
        CheckLine::fail(
            REQ,
            format!("{} is not a writable directory", dir.display()),
            format!(
                "make it a directory writable by root on a read-write filesystem, or set criu_dir in {}",
                server_file(cfg).display()
            ),
        )
    }
}

/// Where the images go, by the policy `update` applies before freezing: not a memory
/// filesystem, and room for the resident memory of every preservable target plus a margin.
fn check_image_storage(cfg: &Config, targets: &[i32], sys: &dyn System) -> CheckLine {
    // One line for both rules: space on a memory filesystem is no space. The name predates
    // the tmpfs rule and lab/scenarios/check.toml greps for it.
    const REQ: &str = "free space for images";
    let dir = &cfg.server.criu_dir;
    let rss: u64 = targets.iter().map(|&p| sys.procs().tree_rss_bytes(p)).sum();
    let needed = policy::bytes_needed(rss);
    if let Err(r) = policy::image_store(dir, needed, sys.fs()) {
        return CheckLine::fail(REQ, r.problem(), r.fix());
    }
    // image_store measured it a moment ago; only a racing error makes this "unknown".
    let free = sys
        .fs()
        .free_bytes(dir)
        .map_or_else(|_| "unknown".to_string(), policy::human_bytes);
    CheckLine::ok(
        REQ,
        format!(
            "{free} free for {}, the images need about {}",
            dir.display(),
            policy::human_bytes(needed)
        ),
    )
}

fn detect_features(sys: &dyn System) -> KernelFeatures {
    let cmdline = sys.read_file(Path::new(CMDLINE)).unwrap_or_default();
    let device = Path::new(pinmem::DEV_ROOT).join(pinmem::PINMEM_DEVICE);
    KernelFeatures {
        pinmem_device: sys.exists(&device),
        ..pinmem::parse_cmdline(&cmdline)
    }
}

fn check_quick_kexec(cfg: &Config, f: &KernelFeatures) -> CheckLine {
    const REQ: &str = "quick kexec";
    match (&f.quick_kexec, cfg.restore.enable_quick_kexec) {
        (Some(size), true) => CheckLine::ok(REQ, format!("enabled, quickkexec={size}")),
        (Some(size), false) => CheckLine::ok(
            REQ,
            format!("available (quickkexec={size}) but not enabled in config"),
        ),
        (None, false) => CheckLine::ok(REQ, "stock kernel: quick kexec not available (not requested)"),
        (None, true) => CheckLine::fail(
            REQ,
            "enable_quick_kexec is set but the running kernel has no quickkexec= boot parameter",
            format!(
                "boot an openEuler kernel with quickkexec=<size> (e.g. 350M), or set enable_quick_kexec: false in {}",
                restore_file(cfg).display()
            ),
        ),
    }
}

fn check_pin_memory(cfg: &Config, f: &KernelFeatures) -> CheckLine {
    const REQ: &str = "pin memory";
    let device = format!("{}/{}", pinmem::DEV_ROOT, pinmem::PINMEM_DEVICE);
    let state = match (&f.pin_memory, f.pinmem_device) {
        (Some(area), true) => Ok(format!("pinmemory={area}, {device} present")),
        (Some(area), false) => Err(format!("pinmemory={area} but {device} is missing")),
        (None, true) => Err(format!("{device} present but no pinmemory= boot parameter")),
        (None, false) => Err("stock kernel: pin memory not available".to_string()),
    };
    match (state, cfg.restore.enable_pin_memory) {
        (Ok(detail), true) => CheckLine::ok(REQ, format!("enabled, {detail}")),
        (Ok(detail), false) => CheckLine::ok(REQ, format!("available ({detail}) but not enabled in config")),
        (Err(why), false) => CheckLine::ok(REQ, format!("{why} (not requested)")),
        (Err(why), true) => CheckLine::fail(
            REQ,
            format!("enable_pin_memory is set but {why}"),
            format!(
                "boot an openEuler kernel with pinmemory=<size>@<addr> and max_pin_pid_num=<n>, run `modprobe pin_memory`, or set enable_pin_memory: false in {}",
                restore_file(cfg).display()
            ),
        ),
    }
}

fn check_cpu_park(f: &KernelFeatures) -> CheckLine {
    // Informational: CPU park only shortens the kexec; nothing in the config asks for it.
    match &f.cpu_park {
        Some(addr) => CheckLine::ok("cpu park", format!("cpuparkmem={addr}")),
        None => CheckLine::ok(
            "cpu park",
            "stock kernel: cpu park not available (not needed)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RestoreConfig, ServerConfig};
    use crate::policy::fake::{FakeFs, FakeProcs};
    use std::cell::RefCell;
    use std::collections::{HashMap, HashSet};

    /// A machine where everything nvwa needs is in place.
    struct FakeSystem {
        euid: u32,
        files: HashMap<PathBuf, String>,
        paths: HashSet<PathBuf>,
        runs: HashMap<String, (i32, String)>,
        writable: HashSet<PathBuf>,
        ran: RefCell<Vec<String>>,
        procs: FakeProcs,
        fs: FakeFs,
        /// Paths another user could change, with why.
        untrusted: HashMap<PathBuf, String>,
    }

    /// The pid of `nvwa check` in the fake machine (FakeProcs::machine's nvwa under init).
    const ME: i32 = 20;

    const GIB: u64 = 1024 * 1024 * 1024;

    impl FakeSystem {
        fn healthy() -> Self {
            let mut s = FakeSystem {
                euid: 0,
                files: HashMap::new(),
                paths: HashSet::new(),
                runs: HashMap::new(),
                writable: HashSet::new(),
                ran: RefCell::new(Vec::new()),
                procs: FakeProcs::machine(),
                fs: FakeFs::disk(100 * GIB),
                untrusted: HashMap::new(),
            };
            s.file(KEXEC_LOADED, "0\n");
            s.file(KEXEC_LOAD_DISABLED, "0\n");
            s.file(LOCKDOWN, "[none] integrity confidentiality\n");
            s.file(CMDLINE, "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet\n");
            s.path("/usr/sbin/criu");
            s.path("/usr/sbin/kexec");
            s.path("/var/nvwa/running/");
            s.writable.insert("/var/nvwa/running/".into());
            s.writable.insert("/etc/systemd/system/".into());
            s.procs.add(100, 1, "redis-server", GIB);
            s.procs.add(200, 1, "nginx", GIB / 2);
            s.runs
                .insert("/usr/sbin/criu check".into(), (0, "Looks good.\n".into()));
            // pre_dump and lazy_restore are on by default, so check asks criu for memory
            // tracking and userfaultfd.
            s.runs.insert(
                "/usr/sbin/criu check --feature uffd-noncoop".into(),
                (0, "uffd-noncoop is supported\n".into()),
            );
            s.runs.insert(
                "/usr/sbin/criu check --feature mem_dirty_track".into(),
                (0, "mem_dirty_track is supported\n".into()),
            );
            s.runs.insert(
                "/usr/sbin/criu --version".into(),
                (0, "Version: 3.17.1\n".into()),
            );
            s.runs.insert(
                format!("systemctl show --property={} nginx.service", crate::systemd::PROPERTIES),
                (
                    0,
                    "Id=nginx.service\nMainPID=200\nType=forking\nActiveState=active\nSubState=running\nControlGroup=/system.slice/nginx.service\n".into(),
                ),
            );
            s
        }

        fn file(&mut self, path: &str, text: &str) {
            self.files.insert(path.into(), text.into());
        }

        fn path(&mut self, path: &str) {
            self.paths.insert(path.into());
        }
    }

    impl System for FakeSystem {
        fn euid(&self) -> u32 {
            self.euid
        }
        fn read_file(&self, path: &Path) -> io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn exists(&self, path: &Path) -> bool {
            // Configured directories end in a slash; compare without it.
            let path = PathBuf::from(path.to_string_lossy().trim_end_matches('/'));
            self.files.contains_key(&path)
                || self
                    .paths
                    .iter()
                    .any(|p| p.components().eq(path.components()))
        }
        fn run(&self, program: &Path, args: &[&str]) -> io::Result<(i32, String)> {
            let cmd = format!("{} {}", program.display(), args.join(" "));
            self.ran.borrow_mut().push(cmd.clone());
            self.runs
                .get(&cmd)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn is_dir_writable(&self, path: &Path) -> bool {
            self.writable.contains(path)
        }
        fn procs(&self) -> &dyn ProcView {
            &self.procs
        }
        fn fs(&self) -> &dyn FsView {
            &self.fs
        }
        fn own_pid(&self) -> i32 {
            ME
        }
        fn untrusted(&self, path: &Path, _: crate::trust::TrustedKind) -> Option<String> {
            self.untrusted.get(path).cloned()
        }
    }

    struct Fixture {
        root: tempfile::TempDir,
        cfg: Config,
    }

    /// A redis pid and an nginx service (the service makes `services supported` fail for now).
    fn fixture_with_service() -> Fixture {
        let mut fx = fixture();
        fx.cfg.restore.services = vec!["nginx".into()];
        fx
    }

    fn fixture() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("boot")).unwrap();
        std::fs::write(root.path().join("boot/vmlinuz-6.6.0"), b"image").unwrap();
        std::fs::write(root.path().join("boot/initramfs-6.6.0.img"), b"initrd").unwrap();
        let cfg = Config {
            dir: PathBuf::from("/etc/nvwa"),
            server: ServerConfig::default(),
            restore: RestoreConfig {
                pids: vec![100],
                ..RestoreConfig::default()
            },
        };
        Fixture { root, cfg }
    }

    fn run(fx: &Fixture, sys: &FakeSystem) -> CheckReport {
        run_checks(&fx.cfg, Some("6.6.0"), fx.root.path(), sys)
    }

    fn line<'a>(report: &'a CheckReport, requirement: &str) -> &'a CheckLine {
        report
            .lines
            .iter()
            .find(|l| l.requirement == requirement)
            .unwrap_or_else(|| panic!("no line {requirement:?} in\n{}", report.render()))
    }

    fn assert_fails(report: &CheckReport, requirement: &str, needle: &str) {
        let l = line(report, requirement);
        assert_eq!(l.verdict, Verdict::Fail, "{}", report.render());
        assert!(l.fix.is_some(), "a failure needs a fix hint");
        assert!(report.failed());
        assert!(report.render().contains(needle), "{}", report.render());
    }

    #[test]
    fn all_ok() {
        let fx = fixture();
        let report = run(&fx, &FakeSystem::healthy());
        let text = report.render();
        assert!(!report.failed(), "{text}");
        assert!(
            report.lines.iter().all(|l| l.verdict == Verdict::Ok),
            "{text}"
        );
        assert!(text.starts_with("ok   config: /etc/nvwa\n"), "{text}");
        assert!(text.contains("ok   running as root: euid 0"), "{text}");
        assert!(
            text.contains("ok   pid 100: running: redis-server (pid 100)"),
            "{text}"
        );
        assert!(
            text.contains("free space for images: 100.0 GiB free for /var/nvwa/running/, the images need about 1.1 GiB"),
            "{text}"
        );
        assert!(
            text.contains("stock kernel: quick kexec not available"),
            "{text}"
        );
        assert!(!text.contains("fix:"), "{text}");
    }

    #[test]
    fn not_root() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.euid = 1000;
        let report = run(&fx, &sys);
        assert_fails(&report, "running as root", "uid 1000");
        assert_eq!(line(&report, "criu check").verdict, Verdict::Warn);
        assert!(
            sys.ran.borrow().iter().all(|c| !c.ends_with("criu check")),
            "{:?}",
            sys.ran.borrow()
        );
    }

    #[test]
    fn kexec_disabled() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.file(KEXEC_LOAD_DISABLED, "1\n");
        assert_fails(
            &run(&fx, &sys),
            "kexec supported",
            "kexec_load_disabled is 1",
        );
    }

    #[test]
    fn kexec_not_built_in() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.files.remove(Path::new(KEXEC_LOADED));
        assert_fails(&run(&fx, &sys), "kexec supported", "CONFIG_KEXEC");
    }

    #[test]
    fn lockdown_integrity_warns() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.file(LOCKDOWN, "none [integrity] confidentiality\n");
        let report = run(&fx, &sys);
        assert_eq!(line(&report, "kernel lockdown").verdict, Verdict::Warn);
        assert!(!report.failed());
        assert!(report
            .render()
            .contains("warn kernel lockdown: lockdown is integrity"));
    }

    #[test]
    fn criu_missing() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.paths.remove(Path::new("/usr/sbin/criu"));
        let report = run(&fx, &sys);
        assert_fails(&report, "criu installed", "/usr/sbin/criu not found");
        assert!(report.lines.iter().all(|l| l.requirement != "criu check"));
        assert!(sys.ran.borrow().iter().all(|c| !c.contains("criu")));
    }

    #[test]
    fn criu_check_failing_shows_last_line() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.runs.insert(
            "/usr/sbin/criu check".into(),
            (
                1,
                "Warn: something\nError: UFFD is not supported\n\n".into(),
            ),
        );
        assert_fails(
            &run(&fx, &sys),
            "criu check",
            "exited with 1: Error: UFFD is not supported",
        );
    }

    #[test]
    fn pre_dump_asks_criu_for_memory_tracking_and_warns_without_it() {
        let mut fx = fixture();
        let mut sys = FakeSystem::healthy();
        fx.cfg.restore.pre_dump = false;
        let report = run(&fx, &sys);
        assert!(report
            .lines
            .iter()
            .all(|l| l.requirement != "memory tracking (pre_dump)"));
        fx.cfg.restore.pre_dump = true;
        sys.runs.insert(
            "/usr/sbin/criu check --feature mem_dirty_track".into(),
            (0, "mem_dirty_track is supported\n".into()),
        );
        let report = run(&fx, &sys);
        assert_eq!(
            line(&report, "memory tracking (pre_dump)").verdict,
            Verdict::Ok
        );
        sys.runs.insert(
            "/usr/sbin/criu check --feature mem_dirty_track".into(),
            (1, "Error: Dirty tracking is OFF\n".into()),
        );
        let report = run(&fx, &sys);
        let l = line(&report, "memory tracking (pre_dump)");
        assert_eq!(l.verdict, Verdict::Warn, "{}", report.render());
        assert!(
            l.detail.contains("Dirty tracking is OFF"),
            "{}",
            report.render()
        );
    }

    #[test]
    fn the_report_names_the_criu_version_and_ends_with_a_verdict() {
        let fx = fixture();
        let text = run(&fx, &FakeSystem::healthy()).render();
        assert!(text.contains("/usr/sbin/criu, version 3.17.1"), "{text}");
        assert!(
            text.ends_with("warning(s)\n") && text.contains("\nready: "),
            "{text}"
        );
        let mut sys = FakeSystem::healthy();
        sys.paths.clear();
        let text = run(&fx, &sys).render();
        assert!(text.contains("\nnot ready: "), "{text}");
    }

    #[test]
    fn a_path_others_can_change_fails() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.untrusted.insert(
            "/usr/sbin/criu".into(),
            "/usr/sbin is writable by uid 1000".into(),
        );
        let report = run(&fx, &sys);
        assert_fails(
            &report,
            "trusted paths",
            "criu_exe: /usr/sbin is writable by uid 1000",
        );
        assert_eq!(
            line(&run(&fx, &FakeSystem::healthy()), "trusted paths").verdict,
            Verdict::Ok
        );
    }

    #[test]
    fn kexec_exe_missing_warns_unless_quick_kexec() {
        let mut fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.paths.remove(Path::new("/usr/sbin/kexec"));
        let report = run(&fx, &sys);
        assert_eq!(line(&report, "kexec tool").verdict, Verdict::Warn);
        assert!(!report.failed());
        fx.cfg.restore.enable_quick_kexec = true;
        sys.file(CMDLINE, "root=/dev/sda quickkexec=350M");
        assert_fails(&run(&fx, &sys), "kexec tool", "enable_quick_kexec");
    }

    #[test]
    fn missing_initrd() {
        let fx = fixture();
        std::fs::remove_file(fx.root.path().join("boot/initramfs-6.6.0.img")).unwrap();
        assert_fails(
            &run(&fx, &FakeSystem::healthy()),
            "kernel 6.6.0 files",
            "dracut",
        );
    }

    #[test]
    fn invalid_version_fails() {
        let fx = fixture();
        let report = run_checks(
            &fx.cfg,
            Some("../x"),
            fx.root.path(),
            &FakeSystem::healthy(),
        );
        assert_fails(&report, "kernel ../x files", "invalid kernel version");
    }

    #[test]
    fn no_version_no_kernel_line() {
        let fx = fixture();
        let report = run_checks(&fx.cfg, None, fx.root.path(), &FakeSystem::healthy());
        assert!(report
            .lines
            .iter()
            .all(|l| !l.requirement.ends_with(" files")));
        assert!(!report.failed());
    }

    #[test]
    fn dead_pid() {
        let mut fx = fixture();
        fx.cfg.restore.pids.push(4242);
        assert_fails(
            &run(&fx, &FakeSystem::healthy()),
            "pid 4242",
            "pid 4242 listed in /etc/nvwa/nvwa-restore.yaml is not running",
        );
    }

    #[test]
    fn a_running_service_is_reported_with_how_it_comes_back() {
        let fx = fixture_with_service();
        let report = run(&fx, &FakeSystem::healthy());
        assert_eq!(line(&report, "service nginx").verdict, Verdict::Ok);
        assert!(report.render().contains("main process nginx (pid 200)"));
        assert_eq!(
            line(&report, "services handed back at boot").verdict,
            Verdict::Ok
        );
        let mut sys = FakeSystem::healthy();
        sys.fs.no_generator = true;
        assert_fails(
            &run(&fx, &sys),
            "services handed back at boot",
            "reinstall nvwa",
        );
    }

    #[test]
    fn a_service_in_its_own_user_namespace_warns_that_it_comes_back_in_the_hosts() {
        let fx = fixture_with_service();
        let mut sys = FakeSystem::healthy();
        sys.procs.procs.get_mut(&200).unwrap().namespaces = vec!["mnt", "uts", "user"];
        let report = run(&fx, &sys);
        let l = line(&report, "service nginx");
        assert_eq!(l.verdict, Verdict::Warn);
        assert!(
            report
                .render()
                .contains("comes back in the host's user namespace until the unit restarts"),
            "{}",
            report.render()
        );
        // Mount and UTS namespaces alone are carried over as they are.
        sys.procs.procs.get_mut(&200).unwrap().namespaces = vec!["mnt", "uts"];
        assert_eq!(line(&run(&fx, &sys), "service nginx").verdict, Verdict::Ok);
        sys.procs.procs.get_mut(&200).unwrap().namespaces = vec!["mnt", "net"];
        assert_fails(&run(&fx, &sys), "service nginx", "cannot carry over (net)");
    }

    #[test]
    fn restore_net_says_what_the_update_saves() {
        let mut fx = fixture();
        assert_eq!(
            line(&run(&fx, &FakeSystem::healthy()), "network configuration").detail,
            "not carried over (restore_net: false)"
        );
        fx.cfg.restore.restore_net = true;
        let mut sys = FakeSystem::healthy();
        assert_fails(&run(&fx, &sys), "network configuration", "install iproute2");
        sys.paths.insert("/usr/sbin/ip".into());
        let ok = |s: &str| (0, s.to_string());
        sys.runs.insert(
            "/usr/sbin/ip -j addr show".into(),
            ok(r#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
                  {"ifname":"eth0","addr_info":[{"family":"inet","local":"10.0.2.15","prefixlen":24,"scope":"global"},
                  {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#),
        );
        sys.runs.insert(
            "/usr/sbin/ip -j -4 route show table all".into(),
            ok(
                r#"[{"dst":"default","gateway":"10.0.2.2","dev":"eth0","protocol":"static"},
                  {"dst":"10.0.2.0/24","dev":"eth0","protocol":"kernel","scope":"link"}]"#,
            ),
        );
        sys.runs
            .insert("/usr/sbin/ip -j -6 route show table all".into(), ok(""));
        sys.runs.insert(
            "/usr/sbin/ip -j -4 rule show".into(),
            ok(r#"[{"priority":0,"src":"all","table":"local"},{"priority":100,"src":"10.0.3.0","srclen":24,"table":"100"},{"priority":32766,"src":"all","table":"main"}]"#),
        );
        sys.runs
            .insert("/usr/sbin/ip -j -6 rule show".into(), ok("[]"));
        let l = line(&run(&fx, &sys), "network configuration").clone();
        assert_eq!(l.verdict, Verdict::Warn, "{l:?}");
        assert!(
            l.detail.starts_with("restore_net: true; the update saves 1 address, 1 route, 1 policy rule; nft is not installed"),
            "{l:?}"
        );
        sys.paths.insert("/usr/sbin/nft".into());
        sys.runs.insert(
            "/usr/sbin/nft -j list tables".into(),
            ok(r#"{"nftables":[{"metainfo":{}},{"table":{"family":"inet","name":"lab","handle":1}},{"table":{"family":"inet","name":"CRIU-12","handle":2}}]}"#),
        );
        let l = line(&run(&fx, &sys), "network configuration").clone();
        assert_eq!(l.verdict, Verdict::Ok, "{l:?}");
        assert!(
            l.detail.ends_with("1 policy rule, nftables table inet lab"),
            "{l:?}"
        );
    }

    #[test]
    fn service_not_running() {
        let fx = fixture_with_service();
        let mut sys = FakeSystem::healthy();
        sys.runs.insert(
            format!(
                "systemctl show --property={} nginx.service",
                crate::systemd::PROPERTIES
            ),
            (
                0,
                "Id=nginx.service\nMainPID=0\nType=forking\nActiveState=inactive\nSubState=dead\n"
                    .into(),
            ),
        );
        assert_fails(
            &run(&fx, &sys),
            "service nginx",
            "no running main process (inactive/dead)",
        );
    }

    #[test]
    fn service_without_systemctl_warns() {
        let fx = fixture_with_service();
        let mut sys = FakeSystem::healthy();
        sys.runs.clear();
        sys.runs
            .insert("/usr/sbin/criu check".into(), (0, String::new()));
        let report = run(&fx, &sys);
        assert_eq!(line(&report, "service nginx").verdict, Verdict::Warn);
        assert!(report
            .render()
            .contains("services are checked at update time"));
    }

    #[test]
    fn a_service_with_processes_outside_its_main_tree_fails() {
        let fx = fixture_with_service();
        let mut sys = FakeSystem::healthy();
        sys.procs.add(300, 1, "helper", 0);
        sys.file(
            "/sys/fs/cgroup/system.slice/nginx.service/cgroup.procs",
            "200\n300\n",
        );
        assert_fails(&run(&fx, &sys), "service nginx", "helper (pid 300)");
        sys.file(
            "/sys/fs/cgroup/system.slice/nginx.service/cgroup.procs",
            "200\n",
        );
        assert_eq!(line(&run(&fx, &sys), "service nginx").verdict, Verdict::Ok);
    }

    #[test]
    fn too_little_space() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.fs = FakeFs::disk(GIB); // redis has 1 GiB resident; the margin makes it 1.1 GiB
        let report = run(&fx, &sys);
        assert_fails(&report, "free space for images", "need about 1.1 GiB");
        assert!(report.render().contains("only 1.0 GiB is free"));
        // The margin is what update asks for, not a warning: just enough is ok.
        sys.fs = FakeFs::disk(policy::bytes_needed(GIB));
        assert_eq!(
            line(&run(&fx, &sys), "free space for images").verdict,
            Verdict::Ok
        );
    }

    #[test]
    fn space_counts_the_whole_tree_of_preservable_pids_only() {
        let mut fx = fixture();
        fx.cfg.restore.pids = vec![100, 4242];
        let mut sys = FakeSystem::healthy();
        sys.procs.add(101, 100, "redis-child", GIB);
        // 2 GiB for redis and its child; the dead pid adds nothing.
        sys.fs = FakeFs::disk(policy::bytes_needed(2 * GIB) - 1);
        assert_fails(
            &run(&fx, &sys),
            "free space for images",
            "need about 2.2 GiB",
        );
        sys.fs = FakeFs::disk(policy::bytes_needed(2 * GIB));
        assert_eq!(
            line(&run(&fx, &sys), "free space for images").verdict,
            Verdict::Ok
        );
    }

    #[test]
    fn criu_dir_on_tmpfs_fails_whatever_the_space() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.fs.magic = Ok(policy::TMPFS_MAGIC);
        assert_fails(
            &run(&fx, &sys),
            "free space for images",
            "/var/nvwa/running/ is on tmpfs: its contents are lost at the kernel switch",
        );
    }

    #[test]
    fn kernel_threads_fail() {
        let mut fx = fixture();
        fx.cfg.restore.pids = vec![2, 3, 100];
        let report = run(&fx, &FakeSystem::healthy());
        assert_fails(&report, "pid 2", "kthreadd (pid 2)");
        assert_fails(
            &report,
            "pid 3",
            "kworker/0:1 (pid 3) listed in /etc/nvwa/nvwa-restore.yaml is a kernel thread",
        );
        assert_eq!(line(&report, "pid 100").verdict, Verdict::Ok);
    }

    #[test]
    fn a_thread_id_fails_naming_its_process() {
        let mut fx = fixture();
        fx.cfg.restore.pids = vec![101];
        let mut sys = FakeSystem::healthy();
        sys.procs.thread(101, 100);
        let report = run(&fx, &sys);
        assert_fails(
            &report,
            "pid 101",
            "list its process, pid 100, instead of 101",
        );
    }

    #[test]
    fn init_nvwa_and_nested_pids_fail() {
        let mut fx = fixture();
        fx.cfg.restore.pids = vec![1, ME, 100, 101];
        let mut sys = FakeSystem::healthy();
        sys.procs.add(101, 100, "redis-child", 0);
        let report = run(&fx, &sys);
        assert_fails(&report, "pid 1", "is init");
        assert_fails(&report, &format!("pid {ME}"), "nvwa itself");
        assert_fails(&report, "pid 101", "inside the tree of pid 100");
        assert_eq!(line(&report, "pid 100").verdict, Verdict::Ok);
    }

    #[test]
    fn an_empty_target_list_warns() {
        let mut fx = fixture();
        fx.cfg.restore.pids.clear();
        let report = run(&fx, &FakeSystem::healthy());
        let l = line(&report, "targets listed");
        assert_eq!(l.verdict, Verdict::Warn, "{}", report.render());
        assert!(l.detail.starts_with("nothing to preserve"), "{}", l.detail);
        assert!(!report.failed(), "{}", report.render());
        assert!(report
            .render()
            .contains("list the processes to keep in /etc/nvwa/nvwa-restore.yaml"));
    }

    #[test]
    fn criu_dir_not_writable_or_missing() {
        let fx = fixture();
        let mut sys = FakeSystem::healthy();
        sys.writable.clear();
        sys.writable.insert("/etc/systemd/system/".into());
        assert_fails(
            &run(&fx, &sys),
            "image directory",
            "not a writable directory",
        );
        sys.paths.remove(Path::new("/var/nvwa/running/"));
        let report = run(&fx, &sys);
        assert_eq!(line(&report, "image directory").verdict, Verdict::Warn);
        assert!(report.render().contains("mkdir -p /var/nvwa/running/"));
    }

    #[test]
    fn pin_memory_requested_but_absent() {
        let mut fx = fixture();
        fx.cfg.restore.enable_pin_memory = true;
        // As parse_restore leaves it when pre_dump is not given.
        fx.cfg.restore.pre_dump = false;
        let mut sys = FakeSystem::healthy();
        assert_fails(&run(&fx, &sys), "pin memory", "stock kernel");
        // Boot parameter alone is not enough: the device is needed too.
        sys.file(CMDLINE, "ro pinmemory=100M@0x64000000 max_pin_pid_num=4096");
        assert_fails(&run(&fx, &sys), "pin memory", "/dev/pinmem is missing");
        sys.path("/dev/pinmem");
        let report = run(&fx, &sys);
        assert_eq!(line(&report, "pin memory").verdict, Verdict::Ok);
        assert!(!report.failed(), "{}", report.render());
    }

    #[test]
    fn quick_kexec_requested_but_absent() {
        let mut fx = fixture();
        fx.cfg.restore.enable_quick_kexec = true;
        assert_fails(
            &run(&fx, &FakeSystem::healthy()),
            "quick kexec",
            "quickkexec=",
        );
    }

    #[test]
    fn json_shape() {
        let fx = fixture();
        let report = run(&fx, &FakeSystem::healthy());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["lines"][0]["verdict"], "ok");
        assert!(json["lines"][0].get("fix").is_none());
    }
}
