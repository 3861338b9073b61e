//! `powernode-agent status`: what every agent says about its health (its `<agent>/AgentStatus`
//! publication) and the state of every publication, from the live publishers or, for those
//! that are down, from the checkpoint files they left.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipcmonitor::list::{self, Row};
use powernode_pubsub::inspect::{self, SnapshotItem, Source};
use powernode_pubsub::Dirs;
use powernode_types::{AgentStatus, ModuleStatus, MountStatus, Topic};

/// How long a live publisher has to deliver its snapshot before its checkpoint files are read.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3);

/// Everything `status` shows.
#[derive(Debug)]
pub struct Report {
    /// The root the publications were found under.
    pub root: PathBuf,
    /// When the report was taken, unix milliseconds.
    pub now_ms: u64,
    /// Every publication.
    pub publications: Vec<Row>,
    /// One entry per item of every `AgentStatus` publication.
    pub agents: Vec<AgentHealth>,
    /// Every module's state (`modulemgr/ModuleStatus`).
    pub modules: Vec<ModuleStatus>,
    /// Every mount target's state (`mountmgr/MountStatus`).
    pub mounts: Vec<MountStatus>,
}

impl Report {
    /// How many publications have no publisher up.
    pub fn publishers_down(&self) -> usize {
        self.publications.iter().filter(|r| !r.up).count()
    }
}

/// One agent's health.
#[derive(Debug)]
pub struct AgentHealth {
    /// The agent, from its publication's name (or its item's key).
    pub agent: String,
    /// Whether its `AgentStatus` publisher answered: if not, what follows is from the
    /// checkpoint file the agent left, i.e. its last word.
    pub up: bool,
    /// What it reported.
    pub reported: Reported,
}

/// What an agent's `AgentStatus` publication holds for it.
#[derive(Debug)]
pub enum Reported {
    /// Its status.
    Status(AgentStatus),
    /// The publication has no item (the agent has not published its status yet).
    Missing,
    /// The item could not be read (bad checkpoint, another schema version).
    Unreadable(String),
}

/// Reads every publication under `dirs`, and every agent's `AgentStatus`.
pub async fn gather(dirs: &Dirs, root: PathBuf) -> Report {
    let publications = list::rows(dirs).await;
    let mut agents = Vec::new();
    for row in publications
        .iter()
        .filter(|r| r.info.topic == AgentStatus::NAME)
    {
        let snapshot = inspect::snapshot(dirs, &row.info, SNAPSHOT_TIMEOUT).await;
        let up = matches!(snapshot.source, Source::Live { .. });
        if snapshot.items.is_empty() {
            agents.push(AgentHealth {
                agent: row.info.agent.clone(),
                up,
                reported: Reported::Missing,
            });
        }
        for (key, item) in &snapshot.items {
            agents.push(AgentHealth {
                agent: key.clone(),
                up,
                reported: reported(item),
            });
        }
    }
    let modules = items_of::<ModuleStatus>(dirs, &publications).await;
    let mounts = items_of::<MountStatus>(dirs, &publications).await;
    Report {
        root,
        now_ms: now_ms(),
        publications,
        agents,
        modules,
        mounts,
    }
}

/// Every readable item of topic `T` in any publication (bad ones are left out: the
/// publications table already shows a publication whose checkpoints are bad).
pub(crate) async fn items_of<T: Topic>(dirs: &Dirs, publications: &[list::Row]) -> Vec<T> {
    let mut out = Vec::new();
    for row in publications.iter().filter(|r| r.info.topic == T::NAME) {
        let snapshot = inspect::snapshot(dirs, &row.info, SNAPSHOT_TIMEOUT).await;
        out.extend(
            snapshot
                .items
                .values()
                .filter_map(|item| decode::<T>(item).ok()),
        );
    }
    out
}

/// A snapshot's item as a `T`, or why it cannot be read as one. A checkpoint an earlier
/// version wrote (an agent down since an upgrade) is read through `T::upgrade`, as the
/// agents' own subscriptions read it.
pub(crate) fn decode<T: Topic>(item: &SnapshotItem) -> Result<T, String> {
    match item {
        Err(e) => Err(format!("bad checkpoint file: {e}")),
        Ok((schema, bytes)) if *schema < T::SCHEMA_VERSION => T::upgrade(*schema, bytes)
            .ok_or_else(|| {
                format!(
                    "schema version {schema}, which this build cannot upgrade to version {}",
                    T::SCHEMA_VERSION
                )
            }),
        Ok((schema, _)) if *schema != T::SCHEMA_VERSION => Err(format!(
            "schema version {schema}; this build reads version {}",
            T::SCHEMA_VERSION
        )),
        Ok((_, bytes)) => {
            postcard::from_bytes::<T>(bytes).map_err(|e| format!("does not decode: {e}"))
        }
    }
}

fn reported(item: &SnapshotItem) -> Reported {
    match decode::<AgentStatus>(item) {
        Ok(status) => Reported::Status(status),
        Err(reason) => Reported::Unreadable(reason),
    }
}

/// The node's clock, unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::ControllerStatus;

    /// The first sample of a golden file of the types crate, as bytes.
    fn golden(text: &str) -> Vec<u8> {
        let line = text.lines().find(|l| !l.starts_with('#')).unwrap();
        (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A checkpoint an earlier version wrote is shown upgraded, as the agents read it; one of
    /// a later version, or one the upgrade cannot read, is unreadable with the reason.
    #[test]
    fn a_checkpoint_of_an_earlier_schema_is_read_through_the_upgrade() {
        let v1 = golden(include_str!(
            "../../../types/tests/golden/ControllerStatus.v1.hex"
        ));
        let status = decode::<ControllerStatus>(&Ok((1, v1.clone()))).unwrap();
        assert_eq!(status.applied_generation, 7);
        assert_eq!(status.controller_url, None);
        assert_eq!(
            status.last_error.as_deref(),
            Some("heartbeat: connection reset")
        );

        let later = decode::<ControllerStatus>(&Ok((ControllerStatus::SCHEMA_VERSION + 1, v1)));
        assert!(later.unwrap_err().contains("this build reads version"));
        let garbage = decode::<ControllerStatus>(&Ok((1, vec![0xff; 3])));
        assert!(garbage.unwrap_err().contains("cannot upgrade"));
    }
}
