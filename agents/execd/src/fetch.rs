//! Getting a script named by digest from the controller (`GET /node_api/v1/scripts/{digest}`,
//! over the node's mTLS identity) and checking that what came is what was named.
//!
//! The digest is the node's own check: the controller is trusted to deliver, not to be honest
//! about content, so text whose SHA-256 is not the digest the task named is refused, however
//! it came to differ (a corrupted database, a tampered row, a controller that is not what it
//! should be). A fetch that fails for want of the controller (no URL or credentials yet, no
//! connection, a timeout, 5xx, 408, 429) is tried again with backoff until the task's time is
//! up; one the controller refuses (another 4xx: no such script for this node) fails at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use powernode_modules::digest::Digest;
use powernode_transport::pki::PkiPaths;
use powernode_transport::{Backoff, ControllerClient, TlsIdentity};
use powernode_types::node_api::ScriptResponse;
use tokio::sync::watch;
use tokio::time::Instant;

/// The first wait after a failed attempt; it doubles up to `[controller] max_backoff_s`.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The least time worth starting another attempt with.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

/// Why a script could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The controller answered that it will not give it (no such script for this node).
    #[error("the controller refused script {digest}: {reason}")]
    Refused {
        /// The digest asked for.
        digest: Digest,
        /// Its answer.
        reason: String,
    },
    /// The controller could not be reached, or did not answer, before the task's time was up.
    #[error(
        "could not fetch script {digest} from the controller within the task's {} s \
         ({attempts} attempt(s)); last error: {last}",
        timeout.as_secs()
    )]
    GaveUp {
        /// The digest asked for.
        digest: Digest,
        /// The task's timeout.
        timeout: Duration,
        /// Attempts made.
        attempts: u32,
        /// What the last one met.
        last: String,
    },
    /// What came is not the script named: its digest differs.
    #[error(
        "refused: the script the controller sent for {asked} has digest {got} (a corrupted \
         or tampered copy on the controller); it was not run"
    )]
    Mismatch {
        /// The digest the task named.
        asked: Digest,
        /// The digest of what the controller sent.
        got: Digest,
    },
}

/// `text`, if its digest is `asked`.
pub fn verify(asked: &Digest, text: String) -> Result<String, FetchError> {
    let got = Digest::of(text.as_bytes());
    if got == *asked {
        Ok(text)
    } else {
        Err(FetchError::Mismatch {
            asked: asked.clone(),
            got,
        })
    }
}

/// What a fetch needs to reach the controller; cheap to clone, one per task.
#[derive(Clone, Debug)]
pub struct Fetcher {
    /// Where enrollmgr keeps the node's credentials (read at each attempt, so a rotated
    /// certificate is used as soon as it is installed).
    pub pki: PkiPaths,
    /// The controller's URLs: `[controller] url`, else the ones enrollmgr publishes; empty
    /// until known.
    pub urls: watch::Receiver<Vec<String>>,
    /// Limit on one request (`[controller] request_timeout_ms`).
    pub request_timeout: Duration,
    /// Longest wait between attempts (`[controller] max_backoff_s`).
    pub max_backoff: Duration,
    /// The client of the last attempt, shared by every clone, so that each fetch starts at
    /// the controller URL that answered last rather than at the first of the list.
    pub client: CachedClient,
}

/// A client and what it was built for: the URLs and the identity read from the PKI files.
pub type CachedClient = Arc<Mutex<Option<(Vec<String>, TlsIdentity, Arc<ControllerClient>)>>>;

/// How one attempt failed.
enum Attempt {
    /// For want of the controller: worth trying again.
    Retry(String),
    /// Refused: trying again gives the same answer.
    Refused(String),
}

impl Fetcher {
    /// The text of the script `digest` names, checked against it; attempts go on until
    /// `deadline` (the task's `timeout` from its start).
    pub async fn fetch(
        &self,
        digest: &Digest,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<String, FetchError> {
        let mut backoff = Backoff::new(FIRST_RETRY, self.max_backoff);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let last = match self.attempt(digest, self.request_timeout.min(left)).await {
                Ok(reply) => return verify(digest, reply.script),
                Err(Attempt::Refused(reason)) => {
                    return Err(FetchError::Refused {
                        digest: digest.clone(),
                        reason,
                    })
                }
                Err(Attempt::Retry(reason)) => reason,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            // An attempt needs some time of its own: one squeezed into the last milliseconds
            // could only time out, and hide what the one before met.
            if left < MIN_ATTEMPT {
                return Err(FetchError::GaveUp {
                    digest: digest.clone(),
                    timeout,
                    attempts,
                    last,
                });
            }
            let wait = backoff.next_delay().min(left - MIN_ATTEMPT);
            tracing::warn!(%digest, attempt = attempts, error = %last,
                retry_in_ms = wait.as_millis() as u64, "fetching a script failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(&self, digest: &Digest, timeout: Duration) -> Result<ScriptResponse, Attempt> {
        let urls = self.urls.borrow().clone();
        if urls.is_empty() {
            return Err(Attempt::Retry(
                "no controller URL yet (not enrolled?)".to_owned(),
            ));
        }
        // Missing credentials are the node enrolling or re-enrolling: the controller's to
        // give, so worth waiting for like the controller itself.
        let identity = self.pki.load().map_err(|e| Attempt::Retry(e.to_string()))?;
        let client = self
            .client_for(urls, identity)
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        client
            .get::<ScriptResponse>(&format!("scripts/{digest}"), timeout)
            .await
            .map_err(|e| {
                if e.is_retryable() {
                    Attempt::Retry(e.to_string())
                } else {
                    Attempt::Refused(e.to_string())
                }
            })
    }
}

impl Fetcher {
    /// The shared client when it was built for `urls` and `identity`, else a new one (which
    /// is shared from then on).
    fn client_for(
        &self,
        urls: Vec<String>,
        identity: TlsIdentity,
    ) -> Result<Arc<ControllerClient>, powernode_transport::TransportError> {
        let mut cached = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((u, i, client)) = cached.as_ref() {
            if *u == urls && *i == identity {
                return Ok(client.clone());
            }
        }
        let client = Arc::new(ControllerClient::new(
            &urls,
            &identity,
            self.request_timeout,
        )?);
        *cached = Some((urls, identity, client.clone()));
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_text_of_the_named_digest_passes() {
        let text = "echo hello\n".to_owned();
        let digest = Digest::of(text.as_bytes());
        assert_eq!(verify(&digest, text.clone()).unwrap(), text);
        let err = verify(&digest, "echo evil\n".to_owned()).unwrap_err();
        assert_eq!(
            err,
            FetchError::Mismatch {
                asked: digest.clone(),
                got: Digest::of(b"echo evil\n"),
            }
        );
        let shown = err.to_string();
        assert!(
            shown.contains(&digest.to_string())
                && shown.contains(&Digest::of(b"echo evil\n").to_string()),
            "{shown}"
        );
    }

    /// With no controller known, attempts go on with backoff until the deadline, then give
    /// up saying how many there were and what the last met.
    #[tokio::test]
    async fn without_a_controller_it_retries_until_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (_urls_tx, urls) = watch::channel(Vec::new());
        let fetcher = Fetcher {
            pki: PkiPaths::under(dir.path()),
            urls,
            request_timeout: Duration::from_secs(1),
            max_backoff: Duration::from_millis(300),
            client: CachedClient::default(),
        };
        let digest = Digest::of(b"x");
        let started = Instant::now();
        let timeout = Duration::from_millis(1500);
        let err = fetcher
            .fetch(&digest, started + timeout, timeout)
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= timeout - MIN_ATTEMPT && took < timeout + Duration::from_millis(500),
            "{took:?}"
        );
        match err {
            FetchError::GaveUp { attempts, last, .. } => {
                assert!(attempts >= 3, "{attempts} attempts");
                assert!(last.contains("no controller URL"), "{last}");
            }
            other => panic!("{other:?}"),
        }
    }
}
