//! Targets for what pubsub peers write: frames on the socket, checkpoint files on disk, and the
//! topic items inside both.

use powernode_pubsub::checkpoint::{self, CheckpointError};
use powernode_pubsub::frame::{update_header, Frame};
use powernode_types::{registry, Topic};

/// A message from a peer's socket: one frame ([`Frame::decode`]) and a burst of frames
/// ([`Frame::decode_all`]).
///
/// Properties: a frame that decodes re-encodes to a frame that decodes to itself, in no more
/// bytes (postcard accepts over-long varints, so the bytes themselves may differ); an `Update`'s
/// vectored header plus its value is its encoding; the frames of a burst re-encode to a burst
/// that decodes to the same frames.
pub fn frame(data: &[u8]) {
    if let Ok(frame) = Frame::decode(data) {
        let bytes = frame.encode();
        assert_eq!(Frame::decode(&bytes), Ok(frame.clone()), "re-decoded frame");
        assert!(bytes.len() <= data.len(), "re-encoding grew");
        if let Frame::Update { key, value } = frame {
            let mut vectored = Vec::new();
            update_header(key, value.len(), &mut vectored);
            vectored.extend_from_slice(value);
            assert_eq!(vectored, bytes, "update_header disagrees with postcard");
        }
    }
    let frames: Vec<Frame<'_>> = Frame::decode_all(data).map_while(Result::ok).collect();
    let mut message = Vec::new();
    for frame in &frames {
        frame.encode_into(&mut message);
    }
    let again: Vec<Frame<'_>> = Frame::decode_all(&message)
        .collect::<Result<_, _>>()
        .expect("re-encoded frames decode");
    assert_eq!(again, frames, "re-decoded burst");
}

/// A checkpoint file ([`checkpoint::decode`]), as read, and again with its CRC field made right
/// for its content, so that mutations reach the checks behind the checksum. A topic the types
/// registry knows has its payload decoded as that topic's item, as ipcmonitor does.
///
/// Properties: a decoded checkpoint re-encodes to exactly the bytes read, and `decode_for` its
/// own topic and version agrees; a file whose CRC was made right never fails on its CRC.
pub fn checkpoint(data: &[u8]) {
    let _ = check_checkpoint(data);
    if let Some(fixed) = with_crc_fixed(data) {
        let result = check_checkpoint(&fixed);
        assert!(
            !matches!(result, Err(CheckpointError::Crc { .. })),
            "a right CRC was refused: {result:?}"
        );
    }
}

fn check_checkpoint(data: &[u8]) -> Result<(), CheckpointError> {
    let cp = checkpoint::decode(data)?;
    assert_eq!(
        checkpoint::encode(cp.topic, cp.schema_version, cp.payload),
        data,
        "a decoded checkpoint re-encodes differently"
    );
    assert_eq!(
        checkpoint::decode_for(data, cp.topic, cp.schema_version),
        Ok(cp.payload)
    );
    if let Some(info) = registry::lookup(cp.topic) {
        let _ = (info.decode_json)(cp.payload);
    }
    Ok(())
}

/// `data` with the CRC32 at its declared place recomputed the way the file layout (see
/// `pubsub/src/checkpoint.rs`) defines it, written here independently of the decoder; `None` when
/// `data` is too short to have a CRC field.
fn with_crc_fixed(data: &[u8]) -> Option<Vec<u8>> {
    let topic_len = usize::from(u16::from_le_bytes(data.get(6..8)?.try_into().ok()?));
    let covered = 8 + topic_len + 4 + 4;
    let payload_len = u32::from_le_bytes(data.get(covered - 4..covered)?.try_into().ok()?);
    data.get(covered..covered + 4)?;
    let payload_end = (covered + 4).saturating_add(payload_len as usize);
    let payload = data.get(covered + 4..payload_end.min(data.len()))?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&data[..covered]);
    crc.update(payload);
    let mut fixed = data.to_vec();
    fixed[covered..covered + 4].copy_from_slice(&crc.finalize().to_le_bytes());
    Some(fixed)
}

/// One check per topic type, with the type's name so a test can hold the list to the registry's.
type TopicCheck = (&'static str, fn(&[u8]));

/// Every topic type of the registry, typed. `tests` checks it lists what the registry lists.
const TOPICS: &[TopicCheck] = &[
    topic::<powernode_types::AgentStatus>(),
    topic::<powernode_types::NodeIdentity>(),
    topic::<powernode_types::EnrollmentStatus>(),
    topic::<powernode_types::ControllerStatus>(),
    topic::<powernode_types::ModuleConfig>(),
    topic::<powernode_types::ModuleStatus>(),
    topic::<powernode_types::VerifyConfig>(),
    topic::<powernode_types::VerifyStatus>(),
    topic::<powernode_types::MountConfig>(),
    topic::<powernode_types::MountStatus>(),
    topic::<powernode_types::NetworkConfig>(),
    topic::<powernode_types::NetworkStatus>(),
    topic::<powernode_types::TaskConfig>(),
    topic::<powernode_types::TaskStatus>(),
    topic::<powernode_types::Event>(),
    topic::<powernode_types::EventAck>(),
    topic::<powernode_types::EventdStatus>(),
];

const fn topic<T: Topic>() -> TopicCheck {
    (T::NAME, check_topic::<T>)
}

/// The names of the topic types [`topic_item`] picks from, in the order of its first byte.
pub fn topic_names() -> Vec<&'static str> {
    TOPICS.iter().map(|(name, _)| *name).collect()
}

/// A topic item decoded by name through the types registry (`decode_json`, what ipcmonitor and
/// the status CLI do with any publication). The first byte picks the topic (see
/// [`topic_names`]), the rest is the item.
///
/// Properties: the registry accepts exactly what the typed decoder accepts; an accepted item
/// re-encodes, in no more bytes, to an item the registry shows as the same JSON.
pub fn topic_item(data: &[u8]) {
    let Some((&pick, item)) = data.split_first() else {
        return;
    };
    let (_, check) = TOPICS[usize::from(pick) % TOPICS.len()];
    check(item);
}

fn check_topic<T: Topic>(bytes: &[u8]) {
    let info = registry::lookup(T::NAME).expect("every topic is in the registry");
    let json = (info.decode_json)(bytes);
    let typed = postcard::take_from_bytes::<T>(bytes)
        .ok()
        .filter(|(_, rest)| rest.is_empty());
    assert_eq!(json.is_ok(), typed.is_some(), "registry and type disagree");
    if let (Ok(json), Some((item, _))) = (json, typed) {
        let again = postcard::to_stdvec(&item).expect("a decoded item encodes");
        assert!(again.len() <= bytes.len(), "re-encoding grew");
        assert_eq!(
            (info.decode_json)(&again).expect("re-encoded item decodes"),
            json
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_the_registrys() {
        let registry: Vec<&str> = registry::all().iter().map(|i| i.name).collect();
        assert_eq!(topic_names(), registry, "add the new topic type to TOPICS");
    }

    #[test]
    fn crc_fix_makes_a_flipped_crc_right() {
        // The CRC field of topic "T" starts after 4 + 2 + 2 + 1 + 4 + 4 = 17 bytes.
        let mut flipped = checkpoint::encode("T", 1, b"payload");
        flipped[17] ^= 0x01;
        assert!(checkpoint::decode(&flipped).is_err());
        let fixed = with_crc_fixed(&flipped).unwrap();
        assert_eq!(fixed, checkpoint::encode("T", 1, b"payload"));
        assert!(with_crc_fixed(b"PNCK").is_none());
    }
}
