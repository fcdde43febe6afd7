//! The server's request handler: one request at a time owns the machine.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, TryLockError};

use crate::config;
use crate::machine::{Machine, RealMachine};
use crate::protocol::{Progress, Request};
use crate::restore;
use crate::update::UpdateError as E;
use crate::update::{self, Reporter, UpdateError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
}

pub struct Daemon {
    pub config_dir: PathBuf,
    machine: Arc<dyn Machine>,
    busy: Mutex<()>,
}

impl Daemon {
    /// A daemon for the real machine; fails if the configuration does not load, so a server
    /// never starts on a broken config.
    pub fn new(config_dir: PathBuf) -> Result<Daemon, DaemonError> {
        config::load(&config_dir).map_err(|e| DaemonError::Config(e.to_string()))?;
        Ok(Daemon::with_machine(
            config_dir,
            Arc::new(RealMachine::default()),
        ))
    }

    pub fn with_machine(config_dir: PathBuf, machine: Arc<dyn Machine>) -> Daemon {
        Daemon {
            config_dir,
            machine,
            busy: Mutex::new(()),
        }
    }

    /// Runs `f` unless another request owns the machine. The configuration is read afresh, so
    /// an operator's edit of nvwa-restore.yaml applies to the next request without a restart.
    fn exclusive(
        &self,
        what: &str,
        f: impl FnOnce(&config::Config) -> Result<String, UpdateError>,
    ) -> Result<String, String> {
        let _guard = match self.busy.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(format!(
                    "cannot {what}: the server is busy with another request; see `nvwa status`"
                ))
            }
        };
        let cfg = config::load(&self.config_dir).map_err(|e| E::from(e).to_string())?;
        f(&cfg).map_err(|e| e.to_string())
    }

    /// Restores every saved image set (once, at server start).
    pub fn restore_saved(&self, progress: &mut dyn FnMut(Progress)) -> Result<String, String> {
        let r = Reporter::new(progress);
        self.exclusive("restore", |cfg| {
            restore::restore_saved(self.machine.as_ref(), cfg, &r)
        })
    }

    /// Answers one request: `Ok` is the final success message, `Err` the final error.
    pub fn handle(
        &self,
        request: Request,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, String> {
        let r = Reporter::new(progress);
        match request {
            Request::Update { version } => self.exclusive("update", |cfg| {
                update::run(self.machine.as_ref(), cfg, &version, &r)
            }),
            Request::Init => {
                self.exclusive("init", |cfg| update::init(self.machine.as_ref(), cfg))
            }
            Request::Restore { service, pid } => Err(format!(
                "cannot restore {service}@{pid}: systemd services are not supported by this nvwa yet"
            )),
            // Stopping mid-update would leave frozen processes without anyone to resume them.
            Request::Exit => match self.busy.try_lock() {
                Err(TryLockError::WouldBlock) => Err(
                    "cannot stop: an update or restore is running; wait for it (see `nvwa status`)"
                        .into(),
                ),
                _ => Ok("nvwa server stopping".into()),
            },
            Request::Ping => Ok("pong".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeMachine;

    #[test]
    fn exit_is_refused_while_a_request_owns_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::with_machine(dir.path().into(), Arc::new(FakeMachine::with_pids(&[])));
        let mut sink = |_p: Progress| {};
        let guard = d.busy.lock().unwrap();
        let err = d.handle(Request::Exit, &mut sink).unwrap_err();
        assert!(err.contains("cannot stop"), "{err}");
        drop(guard);
        assert!(d.handle(Request::Exit, &mut sink).is_ok());
    }
}
