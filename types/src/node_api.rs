//! The JSON bodies of the controller's node API (DESIGN §5, `/node_api/v1`): the wire contract
//! between the node's agents and the controller, so both sides use these same types.
//! Unknown fields are accepted (older or newer agents); the types of known fields are enforced.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Who the node says it is at enrollment.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Identity {
    /// Stable identity uuid (from identitymgr); the key a node is found by on re-enrollment.
    pub uuid: String,
    /// Host name.
    pub hostname: String,
    /// CPU architecture, e.g. `x86_64`.
    pub arch: String,
    /// Kernel boot id.
    pub boot_id: String,
}

/// `POST /node_api/v1/enroll`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollRequest {
    /// The bootstrap token the operator created.
    pub bootstrap_token: String,
    /// CSR for the node's key (Ed25519 expected), PEM.
    pub csr_pem: String,
    /// The node's identity.
    pub identity: Identity,
    /// Version of the node agent.
    pub agent_version: String,
}

/// Reply to enroll.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    /// The node's id: the CN of its certificate.
    pub node_id: String,
    /// The node certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate(s) to pin, PEM.
    pub ca_chain_pem: String,
    /// End of validity of the certificate, milliseconds since the epoch.
    pub not_after_ms: i64,
}

/// `POST /node_api/v1/certificates/rotate`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RotateRequest {
    /// CSR for the node's new key, PEM.
    pub csr_pem: String,
}

/// Reply to rotate.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RotateResponse {
    /// The new certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate(s), PEM.
    pub ca_chain_pem: String,
    /// End of validity, milliseconds since the epoch.
    pub not_after_ms: i64,
}

/// Memory figures of a heartbeat.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Memory {
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Available memory in bytes.
    pub available_bytes: u64,
}

/// One module as the node reports it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModuleReport {
    /// Module name.
    pub name: String,
    /// Digest of what the node has, once known.
    #[serde(default)]
    pub digest: Option<String>,
    /// Pipeline state, free text (e.g. `Active`).
    #[serde(default)]
    pub state: Option<String>,
    /// The reference the module was assigned as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Download progress: bytes done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    /// Download progress: bytes in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
}

/// `POST /node_api/v1/status/heartbeat`. Only `boot_id` and `agent_version` are required.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatRequest {
    /// Kernel boot id.
    pub boot_id: String,
    /// Version of the node agent.
    pub agent_version: String,
    /// CPU architecture.
    #[serde(default)]
    pub arch: Option<String>,
    /// Seconds since boot.
    #[serde(default)]
    pub uptime_s: Option<u64>,
    /// Load averages over 1, 5 and 15 minutes.
    #[serde(default)]
    pub load: Option<[f64; 3]>,
    /// Memory figures.
    #[serde(default)]
    pub memory: Option<Memory>,
    /// Modules and their digests.
    #[serde(default)]
    pub modules: Vec<ModuleReport>,
    /// Mount state, an object the controller stores as is.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub mounts: Option<Map<String, Value>>,
    /// Network state, an object the controller stores as is.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub network: Option<Map<String, Value>>,
    /// The desired-state generation the node has applied.
    #[serde(default)]
    pub applied_generation: Option<u64>,
    /// The node's enrollment and certificate rotation, as enrollmgr last said (absent from
    /// agents older than this field, and while enrollmgr has said nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<EnrollmentReport>,
}

/// Where the node's enrollment and certificate rotation stand: what `node show` prints as
/// "certificate: expires …, rotation failing since … (N attempts): error".
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollmentReport {
    /// enrollmgr's state, as its name (`Enrolled`, `RotationFailing`, …): text, so that a
    /// state added later does not make an older controller refuse the heartbeat.
    pub state: String,
    /// SHA-256 of the certificate the node holds, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_fingerprint: Option<String>,
    /// End of the certificate's validity, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<u64>,
    /// When the node rotates (or began to), ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_at_ms: Option<u64>,
    /// Since when rotation has been failing, ms since the epoch; absent while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_failing_since_ms: Option<u64>,
    /// Failed rotation attempts since then.
    #[serde(default)]
    pub rotation_attempts: u32,
    /// The last enrollment or rotation error, at most [`EnrollmentReport::MAX_ERROR`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl EnrollmentReport {
    /// The longest `last_error` a node sends (and a controller stores): longer ones are cut
    /// at a character boundary.
    pub const MAX_ERROR: usize = 1024;
    /// The longest `state` or `cert_fingerprint` a controller stores.
    pub const MAX_FIELD: usize = 128;

    /// What enrollmgr's `status` says, in the heartbeat's words.
    pub fn from_status(status: &crate::EnrollmentStatus) -> EnrollmentReport {
        EnrollmentReport {
            state: format!("{:?}", status.state),
            cert_fingerprint: status.cert_fingerprint.clone(),
            not_after_ms: status.not_after_ms,
            rotate_at_ms: status.rotate_at_ms,
            rotation_failing_since_ms: status.rotation_failing_since_ms,
            rotation_attempts: status.rotation_attempts,
            last_error: status.last_error.clone(),
        }
        .bounded()
    }

    /// The same report with every text cut to its limit, so that a long error never makes a
    /// heartbeat (or a stored row) unbounded.
    pub fn bounded(mut self) -> EnrollmentReport {
        cut(&mut self.state, Self::MAX_FIELD);
        if let Some(f) = &mut self.cert_fingerprint {
            cut(f, Self::MAX_FIELD);
        }
        if let Some(e) = &mut self.last_error {
            cut(e, Self::MAX_ERROR);
        }
        self
    }
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// A module the controller wants on a node (mirrors `powernode_types::ModuleConfig` without
/// its generation, which travels once for the whole desired state).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DesiredModule {
    /// Module name, unique within the list.
    pub name: String,
    /// OCI reference.
    pub reference: String,
    /// Position in the overlay stack: higher is stacked above lower.
    #[serde(default)]
    pub priority: u32,
}

/// One WireGuard peer of the desired network.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WgPeer {
    /// Public key, base64.
    pub public_key: String,
    /// `host:port`, if the peer can be dialled.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Networks routed to the peer, CIDR.
    pub allowed_ips: Vec<String>,
    /// Persistent keepalive in seconds.
    #[serde(default)]
    pub keepalive_s: Option<u16>,
}

/// The overlay network the controller wants on a node (mirrors `powernode_types::NetworkConfig`
/// without its generation).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DesiredNetwork {
    /// Interface name, e.g. `pn0`.
    pub interface: String,
    /// The node's overlay address, CIDR.
    pub address: String,
    /// UDP listen port.
    pub listen_port: u16,
    /// Peers.
    pub peers: Vec<WgPeer>,
    /// The network's name.
    #[serde(default)]
    pub network: String,
    /// Port forwards on this node.
    #[serde(default)]
    pub forwards: Vec<PortForward>,
}

/// One port forward of a node (mirrors `powernode_types::PortForward`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// `tcp` or `udp`.
    pub proto: String,
    /// The node's port.
    pub port: u16,
    /// Where connections go, `address:port`.
    pub to: String,
}

/// The desired state of a node: what a heartbeat reply carries.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredState {
    /// Bumped by every change; the node reports the one it applied.
    pub generation: u64,
    /// Modules, in no particular order.
    pub modules: Vec<DesiredModule>,
    /// Network, or `null` for none.
    pub network: Option<DesiredNetwork>,
}

/// Reply to a heartbeat.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    /// The controller's clock, milliseconds since the epoch.
    pub server_time_ms: i64,
    /// When to send the next heartbeat.
    pub next_interval_s: u32,
    /// What the node should run.
    pub desired: DesiredState,
    /// Tasks queued for the node when the reply was made: a node leases after a heartbeat
    /// only when this is above 0 (most heartbeats find nothing, and a lease is a call).
    /// Absent from a controller that does not count them: lease anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_queued: Option<u32>,
}

/// One event as it travels to the controller (`POST /events`): the node's [`crate::Event`]
/// and what its journal knows of it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventRecord {
    /// Globally unique id: the controller accepts a repeated id once.
    pub id: String,
    /// The agent that raised it.
    pub agent: String,
    /// The agent's sequence number of it.
    pub seq: u64,
    /// How bad it is.
    pub severity: crate::Severity,
    /// Machine-readable kind, dotted lower-case words: `cert.rotation_failing`.
    pub kind: String,
    /// Human-readable message.
    pub message: String,
    /// When it was raised on the node, milliseconds since the epoch.
    pub at_ms: u64,
    /// Structured context as key/value pairs, in order.
    #[serde(default)]
    pub fields: Vec<(String, String)>,
    /// Events of the same agent dropped (over a buffer's bound) since the one before this.
    #[serde(default)]
    pub dropped_before: u64,
}

/// The bounds of `POST /events`: the controller refuses a batch past any of them, so agents
/// cut what they raise to fit (one overlong event would otherwise hold up every event behind
/// it).
pub mod event_limits {
    /// Most events in one `POST /events` batch.
    pub const MAX_BATCH: usize = 1000;
    /// Largest `POST /events` body, bytes.
    pub const MAX_BODY: usize = 1024 * 1024;
    /// Longest event id, bytes (ids are `[A-Za-z0-9._:@+-]`, at least one).
    pub const MAX_ID: usize = 128;
    /// Longest agent name, bytes (`[A-Za-z0-9_-]`, at least one).
    pub const MAX_AGENT: usize = 64;
    /// Longest kind, bytes (dotted lower-case words `[a-z][a-z0-9_]*`).
    pub const MAX_KIND: usize = 128;
    /// Longest message, bytes.
    pub const MAX_MESSAGE: usize = 4096;
    /// Most fields of one event.
    pub const MAX_FIELDS: usize = 32;
    /// Longest field key, bytes (at least one).
    pub const MAX_FIELD_KEY: usize = 64;
    /// Longest field value, bytes.
    pub const MAX_FIELD_VALUE: usize = 1024;
}

/// `POST /events`: a batch, oldest first.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    /// The events.
    pub events: Vec<EventRecord>,
}

/// Reply to `POST /events`: every event of the batch is stored (`accepted` new ones,
/// `duplicates` already held).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventsResponse {
    /// Events stored by this call.
    pub accepted: u64,
    /// Events whose id the controller already held (a redelivery): not stored again.
    pub duplicates: u64,
}

/// The bounds of the task calls (`/tasks/lease`, `/tasks/{id}/complete`) and of a task as the
/// operator creates it.
pub mod task_limits {
    /// Most tasks one `POST /tasks/lease` hands out.
    pub const MAX_LEASE: u32 = 100;
    /// Largest `POST /tasks/{id}/complete` body, bytes: room for an output at the default cap
    /// and its JSON escaping. Output past the controller's cap is stored cut, with a marker.
    pub const MAX_COMPLETE_BODY: usize = 1024 * 1024;
    /// Longest kind, bytes (dotted lower-case words `[a-z][a-z0-9_]*`, as event kinds).
    pub const MAX_KIND: usize = 128;
    /// Largest arguments of a task, bytes of JSON.
    pub const MAX_ARGS: usize = 16 * 1024;
    /// Longest `GET /watch` the controller holds when the node asks for no other, seconds:
    /// under the idle timeouts of common proxies (60 s).
    pub const DEFAULT_WATCH_S: u32 = 55;
    /// Longest `GET /watch` a node may ask for, seconds.
    pub const MAX_WATCH_S: u32 = 300;
}

/// `POST /tasks/lease`: up to `max` of the node's queued tasks.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskLeaseRequest {
    /// How many tasks the node takes at most (1 to [`task_limits::MAX_LEASE`]).
    pub max: u32,
}

/// A task leased to the calling node: it is the node's until `lease_expires_at_ms`, which
/// `POST /tasks/{id}/renew` moves on; past it the controller may give it out again.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LeasedTask {
    /// The controller's task id.
    pub id: String,
    /// What to do, e.g. `node.exec`; selects the agent that runs it.
    pub kind: String,
    /// The task's arguments, as the operator gave them.
    pub args: serde_json::Value,
    /// Which lease of the task this is, from 1: more than 1 when an earlier lease expired.
    pub attempt: u32,
    /// How long the task may run, seconds: the lease lasts this long from each lease or renew.
    pub timeout_s: u32,
    /// When the lease runs out, milliseconds since the epoch (controller clock).
    pub lease_expires_at_ms: u64,
}

/// Reply to `POST /tasks/lease`: the tasks leased, oldest first; empty when none is queued.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskLeaseResponse {
    /// The tasks now leased to the node.
    pub tasks: Vec<LeasedTask>,
}

/// How a task ended on the node.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TaskOutcome {
    /// It did what it was asked.
    Succeeded,
    /// It failed (the output says why).
    Failed,
    /// It was running when its agent died or was stopped, and its kind is not safe to run
    /// again: it will not be.
    Interrupted,
}

/// `POST /tasks/{id}/complete`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskCompleteRequest {
    /// How it ended.
    pub outcome: TaskOutcome,
    /// What it printed or produced (text).
    #[serde(default)]
    pub output: String,
}

/// Reply to `POST /tasks/{id}/complete`: the task's state now. Completing a task twice is
/// answered the same way both times; a completion that came after the lease ran out (the task
/// expired, was given out again or cancelled) is recorded with `late`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskCompleteResponse {
    /// The task's state: `succeeded`, `failed`, `interrupted` or `cancelled`.
    pub state: String,
    /// The completion arrived after the node's lease had run out.
    pub late: bool,
}

/// Reply to `POST /tasks/{id}/renew`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TaskRenewResponse {
    /// The lease's new end, milliseconds since the epoch (controller clock).
    pub lease_expires_at_ms: u64,
}

/// Reply to `GET /watch?generation=G`: answered at once when the node's desired-state
/// generation is past `G` or a task is queued for it, otherwise when that happens or the
/// watch's time is up (`changed` false).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WatchResponse {
    /// The node's desired-state generation now.
    pub generation: u64,
    /// Tasks queued for the node now (not leased yet).
    pub tasks_queued: u64,
    /// The generation is past the one asked with, or a task is queued.
    pub changed: bool,
}

/// Reply to `GET /scripts/{digest}`: a NodeScript the operator stored on the controller, named
/// by the SHA-256 of its text. The node checks that digest itself before it runs the text: a
/// controller (corrupted, or not the one it should be) cannot make it run something else.
/// The text is UTF-8, as every script the controller stores is (docs/controller.md).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScriptResponse {
    /// The digest asked for, `sha256:<64 hex>`.
    pub digest: String,
    /// The script's text.
    pub script: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_without_enrollment_still_parses_and_none_is_not_sent() {
        let old = r#"{"boot_id":"b","agent_version":"0.1.0"}"#;
        let hb: HeartbeatRequest = serde_json::from_str(old).unwrap();
        assert!(hb.enrollment.is_none());
        let text = serde_json::to_string(&hb).unwrap();
        assert!(!text.contains("enrollment"), "{text}");
    }

    #[test]
    fn the_report_is_bounded_at_character_boundaries() {
        let status = crate::EnrollmentStatus {
            state: crate::EnrollmentState::RotationFailing,
            node_id: Some("node-1".into()),
            cert_fingerprint: Some("ab".into()),
            not_before_ms: Some(1),
            not_after_ms: Some(3),
            rotate_at_ms: Some(2),
            controller_urls: Vec::new(),
            rotation_failing_since_ms: Some(2),
            rotation_attempts: 4,
            last_error: Some("é".repeat(EnrollmentReport::MAX_ERROR)),
        };
        let report = EnrollmentReport::from_status(&status);
        assert_eq!(report.state, "RotationFailing");
        assert_eq!(report.rotation_attempts, 4);
        let error = report.last_error.unwrap();
        assert_eq!(error.len(), EnrollmentReport::MAX_ERROR);
        assert!(error.chars().all(|c| c == 'é'));
    }
}
