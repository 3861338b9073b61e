//! Tasks: what the operator may queue for a node (kind, arguments, lease length, attempts) and
//! list; the node's lease, renewal and completion of its own tasks. Every transition is one
//! statement of [`crate::storage`], so two callers racing for a task never both win it.

use super::{Error, Service};
use crate::storage::{self, task_state, Completion, NewTask, TaskQuery, TaskRefusal};
use crate::wire::{
    task_limits, CreateTaskRequest, LeasedTask, Task, TaskCompleteRequest, TaskCompleteResponse,
    TaskLeaseResponse, TaskOutcome, TaskRenewResponse, TasksParams,
};

/// Lease length when the operator names none, seconds.
pub const DEFAULT_TIMEOUT_S: u32 = 300;
/// Longest lease, seconds (a day): a longer task renews.
pub const MAX_TIMEOUT_S: u32 = 86_400;
/// Leases a task gets when the operator names no number.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Most leases a task may be given.
pub const MAX_ATTEMPTS: u32 = 100;
/// Tasks a list shows when the operator names no number.
pub const DEFAULT_LIST: u32 = 100;
/// Most tasks one list shows.
pub const MAX_LIST: u32 = 1000;
/// Bytes of a node's output stored by default; more is cut (`serve --task-output-max`).
pub const DEFAULT_OUTPUT_MAX: u64 = 64 * 1024;

/// Checks a task the operator asks for; the task to store.
pub fn new_task(req: &CreateTaskRequest) -> Result<NewTask<'_>, Error> {
    let invalid = |message: String| Err(Error::Invalid(message));
    super::nodes::check_node_id(&req.node)?;
    if req.kind.len() > task_limits::MAX_KIND || !crate::events::is_kind(&req.kind) {
        return invalid(format!(
            "kind {:?} must be dotted lower-case words ([a-z][a-z0-9_]*, joined by .), \
             at most {} bytes",
            req.kind,
            task_limits::MAX_KIND
        ));
    }
    let args_len = req.args.to_string().len();
    if args_len > task_limits::MAX_ARGS {
        return invalid(format!(
            "args are {args_len} bytes of JSON, over the {}-byte limit",
            task_limits::MAX_ARGS
        ));
    }
    let timeout_s = req.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    if !(1..=MAX_TIMEOUT_S).contains(&timeout_s) {
        return invalid(format!("timeout_s must be 1 to {MAX_TIMEOUT_S}"));
    }
    let max_attempts = req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
        return invalid(format!("max_attempts must be 1 to {MAX_ATTEMPTS}"));
    }
    Ok(NewTask {
        node_id: &req.node,
        kind: &req.kind,
        args: &req.args,
        timeout_s,
        max_attempts,
    })
}

/// Checks a list's filters.
pub fn task_query(params: TasksParams) -> Result<TaskQuery, Error> {
    let limit = params.limit.unwrap_or(DEFAULT_LIST);
    if limit == 0 || limit > MAX_LIST {
        return Err(Error::InvalidQuery(format!(
            "limit must be 1 to {MAX_LIST}"
        )));
    }
    if let Some(s) = &params.state {
        if !task_state::ALL.contains(&s.as_str()) {
            return Err(Error::InvalidQuery(format!(
                "state must be one of {}",
                task_state::ALL.join(", ")
            )));
        }
    }
    if let Some(node) = &params.node {
        super::nodes::check_node_id(node).map_err(|e| Error::InvalidQuery(e.to_string()))?;
    }
    Ok(TaskQuery {
        node: params.node,
        state: params.state,
        limit,
    })
}

/// `output` cut to at most `max` bytes (at a character boundary) with a marker line saying
/// how much was left out; whether it was cut.
pub fn cut_output(output: &str, max: usize) -> (String, bool) {
    if output.len() <= max {
        return (output.to_owned(), false);
    }
    let mut end = max;
    while !output.is_char_boundary(end) {
        end -= 1;
    }
    let rest = output.len() - end;
    (
        format!("{}\n[output truncated: {rest} bytes more]", &output[..end]),
        true,
    )
}

/// The refusal of a task transition, as the service says it.
fn refused(id: &str, refusal: TaskRefusal) -> Error {
    match refusal {
        TaskRefusal::NotFound => Error::NoTask(id.to_owned()),
        TaskRefusal::LeaseLost(state) => Error::LeaseLost {
            id: id.to_owned(),
            state,
        },
        TaskRefusal::NotLeased => Error::NotLeased(id.to_owned()),
        TaskRefusal::Finished(state) => Error::TaskFinished {
            id: id.to_owned(),
            state,
        },
    }
}

impl Service {
    /// Queues a task ([`new_task`]) for a node that exists and is not revoked, and wakes the
    /// node's watch.
    pub async fn create_task(&self, req: &CreateTaskRequest) -> Result<Task, Error> {
        let new = new_task(req)?;
        self.assignable_node(&req.node).await?;
        // Revoked between the check and the insert: the insert refuses, and so do we.
        let task = self
            .storage()
            .create_task(&new, crate::now_ms())
            .await?
            .ok_or_else(|| Error::NodeRevoked(req.node.clone()))?;
        self.changed();
        tracing::info!(task_id = %task.id, node_id = %task.node_id, kind = %task.kind,
            "task created");
        Ok(task)
    }

    /// The newest tasks matching `params` ([`task_query`]), oldest first, without output;
    /// expired leases are swept first, so a list never shows a lease that ran out.
    pub async fn list_tasks(&self, params: TasksParams) -> Result<Vec<Task>, Error> {
        let query = task_query(params)?;
        self.storage().expire_leases(crate::now_ms()).await?;
        let tasks = self.storage().tasks(&query).await?;
        Ok(tasks.into_iter().collect())
    }

    /// One task with its output.
    pub async fn task(&self, id: &str) -> Result<Task, Error> {
        self.storage().expire_leases(crate::now_ms()).await?;
        self.storage()
            .task(id)
            .await?
            .ok_or_else(|| Error::NoTask(id.to_owned()))
    }

    /// Cancels a queued or leased task: it is not leased again, and its node learns it when
    /// it renews or completes.
    pub async fn cancel_task(&self, id: &str) -> Result<Task, Error> {
        let task = self
            .storage()
            .cancel_task(id, crate::now_ms())
            .await?
            .map_err(|r| refused(id, r))?;
        self.changed();
        tracing::info!(task_id = %id, node_id = %task.node_id, "task cancelled");
        Ok(task)
    }

    /// Up to `max` (1 to [`task_limits::MAX_LEASE`]) of `node`'s queued tasks, oldest first.
    pub async fn lease_tasks(
        &self,
        node: &storage::Node,
        max: u32,
    ) -> Result<TaskLeaseResponse, Error> {
        if !(1..=task_limits::MAX_LEASE).contains(&max) {
            return Err(Error::Invalid(format!(
                "max must be 1 to {}",
                task_limits::MAX_LEASE
            )));
        }
        let leases = self
            .storage()
            .lease_tasks(&node.id, max, crate::now_ms())
            .await?;
        for lease in &leases {
            tracing::info!(task_id = %lease.id, node_id = %node.id, attempt = lease.attempt,
                "task leased");
        }
        if !leases.is_empty() {
            self.changed();
        }
        Ok(TaskLeaseResponse {
            tasks: leases
                .into_iter()
                .map(|l| LeasedTask {
                    id: l.id,
                    kind: l.kind,
                    args: l.args,
                    attempt: l.attempt,
                    timeout_s: l.timeout_s,
                    lease_expires_at_ms: u64::try_from(l.expires_at_ms).unwrap_or(0),
                })
                .collect(),
        })
    }

    /// The lease `node` holds on task `id` runs on for the task's timeout from now.
    pub async fn renew_task(
        &self,
        node: &storage::Node,
        id: &str,
    ) -> Result<TaskRenewResponse, Error> {
        let expires = self
            .storage()
            .renew_task(&node.id, id, crate::now_ms())
            .await?
            .map_err(|r| refused(id, r))?;
        Ok(TaskRenewResponse {
            lease_expires_at_ms: u64::try_from(expires).unwrap_or(0),
        })
    }

    /// `node`'s outcome and output of task `id` (the output cut to the configured cap).
    pub async fn complete_task(
        &self,
        node: &storage::Node,
        id: &str,
        req: &TaskCompleteRequest,
    ) -> Result<TaskCompleteResponse, Error> {
        let (final_state, outcome) = match req.outcome {
            TaskOutcome::Succeeded => (task_state::SUCCEEDED, "Succeeded"),
            TaskOutcome::Failed => (task_state::FAILED, "Failed"),
            TaskOutcome::Interrupted => (task_state::INTERRUPTED, "Interrupted"),
        };
        let (output, truncated) = cut_output(&req.output, self.settings().task_output_max);
        let done = Completion {
            state: final_state,
            outcome,
            output: &output,
            truncated,
        };
        let completed = self
            .storage()
            .complete_task(&node.id, id, &done, crate::now_ms())
            .await?
            .map_err(|r| refused(id, r))?;
        tracing::info!(task_id = %id, node_id = %node.id, state = %completed.state,
            late = completed.late, "task completed");
        Ok(TaskCompleteResponse {
            state: completed.state,
            late: completed.late,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cut_at_a_character_boundary_with_what_was_left_out() {
        assert_eq!(cut_output("short", 10), ("short".to_owned(), false));
        let (cut, truncated) = cut_output("aé€b", 4);
        assert!(truncated);
        // 'a' (1) + 'é' (2) fit in 4; '€' (3) would not.
        assert_eq!(cut, "aé\n[output truncated: 4 bytes more]");
    }

    #[test]
    fn a_task_is_checked_before_it_is_stored() {
        let ok = CreateTaskRequest {
            node: "n".into(),
            kind: "node.exec".into(),
            args: serde_json::json!({}),
            timeout_s: None,
            max_attempts: None,
        };
        let task = new_task(&ok).unwrap();
        assert_eq!(
            (task.timeout_s, task.max_attempts),
            (DEFAULT_TIMEOUT_S, DEFAULT_MAX_ATTEMPTS)
        );
        let bad: [fn(&mut CreateTaskRequest); 6] = [
            |r| r.kind = "Node.Exec".into(),
            |r| r.kind = "a".repeat(task_limits::MAX_KIND + 1),
            |r| r.args = serde_json::json!("x".repeat(task_limits::MAX_ARGS)),
            |r| r.timeout_s = Some(0),
            |r| r.max_attempts = Some(MAX_ATTEMPTS + 1),
            |r| r.node = "no/such".into(),
        ];
        for change in bad {
            let mut req = ok.clone();
            change(&mut req);
            assert!(new_task(&req).is_err(), "{req:?}");
        }
    }

    #[test]
    fn list_filters_are_checked() {
        assert!(task_query(TasksParams::default()).is_ok());
        for bad in [
            TasksParams {
                limit: Some(0),
                ..TasksParams::default()
            },
            TasksParams {
                state: Some("done".into()),
                ..TasksParams::default()
            },
        ] {
            assert_eq!(task_query(bad).unwrap_err().code(), "invalid_query");
        }
    }
}
