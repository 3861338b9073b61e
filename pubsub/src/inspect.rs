//! Read-only views of the pubsub tree for tools: which publications exist, and a one-shot
//! snapshot of one, from its live publisher or, when that is down, from its checkpoint files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_seqpacket::UnixSeqpacket;

use crate::checkpoint::{self, CheckpointError};
use crate::dirs::Dirs;
use crate::key::{validate_key, validate_name};
use crate::subscription::{RawEvent, RawSubscription};

/// One publication found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicationInfo {
    /// The publishing agent.
    pub agent: String,
    /// The topic's name.
    pub topic: String,
    /// Whether its checkpoints live under `persist/`.
    pub persistent: bool,
    /// Its checkpoint directory.
    pub checkpoint_dir: PathBuf,
    /// Its socket.
    pub socket: PathBuf,
}

impl PublicationInfo {
    /// `<agent>/<topic>`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.agent, self.topic)
    }

    /// How many checkpoint files (one per item) it has.
    pub fn checkpoint_count(&self) -> usize {
        fs::read_dir(&self.checkpoint_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| validate_key(n).is_ok())
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Whether a publisher accepts connections on its socket now.
    pub async fn is_up(&self) -> bool {
        is_listening(&self.socket).await
    }
}

/// Whether something accepts connections on `socket` (connects and hangs up at once).
pub async fn is_listening(socket: &Path) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(500), UnixSeqpacket::connect(socket)).await,
        Ok(Ok(_))
    )
}

/// Every publication under `dirs`: live sockets, and checkpoint directories of publishers that
/// are down, sorted by name.
pub fn list(dirs: &Dirs) -> Vec<PublicationInfo> {
    let mut found: BTreeMap<(String, String), PublicationInfo> = BTreeMap::new();
    let mut add = |agent: &str, topic: &str, persistent: bool| {
        if validate_name("agent", agent).is_err() || validate_name("topic", topic).is_err() {
            return;
        }
        let entry = found
            .entry((agent.to_owned(), topic.to_owned()))
            .or_insert_with(|| PublicationInfo {
                agent: agent.to_owned(),
                topic: topic.to_owned(),
                persistent,
                checkpoint_dir: dirs.checkpoints(agent, topic, persistent),
                socket: dirs.socket(agent, topic),
            });
        if persistent && !entry.persistent {
            entry.persistent = true;
            entry.checkpoint_dir = dirs.checkpoints(agent, topic, true);
        }
    };
    for agent in subdirs(&dirs.run) {
        let Ok(rd) = fs::read_dir(dirs.agent_run_dir(&agent)) else {
            continue;
        };
        for entry in rd.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(topic) = name.strip_suffix(".sock") {
                add(&agent, topic, false);
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                add(&agent, &name, false);
            }
        }
    }
    let status = dirs.persist_status();
    for agent in subdirs(&status) {
        for topic in subdirs(&status.join(&agent)) {
            add(&agent, &topic, true);
        }
    }
    found.into_values().collect()
}

fn subdirs(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    out.sort();
    out
}

/// Where a snapshot's items came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The live publisher.
    Live {
        /// The publisher instance.
        generation: u64,
        /// Its schema version of the topic.
        schema_version: u32,
    },
    /// Checkpoint files: the publisher is not up.
    Checkpoint {
        /// Why the live publisher could not be read.
        reason: String,
    },
}

/// One item of a snapshot: its encoded value with the schema version it was written with, or
/// why its checkpoint file is not trusted.
pub type SnapshotItem = Result<(u32, Vec<u8>), CheckpointError>;

/// A publication's items at one moment.
#[derive(Debug)]
pub struct Snapshot {
    /// Live or from files.
    pub source: Source,
    /// Items by key.
    pub items: BTreeMap<String, SnapshotItem>,
}

/// Reads a publication's items: from the live publisher if it answers within `timeout`,
/// otherwise from its checkpoint files (which a crashed publisher leaves consistent).
pub async fn snapshot(dirs: &Dirs, info: &PublicationInfo, timeout: Duration) -> Snapshot {
    let mut sub = RawSubscription::new(dirs, &info.agent, &info.topic, None, false);
    let live = tokio::time::timeout(timeout, async {
        sub.connect_once().await?;
        let mut items = BTreeMap::new();
        let mut source = None;
        loop {
            match sub.next().await {
                RawEvent::Connected {
                    generation,
                    schema_version,
                    ..
                } => {
                    source = Some(Source::Live {
                        generation,
                        schema_version,
                    })
                }
                RawEvent::Update { key, value, .. } => {
                    let schema = match &source {
                        Some(Source::Live { schema_version, .. }) => *schema_version,
                        _ => 0,
                    };
                    items.insert(key, Ok((schema, value)));
                }
                RawEvent::Delete { key } => {
                    items.remove(&key);
                }
                RawEvent::Synchronized => break,
                RawEvent::Restarted { .. } => {}
                RawEvent::Disconnected { reason } => {
                    return Err(crate::Error::Protocol {
                        peer: info.socket.display().to_string(),
                        reason,
                    })
                }
            }
        }
        Ok::<_, crate::Error>((source, items))
    })
    .await;
    let reason = match live {
        Ok(Ok((Some(source), items))) => return Snapshot { source, items },
        Ok(Ok((None, _))) => "no handshake".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no snapshot within {timeout:?}"),
    };
    let items = checkpoint::read_dir(&info.checkpoint_dir, &info.topic)
        .map(|items| items.into_iter().map(|i| (i.key, i.payload)).collect())
        .unwrap_or_default();
    Snapshot {
        source: Source::Checkpoint { reason },
        items,
    }
}
