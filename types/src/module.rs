//! Modules: the signed filesystem images a node should run, and how far each one got.

use serde::{Deserialize, Serialize};

use crate::Topic;

/// A module the controller wants on this node, published by heartbeatd.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ModuleConfig {
    /// The module's name; the key.
    pub name: String,
    /// OCI reference, e.g. `registry.example.com/modules/tools:1.2`.
    pub reference: String,
    /// Position in the overlay stack: a higher priority is stacked above a lower one.
    pub priority: u32,
    /// Desired-state generation this entry came from.
    pub generation: u64,
}

// Persistent: the desired modules are the node's desired state, which must outlive a reboot
// (DESIGN §7) so that a node whose controller is down at boot keeps running its modules, and
// modulemgr can read the assignment before heartbeatd is up.
impl Topic for ModuleConfig {
    const NAME: &'static str = "ModuleConfig";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = true;
    fn key(&self) -> String {
        self.name.clone()
    }
}

/// Progress of one module from reference to mounted layer, published by modulemgr.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ModuleStatus {
    /// The module's name; the key.
    pub name: String,
    /// The OCI reference being applied.
    pub reference: String,
    /// Where the module is in its pipeline.
    pub state: ModuleState,
    /// Manifest digest the reference resolved to, once known.
    pub digest: Option<String>,
    /// Bytes of the image downloaded so far.
    pub bytes_done: u64,
    /// Size of the image, once known.
    pub bytes_total: Option<u64>,
    /// Why the module failed, if it did.
    pub error: Option<String>,
}

/// The pipeline a module goes through, in order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModuleState {
    /// Resolving the reference for this node's architecture.
    Resolving,
    /// Pulling the image into the digest store.
    Downloading,
    /// Waiting for the verifier.
    Verifying,
    /// Waiting for mountmgr to switch to a stack that includes it.
    Mounting,
    /// Mounted in the active stack.
    Active,
    /// Stopped at some step (see `error`).
    Failed,
}

impl Topic for ModuleStatus {
    const NAME: &'static str = "ModuleStatus";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.name.clone()
    }
}
