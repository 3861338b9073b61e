//! Every topic type, by name, for tools that do not know a topic's Rust type at compile time.
//!
//! ipcmonitor and the status CLI connect to a publication by name and need to show its items;
//! [`lookup`] gives them the topic's version, persistence and a decoder to JSON.

use crate::{
    AgentStatus, ControllerStatus, EnrollmentStatus, Event, EventAck, EventdStatus, ModuleConfig,
    ModuleStatus, MountConfig, MountStatus, NetworkConfig, NetworkStatus, NodeIdentity, TaskConfig,
    TaskStatus, Topic, VerifyConfig, VerifyStatus,
};

/// What is known about a topic without its Rust type.
#[derive(Clone, Copy, Debug)]
pub struct TopicInfo {
    /// [`Topic::NAME`].
    pub name: &'static str,
    /// [`Topic::SCHEMA_VERSION`].
    pub schema_version: u32,
    /// [`Topic::PERSISTENT`].
    pub persistent: bool,
    /// Decodes one encoded item (as found in an `Update` frame or a checkpoint body) to JSON.
    pub decode_json: fn(&[u8]) -> Result<serde_json::Value, postcard::Error>,
}

/// The [`TopicInfo`] of `T`.
pub const fn info_of<T: Topic>() -> TopicInfo {
    TopicInfo {
        name: T::NAME,
        schema_version: T::SCHEMA_VERSION,
        persistent: T::PERSISTENT,
        decode_json: decode_json::<T>,
    }
}

/// Decodes one item of `T` to JSON.
///
/// Trailing bytes are an error, not ignored: they mean the bytes were written for another type
/// or another schema version, and showing a half-decoded item would mislead.
fn decode_json<T: Topic>(bytes: &[u8]) -> Result<serde_json::Value, postcard::Error> {
    let (item, rest) = postcard::take_from_bytes::<T>(bytes)?;
    if !rest.is_empty() {
        return Err(postcard::Error::DeserializeBadEncoding);
    }
    // Cannot fail for topic types: they contain no maps with non-string keys and no floats.
    serde_json::to_value(&item).map_err(|_| postcard::Error::SerdeSerCustom)
}

static ALL: &[TopicInfo] = &[
    info_of::<AgentStatus>(),
    info_of::<NodeIdentity>(),
    info_of::<EnrollmentStatus>(),
    info_of::<ControllerStatus>(),
    info_of::<ModuleConfig>(),
    info_of::<ModuleStatus>(),
    info_of::<VerifyConfig>(),
    info_of::<VerifyStatus>(),
    info_of::<MountConfig>(),
    info_of::<MountStatus>(),
    info_of::<NetworkConfig>(),
    info_of::<NetworkStatus>(),
    info_of::<TaskConfig>(),
    info_of::<TaskStatus>(),
    info_of::<Event>(),
    info_of::<EventAck>(),
    info_of::<EventdStatus>(),
];

/// Every topic type of the system, in data-flow order.
pub fn all() -> &'static [TopicInfo] {
    ALL
}

/// The topic called `name`, if there is one.
pub fn lookup(name: &str) -> Option<&'static TopicInfo> {
    ALL.iter().find(|info| info.name == name)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_unique() {
        let mut seen = HashSet::new();
        for info in all() {
            assert!(seen.insert(info.name), "topic {} listed twice", info.name);
        }
    }

    #[test]
    fn names_are_camel_case_alphanumeric() {
        // Names become file and socket names (`<Topic>.sock`), so they must be plain.
        for info in all() {
            let mut chars = info.name.chars();
            let first = chars.next().expect("empty topic name");
            assert!(
                first.is_ascii_uppercase(),
                "{} must start with an uppercase letter",
                info.name
            );
            assert!(
                chars.all(|c| c.is_ascii_alphanumeric()),
                "{} must be ASCII alphanumeric",
                info.name
            );
        }
    }

    #[test]
    fn lookup_finds_every_topic_and_nothing_else() {
        for info in all() {
            let found = lookup(info.name).expect("listed topic not found");
            assert_eq!(found.name, info.name);
            assert_eq!(found.schema_version, info.schema_version);
            assert_eq!(found.persistent, info.persistent);
        }
        assert_eq!(
            lookup("ModuleStatus").map(|i| i.schema_version),
            Some(ModuleStatus::SCHEMA_VERSION)
        );
        assert!(lookup("EnrollmentStatus").is_some_and(|i| i.persistent));
        assert!(lookup("NoSuchTopic").is_none());
        assert!(lookup("modulestatus").is_none(), "lookup is case-sensitive");
    }

    #[test]
    fn decode_json_decodes_and_rejects_garbage() {
        let ack = EventAck {
            agent: "verifier".into(),
            through_seq: 42,
        };
        let bytes = postcard::to_stdvec(&ack).unwrap();
        let info = lookup("EventAck").unwrap();
        assert_eq!(
            (info.decode_json)(&bytes).unwrap(),
            serde_json::json!({"agent": "verifier", "through_seq": 42})
        );

        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(
            (info.decode_json)(&trailing).is_err(),
            "trailing bytes accepted"
        );
        assert!(
            (info.decode_json)(&bytes[..bytes.len() - 1]).is_err(),
            "truncated item accepted"
        );
        assert!((info.decode_json)(&[]).is_err(), "empty item accepted");
    }
}
