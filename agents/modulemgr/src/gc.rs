//! Garbage collection of the digest store and of the kept resolutions.
//!
//! Run each time a stack is reported Mounted. A blob stays while anything may still need it:
//!
//! - the image of every assigned module (a failed or rejected one too: a later verdict may
//!   accept it, and it is not downloaded twice),
//! - the layers of the stack mountmgr reports active,
//! - the layers of the stack applied before it, until mountmgr confirms the new one
//!   (`MountStatus.confirm_until_ms` cleared): in its confirmation window mountmgr may switch
//!   back to that stack, and after a reboot it builds it again from the store.
//!
//! Nothing is collected while a module is resolving (its partial download has no digest to
//! keep it by yet), before the assignment is known, or while mountmgr reports a window whose
//! previous stack modulemgr does not know (it restarted during the window).

use std::collections::HashSet;

use powernode_modules::digest::Digest;
use powernode_modules::store::Store;

use crate::lastknown::LastKnown;
use crate::modules::{Effect, Modules};
use crate::pipeline::Phase;

/// What may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Garbage {
    /// The references whose kept resolutions stay; every other one goes.
    pub references: Vec<String>,
    /// The store blobs that stay; every other one goes. `None`: the store is left alone.
    pub blobs: Option<HashSet<Digest>>,
}

impl Garbage {
    /// Removes it, on the node's architecture.
    pub(crate) fn collect(&self, store: &Store, lastknown: &LastKnown, architecture: &str) {
        let references: Vec<&str> = self.references.iter().map(String::as_str).collect();
        lastknown.retain(&references, architecture);
        let Some(keep) = &self.blobs else {
            return;
        };
        match store.gc(keep) {
            Ok((removed, freed)) if !removed.is_empty() => {
                tracing::info!(
                    blobs = removed.len(),
                    bytes = freed,
                    "store garbage collected"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "store garbage collection failed"),
        }
    }
}

impl Modules {
    /// Asks for what no module and no stack needs to be removed.
    pub(crate) fn collect_garbage(&mut self) {
        if !self.desired_known {
            return;
        }
        let references = self
            .modules
            .values()
            .map(|m| m.config.reference.clone())
            .collect();
        let blobs = self.blobs_in_use();
        if let Some(keep) = &blobs {
            self.layer_manifests
                .retain(|digest, _| Digest::parse(digest).is_ok_and(|d| keep.contains(&d)));
        }
        self.emit(Effect::CollectGarbage(Garbage { references, blobs }));
    }

    /// The blobs that must stay, or `None` if none may be collected now.
    fn blobs_in_use(&self) -> Option<HashSet<Digest>> {
        if self
            .modules
            .values()
            .any(|m| matches!(m.phase, Phase::Resolving { .. }))
        {
            return None;
        }
        if self.stack.confirming && self.stack.applied_before.is_none() {
            return None;
        }
        let modules = self.modules.values().filter_map(|m| m.status().digest);
        let mounted = self.stack.mounted.iter().cloned();
        let before = self
            .stack
            .applied_before
            .iter()
            .flat_map(|s| s.layers.iter().map(|l| l.digest.clone()));
        Some(
            modules
                .chain(mounted)
                .chain(before)
                .filter_map(|d| Digest::parse(&d).ok())
                .collect(),
        )
    }
}
