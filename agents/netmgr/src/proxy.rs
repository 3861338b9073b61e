//! The device's UAPI socket, served by `wgdevice` itself in front of boringtun, so that every
//! client (netmgr, `wg`) gets the protocol as WireGuard documents it although boringtun 0.7
//! departs from it in three ways:
//!
//! | boringtun 0.7 | what the socket does |
//! |---|---|
//! | `last_handshake_time_sec`/`_nsec` are the time *since* the handshake | rewritten to the Unix time of the handshake ([`rewrite_handshakes`]), so `wg show` says "5 seconds ago" |
//! | a `set` peer section inherits `endpoint`, `remove` and the keepalive of the section before it | each peer section goes to boringtun as a `set` of its own ([`split_set`]) |
//! | a `set` on an existing peer without `remove=true` panics its thread | refused with `errno=17` (EEXIST) before boringtun sees it: remove the peer and add it again |
//!
//! boringtun is given one end of a socket pair as its UAPI descriptor (`DeviceConfig::uapi_fd`)
//! and answers one request at a time on it; this module owns the listening socket, takes one
//! client at a time (with a timeout, so a stuck client cannot hold the device), and relays.
//! When the pair breaks boringtun exits, and so does the device process: netmgr restarts it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a client has to send its request and take the reply.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long boringtun may take to answer before the device is deemed wedged.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(30);

/// EEXIST: the answer to a `set` that would modify an existing peer.
const EEXIST: i32 = 17;
/// EINVAL: the answer to a request that is neither `get=1` nor `set=1`.
const EINVAL: i32 = 22;

/// Why relaying stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client went away or sent nonsense: only this request is lost.
    #[error("client: {0}")]
    Client(std::io::Error),
    /// boringtun did not answer, or the pair broke: the device is unusable.
    #[error("device: {0}")]
    Device(std::io::Error),
}

/// boringtun's end of the conversation: requests out, replies in.
pub struct Boringtun {
    out: UnixStream,
    replies: BufReader<UnixStream>,
}

impl Boringtun {
    /// Talks to boringtun over `ours`, the other end of the pair it was given.
    pub fn new(ours: UnixStream) -> std::io::Result<Boringtun> {
        ours.set_read_timeout(Some(DEVICE_TIMEOUT))?;
        Ok(Boringtun {
            out: ours.try_clone()?,
            replies: BufReader::new(ours),
        })
    }

    /// Sends one request and returns the reply's lines up to and including `errno=N`, and N.
    fn exchange(&mut self, request: &str) -> Result<(String, i32), ProxyError> {
        self.out
            .write_all(request.as_bytes())
            .map_err(ProxyError::Device)?;
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            if self
                .replies
                .read_line(&mut line)
                .map_err(ProxyError::Device)?
                == 0
            {
                return Err(ProxyError::Device(std::io::ErrorKind::UnexpectedEof.into()));
            }
            if let Some(errno) = line.strip_prefix("errno=") {
                let errno = errno.trim().parse().unwrap_or(EINVAL);
                // The blank line that ends the reply.
                let mut blank = String::new();
                self.replies
                    .read_line(&mut blank)
                    .map_err(ProxyError::Device)?;
                reply.push_str(&line);
                return Ok((reply, errno));
            }
            reply.push_str(&line);
        }
    }

    /// The hex keys of the device's peers.
    fn peers(&mut self) -> Result<Vec<String>, ProxyError> {
        let (reply, _) = self.exchange("get=1\n\n")?;
        Ok(reply
            .lines()
            .filter_map(|l| l.strip_prefix("public_key="))
            .map(str::to_owned)
            .collect())
    }
}

/// Serves the UAPI on `listener` until boringtun's end breaks.
pub fn serve(listener: UnixListener, mut device: Boringtun) -> ProxyError {
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        match relay(&client, &mut device) {
            Ok(()) => {}
            Err(ProxyError::Client(e)) => tracing::debug!(error = %e, "UAPI client"),
            Err(device_error) => return device_error,
        }
    }
    ProxyError::Device(std::io::Error::other("the UAPI socket stopped accepting"))
}

/// One client's request, answered.
fn relay(client: &UnixStream, device: &mut Boringtun) -> Result<(), ProxyError> {
    client
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| client.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(ProxyError::Client)?;
    let mut reader = BufReader::new(client);
    let mut command = String::new();
    reader.read_line(&mut command).map_err(ProxyError::Client)?;
    let reply = match command.trim_end() {
        "get=1" => {
            let (reply, errno) = device.exchange("get=1\n\n")?;
            if errno == 0 {
                rewrite_handshakes(&reply, SystemTime::now())
            } else {
                reply
            }
        }
        "set=1" => {
            let mut body = String::new();
            loop {
                let mut line = String::new();
                let n = reader.read_line(&mut line).map_err(ProxyError::Client)?;
                if n == 0 || line == "\n" {
                    break;
                }
                body.push_str(&line);
            }
            let errno = set(device, &body)?;
            // A new listen port means new sockets (crate::sockbuf).
            crate::sockbuf::raise_udp_buffers();
            format!("errno={errno}\n")
        }
        _ => format!("errno={EINVAL}\n"),
    };
    (&*client)
        .write_all(format!("{reply}\n").as_bytes())
        .map_err(ProxyError::Client)
}

/// Applies a `set` body section by section; the first error stops it and is the answer.
fn set(device: &mut Boringtun, body: &str) -> Result<i32, ProxyError> {
    let (head, sections) = split_set(body);
    let replaces = head.lines().any(|l| l == "replace_peers=true");
    if !replaces && sections.iter().any(|s| !s.removes) {
        // Followed through the request: a peer removed by an earlier section may come back.
        let mut existing: std::collections::BTreeSet<String> =
            device.peers()?.into_iter().collect();
        for section in &sections {
            if section.removes {
                existing.remove(&section.key);
            } else if !existing.insert(section.key.clone()) {
                return Ok(EEXIST);
            }
        }
    }
    if !head.is_empty() {
        let (_, errno) = device.exchange(&format!("set=1\n{head}\n"))?;
        if errno != 0 {
            return Ok(errno);
        }
    }
    for section in &sections {
        let (_, errno) = device.exchange(&format!("set=1\n{}\n", section.text))?;
        if errno != 0 {
            return Ok(errno);
        }
    }
    Ok(0)
}

/// One peer's section of a `set` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The peer's key, hex, as written.
    pub key: String,
    /// Whether it removes the peer.
    pub removes: bool,
    /// Its lines, the `public_key=` line first, each ending in `\n`.
    pub text: String,
}

/// Splits a `set` body into the device's lines (before the first `public_key=`) and each
/// peer's section.
pub fn split_set(body: &str) -> (String, Vec<Section>) {
    let mut head = String::new();
    let mut sections: Vec<Section> = Vec::new();
    for line in body.lines() {
        if let Some(key) = line.strip_prefix("public_key=") {
            sections.push(Section {
                key: key.to_owned(),
                removes: false,
                text: String::new(),
            });
        }
        match sections.last_mut() {
            Some(section) => {
                if line == "remove=true" {
                    section.removes = true;
                }
                section.text.push_str(line);
                section.text.push('\n');
            }
            None => {
                head.push_str(line);
                head.push('\n');
            }
        }
    }
    (head, sections)
}

/// A `get` reply with each `last_handshake_time_sec`/`_nsec` pair (boringtun: an age) turned
/// into the Unix time of the handshake as seen at `now`.
pub fn rewrite_handshakes(reply: &str, now: SystemTime) -> String {
    let mut out = String::with_capacity(reply.len());
    let mut age_sec: Option<u64> = None;
    for line in reply.lines() {
        if let Some(sec) = line.strip_prefix("last_handshake_time_sec=") {
            if let Some(held) = age_sec.take() {
                out.push_str(&format!("last_handshake_time_sec={held}\n"));
            }
            match sec.parse() {
                Ok(sec) => age_sec = Some(sec),
                Err(_) => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            continue;
        }
        if let (Some(nsec), Some(sec)) = (line.strip_prefix("last_handshake_time_nsec="), age_sec) {
            age_sec = None;
            // Saturating: a nonsense age (more nanoseconds than a second, or near u64::MAX
            // seconds) must not panic the device's proxy; it reads as "long ago".
            let age = Duration::from_secs(sec)
                .saturating_add(Duration::from_nanos(nsec.parse::<u64>().unwrap_or(0)));
            let at = now
                .checked_sub(age)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or_default();
            out.push_str(&format!(
                "last_handshake_time_sec={}\nlast_handshake_time_nsec={}\n",
                at.as_secs(),
                at.subsec_nanos()
            ));
            continue;
        }
        if let Some(held) = age_sec.take() {
            out.push_str(&format!("last_handshake_time_sec={held}\n"));
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_ages_become_times() {
        let now = UNIX_EPOCH + Duration::new(1_700_000_000, 800_000_000);
        let reply = "own_public_key=aa\npublic_key=bb\nlast_handshake_time_sec=5\n\
                     last_handshake_time_nsec=300000000\nrx_bytes=1\npublic_key=cc\n\
                     rx_bytes=0\nerrno=0\n";
        assert_eq!(
            rewrite_handshakes(reply, now),
            "own_public_key=aa\npublic_key=bb\nlast_handshake_time_sec=1699999995\n\
             last_handshake_time_nsec=500000000\nrx_bytes=1\npublic_key=cc\nrx_bytes=0\n\
             errno=0\n"
        );
    }

    /// Found by the `netmgr_uapi` fuzz target: an age of `u64::MAX` seconds and more than a
    /// second of nanoseconds overflowed `Duration::new` and panicked the proxy's thread.
    #[test]
    fn a_nonsense_handshake_age_does_not_panic() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let reply = "public_key=aa\nlast_handshake_time_sec=18446744073709551615\n\
                     last_handshake_time_nsec=4294967295\nerrno=0\n";
        assert_eq!(
            rewrite_handshakes(reply, now),
            "public_key=aa\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\nerrno=0\n"
        );
    }

    #[test]
    fn set_bodies_split_by_peer() {
        let body = "private_key=11\nlisten_port=51820\n\
                    public_key=aa\nremove=true\n\
                    public_key=bb\nendpoint=192.0.2.2:51820\nallowed_ip=10.88.0.2/32\n";
        let (head, sections) = split_set(body);
        assert_eq!(head, "private_key=11\nlisten_port=51820\n");
        assert_eq!(
            sections,
            [
                Section {
                    key: "aa".into(),
                    removes: true,
                    text: "public_key=aa\nremove=true\n".into()
                },
                Section {
                    key: "bb".into(),
                    removes: false,
                    text: "public_key=bb\nendpoint=192.0.2.2:51820\nallowed_ip=10.88.0.2/32\n"
                        .into()
                },
            ]
        );
        assert_eq!(
            split_set("listen_port=1\n"),
            ("listen_port=1\n".into(), vec![])
        );
    }
}
