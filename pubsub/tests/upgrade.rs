//! Checkpoints of an earlier schema version, as an upgrade of the agents leaves them: a topic
//! that can read the earlier version (`Topic::upgrade`) keeps its items — subscribers read
//! them from the files before the publisher is up, the publisher reloads them and writes them
//! again at the current version — and a version it cannot read is still quarantined.

mod common;

use std::fs;

use common::*;
use powernode_pubsub::checkpoint::{self, QUARANTINE_DIR};
use powernode_pubsub::{Event, Publication, Subscription};
use powernode_types::Topic;
use serde::{Deserialize, Serialize};

/// The item as version 1 encoded it.
#[derive(Serialize, Deserialize)]
struct ItemV1 {
    key: String,
    n: u32,
}

/// The item now (version 2): a field more.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Item {
    key: String,
    n: u32,
    note: String,
}

impl Topic for Item {
    const NAME: &'static str = "UpgradeItem";
    const SCHEMA_VERSION: u32 = 2;
    const PERSISTENT: bool = true;
    fn key(&self) -> String {
        self.key.clone()
    }
    fn upgrade(schema_version: u32, payload: &[u8]) -> Option<Self> {
        let v1: ItemV1 = match schema_version {
            1 => postcard::from_bytes(payload).ok()?,
            _ => return None,
        };
        Some(Item {
            key: v1.key,
            n: v1.n,
            note: "from v1".to_owned(),
        })
    }
}

const AGENT: &str = "up";

fn item(key: &str, n: u32, note: &str) -> Item {
    Item {
        key: key.to_owned(),
        n,
        note: note.to_owned(),
    }
}

#[tokio::test]
async fn earlier_versions_are_read_by_subscribers_and_rewritten_by_the_publisher() {
    let root = Root::new();
    let dirs = root.dirs();
    let cp_dir = dirs.checkpoints(AGENT, Item::NAME, true);
    fs::create_dir_all(&cp_dir).unwrap();
    let v1 = postcard::to_stdvec(&ItemV1 {
        key: "old".to_owned(),
        n: 7,
    })
    .unwrap();
    let current = item("new", 8, "written at v2");
    let files = [
        ("old", checkpoint::encode(Item::NAME, 1, &v1)),
        (
            "new",
            checkpoint::encode(Item::NAME, 2, &postcard::to_stdvec(&current).unwrap()),
        ),
        // A version this build has no reader for.
        ("older", checkpoint::encode(Item::NAME, 0, b"?")),
    ];
    for (key, bytes) in &files {
        fs::write(cp_dir.join(key), bytes).unwrap();
    }
    let upgraded = item("old", 7, "from v1");

    // Before the publisher is up: the files, the v1 item upgraded, the unreadable one skipped.
    let mut sub = Subscription::<Item>::connect(&dirs, AGENT);
    let mut from_files = Vec::new();
    for _ in 0..2 {
        match next_event(&mut sub).await {
            Event::Create { key, value } => from_files.push((key, value)),
            other => panic!("expected an item from the files, got {other:?}"),
        }
    }
    from_files.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        from_files,
        vec![
            ("new".to_owned(), current.clone()),
            ("old".to_owned(), upgraded.clone()),
        ]
    );

    // The publisher reloads the v1 item upgraded and writes its file again at v2; the
    // unreadable file is moved aside, as before.
    let publication = Publication::<Item>::open(&dirs, AGENT).unwrap();
    assert_eq!(publication.get("old"), Some(upgraded.clone()));
    assert_eq!(publication.get("new"), Some(current.clone()));
    assert_eq!(publication.get("older"), None);
    let rewritten = fs::read(cp_dir.join("old")).unwrap();
    let payload = checkpoint::decode_for(&rewritten, Item::NAME, 2).unwrap();
    assert_eq!(postcard::from_bytes::<Item>(payload).unwrap(), upgraded);
    assert!(!cp_dir.join("older").exists());
    let quarantined: Vec<String> = fs::read_dir(cp_dir.join(QUARANTINE_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        quarantined.len() == 1 && quarantined[0].starts_with("older"),
        "{quarantined:?}"
    );

    // The live snapshot holds what the files said: nothing changes for the subscriber.
    let events = until_synchronized(&mut sub).await;
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(sub.get("old"), Some(&upgraded));
}
