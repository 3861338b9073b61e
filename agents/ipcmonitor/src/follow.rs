//! Following a publication: turns the raw events of a subscription into the changes a person
//! wants to see, relative to the snapshot already shown.
//!
//! The subscription resends every item on each (re)connect; [`Tracker`] compares them with
//! what it holds, so only real changes are reported, and keys missing from a new snapshot are
//! reported deleted.

use std::collections::{BTreeMap, BTreeSet};

use powernode_pubsub::inspect::{Snapshot, Source};
use powernode_pubsub::RawEvent;

use crate::item::ItemValue;

/// One thing that happened to a followed publication.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A publisher is now serving (after being down, or a new instance).
    PublisherUp {
        /// The publisher instance.
        generation: u64,
        /// Its schema version of the topic.
        schema_version: u32,
    },
    /// The publisher went away.
    PublisherDown {
        /// Why the connection ended.
        reason: String,
    },
    /// A key appeared.
    Create {
        /// The key.
        key: String,
        /// Its value.
        value: ItemValue,
    },
    /// A key's value changed.
    Modify {
        /// The key.
        key: String,
        /// Its new value.
        value: ItemValue,
    },
    /// A key went away.
    Delete {
        /// The key.
        key: String,
    },
    /// Everything the publisher held at connect time has arrived.
    Synchronized,
    /// The publisher's restart barrier.
    Restarted {
        /// The publisher's counter.
        counter: u64,
    },
}

impl Change {
    /// The key the change is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Change::Create { key, .. } | Change::Modify { key, .. } | Change::Delete { key } => {
                Some(key)
            }
            _ => None,
        }
    }
}

/// What a follower holds of a publication.
#[derive(Debug)]
pub struct Tracker {
    topic: String,
    /// Encoded items as last seen.
    items: BTreeMap<String, Vec<u8>>,
    /// The live publisher's generation, while connected.
    live: Option<u64>,
    /// The last publisher's generation, to tell a reconnect from a new instance.
    last_generation: Option<u64>,
    schema_version: Option<u32>,
    /// Keys received since connecting, until `Synchronized`.
    seen: Option<BTreeSet<String>>,
}

impl Tracker {
    /// A tracker holding what `snapshot` showed.
    pub fn new(topic: &str, snapshot: &Snapshot) -> Tracker {
        let items = snapshot
            .items
            .iter()
            .filter_map(|(key, item)| Some((key.clone(), item.as_ref().ok()?.1.clone())))
            .collect();
        let (live, schema_version) = match snapshot.source {
            Source::Live {
                generation,
                schema_version,
            } => (Some(generation), Some(schema_version)),
            Source::Checkpoint { .. } => (None, None),
        };
        Tracker {
            topic: topic.to_owned(),
            items,
            live,
            last_generation: live,
            schema_version,
            seen: None,
        }
    }

    /// The changes `event` makes to what the tracker holds (often none).
    pub fn apply(&mut self, event: RawEvent) -> Vec<Change> {
        match event {
            RawEvent::Connected {
                generation,
                schema_version,
                ..
            } => {
                let was_down = self.live.is_none();
                let new_instance = self.last_generation != Some(generation);
                self.live = Some(generation);
                self.last_generation = Some(generation);
                self.schema_version = Some(schema_version);
                self.seen = Some(BTreeSet::new());
                if was_down || new_instance {
                    vec![Change::PublisherUp {
                        generation,
                        schema_version,
                    }]
                } else {
                    Vec::new()
                }
            }
            RawEvent::Update { key, value, .. } => {
                if let Some(seen) = &mut self.seen {
                    seen.insert(key.clone());
                }
                let decoded = ItemValue::decode(&self.topic, self.schema_version, &value);
                match self.items.insert(key.clone(), value.clone()) {
                    None => vec![Change::Create {
                        key,
                        value: decoded,
                    }],
                    Some(old) if old != value => vec![Change::Modify {
                        key,
                        value: decoded,
                    }],
                    Some(_) => Vec::new(),
                }
            }
            RawEvent::Delete { key } => self.delete(key).into_iter().collect(),
            RawEvent::Synchronized => {
                let seen = self.seen.take().unwrap_or_default();
                let stale: Vec<String> = self
                    .items
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                let mut changes: Vec<Change> =
                    stale.into_iter().filter_map(|k| self.delete(k)).collect();
                changes.push(Change::Synchronized);
                changes
            }
            RawEvent::Restarted { counter } => vec![Change::Restarted { counter }],
            RawEvent::Disconnected { reason } => {
                self.seen = None;
                match self.live.take() {
                    Some(_) => vec![Change::PublisherDown { reason }],
                    None => Vec::new(),
                }
            }
        }
    }

    fn delete(&mut self, key: String) -> Option<Change> {
        self.items.remove(&key).map(|_| Change::Delete { key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(key: &str, value: &[u8]) -> RawEvent {
        RawEvent::Update {
            key: key.into(),
            value: value.to_vec(),
            from_checkpoint: false,
        }
    }

    fn connected(generation: u64) -> RawEvent {
        RawEvent::Connected {
            generation,
            schema_version: 1,
            persistent: false,
        }
    }

    fn snapshot(source: Source, items: &[(&str, &[u8])]) -> Snapshot {
        Snapshot {
            source,
            items: items
                .iter()
                .map(|(k, v)| (k.to_string(), Ok((1, v.to_vec()))))
                .collect(),
        }
    }

    /// Keys and kinds only: the values of an unknown topic are just sizes.
    fn summary(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::PublisherUp { generation, .. } => format!("up {generation}"),
                Change::PublisherDown { .. } => "down".into(),
                Change::Create { key, .. } => format!("create {key}"),
                Change::Modify { key, .. } => format!("modify {key}"),
                Change::Delete { key } => format!("delete {key}"),
                Change::Synchronized => "synchronized".into(),
                Change::Restarted { counter } => format!("restarted {counter}"),
            })
            .collect()
    }

    #[test]
    fn reports_only_real_changes_after_a_live_snapshot() {
        let live = Source::Live {
            generation: 7,
            schema_version: 1,
        };
        let mut t = Tracker::new("NoSuchTopic", &snapshot(live, &[("a", b"1"), ("b", b"2")]));
        let steps: Vec<(RawEvent, Vec<&str>)> = vec![
            (connected(7), vec![]),
            (update("a", b"1"), vec![]),
            (update("b", b"3"), vec!["modify b"]),
            (RawEvent::Synchronized, vec!["synchronized"]),
            (update("c", b"4"), vec!["create c"]),
            (RawEvent::Delete { key: "a".into() }, vec!["delete a"]),
            (RawEvent::Delete { key: "zz".into() }, vec![]),
            (RawEvent::Restarted { counter: 2 }, vec!["restarted 2"]),
            (
                RawEvent::Disconnected {
                    reason: "gone".into(),
                },
                vec!["down"],
            ),
            (connected(8), vec!["up 8"]),
            (update("c", b"4"), vec![]),
            // "b" was deleted while the publisher was away.
            (RawEvent::Synchronized, vec!["delete b", "synchronized"]),
        ];
        for (i, (event, want)) in steps.into_iter().enumerate() {
            let got = summary(&t.apply(event));
            assert_eq!(got, want, "step {i}");
        }
    }

    #[test]
    fn a_publisher_coming_up_after_checkpoints_is_reported() {
        let down = Source::Checkpoint {
            reason: "connect: refused".into(),
        };
        let mut t = Tracker::new("NoSuchTopic", &snapshot(down, &[("a", b"1")]));
        assert_eq!(summary(&t.apply(connected(1))), vec!["up 1"]);
        assert_eq!(summary(&t.apply(update("a", b"2"))), vec!["modify a"]);
        let gone = RawEvent::Disconnected { reason: "x".into() };
        assert_eq!(summary(&t.apply(gone.clone())), vec!["down"]);
        assert!(t.apply(gone).is_empty(), "down reported twice");
    }

    #[test]
    fn bad_checkpoints_are_not_held() {
        let mut snap = snapshot(
            Source::Checkpoint {
                reason: "down".into(),
            },
            &[],
        );
        snap.items.insert(
            "bad".into(),
            Err(powernode_pubsub::checkpoint::CheckpointError::BadMagic),
        );
        let mut t = Tracker::new("NoSuchTopic", &snap);
        t.apply(connected(1));
        assert_eq!(summary(&t.apply(update("bad", b"1"))), vec!["create bad"]);
    }
}
