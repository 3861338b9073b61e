//! What the agents' `Event` topics hand the journal writer.
//!
//! An event travels as the bytes its agent checkpointed and published, and it is journalled
//! as those same bytes: `Event` and the journal's `EventRecord` have the same fields in the
//! same order, so their postcard encodings are one and the same (a test holds them to it).
//! eventd therefore reads each event through a borrowed view, which checks that the bytes are
//! exactly one well-formed event and finds its agent, number and id, without building the
//! event's strings, keeping a decoded copy per pending event, or encoding it again.

use agentbase::Context;
use powernode_pubsub::{checkpoint, RawEvent, RawSubscription};
use powernode_types::{Event, Topic};
use tokio::sync::mpsc;

use crate::record::RecordRef;

/// What the subscriptions hand the journal writer.
pub enum Incoming {
    /// An event of an agent.
    Event(Received),
    /// An agent's snapshot is complete: everything it holds has been handed over.
    Synchronized(&'static str),
    /// An agent's connection ended. Until its next snapshot is complete, what arrives (read
    /// from its checkpoint files while it is down) may come in any order, or miss an event
    /// a directory listing raced past: journalled, never acknowledged, since an
    /// acknowledgement through the highest number would cover the missed one.
    Unsynchronized(&'static str),
}

/// One event as its agent published it.
#[derive(Debug)]
pub struct Received {
    /// The agent whose topic it came on (and that the event names).
    pub agent: &'static str,
    /// Its sequence number.
    pub seq: u64,
    /// Its id.
    pub id: String,
    /// Its postcard encoding: also its journal record.
    pub bytes: Vec<u8>,
}

impl Received {
    /// Reads `bytes` published on `agent`'s topic: refused unless they are exactly one event
    /// that names `agent` (another agent's name would let it acknowledge that agent's events
    /// before they are journalled).
    pub fn read(agent: &'static str, bytes: Vec<u8>) -> Result<Received, String> {
        let (view, rest) = postcard::take_from_bytes::<RecordRef<'_>>(&bytes)
            .map_err(|e| format!("not an event: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{} bytes after the event", rest.len()));
        }
        if view.agent != agent {
            return Err(format!("names agent {:?}", view.agent));
        }
        let (seq, id) = (view.seq, view.id.to_owned());
        Ok(Received {
            agent,
            seq,
            id,
            bytes,
        })
    }
}

/// Hands every event of `agent` to the writer, and its snapshot's end, until `tx` closes.
pub async fn forward(ctx: Context, agent: &'static str, tx: mpsc::Sender<Incoming>) {
    let mut sub = RawSubscription::new(
        &ctx.dirs,
        agent,
        Event::NAME,
        Some(Event::SCHEMA_VERSION),
        Event::PERSISTENT,
    )
    .reading_earlier_versions(checkpoint::upgrade_of::<Event>());
    loop {
        let next = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            next = sub.next() => next,
        };
        let incoming = match next {
            RawEvent::Update { key, value, .. } => match Received::read(agent, value) {
                Ok(received) => Incoming::Event(received),
                Err(e) => {
                    tracing::error!(%agent, %key, error = %e, "refused an item of the Event topic");
                    continue;
                }
            },
            RawEvent::Synchronized => Incoming::Synchronized(agent),
            RawEvent::Disconnected { .. } => Incoming::Unsynchronized(agent),
            RawEvent::Connected { .. } | RawEvent::Delete { .. } | RawEvent::Restarted { .. } => {
                continue
            }
        };
        if tx.send(incoming).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::node_api::EventRecord;
    use powernode_types::Severity;

    fn event() -> Event {
        Event {
            id: "0123abcd".into(),
            agent: "modulemgr".into(),
            seq: 300,
            severity: Severity::Critical,
            kind: "module.rejected".into(),
            message: "signature does not verify".into(),
            at_ms: 1_765_000_000_000,
            fields: vec![("module".into(), "base".into()), ("why".into(), "ü".into())],
            dropped_before: 7,
        }
    }

    /// The journal stores an event's published bytes as its record: the two encodings must
    /// stay the same. A field added to one type and not the other fails here.
    #[test]
    fn an_event_encodes_as_its_journal_record() {
        let e = event();
        let bytes = postcard::to_stdvec(&e).unwrap();
        let record: EventRecord = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(postcard::to_stdvec(&record).unwrap(), bytes);
        assert_eq!(
            (
                record.id,
                record.seq,
                record.dropped_before,
                record.fields.len()
            ),
            (e.id, e.seq, e.dropped_before, 2)
        );
    }

    #[test]
    fn reads_an_event_and_refuses_what_is_not_exactly_one_of_its_agent() {
        let bytes = postcard::to_stdvec(&event()).unwrap();
        let r = Received::read("modulemgr", bytes.clone()).unwrap();
        assert_eq!(
            (r.agent, r.seq, r.id.as_str()),
            ("modulemgr", 300, "0123abcd")
        );
        assert_eq!(r.bytes, bytes);

        let e = Received::read("verifier", bytes.clone()).unwrap_err();
        assert!(e.contains("names agent \"modulemgr\""), "{e}");
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            Received::read("modulemgr", longer).unwrap_err(),
            "1 bytes after the event"
        );
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            let e = Received::read("modulemgr", bytes[..cut].to_vec()).unwrap_err();
            assert!(e.starts_with("not an event"), "{cut}: {e}");
        }
    }
}
