//! The HTTP surface: the node API under `/node_api/v1` and the operator API under `/api/v1`,
//! with JSON errors for every refusal, including unknown routes and methods. Handlers only
//! parse, call [`crate::service`] and serialize.
//!
//! [`routes`] is the one list of routes: the router and the OpenAPI document
//! (`GET /api/v1/openapi.json`, `powernode-controller openapi`) are both built from it, each
//! route from its handler's `#[utoipa::path]`, so the two cannot name different routes.

pub mod extract;
pub mod networks;
pub mod node;
pub mod operator;
pub mod scripts;
pub mod tasks;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::ca::CertAuthority;
use crate::errors::ApiError;
use crate::events::EventRetention;
use crate::service::{Service, Settings};
use crate::storage::Storage;
use crate::watch::WatchHub;

/// Largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

/// What every handler shares: the service.
#[derive(Clone, Debug)]
pub struct AppState {
    service: Service,
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
            task_output_max: usize::try_from(crate::service::tasks::DEFAULT_OUTPUT_MAX)
                .unwrap_or(usize::MAX),
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
        let settings = Settings {
            cert_lifetime,
            heartbeat_interval_s,
            event_retention: policy.event_retention,
            task_output_max: policy.task_output_max,
        };
        Self {
            service: Service::new(storage, ca, settings, operator_token_hash, closing),
        }
    }

    /// The rules.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// The watched nodes' states (the server runs their scanner).
    pub fn watches(&self) -> &Arc<WatchHub> {
        self.service.watches()
    }
}

/// The document's frame: title, version, tags and how callers authenticate. The paths and
/// schemas come from [`routes`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "powernode controller",
        description = "The node API (`/node_api/v1`, mutual TLS with the node's certificate; \
                       enroll with a bootstrap token) and the operator API (`/api/v1`, bearer \
                       token). Every error is `{\"error\": {\"code\", \"message\"}}`; \
                       docs/api.md lists the codes.",
    ),
    modifiers(&Security),
    tags(
        (name = "node", description = "Called by the node's agents with the node's certificate."),
        (name = "operator", description = "Called by the operator (and the CLI) with the bearer token."),
    )
)]
struct ApiDoc;

/// The two ways to call the controller, as OpenAPI security schemes.
struct Security;

/// Name of the operator's bearer-token scheme in the document.
pub const OPERATOR_SECURITY: &str = "operator_token";
/// Name of the node's client-certificate scheme in the document.
pub const NODE_SECURITY: &str = "node_certificate";

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            OPERATOR_SECURITY,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The operator token: DATA/operator.token, made at the first `serve`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            NODE_SECURITY,
            SecurityScheme::MutualTls {
                description: Some(
                    "The node's certificate, issued by this controller's CA at enrollment."
                        .to_owned(),
                ),
                deprecated: None,
                extensions: None,
            },
        );
    }
}

/// Every route of the controller, each with its handler's OpenAPI operation: the one list the
/// router and the document are made from. Handlers of one path share one `routes!`.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(node::enroll))
        .routes(routes!(node::rotate))
        .routes(routes!(node::heartbeat))
        .routes(routes!(node::events))
        .routes(routes!(tasks::lease))
        .routes(routes!(tasks::renew))
        .routes(routes!(tasks::complete))
        .routes(routes!(watch::watch))
        .routes(routes!(scripts::fetch))
        .routes(routes!(scripts::add, scripts::list))
        .routes(routes!(scripts::show))
        .routes(routes!(tasks::create, tasks::list))
        .routes(routes!(tasks::show))
        .routes(routes!(tasks::cancel))
        .routes(routes!(operator::list_events))
        .routes(routes!(operator::list_nodes))
        .routes(routes!(operator::show_node))
        .routes(routes!(operator::revoke_node))
        .routes(routes!(operator::set_modules))
        .routes(routes!(operator::set_network))
        .routes(routes!(operator::create_token))
        .routes(routes!(networks::create, networks::list))
        .routes(routes!(networks::show, networks::delete))
        .routes(routes!(networks::join))
        .routes(routes!(networks::leave))
        .routes(routes!(networks::add_forward, networks::list_forwards))
        .routes(routes!(networks::remove_forward))
        .routes(routes!(operator::openapi_json))
}

/// The OpenAPI document of every route (what `GET /api/v1/openapi.json` answers).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

/// Every route of the controller ([`routes`]), and JSON answers for unknown routes and
/// methods.
pub fn router(state: AppState) -> Router {
    let (router, _) = routes().split_for_parts();
    router
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
