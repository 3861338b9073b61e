//! heartbeatd: the node's regular report to the controller, and the desired state that comes
//! back (DESIGN §2, §5; docs/heartbeat.md).
//!
//! Every heartbeat interval it posts `status/heartbeat` with the boot id and architecture (from
//! `identitymgr/NodeIdentity`), the agent version, uptime, load and memory (from `proc` under
//! the root, [`host`]), the module and mount state (from `modulemgr/ModuleStatus` and `mountmgr/MountStatus`, [`report`])
//! and the desired-state generation it last applied. The reply's desired state is published as
//! `heartbeatd/ModuleConfig` items and `heartbeatd/NetworkConfig` ([`desired`]); how the
//! conversation goes is published as `heartbeatd/ControllerStatus` (key `global`).
//!
//! # States
//!
//! The agent is one [`State`] at a time:
//!
//! ```text
//!                 start
//!                   │
//!                   ▼
//!   ┌──────────► Waiting{reason} ◄──────── identity or enrollment no longer usable ─────┐
//!   │               │                                                                   │
//!   │   identity and enrollment usable (debounced)                                      │
//!   │               ▼                                                                   │
//!   │        Scheduled{due} ── due: heartbeat ok ──► Scheduled{now + interval}          │
//!   │           ▲   │                                                                   │
//!   │   ok      │   └── due: heartbeat fails ──► Failing{retry_at = now + backoff} ─────┤
//!   │           └────────────────────────────────────── retry_at: heartbeat ok          │
//!   │                                          Failing ── retry_at: fails again ──► Failing
//!   └─────────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! *Usable* means: a `NodeIdentity` with a boot id; an `EnrollmentStatus` that is `Enrolled`,
//! `Rotating` or `RotationFailing` with a certificate fingerprint and a `not_after_ms` in the
//! future; and controller URLs (settings, else the enrollment's, else the identity's). A
//! change to anything reported (identity, enrollment) moves the next heartbeat to within
//! [`DEBOUNCE`]. A new certificate fingerprint makes the client reload the PKI files and swap
//! its TLS identity ([`ControllerClient::set_identity`]) before the next call. While failing,
//! the delay is the transport [`Backoff`] (from [`BACKOFF_MIN`], doubling, jittered, capped by
//! `max_backoff_s`) instead of the interval, except that a connection the controller's host
//! refused (it is down or restarting) is tried again within one interval: such an attempt
//! costs the controller nothing, and the node is back within an interval of its return
//! (docs/heartbeat.md, "Failing"). With several controller URLs, each call goes to the one in
//! use and fails over to the next that answers (the transport's failover); the one that
//! answered the last heartbeat is published as `ControllerStatus.controller_url`. Every state
//! publishes `ControllerStatus` when it is entered; the main loop beats in every state and
//! shutdown ends it at once, also during a request; then [`drain`] sends the task reports it
//! holds, within a bound.
//!
//! The heartbeat carries the node's enrollment and rotation state as enrollmgr last published
//! it (`enrollment`), so the controller knows when a node's rotation has been failing since.
//!
//! Beside the heartbeat it holds the controller's long-poll [`watch`], which makes it
//! heartbeat at once when a new desired state is set and lease at once when a task is queued;
//! leased tasks are handed to the agent that owns their kind, renewed and reported by
//! [`tasks`] (docs/tasks.md).
//!
//! # Events
//!
//! An [`outage`] starts at the first failed heartbeat. Once it has lasted more than
//! `[controller] unreachable_after_intervals` heartbeat intervals, `controller.unreachable`
//! is raised (once); when a heartbeat succeeds after that, `controller.reachable` says how long
//! the outage was. A failure shorter than that raises nothing.

pub mod desired;
pub mod drain;
pub mod host;
pub mod outage;
pub mod report;
pub mod tasks;
pub mod watch;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentbase::Context;
use anyhow::Context as _;
use powernode_pubsub::{Event, Publication, Subscription};
use powernode_transport::pki::PkiPaths;
use powernode_transport::{Backoff, ControllerClient, TransportError};
use powernode_types::node_api::{EnrollmentReport, HeartbeatRequest, HeartbeatResponse};
use powernode_types::{
    ControllerStatus, EnrollmentState, EnrollmentStatus, ModuleConfig, ModuleStatus, MountStatus,
    NetworkConfig, NodeIdentity, TaskConfig, TaskStatus, GLOBAL_KEY,
};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long after a change to what it reports the agent sends a heartbeat, so that a burst of
/// changes makes one heartbeat.
pub const DEBOUNCE: Duration = Duration::from_millis(200);
/// The first retry delay after a failed heartbeat.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The interval the controller may ask for is clamped to this range, in seconds.
pub const INTERVAL_RANGE_S: (u32, u32) = (1, 3600);
/// The node API call.
pub const HEARTBEAT_CALL: &str = "status/heartbeat";
/// How often held tasks are looked at for a renewal due or a report to send again.
pub const TASK_TICK: Duration = Duration::from_secs(1);
/// The agent that publishes `NodeIdentity`.
pub const IDENTITY_AGENT: &str = "identitymgr";
/// The agent that publishes `EnrollmentStatus`.
pub const ENROLLMENT_AGENT: &str = "enrollmgr";

/// The agent's state.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Not heartbeating: no usable identity, enrollment or controller URL. `reason` is what is
    /// missing, also published as `ControllerStatus.last_error`.
    Waiting {
        /// Why nothing is sent.
        reason: String,
    },
    /// Heartbeating; the next one is sent at `due`.
    Scheduled {
        /// When the next heartbeat goes out.
        due: Instant,
    },
    /// The last heartbeat failed; the next attempt is at `retry_at` (backoff, not interval).
    Failing {
        /// When the next attempt goes out.
        retry_at: Instant,
    },
}

impl State {
    /// When the next heartbeat is sent, if one is planned.
    pub fn next_send(&self) -> Option<Instant> {
        match self {
            State::Waiting { .. } => None,
            State::Scheduled { due } => Some(*due),
            State::Failing { retry_at } => Some(*retry_at),
        }
    }

    /// The same state with its next send no later than `at`; `Waiting` becomes `Scheduled`.
    fn hurry(self, at: Instant) -> State {
        match self {
            State::Waiting { .. } => State::Scheduled { due: at },
            State::Scheduled { due } => State::Scheduled { due: due.min(at) },
            State::Failing { retry_at } => State::Failing {
                retry_at: retry_at.min(at),
            },
        }
    }
}

/// What a heartbeat that went through tells beyond the desired state.
struct Exchanged {
    /// The controller URL that answered.
    answered: String,
    /// Tasks queued for the node, if the controller counts them.
    tasks_queued: Option<u32>,
}

/// Why a heartbeat failed: the reason to report, and whether no connection could be made at
/// all (which decides how soon to try again).
struct Failure {
    error: String,
    refused: bool,
}

impl From<String> for Failure {
    fn from(error: String) -> Failure {
        Failure {
            error,
            refused: false,
        }
    }
}

/// What a heartbeat needs from the other agents, once they have said it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The controller's URLs, in the order to try them (never empty).
    pub urls: Vec<String>,
    /// Fingerprint of the certificate enrollmgr last installed.
    pub cert_fingerprint: String,
    /// Kernel boot id.
    pub boot_id: String,
    /// Architecture (OCI notation).
    pub arch: String,
}

/// Whether a heartbeat can be sent given the configured URLs, the latest identity and
/// enrollment, and `now_ms`.
pub fn target(
    configured_urls: &[String],
    identity: Option<&NodeIdentity>,
    enrollment: Option<&EnrollmentStatus>,
    now_ms: u64,
) -> Result<Target, String> {
    let identity = identity.ok_or("waiting for identitymgr/NodeIdentity")?;
    if identity.boot_id.is_empty() {
        return Err("NodeIdentity has no boot id".to_owned());
    }
    let enrollment = enrollment.ok_or("waiting for enrollmgr/EnrollmentStatus")?;
    match enrollment.state {
        EnrollmentState::Enrolled
        | EnrollmentState::Rotating
        | EnrollmentState::RotationFailing => {}
        other => return Err(format!("not enrolled (enrollment state {other:?})")),
    }
    let cert_fingerprint = enrollment
        .cert_fingerprint
        .clone()
        .ok_or("enrolled but no certificate fingerprint")?;
    if enrollment.not_after_ms.is_some_and(|t| t <= now_ms) {
        return Err("the node certificate has expired; waiting for enrollmgr".to_owned());
    }
    let urls = [
        configured_urls,
        enrollment.controller_urls.as_slice(),
        identity.controller_urls.as_slice(),
    ]
    .into_iter()
    .find(|urls| !urls.is_empty())
    .ok_or("no controller URL (settings, enrollment and identity have none)")?;
    Ok(Target {
        urls: urls.to_vec(),
        cert_fingerprint,
        boot_id: identity.boot_id.clone(),
        arch: identity.arch.clone(),
    })
}

/// The client, and what it was built for.
struct Connection {
    urls: Vec<String>,
    cert_fingerprint: String,
    client: Arc<ControllerClient>,
}

/// Everything the main loop carries between states.
struct Agent {
    ctx: Context,
    status_pub: Publication<ControllerStatus>,
    modules_pub: Publication<ModuleConfig>,
    network_pub: Publication<NetworkConfig>,
    status: ControllerStatus,
    interval: Duration,
    backoff: Backoff,
    identity: Option<NodeIdentity>,
    enrollment: Option<EnrollmentStatus>,
    connection: Option<Connection>,
    modules: Vec<powernode_types::node_api::ModuleReport>,
    module_fingerprint: Vec<String>,
    mounts: Option<serde_json::Map<String, serde_json::Value>>,
    /// netmgr's status, for the heartbeat's `network`.
    network: Option<powernode_types::NetworkStatus>,
    /// Since the first failed heartbeat, until one succeeds.
    outage: Option<outage::Outage>,
    /// What the [`watch`] task watches with; `None` while not heartbeating.
    watch_target: tokio::sync::watch::Sender<Option<watch::WatchTarget>>,
    /// Successful heartbeats and leases that got tasks so far (the watch target's epoch).
    watch_epoch: u64,
    /// Leased tasks, their renewals and reports.
    tasks: tasks::Tasks,
}

/// The agent's entry point: see the crate documentation.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let status_pub = ctx
        .open_publication::<ControllerStatus>()
        .context("opening ControllerStatus")?;
    let modules_pub = ctx
        .open_publication::<ModuleConfig>()
        .context("opening ModuleConfig")?;
    let network_pub = ctx
        .open_publication::<NetworkConfig>()
        .context("opening NetworkConfig")?;
    let task_pub = ctx
        .open_publication::<TaskConfig>()
        .context("opening TaskConfig")?;
    let interval = ctx.settings.controller.heartbeat_interval();
    let previous = status_pub.get(GLOBAL_KEY);
    let applied_generation = previous
        .as_ref()
        .map(|s| s.applied_generation)
        .or_else(|| desired::published_generation(&modules_pub, &network_pub))
        .unwrap_or(0);
    let reason = "waiting for identitymgr/NodeIdentity".to_owned();
    let status = ControllerStatus {
        reachable: false,
        last_success_ms: previous.as_ref().and_then(|s| s.last_success_ms),
        consecutive_failures: 0,
        clock_skew_ms: previous.as_ref().and_then(|s| s.clock_skew_ms),
        heartbeat_interval_s: secs_u32(interval),
        applied_generation,
        last_error: Some(reason.clone()),
        controller_url: previous.as_ref().and_then(|s| s.controller_url.clone()),
    };
    let backoff = Backoff::new(BACKOFF_MIN, ctx.settings.controller.max_backoff());
    let mut agent = Agent {
        ctx,
        status_pub,
        modules_pub,
        network_pub,
        status,
        interval,
        backoff,
        identity: None,
        enrollment: None,
        connection: None,
        modules: Vec::new(),
        module_fingerprint: Vec::new(),
        mounts: None,
        network: None,
        outage: None,
        watch_target: tokio::sync::watch::Sender::new(None),
        watch_epoch: 0,
        tasks: tasks::Tasks::new(task_pub, now_ms()),
    };
    agent.publish_status()?;
    agent.ctx.ready();
    agent.ctx.status(&reason);
    tracing::info!(applied_generation, "started");
    agent.run(State::Waiting { reason }).await
}

impl Agent {
    async fn run(&mut self, mut state: State) -> anyhow::Result<()> {
        let ctx = self.ctx.clone();
        let mut identities = Subscription::<NodeIdentity>::connect(&ctx.dirs, IDENTITY_AGENT);
        let mut enrollments =
            Subscription::<EnrollmentStatus>::connect(&ctx.dirs, ENROLLMENT_AGENT);
        let mut module_statuses =
            Subscription::<ModuleStatus>::connect(&ctx.dirs, report::MODULE_AGENT);
        let mut mount_statuses =
            Subscription::<MountStatus>::connect(&ctx.dirs, report::MOUNT_AGENT);
        let mut network_statuses = Subscription::<powernode_types::NetworkStatus>::connect(
            &ctx.dirs,
            report::NETWORK_AGENT,
        );
        let mut tick = tokio::time::interval(ctx.beat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let desired_news = Arc::new(Notify::new());
        let tasks_queued = Arc::new(Notify::new());
        ctx.tasks.spawn(watch::run(
            self.watch_target.subscribe(),
            desired_news.clone(),
            tasks_queued.clone(),
            ctx.settings.controller.request_timeout(),
            ctx.shutdown.clone(),
        ));
        ctx.tasks.spawn(tasks::follow_local_syncs(
            ctx.dirs.clone(),
            desired_news.clone(),
            ctx.shutdown.clone(),
        ));
        let (status_tx, mut task_statuses) = tokio::sync::mpsc::channel(16);
        for agent in tasks::owner_agents() {
            ctx.tasks
                .spawn(follow_task_statuses(ctx.clone(), agent, status_tx.clone()));
        }
        // The followers hold the only senders: the channel closes once each has said its last
        // word at shutdown (drain).
        drop(status_tx);
        let mut task_tick = tokio::time::interval(TASK_TICK);
        task_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_send = state.next_send();
            let send_now = async {
                match next_send {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            state = tokio::select! {
                _ = ctx.shutdown.cancelled() => return self.drain(&mut task_statuses).await,
                _ = tick.tick() => {
                    ctx.beat();
                    // A long backoff must not hold back `controller.unreachable`.
                    if let State::Failing { .. } = state {
                        self.check_outage();
                    }
                    state
                }
                event = identities.next() => {
                    if !apply_event(&mut self.identity, event) {
                        continue;
                    }
                    self.inputs_changed(state)?
                }
                event = enrollments.next() => {
                    let before = self.enrollment.clone();
                    if !apply_event(&mut self.enrollment, event) {
                        continue;
                    }
                    if !enrollment_matters(before.as_ref(), self.enrollment.as_ref()) {
                        // Another failed attempt: the next heartbeat carries it, no sooner,
                        // so a rotation retrying does not make heartbeats retry with it.
                        continue;
                    }
                    self.inputs_changed(state)?
                }
                _ = module_statuses.next() => {
                    let statuses = || module_statuses.items().map(|(_, s)| s);
                    self.modules = report::modules(statuses());
                    let fingerprint = report::fingerprint(statuses());
                    let changed = fingerprint != self.module_fingerprint;
                    self.module_fingerprint = fingerprint;
                    self.soon_if(changed, state)
                }
                () = desired_news.notified() => match state {
                    State::Waiting { .. } => state,
                    _ => state.hurry(Instant::now()),
                },
                () = tasks_queued.notified() => {
                    self.task_work(true).await;
                    state
                }
                Some(statuses) = task_statuses.recv() => {
                    self.tasks.statuses(&statuses);
                    self.task_work(false).await;
                    state
                }
                _ = task_tick.tick() => {
                    if self.tasks.has_work(now_ms()) {
                        self.task_work(false).await;
                    }
                    state
                }
                _ = mount_statuses.next() => {
                    let mounts = report::mounts(mount_statuses.items().map(|(_, s)| s));
                    let changed = mounts != self.mounts;
                    self.mounts = mounts;
                    self.soon_if(changed, state)
                }
                _ = network_statuses.next() => {
                    let network = network_statuses.get(GLOBAL_KEY).cloned();
                    let changed = report::network_fingerprint(network.as_ref())
                        != report::network_fingerprint(self.network.as_ref());
                    self.network = network;
                    self.soon_if(changed, state)
                }
                _ = send_now => {
                    let attempt = self.heartbeat();
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => {
                            return self.drain(&mut task_statuses).await;
                        }
                        next = attempt => next?,
                    }
                }
            };
        }
    }

    /// A module or mount status changed: if it matters and a heartbeat is due at all, send
    /// it soon (after [`DEBOUNCE`], so a burst of changes makes one heartbeat).
    fn soon_if(&self, changed: bool, state: State) -> State {
        match state {
            State::Waiting { .. } => state,
            _ if changed => state.hurry(Instant::now() + DEBOUNCE),
            _ => state,
        }
    }

    /// Identity or enrollment changed: wait, or send soon.
    fn inputs_changed(&mut self, state: State) -> anyhow::Result<State> {
        match self.target() {
            Err(reason) => {
                if state
                    != (State::Waiting {
                        reason: reason.clone(),
                    })
                {
                    tracing::info!(%reason, "not heartbeating");
                    self.watch_target.send_replace(None);
                    self.ctx.status(&reason);
                    self.status.reachable = false;
                    self.status.last_error = Some(reason.clone());
                    self.publish_status()?;
                }
                Ok(State::Waiting { reason })
            }
            Ok(_) => Ok(state.hurry(Instant::now() + DEBOUNCE)),
        }
    }

    fn target(&self) -> Result<Target, String> {
        target(
            &self.ctx.settings.controller.urls,
            self.identity.as_ref(),
            self.enrollment.as_ref(),
            now_ms(),
        )
    }

    /// Sends one heartbeat and applies its reply; the state that follows.
    async fn heartbeat(&mut self) -> anyhow::Result<State> {
        let target = match self.target() {
            Ok(t) => t,
            // The certificate may have expired while waiting.
            Err(reason) => return self.inputs_changed(State::Waiting { reason }),
        };
        match self.exchange(&target).await {
            Ok(Exchanged {
                answered,
                tasks_queued,
            }) => {
                self.backoff.reset();
                if self.status.consecutive_failures > 0 {
                    tracing::info!(
                        failures = self.status.consecutive_failures,
                        "controller reachable again"
                    );
                    self.ctx.health.clear_error();
                }
                if let Some(outage) = self.outage.take() {
                    outage.ended(
                        &self.ctx.events,
                        self.status.consecutive_failures,
                        &answered,
                    );
                }
                if self.status.controller_url.as_deref() != Some(answered.as_str()) {
                    tracing::info!(url = %answered, "heartbeating with this controller");
                }
                self.status.controller_url = Some(answered);
                self.status.reachable = true;
                self.status.consecutive_failures = 0;
                self.status.last_error = None;
                self.publish_status()?;
                self.watch_again();
                // Most heartbeats find no task queued: no lease call then. A controller that
                // does not count them says nothing, and gets the lease.
                self.task_work(tasks_queued != Some(0)).await;
                self.ctx.status(&format!(
                    "controller reachable; generation {}",
                    self.status.applied_generation
                ));
                Ok(State::Scheduled {
                    due: Instant::now() + self.interval,
                })
            }
            Err(Failure { error, refused }) => {
                let delay = if refused {
                    self.backoff.next_delay_within(self.interval)
                } else {
                    self.backoff.next_delay()
                };
                let failures = self.status.consecutive_failures.saturating_add(1);
                let changed = self.status.last_error.as_deref() != Some(error.as_str());
                // One line per new error, then only at 1, 2, 4, 8… failures while it repeats.
                if changed || failures.is_power_of_two() {
                    tracing::warn!(failures, retry_in_ms = delay.as_millis() as u64, %error, "heartbeat failed");
                }
                self.ctx.health.report_error(&format!("heartbeat: {error}"));
                self.ctx.status("controller unreachable; retrying");
                self.status.reachable = false;
                self.status.consecutive_failures = failures;
                self.status.last_error = Some(error);
                self.publish_status()?;
                self.outage
                    .get_or_insert_with(|| outage::Outage::begin(target.urls.join(",")));
                self.check_outage();
                Ok(State::Failing {
                    retry_at: Instant::now() + delay,
                })
            }
        }
    }

    /// The request, the reply, the desired state published.
    async fn exchange(&mut self, target: &Target) -> Result<Exchanged, Failure> {
        let request = self.request(target).await;
        let client = self.client(target)?;
        let sent_ms = now_ms();
        let reply: HeartbeatResponse =
            client
                .post(HEARTBEAT_CALL, &request)
                .await
                .map_err(|e| Failure {
                    refused: matches!(e, TransportError::Refused { .. }),
                    error: e.to_string(),
                })?;
        let received_ms = now_ms();
        let answered = client.current_url().to_owned();
        let midpoint = (u128::from(sent_ms) + u128::from(received_ms)) / 2;
        let midpoint = i64::try_from(midpoint).unwrap_or(i64::MAX);
        self.status.clock_skew_ms = Some(reply.server_time_ms.saturating_sub(midpoint));
        self.status.last_success_ms = Some(received_ms);
        let (lo, hi) = INTERVAL_RANGE_S;
        let asked = reply.next_interval_s;
        let interval_s = asked.clamp(lo, hi);
        if interval_s != asked {
            tracing::warn!(
                asked,
                used = interval_s,
                "controller asked for an interval out of range"
            );
        }
        if Duration::from_secs(interval_s.into()) != self.interval {
            tracing::info!(interval_s, "heartbeat interval changed");
            self.interval = Duration::from_secs(interval_s.into());
        }
        self.status.heartbeat_interval_s = interval_s;
        let generation = reply.desired.generation;
        desired::apply(&reply.desired, &self.modules_pub, &self.network_pub)
            .map_err(|e| Failure::from(e.to_string()))?;
        if generation != self.status.applied_generation {
            tracing::info!(
                generation,
                modules = reply.desired.modules.len(),
                network = reply.desired.network.is_some(),
                "desired state applied"
            );
            self.status.applied_generation = generation;
        }
        Ok(Exchanged {
            answered,
            tasks_queued: reply.tasks_queued,
        })
    }

    /// The heartbeat body.
    async fn request(&self, target: &Target) -> HeartbeatRequest {
        let facts = host::read(&self.ctx.root).await;
        for problem in &facts.problems {
            tracing::debug!(%problem, "host fact left out of the heartbeat");
        }
        HeartbeatRequest {
            boot_id: target.boot_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            arch: (!target.arch.is_empty()).then(|| target.arch.clone()),
            uptime_s: facts.uptime_s,
            load: facts.load,
            memory: facts.memory,
            modules: self.modules.clone(),
            mounts: self.mounts.clone(),
            network: report::network(self.network.as_ref()),
            applied_generation: Some(self.status.applied_generation),
            enrollment: self.enrollment.as_ref().map(EnrollmentReport::from_status),
        }
    }

    /// The client for `target`: built on first use or when the URLs change; its TLS identity
    /// reloaded from the PKI files when the certificate fingerprint changes (rotation).
    fn client(&mut self, target: &Target) -> Result<&ControllerClient, String> {
        let load = || {
            PkiPaths::under(self.ctx.root.persist_dir())
                .load()
                .map_err(|e| e.to_string())
        };
        let timeout = self.ctx.settings.controller.request_timeout();
        match &mut self.connection {
            Some(c) if c.urls == target.urls => {
                if c.cert_fingerprint != target.cert_fingerprint {
                    let identity = load()?;
                    c.client
                        .set_identity(&identity)
                        .map_err(|e| e.to_string())?;
                    tracing::info!(fingerprint = %target.cert_fingerprint, "node certificate reloaded");
                    c.cert_fingerprint = target.cert_fingerprint.clone();
                }
            }
            _ => {
                let identity = load()?;
                let client = ControllerClient::new(&target.urls, &identity, timeout)
                    .map_err(|e| e.to_string())?;
                let client = Arc::new(client);
                tracing::info!(urls = %target.urls.join(","), fingerprint = %target.cert_fingerprint, "controller client ready");
                self.connection = Some(Connection {
                    urls: target.urls.clone(),
                    cert_fingerprint: target.cert_fingerprint.clone(),
                    client,
                });
            }
        }
        match &self.connection {
            Some(c) => Ok(&c.client),
            None => Err("no controller client".to_owned()),
        }
    }

    /// Hands the watcher the client and generation of the heartbeat (or lease) that just
    /// went through.
    fn watch_again(&mut self) {
        self.watch_epoch += 1;
        let target = self.connection.as_ref().map(|c| watch::WatchTarget {
            client: c.client.clone(),
            generation: self.status.applied_generation,
            epoch: self.watch_epoch,
        });
        self.watch_target.send_replace(target);
    }

    /// Reports finished tasks, renews the leases due and, with `lease`, leases what is
    /// queued: while the node can reach the controller, and no longer than shutdown allows.
    /// A failure waits for the next tick, heartbeat or watch; the heartbeat reports
    /// reachability, so a task call's failure is only logged.
    async fn task_work(&mut self, lease: bool) {
        let Ok(target) = self.target() else { return };
        if let Err(error) = self.client(&target) {
            tracing::debug!(%error, "no controller client for tasks");
            return;
        }
        let Some(client) = self.connection.as_ref().map(|c| c.client.clone()) else {
            return;
        };
        let shutdown = self.ctx.shutdown.clone();
        let work = async {
            // A report the controller cannot take now must not hold up the renewals: their
            // leases would run out and their tasks be killed.
            let reported = self.tasks.report(&client).await;
            self.tasks.renew_due(&client).await?;
            reported?;
            if lease || self.tasks.wants_lease() {
                let got = self.tasks.lease(&client).await?;
                if got > 0 {
                    // Tasks of unknown kinds are reported at once.
                    self.tasks.report(&client).await?;
                    self.watch_again();
                }
            }
            Ok::<(), TransportError>(())
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            done = work => if let Err(error) = done {
                tracing::debug!(%error, "task call failed; trying again later");
            },
        }
    }

    /// Raises `controller.unreachable` once the outage has lasted long enough.
    fn check_outage(&mut self) {
        let Some(outage) = &mut self.outage else {
            return;
        };
        let after = self.ctx.settings.controller.unreachable_after_intervals;
        let threshold = self
            .interval
            .saturating_mul(u32::try_from(after).unwrap_or(u32::MAX));
        outage.check(
            &self.ctx.events,
            threshold,
            after,
            self.status.consecutive_failures,
            self.status.last_error.as_deref().unwrap_or_default(),
        );
    }

    fn publish_status(&self) -> anyhow::Result<()> {
        self.status_pub
            .publish(&self.status)
            .context("publishing ControllerStatus")
    }
}

/// Whether an enrollment change is worth an early heartbeat: anything but the count and
/// error of failed rotation attempts.
fn enrollment_matters(old: Option<&EnrollmentStatus>, new: Option<&EnrollmentStatus>) -> bool {
    let essential = |s: &EnrollmentStatus| EnrollmentStatus {
        rotation_attempts: 0,
        last_error: None,
        ..s.clone()
    };
    old.map(essential) != new.map(essential)
}

/// Applies a subscription event to the value it tracks (key `global`); whether it changed.
fn apply_event<T>(slot: &mut Option<T>, event: Event<T>) -> bool {
    match event {
        Event::Create { key, value } if key == GLOBAL_KEY => *slot = Some(value),
        Event::Modify { key, new, .. } if key == GLOBAL_KEY => *slot = Some(new),
        Event::Delete { key, .. } if key == GLOBAL_KEY => *slot = None,
        // A publisher that went away keeps its last value: enrollment and identity stay true.
        _ => return false,
    }
    true
}

fn secs_u32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Follows `agent`'s `TaskStatus` for as long as the agent runs, sending the main loop every
/// status it holds whenever one changes; at shutdown, the owner's last word
/// ([`drain::last_statuses`]).
async fn follow_task_statuses(
    ctx: Context,
    agent: &'static str,
    to_main: tokio::sync::mpsc::Sender<tasks::OwnerStatuses>,
) {
    let mut statuses = Subscription::<TaskStatus>::connect(&ctx.dirs, agent);
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            _ = statuses.next() => {}
        }
        let all = tasks::OwnerStatuses {
            agent,
            statuses: statuses.items().map(|(_, s)| s.clone()).collect(),
        };
        if to_main.send(all).await.is_err() {
            return;
        }
    }
    drain::last_statuses(agent, &mut statuses, &to_main).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::IdentityState;

    fn identity() -> NodeIdentity {
        NodeIdentity {
            state: IdentityState::Resolved,
            uuid: Some("u-1".to_owned()),
            source: None,
            boot_id: "boot-1".to_owned(),
            hostname: "edge".to_owned(),
            arch: "amd64".to_owned(),
            dmi_uuid: None,
            bootstrap_token: None,
            controller_urls: vec!["https://from-identity".to_owned()],
            ca_pem: None,
            last_error: None,
        }
    }

    fn enrollment(state: EnrollmentState) -> EnrollmentStatus {
        EnrollmentStatus {
            state,
            node_id: Some("node-1".to_owned()),
            cert_fingerprint: Some("ab".to_owned()),
            not_before_ms: Some(0),
            not_after_ms: Some(2_000),
            rotate_at_ms: Some(1_500),
            controller_urls: vec![
                "https://from-enrollment".to_owned(),
                "https://from-enrollment-2".to_owned(),
            ],
            rotation_failing_since_ms: None,
            rotation_attempts: 0,
            last_error: None,
        }
    }

    #[test]
    fn target_table() {
        let id = identity();
        let now = 1_000;
        assert!(target(&[], None, None, now).is_err());
        assert!(target(&[], Some(&id), None, now).is_err());
        for (state, ok) in [
            (EnrollmentState::Enrolled, true),
            (EnrollmentState::Rotating, true),
            (EnrollmentState::RotationFailing, true),
            (EnrollmentState::NotEnrolled, false),
            (EnrollmentState::Enrolling, false),
            (EnrollmentState::Revoked, false),
            (EnrollmentState::CertExpired, false),
            (EnrollmentState::BadToken, false),
            (EnrollmentState::CaMismatch, false),
            (EnrollmentState::Failed, false),
        ] {
            let e = enrollment(state);
            assert_eq!(
                target(&[], Some(&id), Some(&e), now).is_ok(),
                ok,
                "{state:?}"
            );
        }
        let e = enrollment(EnrollmentState::Enrolled);
        // URL precedence: settings, enrollment, identity; each a list, taken whole.
        let set = vec!["https://set".to_owned(), "https://set-2".to_owned()];
        assert_eq!(target(&set, Some(&id), Some(&e), now).unwrap().urls, set);
        assert_eq!(
            target(&[], Some(&id), Some(&e), now).unwrap().urls,
            ["https://from-enrollment", "https://from-enrollment-2"]
        );
        let mut e2 = e.clone();
        e2.controller_urls.clear();
        assert_eq!(
            target(&[], Some(&id), Some(&e2), now).unwrap().urls,
            ["https://from-identity"]
        );
        let mut id2 = id.clone();
        id2.controller_urls.clear();
        assert!(target(&[], Some(&id2), Some(&e2), now).is_err());
        // Expired certificate, missing fingerprint, missing boot id.
        assert!(target(&[], Some(&id), Some(&e), 2_000).is_err());
        let mut e3 = e.clone();
        e3.cert_fingerprint = None;
        assert!(target(&[], Some(&id), Some(&e3), now).is_err());
        let mut id3 = id.clone();
        id3.boot_id.clear();
        assert!(target(&[], Some(&id3), Some(&e), now).is_err());
    }

    #[test]
    fn only_a_new_rotation_attempt_is_not_worth_an_early_heartbeat() {
        let failing = EnrollmentStatus {
            rotation_failing_since_ms: Some(1_600),
            rotation_attempts: 1,
            last_error: Some("refused".to_owned()),
            ..enrollment(EnrollmentState::RotationFailing)
        };
        let again = EnrollmentStatus {
            rotation_attempts: 2,
            last_error: Some("timed out".to_owned()),
            ..failing.clone()
        };
        assert!(!enrollment_matters(Some(&failing), Some(&again)));
        let rotated = enrollment(EnrollmentState::Enrolled);
        assert!(enrollment_matters(Some(&again), Some(&rotated)));
        assert!(enrollment_matters(
            Some(&enrollment(EnrollmentState::Enrolled)),
            Some(&failing)
        ));
        assert!(enrollment_matters(None, Some(&failing)));
    }

    #[test]
    fn hurry_moves_sends_earlier_only() {
        let now = Instant::now();
        let soon = now + DEBOUNCE;
        let later = now + Duration::from_secs(30);
        assert_eq!(
            State::Waiting { reason: "x".into() }.hurry(soon),
            State::Scheduled { due: soon }
        );
        assert_eq!(
            State::Scheduled { due: later }.hurry(soon),
            State::Scheduled { due: soon }
        );
        assert_eq!(
            State::Scheduled { due: now }.hurry(soon),
            State::Scheduled { due: now }
        );
        assert_eq!(
            State::Failing { retry_at: later }.hurry(soon),
            State::Failing { retry_at: soon }
        );
    }
}
