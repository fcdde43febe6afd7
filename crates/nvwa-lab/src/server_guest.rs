//! The server guest: Debian 13 (trixie) built with mmdebstrap from Debian's packages, systemd as
//! PID 1, its kernels installed as packages (so `/boot/vmlinuz-V` and `/boot/initrd.img-V` are
//! made by initramfs-tools), nvwa installed as an operator installs it: from the Debian package
//! that `scripts/package` builds (`dpkg -i`, its maintainer scripts and initramfs trigger
//! included), `/etc/nvwa/nvwa-server.yaml` edited to keep images in `/var/lib/nvwa` on the disk.
//!
//! Cache layout (under `<cache>/server/`), in two layers, so that a new build of nvwa redoes only
//! the second (about a minute, offline) and never mmdebstrap:
//! - `apt/`        the lab's own apt configuration for trixie (see `apt`)
//! - `rootfs/`     mmdebstrap's output, plus the lab's own units; no nvwa
//! - `manifest.json` what was built from what
//! - `pkg/`        the guest with nvwa's package installed, keyed by the package's and the base's
//!   contents (`pkg/key`):
//!   - `disk.raw`  its root file system, ext4 made with `mke2fs -d` (no loop mount); never written
//!     by a run: each run boots a copy-on-write overlay of it
//!   - `boot/`     each kernel's `vmlinuz-V` and `initrd.img-V`, copied out of it for QEMU's
//!     `-kernel`/`-initrd` (the guest's own copies stay in its `/boot`)
//!
//! The lab's workload, scripts and the scenario reach the guest at run time on a small second disk
//! mounted at `/lab`; `lab-install.service` copies them into place.

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
/// Installs nvwa's package into the guest's root file system (chrooted, on the host).
pub const INSTALL_DEB: &str = include_str!("guest/server/install-deb.sh");
pub const RUNNER: &str = include_str!("guest/server/server.sh");
pub const LAB_INSTALL_UNIT: &str = include_str!("guest/server/lab-install.service");
pub const LAB_UNIT: &str = include_str!("guest/server/lab.service");
pub const LIB: &str = include_str!("guest/lib.sh");

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
    // For Ansible, which drives the guest from the host over SSH (disabled at build).
    "openssh-server",
    "python3",
];

/// The server guest's nvwa configuration, written over the package's conffile as an operator edits
/// it: images on the root disk.
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

/// The part of the base layer's manifest that describes what is on its disk, in `pkg/key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// What mmdebstrap installed: `PACKAGES`, then each kernel's `name/suite`.
    packages: Vec<String>,
    customize: String,
    /// The project's files written into the root file system (path, contents).
    files: Vec<(String, String)>,
    kernels: KernelSet,
    /// Bytes of the root file system.
    disk_bytes: u64,
}

/// A built server guest: the base layer alone (`disk` is then its root file system's directory)
/// or with nvwa's package installed (`disk` is the ext4 image a run boots from).
#[derive(Debug, Clone)]
pub struct ServerGuest {
    pub dir: PathBuf,
    pub disk: PathBuf,
    /// Where `boot_files` are.
    pub boot: PathBuf,
    pub kernels: KernelSet,
}

impl ServerGuest {
    /// QEMU's `-kernel` and `-initrd` for `k`: initramfs-tools' own initrd, from the guest.
    pub fn boot_files(&self, k: &Kernel) -> (PathBuf, PathBuf) {
        (
            self.boot.join(format!("vmlinuz-{}", k.release())),
            self.boot.join(format!("initrd.img-{}", k.release())),
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

/// The lab's files in the guest's root file system (path, contents, mode), and the
/// `[Install] WantedBy=` links that `systemctl enable` would make. nvwa's own come from its
/// package (`install_package`).
fn project_files() -> Vec<(&'static str, String, u32)> {
    vec![
        (
            "usr/lib/systemd/system/lab-install.service",
            LAB_INSTALL_UNIT.into(),
            0o644,
        ),
        ("usr/lib/systemd/system/lab.service", LAB_UNIT.into(), 0o644),
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

/// The cached base layer when its inputs are unchanged (no network needed), else builds it.
/// `refresh` re-reads the archive (apt-get update): new kernels there rebuild the guest.
pub fn prepare(cache: &Path, refresh: bool) -> Result<ServerGuest> {
    let dir = cache.join("server");
    let previous = load_manifest(&dir);
    let rootfs = dir.join("rootfs");
    let guest = |m: &Manifest| ServerGuest {
        dir: dir.clone(),
        disk: rootfs.clone(),
        boot: rootfs.join("boot"),
        kernels: m.kernels.clone(),
    };
    if let Some(m) = &previous {
        let g = guest(m);
        let present = g.disk.is_dir()
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
            && rootfs.is_dir()
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
    // Layouts of older labs: a disk and boot files without the package.
    for old in ["disk.raw", "boot", "init-top-nvwa"] {
        let p = dir.join(old);
        let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
    }
    for k in [&kernels.previous, &kernels.current, &kernels.newest] {
        for f in [
            format!("vmlinuz-{}", k.release()),
            format!("initrd.img-{}", k.release()),
        ] {
            if !rootfs.join("boot").join(&f).is_file() {
                bail!(
                    "the guest has no /boot/{f}: did initramfs-tools run for {}?",
                    k.package
                );
            }
        }
    }
    install_project_files(&rootfs)?;
    let disk_bytes = tree_bytes(&rootfs)?;
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
        rootfs.display(),
        disk_bytes >> 20
    );
    Ok(guest(&m))
}

/// The Debian package the server guest installs nvwa from: `NVWA_LAB_DEB`, which
/// `scripts/nvwa-lab` sets after building it with `scripts/package deb`.
pub fn package_from_env() -> Result<PathBuf> {
    let deb = std::env::var_os("NVWA_LAB_DEB")
        .map(PathBuf::from)
        .context(
            "the server guest installs nvwa from its Debian package, and NVWA_LAB_DEB names none: \
         run the lab through scripts/nvwa-lab, which builds it (scripts/package deb)",
        )?;
    if !deb.is_file() {
        bail!(
            "NVWA_LAB_DEB={}: no such package; build it with scripts/package deb",
            deb.display()
        );
    }
    Ok(deb)
}

/// Fails unless the package carries the `nvwa` of this build: a package left from an older build
/// would test other code than the checkout's. cargo-deb strips the binary, so the two are compared
/// by their GNU build id (a hash of what was linked), which stripping keeps.
pub fn check_package_binary(deb: &Path, nvwa: &Path) -> Result<()> {
    let out = Command::new("sh")
        .args([
            "-c",
            "dpkg-deb --fsys-tarfile \"$1\" | tar -xOf - ./usr/bin/nvwa",
            "sh",
        ])
        .arg(deb)
        .output()
        .context("cannot run dpkg-deb (apt-get install dpkg)")?;
    if !out.status.success() {
        bail!(
            "cannot read usr/bin/nvwa from {}: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let built = std::fs::read(nvwa).with_context(|| format!("cannot read {}", nvwa.display()))?;
    let id = |data: &[u8], what: &Path| -> Result<Vec<u8>> {
        use object::Object;
        let f = object::File::parse(data)
            .with_context(|| format!("{} is not an ELF file", what.display()))?;
        f.build_id()?
            .map(<[u8]>::to_vec)
            .with_context(|| format!("{} has no GNU build id", what.display()))
    };
    if id(&out.stdout, deb)? != id(&built, nvwa)? {
        bail!(
            "{} does not carry {}: the package is older than the build; rebuild it with scripts/package deb",
            deb.display(),
            nvwa.display()
        );
    }
    Ok(())
}

/// What the package layer is built from: the package, the script that installs it, the lab's
/// configuration and the base layer it goes onto.
fn package_key(base: &Manifest, deb: &Path) -> Result<String> {
    let sum = exec::run(Command::new("sha256sum").arg(deb), SMALL_DEADLINE)?;
    let sum = sum.stdout.split_whitespace().next().unwrap_or_default();
    Ok(serde_json::to_string_pretty(&serde_json::json!({
        "package_sha256": sum,
        "install_deb": INSTALL_DEB,
        "server_yaml": SERVER_YAML,
        "base": base,
    }))?)
}

/// The guest with nvwa's package installed (`pkg/`), built from the base layer when the package
/// or the base changed: the root file system is copied, the package installed in it by
/// `install-deb.sh` (chrooted, with /proc, /sys and /dev in a mount namespace of its own, so
/// nothing stays mounted), the lab's configuration written, and the disk and boot files made.
pub fn with_package(base: &ServerGuest, deb: &Path) -> Result<ServerGuest> {
    let m = load_manifest(&base.dir).context("the server guest's base layer has no manifest")?;
    let key = package_key(&m, deb)?;
    // Two labs sharing the cache (two checkouts) must not build the layer over each other: the
    // second waits, then finds it built (or builds its own package's).
    let lock_path = base.dir.join("pkg.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    use std::os::fd::AsRawFd;
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "cannot lock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
    }
    let pkg = base.dir.join("pkg");
    let g = ServerGuest {
        dir: base.dir.clone(),
        disk: pkg.join("disk.raw"),
        boot: pkg.join("boot"),
        kernels: base.kernels.clone(),
    };
    let present = g.disk.is_file()
        && [&g.kernels.previous, &g.kernels.current, &g.kernels.newest]
            .iter()
            .all(|k| {
                let (v, i) = g.boot_files(k);
                v.is_file() && i.is_file()
            });
    if present && std::fs::read_to_string(pkg.join("key")).ok().as_deref() == Some(&key) {
        return Ok(g);
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!("installing nvwa's package into the server guest needs root (chroot, and mke2fs -d keeps the files' owners only as root): run scripts/nvwa-lab as root");
    }
    let started = Instant::now();
    eprintln!(
        "nvwa-lab: installing {} into the server guest…",
        deb.display()
    );
    let _ = std::fs::remove_dir_all(&pkg);
    std::fs::create_dir_all(&pkg)?;
    let root = pkg.join("rootfs");
    exec::run(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&base.disk)
            .arg(&root),
        DISK_DEADLINE,
    )
    .context("copying the server guest's root file system")?;
    std::fs::copy(deb, root.join("tmp/nvwa.deb"))?;
    std::fs::write(root.join("tmp/install-deb.sh"), INSTALL_DEB)?;
    let out = exec::run(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                "set -e; r=$1; mount -t proc proc \"$r/proc\"; mount -t sysfs sysfs \"$r/sys\"; \
                 mount --rbind /dev \"$r/dev\"; exec chroot \"$r\" sh /tmp/install-deb.sh /tmp/nvwa.deb",
            )
            .arg("sh")
            .arg(&root),
        DISK_DEADLINE,
    );
    let log = pkg.join("install.log");
    match out {
        Ok(o) => std::fs::write(&log, format!("{}{}", o.stdout, o.stderr))?,
        Err(e) => {
            let _ = std::fs::write(&log, format!("{e:#}"));
            return Err(e).with_context(|| {
                format!(
                    "installing {} into the server guest (log: {})",
                    deb.display(),
                    log.display()
                )
            });
        }
    }
    for f in ["tmp/nvwa.deb", "tmp/install-deb.sh"] {
        std::fs::remove_file(root.join(f))?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(root.join("etc/nvwa/nvwa-server.yaml"), SERVER_YAML)?;
        // criu_dir: root's alone, as nvwa demands.
        std::fs::create_dir_all(root.join("var/lib/nvwa"))?;
        std::fs::set_permissions(
            root.join("var/lib/nvwa"),
            std::fs::Permissions::from_mode(0o700),
        )?;
    }
    std::fs::create_dir_all(&g.boot)?;
    for k in [&g.kernels.previous, &g.kernels.current, &g.kernels.newest] {
        for f in [
            format!("vmlinuz-{}", k.release()),
            format!("initrd.img-{}", k.release()),
        ] {
            std::fs::copy(root.join("boot").join(&f), g.boot.join(&f))
                .with_context(|| format!("the guest has no /boot/{f}"))?;
        }
    }
    let bytes = make_ext4(&root, &g.disk, "nvwa-root", FREE_BYTES)?;
    std::fs::remove_dir_all(&root)?;
    std::fs::write(pkg.join("key"), &key)?;
    eprintln!(
        "nvwa-lab: nvwa's package installed into the server guest in {:.0} s: {} ({} MiB)",
        started.elapsed().as_secs_f64(),
        g.disk.display(),
        bytes >> 20
    );
    Ok(g)
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

/// The lab disk of one run, mounted read-only at `/lab` in the guest: this checkout's workload,
/// the lab's scripts, the scenario and its files.
pub fn lab_disk(dir: &Path, bins: &Binaries, s: &Scenario, scenario_sh: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let stage = dir.join("lab");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("bin"))?;
    std::fs::set_permissions(&stage, std::fs::Permissions::from_mode(0o755))?;
    std::fs::copy(&bins.workload, stage.join("bin/nvwa-lab-workload"))
        .with_context(|| format!("cannot copy {}", bins.workload.display()))?;
    for (name, text, mode) in [
        ("install.sh", INSTALL, 0o755),
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
    if s.ssh {
        authorize_run_key(dir, &stage.join("files"))?;
    }
    let image = dir.join("lab.img");
    make_ext4(&stage, &image, "nvwa-lab", 8 << 20)?;
    Ok(image)
}

/// A key pair for this run only (`ssh = true`): the private key stays in the run directory
/// (`ssh_key`, for the host steps), the public one becomes root's authorized key in the guest.
/// Never in the cache or the checkout, and gone with the next run of the scenario.
fn authorize_run_key(run_dir: &Path, files: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let key = run_dir.join("ssh_key");
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
    exec::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "nvwa-lab run key", "-f"])
            .arg(&key),
        SMALL_DEADLINE,
    )
    .context("making the run's SSH key (ssh-keygen is in openssh-client: apt-get install openssh-client)")?;
    let ssh = files.join("root/.ssh");
    std::fs::create_dir_all(&ssh)?;
    std::fs::set_permissions(files.join("root"), std::fs::Permissions::from_mode(0o700))?;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
    let authorized = ssh.join("authorized_keys");
    std::fs::copy(key.with_extension("pub"), &authorized)?;
    std::fs::set_permissions(&authorized, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nvwa's units and initramfs script, as the package installs them.
    const NVWA_UNIT: &str = include_str!("../../../dist/nvwa.service");
    const NVWA_PRE_UNIT: &str = include_str!("../../../dist/nvwa-pre.service");
    const NVWA_GENERATOR: &str = include_str!("../../../dist/nvwa-generator");
    const INITRAMFS_HOOK: &str =
        include_str!("../../../dist/initramfs-tools/scripts/init-top/nvwa");

    #[test]
    fn the_guest_scripts_are_valid_sh() {
        crate::guest::tests::assert_valid_sh(&[
            ("customize.sh", CUSTOMIZE),
            ("install.sh", INSTALL),
            ("install-deb.sh", INSTALL_DEB),
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
            .join("etc/systemd/system/multi-user.target.wants/lab.service");
        assert_eq!(
            std::fs::read_link(link).unwrap(),
            Path::new("/usr/lib/systemd/system/lab.service")
        );
        assert!(t
            .path()
            .join("etc/systemd/system/sysinit.target.wants/lab-install.service")
            .is_symlink());
        // nvwa's own files come from its package, never from the lab.
        assert!(!t
            .path()
            .join("usr/lib/systemd/system/nvwa.service")
            .exists());
        assert!(!t.path().join("etc/nvwa").exists());
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
        std::fs::create_dir_all(dir.join("rootfs/boot")).unwrap();
        for k in ["6.12.1", "6.12.2", "7.0.1"] {
            std::fs::write(dir.join(format!("rootfs/boot/vmlinuz-{k}")), b"k").unwrap();
            std::fs::write(dir.join(format!("rootfs/boot/initrd.img-{k}")), b"i").unwrap();
        }
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
        assert_eq!(g.disk, t.path().join("server/rootfs"));
    }

    #[test]
    fn a_cached_package_layer_is_used_while_its_key_holds() {
        let t = tempfile::tempdir().unwrap();
        cached_guest(t.path(), CUSTOMIZE);
        let base = prepare(t.path(), false).unwrap();
        let deb = t.path().join("nvwa.deb");
        std::fs::write(&deb, b"a package").unwrap();
        let pkg = t.path().join("server/pkg");
        std::fs::create_dir_all(pkg.join("boot")).unwrap();
        for k in ["6.12.1", "6.12.2", "7.0.1"] {
            std::fs::write(pkg.join(format!("boot/vmlinuz-{k}")), b"k").unwrap();
            std::fs::write(pkg.join(format!("boot/initrd.img-{k}")), b"i").unwrap();
        }
        std::fs::write(pkg.join("disk.raw"), b"disk").unwrap();
        let m = load_manifest(&base.dir).unwrap();
        std::fs::write(pkg.join("key"), package_key(&m, &deb).unwrap()).unwrap();
        let g = with_package(&base, &deb).unwrap();
        assert_eq!(g.disk, pkg.join("disk.raw"));
        assert_eq!(
            g.boot_files(&g.kernels.newest).1,
            pkg.join("boot/initrd.img-7.0.1")
        );
        // Another package, or the same one on another base, is another key.
        let key = package_key(&m, &deb).unwrap();
        std::fs::write(&deb, b"another package").unwrap();
        assert_ne!(package_key(&m, &deb).unwrap(), key);
        let mut m2 = m.clone();
        m2.disk_bytes += 1;
        std::fs::write(&deb, b"a package").unwrap();
        assert_ne!(package_key(&m2, &deb).unwrap(), key);
    }

    #[test]
    fn a_package_without_the_build_s_binary_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(
            root.join("DEBIAN/control"),
            "Package: nvwa\nVersion: 1\nArchitecture: all\nMaintainer: x <x@example.org>\nDescription: x\n",
        )
        .unwrap();
        // Two real binaries (with build ids, as Debian's linker writes them); the package's
        // copy is stripped, as cargo-deb strips it.
        let (first, second) = (Path::new("/usr/bin/true"), Path::new("/usr/bin/false"));
        let st = Command::new("strip")
            .arg("-o")
            .arg(root.join("usr/bin/nvwa"))
            .arg(first)
            .status()
            .unwrap();
        assert!(st.success(), "strip (binutils)");
        let deb = t.path().join("nvwa.deb");
        let out = Command::new("dpkg-deb")
            .args(["--root-owner-group", "-b"])
            .arg(&root)
            .arg(&deb)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        check_package_binary(&deb, first).unwrap();
        let e = check_package_binary(&deb, second).unwrap_err().to_string();
        assert!(e.contains("rebuild it with scripts/package deb"), "{e}");
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
        std::fs::write(&bins.workload, b"workload").unwrap();
        let text = "description = \"x\"\nguest = \"server\"\nssh = true\n[[files]]\nguest = \"/etc/app.conf\"\ncontent = \"a = 1\"\nmode = 0o600\n";
        let s = Scenario::parse(text, &t.path().join("s.toml")).unwrap();
        let run = t.path().join("run");
        std::fs::create_dir_all(&run).unwrap();
        let image = lab_disk(&run, &bins, &s, "LAB_CHECKS=0\n").unwrap();
        assert!(std::fs::metadata(&image).unwrap().len() >= 8 << 20);
        let stage = run.join("lab");
        assert_eq!(
            std::fs::read(stage.join("bin/nvwa-lab-workload")).unwrap(),
            b"workload"
        );
        assert!(
            !stage.join("bin/nvwa").exists(),
            "nvwa comes from its package"
        );
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
        // ssh = true: root's authorized key is the public half of the run's key.
        assert_eq!(mode("files/root/.ssh"), 0o700);
        assert_eq!(
            std::fs::read(stage.join("files/root/.ssh/authorized_keys")).unwrap(),
            std::fs::read(run.join("ssh_key.pub")).unwrap()
        );
        assert_eq!(
            std::fs::metadata(run.join("ssh_key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o077,
            0
        );
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
            disk: PathBuf::from("/c/server/pkg/disk.raw"),
            boot: PathBuf::from("/c/server/pkg/boot"),
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
            PathBuf::from("/c/server/pkg/boot/initrd.img-7.0.1")
        );
    }
}
