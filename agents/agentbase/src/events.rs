//! Raising events: the one way every agent reports what happened to it (DESIGN §2, eventd
//! row; §7; docs/events.md).
//!
//! [`Events::raise`] publishes the event on the agent's persistent `<agent>/Event` topic —
//! checkpointed under `persist`, so it survives a crash or a reboot the moment `raise`
//! returns — with a globally unique id and a per-agent sequence number that keeps growing
//! across restarts. eventd journals it and publishes `eventd/EventAck` for the agent; every
//! event the acknowledgement covers is then unpublished here. While eventd is away the events
//! wait, at most [`PENDING_CAP`] of them: past that the oldest Info or Warning goes first,
//! then the oldest Error, never a Critical, and the count of what went travels in the next
//! event's `dropped_before`.
//!
//! Sequence numbers are reserved on disk [`SEQ_BLOCK`] at a time
//! (`persist/powernode/events/<agent>.state`), so a raise costs one checkpoint write, not
//! two, and a restart never reuses a number eventd may already have acknowledged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::node_api::event_limits::{
    MAX_FIELDS, MAX_FIELD_KEY, MAX_FIELD_VALUE, MAX_KIND, MAX_MESSAGE,
};
use powernode_types::{Event, EventAck, Severity};
use serde::{Deserialize, Serialize};

use crate::health::now_ms;
use crate::root::Root;

/// Most events an agent keeps while eventd has not acknowledged them.
pub const PENDING_CAP: usize = 1000;
/// Sequence numbers reserved on disk at a time.
pub const SEQ_BLOCK: u64 = 1000;
/// The agent that acknowledges events.
pub const EVENTD: &str = "eventd";
/// Why a raise did not go as asked.
#[derive(Debug, thiserror::Error)]
pub enum RaiseError {
    /// The kind is not dotted lower-case words (`cert.rotation_failing`): a bug in the caller.
    #[error("invalid event kind {0:?}: use dotted lower-case words such as cert.rotation_failing")]
    InvalidKind(String),
    /// The event is published but not (yet) on disk: the checkpoint write failed and is being
    /// retried (the agent reports it as Degraded meanwhile).
    #[error("event {id} raised but not yet on disk (its checkpoint write is retried)")]
    NotDurable {
        /// The event's id.
        id: String,
    },
    /// The event could not be published at all.
    #[error("publishing the event: {0}")]
    Publish(#[from] powernode_pubsub::Error),
}

/// An event built apart from raising it, so an agent's wording and fields are tested without
/// an agent, and a state machine can hand the events it decides on to the loop that raises
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raised {
    /// How bad.
    pub severity: Severity,
    /// The kind, dotted lower-case words (`module.active`).
    pub kind: &'static str,
    /// Human text.
    pub message: String,
    /// Structured context, in order.
    pub fields: Vec<(&'static str, String)>,
}

impl Raised {
    /// Raises it (a failure to raise is logged: the event is a report, not the work).
    pub fn raise(&self, events: &Events) {
        let fields: Vec<(&str, &str)> = self.fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        events.report(self.severity, self.kind, &self.message, &fields);
    }

    /// The value of field `key` (for tests).
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The agent's event raiser, shared by every clone of its context.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("agent", &self.inner.agent)
            .finish()
    }
}

struct Inner {
    agent: &'static str,
    publication: Publication<Event>,
    state_file: PathBuf,
    raising: Mutex<Raising>,
}

/// What [`Events::raise`] keeps between calls.
struct Raising {
    next_seq: u64,
    /// Sequence numbers below this are reserved on disk.
    reserved: u64,
    /// Events not yet acknowledged: seq → (id, severity).
    pending: BTreeMap<u64, (String, Severity)>,
    /// Dropped since the last raise.
    dropped: u64,
    /// Starts of this agent, this one included.
    starts: u64,
}

/// `persist/powernode/events/<agent>.state`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedState {
    /// Every sequence number below this may have been used.
    reserved_seq: u64,
    /// How many times the agent has started.
    starts: u64,
}

impl SavedState {
    fn read(path: &std::path::Path) -> Option<SavedState> {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }
}

/// `persist/powernode/events/<agent>.state`.
fn state_file(root: &Root, agent: &str) -> PathBuf {
    root.persist_dir()
        .join("events")
        .join(format!("{agent}.state"))
}

/// How many times `agent` has started under `root` (its current run included), as its events
/// state records it; `None` when it never started there or the record is unreadable. Read
/// only: for tools (`powernode-agent introspect`) that show restarts. The count survives
/// reboots, like the `restarts` field of the `agent.started` event.
pub fn recorded_starts(root: &Root, agent: &str) -> Option<u64> {
    SavedState::read(&state_file(root, agent)).map(|s| s.starts)
}

impl Events {
    /// Opens `<agent>/Event` (reloading the events not yet acknowledged), counts this start,
    /// and follows eventd's acknowledgements. Must run inside a tokio runtime.
    pub fn open(
        dirs: &Dirs,
        root: &Root,
        agent: &'static str,
    ) -> Result<Events, powernode_pubsub::Error> {
        let publication = Publication::<Event>::open(dirs, agent)?;
        let pending: BTreeMap<u64, (String, Severity)> = publication
            .keys()
            .into_iter()
            .filter_map(|key| publication.get(&key))
            .map(|e| (e.seq, (e.id, e.severity)))
            .collect();
        let state_file = state_file(root, agent);
        let saved = SavedState::read(&state_file).unwrap_or_default();
        let next_seq = saved
            .reserved_seq
            .max(pending.keys().next_back().map_or(1, |s| s + 1))
            .max(1);
        let inner = Arc::new(Inner {
            agent,
            publication,
            state_file,
            raising: Mutex::new(Raising {
                next_seq,
                reserved: next_seq,
                pending,
                dropped: 0,
                starts: saved.starts + 1,
            }),
        });
        {
            let mut r = inner.lock();
            if let Err(e) = inner.reserve(&mut r) {
                tracing::warn!(error = %e, "could not record this start and reserve event numbers");
            }
        }
        tokio::spawn(follow_acks(Arc::downgrade(&inner), dirs.clone(), agent));
        Ok(Events { inner })
    }

    /// Raises an event: published and checkpointed when this returns `Ok`. `kind` is dotted
    /// lower-case words (`module.rejected`); `fields` is structured context, in order. Text
    /// past the controller's bounds ([`MAX_MESSAGE`], [`MAX_FIELDS`], [`MAX_FIELD_KEY`],
    /// [`MAX_FIELD_VALUE`]) is cut, marked with `…`: an error quoting a long registry reply
    /// or a command's output must still reach the controller.
    pub fn raise(
        &self,
        severity: Severity,
        kind: &str,
        message: &str,
        fields: &[(&str, &str)],
    ) -> Result<(), RaiseError> {
        check_kind(kind)?;
        let inner = &self.inner;
        let mut r = inner.lock();
        if r.next_seq >= r.reserved {
            if let Err(e) = inner.reserve(&mut r) {
                // Numbers are still handed out: losing the reservation only risks a reuse
                // after a crash, which eventd's acknowledgement then settles.
                tracing::warn!(error = %e, "could not reserve event numbers");
            }
        }
        while r.pending.len() >= PENDING_CAP {
            let Some(victim) = drop_candidate(&r.pending) else {
                break; // only Critical events: never dropped
            };
            if let Some((id, _)) = r.pending.remove(&victim) {
                inner.publication.unpublish(&id)?;
                r.dropped += 1;
            }
        }
        let seq = r.next_seq;
        let event = Event {
            id: new_id(),
            agent: inner.agent.to_owned(),
            seq,
            severity,
            kind: kind.to_owned(),
            message: cut(message, MAX_MESSAGE),
            at_ms: now_ms(),
            fields: fields
                .iter()
                .take(MAX_FIELDS)
                .map(|(k, v)| (cut(k, MAX_FIELD_KEY), cut(v, MAX_FIELD_VALUE)))
                .collect(),
            dropped_before: r.dropped,
        };
        inner.publication.publish(&event)?;
        // A kill right after the event is on disk: it must still reach the controller.
        failpoint::hit("events.raised");
        r.next_seq += 1;
        r.dropped = 0;
        r.pending.insert(seq, (event.id.clone(), severity));
        drop(r);
        // The event itself is the record; a log line per raise would double a burst.
        tracing::debug!(kind, %message, seq, ?severity, "event raised");
        if inner.publication.is_durable(&event.id) {
            Ok(())
        } else {
            Err(RaiseError::NotDurable { id: event.id })
        }
    }

    /// Raises and logs a failure to raise instead of returning it: for the many call sites
    /// where the event is a report, not the work.
    pub fn report(&self, severity: Severity, kind: &str, message: &str, fields: &[(&str, &str)]) {
        if let Err(e) = self.raise(severity, kind, message, fields) {
            tracing::warn!(kind, error = %e, "event not raised durably");
        }
    }

    /// Follows the health of the `Event` publication (for the agent's status).
    pub fn watch_health(
        &self,
    ) -> tokio::sync::watch::Receiver<powernode_pubsub::PublicationHealth> {
        self.inner.publication.watch_health()
    }

    /// Events raised and not yet acknowledged by eventd.
    pub fn pending(&self) -> usize {
        self.inner.lock().pending.len()
    }

    /// How many times this agent has started, this start included.
    pub fn starts(&self) -> u64 {
        self.inner.lock().starts
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Raising> {
        self.raising.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the next block of sequence numbers (and the start count) to disk.
    fn reserve(&self, r: &mut Raising) -> std::io::Result<()> {
        let reserved = r.next_seq + SEQ_BLOCK;
        let saved = SavedState {
            reserved_seq: reserved,
            starts: r.starts,
        };
        if let Some(dir) = self.state_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&self.state_file, &bytes, 0o600)?;
        r.reserved = reserved;
        Ok(())
    }

    /// Forgets (unpublishes) every event with `seq <= through`: eventd has journalled them.
    ///
    /// The whole acknowledged range goes in one unpublish, so a burst costs one directory
    /// sync per acknowledgement rather than one per event (docs/performance.md, events).
    fn acknowledged(&self, through: u64) {
        let mut r = self.lock();
        let rest = r.pending.split_off(&through.saturating_add(1));
        let done = std::mem::replace(&mut r.pending, rest);
        // A reservation lost to a full disk must not let numbers eventd has seen come back.
        if r.next_seq <= through {
            r.next_seq = through + 1;
        }
        // The files go without the lock: a raise meanwhile (another thread) need not wait
        // for the unlinks, and it cannot touch these ids.
        drop(r);
        let ids: Vec<String> = done.into_values().map(|(id, _)| id).collect();
        if let Err(e) = self.publication.unpublish_many(&ids) {
            tracing::warn!(events = ids.len(), error = %e, "could not forget acknowledged events");
        }
    }
}

/// The event to drop when over the cap: the oldest Info or Warning, else the oldest Error.
fn drop_candidate(pending: &BTreeMap<u64, (String, Severity)>) -> Option<u64> {
    let oldest = |pred: fn(Severity) -> bool| {
        pending
            .iter()
            .find(|(_, (_, sev))| pred(*sev))
            .map(|(seq, _)| *seq)
    };
    oldest(|s| matches!(s, Severity::Info | Severity::Warning))
        .or_else(|| oldest(|s| s == Severity::Error))
}

/// Follows `eventd/EventAck` for `agent` for as long as the raiser lives.
async fn follow_acks(inner: Weak<Inner>, dirs: Dirs, agent: &'static str) {
    let mut sub = Subscription::<EventAck>::connect(&dirs, EVENTD);
    loop {
        sub.next().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Some(ack) = sub.get(agent) {
            inner.acknowledged(ack.through_seq);
        }
    }
}

/// Dotted lower-case words: `[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*`.
pub fn check_kind(kind: &str) -> Result<(), RaiseError> {
    let word_ok = |w: &str| {
        w.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    if kind.len() <= MAX_KIND && kind.split('.').all(word_ok) {
        Ok(())
    } else {
        Err(RaiseError::InvalidKind(kind.to_owned()))
    }
}

/// `text`, or its longest start that fits `max` bytes with a `…` after it, cut at a character
/// boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    const MARK: &str = "…";
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

/// 128 random bits in hex: unique across a fleet without coordination.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source at all: time and pid still make it unique on this node.
        let t = now_ms().to_le_bytes();
        bytes[..8].copy_from_slice(&t);
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    // One allocation: a burst raises tens of thousands of these.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(2 * bytes.len());
    for b in bytes {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids are keys of the `Event` topic: 32 lower-case hex digits, a new one each time.
    #[test]
    fn ids_are_hex_and_distinct() {
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
            powernode_pubsub::validate_key(id).unwrap();
        }
        let nibbles: std::collections::BTreeSet<char> =
            ids.iter().flat_map(|i| i.chars()).collect();
        assert_eq!(nibbles.len(), 16, "every hex digit appears in 1000 ids");
    }

    #[test]
    fn kinds() {
        for good in ["cert.rotation_failing", "agent.started", "a", "module.v2_x"] {
            assert!(check_kind(good).is_ok(), "{good}");
        }
        for bad in ["", "Cert.x", "cert..x", ".x", "x.", "2x", "cert-x", "x y"] {
            assert!(check_kind(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlong_text_is_cut_within_the_bound() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("exactly10!", 10), "exactly10!");
        let long = "é".repeat(100); // two bytes each
        let c = cut(&long, 51);
        assert!(c.len() <= 51 && c.ends_with('…'), "{c}");
        assert!(c.starts_with("éé"));
        assert_eq!(cut(&"x".repeat(5000), MAX_MESSAGE).len(), MAX_MESSAGE);
    }

    #[test]
    fn drop_order_spares_critical() {
        let p = |list: &[(u64, Severity)]| -> BTreeMap<u64, (String, Severity)> {
            list.iter()
                .map(|(s, v)| (*s, (s.to_string(), *v)))
                .collect()
        };
        use Severity::*;
        assert_eq!(
            drop_candidate(&p(&[(1, Critical), (2, Error), (3, Info)])),
            Some(3)
        );
        assert_eq!(
            drop_candidate(&p(&[(1, Critical), (2, Error), (3, Error)])),
            Some(2)
        );
        assert_eq!(drop_candidate(&p(&[(1, Critical), (2, Critical)])), None);
    }
}

#[cfg(test)]
mod raise_tests {
    use super::*;
    use crate::{Context, Settings};
    use powernode_pubsub::Event as PubEvent;

    async fn until<T: powernode_types::Topic>(
        sub: &mut Subscription<T>,
        what: &str,
        done: impl Fn(&Subscription<T>) -> bool,
    ) {
        let found = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            while !done(sub) {
                if let PubEvent::Disconnected = sub.next().await {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        })
        .await;
        assert!(found.is_ok(), "not {what} within 20 s");
    }

    /// A raised event is on the agent's persistent topic (and its checkpoint) at once, stays
    /// across a restart of the agent until eventd acknowledges it, is forgotten then, and the
    /// numbers keep growing across restarts even once nothing is pending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raised_events_wait_for_the_acknowledgement() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let ctx = Context::new("raiser", root.clone(), Settings::default()).unwrap();
        ctx.events
            .raise(
                Severity::Warning,
                "module.rejected",
                "bad signature",
                &[("module", "tools")],
            )
            .unwrap();
        let cp = ctx.dirs.checkpoints("raiser", "Event", true);
        assert_eq!(std::fs::read_dir(&cp).unwrap().count(), 1);
        assert!(matches!(
            ctx.events.raise(Severity::Info, "Bad Kind", "x", &[]),
            Err(RaiseError::InvalidKind(_))
        ));
        drop(ctx);

        let ctx = Context::new("raiser", root.clone(), Settings::default()).unwrap();
        assert_eq!(ctx.events.pending(), 1, "kept across the restart");
        assert_eq!(ctx.events.starts(), 2);
        assert_eq!(recorded_starts(&root, "raiser"), Some(2), "what tools read");
        assert_eq!(recorded_starts(&root, "never-ran"), None);
        ctx.events
            .raise(Severity::Info, "agent.started", "again", &[])
            .unwrap();
        let mut sub = Subscription::<Event>::connect(&ctx.dirs, "raiser");
        until(&mut sub, "two events", |s| s.items().count() == 2).await;
        let mut seqs: Vec<u64> = sub.items().map(|(_, e)| e.seq).collect();
        seqs.sort();
        assert!(seqs[0] < seqs[1], "{seqs:?}");
        let first = sub
            .items()
            .find(|(_, e)| e.seq == seqs[0])
            .unwrap()
            .1
            .clone();
        assert_eq!(first.kind, "module.rejected");
        assert_eq!(first.fields, [("module".to_owned(), "tools".to_owned())]);

        let acks = Publication::<EventAck>::open(&ctx.dirs, EVENTD).unwrap();
        acks.publish(&EventAck {
            agent: "raiser".into(),
            through_seq: seqs[1],
        })
        .unwrap();
        until(&mut sub, "both forgotten", |s| s.items().count() == 0).await;
        assert_eq!(ctx.events.pending(), 0);
        drop(ctx);
        drop(acks);

        let ctx = Context::new("raiser", root, Settings::default()).unwrap();
        ctx.events
            .raise(Severity::Info, "agent.started", "third", &[])
            .unwrap();
        let mut sub = Subscription::<Event>::connect(&ctx.dirs, "raiser");
        until(&mut sub, "the third event", |s| s.items().count() == 1).await;
        let third = sub.items().next().unwrap().1.seq;
        assert!(third > seqs[1], "{third} reused a number up to {}", seqs[1]);
    }

    /// An event whose text passes the controller's bounds is raised cut to them, not refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlong_events_are_cut_to_the_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::new("long", Root::new(dir.path()), Settings::default()).unwrap();
        let value = "v".repeat(5000);
        let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        let fields: Vec<(&str, &str)> = keys.iter().map(|k| (k.as_str(), value.as_str())).collect();
        ctx.events
            .raise(Severity::Error, "test.long", &"m".repeat(9000), &fields)
            .unwrap();
        let mut sub = Subscription::<Event>::connect(&ctx.dirs, "long");
        until(&mut sub, "the event", |s| s.items().count() == 1).await;
        let event = sub.items().next().unwrap().1.clone();
        assert_eq!(event.message.len(), MAX_MESSAGE);
        assert_eq!(event.fields.len(), MAX_FIELDS);
        assert!(event.fields.iter().all(|(_, v)| v.len() == MAX_FIELD_VALUE));
        assert_eq!(event.fields[0].0, "k0");
    }

    /// Over the cap, the oldest Info go first, Critical never, and the next event says how
    /// many went.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_the_cap_the_oldest_minor_events_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::new("capped", Root::new(dir.path()), Settings::default()).unwrap();
        ctx.events
            .raise(Severity::Critical, "cert.rotation_failing", "first", &[])
            .unwrap();
        for i in 0..PENDING_CAP + 4 {
            ctx.events
                .raise(Severity::Info, "test.filler", &i.to_string(), &[])
                .unwrap();
        }
        assert_eq!(ctx.events.pending(), PENDING_CAP);
        let mut sub = Subscription::<Event>::connect(&ctx.dirs, "capped");
        until(&mut sub, "the capped set", |s| {
            s.items().count() == PENDING_CAP
        })
        .await;
        assert!(sub.items().any(|(_, e)| e.severity == Severity::Critical));
        let last = sub.items().max_by_key(|(_, e)| e.seq).unwrap().1.clone();
        assert_eq!(last.dropped_before, 1, "{last:?}");
        let dropped: u64 = sub.items().map(|(_, e)| e.dropped_before).sum();
        assert_eq!(dropped, 5);
    }
}
