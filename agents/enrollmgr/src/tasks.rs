//! `cert.rotate`: the operator's "rotate now" (the seed's manual rotation), a task heartbeatd
//! leases and hands to this agent (docs/tasks.md).
//!
//! A `cert.rotate` config (from heartbeatd, or the operator on the node) that has no status
//! here is a request. While the node holds a certificate (Enrolled, or already Rotating) the request makes the
//! next rotation attempt happen now: its status goes `Running`, then `Succeeded` with the new
//! certificate's fingerprint and expiry, or `Failed` with the attempt's error (rotation itself
//! goes on retrying as always). In any other state it fails at once, saying the node is not
//! enrolled. A final status is forgotten once heartbeatd has reported it and withdrawn the
//! config (`agentbase::tasks`). Rotating is safe to repeat, so a status still `Running` at start (the agent died
//! mid-attempt) is dropped and the request taken again.

use agentbase::tasks::{TaskBook, TaskConfigs};
use powernode_pubsub::Publication;
use powernode_types::{TaskConfig, TaskStatus};

/// The kind this agent runs.
pub const KIND: &str = "cert.rotate";

/// The rotation requests and their statuses.
pub struct Requests {
    /// The task configs (the controller's, through heartbeatd, and the operator's).
    pub configs: TaskConfigs,
    book: TaskBook,
}

impl Requests {
    /// Over `configs` and this agent's `TaskStatus` (statuses still `Running` are dropped:
    /// those requests are taken again).
    pub fn new(configs: TaskConfigs, statuses: Publication<TaskStatus>) -> Requests {
        let book = TaskBook::new(statuses);
        for status in book.left_running() {
            book.forget(&status.id);
        }
        Requests { configs, book }
    }

    /// Requests not started yet.
    pub fn pending(&self) -> Vec<TaskConfig> {
        self.book.pending(&self.configs, &[KIND])
    }

    /// Publishes `Running` for `asked`.
    pub fn start(&self, asked: &[TaskConfig]) {
        for config in asked {
            self.book.start(config);
        }
    }

    /// Publishes how the attempt made for `asked` went.
    pub fn finish(&self, asked: &[TaskConfig], outcome: Result<String, String>) {
        for config in asked {
            self.book.conclude(config, outcome.clone());
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

    /// Forgets final statuses whose config was withdrawn.
    pub fn tidy(&self) {
        self.book.tidy(&self.configs);
    }
}
