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

    /// An item encoded by an earlier schema version of this type (`schema_version` below
    /// [`Topic::SCHEMA_VERSION`]), brought to this version; `None` when that version cannot be
    /// read. Checkpoints written before an upgrade of the agents are read through this instead
    /// of being quarantined: a persistent topic keeps what it held across the upgrade. The
    /// default reads no earlier version.
    fn upgrade(schema_version: u32, payload: &[u8]) -> Option<Self> {
        let _ = (schema_version, payload);
        None
    }
}

/// Decodes `payload` as the whole of one `Old` (trailing bytes mean it is not one) and brings
/// it to `T`: the body of a [`Topic::upgrade`] for one earlier version.
pub(crate) fn upgrade_from<Old: serde::de::DeserializeOwned, T: From<Old>>(
    payload: &[u8],
) -> Option<T> {
    match postcard::take_from_bytes::<Old>(payload) {
        Ok((old, [])) => Some(T::from(old)),
        _ => None,
    }
}
