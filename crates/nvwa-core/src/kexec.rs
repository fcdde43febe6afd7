//! Loading a kernel for kexec and jumping into it.
//!
//! The default path is the `kexec_file_load(2)` syscall: the kernel itself parses and (where
//! required) verifies the image, and no kexec-tools are needed. `kexec_exe -l` stays available
//! as a fallback for kernels without KEXEC_FILE, and `-q` for openEuler's quick kexec.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::boot::KernelFiles;

const KEXEC_FILE_UNLOAD: libc::c_ulong = 1;
/// kexec-tools only reads two files and makes one syscall: a minute is plenty.
const TOOL_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum KexecError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the kernel refused to load {image} with kexec_file_load: {source}; {hint}")]
    Load {
        image: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{exe} failed to load {image}: {output}")]
    Tool {
        exe: PathBuf,
        image: PathBuf,
        output: String,
    },
    #[error(
        "cannot run {exe}: {source}; install kexec-tools or set kexec_exe in nvwa-server.yaml"
    )]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the current kernel command line from /proc/cmdline: {0}")]
    Cmdline(std::io::Error),
    #[error("{0}; set kexec_exe in nvwa-server.yaml to a working kexec-tools")]
    ToolRun(crate::exec::ExecError),
    #[error("cannot unload the kernel loaded for kexec: {0}; run `kexec -u` so that a later reboot does not jump into it")]
    Unload(std::io::Error),
    #[error("reboot(LINUX_REBOOT_CMD_KEXEC) failed: {0}; no kernel was switched")]
    Execute(std::io::Error),
}

fn hint_for(err: &std::io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel lacks CONFIG_KEXEC_FILE; set kexec_exe to use kexec-tools",
        Some(libc::EPERM) => "run as root; kexec may be disabled (kernel.kexec_load_disabled) or locked down",
        Some(libc::EKEYREJECTED) | Some(libc::EBADMSG) | Some(libc::ENODATA) => {
            "the image signature was rejected: lockdown or kexec.sig_enforce requires a signed kernel"
        }
        Some(libc::ENOEXEC) => "the file is not a bootable kernel image (bzImage) for this architecture",
        Some(libc::EBUSY) => "another kexec load is in progress",
        _ => "run `nvwa check <version>`",
    }
}

/// The command line the new kernel gets: the running one, as the original does.
pub fn current_cmdline() -> Result<String, KexecError> {
    std::fs::read_to_string("/proc/cmdline")
        .map(|s| s.trim().to_string())
        .map_err(KexecError::Cmdline)
}

fn open(path: &Path) -> Result<File, KexecError> {
    File::open(path).map_err(|source| KexecError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads `files` with `kexec_file_load(2)`.
pub fn load_native(files: &KernelFiles, cmdline: &str) -> Result<(), KexecError> {
    let kernel = open(&files.image)?;
    let initrd = open(&files.initrd)?;
    let cmd = CString::new(cmdline.replace('\0', " ")).expect("NULs replaced");
    // SAFETY: the descriptors are open for the whole call; the length includes the NUL, as the
    // syscall requires.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initrd.as_raw_fd(),
            cmd.as_bytes_with_nul().len() as libc::c_ulong,
            cmd.as_ptr(),
            0 as libc::c_ulong,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let source = std::io::Error::last_os_error();
    Err(KexecError::Load {
        image: files.image.clone(),
        hint: hint_for(&source),
        source,
    })
}

/// Unloads whatever kernel is loaded (when an update is abandoned, so a later reboot does not
/// jump into it by surprise).
pub fn unload() -> Result<(), KexecError> {
    // SAFETY: with KEXEC_FILE_UNLOAD the descriptors and command line are ignored.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            -1,
            -1,
            0 as libc::c_ulong,
            std::ptr::null::<libc::c_char>(),
            KEXEC_FILE_UNLOAD,
        )
    };
    if rc == 0 || !loaded() {
        return Ok(());
    }
    Err(KexecError::Unload(std::io::Error::last_os_error()))
}

/// Loads `files` with kexec-tools: `-l` (kexec_load) or `-q` (openEuler's quick kexec).
pub fn load_with_tool(
    exe: &Path,
    files: &KernelFiles,
    cmdline: &str,
    quick: bool,
) -> Result<(), KexecError> {
    let mut cmd = Command::new(exe);
    cmd.arg(if quick { "-q" } else { "-l" })
        .arg(&files.image)
        .arg(format!("--initrd={}", files.initrd.display()))
        .arg(format!("--append={cmdline}"));
    let out = crate::exec::run(&mut cmd, TOOL_DEADLINE).map_err(|e| match e {
        crate::exec::ExecError::Spawn { source, .. } => KexecError::Spawn {
            exe: exe.to_path_buf(),
            source,
        },
        other => KexecError::ToolRun(other),
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(KexecError::Tool {
        exe: exe.to_path_buf(),
        image: files.image.clone(),
        output: out.stderr_text(),
    })
}

/// Whether the kernel has an image loaded for kexec.
pub fn loaded() -> bool {
    std::fs::read_to_string("/sys/kernel/kexec_loaded").is_ok_and(|s| s.trim() == "1")
}

/// Syncs file systems and jumps into the loaded kernel. Returns only if the jump failed.
pub fn execute() -> KexecError {
    nix::unistd::sync();
    // SAFETY: plain syscall; on success it does not return.
    let rc = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC) };
    debug_assert!(rc != 0);
    KexecError::Execute(std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_to_do() {
        let e = std::io::Error::from_raw_os_error(libc::ENOEXEC);
        assert!(hint_for(&e).contains("not a bootable kernel"));
        let e = std::io::Error::from_raw_os_error(libc::EPERM);
        assert!(hint_for(&e).contains("root"));
    }

    #[test]
    fn a_missing_image_is_named() {
        let files = KernelFiles {
            version: "x".into(),
            image: "/nonexistent/vmlinuz-x".into(),
            initrd: "/nonexistent/initrd".into(),
        };
        let err = load_native(&files, "quiet").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinuz-x"), "{err}");
    }

    #[test]
    fn a_missing_tool_says_how_to_install_it() {
        let files = KernelFiles {
            version: "x".into(),
            image: "/boot/vmlinuz-x".into(),
            initrd: "/boot/initrd".into(),
        };
        let err = load_with_tool(Path::new("/nonexistent/kexec"), &files, "", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kexec-tools"), "{err}");
    }
}
