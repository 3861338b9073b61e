//! The node API: enroll, rotate, heartbeat, events (the service's rules, over HTTP).

use axum::extract::State;
use axum::Json;

use super::extract::{AuthedNode, EventSender, JsonBody, RemoteAddr};
use super::AppState;
use crate::errors::ApiError;
use crate::events;
use crate::wire::{
    EnrollRequest, EnrollResponse, ErrorBody, EventsRequest, EventsResponse, HeartbeatRequest,
    HeartbeatResponse, RotateRequest, RotateResponse,
};

/// `POST /node_api/v1/enroll`: bootstrap token + CSR → node certificate.
#[utoipa::path(
    post, path = "/node_api/v1/enroll", tag = "node",
    request_body = EnrollRequest,
    responses(
        (status = 200, description = "Enrolled: the node's id, certificate and CA.", body = EnrollResponse),
        (status = 400, description = "`invalid_request` (an identity field empty, too long or not printable), `invalid_csr`, `malformed_json`.", body = ErrorBody),
        (status = 401, description = "`invalid_token`, `token_used`, `token_expired`, `token_node_mismatch`.", body = ErrorBody),
        (status = 403, description = "`revoked`: the node with this uuid is revoked.", body = ErrorBody),
    )
)]
pub async fn enroll(
    State(state): State<AppState>,
    body: JsonBody<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    Ok(Json(state.service().enroll(&body.value).await?))
}

/// `POST /node_api/v1/certificates/rotate`: a new certificate for the calling node. Its
/// previous certificates stay valid until they expire.
#[utoipa::path(
    post, path = "/node_api/v1/certificates/rotate", tag = "node",
    security(("node_certificate" = [])),
    request_body = RotateRequest,
    responses(
        (status = 200, description = "The new certificate.", body = RotateResponse),
        (status = 400, description = "`invalid_csr`, `malformed_json`, `invalid_request`.", body = ErrorBody),
        (status = 401, description = "`client_certificate_required`, `unknown_certificate`, `certificate_expired`.", body = ErrorBody),
        (status = 403, description = "`revoked`.", body = ErrorBody),
    )
)]
pub async fn rotate(
    State(state): State<AppState>,
    authed: AuthedNode,
    body: JsonBody<RotateRequest>,
) -> Result<Json<RotateResponse>, ApiError> {
    let reply = state
        .service()
        .rotate(&authed.node, &authed.cert, &body.value)
        .await?;
    Ok(Json(reply))
}

/// `POST /node_api/v1/status/heartbeat`: stores the node's report, answers its desired state.
#[utoipa::path(
    post, path = "/node_api/v1/status/heartbeat", tag = "node",
    security(("node_certificate" = [])),
    request_body = HeartbeatRequest,
    responses(
        (status = 200, description = "The controller's time, the next interval and the node's desired state.", body = HeartbeatResponse),
        (status = 400, description = "`invalid_request` (boot id, agent version or arch empty or too long; load negative), `malformed_json`.", body = ErrorBody),
        (status = 401, description = "`client_certificate_required`, `unknown_certificate`, `certificate_expired`.", body = ErrorBody),
        (status = 403, description = "`revoked`.", body = ErrorBody),
    )
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    authed: AuthedNode,
    RemoteAddr(remote): RemoteAddr,
    body: JsonBody<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let reply = state
        .service()
        .heartbeat(&authed.node, remote.map(|a| a.ip()), &body.value, &body.raw)
        .await?;
    Ok(Json(reply))
}

/// `POST /node_api/v1/events`: stores a batch of the calling node's events, all or nothing.
/// A revoked node may still deliver (see [`EventSender`]).
#[utoipa::path(
    post, path = "/node_api/v1/events", tag = "node",
    security(("node_certificate" = [])),
    request_body = EventsRequest,
    responses(
        (status = 200, description = "Every event of the batch is stored: `accepted` new ones, `duplicates` already held.", body = EventsResponse),
        (status = 400, description = "`invalid_event` (an event breaks a limit), `duplicate_event_id` (an id twice in the batch), `malformed_json`, `invalid_request`.", body = ErrorBody),
        (status = 401, description = "`client_certificate_required`, `unknown_certificate`, `certificate_expired`.", body = ErrorBody),
        (status = 413, description = "`batch_too_large` (more than 1000 events), `body_too_large` (over 1 MiB).", body = ErrorBody),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    EventSender(authed): EventSender,
    body: JsonBody<EventsRequest, { events::MAX_BODY }>,
) -> Result<Json<EventsResponse>, ApiError> {
    let reply = state
        .service()
        .ingest_events(&authed.node, &body.value.events)
        .await?;
    Ok(Json(reply))
}
