//! One module's way from its reference to the mounted stack: the [`Phase`] it is in, the
//! status that shows ([`Module::status`], the one place a `ModuleStatus` is made), and the
//! transitions, each driven by one event — a fetch's [`Report`], a verdict of the verifier, or
//! (in [`crate::stack`]) a mount status.
//!
//! ```text
//!  Resolving ──Resolved──► Downloading ──Done──► Verifying{verdict, durable}
//!   (Retrying: stays, the error shown)             │ accepted and durable
//!                                                  ▼
//!                               Mounting{waiting} ──its stack mounted──► Active
//!
//!  Verifying, rejected: the stored copy is read again (verdict Rechecking)
//!      damaged ──► Resolving, the image downloaded once more
//!      intact, or downloaded once more already ──► Failed{rejected}
//!  Active ──a module it depends on leaves the stack──► Mounting{waiting}
//!  Mounting, Active ──a verdict that rejects the image──► Failed{rejected}
//!  Failed{rejected} ──a verdict that accepts it──► Verifying (accepted)
//!  any ──a fetch failing for good, its stack failing to mount──► Failed
//! ```

use std::time::{Duration, Instant};

use powernode_modules::format::ModuleManifest;
use powernode_modules::local::LocalModule;
use powernode_pubsub::Event;
use powernode_types::{
    ModuleConfig, ModuleState, ModuleStatus, VerifyConfig, VerifyState, VerifyStatus,
};

use crate::events;
use crate::fetch::{Fetched, Report};
use crate::modules::{Effect, Modules};

/// What a module is assigned as: the controller's `ModuleConfig`, or a local assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Assignment {
    /// The module's name.
    pub name: String,
    /// Its reference.
    pub reference: String,
    /// Its place in the stack; `None` (a local assignment that names none) takes the
    /// module manifest's default ([`Assignment::priority`]). The controller's always has
    /// one: it reads the manifest's default when the module is assigned.
    pub priority: Option<u32>,
}

impl Assignment {
    /// The priority the module is stacked at when its image has `manifest`.
    pub fn priority(&self, manifest: &ModuleManifest) -> u32 {
        self.priority.unwrap_or(manifest.priority)
    }
}

impl From<ModuleConfig> for Assignment {
    fn from(config: ModuleConfig) -> Assignment {
        Assignment {
            name: config.name,
            reference: config.reference,
            priority: Some(config.priority),
        }
    }
}

impl From<LocalModule> for Assignment {
    fn from(local: LocalModule) -> Assignment {
        Assignment {
            name: local.name,
            reference: local.reference,
            priority: local.priority,
        }
    }
}

/// One assigned module.
#[derive(Debug)]
pub(crate) struct Module {
    /// Its assignment.
    pub config: Assignment,
    /// The fetch reporting for it now.
    pub run: Run,
    /// Where it is.
    pub phase: Phase,
}

/// The fetch whose reports a module takes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    /// Bumped on every restart of the module's fetch, so late reports of an old one are
    /// ignored.
    pub epoch: u64,
    /// Whether this fetch downloads the image again after the verifier rejected a damaged
    /// stored copy: a second rejection is then final.
    pub redownload: bool,
}

/// Where a module is, with what that step knows.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Resolving the reference for this node's architecture and reading its signatures.
    Resolving {
        /// Transient failures being retried.
        retrying: Option<Retrying>,
    },
    /// Streaming the image into the store.
    Downloading {
        /// The image's digest.
        digest: String,
        /// Bytes in the store so far.
        done: u64,
        /// The image's size.
        total: u64,
        /// Transient failures being retried.
        retrying: Option<Retrying>,
    },
    /// The store has the image (its SHA-256 matched); waiting for the verifier's verdict and
    /// for the image to be synced to disk, since the stack outlives a power cut.
    Verifying {
        /// What was fetched.
        fetched: Box<Fetched>,
        /// What the verifier said of it.
        verdict: Verdict,
        /// Whether the image is synced to disk.
        durable: bool,
    },
    /// Verified and durable: waiting for mountmgr to mount a stack that holds it.
    Mounting {
        /// What was fetched.
        fetched: Box<Fetched>,
        /// Why it is held out of the stack (a module it depends on is not stacked).
        waiting: Option<String>,
    },
    /// In the stack mountmgr reports mounted.
    Active {
        /// What was fetched.
        fetched: Box<Fetched>,
    },
    /// Stopped. Only a new assignment (another reference), a sync, a restart of modulemgr —
    /// or, for a rejection, a verdict that accepts the image — moves it on.
    Failed {
        /// Why (shown in the status).
        reason: String,
        /// Whether the verifier rejected the image: a later verdict that accepts it (the trust
        /// policy changed) brings the module back.
        rejected: bool,
        /// How far it got, which the status goes on showing.
        reached: Reached,
    },
}

/// The verifier's word on an image in [`Phase::Verifying`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// None yet (or the verifier is checking it again).
    Pending,
    /// Verified.
    Accepted,
    /// Rejected for `reason`; the stored copy is being read again, since it may be the copy
    /// that is wrong, not the module. The reason is the latest verdict's.
    Rechecking {
        /// The verifier's reason, as the status will show it.
        reason: String,
    },
}

/// How far a failed module got.
#[derive(Debug)]
pub(crate) enum Reached {
    /// No image known.
    Nothing,
    /// Part of the image was downloaded.
    Download {
        /// The image's digest.
        digest: String,
        /// Bytes in the store.
        done: u64,
        /// The image's size.
        total: u64,
    },
    /// The image is in the store.
    Image {
        /// What was fetched.
        fetched: Box<Fetched>,
        /// Whether it is synced to disk (a rejected image accepted later needs to know).
        durable: bool,
    },
}

/// A fetch failing transiently and being retried.
#[derive(Debug, Clone)]
pub(crate) struct Retrying {
    /// Since when (for `module.download_recovered`).
    pub since: Instant,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// The last failure and when the next try comes, shown until the reference resolves
    /// again.
    pub error: Option<String>,
}

impl Phase {
    /// The image fetched, from Verifying on.
    pub(crate) fn fetched(&self) -> Option<&Fetched> {
        match self {
            Phase::Verifying { fetched, .. }
            | Phase::Mounting { fetched, .. }
            | Phase::Active { fetched }
            | Phase::Failed {
                reached: Reached::Image { fetched, .. },
                ..
            } => Some(fetched),
            _ => None,
        }
    }

    /// Moves the phase on: `step` gets it by value and returns the next.
    pub(crate) fn step(&mut self, step: impl FnOnce(Phase) -> Phase) {
        let phase = std::mem::replace(self, Phase::Resolving { retrying: None });
        *self = step(phase);
    }

    /// The phase as it stops for good: what it reached, for [`Phase::Failed`].
    fn reached(self) -> Reached {
        match self {
            Phase::Resolving { .. } => Reached::Nothing,
            Phase::Downloading {
                digest,
                done,
                total,
                ..
            } => Reached::Download {
                digest,
                done,
                total,
            },
            Phase::Verifying {
                fetched, durable, ..
            } => Reached::Image { fetched, durable },
            Phase::Mounting { fetched, .. } | Phase::Active { fetched } => Reached::Image {
                fetched,
                durable: true,
            },
            Phase::Failed { reached, .. } => reached,
        }
    }
}

impl Module {
    /// The module's status, as published: derived from its phase alone.
    pub(crate) fn status(&self) -> ModuleStatus {
        let image = |f: &Fetched| {
            let size = f.resolved.image.size;
            (Some(f.resolved.image.digest.clone()), size, Some(size))
        };
        let shown = |r: &Option<Retrying>| r.as_ref().and_then(|r| r.error.clone());
        let (state, (digest, bytes_done, bytes_total), error) = match &self.phase {
            Phase::Resolving { retrying } => {
                (ModuleState::Resolving, (None, 0, None), shown(retrying))
            }
            Phase::Downloading {
                digest,
                done,
                total,
                retrying,
            } => (
                ModuleState::Downloading,
                (Some(digest.clone()), *done, Some(*total)),
                shown(retrying),
            ),
            Phase::Verifying { fetched, .. } => (ModuleState::Verifying, image(fetched), None),
            Phase::Mounting { fetched, waiting } => {
                (ModuleState::Mounting, image(fetched), waiting.clone())
            }
            Phase::Active { fetched } => (ModuleState::Active, image(fetched), None),
            Phase::Failed {
                reason, reached, ..
            } => {
                let progress = match reached {
                    Reached::Nothing => (None, 0, None),
                    Reached::Download {
                        digest,
                        done,
                        total,
                    } => (Some(digest.clone()), *done, Some(*total)),
                    Reached::Image { fetched, .. } => image(fetched),
                };
                (ModuleState::Failed, progress, Some(reason.clone()))
            }
        };
        ModuleStatus {
            name: self.config.name.clone(),
            reference: self.config.reference.clone(),
            state,
            digest,
            bytes_done,
            bytes_total,
            error,
        }
    }
}

/// What the verifier is handed for `fetched`: the complete image, or (`complete` false) the
/// one the store is still writing.
pub(crate) fn verify_config(
    name: &str,
    fetched: &Fetched,
    complete: bool,
    trust_policy: &str,
    run: Run,
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
        attempt: u32::from(run.redownload),
    }
}

/// What a verdict leads to, decided while the module is borrowed.
enum Then {
    /// Nothing more.
    Nothing,
    /// On to Mounting, if durable too.
    Advance,
    /// A rejection, for the reason given.
    Reject(String),
    /// The rejected image's stored copy (its digest) is read again.
    Recheck(String),
    /// A rejected module the verifier accepts now comes back.
    Accept,
}

impl Modules {
    /// A fetch of module `name` reported; reports of an older run (`epoch`) are ignored.
    pub(crate) fn on_report(&mut self, name: &str, epoch: u64, report: Report) -> Vec<Effect> {
        if self.modules.get(name).is_some_and(|m| m.run.epoch == epoch) {
            match report {
                Report::Resolved { digest, total } => self.resolved(name, digest, total),
                Report::Progress { done } => self.progress(name, done),
                Report::Retrying {
                    error,
                    attempt,
                    retry_in,
                } => self.retrying(name, &error, attempt, retry_in),
                Report::Arriving(arriving) => self.arriving(name, &arriving),
                Report::Failed(reason) => self.download_failed(name, reason),
                Report::Moved => {
                    tracing::info!(module = %name, "the reference names another manifest now; fetching it");
                    if let Some(config) = self.modules.get(name).map(|m| m.config.clone()) {
                        self.start(config, None);
                    }
                }
                Report::Durable => self.durable(name),
                Report::Rechecked { damage } => self.rechecked(name, damage),
                Report::Done(fetched) => self.fetched(name, *fetched),
            }
        }
        self.done()
    }

    /// A change of the verifier's verdicts.
    pub(crate) fn on_verdict(&mut self, event: Event<VerifyStatus>) -> Vec<Effect> {
        match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                self.verdicts.insert(value.name.clone(), value.clone());
                self.verdict(&value);
            }
            Event::Delete { key, .. } => {
                self.verdicts.remove(&key);
            }
            _ => {}
        }
        self.done()
    }

    /// A complete `VerifyConfig` could not be published: the verifier will not answer for
    /// the module, which fails.
    pub(crate) fn handover_failed(&mut self, name: &str, error: &str) -> Vec<Effect> {
        // What the publication holds now is not known: the next handover is news.
        self.handed.remove(name);
        self.fail(
            name,
            format!("cannot hand the module to the verifier: {error}"),
        );
        self.restack();
        self.done()
    }

    fn resolved(&mut self, name: &str, digest: String, total: u64) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let (retrying, done) = match &mut m.phase {
            Phase::Resolving { retrying } => (retrying.take(), 0),
            Phase::Downloading {
                retrying,
                digest: before,
                done,
                ..
            } => (retrying.take(), if *before == digest { *done } else { 0 }),
            _ => return,
        };
        // The attempts count on until the download goes through; the error is over.
        let retrying = retrying.map(|r| Retrying { error: None, ..r });
        m.phase = Phase::Downloading {
            digest,
            done,
            total,
            retrying,
        };
    }

    fn progress(&mut self, name: &str, bytes: u64) {
        if let Some(Phase::Downloading { done, .. }) =
            self.modules.get_mut(name).map(|m| &mut m.phase)
        {
            *done = bytes;
        }
    }

    fn retrying(&mut self, name: &str, error: &str, attempt: u32, retry_in: Duration) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let (Phase::Resolving { retrying } | Phase::Downloading { retrying, .. }) = &mut m.phase
        else {
            return;
        };
        let r = retrying.get_or_insert(Retrying {
            since: Instant::now(),
            attempts: 0,
            error: None,
        });
        r.attempts = attempt;
        r.error = Some(format!(
            "{error}; retrying in {:.1}s",
            retry_in.as_secs_f64()
        ));
        if events::failing_worth_raising(attempt) {
            let raised =
                events::download_failing(name, &m.config.reference, error, attempt, retry_in);
            self.emit(Effect::Raise(raised));
        }
    }

    /// The image is about to stream into the store: the verifier may start on it while it
    /// arrives; its verdict waits for the complete image.
    fn arriving(&mut self, name: &str, arriving: &Fetched) {
        let Some(m) = self.modules.get(name) else {
            return;
        };
        if !matches!(m.phase, Phase::Resolving { .. } | Phase::Downloading { .. }) {
            return;
        }
        let verify = verify_config(name, arriving, false, &self.settings.trust_policy, m.run);
        if self.handed.get(name) != Some(&verify) {
            self.handed.insert(name.to_owned(), verify.clone());
            self.emit(Effect::Verify(verify));
        }
    }

    fn download_failed(&mut self, name: &str, reason: String) {
        let Some(m) = self.modules.get(name) else {
            return;
        };
        let raised = events::download_failed(name, &m.config.reference, &reason);
        self.emit(Effect::Raise(raised));
        // A download that will not complete: the verifier stops following it.
        if self.handed.get(name).is_some_and(|c| !c.complete) {
            self.handed.remove(name);
            self.emit(Effect::Unverify(name.to_owned()));
        }
        self.fail(name, reason);
    }

    /// The store has the image: the verifier gets it complete.
    fn fetched(&mut self, name: &str, fetched: Fetched) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        // Done comes once per run: to a module still fetching (an offline start goes
        // straight from Resolving). A module failed meanwhile (its stack did not mount) stays
        // failed.
        let retrying = match &mut m.phase {
            Phase::Resolving { retrying } | Phase::Downloading { retrying, .. } => retrying.take(),
            _ => return,
        };
        let reference = m.config.reference.clone();
        let run = m.run;
        let verify = verify_config(name, &fetched, true, &self.settings.trust_policy, run);
        self.layer_manifests.insert(
            fetched.resolved.image.digest.clone(),
            fetched.resolved.module.clone(),
        );
        m.phase = Phase::Verifying {
            fetched: Box::new(fetched),
            verdict: Verdict::Pending,
            durable: false,
        };
        if let Some(r) = retrying {
            let raised =
                events::download_recovered(name, &reference, r.attempts, r.since.elapsed());
            self.emit(Effect::Raise(raised));
        }
        // The same config as already handed over (a restart, or the same module fetched
        // again): the verifier will not see a change, and its verdict on it stands, so take
        // that verdict rather than wait for one that will not come.
        let unchanged = self.handed.get(name) == Some(&verify);
        self.handed.insert(name.to_owned(), verify.clone());
        self.emit(Effect::Verify(verify));
        if unchanged {
            if let Some(verdict) = self.verdicts.get(name).cloned() {
                self.verdict(&verdict);
            }
        }
    }

    fn durable(&mut self, name: &str) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        match &mut m.phase {
            Phase::Verifying { durable, .. } => {
                *durable = true;
                self.advance(name);
            }
            // Should a verdict accept it later, it may go straight on.
            Phase::Failed {
                reached: Reached::Image { durable, .. },
                ..
            } => *durable = true,
            _ => {}
        }
    }

    /// The stored copy of a rejected image was read again.
    fn rechecked(&mut self, name: &str, damage: Option<String>) {
        // Only while the rejection still stands: a later verdict (the trust policy changed
        // meanwhile) has moved the module on, and this answer is stale.
        let Some(Phase::Verifying {
            verdict: Verdict::Rechecking { reason },
            ..
        }) = self.modules.get(name).map(|m| &m.phase)
        else {
            return;
        };
        match damage {
            None => {
                let reason = reason.clone();
                self.reject(name, reason);
            }
            Some(damage) => {
                tracing::warn!(module = %name, %damage, "the stored image is damaged (a power cut before it was synced, or a failing disk); downloading it again");
                self.refetch(name);
            }
        }
    }

    /// Takes a verdict of the verifier: one about another image or manifest than the
    /// module's is not about this module.
    pub(crate) fn verdict(&mut self, v: &VerifyStatus) {
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
        let Some(fetched) = m.phase.fetched() else {
            return;
        };
        if fetched.resolved.image.digest != v.digest
            || fetched.resolved.manifest_digest.to_string() != v.manifest_digest
        {
            return;
        }
        let reason = format!(
            "verification failed: {}",
            v.reason.as_deref().unwrap_or("no reason given")
        );
        let Run { epoch, redownload } = m.run;
        let then = match (&mut m.phase, v.state) {
            // The verifier checks it again (the trust policy changed): a reading of the
            // stored copy under way answers a rejection that no longer stands.
            (Phase::Verifying { verdict, .. }, VerifyState::Verifying) => {
                if matches!(verdict, Verdict::Rechecking { .. }) {
                    *verdict = Verdict::Pending;
                }
                Then::Nothing
            }
            (Phase::Verifying { verdict, .. }, VerifyState::Verified) => {
                *verdict = Verdict::Accepted;
                Then::Advance
            }
            (Phase::Verifying { .. }, VerifyState::Failed) if redownload => Then::Reject(reason),
            (
                Phase::Verifying {
                    verdict, fetched, ..
                },
                VerifyState::Failed,
            ) => match verdict {
                // One reading of the copy answers for whichever reason; the status shows the
                // latest.
                Verdict::Rechecking { reason: standing } => {
                    *standing = reason;
                    Then::Nothing
                }
                _ => {
                    *verdict = Verdict::Rechecking { reason };
                    Then::Recheck(fetched.resolved.image.digest.clone())
                }
            },
            // A verdict that withdraws an image already in use (the trust policy changed): it
            // leaves the stack.
            (Phase::Mounting { .. } | Phase::Active { .. }, VerifyState::Failed) => {
                Then::Reject(reason)
            }
            // Rejected again, perhaps for another reason (another policy edit): the status
            // says why it is rejected now.
            (
                Phase::Failed {
                    rejected: true,
                    reason: standing,
                    ..
                },
                VerifyState::Failed,
            ) => {
                if *standing != reason {
                    tracing::info!(module = %v.name, %reason, "rejected again, for another reason");
                    *standing = reason;
                }
                Then::Nothing
            }
            // A rejected module the verifier now accepts (a key was added to the policy): it
            // goes on to the stack.
            (
                Phase::Failed {
                    rejected: true,
                    reached: Reached::Image { .. },
                    ..
                },
                VerifyState::Verified,
            ) => Then::Accept,
            _ => Then::Nothing,
        };
        match then {
            Then::Nothing => {}
            Then::Advance => self.advance(&v.name),
            Then::Reject(reason) => self.reject(&v.name, reason),
            Then::Recheck(digest) => self.emit(Effect::Recheck {
                name: v.name.clone(),
                epoch,
                digest,
            }),
            Then::Accept => {
                tracing::info!(module = %v.name, "the verifier accepts the module now");
                m.phase.step(|phase| match phase {
                    Phase::Failed {
                        reached: Reached::Image { fetched, durable },
                        ..
                    } => Phase::Verifying {
                        fetched,
                        verdict: Verdict::Accepted,
                        durable,
                    },
                    other => other,
                });
                self.advance(&v.name);
            }
        }
    }

    /// Stops a module for `reason`. Its fetch is not stopped: it may still be running (a
    /// background refresh after an offline start), and a removal or restart stops it.
    pub(crate) fn fail(&mut self, name: &str, reason: String) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        tracing::warn!(module = %name, reason = %reason, "module failed");
        m.phase.step(|phase| Phase::Failed {
            reason,
            rejected: false,
            reached: phase.reached(),
        });
        // Should it come back, that is news again.
        self.active_before.remove(name);
    }

    /// Fails a module the verifier rejected and takes it out of the stack.
    fn reject(&mut self, name: &str, reason: String) {
        self.fail(name, reason);
        if let Some(Phase::Failed { rejected, .. }) =
            self.modules.get_mut(name).map(|m| &mut m.phase)
        {
            *rejected = true;
        }
        self.restack();
    }

    /// Moves a module on to Mounting once its image is both verified and durable.
    pub(crate) fn advance(&mut self, name: &str) {
        let Some(m) = self.modules.get_mut(name) else {
            return;
        };
        let Phase::Verifying {
            verdict: Verdict::Accepted,
            durable: true,
            ..
        } = &m.phase
        else {
            return;
        };
        m.phase.step(|phase| match phase {
            Phase::Verifying { fetched, .. } => Phase::Mounting {
                fetched,
                waiting: None,
            },
            other => other,
        });
        self.restack();
        // The stack may not have changed (a restart re-verifies what is mounted): then the
        // status mountmgr already gave answers it.
        self.answer_from_standing_mount();
    }

    /// Throws away a module's damaged stored image and downloads it again, once.
    fn refetch(&mut self, name: &str) {
        let Some(m) = self.modules.get(name) else {
            return;
        };
        let config = m.config.clone();
        let damaged = m.phase.fetched().map(|f| f.resolved.image.digest.clone());
        if let Some(digest) = &damaged {
            self.rejected.remove(digest);
        }
        // Withdrawn so that the new download's config is news to the verifier, which then
        // checks it afresh instead of its verdict on the damaged copy standing.
        if self.handed.remove(name).is_some() {
            self.emit(Effect::Unverify(name.to_owned()));
        }
        self.start(config, damaged);
    }
}
