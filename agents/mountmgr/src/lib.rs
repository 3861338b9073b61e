//! mountmgr: mounts verified erofs images and composes them into one overlayfs stack per
//! target, built beside the running stack and switched A/B (DESIGN §2, §6, §7;
//! docs/mountmgr.md).
//!
//! It subscribes to `modulemgr/MountConfig` and publishes `mountmgr/MountStatus`, both keyed by
//! target. The union of a target is reached at `run/powernode-mounts/<target>/current`, and,
//! for the modules' target with `[mounts] mount_path` set, at that path ([`mountpath`]).
//!
//! # States
//!
//! The agent is in one [`State`] at a time; applying one `MountConfig` walks the [`Step`]s.
//!
//! ```text
//!   start ──► Recovering ──► Rebuilding (stacks recorded but not mounted: after a reboot)
//!                 │                 │
//!                 ▼                 ▼
//!   ┌────────► Idle ◄───────────────┘ ◄──────────────────────────────────────────┐
//!   │            │ MountConfig (new generation) / Delete / Restarted              │
//!   │            ▼                                                                │
//!   │        Applying{target}:                                                    │
//!   │            (a confirmation window open and the stack changes: its checks    │
//!   │             run once more first; a failure rolls back as below)             │
//!   │            Plan ──same stack──► Done(Mounted, no rebuild)                   │
//!   │             │ ──no layers────► TearDown ──► Done(Mounted, no slot)          │
//!   │             ▼                                                               │
//!   │           Build (inactive slot, cleaned first) ──error──► Discard ──► Done(Failed)
//!   │             ▼                                                               │
//!   │           Check (health checks in the new stack) ──error──► Discard ──► Done(Failed)
//!   │             │ ──shutdown──► Discard ──► Done(Abandoned)                      │
//!   │             ▼                                                               │
//!   │           Switch (record intent, rename current, move the mount path,       │
//!   │             │     record result)                                            │
//!   │             │ ──rename or mount path fails──► Discard ──► Done(RolledBack)   │
//!   │             ▼                                                               │
//!   │           Retire (unmount the old slot) ──► Done(Mounted)                   │
//!   │             │ ──the new stack has health checks──► Window (keep the old     │
//!   │             │                                      slot) ──► Done(Mounted)  │
//!   └─────────────┘                                                               │
//!     Confirming{target}: a window's checks run again (every confirm_interval_s) ─┤
//!        pass, window over ──► retire the old slot                                │
//!        fail ──► switch back to the old slot, retire the new one, RolledBack ────┤
//!     Repairing{target}: the mount table changed and differs from the record ─────┘
//!        stray mounts unmounted; `current` or the mount path put right; a damaged
//!        active stack built again in the other slot and switched to
//!   shutdown (any state) ──► Stopping: a switch under way is finished, a build not yet
//!                            switched is discarded (its target's status back to what it
//!                            said before), the active stacks stay mounted, exit 0
//! ```
//!
//! Crash safety comes from the order of the switch (the record names the slot being switched
//! to before `current` moves) and from [`recover`], which at every start decides from the
//! record, `current` and the real mount table which slot is active; everything else under the
//! agent's directory is unmounted, and the mount path is made to show the active stack. An
//! open confirmation window is in the record too ([`record::Record::window`]): a restart
//! resumes it ([`recover::resume_window`]) rather than keep an unconfirmed stack for good.
//!
//! Raised as events ([`events`]): each switch (and teardown), a health check that refused
//! one, a rollback in the confirmation window, drift found at run time and what was done, and
//! per target at every start what recovery found and did.

pub mod check;
pub mod current;
pub mod events;
pub mod layout;
pub mod mountinfo;
pub mod mountpath;
pub mod mountwatch;
pub mod record;
pub mod recover;
pub mod stack;
pub mod sys;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentbase::settings::MountSettings;
use agentbase::Context;
use anyhow::Context as _;
use powernode_pubsub::{Event, Publication, Subscription};
use powernode_types::{MountConfig, MountState, MountStatus, Slot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::check::CheckError;
use crate::current::SwitchError;
use crate::layout::Layout;
use crate::mountinfo::MountEntry;
use crate::mountpath::{Mode, MountPath};
use crate::mountwatch::MountWatch;
use crate::record::{AppliedStack, LoopRecord, Record, RecordStore, WindowRecord};
use crate::recover::Recovered;
use crate::stack::{Plan, PlannedLayer};

/// The agent that publishes `MountConfig`.
pub const CONFIG_AGENT: &str = "modulemgr";
/// How long the agent lets the mount table settle after it changed before comparing it with
/// the records: one look for a burst of changes (an operator's `umount -R`).
const DRIFT_SETTLE: Duration = Duration::from_millis(100);
/// The wait before the first retry of a failed repair; it doubles up to [`REPAIR_BACKOFF_MAX`].
const REPAIR_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between retries of a failed repair.
const REPAIR_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The agent's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Reading the mount table and the records; adopting or cleaning what an earlier run left.
    Recovering,
    /// Building again the stacks recorded as applied but no longer mounted (after a reboot).
    Rebuilding,
    /// Waiting for `MountConfig` changes, mount table changes and the windows' next checks.
    Idle,
    /// Applying a `MountConfig` to `target` (see [`Step`]).
    Applying {
        /// The target.
        target: String,
        /// The generation being applied.
        generation: u64,
    },
    /// Running again the health checks of `target`'s stack in its confirmation window.
    Confirming {
        /// The target.
        target: String,
        /// The generation switched to.
        generation: u64,
    },
    /// Putting `target`'s mounts back as its record says (drift found at run time).
    Repairing {
        /// The target.
        target: String,
    },
    /// Shutting down: active stacks stay mounted.
    Stopping,
}

/// The steps of applying one `MountConfig`.
#[derive(Debug)]
pub enum Step {
    /// Compare with the active stack; resolve and check the new one.
    Plan,
    /// Unmount everything of the target (a config with no layers).
    TearDown,
    /// Clean the inactive slot and build the new stack in it.
    Build(Plan),
    /// Run the layers' health checks in the new stack.
    Check(Plan),
    /// Record the intent, rename `current`, move the mount path, record the result.
    Switch(Plan),
    /// Unmount the slot that was active before the switch.
    Retire {
        /// The stack switched away from.
        old: Option<AppliedStack>,
        /// Its plan, if known.
        old_plan: Option<Plan>,
    },
    /// Keep the slot that was active before the switch for the confirmation window the
    /// switch recorded.
    Window {
        /// The plan of the stack switched away from, if known.
        old_plan: Option<Plan>,
    },
    /// Unmount the new slot after a failure, then finish with the outcome.
    Discard {
        /// The slot to clean.
        slot: Slot,
        /// What to report.
        outcome: Outcome,
    },
    /// Finished.
    Done(Outcome),
}

/// How applying a `MountConfig` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The configured stack is active (or, with no layers, nothing is mounted).
    Mounted,
    /// The new stack could not be built or was unhealthy; the previous one is still active.
    Failed(String),
    /// The switch itself failed; the previous stack is active again.
    RolledBack(String),
    /// Shutdown interrupted the build; nothing changed and the generation is not answered.
    Abandoned,
}

/// Why a switch did not happen; in either case the previous stack is active as before.
#[derive(Debug)]
enum SwitchFailure {
    /// The intent could not be recorded: nothing was touched.
    Unrecorded(String),
    /// `current` or the mount path could not be moved (or not durably), and was put back.
    NotSwitched(String),
}

/// The confirmation window after a switch: the previous stack stays mounted while the new
/// one's health checks run again. Its record ([`Record::window`]) is what survives a restart.
#[derive(Debug)]
struct Window {
    /// The stack switched away from, still mounted in its slot.
    previous: AppliedStack,
    /// Its plan (its images may be gone from the store by now: it is not planned again).
    previous_plan: Option<Plan>,
    /// When the window ends.
    until: Instant,
    /// The same, in ms since the epoch, for `MountStatus`.
    until_ms: u64,
    /// When the checks run next.
    next_check: Instant,
}

impl Window {
    /// The window `record` describes, its checks next due after `interval` (or at its end, if
    /// that is sooner: a window resumed after its deadline has them run at once). It lasts no
    /// longer than `length` from now, whatever the clock did while the agent was down.
    fn from_record(
        record: &WindowRecord,
        previous_plan: Option<Plan>,
        interval: Duration,
        length: Duration,
    ) -> Window {
        let now = Instant::now();
        let left = record.until_ms.saturating_sub(agentbase::health::now_ms());
        let until = now + Duration::from_millis(left).min(length);
        Window {
            previous: record.previous.clone(),
            previous_plan,
            until,
            until_ms: record.until_ms,
            next_check: (now + interval).min(until),
        }
    }
}

/// A repair that failed: when to try again.
#[derive(Debug)]
struct Retry {
    /// Failed repairs in a row.
    failures: u32,
    /// When to try again.
    at: Instant,
}

/// What differs between a target's mounts and its record.
#[derive(Debug, Default)]
struct Drift {
    /// What differs, in words.
    found: Vec<String>,
    /// The active stack is not mounted exactly as recorded: it is built again.
    active_damaged: bool,
    /// The previous stack kept for the window is damaged: the window ends.
    previous_damaged: bool,
    /// Mounts under the target's directory that belong to no stack.
    strays: Vec<PathBuf>,
    /// `current` does not name the active slot.
    current_wrong: bool,
    /// The mount path does not show the active stack.
    path_wrong: bool,
}

/// What the agent knows of one target.
#[derive(Debug)]
struct TargetState {
    /// The record as last saved.
    record: Record,
    /// The stack `current` points to, fully mounted.
    active: Option<AppliedStack>,
    /// The generation last answered (applied, refused or unchanged): a repeat does nothing.
    handled: Option<u64>,
    /// The active stack's plan (its paths), to compare with the mount table; planned again
    /// when missing.
    plan: Option<Plan>,
    /// The confirmation window of the last switch, while it is open.
    window: Option<Window>,
    /// The last drift found since `handled` was answered, and what was done (MountStatus).
    drift: Option<String>,
    /// A failed repair, while it waits to be tried again.
    retry: Option<Retry>,
    /// The end of the confirmation window a reboot cut short, while the stack it led to is
    /// built again: the switch to it opens its window with this end, not a full window.
    resume_until: Option<u64>,
}

impl TargetState {
    fn new(target: &str) -> TargetState {
        TargetState::with(Record::new(target), None, None)
    }

    fn with(record: Record, active: Option<AppliedStack>, handled: Option<u64>) -> TargetState {
        TargetState {
            record,
            active,
            handled,
            plan: None,
            window: None,
            drift: None,
            retry: None,
            resume_until: None,
        }
    }
}

/// Everything the main loop carries.
struct Agent {
    ctx: Context,
    layout: Layout,
    store: RecordStore,
    status_pub: Publication<MountStatus>,
    targets: BTreeMap<String, TargetState>,
    state: State,
    settings: MountSettings,
    /// The mount path and the target whose union it shows.
    mount_path: Option<(String, MountPath)>,
    /// When to compare the mount table with the records: set when it changed (after
    /// [`DRIFT_SETTLE`]), so a `MountConfig` arriving meanwhile goes first.
    drift_at: Option<Instant>,
}

/// The agent's entry point: see the crate documentation.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let mounts = ctx.root.path(layout::MOUNTS_DIR);
    std::fs::create_dir_all(&mounts).with_context(|| format!("creating {}", mounts.display()))?;
    let layout = Layout::new(ctx.root.base()).context("resolving the root")?;
    let store = RecordStore::new(layout.records_dir());
    let status_pub = ctx
        .open_publication::<MountStatus>()
        .context("opening MountStatus")?;
    let mount_path = mount_path(&ctx, &layout);
    // Started first: a change during recovery is looked at afterwards.
    let watch = match MountWatch::start() {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the mount table; drift is noticed at the periodic check only");
            None
        }
    };
    let mut agent = Agent {
        ctx: ctx.clone(),
        layout,
        store,
        status_pub,
        targets: BTreeMap::new(),
        state: State::Recovering,
        settings: ctx.settings.mounts.clone(),
        mount_path,
        drift_at: None,
    };
    let rebuilds = agent.recover()?;
    agent.status_pub.signal_restarted();
    ctx.ready();
    if !rebuilds.is_empty() {
        agent.enter(State::Rebuilding);
        for recovered in rebuilds {
            if ctx.shutdown.is_cancelled() {
                break;
            }
            agent.rebuild_recorded(recovered).await;
        }
    }
    // The mount path, and anything recovery could not see (a stack switched beneath
    // another when the last run died).
    agent.check_drift().await;
    agent.run(watch).await;
    Ok(())
}

/// The mount path from the settings, for the modules' target; `None` if unset or unusable
/// (which is reported).
fn mount_path(ctx: &Context, layout: &Layout) -> Option<(String, MountPath)> {
    let settings = &ctx.settings.mounts;
    let rel = settings.mount_path.as_deref()?;
    let target = ctx.settings.modules.mount_target.clone();
    let path = layout.root().join(rel.trim_start_matches('/'));
    if path.starts_with(layout.mounts_dir()) || path.starts_with(layout.records_dir()) {
        let problem =
            format!("mounts.mount_path {rel} is inside mountmgr's own directories; ignored");
        tracing::error!("{problem}");
        ctx.health.report_error(&problem);
        return None;
    }
    let beneath = settings.move_beneath && sys::move_beneath_supported();
    if settings.move_beneath && !beneath {
        tracing::info!("the kernel cannot mount beneath a mount (Linux 6.5+): the mount path is a symlink to current");
    }
    let path = MountPath {
        path,
        mode: if beneath {
            Mode::Beneath
        } else {
            Mode::Symlink
        },
        current: layout.current(&target),
    };
    if let Err(e) = path.prepare() {
        tracing::warn!(error = %e, "preparing the mount path");
        ctx.health.report_error(&e.to_string());
    }
    tracing::info!(target = %target, path = %path.path.display(), mode = ?path.mode, "mount path");
    Some((target, path))
}

impl Agent {
    fn enter(&mut self, state: State) {
        if self.state != state {
            tracing::debug!(from = ?self.state, to = ?state, "state");
            self.state = state;
        }
    }

    /// The mount path of `target`, if it has one.
    fn path_of(&self, target: &str) -> Option<MountPath> {
        self.mount_path
            .as_ref()
            .filter(|(t, _)| t == target)
            .map(|(_, p)| p.clone())
    }

    /// Recovers every target an earlier run left (records, directories, mounts) and publishes
    /// the truth about each. Returns the configurations to build again.
    /// Recovers every target ([`recover::recover_target`]): the recoveries with a stack to
    /// build again ([`Recovered::rebuild`]), for [`Agent::rebuild_recorded`].
    fn recover(&mut self) -> anyhow::Result<Vec<Recovered>> {
        let mut names = self.store.targets();
        names.extend(self.layout.existing_targets());
        let entries = mountinfo::read().context("reading the mount table")?;
        for entry in mountinfo::under(&entries, self.layout.mounts_dir()) {
            if let Ok(rel) = entry.mount_point.strip_prefix(self.layout.mounts_dir()) {
                if let Some(first) = rel.components().next() {
                    names.push(first.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
        names.sort();
        names.dedup();
        let mut rebuilds = Vec::new();
        for name in names {
            let mut recovered = recover::recover_target(&self.layout, &self.store, &name)
                .with_context(|| format!("recovering target {name}"))?;
            for problem in &recovered.problems {
                tracing::warn!(target = %name, %problem, "recovery");
                self.ctx
                    .health
                    .report_error(&format!("recovering {name}: {problem}"));
            }
            // A window a reboot cut short is reported once its previous stack is built again
            // (or not): [`Agent::rebuild_recorded`].
            if recovered.rebuild_window.is_none() {
                events::recovered(&name, &recovered).raise(&self.ctx.events);
            }
            if let Some(record) = recovered.record.take() {
                let mut state = TargetState::with(record, recovered.active.clone(), None);
                if let Some(window) = &recovered.window {
                    let previous = &window.previous;
                    let plan =
                        stack::plan_mounted(&self.layout, &previous.config, previous.slot).ok();
                    tracing::info!(target = %name, slot = ?previous.slot, generation = previous.config.generation, until_ms = window.until_ms, "resuming the confirmation window");
                    state.window = Some(Window::from_record(
                        window,
                        plan,
                        self.settings.confirm_interval(),
                        self.settings.confirm_window(),
                    ));
                }
                self.targets.insert(name.clone(), state);
            }
            if recovered.rebuild.is_some() {
                rebuilds.push(recovered);
            }
        }
        // Publish what is true now. A previous answer that still describes the active stack
        // (e.g. "generation 7 failed, slot A still active") is kept, so a repeat of that
        // generation stays a repeat, with the confirmation window as recovery left it (resumed,
        // or over); anything else is replaced or withdrawn.
        let mut keys = self.status_pub.keys();
        keys.extend(self.targets.keys().cloned());
        keys.sort();
        keys.dedup();
        for key in keys {
            let active = self.targets.get(&key).and_then(|t| t.active.clone());
            let truth_slot = active.as_ref().map(|a| a.slot);
            let truth_layers = active.as_ref().map(digests).unwrap_or_default();
            let previous = self.status_pub.get(&key);
            let consistent = previous.as_ref().is_some_and(|p| {
                p.state != MountState::Mounting && p.slot == truth_slot && p.layers == truth_layers
            });
            if let (true, Some(previous)) = (consistent, previous) {
                let state = self
                    .targets
                    .entry(key.clone())
                    .or_insert_with(|| TargetState::new(&key));
                state.handled = Some(previous.generation);
                let window_until = state.window.as_ref().map(|w| w.until_ms);
                if previous.confirm_until_ms != window_until {
                    self.publish(&key, previous.generation, previous.state, previous.error);
                }
            } else if let Some(active) = active {
                let generation = active.config.generation;
                if let Some(t) = self.targets.get_mut(&key) {
                    t.handled = Some(generation);
                }
                self.publish(&key, generation, MountState::Mounted, None);
            } else {
                self.unpublish(&key);
            }
        }
        tracing::info!(
            targets = self.targets.len(),
            rebuilds = rebuilds.len(),
            "recovered"
        );
        Ok(rebuilds)
    }

    /// The main loop: one `MountConfig` event, mount table change or due check at a time.
    async fn run(&mut self, mut watch: Option<MountWatch>) {
        enum Wake {
            Config(Event<MountConfig>),
            MountsChanged,
            Due,
            Tick,
        }
        let ctx = self.ctx.clone();
        let mut configs = Subscription::<MountConfig>::connect(&ctx.dirs, CONFIG_AGENT);
        let mut tick = tokio::time::interval(ctx.beat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.enter(State::Idle);
        loop {
            ctx.beat();
            let due = self.next_due();
            let wake = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = tick.tick() => Wake::Tick,
                () = changed(&mut watch) => Wake::MountsChanged,
                () = sleep_until(due) => Wake::Due,
                event = configs.next() => Wake::Config(event),
            };
            let event = match wake {
                Wake::Config(event) => event,
                Wake::MountsChanged => {
                    self.drift_at.get_or_insert(Instant::now() + DRIFT_SETTLE);
                    continue;
                }
                Wake::Tick => {
                    // The safety net under the watch: a change it could not report.
                    self.check_drift().await;
                    self.enter(State::Idle);
                    continue;
                }
                Wake::Due => {
                    self.on_due().await;
                    self.enter(State::Idle);
                    continue;
                }
            };
            match event {
                Event::Create { value, .. } => self.config_changed(value).await,
                Event::Modify { new, .. } => self.config_changed(new).await,
                Event::Delete { key, .. } => {
                    tracing::info!(target = %key, "MountConfig withdrawn");
                    self.remove_target(&key);
                }
                Event::Restarted { .. } => {
                    // modulemgr has published everything it has: a target it no longer
                    // configures went away while we were not listening.
                    let stale: Vec<String> = self
                        .targets
                        .keys()
                        .filter(|t| configs.get(t).is_none())
                        .cloned()
                        .collect();
                    for target in stale {
                        tracing::info!(target = %target, "no MountConfig after modulemgr restarted");
                        self.remove_target(&target);
                    }
                }
                Event::Synchronized | Event::Disconnected => {}
            }
            self.enter(State::Idle);
        }
        self.enter(State::Stopping);
        tracing::info!("stopping; active stacks stay mounted");
    }

    /// The earliest instant something is due: a look at a changed mount table, a window's
    /// next check, a repair's retry.
    fn next_due(&self) -> Option<Instant> {
        self.targets
            .values()
            .flat_map(|t| {
                [
                    t.window.as_ref().map(|w| w.next_check),
                    t.retry.as_ref().map(|r| r.at),
                ]
            })
            .chain([self.drift_at])
            .flatten()
            .min()
    }

    /// Runs what is due: a look at the changed mount table, windows' checks, repairs to try
    /// again.
    async fn on_due(&mut self) {
        let now = Instant::now();
        if self.drift_at.is_some_and(|at| at <= now) {
            self.drift_at = None;
            self.check_drift().await;
        }
        let windows: Vec<String> = self
            .targets
            .iter()
            .filter(|(_, t)| t.window.as_ref().is_some_and(|w| w.next_check <= now))
            .map(|(name, _)| name.clone())
            .collect();
        for target in windows {
            self.window_check(&target).await;
        }
        if self
            .targets
            .values()
            .any(|t| t.retry.as_ref().is_some_and(|r| r.at <= now))
        {
            self.check_drift().await;
        }
    }

    async fn config_changed(&mut self, config: MountConfig) {
        let handled = self.targets.get(&config.target).and_then(|t| t.handled);
        if handled == Some(config.generation) {
            tracing::debug!(target = %config.target, generation = config.generation, "repeat of a handled generation");
            return;
        }
        self.apply_beating(config).await;
    }

    /// Builds the stack `recovered` found recorded but not mounted (after a reboot). With the
    /// confirmation window the reboot cut short ([`Recovered::rebuild_window`]: its recovery
    /// not yet reported), the stack it kept to switch back to is built first and the recorded
    /// stack switched to from it, so that the window, run to its recorded end, can still roll
    /// back; were that stack not to build, the recorded one is built alone, its window over,
    /// and the recovery says so.
    async fn rebuild_recorded(&mut self, mut recovered: Recovered) {
        let Some(config) = recovered.rebuild.clone() else {
            return;
        };
        let target = config.target.clone();
        if let Some(window) = recovered.rebuild_window.clone() {
            let previous = window.previous.config;
            let generation = previous.generation;
            tracing::info!(target = %target, generation, until_ms = window.until_ms,
                "a reboot cut a confirmation window short: building the stack before it first");
            self.apply_beating(previous).await;
            let built = self
                .targets
                .get(&target)
                .and_then(|t| t.active.as_ref())
                .is_some_and(|a| a.config.generation == generation);
            if !built {
                recovered.rebuild_window = None;
            }
            events::recovered(&target, &recovered).raise(&self.ctx.events);
            if self.ctx.shutdown.is_cancelled() {
                return;
            }
            if let Some(state) = self.targets.get_mut(&target) {
                state.resume_until = built.then_some(window.until_ms);
            }
        }
        self.apply_beating(config).await;
        if let Some(state) = self.targets.get_mut(&target) {
            state.resume_until = None;
        }
    }

    /// [`Agent::apply`], beating the liveness meanwhile (health checks can take long).
    async fn apply_beating(&mut self, config: MountConfig) {
        let ctx = self.ctx.clone();
        beating(&ctx, self.apply(config)).await;
    }

    /// Applies one configuration to its target: walks the [`Step`]s, publishes the outcome.
    async fn apply(&mut self, config: MountConfig) {
        let target = config.target.clone();
        let generation = config.generation;
        // A window still open when the stack changes: its checks run once more now, so the
        // new stack replaces a confirmed one (or the rolled-back one before it). A teardown
        // takes both slots anyway.
        let window_open = self.targets.get(&target).is_some_and(|t| {
            t.window.is_some()
                && !config.layers.is_empty()
                && t.active
                    .as_ref()
                    .is_some_and(|a| !stack::same_stack(&a.config, &config))
        });
        if window_open {
            self.settle_window(&target).await;
        }
        self.enter(State::Applying {
            target: target.clone(),
            generation,
        });
        let previous = self
            .targets
            .get(&target)
            .and_then(|t| t.active.as_ref())
            .map(|a| a.config.generation);
        // What the target's status said before this generation: said again if shutdown
        // abandons the build, since then nothing changed.
        let status_before = self.status_pub.get(&target);
        // Whether the active stack changed: switched to the new one, or torn down.
        let mut changed = false;
        let mut step = Step::Plan;
        let outcome = loop {
            tracing::debug!(target = %target, generation, step = step_name(&step), "step");
            step = match step {
                Step::Plan => self.plan_step(&config),
                Step::TearDown => match self.tear_down(&target) {
                    Ok(()) => {
                        changed = previous.is_some();
                        Step::Done(Outcome::Mounted)
                    }
                    Err(e) => Step::Done(Outcome::Failed(e)),
                },
                Step::Build(plan) => {
                    let next = self.build_step(plan, generation);
                    failpoint::hit("mountmgr.built");
                    next
                }
                Step::Check(plan) => self.check_step(plan, generation).await,
                Step::Switch(plan) => self.switch_step(&config, plan),
                Step::Retire { old, old_plan } => {
                    changed = true;
                    let windowed = self
                        .targets
                        .get(&target)
                        .is_some_and(|t| t.record.window.is_some());
                    if windowed {
                        Step::Window { old_plan }
                    } else {
                        self.retire(&target, old);
                        Step::Done(Outcome::Mounted)
                    }
                }
                Step::Window { old_plan } => {
                    self.open_window(&target, old_plan);
                    Step::Done(Outcome::Mounted)
                }
                Step::Discard { slot, outcome } => {
                    self.discard(&target, slot);
                    Step::Done(outcome)
                }
                Step::Done(outcome) => break outcome,
            };
        };
        let state = match &outcome {
            Outcome::Abandoned => {
                tracing::info!(target = %target, generation, "build abandoned for shutdown");
                // The build said `Mounting`; the stack is the one before it, and so is the
                // status the agent leaves in its checkpoint.
                match status_before {
                    Some(status) => {
                        if let Err(e) = self.status_pub.publish(&status) {
                            tracing::warn!(target = %target, error = %e, "could not publish MountStatus");
                        }
                    }
                    None => self.unpublish(&target),
                }
                return;
            }
            Outcome::Mounted => {
                let active = self.targets.get(&target).and_then(|t| t.active.as_ref());
                tracing::info!(
                    target = %target,
                    generation,
                    slot = ?active.map(|a| a.slot),
                    layers = active.map_or(0, |a| a.config.layers.len()),
                    "stack mounted"
                );
                MountState::Mounted
            }
            Outcome::Failed(error) => {
                tracing::warn!(target = %target, generation, %error, "stack not applied");
                MountState::Failed
            }
            Outcome::RolledBack(error) => {
                tracing::warn!(target = %target, generation, %error, "switch rolled back");
                MountState::RolledBack
            }
        };
        let error = match outcome {
            Outcome::Failed(e) | Outcome::RolledBack(e) => Some(e),
            Outcome::Mounted | Outcome::Abandoned => None,
        };
        let answered = self
            .targets
            .entry(target.clone())
            .or_insert_with(|| TargetState::new(&target));
        answered.handled = Some(generation);
        answered.drift = None;
        if changed {
            let slot = answered.active.as_ref().map(|a| a.slot);
            events::switched(&config, slot, previous).raise(&self.ctx.events);
        }
        self.publish(&target, generation, state, error);
    }

    fn plan_step(&mut self, config: &MountConfig) -> Step {
        let target = &config.target;
        if let Err(e) = layout::check_target_name(target) {
            return Step::Done(Outcome::Failed(e.to_string()));
        }
        if config.layers.is_empty() {
            return Step::TearDown;
        }
        let state = self
            .targets
            .entry(target.clone())
            .or_insert_with(|| TargetState::new(target));
        if let Some(active) = &mut state.active {
            if stack::same_stack(&active.config, config) {
                // A new generation of the same stack: nothing to mount, only to remember
                // (its health checks may differ: planned again when needed).
                active.config = config.clone();
                state.record.applied = Some(active.clone());
                state.plan = None;
                self.store.save_or_warn(&state.record, target);
                return Step::Done(Outcome::Mounted);
            }
        }
        // Build beside the active stack; with none active, beside the one last recorded, so
        // the record's `applied` and the new stack never share a slot.
        let slot = state
            .active
            .as_ref()
            .or(state.record.applied.as_ref())
            .map_or(Slot::A, |s| layout::other(s.slot));
        match stack::plan(&self.layout, config, slot) {
            Ok(plan) => Step::Build(plan),
            Err(e) => Step::Done(Outcome::Failed(e.to_string())),
        }
    }

    fn build_step(&mut self, plan: Plan, generation: u64) -> Step {
        self.publish(&plan.target, generation, MountState::Mounting, None);
        match self.build_slot(&plan) {
            Err(e) => Step::Discard {
                slot: plan.slot,
                outcome: Outcome::Failed(e),
            },
            Ok(()) if self.ctx.shutdown.is_cancelled() => Step::Discard {
                slot: plan.slot,
                outcome: Outcome::Abandoned,
            },
            Ok(()) => Step::Check(plan),
        }
    }

    /// Cleans `plan`'s slot and builds the stack in it, recording the loop devices it binds.
    /// On error the slot is left for the caller to discard.
    fn build_slot(&mut self, plan: &Plan) -> Result<(), String> {
        let target = plan.target.clone();
        // Leftovers of an earlier build or of a retired stack that was busy.
        if let Err(e) = self.clean_slot(&target, plan.slot) {
            return Err(format!(
                "cleaning slot {}: {e}",
                layout::slot_name(plan.slot)
            ));
        }
        let store = &self.store;
        let state = self
            .targets
            .entry(target.clone())
            .or_insert_with(|| TargetState::new(&target));
        let mut on_loop = |l: LoopRecord| {
            tracing::info!(image = %l.image.display(), device = %l.device.display(), "loop device bound");
            state.record.loops.push(l);
            if let Err(e) = store.save(&state.record) {
                tracing::warn!(error = %e, "could not record a loop device (it clears itself on unmount)");
            }
        };
        stack::build(plan, &mut on_loop).map_err(|e| e.to_string())
    }

    async fn check_step(&mut self, plan: Plan, generation: u64) -> Step {
        match run_checks(&plan, &self.ctx.shutdown).await {
            Ok(()) => Step::Switch(plan),
            Err((_, CheckError::Cancelled { .. })) => Step::Discard {
                slot: plan.slot,
                outcome: Outcome::Abandoned,
            },
            Err((layer, e)) => {
                let active = self
                    .targets
                    .get(&plan.target)
                    .and_then(|t| t.active.as_ref())
                    .map(|a| a.config.generation);
                events::health_check_failed(&plan.target, generation, &layer, &e, active)
                    .raise(&self.ctx.events);
                Step::Discard {
                    slot: plan.slot,
                    outcome: Outcome::Failed(e.to_string()),
                }
            }
        }
    }

    /// The switch step of applying `config`: see [`Agent::switch_to`].
    fn switch_step(&mut self, config: &MountConfig, plan: Plan) -> Step {
        let resume_until = self
            .targets
            .get_mut(&plan.target)
            .and_then(|t| t.resume_until.take());
        let Some(state) = self.targets.get(&plan.target) else {
            return Step::Discard {
                slot: plan.slot,
                outcome: Outcome::Failed("internal: target state lost".to_owned()),
            };
        };
        let old = state.active.clone();
        let old_plan = state.plan.clone();
        let new = AppliedStack {
            slot: plan.slot,
            config: config.clone(),
        };
        let window = old
            .clone()
            .filter(|_| self.wants_window(config))
            .map(|previous| WindowRecord {
                previous,
                until_ms: resume_until.unwrap_or_else(|| {
                    agentbase::health::now_ms().saturating_add(
                        u64::try_from(self.settings.confirm_window().as_millis())
                            .unwrap_or(u64::MAX),
                    )
                }),
            });
        let (target, slot) = (plan.target.clone(), plan.slot);
        match self.switch_to(&target, new, Some(plan), old.as_ref(), window) {
            Ok(()) => Step::Retire { old, old_plan },
            Err(SwitchFailure::Unrecorded(e)) => Step::Discard {
                slot,
                outcome: Outcome::Failed(e),
            },
            Err(SwitchFailure::NotSwitched(e)) => Step::Discard {
                slot,
                outcome: Outcome::RolledBack(e),
            },
        }
    }

    /// Makes `new` (built and checked in its slot) the active stack of `target`: the intent
    /// recorded, `current` renamed, the mount path moved (the new stack mounted beneath the
    /// old one, the old one unmounted from above), the result recorded. Once the intent is
    /// on disk a crash at any instant is resolved by [`recover::decide`] and the drift check
    /// after it. On `Err` the stack before (`old`) is active as it was, and so is the record.
    ///
    /// `window` is the confirmation window the switch opens, recorded with the intent so that
    /// a crash after `current` moved resumes it; without one, the recorded window stays in
    /// the intent (a switch back after a failed check, cut short before `current` moved, is
    /// made again by the window's next check) and is cleared with the result.
    fn switch_to(
        &mut self,
        target: &str,
        new: AppliedStack,
        new_plan: Option<Plan>,
        old: Option<&AppliedStack>,
        window: Option<WindowRecord>,
    ) -> Result<(), SwitchFailure> {
        let target_dir = self.layout.target_dir(target);
        let new_merged = self.layout.merged(target, new.slot);
        let old_merged = old.map(|o| self.layout.merged(target, o.slot));
        let path = self.path_of(target);
        let store = &self.store;
        let health = &self.ctx.health;
        let Some(state) = self.targets.get_mut(target) else {
            return Err(SwitchFailure::Unrecorded(
                "internal: target state lost".to_owned(),
            ));
        };
        let window_before = state.record.window.clone();
        state.record.switching_to = Some(new.clone());
        if window.is_some() {
            state.record.window = window.clone();
        }
        if let Err(e) = store.save(&state.record) {
            state.record.switching_to = None;
            state.record.window = window_before;
            return Err(SwitchFailure::Unrecorded(format!(
                "recording the switch: {e}"
            )));
        }
        failpoint::hit("mountmgr.intent_recorded");
        let cancel_intent = |state: &mut TargetState| {
            state.record.switching_to = None;
            state.record.window = window_before.clone();
            store.save_or_warn(&state.record, target);
        };
        match current::switch(&target_dir, new.slot) {
            Ok(()) => failpoint::hit("mountmgr.switched"),
            Err(e @ SwitchError::NotSwitched { .. }) => {
                cancel_intent(state);
                return Err(SwitchFailure::NotSwitched(e.to_string()));
            }
            Err(e @ SwitchError::NotDurable { .. }) => {
                // `current` moved but may not survive a power loss: go back to the old stack
                // rather than run on a switch the disk may forget.
                match switch_back(&target_dir, old) {
                    Ok(()) => {
                        cancel_intent(state);
                        return Err(SwitchFailure::NotSwitched(e.to_string()));
                    }
                    Err(back_error) => {
                        // Neither direction is durable; `current` names the new slot, which
                        // is complete and checked, and the record says so: keep it.
                        let problem = format!("{e}; switching back failed too: {back_error}");
                        tracing::error!(target = %target, %problem, "switch not durable");
                        health.report_error(&problem);
                    }
                }
            }
        }
        if let Some(path) = &path {
            let moved = path
                .stage(&new_merged)
                .and_then(|()| path.reconcile(Some(&new_merged)));
            match moved {
                Ok(_) => failpoint::hit("mountmgr.path_switched"),
                Err(e) => {
                    // The path shows the old stack still (at worst the new one for a moment):
                    // put it and `current` back.
                    if let Err(back) = path.reconcile(old_merged.as_deref()) {
                        tracing::warn!(target = %target, error = %back, "could not put the mount path back");
                    }
                    match switch_back(&target_dir, old) {
                        Ok(()) => {
                            cancel_intent(state);
                            return Err(SwitchFailure::NotSwitched(e.to_string()));
                        }
                        Err(back_error) => {
                            let problem =
                                format!("{e}; switching current back failed: {back_error}");
                            tracing::error!(target = %target, %problem, "mount path not switched");
                            health.report_error(&problem);
                        }
                    }
                }
            }
        }
        state.record.applied = Some(new.clone());
        state.record.switching_to = None;
        state.record.window = window;
        state.active = Some(new.clone());
        state.plan = new_plan;
        let saved = store.save(&state.record);
        failpoint::hit("mountmgr.result_recorded");
        if let Err(e) = saved {
            // Recovery still finds the switch: the intent names the slot `current` names.
            tracing::warn!(target = %target, error = %e, "could not record the switch result");
            health.report_error(&format!("recording the switch of {target}: {e}"));
        }
        tracing::info!(target = %target, slot = ?new.slot, generation = new.config.generation, "switched");
        Ok(())
    }

    /// Whether a switch to `config` opens a confirmation window: it has health checks to run
    /// again, and the window is not 0.
    fn wants_window(&self, config: &MountConfig) -> bool {
        self.settings.confirm_window_s > 0 && config.layers.iter().any(|l| l.health_check.is_some())
    }

    /// Keeps the stack switched away from mounted for the confirmation window the switch
    /// recorded.
    fn open_window(&mut self, target: &str, old_plan: Option<Plan>) {
        let (interval, length) = (
            self.settings.confirm_interval(),
            self.settings.confirm_window(),
        );
        let Some(state) = self.targets.get_mut(target) else {
            return;
        };
        let Some(record) = &state.record.window else {
            return;
        };
        let window = Window::from_record(record, old_plan, interval, length);
        tracing::info!(target, slot = ?window.previous.slot, generation = window.previous.config.generation, until_ms = window.until_ms, "keeping the previous stack for the confirmation window");
        state.window = Some(window);
    }

    /// Ends `target`'s window, in the record first: a crash after this retires nothing twice
    /// and resumes nothing. The window, for the caller to retire its previous stack.
    fn end_window(&mut self, target: &str) -> Option<Window> {
        let state = self.targets.get_mut(target)?;
        let window = state.window.take();
        if state.record.window.take().is_some() {
            self.store.save_or_warn(&state.record, target);
        }
        window
    }

    /// Runs the health checks of `target`'s stack in its window: a failure switches back to
    /// the previous stack; passing at the end of the window retires the previous stack.
    async fn window_check(&mut self, target: &str) {
        let Some(until) = self
            .targets
            .get(target)
            .and_then(|t| t.window.as_ref())
            .map(|w| w.until)
        else {
            return;
        };
        let Some(result) = self.run_window_checks(target).await else {
            return;
        };
        match result {
            Err((layer, e)) => self.roll_back(target, &layer, &e),
            Ok(()) if Instant::now() >= until => self.confirm(target),
            Ok(()) => {
                let interval = self.settings.confirm_interval();
                if let Some(w) = self.targets.get_mut(target).and_then(|t| t.window.as_mut()) {
                    w.next_check = (Instant::now() + interval).min(w.until);
                }
            }
        }
    }

    /// Ends `target`'s window now, for a new stack: its checks run once more; passing
    /// confirms the stack, failing rolls it back.
    async fn settle_window(&mut self, target: &str) {
        match self.run_window_checks(target).await {
            Some(Err((layer, e))) => self.roll_back(target, &layer, &e),
            Some(Ok(())) => self.confirm(target),
            None => {}
        }
    }

    /// The active stack's health checks, in its window. `None`: nothing to run (no window, or
    /// shutting down).
    async fn run_window_checks(
        &mut self,
        target: &str,
    ) -> Option<Result<(), (PlannedLayer, CheckError)>> {
        let generation = self.targets.get(target)?.handled?;
        let Some(plan) = self.active_plan(target) else {
            // The active stack cannot be planned (its images are gone): nothing to run; the
            // window ends as if passed.
            return Some(Ok(()));
        };
        self.enter(State::Confirming {
            target: target.to_owned(),
            generation,
        });
        let ctx = self.ctx.clone();
        match beating(&ctx, run_checks(&plan, &ctx.shutdown)).await {
            Err((_, CheckError::Cancelled { .. })) => None,
            result => Some(result),
        }
    }

    /// The window passed: the previous stack is retired.
    fn confirm(&mut self, target: &str) {
        let Some(window) = self.end_window(target) else {
            return;
        };
        tracing::info!(target, "stack confirmed; retiring the previous one");
        self.retire(target, Some(window.previous));
        self.republish(target);
    }

    /// A health check failed in the window: switch back to the previous stack, retire the
    /// failed one, answer its generation `RolledBack`.
    fn roll_back(&mut self, target: &str, layer: &PlannedLayer, error: &CheckError) {
        let Some(state) = self.targets.get_mut(target) else {
            return;
        };
        let (Some(window), Some(failed)) = (state.window.take(), state.active.clone()) else {
            return;
        };
        let generation = state.handled.unwrap_or(failed.config.generation);
        let previous = window.previous;
        let back = match refresh_shared_upper(window.previous_plan.as_ref()) {
            Ok(()) => self.switch_to(
                target,
                previous.clone(),
                window.previous_plan,
                Some(&failed),
                None,
            ),
            Err(e) => Err(SwitchFailure::NotSwitched(e)),
        };
        let (back, state, reason) = match back {
            Ok(()) => {
                tracing::warn!(target, generation, %error, "health check failed in the confirmation window; switched back");
                self.retire(target, Some(failed));
                (
                    Ok((previous.config.generation, previous.slot)),
                    MountState::RolledBack,
                    format!(
                        "{error} (in the confirmation window; generation {} is active again)",
                        previous.config.generation
                    ),
                )
            }
            Err(SwitchFailure::Unrecorded(why) | SwitchFailure::NotSwitched(why)) => {
                // The failed stack stays; the window is over either way.
                let problem =
                    format!("{error} (in the confirmation window); switching back failed: {why}");
                tracing::error!(target, generation, %problem, "rollback failed");
                self.ctx.health.report_error(&problem);
                self.end_window(target);
                self.retire(target, Some(previous));
                (Err(why), MountState::Failed, problem)
            }
        };
        let back_ref = back.as_ref().copied().map_err(String::as_str);
        events::rolled_back(target, generation, layer, error, back_ref).raise(&self.ctx.events);
        self.publish(target, generation, state, Some(reason));
    }

    /// The active stack's plan, planned again (and kept) if missing.
    fn active_plan(&mut self, target: &str) -> Option<Plan> {
        let state = self.targets.get_mut(target)?;
        if state.plan.is_none() {
            let active = state.active.as_ref()?;
            match stack::plan(&self.layout, &active.config, active.slot) {
                Ok(plan) => state.plan = Some(plan),
                Err(e) => {
                    tracing::debug!(target, error = %e, "the active stack does not plan");
                    return None;
                }
            }
        }
        state.plan.clone()
    }

    /// Compares every target's mounts with its record and repairs what differs.
    async fn check_drift(&mut self) {
        let targets: Vec<String> = self.targets.keys().cloned().collect();
        for target in targets {
            if self.ctx.shutdown.is_cancelled() {
                return;
            }
            self.check_target(&target).await;
        }
        // The mount path of a target not known (torn down, or forgotten by recovery).
        if let Some((target, path)) = &self.mount_path {
            if !self.targets.contains_key(target) {
                let clear = mountinfo::read()
                    .map(|entries| path.check(&entries, None).is_err())
                    .unwrap_or(false);
                if clear {
                    if let Err(e) = path.clear() {
                        tracing::warn!(error = %e, "could not clear the mount path");
                    }
                }
            }
        }
    }

    /// Compares `target`'s mounts with its record; repairs what differs (unless a failed
    /// repair is waiting to be tried again); reports what was found and done.
    async fn check_target(&mut self, target: &str) {
        self.active_plan(target);
        let entries = match mountinfo::read() {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(error = %e, "reading the mount table");
                return;
            }
        };
        let Some(drift) = self.find_drift(target, &entries) else {
            if let Some(state) = self.targets.get_mut(target) {
                state.retry = None;
            }
            return;
        };
        let Some(state) = self.targets.get(target) else {
            return;
        };
        let failures = state.retry.as_ref().map_or(0, |r| r.failures);
        if state.retry.as_ref().is_some_and(|r| Instant::now() < r.at) {
            return;
        }
        tracing::warn!(target, found = %drift.found.join("; "), "the mounts differ from the record");
        self.enter(State::Repairing {
            target: target.to_owned(),
        });
        let ctx = self.ctx.clone();
        let result = beating(&ctx, self.repair(target, &drift)).await;
        if result.is_err() && ctx.shutdown.is_cancelled() {
            // Cut short by shutdown (a check killed): the next start looks again.
            return;
        }
        let Some(state) = self.targets.get_mut(target) else {
            return;
        };
        let applied = state.active.as_ref().map(|a| (a.config.generation, a.slot));
        let found = drift.found.join("; ");
        let (done, repaired) = match result {
            Ok(done) => {
                tracing::info!(target, %done, "repaired");
                state.retry = None;
                state.drift = Some(format!("{found}: {done}"));
                (done, true)
            }
            Err(why) => {
                let wait = REPAIR_BACKOFF
                    .saturating_mul(2u32.saturating_pow(failures.min(16)))
                    .min(REPAIR_BACKOFF_MAX);
                let done = format!("repair failed: {why}; trying again in {} s", wait.as_secs());
                tracing::warn!(target, %done, "drift");
                state.retry = Some(Retry {
                    failures: failures + 1,
                    at: Instant::now() + wait,
                });
                state.drift = Some(format!("{found}; {done}"));
                self.ctx
                    .health
                    .report_error(&format!("repairing the mounts of {target}: {why}"));
                (done, false)
            }
        };
        // Once per repair, and for a failing one only the first time (it is retried).
        if repaired || failures == 0 {
            events::drift(target, applied, &drift.found, &done, repaired).raise(&self.ctx.events);
        }
        self.republish(target);
    }

    /// What differs between `target`'s mounts (`entries`) and its record. What a program
    /// mounted inside a union (below a slot's `merged/`) is its own business, not drift.
    fn find_drift(&self, target: &str, entries: &[MountEntry]) -> Option<Drift> {
        let state = self.targets.get(target)?;
        let target_dir = self.layout.target_dir(target);
        let inside_a_union = |e: &MountEntry| {
            [Slot::A, Slot::B].iter().any(|slot| {
                let merged = self.layout.merged(target, *slot);
                e.mount_point != merged && e.mount_point.starts_with(&merged)
            })
        };
        let entries: Vec<MountEntry> = entries
            .iter()
            .filter(|e| !inside_a_union(e))
            .cloned()
            .collect();
        let entries = entries.as_slice();
        let mut drift = Drift::default();
        let mut kept = Vec::new();
        if let Some(active) = &state.active {
            kept.push(self.layout.slot_dir(target, active.slot));
            if let Some(plan) = &state.plan {
                if let Err(why) = stack::verify_mounted(plan, entries, &state.record.loops) {
                    drift.found.push(format!(
                        "slot {} (active): {why}",
                        layout::slot_name(active.slot)
                    ));
                    drift.active_damaged = true;
                }
            }
            if !drift.active_damaged && current::read(&target_dir) != Some(active.slot) {
                drift.found.push(format!(
                    "current does not name slot {}",
                    layout::slot_name(active.slot)
                ));
                drift.current_wrong = true;
            }
        }
        if let Some(window) = &state.window {
            kept.push(self.layout.slot_dir(target, window.previous.slot));
            if let Some(plan) = &window.previous_plan {
                if let Err(why) = stack::verify_mounted(plan, entries, &state.record.loops) {
                    drift.found.push(format!(
                        "slot {} (kept for the confirmation window): {why}",
                        layout::slot_name(window.previous.slot)
                    ));
                    drift.previous_damaged = true;
                }
            }
        }
        let strays: Vec<PathBuf> = mountinfo::under(entries, &target_dir)
            .into_iter()
            .filter(|e| !kept.iter().any(|k| e.mount_point.starts_with(k)))
            .map(|e| e.mount_point.clone())
            .collect();
        if !strays.is_empty() {
            drift.found.push(format!(
                "{} mounts under {} belong to no stack",
                strays.len(),
                target_dir.display()
            ));
            drift.strays = strays;
        }
        if let Some(path) = self.path_of(target) {
            let merged = state
                .active
                .as_ref()
                .map(|a| self.layout.merged(target, a.slot));
            if !drift.active_damaged {
                if let Err(why) = path.check(entries, merged.as_deref()) {
                    drift.found.push(why);
                    drift.path_wrong = true;
                }
            }
        }
        (!drift.found.is_empty()).then_some(drift)
    }

    /// Puts `target`'s mounts back as recorded. What was done, in words, or why not.
    async fn repair(&mut self, target: &str, drift: &Drift) -> Result<String, String> {
        let mut done = Vec::new();
        if !drift.strays.is_empty() {
            self.unmount_strays(target, &drift.strays)?;
            done.push(format!("unmounted {} stray mounts", drift.strays.len()));
        }
        let window_open = self.targets.get(target).is_some_and(|t| t.window.is_some());
        if window_open && (drift.previous_damaged || drift.active_damaged) {
            // The slot a rebuild needs is the previous stack's, or that stack is damaged: the
            // window ends without a rollback.
            if let Some(window) = self.end_window(target) {
                self.retire(target, Some(window.previous));
                done.push("ended the confirmation window (previous stack retired)".to_owned());
            }
        }
        let active = self.targets.get(target).and_then(|t| t.active.clone());
        if drift.active_damaged {
            let Some(active) = active else {
                return Err("internal: no active stack".to_owned());
            };
            let slot = self.rebuild(target, &active).await?;
            done.push(format!(
                "built generation {} again in slot {} and switched to it",
                active.config.generation,
                layout::slot_name(slot)
            ));
        } else {
            if drift.current_wrong {
                if let Some(active) = &active {
                    current::switch(&self.layout.target_dir(target), active.slot)
                        .map_err(|e| e.to_string())?;
                    done.push(format!(
                        "pointed current to slot {}",
                        layout::slot_name(active.slot)
                    ));
                }
            }
            if drift.path_wrong {
                if let Some(path) = self.path_of(target) {
                    let merged = active.as_ref().map(|a| self.layout.merged(target, a.slot));
                    let actions = path
                        .reconcile(merged.as_deref())
                        .map_err(|e| e.to_string())?;
                    done.extend(actions);
                }
            }
        }
        if done.is_empty() {
            done.push("nothing to do".to_owned());
        }
        Ok(done.join("; "))
    }

    /// Unmounts `strays` (mounts under the target belonging to no stack): a slot holding
    /// one is cleaned whole; anything else is unmounted where it is.
    fn unmount_strays(&mut self, target: &str, strays: &[PathBuf]) -> Result<(), String> {
        for slot in [Slot::A, Slot::B] {
            let dir = self.layout.slot_dir(target, slot);
            if strays.iter().any(|s| s.starts_with(&dir)) {
                self.clean_slot(target, slot).map_err(|e| e.to_string())?;
            }
        }
        let mut rest: Vec<&PathBuf> = strays
            .iter()
            .filter(|s| {
                ![Slot::A, Slot::B]
                    .iter()
                    .any(|slot| s.starts_with(self.layout.slot_dir(target, *slot)))
            })
            .collect();
        rest.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for path in rest {
            sys::unmount(path).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Builds `active`'s stack again in the other slot, checks it and switches to it; the
    /// damaged slot is retired. The slot it is in now.
    async fn rebuild(&mut self, target: &str, active: &AppliedStack) -> Result<Slot, String> {
        let slot = layout::other(active.slot);
        let plan = stack::plan(&self.layout, &active.config, slot).map_err(|e| e.to_string())?;
        if let Err(e) = self.build_slot(&plan) {
            self.discard(target, slot);
            return Err(e);
        }
        match run_checks(&plan, &self.ctx.shutdown).await {
            Ok(()) => {}
            Err((_, e)) => {
                self.discard(target, slot);
                return Err(e.to_string());
            }
        }
        let new = AppliedStack {
            slot,
            config: active.config.clone(),
        };
        match self.switch_to(target, new, Some(plan), Some(active), None) {
            Ok(()) => {
                self.retire(target, Some(active.clone()));
                Ok(slot)
            }
            Err(SwitchFailure::Unrecorded(e) | SwitchFailure::NotSwitched(e)) => {
                self.discard(target, slot);
                Err(e)
            }
        }
    }

    /// Unmounts the slot switched away from (overlay, layers, tmpfs) and releases its loops.
    fn retire(&mut self, target: &str, old: Option<AppliedStack>) {
        let Some(old) = old else {
            return;
        };
        if let Err(e) = self.clean_slot(target, old.slot) {
            // The next build into that slot cleans it first; recovery does too.
            tracing::warn!(target, slot = ?old.slot, error = %e, "could not retire the old slot");
            self.ctx
                .health
                .report_error(&format!("retiring slot of {target}: {e}"));
        }
    }

    /// Tears down a slot that was being built.
    fn discard(&mut self, target: &str, slot: Slot) {
        if let Err(e) = self.clean_slot(target, slot) {
            tracing::warn!(target, ?slot, error = %e, "could not clean the new slot");
            self.ctx
                .health
                .report_error(&format!("cleaning a failed build of {target}: {e}"));
        }
    }

    /// Unmounts and removes `slot`, releases its recorded loop devices.
    fn clean_slot(&mut self, target: &str, slot: Slot) -> Result<(), stack::StackError> {
        let result = stack::clean_slot(&self.layout, target, slot);
        if let Some(state) = self.targets.get_mut(target) {
            if state.record.loops.iter().any(|l| l.slot == slot) {
                let (mine, rest): (Vec<_>, Vec<_>) =
                    state.record.loops.drain(..).partition(|l| l.slot == slot);
                recover::release_loops(&mine, &[]);
                state.record.loops = rest;
                self.store.save_or_warn(&state.record, target);
            }
        }
        result.map(|lazy| {
            if lazy > 0 {
                tracing::warn!(target, ?slot, lazy, "busy mounts detached lazily");
            }
        })
    }

    /// Unmounts everything of `target` and forgets it on disk. The record says "nothing
    /// applied" first, so a crash half-way is finished by recovery, not undone.
    fn tear_down(&mut self, target: &str) -> Result<(), String> {
        let target_dir = self.layout.target_dir(target);
        let path = self.path_of(target);
        let Some(state) = self.targets.get_mut(target) else {
            return Ok(());
        };
        state.record.applied = None;
        state.record.switching_to = None;
        state.record.window = None;
        self.store
            .save(&state.record)
            .map_err(|e| format!("recording the teardown: {e}"))?;
        state.active = None;
        state.plan = None;
        state.window = None;
        if let Some(path) = path {
            path.clear().map_err(|e| e.to_string())?;
        }
        current::remove(&target_dir).map_err(|e| format!("removing current: {e}"))?;
        for slot in [Slot::A, Slot::B] {
            self.clean_slot(target, slot).map_err(|e| e.to_string())?;
        }
        stack::unmount_under(&target_dir, &[]).map_err(|e| e.to_string())?;
        stack::remove_tree(&target_dir).map_err(|e| e.to_string())?;
        self.store.remove(target).map_err(|e| e.to_string())?;
        tracing::info!(target, "target torn down");
        Ok(())
    }

    /// A target whose `MountConfig` is gone: tear it down, withdraw its status.
    fn remove_target(&mut self, target: &str) {
        if let Err(e) = self.tear_down(target) {
            tracing::warn!(target, error = %e, "could not tear the target down");
            self.ctx
                .health
                .report_error(&format!("tearing down {target}: {e}"));
            return;
        }
        self.targets.remove(target);
        self.unpublish(target);
    }

    fn publish(&self, target: &str, generation: u64, state: MountState, error: Option<String>) {
        let known = self.targets.get(target);
        let active = known.and_then(|t| t.active.as_ref());
        let status = MountStatus {
            target: target.to_owned(),
            generation,
            state,
            slot: active.map(|a| a.slot),
            layers: active.map(digests).unwrap_or_default(),
            error,
            upper_dir: active
                .and_then(|a| self.layout.upper_dir(target, a.slot, &a.config.upper).ok())
                .map(|dir| dir.display().to_string()),
            drift: known.and_then(|t| t.drift.clone()),
            confirm_until_ms: known.and_then(|t| t.window.as_ref()).map(|w| w.until_ms),
        };
        if let Err(e) = self.status_pub.publish(&status) {
            tracing::warn!(target, error = %e, "could not publish MountStatus");
            self.ctx
                .health
                .report_error(&format!("publishing MountStatus of {target}: {e}"));
        }
    }

    /// Publishes `target`'s status again with the same answer (generation, state, error)
    /// and what is true now: the active stack (a repair may have moved it), the drift, the
    /// window.
    fn republish(&self, target: &str) {
        if let Some(status) = self.status_pub.get(target) {
            self.publish(target, status.generation, status.state, status.error);
        }
    }

    fn unpublish(&self, target: &str) {
        if self.status_pub.get(target).is_none() {
            return;
        }
        if let Err(e) = self.status_pub.unpublish(target) {
            tracing::warn!(target, error = %e, "could not withdraw MountStatus");
        }
    }
}

/// Before switching back to a stack kept through a window: with a persistent upper, which the
/// failed stack has been writing to meanwhile, its overlay is mounted afresh, so it does not
/// serve what it cached of that directory before (overlayfs does not expect its upper to change
/// under a mounted overlay). A tmpfs upper is the kept stack's own: nothing to do.
fn refresh_shared_upper(plan: Option<&Plan>) -> Result<(), String> {
    let Some(plan) = plan.filter(|p| matches!(p.upper, stack::UpperPlan::Persistent { .. })) else {
        return Ok(());
    };
    sys::unmount(&plan.merged).map_err(|e| e.to_string())?;
    sys::mount_overlay(&plan.overlay_options(), &plan.merged).map_err(|e| e.to_string())
}

/// Points `current` back at `old`'s slot (or removes it: there was no stack before).
fn switch_back(target_dir: &Path, old: Option<&AppliedStack>) -> Result<(), String> {
    match old {
        Some(o) => current::switch(target_dir, o.slot).map_err(|e| e.to_string()),
        None => current::remove(target_dir).map_err(|e| e.to_string()),
    }
}

/// Runs the health checks of `plan`'s layers in its stack, bottom layer first; the first
/// failure, with its layer.
async fn run_checks(
    plan: &Plan,
    shutdown: &CancellationToken,
) -> Result<(), (PlannedLayer, CheckError)> {
    for layer in &plan.layers {
        let Some(health_check) = &layer.health_check else {
            continue;
        };
        tracing::info!(target = %plan.target, slot = ?plan.slot, layer = %layer.name, "running health check");
        check::run(&layer.name, health_check, &plan.merged, shutdown)
            .await
            .map_err(|e| (layer.clone(), e))?;
    }
    Ok(())
}

/// The digests of a stack's layers, bottom first.
fn digests(stack: &AppliedStack) -> Vec<String> {
    stack::ordered_layers(&stack.config.layers)
        .into_iter()
        .map(|l| l.digest.clone())
        .collect()
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::Plan => "plan",
        Step::TearDown => "tear-down",
        Step::Build(_) => "build",
        Step::Check(_) => "check",
        Step::Switch(_) => "switch",
        Step::Retire { .. } => "retire",
        Step::Window { .. } => "window",
        Step::Discard { .. } => "discard",
        Step::Done(_) => "done",
    }
}

/// The next change of the mount table; never, without a watch.
async fn changed(watch: &mut Option<MountWatch>) {
    match watch {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`; forever if `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `fut` while beating the agent's liveness, so a long health check does not look like a
/// wedged loop.
async fn beating<F: Future>(ctx: &Context, fut: F) -> F::Output {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(ctx.beat_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tick.tick() => ctx.beat(),
        }
    }
}
