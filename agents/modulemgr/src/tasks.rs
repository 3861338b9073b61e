//! The tasks modulemgr runs (docs/tasks.md): `module.attach`, `module.detach`,
//! `module.commit` and `node.sync`, asked for by the controller (through heartbeatd) or on the
//! node (`powernode-agent sync`).
//!
//! - **`module.attach`** `{"reference", "name"?, "priority"?}`: a local assignment, as
//!   `powernode-agent attach` makes (`etc/powernode/modules.d`), so it outlives a reboot and a
//!   controller outage. Succeeds once the module is Active, fails with its reason.
//! - **`module.detach`** `{"name"}`: the local assignment is removed; succeeds once the module
//!   is out of the mounted stack (at once if it was not attached).
//! - **`module.commit`** `{"name", "version", "priority"?, "reference"}`: the active stack's
//!   writes as a new module, pushed to `reference` (`registry/repository:tag`); the output is
//!   the pushed index digest and the image's digests as JSON.
//! - **`node.sync`** `{}`: reconcile now. Every module is resolved again (a tag that moved
//!   brings its new image), fetched if missing, verified and stacked; succeeds once each
//!   module has settled (Active or Failed), with what changed. heartbeatd heartbeats at once
//!   when a sync is asked for on the node; a sync leased from the controller comes right
//!   after a heartbeat anyway.
//!
//! A module the controller assigns is the controller's: attaching or detaching one of that
//! name is refused. attach, detach and sync are safe to repeat: a status left `Running` by a
//! run that died is dropped and the task taken again. A commit is not: it is reported
//! `Interrupted`, and so is one running when modulemgr stops.

use std::collections::BTreeMap;
use std::path::PathBuf;

use agentbase::tasks::{TaskBook, TaskConfigs};
use powernode_modules::registry::parse_reference;
use powernode_types::{ModuleState, TaskConfig, TaskState};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::commit::{CommitRequest, Committed};
use powernode_modules::local::{self, LocalModule};

/// Attach a module on this node.
pub const ATTACH: &str = "module.attach";
/// Detach a locally attached module.
pub const DETACH: &str = "module.detach";
/// Commit the stack's writes as a new module.
pub const COMMIT: &str = "module.commit";
/// Reconcile now.
pub const SYNC: &str = "node.sync";
/// Every kind modulemgr runs.
pub const KINDS: &[&str] = &[ATTACH, DETACH, COMMIT, SYNC];
/// Where a commit builds its image, under the root; emptied once it is pushed.
pub const COMMIT_DIR: &str = "persist/powernode/modulemgr/commit";

/// `module.attach` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachArgs {
    reference: String,
    #[serde(default)]
    name: Option<String>,
    /// Absent: the module manifest's default.
    #[serde(default)]
    priority: Option<u32>,
}

fn default_commit_priority() -> u32 {
    crate::commit::DEFAULT_PRIORITY
}

/// `module.detach` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetachArgs {
    name: String,
}

/// `module.commit` arguments.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitArgs {
    name: String,
    version: String,
    #[serde(default = "default_commit_priority")]
    priority: u32,
    reference: String,
}

/// `node.sync` arguments: none.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncArgs {}

/// What a commit job sends back: the task's id and its outcome.
type CommitDone = (String, Result<String, String>);

/// A task started and not finished, and what finishes it.
#[derive(Debug)]
enum Open {
    /// Done when `name` is Active on `reference`.
    Attach { name: String, reference: String },
    /// Done when `name` is out of the mounted stack.
    Detach { name: String },
    /// Done when every module has settled; `before` is each module's digest at the start.
    Sync {
        before: BTreeMap<String, Option<String>>,
    },
    /// Done when the commit job reports; cancelling it stops the job.
    Commit { cancel: CancellationToken },
}

/// modulemgr's tasks: the requests, their statuses, the ones in progress.
pub(crate) struct ModuleTasks {
    book: TaskBook,
    open: BTreeMap<String, (TaskConfig, Open)>,
    commits_tx: mpsc::Sender<CommitDone>,
}

impl ModuleTasks {
    /// Over modulemgr's `TaskStatus`; returns where commit jobs report.
    pub(crate) fn new(book: TaskBook) -> (ModuleTasks, mpsc::Receiver<CommitDone>) {
        for status in book.left_running() {
            if status.kind == COMMIT {
                tracing::warn!(task_id = %status.id, "a module commit was interrupted by a restart");
                book.finish(
                    &status.id,
                    &status.kind,
                    TaskState::Interrupted,
                    "[interrupted: modulemgr stopped during the commit; not run again]".into(),
                );
            } else {
                book.forget(&status.id);
            }
        }
        let (commits_tx, commits_rx) = mpsc::channel(8);
        let tasks = ModuleTasks {
            book,
            open: BTreeMap::new(),
            commits_tx,
        };
        (tasks, commits_rx)
    }

    /// At shutdown: a commit in progress is stopped and reported `Interrupted`; the other
    /// kinds stay `Running`, to be taken again by the next run.
    pub(crate) fn stop(&mut self) {
        for (id, (config, open)) in std::mem::take(&mut self.open) {
            if let Open::Commit { cancel } = open {
                cancel.cancel();
                self.book.finish(
                    &id,
                    &config.kind,
                    TaskState::Interrupted,
                    "[interrupted: modulemgr stopped during the commit]".into(),
                );
            }
        }
    }
}

/// Parses a task's arguments, saying what was expected when they do not do.
fn args<T: DeserializeOwned>(config: &TaskConfig, expected: &str) -> Result<T, String> {
    serde_json::from_str(&config.args_json)
        .map_err(|e| format!("{} arguments: {e} (expected {expected})", config.kind))
}

impl Agent {
    /// The requests (`configs`: the controller's and the operator's) changed: cancels
    /// withdrawn tasks, forgets reported ones, starts new ones.
    pub(crate) fn on_task_configs(&mut self, configs: &TaskConfigs) {
        let withdrawn: Vec<String> = self
            .tasks
            .open
            .keys()
            .filter(|id| configs.withdrawn(id))
            .cloned()
            .collect();
        for id in withdrawn {
            if let Some((config, open)) = self.tasks.open.remove(&id) {
                if let Open::Commit { cancel } = &open {
                    cancel.cancel();
                }
                tracing::info!(task_id = %id, kind = %config.kind, "task cancelled");
                self.tasks.book.conclude(
                    &config,
                    Err("cancelled (what was done so far stays done)".into()),
                );
            }
        }
        self.tasks.book.tidy(configs);
        for config in self.tasks.book.pending(configs, KINDS) {
            self.tasks.book.start(&config);
            tracing::info!(task_id = %config.id, kind = %config.kind, "task started");
            let started = match config.kind.as_str() {
                ATTACH => self.attach(&config),
                DETACH => self.detach(&config),
                COMMIT => self.commit(&config),
                _ => args::<SyncArgs>(&config, "{}").map(|_| self.sync()),
            };
            match started {
                Ok(open) => {
                    self.tasks.open.insert(config.id.clone(), (config, open));
                }
                Err(reason) => {
                    tracing::warn!(task_id = %config.id, kind = %config.kind, %reason, "task failed");
                    self.tasks.book.conclude(&config, Err(reason));
                }
            }
        }
        self.progress_tasks();
    }

    /// Finishes the tasks whose condition now holds.
    pub(crate) fn progress_tasks(&mut self) {
        let mut finished = Vec::new();
        for (id, (_, open)) in &self.tasks.open {
            if let Some(outcome) = self.outcome(open) {
                finished.push((id.clone(), outcome));
            }
        }
        for (id, outcome) in finished {
            if let Some((config, _)) = self.tasks.open.remove(&id) {
                tracing::info!(task_id = %id, kind = %config.kind, ok = outcome.is_ok(), "task finished");
                self.tasks.book.conclude(&config, outcome);
            }
        }
    }

    /// A commit job reported.
    pub(crate) fn on_commit_done(&mut self, id: &str, outcome: Result<String, String>) {
        if let Some((config, _)) = self.tasks.open.remove(id) {
            tracing::info!(task_id = %id, ok = outcome.is_ok(), "module commit finished");
            self.tasks.book.conclude(&config, outcome);
        }
    }

    /// Whether `open` is done, and how.
    fn outcome(&self, open: &Open) -> Option<Result<String, String>> {
        match open {
            Open::Attach { name, reference } => {
                let status = self.modules.status(name)?;
                if status.reference != *reference {
                    return Some(Err(format!(
                        "module {name} was reassigned to {} meanwhile",
                        status.reference
                    )));
                }
                match status.state {
                    ModuleState::Active => Some(Ok(format!(
                        "{name} is active: {reference} ({})",
                        status.digest.as_deref().unwrap_or("-")
                    ))),
                    ModuleState::Failed => Some(Err(format!(
                        "{name} failed: {}",
                        status.error.as_deref().unwrap_or("no reason given")
                    ))),
                    _ => None,
                }
            }
            Open::Detach { name } => {
                let gone = self.modules.status(name).is_none();
                (gone && !self.modules.in_applied_stack(name))
                    .then(|| Ok(format!("{name} is detached and out of the stack")))
            }
            Open::Sync { before } => {
                let settled = self
                    .modules
                    .statuses()
                    .all(|s| matches!(s.state, ModuleState::Active | ModuleState::Failed));
                settled.then(|| Ok(self.sync_summary(before)))
            }
            Open::Commit { .. } => None,
        }
    }

    /// One line per module: its state, and its image when that changed.
    fn sync_summary(&self, before: &BTreeMap<String, Option<String>>) -> String {
        let statuses: Vec<_> = self.modules.statuses().collect();
        let mut lines = vec![format!("synced {} module(s)", statuses.len())];
        for status in &statuses {
            let name = &status.name;
            let now = status.digest.as_deref().unwrap_or("-");
            let state = match status.state {
                ModuleState::Failed => format!(
                    "failed: {}",
                    status.error.as_deref().unwrap_or("no reason given")
                ),
                state => format!("{state:?}").to_lowercase(),
            };
            let change = match before.get(name) {
                None => " (new)".to_owned(),
                Some(old) if old.as_deref() != Some(now) => {
                    format!(" (was {})", old.as_deref().unwrap_or("-"))
                }
                Some(_) => String::new(),
            };
            lines.push(format!("{name}: {state}, {now}{change}"));
        }
        lines.join("\n")
    }

    /// Refuses a name the controller assigns.
    fn not_the_controllers(&self, name: &str) -> Result<(), String> {
        match self.modules.controller_reference(name) {
            Some(reference) => Err(format!(
                "module {name} is assigned by the controller ({reference}); change it there"
            )),
            None => Ok(()),
        }
    }

    fn attach(&mut self, config: &TaskConfig) -> Result<Open, String> {
        let a: AttachArgs = args(
            config,
            r#"{"reference": "registry/repository:tag", "name"?, "priority"?}"#,
        )?;
        parse_reference(&a.reference).map_err(|e| format!("reference: {e}"))?;
        let name = a.name.unwrap_or_else(|| local::default_name(&a.reference));
        if !local::valid_name(&name) {
            return Err(format!("{name:?} is not a valid module name"));
        }
        self.not_the_controllers(&name)?;
        let module = LocalModule {
            name: name.clone(),
            reference: a.reference.clone(),
            priority: a.priority,
        };
        local::write(&self.ctx.root.path(local::DIR), &module).map_err(|e| e.to_string())?;
        let effects = self.local_changed();
        self.apply(effects);
        Ok(Open::Attach {
            name,
            reference: a.reference,
        })
    }

    fn detach(&mut self, config: &TaskConfig) -> Result<Open, String> {
        let d: DetachArgs = args(config, r#"{"name": "module"}"#)?;
        self.not_the_controllers(&d.name)?;
        local::remove(&self.ctx.root.path(local::DIR), &d.name).map_err(|e| e.to_string())?;
        let effects = self.local_changed();
        self.apply(effects);
        Ok(Open::Detach { name: d.name })
    }

    fn sync(&mut self) -> Open {
        let before = self
            .modules
            .statuses()
            .map(|s| (s.name, s.digest))
            .collect();
        self.read_local();
        let effects = self.modules.fetch_all_again();
        self.apply(effects);
        Open::Sync { before }
    }

    fn commit(&mut self, config: &TaskConfig) -> Result<Open, String> {
        let c: CommitArgs = args(
            config,
            r#"{"name", "version", "priority"?, "reference": "registry/repository:tag"}"#,
        )?;
        let upper_dir = self.modules.upper_dir().map(str::to_owned).ok_or_else(|| {
            format!(
                "no stack is active at {} to commit",
                self.modules.settings.target
            )
        })?;
        let request = CommitRequest {
            name: c.name,
            version: c.version,
            priority: c.priority,
            push: Some(c.reference),
        };
        let out = self.ctx.root.path(COMMIT_DIR).join(&config.id);
        let registry = self.registry.clone();
        let cancel = self.ctx.shutdown.child_token();
        let done = self.tasks.commits_tx.clone();
        let id = config.id.clone();
        let stop = cancel.clone();
        self.ctx.tasks.spawn(async move {
            let job = crate::commit::commit(PathBuf::from(upper_dir), &out, &request, &registry);
            let outcome = tokio::select! {
                () = stop.cancelled() => None,
                result = job => Some(result),
            };
            // The image is in the registry now (or the commit failed): the copy goes.
            if let Err(e) = tokio::fs::remove_dir_all(&out).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %out.display(), error = %e, "could not remove a commit's files");
                }
            }
            let Some(result) = outcome else {
                return;
            };
            let outcome = result
                .map(|c| committed_output(&c))
                .map_err(|e| format!("commit failed: {e:#}"));
            let _ = done.send((id, outcome)).await;
        });
        Ok(Open::Commit { cancel })
    }
}

/// A commit's output: where it went, as JSON.
fn committed_output(c: &Committed) -> String {
    serde_json::json!({
        "reference": c.pushed.as_ref().map(|p| p.reference.clone()),
        "index_digest": c.pushed.as_ref().map(|p| p.index_digest.clone()),
        "image_digest": c.built.image_digest,
        "fsverity_digest": c.built.fsverity_digest,
        "files": c.built.module.files.len(),
    })
    .to_string()
}
