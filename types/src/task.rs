//! Tasks leased from the controller and their outcome.

use serde::{Deserialize, Serialize};

use crate::Topic;

/// A task leased to this node, published by heartbeatd for the agent that owns its kind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TaskConfig {
    /// The controller's task id; the key.
    pub id: String,
    /// What to do, e.g. `module.commit`; selects the agent that runs it.
    pub kind: String,
    /// The task's arguments as JSON text. Text rather than a JSON value because the compact
    /// encoding cannot carry self-describing values; the owning agent parses it into its own type.
    pub args_json: String,
    /// When the lease runs out and the controller may give the task to another node.
    pub lease_expires_at_ms: u64,
}

impl Topic for TaskConfig {
    const NAME: &'static str = "TaskConfig";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.id.clone()
    }
}

/// Progress and outcome of one task, published by the agent running it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TaskStatus {
    /// The controller's task id; the key.
    pub id: String,
    /// The task's kind, copied from its `TaskConfig`.
    pub kind: String,
    /// Where the task stands.
    pub state: TaskState,
    /// Output for the controller (text; JSON where the kind defines it).
    pub output: String,
    /// When the agent started the task.
    pub started_at_ms: u64,
    /// When the task finished, once it has.
    pub finished_at_ms: Option<u64>,
}

/// Life cycle of a task on the node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Being executed.
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished with an error (see `output`).
    Failed,
    /// Was running when its agent died or was stopped; reported so it is never silently lost.
    Interrupted,
}

impl Topic for TaskStatus {
    const NAME: &'static str = "TaskStatus";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.id.clone()
    }
}
