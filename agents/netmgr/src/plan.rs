//! Validation: a [`NetworkConfig`] becomes a [`Plan`] or is refused whole with a
//! [`Rejection`] that says what is wrong, before anything of it is applied.
//!
//! | rule | refused when |
//! |---|---|
//! | interface | the name is empty, longer than 15 bytes, or has a byte other than `A-Za-z0-9_.-` |
//! | address | not IPv4 CIDR (`10.88.0.7/16`), a prefix of 0, or the network's own or broadcast address |
//! | listen port | 0 (and, checked by [`check_listen_port`], bound by another socket) |
//! | peer key | not base64 of 32 bytes, the node's own key, or twice |
//! | peer endpoint | not `host:port` with a port other than 0 |
//! | peer allowed IPs | none, one that is not CIDR, the first (the peer's overlay address) not a /32 inside the network's prefix, the node's own address, or one another peer has too |
//! | forwards | what [`crate::forward::render`] refuses (port 0, `to` not a usable `IPv4:port`, the same protocol and port twice), or UDP on the listen port (TCP on that number is no clash) |
//!
//! A peer's first allowed IP is its overlay address, the rest are the routes it announces
//! (the controller builds them so); host bits of an allowed IP are cleared, as `wg` does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net};
use powernode_types::{ForwardProto, NetworkConfig, PortForward};

use crate::key::PublicKey;

/// The longest interface name Linux takes (`IFNAMSIZ` less the NUL).
pub const MAX_IFNAME: usize = 15;

/// Why a configuration is refused: one sentence, naming the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub String);

/// Where a peer is reached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Endpoint {
    /// An address.
    Addr(SocketAddr),
    /// A name, resolved when the configuration is applied.
    Host {
        /// The name.
        host: String,
        /// The port.
        port: u16,
    },
}

/// One validated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    /// Where to reach it, if anywhere.
    pub endpoint: Option<Endpoint>,
    /// Its networks, host bits cleared, without repeats, in the order given: the first is its
    /// overlay address.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive, seconds (0: off).
    pub keepalive: u16,
}

/// A configuration that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The desired-state generation it came from.
    pub generation: u64,
    /// The network's name on the controller.
    pub network: String,
    /// The interface.
    pub interface: String,
    /// The node's overlay address with the network's prefix.
    pub address: Ipv4Net,
    /// WireGuard's UDP port.
    pub listen_port: u16,
    /// The peers by key.
    pub peers: BTreeMap<PublicKey, PeerPlan>,
    /// The port forwards, as given.
    pub forwards: Vec<PortForward>,
}

impl Plan {
    /// The overlay network: the address's prefix.
    pub fn network(&self) -> Ipv4Net {
        self.address.trunc()
    }

    /// The routes the interface needs beyond the one the kernel adds for its own prefix:
    /// every peer's allowed IP the overlay prefix does not cover (announced routes).
    pub fn routes(&self) -> BTreeSet<IpNet> {
        let network = IpNet::V4(self.network());
        self.peers
            .values()
            .flat_map(|p| p.allowed_ips.iter())
            .filter(|net| !network.contains(*net))
            .copied()
            .collect()
    }
}

/// Checks `config` against every rule of the module documentation; `own` is the node's
/// public key.
pub fn validate(config: &NetworkConfig, own: &PublicKey) -> Result<Plan, Rejection> {
    let reject = |message: String| Err(Rejection(message));
    check_interface(&config.interface)?;
    let address: Ipv4Net = config.address.parse().map_err(|_| {
        Rejection(format!(
            "address {:?} is not IPv4 CIDR such as 10.88.0.7/16",
            config.address
        ))
    })?;
    if address.prefix_len() == 0 {
        return reject(format!("address {}: a prefix of 0 is no network", address));
    }
    if address.prefix_len() < 31
        && (address.addr() == address.network() || address.addr() == address.broadcast())
    {
        return reject(format!(
            "address {address} is its network's own or broadcast address"
        ));
    }
    if config.listen_port == 0 {
        return reject("listen port 0: a fixed port is needed for peers to reach".into());
    }
    let network = IpNet::V4(address.trunc());
    let own_host = IpNet::V4(Ipv4Net::from(address.addr()));
    let mut peers = BTreeMap::new();
    // Every allowed IP so far, and the peer that has it.
    let mut taken: BTreeMap<IpNet, PublicKey> = BTreeMap::new();
    for (n, peer) in config.peers.iter().enumerate() {
        let key = PublicKey::from_base64(&peer.public_key).map_err(|e| {
            Rejection(format!(
                "peer {n}: public key {:?} is {e}, not base64 of 32 bytes",
                peer.public_key
            ))
        })?;
        if key == *own {
            return reject(format!("peer {n} ({key}) is this node's own key"));
        }
        if peers.contains_key(&key) {
            return reject(format!("peer {key} is listed twice"));
        }
        let endpoint = match &peer.endpoint {
            None => None,
            Some(text) => Some(parse_endpoint(text).ok_or_else(|| {
                Rejection(format!(
                    "peer {key}: endpoint {text:?} is not host:port with a port other than 0"
                ))
            })?),
        };
        let mut allowed_ips: Vec<IpNet> = Vec::new();
        for text in &peer.allowed_ips {
            let net = text
                .parse::<IpNet>()
                .map_err(|_| Rejection(format!("peer {key}: allowed IP {text:?} is not CIDR")))?
                .trunc();
            if !allowed_ips.contains(&net) {
                allowed_ips.push(net);
            }
        }
        let Some(first) = allowed_ips.first() else {
            return reject(format!("peer {key} has no allowed IPs"));
        };
        if first.prefix_len() != 32 || !network.contains(first) || !matches!(first, IpNet::V4(_)) {
            return reject(format!(
                "peer {key}: its overlay address {first} (its first allowed IP) is not a /32 \
                 inside the network {network}"
            ));
        }
        for net in &allowed_ips {
            if *net == own_host {
                return reject(format!(
                    "peer {key}: allowed IP {net} is this node's own address"
                ));
            }
            if let Some(other) = taken.insert(*net, key) {
                return reject(format!(
                    "peers {other} and {key} both have allowed IP {net}"
                ));
            }
        }
        peers.insert(
            key,
            PeerPlan {
                endpoint,
                allowed_ips,
                keepalive: peer.keepalive_s.unwrap_or(0),
            },
        );
    }
    // The forwards' own rules are the nftables module's, so the two cannot disagree.
    crate::forward::render(&config.forwards, address.addr())
        .map_err(|e| Rejection(e.to_string()))?;
    if let Some(clash) = config
        .forwards
        .iter()
        .find(|f| f.proto == ForwardProto::Udp && f.port == config.listen_port)
    {
        return reject(format!(
            "forward udp/{} is WireGuard's own listen port",
            clash.port
        ));
    }
    Ok(Plan {
        generation: config.generation,
        network: config.network.clone(),
        interface: config.interface.clone(),
        address,
        listen_port: config.listen_port,
        peers,
        forwards: config.forwards.clone(),
    })
}

fn check_interface(name: &str) -> Result<(), Rejection> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Rejection(format!(
            "interface {name:?} is not a name of 1 to {MAX_IFNAME} of A-Za-z0-9_.-"
        )))
    }
}

/// `203.0.113.5:51820`, `[2001:db8::1]:51820` or `node-2.example:51820`.
fn parse_endpoint(text: &str) -> Option<Endpoint> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return (addr.port() != 0).then_some(Endpoint::Addr(addr));
    }
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b));
    (port != 0 && name_ok && host.parse::<IpAddr>().is_err()).then(|| Endpoint::Host {
        host: host.to_owned(),
        port,
    })
}

/// Refuses a listen port another socket holds: binding it must work unless the device
/// already listens there (`device_port`).
pub fn check_listen_port(port: u16, device_port: Option<u16>) -> Result<(), Rejection> {
    if device_port == Some(port) {
        return Ok(());
    }
    match std::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
        Ok(_) => Ok(()),
        Err(e) => Err(Rejection(format!(
            "listen port {port} cannot be bound: {e} (another socket has it)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use powernode_types::WgPeer;

    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn peer(n: u8, ips: &[&str]) -> WgPeer {
        WgPeer {
            public_key: key(n).to_base64(),
            endpoint: Some(format!("192.0.2.{n}:51820")),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            keepalive_s: None,
        }
    }

    fn config() -> NetworkConfig {
        NetworkConfig {
            generation: 3,
            interface: "pn0".into(),
            address: "10.88.0.1/16".into(),
            listen_port: 51820,
            peers: vec![
                peer(2, &["10.88.0.2/32"]),
                peer(3, &["10.88.0.3/32", "192.168.30.0/24"]),
            ],
            network: "lab".into(),
            forwards: vec![PortForward {
                proto: ForwardProto::Tcp,
                port: 8080,
                to: "10.88.0.2:80".into(),
            }],
        }
    }

    #[test]
    fn a_good_config() {
        let plan = validate(&config(), &key(1)).unwrap();
        assert_eq!(plan.network().to_string(), "10.88.0.0/16");
        assert_eq!(plan.peers.len(), 2);
        assert_eq!(
            plan.routes().into_iter().collect::<Vec<_>>(),
            ["192.168.30.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            plan.peers[&key(2)].endpoint,
            Some(Endpoint::Addr("192.0.2.2:51820".parse().unwrap()))
        );
    }

    /// One row per rule of the module documentation: the change, and a word the error must
    /// have.
    #[test]
    fn rejections() {
        type Change = fn(&mut NetworkConfig);
        let rows: &[(&str, Change, &str)] = &[
            ("empty interface", |c| c.interface.clear(), "interface"),
            (
                "long interface",
                |c| c.interface = "a".repeat(16),
                "interface",
            ),
            (
                "slash in interface",
                |c| c.interface = "a/b".into(),
                "interface",
            ),
            (
                "bad CIDR",
                |c| c.address = "10.88.0.300/16".into(),
                "address",
            ),
            ("no prefix", |c| c.address = "10.88.0.7".into(), "address"),
            (
                "IPv6 address",
                |c| c.address = "fd00::1/64".into(),
                "address",
            ),
            (
                "network address",
                |c| c.address = "10.88.0.0/16".into(),
                "network's own",
            ),
            ("port 0", |c| c.listen_port = 0, "listen port"),
            (
                "bad key",
                |c| c.peers[0].public_key = "abc".into(),
                "not base64 of 32",
            ),
            (
                "short key",
                |c| c.peers[0].public_key = "AAAA".into(),
                "3 bytes",
            ),
            (
                "own key",
                |c| c.peers[0].public_key = key(1).to_base64(),
                "own key",
            ),
            (
                "same key twice",
                |c| c.peers[1].public_key = key(2).to_base64(),
                "twice",
            ),
            (
                "bad endpoint",
                |c| c.peers[0].endpoint = Some("nowhere".into()),
                "endpoint",
            ),
            (
                "endpoint port 0",
                |c| c.peers[0].endpoint = Some("192.0.2.1:0".into()),
                "endpoint",
            ),
            (
                "no allowed IPs",
                |c| c.peers[0].allowed_ips.clear(),
                "no allowed IPs",
            ),
            (
                "bad allowed IP",
                |c| c.peers[0].allowed_ips = vec!["10.88.0.2/33".into()],
                "not CIDR",
            ),
            (
                "overlay address outside the network",
                |c| c.peers[0].allowed_ips = vec!["10.99.0.2/32".into()],
                "inside the network",
            ),
            (
                "overlay address not a /32",
                |c| c.peers[0].allowed_ips = vec!["10.88.0.0/24".into()],
                "inside the network",
            ),
            (
                "own address among a peer's",
                |c| c.peers[1].allowed_ips.push("10.88.0.1/32".into()),
                "own address",
            ),
            (
                "own address as a peer's overlay address",
                |c| c.peers[0].allowed_ips = vec!["10.88.0.1/32".into()],
                "own address",
            ),
            (
                "two peers with one /32",
                |c| c.peers[1].allowed_ips = vec!["10.88.0.2/32".into()],
                "both have",
            ),
            (
                "two peers with one route",
                |c| c.peers[0].allowed_ips.push("192.168.30.0/24".into()),
                "both have",
            ),
            ("forward port 0", |c| c.forwards[0].port = 0, "port 0"),
            (
                "forward to a name",
                |c| c.forwards[0].to = "web:80".into(),
                "IPv4 address",
            ),
            (
                "forward twice",
                |c| c.forwards.push(c.forwards[0].clone()),
                "twice",
            ),
            (
                "forward on the listen port",
                |c| {
                    c.forwards[0].proto = ForwardProto::Udp;
                    c.forwards[0].port = 51820;
                },
                "listen port",
            ),
        ];
        for (name, change, word) in rows {
            let mut c = config();
            change(&mut c);
            match validate(&c, &key(1)) {
                Ok(_) => panic!("{name}: accepted"),
                Err(Rejection(message)) => {
                    assert!(message.contains(word), "{name}: {message:?} lacks {word:?}")
                }
            }
        }
    }

    #[test]
    fn lenient_where_wireguard_is() {
        let mut c = config();
        // Host bits cleared, repeats dropped, names and IPv6 endpoints taken, TCP beside
        // WireGuard's UDP port.
        c.peers[1].allowed_ips = vec![
            "10.88.0.3/32".into(),
            "192.168.30.7/24".into(),
            "192.168.30.0/24".into(),
        ];
        c.peers[0].endpoint = Some("node-2.example:51820".into());
        c.peers[1].endpoint = Some("[2001:db8::3]:51820".into());
        c.forwards[0].port = 51820;
        let plan = validate(&c, &key(1)).unwrap();
        assert_eq!(plan.peers[&key(3)].allowed_ips.len(), 2);
        assert_eq!(
            plan.peers[&key(2)].endpoint,
            Some(Endpoint::Host {
                host: "node-2.example".into(),
                port: 51820
            })
        );
    }

    #[test]
    fn a_bound_port_is_refused_unless_it_is_the_devices() {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        assert!(check_listen_port(port, None).is_err());
        assert!(check_listen_port(port, Some(port)).is_ok());
        drop(socket);
        assert!(check_listen_port(port, None).is_ok());
    }
}
