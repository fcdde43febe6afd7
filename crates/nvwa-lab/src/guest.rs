//! The contents of a lab guest: busybox, criu, kexec-tools, the project's own binaries, the
//! kernel modules criu and the persistent memory need, the nvwa config and the scenario.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::image::GuestImage;
use crate::prepare::{Ingredients, KernelBits};
use crate::scenario::Scenario;

pub const INIT: &str = include_str!("guest/init.sh");
/// `/lab/lib.sh`: shell functions init.sh shares with the server guest.
pub const LIB: &str = include_str!("guest/lib.sh");
/// `/usr/sbin/lab-power-cut`: what `lab_power_cut` runs (see the script).
pub const POWER_CUT: &str = include_str!("guest/power-cut.sh");
/// `/usr/sbin/lab-server-pid`: the pid of the running nvwa server.
pub const SERVER_PID: &str = include_str!("guest/server-pid.sh");

/// The unprivileged user of the guest (`lab_as_user`), next to root.
pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nlab:x:1000:1000:lab:/home/lab:/bin/sh\n";
pub const GROUP: &str = "root:x:0:\nlab:x:1000:\n";

/// Modules criu needs (socket diagnostics, netfilter for locking the network, tun, veth) and the
/// legacy persistent memory that keeps the images across the kexec. crc32c_generic is a soft
/// dependency of libcrc32c that loading by path does not follow; `?` marks what some kernels lack.
pub const MODULES: &[&str] = &[
    "crc32c_generic?",
    "libcrc32c",
    "nfnetlink",
    "nf_tables",
    "unix_diag",
    "inet_diag",
    "tcp_diag",
    "udp_diag",
    "netlink_diag",
    "af_packet_diag?",
    "tun",
    "veth",
    "libnvdimm",
    "nd_btt",
    "nd_pmem",
    "nd_e820",
    "ext4",
    "virtio_pci?",
    "virtio_net?",
];

const SERVER_YAML: &str = "\
criu_dir: /var/nvwa/running/
criu_exe: /usr/sbin/criu
kexec_exe: /usr/sbin/kexec
systemd_etc: /etc/systemd/system/
log_dir: /var/nvwa/log/
";

/// The project's binaries, built from this checkout.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub nvwa: PathBuf,
    pub workload: PathBuf,
    /// pid 1 of the guest: runs /lab/init.sh and reaps orphans.
    pub init: PathBuf,
}

impl Binaries {
    pub fn in_dir(dir: &Path) -> Binaries {
        Binaries {
            nvwa: dir.join("nvwa"),
            workload: dir.join("nvwa-lab-workload"),
            init: dir.join("nvwa-lab-init"),
        }
    }
}

/// Userland tools from the Debian packages: (guest path, path inside the sysroot).
const TOOLS: &[(&str, &[&str])] = &[
    ("/usr/sbin/criu", &["usr/sbin/criu", "sbin/criu"]),
    ("/usr/sbin/kexec", &["sbin/kexec", "usr/sbin/kexec"]),
    ("/usr/sbin/mke2fs", &["sbin/mke2fs", "usr/sbin/mke2fs"]),
    (
        "/usr/sbin/ip",
        &["bin/ip", "sbin/ip", "usr/bin/ip", "usr/sbin/ip"],
    ),
];

fn find_in(sysroot: &Path, candidates: &[&str]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(|c| sysroot.join(c))
        .find(|p| p.exists())
}

/// One guest image for `kernel`. The same host files go into the images of both kernels, so a
/// restored process finds its executable and libraries unchanged after the switch.
pub fn image_for(
    ing: &Ingredients,
    bins: &Binaries,
    kernel: &KernelBits,
    scenario: &Scenario,
) -> Result<GuestImage> {
    let roots = vec![ing.sysroot.clone(), PathBuf::from("/")];
    let mut img = GuestImage::new();
    img.add_busybox(&ing.sysroot)?;
    for (guest, candidates) in TOOLS {
        let host = find_in(&ing.sysroot, candidates).with_context(|| {
            format!("{guest} is missing from the prepared packages; run `nvwa-lab prepare` again")
        })?;
        img.add_binary(guest, &host, &roots)?;
    }
    img.add_binary("/usr/sbin/nvwa", &bins.nvwa, &roots)?;
    img.add_binary("/usr/bin/nvwa-lab-workload", &bins.workload, &roots)?;
    img.add_kernel_modules(kernel, MODULES)?;
    img.add_binary("/init", &bins.init, &roots)?;
    img.add_bytes("/lab/init.sh", INIT.as_bytes().to_vec(), 0o755);
    img.add_bytes("/lab/lib.sh", LIB.as_bytes().to_vec(), 0o644);
    img.add_bytes("/etc/nvwa/nvwa-server.yaml", SERVER_YAML.into(), 0o644);
    img.add_bytes("/etc/nvwa/nvwa-restore.yaml", b"pids: []\n".to_vec(), 0o644);
    img.add_bytes(
        "/usr/sbin/lab-power-cut",
        POWER_CUT.as_bytes().to_vec(),
        0o755,
    );
    img.add_bytes(
        "/usr/sbin/lab-server-pid",
        SERVER_PID.as_bytes().to_vec(),
        0o755,
    );
    img.add_bytes("/etc/passwd", PASSWD.as_bytes().to_vec(), 0o644);
    img.add_bytes("/etc/group", GROUP.as_bytes().to_vec(), 0o644);
    img.add_dir("/var/nvwa", 0o755);
    img.add_bytes(
        "/lab/scenario.sh",
        scenario
            .guest_script(&ing.old.version, &ing.new.version)
            .into_bytes(),
        0o644,
    );
    add_scenario_files(&mut img, scenario)?;
    for pkg in &scenario.packages {
        add_package(&mut img, ing, pkg, &roots)?;
    }
    Ok(img)
}

fn add_scenario_files(img: &mut GuestImage, s: &Scenario) -> Result<()> {
    let base = s.path.parent().unwrap_or(Path::new("."));
    for f in &s.files {
        match (&f.source, &f.content) {
            (Some(src), _) => img
                .add_file(&f.guest, &base.join(src), f.mode)
                .with_context(|| format!("scenario {}: file {}", s.name, f.guest))?,
            (None, Some(text)) => img.add_bytes(&f.guest, text.clone().into_bytes(), f.mode),
            (None, None) => unreachable!("validated"),
        }
    }
    Ok(())
}

/// Adds every file of an extra Debian package (already extracted into the sysroot by
/// `prepare`), executables with their libraries.
fn add_package(
    img: &mut GuestImage,
    ing: &Ingredients,
    pkg: &str,
    roots: &[PathBuf],
) -> Result<()> {
    let debs = ing.cache.join("debs");
    let deb = std::fs::read_dir(&debs)
        .with_context(|| format!("cannot list {}", debs.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("package {pkg} was not prepared; `nvwa-lab prepare` fetches the packages scenarios name"))?;
    let out = Command::new("dpkg-deb").arg("-c").arg(&deb).output()?;
    if !out.status.success() {
        bail!("dpkg-deb -c {} failed", deb.display());
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let (kind, path) = (line.chars().next(), line.split_whitespace().nth(5));
        let Some(path) = path.map(|p| p.trim_start_matches('.')) else {
            continue;
        };
        let host = ing.sysroot.join(path.trim_start_matches('/'));
        match kind {
            Some('-') if is_elf(&host) => img.add_binary(path, &host, roots)?,
            Some('-') => img.add_file(path, &host, 0o755)?,
            Some('l') => {
                let target = line.split(" -> ").nth(1).unwrap_or_default();
                img.add_symlink(path, target);
            }
            _ => {}
        }
    }
    Ok(())
}

fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `sh -n`: the guest's scripts parse (busybox sh and dash agree on what they use).
    pub(crate) fn assert_valid_sh(scripts: &[(&str, &str)]) {
        for (name, text) in scripts {
            let out = Command::new("sh")
                .args(["-n", "-c", text])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn the_guest_scripts_are_valid_sh() {
        assert_valid_sh(&[
            ("init.sh", INIT),
            ("lib.sh", LIB),
            ("power-cut.sh", POWER_CUT),
            ("server-pid.sh", SERVER_PID),
        ]);
    }

    #[test]
    fn the_guest_has_root_and_an_unprivileged_user() {
        assert!(PASSWD.lines().any(|l| l.starts_with("root:x:0:0:")));
        assert!(PASSWD.lines().any(|l| l.starts_with("lab:x:1000:1000:")));
        assert!(GROUP.lines().any(|l| l == "lab:x:1000:"));
        assert!(
            INIT.contains("lab_as_user() {")
                && INIT.contains("nvwa-lab-workload as-user lab \"$@\""),
            "init.sh must give scenarios lab_as_user"
        );
    }
}
