//! One item of a publication as a tool shows it: decoded to JSON through the types registry
//! when this build knows the topic, otherwise only its size.

use powernode_pubsub::inspect::SnapshotItem;
use powernode_types::registry;
use serde_json::{json, Map, Value};

/// An item's value, ready to show.
#[derive(Clone, Debug, PartialEq)]
pub enum ItemValue {
    /// Decoded through the types registry.
    Json(Value),
    /// A topic this build does not know: only the size can be shown.
    Unknown {
        /// Encoded size.
        bytes: usize,
    },
    /// A known topic whose bytes do not decode (another schema version, or corrupt).
    Undecodable {
        /// Encoded size.
        bytes: usize,
        /// Why.
        reason: String,
    },
    /// A checkpoint file that failed its checks and is not trusted.
    BadCheckpoint {
        /// Why.
        reason: String,
    },
}

impl ItemValue {
    /// Decodes `bytes`, an item of `topic` encoded with `schema_version` (`None` when unknown,
    /// e.g. for items a subscription read from checkpoint files).
    pub fn decode(topic: &str, schema_version: Option<u32>, bytes: &[u8]) -> ItemValue {
        let Some(info) = registry::lookup(topic) else {
            return ItemValue::Unknown { bytes: bytes.len() };
        };
        if let Some(found) = schema_version.filter(|&v| v != info.schema_version) {
            return ItemValue::Undecodable {
                bytes: bytes.len(),
                reason: format!(
                    "schema version {found}; this build reads version {}",
                    info.schema_version
                ),
            };
        }
        match (info.decode_json)(bytes) {
            Ok(value) => ItemValue::Json(value),
            Err(e) => ItemValue::Undecodable {
                bytes: bytes.len(),
                reason: e.to_string(),
            },
        }
    }

    /// Decodes one item of a [`Snapshot`](powernode_pubsub::inspect::Snapshot).
    pub fn from_snapshot(topic: &str, item: &SnapshotItem) -> ItemValue {
        match item {
            Ok((schema, bytes)) => ItemValue::decode(topic, Some(*schema), bytes),
            Err(e) => ItemValue::BadCheckpoint {
                reason: e.to_string(),
            },
        }
    }

    /// The decoded JSON, if there is one.
    pub fn json(&self) -> Option<&Value> {
        match self {
            ItemValue::Json(value) => Some(value),
            _ => None,
        }
    }

    /// `{"key": .., "value": ..}`, or with `"bytes"` (and `"error"`) in place of `"value"` when
    /// there is nothing to decode.
    pub fn to_json(&self, key: &str) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("key".into(), json!(key));
        match self {
            ItemValue::Json(value) => {
                out.insert("value".into(), value.clone());
            }
            ItemValue::Unknown { bytes } => {
                out.insert("bytes".into(), json!(bytes));
            }
            ItemValue::Undecodable { bytes, reason } => {
                out.insert("bytes".into(), json!(bytes));
                out.insert("error".into(), json!(reason));
            }
            ItemValue::BadCheckpoint { reason } => {
                out.insert(
                    "error".into(),
                    json!(format!("bad checkpoint file: {reason}")),
                );
            }
        }
        out
    }

    /// Readable form: pretty JSON with sorted keys, or a `<...>` note when there is none.
    pub fn to_text(&self) -> String {
        match self {
            ItemValue::Json(value) => {
                serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
            }
            ItemValue::Unknown { bytes } => format!("<{bytes} bytes, unknown topic>"),
            ItemValue::Undecodable { bytes, reason } => {
                format!("<{bytes} bytes, does not decode: {reason}>")
            }
            ItemValue::BadCheckpoint { reason } => format!("<bad checkpoint file: {reason}>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::{EventAck, Topic};

    fn ack_bytes() -> Vec<u8> {
        postcard::to_stdvec(&EventAck {
            agent: "verifier".into(),
            through_seq: 7,
        })
        .unwrap()
    }

    #[test]
    fn decodes_known_topics() {
        let item = ItemValue::decode("EventAck", Some(EventAck::SCHEMA_VERSION), &ack_bytes());
        assert_eq!(
            item,
            ItemValue::Json(json!({"agent": "verifier", "through_seq": 7}))
        );
        assert_eq!(
            Value::Object(item.to_json("verifier")),
            json!({"key": "verifier", "value": {"agent": "verifier", "through_seq": 7}})
        );
        // Keys come out sorted, one per line.
        assert_eq!(
            item.to_text(),
            "{\n  \"agent\": \"verifier\",\n  \"through_seq\": 7\n}"
        );
    }

    #[test]
    fn unknown_topics_show_their_size() {
        let item = ItemValue::decode("NoSuchTopic", Some(1), &[1, 2, 3]);
        assert_eq!(item, ItemValue::Unknown { bytes: 3 });
        assert_eq!(item.to_text(), "<3 bytes, unknown topic>");
        assert_eq!(
            Value::Object(item.to_json("k")),
            json!({"key": "k", "bytes": 3})
        );
    }

    #[test]
    fn wrong_schema_or_garbage_is_not_decoded() {
        let wrong = ItemValue::decode("EventAck", Some(99), &ack_bytes());
        assert!(
            matches!(&wrong, ItemValue::Undecodable { reason, .. } if reason.contains("schema version 99")),
            "{wrong:?}"
        );
        let garbage = ItemValue::decode("EventAck", None, &[0xff]);
        assert!(matches!(garbage, ItemValue::Undecodable { bytes: 1, .. }));
        assert!(garbage.json().is_none());
        assert!(garbage.to_text().starts_with("<1 bytes, does not decode"));
    }

    #[test]
    fn keys_are_sorted_in_text() {
        // serde_json's map keeps keys sorted unless its `preserve_order` feature is on; this
        // notices if a dependency ever turns it on.
        let item = ItemValue::Json(json!({"zeta": 1, "alpha": {"y": 2, "b": 3}}));
        let text = item.to_text();
        let order: Vec<usize> = ["alpha", "\"b\"", "\"y\"", "zeta"]
            .iter()
            .map(|k| text.find(k).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }
}
