//! modulemgr: brings the modules the node should run from the registry into one verified,
//! mounted stack (DESIGN §2, §6; docs/modules.md).
//!
//! It reads the desired modules from `heartbeatd/ModuleConfig` (the controller's assignment)
//! and from the local assignments in `etc/powernode/modules.d` ([`local`]; the controller's
//! entry wins when both name a module). Each module goes through its own state machine,
//! published as `modulemgr/ModuleStatus`:
//!
//! ```text
//!  Resolving ──► Downloading{done,total} ──► Verifying ──► Mounting ──► Active
//!     │ ▲              │ ▲                       │             │
//!     │ └─ transient ──┘ └─ transient: retry      │             │
//!     │    (backoff, error shown)                 │             │
//!     └──────────────── Failed{reason} ◄──────────┴─────────────┘
//! ```
//!
//! A fetch ([`fetch`]) resolves the reference for this node's architecture, reads its cosign
//! signatures and streams the image into the digest store `persist/powernode/store`, resuming
//! a partial download after a crash; with the registry unreachable it goes on with the last
//! resolution kept ([`lastknown`]) if the image is in the store. The module is handed to the
//! verifier as a `VerifyConfig` when its download starts (`complete: false`: the verifier hashes
//! the image as it arrives) and again, complete, once the store has it, while the image is
//! synced to disk; once `verifier/VerifyStatus` says Verified for the same digest and the sync
//! is done, it joins the stack, published as one `MountConfig` (target from settings, layers by
//! priority), unless a module it depends on is not stacked (it then waits in Mounting, and an
//! upgrade keeps the old version stacked). When `mountmgr/MountStatus` reports that generation
//! Mounted, its modules are Active. A stack that fails to mount marks the modules it added
//! Failed (the running stack stays) and the stack is recomputed without them.
//!
//! A change of reference restarts a module; a removal cancels its fetch, takes it out of the
//! stack and, once the smaller stack is mounted, lets the store's garbage collection remove its
//! blobs. A rejected module's stored image is read again: if it no longer hashes to its digest
//! (a power cut before the sync, a failing disk), the rejection is about the copy, not the
//! module, and the image is downloaded again, once. A later verdict on the same image (the
//! trust policy was edited) takes an Active module out of the stack, or brings a rejected one
//! back.
//!
//! Raised as events ([`events`]): a module becoming Active (not again for the same image
//! after a restart of modulemgr), a download failing and retried (at growing intervals) and
//! then going through, a download failing for good. The verifier raises the rejections and
//! mountmgr the stack's switches.

pub mod commit;
pub mod events;
pub mod fetch;
pub mod lastknown;
pub mod local;
pub mod tasks;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use agentbase::Context;
use anyhow::Context as _;
use powernode_modules::digest::Digest;
use powernode_modules::format::{host_architecture, ModuleManifest};
use powernode_modules::registry::{Credential, Registry, RegistryConfig};
use powernode_modules::store::Store;
use powernode_pubsub::{Event, Publication, Subscription};
use powernode_types::{
    ModuleConfig, ModuleState, ModuleStatus, MountConfig, MountLayer, MountState, MountStatus,
    Topic, UpperMode, VerifyConfig, VerifyState, VerifyStatus,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fetch::{Fetched, Report};

/// The agent that publishes the controller's assignment.
pub const HEARTBEAT_AGENT: &str = "heartbeatd";
/// The verifier agent.
pub const VERIFIER_AGENT: &str = "verifier";
/// The mount agent.
pub const MOUNT_AGENT: &str = "mountmgr";
/// The digest store, under the root.
pub const STORE_DIR: &str = "persist/powernode/store";
/// How long modulemgr waits for heartbeatd's assignment before it takes the local ones as
/// the whole desired set (a node without a controller).
const DESIRED_GRACE: Duration = Duration::from_secs(5);
/// How often the local assignments are re-read besides when inotify says they changed.
const LOCAL_POLL: Duration = Duration::from_secs(5);

/// One module's place in the pipeline.
#[derive(Debug)]
struct Module {
    config: ModuleConfig,
    status: ModuleStatus,
    /// Bumped on every restart of the module's fetch, so late reports of an old one are ignored.
    epoch: u64,
    cancel: Option<CancellationToken>,
    fetched: Option<Fetched>,
    verified: bool,
    /// Whether the fetched image is synced to disk (it joins the stack only then).
    durable: bool,
    /// Whether this module's image was already downloaded again after the verifier rejected a
    /// damaged stored copy: a second rejection is final.
    refetched: bool,
    /// Whether the module failed because the verifier rejected it: a later verdict that accepts
    /// it (the trust policy changed) brings it back.
    rejected: bool,
    /// Since when, and how many attempts in a row, its download has been failing (transient
    /// failures being retried); `None` while it is not.
    failing: Option<Failing>,
}

/// A download being retried: for `module.download_recovered`.
#[derive(Debug)]
struct Failing {
    since: Instant,
    attempts: u32,
}

/// The agent's state.
struct Agent {
    ctx: Context,
    registry: Registry,
    store: Store,
    lastknown: lastknown::LastKnown,
    status_pub: Publication<ModuleStatus>,
    verify_pub: Publication<VerifyConfig>,
    mount_pub: Publication<MountConfig>,
    reports_tx: mpsc::Sender<(String, u64, Report)>,
    controller: BTreeMap<String, ModuleConfig>,
    local: BTreeMap<String, ModuleConfig>,
    local_errors: Vec<String>,
    modules: BTreeMap<String, Module>,
    epochs: u64,
    target: String,
    upper: UpperMode,
    /// The stack last published as `MountConfig`.
    stack: Option<MountConfig>,
    /// Digests of the stack mountmgr reports active.
    mounted: Vec<String>,
    /// mountmgr's latest status of the target.
    mount_status: Option<MountStatus>,
    /// The verifier's latest verdict per module.
    verdicts: BTreeMap<String, VerifyStatus>,
    /// Image digests the verifier rejected: never stacked, not even as the old layer of a
    /// module whose new version is still on its way.
    rejected: HashSet<String>,
    /// The module manifest of each image fetched (by image digest): a layer's dependencies are
    /// those of the version it holds. Pruned with the store.
    layer_manifests: std::collections::HashMap<String, ModuleManifest>,
    /// Whether the controller's assignment is known (heartbeatd's snapshot arrived, or the
    /// grace period for a node without heartbeatd ran out). Until it is, nothing is taken out
    /// of the stack and nothing is collected: an empty subscription is not an empty assignment.
    desired_known: bool,
    /// Whether a stack has been published since the start. The first one waits until the
    /// assignment is known and every module has been verified or has failed, so a restart or a
    /// reboot does not tear down the stack mountmgr kept or rebuilt.
    published_since_start: bool,
    /// The last stack mountmgr reported Mounted (at start: the last one published, until
    /// mountmgr says otherwise).
    applied: Option<MountConfig>,
    /// The stack reported Mounted before `applied`: mounted again when mountmgr rolls
    /// `applied` back in its confirmation window.
    applied_before: Option<MountConfig>,
    /// The modules (name → image digest) an earlier run of modulemgr left Active: the same
    /// image becoming Active again after a restart is not news, and raises nothing.
    active_before: HashMap<String, String>,
    /// The tasks modulemgr runs ([`tasks`]).
    tasks: tasks::ModuleTasks,
}

/// How to reach registries, from the `[modules]` settings: plain-HTTP registries, timeouts,
/// and each credential's password read from its file under `root`.
pub fn registry_config(
    settings: &agentbase::settings::ModuleSettings,
    root: &agentbase::root::Root,
) -> anyhow::Result<RegistryConfig> {
    let mut credentials = Vec::new();
    for c in &settings.credentials {
        let path = root.path(&c.password_file);
        let password = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading the password of {} from {}",
                c.registry,
                path.display()
            )
        })?;
        credentials.push(Credential {
            registry: c.registry.clone(),
            username: c.username.clone(),
            password: password.trim_end().to_owned(),
        });
    }
    Ok(RegistryConfig {
        plain_http: settings.plain_http.clone(),
        credentials,
        connect_timeout: Some(Duration::from_millis(settings.connect_timeout_ms)),
    })
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
    let stack = mount_pub.get(&settings.mount_target);
    let active_before = status_pub
        .keys()
        .into_iter()
        .filter_map(|key| status_pub.get(&key))
        .filter(|s| s.state == ModuleState::Active)
        .filter_map(|s| Some((s.name, s.digest?)))
        .collect();
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
        controller: BTreeMap::new(),
        local: BTreeMap::new(),
        local_errors: Vec::new(),
        modules: BTreeMap::new(),
        epochs: 0,
        target: settings.mount_target.clone(),
        upper,
        applied: stack.clone(),
        applied_before: None,
        stack,
        mounted: Vec::new(),
        mount_status: None,
        verdicts: BTreeMap::new(),
        rejected: HashSet::new(),
        layer_manifests: std::collections::HashMap::new(),
        desired_known: false,
        published_since_start: false,
        active_before,
        tasks: module_tasks,
        ctx,
    };
    // A node where heartbeatd never published an assignment (no controller, or its first
    // boot) has nothing to wait for; otherwise the assignment is read from heartbeatd (live,
    // or from its persistent checkpoints) before anything leaves the stack.
    agent.desired_known = !powernode_pubsub::inspect::list(&agent.ctx.dirs)
        .iter()
        .any(|p| p.agent == HEARTBEAT_AGENT && p.topic == ModuleConfig::NAME);
    let mut desired_sub = Subscription::<ModuleConfig>::connect(&agent.ctx.dirs, HEARTBEAT_AGENT);
    let mut verify_sub = Subscription::<VerifyStatus>::connect(&agent.ctx.dirs, VERIFIER_AGENT);
    let mut mount_sub = Subscription::<MountStatus>::connect(&agent.ctx.dirs, MOUNT_AGENT);
    let mut task_configs = agentbase::tasks::TaskConfigs::connect(&agent.ctx.dirs);
    agent.read_local();
    agent.reconcile();
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
        tokio::select! {
            _ = shutdown.cancelled() => break,
            () = &mut grace, if !agent.desired_known => {
                tracing::info!(grace_s = DESIRED_GRACE.as_secs(), "no assignment from heartbeatd; going on with the local ones");
                agent.desired_known = true;
                agent.restack();
            }
            event = desired_sub.next() => agent.on_desired(event),
            event = verify_sub.next() => match event {
                Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                    agent.verdicts.insert(value.name.clone(), value.clone());
                    agent.on_verify(&value);
                }
                Event::Delete { key, .. } => {
                    agent.verdicts.remove(&key);
                }
                _ => {}
            },
            event = mount_sub.next() => {
                if let Event::Create { value, .. } | Event::Modify { new: value, .. } = event {
                    agent.on_mount(&value);
                }
            }
            Some((name, epoch, report)) = reports_rx.recv() => agent.on_report(&name, epoch, report),
            _ = poll.tick() => {
                if agent.read_local() {
                    agent.reconcile();
                }
            }
            changed = async { watch.as_mut()?.changed().await.ok() }, if watch.is_some() => {
                if changed.is_none() {
                    tracing::warn!("watching the local assignments failed; polling only");
                    watch = None;
                }
                if agent.read_local() {
                    agent.reconcile();
                }
            }
            () = task_configs.next() => agent.on_task_configs(&task_configs),
            Some((id, outcome)) = commits_rx.recv() => agent.on_commit_done(&id, outcome),
            _ = beat.tick() => agent.ctx.beat(),
        }
        // Whatever happened may be what a task waits for.
        agent.progress_tasks();
    }
    agent.tasks.stop();
    for module in agent.modules.values() {
        if let Some(cancel) = &module.cancel {
            cancel.cancel();
        }
    }
    Ok(())
}

/// What the verifier is handed for `fetched`: the complete image, or (`complete` false) the
/// one the store is still writing.
fn verify_config(
    name: &str,
    fetched: &Fetched,
    complete: bool,
    trust_policy: &str,
    refetched: bool,
) -> VerifyConfig {
    VerifyConfig {
        name: name.to_owned(),
        image_path: fetched.image_path.to_string_lossy().into_owned(),
        digest: fetched.resolved.image.digest.clone(),
        size: fetched.resolved.image.size,
        complete,
        manifest: fetched.resolved.manifest.clone(),
        manifest_digest: fetched.resolved.manifest_digest.to_string(),
        repository: fetched.resolved.repository.clone(),
        signatures: fetched.signatures.clone(),
        signed_index: fetched
            .resolved
            .signed_index
            .as_ref()
            .map(ToString::to_string),
        trust_policy: trust_policy.to_owned(),
        attempt: u32::from(refetched),
    }
}

impl Agent {
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

    fn on_desired(&mut self, event: Event<ModuleConfig>) {
        match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                self.controller.insert(value.name.clone(), value);
            }
            Event::Delete { key, .. } => {
                self.controller.remove(&key);
            }
            Event::Synchronized if !self.desired_known => self.desired_known = true,
            // After a reconnect the snapshot's deletes arrive as Delete events; until then the
            // last known assignment stands.
            _ => return,
        }
        self.reconcile();
    }

    /// Re-reads the local assignments; true if they changed.
    fn read_local(&mut self) -> bool {
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
        let local: BTreeMap<String, ModuleConfig> = modules
            .into_values()
            .map(|m| {
                let config = ModuleConfig {
                    name: m.name.clone(),
                    reference: m.reference,
                    priority: m.priority,
                    generation: 0,
                };
                (m.name, config)
            })
            .collect();
        let changed = local != self.local;
        self.local = local;
        changed
    }

    /// Brings the modules in line with the desired set.
    fn reconcile(&mut self) {
        let mut desired = self.local.clone();
        desired.extend(self.controller.clone());
        let gone: Vec<String> = self
            .modules
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(module) = self.modules.remove(&name) {
                if let Some(cancel) = module.cancel {
                    cancel.cancel();
                }
            }
            self.report(self.status_pub.unpublish(&name));
            self.report(self.verify_pub.unpublish(&name));
            tracing::info!(module = %name, "module removed");
        }
        // Statuses left from an earlier run for modules no longer wanted (only once the
        // assignment is known: before that, a missing module may just not have arrived yet).
        for key in self
            .status_pub
            .keys()
            .into_iter()
            .filter(|_| self.desired_known)
        {
            if !desired.contains_key(&key) {
                self.report(self.status_pub.unpublish(&key));
                self.report(self.verify_pub.unpublish(&key));
            }
        }
        for (name, config) in desired {
            match self.modules.get_mut(&name) {
                Some(m) if m.config.reference == config.reference => m.config = config,
                _ => self.start(config),
            }
        }
        self.restack();
    }

    /// (Re)starts a module's fetch.
    fn start(&mut self, config: ModuleConfig) {
        if let Some(old) = self.modules.get(&config.name) {
            if let Some(cancel) = &old.cancel {
                cancel.cancel();
            }
        }
        self.epochs += 1;
        let epoch = self.epochs;
        let cancel = self.ctx.shutdown.child_token();
        let job = fetch::Job {
            name: config.name.clone(),
            reference: config.reference.clone(),
            architecture: host_architecture().to_owned(),
            max_backoff: Duration::from_secs(self.ctx.settings.modules.max_backoff_s),
        };
        tracing::info!(module = %config.name, reference = %config.reference, "fetching module");
        self.ctx.tasks.spawn(fetch::run(
            job,
            self.registry.clone(),
            self.store.clone(),
            self.lastknown.clone(),
            self.reports_tx.clone(),
            epoch,
            cancel.clone(),
        ));
        let status = ModuleStatus {
            name: config.name.clone(),
            reference: config.reference.clone(),
            state: ModuleState::Resolving,
            digest: None,
            bytes_done: 0,
            bytes_total: None,
            error: None,
        };
        self.report(self.status_pub.publish(&status));
        self.modules.insert(
            config.name.clone(),
            Module {
                config,
                status,
                epoch,
                cancel: Some(cancel),
                fetched: None,
                verified: false,
                durable: false,
                refetched: false,
                rejected: false,
                failing: None,
            },
        );
    }

    fn publish_status(&mut self, name: &str) {
        if let Some(m) = self.modules.get(name) {
            let result = self.status_pub.publish(&m.status);
            self.report(result);
        }
    }

    fn fail(&mut self, name: &str, reason: String) {
        if let Some(m) = self.modules.get_mut(name) {
            tracing::warn!(module = %name, reason = %reason, "module failed");
            m.status.state = ModuleState::Failed;
            m.status.error = Some(reason);
            m.verified = false;
            m.failing = None;
            // The token stays: the fetch task may still be running (a background refresh after
            // an offline start), and a removal or restart must still stop it.
        }
        // Should it come back, that is news again.
        self.active_before.remove(name);
        self.publish_status(name);
    }

    fn on_report(&mut self, name: &str, epoch: u64, report: Report) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        if m.epoch != epoch {
            return;
        }
        match report {
            Report::Resolved { digest, total } => {
                m.status.state = ModuleState::Downloading;
                m.status.digest = Some(digest);
                m.status.bytes_total = Some(total);
                m.status.error = None;
            }
            Report::Progress { done } => {
                m.status.state = ModuleState::Downloading;
                m.status.bytes_done = done;
            }
            Report::Retrying {
                error,
                attempt,
                retry_in,
            } => {
                m.status.error = Some(format!(
                    "{error}; retrying in {:.1}s",
                    retry_in.as_secs_f64()
                ));
                let failing = m.failing.get_or_insert(Failing {
                    since: Instant::now(),
                    attempts: 0,
                });
                failing.attempts = attempt;
                if events::failing_worth_raising(attempt) {
                    let reference = &m.config.reference;
                    events::download_failing(
                        &self.ctx.events,
                        name,
                        reference,
                        &error,
                        attempt,
                        retry_in,
                    );
                }
            }
            Report::Arriving(arriving) => {
                // The verifier may start on the image while it arrives; its verdict waits
                // for the complete image (Done).
                let verify = verify_config(
                    name,
                    &arriving,
                    false,
                    &self.ctx.settings.modules.trust_policy,
                    m.refetched,
                );
                if self.verify_pub.get(name).as_ref() != Some(&verify) {
                    self.report(self.verify_pub.publish(&verify));
                }
                return;
            }
            Report::Failed(reason) => {
                events::download_failed(&self.ctx.events, name, &m.config.reference, &reason);
                // A download that will not complete: the verifier stops following it.
                if self.verify_pub.get(name).is_some_and(|c| !c.complete) {
                    self.report(self.verify_pub.unpublish(name));
                }
                return self.fail(name, reason);
            }
            Report::Moved => {
                tracing::info!(module = %name, "the reference names another manifest now; fetching it");
                let config = m.config.clone();
                return self.start(config);
            }
            Report::Durable => {
                m.durable = true;
                return self.advance(name);
            }
            Report::Rechecked { damage, verdict } => {
                // Only while the rejection still stands: a later verdict (the trust policy
                // changed meanwhile) has moved the module on, and this answer is stale.
                let digest = m.fetched.as_ref().map(|f| f.resolved.image.digest.clone());
                let still_rejected = m.status.state == ModuleState::Verifying
                    && !m.verified
                    && self.verdicts.get(name).is_some_and(|v| {
                        v.state == VerifyState::Failed && Some(&v.digest) == digest.as_ref()
                    });
                if !still_rejected {
                    return;
                }
                return match damage {
                    None => self.reject(name, verdict),
                    Some(damage) => {
                        tracing::warn!(module = %name, %damage, "the stored image is damaged (a power cut before it was synced, or a failing disk); downloading it again");
                        self.refetch(name)
                    }
                };
            }
            Report::Done(fetched) => {
                if let Some(failing) = m.failing.take() {
                    events::download_recovered(
                        &self.ctx.events,
                        name,
                        &m.config.reference,
                        failing.attempts,
                        failing.since.elapsed(),
                    );
                }
                m.status.state = ModuleState::Verifying;
                // Set here too: an offline start reports no Resolved.
                m.status.digest = Some(fetched.resolved.image.digest.clone());
                m.status.bytes_total = Some(fetched.resolved.image.size);
                m.status.bytes_done = fetched.resolved.image.size;
                m.status.error = None;
                let verify = verify_config(
                    name,
                    &fetched,
                    true,
                    &self.ctx.settings.modules.trust_policy,
                    m.refetched,
                );
                self.layer_manifests.insert(
                    fetched.resolved.image.digest.clone(),
                    fetched.resolved.module.clone(),
                );
                m.fetched = Some(*fetched);
                m.verified = false;
                m.durable = false;
                // The same config as already handed over (a restart, or the same module
                // fetched again): the verifier will not see a change, and its verdict on it
                // stands, so take that verdict rather than wait for one that will not come.
                let unchanged = self.verify_pub.get(name).as_ref() == Some(&verify);
                if let Err(e) = self.verify_pub.publish(&verify) {
                    return self.fail(name, format!("cannot hand the module to the verifier: {e}"));
                }
                if unchanged {
                    self.publish_status(name);
                    if let Some(verdict) = self.verdicts.get(name).cloned() {
                        self.on_verify(&verdict);
                    }
                    return;
                }
            }
        }
        self.publish_status(name);
    }

    fn on_verify(&mut self, v: &VerifyStatus) {
        match v.state {
            VerifyState::Failed => {
                self.rejected.insert(v.digest.clone());
            }
            VerifyState::Verified => {
                self.rejected.remove(&v.digest);
            }
            VerifyState::Verifying => {}
        }
        let Some(m) = self.modules.get_mut(&v.name) else {
            return;
        };
        let Some(fetched) = &m.fetched else { return };
        if fetched.resolved.image.digest != v.digest
            || fetched.resolved.manifest_digest.to_string() != v.manifest_digest
        {
            return;
        }
        if m.status.state != ModuleState::Verifying {
            // A verdict that withdraws an image already in use (the trust policy changed): it
            // leaves the stack.
            if v.state == VerifyState::Failed && m.status.state != ModuleState::Failed {
                let reason = format!(
                    "verification failed: {}",
                    v.reason.as_deref().unwrap_or("no reason given")
                );
                return self.reject(&v.name, reason);
            }
            // A rejected module the verifier now accepts (a key was added to the policy): it
            // goes on to the stack.
            if v.state == VerifyState::Verified && m.rejected {
                tracing::info!(module = %v.name, "the verifier accepts the module now");
                m.rejected = false;
                m.verified = true;
                m.status.state = ModuleState::Verifying;
                m.status.error = None;
                self.advance(&v.name);
            }
            return;
        }
        match v.state {
            VerifyState::Verifying => {}
            VerifyState::Verified => {
                m.verified = true;
                self.advance(&v.name);
            }
            VerifyState::Failed => {
                let reason = format!(
                    "verification failed: {}",
                    v.reason.as_deref().unwrap_or("no reason given")
                );
                m.verified = false;
                if m.refetched {
                    return self.reject(&v.name, reason);
                }
                // The stored copy may be what is wrong, not the module: read it again first.
                self.ctx.tasks.spawn(fetch::recheck(
                    self.store.clone(),
                    v.digest.clone(),
                    reason,
                    self.reports_tx.clone(),
                    v.name.clone(),
                    m.epoch,
                ));
            }
        }
    }

    /// Fails a module the verifier rejected and takes it out of the stack.
    fn reject(&mut self, name: &str, reason: String) {
        self.fail(name, reason);
        if let Some(m) = self.modules.get_mut(name) {
            m.rejected = true;
        }
        self.restack();
    }

    /// Moves a module on to Mounting once its image is both verified and durable.
    fn advance(&mut self, name: &str) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        if m.status.state != ModuleState::Verifying || !m.verified || !m.durable {
            return;
        }
        m.status.state = ModuleState::Mounting;
        self.publish_status(name);
        self.restack();
        // The stack may not have changed (a restart re-verifies what is mounted): then the
        // status mountmgr already gave answers it.
        if let Some(status) = self.mount_status.clone() {
            if status.state == MountState::Mounted {
                self.on_mount(&status);
            }
        }
    }

    /// Throws away a module's damaged stored image and downloads it again, once.
    fn refetch(&mut self, name: &str) {
        let Some(m) = self.modules.get(name) else {
            return;
        };
        let config = m.config.clone();
        if let Some(fetched) = &m.fetched {
            if let Ok(digest) = Digest::parse(&fetched.resolved.image.digest) {
                if let Err(e) = self.store.remove(&digest) {
                    return self.fail(name, format!("cannot remove the damaged image: {e}"));
                }
            }
            self.rejected.remove(&fetched.resolved.image.digest);
        }
        // Withdrawn so that the new download's config is news to the verifier, which then
        // checks it afresh instead of its verdict on the damaged copy standing.
        self.report(self.verify_pub.unpublish(name));
        self.start(config);
        if let Some(m) = self.modules.get_mut(name) {
            m.refetched = true;
        }
    }

    /// The stack the modules make: each verified module's image; for a module whose new
    /// version is not verified (still in the pipeline, or failed), the layer it has in the
    /// current stack, so an upgrade replaces the old image only once the new one is ready.
    /// Sorted by priority (mountmgr orders by priority itself; this keeps the config stable).
    /// A new version whose dependencies are not all in the stack is held out of it (the reason
    /// is in the second list) and the module keeps its current layer, if that one's are.
    fn wanted_stack(&self) -> (Vec<MountLayer>, Vec<(String, String)>) {
        let current = |name: &str| {
            self.applied
                .as_ref()
                .and_then(|s| s.layers.iter().find(|l| l.name == name).cloned())
                .filter(|l| !self.rejected.contains(&l.digest))
        };
        // Each module's first choice, and the layer to fall back to.
        let mut choices: Vec<(MountLayer, Option<MountLayer>)> = self
            .modules
            .values()
            .filter_map(|m| match &m.fetched {
                Some(f) if m.verified && m.durable && m.status.state != ModuleState::Failed => {
                    let new = MountLayer {
                        name: m.config.name.clone(),
                        image_path: f.image_path.to_string_lossy().into_owned(),
                        digest: f.resolved.image.digest.clone(),
                        priority: m.config.priority,
                        health_check: f.resolved.module.health_check(),
                    };
                    let old = current(&m.config.name).filter(|old| old.digest != new.digest);
                    Some((new, old))
                }
                _ => current(&m.config.name).map(|old| (old, None)),
            })
            .filter(|(layer, _)| !self.rejected.contains(&layer.digest))
            .collect();
        // Holding one module out can leave another without its dependency: until nothing
        // changes.
        let mut held = Vec::new();
        loop {
            let stacked: HashSet<String> = choices
                .iter()
                .map(|(l, _)| self.module_name(l).to_owned())
                .collect();
            let mut changed = false;
            choices.retain_mut(|(layer, fallback)| {
                let Some(reason) = self.missing_dependency(layer, &stacked) else {
                    return true;
                };
                held.push((layer.name.clone(), reason));
                changed = true;
                match fallback.take() {
                    Some(old) => {
                        *layer = old;
                        true
                    }
                    None => false,
                }
            });
            if !changed {
                break;
            }
        }
        let mut layers: Vec<MountLayer> = choices.into_iter().map(|(l, _)| l).collect();
        layers.sort_by(|a, b| a.priority.cmp(&b.priority).then(a.name.cmp(&b.name)));
        (layers, held)
    }

    /// Why `layer` cannot be stacked with the modules `stacked` (by module name): the first
    /// dependency its module manifest names that is not among them. The manifest is the one of
    /// the image in the layer, which for a module being upgraded is the old version's.
    fn missing_dependency(&self, layer: &MountLayer, stacked: &HashSet<String>) -> Option<String> {
        let manifest = self.layer_manifests.get(&layer.digest)?;
        let missing = manifest
            .dependencies
            .iter()
            .find(|d| !stacked.contains(*d))?;
        let assigned = self.modules.values().any(|m| {
            m.config.name == *missing
                || m.fetched
                    .as_ref()
                    .is_some_and(|f| f.resolved.module.name == *missing)
        });
        Some(if assigned {
            format!("waiting for module {missing}, which it depends on")
        } else {
            format!("depends on module {missing}, which is not assigned to this node")
        })
    }

    /// The name a layer's module goes by in other modules' dependencies: the name in its
    /// module manifest (the assignment's name when the manifest is not known).
    fn module_name<'a>(&'a self, layer: &'a MountLayer) -> &'a str {
        self.layer_manifests
            .get(&layer.digest)
            .map_or(layer.name.as_str(), |m| m.name.as_str())
    }

    /// Publishes a new `MountConfig` if the stack changed (see `published_since_start` for
    /// when the first one after a start may go out).
    fn restack(&mut self) {
        if !self.published_since_start {
            let pending = self.modules.values().any(|m| {
                matches!(
                    m.status.state,
                    ModuleState::Resolving | ModuleState::Downloading | ModuleState::Verifying
                )
            });
            if !self.desired_known || pending {
                return;
            }
        }
        let (layers, held) = self.wanted_stack();
        for (name, reason) in held {
            let Some(m) = self.modules.get_mut(&name) else {
                continue;
            };
            // A module on its way into the stack, or in it until now, waits (and says why); an
            // old layer kept for a module still in the pipeline has its own state to show.
            let waits = matches!(m.status.state, ModuleState::Mounting | ModuleState::Active);
            if waits && m.status.error.as_ref() != Some(&reason) {
                tracing::info!(module = %name, %reason, "held out of the stack");
                m.status.state = ModuleState::Mounting;
                m.status.error = Some(reason);
                self.publish_status(&name);
            }
        }
        if let Some(stack) = &self.stack {
            if stack.layers == layers && stack.upper == self.upper {
                self.published_since_start = true;
                return;
            }
        }
        let generation = self.stack.as_ref().map_or(1, |s| s.generation + 1);
        let config = MountConfig {
            target: self.target.clone(),
            generation,
            layers,
            upper: self.upper.clone(),
        };
        tracing::info!(
            target = %config.target,
            generation,
            layers = ?config.layers.iter().map(|l| &l.name).collect::<Vec<_>>(),
            "new stack"
        );
        let result = self.mount_pub.publish(&config);
        self.report(result);
        self.stack = Some(config);
        self.published_since_start = true;
    }

    fn on_mount(&mut self, status: &MountStatus) {
        if status.target != self.target {
            return;
        }
        self.mount_status = Some(status.clone());
        let Some(stack) = self.stack.clone() else {
            return;
        };
        if status.generation != stack.generation {
            return;
        }
        match status.state {
            MountState::Mounting => {}
            MountState::Mounted => {
                self.mounted = status.layers.clone();
                if self.applied.as_ref() != Some(&stack) {
                    self.applied_before = self.applied.replace(stack.clone());
                }
                for layer in &stack.layers {
                    if let Some(m) = self.modules.get_mut(&layer.name) {
                        // The layer may be the old version, kept while the new one waits.
                        let is_new = m
                            .fetched
                            .as_ref()
                            .is_some_and(|f| f.resolved.image.digest == layer.digest);
                        if m.verified && is_new && m.status.state == ModuleState::Mounting {
                            m.status.state = ModuleState::Active;
                            m.status.error = None;
                            let again = self
                                .active_before
                                .remove(&layer.name)
                                .is_some_and(|d| d == layer.digest);
                            if !again {
                                let version = m
                                    .fetched
                                    .as_ref()
                                    .map_or("", |f| f.resolved.module.version.as_str());
                                events::active(
                                    &self.ctx.events,
                                    &layer.name,
                                    &m.config.reference,
                                    &layer.digest,
                                    version,
                                    stack.generation,
                                );
                            }
                            // After the raise: a test that sees this line finds the event.
                            tracing::info!(module = %layer.name, digest = %layer.digest, "module active");
                        }
                    }
                    self.publish_status(&layer.name);
                }
                self.collect_garbage();
            }
            MountState::Failed | MountState::RolledBack => {
                if status.state == MountState::RolledBack && self.applied.as_ref() == Some(&stack) {
                    // Rolled back after it was Mounted (a health check failed in mountmgr's
                    // confirmation window): the stack before is mounted again, and the layers a
                    // failed module falls back to are its, not the rolled-back stack's.
                    self.applied = self.applied_before.take();
                }
                self.mounted = status.layers.clone();
                let reason = format!(
                    "mount failed: {}",
                    status.error.as_deref().unwrap_or("no reason given")
                );
                let blamed: Vec<String> = stack
                    .layers
                    .iter()
                    .filter(|l| !status.layers.contains(&l.digest))
                    .map(|l| l.name.clone())
                    .collect();
                if blamed.is_empty() {
                    self.ctx.health.report_error(&reason);
                }
                for name in blamed {
                    self.fail(&name, reason.clone());
                }
                self.restack();
            }
        }
    }

    /// Removes store blobs no desired module and no mounted layer uses, and the kept
    /// resolutions of references no module is assigned any more.
    fn collect_garbage(&mut self) {
        if !self.desired_known {
            return;
        }
        let references: Vec<&str> = self
            .modules
            .values()
            .map(|m| m.config.reference.as_str())
            .collect();
        self.lastknown.retain(&references, host_architecture());
        let mut keep: HashSet<Digest> = HashSet::new();
        for m in self.modules.values() {
            if let Some(d) = m
                .status
                .digest
                .as_deref()
                .and_then(|d| Digest::parse(d).ok())
            {
                keep.insert(d);
            }
        }
        for d in &self.mounted {
            if let Ok(d) = Digest::parse(d) {
                keep.insert(d);
            }
        }
        // A module still resolving has no digest yet: its partial download must survive.
        if self
            .modules
            .values()
            .any(|m| m.status.digest.is_none() && m.status.state != ModuleState::Failed)
        {
            return;
        }
        self.layer_manifests
            .retain(|digest, _| Digest::parse(digest).is_ok_and(|d| keep.contains(&d)));
        match self.store.gc(&keep) {
            Ok((removed, freed)) if !removed.is_empty() => {
                tracing::info!(
                    blobs = removed.len(),
                    bytes = freed,
                    "store garbage collected"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "store garbage collection failed"),
        }
    }
}
