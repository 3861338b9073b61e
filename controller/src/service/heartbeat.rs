//! Heartbeats: what a node reports is checked and stored, and the reply carries its desired
//! state.

use std::net::IpAddr;

use super::{check_field, Error, Service};
use crate::networks::NodeReport;
use crate::storage::{self, HeartbeatFacts};
use crate::wire::{HeartbeatRequest, HeartbeatResponse};

impl Service {
    /// Stores `node`'s report (`raw`, the body's text as it came) and answers its desired
    /// state. A new WireGuard key, new endpoints or a new source address (`remote`) re-derive
    /// the node's network first ([`crate::networks`]), so the reply already carries what that
    /// changed.
    pub async fn heartbeat(
        &self,
        node: &storage::Node,
        remote: Option<IpAddr>,
        hb: &HeartbeatRequest,
        raw: &str,
    ) -> Result<HeartbeatResponse, Error> {
        check_field("boot_id", &hb.boot_id)?;
        check_field("agent_version", &hb.agent_version)?;
        if let Some(arch) = &hb.arch {
            check_field("arch", arch)?;
        }
        if hb
            .load
            .is_some_and(|l| l.iter().any(|v| !v.is_finite() || *v < 0.0))
        {
            return Err(Error::Invalid(
                "load must be three non-negative numbers".to_owned(),
            ));
        }
        let now = crate::now_ms();
        // One read for everything the heartbeat compares and answers: a steady node's
        // heartbeat is this and the insert, two statements.
        let view = self
            .storage()
            .heartbeat_view(&node.id)
            .await?
            .ok_or_else(|| Error::NoNode(node.id.clone()))?;
        self.storage()
            .record_heartbeat(
                &node.id,
                now,
                &HeartbeatFacts {
                    boot_id: &hb.boot_id,
                    agent_version: &hb.agent_version,
                    applied_generation: hb.applied_generation,
                    enrollment: hb.enrollment.as_ref(),
                    stored_enrollment: view.enrollment.as_deref(),
                    body: raw,
                },
            )
            .await?;
        let report = NodeReport::from_heartbeat(hb.network.as_ref(), remote);
        let bumped = self
            .storage()
            .record_network_report(&node.id, view.network_report.as_ref(), &report, now)
            .await?;
        let desired = if bumped.is_empty() {
            view.desired
        } else {
            self.changed();
            tracing::info!(node_id = %node.id, updated = ?bumped,
                "network report changed peers");
            self.storage().desired(&node.id).await?
        };
        tracing::debug!(
            node_id = %node.id,
            applied_generation = ?hb.applied_generation,
            generation = desired.generation,
            tasks_queued = view.tasks_queued,
            "heartbeat"
        );
        Ok(HeartbeatResponse {
            server_time_ms: now,
            next_interval_s: self.settings().heartbeat_interval_s,
            desired,
            tasks_queued: Some(u32::try_from(view.tasks_queued).unwrap_or(u32::MAX)),
        })
    }
}
