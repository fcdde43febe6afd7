//! The `nvwa` binary as an operator sees it. Nothing here talks to a real server or touches the
//! machine: client commands are pointed at sockets in temporary directories.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;

use assert_cmd::Command;
use nvwa_core::journal::{Journal, Phase, Target, TargetKind, TargetState};

fn nvwa() -> Command {
    let mut cmd = Command::cargo_bin("nvwa").unwrap();
    cmd.env_remove("NOTIFY_SOCKET").env_remove("RUST_LOG");
    cmd
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A config dir whose criu_dir is inside it, in a place nvwa trusts: as root it refuses a config
/// directory under the world-writable /tmp.
fn config_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let base = nvwa_core::trust::trusted_scratch_base().unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let criu = dir.path().join("running");
    std::fs::create_dir(&criu).unwrap();
    std::fs::write(
        dir.path().join("nvwa-server.yaml"),
        format!(
            "criu_dir: {}\ncriu_exe: /usr/sbin/criu\nkexec_exe: /usr/sbin/kexec\n\
             systemd_etc: {}\nlog_dir: {}\n",
            criu.display(),
            dir.path().join("systemd").display(),
            dir.path().join("log").display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("nvwa-restore.yaml"),
        "pids: []\nservices: []\nrestore_net: false\nenable_quick_kexec: false\n\
         enable_pin_memory: false\nenbale_debug_mode: false\n",
    )
    .unwrap();
    (dir, criu)
}

#[test]
fn help_lists_the_subcommands() {
    let out = nvwa().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    for sub in [
        "server",
        "update",
        "init",
        "exit",
        "restore",
        "check",
        "status",
        "completions",
        "man",
        "--config-dir",
        "--socket",
    ] {
        assert!(text.contains(sub), "--help lacks {sub}:\n{text}");
    }
    let out = nvwa().args(["help", "update"]).output().unwrap();
    assert!(out.status.success());
    assert!(stdout(&out).contains("VERSION"), "{}", stdout(&out));
}

#[test]
fn restore_without_a_pid_is_refused_clearly() {
    let out = nvwa().args(["restore", "foo"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a command line clap cannot parse"
    );
    let err = stderr(&out);
    assert!(
        err.contains("SERVICE@PID") && err.contains("foo"),
        "unclear error:\n{err}"
    );
}

#[test]
fn no_server_names_the_socket_and_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nowhere.socket");
    let out = nvwa()
        .args(["--socket", sock.to_str().unwrap(), "update", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "unreachable");
    let err = stderr(&out);
    assert!(err.starts_with("nvwa: error: "), "{err}");
    assert!(
        err.contains(sock.to_str().unwrap())
            && err.contains("systemctl start nvwa")
            && err.contains("nvwa server"),
        "{err}"
    );
    assert_eq!(
        err.matches("No such file").count(),
        1,
        "cause repeated:\n{err}"
    );
}

/// A server that answers one request with `lines`; returns the request line it got.
fn answer_once(sock: &Path, lines: &str) -> std::thread::JoinHandle<String> {
    let lines = lines.to_string();
    let listener = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut req = String::new();
        BufReader::new(&s).read_line(&mut req).unwrap();
        (&s).write_all(lines.as_bytes()).unwrap();
        req
    })
}

/// Runs `nvwa --socket S ARGS` against a server that answers `lines`; returns the client's
/// output and the request line the server got.
fn against_server(lines: &str, args: &[&str]) -> (std::process::Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nvwa.socket");
    let server = answer_once(&sock, lines);
    let out = nvwa()
        .args(["--socket", sock.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (out, server.join().unwrap())
}

#[test]
fn progress_is_printed_with_elapsed_time_then_the_result() {
    let (out, request) = against_server(
        "{\"response\":\"progress\",\"event\":\"phase\",\"phase\":\"kernel_loaded\"}\n\
         {\"response\":\"progress\",\"event\":\"target\",\"target\":\"1234\",\"pid\":1234,\"state\":\"dumped\",\"detail\":\"3 MiB\"}\n\
         {\"response\":\"done\",\"message\":\"all restored\"}\n",
        &["init"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with('[') && lines[0].ends_with("s] phase kernel_loaded"),
        "{text}"
    );
    assert!(lines[1].ends_with("s] 1234 (pid) dumped: 3 MiB"), "{text}");
    assert_eq!(lines[2], "all restored");
    assert_eq!(request, "{\"request\":\"init\"}\n");
}

#[test]
fn a_refusal_is_printed_and_exits_4() {
    let (out, request) = against_server(
        "{\"response\":\"error\",\"kind\":\"refused\",\"message\":\"kernel 9.9 is not installed: no /boot/vmlinuz-9.9\"}\n",
        &["update", "9.9"],
    );
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        stderr(&out),
        "nvwa: error: kernel 9.9 is not installed: no /boot/vmlinuz-9.9\n"
    );
    assert_eq!(request, "{\"request\":\"update\",\"version\":\"9.9\"}\n");
}

#[test]
fn restore_runs_locally_and_refuses_what_was_not_saved() {
    // Run by a unit's drop-in on the new boot; without a saved update there is nothing to
    // restore, and the unit should be started normally.
    let (dir, _criu) = config_dir();
    let out = nvwa()
        .args([
            "--config-dir",
            dir.path().to_str().unwrap(),
            "restore",
            "redis@4321",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "refused: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("nothing to restore for redis.service")
            && err.contains("no update journal")
            && err.contains("systemctl restart redis.service"),
        "{err}"
    );
}

#[test]
fn the_generator_writes_nothing_without_a_saved_update() {
    let (dir, _criu) = config_dir();
    let out_dir = tempfile::tempdir().unwrap();
    let out = nvwa()
        .args(["--config-dir", dir.path().to_str().unwrap(), "generator"])
        .arg(out_dir.path())
        .args(["/run/early", "/run/late"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(out_dir.path()).unwrap().count(), 0);
}

#[test]
fn each_kind_of_failure_has_its_exit_code() {
    for (kind, code) in [
        ("refused", 4),
        ("busy", 5),
        ("rolled_back", 6),
        ("restore_failed", 7),
        ("internal", 1),
    ] {
        let (out, _) = against_server(
            &format!("{{\"response\":\"error\",\"kind\":\"{kind}\",\"message\":\"m\"}}\n"),
            &["update", "6.12"],
        );
        assert_eq!(out.status.code(), Some(code), "{kind}");
    }
}

#[test]
fn status_exit_code_follows_the_last_update() {
    let (dir, criu) = config_dir();
    let status = || {
        nvwa()
            .args(["--config-dir", dir.path().to_str().unwrap(), "status"])
            .output()
            .unwrap()
            .status
            .code()
    };
    let mut j = journal();
    j.save(&criu).unwrap();
    assert_eq!(status(), Some(6), "rolled back");
    j = Journal::new("6.1.0", "6.6.0", vec![], BOOT);
    j.save(&criu).unwrap();
    assert_eq!(status(), Some(5), "in progress");
    j.advance_all(&Phase::path_to(Phase::RestoreFailed), BOOT)
        .unwrap();
    j.save(&criu).unwrap();
    assert_eq!(status(), Some(7), "restore failed");
    j.advance_all(&[Phase::Booted, Phase::Restored], BOOT)
        .unwrap();
    j.save(&criu).unwrap();
    assert_eq!(status(), Some(0), "restored");
}

#[test]
fn update_json_streams_the_protocol_lines_and_keeps_the_exit_code() {
    let (out, request) = against_server(
        "{\"response\":\"progress\",\"event\":\"phase\",\"phase\":\"planned\"}\n\
         {\"response\":\"error\",\"kind\":\"rolled_back\",\"message\":\"undone\"}\n",
        &["update", "6.12", "--json"],
    );
    assert_eq!(out.status.code(), Some(6));
    assert_eq!(
        stdout(&out),
        "{\"response\":\"progress\",\"event\":\"phase\",\"phase\":\"planned\"}\n\
         {\"response\":\"error\",\"kind\":\"rolled_back\",\"message\":\"undone\"}\n"
    );
    assert_eq!(request, "{\"request\":\"update\",\"version\":\"6.12\"}\n");
}

#[test]
fn status_and_check_json_are_objects_with_a_verdict() {
    let (dir, _criu) = config_dir();
    let config = dir.path().to_str().unwrap();
    let out = nvwa()
        .args(["--config-dir", config, "status", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["phase"].is_null(), "{v}");
    assert_eq!(v["config_dir"], config);
    let out = nvwa()
        .args(["--config-dir", config, "check", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let verdict = v["verdict"].as_str().unwrap();
    assert!(["ok", "warn", "fail"].contains(&verdict), "{v}");
    assert_eq!(out.status.success(), verdict != "fail", "{v}");
    assert!(v["lines"].as_array().is_some_and(|l| !l.is_empty()), "{v}");
}

#[test]
fn status_without_a_journal() {
    let (dir, criu) = config_dir();
    let out = nvwa()
        .args(["--config-dir", dir.path().to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("no update has run") && text.contains(criu.to_str().unwrap()),
        "{text}"
    );
}

const BOOT: &str = "0f5e1a8c-boot-one";

fn journal() -> Journal {
    let mut j = Journal::new(
        "6.1.0",
        "6.6.0",
        vec![Target {
            tree_ids: vec![777],
            rss_bytes: 4096,
            state: TargetState::Resumed,
            dump_ms: Some(120),
            ..Target::pending("777", TargetKind::Pid, 777)
        }],
        BOOT,
    );
    j.advance(Phase::KernelLoaded, BOOT).unwrap();
    j.advance(Phase::Frozen, BOOT).unwrap();
    j.advance(Phase::RolledBack, BOOT).unwrap();
    j.error = Some("criu dump of 777 failed".into());
    j
}

#[test]
fn status_as_text() {
    let (dir, criu) = config_dir();
    journal().save(&criu).unwrap();
    let out = nvwa()
        .args(["--config-dir", dir.path().to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "rolled back: {}", stderr(&out));
    let text = stdout(&out);
    let config_line = format!("config: {}", dir.path().display());
    for want in [
        config_line.as_str(),
        "6.1.0 -> 6.6.0",
        "rolled_back",
        "criu dump of 777 failed",
        "777",
        "resumed",
        "120 ms",
        "kernel_loaded",
        "downtime:",
    ] {
        assert!(text.contains(want), "missing {want:?}:\n{text}");
    }
}

#[test]
fn status_as_json_has_the_journal_and_the_downtime() {
    let (dir, criu) = config_dir();
    let j = journal();
    j.save(&criu).unwrap();
    let out = nvwa()
        .args([
            "--config-dir",
            dir.path().to_str().unwrap(),
            "status",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "rolled back: {}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["from_kernel"], "6.1.0");
    assert_eq!(v["to_kernel"], "6.6.0");
    assert_eq!(v["phase"], "rolled_back");
    assert_eq!(v["targets"][0]["pid"], 777);
    assert_eq!(v["downtime_ms"], serde_json::json!(j.downtime_ms()));
    assert!(v["downtime_ms"].is_u64());
}

#[test]
fn the_man_page_documents_the_exit_codes() {
    let out = nvwa().arg("man").output().unwrap();
    assert!(out.status.success());
    let man = stdout(&out);
    assert!(man.contains(".TH nvwa"), "{man}");
    assert!(
        man.contains("EXIT STATUS") && man.contains("rolled back"),
        "the man page documents the exit codes:\n{man}"
    );
}

/// Starts the real server over a temporary config (empty criu_dir: nothing to restore, nothing
/// touched) and waits until it answers a ping.
fn start_server(dir: &Path, sock: &Path) -> KillOnDrop {
    use nvwa_core::protocol::Request;
    use std::time::{Duration, Instant};

    let mut server = KillOnDrop(
        std::process::Command::new(assert_cmd::cargo::cargo_bin("nvwa"))
            .args(["--config-dir", dir.to_str().unwrap()])
            .args(["--socket", sock.to_str().unwrap(), "-server", "1"])
            .env_remove("NOTIFY_SOCKET")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Ready when a ping is answered (the socket file alone may exist a moment before listen).
    let deadline = Instant::now() + Duration::from_secs(20);
    let pong = loop {
        match nvwa_core::client::request(sock, &Request::Ping, &mut |_| {}) {
            Ok(pong) => break pong,
            Err(e) => {
                assert!(Instant::now() < deadline, "server never answered: {e}");
                assert!(server.0.try_wait().unwrap().is_none(), "server died: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert!(pong.contains("running"), "{pong}");
    server
}

/// A shell that the completion tests need; its absence fails with the install command.
fn shell(name: &str) -> std::path::PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("{name} is needed to test its completions: apt-get install {name}")
    })
}

/// Writes the completion script for `sh_name` and a stub `nvwa` (first in PATH) whose `kernels`
/// lists 9.9.1-test and 9.10.0-test; returns (dir, script, PATH).
fn completion_setup(sh_name: &str) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = nvwa().args(["completions", sh_name]).output().unwrap();
    assert!(out.status.success());
    let script = dir.path().join(format!("completion.{sh_name}"));
    std::fs::write(&script, &out.stdout).unwrap();
    let stub = dir.path().join("nvwa");
    std::fs::write(
        &stub,
        "#!/bin/sh\n[ \"$1\" = kernels ] && printf '9.10.0-test\\n9.9.1-test\\n'\n",
    )
    .unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (dir, script, path)
}

#[test]
fn bash_completes_kernel_versions_for_update_and_check() {
    let (_dir, script, path) = completion_setup("bash");
    for sub in ["update", "check"] {
        let out = std::process::Command::new(shell("bash"))
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=(nvwa {sub} 9.9); COMP_CWORD=2; _nvwa_with_kernels; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script.display()
            ))
            .env("PATH", &path)
            .output()
            .unwrap();
        assert_eq!(stdout(&out), "9.9.1-test\n", "{sub}: {}", stderr(&out));
    }
}

#[test]
fn fish_completes_kernel_versions_for_update_and_check() {
    let (_dir, script, path) = completion_setup("fish");
    for sub in ["update", "check"] {
        let out = std::process::Command::new(shell("fish"))
            .arg("--no-config")
            .arg("-c")
            .arg(format!(
                "source {}; complete -C 'nvwa {sub} 9.'",
                script.display()
            ))
            .env("PATH", &path)
            .output()
            .unwrap();
        let text = stdout(&out);
        assert!(
            text.lines().any(|l| l == "9.10.0-test") && text.lines().any(|l| l == "9.9.1-test"),
            "{sub}: {text}{}",
            stderr(&out)
        );
    }
}

#[test]
fn zsh_completes_kernel_versions_for_update_and_check() {
    let (_dir, script, path) = completion_setup("zsh");
    let text = std::fs::read_to_string(&script).unwrap();
    assert_eq!(
        text.matches(":_nvwa_kernels'").count(),
        2,
        "update and check use it"
    );
    // The lister itself, with compadd (only usable inside completion) standing in as a printer.
    let out = std::process::Command::new(shell("zsh"))
        .arg("-fc")
        .arg(format!(
            "compdef() {{ :; }}; compadd() {{ [[ $1 == -a ]] && print -l -- ${{(P)2}}; }}; source {}; _nvwa_kernels",
            script.display()
        ))
        .env("PATH", &path)
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out),
        "9.10.0-test\n9.9.1-test\n",
        "{}",
        stderr(&out)
    );
}

/// Driven by the real client: the server answers, `nvwa exit` stops it and its socket goes away.
#[test]
fn server_answers_then_exits_on_request() {
    let (dir, _criu) = config_dir();
    let sock = dir.path().join("run").join("nvwa.socket");
    let mut server = start_server(dir.path(), &sock);
    let server = &mut server.0;

    let out = nvwa()
        .args(["--socket", sock.to_str().unwrap(), "exit"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(server.wait().unwrap().success());
    assert!(!sock.exists(), "the socket must be removed on exit");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(sock.parent().unwrap())
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);
}

/// SIGTERM (what `systemctl stop` sends) stops an idle server cleanly: exit 0, socket removed.
#[test]
fn sigterm_stops_an_idle_server() {
    let (dir, _criu) = config_dir();
    let sock = dir.path().join("run").join("nvwa.socket");
    let mut server = start_server(dir.path(), &sock);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "the socket must be removed");
}

/// Ends a spawned server if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
