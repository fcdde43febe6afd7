//! Running scenarios: build the project's binaries, build both guest images, boot the old kernel
//! in QEMU, and judge what the guest reports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::guest::{self, Binaries};
use crate::prepare::{self, Ingredients, KernelBits};
use crate::report::{self, ScenarioResult};
use crate::scenario::Scenario;
use crate::vm::{self, Stamped, VmSpec};

pub struct Lab {
    pub ingredients: Ingredients,
    pub bins: Binaries,
    pub runs: PathBuf,
}

/// Builds `nvwa` and the workload from this checkout, unless NVWA_LAB_BIN_DIR names a directory
/// that already has them (e.g. a packaged build).
pub fn build_binaries() -> Result<Binaries> {
    if let Some(dir) = std::env::var_os("NVWA_LAB_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return Ok(Binaries::in_dir(&dir));
    }
    let root = crate::workspace_root();
    eprintln!("nvwa-lab: building nvwa from {}", root.display());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "nvwa",
            "-p",
            "nvwa-lab-workload",
        ])
        .status()
        .context("cannot run cargo to build nvwa for the guest")?;
    if !status.success() {
        bail!("building nvwa for the guest failed (cargo build --release -p nvwa)");
    }
    Ok(Binaries::in_dir(&root.join("target/release")))
}

impl Lab {
    pub fn open(scenarios: &[Scenario]) -> Result<Lab> {
        vm::require_qemu()?;
        let mut extra: Vec<String> = scenarios.iter().flat_map(|s| s.packages.clone()).collect();
        extra.sort();
        extra.dedup();
        let ingredients = prepare::prepare(&prepare::cache_dir(), &extra)?;
        let bins = build_binaries()?;
        let runs = ingredients.cache.join("runs");
        std::fs::create_dir_all(&runs)?;
        Ok(Lab {
            ingredients,
            bins,
            runs,
        })
    }

    fn run_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.runs.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// The new kernel's image first: the old guest carries it in /boot, as a distribution
    /// would after installing the new kernel package.
    pub fn build_images(&self, s: &Scenario, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let ing = &self.ingredients;
        let inner = dir.join(format!("initramfs-{}.img", ing.new.version));
        guest::image_for(ing, &self.bins, &ing.new, s)?.write_cpio(&inner)?;
        let mut outer = guest::image_for(ing, &self.bins, &ing.old, s)?;
        outer.add_file(
            &format!("/boot/vmlinuz-{}", ing.new.version),
            &ing.new.vmlinuz,
            0o644,
        )?;
        outer.add_file(
            &format!("/boot/initramfs-{}.img", ing.new.version),
            &inner,
            0o644,
        )?;
        let outer_path = dir.join(format!("initramfs-{}.img", ing.old.version));
        outer.write_cpio(&outer_path)?;
        Ok((outer_path, inner))
    }

    pub fn run(&self, s: &Scenario, live: &mut dyn FnMut(&Stamped)) -> Result<ScenarioResult> {
        let dir = self.run_dir(&s.name)?;
        let (outer, _) = self.build_images(s, &dir)?;
        let log = dir.join("serial.log");
        let mut spec = VmSpec::new(
            &self.ingredients.old.vmlinuz,
            &outer,
            &log,
            Duration::from_secs(s.timeout_s),
        );
        spec.forwards = s.forwards.iter().map(|f| (f.host, f.guest)).collect();
        let outcome = vm::run(&spec, live)?;
        let mut result = report::judge(s, &self.ingredients.new.version, &outcome, log.clone());
        let events = dir.join("events.json");
        let all: Vec<_> = outcome
            .lines
            .iter()
            .filter_map(|l| match &l.line {
                vm::Line::Event(v) => Some(serde_json::json!({"at_ms": l.at_ms, "event": v})),
                _ => None,
            })
            .collect();
        std::fs::write(&events, serde_json::to_vec_pretty(&all)?)?;
        for c in &s.host_check {
            let out = Command::new("sh")
                .arg("-c")
                .arg(&c.run)
                .env("LAB_SERIAL_LOG", &log)
                .env("LAB_EVENTS", &events)
                .current_dir(s.path.parent().unwrap_or(Path::new(".")))
                .output()
                .with_context(|| format!("cannot run host check {}", c.name))?;
            if !out.status.success() {
                result.failures.push(format!(
                    "host check failed: {}\n{}{}",
                    c.name,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
                result.passed = false;
            }
        }
        Ok(result)
    }

    /// Boots a guest with a console on this terminal.
    pub fn shell(&self, s: &Scenario, kernel: &KernelBits) -> Result<()> {
        let dir = self.run_dir(&format!("shell-{}", s.name))?;
        let (outer, inner) = self.build_images(s, &dir)?;
        let initrd = if kernel.version == self.ingredients.old.version {
            outer
        } else {
            inner
        };
        let mut spec = VmSpec::new(
            &kernel.vmlinuz,
            &initrd,
            &dir.join("serial.log"),
            Duration::MAX,
        );
        spec.append.push_str(" nvwa_lab.shell=1");
        vm::run_interactive(&spec)
    }
}
