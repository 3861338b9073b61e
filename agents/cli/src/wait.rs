//! `powernode-agent wait`: block until an item of a publication satisfies a condition, for
//! boot scripts ("wait until enrollmgr says Enrolled").
//!
//! Items come from a subscription, so a persistent topic can be satisfied from its checkpoint
//! files before its publisher is up. The condition is checked on every item as it arrives.

use std::collections::BTreeMap;
use std::time::Duration;

use ipcmonitor::item::ItemValue;
use ipcmonitor::name::PublicationName;
use ipcmonitor::tool::UsageError;
use powernode_pubsub::inspect::is_listening;
use powernode_pubsub::{validate_key, Dirs, RawEvent, RawSubscription};
use powernode_types::registry::{self, TopicInfo};
use tokio::time::{sleep, sleep_until, Instant};

use crate::field::FieldMatch;

/// How long `wait` stays quiet before saying on stderr what it waits for: a condition that
/// already holds prints nothing there.
pub const ANNOUNCE_AFTER: Duration = Duration::from_millis(200);

/// What `wait` waits for: an item of a publication, with a given key and field values if asked.
#[derive(Clone, Debug)]
pub struct Condition {
    name: PublicationName,
    topic: Option<&'static TopicInfo>,
    key: Option<String>,
    fields: Vec<FieldMatch>,
}

/// `wait` gave up.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {waited_for}; last seen: {last_seen}")]
pub struct TimedOut {
    /// The condition, described.
    pub waited_for: String,
    /// How long it waited.
    pub timeout: Duration,
    /// What it last saw: an item, "no item" or "publisher not up".
    pub last_seen: String,
}

impl Condition {
    /// A condition on `name`. Field conditions need a topic this build can decode, and a key
    /// must be one a publisher could use: otherwise it is a usage error.
    pub fn new(
        name: PublicationName,
        key: Option<String>,
        fields: Vec<FieldMatch>,
    ) -> Result<Condition, UsageError> {
        let topic = registry::lookup(&name.topic);
        if topic.is_none() && !fields.is_empty() {
            return Err(UsageError(format!(
                "--field needs a topic this build can decode, and {:?} is not one (known: {})",
                name.topic,
                ipcmonitor::known_topics()
            )));
        }
        if let Some(key) = &key {
            validate_key(key).map_err(|e| UsageError(format!("--key: {e}")))?;
        }
        Ok(Condition {
            name,
            topic,
            key,
            fields,
        })
    }

    /// Whether the item `key` with `value` satisfies the condition.
    pub fn holds(&self, key: &str, value: &ItemValue) -> bool {
        if self.key.as_deref().is_some_and(|want| want != key) {
            return false;
        }
        self.fields.is_empty()
            || value
                .json()
                .is_some_and(|item| self.fields.iter().all(|f| f.matches(item)))
    }

    /// E.g. `item "global" of enrollmgr/EnrollmentStatus with state=Enrolled`.
    pub fn describe(&self) -> String {
        let mut text = match &self.key {
            Some(key) => format!("item {key:?} of {}", self.name),
            None => format!("an item of {}", self.name),
        };
        if !self.fields.is_empty() {
            let fields: Vec<String> = self.fields.iter().map(ToString::to_string).collect();
            text.push_str(" with ");
            text.push_str(&fields.join(" and "));
        }
        text
    }
}

/// Waits up to `timeout` for `condition` and returns the item that satisfied it.
pub async fn wait(
    dirs: &Dirs,
    condition: &Condition,
    timeout: Duration,
) -> Result<(String, ItemValue), TimedOut> {
    let name = &condition.name;
    let mut sub = RawSubscription::new(
        dirs,
        &name.agent,
        &name.topic,
        condition.topic.map(|t| t.schema_version),
        condition.topic.is_some_and(|t| t.persistent),
    );
    let deadline = Instant::now() + timeout;
    let announce = sleep(ANNOUNCE_AFTER.min(timeout));
    tokio::pin!(announce);
    let mut announced = false;
    let mut seen = Seen::default();
    loop {
        tokio::select! {
            event = sub.next() => {
                if let Some(found) = seen.apply(condition, event) {
                    return Ok(found);
                }
            }
            () = &mut announce, if !announced => {
                announced = true;
                eprintln!("waiting up to {timeout:?} for {}", condition.describe());
            }
            () = sleep_until(deadline) => {
                let listening = is_listening(sub.socket_path()).await;
                return Err(TimedOut {
                    waited_for: condition.describe(),
                    timeout,
                    last_seen: seen.describe(condition, listening),
                });
            }
        }
    }
}

/// What a waiting subscriber has seen, to say so on timeout.
#[derive(Debug, Default)]
struct Seen {
    connected: bool,
    items: BTreeMap<String, ItemValue>,
    last_key: Option<String>,
}

impl Seen {
    /// Takes in one event; returns the item if it satisfies `condition`.
    fn apply(&mut self, condition: &Condition, event: RawEvent) -> Option<(String, ItemValue)> {
        match event {
            RawEvent::Connected { .. } => self.connected = true,
            RawEvent::Disconnected { .. } => self.connected = false,
            RawEvent::Update { key, value, .. } => {
                // The subscription already refused other schema versions.
                let item = ItemValue::decode(&condition.name.topic, None, &value);
                if condition.holds(&key, &item) {
                    return Some((key, item));
                }
                self.items.insert(key.clone(), item);
                self.last_key = Some(key);
            }
            RawEvent::Delete { key } => {
                self.items.remove(&key);
            }
            RawEvent::Synchronized | RawEvent::Restarted { .. } => {}
        }
        None
    }

    /// The item the condition is about (its key's, else the last one to change), or why
    /// there is none. `listening`: whether something accepts connections on the socket.
    fn describe(&self, condition: &Condition, listening: bool) -> String {
        let key = condition.key.as_ref().or(self.last_key.as_ref());
        let item = key.and_then(|k| self.items.get_key_value(k));
        let publisher = if self.connected {
            None
        } else if listening {
            Some(format!(
                "publisher is listening but could not be subscribed to \
                 (another schema version? this build reads version {})",
                condition.topic.map_or(0, |t| t.schema_version)
            ))
        } else {
            Some("publisher not up".to_owned())
        };
        match (item, publisher) {
            (Some((k, v)), None) => format!("item {k:?}: {}", compact(v)),
            (Some((k, v)), Some(p)) => format!("{p}; item {k:?} as last known: {}", compact(v)),
            (None, Some(p)) => p,
            (None, None) => match &condition.key {
                Some(k) => format!("no item with key {k:?} ({} other)", self.items.len()),
                None => "no item".to_owned(),
            },
        }
    }
}

/// One line: compact JSON, or the `<...>` note for an item without one.
fn compact(value: &ItemValue) -> String {
    match value.json() {
        Some(json) => json.to_string(),
        None => value.to_text(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::{AgentState, AgentStatus};

    fn condition(name: &str, key: Option<&str>, fields: &[&str]) -> Result<Condition, UsageError> {
        Condition::new(
            name.parse().unwrap(),
            key.map(str::to_owned),
            fields.iter().map(|f| f.parse().unwrap()).collect(),
        )
    }

    fn status(agent: &str, state: AgentState) -> Vec<u8> {
        postcard::to_stdvec(&AgentStatus {
            agent: agent.into(),
            pid: 1,
            version: "0".into(),
            started_at_ms: 0,
            last_loop_ms: 0,
            state,
            last_error: None,
            quarantined_checkpoints: 0,
        })
        .unwrap()
    }

    fn update(key: &str, value: Vec<u8>) -> RawEvent {
        RawEvent::Update {
            key: key.into(),
            value,
            from_checkpoint: false,
        }
    }

    #[test]
    fn fields_need_a_known_topic_and_keys_must_be_valid() {
        let err = condition("a/NoSuchTopic", None, &["x=1"]).unwrap_err();
        assert!(err.0.contains("--field needs a topic"), "{err}");
        assert!(condition("a/NoSuchTopic", Some("k"), &[]).is_ok());
        let err = condition("a/AgentStatus", Some("../x"), &[]).unwrap_err();
        assert!(err.0.starts_with("--key"), "{err}");
    }

    #[test]
    fn describes_itself() {
        let c = condition("a/AgentStatus", Some("a"), &["state=Running", "pid=1"]).unwrap();
        assert_eq!(
            c.describe(),
            "item \"a\" of a/AgentStatus with state=Running and pid=1"
        );
        let c = condition("a/AgentStatus", None, &[]).unwrap();
        assert_eq!(c.describe(), "an item of a/AgentStatus");
    }

    #[test]
    fn satisfied_by_the_matching_item_only() {
        let c = condition("a/AgentStatus", Some("a"), &["state=Running"]).unwrap();
        let mut seen = Seen::default();
        assert_eq!(seen.describe(&c, false), "publisher not up");
        let connected = RawEvent::Connected {
            generation: 1,
            schema_version: 1,
            persistent: false,
        };
        assert!(seen.apply(&c, connected).is_none());
        assert_eq!(seen.describe(&c, true), "no item with key \"a\" (0 other)");
        assert!(seen
            .apply(&c, update("b", status("b", AgentState::Running)))
            .is_none());
        assert!(seen
            .apply(&c, update("a", status("a", AgentState::Starting)))
            .is_none());
        let last = seen.describe(&c, true);
        assert!(
            last.starts_with("item \"a\": {") && last.contains("Starting"),
            "{last}"
        );

        let gone = RawEvent::Disconnected { reason: "x".into() };
        assert!(seen.apply(&c, gone).is_none());
        let last = seen.describe(&c, false);
        assert!(
            last.starts_with("publisher not up; item \"a\" as last known"),
            "{last}"
        );

        let (key, item) = seen
            .apply(&c, update("a", status("a", AgentState::Running)))
            .unwrap();
        assert_eq!(key, "a");
        assert_eq!(item.json().unwrap()["state"], "Running");
    }

    #[test]
    fn without_fields_any_item_will_do() {
        let c = condition("a/NoSuchTopic", None, &[]).unwrap();
        let (key, item) = Seen::default().apply(&c, update("x", vec![1, 2])).unwrap();
        assert_eq!((key.as_str(), item), ("x", ItemValue::Unknown { bytes: 2 }));
    }
}
