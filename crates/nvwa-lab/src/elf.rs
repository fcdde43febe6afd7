//! ELF dependency discovery: the program interpreter (PT_INTERP) and the
//! shared libraries (DT_NEEDED) of a binary, resolved recursively against a
//! list of filesystem roots (the prepared Debian sysroot first, then the host).

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use object::elf::{FileHeader32, FileHeader64, DT_NEEDED, PT_INTERP};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::{Endianness, FileKind};

/// Library directories searched, in order, inside every root.
pub const LIB_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib64",
    "usr/lib",
    "lib",
];

/// Returns the PT_INTERP path and the DT_NEEDED names of `binary`.
/// A static binary yields `(None, [])`.
pub fn needed_libs(binary: &Path) -> Result<(Option<String>, Vec<String>)> {
    let data = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let parsed = match FileKind::parse(&*data) {
        Ok(FileKind::Elf64) => parse_elf::<FileHeader64<Endianness>>(&data),
        Ok(FileKind::Elf32) => parse_elf::<FileHeader32<Endianness>>(&data),
        _ => bail!("{} is not an ELF file", binary.display()),
    };
    parsed.with_context(|| format!("parsing ELF {}", binary.display()))
}

fn parse_elf<Elf: FileHeader<Endian = Endianness>>(
    data: &[u8],
) -> Result<(Option<String>, Vec<String>)> {
    let header = Elf::parse(data)?;
    let endian = header.endian()?;
    let mut interp = None;
    for ph in header.program_headers(endian, data)? {
        if ph.p_type(endian) == PT_INTERP {
            let bytes = ph
                .data(endian, data)
                .map_err(|()| anyhow::anyhow!("PT_INTERP out of bounds"))?;
            let bytes = bytes.split(|&b| b == 0).next().unwrap_or_default();
            interp = Some(String::from_utf8_lossy(bytes).into_owned());
        }
    }
    let sections = header.sections(endian, data)?;
    let mut needed = Vec::new();
    if let Some((dyns, link)) = sections.dynamic(endian, data)? {
        let strings = sections.strings(endian, data, link)?;
        for d in dyns {
            if d.tag32(endian) == Some(DT_NEEDED) {
                let name = d.string(endian, strings)?;
                needed.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok((interp, needed))
}

/// Resolves `rel` (a path relative to `root`) inside `root` the way a chroot
/// would: absolute symlink targets are taken relative to `root`. Returns the
/// host path of the final, non-symlink file, if it exists.
pub fn resolve_in_root(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut pending: VecDeque<String> = components(rel).into();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(comp) = pending.pop_front() {
        match comp.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let candidate: PathBuf = root.join(cur.iter().collect::<PathBuf>()).join(&comp);
        let meta = std::fs::symlink_metadata(&candidate).ok()?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return None;
            }
            let target = std::fs::read_link(&candidate).ok()?;
            let target = target.to_string_lossy().into_owned();
            if target.starts_with('/') {
                cur.clear();
            }
            for (i, c) in components(&target).into_iter().enumerate() {
                pending.insert(i, c);
            }
        } else {
            cur.push(comp);
        }
    }
    let path = root.join(cur.iter().collect::<PathBuf>());
    path.is_file().then_some(path)
}

fn components(p: &str) -> Vec<String> {
    Path::new(p)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// Finds the library `name` (a DT_NEEDED soname) in `roots`; returns the real
/// host file and the guest path (relative to the root it was found in).
fn find_lib(name: &str, roots: &[PathBuf]) -> Option<(PathBuf, String)> {
    for root in roots {
        for dir in LIB_DIRS {
            let rel = format!("{dir}/{name}");
            if let Some(host) = resolve_in_root(root, &rel) {
                return Some((host, rel));
            }
        }
    }
    None
}

/// Resolves the whole shared-library closure (interpreter included) of
/// `binaries`. Each element is `(host file to copy, guest path relative to
/// '/')`; symlinks are followed, so the host path is always a real file.
/// Search order: `search_roots` in order (put the sysroot before "/").
pub fn resolve_closure(
    binaries: &[PathBuf],
    search_roots: &[PathBuf],
) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    let mut guest_seen = HashSet::new();
    let mut names_seen = BTreeSet::new();
    // (file to inspect, who needs it — for error messages)
    let mut queue: VecDeque<PathBuf> = binaries.iter().cloned().collect();
    let mut scanned = HashSet::new();
    while let Some(bin) = queue.pop_front() {
        if !scanned.insert(bin.clone()) {
            continue;
        }
        let (interp, needed) = needed_libs(&bin)?;
        if let Some(interp) = interp {
            let rel = interp.trim_start_matches('/').to_string();
            if guest_seen.insert(rel.clone()) {
                let host = search_roots
                    .iter()
                    .find_map(|r| resolve_in_root(r, &rel))
                    .with_context(|| {
                        format!(
                            "{}: program interpreter {interp} not found under {}; add the package \
                             that ships it (libc6) to the prepared packages",
                            bin.display(),
                            show_roots(search_roots)
                        )
                    })?;
                queue.push_back(host.clone());
                out.push((host, rel));
            }
        }
        for name in needed {
            if !names_seen.insert(name.clone()) {
                continue;
            }
            let Some((host, rel)) = find_lib(&name, search_roots) else {
                bail!(
                    "{} needs {name}, which is not found under {} (searched {}); add the Debian \
                     package that ships {name} to the prepared packages (extra_packages), e.g. \
                     find it with `dpkg -S {name}` or `apt-file search {name}`",
                    bin.display(),
                    show_roots(search_roots),
                    LIB_DIRS.join(", ")
                );
            };
            if guest_seen.insert(rel.clone()) {
                queue.push_back(host.clone());
                out.push((host, rel));
            }
        }
    }
    Ok(out)
}

fn show_roots(roots: &[PathBuf]) -> String {
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_bin() -> PathBuf {
        ["/usr/bin/env", "/bin/ls"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("host has /usr/bin/env or /bin/ls")
    }

    #[test]
    fn host_binary_needs_libc_and_interp() {
        let (interp, needed) = needed_libs(&host_bin()).unwrap();
        let interp = interp.expect("dynamically linked");
        assert!(interp.contains("ld-linux"), "{interp}");
        assert!(
            needed.iter().any(|n| n.starts_with("libc.so")),
            "{needed:?}"
        );
    }

    #[test]
    fn closure_of_host_binary() {
        let closure = resolve_closure(&[host_bin()], &[PathBuf::from("/")]).unwrap();
        let guests: Vec<_> = closure.iter().map(|(_, g)| g.as_str()).collect();
        assert!(guests.contains(&"lib64/ld-linux-x86-64.so.2"), "{guests:?}");
        assert!(
            guests.contains(&"lib/x86_64-linux-gnu/libc.so.6"),
            "{guests:?}"
        );
        for (host, guest) in &closure {
            assert!(!guest.starts_with('/'));
            let meta = std::fs::symlink_metadata(host).unwrap();
            assert!(meta.is_file(), "{} is not a real file", host.display());
        }
        let uniq: HashSet<_> = guests.iter().collect();
        assert_eq!(uniq.len(), guests.len());
    }

    #[test]
    fn symlinks_resolve_inside_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("usr/lib/x86_64-linux-gnu")).unwrap();
        std::fs::create_dir_all(root.join("lib64")).unwrap();
        std::fs::write(root.join("usr/lib/x86_64-linux-gnu/libfoo.so.1.2"), b"x").unwrap();
        // relative link
        std::os::unix::fs::symlink(
            "libfoo.so.1.2",
            root.join("usr/lib/x86_64-linux-gnu/libfoo.so.1"),
        )
        .unwrap();
        // absolute link, must stay inside root
        std::os::unix::fs::symlink(
            "/usr/lib/x86_64-linux-gnu/libfoo.so.1",
            root.join("lib64/foo"),
        )
        .unwrap();
        // directory symlink like usrmerge's /lib -> usr/lib
        std::os::unix::fs::symlink("usr/lib", root.join("lib")).unwrap();
        let want = root.join("usr/lib/x86_64-linux-gnu/libfoo.so.1.2");
        assert_eq!(resolve_in_root(root, "lib64/foo"), Some(want.clone()));
        assert_eq!(
            resolve_in_root(root, "lib/x86_64-linux-gnu/libfoo.so.1"),
            Some(want.clone())
        );
        assert_eq!(
            find_lib("libfoo.so.1", &[root.to_path_buf()]),
            Some((want, "lib/x86_64-linux-gnu/libfoo.so.1".into()))
        );
        assert_eq!(resolve_in_root(root, "lib64/missing"), None);
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(resolve_in_root(root, "loop"), None);
    }

    #[test]
    fn missing_library_names_binary_and_library() {
        let t = tempfile::tempdir().unwrap();
        // an empty root: even libc is missing
        let err = resolve_closure(&[host_bin()], &[t.path().to_path_buf()]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("not found"), "{msg}");
        assert!(msg.contains(host_bin().to_str().unwrap()), "{msg}");
    }

    #[test]
    fn non_elf_is_an_error() {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), b"#!/bin/sh\n").unwrap();
        assert!(needed_libs(t.path()).is_err());
    }
}
