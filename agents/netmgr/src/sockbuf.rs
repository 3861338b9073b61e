//! Larger buffers for the device's UDP sockets.
//!
//! boringtun 0.7 opens its UDP sockets — the listening pair, and a connected socket for a peer
//! once that peer's packets arrive (again when it roams) — with the kernel's default buffers
//! (`net.core.rmem_default`, 208 KiB on Debian). A few hundred Mbit/s of tunnelled TCP
//! overflow the receiving socket (`UdpRcvbufErrors`): every datagram dropped there was
//! encrypted, sent and decrypted for nothing and costs TCP a retransmission and a halved
//! window. wireguard-go sets 7 MiB on its sockets (since 0.0.20230223); `wgdevice` gives
//! boringtun's sockets the same from outside, since boringtun offers no setting: it looks for
//! the process's own IPv4 and IPv6 datagram sockets (`/proc/self/fd`) after every UAPI `set`
//! and every [`RESCAN`], and raises the buffers of those below [`SOCKET_BUFFER`]
//! (`SO_RCVBUFFORCE`, which `CAP_NET_ADMIN` allows beyond `net.core.rmem_max`; without it
//! `SO_RCVBUF`, which the kernel caps there). The memory is the kernel's, taken only while
//! datagrams wait.

use std::os::fd::RawFd;
use std::time::Duration;

/// The receive and send buffer each UDP socket gets (the kernel doubles it for its
/// bookkeeping, as it reports back).
pub const SOCKET_BUFFER: usize = 7 << 20;

/// How often the device looks for new sockets (a peer's connected socket appears when its
/// first packet arrives).
pub const RESCAN: Duration = Duration::from_secs(1);

/// Raises the receive and send buffers of every IPv4 and IPv6 datagram socket of this
/// process that has less than [`SOCKET_BUFFER`]; returns how many sockets it changed.
pub fn raise_udp_buffers() -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let fds: Vec<RawFd> = entries
        .filter_map(|e| {
            let entry = e.ok()?;
            let fd: RawFd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            target
                .to_str()
                .is_some_and(|t| t.starts_with("socket:"))
                .then_some(fd)
        })
        .collect();
    let mut raised = 0;
    for fd in fds {
        let domain = get_int(fd, libc::SO_DOMAIN);
        if get_int(fd, libc::SO_TYPE) != Some(libc::SOCK_DGRAM)
            || !matches!(domain, Some(libc::AF_INET | libc::AF_INET6))
        {
            continue;
        }
        let receive = raise(fd, libc::SO_RCVBUF, libc::SO_RCVBUFFORCE);
        let send = raise(fd, libc::SO_SNDBUF, libc::SO_SNDBUFFORCE);
        if receive || send {
            raised += 1;
        }
    }
    raised
}

/// Sets buffer option `option` of `fd` to [`SOCKET_BUFFER`] (through `force` if allowed)
/// unless it has that much already; whether it set it.
fn raise(fd: RawFd, option: libc::c_int, force: libc::c_int) -> bool {
    let want = SOCKET_BUFFER as libc::c_int;
    // The kernel reports twice what was set.
    if get_int(fd, option).is_some_and(|have| have >= want.saturating_mul(2)) {
        return false;
    }
    set_int(fd, force, want) || set_int(fd, option, want)
}

/// `getsockopt(fd, SOL_SOCKET, name)` of an int.
fn get_int(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value` and the new length into
    // `len`, both on this stack frame. `fd` is only a number to it: a descriptor closed since
    // it was listed gives EBADF, one reused meanwhile is checked for what it is like any other.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// `setsockopt(fd, SOL_SOCKET, name, value)` of an int; whether it succeeded.
fn set_int(fd: RawFd, name: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: the kernel reads `size_of::<c_int>()` bytes from `value`, on this stack frame.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn udp_sockets_get_larger_buffers_and_others_are_left_alone() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (unix, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let before = |fd| {
            (
                get_int(fd, libc::SO_RCVBUF).unwrap(),
                get_int(fd, libc::SO_SNDBUF).unwrap(),
            )
        };
        let (tcp_before, unix_before) = (before(tcp.as_raw_fd()), before(unix.as_raw_fd()));
        let udp_before = before(udp.as_raw_fd());
        assert!(raise_udp_buffers() >= 1);
        let (receive, send) = before(udp.as_raw_fd());
        // Raised as far as this process may: to the size with CAP_NET_ADMIN (root), else to
        // net.core.rmem_max / wmem_max.
        assert!(receive >= udp_before.0 && send >= udp_before.1);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(receive, 2 * SOCKET_BUFFER as libc::c_int);
            assert_eq!(send, 2 * SOCKET_BUFFER as libc::c_int);
            // Done once: a socket that has them is not set again.
            assert!(!raise(
                udp.as_raw_fd(),
                libc::SO_RCVBUF,
                libc::SO_RCVBUFFORCE
            ));
        }
        assert_eq!(before(tcp.as_raw_fd()), tcp_before);
        assert_eq!(before(unix.as_raw_fd()), unix_before);
    }
}
