//! The operator API (bearer token): nodes, bootstrap tokens, desired state, revocation,
//! events.

use std::collections::HashSet;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;

use super::extract::{JsonBody, Operator};
use super::AppState;
use crate::errors::ApiError;
use crate::events;
use crate::storage::{EventQuery, NodeDetail, NodeSummary};
use crate::tokens;
use crate::wire::{
    CreateTokenRequest, CreateTokenResponse, EventsPage, EventsParams, GenerationResponse,
    SetModulesRequest, SetNetworkRequest,
};

fn node_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}

/// `GET /api/v1/nodes`.
pub async fn list_nodes(
    _: Operator,
    State(state): State<AppState>,
) -> Result<Json<Vec<NodeSummary>>, ApiError> {
    Ok(Json(state.storage().list_nodes().await?))
}

/// `GET /api/v1/nodes/{id}`.
pub async fn show_node(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<NodeDetail>, ApiError> {
    let id = node_id(path)?;
    state
        .storage()
        .node_detail(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no node {id}")))
}

/// `POST /api/v1/nodes/{id}/revoke`: the node's certificates stop working at once.
pub async fn revoke_node(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = node_id(path)?;
    if !state.storage().revoke(&id, crate::now_ms()).await? {
        return Err(ApiError::not_found(format!("no node {id}")));
    }
    tracing::info!(node_id = %id, "node revoked");
    Ok(Json(serde_json::json!({"revoked": id})))
}

/// `PUT /api/v1/nodes/{id}/desired/modules`: replaces the module list, bumps the generation.
pub async fn set_modules(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<SetModulesRequest>,
) -> Result<Json<GenerationResponse>, ApiError> {
    let id = node_id(path)?;
    let modules = body.value.modules;
    let mut names = HashSet::new();
    for module in &modules {
        if module.name.trim().is_empty() || module.reference.trim().is_empty() {
            return Err(ApiError::bad_request(
                "invalid_request",
                "every module needs a name and a reference",
            ));
        }
        if !names.insert(module.name.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("module {} is listed twice", module.name),
            ));
        }
    }
    let generation = state
        .storage()
        .set_desired_modules(&id, &modules, crate::now_ms())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no node {id}")))?;
    state.watches().poke();
    tracing::info!(node_id = %id, generation, modules = modules.len(), "desired modules set");
    Ok(Json(GenerationResponse { generation }))
}

/// `PUT /api/v1/nodes/{id}/desired/network`: replaces (or removes) the network, bumps the
/// generation.
pub async fn set_network(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<SetNetworkRequest>,
) -> Result<Json<GenerationResponse>, ApiError> {
    let id = node_id(path)?;
    let generation = state
        .storage()
        .set_desired_network(&id, body.value.network.as_ref(), crate::now_ms())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no node {id}")))?;
    state.watches().poke();
    tracing::info!(node_id = %id, generation, "desired network set");
    Ok(Json(GenerationResponse { generation }))
}

/// `POST /api/v1/tokens`: a new bootstrap token, shown once.
pub async fn create_token(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<CreateTokenRequest>,
) -> Result<Json<CreateTokenResponse>, ApiError> {
    let req = body.value;
    let ttl = match req.ttl_s {
        None => tokens::DEFAULT_TTL,
        Some(0) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "ttl_s must be at least 1",
            ))
        }
        Some(s) => std::time::Duration::from_secs(s),
    };
    let created = tokens::create(state.storage(), ttl, req.node_uuid.as_deref())
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok(Json(created))
}

/// `GET /api/v1/events?node=&severity=&kind=&since=&limit=&after=`: events oldest first,
/// a page at a time; `next` is the cursor to pass as `after` for the following page.
pub async fn list_events(
    _: Operator,
    State(state): State<AppState>,
    params: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Json<EventsPage>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let query = event_query(params).map_err(|e| ApiError::bad_request("invalid_query", e))?;
    let events = state.storage().events(&query).await?;
    let next = events.last().map_or(query.after.unwrap_or(0), |e| e.cursor);
    Ok(Json(EventsPage { events, next }))
}

fn event_query(params: EventsParams) -> Result<EventQuery, String> {
    let limit = params.limit.unwrap_or(events::DEFAULT_PAGE);
    if limit == 0 || limit > events::MAX_PAGE {
        return Err(format!("limit must be 1 to {}", events::MAX_PAGE));
    }
    Ok(EventQuery {
        node: params.node,
        min_severity: params
            .severity
            .as_deref()
            .map(events::parse_severity)
            .transpose()?,
        kind: params.kind,
        since_ms: params
            .since
            .as_deref()
            .map(events::parse_time)
            .transpose()?,
        after: params.after,
        limit,
        newest: false,
    })
}
