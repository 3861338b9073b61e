//! One module's fetch: resolve the reference for this node's architecture, read its cosign
//! signatures, stream its image into the store. Transient failures (registry down, 5xx,
//! connection cut) are retried with backoff; the rest end the fetch with a reason.
//!
//! Each resolution is kept ([`LastKnown`]). When the registry cannot be reached and the image
//! the reference last resolved to is in the store, the fetch goes on with that (a node booting
//! offline brings its modules up), then keeps trying the registry in the background and
//! reports [`Report::Moved`] if the reference has come to name another manifest meanwhile.
//!
//! The fetch runs as its own task and reports to the agent's main loop through a channel;
//! the main loop cancels it when the module's reference changes or it is removed.
//!
//! When an image is to be downloaded, the fetch says so before the first byte
//! ([`Report::Arriving`], with the file the store writes it into), so the verifier can hash it
//! as it arrives; [`Report::Done`] follows once the store has it complete, its SHA-256
//! confirmed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use powernode_modules::digest::Digest;
use powernode_modules::registry::{Registry, RegistryError, Resolved};
use powernode_modules::store::Store;

use crate::lastknown::LastKnown;
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
    /// The image is about to be downloaded into `image_path` of the [`Fetched`] (the store's
    /// partial file): it may be followed there, but is not complete until [`Report::Done`].
    Arriving(Box<Fetched>),
    /// Bytes of the image in the store so far.
    Progress {
        /// Bytes done.
        done: u64,
    },
    /// A transient failure; trying again after `retry_in`.
    Retrying {
        /// What failed.
        error: String,
        /// How many attempts of this fetch have failed so far, this one included.
        attempt: u32,
        /// The delay before the next try.
        retry_in: Duration,
    },
    /// The image is in the store, digest-checked (not yet synced: see `Durable`).
    Done(Box<Fetched>),
    /// The image is synced to disk: it may join the mount stack, which outlives a power cut.
    Durable,
    /// The stored image of a rejected module was read again.
    Rechecked {
        /// What is wrong with the stored copy (it hashes to another digest, or cannot be
        /// read); `None` if it is intact.
        damage: Option<String>,
    },
    /// The fetch failed for good.
    Failed(String),
    /// The fetch went on offline with the last resolution, and the registry, reachable again,
    /// now resolves the reference to another manifest: the module should be fetched again.
    Moved,
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
    /// Whether this is the last resolution kept from before, because the registry could not
    /// be reached.
    pub offline: bool,
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
    /// A damaged stored copy of the image (its digest) to remove first, so that it is
    /// downloaded again rather than found in the store.
    pub discard: Option<String>,
}

/// Runs `job` until it is done, fails for good, or `cancel` fires.
pub async fn run(
    job: Job,
    registry: Registry,
    store: Store,
    lastknown: LastKnown,
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
    if let Some(damaged) = &job.discard {
        if let Err(e) = discard(&store, damaged).await {
            return send(Report::Failed(format!(
                "cannot remove the damaged image: {e}"
            )))
            .await;
        }
    }
    let mut delay = RETRY_MIN;
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt(&job, &registry, &store, &lastknown, &reports, epoch) => r,
        };
        match attempt {
            Ok(fetched) => {
                let digest = fetched.resolved.image.digest.clone();
                let offline = fetched
                    .offline
                    .then(|| fetched.resolved.manifest_digest.clone());
                send(Report::Done(Box::new(fetched))).await;
                // Synced while the verifier reads the image from the page cache: both take
                // about as long, and this way they overlap.
                send(make_durable(&store, &digest).await).await;
                if let Some(kept) = offline {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        moved = refresh(&job, &registry, &lastknown, &kept) => if moved {
                            send(Report::Moved).await;
                        }
                    }
                }
                return;
            }
            Err(e) if e.is_transient() => {
                failures = failures.saturating_add(1);
                tracing::warn!(module = %job.name, error = %e, attempt = failures, retry_in_ms = delay.as_millis() as u64, "fetch failed; retrying");
                send(Report::Retrying {
                    error: e.to_string(),
                    attempt: failures,
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

/// Removes the stored image `digest`.
async fn discard(store: &Store, digest: &str) -> Result<(), String> {
    let store = store.clone();
    let digest = digest.to_owned();
    tokio::task::spawn_blocking(move || {
        let digest = Digest::parse(&digest).map_err(|e| e.to_string())?;
        store.remove(&digest).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// Reads the stored image `digest` again for a module the verifier rejected; the answer comes
/// back as [`Report::Rechecked`] for `name` at `epoch`.
pub async fn recheck(
    store: Store,
    digest: String,
    reports: mpsc::Sender<(String, u64, Report)>,
    name: String,
    epoch: u64,
) {
    let damage = tokio::task::spawn_blocking(move || {
        // Unreadable or gone counts as damaged: downloading it again is the remedy either way.
        let digest = Digest::parse(&digest).map_err(|e| e.to_string())?;
        match store.intact(&digest) {
            Ok(true) => Ok(None),
            Ok(false) => Ok(Some(format!("it no longer hashes to {digest}"))),
            Err(e) => Ok(Some(e.to_string())),
        }
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    // A check that could not run at all leaves the verdict standing.
    let damage = damage.unwrap_or(None);
    let _ = reports
        .send((name, epoch, Report::Rechecked { damage }))
        .await;
}

/// After going on offline: tries the registry again, backing off, until the reference
/// resolves; true if it now names another manifest than `kept`.
async fn refresh(job: &Job, registry: &Registry, lastknown: &LastKnown, kept: &Digest) -> bool {
    let mut delay = RETRY_MIN;
    loop {
        tokio::time::sleep(delay).await;
        match registry
            .resolve_signed(&job.reference, &job.architecture)
            .await
        {
            Ok((resolved, signatures)) => {
                let moved = resolved.manifest_digest != *kept;
                tracing::info!(module = %job.name, moved, "the registry is reachable again");
                if !moved {
                    keep(job, lastknown, &resolved, &signatures).await;
                }
                return moved;
            }
            Err(e) if e.is_transient() => delay = (delay * 2).min(job.max_backoff),
            Err(e) => {
                tracing::warn!(module = %job.name, error = %e, "the registry is reachable again, but the reference no longer resolves; the module stays as it is");
                return false;
            }
        }
    }
}

/// Keeps a resolution whose image is in the store, for an offline start. Only then: a
/// resolution kept before its download finished would replace the last one an offline start
/// could use.
async fn keep(
    job: &Job,
    lastknown: &LastKnown,
    resolved: &Resolved,
    signatures: &[CosignSignature],
) {
    let (lastknown, reference, architecture) = (
        lastknown.clone(),
        job.reference.clone(),
        job.architecture.clone(),
    );
    let (resolved, signatures) = (resolved.clone(), signatures.to_vec());
    let saved = tokio::task::spawn_blocking(move || {
        lastknown.save(&reference, &architecture, &resolved, &signatures)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    if let Err(e) = saved {
        // Only an offline start would miss it.
        tracing::warn!(module = %job.name, error = %e, "cannot keep the resolution");
    }
}

/// Which part of an attempt failed.
enum Failure {
    /// Reading the module config: like resolving, it may fall back to the last resolution.
    Config(RegistryError),
    /// The download or the signatures.
    Other(RegistryError),
}

/// The registry unreachable (`error`) while resolving: the module as last resolved, if its
/// image is in the store; else the error.
fn offline(
    job: &Job,
    store: &Store,
    lastknown: &LastKnown,
    error: RegistryError,
) -> Result<Fetched, RegistryError> {
    let kept = lastknown.load(&job.reference, &job.architecture);
    let in_store = |r: &Resolved| Digest::parse(&r.image.digest).is_ok_and(|d| store.contains(&d));
    match kept {
        Some((resolved, signatures)) if in_store(&resolved) => {
            tracing::warn!(module = %job.name, error = %error, manifest = %resolved.manifest_digest,
                "registry unreachable; going on with the module as last resolved (its image is in the store)");
            Ok(Fetched {
                image_path: store.path(&Digest::parse(&resolved.image.digest)?),
                resolved,
                signatures,
                offline: true,
            })
        }
        _ => Err(error),
    }
}

async fn attempt(
    job: &Job,
    registry: &Registry,
    store: &Store,
    lastknown: &LastKnown,
    reports: &mpsc::Sender<(String, u64, Report)>,
    epoch: u64,
) -> Result<Fetched, RegistryError> {
    // The image's download starts as soon as the platform manifest names it; the module
    // manifest and the signatures are read beside it: nothing needs them before the image is
    // complete, and on a registry next door their round trips were a twentieth of the pull
    // (docs/performance.md, modules).
    let located = match registry.locate(&job.reference, &job.architecture).await {
        Ok(found) => found,
        Err(e) if e.is_transient() => return offline(job, store, lastknown, e),
        Err(e) => return Err(e),
    };
    let image = located.image().clone();
    let repository = located.repository().to_owned();
    let digest = Digest::parse(&image.digest)?;
    let describe = async {
        let resolved = registry
            .describe(located, &job.architecture)
            .await
            .map_err(Failure::Config)?;
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
        if !store.contains(&digest) {
            // Without its signatures yet: the verifier hashes an arriving image, and judges it
            // only with the complete config, which carries them (`Follow::continues`).
            let arriving = Fetched {
                resolved: resolved.clone(),
                image_path: store.partial_path(&digest),
                signatures: Vec::new(),
                offline: false,
            };
            let _ = reports
                .send((
                    job.name.clone(),
                    epoch,
                    Report::Arriving(Box::new(arriving)),
                ))
                .await;
        }
        let (signatures, signed_index) = registry
            .signatures_of(&resolved)
            .await
            .map_err(Failure::Other)?;
        Ok((resolved, signatures, signed_index))
    };
    // Progress counted before the module manifest is read (the module is Resolving until
    // then) is not shown; the next report carries the count.
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
    let download = async {
        registry
            .pull_blob(&repository, &image, store, &mut progress)
            .await
            .map_err(Failure::Other)
    };
    let (image_path, (resolved, signatures, signed_index)) =
        match tokio::try_join!(download, describe) {
            Ok(done) => done,
            // The module config unreadable for now is the registry unreachable, as when
            // resolving: the module may go on as last resolved.
            Err(Failure::Config(e)) if e.is_transient() => {
                return offline(job, store, lastknown, e)
            }
            Err(Failure::Config(e) | Failure::Other(e)) => return Err(e),
        };
    let resolved = Resolved {
        signed_index,
        ..resolved
    };
    keep(job, lastknown, &resolved, &signatures).await;
    Ok(Fetched {
        resolved,
        image_path,
        signatures,
        offline: false,
    })
}
