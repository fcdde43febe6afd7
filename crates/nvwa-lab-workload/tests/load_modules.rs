//! `nvwa-lab-workload load-modules`: what it says of modules that do not load. (It never loads a
//! real module here: the lab's guests are where it does its job.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_nvwa-lab-workload");

#[test]
fn names_each_module_that_did_not_load_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.ko");
    let not_a_module = dir.path().join("garbage.ko");
    std::fs::write(&not_a_module, b"not an ELF file").unwrap();
    let list = dir.path().join("load-order");
    std::fs::write(
        &list,
        format!("{}\n\n{}\n", missing.display(), not_a_module.display()),
    )
    .unwrap();

    let out = Command::new(BIN)
        .arg("load-modules")
        .arg(&list)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("{}: cannot open it", missing.display())),
        "{stdout}"
    );
    // The kernel refuses a file that is not a module (ENOEXEC), or any module from a process
    // without CAP_SYS_MODULE (EPERM): either way it is named, after the first failure.
    assert!(
        stdout.contains(&format!(
            "{}: the kernel refused it",
            not_a_module.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("2 modules in "), "{stdout}");
    assert!(stdout.contains(", 2 failed"), "{stdout}");
    assert!(stderr.contains("2 of the modules in"), "{stderr}");
}

#[test]
fn an_unreadable_list_is_an_error_that_names_it() {
    let out = Command::new(BIN)
        .args(["load-modules", "/nonexistent/load-order"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read /nonexistent/load-order"),
        "{stderr}"
    );
}
