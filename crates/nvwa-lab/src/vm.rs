//! Running a lab guest in QEMU (TCG: no KVM is needed) and reading what it says.
//!
//! The serial console goes to our stdout pipe; every line is stamped with the host's monotonic
//! clock (so phase durations are measured across the kexec by one clock), appended to the serial
//! log, and classified: `NVWA-LAB {json}` lines are structured events, `NVWA-LAB-OUT tag: text`
//! lines are step output, everything else is console noise kept only in the log.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const QEMU: &str = "qemu-system-x86_64";
/// Persistent memory for the images: 768 MiB at 2 GiB in a 3 GiB guest, clear of the BIOS area
/// at the top (a region that crosses it is "misaligned" for nd_pmem). It must not overlap the
/// initramfs, which QEMU loads just below 2 GiB (the bzImage's initrd_addr_max).
pub const MEMMAP: &str = "memmap=768M!2G";
/// The persistent memory of [`MEMMAP`], in MiB.
pub const DEFAULT_PMEM_MIB: u32 = 768;

/// TCG's translation cache, in MiB (QEMU 7.2's default is 1 GiB).
///
/// QEMU keeps, for every guest page it translated code from, the list of its translated blocks,
/// and every guest write to such a page walks that list. A block is keyed by its virtual address,
/// so each run of a position-independent program (criu, nvwa; randomised load addresses) can add
/// blocks for the same library and program pages (the likeliest source of the long lists); with
/// 1 GiB, nothing drops them before the cache fills. After an old boot that ran many of them,
/// the kexec'd kernel, reusing those pages as data, was slowed down by QEMU walking the lists:
/// under `perf`, QEMU spent over 60 % of its time in that walk (`page_collection_lock` and the
/// loop around it), and ext4's module load took 5.4 s, 9.2 s and 46.7 s, or criu's restore of a
/// 4 MiB process 38.6 s, where they usually take 0.2 s and 0.9 s. With a 64 MiB cache, which
/// QEMU empties whenever it fills, the same experiment's new kernel spent no time there (ext4
/// 0.18 s, restore 0.85 s). An emulator artefact: a real CPU has no such lists.
pub const TB_CACHE_MIB: u32 = 64;

/// How TCG runs the guest's vCPUs.
///
/// The lab uses `Single`. Under `Multi`, a vCPU can go on executing a translated block of kernel
/// text that another vCPU is patching: one full lab run failed because the kexec'd 6.12 kernel
/// hit a stale `int3` of a static-key update (`Oops: int3` in `sched_clock_cpu`, 2.8 s into its
/// boot), an emulator artefact. With one host thread, a patch and the invalidation of the
/// blocks translated from that text happen before any other vCPU runs again, and the guest still
/// has two CPUs. Measured on the `pids` scenario (5 runs each, on a shared 2-core host): wall
/// time median 43.1 s with Multi, 42.1 s with Single, 39.6 s with `-smp 1`; QEMU's CPU time was
/// 41–49 s, 33–41 s and 34–40 s: one thread costs nothing here, and saves CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcgThreads {
    /// One host thread per vCPU (QEMU's default for x86 on x86).
    Multi,
    /// Every vCPU in one host thread, round robin.
    Single,
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub tcg_threads: TcgThreads,
    /// Guest RAM backed by this file (shared mapping) instead of anonymous memory: what the guest
    /// wrote stays in the file when QEMU exits, so a second QEMU started with the same file
    /// cold-boots the same machine with its persistent memory (the memmap region) intact.
    pub ram_file: Option<PathBuf>,
    /// Appended to (never truncated): the boots of one scenario share one serial log.
    pub serial_log: PathBuf,
    pub timeout: Duration,
    /// (host port, guest port) TCP forwards on 127.0.0.1.
    pub forwards: Vec<(u16, u16)>,
    /// QEMU `-drive` specifications, in order (the first virtio one is /dev/vda).
    pub drives: Vec<String>,
    /// Where QEMU records the guest's network traffic (pcap), if anywhere.
    pub pcap: Option<PathBuf>,
}

impl VmSpec {
    pub fn new(kernel: &Path, initrd: &Path, serial_log: &Path, timeout: Duration) -> VmSpec {
        VmSpec {
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            append: format!("console=ttyS0 {MEMMAP} panic=-1 quiet loglevel=3"),
            memory_mib: 3072,
            cpus: 2,
            tcg_threads: TcgThreads::Single,
            ram_file: None,
            serial_log: serial_log.to_path_buf(),
            timeout,
            forwards: Vec::new(),
            drives: Vec::new(),
            pcap: None,
        }
    }

    /// Gives the guest `pmem_mib` of persistent memory (more than [`MEMMAP`]'s, for images
    /// larger than 768 MiB): the region goes above 4 GiB, where QEMU puts the RAM beyond the
    /// first 3 GiB (the gap below 4 GiB is for devices), and the guest keeps 3 GiB of RAM.
    pub fn set_pmem(&mut self, pmem_mib: u32) {
        if pmem_mib <= DEFAULT_PMEM_MIB {
            return;
        }
        self.memory_mib = 3072 + pmem_mib;
        self.append = self
            .append
            .replace(MEMMAP, &format!("memmap={pmem_mib}M!4G"));
    }

    fn args(&self) -> Vec<String> {
        let mut netdev = "user,id=n0".to_string();
        for (host, guest) in &self.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        let threads = match self.tcg_threads {
            TcgThreads::Multi => "multi",
            TcgThreads::Single => "single",
        };
        let accel = format!("tcg,thread={threads},tb-size={TB_CACHE_MIB}");
        let mut args: Vec<String> = vec![
            "-accel".into(),
            accel,
            "-cpu".into(),
            "max".into(),
            "-m".into(),
            format!("{}M", self.memory_mib),
        ];
        if let Some(ram) = &self.ram_file {
            // share=on: the guest's writes reach the file, not a private copy of it.
            args.push("-object".into());
            args.push(format!(
                "memory-backend-file,id=ram,size={}M,mem-path={},share=on",
                self.memory_mib,
                // QEMU's option syntax: a comma in a value is written twice.
                ram.display().to_string().replace(',', ",,")
            ));
            args.push("-machine".into());
            args.push("memory-backend=ram".into());
        }
        if let Some(pcap) = &self.pcap {
            // QEMU's filter-dump sees every frame between the guest's NIC and its user network,
            // across the kexec (QEMU keeps running).
            args.push("-object".into());
            args.push(format!(
                "filter-dump,id=pcap0,netdev=n0,file={}",
                pcap.display().to_string().replace(',', ",,")
            ));
        }
        for d in &self.drives {
            args.push("-drive".into());
            args.push(d.clone());
        }
        args.into_iter()
            .chain([
                "-smp".into(),
                self.cpus.to_string(),
                "-kernel".into(),
                self.kernel.display().to_string(),
                "-initrd".into(),
                self.initrd.display().to_string(),
                "-append".into(),
                self.append.clone(),
                "-netdev".into(),
                netdev,
                "-device".into(),
                // No option ROM: iPXE is not needed (we boot with -kernel) nor always installed.
                "virtio-net-pci,netdev=n0,romfile=".into(),
                "-display".into(),
                "none".into(),
                "-no-reboot".into(),
            ])
            .collect()
    }
}

#[derive(Debug, Clone)]
pub enum Line {
    Event(serde_json::Value),
    Output { tag: String, text: String },
    Console(String),
}

#[derive(Debug, Clone)]
pub struct Stamped {
    pub at_ms: u64,
    pub line: Line,
}

#[derive(Debug)]
pub struct Outcome {
    pub lines: Vec<Stamped>,
    pub timed_out: bool,
}

pub fn classify(raw: &str) -> Line {
    let raw = raw.trim_end_matches(['\r', '\n']);
    if let Some(i) = raw.find("NVWA-LAB-OUT ") {
        let rest = &raw[i + "NVWA-LAB-OUT ".len()..];
        if let Some((tag, text)) = rest.split_once(": ") {
            return Line::Output {
                tag: tag.to_string(),
                text: text.to_string(),
            };
        }
        if let Some(tag) = rest.strip_suffix(':') {
            return Line::Output {
                tag: tag.to_string(),
                text: String::new(),
            };
        }
    }
    if let Some(i) = raw.find("NVWA-LAB {") {
        if let Ok(v) = serde_json::from_str(&raw[i + "NVWA-LAB ".len()..]) {
            return Line::Event(v);
        }
    }
    Line::Console(raw.to_string())
}

/// Fails with an install hint when QEMU is missing.
pub fn require_qemu() -> Result<()> {
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("{QEMU} is not installed: run `apt-get install qemu-system-x86` (the lab needs it to boot its guest kernels)"),
    }
}

/// Boots the guest and collects its lines until it powers off or the timeout strikes.
/// Lines are stamped in milliseconds since `origin`, so that several boots of one scenario share
/// one clock. `on_line` sees each line as it arrives (for live output).
pub fn run(spec: &VmSpec, origin: Instant, on_line: &mut dyn FnMut(&Stamped)) -> Result<Outcome> {
    require_qemu()?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.serial_log)
        .with_context(|| format!("cannot open {}", spec.serial_log.display()))?;
    let start = Instant::now();
    let mut child = Command::new(QEMU)
        .args(spec.args())
        .args(["-serial", "stdio", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {QEMU}"))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<(u64, String)>();
    let tx_err = tx.clone();
    let since = move || origin.elapsed().as_millis() as u64;
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r
            .read_until(b'\n', &mut buf)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            if tx
                .send((since(), String::from_utf8_lossy(&buf).into_owned()))
                .is_err()
            {
                break;
            }
            buf.clear();
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx_err.send((since(), format!("qemu: {line}\n")));
        }
    });

    let mut lines = Vec::new();
    let deadline = start + spec.timeout;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok((at_ms, raw)) => {
                let _ = write!(log, "[{:>9.3}] {}", at_ms as f64 / 1000.0, raw);
                let stamped = Stamped {
                    at_ms,
                    line: classify(&raw),
                };
                on_line(&stamped);
                lines.push(stamped);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    timed_out = true;
                    let _ = child.kill();
                    let _ = writeln!(log, "nvwa-lab: timed out after {:?}", spec.timeout);
                    break;
                }
            }
        }
    }
    let _ = child.wait();
    Ok(Outcome { lines, timed_out })
}

/// Boots the guest with the console on this terminal, for an operator to poke around.
pub fn run_interactive(spec: &VmSpec) -> Result<()> {
    require_qemu()?;
    let status = Command::new(QEMU)
        .args(spec.args())
        .args(["-serial", "mon:stdio"])
        .status()
        .with_context(|| format!("cannot start {QEMU}"))?;
    if !status.success() {
        bail!("{QEMU} exited with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_classified() {
        match classify("NVWA-LAB {\"event\":\"boot\",\"kernel\":\"6.1\"}\r\n") {
            Line::Event(v) => assert_eq!(v["kernel"], "6.1"),
            other => panic!("{other:?}"),
        }
        match classify("[  1.2] junk NVWA-LAB-OUT check1: pid 7 ok\n") {
            Line::Output { tag, text } => {
                assert_eq!(tag, "check1");
                assert_eq!(text, "pid 7 ok");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(classify("NVWA-LAB {broken"), Line::Console(_)));
        assert!(matches!(
            classify("[    0.000000] Linux version"),
            Line::Console(_)
        ));
    }

    #[test]
    fn forwards_become_hostfwd_rules() {
        let mut spec = VmSpec::new(
            Path::new("k"),
            Path::new("i"),
            Path::new("l"),
            Duration::from_secs(1),
        );
        spec.forwards.push((8080, 80));
        let args = spec.args().join(" ");
        assert!(args.contains("hostfwd=tcp:127.0.0.1:8080-:80"), "{args}");
        assert!(
            args.contains("-accel tcg,thread=single,tb-size=64 -cpu max"),
            "{args}"
        );
        assert!(args.contains("-smp 2"), "{args}");
        assert!(args.contains(MEMMAP), "{args}");
        assert!(!args.contains("memory-backend"), "{args}");
    }

    #[test]
    fn a_larger_persistent_memory_goes_above_4_gib() {
        let mut spec = VmSpec::new(
            Path::new("k"),
            Path::new("i"),
            Path::new("l"),
            Duration::from_secs(1),
        );
        spec.set_pmem(DEFAULT_PMEM_MIB);
        assert_eq!(spec.memory_mib, 3072);
        assert!(spec.append.contains(MEMMAP), "{}", spec.append);
        spec.set_pmem(1536);
        assert_eq!(spec.memory_mib, 3072 + 1536);
        assert!(spec.append.contains("memmap=1536M!4G"), "{}", spec.append);
        assert!(!spec.append.contains(MEMMAP), "{}", spec.append);
    }

    #[test]
    fn a_ram_file_backs_the_guest_memory_shared() {
        let mut spec = VmSpec::new(
            Path::new("k"),
            Path::new("i"),
            Path::new("l"),
            Duration::from_secs(1),
        );
        spec.ram_file = Some(PathBuf::from("/runs/a,b/ram"));
        let args = spec.args();
        let i = args.iter().position(|a| a == "-object").expect("-object");
        assert_eq!(
            args[i + 1],
            "memory-backend-file,id=ram,size=3072M,mem-path=/runs/a,,b/ram,share=on"
        );
        let m = args.iter().position(|a| a == "-machine").expect("-machine");
        assert_eq!(args[m + 1], "memory-backend=ram");
        let mem = args.iter().position(|a| a == "-m").expect("-m");
        assert_eq!(args[mem + 1], "3072M");
    }
}
