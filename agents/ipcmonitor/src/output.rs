//! How ipcmonitor prints: readable text (aligned columns, one item per block of pretty JSON)
//! or JSON (a document for `--list`, one object per line otherwise).

use std::io::{self, Write};
use std::path::Path;

use powernode_pubsub::inspect::{Snapshot, Source};
use serde_json::{json, Map, Value};

use crate::follow::Change;
use crate::item::ItemValue;
use crate::list::Row;

/// Text for people or JSON for programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Readable text.
    Text,
    /// JSON.
    Json,
}

impl Format {
    /// `Json` when `json` is set.
    pub fn json_if(json: bool) -> Format {
        if json {
            Format::Json
        } else {
            Format::Text
        }
    }
}

/// Writes `rows` under `header` in left-aligned columns two spaces apart; the last column is
/// not padded.
pub fn table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count() + 2;
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `1 item`, `2 items`.
pub fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// A publication as a JSON object: name, agent, topic, item count, publisher up, persistence
/// and checkpoint directory.
pub fn row_json(row: &Row) -> Map<String, Value> {
    let info = &row.info;
    let mut out = Map::new();
    out.insert("publication".into(), json!(info.name()));
    out.insert("agent".into(), json!(info.agent));
    out.insert("topic".into(), json!(info.topic));
    out.insert("items".into(), json!(row.items));
    out.insert("up".into(), json!(row.up));
    out.insert("persistent".into(), json!(info.persistent));
    out.insert(
        "checkpoint_dir".into(),
        json!(info.checkpoint_dir.display().to_string()),
    );
    out
}

/// `ipcmonitor --list`.
pub fn list(out: &mut dyn Write, root: &Path, rows: &[Row], format: Format) -> io::Result<()> {
    if format == Format::Json {
        let all: Vec<Value> = rows.iter().map(|r| Value::Object(row_json(r))).collect();
        return writeln!(out, "{}", Value::Array(all));
    }
    if rows.is_empty() {
        return writeln!(out, "no publications under {}", root.display());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.info.name(),
                r.items.to_string(),
                if r.up { "up" } else { "down" }.to_owned(),
                if r.info.persistent { "persist" } else { "run" }.to_owned(),
            ]
        })
        .collect();
    table(
        out,
        &["PUBLICATION", "ITEMS", "PUBLISHER", "STORAGE"],
        &cells,
    )
}

/// The current items of `name` (only `key`'s when given), with where they came from.
pub fn snapshot(
    out: &mut dyn Write,
    name: &str,
    checkpoint_dir: &Path,
    snapshot: &Snapshot,
    key: Option<&str>,
    format: Format,
) -> io::Result<()> {
    let topic = name.split_once('/').map_or(name, |(_, t)| t);
    let items: Vec<(&String, ItemValue)> = snapshot
        .items
        .iter()
        .filter(|(k, _)| key.is_none_or(|want| want == k.as_str()))
        .map(|(k, item)| (k, ItemValue::from_snapshot(topic, item)))
        .collect();
    match format {
        Format::Json => {
            let mut header = Map::new();
            header.insert("event".into(), json!("snapshot"));
            header.insert("publication".into(), json!(name));
            match &snapshot.source {
                Source::Live {
                    generation,
                    schema_version,
                } => {
                    header.insert("publisher".into(), json!("up"));
                    header.insert("generation".into(), json!(generation));
                    header.insert("schema_version".into(), json!(schema_version));
                }
                Source::Checkpoint { reason } => {
                    header.insert("publisher".into(), json!("down"));
                    header.insert("reason".into(), json!(reason));
                    header.insert(
                        "checkpoint_dir".into(),
                        json!(checkpoint_dir.display().to_string()),
                    );
                }
            }
            header.insert("items".into(), json!(items.len()));
            writeln!(out, "{}", Value::Object(header))?;
            for (k, value) in &items {
                writeln!(out, "{}", event_json("item", k, value))?;
            }
        }
        Format::Text => {
            let n = count(items.len(), "item");
            match &snapshot.source {
                Source::Live {
                    generation,
                    schema_version,
                } => writeln!(
                    out,
                    "{name}: publisher up (generation {generation}, schema version {schema_version}); {n}"
                )?,
                Source::Checkpoint { reason } => writeln!(
                    out,
                    "{name}: publisher down ({reason}); {n} from checkpoint files in {}",
                    checkpoint_dir.display()
                )?,
            }
            for (k, value) in &items {
                writeln!(out, "\n[{k}]\n{}", value.to_text())?;
            }
        }
    }
    out.flush()
}

/// One followed change, flushed at once.
pub fn change(out: &mut dyn Write, change: &Change, format: Format) -> io::Result<()> {
    match format {
        Format::Json => {
            let line = match change {
                Change::PublisherUp {
                    generation,
                    schema_version,
                } => {
                    json!({"event": "publisher_up", "generation": generation, "schema_version": schema_version})
                }
                Change::PublisherDown { reason } => {
                    json!({"event": "publisher_down", "reason": reason})
                }
                Change::Create { key, value } => event_json("create", key, value),
                Change::Modify { key, value } => event_json("modify", key, value),
                Change::Delete { key } => json!({"event": "delete", "key": key}),
                Change::Synchronized => json!({"event": "synchronized"}),
                Change::Restarted { counter } => json!({"event": "restarted", "counter": counter}),
            };
            writeln!(out, "{line}")?;
        }
        Format::Text => match change {
            Change::PublisherUp { generation, .. } => {
                writeln!(out, "publisher up (generation {generation})")?
            }
            Change::PublisherDown { reason } => writeln!(out, "publisher down: {reason}")?,
            Change::Create { key, value } => writeln!(out, "create {key}\n{}", value.to_text())?,
            Change::Modify { key, value } => writeln!(out, "modify {key}\n{}", value.to_text())?,
            Change::Delete { key } => writeln!(out, "delete {key}")?,
            Change::Synchronized => writeln!(out, "synchronized")?,
            Change::Restarted { counter } => writeln!(out, "restarted {counter}")?,
        },
    }
    out.flush()
}

/// `{"event": event, "key": .., "value": ..}` (or `"bytes"`/`"error"` in place of `"value"`).
fn event_json(event: &str, key: &str, value: &ItemValue) -> Value {
    let mut object = Map::new();
    object.insert("event".into(), json!(event));
    object.extend(value.to_json(key));
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use powernode_pubsub::inspect::PublicationInfo;

    use super::*;

    fn text(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> String {
        let mut buf = Vec::new();
        f(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn row(agent: &str, topic: &str, items: usize, up: bool) -> Row {
        Row {
            info: PublicationInfo {
                agent: agent.into(),
                topic: topic.into(),
                persistent: false,
                checkpoint_dir: PathBuf::from(format!("/r/{agent}/{topic}")),
                socket: PathBuf::from(format!("/r/{agent}/{topic}.sock")),
            },
            items,
            up,
        }
    }

    #[test]
    fn list_is_aligned() {
        let rows = [
            row("identitymgr", "AgentStatus", 1, true),
            row("x", "NodeIdentity", 12, false),
        ];
        let out = text(|o| list(o, Path::new("/r"), &rows, Format::Text));
        assert_eq!(
            out,
            "PUBLICATION              ITEMS  PUBLISHER  STORAGE\n\
             identitymgr/AgentStatus  1      up         run\n\
             x/NodeIdentity           12     down       run\n"
        );
        let empty = text(|o| list(o, Path::new("/r"), &[], Format::Text));
        assert_eq!(empty, "no publications under /r\n");
    }

    #[test]
    fn list_json_is_one_array() {
        let rows = [row("a", "T", 2, false)];
        let out = text(|o| list(o, Path::new("/r"), &rows, Format::Json));
        let parsed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed[0]["publication"], "a/T");
        assert_eq!(parsed[0]["items"], 2);
        assert_eq!(parsed[0]["up"], false);
    }

    #[test]
    fn snapshot_from_checkpoints_says_so() {
        let snap = Snapshot {
            source: Source::Checkpoint {
                reason: "refused".into(),
            },
            items: BTreeMap::from([("k".to_owned(), Ok((1, vec![1, 2])))]),
        };
        let dir = Path::new("/r/a/T");
        let out = text(|o| snapshot(o, "a/T", dir, &snap, None, Format::Text));
        assert_eq!(
            out,
            "a/T: publisher down (refused); 1 item from checkpoint files in /r/a/T\n\
             \n[k]\n<2 bytes, unknown topic>\n"
        );
        let out = text(|o| snapshot(o, "a/T", dir, &snap, Some("other"), Format::Json));
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{out}");
        assert_eq!(lines[0]["publisher"], "down");
        assert_eq!(lines[0]["items"], 0);
    }

    #[test]
    fn changes_as_text_and_json_lines() {
        let modify = Change::Modify {
            key: "k".into(),
            value: ItemValue::Json(json!({"b": 1, "a": 2})),
        };
        assert_eq!(
            text(|o| change(o, &modify, Format::Text)),
            "modify k\n{\n  \"a\": 2,\n  \"b\": 1\n}\n"
        );
        assert_eq!(
            text(|o| change(o, &modify, Format::Json)),
            "{\"event\":\"modify\",\"key\":\"k\",\"value\":{\"a\":2,\"b\":1}}\n"
        );
        let down = Change::PublisherDown {
            reason: "closed".into(),
        };
        assert_eq!(
            text(|o| change(o, &down, Format::Text)),
            "publisher down: closed\n"
        );
        assert_eq!(
            text(|o| change(o, &Change::Restarted { counter: 3 }, Format::Json)),
            "{\"counter\":3,\"event\":\"restarted\"}\n"
        );
    }
}
