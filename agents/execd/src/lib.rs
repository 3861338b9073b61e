//! execd: runs the `node.exec` tasks (NodeScripts) that heartbeatd leases from the controller
//! (docs/tasks.md).
//!
//! It follows `heartbeatd/TaskConfig` and the operator's local requests
//! (`agentbase::tasks`). A config of kind `node.exec` that it has no status for
//! is started and published `Running` in `execd/TaskStatus`. The task's own spawned work
//! ([`work`]) gets its script — from the arguments, or from the controller by digest
//! ([`fetch`]: checked against the digest, retried for want of the controller until the task's
//! time is up) — and runs it ([`script::run`]: an interpreter of `[exec] interpreters`, its own
//! process group, the rest of the task's time, output captured and capped). When it ends the
//! status becomes `Succeeded` (exit 0) or `Failed` with the output and how it ended. A config
//! withdrawn while its task runs (the controller cancelled it, or its lease was lost) kills the
//! task's group. A final status stays until heartbeatd, having reported it, withdraws the
//! config; then the status and the task's files go.
//!
//! For scripts named by digest it follows `enrollmgr/EnrollmentStatus` for the controller's
//! URL (unless `[controller] url` sets one) and uses the node's credentials through the
//! transport crate.
//!
//! # States of one task
//!
//! ```text
//!   config appears ──► Running ──► Succeeded | Failed ──► (config withdrawn) ──► gone
//!                         │   (Running: fetching the script when named by digest, then
//!                         │    running it; a refused fetch or a digest mismatch is Failed)
//!                         ├── config withdrawn ──► group killed ──► Failed (cancelled)
//!                         ├── agent stopped (SIGTERM), the script ends within STOP_GRACE
//!                         │     ──► Succeeded | Failed, as it ended
//!                         └── agent killed, or stopped and the script still runs after
//!                              STOP_GRACE ──► group killed ──► Interrupted (at the next
//!                              start, or at shutdown), with the output so far
//! ```
//!
//! On SIGTERM execd starts nothing more; what runs has [`STOP_GRACE`] to end by itself (and
//! keeps its outcome), then its group is killed and it is reported `Interrupted`: a task that
//! was about to finish is not made to look interrupted, and a node still stops within a few
//! seconds, well inside agentbase's drain and the unit's stop timeout.
//!
//! `node.exec` is not safe to run twice: a task with a status, whatever its state, is never
//! started again, so a restart reports `Interrupted` rather than running the script anew.

pub mod fetch;
pub mod scope;
pub mod script;
pub mod work;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use agentbase::tasks::TaskConfigs;
use agentbase::Context;
use anyhow::Context as _;
use powernode_pubsub::{Publication, Subscription};
use powernode_transport::pki::PkiPaths;
use powernode_types::{EnrollmentStatus, Severity, TaskConfig, TaskState, TaskStatus, GLOBAL_KEY};
use tokio::sync::{mpsc, oneshot, watch};

use crate::fetch::{CachedClient, Fetcher};
use crate::script::{Files, Plan};
use crate::work::Work;

/// The agent whose `EnrollmentStatus` says where the controller is.
pub const ENROLLMENT_AGENT: &str = "enrollmgr";

/// How long, after SIGTERM, a running script has to end by itself before its group is killed
/// and the task reported `Interrupted`.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

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
    /// The controller's URLs, as the fetches of scripts named by digest see them.
    urls: watch::Sender<Vec<String>>,
    fetcher: Fetcher,
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
    let (urls, urls_rx) = watch::channel(ctx.settings.controller.urls.clone());
    let fetcher = Fetcher {
        pki: PkiPaths::under(ctx.root.persist_dir()),
        urls: urls_rx,
        request_timeout: ctx.settings.controller.request_timeout(),
        max_backoff: ctx.settings.controller.max_backoff(),
        client: CachedClient::default(),
    };
    let mut agent = Agent {
        ctx: ctx.clone(),
        statuses,
        work,
        running: HashMap::new(),
        done_tx,
        urls,
        fetcher,
    };
    let mut enrollment = Subscription::<EnrollmentStatus>::connect(&ctx.dirs, ENROLLMENT_AGENT);
    agent.interrupted_by_a_previous_run();
    let mut configs = TaskConfigs::connect(&ctx.dirs);
    let mut tick = tokio::time::interval(ctx.beat_interval());
    ctx.ready();
    ctx.status("waiting for node.exec tasks");
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            _ = tick.tick() => ctx.beat(),
            () = configs.next() => agent.reconcile(&configs),
            Some(done) = done_rx.recv() => agent.finished(done, &configs),
            _ = enrollment.next() => agent.enrollment_changed(&enrollment),
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

    /// Keeps the controller URLs the fetches use current: `[controller] url` when set, else
    /// the ones the node enrolled with (kept while enrollmgr restarts).
    fn enrollment_changed(&mut self, enrollment: &Subscription<EnrollmentStatus>) {
        if !self.ctx.settings.controller.urls.is_empty() {
            return;
        }
        let Some(urls) = enrollment
            .get(GLOBAL_KEY)
            .map(|s| s.controller_urls.clone())
            .filter(|urls| !urls.is_empty())
        else {
            return;
        };
        self.urls.send_if_modified(|known| {
            let changed = *known != urls;
            *known = urls;
            changed
        });
    }

    /// Starts what is new, cancels what was withdrawn, forgets what is reported.
    fn reconcile(&mut self, configs: &TaskConfigs) {
        for (id, config) in configs.items() {
            if config.kind != script::KIND
                || self.running.contains_key(id)
                || self.statuses.get(id).is_some()
            {
                continue;
            }
            self.start(config);
        }
        // Only what its publisher withdrew, never what a disconnected subscription has not
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
            if finished && configs.withdrawn(&key) {
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
        let plan = match Plan::from_args(&config.args_json, &self.ctx.settings.exec.interpreters) {
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
        // The digest of a stored script, never an inline script's text.
        let digest = match &plan.source {
            script::Source::Stored(digest) => digest.to_string(),
            script::Source::Inline(_) => "inline".to_owned(),
        };
        tracing::info!(task_id = %config.id, interpreter = %plan.interpreter,
            timeout_s = plan.timeout.as_secs(), script = %digest, "task started");
        self.publish(status.clone());
        let (cancel_tx, cancel) = oneshot::channel();
        self.running.insert(
            config.id.clone(),
            Running {
                cancel: Some(cancel_tx),
            },
        );
        let work = Work {
            id: config.id.clone(),
            deadline: tokio::time::Instant::now() + plan.timeout,
            plan,
            files: Files::of(&self.work, &config.id),
            fetcher: self.fetcher.clone(),
            events: self.ctx.events.clone(),
        };
        let done_tx = self.done_tx.clone();
        self.ctx.tasks.spawn(async move {
            let done = work.run(cancel).await;
            let cancelled = done.cancelled;
            let status = TaskStatus {
                state: done.state,
                output: done.output,
                finished_at_ms: Some(agentbase::health::now_ms()),
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

    fn finished(&mut self, done: Done, configs: &TaskConfigs) {
        self.running.remove(&done.id);
        tracing::info!(task_id = %done.id, state = ?done.status.state, "task finished");
        self.publish(done.status);
        if configs.withdrawn(&done.id) {
            self.forget(&done.id);
        }
    }

    /// Shutdown: a running task that ends within [`STOP_GRACE`] keeps its outcome; every one
    /// still running then is killed and reported `Interrupted` with its output so far, so a
    /// drained node leaves nothing running and nothing unreported.
    async fn stop(&mut self, done_rx: &mut mpsc::Receiver<Done>) {
        if !self.running.is_empty() {
            tracing::info!(
                tasks = self.running.len(),
                grace_s = STOP_GRACE.as_secs(),
                "stopping; running tasks may end by themselves first"
            );
        }
        let grace = tokio::time::Instant::now() + STOP_GRACE;
        while !self.running.is_empty() {
            let Ok(Some(done)) = tokio::time::timeout_at(grace, done_rx.recv()).await else {
                break;
            };
            self.running.remove(&done.id);
            tracing::info!(task_id = %done.id, state = ?done.status.state, "task finished while stopping");
            self.publish(done.status);
        }
        for running in self.running.values_mut() {
            if let Some(cancel) = running.cancel.take() {
                let _ = cancel.send(());
            }
        }
        while !self.running.is_empty() {
            let Ok(Some(done)) = tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await
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
