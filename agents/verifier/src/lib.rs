//! verifier: decides whether a pulled module may be mounted (DESIGN §2, §6; docs/modules.md).
//!
//! For each `modulemgr/VerifyConfig` it runs [`check::check`] against the trust policy the
//! config names ([`policy`]) and publishes `verifier/VerifyStatus`:
//!
//! ```text
//!   VerifyConfig created/changed ──► Verifying ──► Verified (reason: who signed, fs-verity)
//!                                         └──────► Failed   (reason: the first check that failed)
//!   VerifyConfig deleted ──► status removed
//! ```
//!
//! An image that passes is then sealed with fs-verity where the kernel and file system have it
//! ([`kernel`]); the verdict says whether the kernel enforces the digest or only userspace
//! computed it. Checks run on blocking threads, one module at a time per name; a verdict for a config that
//! changed meanwhile is dropped and the newer config is checked. Nothing is cached across
//! configs: every new config is checked from the bytes on disk.

pub mod check;
pub mod kernel;
pub mod policy;

use std::collections::BTreeMap;
use std::time::SystemTime;

use agentbase::Context;
use powernode_pubsub::{Event, Subscription};
use powernode_types::{VerifyConfig, VerifyState, VerifyStatus};
use tokio::sync::mpsc;

/// The agent whose `VerifyConfig` it checks.
pub const MODULE_AGENT: &str = "modulemgr";

/// The agent's main future.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let status_pub = ctx.open_publication::<VerifyStatus>()?;
    let mut configs = Subscription::<VerifyConfig>::connect(&ctx.dirs, MODULE_AGENT);
    let (done_tx, mut done_rx) = mpsc::channel::<(VerifyConfig, VerifyStatus)>(16);
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
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = beat.tick() => ctx.beat(),
            event = configs.next() => match event {
                Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                    publish(&VerifyStatus {
                        name: value.name.clone(),
                        digest: value.digest.clone(),
                        state: VerifyState::Verifying,
                        reason: None,
                    });
                    current.insert(value.name.clone(), value.clone());
                    let trust_dir = trust_dir.clone();
                    let done = done_tx.clone();
                    ctx.tasks.spawn(async move {
                        let config = value.clone();
                        let status = tokio::task::spawn_blocking(move || verdict(&trust_dir, &config))
                            .await
                            .unwrap_or_else(|e| VerifyStatus {
                                name: value.name.clone(),
                                digest: value.digest.clone(),
                                state: VerifyState::Failed,
                                reason: Some(format!("the check did not finish: {e}")),
                            });
                        let _ = done.send((value, status)).await;
                    });
                }
                Event::Delete { key, .. } => {
                    current.remove(&key);
                    if let Err(e) = status_pub.unpublish(&key) {
                        tracing::warn!(error = %e, module = %key, "unpublishing VerifyStatus failed");
                    }
                }
                _ => {}
            },
            Some((config, status)) = done_rx.recv() => {
                if current.get(&config.name) == Some(&config) {
                    publish(&status);
                }
            }
        }
    }
    Ok(())
}

/// Loads the policy and runs the checks; the outcome as a status.
fn verdict(trust_dir: &std::path::Path, config: &VerifyConfig) -> VerifyStatus {
    let started = std::time::Instant::now();
    let outcome = policy::load(trust_dir, &config.trust_policy)
        .map_err(|e| e.to_string())
        .and_then(|p| check::check(config, &p, SystemTime::now()).map_err(|e| e.to_string()))
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
    VerifyStatus {
        name: config.name.clone(),
        digest: config.digest.clone(),
        state,
        reason: Some(reason),
    }
}
