//! `powernode-agent tasks`: the tasks on this node — what heartbeatd holds (`TaskConfig`) with
//! what their agents say of them (`TaskStatus`), and finished ones their agent still shows
//! until heartbeatd has reported them. Read from the publications, live or from the
//! checkpoints the agents left.

use std::collections::BTreeMap;
use std::io::Write;

use powernode_pubsub::Dirs;
use powernode_types::text::{columns, rfc3339_millis};
use powernode_types::{TaskConfig, TaskStatus};
use serde_json::{json, Value};

use crate::status::items_of;

/// One task as shown.
#[derive(Debug)]
pub struct Shown {
    /// The controller's task id.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Still requested: leased and held by heartbeatd, or (an id `local-…`) asked for by a
    /// `powernode-agent exec` or `sync` still waiting for it; not yet reported.
    pub held: bool,
    /// When the lease runs out (controller clock), while held.
    pub lease_expires_at_ms: Option<u64>,
    /// What the agent that runs it says, if it has started it.
    pub status: Option<TaskStatus>,
}

/// The node's tasks, by id.
pub async fn gather(dirs: &Dirs) -> Vec<Shown> {
    let publications = ipcmonitor::list::rows(dirs).await;
    let mut tasks: BTreeMap<String, Shown> = BTreeMap::new();
    for config in items_of::<TaskConfig>(dirs, &publications).await {
        tasks.insert(
            config.id.clone(),
            Shown {
                id: config.id,
                kind: config.kind,
                held: true,
                lease_expires_at_ms: Some(config.lease_expires_at_ms),
                status: None,
            },
        );
    }
    for status in items_of::<TaskStatus>(dirs, &publications).await {
        let shown = tasks.entry(status.id.clone()).or_insert_with(|| Shown {
            id: status.id.clone(),
            kind: status.kind.clone(),
            held: false,
            lease_expires_at_ms: None,
            status: None,
        });
        shown.status = Some(status);
    }
    tasks.into_values().collect()
}

impl Shown {
    /// As `tasks --json` prints it.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "kind": self.kind,
            "held": self.held,
            "lease_expires_at_ms": self.lease_expires_at_ms,
            "status": self.status.as_ref().and_then(|s| serde_json::to_value(s).ok()),
        })
    }
}

/// The table (or, with `json`, a JSON array) of `tasks`.
pub fn print(out: &mut impl Write, tasks: &[Shown], json: bool) -> std::io::Result<()> {
    if json {
        let all: Vec<Value> = tasks.iter().map(Shown::to_json).collect();
        serde_json::to_writer_pretty(&mut *out, &all)?;
        writeln!(out)?;
        return out.flush();
    }
    writeln!(
        out,
        "{}",
        row(["ID", "KIND", "STATE", "LEASE UNTIL", "STARTED", "FINISHED"])
    )?;
    for task in tasks {
        let time = |ms: Option<u64>| {
            ms.and_then(|ms| i64::try_from(ms).ok())
                .map_or("-".to_owned(), rfc3339_millis)
        };
        let state = match (&task.status, task.held) {
            (Some(s), true) => format!("{:?}", s.state),
            (Some(s), false) => format!("{:?} (reported)", s.state),
            (None, _) => "leased".to_owned(),
        };
        writeln!(
            out,
            "{}",
            row([
                &task.id,
                &task.kind,
                &state,
                &time(task.lease_expires_at_ms),
                &time(task.status.as_ref().map(|s| s.started_at_ms)),
                &time(task.status.as_ref().and_then(|s| s.finished_at_ms)),
            ])
        )?;
    }
    out.flush()
}

fn row(cells: [&str; 6]) -> String {
    columns(&cells, &[21, 16, 22, 24, 24])
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::TaskState;

    #[test]
    fn a_row_says_where_each_task_stands() {
        let tasks = [
            Shown {
                id: "task-1".into(),
                kind: "node.exec".into(),
                held: true,
                lease_expires_at_ms: Some(1_700_000_000_000),
                status: None,
            },
            Shown {
                id: "task-2".into(),
                kind: "node.exec".into(),
                held: false,
                lease_expires_at_ms: None,
                status: Some(TaskStatus {
                    id: "task-2".into(),
                    kind: "node.exec".into(),
                    state: TaskState::Succeeded,
                    output: "ok".into(),
                    started_at_ms: 1_700_000_000_000,
                    finished_at_ms: Some(1_700_000_001_000),
                }),
            },
        ];
        let mut out = Vec::new();
        print(&mut out, &tasks, false).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].contains("leased") && lines[1].contains("2023-11-14T22:13:20.000Z"));
        assert!(lines[2].contains("Succeeded (reported)"), "{text}");
        assert_eq!(lines[0].find("STATE"), lines[1].find("leased"));
    }
}
