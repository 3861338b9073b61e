//! What the heartbeat says about modules and mounts, from `modulemgr/ModuleStatus` and
//! `mountmgr/MountStatus`.

use std::collections::BTreeMap;

use powernode_types::node_api::ModuleReport;
use powernode_types::{ModuleStatus, MountStatus};
use serde_json::{Map, Value};

/// The agent that publishes `ModuleStatus`.
pub const MODULE_AGENT: &str = "modulemgr";
/// The agent that publishes `MountStatus`.
pub const MOUNT_AGENT: &str = "mountmgr";

/// The heartbeat's `modules` list.
pub fn modules<'a>(statuses: impl Iterator<Item = &'a ModuleStatus>) -> Vec<ModuleReport> {
    statuses
        .map(|s| ModuleReport {
            name: s.name.clone(),
            digest: s.digest.clone(),
            state: Some(format!("{:?}", s.state)),
            reference: Some(s.reference.clone()),
            error: s.error.clone(),
            bytes_done: s.bytes_total.map(|_| s.bytes_done),
            bytes_total: s.bytes_total,
        })
        .collect()
}

/// The heartbeat's `mounts` object: one entry per target.
pub fn mounts<'a>(statuses: impl Iterator<Item = &'a MountStatus>) -> Option<Map<String, Value>> {
    let map: BTreeMap<String, Value> = statuses
        .map(|s| {
            (
                s.target.clone(),
                serde_json::json!({
                    "generation": s.generation,
                    "state": format!("{:?}", s.state),
                    "slot": s.slot.map(|slot| format!("{slot:?}")),
                    "layers": s.layers,
                    "error": s.error,
                }),
            )
        })
        .collect();
    (!map.is_empty()).then(|| map.into_iter().collect())
}

/// What, of the module statuses, is worth an early heartbeat: states, digests and errors,
/// not download progress.
pub fn fingerprint<'a>(statuses: impl Iterator<Item = &'a ModuleStatus>) -> Vec<String> {
    statuses
        .map(|s| format!("{} {:?} {:?} {:?}", s.name, s.state, s.digest, s.error))
        .collect()
}
