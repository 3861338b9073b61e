//! The HTTP surface: the node API under `/node_api/v1` and the operator API under `/api/v1`,
//! with JSON errors for every refusal, including unknown routes and methods.

pub mod extract;
pub mod networks;
pub mod node;
pub mod operator;
pub mod scripts;
pub mod tasks;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{delete, get, post, put};
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::ca::CertAuthority;
use crate::errors::ApiError;
use crate::events::EventRetention;
use crate::storage::Storage;
use crate::watch::WatchHub;

/// Largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    storage: Storage,
    ca: Arc<CertAuthority>,
    cert_lifetime: Duration,
    heartbeat_interval_s: u32,
    operator_token_hash: String,
    event_retention: EventRetention,
    task_output_max: usize,
    watches: Arc<WatchHub>,
    closing: CancellationToken,
}

/// What the operator may tune of how the controller keeps what nodes send it.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// How long and how many events are kept.
    pub event_retention: EventRetention,
    /// Bytes of a task's output stored; more is cut, with a marker.
    pub task_output_max: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            event_retention: EventRetention::default(),
            task_output_max: usize::try_from(tasks::DEFAULT_OUTPUT_MAX).unwrap_or(usize::MAX),
        }
    }
}

impl From<EventRetention> for Policy {
    fn from(event_retention: EventRetention) -> Self {
        Self {
            event_retention,
            ..Self::default()
        }
    }
}

impl AppState {
    /// State over `storage` and `ca`; node certificates live `cert_lifetime`; nodes are asked
    /// to send a heartbeat every `heartbeat_interval_s`; the operator bearer token is the one
    /// whose SHA-256 hex is `operator_token_hash`; what nodes send is kept as `policy` says.
    /// Held watches end when `closing` is cancelled.
    pub fn new(
        storage: Storage,
        ca: Arc<CertAuthority>,
        cert_lifetime: Duration,
        heartbeat_interval_s: u32,
        operator_token_hash: String,
        policy: Policy,
        closing: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                storage,
                ca,
                cert_lifetime,
                heartbeat_interval_s,
                operator_token_hash,
                event_retention: policy.event_retention,
                task_output_max: policy.task_output_max,
                watches: Arc::default(),
                closing,
            }),
        }
    }

    /// Bytes of a task's output stored.
    pub fn task_output_max(&self) -> usize {
        self.inner.task_output_max
    }

    /// The watched nodes' states.
    pub fn watches(&self) -> &Arc<WatchHub> {
        &self.inner.watches
    }

    /// Cancelled when the controller shuts down: held watches answer then.
    pub fn closing(&self) -> &CancellationToken {
        &self.inner.closing
    }

    /// The database.
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// The CA.
    pub fn ca(&self) -> &CertAuthority {
        &self.inner.ca
    }

    /// Lifetime of node certificates.
    pub fn cert_lifetime(&self) -> Duration {
        self.inner.cert_lifetime
    }

    /// Heartbeat interval handed to nodes.
    pub fn heartbeat_interval_s(&self) -> u32 {
        self.inner.heartbeat_interval_s
    }

    /// SHA-256 hex of the operator token.
    pub fn operator_token_hash(&self) -> &str {
        &self.inner.operator_token_hash
    }

    /// How long and how many events are kept.
    pub fn event_retention(&self) -> &EventRetention {
        &self.inner.event_retention
    }
}

/// Every route of the controller.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/node_api/v1/enroll", post(node::enroll))
        .route("/node_api/v1/certificates/rotate", post(node::rotate))
        .route("/node_api/v1/status/heartbeat", post(node::heartbeat))
        .route("/node_api/v1/events", post(node::events))
        .route("/node_api/v1/tasks/lease", post(tasks::lease))
        .route("/node_api/v1/tasks/{id}/renew", post(tasks::renew))
        .route("/node_api/v1/tasks/{id}/complete", post(tasks::complete))
        .route("/node_api/v1/watch", get(watch::watch))
        .route("/node_api/v1/scripts/{digest}", get(scripts::fetch))
        .route("/api/v1/scripts", post(scripts::add).get(scripts::list))
        .route("/api/v1/scripts/{digest}", get(scripts::show))
        .route("/api/v1/tasks", post(tasks::create).get(tasks::list))
        .route("/api/v1/tasks/{id}", get(tasks::show))
        .route("/api/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/api/v1/events", get(operator::list_events))
        .route("/api/v1/nodes", get(operator::list_nodes))
        .route("/api/v1/nodes/{id}", get(operator::show_node))
        .route("/api/v1/nodes/{id}/revoke", post(operator::revoke_node))
        .route(
            "/api/v1/nodes/{id}/desired/modules",
            put(operator::set_modules),
        )
        .route(
            "/api/v1/nodes/{id}/desired/network",
            put(operator::set_network),
        )
        .route("/api/v1/tokens", post(operator::create_token))
        .route(
            "/api/v1/networks",
            post(networks::create).get(networks::list),
        )
        .route(
            "/api/v1/networks/{name}",
            get(networks::show).delete(networks::delete),
        )
        .route("/api/v1/networks/{name}/join", post(networks::join))
        .route("/api/v1/networks/{name}/leave", post(networks::leave))
        .route(
            "/api/v1/forwards",
            post(networks::add_forward).get(networks::list_forwards),
        )
        .route(
            "/api/v1/forwards/{node}/{proto}/{port}",
            delete(networks::remove_forward),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
