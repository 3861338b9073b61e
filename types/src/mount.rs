//! Composed mounts: verified images stacked as overlayfs lower layers, switched A/B.

use serde::{Deserialize, Serialize};

use crate::topic::upgrade_from;
use crate::Topic;

/// The stack one mount target should have, published by modulemgr.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MountConfig {
    /// The target's name; the key.
    pub target: String,
    /// Increases with every change of the stack, so mountmgr can tell a new stack from a repeat.
    pub generation: u64,
    /// Verified images to stack.
    pub layers: Vec<MountLayer>,
    /// Where writes go.
    pub upper: UpperMode,
}

/// One verified image in a stack.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MountLayer {
    /// The module's name.
    pub name: String,
    /// Path of the erofs image in the digest store.
    pub image_path: String,
    /// The image's verified digest.
    pub digest: String,
    /// Higher priority is stacked above lower.
    pub priority: u32,
    /// The module's declared health check, run in a new stack before it is switched to.
    pub health_check: Option<HealthCheck>,
}

/// A module's health check: a command run with the new stack's root as working directory
/// (also in `POWERNODE_STACK`); exit status 0 within the timeout means healthy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Program and arguments; a relative program is looked up in the stack.
    pub command: Vec<String>,
    /// Seconds the command may take.
    pub timeout_s: u32,
}

/// The overlay's upper (writable) layer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub enum UpperMode {
    /// A tmpfs: writes are lost on every switch and reboot.
    Tmpfs,
    /// A directory that keeps writes across switches and reboots.
    Persistent {
        /// The directory, under `persist/`.
        path: String,
    },
}

impl Topic for MountConfig {
    const NAME: &'static str = "MountConfig";
    const SCHEMA_VERSION: u32 = 2;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.target.clone()
    }
}

/// What is mounted at one target, published by mountmgr.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MountStatus {
    /// The target's name; the key.
    pub target: String,
    /// The `MountConfig` generation this status answers.
    pub generation: u64,
    /// Outcome of applying that generation.
    pub state: MountState,
    /// The slot holding the active stack, once one is mounted.
    pub slot: Option<Slot>,
    /// Digests of the active stack's layers, bottom first.
    pub layers: Vec<String>,
    /// Why the switch failed or was rolled back, if it was.
    pub error: Option<String>,
    /// The active stack's upper directory (absolute): where what is written into the stack
    /// lands, and what a module commit captures. `None` while no stack is active.
    pub upper_dir: Option<String>,
    /// The last difference mountmgr found at run time between the mounts and the stack it
    /// applied (a layer or the overlay unmounted by hand, a slot directory removed, a stack
    /// mounted twice, `current` or the mount path changed), and what it did about it. `None`
    /// while nothing has been found since this generation was answered.
    pub drift: Option<String>,
    /// While the switch to this generation is in its confirmation window (the previous stack
    /// still mounted, the health checks running again, a failure switches back): when the
    /// window ends, in milliseconds since the Unix epoch.
    pub confirm_until_ms: Option<u64>,
}

/// Outcome of applying a `MountConfig` generation.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MountState {
    /// Building the new stack beside the active one.
    Mounting,
    /// The new stack is active.
    Mounted,
    /// The new stack could not be built; the previous one, if any, is still active.
    Failed,
    /// The new stack was switched to but was not healthy; the previous one is active again.
    RolledBack,
}

/// The two places a stack can be built in, so a new one is built beside the active one.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Topic for MountStatus {
    const NAME: &'static str = "MountStatus";
    /// 2: `upper_dir`. 3: `drift`, `confirm_until_ms`.
    const SCHEMA_VERSION: u32 = 3;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.target.clone()
    }
    /// The status a mountmgr from before an upgrade left in its checkpoints (the stack it
    /// mounted outlives it) stays readable to the CLI and to subscribers while the new one is
    /// not up: what an earlier version did not say is unknown (`None`), not made up.
    fn upgrade(schema_version: u32, payload: &[u8]) -> Option<Self> {
        match schema_version {
            1 => upgrade_from::<MountStatusV1, _>(payload),
            2 => upgrade_from::<MountStatusV2, _>(payload),
            _ => None,
        }
    }
}

/// [`MountStatus`] as schema version 1 encoded it: without the upper directory, the drift and
/// the confirmation window.
#[derive(Deserialize)]
struct MountStatusV1 {
    target: String,
    generation: u64,
    state: MountState,
    slot: Option<Slot>,
    layers: Vec<String>,
    error: Option<String>,
}

impl From<MountStatusV1> for MountStatus {
    fn from(v1: MountStatusV1) -> MountStatus {
        MountStatus {
            target: v1.target,
            generation: v1.generation,
            state: v1.state,
            slot: v1.slot,
            layers: v1.layers,
            error: v1.error,
            upper_dir: None,
            drift: None,
            confirm_until_ms: None,
        }
    }
}

/// [`MountStatus`] as schema version 2 encoded it: without the drift and the confirmation
/// window.
#[derive(Deserialize)]
struct MountStatusV2 {
    target: String,
    generation: u64,
    state: MountState,
    slot: Option<Slot>,
    layers: Vec<String>,
    error: Option<String>,
    upper_dir: Option<String>,
}

impl From<MountStatusV2> for MountStatus {
    fn from(v2: MountStatusV2) -> MountStatus {
        MountStatus {
            upper_dir: v2.upper_dir,
            ..MountStatus::from(MountStatusV1 {
                target: v2.target,
                generation: v2.generation,
                state: v2.state,
                slot: v2.slot,
                layers: v2.layers,
                error: v2.error,
            })
        }
    }
}
