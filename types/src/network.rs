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
    const SCHEMA_VERSION: u32 = 1;
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
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        GLOBAL_KEY.to_owned()
    }
}
