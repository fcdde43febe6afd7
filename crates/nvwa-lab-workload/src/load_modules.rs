//! `nvwa-lab-workload load-modules LIST`: loads the kernel modules named in LIST (one path a line,
//! dependencies first) with finit_module(2), all from this one process.
//!
//! The lab's guests used to run busybox `insmod` once per module: 23 process starts under TCG
//! before the new kernel could mount its images, all counted in the bench's "nvwa start". It also
//! names each module that was slow to load, so that a slow boot says where it went in the serial
//! log (ext4's load once took 46 s: see `TB_CACHE_MIB` in nvwa-lab's vm.rs).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// A module whose load took longer than this is named in the output, with its time.
const SLOW: Duration = Duration::from_millis(250);

pub fn run(args: &[String]) -> Result<(), String> {
    let [list] = args else {
        return Err("usage: nvwa-lab-workload load-modules LIST".into());
    };
    let text = std::fs::read_to_string(list).map_err(|e| format!("cannot read {list}: {e}"))?;
    let start = Instant::now();
    let mut failed = 0;
    let mut count = 0;
    for path in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        count += 1;
        let began = Instant::now();
        if let Err(e) = load(path) {
            failed += 1;
            println!("{path}: {e}");
        }
        let took = began.elapsed();
        if took >= SLOW {
            println!("slow: {path} took {} ms", took.as_millis());
        }
    }
    println!(
        "{count} modules in {} ms, {failed} failed",
        start.elapsed().as_millis()
    );
    if failed > 0 {
        return Err(format!("{failed} of the modules in {list} did not load"));
    }
    Ok(())
}

/// Loads one module file; one that is loaded already counts as loaded.
fn load(path: &str) -> Result<(), String> {
    let file = File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    // SAFETY: finit_module reads the open file and an empty, NUL-terminated parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), 0) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(format!("the kernel refused it: {err}"))
}
