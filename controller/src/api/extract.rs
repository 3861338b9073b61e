//! Extractors: JSON bodies (size, content type, syntax, shape), the verified node behind a
//! client certificate, and the operator's bearer token (the rules of who may call are the
//! service's). Each refuses with a JSON [`ApiError`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::{AppState, BODY_LIMIT};
use crate::ca::CertInfo;
use crate::errors::ApiError;
use crate::service::nodes::RevokedNodes;
use crate::service::Denied;
use crate::storage::Node;

/// The client certificate of the TLS connection a request came on, verified against the CA
/// during the handshake; `None` when the client sent none. Inserted by the server per request.
#[derive(Clone, Debug)]
pub struct ClientCert(pub Option<Arc<CertInfo>>);

/// The address of the peer of the TCP connection a request came on. Inserted by the server
/// per request; absent where the router is driven without a connection.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// The address a request came from, if the server recorded it ([`PeerAddr`]); never refuses.
#[derive(Clone, Copy, Debug)]
pub struct RemoteAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for RemoteAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(RemoteAddr(parts.extensions.get::<PeerAddr>().map(|p| p.0)))
    }
}

/// A JSON request body of at most `LIMIT` bytes: `value` typed, `raw` the text as it came
/// (what the node sent, for storage; valid JSON, since `value` was parsed from it).
#[derive(Debug)]
pub struct JsonBody<T, const LIMIT: usize = BODY_LIMIT> {
    /// The body as `T`.
    pub value: T,
    /// The body's text.
    pub raw: String,
}

impl<T: DeserializeOwned, S: Send + Sync, const LIMIT: usize> FromRequest<S>
    for JsonBody<T, LIMIT>
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be application/json",
            ));
        }
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body must be at most {LIMIT} bytes"),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > LIMIT as u64) {
            return Err(too_large());
        }
        let bytes = axum::body::to_bytes(req.into_body(), LIMIT)
            .await
            .map_err(|err| {
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
                while let Some(e) = source {
                    if e.is::<http_body_util::LengthLimitError>() {
                        return too_large();
                    }
                    source = e.source();
                }
                ApiError::bad_request("body_unreadable", format!("cannot read the body: {err}"))
            })?;
        // Parsed once, straight into `T` (a heartbeat is a few KiB: building a `Value` first
        // and the type from that cost the controller more than the rest of the call).
        let value = serde_json::from_slice::<T>(&bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::bad_request("invalid_request", format!("invalid request: {e}"))
            }
            _ => ApiError::bad_request("malformed_json", format!("malformed JSON: {e}")),
        })?;
        // JSON text is UTF-8: what parsed is.
        let raw = String::from_utf8(bytes.to_vec())
            .map_err(|e| ApiError::bad_request("malformed_json", format!("malformed JSON: {e}")))?;
        Ok(Self { value, raw })
    }
}

/// A node authenticated by its client certificate ([`crate::service::Service::authenticate_node`]):
/// issued by this controller, CN naming an enrolled node, not expired, node not revoked.
#[derive(Debug)]
pub struct AuthedNode {
    /// The node.
    pub node: Node,
    /// The certificate it presented.
    pub cert: Arc<CertInfo>,
}

impl FromRequestParts<AppState> for AuthedNode {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state, RevokedNodes::Refused).await
    }
}

/// A node allowed to deliver its events: as [`AuthedNode`], except that a revoked node is
/// still accepted, so the operator sees what the node said up to and about its revocation
/// (`enroll.revoked`). Everything else a revoked node asks for is refused (403 `revoked`).
#[derive(Debug)]
pub struct EventSender(pub AuthedNode);

impl FromRequestParts<AppState> for EventSender {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state, RevokedNodes::Accepted)
            .await
            .map(EventSender)
    }
}

async fn authenticate(
    parts: &mut Parts,
    state: &AppState,
    revoked: RevokedNodes,
) -> Result<AuthedNode, ApiError> {
    let cert = parts
        .extensions
        .get::<ClientCert>()
        .and_then(|c| c.0.clone());
    let node = state
        .service()
        .authenticate_node(cert.as_deref(), revoked)
        .await?;
    // authenticate_node refuses a request without a certificate.
    let cert = cert.ok_or(Denied::CertificateRequired)?;
    Ok(AuthedNode { node, cert })
}

/// The operator, authenticated by `Authorization: Bearer <DIR/operator.token>`.
#[derive(Debug)]
pub struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        state.service().authorize_operator(presented)?;
        Ok(Operator)
    }
}

/// What a path says, or 400 `invalid_path`.
pub fn path_value<T>(path: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    path.map(|Path(value)| value)
        .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
}

/// What a query string says, or 400 `invalid_query`.
pub fn query_value<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(value)| value)
        .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
}
