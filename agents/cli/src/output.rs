//! How the operator CLI prints `status` and `version`: readable text, or one JSON document.

use std::io::{self, Write};

use ipcmonitor::output::{count, row_json, table, Format};
use powernode_types::AgentStatus;
use serde_json::{json, Map, Value};

use crate::status::{AgentHealth, Report, Reported};
use crate::BuildInfo;

/// `powernode-agent status`.
pub fn status(out: &mut dyn Write, report: &Report, format: Format) -> io::Result<()> {
    if format == Format::Json {
        let doc = json!({
            "root": report.root.display().to_string(),
            "agents": report.agents.iter().map(|a| agent_json(a, report.now_ms)).collect::<Vec<_>>(),
            "publications": report.publications.iter().map(|row| {
                let mut object = row_json(row);
                object.insert("from_checkpoint".into(), json!(!row.up));
                Value::Object(object)
            }).collect::<Vec<_>>(),
            "publishers_down": report.publishers_down(),
            "modules": report.modules,
            "mounts": report.mounts,
        });
        return writeln!(out, "{doc}");
    }

    let root = report.root.display();
    if report.publications.is_empty() {
        return writeln!(out, "no agents running under {root}");
    }
    if report.agents.is_empty() {
        writeln!(out, "no agent publishes AgentStatus under {root}")?;
    } else {
        writeln!(out, "agents under {root}:")?;
        let rows: Vec<Vec<String>> = report
            .agents
            .iter()
            .map(|a| agent_cells(a, report.now_ms))
            .collect();
        table(out, &AGENT_HEADER, &rows)?;
    }

    writeln!(out, "\npublications:")?;
    let rows: Vec<Vec<String>> = report
        .publications
        .iter()
        .map(|r| {
            vec![
                r.info.name(),
                r.items.to_string(),
                if r.up {
                    "up".to_owned()
                } else {
                    "down (from checkpoint files)".to_owned()
                },
            ]
        })
        .collect();
    table(out, &["PUBLICATION", "ITEMS", "PUBLISHER"], &rows)?;

    if !report.modules.is_empty() {
        writeln!(out, "\nmodules:")?;
        let rows: Vec<Vec<String>> = report.modules.iter().map(module_cells).collect();
        table(out, &MODULE_HEADER, &rows)?;
    }
    if !report.mounts.is_empty() {
        writeln!(out, "\nmounts:")?;
        let rows: Vec<Vec<String>> = report.mounts.iter().map(mount_cells).collect();
        table(out, &MOUNT_HEADER, &rows)?;
    }

    let down = report.publishers_down();
    if down > 0 {
        writeln!(
            out,
            "\n{down} of {} down: what is shown for them comes from the checkpoint files \
             they left, not from a running agent.",
            count(report.publications.len(), "publisher"),
        )?;
    }
    Ok(())
}

/// `sha256:0123456789ab` from a full digest.
pub(crate) fn short_digest(digest: &str) -> String {
    digest.chars().take("sha256:".len() + 12).collect()
}

/// The columns of [`module_cells`].
pub(crate) const MODULE_HEADER: [&str; 5] = ["MODULE", "STATE", "PROGRESS", "DIGEST", "DETAIL"];

/// The columns of [`mount_cells`].
pub(crate) const MOUNT_HEADER: [&str; 6] = [
    "TARGET",
    "GEN",
    "STATE",
    "SLOT",
    "LAYERS (bottom first)",
    "ERROR",
];

/// The columns of [`agent_cells`].
pub(crate) const AGENT_HEADER: [&str; 6] =
    ["AGENT", "STATE", "PID", "UPTIME", "LAST LOOP", "LAST ERROR"];

/// A mount target's row: generation, state, slot, layers, error.
pub(crate) fn mount_cells(m: &powernode_types::MountStatus) -> Vec<String> {
    vec![
        m.target.clone(),
        m.generation.to_string(),
        format!("{:?}", m.state),
        m.slot.map_or("-".to_owned(), |s| format!("{s:?}")),
        m.layers
            .iter()
            .map(|d| short_digest(d))
            .collect::<Vec<_>>()
            .join(" "),
        m.error.as_deref().unwrap_or("-").replace('\n', " "),
    ]
}

/// A module's row: state, download progress, digest, error or reference.
pub(crate) fn module_cells(m: &powernode_types::ModuleStatus) -> Vec<String> {
    let progress = match m.bytes_total {
        Some(total) if total > 0 => format!(
            "{:.0}% of {}",
            m.bytes_done as f64 * 100.0 / total as f64,
            bytes(total)
        ),
        _ => "-".to_owned(),
    };
    vec![
        m.name.clone(),
        format!("{:?}", m.state),
        progress,
        m.digest.as_deref().map_or("-".to_owned(), short_digest),
        m.error
            .as_deref()
            .map_or_else(|| m.reference.clone(), |e| e.replace('\n', " ")),
    ]
}

/// A byte count in the largest binary unit that keeps it ≥ 1.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An agent's row: state, pid, uptime, time since its last loop, last error.
pub(crate) fn agent_cells(agent: &AgentHealth, now_ms: u64) -> Vec<String> {
    let status = match &agent.reported {
        Reported::Status(status) => status,
        Reported::Missing => {
            let state = if agent.up {
                "starting (no status published yet)"
            } else {
                "down (no status published)"
            };
            return vec![agent.agent.clone(), state.to_owned()];
        }
        Reported::Unreadable(reason) => {
            return vec![agent.agent.clone(), format!("unreadable: {reason}")];
        }
    };
    let state = state_name(status);
    let (state, uptime) = if agent.up {
        (state, duration(elapsed_s(now_ms, status.started_at_ms)))
    } else {
        (format!("down (last said {state})"), "-".to_owned())
    };
    vec![
        agent.agent.clone(),
        state,
        status.pid.to_string(),
        uptime,
        format!("{} ago", duration(elapsed_s(now_ms, status.last_loop_ms))),
        status
            .last_error
            .as_deref()
            .map_or("-".to_owned(), |e| e.replace('\n', " ")),
    ]
}

/// An agent as JSON: its `AgentStatus` fields (or `error`), plus `up`, `from_checkpoint`,
/// `uptime_s` (null when down) and `since_last_loop_s`.
pub(crate) fn agent_json(agent: &AgentHealth, now_ms: u64) -> Value {
    let mut object = Map::new();
    object.insert("agent".into(), json!(agent.agent));
    object.insert("up".into(), json!(agent.up));
    object.insert("from_checkpoint".into(), json!(!agent.up));
    match &agent.reported {
        Reported::Status(status) => {
            if let Ok(Value::Object(fields)) = serde_json::to_value(status) {
                object.extend(fields);
            }
            let uptime = agent.up.then(|| elapsed_s(now_ms, status.started_at_ms));
            object.insert("uptime_s".into(), json!(uptime));
            object.insert(
                "since_last_loop_s".into(),
                json!(elapsed_s(now_ms, status.last_loop_ms)),
            );
        }
        Reported::Missing => {
            object.insert("error".into(), json!("no AgentStatus item published"));
        }
        Reported::Unreadable(reason) => {
            object.insert("error".into(), json!(reason));
        }
    }
    Value::Object(object)
}

/// The state as it is spelled on the wire, e.g. `Running`.
fn state_name(status: &AgentStatus) -> String {
    match serde_json::to_value(status.state) {
        Ok(Value::String(name)) => name,
        _ => format!("{:?}", status.state),
    }
}

/// Whole seconds from `then_ms` to `now_ms`; 0 if `then_ms` is in the future.
pub(crate) fn elapsed_s(now_ms: u64, then_ms: u64) -> u64 {
    now_ms.saturating_sub(then_ms) / 1000
}

/// `42s`, `3m12s`, `5h07m`, `2d04h`.
pub(crate) fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `powernode-agent version`.
pub fn version(out: &mut dyn Write, build: &BuildInfo, format: Format) -> io::Result<()> {
    match format {
        Format::Json => writeln!(
            out,
            "{}",
            json!({
                "name": crate::NAME,
                "version": build.version,
                "git_sha": build.git_sha,
                "rustc": build.rustc,
            })
        ),
        Format::Text => writeln!(
            out,
            "{} {} (git {}, {})",
            crate::NAME,
            build.version,
            build.git_sha,
            build.rustc
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ipcmonitor::list::Row;
    use powernode_pubsub::inspect::PublicationInfo;
    use powernode_types::AgentState;

    use super::*;

    const NOW: u64 = 1_000_000_000;

    fn text(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> String {
        let mut buf = Vec::new();
        f(&mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn row(agent: &str, up: bool) -> Row {
        Row {
            info: PublicationInfo {
                agent: agent.into(),
                topic: "AgentStatus".into(),
                persistent: false,
                checkpoint_dir: PathBuf::from("/r/cp"),
                socket: PathBuf::from("/r/s.sock"),
            },
            items: 1,
            up,
        }
    }

    fn health(agent: &str, up: bool, error: Option<&str>) -> AgentHealth {
        AgentHealth {
            agent: agent.into(),
            up,
            reported: Reported::Status(AgentStatus {
                agent: agent.into(),
                pid: 42,
                version: "0.1.0".into(),
                started_at_ms: NOW - 192_000,
                last_loop_ms: NOW - 2_500,
                state: AgentState::Running,
                last_error: error.map(str::to_owned),
                quarantined_checkpoints: 0,
            }),
        }
    }

    fn report(up: bool) -> Report {
        Report {
            root: PathBuf::from("/r"),
            now_ms: NOW,
            publications: vec![row("alpha", true), row("beta", up)],
            agents: vec![
                health("alpha", true, None),
                health("beta", up, Some("boom")),
            ],
            modules: vec![],
            mounts: vec![],
        }
    }

    #[test]
    fn durations() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (60, "1m00s"),
            (192, "3m12s"),
            (3600, "1h00m"),
            (18_420, "5h07m"),
            (86_400 * 2 + 3600 * 4, "2d04h"),
        ];
        for (secs, want) in cases {
            assert_eq!(duration(secs), want, "{secs}");
        }
        assert_eq!(elapsed_s(1000, 5000), 0, "future times clamp to 0");
    }

    #[test]
    fn text_says_which_publishers_are_down() {
        let out = text(|o| status(o, &report(false), Format::Text));
        assert_eq!(
            out,
            "agents under /r:\n\
             AGENT  STATE                     PID  UPTIME  LAST LOOP  LAST ERROR\n\
             alpha  Running                   42   3m12s   2s ago     -\n\
             beta   down (last said Running)  42   -       2s ago     boom\n\
             \n\
             publications:\n\
             PUBLICATION        ITEMS  PUBLISHER\n\
             alpha/AgentStatus  1      up\n\
             beta/AgentStatus   1      down (from checkpoint files)\n\
             \n\
             1 of 2 publishers down: what is shown for them comes from the checkpoint files \
             they left, not from a running agent.\n"
        );
        let all_up = text(|o| status(o, &report(true), Format::Text));
        assert!(!all_up.contains("down"), "{all_up}");
    }

    #[test]
    fn modules_and_mounts_get_their_tables() {
        use powernode_types::{ModuleState, ModuleStatus, MountState, MountStatus, Slot};
        let mut r = report(true);
        let digest = format!("sha256:{}", "ab".repeat(32));
        r.modules = vec![
            ModuleStatus {
                name: "tools".into(),
                reference: "reg/m/tools:1".into(),
                state: ModuleState::Downloading,
                digest: Some(digest.clone()),
                bytes_done: 1 << 20,
                bytes_total: Some(4 << 20),
                error: None,
            },
            ModuleStatus {
                name: "bad".into(),
                reference: "reg/m/bad:1".into(),
                state: ModuleState::Failed,
                digest: None,
                bytes_done: 0,
                bytes_total: None,
                error: Some("verification failed: signature".into()),
            },
        ];
        r.mounts = vec![MountStatus {
            target: "modules".into(),
            generation: 3,
            state: MountState::Mounted,
            slot: Some(Slot::B),
            layers: vec![digest],
            error: None,
            upper_dir: None,
            drift: None,
            confirm_until_ms: None,
        }];
        let out = text(|o| status(o, &r, Format::Text));
        assert!(
            out.ends_with(
                "modules:\n\
                 MODULE  STATE        PROGRESS        DIGEST               DETAIL\n\
                 tools   Downloading  25% of 4.0 MiB  sha256:abababababab  reg/m/tools:1\n\
                 bad     Failed       -               -                    verification failed: signature\n\
                 \n\
                 mounts:\n\
                 TARGET   GEN  STATE    SLOT  LAYERS (bottom first)  ERROR\n\
                 modules  3    Mounted  B     sha256:abababababab    -\n"
            ),
            "{out}"
        );
        let doc: Value = serde_json::from_str(&text(|o| status(o, &r, Format::Json))).unwrap();
        assert_eq!(doc["modules"][0]["bytes_done"], 1 << 20);
        assert_eq!(doc["mounts"][0]["slot"], "B");
    }

    #[test]
    fn nothing_running_is_said_plainly() {
        let empty = Report {
            root: PathBuf::from("/r"),
            now_ms: NOW,
            publications: vec![],
            agents: vec![],
            modules: vec![],
            mounts: vec![],
        };
        assert_eq!(
            text(|o| status(o, &empty, Format::Text)),
            "no agents running under /r\n"
        );
    }

    #[test]
    fn json_flags_checkpoint_fallback() {
        let out = text(|o| status(o, &report(false), Format::Json));
        let doc: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(doc["publishers_down"], 1);
        let beta = &doc["agents"][1];
        assert_eq!(beta["agent"], "beta");
        assert_eq!(beta["from_checkpoint"], true);
        assert_eq!(beta["uptime_s"], Value::Null);
        assert_eq!(beta["last_error"], "boom");
        assert_eq!(doc["agents"][0]["uptime_s"], 192);
        assert_eq!(doc["agents"][0]["state"], "Running");
        assert_eq!(doc["publications"][1]["from_checkpoint"], true);
    }

    #[test]
    fn version_text_and_json() {
        let build = BuildInfo {
            version: "0.1.0",
            git_sha: "abc1234",
            rustc: "rustc 1.85.0",
        };
        assert_eq!(
            text(|o| version(o, &build, Format::Text)),
            "powernode-agent 0.1.0 (git abc1234, rustc 1.85.0)\n"
        );
        let doc: Value = serde_json::from_str(&text(|o| version(o, &build, Format::Json))).unwrap();
        assert_eq!(doc["git_sha"], "abc1234");
    }
}
