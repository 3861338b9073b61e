//! One module's fetch: resolve the reference for this node's architecture, read its cosign
//! signatures, stream its image into the store. Transient failures (registry down, 5xx,
//! connection cut) are retried with backoff; the rest end the fetch with a reason.
//!
//! The fetch runs as its own task and reports to the agent's main loop through a channel;
//! the main loop cancels it when the module's reference changes or it is removed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use powernode_modules::digest::Digest;
use powernode_modules::registry::{Registry, RegistryError, Resolved};
use powernode_modules::store::Store;
use powernode_types::CosignSignature;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The first retry delay; it doubles up to the configured maximum.
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// Progress is reported at most this often (and at the end).
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What a fetch reports.
#[derive(Debug)]
pub enum Report {
    /// The reference resolved; the image is `total` bytes.
    Resolved {
        /// Image digest.
        digest: String,
        /// Image size.
        total: u64,
    },
    /// Bytes of the image in the store so far.
    Progress {
        /// Bytes done.
        done: u64,
    },
    /// A transient failure; trying again after `retry_in`.
    Retrying {
        /// What failed.
        error: String,
        /// The delay before the next try.
        retry_in: Duration,
    },
    /// The image is in the store, digest-checked (not yet synced: see `Durable`).
    Done(Box<Fetched>),
    /// The image is synced to disk: it may join the mount stack, which outlives a power cut.
    Durable,
    /// The stored image of a rejected module was read again (`intact`: it still hashes to its
    /// digest); `verdict` is the verifier's reason.
    Rechecked {
        /// Whether the stored bytes still match their digest.
        intact: bool,
        /// The verifier's reason for the rejection.
        verdict: String,
    },
    /// The fetch failed for good.
    Failed(String),
}

/// A module ready for verification.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// What the reference resolved to.
    pub resolved: Resolved,
    /// The image in the store.
    pub image_path: PathBuf,
    /// Its signatures, as found in the registry.
    pub signatures: Vec<CosignSignature>,
}

/// A fetch's inputs.
#[derive(Clone, Debug)]
pub struct Job {
    /// The module's name (reports are tagged with it).
    pub name: String,
    /// Its reference.
    pub reference: String,
    /// The node's OCI architecture.
    pub architecture: String,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

/// Runs `job` until it is done, fails for good, or `cancel` fires.
pub async fn run(
    job: Job,
    registry: Registry,
    store: Store,
    reports: mpsc::Sender<(String, u64, Report)>,
    epoch: u64,
    cancel: CancellationToken,
) {
    let send = |report: Report| {
        let reports = reports.clone();
        let name = job.name.clone();
        async move {
            let _ = reports.send((name, epoch, report)).await;
        }
    };
    let mut delay = RETRY_MIN;
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt(&job, &registry, &store, &reports, epoch) => r,
        };
        match attempt {
            Ok(fetched) => {
                let digest = fetched.resolved.image.digest.clone();
                send(Report::Done(Box::new(fetched))).await;
                // Synced while the verifier reads the image from the page cache: both take
                // about as long, and this way they overlap.
                return send(make_durable(&store, &digest).await).await;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(module = %job.name, error = %e, retry_in_ms = delay.as_millis() as u64, "fetch failed; retrying");
                send(Report::Retrying {
                    error: e.to_string(),
                    retry_in: delay,
                })
                .await;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(job.max_backoff);
            }
            Err(e) => {
                tracing::warn!(module = %job.name, error = %e, "fetch failed");
                return send(Report::Failed(e.to_string())).await;
            }
        }
    }
}

/// Syncs the stored image `digest`.
async fn make_durable(store: &Store, digest: &str) -> Report {
    let store = store.clone();
    let digest = digest.to_owned();
    let synced = tokio::task::spawn_blocking(move || {
        let digest = Digest::parse(&digest).map_err(|e| e.to_string())?;
        store.make_durable(&digest).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match synced {
        Ok(()) => Report::Durable,
        Err(e) => Report::Failed(format!("cannot make the image durable: {e}")),
    }
}

/// Reads the stored image `digest` again for a module the verifier rejected; the answer comes
/// back as [`Report::Rechecked`] for `name` at `epoch`.
pub async fn recheck(
    store: Store,
    digest: String,
    verdict: String,
    reports: mpsc::Sender<(String, u64, Report)>,
    name: String,
    epoch: u64,
) {
    let intact = tokio::task::spawn_blocking(move || {
        // Unreadable or gone counts as damaged: downloading it again is the remedy either way.
        Digest::parse(&digest).is_ok_and(|d| store.intact(&d).unwrap_or(false))
    })
    .await
    .unwrap_or(false);
    let _ = reports
        .send((name, epoch, Report::Rechecked { intact, verdict }))
        .await;
}

async fn attempt(
    job: &Job,
    registry: &Registry,
    store: &Store,
    reports: &mpsc::Sender<(String, u64, Report)>,
    epoch: u64,
) -> Result<Fetched, RegistryError> {
    let resolved = registry.resolve(&job.reference, &job.architecture).await?;
    let signatures = registry
        .signatures(&resolved.repository, &resolved.manifest_digest)
        .await?;
    let _ = reports
        .send((
            job.name.clone(),
            epoch,
            Report::Resolved {
                digest: resolved.image.digest.clone(),
                total: resolved.image.size,
            },
        ))
        .await;
    let mut last = Instant::now() - PROGRESS_EVERY;
    let name = job.name.clone();
    let progress_tx = reports.clone();
    let mut progress = move |done: u64, total: u64| {
        if done == total || last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            // Dropped when the main loop is busy: the next one carries a newer count anyway.
            let _ = progress_tx.try_send((name.clone(), epoch, Report::Progress { done }));
        }
    };
    let image_path = registry
        .pull_blob(&resolved.repository, &resolved.image, store, &mut progress)
        .await?;
    Ok(Fetched {
        resolved,
        image_path,
        signatures,
    })
}
