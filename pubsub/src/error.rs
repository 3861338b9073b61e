//! The errors of the pubsub library; each carries the key, path or peer that failed.

use std::path::PathBuf;

/// Everything that can go wrong while publishing, subscribing or reading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key that cannot be used as a checkpoint file name.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// An item whose encoding does not fit in one frame; see `docs/pubsub.md` ("Size").
    #[error("item {key:?} of topic {topic} is {size} bytes encoded; the limit is {limit} bytes")]
    ItemTooLarge {
        /// The topic's name.
        topic: &'static str,
        /// The item's key.
        key: String,
        /// Its encoded size.
        size: usize,
        /// The largest encoded item a frame carries.
        limit: usize,
    },
    /// A value that serde could not encode or decode.
    #[error("{what} for topic {topic}: {source}")]
    Codec {
        /// The topic's name.
        topic: String,
        /// What was being encoded or decoded.
        what: &'static str,
        /// The codec's error.
        source: postcard::Error,
    },
    /// A file-system or socket operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Another live process already publishes this topic.
    #[error("{} is already published by another process (lock {} is held)", socket.display(), lock.display())]
    AlreadyPublished {
        /// The publication's socket.
        socket: PathBuf,
        /// The lock file that is held.
        lock: PathBuf,
    },
    /// A unix socket path longer than `sun_path` holds.
    #[error("socket path {} is {len} bytes; unix sockets allow at most 107: use a shorter --root", path.display())]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// A name that cannot be an agent or topic directory.
    #[error("invalid {what} name {name:?}: use ASCII letters, digits, '-' and '_'")]
    InvalidName {
        /// "agent" or "topic".
        what: &'static str,
        /// The name as given.
        name: String,
    },
    /// The peer spoke a protocol we do not, or sent something that is not a valid frame.
    #[error("protocol error with {peer}: {reason}")]
    Protocol {
        /// The socket path of the publication.
        peer: String,
        /// What was wrong.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
