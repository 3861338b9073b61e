//! modulemgr: brings the modules the node should run from the registry into one verified,
//! mounted stack (DESIGN §2, §6; docs/modules.md).
//!
//! It reads the desired modules from `heartbeatd/ModuleConfig` (the controller's assignment)
//! and from the local assignments in `etc/powernode/modules.d` ([`powernode_modules::local`]; the controller's
//! entry wins when both name a module). Each module goes through its own state machine,
//! published as `modulemgr/ModuleStatus`:
//!
//! ```text
//!  Resolving ──► Downloading{done,total} ──► Verifying ──► Mounting ──► Active
//!     │ ▲              │ ▲                       │             │
//!     │ └─ transient ──┘ └─ transient: retry      │             │
//!     │    (backoff, error shown)                 │             │
//!     └──────────────── Failed{reason} ◄──────────┴─────────────┘
//! ```
//!
//! A fetch ([`fetch`]) resolves the reference for this node's architecture, reads its cosign
//! signatures and streams the image into the digest store `persist/powernode/store`, resuming
//! a partial download after a crash; with the registry unreachable it goes on with the last
//! resolution kept ([`lastknown`]) if the image is in the store. The module is handed to the
//! verifier as a `VerifyConfig` when its download starts (`complete: false`: the verifier hashes
//! the image as it arrives) and again, complete, once the store has it, while the image is
//! synced to disk; once `verifier/VerifyStatus` says Verified for the same digest and the sync
//! is done, it joins the stack, published as one `MountConfig` (target from settings, layers by
//! priority), unless a module it depends on is not stacked (it then waits in Mounting, and an
//! upgrade keeps the old version stacked). When `mountmgr/MountStatus` reports that generation
//! Mounted, its modules are Active. A stack that fails to mount marks the modules it added
//! Failed (the running stack stays) and the stack is recomputed without them.
//!
//! A change of reference restarts a module; a removal cancels its fetch, takes it out of the
//! stack and, once the smaller stack is mounted, lets the store's garbage collection remove its
//! blobs. A rejected module's stored image is read again: if it no longer hashes to its digest
//! (a power cut before the sync, a failing disk), the rejection is about the copy, not the
//! module, and the image is downloaded again, once. A later verdict on the same image (the
//! trust policy was edited) takes an Active module out of the stack, or brings a rejected one
//! back.
//!
//! Raised as events ([`events`]): a module becoming Active (not again for the same image
//! after a restart of modulemgr), a download failing and retried (at growing intervals) and
//! then going through, a download failing for good. The verifier raises the rejections and
//! mountmgr the stack's switches.
//!
//! # Shape
//!
//! One state machine, `Modules` (in `modules.rs`), holds everything modulemgr knows and
//! changes only through events; it answers each with effects (publish this, fetch that, raise
//! this event, the store may drop those blobs) and does no I/O, so its transitions are table
//! tested without a registry (`tests.rs`). Each module is in one `Phase`, which carries what
//! that step knows, and its `ModuleStatus` is derived from the phase in one function
//! (`pipeline.rs`). The stack asked of mountmgr and the handling of its answers are in
//! `stack.rs`, what the store keeps in `gc.rs`, and the agent loop, which only does the I/O,
//! in `agent.rs`.

pub mod commit;
pub mod events;
pub mod fetch;
pub mod lastknown;
pub mod tasks;

mod agent;
mod gc;
mod modules;
mod pipeline;
mod stack;
#[cfg(test)]
mod tests;

use std::time::Duration;

use anyhow::Context as _;
use powernode_modules::registry::{Credential, RegistryConfig};

pub use crate::agent::run;

/// The agent that publishes the controller's assignment.
pub const HEARTBEAT_AGENT: &str = "heartbeatd";
/// The verifier agent.
pub const VERIFIER_AGENT: &str = "verifier";
/// The mount agent.
pub const MOUNT_AGENT: &str = "mountmgr";
/// The digest store, under the root.
pub const STORE_DIR: &str = "persist/powernode/store";

/// How to reach registries, from the `[modules]` settings: plain-HTTP registries, timeouts,
/// and each credential's password read from its file under `root`.
pub fn registry_config(
    settings: &agentbase::settings::ModuleSettings,
    root: &agentbase::root::Root,
) -> anyhow::Result<RegistryConfig> {
    let mut credentials = Vec::new();
    for c in &settings.credentials {
        let path = root.path(&c.password_file);
        let password = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading the password of {} from {}",
                c.registry,
                path.display()
            )
        })?;
        credentials.push(Credential {
            registry: c.registry.clone(),
            username: c.username.clone(),
            password: password.trim_end().to_owned(),
        });
    }
    Ok(RegistryConfig {
        plain_http: settings.plain_http.clone(),
        credentials,
        connect_timeout: Some(Duration::from_millis(settings.connect_timeout_ms)),
    })
}
