//! The server guest: Debian 13 (trixie) built with mmdebstrap from Debian's packages, systemd as
//! PID 1, its kernels installed as packages (so `/boot/vmlinuz-V` and `/boot/initrd.img-V` are
//! made by initramfs-tools), nvwa installed as an operator installs it (`/usr/bin/nvwa`, the
//! units of `dist/` enabled, `/etc/nvwa`, images in `/var/lib/nvwa` on the disk).
//!
//! Cache layout (under `<cache>/server/`):
//! - `apt/`        the lab's own apt configuration for trixie (see `apt`)
//! - `rootfs/`     mmdebstrap's output, plus the project's units and configuration
//! - `boot/`       each kernel's `vmlinuz-V` and `initrd.img-V`, copied out of the root file
//!   system for QEMU's `-kernel`/`-initrd` (the guest's own copies stay in its `/boot`)
//! - `disk.raw`    the root file system, ext4 made with `mke2fs -d` (no loop mount); never
//!   written by a run: each run boots a copy-on-write overlay of it
//! - `manifest.json` what was built from what
//!
//! nvwa itself (and the lab's workload and scripts) reach the guest at run time on a small second
//! disk mounted at `/lab`; `lab-install.service` copies the binaries into `/usr/bin` before
//! nvwa's units start, so that a code change does not rebuild the guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::apt::{self, Kernel, KernelSet, LabApt};
use crate::exec;
use crate::guest::Binaries;
use crate::scenario::{KernelPair, Scenario};

/// mmdebstrap's hook that sets the machine up (see the script).
pub const CUSTOMIZE: &str = include_str!("guest/server/customize.sh");
pub const INSTALL: &str = include_str!("guest/server/install.sh");
pub const RUNNER: &str = include_str!("guest/server/server.sh");
pub const LAB_INSTALL_UNIT: &str = include_str!("guest/server/lab-install.service");
pub const LAB_UNIT: &str = include_str!("guest/server/lab.service");
pub const LIB: &str = include_str!("guest/lib.sh");
/// nvwa's units, as the project ships them.
pub const NVWA_UNIT: &str = include_str!("../../../dist/nvwa.service");
pub const NVWA_PRE_UNIT: &str = include_str!("../../../dist/nvwa-pre.service");
/// nvwa's systemd generator, installed by lab-install.service as the package installs it.
pub const NVWA_GENERATOR: &str = include_str!("../../../dist/nvwa-generator");
/// nvwa's initramfs-tools script, as the package installs it: the kernels' initrds must carry it.
pub const INITRAMFS_HOOK: &str =
    include_str!("../../../dist/initramfs-tools/scripts/init-top/nvwa");
const INITRAMFS_HOOK_PATH: &str = "usr/share/initramfs-tools/scripts/init-top/nvwa";

/// What the guest is built from, besides its kernels.
pub const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "kmod",
    "criu",
    "kexec-tools",
    "iproute2",
    // nft, for the firewall that restore_net carries over.
    "nftables",
    "initramfs-tools",
    "zstd",
    "e2fsprogs",
    "procps",
    // A sandboxed service from Debian, unmodified (disabled at build: see customize.sh).
    "redis-server",
];

/// The server guest's nvwa configuration: images on the root disk.
pub const SERVER_YAML: &str = "\
criu_dir: /var/lib/nvwa
criu_exe: /usr/sbin/criu
kexec_exe: /usr/sbin/kexec
systemd_etc: /etc/systemd/system/
log_dir: /var/log/nvwa
";

const MANIFEST: &str = "manifest.json";
const MANIFEST_FORMAT: u32 = 1;
const MMDEBSTRAP_DEADLINE: Duration = Duration::from_secs(3600);
const DISK_DEADLINE: Duration = Duration::from_secs(900);
const SMALL_DEADLINE: Duration = Duration::from_secs(120);
/// Room on the root disk for images and logs, above what the installed system takes.
const FREE_BYTES: u64 = 1536 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// What mmdebstrap installed: `PACKAGES`, then each kernel's `name/suite`.
    packages: Vec<String>,
    customize: String,
    /// The project's files written into the root file system (path, contents).
    files: Vec<(String, String)>,
    kernels: KernelSet,
    disk_bytes: u64,
}

/// A built server guest.
#[derive(Debug, Clone)]
pub struct ServerGuest {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub kernels: KernelSet,
}

impl ServerGuest {
    /// QEMU's `-kernel` and `-initrd` for `k`: initramfs-tools' own initrd, from the guest.
    pub fn boot_files(&self, k: &Kernel) -> (PathBuf, PathBuf) {
        let boot = self.dir.join("boot");
        (
            boot.join(format!("vmlinuz-{}", k.release())),
            boot.join(format!("initrd.img-{}", k.release())),
        )
    }

    /// (old, new) kernel of a pair.
    pub fn pair(&self, p: KernelPair) -> (&Kernel, &Kernel) {
        let k = &self.kernels;
        match p {
            KernelPair::Series => (&k.previous, &k.current),
            KernelPair::Major => (&k.current, &k.newest),
            KernelPair::Downgrade => (&k.newest, &k.current),
        }
    }
}

/// The project's files in the guest's root file system (path, contents, mode), and the
/// `[Install] WantedBy=` links that `systemctl enable` would make.
fn project_files() -> Vec<(&'static str, String, u32)> {
    vec![
        (
            "usr/lib/systemd/system/nvwa.service",
            NVWA_UNIT.into(),
            0o644,
        ),
        (
            "usr/lib/systemd/system/nvwa-pre.service",
            NVWA_PRE_UNIT.into(),
            0o644,
        ),
        (
            "usr/lib/systemd/system/lab-install.service",
            LAB_INSTALL_UNIT.into(),
            0o644,
        ),
        ("usr/lib/systemd/system/lab.service", LAB_UNIT.into(), 0o644),
        // Also put in place before the kernel packages are configured (see `mmdebstrap`); listed
        // here so that the manifest, hence the cache, follows its contents.
        (INITRAMFS_HOOK_PATH, INITRAMFS_HOOK.into(), 0o755),
        ("etc/nvwa/nvwa-server.yaml", SERVER_YAML.into(), 0o644),
        ("etc/nvwa/nvwa-restore.yaml", "pids: []\n".into(), 0o644),
    ]
}

/// `WantedBy=` targets of a unit's `[Install]` section.
fn wanted_by(unit: &str) -> Vec<String> {
    let mut in_install = false;
    let mut out = Vec::new();
    for l in unit.lines().map(str::trim) {
        if l.starts_with('[') {
            in_install = l == "[Install]";
        } else if in_install {
            if let Some(v) = l.strip_prefix("WantedBy=") {
                out.extend(v.split_whitespace().map(str::to_string));
            }
        }
    }
    out
}

fn load_manifest(dir: &Path) -> Option<Manifest> {
    let m: Manifest =
        serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST)).ok()?).ok()?;
    (m.format == MANIFEST_FORMAT).then_some(m)
}

fn static_inputs_match(m: &Manifest) -> bool {
    m.customize == CUSTOMIZE
        && m.files == file_list()
        && m.packages.iter().take(PACKAGES.len()).eq(PACKAGES.iter())
}

fn file_list() -> Vec<(String, String)> {
    project_files()
        .into_iter()
        .map(|(p, c, _)| (p.to_string(), c))
        .collect()
}

/// The cached guest when its inputs are unchanged (no network needed), else builds it.
/// `refresh` re-reads the archive (apt-get update): new kernels there rebuild the guest.
pub fn prepare(cache: &Path, refresh: bool) -> Result<ServerGuest> {
    let dir = cache.join("server");
    let previous = load_manifest(&dir);
    let guest = |m: &Manifest| ServerGuest {
        dir: dir.clone(),
        disk: dir.join("disk.raw"),
        kernels: m.kernels.clone(),
    };
    if let Some(m) = &previous {
        let g = guest(m);
        let present = g.disk.is_file()
            && [&m.kernels.previous, &m.kernels.current, &m.kernels.newest]
                .iter()
                .all(|k| {
                    let (v, i) = g.boot_files(k);
                    v.is_file() && i.is_file()
                });
        if !refresh && present && static_inputs_match(m) {
            eprintln!(
                "nvwa-lab: server guest cached in {} (kernels {}, {}, {})",
                dir.display(),
                m.kernels.previous.release(),
                m.kernels.current.release(),
                m.kernels.newest.release()
            );
            return Ok(g);
        }
    }
    require_tools()?;
    let started = Instant::now();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lab_apt = LabApt::new(&dir.join("apt"), apt::host_mirrors()?)?;
    eprintln!(
        "nvwa-lab: server guest: reading Debian {} from {}…",
        apt::RELEASE,
        lab_apt.mirrors.debian
    );
    lab_apt.update()?;
    let kernels = apt::resolve_kernels(&lab_apt)?;
    let mut packages: Vec<String> = PACKAGES.iter().map(|s| s.to_string()).collect();
    for k in [&kernels.previous, &kernels.current, &kernels.newest] {
        if !packages.contains(&k.install_spec()) {
            packages.push(k.install_spec());
        }
    }
    if let Some(m) = &previous {
        if m.packages == packages
            && static_inputs_match(m)
            && dir.join("disk.raw").is_file()
            && m.kernels == kernels
        {
            eprintln!("nvwa-lab: server guest is up to date");
            return Ok(guest(m));
        }
    }
    eprintln!(
        "nvwa-lab: building the server guest: Debian {} with kernels {} (previous), {} (current), {} (newest)…",
        apt::RELEASE,
        kernels.previous.release(),
        kernels.current.release(),
        kernels.newest.release()
    );
    let rootfs = dir.join("rootfs");
    // What an interrupted build left behind.
    for e in std::fs::read_dir(&dir)?.flatten() {
        if e.file_name().to_string_lossy().starts_with(".rootfs-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let tmp = dir.join(format!(".rootfs-{}", std::process::id()));
    mmdebstrap(&lab_apt, &packages, &dir, &tmp)?;
    let _ = std::fs::remove_dir_all(&rootfs);
    std::fs::rename(&tmp, &rootfs)?;
    let boot = dir.join("boot");
    let _ = std::fs::remove_dir_all(&boot);
    std::fs::create_dir_all(&boot)?;
    for k in [&kernels.previous, &kernels.current, &kernels.newest] {
        for f in [
            format!("vmlinuz-{}", k.release()),
            format!("initrd.img-{}", k.release()),
        ] {
            std::fs::copy(rootfs.join("boot").join(&f), boot.join(&f)).with_context(|| {
                format!(
                    "the guest has no /boot/{f}: did initramfs-tools run for {}?",
                    k.package
                )
            })?;
        }
    }
    install_project_files(&rootfs)?;
    let disk = dir.join("disk.raw");
    let disk_bytes = make_ext4(&rootfs, &disk, "nvwa-root", FREE_BYTES)?;
    let m = Manifest {
        format: MANIFEST_FORMAT,
        packages,
        customize: CUSTOMIZE.into(),
        files: file_list(),
        kernels: kernels.clone(),
        disk_bytes,
    };
    let tmp_manifest = dir.join(format!("{MANIFEST}.tmp"));
    std::fs::write(&tmp_manifest, serde_json::to_string_pretty(&m)?)?;
    std::fs::rename(&tmp_manifest, dir.join(MANIFEST))?;
    eprintln!(
        "nvwa-lab: server guest built in {:.0} s: {} ({} MiB)",
        started.elapsed().as_secs_f64(),
        disk.display(),
        disk_bytes >> 20
    );
    Ok(guest(&m))
}

fn require_tools() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("building the server guest needs root (mmdebstrap --mode=root, and mke2fs -d keeps the files' owners only as root): run `sudo scripts/nvwa-lab prepare`");
    }
    for (tool, pkg) in [
        ("mmdebstrap", "mmdebstrap"),
        ("mke2fs", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
    ] {
        let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
        if !found {
            bail!("`{tool}` is required for the server guest; install it: apt-get install {pkg}");
        }
    }
    Ok(())
}

fn mmdebstrap(lab_apt: &LabApt, packages: &[String], dir: &Path, into: &Path) -> Result<()> {
    let hook = dir.join("customize.sh");
    std::fs::write(&hook, CUSTOMIZE)?;
    // nvwa's init-top script goes in after the essential packages, before the kernel packages,
    // whose configuration runs initramfs-tools: every initrd is made with it, as on a server
    // where the nvwa package came first. (`update-initramfs -u -k all` afterwards would cost
    // about 25 s for the three kernels; customize.sh checks every initrd has the script.)
    let initramfs_hook = dir.join("init-top-nvwa");
    std::fs::write(&initramfs_hook, INITRAMFS_HOOK)?;
    let hook_dir = Path::new(INITRAMFS_HOOK_PATH).parent().expect("nested");
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--mode=root",
        "--variant=apt",
        "--format=directory",
        "--aptopt=Acquire::Retries \"3\"",
        // Documentation and translations are no use to the lab.
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
    ])
    .arg(format!("--include={}", packages.join(",")))
    .arg(format!(
        "--essential-hook=mkdir -p \"$1/{}\" && install -m 0755 {} \"$1/{INITRAMFS_HOOK_PATH}\"",
        hook_dir.display(),
        initramfs_hook.display(),
    ))
    .arg(format!("--customize-hook=sh {} \"$1\"", hook.display()))
    .arg(apt::RELEASE)
    .arg(into)
    .args(lab_apt.source_lines());
    let out = exec::run(&mut cmd, MMDEBSTRAP_DEADLINE).context("building the server guest")?;
    std::fs::write(dir.join("mmdebstrap.log"), out.stderr)?;
    Ok(())
}

fn install_project_files(rootfs: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (path, text, mode) in project_files() {
        let p = rootfs.join(path);
        std::fs::create_dir_all(p.parent().expect("nested"))?;
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        if let Some(unit) = path.strip_prefix("usr/lib/systemd/system/") {
            let text = std::fs::read_to_string(&p)?;
            for target in wanted_by(&text) {
                let wants = rootfs.join(format!("etc/systemd/system/{target}.wants"));
                std::fs::create_dir_all(&wants)?;
                let link = wants.join(unit);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(format!("/usr/lib/systemd/system/{unit}"), &link)?;
            }
        }
    }
    // criu_dir and log_dir: root's alone, as nvwa demands.
    for d in ["var/lib/nvwa", "var/log/nvwa"] {
        std::fs::create_dir_all(rootfs.join(d))?;
        std::fs::set_permissions(rootfs.join(d), std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Bytes of the files under `dir` (`du`'s apparent size).
fn tree_bytes(dir: &Path) -> Result<u64> {
    let out = exec::run(Command::new("du").arg("-sb").arg(dir), SMALL_DEADLINE)?;
    out.stdout
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sb {}: {:?}", dir.display(), out.stdout))
}

/// An ext4 image of `dir` (`mke2fs -d`), with `free` bytes to spare; returns its size.
fn make_ext4(dir: &Path, image: &Path, label: &str, free: u64) -> Result<u64> {
    let used = tree_bytes(dir)?;
    // ext4's own metadata and block rounding take about a quarter more than the files.
    let bytes = ((used + used / 4 + free) >> 20 << 20).max(16 << 20);
    let tmp = image.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    exec::run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", label, "-d"])
            .arg(dir)
            .arg(&tmp)
            .arg(format!("{}k", bytes >> 10)),
        DISK_DEADLINE,
    )
    .with_context(|| {
        format!(
            "making the ext4 image {} (mke2fs is in e2fsprogs: apt-get install e2fsprogs)",
            image.display()
        )
    })?;
    std::fs::rename(&tmp, image)?;
    Ok(bytes)
}

/// A throwaway copy-on-write overlay of the guest's disk: the cached image is never written.
pub fn overlay(base: &Path, overlay: &Path) -> Result<()> {
    let _ = std::fs::remove_file(overlay);
    exec::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(overlay),
        SMALL_DEADLINE,
    )
    .with_context(|| {
        format!(
            "creating the overlay {} (qemu-img is in qemu-utils: apt-get install qemu-utils)",
            overlay.display()
        )
    })?;
    Ok(())
}

/// The lab disk of one run, mounted read-only at `/lab` in the guest: this checkout's nvwa and
/// workload, the lab's scripts, the scenario and its files.
pub fn lab_disk(dir: &Path, bins: &Binaries, s: &Scenario, scenario_sh: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let stage = dir.join("lab");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("bin"))?;
    std::fs::set_permissions(&stage, std::fs::Permissions::from_mode(0o755))?;
    for (from, name) in [(&bins.nvwa, "nvwa"), (&bins.workload, "nvwa-lab-workload")] {
        std::fs::copy(from, stage.join("bin").join(name))
            .with_context(|| format!("cannot copy {}", from.display()))?;
    }
    for (name, text, mode) in [
        ("install.sh", INSTALL, 0o755),
        ("nvwa-generator", NVWA_GENERATOR, 0o755),
        ("server.sh", RUNNER, 0o755),
        ("lib.sh", LIB, 0o644),
        ("scenario.sh", scenario_sh, 0o644),
    ] {
        let p = stage.join(name);
        std::fs::write(&p, text)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
    }
    let base = s.path.parent().unwrap_or(Path::new("."));
    for f in &s.files {
        let p = stage.join("files").join(f.guest.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("nested"))?;
        match (&f.source, &f.content) {
            (Some(src), _) => {
                std::fs::copy(base.join(src), &p).with_context(|| {
                    format!("scenario {}: file {}", s.name, base.join(src).display())
                })?;
            }
            (None, Some(text)) => std::fs::write(&p, text)?,
            (None, None) => unreachable!("validated"),
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode))?;
    }
    let image = dir.join("lab.img");
    make_ext4(&stage, &image, "nvwa-lab", 8 << 20)?;
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_scripts_are_valid_sh() {
        crate::guest::tests::assert_valid_sh(&[
            ("customize.sh", CUSTOMIZE),
            ("install.sh", INSTALL),
            ("nvwa-generator", NVWA_GENERATOR),
            ("server.sh", RUNNER),
            ("lib.sh", LIB),
            ("init-top/nvwa", INITRAMFS_HOOK),
        ]);
    }

    const DRACUT_HOOK: &str = include_str!("../../../dist/dracut/90nvwa/nvwa-last-pid.sh");
    const DRACUT_SETUP: &str = include_str!("../../../dist/dracut/90nvwa/module-setup.sh");
    /// A script, whether it is sourced, and the shell that runs it: initramfs-tools runs its
    /// scripts (with klibc's sh, a dash; dash here), dracut sources its hooks (bash or dash).
    type Hook = (&'static str, bool, &'static str);
    const HOOKS: [Hook; 3] = [
        (INITRAMFS_HOOK, false, "sh"),
        (DRACUT_HOOK, true, "sh"),
        (DRACUT_HOOK, true, "bash"),
    ];

    /// What an initramfs script did with `cmdline` when the pid counter stood at `last_pid` and
    /// pid_max at 32768: (the counter after it, what it wrote to /dev/kmsg, pid_max after it);
    /// it must exit 0. The script's /proc
    /// and /dev paths are replaced by files of a temporary directory (those named in `missing`
    /// by paths that cannot be opened); `sourced` runs it as dracut does (`.` in `shell`), and
    /// then also asserts that it left nothing behind in the sourcing shell.
    fn run_pid_hook(
        (script, sourced, shell): Hook,
        cmdline: &str,
        last_pid: &str,
        missing: &[&str],
    ) -> (String, String, String) {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n).display().to_string();
        let mut text = script.to_string();
        for (path, file) in [
            ("/proc/cmdline", "cmdline"),
            ("/proc/sys/kernel/ns_last_pid", "ns_last_pid"),
            ("/proc/sys/kernel/pid_max", "pid_max"),
            ("/dev/kmsg", "kmsg"),
        ] {
            assert!(text.contains(path), "the script uses {path}");
            let to = if missing.contains(&file) {
                p(&format!("gone/{file}"))
            } else {
                p(file)
            };
            text = text.replace(path, &to);
        }
        std::fs::write(p("hook"), text).unwrap();
        std::fs::write(p("cmdline"), format!("{cmdline}\n")).unwrap();
        std::fs::write(p("ns_last_pid"), format!("{last_pid}\n")).unwrap();
        std::fs::write(p("pid_max"), "32768\n").unwrap();
        // A file a glob on the command line would match, in the script's working directory.
        std::fs::write(t.path().join("nvwa.last_pid=7777"), b"").unwrap();
        let mut cmd = Command::new(shell);
        if sourced {
            cmd.args([
                "-c",
                ". ./hook; echo \"left:${want-}${cur-}${cmdline-}$(command -v nvwa_last_pid)\"",
            ]);
        } else {
            cmd.arg("./hook");
        }
        let out = cmd.current_dir(t.path()).output().unwrap();
        assert!(out.status.success(), "{cmdline}: {out:?}");
        if sourced {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "left:\n", "{cmdline}");
        }
        let read = |n: &str| std::fs::read_to_string(p(n)).unwrap_or_default();
        let trimmed = |n: &str| read(n).trim().to_string();
        (trimmed("ns_last_pid"), read("kmsg"), trimmed("pid_max"))
    }

    #[test]
    fn the_initramfs_scripts_move_the_pid_counter_past_nvwa_last_pid() {
        for hook in HOOKS {
            let run = |cmdline: &str, last: &str| run_pid_hook(hook, cmdline, last, &[]);
            assert_eq!(
                run("BOOT_IMAGE=/vmlinuz ro nvwa.last_pid=3000 quiet", "150"),
                (
                    "3000".into(),
                    "<6>nvwa: next pid after 3000 (nvwa.last_pid)\n".into(),
                    "32768".into()
                )
            );
            // Beyond the initramfs' pid_max (the last boot ran with systemd's 2^22), or too
            // close to it: pid_max is raised first.
            assert_eq!(
                run("nvwa.last_pid=100000", "150"),
                (
                    "100000".into(),
                    "<6>nvwa: pid_max raised from 32768 to 4194304 (nvwa.last_pid)\n\
                     <6>nvwa: next pid after 100000 (nvwa.last_pid)\n"
                        .into(),
                    "4194304".into()
                )
            );
            assert_eq!(run("nvwa.last_pid=31000", "150").2, "4194304");
            assert_eq!(run("nvwa.last_pid=30000", "150").2, "32768");
            // The last occurrence wins, as for `nvwa pre`, even when it is malformed.
            assert_eq!(
                run("nvwa.last_pid=5000 ro nvwa.last_pid=3000", "150").0,
                "3000"
            );
            // Never backwards, and nothing but digits below pid_max's 7 digits.
            for cmdline in [
                "ro quiet",
                "nvwa.last_pid=100",
                "nvwa.last_pid=3000 nvwa.last_pid=12x",
                "nvwa.last_pid=",
                "nvwa.last_pid=-5",
                "nvwa.last_pid=0",
                "nvwa.last_pid=99999999",
                "nvwa.last_pid=*",
                "nvwa.last_pid=3000 nvwa.last_pid=?*",
                "xnvwa.last_pid=3000",
            ] {
                assert_eq!(
                    run(cmdline, "150"),
                    ("150".into(), String::new(), "32768".into()),
                    "{cmdline}"
                );
            }
            // A leading zero would be octal to the kernel.
            assert_eq!(run("nvwa.last_pid=0042", "10").0, "42");
            // A word that is a glob changes nothing either.
            assert_eq!(run("* nvwa.last_pid=3000", "150").0, "3000");
        }
    }

    #[test]
    fn the_initramfs_scripts_never_fail_the_boot() {
        // No /proc/cmdline, ns_last_pid or /dev/kmsg: each exits 0 (run_pid_hook asserts it).
        for hook in HOOKS {
            let run = |missing: &[&str]| run_pid_hook(hook, "nvwa.last_pid=3000", "150", missing).0;
            assert_eq!(run(&["cmdline"]), "150");
            assert_eq!(run(&["ns_last_pid"]), "150");
            assert_eq!(run(&["kmsg"]), "3000", "the counter moves without a log");
        }
    }

    /// The real pid counter of a pid namespace of the test's own (in a user namespace, so that
    /// nothing of this machine's can change: pid_max stays out of reach): /proc/sys files read
    /// empty past their first byte, which no regular file stands in for.
    #[test]
    fn the_initramfs_scripts_move_a_real_pid_counter() {
        for (script, sourced, shell) in HOOKS {
            let t = tempfile::tempdir().unwrap();
            let p = |n: &str| t.path().join(n).display().to_string();
            let text = script
                .replace("/proc/cmdline", &p("cmdline"))
                .replace("/dev/kmsg", &p("kmsg"));
            std::fs::write(p("hook"), text).unwrap();
            std::fs::write(p("cmdline"), "ro nvwa.last_pid=3000\n").unwrap();
            let run = if sourced { ". \"$0\"" } else { "sh \"$0\"" };
            let out = Command::new("unshare")
                .args([
                    "--user",
                    "--map-root-user",
                    "--pid",
                    "--fork",
                    "--mount-proc",
                ])
                .args([
                    shell,
                    "-c",
                    &format!("{run}; sh -c 'echo $$'; true"),
                    &p("hook"),
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "unshare (util-linux) needs user and pid namespaces: {out:?}"
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout), "3001\n", "{shell}");
            assert_eq!(
                std::fs::read_to_string(p("kmsg")).unwrap(),
                "<6>nvwa: next pid after 3000 (nvwa.last_pid)\n"
            );
        }
    }

    #[test]
    fn the_initramfs_tools_script_declares_no_prerequisites() {
        let out = Command::new("sh")
            .args(["-c", INITRAMFS_HOOK, "nvwa", "prereqs"])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "\n");
    }

    #[test]
    fn the_dracut_module_installs_its_cmdline_hook() {
        crate::guest::tests::assert_valid_sh(&[("nvwa-last-pid.sh", DRACUT_HOOK)]);
        let out = Command::new("bash")
            .args(["-n", "-c", DRACUT_SETUP])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(DRACUT_SETUP.contains("inst_hook cmdline 01 \"$moddir/nvwa-last-pid.sh\""));
    }

    #[test]
    fn units_are_enabled_where_they_ask_to_be() {
        assert_eq!(wanted_by(NVWA_UNIT), ["multi-user.target"]);
        assert_eq!(wanted_by(NVWA_PRE_UNIT), ["sysinit.target"]);
        assert_eq!(wanted_by(LAB_UNIT), ["multi-user.target"]);
        assert_eq!(
            wanted_by("[Unit]\nWantedBy=x.target\n"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn project_files_land_in_the_root_with_their_links() {
        let t = tempfile::tempdir().unwrap();
        install_project_files(t.path()).unwrap();
        let link = t
            .path()
            .join("etc/systemd/system/multi-user.target.wants/nvwa.service");
        assert_eq!(
            std::fs::read_link(link).unwrap(),
            Path::new("/usr/lib/systemd/system/nvwa.service")
        );
        assert!(t
            .path()
            .join("etc/systemd/system/sysinit.target.wants/nvwa-pre.service")
            .is_symlink());
        let yaml = std::fs::read_to_string(t.path().join("etc/nvwa/nvwa-server.yaml")).unwrap();
        assert!(yaml.contains("criu_dir: /var/lib/nvwa\n"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.path().join("var/lib/nvwa"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // The initramfs script is a project file: its contents are in the cache key.
        let hook = t.path().join(INITRAMFS_HOOK_PATH);
        assert_eq!(std::fs::read_to_string(&hook).unwrap(), INITRAMFS_HOOK);
        let mode = std::fs::metadata(&hook).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o755,
            "initramfs-tools runs only executable scripts"
        );
        assert!(file_list().iter().any(|(p, _)| p == INITRAMFS_HOOK_PATH));
    }

    fn kernel(release: &str) -> Kernel {
        Kernel {
            package: format!("linux-image-{release}"),
            deb_version: "1".into(),
            suite: "trixie".into(),
        }
    }

    /// A cache holding a built guest: its manifest, disk and boot files.
    fn cached_guest(cache: &Path, customize: &str) -> KernelSet {
        let dir = cache.join("server");
        let kernels = KernelSet {
            previous: kernel("6.12.1"),
            current: kernel("6.12.2"),
            newest: kernel("7.0.1"),
        };
        std::fs::create_dir_all(dir.join("boot")).unwrap();
        for k in ["6.12.1", "6.12.2", "7.0.1"] {
            std::fs::write(dir.join(format!("boot/vmlinuz-{k}")), b"k").unwrap();
            std::fs::write(dir.join(format!("boot/initrd.img-{k}")), b"i").unwrap();
        }
        std::fs::write(dir.join("disk.raw"), b"disk").unwrap();
        let m = Manifest {
            format: MANIFEST_FORMAT,
            packages: PACKAGES.iter().map(|p| p.to_string()).collect(),
            customize: customize.into(),
            files: file_list(),
            kernels: kernels.clone(),
            disk_bytes: 4,
        };
        std::fs::write(dir.join(MANIFEST), serde_json::to_string(&m).unwrap()).unwrap();
        kernels
    }

    #[test]
    fn a_cached_guest_is_used_without_apt_or_root() {
        let t = tempfile::tempdir().unwrap();
        let kernels = cached_guest(t.path(), CUSTOMIZE);
        let g = prepare(t.path(), false).unwrap();
        assert_eq!(g.kernels, kernels);
        assert_eq!(g.disk, t.path().join("server/disk.raw"));
    }

    #[test]
    fn a_changed_input_is_not_served_from_the_cache() {
        let t = tempfile::tempdir().unwrap();
        cached_guest(t.path(), "an older hook");
        let m = load_manifest(&t.path().join("server")).unwrap();
        assert!(!static_inputs_match(&m));
        let mut m2 = m.clone();
        m2.customize = CUSTOMIZE.into();
        assert!(static_inputs_match(&m2));
        m2.files[0].1.push_str("# edited\n");
        assert!(
            !static_inputs_match(&m2),
            "an edited dist unit rebuilds the guest"
        );
    }

    #[test]
    fn the_lab_disk_carries_the_binaries_scripts_and_files() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let bins = Binaries::in_dir(t.path());
        std::fs::write(&bins.nvwa, b"nvwa").unwrap();
        std::fs::write(&bins.workload, b"workload").unwrap();
        let text = "description = \"x\"\nguest = \"server\"\n[[files]]\nguest = \"/etc/app.conf\"\ncontent = \"a = 1\"\nmode = 0o600\n";
        let s = Scenario::parse(text, &t.path().join("s.toml")).unwrap();
        let run = t.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let image = lab_disk(&run, &bins, &s, "LAB_CHECKS=0\n").unwrap();
        assert!(std::fs::metadata(&image).unwrap().len() >= 8 << 20);
        let stage = run.join("lab");
        assert_eq!(std::fs::read(stage.join("bin/nvwa")).unwrap(), b"nvwa");
        assert_eq!(
            std::fs::read_to_string(stage.join("scenario.sh")).unwrap(),
            "LAB_CHECKS=0\n"
        );
        let mode = |p: &str| {
            std::fs::metadata(stage.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("server.sh"), 0o755);
        assert_eq!(mode("install.sh"), 0o755);
        assert_eq!(mode("files/etc/app.conf"), 0o600);
        // mke2fs labelled it for the guest's fstab (LABEL=nvwa-lab).
        let raw = std::fs::read(&image).unwrap();
        // ext4 superblock at 1024, volume name at offset 0x78 in it
        assert_eq!(&raw[1024 + 0x78..1024 + 0x78 + 8], b"nvwa-lab");
    }

    #[test]
    fn a_run_writes_an_overlay_never_the_cached_disk() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("disk.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let ov = t.path().join("root.qcow2");
        overlay(&base, &ov).unwrap();
        let info = exec::run(
            Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(&ov),
            SMALL_DEADLINE,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
        assert_eq!(v["format"], "qcow2");
        assert_eq!(v["backing-filename-format"], "raw");
        assert_eq!(v["backing-filename"], base.display().to_string());
    }

    #[test]
    fn pairs_name_their_kernels() {
        let k = kernel;
        let g = ServerGuest {
            dir: PathBuf::from("/c/server"),
            disk: PathBuf::from("/c/server/disk.raw"),
            kernels: KernelSet {
                previous: k("6.12.1"),
                current: k("6.12.2"),
                newest: k("7.0.1"),
            },
        };
        let names = |p| {
            let (a, b) = g.pair(p);
            (a.release().to_string(), b.release().to_string())
        };
        assert_eq!(
            names(KernelPair::Series),
            ("6.12.1".into(), "6.12.2".into())
        );
        assert_eq!(names(KernelPair::Major), ("6.12.2".into(), "7.0.1".into()));
        assert_eq!(
            names(KernelPair::Downgrade),
            ("7.0.1".into(), "6.12.2".into())
        );
        assert_eq!(
            g.boot_files(&g.kernels.newest).1,
            PathBuf::from("/c/server/boot/initrd.img-7.0.1")
        );
    }
}
