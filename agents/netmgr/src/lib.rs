//! netmgr: the node's WireGuard overlay (docs/network.md, "netmgr").
//!
//! It follows `heartbeatd/NetworkConfig` and publishes `netmgr/NetworkStatus`. The node's
//! X25519 key is generated once ([`key`]); its public half is published from the start, before
//! any configuration, since the controller needs it to make this node the others' peer.
//!
//! A configuration is validated whole first ([`plan`]): one that breaks a rule is refused with
//! its reason in `NetworkStatus.error` (state `Failed`) and a `network.config_rejected` event,
//! and the last good one stays applied. A good one is applied by difference: the WireGuard
//! interface ([`dataplane`]) is adopted or made — kernel WireGuard ([`kernel`]) where the
//! kernel has it, else the userspace device ([`device`], a process of its own); both outlive
//! netmgr — its key, port and peers changed only where they differ ([`uapi`]: over generic
//! netlink for the kernel, over the UAPI socket for the device), the interface's address, MTU
//! and routes set over rtnetlink ([`link`]) and the port forwards replaced in nftables
//! ([`forward`]) when they changed. What was applied is recorded in
//! `run/powernode/netmgr/applied.json`, so that a restarted netmgr knows it.
//!
//! `network.wireguard` in the settings picks the data plane: `auto` (the default), `kernel`
//! or `userspace`; `NetworkStatus.userspace` says which runs.
//!
//! # States
//!
//! ```text
//!             valid config                   applied
//!   Down ──────────────────► Configuring ──────────────► Up ◄──┐
//!    ▲                          ▲   │ apply failed          │   │ valid config
//!    │                          │   ▼                       │   │ (by difference)
//!    │                          │  ApplyFailed (retried     │   │
//!    │                          │  with backoff) ───────────┼───┘
//!    │                          │                           │ invalid config
//!    │                          │ interface gone:           ▼
//!    │                          └─ made again, re-applied  Rejected (last good runs)
//!    └──────── config withdrawn (any state): interface removed, forwards removed
//! ```
//!
//! `Rejected` and `ApplyFailed` are published as `Failed` with the error. On SIGTERM netmgr
//! exits 0 and leaves the interface running: the data plane outlives the control plane, and
//! the next netmgr adopts it.

pub mod dataplane;
pub mod device;
pub mod forward;
pub mod kernel;
pub mod key;
pub mod link;
pub mod plan;
pub mod sockbuf;
pub mod uapi;
pub mod userspace;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentbase::settings::WireguardChoice;
use agentbase::Context;
use anyhow::Context as _;
use powernode_pubsub::{Event, Publication, Subscription};
use powernode_types::{
    NetworkConfig, NetworkState, NetworkStatus, PeerStatus, Severity, GLOBAL_KEY,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::dataplane::Dataplane;
use crate::key::{PrivateKey, PublicKey};
use crate::link::Netlink;
use crate::plan::{Endpoint, Plan, Rejection};
use crate::uapi::{DeviceState, WantedDevice, WantedPeer};

/// The agent whose `NetworkConfig` netmgr follows.
pub const CONFIG_AGENT: &str = "heartbeatd";

/// How often the device is read for `NetworkStatus` (handshakes, bytes) while there is one.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// A peer is up while its last handshake is this recent.
pub const PEER_UP_WITHIN: Duration = Duration::from_secs(180);

/// The record of what is applied, under `run/powernode`.
pub const APPLIED_FILE: &str = "netmgr/applied.json";

/// The longest wait between two tries of a configuration that failed to apply.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A device that dies within this long of its start counts as failing again: its next
/// restart waits (with backoff) instead of coming at once.
pub const QUICK_DEATH: Duration = Duration::from_secs(10);

/// How long resolving a peer's endpoint name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the WireGuard interface is being made again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Restart {
    /// The applied configuration's interface was not there when netmgr started.
    NotRunning,
    /// It went away: the device exited, or the kernel interface was deleted (described).
    Gone(String),
}

/// netmgr's states: see the crate documentation for the diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No configuration: no device, no forwards (the key is kept).
    Down,
    /// Starting the device or applying a configuration.
    Configuring,
    /// The newest valid configuration runs.
    Up,
    /// The newest configuration was refused; the last good one, if any, still runs.
    Rejected,
    /// Applying a valid configuration failed (the device, the kernel, nftables); retried.
    ApplyFailed,
}

impl State {
    fn published(self) -> NetworkState {
        match self {
            State::Down => NetworkState::Down,
            State::Configuring => NetworkState::Configuring,
            State::Up => NetworkState::Up,
            State::Rejected | State::ApplyFailed => NetworkState::Failed,
        }
    }
}

/// What is applied, as `run/powernode/netmgr/applied.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Applied {
    /// The configuration (the target's own, shared).
    config: Arc<NetworkConfig>,
    /// Each peer's endpoint as set on the device (names resolved), by base64 key.
    endpoints: BTreeMap<String, Option<SocketAddr>>,
}

impl Applied {
    fn endpoints(&self) -> BTreeMap<PublicKey, Option<SocketAddr>> {
        self.endpoints
            .iter()
            .filter_map(|(k, e)| PublicKey::from_base64(k).ok().map(|k| (k, *e)))
            .collect()
    }
}

/// The configuration netmgr wants running: the newest valid one. A configuration of a
/// thousand peers is a few hundred KB, so it is held once (`Arc`) by what refers to it: the
/// newest seen, the target, the record of what is applied.
#[derive(Debug)]
struct Target {
    config: Arc<NetworkConfig>,
    plan: Plan,
}

/// Everything the main loop carries.
struct Agent {
    ctx: Context,
    key: PrivateKey,
    public: PublicKey,
    statuses: Publication<NetworkStatus>,
    netlink: Netlink,
    state: State,
    target: Option<Arc<Target>>,
    /// The newest configuration received, valid or not (a repeat is not handled again).
    seen: Option<Arc<NetworkConfig>>,
    applied: Option<Applied>,
    device: Option<Dataplane>,
    /// Which WireGuard the settings allow (`network.wireguard`).
    choice: WireguardChoice,
    /// Whether the overlay is (or, with no interface yet, would be) the userspace device.
    userspace: bool,
    device_started: Option<Instant>,
    /// The interface that went away (or was not there at start), until its successor is
    /// configured: reported then.
    restarting_after: Option<Restart>,
    error: Option<String>,
    retry_at: Option<Instant>,
    /// Failures in a row (applies, or quick device deaths), for the backoff.
    failures: u32,
    /// Whether each peer was up at the last reading.
    peers_up: BTreeMap<PublicKey, bool>,
    /// The device as last read.
    device_state: Option<DeviceState>,
    /// Whether reading the device failed at the last try (logged once a streak).
    read_failing: bool,
    /// The node's endpoints as last published.
    endpoints: Vec<String>,
}

/// The agent's entry point: see the crate documentation.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let key_path = ctx.root.persist_dir().join(key::KEY_FILE);
    let (private, origin) = key::load_or_create(&key_path).context("the node's WireGuard key")?;
    let public = private.public_key();
    match origin {
        key::Origin::Loaded => {}
        key::Origin::Generated => {
            tracing::info!(public_key = %public, "generated the node's WireGuard key");
        }
        key::Origin::Replaced(aside) => {
            tracing::error!(aside = %aside.display(), public_key = %public,
                "the key file held no key; moved it aside and generated a new key");
            ctx.events.report(
                Severity::Error,
                "network.key_replaced",
                "the WireGuard key file held no key: it was moved aside and a new key \
                 generated (the node's peers need its new public key)",
                &[("public_key", &public.to_base64())],
            );
        }
    }
    let statuses = ctx
        .open_publication::<NetworkStatus>()
        .context("opening NetworkStatus")?;
    let netlink = Netlink::connect().context("netlink")?;
    let choice = ctx.settings.network.wireguard;
    // What a new interface would be, until there is one; with `auto`, what the kernel offers.
    let userspace = match choice {
        WireguardChoice::Userspace => true,
        WireguardChoice::Kernel => false,
        WireguardChoice::Auto => !dataplane::kernel_has_wireguard().await,
    };
    tracing::info!(?choice, userspace, "WireGuard data plane");
    let mut agent = Agent {
        ctx: ctx.clone(),
        key: private,
        public,
        statuses,
        netlink,
        state: State::Down,
        target: None,
        seen: None,
        applied: None,
        device: None,
        choice,
        userspace,
        device_started: None,
        restarting_after: None,
        error: None,
        retry_at: None,
        failures: 0,
        peers_up: BTreeMap::new(),
        device_state: None,
        read_failing: false,
        endpoints: Vec::new(),
    };
    agent.start().await;
    let mut configs = Subscription::<NetworkConfig>::connect(&ctx.dirs, CONFIG_AGENT);
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ctx.ready();
    ctx.status("waiting for a NetworkConfig");
    loop {
        let retry_at = agent.retry_at;
        tokio::select! {
            () = ctx.shutdown.cancelled() => break,
            _ = tick.tick() => {
                ctx.beat();
                agent.refresh().await;
            }
            event = configs.next() => {
                if matches!(event, Event::Create { .. } | Event::Modify { .. } | Event::Delete { .. } | Event::Synchronized) {
                    agent.reconcile(&configs).await;
                }
            }
            () = agent.device_exited() => agent.device_died().await,
            () = sleep_until(retry_at), if retry_at.is_some() => {
                agent.retry_at = None;
                agent.converge().await;
            }
        }
    }
    // SIGTERM: the device keeps running; the next netmgr adopts it.
    if let Some(device) = &agent.device {
        tracing::info!(interface = %device.interface(), device = %device.describe(), "stopping; the WireGuard interface keeps running");
    }
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `min(1 s · 2^(n-1), MAX_BACKOFF)`.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
}

impl Agent {
    fn applied_file(&self) -> PathBuf {
        self.ctx.root.run_dir().join(APPLIED_FILE)
    }

    /// At start: the peers' last known state from the previous run's status, the record of
    /// what is applied, and the device that serves it, adopted — or, found dead, restarted
    /// at once with the recorded configuration (heartbeatd may be away).
    async fn start(&mut self) {
        if let Some(previous) = self.statuses.get(GLOBAL_KEY) {
            self.endpoints = previous.endpoints;
            let now = agentbase::health::now_ms();
            for peer in &previous.peers {
                if let Ok(key) = PublicKey::from_base64(&peer.public_key) {
                    self.peers_up
                        .insert(key, is_up(peer.last_handshake_ms, now));
                }
            }
        }
        let record = std::fs::read(self.applied_file())
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Applied>(&bytes).ok());
        if let Some(record) = record {
            match plan::validate(&record.config, &self.public) {
                Ok(plan) => {
                    self.target = Some(Arc::new(Target {
                        config: Arc::clone(&record.config),
                        plan,
                    }));
                    self.applied = Some(record);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the record of the applied configuration is no longer valid; ignored");
                }
            }
        }
        if let Some(target) = &self.target {
            let interface = target.plan.interface.clone();
            match Dataplane::adopt(&self.ctx.root, &self.netlink, &interface, self.choice).await {
                Some(device) => {
                    tracing::info!(%interface, device = %device.describe(), "adopted the running WireGuard interface");
                    self.userspace = device.is_userspace();
                    self.device = Some(device);
                    self.state = State::Up;
                }
                None => {
                    tracing::warn!(%interface, "the WireGuard device of the applied configuration is not running; starting it");
                    self.restarting_after = Some(Restart::NotRunning);
                    self.converge().await;
                }
            }
        }
        self.refresh().await;
    }

    /// Resolves when the device exits; never when there is none.
    async fn device_exited(&self) {
        match &self.device {
            Some(device) => device.exited().await,
            None => std::future::pending().await,
        }
    }

    /// A new `NetworkConfig` (or none): validated, then applied or refused; withdrawn, the
    /// network is left.
    async fn reconcile(&mut self, configs: &Subscription<NetworkConfig>) {
        let Some(config) = configs.get(GLOBAL_KEY) else {
            // Only what heartbeatd withdrew (or never had), never what a subscription that
            // lost its publisher has not confirmed.
            if configs.is_synchronized() {
                self.leave().await;
            }
            return;
        };
        if self.seen.as_deref() == Some(config) {
            return;
        }
        let config = Arc::new(config.clone());
        self.seen = Some(Arc::clone(&config));
        let plan = match plan::validate(&config, &self.public) {
            Ok(plan) => plan,
            Err(rejection) => return self.reject(&config, &rejection).await,
        };
        if self.device.is_none() {
            self.device =
                Dataplane::adopt(&self.ctx.root, &self.netlink, &plan.interface, self.choice).await;
        }
        let device_port = match &self.device {
            Some(d) if d.interface() == plan.interface => d.get().await.ok().map(|s| s.listen_port),
            _ => None,
        };
        if let Err(rejection) = plan::check_listen_port(plan.listen_port, device_port) {
            return self.reject(&config, &rejection).await;
        }
        self.target = Some(Arc::new(Target { config, plan }));
        self.failures = 0;
        self.retry_at = None;
        self.converge().await;
    }

    /// Refuses `config`: the last good configuration stays.
    async fn reject(&mut self, config: &NetworkConfig, rejection: &Rejection) {
        tracing::warn!(generation = config.generation, network = %config.network, error = %rejection, "NetworkConfig refused");
        self.ctx.events.report(
            Severity::Error,
            "network.config_rejected",
            &format!("NetworkConfig refused, the last good one stays: {rejection}"),
            &[
                ("generation", &config.generation.to_string()),
                ("network", &config.network),
            ],
        );
        self.state = State::Rejected;
        self.error = Some(format!("generation {}: {rejection}", config.generation));
        self.refresh().await;
    }

    /// Applies the target, or schedules a retry when that fails.
    async fn converge(&mut self) {
        let Some(target) = self.target.clone() else {
            return;
        };
        let was_up = self.state == State::Up;
        if self.device.is_none() || !matches!(self.state, State::Up | State::Rejected) {
            self.state = State::Configuring;
            self.publish();
        }
        match self.apply(&target).await {
            Ok(()) => {
                self.failures = 0;
                self.state = State::Up;
                self.error = None;
                if let (Some(restart), Some(device)) = (self.restarting_after.take(), &self.device)
                {
                    let now = device.describe();
                    let message = match restart {
                        Restart::NotRunning => format!("the WireGuard interface was not there at netmgr's start; made it ({now}) and re-applied the configuration"),
                        Restart::Gone(old) => format!("the WireGuard interface went away ({old}); made it again ({now}) and re-applied the configuration"),
                    };
                    tracing::warn!(device = %now, "WireGuard interface restarted");
                    let pid = device.pid().map(|p| p.to_string()).unwrap_or_default();
                    self.ctx.events.report(
                        Severity::Warning,
                        "network.device_restarted",
                        &message,
                        &[("interface", &target.plan.interface), ("pid", &pid)],
                    );
                }
                if !was_up {
                    let address = target.plan.address.to_string();
                    tracing::info!(interface = %target.plan.interface, %address, generation = target.config.generation, "interface up");
                    self.ctx.events.report(
                        Severity::Info,
                        "network.interface_up",
                        &format!(
                            "{} is up as {address} in network {}",
                            target.plan.interface, target.plan.network
                        ),
                        &[
                            ("interface", &target.plan.interface),
                            ("address", &address),
                            ("network", &target.plan.network),
                            ("generation", &target.config.generation.to_string()),
                        ],
                    );
                }
                self.ctx.status(&format!(
                    "{} up, generation {}",
                    target.plan.interface, target.config.generation
                ));
            }
            Err(error) => {
                self.failures += 1;
                let wait = backoff(self.failures);
                tracing::warn!(error = %error, retry_in = ?wait, "applying the NetworkConfig failed");
                if self.failures == 1 {
                    self.ctx.events.report(
                        Severity::Error,
                        "network.apply_failed",
                        &format!("applying the NetworkConfig failed (retried): {error}"),
                        &[("generation", &target.config.generation.to_string())],
                    );
                }
                self.state = State::ApplyFailed;
                self.error = Some(error);
                self.retry_at = Some(Instant::now() + wait);
            }
        }
        self.refresh().await;
    }

    /// Makes the device, the interface and the forwards what `target` says.
    async fn apply(&mut self, target: &Target) -> Result<(), String> {
        let plan = &target.plan;
        if self
            .device
            .as_ref()
            .is_some_and(|d| d.interface() != plan.interface || d.has_exited())
        {
            if let Some(old) = self.device.take() {
                tracing::info!(interface = %old.interface(), device = %old.describe(), "stopping the WireGuard interface of the previous configuration");
                old.stop().await;
            }
        }
        if self.device.is_none() {
            let (root, netlink) = (&self.ctx.root, &self.netlink);
            let device = match Dataplane::adopt(root, netlink, &plan.interface, self.choice).await {
                Some(device) => device,
                None => Dataplane::create(root, netlink, &plan.interface, self.choice).await?,
            };
            tracing::info!(interface = %plan.interface, device = %device.describe(), adopted = device.adopted(), "WireGuard interface ready");
            self.userspace = device.is_userspace();
            self.device = Some(device);
            self.device_started = Some(Instant::now());
        }
        let Some(device) = &self.device else {
            return Err("no device".into());
        };
        let mut endpoints = BTreeMap::new();
        let mut peers = BTreeMap::new();
        for (key, peer) in &plan.peers {
            let endpoint = match &peer.endpoint {
                None => None,
                Some(endpoint) => resolve(endpoint).await,
            };
            endpoints.insert(key.to_base64(), endpoint);
            peers.insert(
                *key,
                WantedPeer {
                    endpoint,
                    allowed_ips: peer.allowed_ips.iter().copied().collect(),
                    keepalive: peer.keepalive,
                },
            );
        }
        let wanted = WantedDevice {
            public_key: self.public,
            listen_port: plan.listen_port,
            peers,
        };
        let state = device.get().await?;
        let recorded = self.applied.as_ref().map(Applied::endpoints);
        let changes = uapi::changes(&state, recorded.as_ref(), &wanted);
        if !changes.is_empty() {
            device.set(&changes, &self.key).await?;
            tracing::info!(
                interface = %plan.interface,
                removed = changes.remove.len(),
                set = changes.set.len(),
                listen_port = ?changes.listen_port,
                "device configured"
            );
        }
        let index = self
            .netlink
            .link_index(&plan.interface)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("the device's interface {} is missing", plan.interface))?;
        self.netlink
            .configure(index, plan.address)
            .await
            .map_err(|e| e.to_string())?;
        self.netlink
            .set_routes(index, &plan.routes())
            .await
            .map_err(|e| e.to_string())?;
        let applied_forwards = self
            .applied
            .as_ref()
            .map(|a| (a.config.forwards.as_slice(), a.config.address.as_str()));
        let forwards_changed = match applied_forwards {
            Some((forwards, address)) => {
                forwards != plan.forwards.as_slice()
                    || (address != target.config.address && !plan.forwards.is_empty())
            }
            None => !plan.forwards.is_empty(),
        };
        if forwards_changed {
            forward::apply(&plan.forwards, plan.address.addr())
                .await
                .map_err(|e| e.to_string())?;
        }
        let applied = Applied {
            config: Arc::clone(&target.config),
            endpoints,
        };
        if self.applied.as_ref() != Some(&applied) {
            // Compact: a thousand peers pretty-printed are twice the bytes to hold and write.
            let json = serde_json::to_vec(&applied).map_err(|e| e.to_string())?;
            let path = self.applied_file();
            if let Err(e) = agentbase::fsutil::write_atomic(&path, &json, 0o600) {
                // What runs is right; only a restarted netmgr would know less.
                tracing::warn!(file = %path.display(), error = %e, "could not record the applied configuration");
            }
            self.applied = Some(applied);
        }
        Ok(())
    }

    /// The device died: collected, reported once restarted, and restarted with the target
    /// (at once, or after a backoff when it keeps dying young).
    async fn device_died(&mut self) {
        let Some(device) = self.device.take() else {
            return;
        };
        device.reap();
        let young = self
            .device_started
            .is_some_and(|at| at.elapsed() < QUICK_DEATH);
        tracing::warn!(interface = %device.interface(), device = %device.describe(), "the WireGuard interface is gone");
        self.restarting_after = Some(Restart::Gone(device.describe()));
        self.device_state = None;
        if self.target.is_none() {
            self.state = State::Down;
            self.refresh().await;
            return;
        }
        self.state = State::Configuring;
        if young {
            self.failures += 1;
            let wait = backoff(self.failures);
            tracing::warn!(retry_in = ?wait, "the device died soon after it started; waiting before the next start");
            self.retry_at = Some(Instant::now() + wait);
            self.refresh().await;
        } else {
            self.converge().await;
        }
    }

    /// The configuration was withdrawn: the device stops (the interface goes with it), the
    /// forwards go, the record goes; the key stays.
    async fn leave(&mut self) {
        let was_in = self.device.is_some() || self.applied.is_some() || self.target.is_some();
        let had_forwards = self
            .applied
            .as_ref()
            .is_some_and(|a| !a.config.forwards.is_empty());
        if self.device.is_none()
            && self.applied.is_none()
            && self.state == State::Down
            && device::recorded_interfaces(&self.ctx.root).is_empty()
            && dataplane::marked_kernel_interfaces(&self.ctx.root).is_empty()
        {
            return;
        }
        let interface = self
            .target
            .as_ref()
            .map(|t| t.plan.interface.clone())
            .unwrap_or_default();
        if let Some(device) = self.device.take() {
            tracing::info!(interface = %device.interface(), device = %device.describe(), "stopping the WireGuard interface");
            device.stop().await;
        }
        // Kernel interfaces this netmgr did not hold (they outlive every netmgr).
        for name in dataplane::marked_kernel_interfaces(&self.ctx.root) {
            dataplane::delete_marked(&self.ctx.root, &self.netlink, &name).await;
        }
        // A device this netmgr did not hold (started by a run that left no record).
        for name in device::recorded_interfaces(&self.ctx.root) {
            match device::Device::adopt(&self.ctx.root, &name).await {
                Some(device) => {
                    tracing::info!(pid = device.pid, interface = %name, "stopping a WireGuard device left by an earlier run");
                    device.stop().await;
                }
                None => device::forget(&self.ctx.root, &name).await,
            }
        }
        if had_forwards {
            if let Err(e) = forward::remove().await {
                tracing::warn!(error = %e, "could not remove the port forwards");
            }
        }
        let _ = std::fs::remove_file(self.applied_file());
        self.applied = None;
        self.target = None;
        self.seen = None;
        self.error = None;
        self.retry_at = None;
        self.restarting_after = None;
        self.failures = 0;
        self.device_state = None;
        self.peers_up.clear();
        self.state = State::Down;
        if was_in {
            tracing::info!(%interface, "left the network");
            self.ctx.events.report(
                Severity::Info,
                "network.left",
                "the NetworkConfig was withdrawn: interface removed, forwards removed",
                &[("interface", &interface)],
            );
        }
        self.ctx.status("no NetworkConfig");
        self.refresh().await;
    }

    /// Reads the device, raises peer up/down events, publishes the status if it changed.
    async fn refresh(&mut self) {
        if let Some(device) = &self.device {
            match device.get().await {
                Ok(mut state) => {
                    if let Some(previous) = &self.device_state {
                        steady_handshakes(previous, &mut state);
                    }
                    self.read_failing = false;
                    self.peer_events(&state);
                    self.device_state = Some(state);
                }
                Err(e) => {
                    if !self.read_failing {
                        tracing::warn!(error = %e, "could not read the WireGuard device");
                    }
                    self.read_failing = true;
                }
            }
        }
        self.publish_with_endpoints().await;
        // Every handler ends here, after reading and publishing a status of every peer.
        agentbase::memory::release_free();
    }

    /// Raises `network.peer_up` / `peer_down` for peers whose state changed since the last
    /// read. The first read of this process is the starting point, not news: after a restart
    /// of netmgr the adopted device's sessions were up all along.
    fn peer_events(&mut self, state: &DeviceState) {
        let now = agentbase::health::now_ms();
        let first_read = self.device_state.is_none();
        for (key, peer) in &state.peers {
            let up = is_up(peer.last_handshake_ms, now);
            let was = match self.peers_up.insert(*key, up) {
                Some(was) => was,
                None if first_read => continue,
                None => false,
            };
            if up == was {
                continue;
            }
            let (kind, what) = if up {
                ("network.peer_up", "handshake completed")
            } else {
                ("network.peer_down", "no handshake for 3 minutes")
            };
            let key_text = key.to_base64();
            tracing::info!(peer = %key_text, up, "peer {}", if up { "up" } else { "down" });
            self.ctx.events.report(
                Severity::Info,
                kind,
                &format!("peer {key_text}: {what}"),
                &[
                    ("peer", &key_text),
                    (
                        "endpoint",
                        &peer.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                    ),
                ],
            );
        }
        self.peers_up.retain(|k, _| state.peers.contains_key(k));
    }

    async fn publish_with_endpoints(&mut self) {
        let mut status = self.status();
        if let (Some(port), Some(target)) = (status.listen_port, &self.target) {
            let overlay = self
                .netlink
                .link_index(&target.plan.interface)
                .await
                .ok()
                .flatten();
            if let Ok(addresses) = self.netlink.local_ipv4(overlay).await {
                status.endpoints = addresses
                    .into_iter()
                    .filter(|a| *a != target.plan.address.addr())
                    .map(|a| SocketAddr::new(IpAddr::V4(a), port).to_string())
                    .collect();
            }
        }
        self.publish_status(status);
    }

    /// Publishes the status without reading anything (endpoints as last published).
    fn publish(&mut self) {
        let mut status = self.status();
        status.endpoints = self.endpoints.clone();
        self.publish_status(status);
    }

    /// Publishes `status`; an unchanged one goes nowhere (the publication compares).
    fn publish_status(&mut self, status: NetworkStatus) {
        self.endpoints.clone_from(&status.endpoints);
        if let Err(e) = self.statuses.publish(&status) {
            tracing::warn!(error = %e, "could not publish NetworkStatus");
        }
    }

    fn status(&self) -> NetworkStatus {
        let now = agentbase::health::now_ms();
        let device = self.device.as_ref().and(self.device_state.as_ref());
        let peers: Vec<PeerStatus> = device
            .map(|d| {
                d.peers
                    .iter()
                    .map(|(key, p)| PeerStatus {
                        public_key: key.to_base64(),
                        endpoint: p.endpoint.map(|e| e.to_string()),
                        last_handshake_ms: p.last_handshake_ms,
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let peers_up = peers
            .iter()
            .filter(|p| is_up(p.last_handshake_ms, now))
            .count() as u32;
        NetworkStatus {
            state: self.state.published(),
            interface: self
                .target
                .as_ref()
                .map(|t| t.plan.interface.clone())
                .unwrap_or_default(),
            public_key: Some(self.public.to_base64()),
            peers_up,
            userspace: self.userspace,
            error: self.error.clone(),
            generation: self.applied.as_ref().map_or(0, |a| a.config.generation),
            listen_port: device.map(|d| d.listen_port).filter(|p| *p != 0),
            endpoints: Vec::new(),
            peers,
        }
    }
}

/// Keeps each peer's handshake time as `previous` had it when the new reading is within a
/// second of it: a device derives the time from the handshake's age (boringtun's protocol
/// keeps ages), so the same handshake reads a few ms apart each time, and the status would
/// change on every reading for nothing.
fn steady_handshakes(previous: &DeviceState, state: &mut DeviceState) {
    for (key, peer) in &mut state.peers {
        let old = previous.peers.get(key).and_then(|p| p.last_handshake_ms);
        if let (Some(old), Some(new)) = (old, peer.last_handshake_ms) {
            if old.abs_diff(new) < 1_000 {
                peer.last_handshake_ms = Some(old);
            }
        }
    }
}

/// Whether a handshake at `at` (ms since the epoch) is recent enough for the peer to be up.
fn is_up(at: Option<u64>, now_ms: u64) -> bool {
    at.is_some_and(|t| now_ms.saturating_sub(t) < PEER_UP_WITHIN.as_millis() as u64)
}

/// A peer's endpoint as an address: names are looked up (IPv4 preferred); one that does not
/// resolve is left out (the peer can still reach this node) and logged.
async fn resolve(endpoint: &Endpoint) -> Option<SocketAddr> {
    match endpoint {
        Endpoint::Addr(addr) => Some(*addr),
        Endpoint::Host { host, port } => {
            let lookup = tokio::net::lookup_host((host.as_str(), *port));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => {
                    let addrs: Vec<SocketAddr> = addrs.collect();
                    addrs
                        .iter()
                        .find(|a| a.is_ipv4())
                        .or(addrs.first())
                        .copied()
                }
                Ok(Err(e)) => {
                    tracing::warn!(%host, error = %e, "peer endpoint does not resolve; left out");
                    None
                }
                Err(_) => {
                    tracing::warn!(%host, "peer endpoint did not resolve in time; left out");
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_bound() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(6), MAX_BACKOFF);
        assert_eq!(backoff(60), MAX_BACKOFF);
    }

    #[test]
    fn a_handshake_read_again_keeps_its_time() {
        let key = PublicKey([2; 32]);
        let reading = |at: u64| DeviceState {
            peers: [(
                key,
                uapi::PeerState {
                    last_handshake_ms: Some(at),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let previous = reading(10_000);
        let mut again = reading(10_004);
        steady_handshakes(&previous, &mut again);
        assert_eq!(again, previous);
        let mut new = reading(25_000);
        steady_handshakes(&previous, &mut new);
        assert_eq!(new, reading(25_000), "a new handshake");
    }

    #[test]
    fn peers_are_up_for_three_minutes() {
        let now = 1_000_000_000;
        assert!(is_up(Some(now - 1_000), now));
        assert!(!is_up(Some(now - 180_000), now));
        assert!(!is_up(None, now));
    }
}
