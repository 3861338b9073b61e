//! The node API: enroll, rotate, heartbeat, events.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::extract::{AuthedNode, EventSender, JsonBody, RemoteAddr};
use super::AppState;
use crate::ca::CertAuthority;
use crate::errors::ApiError;
use crate::events::{self, BatchError};
use crate::networks::NodeReport;
use crate::secrets;
use crate::storage::{EnrollError, HeartbeatFacts};
use crate::wire::{
    EnrollRequest, EnrollResponse, EventsRequest, EventsResponse, HeartbeatRequest,
    HeartbeatResponse, RotateRequest, RotateResponse,
};

/// Longest identity field, version or boot id accepted.
const MAX_FIELD: usize = 256;

fn check_field(name: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("{name} must not be empty"),
        ));
    }
    if value.len() > MAX_FIELD || value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("{name} must be at most {MAX_FIELD} printable characters"),
        ));
    }
    Ok(())
}

fn parse_csr(csr_pem: &str) -> Result<rcgen::CertificateSigningRequestParams, ApiError> {
    CertAuthority::parse_csr(csr_pem)
        .map_err(|e| ApiError::bad_request("invalid_csr", e.to_string()))
}

/// `POST /node_api/v1/enroll`: bootstrap token + CSR → node certificate.
pub async fn enroll(
    State(state): State<AppState>,
    body: JsonBody<EnrollRequest>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let req = body.value;
    check_field("identity.uuid", &req.identity.uuid)?;
    check_field("identity.hostname", &req.identity.hostname)?;
    check_field("identity.arch", &req.identity.arch)?;
    check_field("identity.boot_id", &req.identity.boot_id)?;
    check_field("agent_version", &req.agent_version)?;
    // The CSR is checked before the token is consumed: a bad CSR does not burn the token.
    let csr = parse_csr(&req.csr_pem)?;
    let token_hash = secrets::sha256_hex(req.bootstrap_token.as_bytes());
    let lifetime = state.cert_lifetime();
    let (node, issued) = state
        .storage()
        .enroll(&token_hash, &req.identity, crate::now_ms(), |node_id| {
            state.ca().sign_node(&csr, node_id, lifetime)
        })
        .await
        .map_err(|err| match err {
            EnrollError::UnknownToken => {
                ApiError::unauthorized("invalid_token", "unknown bootstrap token")
            }
            EnrollError::TokenUsed => {
                ApiError::unauthorized("token_used", "bootstrap token already used")
            }
            EnrollError::TokenExpired => {
                ApiError::unauthorized("token_expired", "bootstrap token expired")
            }
            EnrollError::TokenNodeMismatch => ApiError::unauthorized(
                "token_node_mismatch",
                "bootstrap token is bound to another node",
            ),
            EnrollError::Revoked(id) => ApiError::new(
                StatusCode::FORBIDDEN,
                "revoked",
                format!("node {id} is revoked"),
            ),
            other => ApiError::internal(&other),
        })?;
    tracing::info!(
        node_id = %node.id,
        uuid = %node.uuid,
        hostname = %node.hostname,
        serial = %issued.info.serial,
        agent_version = %req.agent_version,
        "node enrolled"
    );
    Ok(Json(EnrollResponse {
        node_id: node.id,
        cert_pem: issued.cert_pem,
        ca_chain_pem: state.ca().cert_pem().to_owned(),
        not_after_ms: issued.info.not_after_ms,
    }))
}

/// `POST /node_api/v1/certificates/rotate`: a new certificate for the calling node. Its
/// previous certificates stay valid until they expire.
pub async fn rotate(
    State(state): State<AppState>,
    authed: AuthedNode,
    body: JsonBody<RotateRequest>,
) -> Result<Json<RotateResponse>, ApiError> {
    let csr = parse_csr(&body.value.csr_pem)?;
    let issued = state
        .ca()
        .sign_node(&csr, &authed.node.id, state.cert_lifetime())
        .map_err(|e| ApiError::internal(&e))?;
    state
        .storage()
        .record_cert(&authed.node.id, &issued.info, crate::now_ms())
        .await?;
    tracing::info!(
        node_id = %authed.node.id,
        old_serial = %authed.cert.serial,
        serial = %issued.info.serial,
        "certificate rotated"
    );
    Ok(Json(RotateResponse {
        cert_pem: issued.cert_pem,
        ca_chain_pem: state.ca().cert_pem().to_owned(),
        not_after_ms: issued.info.not_after_ms,
    }))
}

/// `POST /node_api/v1/status/heartbeat`: stores the node's report, answers its desired state.
/// A new WireGuard key, new endpoints or a new source address re-derive the node's network
/// first (crate::networks), so the reply already carries what that changed.
pub async fn heartbeat(
    State(state): State<AppState>,
    authed: AuthedNode,
    RemoteAddr(remote): RemoteAddr,
    body: JsonBody<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let hb = &body.value;
    check_field("boot_id", &hb.boot_id)?;
    check_field("agent_version", &hb.agent_version)?;
    if let Some(arch) = &hb.arch {
        check_field("arch", arch)?;
    }
    if hb
        .load
        .is_some_and(|l| l.iter().any(|v| !v.is_finite() || *v < 0.0))
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            "load must be three non-negative numbers",
        ));
    }
    let raw = body.raw.to_string();
    let now = crate::now_ms();
    state
        .storage()
        .record_heartbeat(
            &authed.node.id,
            now,
            &HeartbeatFacts {
                boot_id: &hb.boot_id,
                agent_version: &hb.agent_version,
                applied_generation: hb.applied_generation,
                enrollment: hb.enrollment.as_ref(),
                body: &raw,
            },
        )
        .await?;
    let report = NodeReport::from_heartbeat(hb.network.as_ref(), remote.map(|a| a.ip()));
    let bumped = state
        .storage()
        .record_network_report(&authed.node.id, &report, now)
        .await?;
    if !bumped.is_empty() {
        state.watches().poke();
        tracing::info!(node_id = %authed.node.id, updated = ?bumped,
            "network report changed peers");
    }
    let desired = state.storage().desired(&authed.node.id).await?;
    tracing::debug!(
        node_id = %authed.node.id,
        applied_generation = ?hb.applied_generation,
        generation = desired.generation,
        "heartbeat"
    );
    Ok(Json(HeartbeatResponse {
        server_time_ms: now,
        next_interval_s: state.heartbeat_interval_s(),
        desired,
    }))
}

/// `POST /node_api/v1/events`: stores a batch of the calling node's events, all or nothing.
/// A batch that breaks a limit is refused whole; an id the node sent before is counted as a
/// duplicate and not stored again. A revoked node may still deliver (see [`EventSender`]).
pub async fn events(
    State(state): State<AppState>,
    EventSender(authed): EventSender,
    body: JsonBody<EventsRequest, { events::MAX_BODY }>,
) -> Result<Json<EventsResponse>, ApiError> {
    let batch = &body.value.events;
    events::validate_batch(batch).map_err(|err| {
        let message = err.to_string();
        match err {
            BatchError::TooMany(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "batch_too_large", message)
            }
            BatchError::Invalid { .. } => ApiError::bad_request("invalid_event", message),
            BatchError::Duplicate(_) => ApiError::bad_request("duplicate_event_id", message),
        }
    })?;
    let stored = state
        .storage()
        .insert_events(
            &authed.node.id,
            batch,
            crate::now_ms(),
            state.event_retention(),
        )
        .await?;
    tracing::debug!(
        node_id = %authed.node.id,
        accepted = stored.accepted,
        duplicates = stored.duplicates,
        "events"
    );
    Ok(Json(EventsResponse {
        accepted: stored.accepted,
        duplicates: stored.duplicates,
    }))
}
