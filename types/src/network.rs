//! The WireGuard overlay network.

use serde::{Deserialize, Serialize};

use crate::{Topic, GLOBAL_KEY};

/// The overlay interface the controller wants, published by heartbeatd.
///
/// Carries no private key: netmgr generates and keeps the node's key and reports only the
/// public half in [`NetworkStatus`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Desired-state generation this came from.
    pub generation: u64,
    /// Interface name, e.g. `pn0`.
    pub interface: String,
    /// The node's overlay address in CIDR notation, e.g. `10.88.0.7/16`.
    pub address: String,
    /// UDP port to listen on.
    pub listen_port: u16,
    /// The peers to configure.
    pub peers: Vec<WgPeer>,
    /// The network's name on the controller (for reports and events).
    pub network: String,
    /// Ports of this node forwarded to addresses on the overlay (or beyond it).
    pub forwards: Vec<PortForward>,
}

/// One port forward: connections to `port` on the node go to `to`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PortForward {
    /// The protocol.
    pub proto: ForwardProto,
    /// The node's port.
    pub port: u16,
    /// Where connections go, `address:port` (an IPv4 address).
    pub to: String,
}

/// A forwarded port's protocol.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ForwardProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One WireGuard peer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    /// The peer's public key, base64.
    pub public_key: String,
    /// `host:port` to reach the peer at; `None` for a peer that only connects in.
    pub endpoint: Option<String>,
    /// Networks routed to the peer, CIDR.
    pub allowed_ips: Vec<String>,
    /// Persistent keepalive interval in seconds, for peers behind NAT.
    pub keepalive_s: Option<u16>,
}

impl Topic for NetworkConfig {
    const NAME: &'static str = "NetworkConfig";
    /// 2: `network`, `forwards`.
    const SCHEMA_VERSION: u32 = 2;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        GLOBAL_KEY.to_owned()
    }
}

/// State of the overlay interface, published by netmgr.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NetworkStatus {
    /// State of the interface.
    pub state: NetworkState,
    /// Interface name.
    pub interface: String,
    /// The node's WireGuard public key, base64, once generated.
    pub public_key: Option<String>,
    /// Peers with a recent handshake.
    pub peers_up: u32,
    /// Whether WireGuard runs in userspace because the kernel has no module for it.
    pub userspace: bool,
    /// The last configuration error, if any.
    pub error: Option<String>,
    /// The `NetworkConfig` generation applied (0: none yet).
    pub generation: u64,
    /// The UDP port WireGuard listens on, once the interface is up.
    pub listen_port: Option<u16>,
    /// Where peers may reach this node, `address:port`: the node's own addresses with the
    /// listen port (the controller may know better, from where the node's calls come from).
    pub endpoints: Vec<String>,
    /// Each configured peer, as WireGuard last reported it.
    pub peers: Vec<PeerStatus>,
}

/// One peer as WireGuard reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's public key, base64.
    pub public_key: String,
    /// Where its packets last came from, or the configured endpoint.
    pub endpoint: Option<String>,
    /// When the last handshake completed (node clock, ms since the epoch).
    pub last_handshake_ms: Option<u64>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// State of the overlay interface.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetworkState {
    /// No interface (no configuration, or not enrolled).
    Down,
    /// Creating or reconfiguring the interface.
    Configuring,
    /// The interface is up with the desired configuration.
    Up,
    /// Configuration failed (see `error`).
    Failed,
}

impl Topic for NetworkStatus {
    const NAME: &'static str = "NetworkStatus";
    /// 2: `generation`, `listen_port`, `endpoints`, `peers`.
    const SCHEMA_VERSION: u32 = 2;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        GLOBAL_KEY.to_owned()
    }
}
