//! Whether the running kernel can serve a lazy restore: the kernel's side of criu's
//! `check --feature uffd-noncoop`, asked directly.
//!
//! criu's lazy-pages daemon fills a restored process's memory through userfaultfd(2), and follows
//! the process's own changes to its memory map through the non-cooperative events: a fork, an
//! mremap(2), an munmap(2), an madvise(MADV_DONTNEED). Without them a page could be copied to an
//! address the process no longer uses. criu asks the kernel exactly this (`kerndat_uffd` in
//! criu/kerndat.c, `uffd_noncooperative` in criu/uffd.c); asking it here saves a whole criu run
//! at the start of every restore, on the new kernel's critical path (0.17–0.26 s under the lab's
//! TCG, where criu had already probed that kernel).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `UFFD_API` of linux/userfaultfd.h: the API version userfaultfd has had since it exists.
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// criu's `NEED_UFFD_API_FEATURES`.
const NEEDED_FEATURES: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_EVENT_REMOVE;

/// `struct uffdio_api` of linux/userfaultfd.h.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

// UFFDIO_API: _IOWR(0xAA, 0x3F, struct uffdio_api).
nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);

/// Why a lazy restore cannot work on this kernel, if it cannot.
pub fn lazy_restore_unsupported() -> Option<String> {
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Some(match e.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel has no userfaultfd (CONFIG_USERFAULTFD)".into(),
            Some(libc::EPERM) => format!(
                "userfaultfd(2) is not permitted ({e}): nvwa runs as root, so a security module or seccomp forbids it"
            ),
            _ => format!("userfaultfd(2) failed: {e}"),
        });
    }
    // SAFETY: the descriptor was just returned to us and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one struct uffdio_api, which `api` is.
    if let Err(e) = unsafe { uffdio_api(fd.as_raw_fd(), &mut api) } {
        return Some(format!("userfaultfd's UFFDIO_API failed: {e}"));
    }
    missing_features(api.api, api.features)
}

/// What the kernel's answer to UFFDIO_API lacks.
fn missing_features(api: u64, features: u64) -> Option<String> {
    if api != UFFD_API {
        return Some(format!(
            "the kernel's userfaultfd speaks API {api:#x}, not {UFFD_API:#x}"
        ));
    }
    let missing = NEEDED_FEATURES & !features;
    (missing != 0).then(|| {
        format!(
            "the kernel's userfaultfd lacks the non-cooperative events (features {missing:#x}) through which criu follows a restored process's memory map; they exist since Linux 4.11"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_number_is_the_kernels() {
        // UFFDIO_API as linux/userfaultfd.h computes it on x86_64 and arm64.
        assert_eq!(
            nix::request_code_readwrite!(0xAA, 0x3F, std::mem::size_of::<UffdioApi>()),
            0xC018_AA3F
        );
    }

    #[test]
    fn every_non_cooperative_event_is_needed() {
        assert_eq!(missing_features(UFFD_API, NEEDED_FEATURES), None);
        assert_eq!(missing_features(UFFD_API, NEEDED_FEATURES | 1), None);
        for bit in [1 << 1, 1 << 2, 1 << 3, 1 << 6] {
            let why = missing_features(UFFD_API, NEEDED_FEATURES & !bit).unwrap();
            assert!(why.contains(&format!("{bit:#x}")), "{why}");
        }
        assert!(missing_features(0xAB, NEEDED_FEATURES)
            .unwrap()
            .contains("API 0xab"));
    }
}
