//! nvwa: upgrade the kernel of a running server without losing its important processes.
//!
//! The update pipeline (`update`) is a persisted state machine (`journal`) driving one module per
//! outside system: `criu` (checkpoint/restore), `kexec` (load and jump), `boot` (kernel files),
//! `pidns` (keeping saved pids free), `pinmem` (openEuler kernel features). `server` and `client`
//! speak the typed `protocol` over a unix socket.

pub mod boot;
pub mod check;
pub mod client;
pub mod config;
pub mod criu;
pub mod criu_image;
pub mod daemon;
pub mod exec;
pub mod journal;
pub mod kexec;
pub mod lazy_pages;
pub mod lazy_view;
pub mod machine;
pub mod metrics;
pub mod net;
pub mod pidns;
pub mod pinmem;
pub mod policy;
pub mod pre_dump;
pub mod process;
pub mod protocol;
pub mod restore;
pub mod server;
pub mod service;
pub mod systemd;
pub mod tcp;
pub mod trust;
pub mod uffd;
pub mod update;

#[cfg(test)]
mod net_tests;
#[cfg(test)]
mod pipeline_tests;
#[cfg(test)]
mod service_tests;
#[cfg(test)]
mod testing;
