//! `nvwa`: the kernel live-upgrade server and its command-line client (a thin layer over
//! `nvwa_core`).

#[macro_use]
mod exit;
mod cli;
mod completions;
mod man;
mod render;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::Parser;

use nvwa_core::client::{self, ClientError};
use nvwa_core::journal::{Journal, Phase};
use nvwa_core::protocol::{Failure, Progress, Request, DEFAULT_SOCKET};
use nvwa_core::server::{self, Handler, Server};
use nvwa_core::update::Daemon;
use nvwa_core::{check, config};

use cli::{Cli, Command};

fn main() -> ExitCode {
    // `nvwa hold` (hidden; nvwa's drop-in runs it in a sandboxed unit's ExecStartPre=) runs
    // under the unit's system call filter: it must not reach clap or logging, only fork, setsid
    // and pause.
    let mut args = std::env::args_os();
    if args
        .nth(1)
        .is_some_and(|a| a == nvwa_core::systemd::HOLD_ARG)
        && args.next().is_none()
    {
        nvwa_core::service::hold();
    }
    let cli = Cli::parse_from(cli::rewrite_legacy_args(std::env::args_os().collect()));
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nvwa: error: {}", error_text(&e));
            ExitCode::from(exit::OTHER)
        }
    }
}

/// The error and its causes, skipping a cause whose text an outer message already contains
/// (our error types name their source in their own message).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if text.contains(&s) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&s);
    }
    text
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Server => {
            init_logging(cli, "info");
            run_server(cli)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Update {
            kernel,
            latest,
            json,
        } => {
            init_logging(cli, "warn");
            let version = match (kernel, latest) {
                (Some(v), _) => v.clone(),
                (None, _) => {
                    let running = nvwa_core::boot::running_kernel();
                    match nvwa_core::boot::newest_newer_than(Path::new("/"), &running) {
                        Some(v) => {
                            if !json {
                                println!("newest installed kernel newer than {running}: {v}");
                            }
                            v
                        }
                        None => {
                            eprintln!("nvwa: error: no installed kernel is newer than the running {running}; install one first (see /boot/vmlinuz-*)");
                            return Ok(ExitCode::from(exit::REFUSED));
                        }
                    }
                }
            };
            send(cli, Request::Update { version }, *json)
        }
        Command::Pre => {
            match nvwa_core::pidns::apply_boot_reservation()? {
                Some(n) => println!("pids up to {n} are kept for restores"),
                None => println!("no pid reservation on the kernel command line"),
            }
            // The network lock of the saved TCP connections, before the network comes up
            // (nvwa-pre.service runs before network-pre.target).
            let mut locked = true;
            if let Ok(cfg) = load_config(cli.config_dir.as_deref()) {
                let boot = nvwa_core::journal::boot_id()?;
                match nvwa_core::tcp::install_for_restore(&cfg.server.criu_dir, &boot) {
                    Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                    Err(e) => {
                        eprintln!("nvwa: error: {e}");
                        locked = false;
                    }
                }
            }
            // openEuler's pin memory: let the restore read the pinned pages (nvwa-pin's job).
            let pinmem = std::path::Path::new(nvwa_core::pinmem::DEV_ROOT)
                .join(nvwa_core::pinmem::PINMEM_DEVICE);
            if pinmem.exists() {
                nvwa_core::pinmem::PinMem::open(&pinmem)?.init_pagemap_read()?;
                println!("pin memory: pagemap read enabled");
            }
            Ok(if locked {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Init => {
            init_logging(cli, "warn");
            send(cli, Request::Init, false)
        }
        Command::Exit => {
            init_logging(cli, "warn");
            send(cli, Request::Exit, false)
        }
        Command::Restore { target } => {
            init_logging(cli, "info");
            let cfg = load_config(cli.config_dir.as_deref())?;
            let unit = nvwa_core::systemd::unit_name(&target.service)?;
            let m = nvwa_core::machine::RealMachine::default();
            match nvwa_core::service::restore_in_unit(&m, &cfg, &unit, target.pid) {
                Ok((pid, ms)) => {
                    println!("nvwa: restored {unit} as pid {pid} in {ms} ms");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("nvwa: error: {e}");
                    Ok(ExitCode::from(match e {
                        nvwa_core::service::ServiceError::NothingSaved { .. } => exit::REFUSED,
                        _ => exit::RESTORE_FAILED,
                    }))
                }
            }
        }
        Command::Generator { normal_dir, .. } => {
            // A generator must never hold up the boot: problems are reported (systemd logs
            // them to the kernel log) and the units start as their files say.
            let Ok(dir) = config::find_config_dir(cli.config_dir.as_deref()) else {
                return Ok(ExitCode::SUCCESS);
            };
            let cfg = config::load(&dir)?;
            let boot = nvwa_core::journal::boot_id()?;
            let exe = std::env::current_exe().context("cannot find nvwa's own executable")?;
            let n = nvwa_core::service::generate(&cfg, &boot, normal_dir, &exe)
                .with_context(|| format!("cannot write drop-ins under {}", normal_dir.display()))?;
            if n > 0 {
                eprintln!("nvwa-generator: {n} service(s) will be restored by nvwa");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { kernel, json } => {
            init_logging(cli, "warn");
            let cfg = load_config(cli.config_dir.as_deref())?;
            let report =
                check::run_checks(&cfg, kernel.as_deref(), Path::new("/"), &check::RealSystem);
            if *json {
                let verdict = report
                    .lines
                    .iter()
                    .map(|l| l.verdict)
                    .max_by_key(|v| match v {
                        check::Verdict::Ok => 0,
                        check::Verdict::Warn => 1,
                        check::Verdict::Fail => 2,
                    })
                    .unwrap_or(check::Verdict::Ok);
                let value = serde_json::json!({
                    "verdict": verdict,
                    "config_dir": cfg.dir,
                    "lines": report.lines,
                });
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", report.render());
            }
            Ok(if report.failed() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Status { json } => {
            init_logging(cli, "warn");
            status(cli, *json)
        }
        Command::Kernels => {
            let mut versions = nvwa_core::boot::installed_versions(Path::new("/"));
            versions.sort_by(|a, b| nvwa_core::boot::compare_versions(b, a));
            for v in versions {
                println!("{v}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            completions::completions(*shell, &mut std::io::stdout().lock())
                .context("cannot write the completion script")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            man::man(&mut std::io::stdout().lock()).context("cannot write the manual page")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Logs to the journal when systemd connected our output to it (`JOURNAL_STREAM`, the server as
/// nvwa.service), else to stderr, in colour only on a terminal and without `NO_COLOR`.
/// `-v` lowers the level to debug, `-q` raises it to error; `RUST_LOG` overrides both.
fn init_logging(cli: &Cli, default_level: &str) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;

    let level = match (cli.verbose, cli.quiet) {
        (true, _) => "debug",
        (_, true) => "error",
        _ => default_level,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            registry.with(journald).init();
            return;
        }
    }
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour),
        )
        .init();
}

fn load_config(explicit: Option<&Path>) -> anyhow::Result<config::Config> {
    // The config errors name the file, the line and the fix: no context needed.
    let dir = config::find_config_dir(explicit)?;
    Ok(config::load(&dir)?)
}

/// Adapts the update daemon to the socket server.
struct DaemonHandler(Arc<Daemon>);

impl Handler for DaemonHandler {
    fn handle(
        &self,
        request: Request,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, Failure> {
        // The operator's terminal may be gone; the server's log keeps the whole story (the
        // request and its outcome are logged by the server itself).
        self.0.handle(request, &mut |p: Progress| {
            tracing::info!("{}", render::progress(&p));
            progress(p)
        })
    }
}

fn run_server(cli: &Cli) -> anyhow::Result<()> {
    let cfg = load_config(cli.config_dir.as_deref())?;
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| cfg.server.socket.clone());
    tracing::info!(config = %cfg.dir.display(), socket = %socket.display(), "starting the nvwa server");
    let daemon = Arc::new(Daemon::new(&cfg));
    let server = Server::bind(&socket)?;
    stop_on_signals(Arc::clone(&daemon), server.stopper())?;
    server::notify_ready();

    // Like the original: processes saved before the kexec are restored in the background while
    // the server already answers (`nvwa status` shows the progress).
    let restorer = Arc::clone(&daemon);
    std::thread::Builder::new()
        .name("nvwa-restore".into())
        .spawn(move || {
            let outcome = restorer.restore_saved(cfg, &mut |p| {
                tracing::info!("restore: {}", render::progress(&p));
            });
            match outcome {
                Ok(message) => tracing::info!("restore of saved processes: {message}"),
                Err(message) => tracing::error!("restore of saved processes failed: {message}"),
            }
        })
        .context("cannot start the restore thread")?;

    server.serve(Arc::new(DaemonHandler(daemon)))?;
    tracing::info!("nvwa server stopped");
    Ok(())
}

/// SIGTERM (what `systemctl stop` sends) and SIGINT stop the server, never with a target left
/// stopped: an update that has not committed rolls back first; after the commit the jump goes
/// on (the signal is ignored until then); a restore in progress finishes.
fn stop_on_signals(daemon: Arc<Daemon>, stopper: server::Stopper) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Blocked here, before any other thread exists, so every thread inherits the mask and the
    // signal is only ever taken by the waiting thread below.
    set.thread_block()
        .context("cannot block SIGTERM and SIGINT")?;
    std::thread::Builder::new()
        .name("nvwa-signals".into())
        .spawn(move || {
            let signal = match set.wait() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot wait for signals: {e}");
                    return;
                }
            };
            tracing::warn!(
                "{signal:?}: stopping; an update that has not committed rolls back first"
            );
            let _owned = daemon.shut_down();
            tracing::info!("no request owns the machine any more; the server stops");
            stopper.stop();
            // Keep the daemon owned until the process ends: nothing may start now.
            loop {
                std::thread::park();
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// The socket to talk to: --socket, else the configuration's, else the default. A missing or
/// broken configuration only matters when --config-dir named it.
fn client_socket(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(s) = &cli.socket {
        return Ok(s.clone());
    }
    match load_config(cli.config_dir.as_deref()) {
        Ok(cfg) => Ok(cfg.server.socket),
        Err(e) if cli.config_dir.is_none() => {
            tracing::debug!(
                "{}; using the default socket {DEFAULT_SOCKET}",
                error_text(&e)
            );
            Ok(PathBuf::from(DEFAULT_SOCKET))
        }
        Err(e) => Err(e),
    }
}

/// Prints progress lines (with a spinner on a terminal).
struct Output {
    start: Instant,
    spinner: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Output {
    /// `quiet`: no progress lines and no spinner, only what `send` prints at the end.
    fn new(quiet: bool) -> Output {
        let spinner = (std::io::stdout().is_terminal() && !quiet).then(|| {
            let pb = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stdout(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            {
                pb.set_style(style);
            }
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        });
        Output {
            start: Instant::now(),
            spinner,
            quiet,
        }
    }

    fn event(&self, p: &Progress) {
        if self.quiet {
            return;
        }
        let text = render::progress(p);
        let line = format!("{} {text}", render::elapsed_prefix(self.start.elapsed()));
        match &self.spinner {
            Some(pb) => {
                pb.println(&line);
                pb.set_message(text);
            }
            None => println!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.spinner {
            pb.finish_and_clear();
        }
    }
}

/// Sends one request to the server and renders its answer: as text with elapsed times (with a
/// spinner on a terminal), or with `json` as the protocol's own lines (progress events, then the
/// result), for automation. The exit code says how it ended either way.
fn send(cli: &Cli, req: Request, json: bool) -> anyhow::Result<ExitCode> {
    use nvwa_core::protocol::Response;
    let socket = client_socket(cli)?;
    let json_line = |r: &Response| println!("{}", serde_json::to_string(r).expect("serializes"));
    let out = (!json).then(|| Output::new(cli.quiet));
    let mut last_phase = None;
    let result = client::request(&socket, &req, &mut |p| {
        if let Progress::Phase { phase } = p {
            last_phase = Some(*phase);
        }
        match &out {
            Some(out) => out.event(p),
            None => json_line(&Response::Progress(p.clone())),
        }
    });
    if let Some(out) = &out {
        out.finish();
    }
    match result {
        Ok(message) => {
            if json {
                json_line(&Response::Done { message });
            } else {
                println!("{message}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ClientError::Server(failure)) => {
            let code = exit::for_failure(failure.kind);
            if json {
                json_line(&failure.into());
            } else {
                eprintln!("nvwa: error: {failure}");
            }
            Ok(ExitCode::from(code))
        }
        // The socket is root's: another user is refused before anything happens.
        Err(e @ ClientError::PermissionDenied { .. }) => {
            eprintln!("nvwa: error: {e}");
            Ok(ExitCode::from(exit::REFUSED))
        }
        Err(e @ (ClientError::NotRunning { .. } | ClientError::Connect { .. })) => {
            eprintln!("nvwa: error: {e}");
            Ok(ExitCode::from(exit::UNREACHABLE))
        }
        // After the commit the server kexecs: the connection dying is the expected end.
        Err(ClientError::Closed { .. })
            if matches!(req, Request::Update { .. }) && last_phase == Some(Phase::Committed) =>
        {
            if let (Request::Update { version }, false) = (&req, json) {
                println!(
                    "switching to kernel {version}; once it is up, `nvwa status` shows the restore"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(anyhow!("{e}")),
    }
}

fn status(cli: &Cli, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = load_config(cli.config_dir.as_deref())?;
    let criu_dir = &cfg.server.criu_dir;
    let Some(journal) = Journal::load(criu_dir)? else {
        let text = format!(
            "no update has run (no journal in {}; configuration from {})",
            criu_dir.display(),
            cfg.dir.display()
        );
        if json {
            let value = serde_json::json!({
                "phase": null,
                "message": text,
                "config_dir": cfg.dir,
                "criu_dir": criu_dir,
            });
            println!("{}", serde_json::to_string_pretty(&value)?);
        } else {
            println!("{text}");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let code = ExitCode::from(exit::for_phase(journal.phase));
    if json {
        let mut value = serde_json::to_value(&journal)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("downtime_ms".into(), journal.downtime_ms().into());
            obj.insert("config_dir".into(), cfg.dir.display().to_string().into());
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!("config: {}", cfg.dir.display());
        print!("{}", render::status(&journal));
    }
    Ok(code)
}
