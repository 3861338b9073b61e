//! Overlay networks over HTTP (operator token): networks, membership and port forwards under
//! `/api/v1/networks` and `/api/v1/forwards`. Every change answers the nodes whose desired
//! state it changed. The rules are [`crate::service::networks`] and [`crate::networks`].

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;

use super::extract::{path_value, query_value, JsonBody, Operator};
use super::AppState;
use crate::errors::ApiError;
use crate::networks::Forward;
use crate::service::networks::parse_port;
use crate::wire::{
    AddForwardRequest, CreateNetworkRequest, DeleteNetworkResponse, ErrorBody, ForwardResponse,
    ForwardsParams, JoinNetworkRequest, JoinResponse, LeaveNetworkRequest, LeaveResponse, Network,
    NetworkDetail,
};

/// `POST /api/v1/networks {"name", "cidr", "port"?}`: a new, empty network.
#[utoipa::path(
    post, path = "/api/v1/networks", tag = "operator",
    security(("operator_token" = [])),
    request_body = CreateNetworkRequest,
    responses(
        (status = 200, description = "The network, empty.", body = Network),
        (status = 400, description = "`invalid_request`: a name that is not 1 to 32 of a-z 0-9 -, a CIDR that is not IPv4 with prefix 8 to 30 (or is loopback, 0/8, 224/3), a port that is not 1 to 65535; `malformed_json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 409, description = "`network_exists`.", body = ErrorBody),
    )
)]
pub async fn create(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<CreateNetworkRequest>,
) -> Result<Json<Network>, ApiError> {
    Ok(Json(state.service().create_network(&body.value).await?))
}

/// `GET /api/v1/networks`: every network with its member count, by name.
#[utoipa::path(
    get, path = "/api/v1/networks", tag = "operator",
    security(("operator_token" = [])),
    responses(
        (status = 200, description = "Every network with its member count, by name.", body = Vec<Network>),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
    )
)]
pub async fn list(
    _: Operator,
    State(state): State<AppState>,
) -> Result<Json<Vec<Network>>, ApiError> {
    Ok(Json(state.service().list_networks().await?))
}

/// `GET /api/v1/networks/{name}`: the network, its members and their forwards.
#[utoipa::path(
    get, path = "/api/v1/networks/{name}", tag = "operator",
    security(("operator_token" = [])),
    params(("name" = String, Path, description = "The network's name.")),
    responses(
        (status = 200, description = "The network, its members (address, key, endpoint used, what they reported) and their forwards.", body = NetworkDetail),
        (status = 400, description = "`invalid_request`: not a network name.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
    )
)]
pub async fn show(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<NetworkDetail>, ApiError> {
    let name = path_value(path)?;
    Ok(Json(state.service().network(&name).await?))
}

/// `DELETE /api/v1/networks/{name}`: only an empty network.
#[utoipa::path(
    delete, path = "/api/v1/networks/{name}", tag = "operator",
    security(("operator_token" = [])),
    params(("name" = String, Path, description = "The network's name.")),
    responses(
        (status = 200, description = "Deleted.", body = DeleteNetworkResponse),
        (status = 400, description = "`invalid_request`: not a network name.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`network_not_empty`: members must leave first.", body = ErrorBody),
    )
)]
pub async fn delete(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DeleteNetworkResponse>, ApiError> {
    let name = path_value(path)?;
    Ok(Json(state.service().delete_network(&name).await?))
}

/// `POST /api/v1/networks/{name}/join {"node", "announce"?, "endpoint"?}`: the node gets the
/// lowest free address; joining the same network again replaces its routes and endpoint.
#[utoipa::path(
    post, path = "/api/v1/networks/{name}/join", tag = "operator",
    security(("operator_token" = [])),
    params(("name" = String, Path, description = "The network's name.")),
    request_body = JoinNetworkRequest,
    responses(
        (status = 200, description = "The membership and the nodes whose desired network changed.", body = JoinResponse),
        (status = 400, description = "`invalid_request`: an endpoint that is not HOST:PORT, an announced route that is not a CIDR, more than 32 routes, a malformed node id; `malformed_json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such network or node.", body = ErrorBody),
        (status = 409, description = "`node_revoked`, `in_another_network`, `network_full`, `route_conflict`.", body = ErrorBody),
    )
)]
pub async fn join(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<JoinNetworkRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    let name = path_value(path)?;
    Ok(Json(
        state.service().join_network(&name, &body.value).await?,
    ))
}

/// `POST /api/v1/networks/{name}/leave {"node"}`: its address is free, its forwards go, its
/// desired network is `null`.
#[utoipa::path(
    post, path = "/api/v1/networks/{name}/leave", tag = "operator",
    security(("operator_token" = [])),
    params(("name" = String, Path, description = "The network's name.")),
    request_body = LeaveNetworkRequest,
    responses(
        (status = 200, description = "What the leave did and the nodes whose desired network changed.", body = LeaveResponse),
        (status = 400, description = "`invalid_request`, `malformed_json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such network.", body = ErrorBody),
        (status = 409, description = "`not_a_member`.", body = ErrorBody),
    )
)]
pub async fn leave(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: JsonBody<LeaveNetworkRequest>,
) -> Result<Json<LeaveResponse>, ApiError> {
    let name = path_value(path)?;
    let reply = state
        .service()
        .leave_network(&name, &body.value.node)
        .await?;
    Ok(Json(reply))
}

/// `POST /api/v1/forwards {"node", "proto", "port", "to"}`: forwards a member's port.
#[utoipa::path(
    post, path = "/api/v1/forwards", tag = "operator",
    security(("operator_token" = [])),
    request_body = AddForwardRequest,
    responses(
        (status = 200, description = "The forward and the nodes whose desired network changed (none when it was there already).", body = ForwardResponse),
        (status = 400, description = "`invalid_request`: proto not tcp or udp, port not 1 to 65535, a target that is not a routable a.b.c.d:port; `malformed_json`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such node.", body = ErrorBody),
        (status = 409, description = "`not_a_member`, `port_conflict`, `forward_exists`, `node_revoked`.", body = ErrorBody),
    )
)]
pub async fn add_forward(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<AddForwardRequest>,
) -> Result<Json<ForwardResponse>, ApiError> {
    Ok(Json(state.service().add_forward(&body.value).await?))
}

/// `GET /api/v1/forwards?node=`: forwards by node, protocol and port.
#[utoipa::path(
    get, path = "/api/v1/forwards", tag = "operator",
    security(("operator_token" = [])),
    params(ForwardsParams),
    responses(
        (status = 200, description = "Forwards by node, protocol and port.", body = Vec<Forward>),
        (status = 400, description = "`invalid_query`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
    )
)]
pub async fn list_forwards(
    _: Operator,
    State(state): State<AppState>,
    params: Result<Query<ForwardsParams>, QueryRejection>,
) -> Result<Json<Vec<Forward>>, ApiError> {
    let params = query_value(params)?;
    Ok(Json(state.service().list_forwards(&params).await?))
}

/// `DELETE /api/v1/forwards/{node}/{proto}/{port}`: the forward removed.
#[utoipa::path(
    delete, path = "/api/v1/forwards/{node}/{proto}/{port}", tag = "operator",
    security(("operator_token" = [])),
    params(
        ("node" = String, Path, description = "The node id."),
        ("proto" = String, Path, description = "`tcp` or `udp`."),
        ("port" = u16, Path, description = "The node's port."),
    ),
    responses(
        (status = 200, description = "The forward removed and the nodes whose desired network changed.", body = ForwardResponse),
        (status = 400, description = "`invalid_request`.", body = ErrorBody),
        (status = 401, description = "`unauthorized`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such forward.", body = ErrorBody),
    )
)]
pub async fn remove_forward(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Json<ForwardResponse>, ApiError> {
    let (node, proto, port) = path_value(path)?;
    let port = parse_port(&port)?;
    let reply = state.service().remove_forward(&node, &proto, port).await?;
    Ok(Json(reply))
}
