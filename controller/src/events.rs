//! Fleet events: the limits a batch from a node must keep, their validation, how long events
//! are kept, and the periodic task that enforces it. Storing and querying are in
//! [`crate::storage`], the endpoints in [`crate::api`].

use std::time::Duration;

use powernode_types::Severity;
use tokio_util::sync::CancellationToken;

use crate::storage::Storage;
use crate::wire::EventRecord;

// The bounds of `POST /events` are the node API's: agents cut what they raise to them.
pub use powernode_types::node_api::event_limits::*;

/// Events in a page of `GET /api/v1/events` unless `limit` says otherwise.
pub const DEFAULT_PAGE: u32 = 100;
/// Most events in a page of `GET /api/v1/events`.
pub const MAX_PAGE: u32 = 1000;

/// Default of `--event-retention-days`.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;
/// Default of `--event-retention-count` (events kept per node).
pub const DEFAULT_RETENTION_COUNT: u32 = 100_000;
/// How often the retention task sweeps all nodes.
const SWEEP_INTERVAL: Duration = Duration::from_secs(600);

/// Why a batch was refused. Nothing of a refused batch is stored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    /// More than [`MAX_BATCH`] events.
    #[error("a batch holds at most {MAX_BATCH} events, this one {0}")]
    TooMany(usize),
    /// One event breaks a limit or a syntax.
    #[error("event {index} (id {id:?}): {reason}")]
    Invalid {
        /// Its place in the batch, from 0.
        index: usize,
        /// Its id as sent (cut to [`MAX_ID`] bytes).
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// Two events of the batch have the same id.
    #[error("event id {0:?} appears more than once in the batch")]
    Duplicate(String),
}

/// How long and how many events are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRetention {
    /// Events received longer ago than this are deleted.
    pub max_age: Duration,
    /// Each node keeps at most this many events, the newest.
    pub max_per_node: u32,
}

impl Default for EventRetention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(u64::from(DEFAULT_RETENTION_DAYS) * 86_400),
            max_per_node: DEFAULT_RETENTION_COUNT,
        }
    }
}

impl EventRetention {
    /// The oldest receive time kept at `now_ms`.
    pub fn cutoff_ms(&self, now_ms: i64) -> i64 {
        let age = i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_sub(age)
    }
}

/// Rank of a severity as stored: 0 Info, 1 Warning, 2 Error, 3 Critical.
pub fn severity_rank(severity: Severity) -> i64 {
    match severity {
        Severity::Info => 0,
        Severity::Warning => 1,
        Severity::Error => 2,
        Severity::Critical => 3,
    }
}

/// The severity of a stored rank.
pub fn severity_of_rank(rank: i64) -> Option<Severity> {
    match rank {
        0 => Some(Severity::Info),
        1 => Some(Severity::Warning),
        2 => Some(Severity::Error),
        3 => Some(Severity::Critical),
        _ => None,
    }
}

/// A severity by name, any case: `warning`, `Warning`, `WARNING`.
pub fn parse_severity(text: &str) -> Result<Severity, String> {
    [
        Severity::Info,
        Severity::Warning,
        Severity::Error,
        Severity::Critical,
    ]
    .into_iter()
    .find(|s| format!("{s:?}").eq_ignore_ascii_case(text.trim()))
    .ok_or_else(|| format!("`{text}` is not a severity (Info, Warning, Error, Critical)"))
}

/// A point in time as milliseconds since the epoch, or an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| format!("`{text}` is too large a time"));
    }
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            format!("`{text}` is neither milliseconds since the epoch nor an RFC 3339 time")
        })?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("`{text}` is out of range"))
}

/// Checks a whole batch against the limits above before anything of it is stored.
pub fn validate_batch(events: &[EventRecord]) -> Result<(), BatchError> {
    if events.len() > MAX_BATCH {
        return Err(BatchError::TooMany(events.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for (index, event) in events.iter().enumerate() {
        validate_event(event).map_err(|reason| BatchError::Invalid {
            index,
            id: cut(&event.id, MAX_ID).to_owned(),
            reason,
        })?;
        if !seen.insert(event.id.as_str()) {
            return Err(BatchError::Duplicate(event.id.clone()));
        }
    }
    Ok(())
}

fn validate_event(e: &EventRecord) -> Result<(), String> {
    let id_char = |b: u8| b.is_ascii_alphanumeric() || b"._:@+-".contains(&b);
    if e.id.is_empty() || e.id.len() > MAX_ID || !e.id.bytes().all(id_char) {
        return Err(format!(
            "id must be 1 to {MAX_ID} bytes of A-Z a-z 0-9 . _ : @ + -"
        ));
    }
    let agent_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    if e.agent.is_empty() || e.agent.len() > MAX_AGENT || !e.agent.bytes().all(agent_char) {
        return Err(format!(
            "agent must be 1 to {MAX_AGENT} bytes of A-Z a-z 0-9 _ -"
        ));
    }
    if e.kind.len() > MAX_KIND || !is_kind(&e.kind) {
        return Err(format!(
            "kind {:?} must be dotted lower-case words ([a-z][a-z0-9_]*, joined by .), \
             at most {MAX_KIND} bytes",
            cut(&e.kind, MAX_KIND)
        ));
    }
    if e.message.len() > MAX_MESSAGE {
        return Err(format!("message must be at most {MAX_MESSAGE} bytes"));
    }
    if e.fields.len() > MAX_FIELDS {
        return Err(format!("at most {MAX_FIELDS} fields"));
    }
    for (key, value) in &e.fields {
        if key.is_empty() || key.len() > MAX_FIELD_KEY {
            return Err(format!(
                "field key {:?} must be 1 to {MAX_FIELD_KEY} bytes",
                cut(key, MAX_FIELD_KEY)
            ));
        }
        if value.len() > MAX_FIELD_VALUE {
            return Err(format!(
                "field {key:?}: value must be at most {MAX_FIELD_VALUE} bytes"
            ));
        }
    }
    for (name, value) in [
        ("seq", e.seq),
        ("at_ms", e.at_ms),
        ("dropped_before", e.dropped_before),
    ] {
        if i64::try_from(value).is_err() {
            return Err(format!("{name} must be at most {}", i64::MAX));
        }
    }
    Ok(())
}

/// `[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*`.
pub(crate) fn is_kind(kind: &str) -> bool {
    kind.split('.').all(|word| {
        let mut bytes = word.bytes();
        bytes.next().is_some_and(|b| b.is_ascii_lowercase())
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Applies `retention` to every node now, then every ten minutes until `shutdown`. Inserts
/// trim their own node by count as they go; this sweep is what removes events by age and
/// catches a lowered count.
pub async fn retention_task(
    storage: Storage,
    retention: EventRetention,
    shutdown: CancellationToken,
) {
    loop {
        match storage.trim_events(crate::now_ms(), &retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "old events deleted"),
            Err(err) => tracing::warn!(error = %err, "event retention sweep failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> EventRecord {
        EventRecord {
            id: id.to_owned(),
            agent: "modulemgr".to_owned(),
            seq: 1,
            severity: Severity::Warning,
            kind: "module.start_failed".to_owned(),
            message: "tools did not start".to_owned(),
            at_ms: 1_700_000_000_000,
            fields: vec![("module".to_owned(), "tools".to_owned())],
            dropped_before: 0,
        }
    }

    #[test]
    fn kinds() {
        let table = [
            ("cert", true),
            ("cert.rotation_failing", true),
            ("a1.b_2.c", true),
            ("", false),
            ("Cert", false),
            ("cert.", false),
            (".cert", false),
            ("cert..x", false),
            ("1cert", false),
            ("cert._x", false),
            ("cert-x", false),
            ("cert x", false),
        ];
        for (kind, ok) in table {
            assert_eq!(is_kind(kind), ok, "{kind:?}");
        }
    }

    #[test]
    fn each_limit_is_enforced() {
        type Edit = fn(&mut EventRecord);
        let table: &[(&str, Edit, bool)] = &[
            ("as is", |_| {}, true),
            ("empty id", |e| e.id.clear(), false),
            ("id of 128", |e| e.id = "a".repeat(MAX_ID), true),
            ("id of 129", |e| e.id = "a".repeat(MAX_ID + 1), false),
            ("id with all allowed", |e| e.id = "aZ9._:@+-".into(), true),
            ("id with /", |e| e.id = "a/b".into(), false),
            ("empty agent", |e| e.agent.clear(), false),
            (
                "agent of 65",
                |e| e.agent = "a".repeat(MAX_AGENT + 1),
                false,
            ),
            ("agent with .", |e| e.agent = "a.b".into(), false),
            ("bad kind", |e| e.kind = "Module.Failed".into(), false),
            ("kind of 129", |e| e.kind = "a".repeat(MAX_KIND + 1), false),
            (
                "message of 4096",
                |e| e.message = "m".repeat(MAX_MESSAGE),
                true,
            ),
            (
                "message of 4097",
                |e| e.message = "m".repeat(MAX_MESSAGE + 1),
                false,
            ),
            (
                "32 fields",
                |e| e.fields = vec![("k".into(), "v".into()); MAX_FIELDS],
                true,
            ),
            (
                "33 fields",
                |e| e.fields = vec![("k".into(), "v".into()); MAX_FIELDS + 1],
                false,
            ),
            (
                "empty key",
                |e| e.fields = vec![(String::new(), "v".into())],
                false,
            ),
            (
                "key of 65",
                |e| e.fields = vec![("k".repeat(MAX_FIELD_KEY + 1), "v".into())],
                false,
            ),
            (
                "value of 1025",
                |e| e.fields = vec![("k".into(), "v".repeat(MAX_FIELD_VALUE + 1))],
                false,
            ),
            ("seq over i64", |e| e.seq = u64::MAX, false),
            ("at_ms over i64", |e| e.at_ms = u64::MAX, false),
        ];
        for (name, edit, ok) in table {
            let mut e = event("e-1");
            edit(&mut e);
            assert_eq!(validate_batch(&[e]).is_ok(), *ok, "{name}");
        }
    }

    #[test]
    fn batch_size_and_duplicates() {
        let many: Vec<_> = (0..=MAX_BATCH).map(|i| event(&format!("e-{i}"))).collect();
        assert_eq!(
            validate_batch(&many),
            Err(BatchError::TooMany(MAX_BATCH + 1))
        );
        assert_eq!(validate_batch(&many[..MAX_BATCH]), Ok(()));
        assert_eq!(
            validate_batch(&[event("a"), event("b"), event("a")]),
            Err(BatchError::Duplicate("a".into()))
        );
        assert_eq!(validate_batch(&[]), Ok(()));
    }

    #[test]
    fn times_and_severities() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T23:13:20.5+01:00"),
            Ok(1_700_000_000_500)
        );
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("").is_err());
        assert_eq!(parse_severity("warning"), Ok(Severity::Warning));
        assert_eq!(parse_severity("CRITICAL"), Ok(Severity::Critical));
        assert!(parse_severity("fatal").is_err());
        for rank in 0..4 {
            assert_eq!(severity_of_rank(rank).map(severity_rank), Some(rank));
        }
        assert_eq!(severity_of_rank(4), None);
    }
}
