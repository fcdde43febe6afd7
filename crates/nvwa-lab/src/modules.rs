//! Kernel module dependency resolution from `modules.dep` / `modules.builtin`,
//! and decompression of `.ko.xz` / `.ko.zst` / `.ko.gz` files so that the guest
//! can load them with finit_module(2) (`nvwa-lab-workload load-modules`), which takes
//! uncompressed modules only unless told otherwise.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Outcome of resolving a wanted module list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleResolution {
    /// Module files (absolute host paths), dependencies first, no duplicates.
    pub load_order: Vec<PathBuf>,
    /// Wanted modules that are built into the kernel (normalized names).
    pub builtin: Vec<String>,
    /// Optional (`name?`) wanted modules that this kernel does not have.
    pub missing_optional: Vec<String>,
}

/// Normalizes a module name: '-' and '_' are equivalent.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path such as `kernel/fs/ext4/ext4.ko.xz`.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = ["ko.xz", "ko.zst", "ko.gz", "ko"]
        .iter()
        .find_map(|ext| base.strip_suffix(&format!(".{ext}")))
        .unwrap_or(base);
    normalize(stem)
}

struct DepDb {
    /// name -> (relative path, direct/transitive deps as names)
    modules: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl DepDb {
    fn load(modules_dir: &Path) -> Result<Self> {
        let dep_path = modules_dir.join("modules.dep");
        let dep = std::fs::read_to_string(&dep_path).with_context(|| {
            format!(
                "reading {} (run `depmod -b <root> <version>` to create it)",
                dep_path.display()
            )
        })?;
        let mut modules = HashMap::new();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(module_name).collect();
            modules.insert(module_name(path), (path.to_string(), deps));
        }
        let builtin_path = modules_dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_path) {
            Ok(s) => s
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(module_name)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", builtin_path.display())),
        };
        Ok(Self { modules, builtin })
    }
}

/// Resolves `wanted` module names (a trailing `?` marks an optional one) into
/// a dependency-first load order. Built-in modules are skipped; a required
/// module that is neither a module nor built in is an error.
pub fn resolve_modules(modules_dir: &Path, wanted: &[&str]) -> Result<ModuleResolution> {
    let db = DepDb::load(modules_dir)?;
    let mut res = ModuleResolution::default();
    let mut done = HashSet::new();
    for raw in wanted {
        let (name, optional) = match raw.strip_suffix('?') {
            Some(n) => (normalize(n), true),
            None => (normalize(raw), false),
        };
        if db.modules.contains_key(&name) {
            visit(
                &db,
                &name,
                modules_dir,
                &mut done,
                &mut Vec::new(),
                &mut res.load_order,
            )?;
        } else if db.builtin.contains(&name) {
            if !res.builtin.contains(&name) {
                res.builtin.push(name);
            }
        } else if optional {
            res.missing_optional.push(name);
        } else {
            bail!(
                "kernel module {name} is neither in {}/modules.dep nor built in (modules.builtin); \
                 mark it optional with a trailing '?' if that is acceptable",
                modules_dir.display()
            );
        }
    }
    Ok(res)
}

fn visit(
    db: &DepDb,
    name: &str,
    dir: &Path,
    done: &mut HashSet<String>,
    stack: &mut Vec<String>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    if done.contains(name) {
        return Ok(());
    }
    if stack.iter().any(|s| s == name) {
        bail!("module dependency cycle: {} -> {name}", stack.join(" -> "));
    }
    let Some((path, deps)) = db.modules.get(name) else {
        if db.builtin.contains(name) {
            return Ok(());
        }
        bail!(
            "module {name} (needed by {}) is missing from modules.dep",
            stack.join(" -> ")
        );
    };
    stack.push(name.to_string());
    // modules.dep lists dependencies so that the last one must be loaded first
    for dep in deps.iter().rev() {
        visit(db, dep, dir, done, stack, out)?;
    }
    stack.pop();
    done.insert(name.to_string());
    out.push(dir.join(path));
    Ok(())
}

/// [`resolve_modules`], returning only the load order.
pub fn module_closure(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    Ok(resolve_modules(modules_dir, wanted)?.load_order)
}

/// Returns the contents of a module file (`.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz`) as the lab
/// guest loads it: uncompressed, and without its signature ([`strip_signature`]).
pub fn stage_module(path: &Path) -> Result<Vec<u8>> {
    Ok(strip_signature(uncompressed_module(path)?))
}

/// What the kernel appends to a signed module's ELF image: the signature, then a
/// `struct module_signature` (the signature's length big-endian in its last 4 bytes), then
/// this marker.
const SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`, between the signature and [`SIGNATURE_MARKER`].
const SIGNATURE_INFO_LEN: usize = 12;

/// A module without its appended signature (unchanged if it has none or it does not parse).
///
/// The lab's kernels check a signature whenever there is one, even for a module that is
/// loaded already: under TCG, hashing ext4's 2.4 MB took 0.35–0.64 s per `insmod`, against
/// 0.06 s for the same module unsigned (a real CPU hashes it in milliseconds), and the guest
/// loads 23 modules on every boot. Debian's kernels do not enforce
/// signatures (`CONFIG_MODULE_SIG_FORCE` off) and the lab runs them without lockdown: they load
/// an unsigned module and mark themselves tainted (`E`).
fn strip_signature(mut module: Vec<u8>) -> Vec<u8> {
    let Some(body) = module
        .len()
        .checked_sub(SIGNATURE_MARKER.len() + SIGNATURE_INFO_LEN)
    else {
        return module;
    };
    if !module.ends_with(SIGNATURE_MARKER) {
        return module;
    }
    let info = &module[body..body + SIGNATURE_INFO_LEN];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    if let Some(end) = body.checked_sub(sig_len) {
        module.truncate(end);
    }
    module
}

fn uncompressed_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let (tool, pkg) = if name.ends_with(".ko") {
        return std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    } else if name.ends_with(".ko.xz") {
        ("xz", "xz-utils")
    } else if name.ends_with(".ko.zst") {
        ("zstd", "zstd")
    } else if name.ends_with(".ko.gz") {
        ("gzip", "gzip")
    } else {
        bail!("{}: not a kernel module file", path.display());
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!(
                    "`{tool}` is needed to decompress {}; install it: apt-get install {pkg}",
                    path.display()
                )
            } else {
                anyhow::anyhow!("running {tool} -dc {}: {e}", path.display())
            }
        })?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modules_signature_is_cut_off_and_an_unsigned_module_kept_whole() {
        let elf = b"\x7fELF module body".to_vec();
        let mut signed = elf.clone();
        signed.extend_from_slice(&[0xAB; 5]); // the signature (PKCS#7 in real modules)
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 5]); // its length: 5
        signed.extend_from_slice(SIGNATURE_MARKER);
        assert_eq!(strip_signature(signed), elf);
        assert_eq!(strip_signature(elf.clone()), elf);
        // A length that points before the start of the file is not a signature of this file.
        let mut bogus = b"xy".to_vec();
        bogus.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        bogus.extend_from_slice(SIGNATURE_MARKER);
        assert_eq!(strip_signature(bogus.clone()), bogus);
    }

    #[test]
    fn a_real_modules_signature_length_is_read_big_endian() {
        // The tail of Debian's signed ext4.ko (6.12): 264 bytes of signature.
        let mut m = vec![0u8; 300];
        m.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 8]);
        m.extend_from_slice(SIGNATURE_MARKER);
        assert_eq!(strip_signature(m).len(), 300 - 264);
    }

    fn fake_tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::write(
            d.join("modules.dep"),
            "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n\
             kernel/lib/crc16.ko.xz:\n\
             kernel/fs/mbcache.ko.xz:\n\
             kernel/fs/jbd2/jbd2.ko.xz:\n\
             kernel/net/netfilter/nf_tables.ko: kernel/lib/libcrc32c.ko kernel/net/netfilter/nfnetlink.ko\n\
             kernel/net/netfilter/nfnetlink.ko:\n\
             kernel/lib/libcrc32c.ko:\n\
             kernel/crypto/crc32c_generic.ko.zst:\n\
             kernel/net/packet/af-packet-diag.ko:\n",
        )
        .unwrap();
        std::fs::write(
            d.join("modules.builtin"),
            "kernel/net/unix/unix_diag.ko\nkernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        t
    }

    fn names(v: &[PathBuf]) -> Vec<String> {
        v.iter()
            .map(|p| module_name(&p.to_string_lossy()))
            .collect()
    }

    #[test]
    fn dependency_first_order_without_duplicates() {
        let t = fake_tree();
        let order = module_closure(
            t.path(),
            &[
                "crc32c_generic?",
                "libcrc32c",
                "nf-tables",
                "nfnetlink",
                "unix_diag",
                "af_packet_diag?",
                "tun?",
            ],
        )
        .unwrap();
        assert_eq!(
            names(&order),
            [
                "crc32c_generic",
                "libcrc32c",
                "nfnetlink",
                "nf_tables",
                "af_packet_diag"
            ]
        );
        assert_eq!(
            order[0],
            t.path().join("kernel/crypto/crc32c_generic.ko.zst")
        );
    }

    #[test]
    fn transitive_dependencies_come_first() {
        let t = fake_tree();
        // ext4 is both a module and listed as builtin in the fake tree: the module wins
        let res = resolve_modules(t.path(), &["ext4"]).unwrap();
        assert_eq!(names(&res.load_order), ["jbd2", "mbcache", "crc16", "ext4"]);
    }

    #[test]
    fn builtin_and_missing() {
        let t = fake_tree();
        let res = resolve_modules(t.path(), &["unix-diag", "tun?"]).unwrap();
        assert!(res.load_order.is_empty());
        assert_eq!(res.builtin, ["unix_diag"]);
        assert_eq!(res.missing_optional, ["tun"]);
        let err = module_closure(t.path(), &["tun"]).unwrap_err();
        assert!(format!("{err:#}").contains("tun"), "{err:#}");
    }

    #[test]
    fn missing_modules_dep_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        assert!(module_closure(t.path(), &["x"]).is_err());
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.xz"), "ext4");
        assert_eq!(
            module_name("kernel/net/packet/af-packet-diag.ko.zst"),
            "af_packet_diag"
        );
        assert_eq!(module_name("x.ko"), "x");
    }

    #[test]
    fn stage_plain_and_xz() {
        let t = tempfile::tempdir().unwrap();
        let plain = t.path().join("m.ko");
        std::fs::write(&plain, b"\x7fELF module").unwrap();
        assert_eq!(stage_module(&plain).unwrap(), b"\x7fELF module");
        // xz is a documented host requirement for the lab
        let st = Command::new("xz")
            .arg("-k")
            .arg(&plain)
            .status()
            .expect("xz is installed (apt-get install xz-utils)");
        assert!(st.success());
        assert_eq!(
            stage_module(&t.path().join("m.ko.xz")).unwrap(),
            b"\x7fELF module"
        );
        assert!(stage_module(&t.path().join("m.txt")).is_err());
    }
}
