//! The agent loop: the I/O around [`Modules`]. It subscribes to the assignment, the
//! verdicts, mountmgr's status and the task requests, watches the local assignments, runs the
//! fetches, hands each event to the state machine and carries out the [`Effect`]s it answers
//! with. It decides nothing about modules itself.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use agentbase::Context;
use anyhow::Context as _;
use powernode_modules::format::host_architecture;
use powernode_modules::local;
use powernode_modules::registry::Registry;
use powernode_modules::store::Store;
use powernode_pubsub::{Event, Publication, Subscription};
use powernode_types::{
    ModuleConfig, ModuleState, ModuleStatus, MountConfig, MountStatus, Topic, UpperMode,
    VerifyConfig, VerifyStatus,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fetch::{self, Report};
use crate::modules::{Effect, Modules, Restored, Settings};
use crate::{lastknown, registry_config, tasks};
use crate::{HEARTBEAT_AGENT, MOUNT_AGENT, STORE_DIR, VERIFIER_AGENT};

/// How long modulemgr waits for heartbeatd's assignment before it takes the local ones as
/// the whole desired set (a node without a controller).
const DESIRED_GRACE: Duration = Duration::from_secs(5);
/// How often the local assignments are re-read besides when inotify says they changed.
const LOCAL_POLL: Duration = Duration::from_secs(5);

/// The agent: the state machine and what it needs to act.
pub(crate) struct Agent {
    pub(crate) ctx: Context,
    pub(crate) registry: Registry,
    store: Store,
    lastknown: lastknown::LastKnown,
    status_pub: Publication<ModuleStatus>,
    verify_pub: Publication<VerifyConfig>,
    mount_pub: Publication<MountConfig>,
    reports_tx: mpsc::Sender<(String, u64, Report)>,
    /// The running fetch of each module, to stop it.
    fetches: HashMap<String, CancellationToken>,
    /// The errors last found in the local assignments (reported when they change).
    local_errors: Vec<String>,
    /// Everything known of the modules.
    pub(crate) modules: Modules,
    /// The tasks modulemgr runs ([`tasks`]).
    pub(crate) tasks: tasks::ModuleTasks,
}

/// The agent's main future.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let settings = ctx.settings.modules.clone();
    let registry = Registry::new(registry_config(&settings, &ctx.root)?);
    let store = Store::open(&ctx.root.path(STORE_DIR)).context("opening the digest store")?;
    let upper = if settings.upper == "tmpfs" {
        UpperMode::Tmpfs
    } else {
        UpperMode::Persistent {
            path: settings.upper.clone(),
        }
    };
    let status_pub = ctx.open_publication::<ModuleStatus>()?;
    let verify_pub = ctx.open_publication::<VerifyConfig>()?;
    let mount_pub = ctx.open_publication::<MountConfig>()?;
    let restored = Restored {
        statuses: items(&status_pub),
        handed: items(&verify_pub),
        stack: mount_pub.get(&settings.mount_target),
        stack_before: read_stack_before(&ctx.root),
        // A node where heartbeatd never published an assignment (no controller, or its
        // first boot) has nothing to wait for; otherwise the assignment is read from
        // heartbeatd (live, or from its persistent checkpoints) before anything leaves the
        // stack.
        desired_known: !powernode_pubsub::inspect::list(&ctx.dirs)
            .iter()
            .any(|p| p.agent == HEARTBEAT_AGENT && p.topic == ModuleConfig::NAME),
    };
    let modules = Modules::new(
        Settings {
            target: settings.mount_target.clone(),
            upper,
            trust_policy: settings.trust_policy.clone(),
        },
        restored,
    );
    let (reports_tx, mut reports_rx) = mpsc::channel(64);
    let (module_tasks, mut commits_rx) =
        tasks::ModuleTasks::new(agentbase::tasks::TaskBook::new(ctx.open_publication()?));
    let mut agent = Agent {
        registry,
        store,
        lastknown: lastknown::LastKnown::new(ctx.root.path(lastknown::DIR)),
        status_pub,
        verify_pub,
        mount_pub,
        reports_tx,
        fetches: HashMap::new(),
        local_errors: Vec::new(),
        modules,
        tasks: module_tasks,
        ctx,
    };
    let dirs = agent.ctx.dirs.clone();
    let mut desired_sub = Subscription::<ModuleConfig>::connect(&dirs, HEARTBEAT_AGENT);
    let mut verify_sub = Subscription::<VerifyStatus>::connect(&dirs, VERIFIER_AGENT);
    let mut mount_sub = Subscription::<MountStatus>::connect(&dirs, MOUNT_AGENT);
    let mut task_configs = agentbase::tasks::TaskConfigs::connect(&dirs);
    agent.read_local();
    let effects = agent.modules.reconcile();
    agent.apply(effects);
    agent.ctx.ready();
    let mut poll = tokio::time::interval(LOCAL_POLL);
    let mut watch = match agentbase::watch::DirWatch::new(&agent.ctx.root.path(local::DIR)) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the local assignments; polling every {}s", LOCAL_POLL.as_secs());
            None
        }
    };
    let mut beat = tokio::time::interval(agent.ctx.beat_interval());
    let shutdown = agent.ctx.shutdown.clone();
    let grace = tokio::time::sleep(DESIRED_GRACE);
    tokio::pin!(grace);
    loop {
        let effects = tokio::select! {
            _ = shutdown.cancelled() => break,
            () = &mut grace, if !agent.modules.desired_known => {
                tracing::info!(grace_s = DESIRED_GRACE.as_secs(), "no assignment from heartbeatd; going on with the local ones");
                agent.modules.assignment_known()
            }
            event = desired_sub.next() => agent.modules.on_desired(event),
            event = verify_sub.next() => agent.modules.on_verdict(event),
            event = mount_sub.next() => match event {
                Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                    agent.modules.on_mount(&value)
                }
                _ => Vec::new(),
            },
            Some((name, epoch, report)) = reports_rx.recv() => {
                agent.modules.on_report(&name, epoch, report)
            }
            _ = poll.tick() => agent.local_changed(),
            changed = async { watch.as_mut()?.changed().await.ok() }, if watch.is_some() => {
                if changed.is_none() {
                    tracing::warn!("watching the local assignments failed; polling only");
                    watch = None;
                }
                agent.local_changed()
            }
            () = task_configs.next() => {
                agent.on_task_configs(&task_configs);
                Vec::new()
            }
            Some((id, outcome)) = commits_rx.recv() => {
                agent.on_commit_done(&id, outcome);
                Vec::new()
            }
            _ = beat.tick() => {
                agent.ctx.beat();
                Vec::new()
            }
        };
        agent.apply(effects);
        // Whatever happened may be what a task waits for.
        agent.progress_tasks();
    }
    agent.tasks.stop();
    for cancel in agent.fetches.values() {
        cancel.cancel();
    }
    Ok(())
}

/// Where the stack applied before the one mountmgr is confirming is kept
/// ([`Effect::KeepStackBefore`]).
const STACK_BEFORE: &str = "persist/powernode/modulemgr/stack-before.json";

/// The stack kept by [`keep_stack_before`], if any (an unreadable file is as none).
fn read_stack_before(root: &agentbase::Root) -> Option<MountConfig> {
    let path = root.path(STACK_BEFORE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the stack before");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable stack before"))
        .ok()
}

/// Writes `before` durably, or removes the file for `None`.
fn keep_stack_before(root: &agentbase::Root, before: Option<&MountConfig>) -> anyhow::Result<()> {
    let path = root.path(STACK_BEFORE);
    match before {
        Some(config) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            powernode_atomicfile::write_atomic(&path, &serde_json::to_vec(config)?, 0o644)?;
        }
        None => match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        },
    }
    Ok(())
}

/// Every item of `publication`.
fn items<T: Topic>(publication: &Publication<T>) -> Vec<T> {
    publication
        .keys()
        .into_iter()
        .filter_map(|key| publication.get(&key))
        .collect()
}

impl Agent {
    /// Carries out `effects` in order, and those that their outcome leads to.
    pub(crate) fn apply(&mut self, effects: Vec<Effect>) {
        let mut queue = VecDeque::from(effects);
        while let Some(effect) = queue.pop_front() {
            queue.extend(self.carry_out(effect));
        }
    }

    /// Carries out one effect; what its outcome leads to comes back.
    fn carry_out(&mut self, effect: Effect) -> Vec<Effect> {
        match effect {
            Effect::Fetch {
                name,
                reference,
                epoch,
                discard,
            } => self.fetch(name, reference, epoch, discard),
            Effect::StopFetch(name) => {
                if let Some(cancel) = self.fetches.remove(&name) {
                    cancel.cancel();
                }
            }
            Effect::Recheck {
                name,
                epoch,
                digest,
            } => {
                self.ctx.tasks.spawn(fetch::recheck(
                    self.store.clone(),
                    digest,
                    self.reports_tx.clone(),
                    name,
                    epoch,
                ));
            }
            Effect::Status(status) => {
                self.report(self.status_pub.publish(&status));
                if status.state == ModuleState::Active {
                    // Once published, after the event raised for it: who sees this line finds
                    // both.
                    let digest = status.digest.as_deref().unwrap_or("-");
                    tracing::info!(module = %status.name, %digest, "module active");
                }
            }
            Effect::Unstatus(name) => self.report(self.status_pub.unpublish(&name)),
            Effect::Verify(config) => {
                if let Err(e) = self.verify_pub.publish(&config) {
                    let error = e.to_string();
                    self.report(Err(e));
                    if config.complete {
                        return self.modules.handover_failed(&config.name, &error);
                    }
                }
            }
            Effect::Unverify(name) => self.report(self.verify_pub.unpublish(&name)),
            Effect::Stack(config) => self.report(self.mount_pub.publish(&config)),
            Effect::Raise(raised) => raised.raise(&self.ctx.events),
            Effect::ReportError(error) => self.ctx.health.report_error(&error),
            Effect::CollectGarbage(garbage) => {
                garbage.collect(&self.store, &self.lastknown, host_architecture());
            }
            Effect::KeepStackBefore(before) => {
                if let Err(e) = keep_stack_before(&self.ctx.root, before.as_ref()) {
                    // Only a restart inside the window would miss it: a rollback then has no
                    // layers to fall back to, and nothing is collected until the window ends.
                    tracing::error!(error = %e, "cannot keep the stack before the one being confirmed");
                    self.ctx
                        .health
                        .report_error(&format!("keeping the stack before: {e}"));
                }
            }
        }
        Vec::new()
    }

    /// Starts a fetch, stopping the one running for the same module.
    fn fetch(&mut self, name: String, reference: String, epoch: u64, discard: Option<String>) {
        let cancel = self.ctx.shutdown.child_token();
        if let Some(old) = self.fetches.insert(name.clone(), cancel.clone()) {
            old.cancel();
        }
        let job = fetch::Job {
            name,
            reference,
            architecture: host_architecture().to_owned(),
            max_backoff: Duration::from_secs(self.ctx.settings.modules.max_backoff_s),
            discard,
        };
        self.ctx.tasks.spawn(fetch::run(
            job,
            self.registry.clone(),
            self.store.clone(),
            self.lastknown.clone(),
            self.reports_tx.clone(),
            epoch,
            cancel,
        ));
    }

    /// Logs and reports a failed publish (a checkpoint that cannot be written): the agent
    /// carries on, subscribers keep the previous value.
    fn report(&self, result: powernode_pubsub::Result<()>) {
        if let Err(e) = result {
            tracing::error!(error = %e, "publish failed");
            self.ctx
                .health
                .report_error(&format!("publish failed: {e}"));
        }
    }

    /// Re-reads the local assignments; the effects of reconciling if they changed.
    pub(crate) fn local_changed(&mut self) -> Vec<Effect> {
        if self.read_local() {
            self.modules.reconcile()
        } else {
            Vec::new()
        }
    }

    /// Re-reads the local assignments into the state machine; true if they changed.
    pub(crate) fn read_local(&mut self) -> bool {
        let (modules, errors) = local::read_all(&self.ctx.root.path(local::DIR));
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        if errors != self.local_errors {
            for e in &errors {
                tracing::warn!(error = %e, "ignoring a bad local module assignment");
            }
            if let Some(first) = errors.first() {
                self.ctx.health.report_error(first);
            }
            self.local_errors = errors;
        }
        let local = modules
            .into_iter()
            .map(|(name, m)| (name, m.into()))
            .collect();
        self.modules.set_local(local)
    }
}
