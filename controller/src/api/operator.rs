//! The operator API (bearer token): nodes, bootstrap tokens, desired state, revocation,
//! events, and the OpenAPI document of the whole API. The rules are [`crate::service`]'s.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;

use super::extract::{path_value, query_value, JsonBody, Operator};
use super::AppState;
use crate::errors::ApiError;
use crate::wire::{
    CreateTokenRequest, CreateTokenResponse, ErrorBody, EventsPage, EventsParams,
    GenerationResponse, NodeDetail, NodeSummary, RevokeResponse, SetModulesRequest,
    SetNetworkRequest,
};

/// `GET /api/v1/nodes`.
#[utoipa::path(
    get, path = "/api/v1/nodes", tag = "operator",
    security(("operator_token" = [])),
    responses(
        (status = 200, description = "Every node, by enrollment time.", body = Vec<NodeSummary>),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
    )
)]
pub async fn list_nodes(
    _: Operator,
    State(state): State<AppState>,
) -> Result<Json<Vec<NodeSummary>>, ApiError> {
    Ok(Json(state.service().list_nodes().await?))
}

/// `GET /api/v1/nodes/{id}`.
#[utoipa::path(
    get, path = "/api/v1/nodes/{id}", tag = "operator",
    security(("operator_token" = [])),
    params(("id" = String, Path, description = "The node id.")),
    responses(
        (status = 200, description = "The node: identity, certificates, latest heartbeat, desired state, last events.", body = NodeDetail),
        (status = 400, description = "`invalid_request`: a malformed node id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
    )
)]
pub async fn show_node(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<NodeDetail>, ApiError> {
    let id = path_value(path)?;
    Ok(Json(state.service().node_detail(&id).await?))
}

/// `POST /api/v1/nodes/{id}/revoke`: the node's certificates stop working at once.
#[utoipa::path(
    post, path = "/api/v1/nodes/{id}/revoke", tag = "operator",
    security(("operator_token" = [])),
    params(("id" = String, Path, description = "The node id.")),
    responses(
        (status = 200, description = "Revoked (again: the first time is kept).", body = RevokeResponse),
        (status = 400, description = "`invalid_request`: a malformed node id.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
    )
)]
pub async fn revoke_node(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<RevokeResponse>, ApiError> {
    let id = path_value(path)?;
    Ok(Json(state.service().revoke_node(&id).await?))
}

/// `PUT /api/v1/nodes/{id}/desired/modules`: replaces the module list, bumps the generation.
#[utoipa::path(
    put, path = "/api/v1/nodes/{id}/desired/modules", tag = "operator",
    security(("operator_token" = [])),
    params(("id" = String, Path, description = "The node id.")),
    request_body = SetModulesRequest,
    responses(
        (status = 200, description = "The generation the change created.", body = GenerationResponse),
        (status = 400, description = "`invalid_request`: a module name that is not one, a reference that is not an OCI reference, a name twice, more than 64 modules, a malformed node id; `malformed_json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such node.", body = ErrorBody),
        (status = 409, description = "`node_revoked`.", body = ErrorBody),
    )
)]
pub async fn set_modules(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<SetModulesRequest>,
) -> Result<Json<GenerationResponse>, ApiError> {
    let id = path_value(path)?;
    let reply = state
        .service()
        .set_modules(&id, &body.value.modules)
        .await?;
    Ok(Json(reply))
}

/// `PUT /api/v1/nodes/{id}/desired/network`: replaces (or removes) the network, bumps the
/// generation.
#[utoipa::path(
    put, path = "/api/v1/nodes/{id}/desired/network", tag = "operator",
    security(("operator_token" = [])),
    params(("id" = String, Path, description = "The node id.")),
    request_body = SetNetworkRequest,
    responses(
        (status = 200, description = "The generation the change created.", body = GenerationResponse),
        (status = 400, description = "`invalid_request`: an interface, address, port, key, endpoint, allowed IP or forward that breaks its rule; `malformed_json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such node.", body = ErrorBody),
        (status = 409, description = "`node_revoked`.", body = ErrorBody),
    )
)]
pub async fn set_network(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<SetNetworkRequest>,
) -> Result<Json<GenerationResponse>, ApiError> {
    let id = path_value(path)?;
    let reply = state
        .service()
        .set_network(&id, body.value.network.as_ref())
        .await?;
    Ok(Json(reply))
}

/// `POST /api/v1/tokens`: a new bootstrap token, shown once.
#[utoipa::path(
    post, path = "/api/v1/tokens", tag = "operator",
    security(("operator_token" = [])),
    request_body = CreateTokenRequest,
    responses(
        (status = 200, description = "The token (shown only now) and its expiry.", body = CreateTokenResponse),
        (status = 400, description = "`invalid_request`: ttl_s not 1 to a year, node_uuid empty or not printable; `malformed_json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
    )
)]
pub async fn create_token(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<CreateTokenRequest>,
) -> Result<Json<CreateTokenResponse>, ApiError> {
    Ok(Json(state.service().create_token(&body.value).await?))
}

/// `GET /api/v1/events?node=&severity=&kind=&since=&limit=&after=&newest=`: events oldest
/// first, a page at a time; `next` is the cursor to pass as `after` for the following page.
#[utoipa::path(
    get, path = "/api/v1/events", tag = "operator",
    security(("operator_token" = [])),
    params(EventsParams),
    responses(
        (status = 200, description = "A page of events, oldest first, and the cursor of the next.", body = EventsPage),
        (status = 400, description = "`invalid_query`: limit not 1 to 1000, an unknown severity, a time that is not one, an unknown parameter.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
    )
)]
pub async fn list_events(
    _: Operator,
    State(state): State<AppState>,
    params: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Json<EventsPage>, ApiError> {
    let params = query_value(params)?;
    Ok(Json(state.service().list_events(params).await?))
}

/// `GET /api/v1/openapi.json`: this API's OpenAPI document, generated from the handlers and
/// the wire types. Public like the node API's CA: it says how to call, not what is stored.
#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "operator",
    responses(
        (status = 200, description = "The OpenAPI 3 document of every route.", content_type = "application/json", body = Object),
    )
)]
pub async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    // Made once: the document is the same for the life of the process.
    static DOCUMENT: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    Json(DOCUMENT.get_or_init(super::openapi).clone())
}
