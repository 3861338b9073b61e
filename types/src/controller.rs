//! How the conversation with the controller is going.

use serde::{Deserialize, Serialize};

use crate::topic::upgrade_from;
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
    /// The controller URL that answered the last successful heartbeat: of the node's list of
    /// controller URLs, the one in use.
    pub controller_url: Option<String>,
}

impl Topic for ControllerStatus {
    const NAME: &'static str = "ControllerStatus";
    /// 2: `controller_url`.
    const SCHEMA_VERSION: u32 = 2;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        GLOBAL_KEY.to_owned()
    }
    fn upgrade(schema_version: u32, payload: &[u8]) -> Option<Self> {
        match schema_version {
            1 => upgrade_from::<ControllerStatusV1, _>(payload),
            _ => None,
        }
    }
}

/// [`ControllerStatus`] as schema version 1 encoded it: without the URL in use.
#[derive(Deserialize)]
struct ControllerStatusV1 {
    reachable: bool,
    last_success_ms: Option<u64>,
    consecutive_failures: u32,
    clock_skew_ms: Option<i64>,
    heartbeat_interval_s: u32,
    applied_generation: u64,
    last_error: Option<String>,
}

impl From<ControllerStatusV1> for ControllerStatus {
    fn from(v1: ControllerStatusV1) -> ControllerStatus {
        ControllerStatus {
            reachable: v1.reachable,
            last_success_ms: v1.last_success_ms,
            consecutive_failures: v1.consecutive_failures,
            clock_skew_ms: v1.clock_skew_ms,
            heartbeat_interval_s: v1.heartbeat_interval_s,
            applied_generation: v1.applied_generation,
            last_error: v1.last_error,
            controller_url: None,
        }
    }
}
