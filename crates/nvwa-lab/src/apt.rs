//! The lab's own apt configuration for Debian 13 (trixie): a private directory under the lab
//! cache with its own sources, lists and status file, so that the host's apt configuration is
//! never touched. The mirror is the host's own (its apt sources' `URIs:`), read at run time.
//!
//! It resolves the server guest's kernels from the archive's metadata: trixie's current kernel
//! (`linux-image-<flavour>` outside backports), the point release of the same series before it,
//! and the newest kernel (backports included).

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::exec;

/// The Debian release of the server guest.
pub const RELEASE: &str = "trixie";
/// The kernel flavour: `linux-image-amd64` is trixie's meta-package for it.
pub const FLAVOUR: &str = "amd64";
const APT_DEADLINE: Duration = Duration::from_secs(600);
const QUERY_DEADLINE: Duration = Duration::from_secs(120);

/// Where the host gets its Debian packages: the archive and the security archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirrors {
    pub debian: String,
    pub security: String,
}

/// The host's mirrors, from `/etc/apt/sources.list.d/*.sources` (deb822) and
/// `/etc/apt/sources.list` (one-line).
pub fn host_mirrors() -> Result<Mirrors> {
    let mut entries = Vec::new();
    let dir = Path::new("/etc/apt/sources.list.d");
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            match f.extension().and_then(|e| e.to_str()) {
                Some("sources") => entries.extend(parse_deb822(&text)),
                Some("list") => entries.extend(parse_one_line(&text)),
                _ => {}
            }
        }
    }
    let legacy = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    entries.extend(parse_one_line(&legacy));
    mirrors_of(&entries).context(
        "the lab takes its Debian mirror from this machine's apt sources \
         (/etc/apt/sources.list.d/*.sources `URIs:`), and found none: add a Debian source",
    )
}

/// (URI, suite) pairs of `Types: deb` stanzas.
fn parse_deb822(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |k: &str| {
            stanza.lines().find_map(|l| {
                let (key, v) = l.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(k)
                    .then(|| v.trim().to_string())
            })
        };
        let types = field("Types").unwrap_or_default();
        if !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        if field("Enabled").is_some_and(|e| e == "no") {
            continue;
        }
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
            continue;
        };
        for u in uris.split_whitespace() {
            for s in suites.split_whitespace() {
                out.push((u.to_string(), s.to_string()));
            }
        }
    }
    out
}

fn parse_one_line(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.split('#').next()?.trim();
            let rest = l.strip_prefix("deb ")?.trim_start();
            // skip `[ options ]`
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']')?.1.trim_start(),
                None => rest,
            };
            let mut words = rest.split_whitespace();
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect()
}

fn mirrors_of(entries: &[(String, String)]) -> Option<Mirrors> {
    let debian = entries
        .iter()
        .find(|(_, s)| !s.ends_with("-security"))
        .map(|(u, _)| u.trim_end_matches('/').to_string())?;
    let security = entries
        .iter()
        .find(|(_, s)| s.ends_with("-security"))
        .map(|(u, _)| u.trim_end_matches('/').to_string())
        // Debian's layout: the security archive sits next to the archive.
        .unwrap_or_else(|| format!("{debian}-security"));
    Some(Mirrors { debian, security })
}

/// The lab's private apt configuration for [`RELEASE`].
#[derive(Debug, Clone)]
pub struct LabApt {
    pub dir: PathBuf,
    pub mirrors: Mirrors,
}

impl LabApt {
    /// Writes the configuration under `dir` (nothing is fetched yet).
    pub fn new(dir: &Path, mirrors: Mirrors) -> Result<LabApt> {
        for d in [
            "etc/sources.list.d",
            "etc/preferences.d",
            "etc/apt.conf.d",
            "state/lists/partial",
            "cache/archives/partial",
        ] {
            std::fs::create_dir_all(dir.join(d))
                .with_context(|| format!("cannot create {}", dir.join(d).display()))?;
        }
        let apt = LabApt {
            dir: dir.to_path_buf(),
            mirrors,
        };
        std::fs::write(
            dir.join("etc/sources.list.d/lab.list"),
            apt.source_lines().join("\n") + "\n",
        )?;
        let status = dir.join("status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        Ok(apt)
    }

    /// One-line sources (what mmdebstrap takes): the release, its updates, its backports and
    /// its security updates.
    pub fn source_lines(&self) -> Vec<String> {
        let key = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut lines: Vec<String> = ["", "-updates", "-backports"]
            .iter()
            .map(|s| {
                format!(
                    "deb [signed-by={key}] {} {RELEASE}{s} main",
                    self.mirrors.debian
                )
            })
            .collect();
        lines.push(format!(
            "deb [signed-by={key}] {} {RELEASE}-security main",
            self.mirrors.security
        ));
        lines
    }

    fn options(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        vec![
            format!("Dir::Etc={}", d("etc")),
            format!("Dir::State={}", d("state")),
            format!("Dir::Cache={}", d("cache")),
            format!("Dir::State::status={}", d("status")),
            "Dir::Etc::Trusted=/dev/null".into(),
            "APT::Architecture=amd64".into(),
            "Acquire::Retries=3".into(),
        ]
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        for o in self.options() {
            c.arg("-o").arg(o);
        }
        c
    }

    /// `apt-get update` against the lab's sources only.
    pub fn update(&self) -> Result<()> {
        exec::run(self.command("apt-get").args(["update", "-q"]), APT_DEADLINE).with_context(
            || {
                format!(
                    "fetching the {RELEASE} package lists from {} and {}",
                    self.mirrors.debian, self.mirrors.security
                )
            },
        )?;
        Ok(())
    }

    fn cache(&self, args: &[&str]) -> Result<String> {
        Ok(exec::run(self.command("apt-cache").args(args), QUERY_DEADLINE)?.stdout)
    }

    /// Every version of each package with the suite it comes from (`apt-cache madison`).
    pub fn madison(&self, pkgs: &[&str]) -> Result<Vec<Madison>> {
        let mut args = vec!["madison"];
        args.extend(pkgs);
        Ok(parse_madison(&self.cache(&args)?))
    }

    /// The `Depends:` of one version of a package.
    pub fn depends(&self, pkg: &str, version: &str) -> Result<String> {
        let out = self.cache(&["show", &format!("{pkg}={version}")])?;
        Ok(out
            .lines()
            .find_map(|l| l.strip_prefix("Depends:"))
            .unwrap_or_default()
            .trim()
            .to_string())
    }

    pub fn package_names(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .cache(&["pkgnames", prefix])?
            .lines()
            .map(str::to_string)
            .collect())
    }
}

/// One line of `apt-cache madison`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Madison {
    pub package: String,
    pub version: String,
    /// e.g. `trixie-backports`
    pub suite: String,
}

fn parse_madison(out: &str) -> Vec<Madison> {
    out.lines()
        .filter_map(|l| {
            let mut cols = l.split('|').map(str::trim);
            let (package, version, source) = (cols.next()?, cols.next()?, cols.next()?);
            // "http://… trixie-backports/main amd64 Packages"
            let suite = source.split_whitespace().nth(1)?.split('/').next()?;
            Some(Madison {
                package: package.to_string(),
                version: version.to_string(),
                suite: suite.to_string(),
            })
        })
        .collect()
}

/// A kernel package of the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernel {
    /// `linux-image-6.12.118+deb13-amd64`
    pub package: String,
    /// The package's version, `6.12.118-1`
    pub deb_version: String,
    /// The suite it is installed from
    pub suite: String,
}

impl Kernel {
    /// What `uname -r` says and what `/boot/vmlinuz-…` is named: `6.12.118+deb13-amd64`.
    pub fn release(&self) -> &str {
        self.package
            .strip_prefix("linux-image-")
            .unwrap_or(&self.package)
    }

    /// `name/suite`: apt then takes the package and what it needs from that suite (a
    /// backports kernel needs backports' linux-base).
    pub fn install_spec(&self) -> String {
        format!("{}/{}", self.package, self.suite)
    }
}

/// The three kernels of the server guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSet {
    /// The point release of the current kernel's series before it, still in the archive.
    pub previous: Kernel,
    /// The release's current kernel (`linux-image-<flavour>` outside backports).
    pub current: Kernel,
    /// The newest kernel, backports included.
    pub newest: Kernel,
}

/// Resolves [`KernelSet`] from the lab's apt metadata.
pub fn resolve_kernels(apt: &LabApt) -> Result<KernelSet> {
    let meta = format!("linux-image-{FLAVOUR}");
    let metas = apt.madison(&[&meta])?;
    let pick = |from_backports: bool| {
        metas
            .iter()
            .filter(|m| from_backports || !m.suite.ends_with("-backports"))
            .max_by(|a, b| compare_versions(&a.version, &b.version))
            .cloned()
    };
    let (Some(cur_meta), Some(new_meta)) = (pick(false), pick(true)) else {
        bail!("{meta} is in none of the lab's {RELEASE} suites (apt-cache madison {meta})");
    };
    let kernel_of = |m: &Madison| -> Result<Kernel> {
        let deps = apt.depends(&m.package, &m.version)?;
        let package = image_dependency(&deps).with_context(|| {
            format!(
                "{}={} depends on no linux-image-… package",
                m.package, m.version
            )
        })?;
        let version = apt
            .madison(&[&package])?
            .into_iter()
            .find(|k| k.suite == m.suite)
            .with_context(|| format!("{package} is not in {}", m.suite))?;
        Ok(Kernel {
            package,
            deb_version: version.version,
            suite: m.suite.clone(),
        })
    };
    let current = kernel_of(&cur_meta)?;
    let newest = kernel_of(&new_meta)?;
    let series = series_prefix(current.release())
        .with_context(|| format!("cannot tell the series of {}", current.package))?;
    let names: Vec<String> = apt
        .package_names(&format!("linux-image-{series}"))?
        .into_iter()
        .filter(|n| same_flavour(n) && n != &current.package)
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let candidates = if refs.is_empty() {
        Vec::new()
    } else {
        apt.madison(&refs)?
    };
    let previous = previous_of(&current, &candidates).with_context(|| {
        format!(
            "no earlier {series}… point release of {} is left in the archive",
            current.package
        )
    })?;
    Ok(KernelSet {
        previous,
        current,
        newest,
    })
}

/// `6.12.` of `6.12.118+deb13-amd64`.
fn series_prefix(release: &str) -> Option<String> {
    let mut parts = release.split('.');
    let (major, minor) = (parts.next()?, parts.next()?);
    (major.chars().all(|c| c.is_ascii_digit()) && minor.chars().all(|c| c.is_ascii_digit()))
        .then(|| format!("{major}.{minor}."))
}

/// `linux-image-<abi>-<flavour>` with an ABI free of dashes: not `-cloud-amd64`, `-rt-amd64`,
/// `-amd64-dbg` or `-amd64-unsigned`.
fn same_flavour(name: &str) -> bool {
    name.strip_prefix("linux-image-")
        .and_then(|r| r.strip_suffix(&format!("-{FLAVOUR}")))
        .is_some_and(|abi| !abi.contains('-'))
}

fn image_dependency(depends: &str) -> Option<String> {
    depends
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-") && same_flavour(d))
        .map(str::to_string)
}

/// The highest version below `current`'s among `candidates`.
fn previous_of(current: &Kernel, candidates: &[Madison]) -> Option<Kernel> {
    candidates
        .iter()
        .filter(|m| compare_versions(&m.version, &current.deb_version) == Ordering::Less)
        .max_by(|a, b| compare_versions(&a.version, &b.version))
        .map(|m| Kernel {
            package: m.package.clone(),
            deb_version: m.version.clone(),
            suite: m.suite.clone(),
        })
}

/// Debian's version order (deb-version(7)): epoch, then upstream version and revision compared
/// part by part, non-digits by the modified ASCII order (`~` before everything, letters before
/// other characters), digits numerically.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let split = |v: &str| -> (u64, String, String) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        let (up, rev) = match rest.rsplit_once('-') {
            Some((u, r)) => (u.to_string(), r.to_string()),
            None => (rest.to_string(), String::new()),
        };
        (epoch, up, rev)
    };
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| compare_part(&ua, &ub))
        .then_with(|| compare_part(&ra, &rb))
}

fn compare_part(a: &str, b: &str) -> Ordering {
    fn order(c: Option<char>) -> i32 {
        match c {
            None => 0,
            Some('~') => -1,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    let (mut a, mut b) = (a.chars().peekable(), b.chars().peekable());
    loop {
        // non-digit prefix
        loop {
            let (ca, cb) = (
                a.peek().copied().filter(|c| !c.is_ascii_digit()),
                b.peek().copied().filter(|c| !c.is_ascii_digit()),
            );
            if ca.is_none() && cb.is_none() {
                break;
            }
            match order(ca).cmp(&order(cb)) {
                Ordering::Equal => {
                    a.next();
                    b.next();
                }
                o => return o,
            }
        }
        // digit run
        let num = |it: &mut std::iter::Peekable<std::str::Chars>| {
            let mut n: u128 = 0;
            while let Some(d) = it.peek().and_then(|c| c.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(d as u128);
                it.next();
            }
            n
        };
        match num(&mut a).cmp(&num(&mut b)) {
            Ordering::Equal => {}
            o => return o,
        }
        if a.peek().is_none() && b.peek().is_none() {
            return Ordering::Equal;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_order_as_dpkg_does() {
        use Ordering::*;
        for (a, b, want) in [
            ("6.12.117-1", "6.12.118-1", Less),
            ("6.12.99-1", "6.12.100-1", Less),
            ("7.3.4-1~bpo13+1", "7.3.4-1", Less),
            ("7.3.4-1~bpo13+1", "6.12.118-1", Greater),
            ("1:1.0", "2.0", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0a", "1.0+", Less),
            ("6.12.115-1+deb13u1", "6.12.115-1", Greater),
            ("2.0", "2.0", Equal),
        ] {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn the_host_mirrors_are_read_from_both_source_formats() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n\
                      Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n\nTypes: deb-src\nURIs: http://src.example/\nSuites: x\n";
        let m = mirrors_of(&parse_deb822(deb822)).unwrap();
        assert_eq!(m.debian, "http://mirror.example/debian");
        assert_eq!(m.security, "http://mirror.example/debian-security");
        let one = "# deb http://old.example/debian bullseye main\ndeb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n";
        let m = mirrors_of(&parse_one_line(one)).unwrap();
        assert_eq!(m.debian, "http://one.example/debian");
        assert_eq!(m.security, "http://one.example/debian-security");
        assert!(mirrors_of(&parse_deb822("Types: deb-src\nURIs: x\nSuites: y\n")).is_none());
    }

    #[test]
    fn madison_lines_are_parsed() {
        let out = "linux-image-amd64 | 7.3.4-1~bpo13+1 | http://m.example/debian trixie-backports/main amd64 Packages\n\
                   linux-image-amd64 | 6.12.118-1 | http://m.example/debian-security trixie-security/main amd64 Packages\n";
        let m = parse_madison(out);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].suite, "trixie-backports");
        assert_eq!(m[1].version, "6.12.118-1");
    }

    #[test]
    fn the_previous_point_release_is_the_highest_below_the_current() {
        let k = |p: &str, v: &str, s: &str| Madison {
            package: p.into(),
            version: v.into(),
            suite: s.into(),
        };
        let current = Kernel {
            package: "linux-image-6.12.118+deb13-amd64".into(),
            deb_version: "6.12.118-1".into(),
            suite: "trixie-security".into(),
        };
        let prev = previous_of(
            &current,
            &[
                k("linux-image-6.12.99+deb13-amd64", "6.12.99-1", "trixie"),
                k("linux-image-6.12.117+deb13-amd64", "6.12.117-1", "trixie"),
                k(
                    "linux-image-6.12.119+deb13-amd64",
                    "6.12.119-1",
                    "trixie-proposed",
                ),
            ],
        )
        .unwrap();
        assert_eq!(prev.package, "linux-image-6.12.117+deb13-amd64");
        assert_eq!(prev.release(), "6.12.117+deb13-amd64");
        assert_eq!(
            prev.install_spec(),
            "linux-image-6.12.117+deb13-amd64/trixie"
        );
        assert!(previous_of(&current, &[]).is_none());
    }

    #[test]
    fn kernel_names_are_told_apart() {
        assert!(same_flavour("linux-image-6.12.118+deb13-amd64"));
        assert!(same_flavour("linux-image-6.12.115+deb13.1-amd64"));
        assert!(!same_flavour("linux-image-6.12.118+deb13-cloud-amd64"));
        assert!(!same_flavour("linux-image-6.12.118+deb13-amd64-dbg"));
        assert!(!same_flavour("linux-image-amd64-signed-template"));
        assert_eq!(
            series_prefix("6.12.118+deb13-amd64").as_deref(),
            Some("6.12.")
        );
        assert_eq!(
            image_dependency("linux-base-amd64 (= 7.3.4-1~bpo13+1), linux-image-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)")
                .as_deref(),
            Some("linux-image-7.3.4+deb13-amd64")
        );
    }

    #[test]
    fn the_lab_sources_follow_the_host_mirror() {
        let t = tempfile::tempdir().unwrap();
        let apt = LabApt::new(
            t.path(),
            Mirrors {
                debian: "http://m.example/debian".into(),
                security: "http://m.example/debian-security".into(),
            },
        )
        .unwrap();
        let lines = apt.source_lines();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].ends_with("http://m.example/debian trixie main"));
        assert!(lines[2].ends_with("trixie-backports main"));
        assert!(lines[3].ends_with("http://m.example/debian-security trixie-security main"));
        let written =
            std::fs::read_to_string(t.path().join("etc/sources.list.d/lab.list")).unwrap();
        assert_eq!(written.lines().count(), 4);
    }
}
