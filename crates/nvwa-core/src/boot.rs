//! Locating the kernel image and initrd to kexec into.
//!
//! Every function takes the filesystem root explicitly ("/" in production) so tests can use a
//! temporary directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("invalid kernel version {version:?}: {reason}; pass a version as listed by `ls /boot/vmlinuz-*` (the part after `vmlinuz-`), e.g. `nvwa update $(uname -r)`")]
    InvalidVersion { version: String, reason: String },

    #[error("no kernel image for version {version}: tried {}; installed versions: {}; install the kernel package first", display_paths(.tried), display_versions(.installed))]
    ImageNotFound {
        version: String,
        tried: Vec<PathBuf>,
        installed: Vec<String>,
    },

    #[error("no initrd for kernel {version}: tried {}; create one with `dracut --kver {version}` (openEuler, RHEL, Fedora) or `update-initramfs -c -k {version}` (Debian, Ubuntu)", display_paths(.tried))]
    InitrdNotFound {
        version: String,
        tried: Vec<PathBuf>,
    },

    #[error("{} is empty, probably left by an interrupted install; reinstall the kernel {version} package or regenerate it (dracut --force --kver {version} / update-initramfs -u -k {version})", .path.display())]
    EmptyFile { version: String, path: PathBuf },
}

fn display_paths(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

fn display_versions(versions: &[String]) -> String {
    if versions.is_empty() {
        "none found".to_string()
    } else {
        versions.join(", ")
    }
}

/// Longest version accepted, in bytes; real ones are well under 100.
pub const MAX_VERSION_BYTES: usize = 128;

/// What a version may be made of: the characters of Debian and RPM version strings.
const VERSION_CHARS: &str = "ASCII letters, digits and `.`, `_`, `+`, `~`, `-`";

/// The version ends up in file paths, on kexec's command line and in messages shown to the
/// operator, so only the characters kernel packages use are accepted: nothing that could
/// escape `/boot` (`/`, `..`), be taken as an option (a leading `-`), or display as something
/// else (whitespace, control or format characters such as U+202E).
pub fn validate_version(v: &str) -> Result<(), BootError> {
    let invalid = |reason: String| {
        Err(BootError::InvalidVersion {
            version: v.to_string(),
            reason,
        })
    };
    if v.is_empty() {
        return invalid("it is empty".to_string());
    }
    for (i, c) in v.chars().enumerate() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '~' | '-') {
            continue;
        }
        let what = if c == '/' {
            "`/`".to_string()
        } else if c.is_whitespace() {
            format!("whitespace (U+{:04X})", u32::from(c))
        } else if c.is_control() {
            format!("a control character (U+{:04X})", u32::from(c))
        } else if c.is_ascii() {
            format!("`{c}`")
        } else {
            // Shown only by code point: it may be invisible or reorder the text around it.
            format!("the non-ASCII character U+{:04X}", u32::from(c))
        };
        return invalid(format!(
            "it contains {what} at character {} (only {VERSION_CHARS} are allowed)",
            i + 1
        ));
    }
    if v.len() > MAX_VERSION_BYTES {
        return invalid(format!(
            "it is {} bytes long, more than {MAX_VERSION_BYTES}",
            v.len()
        ));
    }
    if v.contains("..") {
        return invalid("it contains `..`".to_string());
    }
    if v.starts_with('-') {
        return invalid("it starts with `-`".to_string());
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFiles {
    pub version: String,
    pub image: PathBuf,
    pub initrd: PathBuf,
}

/// Find the image and initrd of `version` under `root`, in the layouts used by the common
/// distributions: `/boot/vmlinuz-<v>` (all) or `/usr/lib/modules/<v>/vmlinuz` (Fedora-style,
/// where the initrd may sit next to it).
pub fn find_kernel(root: &Path, version: &str) -> Result<KernelFiles, BootError> {
    validate_version(version)?;
    let boot = root.join("boot");
    let modules = root.join("usr/lib/modules").join(version);

    let image_candidates = [
        boot.join(format!("vmlinuz-{version}")),
        modules.join("vmlinuz"),
    ];
    let image = first_file(&image_candidates).ok_or_else(|| BootError::ImageNotFound {
        version: version.to_string(),
        tried: image_candidates.to_vec(),
        installed: installed_versions(root),
    })?;

    let mut initrd_candidates = vec![
        boot.join(format!("initramfs-{version}.img")),
        boot.join(format!("initrd.img-{version}")),
    ];
    if image.starts_with(&modules) {
        initrd_candidates.push(modules.join("initrd"));
    }
    let initrd = first_file(&initrd_candidates).ok_or_else(|| BootError::InitrdNotFound {
        version: version.to_string(),
        tried: initrd_candidates.clone(),
    })?;

    for path in [&image, &initrd] {
        if is_empty_file(path) {
            return Err(BootError::EmptyFile {
                version: version.to_string(),
                path: path.clone(),
            });
        }
    }
    Ok(KernelFiles {
        version: version.to_string(),
        image,
        initrd,
    })
}

fn first_file(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.is_file()).cloned()
}

fn is_empty_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == 0)
}

/// Versions with an image under `root`, sorted and deduplicated. Names that would not pass
/// [`validate_version`] are left out, since they could not be used anyway.
pub fn installed_versions(root: &Path) -> Vec<String> {
    let mut versions = BTreeSet::new();
    for name in dir_names(&root.join("boot")) {
        if let Some(v) = name.strip_prefix("vmlinuz-") {
            if root.join("boot").join(&name).is_file() {
                versions.insert(v.to_string());
            }
        }
    }
    let modules = root.join("usr/lib/modules");
    for name in dir_names(&modules) {
        if modules.join(&name).join("vmlinuz").is_file() {
            versions.insert(name);
        }
    }
    versions
        .into_iter()
        .filter(|v| validate_version(v).is_ok())
        .collect()
}

/// Entry names of `dir` that are valid UTF-8; a missing or unreadable directory has none.
fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// The running kernel's release, as `uname -r` prints it.
pub fn running_kernel() -> String {
    match nix::sys::utsname::uname() {
        Ok(uts) => uts.release().to_string_lossy().into_owned(),
        // uname(2) cannot fail with a valid buffer; keep the signature simple for callers.
        Err(_) => "unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;

    fn touch(root: &Path, rel: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"x").unwrap();
    }

    #[test]
    fn valid_versions() {
        for v in [
            "6.6.0-28.0.0.34.oe2403.x86_64",
            "5.15.0-91-generic",
            "6.8.9-300.fc40.x86_64",
            "0-rescue-abc",
        ] {
            validate_version(v).unwrap();
        }
    }

    #[test]
    fn invalid_versions_are_refused_with_reason() {
        for (v, why) in [
            ("", "empty"),
            ("../etc", "`/`"),
            ("a..b", "`..`"),
            ("6.6 x", "whitespace"),
            ("6.6\u{7}", "control"),
            ("-x", "`-`"),
            ("6.6\n", "whitespace"),
        ] {
            let msg = validate_version(v).unwrap_err().to_string();
            assert!(msg.contains(why), "{v:?}: {msg}");
            assert!(msg.contains("ls /boot/vmlinuz-*"), "{msg}");
        }
    }

    #[test]
    fn versions_with_debian_and_rpm_characters_are_valid() {
        for v in [
            "6.12.117+deb12-amd64",
            "6.1.0~rc7-1",
            "5.10.0-182.0.0.95.oe2203sp3.x86_64",
            "6.8.0_custom",
            &"9".repeat(MAX_VERSION_BYTES),
        ] {
            validate_version(v).unwrap();
        }
    }

    #[test]
    fn format_and_other_characters_are_refused_naming_the_character_and_place() {
        for (v, needle) in [
            ("6.6\u{202e}x", "U+202E at character 4"),
            ("6.6\u{200b}", "U+200B at character 4"),
            ("6.6-é", "U+00E9 at character 5"),
            ("6.6;reboot", "`;` at character 4"),
            ("$(id)", "`$` at character 1"),
            ("6.6\t", "whitespace (U+0009)"),
            ("6.6:x", "`:` at character 4"),
        ] {
            let msg = validate_version(v).unwrap_err().to_string();
            assert!(msg.contains(needle), "{v:?}: {msg}");
            assert!(
                msg.contains("`+`, `~`, `-`"),
                "names the allowed set: {msg}"
            );
            // The bad character itself is not echoed into the operator's terminal.
            if !v.is_ascii() {
                let shown = msg.split("invalid kernel version").nth(1).unwrap();
                let reason = shown.split_once(": ").unwrap().1;
                assert!(reason.is_ascii(), "{reason}");
            }
        }
    }

    #[test]
    fn overlong_versions_are_refused() {
        let v = "1".repeat(MAX_VERSION_BYTES + 1);
        let msg = validate_version(&v).unwrap_err().to_string();
        assert!(msg.contains("129 bytes long, more than 128"), "{msg}");
    }

    #[test]
    fn finds_boot_layout_redhat_initramfs() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        touch(r, "boot/vmlinuz-6.6.0");
        touch(r, "boot/initramfs-6.6.0.img");
        let k = find_kernel(r, "6.6.0").unwrap();
        assert_eq!(k.image, r.join("boot/vmlinuz-6.6.0"));
        assert_eq!(k.initrd, r.join("boot/initramfs-6.6.0.img"));
        assert_eq!(k.version, "6.6.0");
    }

    #[test]
    fn finds_boot_layout_debian_initrd() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        touch(r, "boot/vmlinuz-6.1.0-18-amd64");
        touch(r, "boot/initrd.img-6.1.0-18-amd64");
        let k = find_kernel(r, "6.1.0-18-amd64").unwrap();
        assert_eq!(k.initrd, r.join("boot/initrd.img-6.1.0-18-amd64"));
    }

    #[test]
    fn finds_usr_lib_modules_layout() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        touch(r, "usr/lib/modules/6.8.9/vmlinuz");
        touch(r, "usr/lib/modules/6.8.9/initrd");
        let k = find_kernel(r, "6.8.9").unwrap();
        assert_eq!(k.image, r.join("usr/lib/modules/6.8.9/vmlinuz"));
        assert_eq!(k.initrd, r.join("usr/lib/modules/6.8.9/initrd"));
        // An initrd in /boot is still preferred.
        touch(r, "boot/initramfs-6.8.9.img");
        assert_eq!(
            find_kernel(r, "6.8.9").unwrap().initrd,
            r.join("boot/initramfs-6.8.9.img")
        );
    }

    #[test]
    fn missing_image_lists_installed_versions() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        touch(r, "boot/vmlinuz-6.6.0");
        touch(r, "usr/lib/modules/5.10.0/vmlinuz");
        let err = find_kernel(r, "7.0.0").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, BootError::ImageNotFound { .. }));
        assert!(msg.contains("5.10.0, 6.6.0"), "{msg}");
        assert!(msg.contains("vmlinuz-7.0.0"), "{msg}");
    }

    #[test]
    fn missing_initrd_names_paths_and_tools() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        touch(r, "boot/vmlinuz-6.6.0");
        let msg = find_kernel(r, "6.6.0").unwrap_err().to_string();
        assert!(
            msg.contains("initramfs-6.6.0.img") && msg.contains("initrd.img-6.6.0"),
            "{msg}"
        );
        assert!(
            msg.contains("dracut --kver 6.6.0") && msg.contains("update-initramfs -c -k 6.6.0")
        );
    }

    #[test]
    fn empty_initrd_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        touch(r, "boot/vmlinuz-6.6.0");
        fs::write(r.join("boot/initramfs-6.6.0.img"), b"").unwrap();
        let err = find_kernel(r, "6.6.0").unwrap_err();
        assert!(matches!(err, BootError::EmptyFile { .. }), "{err}");
    }

    #[test]
    fn invalid_version_is_refused_before_touching_files() {
        let root = tempfile::tempdir().unwrap();
        let err = find_kernel(root.path(), "../../etc/passwd").unwrap_err();
        assert!(matches!(err, BootError::InvalidVersion { .. }));
    }

    #[test]
    fn installed_versions_sorted_deduplicated() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        touch(r, "boot/vmlinuz-6.6.0");
        touch(r, "boot/vmlinuz-5.10.0");
        touch(r, "boot/config-6.6.0");
        touch(r, "usr/lib/modules/6.6.0/vmlinuz");
        fs::create_dir_all(r.join("usr/lib/modules/4.0.0")).unwrap(); // modules only, no image
        assert_eq!(installed_versions(r), vec!["5.10.0", "6.6.0"]);
        assert!(installed_versions(&r.join("nonexistent")).is_empty());
    }

    #[test]
    fn running_kernel_is_a_valid_version() {
        validate_version(&running_kernel()).unwrap();
    }

    proptest! {
        #[test]
        fn slash_or_whitespace_always_refused(
            prefix in ".*",
            bad in prop::sample::select(vec!['/', ' ', '\t', '\n', '\r', '\u{a0}', '\u{2003}']),
            suffix in ".*",
        ) {
            let v = format!("{prefix}{bad}{suffix}");
            prop_assert!(validate_version(&v).is_err());
        }

        #[test]
        fn exactly_the_allowed_set_is_accepted(v in "\\PC{1,40}") {
            let allowed = v.len() <= MAX_VERSION_BYTES
                && v.chars().all(|c| c.is_ascii_alphanumeric() || "._+~-".contains(c))
                && !v.contains("..")
                && !v.starts_with('-');
            prop_assert_eq!(validate_version(&v).is_ok(), allowed, "{:?}", v);
        }

        #[test]
        fn allowed_versions_pass(v in "[A-Za-z0-9_+~][A-Za-z0-9._+~-]{0,60}") {
            prop_assume!(!v.contains(".."));
            prop_assert!(validate_version(&v).is_ok());
        }
    }
}
