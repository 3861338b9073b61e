//! What every agent that runs tasks shares: where task requests come from, and the book of
//! `TaskStatus` it keeps for them (docs/tasks.md).
//!
//! Requests come from two publishers of `TaskConfig`:
//! - `heartbeatd`: tasks leased from the controller;
//! - [`LOCAL_AGENT`]: tasks asked for on the node itself by the operator CLI
//!   (`powernode-agent exec`, `sync`), keyed `local-…` ([`LOCAL_PREFIX`]) so they never collide
//!   with the controller's ids. heartbeatd ignores their statuses: nothing is reported for them.
//!
//! Whoever published a request withdraws it once it has the final status; the owner then
//! forgets the status ([`TaskBook::tidy`]). A withdrawn request whose status is still
//! `Running` is a cancellation.

use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::{TaskConfig, TaskState, TaskStatus};

/// The agent that publishes the controller's tasks.
pub const CONTROLLER_AGENT: &str = "heartbeatd";
/// The name under which the operator CLI publishes local task requests.
pub const LOCAL_AGENT: &str = "operator";
/// Prefix of every local task's id.
pub const LOCAL_PREFIX: &str = "local-";

/// Both sources of task requests, followed together.
pub struct TaskConfigs {
    controller: Subscription<TaskConfig>,
    local: Subscription<TaskConfig>,
}

impl TaskConfigs {
    /// Subscribes to heartbeatd's and the operator's `TaskConfig`.
    pub fn connect(dirs: &Dirs) -> TaskConfigs {
        TaskConfigs {
            controller: Subscription::connect(dirs, CONTROLLER_AGENT),
            local: Subscription::connect(dirs, LOCAL_AGENT),
        }
    }

    /// Waits for the next change in either source. Cancel-safe.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.controller.next() => {}
            _ = self.local.next() => {}
        }
    }

    /// Every request, from both sources. A local request is only taken under its prefix, so
    /// an operator publication cannot pass itself off as a controller task.
    pub fn items(&self) -> impl Iterator<Item = (&str, &TaskConfig)> {
        self.controller
            .items()
            .filter(|(id, _)| !is_local(id))
            .chain(self.local.items().filter(|(id, _)| is_local(id)))
    }

    /// The request `id`, if it is there.
    pub fn get(&self, id: &str) -> Option<&TaskConfig> {
        if is_local(id) {
            self.local.get(id)
        } else {
            self.controller.get(id)
        }
    }

    /// Whether `id` is known to be withdrawn: its source has sent its whole map since the
    /// last (re)connect and it is not in it. Before that, an absent request may only not
    /// have arrived yet.
    pub fn withdrawn(&self, id: &str) -> bool {
        let source = if is_local(id) {
            &self.local
        } else {
            &self.controller
        };
        source.is_synchronized() && source.get(id).is_none()
    }
}

/// Whether `id` names a task asked for on the node rather than by the controller.
pub fn is_local(id: &str) -> bool {
    id.starts_with(LOCAL_PREFIX)
}

/// One agent's `TaskStatus` publication, with the rules every task-running agent follows.
pub struct TaskBook {
    statuses: Publication<TaskStatus>,
}

impl TaskBook {
    /// Over the agent's `TaskStatus` publication.
    pub fn new(statuses: Publication<TaskStatus>) -> TaskBook {
        TaskBook { statuses }
    }

    /// The status of `id`, if there is one.
    pub fn get(&self, id: &str) -> Option<TaskStatus> {
        self.statuses.get(id)
    }

    /// The ids with a status.
    pub fn ids(&self) -> Vec<String> {
        self.statuses.keys()
    }

    /// Statuses an earlier run left `Running`: that run died or was stopped mid-task.
    pub fn left_running(&self) -> Vec<TaskStatus> {
        self.ids()
            .iter()
            .filter_map(|id| self.statuses.get(id))
            .filter(|s| s.state == TaskState::Running)
            .collect()
    }

    /// Requests of `kinds` that have no status yet: work to start.
    pub fn pending(&self, configs: &TaskConfigs, kinds: &[&str]) -> Vec<TaskConfig> {
        configs
            .items()
            .filter(|(id, c)| kinds.contains(&c.kind.as_str()) && self.statuses.get(id).is_none())
            .map(|(_, c)| c.clone())
            .collect()
    }

    /// Publishes `Running` for `config`, started now.
    pub fn start(&self, config: &TaskConfig) {
        self.publish(TaskStatus {
            id: config.id.clone(),
            kind: config.kind.clone(),
            state: TaskState::Running,
            output: String::new(),
            started_at_ms: crate::health::now_ms(),
            finished_at_ms: None,
        });
    }

    /// Publishes the final state of `id` (its start time kept), with `output`.
    pub fn finish(&self, id: &str, kind: &str, state: TaskState, output: String) {
        let started_at_ms = self
            .statuses
            .get(id)
            .map_or_else(crate::health::now_ms, |s| s.started_at_ms);
        self.publish(TaskStatus {
            id: id.to_owned(),
            kind: kind.to_owned(),
            state,
            output,
            started_at_ms,
            finished_at_ms: Some(crate::health::now_ms()),
        });
    }

    /// Publishes the outcome of `config`: `Succeeded` with the text of `Ok`, `Failed` with the
    /// reason of `Err`.
    pub fn conclude(&self, config: &TaskConfig, outcome: Result<String, String>) {
        let (state, output) = match outcome {
            Ok(text) => (TaskState::Succeeded, text),
            Err(text) => (TaskState::Failed, text),
        };
        self.finish(&config.id, &config.kind, state, output);
    }

    /// Drops the status of `id` (a request taken again after a restart, or one forgotten).
    pub fn forget(&self, id: &str) {
        if let Err(e) = self.statuses.unpublish(id) {
            tracing::error!(task_id = %id, error = %e, "could not drop a task status");
        }
    }

    /// Forgets final statuses whose request was withdrawn (reported and done with).
    pub fn tidy(&self, configs: &TaskConfigs) {
        for id in self.ids() {
            let done = self
                .statuses
                .get(&id)
                .is_some_and(|s| s.state != TaskState::Running);
            if done && configs.withdrawn(&id) {
                self.forget(&id);
            }
        }
    }

    fn publish(&self, status: TaskStatus) {
        if let Err(e) = self.statuses.publish(&status) {
            tracing::error!(task_id = %status.id, error = %e, "could not publish a task status");
        }
    }
}
