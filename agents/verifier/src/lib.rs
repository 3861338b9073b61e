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
//! An image that passes is then sealed with fs-verity where the kernel and file system have it
//! ([`kernel`]); the verdict says whether the kernel enforces the digest or only userspace
//! computed it. Checks run on blocking threads, one at a time per name and at most
//! [`MAX_CHECKS`] at once; a verdict for a config that changed meanwhile is dropped and the
//! newer config is checked. Nothing is cached across configs: every new config is checked from
//! the bytes on disk.
//!
//! A rejection is raised as `module.rejected` ([`rejections`]), once per image and reason.

pub mod changes;
pub mod check;
pub mod kernel;
pub mod policy;
pub mod rejections;

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use agentbase::Context;
use powernode_pubsub::{Event, Subscription};
use powernode_types::{VerifyConfig, VerifyState, VerifyStatus};
use tokio::sync::mpsc;

/// The most checks that run at once.
pub const MAX_CHECKS: usize = 2;
/// The agent whose `VerifyConfig` it checks.
pub const MODULE_AGENT: &str = "modulemgr";

/// The agent's main future.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let status_pub = ctx.open_publication::<VerifyStatus>()?;
    // Verdicts left by an earlier run: their rejections were raised then.
    let mut rejections = rejections::Rejections::standing(
        status_pub
            .keys()
            .into_iter()
            .filter_map(|key| status_pub.get(&key)),
    );
    let mut configs = Subscription::<VerifyConfig>::connect(&ctx.dirs, MODULE_AGENT);
    // Each verdict comes back with the policy generation it was reached under.
    let (done_tx, mut done_rx) = mpsc::channel::<(VerifyConfig, u64, Checked)>(16);
    // The config each name should be answered for: a verdict for anything else is stale.
    let mut current: BTreeMap<String, VerifyConfig> = BTreeMap::new();
    let trust_dir = ctx.root.path(policy::DIR);
    let publish = |status: &VerifyStatus| {
        if let Err(e) = status_pub.publish(status) {
            tracing::error!(error = %e, module = %status.name, "publishing VerifyStatus failed");
            ctx.health
                .report_error(&format!("publishing VerifyStatus failed: {e}"));
        }
    };
    ctx.ready();
    let mut beat = tokio::time::interval(ctx.beat_interval());
    // Names with a check in flight, and the config each was last answered for: at most one
    // check per name, at most MAX_CHECKS at once (each reads the whole image on two threads).
    let mut running: BTreeSet<String> = BTreeSet::new();
    let mut answered: BTreeMap<String, VerifyConfig> = BTreeMap::new();
    // Bumped when a file in the trust directory changes: every verdict reached under an older
    // policy is void, and each module is checked again (a key revoked takes a module out of
    // the stack; a key added brings a rejected one in).
    let mut policy_generation = 0u64;
    let mut policy_changes = changes::PolicyChanges::new(&trust_dir);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = beat.tick() => ctx.beat(),
            () = policy_changes.next() => {
                policy_generation += 1;
                answered.clear();
                if !current.is_empty() {
                    tracing::info!(modules = current.len(), "trust policy changed; checking every module again");
                }
            }
            event = configs.next() => match event {
                Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                    publish(&status(&value, VerifyState::Verifying, None));
                    current.insert(value.name.clone(), value);
                }
                Event::Delete { key, .. } => {
                    current.remove(&key);
                    answered.remove(&key);
                    rejections.forget(&key);
                    if let Err(e) = status_pub.unpublish(&key) {
                        tracing::warn!(error = %e, module = %key, "unpublishing VerifyStatus failed");
                    }
                }
                _ => {}
            },
            Some((config, generation, checked)) = done_rx.recv() => {
                running.remove(&config.name);
                // A verdict for a config that changed meanwhile, or reached under a policy
                // that changed (or is changing) meanwhile, is dropped; the module is checked
                // again.
                let fresh = generation == policy_generation && !policy_changes.settling();
                if current.get(&config.name) == Some(&config) && fresh {
                match checked {
                    Checked::Verdict(status) => {
                        publish(&status);
                        rejections.published(&ctx.events, &config, &status);
                    }
                    // A policy edited into something unreadable (a typo, a file half written)
                    // does not take down what it had passed: the verdict reached under the last
                    // readable policy stands, and the error is reported until the policy is
                    // fixed. A revocation is an edit that removes the key.
                    Checked::PolicyUnreadable(status) => {
                        let standing = status_pub.get(&config.name).filter(|s| {
                            s.state != VerifyState::Verifying
                                && s.digest == config.digest
                                && s.manifest_digest == config.manifest_digest
                        });
                        if standing.is_some() {
                            let reason = status.reason.unwrap_or_default();
                            tracing::error!(module = %config.name, %reason, "the trust policy cannot be read; the module's verdict stands");
                            ctx.health.report_error(&reason);
                        } else {
                            publish(&status);
                            rejections.published(&ctx.events, &config, &status);
                        }
                    }
                }
                answered.insert(config.name.clone(), config);
                }
            }
        }
        // While the policy files are changing, checks wait for them to settle.
        let waiting: Vec<VerifyConfig> = current
            .values()
            .filter(|_| !policy_changes.settling())
            .filter(|c| !running.contains(&c.name) && answered.get(&c.name) != Some(*c))
            .take(MAX_CHECKS.saturating_sub(running.len()))
            .cloned()
            .collect();
        for config in waiting {
            running.insert(config.name.clone());
            let trust_dir = trust_dir.clone();
            let done = done_tx.clone();
            let generation = policy_generation;
            ctx.tasks.spawn(async move {
                let checked = config.clone();
                let checked = tokio::task::spawn_blocking(move || verdict(&trust_dir, &checked))
                    .await
                    .unwrap_or_else(|e| {
                        Checked::Verdict(failed(&config, format!("the check did not finish: {e}")))
                    });
                let _ = done.send((config, generation, checked)).await;
            });
        }
    }
    Ok(())
}

/// What a check came to.
enum Checked {
    /// The checks ran under the policy: Verified or Failed.
    Verdict(VerifyStatus),
    /// The policy could not be read: a Failed status saying why.
    PolicyUnreadable(VerifyStatus),
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

/// Loads the policy and runs the checks.
fn verdict(trust_dir: &std::path::Path, config: &VerifyConfig) -> Checked {
    let policy = match policy::load(trust_dir, &config.trust_policy) {
        Ok(policy) => policy,
        Err(e) => {
            tracing::warn!(module = %config.name, error = %e, "module rejected: no readable trust policy");
            return Checked::PolicyUnreadable(failed(config, e.to_string()));
        }
    };
    Checked::Verdict(checked(config, &policy))
}

/// Runs the checks under `policy`; the outcome as a status.
fn checked(config: &VerifyConfig, policy: &powernode_modules::cosign::Policy) -> VerifyStatus {
    let started = std::time::Instant::now();
    let outcome = check::check(config, policy, SystemTime::now())
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
    let (state, reason) = match outcome {
        Ok(summary) => {
            tracing::info!(module = %config.name, digest = %config.digest, %summary,
                ms = started.elapsed().as_millis() as u64, "module verified");
            (VerifyState::Verified, summary)
        }
        Err(reason) => {
            tracing::warn!(module = %config.name, digest = %config.digest, %reason, "module rejected");
            (VerifyState::Failed, reason)
        }
    };
    status(config, state, Some(reason))
}
