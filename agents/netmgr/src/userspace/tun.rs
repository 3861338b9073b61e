//! The TUN interface: queues of one multi-queue interface, each a file descriptor that a
//! thread reads packets from (the kernel spreads flows over the queues) and that any thread
//! may write packets to. The interface lives as long as a queue is open: when the device
//! process ends, it goes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags, padded to the union's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// One queue of the TUN interface: packets without a packet-information header.
#[derive(Debug)]
pub struct TunQueue {
    file: File,
}

impl TunQueue {
    /// Opens a queue of the interface `name`, creating the interface if it has none yet.
    pub fn open(name: &str) -> std::io::Result<TunQueue> {
        let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad name");
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(invalid());
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: the fd is open, and `request` is a whole `struct ifreq` that outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut request) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(TunQueue { file })
    }

    /// Another handle on the same queue (for writers on other threads).
    pub fn try_clone(&self) -> std::io::Result<TunQueue> {
        Ok(TunQueue {
            file: self.file.try_clone()?,
        })
    }

    /// Reads one packet into `buf`, blocking until one comes; returns its length.
    pub fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one packet.
    pub fn write(&self, packet: &[u8]) -> std::io::Result<()> {
        (&self.file).write(packet).map(drop)
    }
}
