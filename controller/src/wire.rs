//! Bodies of the operator API (`/api/v1`); the node API's bodies are the shared contract in
//! `powernode_types::node_api`, re-exported here.
//!
//! What the operator API answers is defined here, apart from the rows of [`crate::storage`]:
//! the API's contract does not change when a backend's columns do, and the CLI, which reads
//! these bodies back, never sees a storage type. Every type derives its OpenAPI schema
//! (`utoipa::ToSchema`), so the document the controller serves is generated from them.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub use powernode_types::node_api::*;

use crate::networks::Forward;

/// Operator: `POST /api/v1/tokens`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Lifetime in seconds (default one hour).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// Bind the token to the node with this identity uuid.
    #[serde(default)]
    pub node_uuid: Option<String>,
}

/// Reply to token creation: the only time the token is shown.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct CreateTokenResponse {
    /// The bootstrap token.
    pub token: String,
    /// Expiry, milliseconds since the epoch.
    pub expires_at_ms: i64,
}

/// Operator: `PUT /api/v1/nodes/{id}/desired/modules`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetModulesRequest {
    /// The full list of modules the node should run.
    pub modules: Vec<DesiredModule>,
}

/// Operator: `PUT /api/v1/nodes/{id}/desired/network`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetNetworkRequest {
    /// The network, or `null` to remove it.
    pub network: Option<DesiredNetwork>,
}

/// Operator: reply to a desired-state change.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct GenerationResponse {
    /// The generation the change created.
    pub generation: u64,
}

/// Operator: the query of `GET /api/v1/events`, every parameter optional.
#[derive(Clone, Debug, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsParams {
    /// Only this node's events.
    pub node: Option<String>,
    /// Only events at least this severe (`Info` < `Warning` < `Error` < `Critical`, any case).
    pub severity: Option<String>,
    /// Only events of exactly this kind.
    pub kind: Option<String>,
    /// Only events raised at or after this (node clock): ms since the epoch or RFC 3339.
    pub since: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Only events after this cursor (a previous page's `next`).
    pub after: Option<i64>,
    /// Take the newest `limit` matching events instead of the oldest (the page is still
    /// oldest first): what `events` prints before it follows.
    pub newest: Option<bool>,
}

/// Operator: reply to `GET /api/v1/events`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct EventsPage {
    /// The events, oldest first (in the order the controller received them).
    pub events: Vec<StoredEvent>,
    /// What to pass as `after` for the next page: the last event's cursor, or the `after`
    /// asked with (0 when none) when the page is empty.
    pub next: i64,
}

/// Operator: `POST /api/v1/tasks`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTaskRequest {
    /// The node that is to run it.
    pub node: String,
    /// What to do: dotted lower-case words, e.g. `node.exec`.
    pub kind: String,
    /// Its arguments (any JSON; `{}` when left out), at most `task_limits::MAX_ARGS` bytes.
    #[serde(default = "empty_args")]
    pub args: serde_json::Value,
    /// How long one attempt may run before its lease expires, seconds (default 300).
    #[serde(default)]
    pub timeout_s: Option<u32>,
    /// How many leases the task gets before an expired one fails it (default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
}

fn empty_args() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// Operator: the query of `GET /api/v1/tasks`, every parameter optional.
#[derive(Clone, Debug, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TasksParams {
    /// Only this node's tasks.
    pub node: Option<String>,
    /// Only tasks in this state (`queued`, `leased`, `succeeded`, `failed`, `interrupted`,
    /// `cancelled`).
    pub state: Option<String>,
    /// At most this many, the newest (default 100, at most 1000).
    pub limit: Option<u32>,
}

/// Node: the query of `GET /node_api/v1/watch`.
#[derive(Clone, Debug, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    /// The desired-state generation the node has.
    pub generation: u64,
    /// How long to hold the request, seconds (default `task_limits::DEFAULT_WATCH_S`, at most
    /// `task_limits::MAX_WATCH_S`).
    pub timeout_s: Option<u32>,
}

/// Operator: `POST /api/v1/scripts`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddScriptRequest {
    /// The script's text (at most `service::scripts::MAX_SCRIPT` bytes of UTF-8).
    pub script: String,
}

/// Operator: `POST /api/v1/networks`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetworkRequest {
    /// Its name: 1 to 32 of `a-z 0-9 -`.
    pub name: String,
    /// Its IPv4 CIDR, prefix 8 to 30, e.g. `10.88.0.0/16`.
    pub cidr: String,
    /// The UDP port its members listen on (default 51820).
    #[serde(default)]
    pub port: Option<u32>,
}

/// Operator: `POST /api/v1/networks/{name}/join`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinNetworkRequest {
    /// The node.
    pub node: String,
    /// Routes (IPv4 CIDRs) the node announces: the others route them to it.
    #[serde(default)]
    pub announce: Vec<String>,
    /// `HOST:PORT` the other members dial it at, instead of what it reports.
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// Operator: `POST /api/v1/networks/{name}/leave`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaveNetworkRequest {
    /// The node.
    pub node: String,
}

/// Operator: `POST /api/v1/forwards`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddForwardRequest {
    /// The node whose port is forwarded (a member of a network).
    pub node: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// The node's port, 1 to 65535, not its network's listen port.
    pub port: u32,
    /// Where connections go, `a.b.c.d:port`.
    pub to: String,
}

/// Operator: the query of `GET /api/v1/forwards`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ForwardsParams {
    /// Only this node's forwards.
    pub node: Option<String>,
}

/// A node whose desired state a network change re-derived, and its new generation.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct NodeGeneration {
    /// The node.
    pub node_id: String,
    /// Its desired-state generation now.
    pub generation: u64,
}

impl NodeGeneration {
    /// The list of a storage answer.
    pub fn list(bumped: crate::storage::Bumped) -> Vec<NodeGeneration> {
        bumped
            .into_iter()
            .map(|(node_id, generation)| NodeGeneration {
                node_id,
                generation,
            })
            .collect()
    }
}

/// Operator: reply to a join: the membership and the nodes whose desired state changed.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct JoinResponse {
    /// The membership.
    #[serde(flatten)]
    pub member: Member,
    /// The nodes whose desired network changed (the joining node and its new peers).
    pub updated: Vec<NodeGeneration>,
}

/// Operator: reply to a leave.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct LeaveResponse {
    /// What the leave did.
    #[serde(flatten)]
    pub left: Left,
    /// The nodes whose desired network changed.
    pub updated: Vec<NodeGeneration>,
}

/// Operator: reply to adding or removing a forward.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct ForwardResponse {
    /// The forward added or removed.
    #[serde(flatten)]
    pub forward: Forward,
    /// The nodes whose desired network changed (none when the forward was there already).
    pub updated: Vec<NodeGeneration>,
}

/// Every error answer: `{"error": {"code", "message"}}` with the HTTP status (docs/api.md
/// lists the codes).
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `invalid_request`, `not_found`, `node_revoked`, …
    pub code: String,
    /// For a person: what was refused and why.
    pub message: String,
}

/// Operator: reply to `POST /api/v1/nodes/{id}/revoke`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct RevokeResponse {
    /// The node revoked.
    pub revoked: String,
}

/// Operator: reply to `DELETE /api/v1/networks/{name}`.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
pub struct DeleteNetworkResponse {
    /// The network deleted.
    pub deleted: String,
}

/// The storage rows the operator API answers with, as they are: one definition of each, whose
/// derives give the API its JSON and its OpenAPI schema.
pub use crate::storage::{
    CertRecord, HeartbeatRecord, Left, Member, MemberDetail, Network, NetworkDetail, Node,
    NodeDetail, NodeEnrollment, NodeSummary, Script, StoredEvent, Task,
};
