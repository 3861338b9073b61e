//! One task's work, done in the task's own spawned future so that execd's main loop never
//! waits on it: get the script (from the arguments, or fetched from the controller and
//! checked against its digest), then run it in the time the task has left.

use agentbase::Events;
use powernode_types::{Severity, TaskState};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::fetch::{FetchError, Fetcher};
use crate::script::{self, Ending, Files, Plan, Source};

/// What the output of a task cancelled while its script was being fetched ends with. Starts
/// like a cancelled run's, so that a stopping execd reports it the same way (`Interrupted`).
pub const CANCELLED_WHILE_FETCHING: &str =
    "[cancelled; the script was being fetched and never ran]";

/// A started task's work.
pub struct Work {
    /// The task.
    pub id: String,
    /// Its checked arguments.
    pub plan: Plan,
    /// Its files under the work directory.
    pub files: Files,
    /// How to reach the controller, for a script named by digest.
    pub fetcher: Fetcher,
    /// For the event a digest mismatch raises.
    pub events: Events,
    /// The task's timeout from when it was started: the fetch and the run share it.
    pub deadline: Instant,
}

/// How a task's work ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `Succeeded` or `Failed`.
    pub state: TaskState,
    /// The output, with a last line saying how it ended.
    pub output: String,
    /// It ended because it was told to stop, not by itself.
    pub cancelled: bool,
}

impl Outcome {
    fn failed(output: String) -> Outcome {
        Outcome {
            state: TaskState::Failed,
            output,
            cancelled: false,
        }
    }
}

impl Work {
    /// Does the work until it ends, its time is up or `cancel` fires.
    pub async fn run(self, mut cancel: oneshot::Receiver<()>) -> Outcome {
        let script = match &self.plan.source {
            Source::Inline(text) => text.clone(),
            Source::Stored(digest) => {
                let fetched = tokio::select! {
                    fetched = self.fetcher.fetch(digest, self.deadline, self.plan.timeout) => fetched,
                    _ = &mut cancel => {
                        return Outcome {
                            state: TaskState::Failed,
                            output: CANCELLED_WHILE_FETCHING.to_owned(),
                            cancelled: true,
                        };
                    }
                };
                match fetched {
                    Ok(text) => text,
                    Err(e) => return self.not_fetched(&e),
                }
            }
        };
        let finished =
            script::run(&self.plan, &script, &self.files, &mut cancel, self.deadline).await;
        match finished {
            Ok(f) => Outcome {
                state: if f.succeeded() {
                    TaskState::Succeeded
                } else {
                    TaskState::Failed
                },
                output: f.report(),
                cancelled: f.ending == Ending::Cancelled,
            },
            Err(e) => Outcome::failed(format!("could not run the script: {e}")),
        }
    }

    /// A script that could not be had: the task fails with the reason, and a mismatch — the
    /// controller serving other text under a digest — is raised as an event too, since it
    /// means the controller's store is corrupt or was tampered with.
    fn not_fetched(&self, error: &FetchError) -> Outcome {
        let reason = error.to_string();
        if let FetchError::Mismatch { asked, got } = error {
            tracing::error!(task_id = %self.id, asked = %asked, got = %got, "script digest mismatch; not run");
            self.events.report(
                Severity::Critical,
                "task.script_digest_mismatch",
                &reason,
                &[
                    ("task_id", &self.id),
                    ("digest", &asked.to_string()),
                    ("received_digest", &got.to_string()),
                ],
            );
        } else {
            tracing::warn!(task_id = %self.id, error = %reason, "script not fetched; not run");
        }
        Outcome::failed(reason)
    }
}
