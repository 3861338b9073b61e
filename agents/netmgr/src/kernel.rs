//! Kernel WireGuard over generic netlink: the `wireguard` family's `GET_DEVICE` read into a
//! [`DeviceState`] and [`Changes`] written as `SET_DEVICE` (the same difference the UAPI
//! path sends). The link itself is made and deleted over rtnetlink ([`crate::link`]).
//!
//! The exchanges are short and with the kernel, so they are blocking calls on a socket of
//! their own, made on tokio's blocking threads ([`Wireguard::get`], [`Wireguard::set`]).

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use netlink_packet_core::{
    Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use crate::key::{PrivateKey, PublicKey};
use crate::uapi::{Changes, DeviceState, PeerState};

/// The generic netlink family of kernel WireGuard.
pub const FAMILY: &str = "wireguard";

/// How long the kernel has to answer one request.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why an exchange with kernel WireGuard failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel has no `wireguard` family: no WireGuard module.
    #[error("the kernel has no WireGuard (no `{FAMILY}` generic netlink family)")]
    Missing,
    /// The socket failed.
    #[error("generic netlink: {0}")]
    Io(std::io::Error),
    /// The kernel refused a request.
    #[error("{what}: {source}")]
    Refused {
        /// What was asked.
        what: String,
        /// The kernel's error.
        source: std::io::Error,
    },
    /// The device changed while it was being read: the dump is not coherent.
    #[error("{0}: the device changed while it was read")]
    Interrupted(String),
    /// The kernel's answer could not be read.
    #[error("unreadable answer to {what}: {reason}")]
    Decode {
        /// What was asked.
        what: String,
        /// Why it could not be read.
        reason: String,
    },
}

/// The `wireguard` family of this network namespace's kernel, resolved.
#[derive(Debug, Clone, Copy)]
pub struct Wireguard {
    family: u16,
}

impl Wireguard {
    /// Resolves the family: [`KernelError::Missing`] when the kernel has no WireGuard.
    pub async fn resolve() -> Result<Wireguard, KernelError> {
        blocking(|| match family_id(FAMILY)? {
            Some(family) => Ok(Wireguard { family }),
            None => Err(KernelError::Missing),
        })
        .await
    }

    /// Reads the device of `interface`. A read the kernel marks interrupted (the device
    /// changed meanwhile) is made again, three times at most.
    pub async fn get(self, interface: &str) -> Result<DeviceState, KernelError> {
        let interface = interface.to_owned();
        blocking(move || {
            let mut tries = 0;
            loop {
                match self.get_blocking(&interface) {
                    Err(KernelError::Interrupted(_)) if tries < 2 => tries += 1,
                    answer => return answer,
                }
            }
        })
        .await
    }

    /// Makes `changes` on the device of `interface`, `key` being the node's key.
    pub async fn set(
        self,
        interface: &str,
        changes: &Changes,
        key: &PrivateKey,
    ) -> Result<(), KernelError> {
        let messages = set_messages(interface, changes, key);
        let what = format!("configuring {interface}");
        blocking(move || {
            let socket = open()?;
            for message in messages {
                let bytes = encode(self.family, message, NLM_F_REQUEST | NLM_F_ACK);
                exchange(&socket, &bytes, Ends::Ack, &what, |_: WireguardMessage| {})?;
            }
            Ok(())
        })
        .await
    }

    fn get_blocking(self, interface: &str) -> Result<DeviceState, KernelError> {
        let socket = open()?;
        let request = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(interface.to_owned())],
        };
        let bytes = encode(self.family, request, NLM_F_REQUEST | NLM_F_DUMP);
        let what = format!("reading {interface}");
        let mut reading = StateReading::new();
        exchange(&socket, &bytes, Ends::Done, &what, |message| {
            reading.message(message)
        })?;
        Ok(reading.finish())
    }
}

/// The id of the generic netlink family called `name`; `None` when the kernel has none.
pub fn family_id(name: &str) -> Result<Option<u16>, KernelError> {
    let socket = open()?;
    let request = GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_owned())],
    };
    let mut message = GenlMessage::from_payload(request);
    message.finalize();
    let bytes = serialize(message, NLM_F_REQUEST);
    let what = format!("resolving the {name} family");
    let mut id = None;
    let answer = exchange(&socket, &bytes, Ends::Single, &what, |reply: GenlCtrl| {
        id = id.or(reply.nlas.iter().find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        }));
    });
    match answer {
        Ok(()) => Ok(id),
        Err(KernelError::Refused { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Runs `work` on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, KernelError> + Send + 'static,
) -> Result<T, KernelError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| KernelError::Io(std::io::Error::other(e.to_string())))?
}

/// A generic netlink socket that waits [`TIMEOUT`] at most for an answer.
fn open() -> Result<Socket, KernelError> {
    let mut socket = Socket::new(NETLINK_GENERIC).map_err(KernelError::Io)?;
    socket.bind_auto().map_err(KernelError::Io)?;
    // An error answer without a copy of the request (which may carry the key, and may be
    // larger than the answers' buffer).
    socket.set_cap_ack(true).map_err(KernelError::Io)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(KernelError::Io)?;
    let timeout = nix::sys::time::TimeVal::new(TIMEOUT.as_secs() as _, 0);
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(|e| KernelError::Io(e.into()))?;
    Ok(socket)
}

fn encode(family: u16, payload: WireguardMessage, flags: u16) -> Vec<u8> {
    let mut message = GenlMessage::from_payload(payload);
    message.set_resolved_family_id(family);
    message.finalize();
    serialize(message, flags)
}

fn serialize<F>(message: GenlMessage<F>, flags: u16) -> Vec<u8>
where
    F: netlink_packet_generic::GenlFamily + Emitable + std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// How the kernel's answer to a request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    /// With an acknowledgement (`NLM_F_ACK` asked for it).
    Ack,
    /// With `NLMSG_DONE` (a dump).
    Done,
    /// With the one message that answers (or an error).
    Single,
}

/// Sends `request` and reads the kernel's answers until it has answered in full (`ends`),
/// handing every message of the family to `each`.
fn exchange<F>(
    socket: &Socket,
    request: &[u8],
    ends: Ends,
    what: &str,
    mut each: impl FnMut(F),
) -> Result<(), KernelError>
where
    F: netlink_packet_core::ParseableParametrized<[u8], netlink_packet_generic::GenlHeader>
        + netlink_packet_generic::GenlFamily
        + std::fmt::Debug,
{
    let decode = |reason: String| KernelError::Decode {
        what: what.to_owned(),
        reason,
    };
    socket.send(request, 0).map_err(KernelError::Io)?;
    const BUFFER: usize = 64 * 1024;
    let mut buffer: Vec<u8> = Vec::with_capacity(BUFFER);
    loop {
        buffer.clear();
        let n = match socket.recv(&mut buffer, libc::MSG_TRUNC) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(KernelError::Refused {
                    what: what.to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {TIMEOUT:?}"),
                    ),
                })
            }
            Err(e) => return Err(KernelError::Io(e)),
        };
        if n > buffer.len() {
            return Err(decode(format!("an answer of {n} bytes, over {BUFFER}")));
        }
        let mut rest = &buffer[..n];
        while !rest.is_empty() {
            let message = NetlinkMessage::<GenlMessage<F>>::deserialize(rest)
                .map_err(|e| decode(e.to_string()))?;
            let length = (message.header.length as usize).next_multiple_of(4);
            if length == 0 {
                return Err(decode("a message of length 0".into()));
            }
            rest = rest.get(length..).unwrap_or_default();
            if message.header.flags & netlink_packet_core::NLM_F_DUMP_INTR != 0 {
                return Err(KernelError::Interrupted(what.to_owned()));
            }
            match message.payload {
                // The end of a dump, with the error that cut it short if one did.
                NetlinkPayload::Done(done) if done.code != 0 => {
                    return Err(KernelError::Refused {
                        what: what.to_owned(),
                        source: std::io::Error::from_raw_os_error(-done.code),
                    });
                }
                NetlinkPayload::Done(_) => return Ok(()),
                // An error, or with code 0 the acknowledgement.
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        None => Ok(()),
                        Some(_) => Err(KernelError::Refused {
                            what: what.to_owned(),
                            source: error.to_io(),
                        }),
                    };
                }
                NetlinkPayload::InnerMessage(inner) => {
                    each(inner.payload);
                    if ends == Ends::Single {
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
    }
}

/// The `SET_DEVICE` messages that make `changes` on `interface`: the key and port in the
/// first, then the peers removed, then the peers set, as many to a message as fit in
/// [`MESSAGE_BUDGET`]. Every peer set says all of the peer: its keepalive, its endpoint when
/// stated, and its allowed IPs in place of the old ones. A peer whose allowed IPs do not fit
/// goes on in the next message, named again with the rest of its allowed IPs (without the
/// replace flag, which would drop the ones already set): how `wg` splits a large change.
pub fn set_messages(interface: &str, changes: &Changes, key: &PrivateKey) -> Vec<WireguardMessage> {
    let mut head = vec![WireguardAttribute::IfName(interface.to_owned())];
    if changes.set_key {
        head.push(WireguardAttribute::PrivateKey(key.to_bytes()));
    }
    if let Some(port) = changes.listen_port {
        head.push(WireguardAttribute::ListenPort(port));
    }
    let mut split = Split::new(interface, head);
    for key in &changes.remove {
        split.peer(
            vec![
                WireguardPeerAttribute::PublicKey(key.0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ],
            key,
            &[],
        );
    }
    for (key, peer) in &changes.set {
        let mut attributes = vec![
            WireguardPeerAttribute::PublicKey(key.0),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
            WireguardPeerAttribute::PersistentKeepalive(peer.keepalive),
        ];
        if let Some(endpoint) = peer.endpoint {
            attributes.push(WireguardPeerAttribute::Endpoint(endpoint));
        }
        let ips: Vec<WireguardAllowedIp> = peer.allowed_ips.iter().map(allowed_ip).collect();
        split.peer(attributes, key, &ips);
    }
    split.finish()
}

/// The most a message's peers may take, encoded. Far under the 64 KiB an attribute's 16-bit
/// length can say (the peers are one attribute), and under the socket's send buffer.
pub const MESSAGE_BUDGET: usize = 16 * 1024;

/// `SET_DEVICE` messages being filled, each with peers up to [`MESSAGE_BUDGET`].
struct Split {
    interface: String,
    messages: Vec<WireguardMessage>,
    /// The message being filled: its device attributes and its peers so far.
    head: Vec<WireguardAttribute>,
    peers: Vec<WireguardPeer>,
    used: usize,
}

impl Split {
    fn new(interface: &str, head: Vec<WireguardAttribute>) -> Split {
        Split {
            interface: interface.to_owned(),
            messages: Vec::new(),
            head,
            peers: Vec::new(),
            used: 0,
        }
    }

    /// Adds a peer: `attributes` then its allowed IPs, over as many messages as they need.
    fn peer(
        &mut self,
        mut attributes: Vec<WireguardPeerAttribute>,
        key: &PublicKey,
        mut ips: &[WireguardAllowedIp],
    ) {
        // The nested peer's header and its allowed IPs' list header.
        const HEADERS: usize = 8;
        loop {
            let fixed = attributes.as_slice().buffer_len() + HEADERS;
            if self.used + fixed + ips.first().map_or(0, Emitable::buffer_len) > MESSAGE_BUDGET
                && !self.peers.is_empty()
            {
                self.next_message();
            }
            let mut room = MESSAGE_BUDGET.saturating_sub(self.used + fixed);
            let mut fit = 0;
            for ip in ips {
                let len = ip.buffer_len();
                // One allowed IP always goes, however small the budget.
                if len > room && fit > 0 {
                    break;
                }
                room = room.saturating_sub(len);
                fit += 1;
            }
            let (now, rest) = ips.split_at(fit);
            if !now.is_empty() {
                attributes.push(WireguardPeerAttribute::AllowedIps(now.to_vec()));
            }
            let peer = WireguardPeer(attributes);
            self.used += peer.buffer_len();
            self.peers.push(peer);
            if rest.is_empty() {
                return;
            }
            ips = rest;
            // The rest of this peer's allowed IPs, added to those just set.
            attributes = vec![WireguardPeerAttribute::PublicKey(key.0)];
            self.next_message();
        }
    }

    fn next_message(&mut self) {
        let mut attributes = std::mem::replace(
            &mut self.head,
            vec![WireguardAttribute::IfName(self.interface.clone())],
        );
        if !self.peers.is_empty() {
            attributes.push(WireguardAttribute::Peers(std::mem::take(&mut self.peers)));
        }
        self.messages.push(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        });
        self.used = 0;
    }

    fn finish(mut self) -> Vec<WireguardMessage> {
        if !self.peers.is_empty() || self.messages.is_empty() {
            self.next_message();
        }
        self.messages
    }
}

fn allowed_ip(net: &IpNet) -> WireguardAllowedIp {
    let family = match net.addr() {
        IpAddr::V4(_) => WireguardAddressFamily::Ipv4,
        IpAddr::V6(_) => WireguardAddressFamily::Ipv6,
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// A `GET_DEVICE` dump being read: the kernel splits a device with many peers over several
/// messages, and a peer with many allowed IPs too (its key then starts the next message
/// again, with the rest of its allowed IPs).
#[derive(Default)]
pub struct StateReading {
    state: DeviceState,
    last: Option<PublicKey>,
}

impl StateReading {
    /// A reading that has seen nothing.
    pub fn new() -> StateReading {
        StateReading::default()
    }

    /// Adds one message of the dump.
    pub fn message(&mut self, message: WireguardMessage) {
        for attribute in message.attributes {
            match attribute {
                WireguardAttribute::PublicKey(key) => self.state.public_key = Some(PublicKey(key)),
                WireguardAttribute::ListenPort(port) => self.state.listen_port = port,
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        self.peer(peer);
                    }
                }
                _ => {}
            }
        }
    }

    fn peer(&mut self, peer: WireguardPeer) {
        let Some(key) = peer.iter().find_map(|a| match a {
            WireguardPeerAttribute::PublicKey(key) => Some(PublicKey(*key)),
            _ => None,
        }) else {
            return;
        };
        // The same peer again continues it; any other starts afresh.
        let continued = self.last == Some(key);
        self.last = Some(key);
        let state = self.state.peers.entry(key).or_default();
        if !continued {
            *state = PeerState::default();
        }
        for attribute in peer.0 {
            match attribute {
                WireguardPeerAttribute::Endpoint(endpoint) => state.endpoint = Some(endpoint),
                WireguardPeerAttribute::PersistentKeepalive(seconds) => state.keepalive = seconds,
                WireguardPeerAttribute::LastHandshake(time) => {
                    state.last_handshake_ms = wall_clock_ms(time.seconds, time.nano_seconds);
                }
                WireguardPeerAttribute::RxBytes(n) => state.rx_bytes = n,
                WireguardPeerAttribute::TxBytes(n) => state.tx_bytes = n,
                WireguardPeerAttribute::AllowedIps(ips) => {
                    for ip in ips {
                        if let Some(net) = net_of(&ip) {
                            state.allowed_ips.insert(net);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The device as read.
    pub fn finish(self) -> DeviceState {
        self.state
    }
}

/// A handshake time as the kernel gives it (wall-clock seconds and nanoseconds, `0, 0` for
/// none) in ms since the epoch.
fn wall_clock_ms(seconds: i64, nanoseconds: i64) -> Option<u64> {
    let seconds = u64::try_from(seconds).ok()?;
    let nanoseconds = u64::try_from(nanoseconds).ok()?;
    (seconds, nanoseconds).ne(&(0, 0)).then(|| {
        seconds
            .saturating_mul(1000)
            .saturating_add(nanoseconds / 1_000_000)
    })
}

fn net_of(ip: &WireguardAllowedIp) -> Option<IpNet> {
    let addr = ip.iter().find_map(|a| match a {
        WireguardAllowedIpAttr::IpAddr(addr) => Some(*addr),
        _ => None,
    })?;
    let prefix = ip.iter().find_map(|a| match a {
        WireguardAllowedIpAttr::Cidr(prefix) => Some(*prefix),
        _ => None,
    })?;
    IpNet::new(addr, prefix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::WantedPeer;
    use netlink_packet_core::ParseableParametrized;
    use netlink_packet_generic::GenlHeader;
    use netlink_packet_wireguard::WireguardTimeSpec;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn peer(endpoint: Option<&str>, nets: &[&str], keepalive: u16) -> WantedPeer {
        WantedPeer {
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: nets.iter().map(|n| n.parse().unwrap()).collect(),
            keepalive,
        }
    }

    /// `message` as the kernel sends it and as it is read back: emitted, then parsed.
    fn through_the_wire(message: &WireguardMessage) -> WireguardMessage {
        let header = GenlHeader {
            cmd: message.cmd.into(),
            version: 1,
        };
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        WireguardMessage::parse_with_param(&bytes, header).expect("parses")
    }

    #[test]
    fn a_change_is_one_message_with_the_key_port_removals_then_peers() {
        let node = PrivateKey::generate().unwrap();
        let changes = Changes {
            set_key: true,
            listen_port: Some(51820),
            remove: vec![key(1)],
            set: vec![
                (key(2), peer(Some("192.0.2.2:51820"), &["10.88.0.2/32"], 25)),
                (key(3), peer(None, &["10.88.0.3/32", "fd00::3/128"], 0)),
            ],
        };
        let messages = set_messages("pn0", &changes, &node);
        assert_eq!(messages.len(), 1);
        let message = through_the_wire(&messages[0]);
        assert_eq!(message.cmd, WireguardCmd::SetDevice);
        let attributes = &message.attributes;
        assert_eq!(attributes[0], WireguardAttribute::IfName("pn0".into()));
        assert_eq!(
            attributes[1],
            WireguardAttribute::PrivateKey(node.to_bytes())
        );
        assert_eq!(attributes[2], WireguardAttribute::ListenPort(51820));
        let WireguardAttribute::Peers(peers) = &attributes[3] else {
            panic!("no peers: {attributes:?}");
        };
        assert_eq!(peers.len(), 3);
        assert_eq!(
            peers[0].0,
            vec![
                WireguardPeerAttribute::PublicKey(key(1).0),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ]
        );
        assert!(peers[1].contains(&WireguardPeerAttribute::Endpoint(
            "192.0.2.2:51820".parse().unwrap()
        )));
        assert!(peers[1].contains(&WireguardPeerAttribute::PersistentKeepalive(25)));
        for set in &peers[1..] {
            assert!(set.contains(&WireguardPeerAttribute::Flags(
                WireguardPeerFlags::ReplaceAllowedIps
            )));
        }
        // An endpoint not stated is left as it is (a roamed peer stays where it is).
        assert!(!peers[2]
            .iter()
            .any(|a| matches!(a, WireguardPeerAttribute::Endpoint(_))));
        let nets: Vec<IpNet> = peers[2]
            .iter()
            .find_map(|a| match a {
                WireguardPeerAttribute::AllowedIps(ips) => {
                    Some(ips.iter().filter_map(net_of).collect())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(
            nets,
            vec![
                "10.88.0.3/32".parse::<IpNet>().unwrap(),
                "fd00::3/128".parse().unwrap()
            ]
        );
    }

    /// The peers' keys (first byte) and allowed IPs of `messages`, in order, each message
    /// checked to be within the budget, the key in the first message only.
    fn read_split(messages: &[WireguardMessage]) -> Vec<(u8, Vec<WireguardPeerAttribute>)> {
        let mut seen = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            assert!(
                message.buffer_len() < MESSAGE_BUDGET + 512,
                "message {i}: {} bytes",
                message.buffer_len()
            );
            let message = through_the_wire(message);
            assert_eq!(
                message.attributes[0],
                WireguardAttribute::IfName("pn0".into())
            );
            let has_key = message
                .attributes
                .iter()
                .any(|a| matches!(a, WireguardAttribute::PrivateKey(_)));
            assert_eq!(has_key, i == 0, "message {i}");
            for attribute in message.attributes {
                if let WireguardAttribute::Peers(peers) = attribute {
                    for peer in peers {
                        let Some(WireguardPeerAttribute::PublicKey(k)) = peer.first() else {
                            panic!("a peer without its key first: {peer:?}");
                        };
                        seen.push((k[0], peer.0[1..].to_vec()));
                    }
                }
            }
        }
        seen
    }

    #[test]
    fn a_thousand_peers_go_in_messages_within_the_budget_in_order() {
        let node = PrivateKey::generate().unwrap();
        let changes = Changes {
            set_key: true,
            set: (0..1000u32)
                .map(|n| (key((n % 256) as u8), peer(None, &["10.88.0.0/32"], 0)))
                .collect(),
            ..Changes::default()
        };
        let messages = set_messages("pn0", &changes, &node);
        assert!(messages.len() > 1, "1,000 peers in one message");
        let seen = read_split(&messages);
        let keys: Vec<u8> = seen.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            (0..1000u32).map(|n| (n % 256) as u8).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_peer_with_more_allowed_ips_than_a_message_holds_goes_on_in_the_next() {
        let node = PrivateKey::generate().unwrap();
        let nets: Vec<String> = (0..3000u32)
            .map(|n| format!("172.{}.{}.0/24", 16 + n / 256, n % 256))
            .collect();
        let nets: Vec<&str> = nets.iter().map(String::as_str).collect();
        let changes = Changes {
            set_key: true,
            set: vec![
                (key(7), peer(Some("192.0.2.7:51820"), &nets, 25)),
                (key(8), peer(None, &["10.88.0.8/32"], 0)),
            ],
            ..Changes::default()
        };
        let messages = set_messages("pn0", &changes, &node);
        assert!(
            messages.len() >= 4,
            "3,000 prefixes fit in {} messages",
            messages.len()
        );
        let seen = read_split(&messages);
        let mut got = Vec::new();
        for (i, (k, attributes)) in seen.iter().enumerate() {
            let replaces = attributes.contains(&WireguardPeerAttribute::Flags(
                WireguardPeerFlags::ReplaceAllowedIps,
            ));
            if *k == 7 {
                // Only the first part replaces; the others add to it and say nothing else.
                assert_eq!(replaces, i == 0, "part {i}: {attributes:?}");
                if i > 0 {
                    assert_eq!(attributes.len(), 1, "part {i}: {attributes:?}");
                }
                for attribute in attributes {
                    if let WireguardPeerAttribute::AllowedIps(ips) = attribute {
                        got.extend(ips.iter().filter_map(net_of));
                    }
                }
            } else {
                assert!(replaces, "the next peer is whole: {attributes:?}");
            }
        }
        let want: Vec<IpNet> = nets
            .iter()
            .map(|n| n.parse().unwrap())
            .collect::<crate::uapi::AllowedIps>()
            .iter()
            .copied()
            .collect();
        assert_eq!(got, want, "every prefix once, in order");
        assert_eq!(seen.last().map(|(k, _)| *k), Some(8));
    }

    /// A netlink attribute as the kernel's uapi lays it out: length (header included, padding
    /// not) and type, little-endian here, then the value padded to 4 bytes.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(4 + value.len() as u16).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    const NESTED: u16 = 0x8000;

    #[test]
    fn a_change_is_encoded_as_the_kernels_uapi_lays_it_out() {
        let node = PrivateKey::generate().unwrap();
        let changes = Changes {
            listen_port: Some(51820),
            set: vec![(key(1), peer(None, &["10.88.0.2/32"], 25))],
            ..Changes::default()
        };
        let messages = set_messages("pn0", &changes, &node);
        assert_eq!(messages.len(), 1);
        let mut got = vec![0; messages[0].buffer_len()];
        messages[0].emit(&mut got);
        // include/uapi/linux/wireguard.h: WGDEVICE_A_IFNAME 2, LISTEN_PORT 6, PEERS 8;
        // WGPEER_A_PUBLIC_KEY 1, FLAGS 3, PERSISTENT_KEEPALIVE_INTERVAL 5, ALLOWEDIPS 9;
        // WGALLOWEDIP_A_FAMILY 1, IPADDR 2, CIDR_MASK 3; WGPEER_F_REPLACE_ALLOWEDIPS 2.
        let allowed_ip = [
            nla(1, &(libc::AF_INET as u16).to_le_bytes()),
            nla(2, &[10, 88, 0, 2]),
            nla(3, &[32]),
        ]
        .concat();
        let peer = [
            nla(1, &[1; 32]),
            nla(3, &2u32.to_le_bytes()),
            nla(5, &25u16.to_le_bytes()),
            nla(9 | NESTED, &nla(NESTED, &allowed_ip)),
        ]
        .concat();
        let want = [
            nla(2, b"pn0\0"),
            nla(6, &51820u16.to_le_bytes()),
            nla(8 | NESTED, &nla(NESTED, &peer)),
        ]
        .concat();
        assert_eq!(got, want);
    }

    #[test]
    fn nothing_but_the_key_is_one_message_without_peers() {
        let node = PrivateKey::generate().unwrap();
        let changes = Changes {
            set_key: true,
            ..Changes::default()
        };
        let messages = set_messages("pn0", &changes, &node);
        assert_eq!(messages.len(), 1);
        assert!(!messages[0]
            .attributes
            .iter()
            .any(|a| matches!(a, WireguardAttribute::Peers(_))));
    }

    fn reply_peer(k: u8, nets: &[&str], handshake_s: i64, handshake_ns: i64) -> WireguardPeer {
        WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(key(k).0),
            WireguardPeerAttribute::Endpoint("192.0.2.9:51820".parse().unwrap()),
            WireguardPeerAttribute::PersistentKeepalive(25),
            WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                seconds: handshake_s,
                nano_seconds: handshake_ns,
            }),
            WireguardPeerAttribute::RxBytes(100),
            WireguardPeerAttribute::TxBytes(200),
            WireguardPeerAttribute::AllowedIps(
                nets.iter()
                    .map(|n| allowed_ip(&n.parse().unwrap()))
                    .collect(),
            ),
        ])
    }

    #[test]
    fn a_dump_over_several_messages_reads_as_one_device() {
        // The kernel's split: peer 2's allowed IPs continue in the second message, which
        // names it again.
        let first = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::IfName("pn0".into()),
                WireguardAttribute::PublicKey(key(9).0),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Peers(vec![
                    reply_peer(1, &["10.88.0.1/32"], 1_799_999_990, 500_000_000),
                    reply_peer(2, &["10.88.0.2/32"], 0, 0),
                ]),
            ],
        };
        let second = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                WireguardAttribute::IfName("pn0".into()),
                WireguardAttribute::Peers(vec![WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(key(2).0),
                    WireguardPeerAttribute::AllowedIps(vec![allowed_ip(
                        &"192.168.30.0/24".parse().unwrap(),
                    )]),
                ])]),
            ],
        };
        let mut reading = StateReading::new();
        reading.message(through_the_wire(&first));
        reading.message(through_the_wire(&second));
        let state = reading.finish();
        assert_eq!(state.public_key, Some(key(9)));
        assert_eq!(state.listen_port, 51820);
        assert_eq!(state.peers.len(), 2);
        let one = &state.peers[&key(1)];
        assert_eq!(one.last_handshake_ms, Some(1_799_999_990_500));
        assert_eq!((one.rx_bytes, one.tx_bytes, one.keepalive), (100, 200, 25));
        assert_eq!(one.endpoint, Some("192.0.2.9:51820".parse().unwrap()));
        let two = &state.peers[&key(2)];
        assert_eq!(
            two.allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.88.0.2/32", "192.168.30.0/24"]
        );
        // No handshake yet: the kernel says 0, 0.
        assert_eq!(two.last_handshake_ms, None);
        // The kernel's times are wall-clock, however early (boringtun's small ages are not).
        assert_eq!(wall_clock_ms(5, 2_000_000), Some(5_002));
    }

    #[test]
    fn families_resolve_against_this_kernel() {
        // The controller's own family has a fixed id: the exchange works end to end.
        assert_eq!(family_id("nlctrl").unwrap(), Some(0x10));
        assert_eq!(family_id("pn-no-such").unwrap(), None);
    }
}
