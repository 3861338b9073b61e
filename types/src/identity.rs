//! Who this node is: the result of identitymgr's identity cascade.

use serde::{Deserialize, Serialize};

use crate::topic::upgrade_from;
use crate::{Topic, GLOBAL_KEY};

/// The node's identity and the bootstrap facts found alongside it, published by identitymgr.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Whether the cascade found an identity.
    pub state: IdentityState,
    /// The node's UUID, when resolved.
    pub uuid: Option<String>,
    /// Which step of the cascade supplied `uuid`.
    pub source: Option<IdentitySource>,
    /// The kernel's boot id; changes on every boot.
    pub boot_id: String,
    /// The node's hostname.
    pub hostname: String,
    /// CPU architecture in OCI notation, e.g. `amd64`, `arm64`; used to resolve module images.
    pub arch: String,
    /// The DMI/SMBIOS product UUID, when readable, reported even if another source won.
    pub dmi_uuid: Option<String>,
    /// One-time token for enrollment, when a source provided one.
    pub bootstrap_token: Option<String>,
    /// The controller's URLs, in the order to try them, when a source provided any; empty
    /// when none did. `[controller] url` in the settings overrides them.
    pub controller_urls: Vec<String>,
    /// PEM CA bundle to trust for the controller, when a source provided one.
    pub ca_pem: Option<String>,
    /// Why the cascade failed or which source misbehaved, if any.
    pub last_error: Option<String>,
}

/// Outcome of the identity cascade.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentityState {
    /// A UUID was found (or generated and stored).
    Resolved,
    /// No source yielded a UUID and none could be generated; enrollment cannot proceed.
    Unresolvable,
}

/// The steps of the identity cascade, in the order they are tried.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentitySource {
    /// `powernode.instance_uuid=` on the kernel command line.
    KernelCmdline,
    /// QEMU fw-cfg entry.
    FwCfg,
    /// AWS instance metadata service.
    Aws,
    /// Google Cloud metadata server.
    Gcp,
    /// Azure instance metadata service.
    Azure,
    /// DigitalOcean metadata service.
    DigitalOcean,
    /// Hetzner Cloud metadata service.
    Hetzner,
    /// DMI/SMBIOS product UUID.
    Dmi,
    /// The operator's `identity.cfg` file.
    IdentityCfg,
    /// Generated once, when no source had one, and kept in `etc/powernode/identity.cfg`.
    Generated,
}

impl Topic for NodeIdentity {
    const NAME: &'static str = "NodeIdentity";
    /// 2: `controller_urls` (a list) instead of `controller_url`.
    const SCHEMA_VERSION: u32 = 2;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        GLOBAL_KEY.to_owned()
    }
    fn upgrade(schema_version: u32, payload: &[u8]) -> Option<Self> {
        match schema_version {
            1 => upgrade_from::<NodeIdentityV1, _>(payload),
            _ => None,
        }
    }
}

/// [`NodeIdentity`] as schema version 1 encoded it: one controller URL at most.
#[derive(Deserialize)]
struct NodeIdentityV1 {
    state: IdentityState,
    uuid: Option<String>,
    source: Option<IdentitySource>,
    boot_id: String,
    hostname: String,
    arch: String,
    dmi_uuid: Option<String>,
    bootstrap_token: Option<String>,
    controller_url: Option<String>,
    ca_pem: Option<String>,
    last_error: Option<String>,
}

impl From<NodeIdentityV1> for NodeIdentity {
    fn from(v1: NodeIdentityV1) -> NodeIdentity {
        NodeIdentity {
            state: v1.state,
            uuid: v1.uuid,
            source: v1.source,
            boot_id: v1.boot_id,
            hostname: v1.hostname,
            arch: v1.arch,
            dmi_uuid: v1.dmi_uuid,
            bootstrap_token: v1.bootstrap_token,
            controller_urls: v1.controller_url.into_iter().collect(),
            ca_pem: v1.ca_pem,
            last_error: v1.last_error,
        }
    }
}
