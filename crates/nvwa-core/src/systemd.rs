//! What nvwa asks systemd about a service: its main process, its type and its cgroup, read with
//! `systemctl show` (the stable, documented interface; no D-Bus client library is needed for a
//! handful of properties read once per update).
//!
//! A service can be checkpointed with its main process only if every process of its cgroup is in
//! the main process's tree: criu dumps a process tree, and a helper that systemd started beside
//! the main process (an `ExecStartPost=` leftover, a second daemon) would be lost.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::exec::{self, ExecError};

/// The properties read, in one `systemctl show` call.
pub const PROPERTIES: &str =
    "Id,MainPID,Type,PIDFile,NotifyAccess,ControlGroup,ActiveState,SubState,SyslogIdentifier,ExecStart";

const SYSTEMCTL: &str = "systemctl";
/// `systemctl show` and `daemon-reload` answer in well under a second on an idle machine; a
/// minute means systemd is stuck.
const QUERY_DEADLINE: Duration = Duration::from_secs(60);

/// Where the restore of a service leaves the restored pid for systemd (`PIDFile=` of the drop-in).
pub const RESTORE_PID_DIR: &str = "/run/nvwa-restore";
/// The file name of nvwa's drop-in, in the generator's directory `<unit>.d/`.
pub const DROP_IN: &str = "50-nvwa-restore.conf";

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot run `{command}`: {source}")]
    Run { command: String, source: ExecError },
    #[error("`{command}` failed (exit {code}): {output}")]
    Failed {
        command: String,
        code: i32,
        output: String,
    },
    #[error("cannot write {path}: {source}")]
    DropIn {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How systemd starts a service (`Type=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceType {
    Simple,
    Exec,
    Forking,
    Notify,
    NotifyReload,
    /// oneshot, dbus, idle, or anything newer: not a long-running main process nvwa can hand
    /// back to systemd.
    Other(String),
}

impl ServiceType {
    fn parse(s: &str) -> ServiceType {
        match s {
            "simple" => ServiceType::Simple,
            "exec" => ServiceType::Exec,
            "forking" => ServiceType::Forking,
            "notify" => ServiceType::Notify,
            "notify-reload" => ServiceType::NotifyReload,
            other => ServiceType::Other(other.to_string()),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            ServiceType::Simple => "simple",
            ServiceType::Exec => "exec",
            ServiceType::Forking => "forking",
            ServiceType::Notify => "notify",
            ServiceType::NotifyReload => "notify-reload",
            ServiceType::Other(s) => s,
        }
    }
}

/// A service as systemd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitInfo {
    pub id: String,
    /// 0 when the service has no main process (stopped, or a oneshot).
    pub main_pid: i32,
    pub kind: ServiceType,
    pub pid_file: Option<PathBuf>,
    pub notify_access: String,
    /// The cgroup path below the cgroup root, e.g. `/system.slice/redis-server.service`.
    pub control_group: Option<String>,
    pub active_state: String,
    pub sub_state: String,
    /// `SyslogIdentifier=`, else the basename of ExecStart's argv[0] (what systemd tags the
    /// service's stdout stream with when none is set). Empty if neither is known.
    pub identifier: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitNameError {
    #[error("{0:?} is not a systemd unit name: {1}; write the service's name as `systemctl status` shows it, e.g. redis-server or redis-server.service")]
    Invalid(String, &'static str),
}

/// The unit name for a configured service: systemd's rules (ASCII letters, digits and `:-_.\@`, at
/// most 255 bytes, no leading dot), `.service` added when missing; any other unit type is refused.
pub fn unit_name(configured: &str) -> Result<String, UnitNameError> {
    const OTHER_TYPES: [&str; 10] = [
        "socket",
        "target",
        "timer",
        "mount",
        "path",
        "slice",
        "scope",
        "device",
        "swap",
        "automount",
    ];
    let bad = |why| Err(UnitNameError::Invalid(configured.to_string(), why));
    if configured
        .rsplit_once('.')
        .is_some_and(|(_, suffix)| OTHER_TYPES.contains(&suffix))
    {
        return bad("only .service units run processes nvwa can preserve");
    }
    let stem = configured.strip_suffix(".service").unwrap_or(configured);
    if stem.is_empty() {
        return bad("it is empty");
    }
    if stem.len() + ".service".len() > 255 {
        return bad("it is longer than 255 bytes");
    }
    if stem.starts_with('.') {
        return bad("it starts with a dot");
    }
    if !stem
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
    {
        return bad("only ASCII letters, digits and :-_.\\@ are allowed");
    }
    if stem.ends_with('@') {
        return bad("it is a template; name an instance, e.g. getty@tty1");
    }
    Ok(format!("{stem}.service"))
}

/// Parses `systemctl show --property=PROPERTIES UNIT` output (`Key=value` lines).
pub fn parse_show(text: &str) -> UnitInfo {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    UnitInfo {
        id: get("Id"),
        main_pid: get("MainPID").parse().unwrap_or(0),
        kind: ServiceType::parse(&get("Type")),
        pid_file: non_empty(get("PIDFile")).map(PathBuf::from),
        notify_access: get("NotifyAccess"),
        control_group: non_empty(get("ControlGroup")),
        active_state: get("ActiveState"),
        sub_state: get("SubState"),
        identifier: non_empty(get("SyslogIdentifier"))
            .or_else(|| exec_start_name(&get("ExecStart")))
            .unwrap_or_default(),
    }
}

/// The basename of argv[0] in `ExecStart={ path=/usr/bin/x ; argv[]=/usr/bin/x -f ; ... }`.
fn exec_start_name(value: &str) -> Option<String> {
    let argv = value.split("argv[]=").nth(1)?;
    let first = argv.split_whitespace().next()?;
    let name = first.rsplit('/').next()?;
    (!name.is_empty() && name != ";").then(|| name.to_string())
}

fn systemctl(args: &[&str], deadline: Duration) -> Result<String, SystemdError> {
    run_tool(SYSTEMCTL, args, deadline)
}

/// Runs one of systemd's tools; its standard output, or the failure with what it printed.
fn run_tool(program: &str, args: &[&str], deadline: Duration) -> Result<String, SystemdError> {
    let command = format!("{program} {}", args.join(" "));
    let out = exec::run(Command::new(program).args(args), deadline).map_err(|source| {
        SystemdError::Run {
            command: command.clone(),
            source,
        }
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SystemdError::Failed {
            command,
            code: out.code(),
            output: out.output_text().trim().to_string(),
        })
    }
}

/// What systemd says about `unit` now.
pub fn show(unit: &str) -> Result<UnitInfo, SystemdError> {
    let property = format!("--property={PROPERTIES}");
    systemctl(&["show", &property, unit], QUERY_DEADLINE).map(|out| parse_show(&out))
}

/// Starts `unit` and waits for the start job to finish (for nvwa's drop-in: the restore), at
/// most `deadline`.
pub fn start(unit: &str, deadline: Duration) -> Result<(), SystemdError> {
    systemctl(&["start", unit], deadline).map(drop)
}

/// Whether systemd manages this boot (sd_booted(3)).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Waits, at most `deadline`, until `network-online.target` is reached (starting it if nothing
/// asked for it): the network manager has configured the links. `nvwa.service` is not ordered
/// after it, so that targets needing no network are restored before it; the others wait here.
pub fn wait_network_online(deadline: Duration) -> Result<(), SystemdError> {
    systemctl(&["start", "network-online.target"], deadline).map(drop)
}

/// Makes systemd re-run its generators and re-read unit files.
pub fn daemon_reload() -> Result<(), SystemdError> {
    systemctl(&["daemon-reload"], QUERY_DEADLINE).map(drop)
}

/// Where an orderly kexec's drop-ins go: runtime configuration, gone with the old boot.
const RUNTIME_UNITS: &str = "/run/systemd/system";
const HOLD_DROP_IN: &str = "50-nvwa-hold.conf";

/// What an orderly kexec puts on a listed unit: stopping it kills its stopped processes outright
/// (no ExecStop= talking to them, no SIGTERM + SIGCONT that would let them run once more).
pub const HOLD: &str = "\
# Written by nvwa for an orderly kexec: this service was checkpointed and must not run again
# before the kernel switch, so stopping it kills it outright. Gone with this boot (/run).
[Service]
ExecStop=
KillSignal=SIGKILL
SendSIGHUP=no
";

/// Puts [`HOLD`] on every unit and reloads systemd. Returns the drop-ins written, for
/// [`release`]; on error, what it wrote is removed again.
pub fn hold(units: &[String]) -> Result<Vec<PathBuf>, SystemdError> {
    let mut written = Vec::new();
    let result = units
        .iter()
        .try_for_each(|unit| {
            let dir = Path::new(RUNTIME_UNITS).join(format!("{unit}.d"));
            let path = dir.join(HOLD_DROP_IN);
            // Unit configuration is public (systemd warns about restricted modes at each reload):
            // 0755/0644 whatever the server's umask.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&dir)
                .and_then(|()| std::fs::write(&path, HOLD))
                .and_then(|()| {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                })
                .map_err(|source| SystemdError::DropIn {
                    path: path.clone(),
                    source,
                })?;
            written.push(path);
            Ok(())
        })
        .and_then(|()| {
            if written.is_empty() {
                Ok(())
            } else {
                daemon_reload()
            }
        });
    match result {
        Ok(()) => Ok(written),
        Err(e) => {
            release(&written);
            Err(e)
        }
    }
}

/// Removes the drop-ins of [`hold`]: the units go back to their own stop settings.
pub fn release(written: &[PathBuf]) {
    for path in written {
        let _ = std::fs::remove_file(path);
    }
    if !written.is_empty() {
        let _ = daemon_reload();
    }
}

/// `systemctl kexec`: systemd stops every unit, unmounts the filesystems and jumps into the
/// loaded kernel. Returns once the job is queued.
pub fn kexec() -> Result<(), SystemdError> {
    systemctl(&["kexec"], QUERY_DEADLINE).map(drop)
}

/// The path of the pid file through which the restore hands `unit`'s main pid to systemd.
pub fn restore_pid_file(unit: &str) -> PathBuf {
    Path::new(RESTORE_PID_DIR).join(format!("{unit}.pid"))
}

/// The drop-in with which the next boot restores `unit` (saved as pid `pid`) instead of starting
/// it afresh. The helper runs with full privileges (`+`: outside the unit's sandbox, which criu
/// needs) but in the unit's cgroup and with the unit's standard streams; it restores the
/// process, writes its pid to the pid file and exits, so `Type=forking` makes the restored
/// process the unit's main process. Commands that would run beside the restore are cleared.
///
/// For a sandboxed service (`sandboxed`: it ran in mount or UTS namespaces of its own), the
/// unit's own sandbox is made for an `ExecStartPre=` that runs `nvwa hold` (no `+`: inside the
/// sandbox, under the unit's credentials and filters); the helper restores the process into the
/// holder's namespaces. The holder must be executable there even under `NoExecPaths=/`.
pub fn restore_drop_in(
    unit: &str,
    pid: i32,
    identifier: &str,
    nvwa_exe: &Path,
    start_timeout: Duration,
    to_kernel: &str,
    sandboxed: bool,
) -> String {
    let ident = if identifier.is_empty() {
        String::new()
    } else {
        format!("SyslogIdentifier={identifier}\n")
    };
    let hold = if sandboxed {
        format!(
            "ExecStartPre={exe} {HOLD_ARG}\nExecPaths={exe}\n",
            exe = nvwa_exe.display()
        )
    } else {
        String::new()
    };
    format!(
        "# Generated by nvwa-generator: nvwa checkpointed {unit} (pid {pid}) before switching to\n\
         # kernel {to_kernel}; this start restores it instead of starting it afresh. The drop-in\n\
         # disappears at the daemon-reload that follows the recorded restore.\n\
         [Unit]\n\
         After=nvwa-pre.service\n\
         \n\
         [Service]\n\
         Type=forking\n\
         PIDFile={pidfile}\n\
         GuessMainPID=no\n\
         ExecCondition=\n\
         ExecStartPre=\n\
         {hold}\
         ExecStartPost=\n\
         ExecStart=\n\
         ExecStart=+{exe} restore {unit}@{pid}\n\
         Restart=no\n\
         TimeoutStartSec={timeout}\n\
         {ident}",
        pidfile = restore_pid_file(unit).display(),
        exe = nvwa_exe.display(),
        timeout = start_timeout.as_secs(),
    )
}

/// The argument of nvwa's holder (`nvwa hold`), also how the helper recognises it.
pub const HOLD_ARG: &str = "hold";

/// Where a cgroup's member processes are listed: the unified (v2) hierarchy, else systemd's own
/// v1 hierarchy.
pub fn cgroup_procs_files(control_group: &str) -> [PathBuf; 2] {
    let rel = control_group.trim_start_matches('/');
    [
        Path::new("/sys/fs/cgroup").join(rel).join("cgroup.procs"),
        Path::new("/sys/fs/cgroup/systemd")
            .join(rel)
            .join("cgroup.procs"),
    ]
}

/// The pids of a `cgroup.procs` file.
pub fn parse_procs(text: &str) -> Vec<i32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The processes of `control_group`, from the first of its [`cgroup_procs_files`] that `read`
/// can read; `None` if it can read none.
pub fn cgroup_members(
    control_group: &str,
    read: impl Fn(&Path) -> Option<String>,
) -> Option<Vec<i32>> {
    cgroup_procs_files(control_group)
        .iter()
        .find_map(|f| read(f))
        .map(|text| parse_procs(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_follow_systemd_rules() {
        assert_eq!(unit_name("redis-server").unwrap(), "redis-server.service");
        assert_eq!(
            unit_name("redis-server.service").unwrap(),
            "redis-server.service"
        );
        assert_eq!(unit_name("getty@tty1").unwrap(), "getty@tty1.service");
        assert_eq!(unit_name("a\\x2db").unwrap(), "a\\x2db.service");
        for (bad, why) in [
            ("", "empty"),
            (".service", "empty"),
            ("../etc/passwd", "dot"),
            ("etc/passwd", "only ASCII"),
            ("red is", "only ASCII"),
            ("sshd.socket", "only .service"),
            ("getty@", "template"),
            (".hidden", "dot"),
            ("r\u{202e}", "only ASCII"),
        ] {
            let err = unit_name(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(unit_name(&"a".repeat(300)).is_err());
    }

    #[test]
    fn show_output_is_parsed() {
        let text = "Id=redis-server.service\nMainPID=812\nType=notify\nPIDFile=\n\
                    NotifyAccess=main\nControlGroup=/system.slice/redis-server.service\n\
                    ActiveState=active\nSubState=running\n";
        let u = parse_show(text);
        assert_eq!(u.id, "redis-server.service");
        assert_eq!(u.main_pid, 812);
        assert_eq!(u.kind, ServiceType::Notify);
        assert_eq!(u.pid_file, None);
        assert_eq!(
            u.control_group.as_deref(),
            Some("/system.slice/redis-server.service")
        );
        assert_eq!(u.active_state, "active");
        let stopped = parse_show("Id=x.service\nMainPID=0\nType=oneshot\nControlGroup=\n");
        assert_eq!(stopped.main_pid, 0);
        assert_eq!(stopped.kind, ServiceType::Other("oneshot".into()));
        assert_eq!(stopped.control_group, None);
    }

    #[test]
    fn cgroup_members_are_listed() {
        assert_eq!(parse_procs("12\n40\n\n"), vec![12, 40]);
        assert_eq!(
            cgroup_procs_files("/system.slice/a.service")[0],
            Path::new("/sys/fs/cgroup/system.slice/a.service/cgroup.procs")
        );
    }
}
