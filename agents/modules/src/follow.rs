//! Hashing an image while it is still arriving.
//!
//! modulemgr publishes a module's `VerifyConfig` when the download starts (`complete: false`,
//! `image_path` the file being written) and again once the store has taken the image in
//! (`complete: true`, the blob's path). A check started on the first follows the file as it
//! grows, feeding the fs-verity tree the blocks that have landed ([`GrowingFile`]), and gives
//! its verdict only after [`Follow::complete`] hands it the second: the verdict is always about
//! the complete file whose SHA-256 the store confirmed.
//!
//! ```text
//!   Arriving ──complete(config)──► Complete(config)      the check finishes and answers config
//!      └────────cancel()─────────► Cancelled             the check stops, answers nothing
//! ```
//!
//! What makes a followed digest safe to use: it is computed over the bytes as read, which
//! equal the complete file's unless the download started over (truncated and wrote the file
//! again) while it was followed. Bytes read that way give the annotated digest only if they
//! are the authentic image (the digest is a SHA-256 Merkle root), which is also the only
//! content the store accepts under the layer digest; anything else gives another digest, and
//! the check then reads the complete file again before it rejects ([`crate::check`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::fsverity::{self, GrowingFile};
use powernode_types::VerifyConfig;

/// How long a follower sleeps when it has hashed every byte that has landed; a completion or
/// cancellation wakes it at once.
const POLL: Duration = Duration::from_millis(2);
/// The most a check hashes before it looks whether it is cancelled or complete.
const SLICE: u64 = 64 << 20;

/// Where a check stands with the download it follows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// The image is still arriving.
    Arriving,
    /// The store has the complete image: the config to answer.
    Complete(Box<VerifyConfig>),
    /// The config was withdrawn or changed into another download: stop.
    Cancelled,
}

/// Shared between the verifier's main loop and one running check.
#[derive(Debug)]
pub struct Follow {
    state: Mutex<State>,
    changed: Condvar,
    /// Bytes of the arriving image hashed so far.
    hashed: AtomicU64,
}

impl Follow {
    /// The handle for a check of `config`: already complete if `config` is.
    pub fn new(config: &VerifyConfig) -> Follow {
        let state = if config.complete {
            State::Complete(Box::new(config.clone()))
        } else {
            State::Arriving
        };
        Follow {
            state: Mutex::new(state),
            changed: Condvar::new(),
            hashed: AtomicU64::new(0),
        }
    }

    /// Whether `next` completes the download a check of `started` follows: everything but the
    /// path, the completion and the signatures is the same, and `next` is complete. The
    /// signatures come with the complete config (modulemgr fetches them beside the image),
    /// and the verdict is reached with `next`'s; anything else that changed is another check
    /// (a changed config is checked from the start).
    pub fn continues(started: &VerifyConfig, next: &VerifyConfig) -> bool {
        !started.complete
            && next.complete
            && VerifyConfig {
                image_path: next.image_path.clone(),
                complete: true,
                signatures: next.signatures.clone(),
                signed_index: next.signed_index.clone(),
                ..started.clone()
            } == *next
    }

    /// The store has the complete image: the check finishes and answers `config`.
    pub fn complete(&self, config: VerifyConfig) {
        let mut state = self.lock();
        if *state == State::Arriving {
            *state = State::Complete(Box::new(config));
            self.changed.notify_all();
        }
    }

    /// The check is no longer wanted: it stops as soon as it looks.
    pub fn cancel(&self) {
        *self.lock() = State::Cancelled;
        self.changed.notify_all();
    }

    /// Bytes of the image hashed while it arrived, so far.
    pub fn hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Whether [`Follow::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        *self.lock() == State::Cancelled
    }

    /// Waits until the image is complete (the config to answer) or the check is cancelled
    /// (`None`).
    pub fn until_settled(&self) -> Option<VerifyConfig> {
        loop {
            match self.wait(Duration::from_secs(60)) {
                State::Arriving => {}
                State::Complete(config) => return Some(*config),
                State::Cancelled => return None,
            }
        }
    }

    /// The state, after waiting up to `timeout` while it is Arriving.
    fn wait(&self, timeout: Duration) -> State {
        let state = self.lock();
        if *state != State::Arriving {
            return state.clone();
        }
        let (state, _) = self
            .changed
            .wait_timeout(state, timeout)
            .unwrap_or_else(|e| e.into_inner());
        state.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a plain value: a panic elsewhere cannot leave it half written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What following an image came to.
#[derive(Debug)]
pub struct Followed {
    /// The complete config the digest is for.
    pub config: VerifyConfig,
    /// The fs-verity digest of the bytes read.
    pub digest: fsverity::Digest,
    /// Whether the bytes were read while the image arrived (and may be from a download that
    /// started over), rather than from the complete file.
    pub followed: bool,
    /// Bytes hashed before the store said the image was complete.
    pub hashed_early: u64,
    /// When the check learnt that the image is complete: what it does from then on is what
    /// verifying adds to the download.
    pub completed: Instant,
}

/// Why an image could not be hashed.
#[derive(Debug, thiserror::Error)]
#[error("cannot read image {path}: {source}")]
pub struct ReadError {
    /// The file.
    pub path: String,
    /// The error.
    pub source: io::Error,
}

/// The fs-verity digest of the image `started` names: followed while it arrives, finished
/// once the store has it complete. `None` if the check was cancelled meanwhile.
pub fn image_digest(
    started: &VerifyConfig,
    follow: &Follow,
) -> Result<Option<Followed>, ReadError> {
    let size = started.size;
    // Wait for the file the download writes into (it is created when the download starts),
    // unless the image is complete already.
    let mut growing = loop {
        match follow.wait(Duration::ZERO) {
            State::Cancelled => return Ok(None),
            State::Complete(config) => return whole(*config, follow),
            State::Arriving => {}
        }
        match File::open(&started.image_path) {
            Ok(file) => break GrowingFile::new(file, size),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                follow.wait(POLL);
            }
            Err(source) => {
                return Err(ReadError {
                    path: started.image_path.clone(),
                    source,
                })
            }
        }
    };
    let read_error = |source| ReadError {
        path: started.image_path.clone(),
        source,
    };
    let config = loop {
        // In slices, so that a completion or cancellation is noticed within one.
        let new = growing.catch_up_at_most(SLICE).map_err(read_error)?;
        follow.hashed.store(growing.hashed(), Ordering::Relaxed);
        match follow.wait(if new == 0 || growing.is_whole() {
            POLL
        } else {
            Duration::ZERO
        }) {
            State::Arriving => {}
            State::Cancelled => return Ok(None),
            State::Complete(config) => break *config,
        }
    };
    let completed = Instant::now();
    let hashed_early = growing.hashed();
    // The blob the store completed must be the file followed (renamed into place); another
    // file (the download was thrown away and made anew) is read whole.
    let final_path = Path::new(&config.image_path);
    // Its length must be the one announced, or the digest of the announced bytes would not
    // be the file's: then the file is read whole, to its end, and its digest is what counts.
    let same_file = match (growing.file().metadata(), std::fs::metadata(final_path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino() && a.len() == config.size,
        _ => false,
    };
    if !same_file {
        return whole(config, follow);
    }
    growing.catch_up().map_err(|source| ReadError {
        path: config.image_path.clone(),
        source,
    })?;
    Ok(Some(Followed {
        digest: growing.finish(),
        config,
        followed: true,
        hashed_early,
        completed,
    }))
}

/// The fs-verity digest of the complete image `config` names, read from its start to its end
/// (whatever its length: a file longer or shorter than announced gives another digest).
/// `None` if cancelled meanwhile.
pub fn whole(config: VerifyConfig, follow: &Follow) -> Result<Option<Followed>, ReadError> {
    let completed = Instant::now();
    let error = |source| ReadError {
        path: config.image_path.clone(),
        source,
    };
    let file = File::open(&config.image_path).map_err(error)?;
    if !file.metadata().map_err(error)?.is_file() {
        return Err(error(io::Error::other("not a regular file")));
    }
    let mut growing = GrowingFile::new(file, u64::MAX);
    // In slices, so that a cancellation is noticed within one.
    while growing.catch_up_at_most(SLICE).map_err(error)? > 0 {
        if follow.is_cancelled() {
            return Ok(None);
        }
    }
    Ok(Some(Followed {
        digest: growing.finish(),
        config,
        followed: false,
        hashed_early: 0,
        completed,
    }))
}
