//! Host steps: commands a scenario runs on the host while its guest runs (a client of a guest
//! service through a port forward, a fleet tool driving the guest over SSH). The guest starts one
//! by calling `lab_host WHEN` (an event on its serial console); the runner then starts every
//! `[[host]]` step with that `when` in the background (bash) and, once the guest has powered off, waits
//! for it until the scenario's deadline. A step's exit status counts like a check.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use crate::scenario::HostStep;
use crate::vm::{Line, Stamped};

/// What the host steps of one scenario run see in their environment besides their own.
pub struct HostEnv {
    /// The run's directory (serial log, events, the steps' logs).
    pub run_dir: PathBuf,
    /// Where `run` executes: the scenario's directory.
    pub cwd: PathBuf,
    /// (guest port, host port) of every forward: `LAB_PORT_<guest>=<host>`.
    pub ports: Vec<(u16, u16)>,
    /// The lab's binaries built from this checkout (`nvwa-lab-workload`, e.g. its host-side
    /// `tcp-client`), first on the steps' PATH.
    pub bin_dir: Option<PathBuf>,
}

struct Started {
    name: String,
    log: PathBuf,
    /// The step's process group (its own, so that a deadline kills what it started too).
    pgid: i32,
    done: mpsc::Receiver<std::io::Result<ExitStatus>>,
}

pub struct HostSteps<'a> {
    steps: &'a [HostStep],
    env: HostEnv,
    started: Vec<Started>,
    /// Steps that could not start, and `lab_host` calls no step answers.
    failures: Vec<String>,
}

impl<'a> HostSteps<'a> {
    pub fn new(steps: &'a [HostStep], env: HostEnv) -> HostSteps<'a> {
        HostSteps {
            steps,
            env,
            started: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Starts the steps a `host` event from the guest asks for; every other line is ignored.
    pub fn on_line(&mut self, line: &Stamped) {
        let Line::Event(v) = &line.line else { return };
        if v["event"] != "host" {
            return;
        }
        let when = v["name"].as_str().unwrap_or_default().to_string();
        let due: Vec<&HostStep> = self.steps.iter().filter(|s| s.when == when).collect();
        if due.is_empty() {
            self.failures.push(format!(
                "the guest called `lab_host {when}` but no [[host]] step has when = \"{when}\""
            ));
        }
        for step in due {
            if self.started.iter().any(|s| s.name == step.name) {
                self.failures.push(format!(
                    "host step {:?} was asked for twice (`lab_host {when}`): a step runs once",
                    step.name
                ));
                continue;
            }
            match self.start(step) {
                Ok(s) => self.started.push(s),
                Err(e) => self
                    .failures
                    .push(format!("host step {:?} could not start: {e}", step.name)),
            }
        }
    }

    fn start(&self, step: &HostStep) -> std::io::Result<Started> {
        let log = self
            .env
            .run_dir
            .join(format!("host-{}.log", slug(&step.name)));
        let out = File::create(&log)?;
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(&step.run)
            .current_dir(&self.env.cwd)
            .env("LAB_RUN_DIR", &self.env.run_dir)
            .envs(port_vars(&self.env.ports))
            .envs(self.env.bin_dir.as_ref().map(|d| {
                let path = std::env::var_os("PATH").unwrap_or_default();
                let mut dirs = vec![d.clone()];
                dirs.extend(std::env::split_paths(&path));
                ("PATH", std::env::join_paths(dirs).unwrap_or(path))
            }))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let mut child = cmd.spawn()?;
        let pgid = child.id() as i32;
        let (tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        Ok(Started {
            name: step.name.clone(),
            log,
            pgid,
            done,
        })
    }

    /// Waits for every started step until `deadline` (then kills its process group) and returns
    /// the failures: steps that failed, timed out or were never asked for.
    pub fn finish(mut self, deadline: Instant) -> Vec<String> {
        for step in self.steps {
            if !self.started.iter().any(|s| s.name == step.name) {
                self.failures.push(format!(
                    "host step {:?} never ran: the guest never called `lab_host {}`",
                    step.name, step.when
                ));
            }
        }
        for s in self.started {
            let left = deadline.saturating_duration_since(Instant::now());
            let verdict = match s.done.recv_timeout(left) {
                Ok(Ok(status)) if status.success() => continue,
                Ok(Ok(status)) => format!("failed ({status})"),
                Ok(Err(e)) => format!("could not be waited for: {e}"),
                Err(_) => {
                    // SAFETY: kill(2) on the step's own process group; no memory is involved.
                    unsafe { libc::kill(-s.pgid, libc::SIGKILL) };
                    let _ = s.done.recv();
                    "was still running at the scenario's deadline and was killed".to_string()
                }
            };
            self.failures.push(format!(
                "host step {:?} {verdict}; its output ({}):\n{}",
                s.name,
                s.log.display(),
                tail(&s.log, 25)
            ));
        }
        self.failures
    }
}

/// `LAB_PORT_<guest port>` = the host port that reaches it.
fn port_vars(ports: &[(u16, u16)]) -> BTreeMap<String, String> {
    ports
        .iter()
        .map(|(guest, host)| (format!("LAB_PORT_{guest}"), host.to_string()))
        .collect()
}

/// A step's name as a file name: letters and digits kept, runs of anything else one dash.
fn slug(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').chars().take(60).collect()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What `nvwa-lab-workload tcp-client` leaves in the run directory (scenarios pass these
/// paths): its report, and the file whose appearance stops it.
pub const CLIENT_RESULT: &str = "tcp-client.json";
pub const CLIENT_STOP: &str = "tcp-client.stop";

/// The client-visible figures of a run whose host steps ran the lab's TCP client: the blackout
/// (last answer before the switch → first answer after it, on the host's clock) and the slowest
/// answer afterwards, for the report's timeline.
pub fn client_timeline(run_dir: &Path) -> Vec<crate::report::PhaseTime> {
    let Ok(text) = std::fs::read_to_string(run_dir.join(CLIENT_RESULT)) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    [
        ("client blackout", "blackout_ms"),
        ("client: slowest answer after", "slowest_answer_after_ms"),
    ]
    .into_iter()
    .filter_map(|(phase, key)| {
        Some(crate::report::PhaseTime {
            phase: phase.into(),
            ms: v[key].as_u64()?,
        })
    })
    .collect()
}

/// A free TCP port on 127.0.0.1 for a forward, chosen by the kernel. Another program may take it
/// before QEMU binds it; QEMU then fails to start and says so.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn step(name: &str, when: &str, run: &str) -> HostStep {
        HostStep {
            name: name.into(),
            when: when.into(),
            run: run.into(),
        }
    }

    fn host_event(name: &str) -> Stamped {
        Stamped {
            at_ms: 0,
            line: Line::Event(serde_json::json!({"event": "host", "name": name})),
        }
    }

    fn env(dir: &Path) -> HostEnv {
        HostEnv {
            run_dir: dir.to_path_buf(),
            cwd: dir.to_path_buf(),
            ports: vec![(7000, 40123)],
            bin_dir: None,
        }
    }

    #[test]
    fn a_step_runs_when_the_guest_asks_and_sees_its_ports_and_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let steps = [step(
            "client",
            "go",
            "echo \"$LAB_PORT_7000\" > \"$LAB_RUN_DIR/port\"",
        )];
        let mut h = HostSteps::new(&steps, env(dir.path()));
        h.on_line(&host_event("go"));
        let failures = h.finish(Instant::now() + Duration::from_secs(30));
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("port")).unwrap(),
            "40123\n"
        );
    }

    #[test]
    fn a_failing_step_is_a_failure_with_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let steps = [step("the client", "go", "echo refused by peer; exit 3")];
        let mut h = HostSteps::new(&steps, env(dir.path()));
        h.on_line(&host_event("go"));
        let failures = h.finish(Instant::now() + Duration::from_secs(30));
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains("\"the client\" failed"),
            "{}",
            failures[0]
        );
        assert!(failures[0].contains("refused by peer"), "{}", failures[0]);
        assert!(dir.path().join("host-the-client.log").exists());
    }

    #[test]
    fn a_step_never_asked_for_and_a_call_nobody_answers_are_failures() {
        let dir = tempfile::tempdir().unwrap();
        let steps = [step("client", "go", "true")];
        let mut h = HostSteps::new(&steps, env(dir.path()));
        h.on_line(&host_event("gone"));
        let failures = h.finish(Instant::now() + Duration::from_secs(30));
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures[0].contains("`lab_host gone`"), "{}", failures[0]);
        assert!(failures[1].contains("never ran"), "{}", failures[1]);
    }

    #[test]
    fn a_step_past_the_deadline_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        // The background sleep is in the step's process group: it dies with the step, so the
        // log's writer is gone too.
        let steps = [step("hang", "go", "sleep 600 & echo started; wait")];
        let mut h = HostSteps::new(&steps, env(dir.path()));
        h.on_line(&host_event("go"));
        let failures = h.finish(Instant::now() + Duration::from_millis(300));
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("killed"), "{}", failures[0]);
    }

    #[test]
    fn the_clients_blackout_joins_the_timeline() {
        let dir = tempfile::tempdir().unwrap();
        assert!(client_timeline(dir.path()).is_empty());
        std::fs::write(
            dir.path().join(CLIENT_RESULT),
            r#"{"requests":46,"answers":46,"blackout_ms":13285,"slowest_answer_after_ms":32,"error":null}"#,
        )
        .unwrap();
        let t = client_timeline(dir.path());
        assert_eq!(t[0].phase, "client blackout");
        assert_eq!(t[0].ms, 13285);
        assert_eq!(t[1].ms, 32);
    }

    #[test]
    fn names_become_file_names() {
        assert_eq!(
            slug("A client on the host: keeps its socket!"),
            "a-client-on-the-host-keeps-its-socket"
        );
    }
}
