//! Overlay networks over HTTP (operator token): networks, membership and port forwards under
//! `/api/v1/networks` and `/api/v1/forwards`. Every change answers the nodes whose desired
//! state it changed, and wakes their watches. The rules are in [`crate::networks`]; the
//! checks of a request's own values are here, shared with the CLI.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::extract::{JsonBody, Operator};
use super::AppState;
use crate::errors::ApiError;
use crate::networks::{self, Cidr, Forward, Refusal};
use crate::storage::{Bumped, Network, NetworkDetail};
use crate::wire::{
    AddForwardRequest, CreateNetworkRequest, ForwardResponse, ForwardsParams, JoinNetworkRequest,
    JoinResponse, LeaveNetworkRequest, LeaveResponse, NodeGeneration,
};

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let status =
            StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
        ApiError::new(status, refusal.code(), refusal.to_string())
    }
}

/// Checks a network to create: its name, CIDR and port (default [`networks::DEFAULT_PORT`]).
pub fn check_create(req: &CreateNetworkRequest) -> Result<(Cidr, u16), Refusal> {
    networks::check_name(&req.name)?;
    let cidr = networks::network_cidr(&req.cidr)?;
    let port = match req.port {
        None => networks::DEFAULT_PORT,
        Some(p) => networks::check_port("port", p)?,
    };
    Ok((cidr, port))
}

/// Checks a join's own values (its routes are checked against the network when stored).
pub fn check_join(req: &JoinNetworkRequest) -> Result<(), Refusal> {
    if let Some(endpoint) = &req.endpoint {
        networks::check_endpoint(endpoint)?;
    }
    Ok(())
}

/// Checks a forward's protocol, port and (when adding) target: the port.
pub fn check_forward(proto: &str, port: u32, to: Option<&str>) -> Result<u16, Refusal> {
    networks::check_proto(proto)?;
    let port = networks::check_port("port", port)?;
    if let Some(to) = to {
        networks::check_target(to)?;
    }
    Ok(port)
}

/// What a path says, or 400 `invalid_path`.
fn path_value<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(value)| value)
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}

fn updated(state: &AppState, what: &str, bumped: Bumped) -> Vec<NodeGeneration> {
    if !bumped.is_empty() {
        state.watches().poke();
        tracing::info!(change = what, updated = ?bumped, "desired networks re-derived");
    }
    NodeGeneration::list(bumped)
}

/// `POST /api/v1/networks {"name", "cidr", "port"?}`: a new, empty network.
pub async fn create(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<CreateNetworkRequest>,
) -> Result<Json<Network>, ApiError> {
    let req = body.value;
    let (cidr, port) = check_create(&req)?;
    let network = state
        .storage()
        .create_network(&req.name, cidr, port, crate::now_ms())
        .await??;
    tracing::info!(network = %network.name, cidr = %network.cidr, port, "network created");
    Ok(Json(network))
}

/// `GET /api/v1/networks`: every network with its member count, by name.
pub async fn list(
    _: Operator,
    State(state): State<AppState>,
) -> Result<Json<Vec<Network>>, ApiError> {
    Ok(Json(state.storage().networks().await?))
}

/// `GET /api/v1/networks/{name}`: the network, its members (address, key, endpoint used,
/// what they reported) and their forwards.
pub async fn show(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<NetworkDetail>, ApiError> {
    let name = path_value(path)?;
    state
        .storage()
        .network_detail(&name)
        .await?
        .map(Json)
        .ok_or_else(|| Refusal::NoNetwork(name).into())
}

/// `DELETE /api/v1/networks/{name}`: only an empty network (409 `network_not_empty`).
pub async fn delete(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let name = path_value(path)?;
    state.storage().delete_network(&name).await??;
    tracing::info!(network = %name, "network deleted");
    Ok(Json(serde_json::json!({ "deleted": name })))
}

/// `POST /api/v1/networks/{name}/join {"node", "announce"?, "endpoint"?}`: the node gets the
/// lowest free address; joining the same network again replaces its routes and endpoint.
pub async fn join(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<JoinNetworkRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let name = path_value(path)?;
    let req = body.value;
    check_join(&req)?;
    let (member, bumped) = state
        .storage()
        .join_network(
            &name,
            &req.node,
            &req.announce,
            req.endpoint.as_deref(),
            crate::now_ms(),
        )
        .await??;
    tracing::info!(network = %name, node_id = %member.node_id, address = %member.address,
        "node joined network");
    Ok(Json(JoinResponse {
        updated: updated(&state, "join", bumped),
        member,
    }))
}

/// `POST /api/v1/networks/{name}/leave {"node"}`: its address is free, its forwards go, its
/// desired network is `null`.
pub async fn leave(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<LeaveNetworkRequest>,
) -> Result<Json<LeaveResponse>, ApiError> {
    let name = path_value(path)?;
    let node = body.value.node;
    let (left, bumped) = state
        .storage()
        .leave_network(&name, &node, crate::now_ms())
        .await??;
    tracing::info!(network = %name, node_id = %node, address = %left.address, "node left network");
    Ok(Json(LeaveResponse {
        updated: updated(&state, "leave", bumped),
        left,
    }))
}

/// `POST /api/v1/forwards {"node", "proto", "port", "to"}`: forwards a member's port.
pub async fn add_forward(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<AddForwardRequest>,
) -> Result<Json<ForwardResponse>, ApiError> {
    let req = body.value;
    let port = check_forward(&req.proto, req.port, Some(&req.to))?;
    let (forward, bumped) = state
        .storage()
        .add_forward(&req.node, &req.proto, port, &req.to, crate::now_ms())
        .await??;
    tracing::info!(node_id = %req.node, proto = %req.proto, port, to = %req.to, "forward added");
    Ok(Json(ForwardResponse {
        updated: updated(&state, "forward add", bumped),
        forward,
    }))
}

/// `GET /api/v1/forwards?node=`: forwards by node, protocol and port.
pub async fn list_forwards(
    _: Operator,
    State(state): State<AppState>,
    params: Result<Query<ForwardsParams>, QueryRejection>,
) -> Result<Json<Vec<Forward>>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    Ok(Json(
        state.storage().forwards(params.node.as_deref()).await?,
    ))
}

/// `DELETE /api/v1/forwards/{node}/{proto}/{port}`: the forward removed.
pub async fn remove_forward(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Json<ForwardResponse>, ApiError> {
    let (node, proto, port) = path_value(path)?;
    let port = port
        .parse::<u32>()
        .map_err(|_| Refusal::Invalid(format!("port must be 1 to 65535, not {port:?}")))?;
    let port = check_forward(&proto, port, None)?;
    let (forward, bumped) = state
        .storage()
        .remove_forward(&node, &proto, port, crate::now_ms())
        .await??;
    tracing::info!(node_id = %node, proto = %proto, port, "forward removed");
    Ok(Json(ForwardResponse {
        updated: updated(&state, "forward remove", bumped),
        forward,
    }))
}
