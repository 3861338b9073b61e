//! An event read in place: the bytes an agent published, a journal record (the same bytes,
//! see [`crate::incoming`]) and one element of the `POST /events` body are one record in three
//! forms. Reading and writing them through borrowed strings checks and converts a record
//! without building its strings, once per event on the busiest path eventd has.

use powernode_types::node_api::EventRecord;
use powernode_types::Severity;
use serde::{Deserialize, Serialize};

/// A journal record (or an `Event`) read in place: field for field `EventRecord`, so it
/// decodes from the same postcard and encodes to the same JSON.
#[derive(Debug, Deserialize, Serialize)]
pub struct RecordRef<'a> {
    /// Globally unique id.
    pub id: &'a str,
    /// The agent that raised it.
    pub agent: &'a str,
    /// The agent's sequence number of it.
    pub seq: u64,
    /// How bad it is.
    pub severity: Severity,
    /// Machine-readable kind.
    pub kind: &'a str,
    /// Human-readable message.
    pub message: &'a str,
    /// When it was raised, milliseconds since the epoch.
    pub at_ms: u64,
    /// Structured context as key/value pairs, in order.
    #[serde(borrow)]
    pub fields: Vec<(&'a str, &'a str)>,
    /// Events of the same agent dropped since the one before this.
    pub dropped_before: u64,
}

impl RecordRef<'_> {
    /// The record with strings of its own.
    pub fn to_record(&self) -> EventRecord {
        EventRecord {
            id: self.id.to_owned(),
            agent: self.agent.to_owned(),
            seq: self.seq,
            severity: self.severity,
            kind: self.kind.to_owned(),
            message: self.message.to_owned(),
            at_ms: self.at_ms,
            fields: self
                .fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            dropped_before: self.dropped_before,
        }
    }
}

/// `POST /events` with borrowed records: the same JSON as `EventsRequest`.
#[derive(Debug, Serialize)]
pub struct EventsRequestRef<'a> {
    /// The events.
    pub events: Vec<RecordRef<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::node_api::EventsRequest;

    fn record(fields: Vec<(String, String)>) -> EventRecord {
        EventRecord {
            id: "9f".into(),
            agent: "verifier".into(),
            seq: u64::MAX,
            severity: Severity::Warning,
            kind: "module.rejected".into(),
            message: "a \"quoted\"\nline ü".into(),
            at_ms: 1,
            fields,
            dropped_before: 3,
        }
    }

    /// The controller reads what eventd sends as `EventsRequest`: the borrowed form must
    /// write exactly its JSON, and read exactly its postcard.
    #[test]
    fn reads_and_writes_as_the_owned_record() {
        let owned = vec![
            record(vec![]),
            record(vec![("k".into(), "v".into()), ("".into(), "\u{0}".into())]),
        ];
        let bytes: Vec<Vec<u8>> = owned
            .iter()
            .map(|r| postcard::to_stdvec(r).unwrap())
            .collect();
        let borrowed: Vec<RecordRef<'_>> = bytes
            .iter()
            .map(|b| postcard::from_bytes(b).unwrap())
            .collect();
        for (b, o) in borrowed.iter().zip(&owned) {
            assert_eq!(&b.to_record(), o);
        }
        assert_eq!(
            serde_json::to_string(&EventsRequestRef { events: borrowed }).unwrap(),
            serde_json::to_string(&EventsRequest { events: owned }).unwrap()
        );
    }
}
