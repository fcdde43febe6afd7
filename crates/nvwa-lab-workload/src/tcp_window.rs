//! tcp-window: nvwa-lab-workload tcp-window --port P [--to ADDR] [--iface NAME] [--segments N]
//!             [--deadline-s S]
//!
//! Watches the TCP segments this machine sends from local port P (to address ADDR only, on
//! interface NAME only, if given; an AF_PACKET socket, as root) and prints the receive window each one advertises, as it is on the wire:
//! `segment to A:B advertises window W`, N of them (default 3), then exits 0; exits 1 if none
//! came before the deadline. It is how a scenario sees a connection restored with a window
//! scale its peer never agreed to: the kernel's TCP_INFO shows scales only when both sides
//! negotiated scaling, so a socket with a stray receive scale looks unscaled there while it
//! advertises a window of a few bytes.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::{num, opt};

/// The receive window of a TCP segment sent from `port`, from an IPv4 packet (no link header),
/// and where it goes; None for anything else.
pub fn advertised_window(packet: &[u8], port: u16) -> Option<(u16, String)> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet.first()? >> 4 != 4 || *packet.get(9)? != libc::IPPROTO_TCP as u8 || ihl < 20 {
        return None;
    }
    let tcp = packet.get(ihl..ihl + 20)?;
    let be16 = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    if be16(0) != port {
        return None;
    }
    let to = format!(
        "{}.{}.{}.{}:{}",
        packet[16],
        packet[17],
        packet[18],
        packet[19],
        be16(2)
    );
    Some((be16(14), to))
}

pub fn run(args: &[String]) -> Result<(), String> {
    let port = num(args, "--port", 0)? as u16;
    if port == 0 {
        return Err("tcp-window needs --port P".into());
    }
    let to_addr = opt(args, "--to");
    let wanted = num(args, "--segments", 3)?;
    let deadline = Instant::now() + Duration::from_secs(num(args, "--deadline-s", 60)?);
    let iface = opt(args, "--iface");
    // Index 0: every interface.
    let index = match &iface {
        None => 0,
        Some(i) => {
            let name = CString::new(i.as_str()).map_err(|_| format!("bad interface {i:?}"))?;
            // SAFETY: a NUL-terminated name.
            match unsafe { libc::if_nametoindex(name.as_ptr()) } {
                0 => return Err(format!("no interface {i}")),
                n => n,
            }
        }
    };
    let place = iface.as_deref().unwrap_or("any interface");
    // Every protocol: a tap for IPv4 alone sees only received frames (the kernel hands the
    // frames it sends to taps of all protocols only); advertised_window keeps the IPv4 ones.
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
    if fd < 0 {
        return Err(format!(
            "cannot open a packet socket (root only): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: just returned, owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    at.sll_family = libc::AF_PACKET as u16;
    at.sll_protocol = proto;
    at.sll_ifindex = index as i32;
    // SAFETY: a valid descriptor and address of the given size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&at as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot bind to {place}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a valid descriptor and a timeval.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    // Without the timeout a quiet port would block recv past the deadline.
    if rc != 0 {
        return Err(format!(
            "cannot set a receive timeout: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut seen = 0;
    let mut buf = [0u8; 2048];
    while seen < wanted {
        if Instant::now() > deadline {
            return Err(format!(
                "{seen} segment(s) from port {port} on {place} before the deadline, {wanted} wanted"
            ));
        }
        // SAFETY: a buffer of the given size.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        // Every segment from port P is this machine's (the peer's come from its own port); the
        // packet type is not checked, since on lo a sent segment is seen only as received.
        if n <= 0 {
            continue;
        }
        if let Some((window, to)) = advertised_window(&buf[..n as usize], port) {
            if to_addr
                .as_ref()
                .is_some_and(|a| !to.starts_with(&format!("{a}:")))
            {
                continue;
            }
            println!("segment to {to} advertises window {window}");
            seen += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(sport: u16, window: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = 6;
        p[16..20].copy_from_slice(&[10, 0, 2, 2]);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&40000u16.to_be_bytes());
        p[34..36].copy_from_slice(&window.to_be_bytes());
        p
    }

    #[test]
    fn the_window_of_a_segment_from_the_port_is_read_off_the_wire() {
        assert_eq!(
            advertised_window(&segment(7000, 4), 7000),
            Some((4, "10.0.2.2:40000".into()))
        );
        assert_eq!(advertised_window(&segment(7001, 4), 7000), None);
        let mut udp = segment(7000, 4);
        udp[9] = 17;
        assert_eq!(advertised_window(&udp, 7000), None);
        assert_eq!(advertised_window(&segment(7000, 4)[..30], 7000), None);
    }
}
