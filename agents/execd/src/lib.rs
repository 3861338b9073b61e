//! execd: runs the `node.exec` tasks (NodeScripts) that heartbeatd leases from the controller
//! (docs/tasks.md).
//!
//! It follows `heartbeatd/TaskConfig`. A config of kind `node.exec` that it has no status for
//! is started ([`script::run`]: an allowed interpreter, its own process group, a timeout,
//! output captured and capped) and published `Running` in `execd/TaskStatus`; when it ends the
//! status becomes `Succeeded` (exit 0) or `Failed` with the output and how it ended. A config
//! withdrawn while its task runs (the controller cancelled it, or its lease was lost) kills the
//! task's group. A final status stays until heartbeatd, having reported it, withdraws the
//! config; then the status and the task's files go.
//!
//! # States of one task
//!
//! ```text
//!   config appears ──► Running ──► Succeeded | Failed ──► (config withdrawn) ──► gone
//!                         │
//!                         ├── config withdrawn ──► group killed ──► Failed (cancelled)
//!                         └── agent killed or stopped ──► Interrupted (at the next start,
//!                              or at shutdown), with the output so far
//! ```
//!
//! `node.exec` is not safe to run twice: a task with a status, whatever its state, is never
//! started again, so a restart reports `Interrupted` rather than running the script anew.

pub mod script;

use std::collections::HashMap;
use std::path::PathBuf;

use agentbase::Context;
use anyhow::Context as _;
use powernode_pubsub::{Publication, Subscription};
use powernode_types::{Severity, TaskConfig, TaskState, TaskStatus};
use tokio::sync::{mpsc, oneshot};

use crate::script::{Files, Plan};

/// The agent that publishes `TaskConfig`.
pub const TASK_AGENT: &str = "heartbeatd";

/// A task being run: how to stop it.
struct Running {
    cancel: Option<oneshot::Sender<()>>,
}

/// What a run sends back to the main loop.
struct Done {
    id: String,
    status: TaskStatus,
    /// It ended because it was told to stop (withdrawn, or execd stopping), not by itself.
    cancelled: bool,
}

/// Everything the main loop carries.
struct Agent {
    ctx: Context,
    statuses: Publication<TaskStatus>,
    work: PathBuf,
    running: HashMap<String, Running>,
    done_tx: mpsc::Sender<Done>,
}

/// The agent's entry point: see the crate documentation.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let statuses = ctx
        .open_publication::<TaskStatus>()
        .context("opening TaskStatus")?;
    // Beside the agent's pubsub files, in a directory of its own.
    let work = ctx.root.run_dir().join("execd").join("scripts");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let (done_tx, mut done_rx) = mpsc::channel(64);
    let mut agent = Agent {
        ctx: ctx.clone(),
        statuses,
        work,
        running: HashMap::new(),
        done_tx,
    };
    agent.interrupted_by_a_previous_run();
    let mut configs = Subscription::<TaskConfig>::connect(&ctx.dirs, TASK_AGENT);
    let mut tick = tokio::time::interval(ctx.beat_interval());
    ctx.ready();
    ctx.status("waiting for node.exec tasks");
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            _ = tick.tick() => ctx.beat(),
            _ = configs.next() => agent.reconcile(&configs),
            Some(done) = done_rx.recv() => agent.finished(done, &configs),
        }
    }
    agent.stop(&mut done_rx).await;
    Ok(())
}

impl Agent {
    /// Statuses still `Running` at start belong to a run that was killed: their groups are
    /// killed now and they are reported `Interrupted` with the output they had written.
    fn interrupted_by_a_previous_run(&mut self) {
        for key in self.statuses.keys() {
            let Some(status) = self.statuses.get(&key) else {
                continue;
            };
            if status.state != TaskState::Running {
                continue;
            }
            let files = Files::of(&self.work, &status.id);
            script::kill_leftover(&files);
            let mut output = files.output_so_far();
            if !output.is_empty() && !output.ends_with('\n') {
                output.push('\n');
            }
            output.push_str("[interrupted: execd stopped while the script ran; not run again]");
            tracing::warn!(task_id = %status.id, "task interrupted by a restart");
            self.ctx.events.report(
                Severity::Warning,
                "task.interrupted",
                "a node.exec task was running when execd stopped; it is not run again",
                &[("task_id", &status.id)],
            );
            self.publish(TaskStatus {
                state: TaskState::Interrupted,
                output,
                finished_at_ms: Some(agentbase::health::now_ms()),
                ..status
            });
        }
    }

    /// Starts what is new, cancels what was withdrawn, forgets what is reported.
    fn reconcile(&mut self, configs: &Subscription<TaskConfig>) {
        for (id, config) in configs.items() {
            if config.kind != script::KIND
                || self.running.contains_key(id)
                || self.statuses.get(id).is_some()
            {
                continue;
            }
            self.start(config);
        }
        // Only what heartbeatd withdrew, never what a disconnected subscription has not
        // confirmed yet: a subscription keeps its items while heartbeatd restarts.
        for (id, running) in &mut self.running {
            if configs.get(id).is_none() {
                if let Some(cancel) = running.cancel.take() {
                    tracing::info!(task_id = %id, "task withdrawn; killing it");
                    let _ = cancel.send(());
                }
            }
        }
        for key in self.statuses.keys() {
            let finished = self
                .statuses
                .get(&key)
                .is_some_and(|s| s.state != TaskState::Running);
            if finished && configs.get(&key).is_none() && configs.is_synchronized() {
                self.forget(&key);
            }
        }
    }

    fn start(&mut self, config: &TaskConfig) {
        let now = agentbase::health::now_ms();
        let mut status = TaskStatus {
            id: config.id.clone(),
            kind: config.kind.clone(),
            state: TaskState::Running,
            output: String::new(),
            started_at_ms: now,
            finished_at_ms: None,
        };
        let plan = match Plan::from_args(&config.args_json) {
            Ok(plan) => plan,
            Err(reason) => {
                tracing::warn!(task_id = %config.id, %reason, "task refused");
                status.state = TaskState::Failed;
                status.output = reason;
                status.finished_at_ms = Some(now);
                self.publish(status);
                return;
            }
        };
        tracing::info!(task_id = %config.id, interpreter = plan.interpreter,
            timeout_s = plan.timeout.as_secs(), "task started");
        self.publish(status.clone());
        let (cancel_tx, cancel) = oneshot::channel();
        self.running.insert(
            config.id.clone(),
            Running {
                cancel: Some(cancel_tx),
            },
        );
        let files = Files::of(&self.work, &config.id);
        let done_tx = self.done_tx.clone();
        self.ctx.tasks.spawn(async move {
            let finished = script::run(&plan, &files, cancel).await;
            let now = agentbase::health::now_ms();
            let cancelled = finished
                .as_ref()
                .is_ok_and(|f| f.ending == script::Ending::Cancelled);
            let (state, output) = match finished {
                Ok(f) if f.succeeded() => (TaskState::Succeeded, f.report()),
                Ok(f) => (TaskState::Failed, f.report()),
                Err(e) => (TaskState::Failed, format!("could not run the script: {e}")),
            };
            let status = TaskStatus {
                state,
                output,
                finished_at_ms: Some(now),
                ..status
            };
            let _ = done_tx
                .send(Done {
                    id: status.id.clone(),
                    status,
                    cancelled,
                })
                .await;
        });
    }

    fn finished(&mut self, done: Done, configs: &Subscription<TaskConfig>) {
        self.running.remove(&done.id);
        tracing::info!(task_id = %done.id, state = ?done.status.state, "task finished");
        self.publish(done.status);
        if configs.get(&done.id).is_none() && configs.is_synchronized() {
            self.forget(&done.id);
        }
    }

    /// Shutdown: every running task is killed and reported `Interrupted` with its output so
    /// far, so a drained node leaves nothing running and nothing unreported.
    async fn stop(&mut self, done_rx: &mut mpsc::Receiver<Done>) {
        for running in self.running.values_mut() {
            if let Some(cancel) = running.cancel.take() {
                let _ = cancel.send(());
            }
        }
        while !self.running.is_empty() {
            let Ok(Some(done)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), done_rx.recv()).await
            else {
                break;
            };
            self.running.remove(&done.id);
            let mut status = done.status;
            // A script that ended by itself meanwhile keeps its outcome.
            if done.cancelled {
                status.state = TaskState::Interrupted;
                status.output = status
                    .output
                    .replace("[cancelled;", "[interrupted: execd was stopped;");
            }
            self.publish(status);
        }
    }

    fn forget(&mut self, id: &str) {
        if let Err(e) = self.statuses.unpublish(id) {
            tracing::warn!(task_id = %id, error = %e, "could not unpublish a task status");
        }
        Files::of(&self.work, id).remove();
    }

    /// Publishes `status`; one that cannot be (an item over the frame limit) is replaced by
    /// a final `Failed` saying why, so the task is never left `Running` for heartbeatd to
    /// renew forever.
    fn publish(&mut self, status: TaskStatus) {
        let Err(e) = self.statuses.publish(&status) else {
            return;
        };
        tracing::error!(task_id = %status.id, error = %e, "could not publish a task status");
        let fallback = TaskStatus {
            state: TaskState::Failed,
            output: format!("execd could not publish the task's status: {e}"),
            finished_at_ms: Some(agentbase::health::now_ms()),
            ..status
        };
        if let Err(e) = self.statuses.publish(&fallback) {
            self.ctx
                .health
                .report_error(&format!("publishing TaskStatus {}: {e}", fallback.id));
        }
    }
}
