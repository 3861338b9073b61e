//! The stack modulemgr asks mountmgr for (`MountConfig`), and what mountmgr's answers
//! (`MountStatus`) do to the modules.
//!
//! The stack holds each Mounting or Active module's image, ordered by priority. A module
//! whose new version is not ready (still in the pipeline, or failed) keeps the layer it has in
//! the applied stack, so an upgrade replaces the old image only once the new one is ready. A
//! layer whose module manifest names a dependency that is not stacked is held out (the module
//! waits in Mounting and says for what), falling back to the module's old layer if that one's
//! dependencies are stacked. A digest the verifier rejected is never stacked.
//!
//! When mountmgr reports the stack's generation Mounted, the modules it brought in are Active.
//! A stack that fails to mount (or is rolled back in its confirmation window) fails the
//! modules it added, and the stack is computed again without them.
//!
//! Until mountmgr confirms the applied stack (`MountStatus.confirm_until_ms` cleared: its
//! confirmation window is over, or it had none), mountmgr may switch back to the stack applied
//! before it; that one is kept as [`Stack::applied_before`], and the store keeps its images
//! ([`crate::gc`]).

use std::collections::HashSet;

use powernode_types::{MountConfig, MountLayer, MountState, MountStatus};

use crate::events;
use crate::modules::{Effect, Modules};
use crate::pipeline::Phase;

/// The stack asked for and what mountmgr made of it.
#[derive(Debug)]
pub(crate) struct Stack {
    /// The stack last published as `MountConfig`.
    pub published: Option<MountConfig>,
    /// Whether a stack has been published since the start. The first one waits until the
    /// assignment is known and every module has been verified or has failed, so a restart or a
    /// reboot does not tear down the stack mountmgr kept or rebuilt.
    pub published_since_start: bool,
    /// The last stack mountmgr reported Mounted (at start: the last one published, until
    /// mountmgr says otherwise).
    pub applied: Option<MountConfig>,
    /// The stack applied before `applied`, while mountmgr may still switch back to it
    /// (`applied` in its confirmation window): its images stay in the store, so it can be
    /// built again after a reboot. `None` once `applied` is confirmed.
    pub applied_before: Option<MountConfig>,
    /// Whether `applied` is in its confirmation window, by mountmgr's latest word.
    pub confirming: bool,
    /// Digests of the stack mountmgr reports active.
    pub mounted: Vec<String>,
    /// mountmgr's latest status of the target.
    pub status: Option<MountStatus>,
}

impl Stack {
    /// At start: the stack the last run published is taken as applied until mountmgr says
    /// otherwise.
    /// `before` is the stack applied before it, as the last run kept it while mountmgr was
    /// confirming the published one.
    pub(crate) fn new(published: Option<MountConfig>, before: Option<MountConfig>) -> Stack {
        Stack {
            applied: published.clone(),
            applied_before: before.filter(|b| published.as_ref() != Some(b)),
            published,
            published_since_start: false,
            confirming: false,
            mounted: Vec::new(),
            status: None,
        }
    }

    /// Follows the confirmation window of the applied stack in a status about it.
    fn follow_window(&mut self, status: &MountStatus) {
        if self.applied.as_ref().map(|a| a.generation) != Some(status.generation) {
            return;
        }
        match status.state {
            MountState::Mounting => {}
            MountState::Mounted => {
                self.confirming = status.confirm_until_ms.is_some();
                if !self.confirming {
                    // Confirmed: mountmgr has retired the stack before, and cannot go back.
                    self.applied_before = None;
                }
            }
            MountState::RolledBack => {
                // Rolled back after it was Mounted (a health check failed in mountmgr's
                // confirmation window): the stack before is mounted again, and the layers a
                // failed module falls back to are its, not the rolled-back stack's.
                self.applied = self.applied_before.take();
                self.confirming = false;
            }
            MountState::Failed => {
                // Switching back failed: the applied stack stays, its window is over.
                self.applied_before = None;
                self.confirming = false;
            }
        }
    }
}

/// The image digests of `stack`, bottom first.
fn images(stack: &MountConfig) -> Vec<&str> {
    stack.layers.iter().map(|l| l.digest.as_str()).collect()
}

impl Modules {
    /// The stack the modules make, sorted by priority (mountmgr orders by priority itself;
    /// this keeps the config stable), and the modules held out of it with the reason.
    pub(crate) fn wanted_stack(&self) -> (Vec<MountLayer>, Vec<(String, String)>) {
        let current = |name: &str| {
            self.stack
                .applied
                .as_ref()
                .and_then(|s| s.layers.iter().find(|l| l.name == name).cloned())
                .filter(|l| !self.rejected.contains(&l.digest))
        };
        // Each module's first choice, and the layer to fall back to.
        let mut choices: Vec<(MountLayer, Option<MountLayer>)> = self
            .modules
            .values()
            .filter_map(|m| match &m.phase {
                Phase::Mounting { fetched, .. } | Phase::Active { fetched } => {
                    let new = MountLayer {
                        name: m.config.name.clone(),
                        image_path: fetched.image_path.to_string_lossy().into_owned(),
                        digest: fetched.resolved.image.digest.clone(),
                        priority: m.config.priority(&fetched.resolved.module),
                        health_check: fetched.resolved.module.health_check(),
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
                || m.phase
                    .fetched()
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

    /// Publishes a new `MountConfig` if the stack changed (see
    /// [`Stack::published_since_start`] for when the first one after a start may go out), and
    /// marks the modules held out of it.
    pub(crate) fn restack(&mut self) {
        if !self.stack.published_since_start {
            let pending = self.modules.values().any(|m| {
                matches!(
                    m.phase,
                    Phase::Resolving { .. } | Phase::Downloading { .. } | Phase::Verifying { .. }
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
            let news = match &m.phase {
                Phase::Mounting { waiting, .. } => waiting.as_ref() != Some(&reason),
                Phase::Active { .. } => true,
                _ => false,
            };
            if news {
                tracing::info!(module = %name, %reason, "held out of the stack");
                m.phase.step(|phase| match phase {
                    Phase::Mounting { fetched, .. } | Phase::Active { fetched } => {
                        Phase::Mounting {
                            fetched,
                            waiting: Some(reason),
                        }
                    }
                    other => other,
                });
            }
        }
        let upper = &self.settings.upper;
        if let Some(stack) = &self.stack.published {
            if stack.layers == layers && stack.upper == *upper {
                self.stack.published_since_start = true;
                return;
            }
        }
        let generation = self
            .stack
            .published
            .as_ref()
            .map_or(1, |s| s.generation + 1);
        let config = MountConfig {
            target: self.settings.target.clone(),
            generation,
            layers,
            upper: upper.clone(),
        };
        tracing::info!(
            target = %config.target,
            generation,
            layers = ?config.layers.iter().map(|l| &l.name).collect::<Vec<_>>(),
            "new stack"
        );
        self.emit(Effect::Stack(config.clone()));
        self.stack.published = Some(config);
        self.stack.published_since_start = true;
    }

    /// A change of mountmgr's status.
    pub(crate) fn on_mount(&mut self, status: &MountStatus) -> Vec<Effect> {
        self.mount_status(status);
        self.done()
    }

    /// After a module joined the stack without changing it (a restart re-verifies what is
    /// mounted): the status mountmgr already gave answers it.
    pub(crate) fn answer_from_standing_mount(&mut self) {
        if let Some(status) = self.stack.status.clone() {
            if status.state == MountState::Mounted {
                self.mount_status(&status);
            }
        }
    }

    fn mount_status(&mut self, status: &MountStatus) {
        let before = self.stack.applied_before.clone();
        self.follow_mount_status(status);
        if self.stack.applied_before != before {
            self.emit(Effect::KeepStackBefore(self.stack.applied_before.clone()));
        }
    }

    fn follow_mount_status(&mut self, status: &MountStatus) {
        if status.target != self.settings.target {
            return;
        }
        self.stack.status = Some(status.clone());
        // Whatever generation it answers, the status names the stack mounted now.
        self.stack.mounted = status.layers.clone();
        let Some(stack) = self.stack.published.clone() else {
            return;
        };
        if status.generation != stack.generation {
            // About the applied stack while a newer one is on its way: mountmgr ends the
            // applied stack's window before it builds the next.
            self.stack.follow_window(status);
            return;
        }
        match status.state {
            MountState::Mounting => {}
            MountState::Mounted => {
                if self.stack.applied.as_ref() != Some(&stack) {
                    let previous = self.stack.applied.replace(stack.clone());
                    // A new generation of the same images (mountmgr keeps its window going)
                    // leaves the stack to go back to as it was.
                    if previous.as_ref().map(images) != Some(images(&stack)) {
                        self.stack.applied_before = previous;
                    }
                }
                self.stack.follow_window(status);
                self.activate(&stack);
                self.collect_garbage();
            }
            MountState::Failed | MountState::RolledBack => {
                self.stack.follow_window(status);
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
                    self.emit(Effect::ReportError(reason.clone()));
                }
                for name in blamed {
                    self.fail(&name, reason.clone());
                }
                self.restack();
            }
        }
    }

    /// The modules whose new image is in `stack`, mounted, are Active.
    fn activate(&mut self, stack: &MountConfig) {
        for layer in &stack.layers {
            let Some(m) = self.modules.get_mut(&layer.name) else {
                continue;
            };
            // The layer may be the old version, kept while the new one waits.
            let joined = matches!(&m.phase, Phase::Mounting { fetched, .. }
                if fetched.resolved.image.digest == layer.digest);
            if !joined {
                continue;
            }
            let reference = m.config.reference.clone();
            let mut version = String::new();
            m.phase.step(|phase| match phase {
                Phase::Mounting { fetched, .. } => {
                    version.clone_from(&fetched.resolved.module.version);
                    Phase::Active { fetched }
                }
                other => other,
            });
            let again = self
                .active_before
                .remove(&layer.name)
                .is_some_and(|d| d == layer.digest);
            if !again {
                self.emit(Effect::Raise(events::active(
                    &layer.name,
                    &reference,
                    &layer.digest,
                    &version,
                    stack.generation,
                )));
            }
        }
    }

    /// Whether module `name` has a layer in the applied stack.
    pub(crate) fn in_applied_stack(&self, name: &str) -> bool {
        self.stack
            .applied
            .as_ref()
            .is_some_and(|s| s.layers.iter().any(|l| l.name == name))
    }

    /// The active stack's upper directory, as mountmgr last reported it.
    pub(crate) fn upper_dir(&self) -> Option<&str> {
        self.stack.status.as_ref()?.upper_dir.as_deref()
    }
}
