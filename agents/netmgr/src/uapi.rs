//! A client of WireGuard's cross-platform userspace API (the UAPI): the text protocol on the
//! device's unix socket that `wg` speaks too. `get=1` reads the device (its key, port, peers
//! with their handshakes and bytes); `set=1` changes it; each reply ends with `errno=N`.
//!
//! Changes are computed ([`changes`]) as the difference between what the device has and what
//! is wanted, so that applying a configuration touches only what differs: the private key and
//! the listen port when they differ, peers removed, and peers added or changed in place (a
//! changed endpoint or set of allowed IPs keeps the peer's session). They go to the device as
//! one `set` ([`Changes::request`]), which `wgdevice` applies whole or not at all.
//!
//! The reply of `get` names the device's key by its private half (`private_key=`, as the
//! protocol has it). A device started by an older netmgr, which ran boringtun's own device
//! and outlives the upgrade like any device, names it by `own_public_key=` and gives
//! `last_handshake_time_sec` as an age: values below [`EPOCH_FLOOR_S`] are read as ages,
//! anything else as a time. Such a device is read, to be recognised ([`DeviceState::legacy`])
//! and replaced, not adopted: it cannot change a peer in place.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::key::{PrivateKey, PublicKey};

/// How long one UAPI exchange may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// `last_handshake_time_sec` values below this (2001-09-09) are ages, not times (boringtun).
pub const EPOCH_FLOOR_S: u64 = 1_000_000_000;

/// Why an exchange with the device failed.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    /// The socket could not be reached or the exchange broke off.
    #[error("{path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// No reply within [`TIMEOUT`].
    #[error("{0}: no reply within {TIMEOUT:?}")]
    Timeout(PathBuf),
    /// The device answered with an error number.
    #[error("the device refused the change: errno {errno} ({})", std::io::Error::from_raw_os_error(*errno))]
    Errno {
        /// The errno.
        errno: i32,
    },
    /// The reply is not the protocol.
    #[error("unreadable reply: {0}")]
    Protocol(String),
}

/// A device's UAPI socket.
#[derive(Debug, Clone)]
pub struct Uapi {
    path: PathBuf,
}

impl Uapi {
    /// The client of the socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Uapi {
        Uapi { path: path.into() }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the device. The reply is read a line at a time: for a thousand peers it is
    /// 300 KB that need not be held whole.
    pub async fn get(&self) -> Result<DeviceState, UapiError> {
        let mut reader = GetReader::new(agentbase::health::now_ms());
        let mut state = None;
        self.exchange("get=1\n\n", |line| {
            state = reader.line(line)?;
            Ok(state.is_some())
        })
        .await?;
        state.ok_or_else(|| UapiError::Protocol("the reply ends without errno".into()))
    }

    /// Sends one `set=1` request whose body is `body` (lines ending in `\n`).
    pub async fn set(&self, body: &str) -> Result<(), UapiError> {
        let mut errno = None;
        self.exchange(&format!("set=1\n{body}\n"), |line| {
            errno = errno_of(line)?;
            Ok(errno.is_some())
        })
        .await?;
        match errno {
            Some(0) => Ok(()),
            Some(errno) => Err(UapiError::Errno { errno }),
            None => Err(UapiError::Protocol("no errno line".into())),
        }
    }

    /// Whether the socket answers `get` at all.
    pub async fn answers(&self) -> bool {
        self.get().await.is_ok()
    }

    /// Sends `request` and hands each line of the reply (without its newline) to `line`
    /// until it says the reply is complete or the device closes the connection.
    async fn exchange(
        &self,
        request: &str,
        mut line: impl FnMut(&str) -> Result<bool, UapiError>,
    ) -> Result<(), UapiError> {
        let io = |source| UapiError::Io {
            path: self.path.clone(),
            source,
        };
        let work = async {
            let mut stream = UnixStream::connect(&self.path).await.map_err(io)?;
            stream.write_all(request.as_bytes()).await.map_err(io)?;
            let mut reader = BufReader::new(stream);
            let mut text = String::new();
            loop {
                text.clear();
                if reader.read_line(&mut text).await.map_err(io)? == 0
                    || line(text.trim_end_matches('\n'))?
                {
                    return Ok(());
                }
            }
        };
        tokio::time::timeout(TIMEOUT, work)
            .await
            .map_err(|_| UapiError::Timeout(self.path.clone()))?
    }
}

/// The error number of an `errno=N` line; `None` for any other line.
fn errno_of(line: &str) -> Result<Option<i32>, UapiError> {
    line.strip_prefix("errno=")
        .map(|n| {
            n.trim()
                .parse()
                .map_err(|_| UapiError::Protocol("errno is not a number".into()))
        })
        .transpose()
}

/// A peer's allowed IPs, in order, without repeats. A sorted `Vec`, not a `BTreeSet`, whose
/// first node alone is some 250 bytes: netmgr holds a few of these sets for every peer, and a
/// node may have a thousand peers of one prefix each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedIps(Vec<IpNet>);

impl AllowedIps {
    /// Adds `net` where it sorts, unless it is there.
    pub fn insert(&mut self, net: IpNet) {
        if let Err(at) = self.0.binary_search(&net) {
            self.0.insert(at, net);
        }
    }

    /// The prefixes, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, IpNet> {
        self.0.iter()
    }
}

impl FromIterator<IpNet> for AllowedIps {
    fn from_iter<I: IntoIterator<Item = IpNet>>(nets: I) -> AllowedIps {
        let mut nets: Vec<IpNet> = nets.into_iter().collect();
        nets.sort();
        nets.dedup();
        AllowedIps(nets)
    }
}

/// A device as `get=1` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Its public key, once it has a private key.
    pub public_key: Option<PublicKey>,
    /// Its UDP port.
    pub listen_port: u16,
    /// Its peers.
    pub peers: BTreeMap<PublicKey, PeerState>,
    /// It names its public key (`own_public_key=`): boringtun's own device, which netmgr ran
    /// before it had a device of its own, and which refuses to change a peer in place.
    pub legacy: bool,
}

/// A peer as `get=1` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerState {
    /// Where its packets last came from, or the configured endpoint.
    pub endpoint: Option<SocketAddr>,
    /// Its allowed IPs.
    pub allowed_ips: AllowedIps,
    /// Persistent keepalive, seconds (0: off).
    pub keepalive: u16,
    /// When its last handshake completed, ms since the epoch.
    pub last_handshake_ms: Option<u64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// A peer section being read: its key, what it says so far, its handshake's seconds and
/// nanoseconds.
type PeerReading = (PublicKey, PeerState, Option<(u64, u64)>);

/// Parses a `get=1` reply; `now_ms` turns handshake ages into times.
pub fn parse_get(reply: &str, now_ms: u64) -> Result<DeviceState, UapiError> {
    let mut reader = GetReader::new(now_ms);
    for line in reply.lines() {
        if let Some(state) = reader.line(line)? {
            return Ok(state);
        }
    }
    Err(UapiError::Protocol("the reply ends without errno".into()))
}

/// A `get=1` reply read a line at a time.
struct GetReader {
    state: DeviceState,
    /// The peer being read, with its handshake's seconds and nanoseconds.
    current: Option<PeerReading>,
    now_ms: u64,
}

impl GetReader {
    fn new(now_ms: u64) -> GetReader {
        GetReader {
            state: DeviceState::default(),
            current: None,
            now_ms,
        }
    }

    fn finish_peer(&mut self) {
        if let Some((key, mut peer, handshake)) = self.current.take() {
            peer.last_handshake_ms =
                handshake.and_then(|(sec, nsec)| handshake_ms(sec, nsec, self.now_ms));
            self.state.peers.insert(key, peer);
        }
    }

    /// Takes one line; the device once the reply's `errno=0` has come.
    fn line(&mut self, line: &str) -> Result<Option<DeviceState>, UapiError> {
        let bad = || UapiError::Protocol(format!("line {line:?}"));
        if line.is_empty() {
            return Ok(None);
        }
        let (key, value) = line.split_once('=').ok_or_else(bad)?;
        let number = || value.parse::<u64>().map_err(|_| bad());
        match key {
            "errno" => {
                let errno: i32 = value.parse().map_err(|_| bad())?;
                if errno != 0 {
                    return Err(UapiError::Errno { errno });
                }
                self.finish_peer();
                return Ok(Some(std::mem::take(&mut self.state)));
            }
            "public_key" => {
                self.finish_peer();
                let key = PublicKey::from_hex(value).map_err(|_| bad())?;
                self.current = Some((key, PeerState::default(), None));
            }
            // The protocol's own: the device's key is known by its private half.
            "private_key" if self.current.is_none() => {
                let key = crate::key::PrivateKey::from_hex(value).map_err(|_| bad())?;
                self.state.public_key = Some(key.public_key());
            }
            // boringtun's device names its public key instead.
            "own_public_key" if self.current.is_none() => {
                self.state.public_key = Some(PublicKey::from_hex(value).map_err(|_| bad())?);
                self.state.legacy = true;
            }
            "listen_port" if self.current.is_none() => {
                self.state.listen_port = value.parse().map_err(|_| bad())?;
            }
            _ => {
                let Some((_, peer, handshake)) = self.current.as_mut() else {
                    // fwmark and what a newer device adds.
                    return Ok(None);
                };
                match key {
                    "endpoint" => peer.endpoint = Some(value.parse().map_err(|_| bad())?),
                    "allowed_ip" => {
                        peer.allowed_ips.insert(value.parse().map_err(|_| bad())?);
                    }
                    "persistent_keepalive_interval" => {
                        peer.keepalive = value.parse().map_err(|_| bad())?;
                    }
                    "last_handshake_time_sec" => {
                        handshake.get_or_insert((0, 0)).0 = number()?;
                    }
                    "last_handshake_time_nsec" => {
                        handshake.get_or_insert((0, 0)).1 = number()?;
                    }
                    "rx_bytes" => peer.rx_bytes = number()?,
                    "tx_bytes" => peer.tx_bytes = number()?,
                    _ => {}
                }
            }
        }
        Ok(None)
    }
}

/// A handshake's time in ms since the epoch from the UAPI's seconds and nanoseconds: `0, 0`
/// is none; seconds below [`EPOCH_FLOOR_S`] are an age (boringtun).
fn handshake_ms(sec: u64, nsec: u64, now_ms: u64) -> Option<u64> {
    let ms = sec.saturating_mul(1000).saturating_add(nsec / 1_000_000);
    match (sec, nsec) {
        (0, 0) => None,
        (sec, _) if sec < EPOCH_FLOOR_S => Some(now_ms.saturating_sub(ms)),
        _ => Some(ms),
    }
}

/// A peer as it should be on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedPeer {
    /// Where to reach it (resolved).
    pub endpoint: Option<SocketAddr>,
    /// Its allowed IPs.
    pub allowed_ips: AllowedIps,
    /// Persistent keepalive, seconds (0: off).
    pub keepalive: u16,
}

/// What a device should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedDevice {
    /// The node's public key (the device's must be this).
    pub public_key: PublicKey,
    /// The UDP port.
    pub listen_port: u16,
    /// The peers.
    pub peers: BTreeMap<PublicKey, WantedPeer>,
}

/// The difference between a device and what it should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The device's key must be set.
    pub set_key: bool,
    /// The port to listen on, when it differs.
    pub listen_port: Option<u16>,
    /// Peers to remove: those no longer wanted, and those whose endpoint must go (the
    /// protocol can set an endpoint but not clear one), which are then set again.
    pub remove: Vec<PublicKey>,
    /// Peers to add, or to change in place.
    pub set: Vec<(PublicKey, WantedPeer)>,
}

/// What must change on a device in `state` to make it `wanted`. `applied` is the endpoint of
/// each peer as netmgr last set it, when known: a peer that roamed (the device reports where
/// its packets come from now) is not changed when its configured endpoint did not change.
pub fn changes(
    state: &DeviceState,
    applied: Option<&BTreeMap<PublicKey, Option<SocketAddr>>>,
    wanted: &WantedDevice,
) -> Changes {
    let mut changes = Changes {
        set_key: state.public_key != Some(wanted.public_key),
        listen_port: (state.listen_port != wanted.listen_port).then_some(wanted.listen_port),
        ..Changes::default()
    };
    for key in state.peers.keys() {
        if !wanted.peers.contains_key(key) {
            changes.remove.push(*key);
        }
    }
    for (key, peer) in &wanted.peers {
        let Some(have) = state.peers.get(key) else {
            changes.set.push((*key, peer.clone()));
            continue;
        };
        let endpoint_changed = match applied.and_then(|a| a.get(key)) {
            Some(was) => *was != peer.endpoint,
            None => peer.endpoint.is_some() && have.endpoint != peer.endpoint,
        };
        if endpoint_changed
            || have.allowed_ips != peer.allowed_ips
            || have.keepalive != peer.keepalive
        {
            if endpoint_changed && peer.endpoint.is_none() {
                changes.remove.push(*key);
            }
            // The endpoint is stated only when it changed: a peer that roamed stays where its
            // packets come from.
            let mut peer = peer.clone();
            if !endpoint_changed {
                peer.endpoint = None;
            }
            changes.set.push((*key, peer));
        }
    }
    changes
}

impl Changes {
    /// Whether the device is as wanted already.
    pub fn is_empty(&self) -> bool {
        !self.set_key && self.listen_port.is_none() && self.remove.is_empty() && self.set.is_empty()
    }

    /// The body of the one `set` that makes the changes (lines ending in `\n`): the device's
    /// key and port, then each peer removed, then each peer set, every section saying all
    /// of the peer (its keepalive, endpoint, and allowed IPs in place of the old ones).
    pub fn request(&self, private_key: &PrivateKey) -> String {
        use std::fmt::Write;
        let mut body = String::new();
        if self.set_key {
            let _ = writeln!(body, "private_key={}", private_key.to_hex());
        }
        if let Some(port) = self.listen_port {
            let _ = writeln!(body, "listen_port={port}");
        }
        for key in &self.remove {
            let _ = writeln!(body, "public_key={}\nremove=true", key.to_hex());
        }
        for (key, peer) in &self.set {
            let _ = writeln!(
                body,
                "public_key={}\npersistent_keepalive_interval={}",
                key.to_hex(),
                peer.keepalive
            );
            if let Some(endpoint) = peer.endpoint {
                let _ = writeln!(body, "endpoint={endpoint}");
            }
            body.push_str("replace_allowed_ips=true\n");
            for net in peer.allowed_ips.iter() {
                let _ = writeln!(body, "allowed_ip={net}");
            }
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn nets(list: &[&str]) -> AllowedIps {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn parses_boringtun_and_kernel_replies() {
        let reply = format!(
            "own_public_key={}\nlisten_port=51820\n\
             public_key={}\npersistent_keepalive_interval=25\nendpoint=192.0.2.2:51820\n\
             allowed_ip=10.88.0.2/32\nallowed_ip=192.168.30.0/24\n\
             last_handshake_time_sec=5\nlast_handshake_time_nsec=500000000\n\
             rx_bytes=100\ntx_bytes=200\n\
             public_key={}\nallowed_ip=10.88.0.3/32\n\
             last_handshake_time_sec=1699999990\nlast_handshake_time_nsec=0\n\
             rx_bytes=0\ntx_bytes=0\n\
             public_key={}\nallowed_ip=10.88.0.4/32\nlast_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\nerrno=0\n\n",
            key(1).to_hex(),
            key(2).to_hex(),
            key(3).to_hex(),
            key(4).to_hex()
        );
        let state = parse_get(&reply, NOW).unwrap();
        assert_eq!(state.public_key, Some(key(1)));
        assert!(state.legacy, "own_public_key is boringtun's device");
        assert_eq!(state.listen_port, 51820);
        let p2 = &state.peers[&key(2)];
        assert_eq!(p2.keepalive, 25);
        assert_eq!(p2.endpoint, Some("192.0.2.2:51820".parse().unwrap()));
        assert_eq!(p2.allowed_ips, nets(&["10.88.0.2/32", "192.168.30.0/24"]));
        assert_eq!(p2.last_handshake_ms, Some(NOW - 5_500), "an age");
        assert_eq!((p2.rx_bytes, p2.tx_bytes), (100, 200));
        assert_eq!(
            state.peers[&key(3)].last_handshake_ms,
            Some(1_699_999_990_000),
            "a time"
        );
        assert_eq!(state.peers[&key(4)].last_handshake_ms, None, "never");
    }

    #[test]
    fn the_protocols_reply_names_the_private_key() {
        let private = PrivateKey::generate().unwrap();
        let reply = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\nprotocol_version=1\n\
             last_handshake_time_sec=1699999990\nlast_handshake_time_nsec=0\n\
             tx_bytes=1\nrx_bytes=2\npersistent_keepalive_interval=0\n\
             allowed_ip=10.88.0.2/32\nerrno=0\n\n",
            private.to_hex(),
            key(2).to_hex()
        );
        let state = parse_get(&reply, NOW).unwrap();
        assert_eq!(state.public_key, Some(private.public_key()));
        assert!(!state.legacy);
        assert_eq!(
            state.peers[&key(2)].last_handshake_ms,
            Some(1_699_999_990_000)
        );
    }

    #[test]
    fn bad_replies() {
        assert!(matches!(
            parse_get("errno=22\n\n", NOW),
            Err(UapiError::Errno { errno: 22 })
        ));
        assert!(matches!(
            parse_get("listen_port=1\n", NOW),
            Err(UapiError::Protocol(_))
        ));
        assert!(matches!(
            parse_get("public_key=zz\nerrno=0\n", NOW),
            Err(UapiError::Protocol(_))
        ));
        assert!(matches!(
            parse_get("garbage\n", NOW),
            Err(UapiError::Protocol(_))
        ));
    }

    fn wanted(peers: &[(u8, Option<&str>, &[&str])]) -> WantedDevice {
        WantedDevice {
            public_key: key(1),
            listen_port: 51820,
            peers: peers
                .iter()
                .map(|(n, endpoint, ips)| {
                    (
                        key(*n),
                        WantedPeer {
                            endpoint: endpoint.map(|e| e.parse().unwrap()),
                            allowed_ips: nets(ips),
                            keepalive: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    fn device_with(wanted: &WantedDevice) -> DeviceState {
        DeviceState {
            public_key: Some(wanted.public_key),
            listen_port: wanted.listen_port,
            peers: wanted
                .peers
                .iter()
                .map(|(k, p)| {
                    (
                        *k,
                        PeerState {
                            endpoint: p.endpoint,
                            allowed_ips: p.allowed_ips.clone(),
                            keepalive: p.keepalive,
                            ..PeerState::default()
                        },
                    )
                })
                .collect(),
            legacy: false,
        }
    }

    #[test]
    fn a_fresh_device_gets_everything() {
        let want = wanted(&[
            (2, Some("192.0.2.2:51820"), &["10.88.0.2/32"]),
            (3, None, &["10.88.0.3/32"]),
        ]);
        let changes = changes(&DeviceState::default(), None, &want);
        assert!(changes.set_key);
        assert_eq!(changes.listen_port, Some(51820));
        assert_eq!(changes.set.len(), 2);
        let private = PrivateKey::generate().unwrap();
        let request = changes.request(&private);
        assert!(request.starts_with(&format!(
            "private_key={}\nlisten_port=51820\npublic_key=",
            private.to_hex()
        )));
        assert!(request.contains("endpoint=192.0.2.2:51820\n"));
        assert_eq!(
            request.matches("persistent_keepalive_interval=0\n").count(),
            2
        );
        assert_eq!(request.matches("replace_allowed_ips=true\n").count(), 2);
        assert!(!request.contains("remove"));
    }

    #[test]
    fn only_the_difference() {
        let want = wanted(&[
            (2, Some("192.0.2.2:51820"), &["10.88.0.2/32"]),
            (3, Some("192.0.2.3:51820"), &["10.88.0.3/32"]),
        ]);
        let mut state = device_with(&want);
        assert!(changes(&state, None, &want).is_empty());
        // A peer gone, one new, one changed.
        state.peers.insert(key(9), PeerState::default());
        let mut want2 = want.clone();
        want2.peers.insert(key(4), want.peers[&key(2)].clone());
        want2.peers.get_mut(&key(4)).unwrap().allowed_ips = nets(&["10.88.0.4/32"]);
        want2.peers.get_mut(&key(3)).unwrap().allowed_ips = nets(&["10.88.0.3/32", "10.9.0.0/16"]);
        let c = changes(&state, None, &want2);
        assert!(!c.set_key && c.listen_port.is_none());
        // The changed one in place: its session stays.
        assert_eq!(c.remove, [key(9)]);
        assert_eq!(
            c.set.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            [key(3), key(4)]
        );
        let request = c.request(&PrivateKey::generate().unwrap());
        assert!(!request.contains("private_key") && !request.contains("listen_port"));
        assert_eq!(request.matches("remove=true").count(), 1);
        assert!(request.contains("allowed_ip=10.9.0.0/16\nallowed_ip=10.88.0.3/32\n"));
        // An endpoint that must go takes the peer off and on again.
        let mut unset = want.clone();
        unset.peers.get_mut(&key(2)).unwrap().endpoint = None;
        let applied: BTreeMap<_, _> = [(key(2), Some("192.0.2.2:51820".parse().unwrap()))].into();
        let c = changes(&device_with(&want), Some(&applied), &unset);
        assert_eq!(c.remove, [key(2)]);
        assert_eq!(c.set.len(), 1);
    }

    #[test]
    fn a_roamed_endpoint_is_not_a_change() {
        let want = wanted(&[(2, Some("192.0.2.2:51820"), &["10.88.0.2/32"])]);
        let mut state = device_with(&want);
        state.peers.get_mut(&key(2)).unwrap().endpoint =
            Some("198.51.100.7:40000".parse().unwrap());
        let applied: BTreeMap<_, _> = [(key(2), Some("192.0.2.2:51820".parse().unwrap()))].into();
        assert!(changes(&state, Some(&applied), &want).is_empty());
        let changed = |c: Changes| c.set.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        // Without the record the device's word is all there is.
        assert_eq!(changed(changes(&state, None, &want)), [key(2)]);
        // A roamed peer whose allowed IPs changed is set without its endpoint, so it stays
        // where its packets come from.
        let mut more = want.clone();
        more.peers.get_mut(&key(2)).unwrap().allowed_ips = nets(&["10.88.0.2/32", "10.9.0.0/16"]);
        let c = changes(&state, Some(&applied), &more);
        assert_eq!(c.set.len(), 1);
        assert_eq!(c.set[0].1.endpoint, None);
        assert!(!c
            .request(&PrivateKey::generate().unwrap())
            .contains("endpoint="));
        // A configured endpoint that changed is a change.
        let moved: BTreeMap<_, _> = [(key(2), Some("192.0.2.9:51820".parse().unwrap()))].into();
        assert_eq!(changed(changes(&state, Some(&moved), &want)), [key(2)]);
    }
}
