//! The contract between agents: every pubsub topic type, versioned.
//!
//! Each topic type implements [`Topic`]; [`registry`] lets tools that do not know a topic's
//! Rust type at compile time (ipcmonitor, the status CLI) decode its items to JSON.
//!
//! Items are encoded with `postcard` on the wire and in checkpoints. postcard is not
//! self-describing, so topic types use no `serde_json::Value`, `#[serde(flatten)]`,
//! `#[serde(untagged)]` or `skip_serializing_if`; fields are only added by bumping
//! [`Topic::SCHEMA_VERSION`], which `tests/golden.rs` enforces; a type whose checkpoints must
//! outlive an upgrade reads its previous version through [`Topic::upgrade`]. Times are `u64`
//! unix milliseconds in fields named `*_ms`.
//!
//! | topic | key | published by | module |
//! |---|---|---|---|
//! | [`AgentStatus`] | agent name | every agent | [`agent`] |
//! | [`NodeIdentity`] | `global` | identitymgr | [`identity`] |
//! | [`EnrollmentStatus`] (persistent) | `global` | enrollmgr | [`enrollment`] |
//! | [`ControllerStatus`] | `global` | heartbeatd | [`controller`] |
//! | [`ModuleConfig`] | module name | heartbeatd | [`module`] |
//! | [`ModuleStatus`] | module name | modulemgr | [`module`] |
//! | [`VerifyConfig`] | module name | modulemgr | [`verify`] |
//! | [`VerifyStatus`] | module name | verifier | [`verify`] |
//! | [`MountConfig`] | target name | modulemgr | [`mount`] |
//! | [`MountStatus`] | target name | mountmgr | [`mount`] |
//! | [`NetworkConfig`] | `global` | heartbeatd | [`network`] |
//! | [`NetworkStatus`] | `global` | netmgr | [`network`] |
//! | [`TaskConfig`] | task id | heartbeatd | [`task`] |
//! | [`TaskStatus`] | task id | the agent owning the task kind | [`task`] |
//! | [`Event`] (persistent) | event id | every agent | [`event`] |
//! | [`EventAck`] | agent name | eventd | [`event`] |
//! | [`EventdStatus`] | `global` | eventd | [`event`] |

pub mod agent;
pub mod controller;
pub mod enrollment;
pub mod event;
pub mod identity;
pub mod module;
pub mod mount;
pub mod network;
pub mod node_api;
pub mod registry;
pub mod task;
pub mod text;
mod topic;
pub mod verify;

pub use agent::{AgentState, AgentStatus};
pub use controller::ControllerStatus;
pub use enrollment::{EnrollmentState, EnrollmentStatus};
pub use event::{Event, EventAck, EventdStatus, Severity};
pub use identity::{IdentitySource, IdentityState, NodeIdentity};
pub use module::{ModuleConfig, ModuleState, ModuleStatus};
pub use mount::{HealthCheck, MountConfig, MountLayer, MountState, MountStatus, Slot, UpperMode};
pub use network::{
    ForwardProto, NetworkConfig, NetworkState, NetworkStatus, PeerStatus, PortForward, WgPeer,
};
pub use task::{TaskConfig, TaskState, TaskStatus};
pub use topic::Topic;
pub use verify::{CosignSignature, VerifyConfig, VerifyState, VerifyStatus};

/// The key of the single item of a per-node topic such as [`NodeIdentity`].
pub const GLOBAL_KEY: &str = "global";
