//! The nvwa lab: rehearses real kernel live upgrades inside QEMU guests.

pub mod apt;
pub mod bench;
pub mod cpio;
pub mod elf;
pub mod exec;
pub mod guest;
pub mod host;
pub mod image;
pub mod modules;
pub mod oops;
pub mod prepare;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod server_guest;
pub mod vm;

/// The checkout this lab was built from: scenarios and the nvwa sources live there.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}
