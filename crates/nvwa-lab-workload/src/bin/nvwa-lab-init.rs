//! pid 1 of a lab guest: runs the lab's init script and reaps every orphan, as systemd does on a
//! real server. A busybox shell as pid 1 leaves orphans as zombies, which hold their pids, and a
//! held pid is exactly what a restore must not meet by accident.
//!
//! usage: nvwa-lab-init SCRIPT

use std::process::Command;

fn power_off() -> ! {
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    std::process::exit(1)
}

fn main() {
    let script = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/lab/init.sh".into());
    let main = match Command::new("/bin/sh").arg(&script).spawn() {
        Ok(child) => child.id() as libc::pid_t,
        Err(e) => {
            eprintln!("nvwa-lab-init: cannot run {script}: {e}");
            power_off()
        }
    };
    loop {
        let mut status = 0;
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == main {
            // The script powers the guest off itself; getting here means it died early.
            eprintln!("nvwa-lab-init: {script} exited (status {status}) without powering off");
            power_off();
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            power_off();
        }
    }
}
