//! verifier: decides whether a pulled module may be mounted (DESIGN §2, §6; docs/modules.md).
//!
//! For each `modulemgr/VerifyConfig` it runs [`check::check`] against the trust policy the
//! config names ([`policy`]) and publishes `verifier/VerifyStatus`:
//!
//! ```text
//!   VerifyConfig created/changed ──► Verifying ──► Verified (reason: who signed, fs-verity)
//!                                         └──────► Failed   (reason: the first check that failed)
//!   VerifyConfig deleted ──► status removed
//!   trust policy edited  ──► every module checked again under the new policy
//!                            (unreadable: the standing verdicts stay, the error is reported)
//! ```
//!
//! modulemgr publishes a module's config when its download starts (`complete: false`): the
//! check starts then and hashes the image as it arrives ([`follow`]). The same config again
//! with `complete: true` (the store has taken the image in, its SHA-256 confirmed) lets the
//! check finish; only then is a verdict published, and it is about that complete config. A
//! config withdrawn or changed into another one meanwhile stops the check (a changed one is
//! checked from the start).
//!
//! An image that passes is then sealed with fs-verity where the kernel and file system have it
//! ([`kernel`]); the verdict says whether the kernel enforces the digest or only userspace
//! computed it. Checks run on blocking threads, one at a time per name and at most
//! [`MAX_CHECKS`] at once (a check following a download holds its place while it waits); a
//! verdict for a config that changed meanwhile is dropped and the newer config is checked.
//! Nothing is cached across configs: every new config is checked from the bytes on disk.
//!
//! A rejection is raised as `module.rejected` ([`rejections`]), once per image and reason.
//!
//! The state (the config each module should be answered for, the checks in flight, the
//! configs answered, the policy generation) lives in one value with a method per event: a
//! config created, changed or withdrawn, a check done, the policy changed. [`run`] is the
//! select loop that calls them.

pub mod changes;
pub mod kernel;
pub mod rejections;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use agentbase::Context;
use powernode_pubsub::{Event, Publication, Subscription};
use powernode_types::{VerifyConfig, VerifyState, VerifyStatus};
use tokio::sync::mpsc;

use powernode_modules::follow::Follow;
use powernode_modules::{check, policy};

/// The most checks that run at once.
pub const MAX_CHECKS: usize = 2;
/// The agent whose `VerifyConfig` it checks.
pub const MODULE_AGENT: &str = "modulemgr";

/// The agent's main future: a select loop that hands each event to the `Verifier`, then
/// lets it start the checks that may run.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let (done_tx, mut done_rx) = mpsc::channel::<(String, u64, Checked)>(16);
    let mut verifier = Verifier::new(&ctx, done_tx)?;
    let mut configs = Subscription::<VerifyConfig>::connect(&ctx.dirs, MODULE_AGENT);
    let mut policy_changes = changes::PolicyChanges::new(&verifier.trust_dir);
    ctx.ready();
    let mut beat = tokio::time::interval(ctx.beat_interval());
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = beat.tick() => ctx.beat(),
            () = policy_changes.next() => verifier.on_policy_changed(),
            event = configs.next() => verifier.on_config(event),
            Some((name, generation, checked)) = done_rx.recv() => {
                verifier.on_checked(&name, generation, checked, policy_changes.settling());
            }
        }
        // While the policy files are changing, checks wait for them to settle.
        if !policy_changes.settling() {
            verifier.start_checks();
        }
    }
    verifier.stop();
    Ok(())
}

/// The verifier's state: the config each module should be answered for, the checks in
/// flight, the config each was last answered for, the policy generation.
struct Verifier {
    ctx: Context,
    status_pub: Publication<VerifyStatus>,
    /// The rejections raised, so each is raised once per image and reason.
    rejections: rejections::Rejections,
    /// Where the trust policies are.
    trust_dir: PathBuf,
    /// The config each name should be answered for: a verdict for anything else is stale.
    current: BTreeMap<String, VerifyConfig>,
    /// Names with a check in flight: at most one check per name, at most [`MAX_CHECKS`] at
    /// once (each reads the whole image).
    running: BTreeMap<String, Running>,
    /// The config each name was last answered for.
    answered: BTreeMap<String, VerifyConfig>,
    /// Bumped when a file in the trust directory changes: every verdict reached under an older
    /// policy is void, and each module is checked again (a key revoked takes a module out of
    /// the stack; a key added brings a rejected one in).
    policy_generation: u64,
    /// Where each check comes back with the name it ran for, the policy generation it ran
    /// under and what it came to.
    done_tx: mpsc::Sender<(String, u64, Checked)>,
}

impl Verifier {
    fn new(
        ctx: &Context,
        done_tx: mpsc::Sender<(String, u64, Checked)>,
    ) -> anyhow::Result<Verifier> {
        let status_pub = ctx.open_publication::<VerifyStatus>()?;
        // Verdicts left by an earlier run: their rejections were raised then.
        let rejections = rejections::Rejections::standing(
            status_pub
                .keys()
                .into_iter()
                .filter_map(|key| status_pub.get(&key)),
        );
        Ok(Verifier {
            ctx: ctx.clone(),
            status_pub,
            rejections,
            trust_dir: ctx.root.path(policy::DIR),
            current: BTreeMap::new(),
            running: BTreeMap::new(),
            answered: BTreeMap::new(),
            policy_generation: 0,
            done_tx,
        })
    }

    fn publish(&self, status: &VerifyStatus) {
        if let Err(e) = self.status_pub.publish(status) {
            tracing::error!(error = %e, module = %status.name, "publishing VerifyStatus failed");
            self.ctx
                .health
                .report_error(&format!("publishing VerifyStatus failed: {e}"));
        }
    }

    /// A file in the trust directory changed.
    fn on_policy_changed(&mut self) {
        self.policy_generation += 1;
        self.answered.clear();
        // Checks under the old policy stop; each module is checked again.
        for check in self.running.values() {
            check.follow.cancel();
        }
        if !self.current.is_empty() {
            tracing::info!(
                modules = self.current.len(),
                "trust policy changed; checking every module again"
            );
        }
    }

    /// A change of modulemgr's `VerifyConfig`s.
    fn on_config(&mut self, event: Event<VerifyConfig>) {
        match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                self.config_changed(value);
            }
            Event::Delete { key, .. } => self.config_withdrawn(&key),
            _ => {}
        }
    }

    fn config_changed(&mut self, config: VerifyConfig) {
        self.publish(&status(&config, VerifyState::Verifying, None));
        // The download a check follows has completed: it finishes. Any other change stops it,
        // and the new config is checked from the start.
        if let Some(check) = self.running.get(&config.name) {
            if Follow::continues(&check.config, &config) {
                check.follow.complete(config.clone());
            } else if check.config != config {
                check.follow.cancel();
            }
        }
        self.current.insert(config.name.clone(), config);
    }

    fn config_withdrawn(&mut self, name: &str) {
        if let Some(check) = self.running.get(name) {
            check.follow.cancel();
        }
        self.current.remove(name);
        self.answered.remove(name);
        self.rejections.forget(name);
        if let Err(e) = self.status_pub.unpublish(name) {
            tracing::warn!(error = %e, module = %name, "unpublishing VerifyStatus failed");
        }
    }

    /// A check of `name`, run under policy `generation`, came to `checked`; `settling` says
    /// whether the policy files are changing now.
    fn on_checked(&mut self, name: &str, generation: u64, checked: Checked, settling: bool) {
        self.running.remove(name);
        // A verdict for a config that changed meanwhile, or reached under a policy that
        // changed (or is changing) meanwhile, is dropped; the module is checked again. A
        // cancelled check answers nothing.
        let fresh = generation == self.policy_generation && !settling;
        let Some(config) = checked
            .config()
            .filter(|c| self.current.get(name) == Some(*c) && fresh)
            .cloned()
        else {
            return;
        };
        match checked {
            Checked::Cancelled => {}
            Checked::Verdict(_, status) => {
                self.publish(&status);
                self.rejections
                    .published(&self.ctx.events, &config, &status);
            }
            // A policy edited into something unreadable (a typo, a file half written) does not
            // take down what it had passed: the verdict reached under the last readable policy
            // stands, and the error is reported until the policy is fixed. A revocation is an
            // edit that removes the key.
            Checked::PolicyUnreadable(_, status) => {
                let standing = self.status_pub.get(&config.name).filter(|s| {
                    s.state != VerifyState::Verifying
                        && s.digest == config.digest
                        && s.manifest_digest == config.manifest_digest
                });
                if standing.is_some() {
                    let reason = status.reason.unwrap_or_default();
                    tracing::error!(module = %config.name, %reason, "the trust policy cannot be read; the module's verdict stands");
                    self.ctx.health.report_error(&reason);
                } else {
                    self.publish(&status);
                    self.rejections
                        .published(&self.ctx.events, &config, &status);
                }
            }
        }
        self.answered.insert(config.name.clone(), config);
    }

    /// Starts the checks of the configs not answered and not being checked, as many as may
    /// run.
    fn start_checks(&mut self) {
        let waiting: Vec<VerifyConfig> = self
            .current
            .values()
            .filter(|c| {
                !self.running.contains_key(&c.name) && self.answered.get(&c.name) != Some(*c)
            })
            .take(MAX_CHECKS.saturating_sub(self.running.len()))
            .cloned()
            .collect();
        for config in waiting {
            self.start_check(config);
        }
    }

    /// Runs the checks of `config` on a blocking thread; the answer comes back on `done_tx`.
    fn start_check(&mut self, config: VerifyConfig) {
        let follow = Arc::new(Follow::new(&config));
        self.running.insert(
            config.name.clone(),
            Running {
                config: config.clone(),
                follow: follow.clone(),
            },
        );
        let trust_dir = self.trust_dir.clone();
        let done = self.done_tx.clone();
        let generation = self.policy_generation;
        self.ctx.tasks.spawn(async move {
            let name = config.name.clone();
            let checked = tokio::task::spawn_blocking(move || {
                let run = std::panic::AssertUnwindSafe(|| verdict(&trust_dir, &config, &follow));
                std::panic::catch_unwind(run).unwrap_or_else(|_| {
                    // Answered, like every verdict, for the complete image.
                    match follow.until_settled() {
                        Some(config) => {
                            let status = failed(&config, "the check did not finish".into());
                            Checked::Verdict(config, status)
                        }
                        None => Checked::Cancelled,
                    }
                })
            })
            .await
            // Only at shutdown.
            .unwrap_or(Checked::Cancelled);
            let _ = done.send((name, generation, checked)).await;
        });
    }

    /// At shutdown: a check following a download that will not complete now must not hold up
    /// the exit.
    fn stop(&self) {
        for check in self.running.values() {
            check.follow.cancel();
        }
    }
}

/// A check in flight.
struct Running {
    /// The config it started on.
    config: VerifyConfig,
    /// Completes (the download it follows is done) or stops it.
    follow: Arc<Follow>,
}

/// What a check came to, for the complete config it answers.
enum Checked {
    /// The checks ran under the policy: Verified or Failed.
    Verdict(VerifyConfig, VerifyStatus),
    /// The policy could not be read: a Failed status saying why.
    PolicyUnreadable(VerifyConfig, VerifyStatus),
    /// The config was withdrawn or changed before the image was complete.
    Cancelled,
}

impl Checked {
    /// The complete config answered (none if cancelled).
    fn config(&self) -> Option<&VerifyConfig> {
        match self {
            Checked::Verdict(config, _) | Checked::PolicyUnreadable(config, _) => Some(config),
            Checked::Cancelled => None,
        }
    }
}

/// `config`'s verdict.
fn status(config: &VerifyConfig, state: VerifyState, reason: Option<String>) -> VerifyStatus {
    VerifyStatus {
        name: config.name.clone(),
        digest: config.digest.clone(),
        manifest_digest: config.manifest_digest.clone(),
        state,
        reason,
    }
}

fn failed(config: &VerifyConfig, reason: String) -> VerifyStatus {
    status(config, VerifyState::Failed, Some(reason))
}

/// Loads the policy and runs the checks of `started`, following its download through
/// `follow`.
fn verdict(trust_dir: &std::path::Path, started: &VerifyConfig, follow: &Follow) -> Checked {
    let policy = match policy::load(trust_dir, &started.trust_policy) {
        Ok(policy) => policy,
        Err(e) => {
            // Answered, like every verdict, for the complete image.
            let Some(config) = follow.until_settled() else {
                return Checked::Cancelled;
            };
            tracing::warn!(module = %config.name, error = %e, "module rejected: no readable trust policy");
            let status = failed(&config, e.to_string());
            return Checked::PolicyUnreadable(config, status);
        }
    };
    let started_at = std::time::Instant::now();
    match check::check_following(started, &policy, SystemTime::now(), follow) {
        Some(answer) => {
            let (config, status) = checked(answer, started_at);
            Checked::Verdict(config, status)
        }
        None => Checked::Cancelled,
    }
}

/// Seals an image that passed the checks; the answer as a status, with the complete config
/// it is for.
fn checked(answer: check::Answer, started: std::time::Instant) -> (VerifyConfig, VerifyStatus) {
    let check::Answer {
        config,
        outcome,
        hashed_early,
        completed,
    } = answer;
    let config = &config;
    let outcome = outcome
        .map_err(|e| e.to_string())
        .and_then(|v| {
            // Only an image that passed every check is sealed: fs-verity makes it immutable.
            let digest = powernode_modules::fsverity::Digest::parse(&v.fsverity_digest)
                .map_err(|e| e.to_string())?;
            match kernel::enforce(std::path::Path::new(&config.image_path), &digest.0) {
                Ok(kernel::Kernel::Enforced) => Ok(format!(
                    "{}; fs-verity {} (computed, and enforced by the kernel)",
                    v.signer, v.fsverity_digest
                )),
                Ok(kernel::Kernel::Unsupported(why)) => Ok(format!(
                    "{}; fs-verity {} (computed in userspace; the kernel cannot enforce it here: {why})",
                    v.signer, v.fsverity_digest
                )),
                Err(e) => Err(e.to_string()),
            }
        });
    // `ms`: from the start of the check (with the download, if it followed one);
    // `hashed_early_mib`: the image hashed before the store had it complete; `tail_ms`: what
    // the check took after that, sealing included.
    let (ms, early, tail_ms) = (
        started.elapsed().as_millis() as u64,
        hashed_early >> 20,
        completed.elapsed().as_millis() as u64,
    );
    let (state, reason) = match outcome {
        Ok(summary) => {
            tracing::info!(module = %config.name, digest = %config.digest, %summary,
                ms, hashed_early_mib = early, tail_ms, "module verified");
            (VerifyState::Verified, summary)
        }
        Err(reason) => {
            tracing::warn!(module = %config.name, digest = %config.digest, %reason,
                ms, hashed_early_mib = early, tail_ms, "module rejected");
            (VerifyState::Failed, reason)
        }
    };
    (config.clone(), status(config, state, Some(reason)))
}
