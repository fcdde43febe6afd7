//! Lab scenarios: TOML files that say what to put in the guest, how to set the workload up on the
//! old kernel, which updates to run, and what must hold afterwards. See the README for the format.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// Written in update versions to mean the lab's new kernel.
pub const NEW_KERNEL: &str = "@new";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(skip)]
    pub name: String,
    #[serde(skip)]
    pub path: PathBuf,
    pub description: String,
    /// Hard limit for the whole guest run, both kernels.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Debian packages whose files are added to the guest.
    #[serde(default)]
    pub packages: Vec<String>,
    /// TCP ports of the guest reachable from the host on 127.0.0.1.
    #[serde(default)]
    pub forwards: Vec<Forward>,
    #[serde(default)]
    pub files: Vec<GuestFile>,
    /// `nvwa-restore.yaml`, with `$VARS` of the setup script expanded.
    #[serde(default)]
    pub config: String,
    /// Shell (busybox sh, `set -e`) run on the old kernel. `lab_save NAME VALUE` keeps a value
    /// for the checks after the kernel switch.
    #[serde(default)]
    pub setup: String,
    #[serde(default)]
    pub update: Vec<Update>,
    /// Shell run on the new kernel before the nvwa server starts (e.g. to take a saved pid).
    #[serde(default)]
    pub before_restore: String,
    /// How the restore on the new kernel must end.
    #[serde(default = "default_expect")]
    pub expect_restore: Expect,
    /// Shell snippets that must exit 0: on the new kernel after a successful update, else on the
    /// old one.
    #[serde(default)]
    pub check: Vec<Check>,
    /// Shell snippets run on the host after the guest powered off, with LAB_SERIAL_LOG and
    /// LAB_EVENTS (a JSON file) in the environment.
    #[serde(default)]
    pub host_check: Vec<Check>,
}

const TOP_LEVEL: &[&str] = &[
    "description",
    "timeout_s",
    "packages",
    "forwards",
    "config",
    "setup",
    "before_restore",
    "expect_restore",
];

fn default_expect() -> Expect {
    Expect::Success
}

fn default_timeout() -> u64 {
    900
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    pub host: u16,
    pub guest: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestFile {
    /// Absolute path in the guest.
    pub guest: String,
    /// A host file, relative to the scenario file.
    #[serde(default)]
    pub source: Option<PathBuf>,
    /// Or the contents inline.
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Success,
    Failure,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// A kernel version, or "@new" for the lab's new kernel.
    #[serde(default = "default_version")]
    pub version: String,
    pub expect: Expect,
    /// Substrings the client's output must contain.
    #[serde(default)]
    pub output_contains: Vec<String>,
}

fn default_version() -> String {
    NEW_KERNEL.into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    pub run: String,
}

impl Scenario {
    pub fn parse(text: &str, path: &Path) -> Result<Scenario> {
        let mut s: Scenario = toml::from_str(text).map_err(|e| {
            let msg = e.to_string();
            // A top-level key written after a [[table]] belongs to that table in TOML.
            let misplaced = TOP_LEVEL
                .iter()
                .find(|k| msg.contains(&format!("unknown field `{k}`")));
            let hint = misplaced.map_or(String::new(), |k| {
                format!("\n`{k}` is a top-level key: move it above the first [[...]] table")
            });
            anyhow::anyhow!("invalid scenario {}: {msg}{hint}", path.display())
        })?;
        s.name = path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        s.path = path.to_path_buf();
        s.validate()
            .with_context(|| format!("invalid scenario {}", path.display()))?;
        Ok(s)
    }

    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        Scenario::parse(&text, path)
    }

    fn validate(&self) -> Result<()> {
        if let Some(i) = self.update.iter().position(|u| u.expect == Expect::Success) {
            if i + 1 != self.update.len() {
                bail!("update {} expects success, so it must be the last update: nothing runs on the old kernel after a kernel switch", i + 1);
            }
        }
        for f in &self.files {
            if !f.guest.starts_with('/') {
                bail!("files: guest path {:?} must be absolute", f.guest);
            }
            if f.source.is_some() == f.content.is_some() {
                bail!(
                    "files: {} needs exactly one of `source` or `content`",
                    f.guest
                );
            }
        }
        for c in self.check.iter().chain(&self.host_check) {
            if c.run.trim().is_empty() {
                bail!("check {:?} has nothing to run", c.name);
            }
        }
        Ok(())
    }

    pub fn expects_kernel_switch(&self) -> bool {
        self.update
            .last()
            .is_some_and(|u| u.expect == Expect::Success)
    }

    /// The version an update asks for, with "@new" resolved.
    pub fn version_of<'a>(u: &'a Update, new_kernel: &'a str) -> &'a str {
        if u.version == NEW_KERNEL {
            new_kernel
        } else {
            &u.version
        }
    }

    /// The shell library the guest's /init sources (see guest/init.sh).
    pub fn guest_script(&self, old_kernel: &str, new_kernel: &str) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "LAB_OLD_KERNEL={}\nLAB_NEW_KERNEL={}\nexport LAB_OLD_KERNEL LAB_NEW_KERNEL\n",
            quote(old_kernel),
            quote(new_kernel)
        ));
        s.push_str(&format!(
            "LAB_CHECKS={}\nLAB_UPDATES={}\n",
            self.check.len(),
            self.update.len()
        ));
        s.push_str(&function("lab_setup", &self.setup));
        s.push_str(&function("lab_before_restore", &self.before_restore));
        let marker = "NVWA_LAB_CONFIG_EOF";
        s.push_str(&format!(
            "lab_render_config() {{\ncat <<{marker}\n{}\n{marker}\n}}\n",
            self.config.trim_end()
        ));
        for (i, u) in self.update.iter().enumerate() {
            let n = i + 1;
            let expect = match u.expect {
                Expect::Success => "success",
                Expect::Failure => "failure",
            };
            s.push_str(&format!(
                "lab_update_version_{n}() {{ echo {}; }}\nlab_update_expect_{n}() {{ echo {expect}; }}\n",
                quote(Self::version_of(u, new_kernel))
            ));
        }
        for (i, c) in self.check.iter().enumerate() {
            s.push_str(&function(&format!("lab_check_{}", i + 1), &c.run));
        }
        s
    }
}

fn function(name: &str, body: &str) -> String {
    // `:` keeps an empty body valid sh.
    format!("{name}() {{\n:\n{}\n}}\n", body.trim_end())
}

/// Single-quotes a string for sh.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The scenarios shipped in lab/scenarios, sorted by name.
pub fn builtin_dir() -> PathBuf {
    crate::workspace_root().join("lab/scenarios")
}

pub fn list(dir: &Path) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            out.push(Scenario::load(&p)?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
description = "two processes"
config = "pids: [$A]"
setup = "lab_save A 5"
[[update]]
version = "../x"
expect = "failure"
output_contains = ["refused"]
[[update]]
expect = "success"
[[check]]
name = "alive"
run = "kill -0 $A"
"#;

    #[test]
    fn a_scenario_parses_and_renders_a_guest_script() {
        let s = Scenario::parse(GOOD, Path::new("/x/pids.toml")).unwrap();
        assert_eq!(s.name, "pids");
        assert!(s.expects_kernel_switch());
        let script = s.guest_script("6.1", "6.12");
        assert!(
            script.contains("lab_update_version_1() { echo '../x'; }"),
            "{script}"
        );
        assert!(
            script.contains("lab_update_version_2() { echo '6.12'; }"),
            "{script}"
        );
        assert!(script.contains("LAB_CHECKS=1"));
        assert!(script.contains("cat <<NVWA_LAB_CONFIG_EOF\npids: [$A]\nNVWA_LAB_CONFIG_EOF"));
    }

    #[test]
    fn the_rendered_script_is_valid_sh() {
        let s = Scenario::parse(GOOD, Path::new("/x/pids.toml")).unwrap();
        let script =
            s.guest_script("6.1", "6.12") + "\nlab_update_version_2\nlab_check_1 || echo dead\n";
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("A=$$; {script}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "6.12");
    }

    #[test]
    fn mistakes_are_named() {
        let e = Scenario::parse("description = 1", Path::new("a.toml")).unwrap_err();
        assert!(format!("{e:#}").contains("a.toml"), "{e:#}");
        let e =
            Scenario::parse("description = \"x\"\nsetpu = \"\"", Path::new("a.toml")).unwrap_err();
        assert!(format!("{e:#}").contains("setpu"), "{e:#}");
        let e = Scenario::parse(
            "description = \"x\"\n[[update]]\nexpect = \"success\"\n[[update]]\nexpect = \"failure\"",
            Path::new("a.toml"),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("must be the last"), "{e:#}");
    }

    #[test]
    fn a_top_level_key_after_a_table_gets_a_hint() {
        let e = Scenario::parse(
            "description = \"x\"\n[[update]]\nexpect = \"success\"\nsetup = \"true\"\n",
            Path::new("a.toml"),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("move it above the first"),
            "{e:#}"
        );
    }

    #[test]
    fn quoting_survives_single_quotes() {
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("echo {}", quote("it's $HOME"))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "it's $HOME");
    }

    #[test]
    fn the_shipped_scenarios_parse() {
        let all = list(&builtin_dir()).unwrap();
        assert!(
            all.iter().any(|s| s.name == "demo"),
            "demo scenario missing"
        );
    }
}
