//! A guest initramfs builder: collect files, symlinks and directories keyed
//! by guest path (later additions win) and write them as one cpio "newc"
//! archive, parents before children.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cpio::CpioWriter;
use crate::elf;
use crate::modules;
use crate::prepare::KernelBits;

/// mtime of generated entries (directories, symlinks, in-memory files).
pub const GENERATED_MTIME: u32 = 1_700_000_000;

/// The basic directory skeleton of every image.
pub const SKELETON: &[&str] = &[
    "bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc", "proc", "sys", "dev", "run",
    "tmp", "var", "boot", "root", "mnt",
];

/// Busybox applets the lab's guest scripts rely on; `add_busybox` fails if
/// the packaged busybox lacks one of them. Debian 12's busybox-static (1.35)
/// has no `nohup`, `pgrep` or `mountpoint`: use `setsid`, `pidof` and
/// `grep … /proc/mounts` instead.
pub const REQUIRED_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "mount",
    "umount",
    "mkdir",
    "cat",
    "echo",
    "ls",
    "ps",
    "kill",
    "sleep",
    "insmod",
    "modprobe",
    "poweroff",
    "reboot",
    "ip",
    "ifconfig",
    "grep",
    "sed",
    "awk",
    "head",
    "tail",
    "wc",
    "md5sum",
    "sha256sum",
    "sync",
    "tee",
    "cut",
    "tr",
    "seq",
    "date",
    "uname",
    "mknod",
    "setsid",
    "chmod",
    "cp",
    "mv",
    "rm",
    "ln",
    "stat",
    "test",
    "[",
    "printf",
    "dd",
    "find",
    "xargs",
    "timeout",
    "true",
    "false",
    "env",
    "pidof",
    "hexdump",
    "od",
    "switch_root",
    "dmesg",
    "free",
    "df",
    "du",
    "basename",
    "dirname",
    "sort",
    "uniq",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir { mode: u32 },
    HostFile { host: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
}

/// An initramfs under construction.
#[derive(Debug, Clone, Default)]
pub struct GuestImage {
    entries: BTreeMap<String, Entry>,
}

/// `"/usr/bin/x/"` → `"usr/bin/x"`.
fn norm(guest: &str) -> String {
    guest
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

impl GuestImage {
    /// An image with the basic directory skeleton.
    pub fn new() -> Self {
        let mut img = Self::default();
        for d in SKELETON {
            img.add_dir(d, 0o755);
        }
        img.add_dir("tmp", 0o1777);
        img.add_dir("root", 0o700);
        img
    }

    /// Copies host file `host` (symlinks followed) to `guest`, keeping its mtime.
    pub fn add_file(&mut self, guest: &str, host: &Path, mode: u32) -> Result<()> {
        let meta = std::fs::metadata(host)
            .with_context(|| format!("adding {guest}: {}", host.display()))?;
        if !meta.is_file() {
            bail!("adding {guest}: {} is not a regular file", host.display());
        }
        self.insert(
            guest,
            Entry::HostFile {
                host: host.to_path_buf(),
                mode: mode & 0o7777,
            },
        );
        Ok(())
    }

    /// Adds generated content (written with [`GENERATED_MTIME`]).
    pub fn add_bytes(&mut self, guest: &str, data: Vec<u8>, mode: u32) {
        self.insert(
            guest,
            Entry::Bytes {
                data,
                mode: mode & 0o7777,
            },
        );
    }

    pub fn add_symlink(&mut self, guest: &str, target: &str) {
        self.insert(
            guest,
            Entry::Symlink {
                target: target.to_string(),
            },
        );
    }

    pub fn add_dir(&mut self, guest: &str, mode: u32) {
        self.insert(
            guest,
            Entry::Dir {
                mode: mode & 0o7777,
            },
        );
    }

    fn insert(&mut self, guest: &str, e: Entry) {
        let key = norm(guest);
        assert!(!key.is_empty(), "guest path {guest:?} names the root");
        self.entries.insert(key, e);
    }

    /// Whether something (of any kind) is registered at `guest`.
    pub fn contains(&self, guest: &str) -> bool {
        self.entries.contains_key(&norm(guest))
    }

    /// Guest paths registered so far (without leading '/', sorted).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Adds an executable and its whole shared-library closure, each library
    /// at the guest path it has relative to the root of `lib_roots` it was
    /// found in (search the sysroot before "/").
    pub fn add_binary(&mut self, guest: &str, host: &Path, lib_roots: &[PathBuf]) -> Result<()> {
        self.add_file(guest, host, 0o755)?;
        for (lib_host, lib_guest) in elf::resolve_closure(&[host.to_path_buf()], lib_roots)? {
            let mode = std::fs::metadata(&lib_host)?.permissions();
            let mode = std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777;
            self.add_file(&lib_guest, &lib_host, mode)?;
        }
        Ok(())
    }

    /// Adds `/bin/busybox` from the busybox-static package in `sysroot` and a
    /// `/bin/<applet>` symlink for every applet it has (unless a regular
    /// file is already at that path).
    pub fn add_busybox(&mut self, sysroot: &Path) -> Result<()> {
        let bb = sysroot.join("bin/busybox");
        if !bb.is_file() {
            bail!(
                "{} is missing: prepare the sysroot with busybox-static",
                bb.display()
            );
        }
        let (interp, _) = elf::needed_libs(&bb)?;
        if interp.is_some() {
            bail!(
                "{} is dynamically linked; the lab needs busybox-static",
                bb.display()
            );
        }
        let out = Command::new(&bb)
            .arg("--list")
            .output()
            .with_context(|| format!("running {} --list", bb.display()))?;
        if !out.status.success() {
            bail!("{} --list failed: {}", bb.display(), out.status);
        }
        let applets: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty() && !l.contains('/'))
            .collect();
        let missing: Vec<&str> = REQUIRED_APPLETS
            .iter()
            .copied()
            .filter(|a| !applets.contains(*a))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} lacks applets the lab needs: {}",
                bb.display(),
                missing.join(" ")
            );
        }
        self.add_file("bin/busybox", &bb, 0o755)?;
        for a in &applets {
            let guest = format!("bin/{a}");
            match self.entries.get(&guest) {
                Some(Entry::HostFile { .. } | Entry::Bytes { .. }) => continue,
                _ => self.add_symlink(&guest, "busybox"),
            }
        }
        Ok(())
    }

    /// Adds the (decompressed) closure of `wanted` modules of `kernel` as
    /// `/lib/modules/<v>/nvwa-lab/<name>.ko`, plus a `load-order` file next
    /// to them listing one guest path per line. Returns that load order
    /// (absolute guest paths). Names ending in `?` are optional.
    pub fn add_kernel_modules(
        &mut self,
        kernel: &KernelBits,
        wanted: &[&str],
    ) -> Result<Vec<String>> {
        let dir = format!("lib/modules/{}/nvwa-lab", kernel.version);
        let mut order = Vec::new();
        for path in modules::module_closure(&kernel.modules_dir, wanted)? {
            let name = modules::module_name(&path.to_string_lossy());
            let data = modules::stage_module(&path)?;
            let guest = format!("{dir}/{name}.ko");
            self.add_bytes(&guest, data, 0o644);
            order.push(format!("/{guest}"));
        }
        let mut list = order.join("\n");
        if !list.is_empty() {
            list.push('\n');
        }
        self.add_bytes(&format!("{dir}/load-order"), list.into_bytes(), 0o644);
        Ok(order)
    }

    /// Writes the image as a cpio "newc" archive (parents before children,
    /// missing parent directories created with mode 0755; host files keep
    /// their mtime). Returns the archive size in bytes.
    pub fn write_cpio(&self, out: &Path) -> Result<u64> {
        let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
        let result = self.write_cpio_to(&tmp);
        match result {
            Ok(size) => {
                std::fs::rename(&tmp, out)
                    .with_context(|| format!("renaming to {}", out.display()))?;
                Ok(size)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn write_cpio_to(&self, path: &Path) -> Result<u64> {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = CpioWriter::with_mtime(BufWriter::new(file), GENERATED_MTIME);
        // implicit parents
        let mut all: BTreeMap<Vec<&str>, Option<&Entry>> = BTreeMap::new();
        for (k, e) in &self.entries {
            let comps: Vec<&str> = k.split('/').collect();
            for i in 1..comps.len() {
                all.entry(comps[..i].to_vec()).or_insert(None);
            }
            all.insert(comps, Some(e));
        }
        for (comps, e) in &all {
            let p = comps.join("/");
            let io = |r: std::io::Result<()>| {
                r.with_context(|| format!("writing {p} to {}", path.display()))
            };
            match e {
                None => io(w.add_dir(&p, 0o755))?,
                Some(Entry::Dir { mode }) => io(w.add_dir(&p, *mode))?,
                Some(Entry::Symlink { target }) => io(w.add_symlink(&p, target))?,
                Some(Entry::Bytes { data, mode }) => {
                    io(w.add_file(&p, *mode, data, GENERATED_MTIME))?
                }
                Some(Entry::HostFile { host, mode }) => {
                    let mut f = std::fs::File::open(host)
                        .with_context(|| format!("opening {}", host.display()))?;
                    let meta = f.metadata()?;
                    let mtime = std::os::unix::fs::MetadataExt::mtime(&meta)
                        .clamp(0, u32::MAX as i64) as u32;
                    io(w.add_file_from_reader(&p, *mode, &mut f, meta.len(), mtime))?;
                }
            }
        }
        let (buf, size) = w.finish()?;
        buf.into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
            .with_context(|| format!("syncing {}", path.display()))?;
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::tests::parse;

    fn read_image(img: &GuestImage) -> Vec<crate::cpio::tests::Entry> {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("img.cpio");
        let size = img.write_cpio(&out).unwrap();
        let buf = std::fs::read(&out).unwrap();
        assert_eq!(size as usize, buf.len());
        parse(&buf)
    }

    #[test]
    fn skeleton_parents_first_and_later_wins() {
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("hello");
        std::fs::write(&host, b"hi").unwrap();
        let mtime =
            std::os::unix::fs::MetadataExt::mtime(&std::fs::metadata(&host).unwrap()) as u32;
        let mut img = GuestImage::new();
        img.add_bytes("/etc/deep/er/conf", b"old".to_vec(), 0o644);
        img.add_bytes("etc/deep/er/conf", b"new".to_vec(), 0o600);
        img.add_file("/usr/bin/hello", &host, 0o755).unwrap();
        img.add_symlink("bin/sh", "busybox");
        let entries = read_image(&img);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        for d in SKELETON {
            assert!(names.contains(d), "{d} missing from {names:?}");
        }
        // parents precede children
        for (i, n) in names.iter().enumerate() {
            if let Some((parent, _)) = n.rsplit_once('/') {
                let pi = names
                    .iter()
                    .position(|x| *x == parent)
                    .unwrap_or_else(|| panic!("no parent of {n}"));
                assert!(pi < i, "{parent} after {n}");
            }
        }
        let conf = entries
            .iter()
            .find(|e| e.name == "etc/deep/er/conf")
            .unwrap();
        assert_eq!(conf.data, b"new");
        assert_eq!(conf.mode, 0o100_600);
        assert_eq!(conf.mtime, GENERATED_MTIME);
        assert_eq!(
            names.iter().filter(|n| **n == "etc/deep/er/conf").count(),
            1
        );
        let hello = entries.iter().find(|e| e.name == "usr/bin/hello").unwrap();
        assert_eq!(hello.data, b"hi");
        assert_eq!(hello.mtime, mtime);
        let tmp = entries.iter().find(|e| e.name == "tmp").unwrap();
        assert_eq!(tmp.mode, 0o041_777);
        let sh = entries.iter().find(|e| e.name == "bin/sh").unwrap();
        assert_eq!(sh.data, b"busybox");
    }

    #[test]
    fn output_is_deterministic() {
        let build = || {
            let mut img = GuestImage::new();
            img.add_bytes("z/a", vec![1], 0o644);
            img.add_bytes("a/z", vec![2], 0o644);
            img.add_symlink("m", "a/z");
            let t = tempfile::tempdir().unwrap();
            img.write_cpio(&t.path().join("x")).unwrap();
            std::fs::read(t.path().join("x")).unwrap()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn add_binary_brings_its_libraries() {
        let bin = PathBuf::from("/usr/bin/env");
        let mut img = GuestImage::new();
        img.add_binary("bin/env", &bin, &[PathBuf::from("/")])
            .unwrap();
        assert!(img.contains("/bin/env"));
        assert!(img.contains("lib/x86_64-linux-gnu/libc.so.6"));
        assert!(img.contains("lib64/ld-linux-x86-64.so.2"));
        let entries = read_image(&img);
        let libc = entries
            .iter()
            .find(|e| e.name == "lib/x86_64-linux-gnu/libc.so.6")
            .unwrap();
        assert_eq!(
            libc.mode & 0o170_000,
            0o100_000,
            "libc must be a real file, not a symlink"
        );
        assert_eq!(&libc.data[..4], b"\x7fELF");
    }

    #[test]
    fn add_file_of_missing_host_file_fails() {
        let mut img = GuestImage::new();
        assert!(img
            .add_file("x", Path::new("/nonexistent/nvwa"), 0o644)
            .is_err());
    }

    #[test]
    fn kernel_modules_are_staged_with_load_order() {
        let t = tempfile::tempdir().unwrap();
        let md = t.path().join("lib/modules/6.99.0-test");
        std::fs::create_dir_all(md.join("kernel")).unwrap();
        std::fs::write(
            md.join("modules.dep"),
            "kernel/b.ko: kernel/a-dep.ko\nkernel/a-dep.ko:\n",
        )
        .unwrap();
        std::fs::write(md.join("modules.builtin"), "kernel/ext4.ko\n").unwrap();
        std::fs::write(md.join("kernel/b.ko"), b"B").unwrap();
        std::fs::write(md.join("kernel/a-dep.ko"), b"A").unwrap();
        let kernel = KernelBits {
            version: "6.99.0-test".into(),
            vmlinuz: t.path().join("vmlinuz"),
            modules_dir: md,
        };
        let mut img = GuestImage::new();
        let order = img
            .add_kernel_modules(&kernel, &["b", "ext4", "nope?"])
            .unwrap();
        let dir = "/lib/modules/6.99.0-test/nvwa-lab";
        assert_eq!(order, [format!("{dir}/a_dep.ko"), format!("{dir}/b.ko")]);
        let entries = read_image(&img);
        let lo = entries
            .iter()
            .find(|e| e.name == format!("{}/load-order", &dir[1..]))
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&lo.data),
            format!("{dir}/a_dep.ko\n{dir}/b.ko\n")
        );
        assert_eq!(
            entries
                .iter()
                .find(|e| e.name == format!("{}/b.ko", &dir[1..]))
                .unwrap()
                .data,
            b"B"
        );
        assert!(img.add_kernel_modules(&kernel, &["nope"]).is_err());
    }
}
