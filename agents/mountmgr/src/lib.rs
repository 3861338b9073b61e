//! mountmgr: mounts verified erofs images and composes them into one overlayfs stack per
//! target, built beside the running stack and switched A/B (DESIGN §2, §6, §7;
//! docs/mountmgr.md).
//!
//! It subscribes to `modulemgr/MountConfig` and publishes `mountmgr/MountStatus`, both keyed by
//! target. The union of a target is reached at `run/powernode-mounts/<target>/current`.
//!
//! # States
//!
//! The agent is in one [`State`] at a time; applying one `MountConfig` walks the [`Step`]s.
//!
//! ```text
//!   start ──► Recovering ──► Rebuilding (stacks recorded but not mounted: after a reboot)
//!                 │                 │
//!                 ▼                 ▼
//!   ┌────────► Idle ◄───────────────┘
//!   │            │ MountConfig (new generation) / Delete / Restarted
//!   │            ▼
//!   │        Applying{target}:
//!   │            Plan ──same stack──► Done(Mounted, no rebuild)
//!   │             │ ──no layers────► TearDown ──► Done(Mounted, no slot)
//!   │             ▼
//!   │           Build (inactive slot, cleaned first) ──error──► Discard ──► Done(Failed)
//!   │             ▼
//!   │           Check (health checks in the new stack) ──error──► Discard ──► Done(Failed)
//!   │             │ ──shutdown──► Discard ──► Done(Abandoned)
//!   │             ▼
//!   │           Switch (record intent, rename current, record result)
//!   │             │ ──rename fails──► Discard ──► Done(RolledBack)
//!   │             ▼
//!   │           Retire (unmount the old slot: overlay, layers, tmpfs) ──► Done(Mounted)
//!   └─────────────┘
//!   shutdown (any state) ──► Stopping: a switch under way is finished, a build not yet
//!                            switched is discarded (its target's status back to what it
//!                            said before), the active stacks stay mounted, exit 0
//! ```
//!
//! Crash safety comes from the order of the switch (the record names the slot being switched
//! to before `current` moves) and from [`recover`], which at every start decides from the
//! record, `current` and the real mount table which slot is active; everything else under the
//! agent's directory is unmounted.
//!
//! Raised as events ([`events`]): each switch (and teardown), a health check that refused
//! one, and per target at every start what recovery found and did.

pub mod check;
pub mod current;
pub mod events;
pub mod layout;
pub mod mountinfo;
pub mod record;
pub mod recover;
pub mod stack;
pub mod sys;

use std::collections::BTreeMap;
use std::future::Future;

use agentbase::Context;
use anyhow::Context as _;
use powernode_pubsub::{Event, Publication, Subscription};
use powernode_types::{MountConfig, MountState, MountStatus, Slot};

use crate::current::SwitchError;
use crate::layout::Layout;
use crate::record::{AppliedStack, LoopRecord, Record, RecordStore};
use crate::stack::Plan;

/// The agent that publishes `MountConfig`.
pub const CONFIG_AGENT: &str = "modulemgr";

/// The agent's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Reading the mount table and the records; adopting or cleaning what an earlier run left.
    Recovering,
    /// Building again the stacks recorded as applied but no longer mounted (after a reboot).
    Rebuilding,
    /// Waiting for `MountConfig` changes.
    Idle,
    /// Applying a `MountConfig` to `target` (see [`Step`]).
    Applying {
        /// The target.
        target: String,
        /// The generation being applied.
        generation: u64,
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
    /// Record the intent, rename `current`, record the result.
    Switch(Plan),
    /// Unmount the slot that was active before the switch.
    Retire {
        /// The stack switched away from.
        old: Option<AppliedStack>,
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

/// What the agent knows of one target.
#[derive(Debug)]
struct TargetState {
    /// The record as last saved.
    record: Record,
    /// The stack `current` points to, fully mounted.
    active: Option<AppliedStack>,
    /// The generation last answered (applied, refused or unchanged): a repeat does nothing.
    handled: Option<u64>,
}

impl TargetState {
    fn new(target: &str) -> TargetState {
        TargetState {
            record: Record::new(target),
            active: None,
            handled: None,
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
    let mut agent = Agent {
        ctx: ctx.clone(),
        layout,
        store,
        status_pub,
        targets: BTreeMap::new(),
        state: State::Recovering,
    };
    let rebuilds = agent.recover()?;
    agent.status_pub.signal_restarted();
    ctx.ready();
    if !rebuilds.is_empty() {
        agent.enter(State::Rebuilding);
        for config in rebuilds {
            if ctx.shutdown.is_cancelled() {
                break;
            }
            agent.apply_beating(config).await;
        }
    }
    agent.run().await;
    Ok(())
}

impl Agent {
    fn enter(&mut self, state: State) {
        if self.state != state {
            tracing::debug!(from = ?self.state, to = ?state, "state");
            self.state = state;
        }
    }

    /// Recovers every target an earlier run left (records, directories, mounts) and publishes
    /// the truth about each. Returns the configurations to build again.
    fn recover(&mut self) -> anyhow::Result<Vec<MountConfig>> {
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
            let recovered = recover::recover_target(&self.layout, &self.store, &name)
                .with_context(|| format!("recovering target {name}"))?;
            for problem in &recovered.problems {
                tracing::warn!(target = %name, %problem, "recovery");
                self.ctx
                    .health
                    .report_error(&format!("recovering {name}: {problem}"));
            }
            events::recovered(&name, &recovered).raise(&self.ctx.events);
            if let Some(record) = recovered.record {
                self.targets.insert(
                    name.clone(),
                    TargetState {
                        record,
                        active: recovered.active,
                        handled: None,
                    },
                );
            }
            if let Some(config) = recovered.rebuild {
                rebuilds.push(config);
            }
        }
        // Publish what is true now. A previous answer that still describes the active stack
        // (e.g. "generation 7 failed, slot A still active") is kept, so a repeat of that
        // generation stays a repeat; anything else is replaced or withdrawn.
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
            if consistent {
                let generation = previous.map(|p| p.generation);
                self.targets
                    .entry(key.clone())
                    .or_insert_with(|| TargetState::new(&key))
                    .handled = generation;
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

    /// The main loop: one `MountConfig` event at a time.
    async fn run(&mut self) {
        let ctx = self.ctx.clone();
        let mut configs = Subscription::<MountConfig>::connect(&ctx.dirs, CONFIG_AGENT);
        let mut tick = tokio::time::interval(ctx.beat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.enter(State::Idle);
        loop {
            ctx.beat();
            let event = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = tick.tick() => continue,
                event = configs.next() => event,
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

    async fn config_changed(&mut self, config: MountConfig) {
        let handled = self.targets.get(&config.target).and_then(|t| t.handled);
        if handled == Some(config.generation) {
            tracing::debug!(target = %config.target, generation = config.generation, "repeat of a handled generation");
            return;
        }
        self.apply_beating(config).await;
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
                Step::Retire { old } => {
                    self.retire(&target, old);
                    changed = true;
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
                // A new generation of the same stack: nothing to mount, only to remember.
                active.config = config.clone();
                state.record.applied = Some(active.clone());
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
        let target = plan.target.clone();
        self.publish(&target, generation, MountState::Mounting, None);
        // Leftovers of an earlier build or of a retired stack that was busy.
        if let Err(e) = self.clean_slot(&target, plan.slot) {
            return Step::Done(Outcome::Failed(format!(
                "cleaning slot {}: {e}",
                layout::slot_name(plan.slot)
            )));
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
        match stack::build(&plan, &mut on_loop) {
            Err(e) => Step::Discard {
                slot: plan.slot,
                outcome: Outcome::Failed(e.to_string()),
            },
            Ok(()) if self.ctx.shutdown.is_cancelled() => Step::Discard {
                slot: plan.slot,
                outcome: Outcome::Abandoned,
            },
            Ok(()) => Step::Check(plan),
        }
    }

    async fn check_step(&mut self, plan: Plan, generation: u64) -> Step {
        for layer in &plan.layers {
            let Some(health_check) = &layer.health_check else {
                continue;
            };
            tracing::info!(target = %plan.target, layer = %layer.name, "running health check");
            match check::run(&layer.name, health_check, &plan.merged, &self.ctx.shutdown).await {
                Ok(()) => {}
                Err(check::CheckError::Cancelled { .. }) => {
                    return Step::Discard {
                        slot: plan.slot,
                        outcome: Outcome::Abandoned,
                    }
                }
                Err(e) => {
                    let active = self
                        .targets
                        .get(&plan.target)
                        .and_then(|t| t.active.as_ref())
                        .map(|a| a.config.generation);
                    events::health_check_failed(&plan.target, generation, layer, &e, active)
                        .raise(&self.ctx.events);
                    return Step::Discard {
                        slot: plan.slot,
                        outcome: Outcome::Failed(e.to_string()),
                    };
                }
            }
        }
        Step::Switch(plan)
    }

    /// The switch: intent recorded, `current` renamed, result recorded. Once the intent is on
    /// disk a crash at any instant is resolved by [`recover::decide`].
    fn switch_step(&mut self, config: &MountConfig, plan: Plan) -> Step {
        let target = &plan.target;
        let target_dir = self.layout.target_dir(target);
        let new = AppliedStack {
            slot: plan.slot,
            config: config.clone(),
        };
        let Some(state) = self.targets.get_mut(target) else {
            return Step::Discard {
                slot: plan.slot,
                outcome: Outcome::Failed("internal: target state lost".to_owned()),
            };
        };
        let old = state.active.clone();
        state.record.switching_to = Some(new.clone());
        if let Err(e) = self.store.save(&state.record) {
            state.record.switching_to = None;
            return Step::Discard {
                slot: plan.slot,
                outcome: Outcome::Failed(format!("recording the switch: {e}")),
            };
        }
        failpoint::hit("mountmgr.intent_recorded");
        match current::switch(&target_dir, plan.slot) {
            Ok(()) => failpoint::hit("mountmgr.switched"),
            Err(e @ SwitchError::NotSwitched { .. }) => {
                state.record.switching_to = None;
                self.store.save_or_warn(&state.record, target);
                return Step::Discard {
                    slot: plan.slot,
                    outcome: Outcome::RolledBack(e.to_string()),
                };
            }
            Err(e @ SwitchError::NotDurable { .. }) => {
                // `current` moved but may not survive a power loss: go back to the old stack
                // rather than run on a switch the disk may forget.
                let back = match &old {
                    Some(o) => current::switch(&target_dir, o.slot).map_err(|e| e.to_string()),
                    None => current::remove(&target_dir).map_err(|e| e.to_string()),
                };
                match back {
                    Ok(()) => {
                        state.record.switching_to = None;
                        self.store.save_or_warn(&state.record, target);
                        return Step::Discard {
                            slot: plan.slot,
                            outcome: Outcome::RolledBack(e.to_string()),
                        };
                    }
                    Err(back_error) => {
                        // Neither direction is durable; `current` names the new slot, which
                        // is complete and checked, and the record says so: keep it.
                        let problem = format!("{e}; switching back failed too: {back_error}");
                        tracing::error!(target = %target, %problem, "switch not durable");
                        self.ctx.health.report_error(&problem);
                    }
                }
            }
        }
        state.record.applied = Some(new.clone());
        state.record.switching_to = None;
        state.active = Some(new);
        let saved = self.store.save(&state.record);
        failpoint::hit("mountmgr.result_recorded");
        if let Err(e) = saved {
            // Recovery still finds the switch: the intent names the slot `current` names.
            tracing::warn!(target = %target, error = %e, "could not record the switch result");
            self.ctx
                .health
                .report_error(&format!("recording the switch of {target}: {e}"));
        }
        tracing::info!(target = %target, slot = ?plan.slot, generation = config.generation, "switched");
        Step::Retire { old }
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
                recover::release_loops(&mine, None);
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
        let Some(state) = self.targets.get_mut(target) else {
            return Ok(());
        };
        state.record.applied = None;
        state.record.switching_to = None;
        self.store
            .save(&state.record)
            .map_err(|e| format!("recording the teardown: {e}"))?;
        state.active = None;
        current::remove(&target_dir).map_err(|e| format!("removing current: {e}"))?;
        for slot in [Slot::A, Slot::B] {
            self.clean_slot(target, slot).map_err(|e| e.to_string())?;
        }
        stack::unmount_under(&target_dir, None).map_err(|e| e.to_string())?;
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
        let active = self.targets.get(target).and_then(|t| t.active.as_ref());
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
        };
        if let Err(e) = self.status_pub.publish(&status) {
            tracing::warn!(target, error = %e, "could not publish MountStatus");
            self.ctx
                .health
                .report_error(&format!("publishing MountStatus of {target}: {e}"));
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
        Step::Discard { .. } => "discard",
        Step::Done(_) => "done",
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
