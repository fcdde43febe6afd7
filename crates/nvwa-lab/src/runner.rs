//! Running scenarios: build the project's binaries, build both guest images, boot the old kernel
//! in QEMU, and judge what the guest reports.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::apt;
use crate::guest::{self, Binaries};
use crate::host::{self, HostEnv, HostSteps};
use crate::prepare::{self, Ingredients, KernelBits};
use crate::report::{self, ScenarioResult};
use crate::scenario::{Guest, Scenario};
use crate::server_guest::{self, ServerGuest};
use crate::vm::{self, Line, Outcome, Stamped, VmSpec};

/// On the kernel command line of the cold boot after a power cut: init.sh takes the "after
/// restart" path (see guest/init.sh).
pub const COLD_BOOT_FLAG: &str = "nvwa_lab.boot=cold";

/// Whether the guest cut its power on purpose (`lab_power_cut` said so first) and did not
/// finish afterwards.
fn cut_power(o: &Outcome) -> bool {
    let mut cut = false;
    for l in &o.lines {
        if let Line::Event(v) = &l.line {
            match v["event"].as_str() {
                Some("power-cut") => cut = true,
                Some("finish") => cut = false,
                _ => {}
            }
        }
    }
    cut
}

/// The file behind the guest's RAM; deleted when dropped (it is as large as the guest's memory,
/// sparse where the guest never wrote).
struct RamFile {
    path: PathBuf,
}

impl RamFile {
    fn new(path: PathBuf) -> RamFile {
        // A file left by an earlier run would hand its memory to this one.
        let _ = std::fs::remove_file(&path);
        RamFile { path }
    }

    /// Disk space the file takes (allocated blocks, not its length).
    fn disk_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).map_or(0, |m| m.blocks() * 512)
    }
}

impl Drop for RamFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An exclusive flock on a file, released when dropped (or when the process dies).
struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    fn take(path: &Path, name: &str) -> Result<RunLock> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open the run lock {}", path.display()))?;
        let fd = file.as_raw_fd();
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!(
                "nvwa-lab: another nvwa-lab is running scenario {name} ({} is locked); waiting for it",
                path.display()
            );
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                bail!(
                    "cannot lock {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(RunLock { _file: file })
    }
}

fn writeln_log(log: &Path, line: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().append(true).open(log)?;
    writeln!(f, "{line}")
}

pub struct Lab {
    pub ingredients: Ingredients,
    /// Built when a scenario runs in the server guest.
    pub server: Option<ServerGuest>,
    pub bins: Binaries,
    pub runs: PathBuf,
}

/// What a scenario boots from.
enum Boot {
    /// The busybox guest: the old kernel's initramfs (the new one is inside it).
    Busybox { initrd: PathBuf },
    /// The server guest: its cached disk (behind a fresh overlay per attempt) and this run's
    /// lab disk.
    Server { lab_disk: PathBuf },
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
        let server = if scenarios.iter().any(|s| s.guest == Guest::Server) {
            let deb = server_guest::package_from_env()?;
            server_guest::check_package_binary(&deb, &bins.nvwa)?;
            let base = server_guest::prepare(&prepare::cache_dir(), false)?;
            Some(server_guest::with_package(&base, &deb)?)
        } else {
            None
        };
        let runs = ingredients.cache.join("runs");
        std::fs::create_dir_all(&runs)?;
        Ok(Lab {
            ingredients,
            server,
            bins,
            runs,
        })
    }

    /// A fresh run directory for `name`, held (flock) until the returned lock is dropped: the
    /// cache, runs included, is shared by every checkout on the machine, and two runs of one
    /// scenario would otherwise delete each other's images and logs.
    fn run_dir(&self, name: &str) -> Result<(PathBuf, RunLock)> {
        let lock = RunLock::take(&self.runs.join(format!("{name}.lock")), name)?;
        let dir = self.runs.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok((dir, lock))
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

    /// Runs a scenario. A run that fails after a guest kernel oopsed or panicked before /init
    /// (an emulator artefact, see `oops`) is run once more; the result says so in `reran_after`,
    /// and the first run's logs are kept as serial-1.log and events-1.json.
    pub fn run(&self, s: &Scenario, live: &mut dyn FnMut(&Stamped)) -> Result<ScenarioResult> {
        let (dir, _lock) = self.run_dir(&s.name)?;
        let boot = match s.guest {
            Guest::Busybox => Boot::Busybox {
                initrd: self.build_images(s, &dir)?.0,
            },
            Guest::Server => {
                let (old, new) = self.server_pair(s)?;
                let script = s.guest_script(old.release(), new.release());
                Boot::Server {
                    lab_disk: server_guest::lab_disk(&dir, &self.bins, s, &script)?,
                }
            }
        };
        let first = self.attempt(s, &dir, &boot, live)?;
        let Some(oops) = first.early_oops.clone().filter(|_| !first.passed) else {
            return Ok(first);
        };
        eprintln!(
            "nvwa-lab: {}: the guest kernel died before /init ({oops}); running the scenario once more",
            s.name
        );
        for (from, to) in [
            ("serial.log", "serial-1.log"),
            ("events.json", "events-1.json"),
        ] {
            std::fs::rename(dir.join(from), dir.join(to)).with_context(|| {
                format!("cannot keep the first run's {from} in {}", dir.display())
            })?;
        }
        let mut second = self.attempt(s, &dir, &boot, live)?;
        second.reran_after = Some(oops);
        Ok(second)
    }

    /// The server guest's (old, new) kernels for `s`.
    fn server_pair(&self, s: &Scenario) -> Result<(&apt::Kernel, &apt::Kernel)> {
        let g = self
            .server
            .as_ref()
            .context("the server guest was not prepared")?;
        Ok(g.pair(s.kernel_pair().unwrap_or_default()))
    }

    /// The server guest's machine: its old kernel and initramfs-tools' initrd from the guest's
    /// /boot, the root disk as a fresh overlay of the cached image, the lab disk read-only.
    fn server_spec(&self, s: &Scenario, dir: &Path, lab_disk: &Path) -> Result<VmSpec> {
        let g = self
            .server
            .as_ref()
            .context("the server guest was not prepared")?;
        let (old, _) = self.server_pair(s)?;
        let overlay = dir.join("root.qcow2");
        server_guest::overlay(&g.disk, &overlay)?;
        let (vmlinuz, initrd) = g.boot_files(old);
        let mut spec = VmSpec::new(
            &vmlinuz,
            &initrd,
            &dir.join("serial.log"),
            Duration::from_secs(s.timeout_s),
        );
        spec.append = "console=ttyS0 root=/dev/vda rw panic=-1 loglevel=3".into();
        // QEMU's option syntax: a comma in a value is written twice.
        let q = |p: &Path| p.display().to_string().replace(',', ",,");
        spec.drives = vec![
            format!("file={},format=qcow2,if=virtio", q(&overlay)),
            format!("file={},format=raw,if=virtio,readonly=on", q(lab_disk)),
        ];
        Ok(spec)
    }

    /// One run of a scenario: one boot, or two when the scenario cuts the power.
    fn attempt(
        &self,
        s: &Scenario,
        dir: &Path,
        boot: &Boot,
        live: &mut dyn FnMut(&Stamped),
    ) -> Result<ScenarioResult> {
        let log = dir.join("serial.log");
        let origin = Instant::now();
        let deadline = origin + Duration::from_secs(s.timeout_s);
        let (mut spec, new_version) = match boot {
            Boot::Busybox { initrd } => (
                VmSpec::new(
                    &self.ingredients.old.vmlinuz,
                    initrd,
                    &log,
                    Duration::from_secs(s.timeout_s),
                ),
                self.ingredients.new.version.clone(),
            ),
            Boot::Server { lab_disk } => (
                self.server_spec(s, dir, lab_disk)?,
                self.server_pair(s)?.1.release().to_string(),
            ),
        };
        if let Some(p) = s.pmem_mib {
            spec.set_pmem(p);
        }
        spec.forwards = s
            .forwards
            .iter()
            .map(|&guest| {
                host::free_port()
                    .map(|h| (h, guest))
                    .context("cannot find a free host port for a forward")
            })
            .collect::<Result<_>>()?;
        if std::env::var_os("NVWA_LAB_PCAP").is_some() {
            spec.pcap = Some(dir.join("guest-net.pcap"));
        }
        // A client of an earlier run of this scenario must neither speak for this one nor stop it.
        for stale in [host::CLIENT_RESULT, host::CLIENT_STOP] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let mut steps = HostSteps::new(
            &s.host,
            HostEnv {
                run_dir: dir.to_path_buf(),
                cwd: s.path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                ports: spec.forwards.iter().map(|&(h, g)| (g, h)).collect(),
                bin_dir: self.bins.workload.parent().map(Path::to_path_buf),
            },
        );
        let mut live = |l: &Stamped| {
            steps.on_line(l);
            live(l)
        };
        // Only a scenario that cuts the power needs its RAM to outlive QEMU.
        let ram = s.power_cut.then(|| RamFile::new(dir.join("ram")));
        spec.ram_file = ram.as_ref().map(|r| r.path.clone());
        let mut outcome = vm::run(&spec, origin, &mut live)?;
        if s.power_cut && !outcome.timed_out && cut_power(&outcome) {
            // The same machine powered on again: same kernel, initramfs and RAM file; the flag
            // only tells init.sh to take the "after restart" path instead of setting up anew.
            spec.append.push_str(&format!(" {COLD_BOOT_FLAG}"));
            spec.timeout = deadline.saturating_duration_since(Instant::now());
            let second = vm::run(&spec, origin, &mut live)?;
            outcome.lines.extend(second.lines);
            outcome.timed_out = second.timed_out;
        }
        if let Some(r) = &ram {
            let used = r.disk_bytes();
            let _ = writeln_log(
                &log,
                &format!(
                    "nvwa-lab: the RAM file {} used {} MiB of disk (sparse); deleted",
                    r.path.display(),
                    used / (1024 * 1024)
                ),
            );
        }
        drop(ram);
        let mut result = report::judge(s, &new_version, &outcome, log.clone());
        let host_failures = steps.finish(deadline);
        result.passed &= host_failures.is_empty();
        result.failures.extend(host_failures);
        result.timeline_ms.extend(host::client_timeline(dir));
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

    /// Boots the old kernel of the busybox scenario `s` once more, from the images its last
    /// `run` left, with `flag` added to the command line (the bench's bare kexec: init.sh acts on
    /// the flag). Its serial log is `serial-NAME.log` in the run's directory, NAME being the
    /// flag's value.
    pub fn boot_again(&self, s: &Scenario, flag: &str) -> Result<(Outcome, PathBuf)> {
        let dir = self.runs.join(&s.name);
        let _lock = RunLock::take(&self.runs.join(format!("{}.lock", s.name)), &s.name)?;
        let initrd = dir.join(format!("initramfs-{}.img", self.ingredients.old.version));
        if s.guest != Guest::Busybox || !initrd.exists() {
            bail!(
                "no busybox guest image of scenario {} in {}: run it first",
                s.name,
                dir.display()
            );
        }
        let log = dir.join(format!(
            "serial-{}.log",
            flag.rsplit('=').next().unwrap_or(flag)
        ));
        let _ = std::fs::remove_file(&log);
        let mut spec = VmSpec::new(
            &self.ingredients.old.vmlinuz,
            &initrd,
            &log,
            Duration::from_secs(s.timeout_s),
        );
        if let Some(p) = s.pmem_mib {
            spec.set_pmem(p);
        }
        spec.append.push_str(&format!(" {flag}"));
        Ok((vm::run(&spec, Instant::now(), &mut |_| {})?, log))
    }

    /// Boots a guest with a console on this terminal.
    pub fn shell(&self, s: &Scenario, kernel: &KernelBits) -> Result<()> {
        if s.guest == Guest::Server {
            bail!("`nvwa-lab shell` boots the busybox guest only; scenario {} runs in the server guest", s.name);
        }
        let (dir, _lock) = self.run_dir(&format!("shell-{}", s.name))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_lock_excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = RunLock::take(&path, "x").unwrap();
        let probe = std::fs::File::open(&path).unwrap();
        let try_lock = || {
            use std::os::fd::AsRawFd;
            let rc = unsafe { libc::flock(probe.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                unsafe { libc::flock(probe.as_raw_fd(), libc::LOCK_UN) };
            }
            rc == 0
        };
        assert!(!try_lock(), "the lock is held");
        drop(first);
        assert!(try_lock(), "the lock is released");
    }

    #[test]
    fn a_deliberate_power_cut_is_told_from_a_finished_boot() {
        let o = |raw: &[&str]| Outcome {
            lines: raw
                .iter()
                .map(|r| Stamped {
                    at_ms: 0,
                    line: vm::classify(r),
                })
                .collect(),
            timed_out: false,
        };
        assert!(cut_power(&o(&[
            r#"NVWA-LAB {"event":"init"}"#,
            r#"[ 9.1] NVWA-LAB {"event":"power-cut","by":"x"}"#,
            "[ 9.2] reboot: Power down",
        ])));
        assert!(!cut_power(&o(&[
            r#"NVWA-LAB {"event":"power-cut","by":"x"}"#,
            r#"NVWA-LAB {"event":"finish","kernel":"6.1","failed":0}"#,
        ])));
        assert!(!cut_power(&o(&[r#"NVWA-LAB {"event":"finish"}"#])));
    }

    #[test]
    fn the_ram_file_is_deleted_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        std::fs::write(&path, b"left by an earlier run").unwrap();
        let ram = RamFile::new(path.clone());
        assert!(!path.exists(), "an old RAM file is removed first");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        assert!(ram.disk_bytes() >= 8192);
        drop(ram);
        assert!(!path.exists());
    }
}
