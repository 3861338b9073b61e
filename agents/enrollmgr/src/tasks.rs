//! `cert.rotate`: the operator's "rotate now" (the seed's manual rotation), a task heartbeatd
//! leases and hands to this agent (docs/tasks.md).
//!
//! A `cert.rotate` config from `heartbeatd/TaskConfig` that has no status here is a request.
//! While the node holds a certificate (Enrolled, or already Rotating) the request makes the
//! next rotation attempt happen now: its status goes `Running`, then `Succeeded` with the new
//! certificate's fingerprint and expiry, or `Failed` with the attempt's error (rotation itself
//! goes on retrying as always). In any other state it fails at once, saying the node is not
//! enrolled. A final status is forgotten once heartbeatd has reported it and withdrawn the
//! config. Rotating is safe to repeat, so a status still `Running` at start (the agent died
//! mid-attempt) is dropped and the request taken again.

use powernode_pubsub::{Publication, Subscription};
use powernode_types::{TaskConfig, TaskState, TaskStatus};

/// The kind this agent runs.
pub const KIND: &str = "cert.rotate";
/// The agent that publishes `TaskConfig`.
pub const TASK_AGENT: &str = "heartbeatd";

/// The rotation requests and their statuses.
pub struct Requests {
    /// heartbeatd's task configs.
    pub configs: Subscription<TaskConfig>,
    statuses: Publication<TaskStatus>,
}

impl Requests {
    /// Over `configs` and this agent's `TaskStatus` (statuses still `Running` are dropped:
    /// those requests are taken again).
    pub fn new(configs: Subscription<TaskConfig>, statuses: Publication<TaskStatus>) -> Requests {
        for id in statuses.keys() {
            if statuses
                .get(&id)
                .is_some_and(|s| s.state == TaskState::Running)
            {
                let _ = statuses.unpublish(&id);
            }
        }
        Requests { configs, statuses }
    }

    /// Requests not started yet.
    pub fn pending(&self) -> Vec<String> {
        self.configs
            .items()
            .filter(|(id, c)| c.kind == KIND && self.statuses.get(id).is_none())
            .map(|(id, _)| id.to_owned())
            .collect()
    }

    /// Publishes `Running` for `ids`.
    pub fn start(&self, ids: &[String]) {
        for id in ids {
            self.publish(id, TaskState::Running, String::new(), None);
        }
    }

    /// Publishes how the attempt made for `ids` went.
    pub fn finish(&self, ids: &[String], outcome: Result<String, String>) {
        let now = agentbase::health::now_ms();
        let (state, output) = match outcome {
            Ok(text) => (TaskState::Succeeded, text),
            Err(text) => (TaskState::Failed, text),
        };
        for id in ids {
            self.publish(id, state, output.clone(), Some(now));
        }
    }

    /// Fails every pending request at once with `why`.
    pub fn refuse_pending(&self, why: &str) {
        let pending = self.pending();
        if !pending.is_empty() {
            tracing::warn!(tasks = pending.len(), %why, "cert.rotate refused");
            self.finish(&pending, Err(why.to_owned()));
        }
    }

    /// Forgets final statuses whose config heartbeatd has withdrawn.
    pub fn tidy(&self) {
        if !self.configs.is_synchronized() {
            return;
        }
        for id in self.statuses.keys() {
            let done = self
                .statuses
                .get(&id)
                .is_some_and(|s| s.state != TaskState::Running);
            if done && self.configs.get(&id).is_none() {
                let _ = self.statuses.unpublish(&id);
            }
        }
    }

    fn publish(&self, id: &str, state: TaskState, output: String, finished_at_ms: Option<u64>) {
        let started_at_ms = self
            .statuses
            .get(id)
            .map_or_else(agentbase::health::now_ms, |s| s.started_at_ms);
        let status = TaskStatus {
            id: id.to_owned(),
            kind: KIND.to_owned(),
            state,
            output,
            started_at_ms,
            finished_at_ms,
        };
        if let Err(e) = self.statuses.publish(&status) {
            tracing::error!(task_id = %id, error = %e, "could not publish a task status");
        }
    }
}
