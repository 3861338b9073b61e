//! Tasks over HTTP: the operator creates, lists, shows and cancels them under `/api/v1/tasks`;
//! the node leases, renews and completes its own under `/node_api/v1/tasks`.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::extract::{AuthedNode, JsonBody, Operator};
use super::AppState;
use crate::errors::ApiError;
use crate::storage::{task_state, Completion, NewTask, Task, TaskQuery, TaskRefusal};
use crate::wire::{
    task_limits, CreateTaskRequest, LeasedTask, TaskCompleteRequest, TaskCompleteResponse,
    TaskLeaseRequest, TaskLeaseResponse, TaskOutcome, TaskRenewResponse, TasksParams,
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

fn task_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", message)
}

/// Checks what the operator asked for (over the API or the CLI); the task to store.
pub fn new_task(req: &CreateTaskRequest) -> Result<NewTask<'_>, ApiError> {
    if req.kind.len() > task_limits::MAX_KIND || !crate::events::is_kind(&req.kind) {
        return Err(invalid(format!(
            "kind {:?} must be dotted lower-case words ([a-z][a-z0-9_]*, joined by .), \
             at most {} bytes",
            req.kind,
            task_limits::MAX_KIND
        )));
    }
    let args_len = req.args.to_string().len();
    if args_len > task_limits::MAX_ARGS {
        return Err(invalid(format!(
            "args are {args_len} bytes of JSON, over the {}-byte limit",
            task_limits::MAX_ARGS
        )));
    }
    let timeout_s = req.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
    if !(1..=MAX_TIMEOUT_S).contains(&timeout_s) {
        return Err(invalid(format!("timeout_s must be 1 to {MAX_TIMEOUT_S}")));
    }
    let max_attempts = req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
        return Err(invalid(format!("max_attempts must be 1 to {MAX_ATTEMPTS}")));
    }
    Ok(NewTask {
        node_id: &req.node,
        kind: &req.kind,
        args: &req.args,
        timeout_s,
        max_attempts,
    })
}

/// `POST /api/v1/tasks`: queues a task for a node and wakes the node's watch.
pub async fn create(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<CreateTaskRequest>,
) -> Result<Json<Task>, ApiError> {
    let req = body.value;
    let new = new_task(&req)?;
    let task = state
        .storage()
        .create_task(&new, crate::now_ms())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no node {} (or it is revoked)", req.node)))?;
    state.watches().poke();
    tracing::info!(task_id = %task.id, node_id = %task.node_id, kind = %task.kind, "task created");
    Ok(Json(task))
}

/// `GET /api/v1/tasks?node=&state=&limit=`: the newest tasks, oldest first, without output.
pub async fn list(
    _: Operator,
    State(state): State<AppState>,
    params: Result<Query<TasksParams>, QueryRejection>,
) -> Result<Json<Vec<Task>>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let query = task_query(params).map_err(|e| ApiError::bad_request("invalid_query", e))?;
    state.storage().expire_leases(crate::now_ms()).await?;
    Ok(Json(state.storage().tasks(&query).await?))
}

/// Checks a list's filters (shared with the CLI).
pub fn task_query(params: TasksParams) -> Result<TaskQuery, String> {
    let limit = params.limit.unwrap_or(DEFAULT_LIST);
    if limit == 0 || limit > MAX_LIST {
        return Err(format!("limit must be 1 to {MAX_LIST}"));
    }
    if let Some(s) = &params.state {
        if !task_state::ALL.contains(&s.as_str()) {
            return Err(format!(
                "state must be one of {}",
                task_state::ALL.join(", ")
            ));
        }
    }
    Ok(TaskQuery {
        node: params.node,
        state: params.state,
        limit,
    })
}

/// `GET /api/v1/tasks/{id}`: one task with its output.
pub async fn show(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Task>, ApiError> {
    let id = task_id(path)?;
    state.storage().expire_leases(crate::now_ms()).await?;
    state
        .storage()
        .task(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))
}

/// `POST /api/v1/tasks/{id}/cancel`: a queued or leased task is cancelled; its node learns
/// it when it renews or completes.
pub async fn cancel(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Task>, ApiError> {
    let id = task_id(path)?;
    match state.storage().cancel_task(&id, crate::now_ms()).await? {
        Ok(task) => {
            state.watches().poke();
            tracing::info!(task_id = %id, node_id = %task.node_id, "task cancelled");
            Ok(Json(task))
        }
        Err(refusal) => Err(refused(&id, refusal)),
    }
}

/// `POST /node_api/v1/tasks/lease`: up to `max` of the node's queued tasks, oldest first.
pub async fn lease(
    State(state): State<AppState>,
    authed: AuthedNode,
    body: JsonBody<TaskLeaseRequest>,
) -> Result<Json<TaskLeaseResponse>, ApiError> {
    let max = body.value.max;
    if !(1..=task_limits::MAX_LEASE).contains(&max) {
        return Err(invalid(format!(
            "max must be 1 to {}",
            task_limits::MAX_LEASE
        )));
    }
    let leases = state
        .storage()
        .lease_tasks(&authed.node.id, max, crate::now_ms())
        .await?;
    for lease in &leases {
        tracing::info!(task_id = %lease.id, node_id = %authed.node.id, attempt = lease.attempt, "task leased");
    }
    if !leases.is_empty() {
        state.watches().poke();
    }
    Ok(Json(TaskLeaseResponse {
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
    }))
}

/// `POST /node_api/v1/tasks/{id}/renew`: the lease the node holds runs on for the task's
/// timeout from now.
pub async fn renew(
    State(state): State<AppState>,
    authed: AuthedNode,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<TaskRenewResponse>, ApiError> {
    let id = task_id(path)?;
    match state
        .storage()
        .renew_task(&authed.node.id, &id, crate::now_ms())
        .await?
    {
        Ok(expires) => Ok(Json(TaskRenewResponse {
            lease_expires_at_ms: u64::try_from(expires).unwrap_or(0),
        })),
        Err(refusal) => Err(refused(&id, refusal)),
    }
}

/// `POST /node_api/v1/tasks/{id}/complete`: the node's outcome and output (cut to the cap).
pub async fn complete(
    State(state): State<AppState>,
    authed: AuthedNode,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<TaskCompleteRequest, { task_limits::MAX_COMPLETE_BODY }>,
) -> Result<Json<TaskCompleteResponse>, ApiError> {
    let id = task_id(path)?;
    let req = body.value;
    let (final_state, outcome) = match req.outcome {
        TaskOutcome::Succeeded => (task_state::SUCCEEDED, "Succeeded"),
        TaskOutcome::Failed => (task_state::FAILED, "Failed"),
        TaskOutcome::Interrupted => (task_state::INTERRUPTED, "Interrupted"),
    };
    let (output, truncated) = cut_output(&req.output, state.task_output_max());
    let done = Completion {
        state: final_state,
        outcome,
        output: &output,
        truncated,
    };
    match state
        .storage()
        .complete_task(&authed.node.id, &id, &done, crate::now_ms())
        .await?
    {
        Ok(completed) => {
            tracing::info!(task_id = %id, node_id = %authed.node.id, state = %completed.state,
                late = completed.late, "task completed");
            Ok(Json(TaskCompleteResponse {
                state: completed.state,
                late: completed.late,
            }))
        }
        Err(refusal) => Err(refused(&id, refusal)),
    }
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

fn refused(id: &str, refusal: TaskRefusal) -> ApiError {
    match refusal {
        TaskRefusal::NotFound => ApiError::not_found(format!("no task {id}")),
        TaskRefusal::LeaseLost(state) => ApiError::new(
            StatusCode::CONFLICT,
            "lease_lost",
            format!("task {id} is not leased to this node (it is {state})"),
        ),
        TaskRefusal::NotLeased => ApiError::new(
            StatusCode::CONFLICT,
            "not_leased",
            format!("task {id} was never leased to this node"),
        ),
        TaskRefusal::Finished(state) => ApiError::new(
            StatusCode::CONFLICT,
            "task_finished",
            format!("task {id} is {state} already"),
        ),
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
        let bad: [fn(&mut CreateTaskRequest); 5] = [
            |r| r.kind = "Node.Exec".into(),
            |r| r.kind = "a".repeat(task_limits::MAX_KIND + 1),
            |r| r.args = serde_json::json!("x".repeat(task_limits::MAX_ARGS)),
            |r| r.timeout_s = Some(0),
            |r| r.max_attempts = Some(MAX_ATTEMPTS + 1),
        ];
        for change in bad {
            let mut req = ok.clone();
            change(&mut req);
            assert!(new_task(&req).is_err(), "{req:?}");
        }
    }
}
