//! What the heartbeat says about modules, mounts and the overlay network, from
//! `modulemgr/ModuleStatus`, `mountmgr/MountStatus` and `netmgr/NetworkStatus`.

use std::collections::BTreeMap;

use powernode_types::node_api::ModuleReport;
use powernode_types::{ModuleStatus, MountStatus, NetworkStatus};
use serde_json::{Map, Value};

/// The agent that publishes `ModuleStatus`.
pub const MODULE_AGENT: &str = "modulemgr";
/// The agent that publishes `MountStatus`.
pub const MOUNT_AGENT: &str = "mountmgr";
/// The agent that publishes `NetworkStatus`.
pub const NETWORK_AGENT: &str = "netmgr";

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

/// The heartbeat's `network` object: netmgr's status as it is (the controller reads the
/// public key, listen port, endpoints and peers from it; docs/network.md).
pub fn network(status: Option<&NetworkStatus>) -> Option<Map<String, Value>> {
    match serde_json::to_value(status?) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// What, of the network status, is worth an early heartbeat: what the controller derives
/// other nodes' peers from, and the state; not the traffic counters.
pub fn network_fingerprint(status: Option<&NetworkStatus>) -> Option<String> {
    status.map(|s| {
        format!(
            "{:?} {:?} {:?} {:?} {} {} {:?}",
            s.state, s.public_key, s.listen_port, s.endpoints, s.generation, s.peers_up, s.error
        )
    })
}
