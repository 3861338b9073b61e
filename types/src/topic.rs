//! The [`Topic`] trait: what makes a Rust type a pubsub topic.

use serde::{de::DeserializeOwned, Serialize};

/// A type that one agent publishes as a map of keyed items.
///
/// The encoding of a topic type is a contract between processes and between versions of the
/// agent on disk: whenever the encoded form of a type changes, [`Topic::SCHEMA_VERSION`] must be
/// bumped (the golden-encoding tests in this crate fail until it is).
pub trait Topic: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The topic's name, `CamelCase` ASCII letters and digits, e.g. `NodeIdentity`.
    const NAME: &'static str;
    /// Version of the encoded form; subscribers refuse a publisher whose version differs.
    const SCHEMA_VERSION: u32;
    /// Whether checkpoints live under `persist/` (survive reboot) rather than `run/`.
    const PERSISTENT: bool;
    /// The key of this item in its publication's map.
    fn key(&self) -> String;
}
