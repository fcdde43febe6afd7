//! The update pipeline (owned by the lead; stub API so the binary can be wired up).

use std::path::PathBuf;

use crate::protocol::{Progress, Request};

/// The server's request handler: owns the configuration directory and the update state machine.
pub struct Daemon {
    pub config_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
}

impl Daemon {
    pub fn new(config_dir: PathBuf) -> Result<Daemon, DaemonError> {
        Ok(Daemon { config_dir })
    }

    /// Restores every saved image set (called once at server start, on the new kernel).
    pub fn restore_saved(&self, _progress: &mut dyn FnMut(Progress)) -> Result<String, String> {
        Ok("nothing to restore".into())
    }

    /// Answers one request; `Ok` is the final success message, `Err` the final error message.
    pub fn handle(
        &self,
        request: Request,
        _progress: &mut dyn FnMut(Progress),
    ) -> Result<String, String> {
        Err(format!("{request:?}: not implemented yet"))
    }
}
