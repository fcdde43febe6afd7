//! openEuler kernel features: quick kexec, CPU park and pin memory.
//!
//! Only patched openEuler kernels have them; on stock kernels [`detect`] simply reports them
//! absent, and nvwa must then work without them.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where production code finds the pin memory device; [`detect`] takes the directory so that
/// tests can use a temporary one.
pub const DEV_ROOT: &str = "/dev";
pub const PINMEM_DEVICE: &str = "pinmem";

/// Kernel boot parameters (values as written on the cmdline) and the pin memory device.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelFeatures {
    /// `quickkexec=<size>`: memory reserved for quick kexec.
    pub quick_kexec: Option<String>,
    /// `cpuparkmem=<addr>`: secondary CPUs spin there across kexec instead of going offline.
    pub cpu_park: Option<String>,
    /// `pinmemory=<size>@<addr>`: memory that survives kexec for pinned process pages.
    pub pin_memory: Option<String>,
    /// `max_pin_pid_num=<n>`.
    pub max_pin_pid_num: Option<String>,
    /// `/dev/pinmem` exists (module `pin_memory` loaded).
    pub pinmem_device: bool,
}

impl KernelFeatures {
    /// Pin memory needs both the reserved area and the device to talk to.
    pub fn pin_memory_usable(&self) -> bool {
        self.pin_memory.is_some() && self.pinmem_device
    }
}

/// Features from a kernel command line (the content of `/proc/cmdline`) and `dev_root`
/// (the directory holding device nodes, [`DEV_ROOT`] in production).
pub fn detect(cmdline: &str, dev_root: &Path) -> KernelFeatures {
    KernelFeatures {
        pinmem_device: dev_root.join(PINMEM_DEVICE).exists(),
        ..parse_cmdline(cmdline)
    }
}

/// The cmdline part of [`detect`]; `pinmem_device` is left false.
pub fn parse_cmdline(cmdline: &str) -> KernelFeatures {
    let words = cmdline_words(cmdline);
    KernelFeatures {
        quick_kexec: param(&words, "quickkexec"),
        cpu_park: param(&words, "cpuparkmem"),
        pin_memory: param(&words, "pinmemory"),
        max_pin_pid_num: param(&words, "max_pin_pid_num"),
        pinmem_device: false,
    }
}

/// The value of `name=value`. The last occurrence wins, as in the kernel. A bare `name` or an
/// empty value reserves nothing, so it counts as absent.
fn param(words: &[String], name: &str) -> Option<String> {
    words
        .iter()
        .rev()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// Split like the kernel does: on whitespace, except inside double quotes, which are removed.
fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    for c in cmdline.chars() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c.is_whitespace() && !in_quotes => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

const PIN_MEM_MAGIC: u8 = 0x59;

/// The `/dev/pinmem` ioctls nvwa uses (`_IOW(0x59, nr, int)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinMemCmd {
    ClearPinArea = 2,
    RemapPinArea = 3,
    FinishPinMemDump = 4,
    InitPagemapRead = 5,
}

impl PinMemCmd {
    pub fn nr(self) -> u8 {
        self as u8
    }

    /// The ioctl request number, computed like the kernel's `_IOW` for this architecture.
    pub fn request(self) -> nix::sys::ioctl::ioctl_num_type {
        nix::request_code_write!(PIN_MEM_MAGIC, self.nr(), std::mem::size_of::<libc::c_int>())
    }

    fn describe(self) -> &'static str {
        match self {
            PinMemCmd::ClearPinArea => "clear the pin memory area",
            PinMemCmd::RemapPinArea => "remap the pin memory area",
            PinMemCmd::FinishPinMemDump => "finish the pin memory dump",
            PinMemCmd::InitPagemapRead => "initialise pagemap reading",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PinMemError {
    #[error("cannot open {}: {source}; pin memory needs an openEuler kernel booted with pinmemory= and the module loaded (`modprobe pin_memory`), or set enable_pin_memory: false", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{} failed on {} (ioctl 0x{request:x}): {errno}; check `dmesg` for pin_memory messages", .cmd.describe(), .path.display())]
    Ioctl {
        cmd: PinMemCmd,
        path: PathBuf,
        request: nix::sys::ioctl::ioctl_num_type,
        errno: nix::errno::Errno,
    },
}

/// An open `/dev/pinmem`.
#[derive(Debug)]
pub struct PinMem {
    file: File,
    path: PathBuf,
}

impl PinMem {
    pub fn open(path: &Path) -> Result<PinMem, PinMemError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| PinMemError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(PinMem {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Forget all pinned areas, before a new dump.
    pub fn clear(&self) -> Result<(), PinMemError> {
        self.ioctl(PinMemCmd::ClearPinArea, 0)
    }

    /// Map the pinned pages back into the restored process `pid`.
    pub fn remap(&self, pid: i32) -> Result<(), PinMemError> {
        self.ioctl(PinMemCmd::RemapPinArea, pid)
    }

    /// Seal the pinned areas after all dumps, before kexec.
    pub fn finish_dump(&self) -> Result<(), PinMemError> {
        self.ioctl(PinMemCmd::FinishPinMemDump, 0)
    }

    /// After boot: make the pinned pages readable through pagemap, before restore.
    pub fn init_pagemap_read(&self) -> Result<(), PinMemError> {
        self.ioctl(PinMemCmd::InitPagemapRead, 0)
    }

    fn ioctl(&self, cmd: PinMemCmd, arg: libc::c_int) -> Result<(), PinMemError> {
        // Although declared `_IOW(.., int)`, the driver copy_from_user()s the int, so it
        // must be passed by pointer, as openEuler's nvwa-pin does.
        let value: libc::c_int = arg;
        // SAFETY: the fd is open for the lifetime of `self`, and the kernel reads at most
        // sizeof(int) bytes from `&value`, which outlives the call.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                cmd.request() as _,
                &value as *const libc::c_int,
            )
        };
        nix::errno::Errno::result(rc)
            .map(drop)
            .map_err(|errno| PinMemError::Ioctl {
                cmd,
                path: self.path.clone(),
                request: cmd.request(),
                errno,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENEULER: &str = "BOOT_IMAGE=/vmlinuz-5.10.0 root=/dev/mapper/root ro quickkexec=350M cpuparkmem=0x40000000 pinmemory=100M@0x64000000 max_pin_pid_num=4096 quiet";

    #[test]
    fn parses_openeuler_cmdline() {
        let f = parse_cmdline(OPENEULER);
        assert_eq!(f.quick_kexec.as_deref(), Some("350M"));
        assert_eq!(f.cpu_park.as_deref(), Some("0x40000000"));
        assert_eq!(f.pin_memory.as_deref(), Some("100M@0x64000000"));
        assert_eq!(f.max_pin_pid_num.as_deref(), Some("4096"));
        assert!(!f.pinmem_device);
    }

    #[test]
    fn stock_cmdline_has_nothing() {
        let f = parse_cmdline("BOOT_IMAGE=/boot/vmlinuz-6.8.0 root=UUID=abc ro quiet splash\n");
        assert_eq!(f, KernelFeatures::default());
    }

    #[test]
    fn similar_names_empty_values_and_last_wins() {
        let f = parse_cmdline(
            "xquickkexec=1M quickkexec_extra=2 pinmemory= quickkexec quickkexec=1G quickkexec=2G",
        );
        assert_eq!(f.quick_kexec.as_deref(), Some("2G"));
        assert_eq!(f.pin_memory, None);
    }

    #[test]
    fn quoted_values() {
        let f = parse_cmdline("root=/dev/sda \"pinmemory=100M@0x64000000\" quiet");
        assert_eq!(f.pin_memory.as_deref(), Some("100M@0x64000000"));
        assert_eq!(cmdline_words("a \"b c\" d"), vec!["a", "b c", "d"]);
    }

    #[test]
    fn detect_looks_for_the_device() {
        let dev = tempfile::tempdir().unwrap();
        assert!(!detect(OPENEULER, dev.path()).pin_memory_usable());
        std::fs::write(dev.path().join(PINMEM_DEVICE), b"").unwrap();
        let f = detect(OPENEULER, dev.path());
        assert!(f.pinmem_device && f.pin_memory_usable());
    }

    #[test]
    fn request_numbers_match_the_kernel_iow() {
        assert_eq!(PinMemCmd::ClearPinArea.nr(), 2);
        assert_eq!(PinMemCmd::RemapPinArea.nr(), 3);
        assert_eq!(PinMemCmd::FinishPinMemDump.nr(), 4);
        assert_eq!(PinMemCmd::InitPagemapRead.nr(), 5);
        // _IOW on x86 and arm: dir write (1) << 30 | size 4 << 16 | magic << 8 | nr.
        #[cfg(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64"
        ))]
        {
            let expected: [nix::sys::ioctl::ioctl_num_type; 4] =
                [0x4004_5902, 0x4004_5903, 0x4004_5904, 0x4004_5905];
            let cmds = [
                PinMemCmd::ClearPinArea,
                PinMemCmd::RemapPinArea,
                PinMemCmd::FinishPinMemDump,
                PinMemCmd::InitPagemapRead,
            ];
            assert_eq!(cmds.map(PinMemCmd::request), expected);
        }
    }

    #[test]
    fn open_missing_device_explains() {
        let dir = tempfile::tempdir().unwrap();
        let msg = PinMem::open(&dir.path().join("pinmem"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("pinmem") && msg.contains("modprobe pin_memory"),
            "{msg}"
        );
    }
}
