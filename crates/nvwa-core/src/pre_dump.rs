//! Pre-dump (`pre_dump: true` in nvwa-restore.yaml): while the targets still run, criu copies
//! their memory in passes, each one only the pages dirtied since the pass before (soft-dirty
//! tracking). The freeze then writes only what changed since the last pass, so the dump — the
//! part of the downtime that grows with memory — shrinks to the application's dirty set.
//!
//! Each pass freezes the tree briefly (while its pages are collected, not while they are
//! written). Passes stop when the dirty set stops shrinking, when it is small, or after
//! [`MAX_PASSES`]. A pass that fails costs nothing but the time: the target is dumped in full.

use std::path::{Path, PathBuf};

use crate::criu::{Criu, CriuError, DumpOptions, PreDumpPass};
use crate::machine::Machine;

/// Passes at most: each one is a short freeze and a walk over the whole memory.
pub const MAX_PASSES: usize = 4;
/// Below this, the dump writes the rest quickly: another pass would only add a freeze.
const SMALL_BYTES: u64 = 4 << 20;

/// Whether another pass is worth it after `passes`: the first always is; then only while the
/// dirty set still shrinks by more than a fifth per pass and is not already small.
pub fn another_pass(passes: &[PreDumpPass]) -> bool {
    match passes {
        [] => true,
        _ if passes.len() >= MAX_PASSES => false,
        [.., last] if last.bytes <= SMALL_BYTES => false,
        [.., before, last] => last.bytes * 5 < before.bytes * 4,
        [_] => true,
    }
}

/// The directory of pass `n` (from 1) inside a target's image directory.
pub fn pass_dir(images: &Path, n: usize) -> PathBuf {
    images.join(format!("pre-{n}"))
}

/// What the dump names as its previous images after `passes` passes (relative to the image
/// directory), if any.
pub fn dump_parent(passes: usize) -> Option<String> {
    (passes > 0).then(|| format!("pre-{passes}"))
}

/// Runs passes on the tree rooted at `pid` until another one would not pay.
pub fn run(
    m: &dyn Machine,
    criu: &Criu,
    pid: i32,
    images: &Path,
    opts: &DumpOptions,
) -> Result<Vec<PreDumpPass>, CriuError> {
    let mut passes = Vec::new();
    while another_pass(&passes) {
        let n = passes.len() + 1;
        let prev = (n > 1).then(|| format!("../pre-{}", n - 1));
        passes.push(m.pre_dump(criu, pid, &pass_dir(images, n), prev.as_deref(), opts)?);
    }
    Ok(passes)
}

/// "3 passes: 256.0, 12.0, 3.0 MiB in 4.1 s", for the client and the journal's readers.
pub fn describe(passes: &[PreDumpPass]) -> String {
    let mib: Vec<String> = passes
        .iter()
        .map(|p| format!("{:.1}", p.bytes as f64 / (1 << 20) as f64))
        .collect();
    let ms: u64 = passes.iter().map(|p| p.ms).sum();
    format!(
        "{} pass{}: {} MiB in {:.1} s",
        passes.len(),
        if passes.len() == 1 { "" } else { "es" },
        mib.join(", "),
        ms as f64 / 1000.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passes(mib: &[u64]) -> Vec<PreDumpPass> {
        mib.iter()
            .map(|m| PreDumpPass {
                bytes: m << 20,
                ms: 100,
            })
            .collect()
    }

    #[test]
    fn passes_go_on_while_the_dirty_set_shrinks_and_stop_when_it_does_not() {
        assert!(another_pass(&passes(&[])));
        assert!(another_pass(&passes(&[1024])));
        assert!(another_pass(&passes(&[1024, 100])));
        // 90 of 100: not a fifth less.
        assert!(!another_pass(&passes(&[1024, 100, 90])));
        // Growing: the application dirties faster than a pass copies.
        assert!(!another_pass(&passes(&[1024, 1100])));
    }

    #[test]
    fn a_small_dirty_set_or_the_pass_limit_ends_the_passes() {
        assert!(!another_pass(&passes(&[3])));
        assert!(!another_pass(&passes(&[1024, 4])));
        assert!(!another_pass(&passes(&[4096, 2048, 1024, 512])));
    }

    #[test]
    fn the_dump_builds_on_the_last_pass() {
        assert_eq!(dump_parent(0), None);
        assert_eq!(dump_parent(3).as_deref(), Some("pre-3"));
        assert_eq!(pass_dir(Path::new("/i/100"), 2), Path::new("/i/100/pre-2"));
        assert_eq!(
            describe(&passes(&[256, 12])),
            "2 passes: 256.0, 12.0 MiB in 0.2 s"
        );
    }
}
