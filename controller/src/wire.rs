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

use crate::networks::{EndpointSource, Forward, ReportedNetwork};
use crate::storage;

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

/// Operator: a node as enrolled.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct Node {
    /// Node id (certificate CN).
    pub id: String,
    /// Identity uuid.
    pub uuid: String,
    /// Host name at enrollment.
    pub hostname: String,
    /// Architecture at enrollment.
    pub arch: String,
    /// Enrollment time (first), ms since the epoch.
    pub enrolled_at_ms: i64,
    /// Revocation time, ms since the epoch, if revoked.
    pub revoked_at_ms: Option<i64>,
}

/// Operator: a row of `GET /api/v1/nodes`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct NodeSummary {
    /// Node id.
    pub id: String,
    /// Identity uuid.
    pub uuid: String,
    /// Host name.
    pub hostname: String,
    /// Architecture.
    pub arch: String,
    /// Enrollment time, ms.
    pub enrolled_at_ms: i64,
    /// Revocation time, ms.
    pub revoked_at_ms: Option<i64>,
    /// Time of the latest heartbeat, ms.
    pub last_heartbeat_ms: Option<i64>,
    /// Latest expiry among the node's certificates, ms.
    pub cert_not_after_ms: Option<i64>,
    /// Desired-state generation.
    pub generation: Option<i64>,
}

/// Operator: a certificate issued to a node.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct CertRecord {
    /// Serial, hex.
    pub serial: String,
    /// Owner.
    pub node_id: String,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    /// Validity start, ms.
    pub not_before_ms: i64,
    /// Validity end, ms.
    pub not_after_ms: i64,
    /// Issue time, ms.
    pub issued_at_ms: i64,
}

/// Operator: a node's latest heartbeat.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct HeartbeatRecord {
    /// Receipt time, ms.
    pub received_at_ms: i64,
    /// Boot id.
    pub boot_id: String,
    /// Agent version.
    pub agent_version: String,
    /// Applied generation reported.
    pub applied_generation: Option<i64>,
    /// The whole body as the node sent it.
    pub body: serde_json::Value,
}

/// Operator: the node's enrollment and rotation as its heartbeats last reported them.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct NodeEnrollment {
    /// What the node said.
    #[serde(flatten)]
    pub report: EnrollmentReport,
    /// When the stored report last changed, ms.
    pub changed_at_ms: i64,
}

/// Operator: `GET /api/v1/nodes/{id}`, everything `node show` prints.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct NodeDetail {
    /// The node.
    #[serde(flatten)]
    pub node: Node,
    /// Its enrollment and rotation as last reported (`null` before a heartbeat carried it).
    pub enrollment: Option<NodeEnrollment>,
    /// Its latest heartbeat.
    pub last_heartbeat: Option<HeartbeatRecord>,
    /// Its certificates, newest first.
    pub certificates: Vec<CertRecord>,
    /// Its desired state.
    pub desired: DesiredState,
    /// Its last events, oldest first.
    pub last_events: Vec<StoredEvent>,
}

/// Operator: an event as stored: what the node sent, who sent it, when it arrived.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct StoredEvent {
    /// Position in arrival order; what `after` pages by.
    pub cursor: i64,
    /// The node that sent it (from its client certificate).
    pub node_id: String,
    /// The event's id (unique per node).
    pub id: String,
    /// The agent that raised it.
    pub agent: String,
    /// The agent's sequence number of it.
    pub seq: i64,
    /// How bad it is.
    pub severity: powernode_types::Severity,
    /// Machine-readable kind.
    pub kind: String,
    /// Human-readable message.
    pub message: String,
    /// When it was raised, by the node's clock, ms.
    pub at_ms: i64,
    /// When the controller received it, by its clock, ms.
    pub received_ms: i64,
    /// Structured context, in order: `[key, value]` pairs.
    pub fields: Vec<(String, String)>,
    /// Events the agent dropped just before this one.
    pub dropped_before: i64,
}

/// Operator: a task.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct Task {
    /// `task-` and 16 hex digits.
    pub id: String,
    /// The node that runs it.
    pub node_id: String,
    /// What to do.
    pub kind: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// `queued`, `leased`, `succeeded`, `failed`, `interrupted` or `cancelled`.
    pub state: String,
    /// Leases given so far.
    pub attempts: u32,
    /// Leases it may get; an expiry past the last fails it.
    pub max_attempts: u32,
    /// How long one lease lasts from a lease or renew, seconds.
    pub timeout_s: u32,
    /// When the operator created it, ms.
    pub created_at_ms: i64,
    /// When it last changed, ms.
    pub updated_at_ms: i64,
    /// When the current lease runs out, ms; only while leased.
    pub lease_expires_at_ms: Option<i64>,
    /// When it reached a final state, ms.
    pub finished_at_ms: Option<i64>,
    /// The controller's reason for a final state it set (expiry, cancel).
    pub reason: Option<String>,
    /// The node's outcome, as it reported it.
    pub outcome: Option<String>,
    /// The node's output (left out of lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The output was longer than the cap and is stored cut.
    pub output_truncated: bool,
    /// The node's completion came after its lease had run out.
    pub late: bool,
}

/// Operator: a stored NodeScript.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct Script {
    /// `sha256:` and the lowercase hex SHA-256 of the text.
    pub digest: String,
    /// Bytes of the text.
    pub size: u64,
    /// When it was first stored, ms.
    pub created_at_ms: i64,
    /// The text (left out of lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
}

/// Operator: a network as listed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct Network {
    /// Its name.
    pub name: String,
    /// Its IPv4 CIDR.
    pub cidr: String,
    /// The UDP port its members listen on.
    pub listen_port: u16,
    /// When it was created, ms.
    pub created_at_ms: i64,
    /// Its members now.
    pub member_count: u64,
}

/// Operator: a node's membership.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct Member {
    /// The network.
    pub network: String,
    /// The node.
    pub node_id: String,
    /// Its overlay address, `a.b.c.d`.
    pub address: String,
    /// Routes it announces.
    pub announce: Vec<String>,
    /// The operator's endpoint for it.
    pub endpoint: Option<String>,
    /// When it joined, ms.
    pub joined_at_ms: i64,
}

/// Operator: a member as `network show` has it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct MemberDetail {
    /// The membership.
    #[serde(flatten)]
    pub member: Member,
    /// The node's host name.
    pub hostname: String,
    /// The node is revoked (and no one's peer).
    pub revoked: bool,
    /// The public key it reported.
    pub public_key: Option<String>,
    /// The endpoint the other members are given for it.
    pub endpoint_used: Option<String>,
    /// Where that endpoint came from.
    pub endpoint_source: Option<EndpointSource>,
    /// The endpoints it reported.
    pub reported_endpoints: Vec<String>,
    /// The address its last heartbeat came from.
    pub seen_ip: Option<String>,
    /// Its desired-state generation.
    pub generation: u64,
    /// When its last heartbeat came, ms.
    pub last_heartbeat_ms: Option<i64>,
    /// Its network as its last heartbeat reported it (peers named by node where known).
    pub reported: Option<ReportedNetwork>,
    /// Its port forwards.
    pub forwards: Vec<Forward>,
}

/// Operator: `GET /api/v1/networks/{name}`, everything `network show` prints.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct NetworkDetail {
    /// The network.
    #[serde(flatten)]
    pub network: Network,
    /// Its members, by address.
    pub members: Vec<MemberDetail>,
}

/// Operator: what a leave did.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, ToSchema)]
pub struct Left {
    /// The network left.
    pub network: String,
    /// The node.
    pub node_id: String,
    /// The address it had, free again.
    pub address: String,
    /// Its port forwards, removed with it.
    pub forwards_removed: u64,
}

// The storage rows as the API shows them: field for field, so that the API's contract is
// stated here and a change of a row is a change of one conversion.

impl From<storage::Node> for Node {
    fn from(n: storage::Node) -> Self {
        Node {
            id: n.id,
            uuid: n.uuid,
            hostname: n.hostname,
            arch: n.arch,
            enrolled_at_ms: n.enrolled_at_ms,
            revoked_at_ms: n.revoked_at_ms,
        }
    }
}

impl From<storage::NodeSummary> for NodeSummary {
    fn from(n: storage::NodeSummary) -> Self {
        NodeSummary {
            id: n.id,
            uuid: n.uuid,
            hostname: n.hostname,
            arch: n.arch,
            enrolled_at_ms: n.enrolled_at_ms,
            revoked_at_ms: n.revoked_at_ms,
            last_heartbeat_ms: n.last_heartbeat_ms,
            cert_not_after_ms: n.cert_not_after_ms,
            generation: n.generation,
        }
    }
}

impl From<storage::CertRecord> for CertRecord {
    fn from(c: storage::CertRecord) -> Self {
        CertRecord {
            serial: c.serial,
            node_id: c.node_id,
            fingerprint: c.fingerprint,
            not_before_ms: c.not_before_ms,
            not_after_ms: c.not_after_ms,
            issued_at_ms: c.issued_at_ms,
        }
    }
}

impl From<storage::HeartbeatRecord> for HeartbeatRecord {
    fn from(h: storage::HeartbeatRecord) -> Self {
        HeartbeatRecord {
            received_at_ms: h.received_at_ms,
            boot_id: h.boot_id,
            agent_version: h.agent_version,
            applied_generation: h.applied_generation,
            body: h.body,
        }
    }
}

impl From<storage::NodeEnrollment> for NodeEnrollment {
    fn from(e: storage::NodeEnrollment) -> Self {
        NodeEnrollment {
            report: e.report,
            changed_at_ms: e.changed_at_ms,
        }
    }
}

impl From<storage::NodeDetail> for NodeDetail {
    fn from(d: storage::NodeDetail) -> Self {
        NodeDetail {
            node: d.node.into(),
            enrollment: d.enrollment.map(Into::into),
            last_heartbeat: d.last_heartbeat.map(Into::into),
            certificates: d.certificates.into_iter().map(Into::into).collect(),
            desired: d.desired,
            last_events: d.last_events.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<storage::StoredEvent> for StoredEvent {
    fn from(e: storage::StoredEvent) -> Self {
        StoredEvent {
            cursor: e.cursor,
            node_id: e.node_id,
            id: e.id,
            agent: e.agent,
            seq: e.seq,
            severity: e.severity,
            kind: e.kind,
            message: e.message,
            at_ms: e.at_ms,
            received_ms: e.received_ms,
            fields: e.fields,
            dropped_before: e.dropped_before,
        }
    }
}

impl From<storage::Task> for Task {
    fn from(t: storage::Task) -> Self {
        Task {
            id: t.id,
            node_id: t.node_id,
            kind: t.kind,
            args: t.args,
            state: t.state,
            attempts: t.attempts,
            max_attempts: t.max_attempts,
            timeout_s: t.timeout_s,
            created_at_ms: t.created_at_ms,
            updated_at_ms: t.updated_at_ms,
            lease_expires_at_ms: t.lease_expires_at_ms,
            finished_at_ms: t.finished_at_ms,
            reason: t.reason,
            outcome: t.outcome,
            output: t.output,
            output_truncated: t.output_truncated,
            late: t.late,
        }
    }
}

impl From<storage::Script> for Script {
    fn from(s: storage::Script) -> Self {
        Script {
            digest: s.digest,
            size: s.size,
            created_at_ms: s.created_at_ms,
            script: s.script,
        }
    }
}

impl From<storage::Network> for Network {
    fn from(n: storage::Network) -> Self {
        Network {
            name: n.name,
            cidr: n.cidr,
            listen_port: n.listen_port,
            created_at_ms: n.created_at_ms,
            member_count: n.member_count,
        }
    }
}

impl From<storage::Member> for Member {
    fn from(m: storage::Member) -> Self {
        Member {
            network: m.network,
            node_id: m.node_id,
            address: m.address,
            announce: m.announce,
            endpoint: m.endpoint,
            joined_at_ms: m.joined_at_ms,
        }
    }
}

impl From<storage::MemberDetail> for MemberDetail {
    fn from(m: storage::MemberDetail) -> Self {
        MemberDetail {
            member: m.member.into(),
            hostname: m.hostname,
            revoked: m.revoked,
            public_key: m.public_key,
            endpoint_used: m.endpoint_used,
            endpoint_source: m.endpoint_source,
            reported_endpoints: m.reported_endpoints,
            seen_ip: m.seen_ip,
            generation: m.generation,
            last_heartbeat_ms: m.last_heartbeat_ms,
            reported: m.reported,
            forwards: m.forwards,
        }
    }
}

impl From<storage::NetworkDetail> for NetworkDetail {
    fn from(d: storage::NetworkDetail) -> Self {
        NetworkDetail {
            network: d.network.into(),
            members: d.members.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<storage::Left> for Left {
    fn from(l: storage::Left) -> Self {
        Left {
            network: l.network,
            node_id: l.node_id,
            address: l.address,
            forwards_removed: l.forwards_removed,
        }
    }
}
