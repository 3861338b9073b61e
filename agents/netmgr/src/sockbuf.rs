//! Larger buffers for the device's UDP sockets.
//!
//! The kernel opens a UDP socket with `net.core.rmem_default` of receive buffer, 208 KiB on
//! Debian. A few hundred Mbit/s of tunnelled TCP overflow that (`UdpRcvbufErrors`): every
//! datagram dropped there was encrypted, sent and decrypted for nothing and costs TCP a
//! retransmission and a halved window. wireguard-go sets 7 MiB on its sockets (since
//! 0.0.20230223), and so does the device ([`enlarge`]): `SO_RCVBUFFORCE`, which
//! `CAP_NET_ADMIN` allows beyond `net.core.rmem_max`, else `SO_RCVBUF`, which the kernel caps
//! there. The memory is the kernel's, taken only while datagrams wait.

use std::os::fd::{AsRawFd, RawFd};

/// The receive and send buffer each UDP socket gets (the kernel doubles it for its
/// bookkeeping, as it reports back).
pub const SOCKET_BUFFER: usize = 7 << 20;

/// Gives `socket` [`SOCKET_BUFFER`] to receive and to send, as far as this process may.
pub fn enlarge(socket: &impl AsRawFd) {
    let fd = socket.as_raw_fd();
    let want = SOCKET_BUFFER as libc::c_int;
    for (option, force) in [
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
    ] {
        if !set_int(fd, force, want) && !set_int(fd, option, want) {
            tracing::debug!(option, "could not enlarge a socket buffer");
        }
    }
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
    use nix::sys::socket::{getsockopt, sockopt};

    #[test]
    fn a_socket_gets_the_larger_buffers() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = (
            getsockopt(&udp, sockopt::RcvBuf).unwrap(),
            getsockopt(&udp, sockopt::SndBuf).unwrap(),
        );
        enlarge(&udp);
        let (receive, send) = (
            getsockopt(&udp, sockopt::RcvBuf).unwrap(),
            getsockopt(&udp, sockopt::SndBuf).unwrap(),
        );
        // As far as this process may: the size with CAP_NET_ADMIN (root), else
        // net.core.rmem_max / wmem_max.
        assert!(receive >= before.0 && send >= before.1);
        if nix::unistd::geteuid().is_root() {
            assert_eq!(receive, 2 * SOCKET_BUFFER);
            assert_eq!(send, 2 * SOCKET_BUFFER);
        }
    }
}
