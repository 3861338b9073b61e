//! Fleet events: raised by every agent, journalled and delivered by eventd.

use serde::{Deserialize, Serialize};

use crate::{Topic, GLOBAL_KEY};

/// One event, published by the agent that raised it until eventd acknowledges it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Globally unique id; the key. The controller accepts a repeated id once, so redelivery
    /// after a crash is harmless.
    pub id: String,
    /// The agent that raised it.
    pub agent: String,
    /// Per-agent sequence number, increasing; [`EventAck::through_seq`] refers to it.
    pub seq: u64,
    /// How bad it is.
    pub severity: Severity,
    /// Machine-readable kind, e.g. `cert.rotation_failing`.
    pub kind: String,
    /// Human-readable message.
    pub message: String,
    /// When it was raised.
    pub at_ms: u64,
    /// Structured context (module name, digest, …) as key/value pairs, in order.
    pub fields: Vec<(String, String)>,
    /// Events of this agent dropped (over its bound, while eventd was away) since the one
    /// before this.
    pub dropped_before: u64,
}

/// Severity of an event.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// Normal operation worth recording.
    Info,
    /// Something went wrong but was handled.
    Warning,
    /// Something failed and needs attention.
    Error,
    /// The node is or will soon be unable to do its job.
    Critical,
}

impl Topic for Event {
    const NAME: &'static str = "Event";
    // v2: `dropped_before`.
    const SCHEMA_VERSION: u32 = 2;
    // An event raised just before a reboot must still reach eventd's journal (DESIGN §7).
    const PERSISTENT: bool = true;
    fn key(&self) -> String {
        self.id.clone()
    }
}

/// eventd's acknowledgement that an agent's events are journalled, published by eventd.
///
/// The agent may then forget (unpublish) its events up to and including `through_seq`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EventAck {
    /// The agent acknowledged; the key.
    pub agent: String,
    /// Every event of that agent with `seq <= through_seq` is journalled.
    pub through_seq: u64,
}

impl Topic for EventAck {
    const NAME: &'static str = "EventAck";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.agent.clone()
    }
}

/// State of eventd's journal and delivery, published by eventd.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EventdStatus {
    /// Events in the journal.
    pub journal_len: u64,
    /// Bytes the journal's segments take on disk.
    pub journal_bytes: u64,
    /// The journal's bound (`events.journal_max_mib`), in bytes.
    pub journal_max_bytes: u64,
    /// Journalled events not yet accepted by the controller.
    pub pending: u64,
    /// Events accepted by the controller since eventd started.
    pub delivered_total: u64,
    /// When a delivery last succeeded.
    pub last_delivery_ms: Option<u64>,
    /// The last delivery error, if any.
    pub last_error: Option<String>,
    /// Info events dropped by the journal's compaction since eventd started.
    pub dropped_info: u64,
    /// Warning events dropped by the journal's compaction since eventd started.
    pub dropped_warning: u64,
    /// Error events dropped by the journal's compaction since eventd started (a Critical is
    /// never dropped).
    pub dropped_error: u64,
}

impl Topic for EventdStatus {
    const NAME: &'static str = "EventdStatus";
    // v2: the journal's bytes and bound, and the events its compaction dropped.
    const SCHEMA_VERSION: u32 = 2;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        GLOBAL_KEY.to_owned()
    }
}
