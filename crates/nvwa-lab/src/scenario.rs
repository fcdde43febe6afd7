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
    /// Which guest runs the scenario: the busybox initramfs (default) or the Debian 13 server.
    #[serde(default)]
    pub guest: Guest,
    /// The server guest's kernel pair (default `series`); the busybox guest has one pair.
    #[serde(default)]
    pub kernels: Option<KernelPair>,
    /// Hard limit for the whole guest run, both kernels.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Debian packages whose files are added to the guest.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Persistent memory for the images in MiB (busybox guest; default and minimum 768): more
    /// moves it above 4 GiB and gives the guest 3 GiB of RAM besides it.
    #[serde(default)]
    pub pmem_mib: Option<u32>,
    /// TCP ports of the guest reachable from the host on 127.0.0.1, each through a free host
    /// port the runner picks (host steps find it in `LAB_PORT_<guest port>`).
    #[serde(default)]
    pub forwards: Vec<u16>,
    /// Server guest: root may log in over SSH with a key pair made for this run (private key:
    /// `$LAB_RUN_DIR/ssh_key` on the host); sshd itself is started by the scenario.
    #[serde(default)]
    pub ssh: bool,
    /// Server guest: the update comes from the host, from the `[[host]]` steps with this `when`
    /// (Ansible over SSH…): after the setup the guest calls `lab_host WHEN` and waits for the
    /// kernel switch instead of running `nvwa update`; the checks run on the new kernel once the
    /// host steps say they are done (`touch /run/nvwa-lab-host-done` in the guest), or on the old
    /// one if they say so without a switch.
    #[serde(default)]
    pub update_from_host: Option<String>,
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
    /// The scenario cuts the power itself (`lab_power_cut`, during setup or an update); the lab
    /// then cold-boots the same machine, old kernel and persistent memory intact, and runs the
    /// "after restart" path there: `before_restore`, the nvwa server settles the journal, checks.
    #[serde(default)]
    pub power_cut: bool,
    /// Shell run on the next boot (the new kernel, or the cold boot after a power cut) before the
    /// nvwa server starts (e.g. to take a saved pid).
    #[serde(default)]
    pub before_restore: String,
    /// How the nvwa server on the next boot must settle the update.
    #[serde(default = "default_settle")]
    pub expect_restore: Settle,
    /// Shell snippets that must exit 0: on the boot after a kernel switch or a power cut, else on
    /// the old kernel.
    #[serde(default)]
    pub check: Vec<Check>,
    /// Shell snippets run on the host after the guest powered off, with LAB_SERIAL_LOG and
    /// LAB_EVENTS (a JSON file) in the environment.
    #[serde(default)]
    pub host_check: Vec<Check>,
    /// Commands run on the host while the guest runs, each started when the guest calls
    /// `lab_host WHEN` (see `host`).
    #[serde(default)]
    pub host: Vec<HostStep>,
}

const TOP_LEVEL: &[&str] = &[
    "description",
    "guest",
    "kernels",
    "timeout_s",
    "power_cut",
    "packages",
    "pmem_mib",
    "forwards",
    "ssh",
    "update_from_host",
    "config",
    "setup",
    "before_restore",
    "expect_restore",
];

fn default_settle() -> Settle {
    Settle::Success
}

fn default_timeout() -> u64 {
    900
}

/// The guest a scenario runs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guest {
    /// An initramfs with busybox as init: fast, for the core scenarios.
    #[default]
    Busybox,
    /// Debian 13 with systemd, its kernels installed as packages, nvwa as a service.
    Server,
}

/// Which kernels of the server guest an update goes between (resolved at prepare time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelPair {
    /// The previous point release of trixie's kernel series → the current one.
    #[default]
    Series,
    /// trixie's current kernel → the newest (backports).
    Major,
    /// The newest kernel → trixie's current one.
    Downgrade,
}

impl KernelPair {
    pub fn name(self) -> &'static str {
        match self {
            KernelPair::Series => "series",
            KernelPair::Major => "major",
            KernelPair::Downgrade => "downgrade",
        }
    }
}

/// A command run on the host while the guest runs: started in the background when the guest
/// calls `lab_host WHEN`, waited for after the guest powered off; it must exit 0.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostStep {
    pub name: String,
    pub when: String,
    pub run: String,
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
#[serde(rename_all = "snake_case")]
pub enum Expect {
    Success,
    Failure,
    /// The power is cut while this update runs: it never returns (only with `power_cut = true`).
    PowerCut,
}

impl Expect {
    pub fn name(self) -> &'static str {
        match self {
            Expect::Success => "success",
            Expect::Failure => "failure",
            Expect::PowerCut => "power_cut",
        }
    }
}

/// How the nvwa server of the next boot settles the update: the journal's terminal phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Settle {
    /// `restored`: every target runs again.
    Success,
    /// `restore_failed` (`failed` in older nvwa): a target could not be restored.
    Failure,
    /// `abandoned`: the update never committed; its images are deleted, never restored.
    Abandoned,
}

impl Settle {
    /// The journal phases that fulfil this expectation.
    pub fn phases(self) -> &'static [&'static str] {
        match self {
            Settle::Success => &["restored"],
            Settle::Failure => &["restore_failed", "failed"],
            Settle::Abandoned => &["abandoned"],
        }
    }
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
    /// The exit status the client must return (for an update that returns).
    #[serde(default)]
    pub exit_code: Option<i32>,
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
        match self.guest {
            Guest::Busybox if self.kernels.is_some() => bail!(
                "kernels = \"{}\" chooses a kernel pair of the server guest: add guest = \"server\"",
                self.kernels.unwrap_or_default().name()
            ),
            Guest::Server => {
                let unsupported = [
                    (!self.packages.is_empty(), "packages"),
                    (self.pmem_mib.is_some(), "pmem_mib"),
                    (self.power_cut, "power_cut"),
                    (!self.before_restore.trim().is_empty(), "before_restore"),
                ];
                if let Some((_, key)) = unsupported.iter().find(|(set, _)| *set) {
                    bail!("`{key}` is not available on the server guest (guest = \"server\"); nvwa.service restores at boot by itself there");
                }
            }
            Guest::Busybox => {
                if self.ssh || self.update_from_host.is_some() {
                    bail!("`ssh` and `update_from_host` are server guest keys: add guest = \"server\"");
                }
            }
        }
        if let Some(when) = &self.update_from_host {
            if !self.update.is_empty() {
                bail!("update_from_host = {when:?}: the host runs the update, so the scenario has no [[update]]");
            }
            if !self.host.iter().any(|h| &h.when == when) {
                bail!("update_from_host = {when:?}: no [[host]] step has when = {when:?}");
            }
        }
        if let Some(i) = self.update.iter().position(|u| u.expect == Expect::Success) {
            if i + 1 != self.update.len() {
                bail!("update {} expects success, so it must be the last update: nothing runs on the old kernel after a kernel switch", i + 1);
            }
            if self.power_cut {
                bail!("update {} expects success (a kernel switch), but with power_cut = true the machine comes back by a cold boot of the old kernel: expect \"power_cut\" or \"failure\"", i + 1);
            }
        }
        for (i, u) in self.update.iter().enumerate() {
            match (u.expect, u.exit_code) {
                (Expect::Success | Expect::PowerCut, Some(_)) => bail!(
                    "update {} expects {}: it never returns, so it has no exit_code to check",
                    i + 1,
                    u.expect.name()
                ),
                (Expect::Failure, Some(0)) => bail!(
                    "update {} expects failure but exit_code = 0 (success)",
                    i + 1
                ),
                _ => {}
            }
        }
        if let Some(i) = self
            .update
            .iter()
            .position(|u| u.expect == Expect::PowerCut)
        {
            if !self.power_cut {
                bail!("update {} expects \"power_cut\": set power_cut = true at the top of the scenario", i + 1);
            }
            if i + 1 != self.update.len() {
                bail!("update {} expects the power to be cut, so it must be the last update: nothing runs after it on that boot", i + 1);
            }
        }
        if self.expect_restore == Settle::Abandoned && !self.power_cut {
            bail!("expect_restore = \"abandoned\" needs power_cut = true: only a new boot before the commit abandons an update");
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
        for (i, h) in self.host.iter().enumerate() {
            if h.when.is_empty()
                || !h
                    .when
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bail!("host step {:?}: when = {:?} must be a word (letters, digits, - or _): the guest calls `lab_host WORD`", h.name, h.when);
            }
            if h.run.trim().is_empty() {
                bail!("host step {:?} has nothing to run", h.name);
            }
            if self.host[..i].iter().any(|o| o.name == h.name) {
                bail!("two host steps are named {:?}: names must differ", h.name);
            }
        }
        for c in self.check.iter().chain(&self.host_check) {
            if c.run.trim().is_empty() {
                bail!("check {:?} has nothing to run", c.name);
            }
        }
        Ok(())
    }

    /// The server guest's kernel pair (`series` unless the scenario names one).
    pub fn kernel_pair(&self) -> Option<KernelPair> {
        (self.guest == Guest::Server).then(|| self.kernels.unwrap_or_default())
    }

    pub fn expects_kernel_switch(&self) -> bool {
        self.update_from_host.is_some()
            || self
                .update
                .last()
                .is_some_and(|u| u.expect == Expect::Success)
    }

    /// Whether the scenario ends on a second boot (new kernel or cold boot), where the nvwa
    /// server settles the update and the checks run.
    pub fn expects_next_boot(&self) -> bool {
        self.expects_kernel_switch() || self.power_cut
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
            "LAB_CHECKS={}\nLAB_UPDATES={}\nLAB_UPDATE_FROM_HOST={}\n",
            self.check.len(),
            self.update.len(),
            quote(self.update_from_host.as_deref().unwrap_or_default())
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
            let expect = u.expect.name();
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
    fn the_guest_and_its_kernel_pair_are_chosen_by_keys() {
        let s = Scenario::parse(GOOD, Path::new("/x/pids.toml")).unwrap();
        assert_eq!(s.guest, Guest::Busybox);
        assert_eq!(s.kernel_pair(), None);
        let server = format!("guest = \"server\"\n{GOOD}");
        let s = Scenario::parse(&server, Path::new("/x/s.toml")).unwrap();
        assert_eq!(s.kernel_pair(), Some(KernelPair::Series));
        let major = format!("guest = \"server\"\nkernels = \"major\"\n{GOOD}");
        let s = Scenario::parse(&major, Path::new("/x/s.toml")).unwrap();
        assert_eq!(s.kernel_pair(), Some(KernelPair::Major));
        let e = Scenario::parse(
            &format!("kernels = \"downgrade\"\n{GOOD}"),
            Path::new("a.toml"),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("add guest = \"server\""), "{e:#}");
        let e = Scenario::parse(
            &format!("guest = \"server\"\nbefore_restore = \"true\"\n{GOOD}"),
            Path::new("a.toml"),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("`before_restore` is not available"),
            "{e:#}"
        );
        let e = Scenario::parse(
            &format!("kernels = \"sideways\"\n{GOOD}"),
            Path::new("a.toml"),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("sideways"), "{e:#}");
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
    fn host_steps_parse_and_their_mistakes_are_named() {
        let ok = "description = \"x\"\nforwards = [7000]\n[[host]]\nname = \"client\"\nwhen = \"go\"\nrun = \"true\"";
        let s = Scenario::parse(ok, Path::new("a.toml")).unwrap();
        assert_eq!(s.forwards, [7000]);
        assert_eq!(s.host[0].when, "go");
        let bad_when = ok.replace("when = \"go\"", "when = \"go now\"");
        let e = Scenario::parse(&bad_when, Path::new("a.toml")).unwrap_err();
        assert!(format!("{e:#}").contains("must be a word"), "{e:#}");
        let twice = format!("{ok}\n[[host]]\nname = \"client\"\nwhen = \"go\"\nrun = \"true\"");
        let e = Scenario::parse(&twice, Path::new("a.toml")).unwrap_err();
        assert!(format!("{e:#}").contains("two host steps"), "{e:#}");
    }

    #[test]
    fn an_update_from_the_host_switches_kernels_without_an_update_table() {
        let ok = "description = \"x\"\nguest = \"server\"\nssh = true\nforwards = [22]\nupdate_from_host = \"rollout\"\n[[host]]\nname = \"ansible\"\nwhen = \"rollout\"\nrun = \"true\"";
        let s = Scenario::parse(ok, Path::new("a.toml")).unwrap();
        assert!(s.ssh);
        assert!(s.expects_kernel_switch() && s.expects_next_boot());
        assert!(s
            .guest_script("1", "2")
            .contains("LAB_UPDATE_FROM_HOST='rollout'\n"));
        let parse_err = |text: &str| {
            format!(
                "{:#}",
                Scenario::parse(text, Path::new("a.toml")).unwrap_err()
            )
        };
        let e = parse_err(&ok.replace("when = \"rollout\"", "when = \"other\""));
        assert!(e.contains("no [[host]] step has when = \"rollout\""), "{e}");
        let e = parse_err(&format!("{ok}\n[[update]]\nexpect = \"success\""));
        assert!(e.contains("has no [[update]]"), "{e}");
        let e = parse_err(&ok.replace("guest = \"server\"\n", ""));
        assert!(e.contains("server guest keys"), "{e}");
        // Without the key, the guest runs its own updates.
        let plain = Scenario::parse("description = \"x\"", Path::new("a.toml")).unwrap();
        assert!(plain
            .guest_script("1", "2")
            .contains("LAB_UPDATE_FROM_HOST=''\n"));
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

    const POWER_CUT: &str = r#"
description = "cut"
power_cut = true
expect_restore = "abandoned"
[[update]]
expect = "failure"
[[update]]
expect = "power_cut"
"#;

    #[test]
    fn a_power_cut_scenario_parses() {
        let s = Scenario::parse(POWER_CUT, Path::new("/x/cut.toml")).unwrap();
        assert!(s.power_cut);
        assert_eq!(s.expect_restore, Settle::Abandoned);
        assert!(!s.expects_kernel_switch());
        assert!(s.expects_next_boot());
        let script = s.guest_script("6.1", "6.12");
        assert!(
            script.contains("lab_update_expect_2() { echo power_cut; }"),
            "{script}"
        );
        let plain = Scenario::parse(GOOD, Path::new("/x/pids.toml")).unwrap();
        assert!(!plain.power_cut);
        assert_eq!(plain.expect_restore, Settle::Success);
    }

    #[test]
    fn power_cut_mistakes_are_named() {
        let err = |text: &str| {
            format!(
                "{:#}",
                Scenario::parse(text, Path::new("a.toml")).unwrap_err()
            )
        };
        let e = err("description = \"x\"\n[[update]]\nexpect = \"power_cut\"\n");
        assert!(e.contains("set power_cut = true"), "{e}");
        let e = err("description = \"x\"\npower_cut = true\n[[update]]\nexpect = \"success\"\n");
        assert!(e.contains("cold boot of the old kernel"), "{e}");
        let e = err(
            "description = \"x\"\npower_cut = true\n[[update]]\nexpect = \"power_cut\"\n[[update]]\nexpect = \"failure\"\n",
        );
        assert!(e.contains("must be the last update"), "{e}");
        let e = err("description = \"x\"\n[[update]]\nexpect = \"success\"\nexit_code = 0\n");
        assert!(e.contains("no exit_code to check"), "{e}");
        let e = err("description = \"x\"\n[[update]]\nexpect = \"failure\"\nexit_code = 0\n");
        assert!(e.contains("exit_code = 0"), "{e}");
        let e = err("description = \"x\"\nexpect_restore = \"abandoned\"\n");
        assert!(e.contains("needs power_cut = true"), "{e}");
        let e = err("description = \"x\"\n[[update]]\nexpect = \"success\"\npower_cut = true\n");
        assert!(e.contains("move it above the first"), "{e}");
    }

    #[test]
    fn restore_expectations_name_their_phases() {
        assert_eq!(Settle::Success.phases(), ["restored"]);
        assert!(Settle::Failure.phases().contains(&"restore_failed"));
        assert!(Settle::Failure.phases().contains(&"failed"));
        assert_eq!(Settle::Abandoned.phases(), ["abandoned"]);
    }

    #[test]
    fn quoting_survives_single_quotes() {
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("echo {}", quote("it's $HOME"))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "it's $HOME");
    }

    /// `! cmd` asserts nothing in the middle of a `set -e` script: an inverted status is exempt
    /// from errexit, so only the script's last command may be one (it gives the exit status).
    #[test]
    fn no_shipped_script_inverts_a_command_it_does_not_judge() {
        let mut found = Vec::new();
        for s in list(&builtin_dir()).unwrap() {
            let scripts = [&s.setup, &s.before_restore]
                .into_iter()
                .chain(s.check.iter().chain(&s.host_check).map(|c| &c.run));
            for script in scripts {
                let lines: Vec<&str> = script
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .collect();
                let body = lines.split_last().map_or(&[][..], |(_, b)| b);
                found.extend(
                    body.iter()
                        .filter(|l| l.starts_with("! ") && !l.contains("||"))
                        .map(|l| format!("{}: {l}", s.name)),
                );
            }
        }
        assert!(
            found.is_empty(),
            "use `if cmd; then exit 1; fi` (or `! cmd || exit 1`) instead:\n{}",
            found.join("\n")
        );
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
