//! `nvwa-lab-workload as-user`: what `lab_as_user` in the guest relies on.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_nvwa-lab-workload");

fn passwd_entry(name: &str) -> Option<(String, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| (f[2].to_string(), f[3].to_string()))
    })
}

#[test]
fn a_command_runs_with_the_users_ids_and_no_other_groups() {
    // Debian and every CI image have `nobody`; without it this test cannot say anything.
    let (uid, gid) = passwd_entry("nobody").expect("/etc/passwd has no `nobody` user");
    let out = Command::new(BIN)
        .args([
            "as-user",
            "nobody",
            "sh",
            "-c",
            "id -u; id -g; id -G; echo $HOME $USER",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if unsafe { libc::geteuid() } == 0 {
        assert!(out.status.success(), "{err}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], uid, "{text}");
        assert_eq!(lines[1], gid, "{text}");
        assert_eq!(lines[2], gid, "no supplementary groups: {text}");
        assert!(lines[3].ends_with(" nobody"), "{text}");
    } else {
        // Without root the ids cannot change: it must say so, never run the command as us.
        assert!(!out.status.success(), "{text}");
        assert!(err.contains("nobody"), "{err}");
        assert!(text.is_empty(), "{text}");
    }
}

#[test]
fn an_unknown_user_is_named() {
    let out = Command::new(BIN)
        .args(["as-user", "no-such-user-here", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-user-here"), "{err}");
}
