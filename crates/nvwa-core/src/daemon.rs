//! The server's request handler: one request at a time owns the machine.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use crate::config;
use crate::machine::{Machine, RealMachine};
use crate::protocol::{ErrorKind, Failure, Progress, Request};
use crate::restore;
use crate::update::{self, Reporter, UpdateError};

pub struct Daemon {
    pub config_dir: PathBuf,
    machine: Arc<dyn Machine>,
    busy: Mutex<()>,
    /// Set once the server is going down (`nvwa exit`, SIGTERM, SIGINT): an update that has not
    /// committed rolls back, and no new request starts.
    stop: Arc<AtomicBool>,
}

fn failure(e: UpdateError) -> Failure {
    Failure::new(e.kind(), e.to_string())
}

/// Tells monitoring how the last update stands: the metrics file (if configured) and systemd's
/// STATUS= line. Failures here are logged, never fatal: they must not change an update's outcome.
fn publish(cfg: &config::Config) {
    let journal = match crate::journal::Journal::load(&cfg.server.criu_dir) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!("cannot read the journal for monitoring: {e}");
            return;
        }
    };
    if let Some(path) = &cfg.server.metrics_file {
        if let Err(e) = crate::metrics::write(path, &crate::metrics::render(journal.as_ref())) {
            tracing::warn!("cannot write the metrics file {}: {e}", path.display());
        }
    }
    if let Some(j) = &journal {
        crate::server::notify_status(&crate::metrics::summary(j));
    }
}

impl Daemon {
    /// A daemon for the real machine, from the configuration the server started with (so a
    /// server never starts on a broken config); later requests read it afresh.
    pub fn new(cfg: &config::Config) -> Daemon {
        Daemon::with_machine(cfg.dir.clone(), Arc::new(RealMachine::default()))
    }

    pub fn with_machine(config_dir: PathBuf, machine: Arc<dyn Machine>) -> Daemon {
        Daemon {
            config_dir,
            machine,
            busy: Mutex::new(()),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks a running update to roll back, waits until no request owns the machine, and keeps it
    /// owned: nothing starts after this. Called when the server must go down.
    pub fn shut_down(&self) -> MutexGuard<'_, ()> {
        self.stop.store(true, Ordering::SeqCst);
        self.lock()
    }

    /// Runs `f` unless another request owns the machine. The configuration is read afresh
    /// unless `loaded` is given, so an operator's edit of nvwa-restore.yaml applies to the next
    /// request without a restart.
    fn exclusive(
        &self,
        what: &'static str,
        loaded: Option<config::Config>,
        f: impl FnOnce(&config::Config) -> Result<String, UpdateError>,
    ) -> Result<String, Failure> {
        let _guard = match self.busy.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(Failure::new(
                    ErrorKind::Busy,
                    format!(
                        "cannot {what}: the server is busy with another request; see `nvwa status`"
                    ),
                ))
            }
        };
        if self.stop.load(Ordering::SeqCst) {
            return Err(failure(UpdateError::Stopping(what)));
        }
        let cfg = match loaded {
            Some(cfg) => cfg,
            None => config::load(&self.config_dir).map_err(|e| failure(e.into()))?,
        };
        let outcome = f(&cfg).map_err(failure);
        publish(&cfg);
        outcome
    }

    /// Restores every saved image set (once, at server start) with the configuration the
    /// server has just read: the restore is on the new boot's critical path, and reading it
    /// again would only delay the targets.
    pub fn restore_saved(
        &self,
        cfg: config::Config,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, Failure> {
        let r = Reporter::new(progress);
        self.exclusive("restore", Some(cfg), |cfg| {
            restore::restore_saved(self.machine.as_ref(), cfg, &r)
        })
    }

    /// Answers one request: `Ok` is the final success message, `Err` the final failure.
    pub fn handle(
        &self,
        request: Request,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, Failure> {
        let r = Reporter::new(progress);
        match request {
            Request::Update { version } => self.exclusive("update", None, |cfg| {
                update::run(self.machine.as_ref(), cfg, &version, &r, &self.stop)
            }),
            Request::Init => {
                self.exclusive("init", None, |cfg| update::init(self.machine.as_ref(), cfg))
            }
            // The original's client asked its server; ours restores inside the unit, where
            // the restored process must live, so the server has nothing to do here.
            Request::Restore { service, pid } => Err(Failure::new(
                ErrorKind::Refused,
                format!(
                    "cannot restore {service}@{pid} from the server: a service is restored inside its unit by `nvwa restore {service}@{pid}`, which nvwa's drop-in runs when systemd starts the unit"
                ),
            )),
            // Stopping mid-update would leave frozen processes without anyone to resume them.
            // Once accepted, the stop flag keeps any later request from starting.
            Request::Exit => match self.busy.try_lock() {
                Err(TryLockError::WouldBlock) => Err(Failure::new(
                    ErrorKind::Busy,
                    "cannot stop: an update or restore is running; wait for it (see `nvwa status`)",
                )),
                _ => {
                    self.stop.store(true, Ordering::SeqCst);
                    Ok("nvwa server stopping".into())
                }
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
        assert!(err.message.contains("cannot stop"), "{err}");
        assert_eq!(err.kind, ErrorKind::Busy);
        drop(guard);
        assert!(d.handle(Request::Exit, &mut sink).is_ok());
    }

    #[test]
    fn the_restore_at_start_uses_the_configuration_the_server_read() {
        // The configuration directory is gone after the server read it: a second read would
        // fail, so a restore that succeeds did not read it again.
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::testing::config(dir.path(), &[]);
        let d = Daemon::with_machine(
            dir.path().join("gone"),
            Arc::new(FakeMachine::with_pids(&[])),
        );
        let mut sink = |_p: Progress| {};
        assert_eq!(
            d.restore_saved(cfg, &mut sink).unwrap(),
            "nothing to restore"
        );
        // Any other request reads it afresh.
        let err = d.handle(Request::Init, &mut sink).unwrap_err();
        assert!(err.message.contains("gone"), "{err}");
    }

    #[test]
    fn nothing_starts_after_an_accepted_exit() {
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::with_machine(dir.path().into(), Arc::new(FakeMachine::with_pids(&[])));
        let mut sink = |_p: Progress| {};
        d.handle(Request::Exit, &mut sink).unwrap();
        let err = d
            .handle(
                Request::Update {
                    version: "6.12-new".into(),
                },
                &mut sink,
            )
            .unwrap_err();
        assert!(err.message.contains("stopping"), "{err}");
        assert_eq!(err.kind, ErrorKind::Busy);
    }
}
