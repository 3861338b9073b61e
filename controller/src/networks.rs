//! Overlay networks: the rules every network, membership and port forward is checked against
//! (over the API and the CLI alike), overlay address allocation, and the one place where a
//! member's desired network is derived ([`derive`]) from its network, the other members and
//! what their nodes reported. The SQL is in `storage/networks.rs`; docs/network.md, "The
//! controller's part", has the rules in prose.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::wire::{DesiredNetwork, PortForward, WgPeer};

/// The overlay interface every member gets.
pub const INTERFACE: &str = "pn0";
/// A network's UDP listen port when the operator names none.
pub const DEFAULT_PORT: u16 = 51820;
/// Persistent keepalive of every peer, seconds: keeps NAT mappings open.
pub const KEEPALIVE_S: u16 = 25;
/// Narrowest and widest prefix of a network's CIDR (a /30 has two host addresses).
pub const MIN_PREFIX: u8 = 8;
/// See [`MIN_PREFIX`].
pub const MAX_PREFIX: u8 = 30;
/// Longest network name, bytes.
pub const MAX_NAME: usize = 32;
/// Most routes one member may announce.
pub const MAX_ANNOUNCE: usize = 32;
/// Longest operator endpoint, bytes (a DNS name and a port).
pub const MAX_ENDPOINT: usize = 261;
/// Most endpoints kept of what a node reports.
pub const MAX_REPORTED_ENDPOINTS: usize = 8;

/// Why a network operation was refused: a bad request or a state it does not fit. The API
/// answers [`Refusal::status`] with [`Refusal::code`]; the CLI prints the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A value breaks a rule (the message says which).
    #[error("{0}")]
    Invalid(String),
    /// No network of that name.
    #[error("no network {0}")]
    NoNetwork(String),
    /// No node of that id.
    #[error("no node {0}")]
    NoNode(String),
    /// The name is taken.
    #[error("network {0} exists already")]
    Exists(String),
    /// Delete of a network that still has members.
    #[error("network {name} still has {members} member(s): they must leave first")]
    NotEmpty {
        /// The network.
        name: String,
        /// Its members.
        members: u64,
    },
    /// Join of a node that is a member of another network.
    #[error("node {node} is in network {network}: it must leave it first")]
    InAnotherNetwork {
        /// The node.
        node: String,
        /// The network it is in.
        network: String,
    },
    /// The node is revoked.
    #[error("node {0} is revoked")]
    Revoked(String),
    /// Every host address of the network is taken.
    #[error("network {name} ({cidr}) has no free address: all {hosts} are taken")]
    Full {
        /// The network.
        name: String,
        /// Its CIDR.
        cidr: String,
        /// Its host addresses.
        hosts: u64,
    },
    /// Leave (or a forward) of a node that is not a member (of that network).
    #[error("node {node} is not in {network}")]
    NotMember {
        /// The node.
        node: String,
        /// The network named, or "any network".
        network: String,
    },
    /// An announced route overlaps the overlay or another member's route.
    #[error("{0}")]
    RouteConflict(String),
    /// A forwarded port is the network's listen port.
    #[error("port {port} is the listen port of network {network}: it cannot be forwarded")]
    PortConflict {
        /// The port.
        port: u16,
        /// The network.
        network: String,
    },
    /// A forward of the same node, protocol and port goes elsewhere.
    #[error("node {node} forwards {proto} {port} to {to} already: remove it first")]
    ForwardExists {
        /// The node.
        node: String,
        /// `tcp` or `udp`.
        proto: String,
        /// The port.
        port: u16,
        /// Where the existing forward goes.
        to: String,
    },
    /// No such forward.
    #[error("node {node} has no {proto} forward of port {port}")]
    NoForward {
        /// The node.
        node: String,
        /// `tcp` or `udp`.
        proto: String,
        /// The port.
        port: u16,
    },
}

impl Refusal {
    /// The API's machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Invalid(_) => "invalid_request",
            Refusal::NoNetwork(_) | Refusal::NoNode(_) | Refusal::NoForward { .. } => "not_found",
            Refusal::Exists(_) => "network_exists",
            Refusal::NotEmpty { .. } => "network_not_empty",
            Refusal::InAnotherNetwork { .. } => "in_another_network",
            Refusal::Revoked(_) => "node_revoked",
            Refusal::Full { .. } => "network_full",
            Refusal::NotMember { .. } => "not_a_member",
            Refusal::RouteConflict(_) => "route_conflict",
            Refusal::PortConflict { .. } => "port_conflict",
            Refusal::ForwardExists { .. } => "forward_exists",
        }
    }

    /// The API's HTTP status: 400 for a bad value, 404 for what does not exist, 409 for a
    /// state the request does not fit.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Invalid(_) => 400,
            Refusal::NoNetwork(_) | Refusal::NoNode(_) | Refusal::NoForward { .. } => 404,
            _ => 409,
        }
    }
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::Invalid(message.into())
}

/// An IPv4 network in CIDR notation, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The network address.
    pub base: Ipv4Addr,
    /// The prefix length, 0 to 32.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/p` (0 ≤ p ≤ 32) whose host bits are zero.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (ip, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not an IPv4 CIDR (a.b.c.d/prefix)"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 CIDR (a.b.c.d/prefix)"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to 32"))?;
        let cidr = Cidr { base: ip, prefix };
        let base = Ipv4Addr::from(u32::from(ip) & cidr.mask());
        if base != ip {
            return Err(format!(
                "{text:?} has host bits set: the network is {base}/{prefix}"
            ));
        }
        Ok(cidr)
    }

    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// Whether `ip` is in this network.
    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.base)
    }

    /// Whether the two networks share an address.
    pub fn overlaps(self, other: Cidr) -> bool {
        self.contains(other.base) || other.contains(self.base)
    }

    /// Host addresses: all but the network and broadcast address.
    pub fn hosts(self) -> u64 {
        (1u64 << (32 - u32::from(self.prefix))).saturating_sub(2)
    }

    /// The `n`th host address (1 is the first after the network address).
    fn host(self, n: u64) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base).wrapping_add(n as u32))
    }

    /// Which host address `ip` is (1 the first), if it is one of this network's.
    fn host_number(self, ip: Ipv4Addr) -> Option<u64> {
        let n = u64::from(u32::from(ip).wrapping_sub(u32::from(self.base)));
        (self.contains(ip) && (1..=self.hosts()).contains(&n)).then_some(n)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// Checks a network name: 1 to [`MAX_NAME`] bytes of `a-z 0-9 -`, starting and ending with a
/// letter or digit.
pub fn check_name(name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "network name {name:?} must be 1 to {MAX_NAME} of a-z, 0-9 and -, \
             starting and ending with a letter or digit"
        )))
    }
}

/// A network's CIDR: IPv4, host bits zero, prefix [`MIN_PREFIX`] to [`MAX_PREFIX`], and not
/// in `0.0.0.0/8`, `127.0.0.0/8` or from `224.0.0.0` up (multicast and reserved).
pub fn network_cidr(text: &str) -> Result<Cidr, Refusal> {
    let cidr = Cidr::parse(text).map_err(|e| invalid(format!("cidr: {e}")))?;
    if !(MIN_PREFIX..=MAX_PREFIX).contains(&cidr.prefix) {
        return Err(invalid(format!(
            "cidr {cidr}: the prefix length must be {MIN_PREFIX} to {MAX_PREFIX}"
        )));
    }
    let first = cidr.base.octets()[0];
    if first == 0 || first == 127 || first >= 224 {
        return Err(invalid(format!(
            "cidr {cidr} is not usable for an overlay (0/8, 127/8 and 224/3 are refused)"
        )));
    }
    Ok(cidr)
}

/// A port from the operator: 1 to 65535.
pub fn check_port(what: &str, port: u32) -> Result<u16, Refusal> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(format!("{what} must be 1 to 65535, not {port}")))
}

/// A forward's protocol: `tcp` or `udp`.
pub fn check_proto(proto: &str) -> Result<(), Refusal> {
    match proto {
        "tcp" | "udp" => Ok(()),
        _ => Err(invalid(format!("proto must be tcp or udp, not {proto:?}"))),
    }
}

/// A forward's target: an IPv4 address (not unspecified, broadcast, multicast or loopback —
/// the node cannot route there, and refuses such a forward) and a port 1 to 65535,
/// `a.b.c.d:port`.
pub fn check_target(to: &str) -> Result<(), Refusal> {
    let bad = || {
        invalid(format!(
            "to must be an IPv4 address and port (a.b.c.d:port), not {to:?}"
        ))
    };
    let addr: SocketAddrV4 = to.parse().map_err(|_| bad())?;
    let ip = addr.ip();
    if addr.port() == 0
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_loopback()
    {
        return Err(bad());
    }
    Ok(())
}

/// An operator's endpoint for a member: `HOST:PORT` where HOST is a DNS name, an IPv4
/// address or a bracketed IPv6 address, and PORT is 1 to 65535.
pub fn check_endpoint(endpoint: &str) -> Result<(), Refusal> {
    let bad = || {
        invalid(format!(
            "endpoint must be HOST:PORT (a name, an IPv4 address or [IPv6]; port 1 to 65535), \
             not {endpoint:?}"
        ))
    };
    if endpoint.len() > MAX_ENDPOINT {
        return Err(bad());
    }
    if let Ok(addr) = endpoint.parse::<SocketAddr>() {
        return if addr.port() == 0 || addr.ip().is_unspecified() {
            Err(bad())
        } else {
            Ok(())
        };
    }
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    // A name's last label is never all digits: `1.2.3` is a mistyped address, not a name.
    let numeric_tail = host
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if host.is_empty()
        || numeric_tail
        || !host
            .split('.')
            .all(powernode_modules::reference::is_dns_label)
    {
        return Err(bad());
    }
    Ok(())
}

/// Routes a member announces (`announce`), checked against its network's CIDR: each an IPv4
/// CIDR with host bits zero and a prefix of 1 to 32, at most [`MAX_ANNOUNCE`], overlapping
/// neither the overlay nor each other. Returned in a stable order.
pub fn check_announce(announce: &[String], network: Cidr) -> Result<Vec<Cidr>, Refusal> {
    if announce.len() > MAX_ANNOUNCE {
        return Err(invalid(format!(
            "at most {MAX_ANNOUNCE} announced routes, not {}",
            announce.len()
        )));
    }
    let mut routes = Vec::with_capacity(announce.len());
    for text in announce {
        let route = Cidr::parse(text).map_err(|e| invalid(format!("announce: {e}")))?;
        if route.prefix == 0 {
            return Err(invalid(format!(
                "announce: {route} (a default route) is not supported"
            )));
        }
        if route.overlaps(network) {
            return Err(Refusal::RouteConflict(format!(
                "announced route {route} overlaps the network's own {network}"
            )));
        }
        if let Some(other) = routes.iter().find(|r: &&Cidr| r.overlaps(route)) {
            return Err(Refusal::RouteConflict(format!(
                "announced routes {other} and {route} overlap"
            )));
        }
        routes.push(route);
    }
    routes.sort();
    Ok(routes)
}

/// Whether `key` is a WireGuard public key as `wg` prints it: 32 bytes in standard base64,
/// 44 characters with one `=` of padding. A key that is not is never handed to peers (a
/// node refuses a whole configuration with one bad key in it).
pub fn is_public_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    let b64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    // 32 bytes = 256 bits: 42 full characters, one carrying the last 4 bits (its low 2 bits
    // zero), then `=`.
    bytes.len() == 44
        && bytes[..42].iter().all(b64)
        && b"AEIMQUYcgkosw048".contains(&bytes[42])
        && bytes[43] == b'='
}

/// The lowest host address of `cidr` not in `used`: never the network or broadcast address,
/// never one taken. `None` when all are.
pub fn allocate(cidr: Cidr, used: impl IntoIterator<Item = Ipv4Addr>) -> Option<Ipv4Addr> {
    let mut taken: Vec<u64> = used
        .into_iter()
        .filter_map(|ip| cidr.host_number(ip))
        .collect();
    taken.sort_unstable();
    taken.dedup();
    let mut next = 1;
    for n in taken {
        if n != next {
            break;
        }
        next += 1;
    }
    (next <= cidr.hosts()).then(|| cidr.host(next))
}

/// What of a node's heartbeats its peers are derived from: its WireGuard public key, the
/// endpoints it reported, and the address its heartbeat came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The public key, when a heartbeat carried a valid one.
    pub public_key: Option<String>,
    /// Where the node says it can be reached, `address:port`, in its order.
    pub endpoints: Vec<String>,
    /// The address the node's last heartbeat came from.
    pub seen_ip: Option<IpAddr>,
}

impl NodeReport {
    /// What a heartbeat with `network` (netmgr's status as the node sent it), which came
    /// from `remote`, says. A key that is not one, and endpoints that are not `ip:port`, are
    /// left out.
    pub fn from_heartbeat(network: Option<&Map<String, Value>>, remote: Option<IpAddr>) -> Self {
        let public_key = network
            .and_then(|n| n.get("public_key"))
            .and_then(Value::as_str)
            .filter(|k| is_public_key(k))
            .map(str::to_owned);
        let endpoints = network
            .and_then(|n| n.get("endpoints"))
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .filter_map(|e| e.parse::<SocketAddr>().ok())
                    .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
                    .map(|a| a.to_string())
                    .take(MAX_REPORTED_ENDPOINTS)
                    .collect()
            })
            .unwrap_or_default();
        NodeReport {
            public_key,
            endpoints,
            seen_ip: remote.map(|ip| ip.to_canonical()),
        }
    }

    /// `self` (what is stored) updated by `new` (a heartbeat): what the heartbeat does not
    /// say — no key, no endpoints, no address — is kept, so a node whose netmgr restarts
    /// (and reports nothing for a moment) changes no one's peers.
    pub fn updated_by(&self, new: &NodeReport) -> NodeReport {
        NodeReport {
            public_key: new.public_key.clone().or_else(|| self.public_key.clone()),
            endpoints: if new.endpoints.is_empty() {
                self.endpoints.clone()
            } else {
                new.endpoints.clone()
            },
            seen_ip: new.seen_ip.or(self.seen_ip),
        }
    }
}

/// A port forward of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Forward {
    /// The node whose port is forwarded.
    pub node_id: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// The node's port.
    pub port: u16,
    /// Where connections go, `a.b.c.d:port`.
    pub to: String,
    /// When it was added, ms.
    pub created_at_ms: i64,
}

/// A network as derivation needs it.
#[derive(Clone, Debug)]
pub struct NetworkFacts {
    /// Its name.
    pub name: String,
    /// Its CIDR.
    pub cidr: Cidr,
    /// Its UDP listen port.
    pub listen_port: u16,
}

/// A member as derivation needs it.
#[derive(Clone, Debug)]
pub struct MemberFacts {
    /// The node.
    pub node_id: String,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// Routes it announces.
    pub announce: Vec<String>,
    /// The operator's endpoint for it, if any.
    pub endpoint: Option<String>,
    /// The node is revoked.
    pub revoked: bool,
    /// What its heartbeats said.
    pub report: NodeReport,
}

/// Where a peer's endpoint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EndpointSource {
    /// The operator set it at join.
    Operator,
    /// The first endpoint the node reported.
    Reported,
    /// The address the node's last heartbeat came from, with the network's listen port.
    Heartbeat,
}

/// The endpoint other members dial `member` at, and where it came from: the operator's,
/// else the first the node reported, else the address its last heartbeat came from with the
/// network's listen port. `None` when there is none of these (peers then wait for it to
/// dial them).
pub fn endpoint_of(member: &MemberFacts, listen_port: u16) -> Option<(String, EndpointSource)> {
    if let Some(e) = &member.endpoint {
        return Some((e.clone(), EndpointSource::Operator));
    }
    if let Some(e) = member.report.endpoints.first() {
        return Some((e.clone(), EndpointSource::Reported));
    }
    member.report.seen_ip.map(|ip| {
        (
            SocketAddr::new(ip, listen_port).to_string(),
            EndpointSource::Heartbeat,
        )
    })
}

/// `member` as the other members' peer: its key, endpoint, its /32 and the routes it
/// announces, keepalive [`KEEPALIVE_S`]. `None` for a revoked node and for one that has not
/// reported a valid key.
pub fn peer_of(member: &MemberFacts, listen_port: u16) -> Option<WgPeer> {
    if member.revoked {
        return None;
    }
    let public_key = member
        .report
        .public_key
        .clone()
        .filter(|k| is_public_key(k))?;
    let mut allowed_ips = vec![format!("{}/32", member.address)];
    allowed_ips.extend(member.announce.iter().cloned());
    Some(WgPeer {
        public_key,
        endpoint: endpoint_of(member, listen_port).map(|(e, _)| e),
        allowed_ips,
        keepalive_s: Some(KEEPALIVE_S),
    })
}

/// Every member's desired network, by node id: interface [`INTERFACE`], its address with the
/// network's prefix, the network's port and name, every *other* member that can be a peer
/// ([`peer_of`]) ordered by overlay address, and its own forwards ordered by protocol and
/// port. A revoked member gets `None`. Two members reporting the same key are peers of no
/// one (a cloned node must not take the other's traffic, and a node refuses a configuration
/// with a key twice).
pub fn derive(
    network: &NetworkFacts,
    members: &[MemberFacts],
    forwards: &[Forward],
) -> BTreeMap<String, Option<DesiredNetwork>> {
    let mut ordered: Vec<&MemberFacts> = members.iter().collect();
    ordered.sort_by_key(|m| (m.address, m.node_id.clone()));
    let candidates: Vec<(&MemberFacts, WgPeer)> = ordered
        .iter()
        .filter_map(|m| peer_of(m, network.listen_port).map(|p| (*m, p)))
        .collect();
    let mut key_count: HashMap<&str, usize> = HashMap::new();
    for (_, peer) in &candidates {
        *key_count.entry(peer.public_key.as_str()).or_default() += 1;
    }
    let peers: Vec<(&str, &WgPeer)> = candidates
        .iter()
        .filter(|(_, p)| key_count[p.public_key.as_str()] == 1)
        .map(|(m, p)| (m.node_id.as_str(), p))
        .collect();
    let mut own_forwards: HashMap<&str, Vec<&Forward>> = HashMap::new();
    for f in forwards {
        own_forwards.entry(f.node_id.as_str()).or_default().push(f);
    }
    members
        .iter()
        .map(|member| {
            let desired = (!member.revoked).then(|| {
                let mut forwards: Vec<PortForward> = own_forwards
                    .get(member.node_id.as_str())
                    .map(|list| {
                        list.iter()
                            .map(|f| PortForward {
                                proto: f.proto.clone(),
                                port: f.port,
                                to: f.to.clone(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                forwards.sort_by(|a, b| (&a.proto, a.port).cmp(&(&b.proto, b.port)));
                DesiredNetwork {
                    interface: INTERFACE.to_owned(),
                    address: format!("{}/{}", member.address, network.cidr.prefix),
                    listen_port: network.listen_port,
                    peers: peers
                        .iter()
                        .filter(|(id, _)| *id != member.node_id)
                        .map(|(_, p)| (*p).clone())
                        .collect(),
                    network: network.name.clone(),
                    forwards,
                }
            });
            (member.node_id.clone(), desired)
        })
        .collect()
}

/// The heartbeat's `network` object read leniently, for `network show`: netmgr's
/// `NetworkStatus` as far as it is there (older agents send less, or nothing).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct ReportedNetwork {
    /// `Down`, `Configuring`, `Up` or `Failed`.
    pub state: Option<String>,
    /// The interface.
    pub interface: Option<String>,
    /// Whether WireGuard runs in userspace.
    pub userspace: Option<bool>,
    /// The last configuration error.
    pub error: Option<String>,
    /// The desired-state generation netmgr applied.
    pub generation: Option<u64>,
    /// Peers with a recent handshake.
    pub peers_up: Option<u32>,
    /// Its listen port.
    pub listen_port: Option<u16>,
    /// Each peer as WireGuard reports it.
    pub peers: Vec<ReportedPeer>,
}

/// One peer as a node reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct ReportedPeer {
    /// Its public key.
    pub public_key: String,
    /// The node that has this key, among the network's members (filled in by the
    /// controller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Where its packets last came from.
    pub endpoint: Option<String>,
    /// Its last handshake (the node's clock), ms since the epoch.
    pub last_handshake_ms: Option<u64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

impl ReportedNetwork {
    /// The report in a heartbeat's `network` object; `None` when there is none or it does
    /// not read.
    pub fn from_heartbeat(network: Option<&Value>) -> Option<Self> {
        network.and_then(|n| serde_json::from_value(n.clone()).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        Cidr::parse(text).unwrap()
    }

    const KEY_A: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const KEY_B: &str = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA=";

    #[test]
    fn cidrs_parse_with_host_bits_zero() {
        let c = cidr("10.88.0.0/16");
        assert_eq!((c.base, c.prefix), (Ipv4Addr::new(10, 88, 0, 0), 16));
        assert_eq!(c.to_string(), "10.88.0.0/16");
        assert_eq!(c.hosts(), 65_534);
        assert!(c.contains(Ipv4Addr::new(10, 88, 255, 255)));
        assert!(!c.contains(Ipv4Addr::new(10, 89, 0, 0)));
        for bad in [
            "10.88.0.1/16",
            "10.88.0.0",
            "10.88.0.0/33",
            "x/8",
            "::/0",
            "10.88.0.0/-1",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert!(cidr("10.0.0.0/8").overlaps(cidr("10.88.0.0/16")));
        assert!(!cidr("10.1.0.0/16").overlaps(cidr("10.2.0.0/16")));
    }

    #[test]
    fn network_cidrs_are_ipv4_with_prefix_8_to_30() {
        assert!(network_cidr("10.88.0.0/16").is_ok());
        assert!(network_cidr("10.88.0.0/30").is_ok());
        assert!(network_cidr("10.0.0.0/8").is_ok());
        for bad in [
            "10.88.0.0/31",
            "10.0.0.0/7",
            "127.0.0.0/8",
            "0.0.0.0/8",
            "224.0.0.0/8",
            "fd00::/64",
        ] {
            let err = network_cidr(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_request", "{bad}");
        }
    }

    #[test]
    fn allocation_takes_the_lowest_free_host_and_never_the_ends() {
        let net = cidr("10.88.0.0/30");
        assert_eq!(allocate(net, []), Some(Ipv4Addr::new(10, 88, 0, 1)));
        let one = [Ipv4Addr::new(10, 88, 0, 1)];
        assert_eq!(allocate(net, one), Some(Ipv4Addr::new(10, 88, 0, 2)));
        let both = [Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 1)];
        assert_eq!(
            allocate(net, both),
            None,
            "the broadcast address is not handed out"
        );
        let gap = [Ipv4Addr::new(10, 88, 0, 2)];
        assert_eq!(allocate(net, gap), Some(Ipv4Addr::new(10, 88, 0, 1)));
        let wide = cidr("10.0.0.0/8");
        let used: Vec<Ipv4Addr> = (1..=300u32)
            .map(|n| Ipv4Addr::from(0x0a00_0000 + n))
            .collect();
        assert_eq!(allocate(wide, used), Some(Ipv4Addr::new(10, 0, 1, 45)));
    }

    #[test]
    fn names_ports_forwards_and_endpoints_are_checked() {
        for good in ["lab", "a", "edge-1", &"x".repeat(MAX_NAME)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Lab",
            "-a",
            "a-",
            "a_b",
            "a b",
            &"x".repeat(MAX_NAME + 1),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(check_port("port", 51820), Ok(51820));
        assert!(check_port("port", 0).is_err());
        assert!(check_port("port", 65536).is_err());
        assert!(check_proto("tcp").is_ok() && check_proto("udp").is_ok());
        assert!(check_proto("TCP").is_err() && check_proto("sctp").is_err());
        assert!(check_target("10.88.0.2:80").is_ok());
        for bad in [
            "10.88.0.2",
            "10.88.0.2:0",
            "host:80",
            "[::1]:80",
            "0.0.0.0:80",
            "127.0.0.1:80",
            "224.0.0.1:5",
        ] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
        for good in [
            "vpn.example.com:51820",
            "198.51.100.7:51820",
            "[2001:db8::1]:51820",
            "gw:1",
        ] {
            assert!(check_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "vpn.example.com",
            "vpn.example.com:0",
            ":51820",
            "a b:1",
            "-x:1",
            "1.2.3:4",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn announced_routes_must_not_overlap_the_overlay_or_each_other() {
        let net = cidr("10.88.0.0/16");
        let ok = check_announce(&["192.168.2.0/24".into(), "192.168.1.0/24".into()], net);
        assert_eq!(
            ok.unwrap(),
            vec![cidr("192.168.1.0/24"), cidr("192.168.2.0/24")]
        );
        let inside = check_announce(&["10.88.4.0/24".into()], net).unwrap_err();
        assert_eq!(inside.code(), "route_conflict");
        let around = check_announce(&["10.0.0.0/8".into()], net).unwrap_err();
        assert_eq!(around.code(), "route_conflict");
        let twice = check_announce(&["192.168.0.0/16".into(), "192.168.1.0/24".into()], net);
        assert_eq!(twice.unwrap_err().code(), "route_conflict");
        assert_eq!(
            check_announce(&["0.0.0.0/0".into()], net)
                .unwrap_err()
                .code(),
            "invalid_request"
        );
        assert_eq!(
            check_announce(&["192.168.1.1/24".into()], net)
                .unwrap_err()
                .code(),
            "invalid_request"
        );
    }

    #[test]
    fn public_keys_are_32_bytes_of_base64() {
        assert!(is_public_key(KEY_A) && is_public_key(KEY_B));
        assert!(is_public_key(
            "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
        ));
        for bad in [
            "",
            "AAAA",
            &KEY_A[..43],
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA-A=",
        ] {
            assert!(!is_public_key(bad), "{bad}");
        }
    }

    #[test]
    fn a_report_keeps_what_a_heartbeat_leaves_out() {
        let status = serde_json::json!({"state": "Up", "public_key": KEY_A,
            "endpoints": ["192.0.2.1:51820", "bogus", "0.0.0.0:1", "[2001:db8::1]:51820"]});
        let report = NodeReport::from_heartbeat(
            status.as_object(),
            Some("::ffff:192.0.2.9".parse().unwrap()),
        );
        assert_eq!(report.public_key.as_deref(), Some(KEY_A));
        assert_eq!(report.endpoints, ["192.0.2.1:51820", "[2001:db8::1]:51820"]);
        assert_eq!(report.seen_ip, Some("192.0.2.9".parse().unwrap()));
        let restarting = serde_json::json!({"state": "Down", "public_key": null, "endpoints": []});
        let next = NodeReport::from_heartbeat(restarting.as_object(), report.seen_ip);
        assert_eq!(report.updated_by(&next), report);
        let bad_key = serde_json::json!({"public_key": "not a key"});
        assert_eq!(
            NodeReport::from_heartbeat(bad_key.as_object(), None).public_key,
            None
        );
    }

    fn member(id: &str, host: u8, key: Option<&str>) -> MemberFacts {
        MemberFacts {
            node_id: id.into(),
            address: Ipv4Addr::new(10, 88, 0, host),
            announce: Vec::new(),
            endpoint: None,
            revoked: false,
            report: NodeReport {
                public_key: key.map(str::to_owned),
                endpoints: Vec::new(),
                seen_ip: None,
            },
        }
    }

    #[test]
    fn each_member_gets_every_other_keyed_member_as_a_peer() {
        let net = NetworkFacts {
            name: "lab".into(),
            cidr: cidr("10.88.0.0/16"),
            listen_port: 51820,
        };
        let mut a = member("a", 1, Some(KEY_A));
        a.announce = vec!["192.168.1.0/24".into()];
        a.report.endpoints = vec!["192.0.2.1:51820".into()];
        a.report.seen_ip = Some("198.51.100.1".parse().unwrap());
        let mut b = member("b", 2, Some(KEY_B));
        b.report.seen_ip = Some("198.51.100.2".parse().unwrap());
        b.endpoint = Some("b.example:4000".into());
        let mut c = member("c", 3, None);
        c.report.seen_ip = Some("198.51.100.3".parse().unwrap());
        let forwards = [Forward {
            node_id: "c".into(),
            proto: "udp".into(),
            port: 53,
            to: "10.88.0.1:53".into(),
            created_at_ms: 0,
        }];
        let derived = derive(&net, &[c.clone(), b.clone(), a.clone()], &forwards);
        let of = |id: &str| derived[id].clone().unwrap();
        let a_cfg = of("a");
        assert_eq!(a_cfg.address, "10.88.0.1/16");
        assert_eq!(
            (a_cfg.interface.as_str(), a_cfg.listen_port),
            ("pn0", 51820)
        );
        assert_eq!(a_cfg.network, "lab");
        assert_eq!(a_cfg.peers.len(), 1, "c has no key");
        assert_eq!(a_cfg.peers[0].endpoint.as_deref(), Some("b.example:4000"));
        let c_cfg = of("c");
        assert_eq!(
            c_cfg
                .peers
                .iter()
                .map(|p| p.public_key.as_str())
                .collect::<Vec<_>>(),
            [KEY_A, KEY_B]
        );
        assert_eq!(
            c_cfg.peers[0].allowed_ips,
            ["10.88.0.1/32", "192.168.1.0/24"]
        );
        assert_eq!(c_cfg.peers[0].endpoint.as_deref(), Some("192.0.2.1:51820"));
        assert_eq!(c_cfg.peers[0].keepalive_s, Some(KEEPALIVE_S));
        assert_eq!(c_cfg.forwards.len(), 1);
        // Without reported endpoints: the heartbeat's address with the listen port.
        a.report.endpoints.clear();
        assert_eq!(
            endpoint_of(&a, 51820),
            Some(("198.51.100.1:51820".into(), EndpointSource::Heartbeat))
        );
        a.report.seen_ip = None;
        assert_eq!(peer_of(&a, 51820).unwrap().endpoint, None);
    }

    #[test]
    fn revoked_members_and_shared_keys_are_no_ones_peers() {
        let net = NetworkFacts {
            name: "lab".into(),
            cidr: cidr("10.88.0.0/24"),
            listen_port: 51820,
        };
        let mut revoked = member("r", 4, Some(KEY_B));
        revoked.revoked = true;
        let clone1 = member("x", 2, Some(KEY_A));
        let clone2 = member("y", 3, Some(KEY_A));
        let plain = member("p", 1, None);
        let derived = derive(&net, &[plain, clone1, clone2, revoked], &[]);
        assert!(derived["p"].as_ref().unwrap().peers.is_empty());
        assert!(derived["x"].as_ref().unwrap().peers.is_empty());
        assert_eq!(derived["r"], None);
    }
}
