//! `powernode-agent events`: the node's events, from eventd's journal, read-only (eventd owns
//! it: nothing here repairs, moves or deletes a file; [`eventd::view`] copes with segments
//! appended, compacted or deleted while it reads).
//!
//! One line per event, oldest first (by the time raised; under `--follow`, new ones as they
//! are journalled): time (the node's clock, UTC), agent, severity, kind,
//! message, fields as `key=value`. `--pending` keeps only what the controller has not
//! accepted yet: the journal's records past the delivery cursor, then the events agents have
//! raised that eventd has not journalled yet (read from their `<agent>/Event` checkpoints,
//! marked as such). `--follow` polls the journal and prints records as they are appended,
//! until SIGINT or SIGTERM. `--json` prints one JSON object per line instead.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentbase::Root;
use anyhow::Context as _;
use ipcmonitor::tool::{self, Exit};
use powernode_pubsub::{checkpoint, Dirs};
use powernode_types::node_api::EventRecord;
use powernode_types::text::{columns, one_line, rfc3339_millis};
use powernode_types::{Event, Topic};
use serde_json::{json, Value};

/// How often `--follow` looks for new records.
pub const POLL: Duration = Duration::from_millis(250);

/// What to show.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Only what the controller has not accepted.
    pub pending: bool,
    /// Keep printing records as they are appended.
    pub follow: bool,
    /// One JSON object per line.
    pub json: bool,
}

/// Where an event shown stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// In the journal, accepted by the controller.
    Delivered,
    /// In the journal, not yet accepted by the controller.
    Journalled,
    /// Raised by its agent, not yet in the journal.
    Raised,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Delivered => "delivered",
            Stage::Journalled => "journalled",
            Stage::Raised => "raised",
        }
    }
}

/// The journal's directory under `root`.
pub fn journal_dir(root: &Root) -> PathBuf {
    root.persist_dir().join("eventd/journal")
}

/// Runs `events` with `options` under `root`.
pub async fn run(root: &Root, options: Options) -> anyhow::Result<Exit> {
    match show(root, options).await {
        Err(e) if tool::is_broken_pipe(&e) => Ok(Exit::Success),
        other => other,
    }
}

async fn show(root: &Root, options: Options) -> anyhow::Result<Exit> {
    let dir = journal_dir(root);
    let mut view = read(&dir, None)?;
    // The journal's order is arrival order; an agent's snapshot arrives in key order.
    view.records
        .sort_by(|(_, a), (_, b)| (a.at_ms, &a.agent, a.seq).cmp(&(b.at_ms, &b.agent, b.seq)));
    if !dir.exists() {
        eprintln!("no event journal at {} (eventd has not run)", dir.display());
    }
    let mut out = std::io::stdout().lock();
    let mut seen = HashSet::new();
    let mut last = None;
    for (index, record) in &view.records {
        seen.insert(record.id.clone());
        last = last.max(Some(*index));
        let stage = if *index < view.cursor {
            Stage::Delivered
        } else {
            Stage::Journalled
        };
        if !options.pending || stage != Stage::Delivered {
            print(&mut out, record, stage, Some(*index), options.json)?;
        }
    }
    if options.pending {
        for event in raised(root, &seen)? {
            print(
                &mut out,
                &record_of(event),
                Stage::Raised,
                None,
                options.json,
            )?;
        }
    }
    out.flush().context("writing to stdout")?;
    drop(out);
    if options.follow {
        follow(&dir, last, options.json).await?;
    }
    Ok(Exit::Success)
}

/// The journal's records, decoded; what cannot be read is said on stderr.
struct Read {
    cursor: u64,
    records: Vec<(u64, EventRecord)>,
}

fn read(dir: &Path, after: Option<u64>) -> anyhow::Result<Read> {
    let view = eventd::view::read(dir, after)
        .with_context(|| format!("reading the event journal in {}", dir.display()))?;
    for damaged in &view.damaged {
        eprintln!("warning: {damaged} (eventd quarantines it when it next starts)");
    }
    let mut records = Vec::with_capacity(view.records.len());
    for (index, payload) in view.records {
        match postcard::from_bytes::<EventRecord>(&payload) {
            Ok(record) => records.push((index, record)),
            Err(e) => eprintln!("warning: journal record {index} is not an event: {e}"),
        }
    }
    Ok(Read {
        cursor: view.cursor,
        records,
    })
}

/// Prints records appended after `last` until SIGINT or SIGTERM.
async fn follow(dir: &Path, mut last: Option<u64>, json: bool) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = tokio::time::sleep(POLL) => {}
        }
        let new = read(dir, last)?;
        let mut out = std::io::stdout().lock();
        for (index, record) in &new.records {
            let stage = if *index < new.cursor {
                Stage::Delivered
            } else {
                Stage::Journalled
            };
            print(&mut out, record, stage, Some(*index), json)?;
            last = Some(*index);
        }
        out.flush().context("writing to stdout")?;
    }
}

/// Events the agents hold that the journal does not: raised, not yet journalled. Read from
/// each agent's `Event` checkpoints (a persistent topic), oldest first.
fn raised(root: &Root, journalled: &HashSet<String>) -> anyhow::Result<Vec<Event>> {
    let dirs = Dirs::under_root(root.base());
    let status = dirs.persist_status();
    let agents = match std::fs::read_dir(&status) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", status.display())),
    };
    let mut events = Vec::new();
    for agent in agents.filter_map(|e| e.ok()) {
        let Some(agent) = agent.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let cp = dirs.checkpoints(&agent, Event::NAME, true);
        let items = checkpoint::read_dir(&cp, Event::NAME)
            .with_context(|| format!("reading {}", cp.display()))?;
        for item in items {
            let event = match item.payload {
                Ok((version, payload)) if version == Event::SCHEMA_VERSION => {
                    postcard::from_bytes::<Event>(&payload).ok()
                }
                _ => None,
            };
            match event {
                Some(e) if !journalled.contains(&e.id) => events.push(e),
                Some(_) => {}
                None => eprintln!(
                    "warning: {}/{} is not a readable event",
                    cp.display(),
                    item.key
                ),
            }
        }
    }
    events.sort_by(|a, b| (a.at_ms, &a.agent, a.seq).cmp(&(b.at_ms, &b.agent, b.seq)));
    Ok(events)
}

fn record_of(e: Event) -> EventRecord {
    EventRecord {
        id: e.id,
        agent: e.agent,
        seq: e.seq,
        severity: e.severity,
        kind: e.kind,
        message: e.message,
        at_ms: e.at_ms,
        fields: e.fields,
        dropped_before: e.dropped_before,
    }
}

fn print(
    out: &mut impl Write,
    record: &EventRecord,
    stage: Stage,
    index: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let mut doc = serde_json::to_value(record).context("encoding an event")?;
        if let Value::Object(map) = &mut doc {
            map.insert("stage".into(), json!(stage.name()));
            map.insert("index".into(), json!(index));
        }
        writeln!(out, "{doc}")
    } else {
        writeln!(out, "{}", line(record, stage))
    }
    .context("writing to stdout")
}

/// One event as a line: time, agent, severity, kind, message, fields. Control characters
/// are escaped, so an event is always one line.
pub fn line(e: &EventRecord, stage: Stage) -> String {
    let fields: Vec<String> = e
        .fields
        .iter()
        .map(|(k, v)| format!("{}={}", one_line(k), one_line(v)))
        .collect();
    let mut message = one_line(&e.message);
    if e.dropped_before > 0 {
        message = format!("({} dropped before) {message}", e.dropped_before);
    }
    if stage == Stage::Raised {
        message = format!("[not yet journalled] {message}");
    }
    let cells = [
        rfc3339_millis(i64::try_from(e.at_ms).unwrap_or(i64::MAX)),
        one_line(&e.agent),
        format!("{:?}", e.severity),
        one_line(&e.kind),
        message,
        fields.join(" "),
    ];
    columns(&cells, &[24, 12, 8, 28])
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::Severity;

    #[test]
    fn a_line_is_one_line_with_every_part() {
        let e = EventRecord {
            id: "ab".into(),
            agent: "modulemgr".into(),
            seq: 3,
            severity: Severity::Error,
            kind: "module.rejected".into(),
            message: "bad\nsignature".into(),
            at_ms: 1_700_000_000_123,
            fields: vec![("module".into(), "tools".into())],
            dropped_before: 2,
        };
        let text = line(&e, Stage::Journalled);
        assert!(
            text.starts_with("2023-11-14T22:13:20.123Z  modulemgr"),
            "{text}"
        );
        for part in [
            "Error",
            "module.rejected",
            "(2 dropped before) bad\\nsignature",
            "module=tools",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(!text.contains('\n'));
        assert!(line(&e, Stage::Raised).contains("[not yet journalled]"));
    }
}
