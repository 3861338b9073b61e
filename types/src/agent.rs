//! What every agent says about itself.

use serde::{Deserialize, Serialize};

use crate::Topic;

/// The health of one agent process, published by the agent itself.
///
/// Not persistent: it describes a running process, and a reboot makes it meaningless.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    /// The agent's name, e.g. `modulemgr`; the key.
    pub agent: String,
    /// Process id of the agent.
    pub pid: u32,
    /// Version of the agent binary.
    pub version: String,
    /// When the process started.
    pub started_at_ms: u64,
    /// When the agent's main loop last completed a turn; a stale value means it is stuck.
    pub last_loop_ms: u64,
    /// Where the agent is in its life cycle.
    pub state: AgentState,
    /// The most recent error the agent could not recover from by itself, if any.
    pub last_error: Option<String>,
    /// How many checkpoint files the agent found corrupt or of the wrong version and moved aside.
    pub quarantined_checkpoints: u32,
}

/// Life cycle of an agent process.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AgentState {
    /// Loading checkpoints and connecting to the topics it needs.
    Starting,
    /// Doing its work normally.
    Running,
    /// Still running, but something it depends on is failing (see `last_error`).
    Degraded,
    /// Draining after SIGTERM.
    Stopping,
}

impl Topic for AgentStatus {
    const NAME: &'static str = "AgentStatus";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.agent.clone()
    }
}
