//! Everything modulemgr knows, in one value that only events change: [`Modules`].
//!
//! Its methods take what happened (the desired set changed, a fetch reported, a verdict, a
//! mount status) and answer with [`Effect`]s: what to publish, which fetches to start or
//! stop, what to raise, what the store may drop. It does no I/O itself, so every transition
//! can be driven in a test without a registry, a verifier or a mount; the agent loop
//! ([`crate::agent`]) carries the effects out.
//!
//! This file holds the state and the desired set (the controller's assignment and the local
//! ones, reconciled with the modules running); each module's phases are in
//! [`crate::pipeline`], the stack asked of mountmgr in [`crate::stack`], what the store keeps
//! in [`crate::gc`].

use std::collections::{BTreeMap, HashMap, HashSet};

use powernode_modules::format::ModuleManifest;
use powernode_pubsub::Event;
use powernode_types::{
    ModuleConfig, ModuleState, ModuleStatus, MountConfig, UpperMode, VerifyConfig, VerifyStatus,
};

use crate::events::Raised;
use crate::gc::Garbage;
use crate::pipeline::{Assignment, Module, Phase, Run};
use crate::stack::Stack;

/// What the agent loop is asked to do.
#[derive(Debug, Clone)]
pub(crate) enum Effect {
    /// Fetch `reference` for module `name`, reporting as run `epoch`; a fetch still running
    /// for the name is stopped.
    Fetch {
        /// The module.
        name: String,
        /// Its reference.
        reference: String,
        /// The run its reports carry.
        epoch: u64,
        /// A damaged stored copy (its digest) the fetch removes before it starts, so the
        /// image is downloaded again.
        discard: Option<String>,
    },
    /// Stop the fetch of module `name` (it is no longer assigned).
    StopFetch(String),
    /// Read the stored image `digest` again (the verifier rejected it) and report
    /// `Rechecked` to `name` at `epoch`.
    Recheck {
        /// The module.
        name: String,
        /// Its run.
        epoch: u64,
        /// The image.
        digest: String,
    },
    /// Publish a module's status.
    Status(ModuleStatus),
    /// Withdraw a module's status.
    Unstatus(String),
    /// Hand a module to the verifier. When a complete config cannot be published, the module
    /// fails ([`Modules::handover_failed`]).
    Verify(VerifyConfig),
    /// Withdraw a module's `VerifyConfig`.
    Unverify(String),
    /// Publish the stack.
    Stack(MountConfig),
    /// Raise an event.
    Raise(Raised),
    /// Report an error in the agent's status.
    ReportError(String),
    /// Drop what the store and the kept resolutions no longer need.
    CollectGarbage(Garbage),
    /// Keep (or, `None`, forget) the stack applied before the one mountmgr is confirming, on
    /// disk: a restart inside the window must still know where a rollback goes back to.
    KeepStackBefore(Option<MountConfig>),
}

/// The settings the state machine goes by.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The stack's mount target.
    pub target: String,
    /// The stack's upper layer.
    pub upper: UpperMode,
    /// The trust policy the verifier is asked to check against.
    pub trust_policy: String,
}

/// What an earlier run of modulemgr left published, read back at start.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// Its `ModuleStatus` items.
    pub statuses: Vec<ModuleStatus>,
    /// Its `VerifyConfig` items.
    pub handed: Vec<VerifyConfig>,
    /// Its `MountConfig` for the target.
    pub stack: Option<MountConfig>,
    /// The stack it applied before that one, kept while mountmgr was confirming it
    /// ([`Effect::KeepStackBefore`]).
    pub stack_before: Option<MountConfig>,
    /// Whether the assignment is known from the start (heartbeatd never published one).
    pub desired_known: bool,
}

/// modulemgr's state: the desired set, each module's phase, the verdicts, the stack.
#[derive(Debug)]
pub(crate) struct Modules {
    pub(crate) settings: Settings,
    /// The controller's assignment (heartbeatd's `ModuleConfig`).
    controller: BTreeMap<String, Assignment>,
    /// The local assignments (`etc/powernode/modules.d`).
    local: BTreeMap<String, Assignment>,
    /// Whether the controller's assignment is known (heartbeatd's snapshot arrived, or the
    /// grace period for a node without heartbeatd ran out). Until it is, nothing is taken out
    /// of the stack and nothing is collected: an empty subscription is not an empty assignment.
    pub(crate) desired_known: bool,
    /// The modules being brought up, by name.
    pub(crate) modules: BTreeMap<String, Module>,
    /// The last run number given to a fetch.
    epochs: u64,
    /// The verifier's latest verdict per module.
    pub(crate) verdicts: BTreeMap<String, VerifyStatus>,
    /// Image digests the verifier rejected: never stacked, not even as the old layer of a
    /// module whose new version is still on its way.
    pub(crate) rejected: HashSet<String>,
    /// The module manifest of each image fetched (by image digest): a layer's dependencies are
    /// those of the version it holds. Pruned with the store.
    pub(crate) layer_manifests: HashMap<String, ModuleManifest>,
    /// The modules (name → image digest) an earlier run of modulemgr left Active, or a sync
    /// found Active: the same image becoming Active again is not news, and raises nothing.
    pub(crate) active_before: HashMap<String, String>,
    /// Each status as last published: a status is published when what it derives to changes.
    published: BTreeMap<String, ModuleStatus>,
    /// Each `VerifyConfig` as last published.
    pub(crate) handed: BTreeMap<String, VerifyConfig>,
    /// The stack asked of mountmgr and what mountmgr made of it.
    pub(crate) stack: Stack,
    /// The effects of the event being handled.
    out: Vec<Effect>,
}

impl Modules {
    /// The state at start, from what the last run left published.
    pub(crate) fn new(settings: Settings, restored: Restored) -> Modules {
        let active_before = restored
            .statuses
            .iter()
            .filter(|s| s.state == ModuleState::Active)
            .filter_map(|s| Some((s.name.clone(), s.digest.clone()?)))
            .collect();
        let stack = Stack::new(restored.stack, restored.stack_before);
        Modules {
            settings,
            controller: BTreeMap::new(),
            local: BTreeMap::new(),
            desired_known: restored.desired_known,
            modules: BTreeMap::new(),
            epochs: 0,
            verdicts: BTreeMap::new(),
            rejected: HashSet::new(),
            layer_manifests: HashMap::new(),
            active_before,
            published: restored
                .statuses
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
            handed: restored
                .handed
                .into_iter()
                .map(|c| (c.name.clone(), c))
                .collect(),
            stack,
            out: Vec::new(),
        }
    }

    /// Queues an effect of the event being handled.
    pub(crate) fn emit(&mut self, effect: Effect) {
        self.out.push(effect);
    }

    /// Ends the handling of an event: publishes every status that changed, and hands over
    /// what the event led to.
    pub(crate) fn done(&mut self) -> Vec<Effect> {
        for (name, module) in &self.modules {
            let status = module.status();
            if self.published.get(name) != Some(&status) {
                self.published.insert(name.clone(), status.clone());
                self.out.push(Effect::Status(status));
            }
        }
        std::mem::take(&mut self.out)
    }

    /// A module's status as it derives now.
    pub(crate) fn status(&self, name: &str) -> Option<ModuleStatus> {
        self.modules.get(name).map(Module::status)
    }

    /// Every module's status, by name.
    pub(crate) fn statuses(&self) -> impl Iterator<Item = ModuleStatus> + '_ {
        self.modules.values().map(Module::status)
    }

    /// The reference the controller assigns `name`, if it assigns it.
    pub(crate) fn controller_reference(&self, name: &str) -> Option<&str> {
        self.controller.get(name).map(|c| c.reference.as_str())
    }

    /// A change of the controller's assignment (heartbeatd's `ModuleConfig`).
    pub(crate) fn on_desired(&mut self, event: Event<ModuleConfig>) -> Vec<Effect> {
        match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                self.controller.insert(value.name.clone(), value.into());
            }
            Event::Delete { key, .. } => {
                self.controller.remove(&key);
            }
            Event::Synchronized if !self.desired_known => self.desired_known = true,
            // After a reconnect the snapshot's deletes arrive as Delete events; until then the
            // last known assignment stands.
            _ => return self.done(),
        }
        self.reconcile()
    }

    /// heartbeatd did not publish an assignment within the grace period: the local ones are
    /// the whole desired set.
    pub(crate) fn assignment_known(&mut self) -> Vec<Effect> {
        self.desired_known = true;
        self.restack();
        self.done()
    }

    /// The local assignments as read now; true if they changed (then [`Modules::reconcile`]).
    pub(crate) fn set_local(&mut self, local: BTreeMap<String, Assignment>) -> bool {
        let changed = local != self.local;
        self.local = local;
        changed
    }

    /// Brings the modules in line with the desired set: the local assignments, and the
    /// controller's, which wins a name both have.
    pub(crate) fn reconcile(&mut self) -> Vec<Effect> {
        let mut desired = self.local.clone();
        desired.extend(self.controller.clone());
        let gone: Vec<String> = self
            .modules
            .keys()
            .filter(|name| !desired.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            self.modules.remove(&name);
            self.emit(Effect::StopFetch(name.clone()));
            self.withdraw(&name);
            tracing::info!(module = %name, "module removed");
        }
        // Statuses left from an earlier run for modules no longer wanted (only once the
        // assignment is known: before that, a missing module may just not have arrived yet).
        if self.desired_known {
            let stale: Vec<String> = self
                .published
                .keys()
                .filter(|name| !desired.contains_key(*name))
                .cloned()
                .collect();
            for name in stale {
                self.withdraw(&name);
            }
        }
        for (name, config) in desired {
            match self.modules.get_mut(&name) {
                Some(m) if m.config.reference == config.reference => m.config = config,
                _ => self.start(config, None),
            }
        }
        self.restack();
        self.done()
    }

    /// `node.sync`: every module is fetched again (a tag that moved brings its new image; an
    /// image in the store is not downloaded again; an image Active now that comes back Active
    /// is not news), then the desired set is reconciled.
    pub(crate) fn fetch_all_again(&mut self) -> Vec<Effect> {
        for m in self.modules.values() {
            if let Phase::Active { fetched } = &m.phase {
                self.active_before
                    .insert(m.config.name.clone(), fetched.resolved.image.digest.clone());
            }
        }
        let configs: Vec<Assignment> = self.modules.values().map(|m| m.config.clone()).collect();
        for config in configs {
            self.start(config, None);
        }
        self.reconcile()
    }

    /// Withdraws a module's status and `VerifyConfig`.
    fn withdraw(&mut self, name: &str) {
        if self.published.remove(name).is_some() {
            self.emit(Effect::Unstatus(name.to_owned()));
        }
        if self.handed.remove(name).is_some() {
            self.emit(Effect::Unverify(name.to_owned()));
        }
    }

    /// (Re)starts a module's fetch; `discard` is a damaged stored copy to remove first (the
    /// module's image is then downloaded again, and a second rejection is final).
    pub(crate) fn start(&mut self, config: Assignment, discard: Option<String>) {
        self.epochs += 1;
        let run = Run {
            epoch: self.epochs,
            redownload: discard.is_some(),
        };
        tracing::info!(module = %config.name, reference = %config.reference, "fetching module");
        self.emit(Effect::Fetch {
            name: config.name.clone(),
            reference: config.reference.clone(),
            epoch: run.epoch,
            discard,
        });
        self.modules.insert(
            config.name.clone(),
            Module {
                config,
                run,
                phase: Phase::Resolving { retrying: None },
            },
        );
    }
}
