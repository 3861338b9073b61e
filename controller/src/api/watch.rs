//! `GET /node_api/v1/watch?generation=G[&timeout_s=S]`: the long-poll a node holds (the rules
//! are [`crate::service::watch`]).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;

use super::extract::{query_value, AuthedNode};
use super::AppState;
use crate::errors::ApiError;
use crate::wire::{ErrorBody, WatchParams, WatchResponse};

/// Answers when the node's generation is past `generation` or a task is queued for it
/// (`changed`), or when the time is up or the controller shuts down (`changed` false).
#[utoipa::path(
    get, path = "/node_api/v1/watch", tag = "node",
    security(("node_certificate" = [])),
    params(WatchParams),
    responses(
        (status = 200, description = "The node's generation and queued tasks now; `changed` says whether that is news.", body = WatchResponse),
        (status = 400, description = "`invalid_query`: no generation, timeout_s not 1 to 300.", body = ErrorBody),
        (status = 401, description = "`client_certificate_required`, `unknown_certificate`, `certificate_expired`.", body = ErrorBody),
        (status = 403, description = "`revoked`.", body = ErrorBody),
    )
)]
pub async fn watch(
    State(state): State<AppState>,
    authed: AuthedNode,
    params: Result<Query<WatchParams>, QueryRejection>,
) -> Result<Json<WatchResponse>, ApiError> {
    let params = query_value(params)?;
    Ok(Json(state.service().watch(&authed.node, &params).await?))
}
