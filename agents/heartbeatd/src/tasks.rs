//! Tasks on the node side of the controller: leased, handed to the agent that owns their kind
//! as `heartbeatd/TaskConfig`, renewed while they run, reported once the owner's `TaskStatus`
//! is final (docs/tasks.md).
//!
//! - **Lease** after every successful heartbeat and whenever the watch says tasks are queued,
//!   up to [`MAX_HELD`] at a time. A task whose kind no agent on this node runs is reported
//!   `Failed` at once with that reason, so it does not sit leased until it expires.
//! - **Renew** a held task once less than half its lease is left ([`Tasks::renew_due`]). A
//!   controller that answers `lease_lost` (the task was cancelled, or went back to the queue)
//!   or does not know the task makes heartbeatd withdraw the config, which tells the owner
//!   to stop it.
//! - **Report** a final status (`Succeeded`, `Failed`, `Interrupted`) with
//!   `POST /tasks/{id}/complete`, then withdraw the config; the owner then forgets its status.
//!   A report that fails for want of the controller is kept and sent again; the controller
//!   takes a repeated completion the same way, so a report is never lost nor counted twice.
//!
//! `TaskConfig` lives in `run/` (not persistent): a restarted heartbeatd reloads what it
//! held, and keeps renewing and reporting it; after a reboot the leases simply expire on the
//! controller, which gives the tasks out again (or fails them after their last attempt).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use std::sync::Arc;

use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_transport::{ControllerClient, TransportError};
use powernode_types::node_api::{
    TaskCompleteRequest, TaskCompleteResponse, TaskLeaseRequest, TaskLeaseResponse, TaskOutcome,
    TaskRenewResponse,
};
use powernode_types::{TaskConfig, TaskState, TaskStatus};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The node API call that leases.
pub const LEASE_CALL: &str = "tasks/lease";
/// Most tasks this node holds at once.
pub const MAX_HELD: usize = 8;

/// The agents that run tasks, by kind: the one table of it (docs/tasks.md).
pub const OWNERS: &[(&str, &str)] = &[
    ("node.exec", "execd"),
    ("cert.rotate", "enrollmgr"),
    ("module.attach", "modulemgr"),
    ("module.detach", "modulemgr"),
    ("module.commit", "modulemgr"),
    ("node.sync", "modulemgr"),
];

/// The agent that runs tasks of `kind` on this node.
pub fn owner(kind: &str) -> Option<&'static str> {
    OWNERS.iter().find(|(k, _)| *k == kind).map(|(_, a)| *a)
}

/// The owning agents, each once, in table order.
pub fn owner_agents() -> Vec<&'static str> {
    let mut agents: Vec<&'static str> = Vec::new();
    for (_, agent) in OWNERS {
        if !agents.contains(agent) {
            agents.push(agent);
        }
    }
    agents
}

/// Wakes `heartbeat_now` whenever the operator asks this node for a `node.sync`
/// (`powernode-agent sync`, published as `operator/TaskConfig`): the reconcile starts with a
/// heartbeat, so the desired state it works from is the controller's latest. modulemgr runs
/// the rest of the sync; nothing is reported to the controller for a local task.
pub async fn follow_local_syncs(
    dirs: Dirs,
    heartbeat_now: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut configs = Subscription::<TaskConfig>::connect(&dirs, agentbase::tasks::LOCAL_AGENT);
    let mut seen = HashSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = configs.next() => {}
        }
        let syncs: HashSet<String> = configs
            .items()
            .filter(|(id, c)| c.kind == "node.sync" && agentbase::tasks::is_local(id))
            .map(|(id, _)| id.to_owned())
            .collect();
        if syncs.iter().any(|id| !seen.contains(id)) {
            tracing::info!("the operator asked for a sync; heartbeating now");
            heartbeat_now.notify_one();
        }
        seen = syncs;
    }
}

/// What a follower of an owner's `TaskStatus` sends heartbeatd's main loop: every status
/// that owner holds.
#[derive(Debug)]
pub struct OwnerStatuses {
    /// The owning agent.
    pub agent: &'static str,
    /// All its statuses.
    pub statuses: Vec<TaskStatus>,
}

/// A held task's lease as this node's clock sees it (the controller's expiry is on the
/// controller's clock, which may differ).
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// The lease's length.
    period: Duration,
    /// When it was leased or last renewed, local ms.
    since_ms: u64,
    /// When it was handed to its owner, local ms: an owner that has not said it runs the task
    /// a lease later never will (it is down), and the lease is left to run out.
    handed_ms: u64,
}

impl Lease {
    fn expires_ms(&self) -> u64 {
        self.since_ms
            .saturating_add(u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX))
    }
}

/// The held tasks and the reports not yet taken by the controller.
pub struct Tasks {
    configs: Publication<TaskConfig>,
    /// Each held task's lease; a task reloaded after a restart gets what was left of its
    /// lease then (by the controller's clock: the best there is).
    leases: HashMap<String, Lease>,
    /// Held tasks their owner reports `Running`.
    running: HashSet<String>,
    /// Tasks whose lease was lost while held: if the controller gives one out again, it ran
    /// (or runs) here already, and is reported Interrupted rather than handed over twice.
    lost: HashSet<String>,
    /// Completions to send, by task id.
    reports: BTreeMap<String, TaskCompleteRequest>,
    /// Whether the controller may hold more queued tasks than this node could take: the last
    /// lease filled every free place, or was skipped for want of one. A place freed then is
    /// filled at once, without waiting for the watch (which has already answered) or the
    /// next heartbeat.
    more_queued: bool,
}

impl Tasks {
    /// Over heartbeatd's `TaskConfig` publication (and what it reloaded).
    pub fn new(configs: Publication<TaskConfig>, now_ms: u64) -> Tasks {
        let leases = configs
            .keys()
            .into_iter()
            .filter_map(|id| {
                let left = configs.get(&id)?.lease_expires_at_ms.saturating_sub(now_ms);
                let lease = Lease {
                    period: Duration::from_millis(left.max(1_000)),
                    since_ms: now_ms,
                    handed_ms: now_ms,
                };
                Some((id, lease))
            })
            .collect();
        Tasks {
            configs,
            leases,
            running: HashSet::new(),
            lost: HashSet::new(),
            reports: BTreeMap::new(),
            more_queued: false,
        }
    }

    /// Tasks held now.
    pub fn held(&self) -> usize {
        self.configs.keys().len()
    }

    /// Whether anything waits to be sent: a report, a renewal due by `now_ms`, or a lease
    /// ([`Tasks::wants_lease`]).
    pub fn has_work(&self, now_ms: u64) -> bool {
        !self.reports.is_empty() || !self.due(now_ms).is_empty() || self.wants_lease()
    }

    /// Whether to lease now: tasks may be queued beyond what the last lease could take, and
    /// a place is free.
    pub fn wants_lease(&self) -> bool {
        self.more_queued && self.held() < MAX_HELD
    }

    /// Leases what the controller has queued, up to [`MAX_HELD`] held; how many it got.
    pub async fn lease(&mut self, client: &ControllerClient) -> Result<usize, TransportError> {
        let room = MAX_HELD.saturating_sub(self.held());
        if room == 0 {
            self.more_queued = true;
            return Ok(0);
        }
        let reply: TaskLeaseResponse = client
            .post(LEASE_CALL, &TaskLeaseRequest { max: room as u32 })
            .await?;
        let got = reply.tasks.len();
        self.more_queued = got >= room;
        let now = local_ms();
        for task in reply.tasks {
            if self.lost.remove(&task.id) {
                tracing::warn!(task_id = %task.id, "a task whose lease this node lost was given to it again");
                self.reports.insert(
                    task.id.clone(),
                    TaskCompleteRequest {
                        outcome: TaskOutcome::Interrupted,
                        output: "the lease was lost while the task was held on this node; it \
                                 is not run again"
                            .to_owned(),
                    },
                );
                continue;
            }
            let Some(agent) = owner(&task.kind) else {
                tracing::warn!(task_id = %task.id, kind = %task.kind, "no agent runs this kind");
                self.reports.insert(
                    task.id.clone(),
                    TaskCompleteRequest {
                        outcome: TaskOutcome::Failed,
                        output: format!(
                            "no agent on this node runs tasks of kind {:?} (kinds run here: {})",
                            task.kind,
                            OWNERS
                                .iter()
                                .map(|(k, _)| *k)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    },
                );
                continue;
            };
            tracing::info!(task_id = %task.id, kind = %task.kind, agent, attempt = task.attempt, "task leased");
            let config = TaskConfig {
                id: task.id.clone(),
                kind: task.kind,
                args_json: task.args.to_string(),
                lease_expires_at_ms: task.lease_expires_at_ms,
            };
            if let Err(e) = self.configs.publish(&config) {
                // Too large to publish (arguments past a frame): the owner can never see it.
                self.reports.insert(
                    task.id.clone(),
                    TaskCompleteRequest {
                        outcome: TaskOutcome::Failed,
                        output: format!("the task could not be handed to {agent}: {e}"),
                    },
                );
                continue;
            }
            self.leases.insert(
                task.id,
                Lease {
                    period: Duration::from_secs(task.timeout_s.into()),
                    since_ms: now,
                    handed_ms: now,
                },
            );
        }
        Ok(got)
    }

    /// Takes `owner`'s statuses (all it holds): which of its tasks run, and every final
    /// status of a held task as a report to send. Each owner speaks only for its own tasks.
    pub fn statuses(&mut self, owner: &OwnerStatuses) {
        let configs = &self.configs;
        self.running.retain(|id| {
            configs
                .get(id)
                .and_then(|c| self::owner(&c.kind))
                .is_some_and(|agent| agent != owner.agent)
        });
        for status in &owner.statuses {
            let id = status.id.as_str();
            let outcome = match status.state {
                TaskState::Running => {
                    self.running.insert(id.to_owned());
                    continue;
                }
                TaskState::Succeeded => TaskOutcome::Succeeded,
                TaskState::Failed => TaskOutcome::Failed,
                TaskState::Interrupted => TaskOutcome::Interrupted,
            };
            if self.configs.get(id).is_none() || self.reports.contains_key(id) {
                continue;
            }
            self.reports.insert(
                id.to_owned(),
                TaskCompleteRequest {
                    outcome,
                    output: status.output.clone(),
                },
            );
        }
    }

    /// Sends the reports; each the controller took (or no longer knows) ends the task here.
    /// Stops at the first failure for want of the controller: the rest wait with it.
    pub async fn report(&mut self, client: &ControllerClient) -> Result<(), TransportError> {
        let ids: Vec<String> = self.reports.keys().cloned().collect();
        for id in ids {
            let Some(report) = self.reports.get(&id) else {
                continue;
            };
            let call = format!("tasks/{id}/complete");
            match client.post::<_, TaskCompleteResponse>(&call, report).await {
                Ok(reply) => {
                    tracing::info!(task_id = %id, state = %reply.state, late = reply.late, "task reported");
                }
                // Refused for what it is (not for the moment): sending it again cannot help.
                Err(TransportError::Status { status, code, .. })
                    if (400..500).contains(&status) && !matches!(status, 408 | 429) =>
                {
                    tracing::warn!(task_id = %id, status, %code, "the controller refused the task's report; dropping it");
                }
                Err(e) => return Err(e),
            }
            self.reports.remove(&id);
            self.forget(&id);
        }
        Ok(())
    }

    /// Renews every held task less than half of whose lease is left; a task the controller
    /// says is no longer ours is withdrawn (its owner stops it).
    pub async fn renew_due(&mut self, client: &ControllerClient) -> Result<(), TransportError> {
        for id in self.due(local_ms()) {
            let call = format!("tasks/{id}/renew");
            match client
                .post::<_, TaskRenewResponse>(&call, &serde_json::json!({}))
                .await
            {
                Ok(reply) => {
                    if let Some(lease) = self.leases.get_mut(&id) {
                        lease.since_ms = local_ms();
                    }
                    if let Some(mut config) = self.configs.get(&id) {
                        config.lease_expires_at_ms = reply.lease_expires_at_ms;
                        if let Err(e) = self.configs.publish(&config) {
                            tracing::warn!(task_id = %id, error = %e, "renewed lease not published");
                        }
                    }
                }
                Err(TransportError::Status {
                    status: 404 | 409,
                    code,
                    ..
                }) => {
                    tracing::info!(task_id = %id, %code, "task no longer leased to this node; withdrawing it");
                    self.forget(&id);
                    self.lost.insert(id);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Held tasks whose lease is half gone by `now_ms` (this node's clock), not finished, and
    /// either running or handed over less than a lease ago: a task its owner never took up (the
    /// owner is down) is left to expire, so the controller can give it out again.
    fn due(&self, now_ms: u64) -> Vec<String> {
        self.leases
            .iter()
            .filter(|(id, _)| !self.reports.contains_key(*id))
            .filter(|(id, lease)| {
                let half = u64::try_from(lease.period.as_millis() / 2).unwrap_or(u64::MAX);
                let period = u64::try_from(lease.period.as_millis()).unwrap_or(u64::MAX);
                let taken_up =
                    self.running.contains(*id) || now_ms < lease.handed_ms.saturating_add(period);
                taken_up && lease.expires_ms().saturating_sub(now_ms) < half
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn forget(&mut self, id: &str) {
        self.leases.remove(id);
        self.running.remove(id);
        if let Err(e) = self.configs.unpublish(id) {
            tracing::warn!(task_id = %id, error = %e, "could not withdraw a task config");
        }
    }
}

/// This node's clock, ms since the epoch.
fn local_ms() -> u64 {
    agentbase::health::now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(period_s: u64, since_ms: u64, handed_ms: u64) -> Lease {
        Lease {
            period: Duration::from_secs(period_s),
            since_ms,
            handed_ms,
        }
    }

    /// Runs `test` with a `Tasks` over a fresh `TaskConfig` publication holding `held`
    /// (id, kind).
    fn with_tasks(held: &[(&str, &str)], test: impl FnOnce(&mut Tasks)) {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let dirs = powernode_pubsub::Dirs::under_root(dir.path());
        let configs = Publication::<TaskConfig>::open(&dirs, "heartbeatd").unwrap();
        for (id, kind) in held {
            configs
                .publish(&TaskConfig {
                    id: (*id).into(),
                    kind: (*kind).into(),
                    args_json: "{}".into(),
                    lease_expires_at_ms: 10_000,
                })
                .unwrap();
        }
        test(&mut Tasks::new(configs, 0));
    }

    #[test]
    fn a_lease_is_renewed_at_half_life_only_while_its_owner_runs_it() {
        with_tasks(
            &[],
            a_lease_is_renewed_at_half_life_only_while_its_owner_runs_it_with,
        );
    }

    fn a_lease_is_renewed_at_half_life_only_while_its_owner_runs_it_with(tasks: &mut Tasks) {
        tasks.leases.insert("t".into(), lease(10, 0, 0));
        // Less than half gone: nothing to do.
        assert!(tasks.due(4_000).is_empty());
        // Half gone, handed over less than a lease ago: renewed even before the owner says.
        assert_eq!(tasks.due(6_000), ["t"]);
        // Renewed at 6 s, never taken up: past one lease since it was handed over, it is let go.
        tasks.leases.insert("t".into(), lease(10, 6_000, 0));
        assert!(tasks.due(12_000).is_empty());
        // ... unless its owner runs it.
        tasks.running.insert("t".into());
        assert_eq!(tasks.due(12_000), ["t"]);
        // A task being reported is not renewed.
        tasks.reports.insert(
            "t".into(),
            TaskCompleteRequest {
                outcome: TaskOutcome::Succeeded,
                output: String::new(),
            },
        );
        assert!(tasks.due(12_000).is_empty());
    }

    #[test]
    fn each_owner_speaks_only_for_its_own_tasks() {
        with_tasks(
            &[("script", "node.exec"), ("sync", "node.sync")],
            each_owner_speaks_only_for_its_own_tasks_with,
        );
    }

    fn each_owner_speaks_only_for_its_own_tasks_with(tasks: &mut Tasks) {
        let running = |id: &str, kind: &str| TaskStatus {
            id: id.into(),
            kind: kind.into(),
            state: TaskState::Running,
            output: String::new(),
            started_at_ms: 0,
            finished_at_ms: None,
        };
        tasks.statuses(&OwnerStatuses {
            agent: "execd",
            statuses: vec![running("script", "node.exec")],
        });
        tasks.statuses(&OwnerStatuses {
            agent: "modulemgr",
            statuses: vec![running("sync", "node.sync")],
        });
        // modulemgr's list, now empty, says nothing of execd's task.
        tasks.statuses(&OwnerStatuses {
            agent: "modulemgr",
            statuses: Vec::new(),
        });
        assert!(tasks.running.contains("script"));
        assert!(!tasks.running.contains("sync"));
    }

    #[test]
    fn every_kind_has_one_owner() {
        assert_eq!(owner("node.exec"), Some("execd"));
        assert_eq!(owner("cert.rotate"), Some("enrollmgr"));
        assert_eq!(owner("node.sync"), Some("modulemgr"));
        assert_eq!(owner("module.erase"), None);
        assert_eq!(owner_agents(), ["execd", "enrollmgr", "modulemgr"]);
    }
}
