//! Bodies of the operator API (`/api/v1`); the node API's bodies are the shared contract in
//! `powernode_types::node_api`, re-exported here.

use serde::{Deserialize, Serialize};

pub use powernode_types::node_api::*;

use crate::storage::StoredEvent;

/// Operator: `POST /api/v1/tokens`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CreateTokenResponse {
    /// The bootstrap token.
    pub token: String,
    /// Expiry, milliseconds since the epoch.
    pub expires_at_ms: i64,
}

/// Operator: `PUT /api/v1/nodes/{id}/desired/modules`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetModulesRequest {
    /// The full list of modules the node should run.
    pub modules: Vec<DesiredModule>,
}

/// Operator: `PUT /api/v1/nodes/{id}/desired/network`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetNetworkRequest {
    /// The network, or `null` to remove it.
    pub network: Option<DesiredNetwork>,
}

/// Operator: reply to a desired-state change.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct GenerationResponse {
    /// The generation the change created.
    pub generation: u64,
}

/// Operator: the query of `GET /api/v1/events`, every parameter optional.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
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
}

/// Operator: reply to `GET /api/v1/events`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct EventsPage {
    /// The events, oldest first (in the order the controller received them).
    pub events: Vec<StoredEvent>,
    /// What to pass as `after` for the next page: the last event's cursor, or the `after`
    /// asked with (0 when none) when the page is empty.
    pub next: i64,
}

/// Operator: `POST /api/v1/tasks`.
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
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

/// Operator: `POST /api/v1/scripts`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AddScriptRequest {
    /// The script's text (at most `api::scripts::MAX_SCRIPT` bytes of UTF-8).
    pub script: String,
}

/// Operator: `POST /api/v1/networks`.
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveNetworkRequest {
    /// The node.
    pub node: String,
}

/// Operator: `POST /api/v1/forwards`.
#[derive(Clone, Debug, Deserialize, Serialize)]
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
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardsParams {
    /// Only this node's forwards.
    pub node: Option<String>,
}

/// A node whose desired state a network change re-derived, and its new generation.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
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
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct JoinResponse {
    /// The membership.
    #[serde(flatten)]
    pub member: crate::storage::Member,
    /// The nodes whose desired network changed (the joining node and its new peers).
    pub updated: Vec<NodeGeneration>,
}

/// Operator: reply to a leave.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LeaveResponse {
    /// What the leave did.
    #[serde(flatten)]
    pub left: crate::storage::Left,
    /// The nodes whose desired network changed.
    pub updated: Vec<NodeGeneration>,
}

/// Operator: reply to adding or removing a forward.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ForwardResponse {
    /// The forward added or removed.
    #[serde(flatten)]
    pub forward: crate::networks::Forward,
    /// The nodes whose desired network changed (none when the forward was there already).
    pub updated: Vec<NodeGeneration>,
}
