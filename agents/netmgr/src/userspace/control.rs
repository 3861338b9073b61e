//! The device's side of WireGuard's cross-platform userspace API: the text protocol on the
//! unix socket at `/var/run/wireguard/<iface>.sock` that `wg` and netmgr ([`crate::uapi`])
//! speak. `get=1` describes the device; `set=1` changes it. Each request ends with a blank
//! line, each reply with `errno=N` and a blank line; a client may send several requests on
//! one connection.
//!
//! A `set` is read whole and checked before anything changes: a request with one bad line
//! changes nothing (WireGuard's own implementations apply the lines before it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::Device;

/// How long a client has to send a request and take the reply: a stuck client must not hold
/// the socket, which serves one client at a time.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a connection may send (a `set` of thousands of peers is a few hundred KB).
pub const MAX_REQUEST: u64 = 16 << 20;

/// The error numbers the protocol answers with.
pub mod errno {
    /// A value that does not parse, or a peer key that is not one.
    pub const EINVAL: i32 = libc::EINVAL;
    /// A line that is not `key=value`, or a key the protocol does not have.
    pub const EPROTO: i32 = libc::EPROTO;
    /// The listen port is taken.
    pub const EADDRINUSE: i32 = libc::EADDRINUSE;
    /// Anything else that failed.
    pub const EIO: i32 = libc::EIO;
}

/// A `set=1` request, read and checked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// A new private key; all zeros removes it.
    pub private_key: Option<[u8; 32]>,
    /// A new listen port (0: one the kernel picks).
    pub listen_port: Option<u16>,
    /// A new firewall mark for the sockets (0: none).
    pub fwmark: Option<u32>,
    /// Remove every peer before the peers below.
    pub replace_peers: bool,
    /// Peer sections, in order.
    pub peers: Vec<PeerChange>,
}

/// One peer section of a `set`.
#[derive(Debug, PartialEq, Eq)]
pub struct PeerChange {
    /// The peer.
    pub public_key: [u8; 32],
    /// Remove it.
    pub remove: bool,
    /// Change it only if it exists.
    pub update_only: bool,
    /// A new preshared key; all zeros removes it.
    pub preshared_key: Option<[u8; 32]>,
    /// A new endpoint.
    pub endpoint: Option<SocketAddr>,
    /// A new persistent keepalive, seconds (0: off).
    pub keepalive: Option<u16>,
    /// Drop its allowed IPs before adding those below.
    pub replace_allowed_ips: bool,
    /// Allowed IPs to add.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerChange {
    /// A section for `public_key` that changes nothing yet.
    pub fn new(public_key: [u8; 32]) -> PeerChange {
        PeerChange {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// Reads the lines of a `set` (without `set=1` and the blank line).
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<SetRequest, i32> {
    let mut request = SetRequest::default();
    for line in lines {
        read_set_line(&mut request, line)?;
    }
    Ok(request)
}

/// Adds one line of a `set` to `request`: a device key before the first `public_key=`, a
/// peer key after it.
fn read_set_line(request: &mut SetRequest, line: &str) -> Result<(), i32> {
    let (key, value) = line.split_once('=').ok_or(errno::EPROTO)?;
    let flag = || match value {
        "true" => Ok(true),
        _ => Err(errno::EINVAL),
    };
    let number = || value.parse::<u32>().map_err(|_| errno::EINVAL);
    let Some(peer) = request.peers.last_mut().filter(|_| key != "public_key") else {
        match key {
            "private_key" => request.private_key = Some(parse_key(value)?),
            "listen_port" => {
                request.listen_port = Some(u16::try_from(number()?).map_err(|_| errno::EINVAL)?)
            }
            "fwmark" => request.fwmark = Some(number()?),
            "replace_peers" => request.replace_peers = flag()?,
            "public_key" => request.peers.push(PeerChange::new(parse_key(value)?)),
            _ => return Err(errno::EPROTO),
        }
        return Ok(());
    };
    match key {
        "remove" => peer.remove = flag()?,
        "update_only" => peer.update_only = flag()?,
        "preshared_key" => peer.preshared_key = Some(parse_key(value)?),
        "endpoint" => peer.endpoint = Some(value.parse().map_err(|_| errno::EINVAL)?),
        "persistent_keepalive_interval" => {
            peer.keepalive = Some(u16::try_from(number()?).map_err(|_| errno::EINVAL)?)
        }
        "replace_allowed_ips" => peer.replace_allowed_ips = flag()?,
        "allowed_ip" => peer
            .allowed_ips
            .push(value.parse().map_err(|_| errno::EINVAL)?),
        "protocol_version" if value == "1" => {}
        "protocol_version" => return Err(errno::EINVAL),
        _ => return Err(errno::EPROTO),
    }
    Ok(())
}

fn parse_key(hex: &str) -> Result<[u8; 32], i32> {
    let mut key = [0; 32];
    ::hex::decode_to_slice(hex, &mut key).map_err(|_| errno::EINVAL)?;
    Ok(key)
}

/// Serves clients one at a time until accepting fails; returns why.
pub fn serve(listener: UnixListener, device: &Arc<Device>) -> std::io::Error {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_client(stream, device) {
                    tracing::debug!(error = %e, "UAPI client");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Out of descriptors or memory for now, or a client gone before it was taken:
            // the next client may fare better; the data plane must not end for it.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EMFILE
                            | libc::ENFILE
                            | libc::ENOBUFS
                            | libc::ENOMEM
                            | libc::ECONNABORTED
                    )
                ) =>
            {
                tracing::warn!(error = %e, "accepting a UAPI client");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return e,
        }
    }
}

fn serve_client(stream: UnixStream, device: &Arc<Device>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut writer = &stream;
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST));
    let mut line = String::new();
    loop {
        if !read_line(&mut reader, &mut line)? {
            return Ok(());
        }
        let reply = match line.as_str() {
            "get=1" => {
                skip_to_blank_line(&mut reader, &mut line)?;
                let mut reply = device.describe();
                reply.push_str("errno=0\n\n");
                reply
            }
            "set=1" => {
                // Read a line at a time into the request: a thousand peers are 4,000 lines.
                let mut request = Ok(SetRequest::default());
                loop {
                    if !read_line(&mut reader, &mut line)? {
                        // Cut off (or over MAX_REQUEST): nothing of it is applied.
                        return Ok(());
                    }
                    if line.is_empty() {
                        break;
                    }
                    if let Ok(read) = &mut request {
                        if let Err(errno) = read_set_line(read, &line) {
                            request = Err(errno);
                        }
                    }
                }
                let errno = request.and_then(|request| device.apply(request));
                // What a set of a thousand peers allocated and freed would stay resident.
                agentbase::memory::release_free();
                format!("errno={}\n\n", errno.err().unwrap_or(0))
            }
            _ => {
                writer.write_all(format!("errno={}\n\n", errno::EINVAL).as_bytes())?;
                return Ok(());
            }
        };
        writer.write_all(reply.as_bytes())?;
    }
}

/// Reads lines up to a blank one (or the end).
fn skip_to_blank_line(reader: &mut impl BufRead, line: &mut String) -> std::io::Result<()> {
    while read_line(reader, line)? && !line.is_empty() {}
    Ok(())
}

/// Reads one line into `line`, without its newline; false at the end of the stream.
fn read_line(reader: &mut impl BufRead, line: &mut String) -> std::io::Result<bool> {
    line.clear();
    if reader.read_line(line)? == 0 {
        return Ok(false);
    }
    if line.ends_with('\n') {
        line.pop();
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn a_set_is_read_into_device_and_peer_sections() {
        let body = format!(
            "private_key={A}\nlisten_port=51820\nreplace_peers=true\n\
             public_key={B}\nendpoint=[fd00::1]:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.88.0.2/32\nallowed_ip=fd88::2/128\n\
             protocol_version=1\npublic_key={A}\nremove=true"
        );
        let request = parse_set(body.lines()).unwrap();
        assert_eq!(request.private_key, Some([0x11; 32]));
        assert_eq!(request.listen_port, Some(51820));
        assert!(request.replace_peers);
        assert_eq!(request.peers.len(), 2);
        let b = &request.peers[0];
        assert_eq!(b.public_key, [0x22; 32]);
        assert_eq!(b.endpoint, Some("[fd00::1]:51820".parse().unwrap()));
        assert_eq!(b.keepalive, Some(25));
        assert!(b.replace_allowed_ips && !b.remove);
        assert_eq!(
            b.allowed_ips,
            vec![
                "10.88.0.2/32".parse::<IpNet>().unwrap(),
                "fd88::2/128".parse().unwrap()
            ]
        );
        // A section says only what it says: nothing carries over from the one before.
        let a = &request.peers[1];
        assert!(a.remove && a.endpoint.is_none() && a.keepalive.is_none());
    }

    #[test]
    fn bad_lines_are_refused_with_the_protocols_error_numbers() {
        let table: &[(&str, i32)] = &[
            ("private_key=zz", errno::EINVAL),
            ("listen_port=70000", errno::EINVAL),
            ("listen_port", errno::EPROTO),
            ("colour=blue", errno::EPROTO),
            ("replace_peers=yes", errno::EINVAL),
            ("endpoint=1.2.3.4:5", errno::EPROTO),
            ("public_key=22", errno::EINVAL),
        ];
        for (body, want) in table {
            assert_eq!(parse_set(body.lines()), Err(*want), "{body}");
        }
        let peer_lines: &[(&str, i32)] = &[
            ("endpoint=somewhere", errno::EINVAL),
            ("allowed_ip=10.0.0.1/33", errno::EINVAL),
            ("persistent_keepalive_interval=-1", errno::EINVAL),
            ("protocol_version=2", errno::EINVAL),
            ("listen_port=1", errno::EPROTO),
        ];
        for (line, want) in peer_lines {
            let body = format!("public_key={B}\n{line}");
            assert_eq!(parse_set(body.lines()), Err(*want), "{line}");
        }
    }
}
