//! tcp-info: nvwa-lab-workload tcp-info --pid PID
//!
//! Prints, for each established TCP connection of PID (a copy of each socket taken with
//! pidfd_getfd(2), as root), what the kernel says of it in TCP_INFO: its window scaling
//! (each side's shift; 0/0 without scaling), the options in effect and the receive window it
//! advertises. A connection restored with a wrong scale shows it here at once, whatever the
//! peer's timing: one line each, `fd N: established wscale SND/RCV options 0xO rcv_space R`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::num;

const TCP_ESTABLISHED: u8 = 1;

fn syscall_fd(nr: libc::c_long, a: libc::c_long, b: libc::c_long) -> Result<OwnedFd, String> {
    // SAFETY: pidfd_open/pidfd_getfd take integers and return a new descriptor or -1.
    let fd = unsafe { libc::syscall(nr, a, b, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: the descriptor was just returned to us and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn tcp_info(fd: &OwnedFd) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid descriptor, a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let pid = num(args, "--pid", 0)?;
    if pid == 0 {
        return Err("tcp-info needs --pid PID".into());
    }
    let pidfd = syscall_fd(libc::SYS_pidfd_open, pid as libc::c_long, 0)
        .map_err(|e| format!("pidfd_open({pid}): {e}"))?;
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<i32> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot read {dir}: {e}"))?
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    let mut established = 0;
    for n in fds {
        let Ok(fd) = syscall_fd(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd() as libc::c_long,
            n as libc::c_long,
        ) else {
            continue;
        };
        let Some(i) = tcp_info(&fd) else { continue };
        if i.tcpi_state != TCP_ESTABLISHED {
            continue;
        }
        established += 1;
        // The two shifts share one byte: snd_wscale in the low 4 bits, rcv_wscale in the high.
        let (snd, rcv) = (i.tcpi_snd_rcv_wscale & 0xf, i.tcpi_snd_rcv_wscale >> 4);
        println!(
            "fd {n}: established wscale {snd}/{rcv} options {:#x} rcv_space {}",
            i.tcpi_options, i.tcpi_rcv_space
        );
    }
    if established == 0 {
        println!("pid {pid} has no established TCP connection");
    }
    Ok(())
}
