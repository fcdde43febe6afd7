//! The command line: clap definitions and the rewrite of the original's `nvwa -server 1`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

const ABOUT: &str = "Upgrade the kernel of a running server without losing its important processes";

const LONG_ABOUT: &str = "\
Upgrade the kernel of a running server without losing its important processes.

nvwa checkpoints the configured processes and systemd services (`pids:` and `services:` in
nvwa-restore.yaml) with CRIU, kexecs into the new kernel, and restores them there; if anything
fails before the jump, every process runs on. The work is done by the nvwa server (`nvwa server`, normally the systemd unit nvwa.service);
the other commands talk to it over its unix socket, except `check`, `status` and `kernels`, which
run locally.

Configuration is read from nvwa-server.yaml and nvwa-restore.yaml, searched in `.`, `./config` and
`/etc/nvwa` (or only in --config-dir); as root, a directory that another user could change is
skipped.";

const AFTER_HELP: &str = concat!(
    "\
Typical use:
  nvwa check 6.6.0-28.oe2403.x86_64     # is this machine ready to switch to that kernel?
  nvwa update 6.6.0-28.oe2403.x86_64    # checkpoint, kexec, restore
  nvwa status                           # what the last update did, and the downtime

Compatibility: `nvwa -server 1` (the original's way to start the server) means `nvwa server`.

",
    exit_status_help!()
);

#[derive(Debug, Parser)]
#[command(
    name = "nvwa",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Read the configuration from DIR only, instead of searching `.`, `./config`, `/etc/nvwa`
    #[arg(long, global = true, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// The server's unix socket (default: `socket` in nvwa-server.yaml, else /run/nvwa/nvwa.socket)
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Log more (debug level) to standard error
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    pub verbose: bool,

    /// Print only the result and errors, no progress lines
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the nvwa server (normally started by nvwa.service)
    ///
    /// Loads the configuration, listens on the socket, tells systemd it is ready, and restores
    /// in the background the processes saved by an update before the kexec. Stops on `nvwa exit`.
    Server,

    /// Checkpoint the configured processes, then kexec into kernel VERSION
    ///
    /// VERSION is the suffix of an installed /boot/vmlinuz-VERSION (see `nvwa check` and shell
    /// completion). If anything fails before the jump, every process is resumed on the current
    /// kernel. Progress is printed as it happens; the machine then switches kernels and the
    /// server restores the processes when it starts again.
    Update {
        /// Kernel version to switch to, e.g. 6.6.0-28.oe2403.x86_64
        #[arg(value_name = "VERSION", required_unless_present = "latest")]
        kernel: Option<String>,
        /// Switch to the newest installed kernel that is newer than the running one (refused,
        /// exit 4, when there is none)
        #[arg(long, conflicts_with = "kernel")]
        latest: bool,
        /// Print the server's protocol lines (JSON: progress events, then the result) instead of text
        #[arg(long)]
        json: bool,
    },

    /// Early-boot step (nvwa-pre.service): keep the pids of saved processes free, lock their TCP connections
    ///
    /// An update passes `nvwa.last_pid=N` to the new kernel; this moves the pid counter past N
    /// before services start, so none of them lands on a pid that a restore needs. Nothing to do
    /// when the initramfs hook already did (it runs earlier, before udev and systemd). While a
    /// committed update awaits its restore, it also puts back the network lock saved with each
    /// target's images, before the network comes up, so that the new kernel does not answer the
    /// saved connections' peers with resets.
    Pre,

    /// Forget a previous update: remove saved images, the journal and pinned memory
    Init,

    /// Stop the nvwa server (refused while an update is in progress)
    Exit,

    /// Restore a saved service inside its unit (run by systemd as the unit's ExecStart=)
    ///
    /// On the boot after an update, nvwa's generator gives each saved service a drop-in whose
    /// ExecStart= runs this: it restores the service's processes with criu inside the unit,
    /// hands them the unit's journal stream, and writes the pid file from which systemd takes
    /// the restored main process. It runs locally, without the server. Exits 4 when nothing was
    /// saved for SERVICE@PID, 7 when the restore failed.
    Restore {
        /// The service and its pid before the update, e.g. redis@1234
        #[arg(value_name = "SERVICE@PID", value_parser = parse_service_at_pid)]
        target: ServiceAtPid,
    },

    /// systemd generator (installed as nvwa-generator): drop-ins for the services to restore
    #[command(hide = true)]
    Generator {
        /// Where systemd wants generated units (the first of its three directories)
        normal_dir: PathBuf,
        /// The early and late directories (unused)
        #[arg(num_args = 0..=2)]
        others: Vec<PathBuf>,
    },

    /// Check whether this machine is ready to update (to VERSION, if given); runs locally
    ///
    /// Checks the configuration, the tools (criu, kexec), the kernel files, the targets, free
    /// space, and the optional openEuler kernel features. Exits 1 when a check fails.
    Check {
        /// Kernel version to check, e.g. 6.6.0-28.oe2403.x86_64
        #[arg(value_name = "VERSION")]
        kernel: Option<String>,
        /// Print the report as JSON: an overall `verdict` (ok, warn, fail) and the lines
        #[arg(long)]
        json: bool,
    },

    /// Show the journal of the last update: phases, targets, timings and downtime; runs locally
    Status {
        /// Print the journal as a JSON object (with `downtime_ms` and `config_dir`; `phase` is
        /// null when no update has run)
        #[arg(long)]
        json: bool,
    },

    /// List the installed kernel versions (what `update` and `check` accept), newest first
    ///
    /// A version is listed when /boot/vmlinuz-VERSION (or /usr/lib/modules/VERSION/vmlinuz)
    /// exists; the shell completions offer these.
    Kernels,

    /// Print a shell completion script (bash, zsh and fish also complete installed kernel versions)
    ///
    /// For example: `nvwa completions bash > /etc/bash_completion.d/nvwa`
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },

    /// Print the manual page (roff) to standard output
    ///
    /// For example: `nvwa man > /usr/share/man/man8/nvwa.8`
    Man,
}

/// `SERVICE@PID`, as written by the unit overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAtPid {
    pub service: String,
    pub pid: i32,
}

pub fn parse_service_at_pid(s: &str) -> Result<ServiceAtPid, String> {
    let Some((service, pid)) = s.rsplit_once('@') else {
        return Err(format!(
            "expected SERVICE@PID (e.g. redis@1234), got {s:?} without '@'"
        ));
    };
    if service.is_empty() {
        return Err(format!(
            "expected SERVICE@PID (e.g. redis@1234), the service name before '@' is empty in {s:?}"
        ));
    }
    if service.contains('/') || service.chars().any(char::is_whitespace) {
        return Err(format!(
            "{service:?} is not a systemd service name (no '/' or spaces allowed)"
        ));
    }
    let pid: i32 = pid.parse().map_err(|_| {
        format!("expected SERVICE@PID (e.g. redis@1234), {pid:?} after '@' is not a pid")
    })?;
    if pid <= 0 {
        return Err(format!("{pid} is not a valid pid (must be positive)"));
    }
    let service = service.strip_suffix(".service").unwrap_or(service);
    Ok(ServiceAtPid {
        service: service.to_string(),
        pid,
    })
}

/// Rewrites the original's `nvwa [global flags] -server 1 [...]` into `nvwa [global flags] server
/// [...]`, so that unit files written for it keep working. Anything else is left alone.
pub fn rewrite_legacy_args(args: Vec<OsString>) -> Vec<OsString> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--config-dir" || a == "--socket" {
            i += 2;
        } else if a.starts_with("--config-dir=") || a.starts_with("--socket=") {
            i += 1;
        } else {
            break;
        }
    }
    let arg = |k: usize| args.get(k).map(|a| a.to_string_lossy().into_owned());
    let (skip, matched) = match (arg(i).as_deref(), arg(i + 1).as_deref()) {
        (Some("-server" | "--server"), Some("1")) => (2, true),
        (Some("-server=1" | "--server=1"), _) => (1, true),
        // Without the `1`, as people type it.
        (Some("-server" | "--server"), next) if next.is_none_or(|n| n.starts_with('-')) => {
            (1, true)
        }
        _ => (0, false),
    };
    if !matched {
        return args;
    }
    let mut out = args[..i].to_vec();
    out.push("server".into());
    out.extend_from_slice(&args[i + skip..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_original_server_flag_means_server() {
        assert_eq!(
            rewrite_legacy_args(os(&["nvwa", "-server", "1"])),
            os(&["nvwa", "server"])
        );
        assert_eq!(
            rewrite_legacy_args(os(&["nvwa", "--config-dir", "/c", "-server", "1"])),
            os(&["nvwa", "--config-dir", "/c", "server"])
        );
        assert_eq!(
            rewrite_legacy_args(os(&["nvwa", "--socket=/s", "-server=1"])),
            os(&["nvwa", "--socket=/s", "server"])
        );
        assert_eq!(
            rewrite_legacy_args(os(&["nvwa", "-server", "1", "--help"])),
            os(&["nvwa", "server", "--help"])
        );
        let cli = Cli::try_parse_from(rewrite_legacy_args(os(&[
            "nvwa",
            "--config-dir",
            "/c",
            "-server",
            "1",
        ])))
        .unwrap();
        assert!(matches!(cli.command, Command::Server));
        assert_eq!(cli.config_dir, Some(PathBuf::from("/c")));
    }

    #[test]
    fn other_arguments_are_left_alone() {
        assert_eq!(
            rewrite_legacy_args(os(&["nvwa", "-server"])),
            os(&["nvwa", "server"])
        );
        assert_eq!(
            rewrite_legacy_args(os(&["nvwa", "-server", "--socket", "/s"])),
            os(&["nvwa", "server", "--socket", "/s"])
        );
        for v in [
            &["nvwa", "update", "1"][..],
            &["nvwa", "-server", "0"],
            &["nvwa", "update", "-server", "1"],
            &["nvwa"],
            &["nvwa", "--socket"],
        ] {
            assert_eq!(rewrite_legacy_args(os(v)), os(v));
        }
    }

    #[test]
    fn service_at_pid() {
        assert_eq!(
            parse_service_at_pid("redis@1234").unwrap(),
            ServiceAtPid {
                service: "redis".into(),
                pid: 1234
            }
        );
        assert_eq!(
            parse_service_at_pid("redis.service@7").unwrap().service,
            "redis"
        );
        assert_eq!(
            parse_service_at_pid("getty@tty1@99").unwrap().service,
            "getty@tty1"
        );
        for (bad, why) in [
            ("redis", "without '@'"),
            ("@12", "empty"),
            ("redis@", "not a pid"),
            ("redis@x", "not a pid"),
            ("redis@-3", "must be positive"),
            ("a/b@3", "not a systemd service name"),
        ] {
            let err = parse_service_at_pid(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
