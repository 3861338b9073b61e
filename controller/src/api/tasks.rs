//! Tasks over HTTP: the operator creates, lists, shows and cancels them under `/api/v1/tasks`;
//! the node leases, renews and completes its own under `/node_api/v1/tasks`. The rules are
//! [`crate::service::tasks`].

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;

use super::extract::{path_value, query_value, AuthedNode, JsonBody, Operator};
use super::AppState;
use crate::errors::ApiError;
use crate::wire::{
    task_limits, CreateTaskRequest, ErrorBody, Task, TaskCompleteRequest, TaskCompleteResponse,
    TaskLeaseRequest, TaskLeaseResponse, TaskRenewResponse, TasksParams,
};

/// `POST /api/v1/tasks`: queues a task for a node and wakes the node's watch.
#[utoipa::path(
    post, path = "/api/v1/tasks", tag = "operator",
    security(("operator_token" = [])),
    request_body = CreateTaskRequest,
    responses(
        (status = 200, description = "The task, queued.", body = Task),
        (status = 400, description = "`invalid_request`: a kind that is not dotted lower-case words, arguments over 16 KiB, timeout_s not 1 to 86400, max_attempts not 1 to 100, a malformed node id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such node.", body = ErrorBody),
        (status = 409, description = "`node_revoked`.", body = ErrorBody),
    )
)]
pub async fn create(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<CreateTaskRequest>,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(state.service().create_task(&body.value).await?))
}

/// `GET /api/v1/tasks?node=&state=&limit=`: the newest tasks, oldest first, without output.
#[utoipa::path(
    get, path = "/api/v1/tasks", tag = "operator",
    security(("operator_token" = [])),
    params(TasksParams),
    responses(
        (status = 200, description = "The tasks, oldest first among the newest `limit`, without their output.", body = Vec<Task>),
        (status = 400, description = "`invalid_query`: limit not 1 to 1000, an unknown state or parameter.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
    )
)]
pub async fn list(
    _: Operator,
    State(state): State<AppState>,
    params: Result<Query<TasksParams>, QueryRejection>,
) -> Result<Json<Vec<Task>>, ApiError> {
    let params = query_value(params)?;
    Ok(Json(state.service().list_tasks(params).await?))
}

/// `GET /api/v1/tasks/{id}`: one task with its output.
#[utoipa::path(
    get, path = "/api/v1/tasks/{id}", tag = "operator",
    security(("operator_token" = [])),
    params(("id" = String, Path, description = "The task id.")),
    responses(
        (status = 200, description = "The task with its output.", body = Task),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
    )
)]
pub async fn show(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Task>, ApiError> {
    let id = path_value(path)?;
    Ok(Json(state.service().task(&id).await?))
}

/// `POST /api/v1/tasks/{id}/cancel`: a queued or leased task is cancelled; its node learns
/// it when it renews or completes.
#[utoipa::path(
    post, path = "/api/v1/tasks/{id}/cancel", tag = "operator",
    security(("operator_token" = [])),
    params(("id" = String, Path, description = "The task id.")),
    responses(
        (status = 200, description = "The task, cancelled.", body = Task),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`task_finished`: it ended already.", body = ErrorBody),
    )
)]
pub async fn cancel(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Task>, ApiError> {
    let id = path_value(path)?;
    Ok(Json(state.service().cancel_task(&id).await?))
}

/// `POST /node_api/v1/tasks/lease`: up to `max` of the node's queued tasks, oldest first.
#[utoipa::path(
    post, path = "/node_api/v1/tasks/lease", tag = "node",
    security(("node_certificate" = [])),
    request_body = TaskLeaseRequest,
    responses(
        (status = 200, description = "The tasks now leased to the node, oldest first; none when none is queued.", body = TaskLeaseResponse),
        (status = 400, description = "`invalid_request`: max not 1 to 100.", body = ErrorBody),
        (status = 401, description = "`client_certificate_required`, `unknown_certificate`, `certificate_expired`.", body = ErrorBody),
        (status = 403, description = "`revoked`.", body = ErrorBody),
    )
)]
pub async fn lease(
    State(state): State<AppState>,
    authed: AuthedNode,
    body: JsonBody<TaskLeaseRequest>,
) -> Result<Json<TaskLeaseResponse>, ApiError> {
    let reply = state
        .service()
        .lease_tasks(&authed.node, body.value.max)
        .await?;
    Ok(Json(reply))
}

/// `POST /node_api/v1/tasks/{id}/renew`: the lease the node holds runs on for the task's
/// timeout from now.
#[utoipa::path(
    post, path = "/node_api/v1/tasks/{id}/renew", tag = "node",
    security(("node_certificate" = [])),
    params(("id" = String, Path, description = "The task id.")),
    responses(
        (status = 200, description = "The lease's new end.", body = TaskRenewResponse),
        (status = 401, description = "`client_certificate_required`, `unknown_certificate`, `certificate_expired`.", body = ErrorBody),
        (status = 403, description = "`revoked`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such task of this node.", body = ErrorBody),
        (status = 409, description = "`lease_lost`, `not_leased`, `task_finished`.", body = ErrorBody),
    )
)]
pub async fn renew(
    State(state): State<AppState>,
    authed: AuthedNode,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<TaskRenewResponse>, ApiError> {
    let id = path_value(path)?;
    Ok(Json(state.service().renew_task(&authed.node, &id).await?))
}

/// `POST /node_api/v1/tasks/{id}/complete`: the node's outcome and output (cut to the cap).
#[utoipa::path(
    post, path = "/node_api/v1/tasks/{id}/complete", tag = "node",
    security(("node_certificate" = [])),
    params(("id" = String, Path, description = "The task id.")),
    request_body = TaskCompleteRequest,
    responses(
        (status = 200, description = "The task's state now, and whether the completion came after the lease ran out.", body = TaskCompleteResponse),
        (status = 400, description = "`malformed_json`, `invalid_request`.", body = ErrorBody),
        (status = 401, description = "`client_certificate_required`, `unknown_certificate`, `certificate_expired`.", body = ErrorBody),
        (status = 403, description = "`revoked`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`not_leased`, `task_finished`.", body = ErrorBody),
        (status = 413, description = "`body_too_large` (over 1 MiB).", body = ErrorBody),
    )
)]
pub async fn complete(
    State(state): State<AppState>,
    authed: AuthedNode,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<TaskCompleteRequest, { task_limits::MAX_COMPLETE_BODY }>,
) -> Result<Json<TaskCompleteResponse>, ApiError> {
    let id = path_value(path)?;
    let reply = state
        .service()
        .complete_task(&authed.node, &id, &body.value)
        .await?;
    Ok(Json(reply))
}
