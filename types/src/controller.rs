//! How the conversation with the controller is going.

use serde::{Deserialize, Serialize};

use crate::{Topic, GLOBAL_KEY};

/// Reachability of the controller and the desired-state generation applied, published by
/// heartbeatd.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ControllerStatus {
    /// Whether the last heartbeat succeeded.
    pub reachable: bool,
    /// When a heartbeat last succeeded.
    pub last_success_ms: Option<u64>,
    /// Heartbeats failed in a row since the last success.
    pub consecutive_failures: u32,
    /// Controller clock minus node clock, from the last reply; signed because either may lead.
    pub clock_skew_ms: Option<i64>,
    /// The heartbeat interval the controller asked for, in seconds.
    pub heartbeat_interval_s: u32,
    /// Generation of the desired state last handed to the agents.
    pub applied_generation: u64,
    /// The last heartbeat error, if any.
    pub last_error: Option<String>,
}

impl Topic for ControllerStatus {
    const NAME: &'static str = "ControllerStatus";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        GLOBAL_KEY.to_owned()
    }
}
