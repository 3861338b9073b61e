//! Publisher restarts and crashes, with real `pubsub-peer` processes: checkpoints carry the map
//! across a SIGKILL, subscribers converge across a reconnect (deletes included), persistent topics
//! can be read before their publisher is up, and the restart barrier comes after the snapshot.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

use common::*;
use powernode_pubsub::checkpoint;
use powernode_pubsub::testing::{PersistentTestItem, TestItem};
use powernode_pubsub::{Error, Event, Publication, Subscription};

/// Publisher k0..k2, SIGKILL, restart without publishing anything: the map comes back from the
/// checkpoints, byte for byte. A subscriber that stayed sees no change at all across the
/// restart; a fresh one gets the same three items.
#[tokio::test]
async fn restarted_publisher_reloads_its_items_from_checkpoints() {
    let root = Root::new();
    let dirs = root.dirs();
    let mut first = Peer::publisher(&root, "rs", 3, &[]);
    first.wait_published_async().await;

    let mut stayed = Subscription::<TestItem>::connect(&dirs, "rs");
    let events = until_synchronized(&mut stayed).await;
    assert_eq!(events.len(), 3, "{events:?}");
    let before: BTreeMap<String, TestItem> = stayed
        .items()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect();
    assert_eq!(before.keys().cloned().collect::<Vec<_>>(), keys(3));
    for (i, item) in before.values().enumerate() {
        assert!(peer_item_matches(item, i as u64, 16), "{item:?}");
    }

    first.kill();
    assert_eq!(next_event(&mut stayed).await, Event::Disconnected);

    let second = Peer::publisher(&root, "rs", 0, &[]);
    let reloaded = second.wait_line_async(|l| l.starts_with("reloaded ")).await;
    assert_eq!(reloaded, "reloaded 3 quarantined 0");
    second.wait_published_async().await;

    // The reconnect's snapshot equals what the subscriber holds: no create, modify or delete.
    let events = until_synchronized(&mut stayed).await;
    assert!(
        events.is_empty(),
        "a restart without changes must not change anything: {events:?}"
    );

    let mut fresh = Subscription::<TestItem>::connect(&dirs, "rs");
    let events = until_synchronized(&mut fresh).await;
    let expected: Vec<Event<TestItem>> = before
        .iter()
        .map(|(k, v)| Event::Create {
            key: k.clone(),
            value: v.clone(),
        })
        .collect();
    assert_eq!(
        events, expected,
        "same items, same values (sent_ns included)"
    );
}

/// A subscriber holding k0..k4 loses its publisher; the next publisher starts from nothing and
/// publishes k0, k1 only. It never had k2..k4, so it never sends their deletes: the subscriber
/// must drop them itself when the reconnect's snapshot lacks them.
#[tokio::test]
async fn reconnect_snapshot_sweeps_keys_the_new_publisher_lacks() {
    let root = Root::new();
    let dirs = root.dirs();
    let mut first = Peer::publisher(&root, "sw", 5, &[]);
    first.wait_published_async().await;

    let mut sub = Subscription::<TestItem>::connect(&dirs, "sw");
    let events = until_synchronized(&mut sub).await;
    assert_eq!(events.len(), 5, "{events:?}");
    assert_eq!(
        sub.items().map(|(k, _)| k.to_owned()).collect::<Vec<_>>(),
        keys(5)
    );

    first.kill();
    assert_eq!(next_event(&mut sub).await, Event::Disconnected);
    assert_eq!(
        sub.len(),
        5,
        "items are kept as last known while the publisher is away"
    );

    let second = Peer::publisher(&root, "sw", 2, &["--clear"]);
    assert_eq!(
        second.wait_line_async(|l| l.starts_with("reloaded ")).await,
        "reloaded 0 quarantined 0"
    );
    second.wait_published_async().await;

    let events = until_synchronized(&mut sub).await;
    let mut deleted: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Delete { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect();
    deleted.sort();
    assert_eq!(deleted, ["k2", "k3", "k4"], "events: {events:?}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Create { .. } | Event::Disconnected)),
        "k0, k1 are modified (new sent_ns), not re-created: {events:?}"
    );
    assert_eq!(
        sub.items().map(|(k, _)| k.to_owned()).collect::<Vec<_>>(),
        keys(2)
    );
    for (i, (_, item)) in sub.items().enumerate() {
        assert!(peer_item_matches(item, i as u64, 16), "{item:?}");
    }
    assert!(sub.is_synchronized());
}

/// SIGKILL a publisher in the middle of a burst of checkpoint writes, at varying moments:
/// every checkpoint file left is whole (header, CRC, topic, schema), and the restarted
/// publisher quarantines nothing and reloads every key. At least one kill must land mid-write
/// (a temp file left behind), or the test proved nothing: ten rounds, then more until one has
/// (a kill lands mid-write in roughly a third of the rounds).
#[test]
fn sigkill_during_a_burst_never_leaves_a_torn_checkpoint() {
    const KEYS: u64 = 50;
    const ROUNDS: u64 = 10;
    const MAX_ROUNDS: u64 = 60;
    let root = Root::new();
    let cp_dir = root.dirs().checkpoints("burst", "TestItem", false);
    let mut killed_mid_write = 0;
    let mut rounds = 0;
    while rounds < ROUNDS || (killed_mid_write == 0 && rounds < MAX_ROUNDS) {
        let round = rounds;
        rounds += 1;
        let mut burst = Peer::burst(&root, "burst", KEYS);
        burst.wait_line(|l| l == "bursting");
        // Not a timing assertion: only varies where in the write sequence the kill lands.
        std::thread::sleep(Duration::from_millis(round * 7 % 31));
        burst.kill();

        let mut seen_tmp = false;
        for entry in fs::read_dir(&cp_dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            seen_tmp |= name.ends_with(".tmp");
        }
        killed_mid_write += usize::from(seen_tmp);
        let files = checkpoint_files(&cp_dir);
        let mut expected = keys(KEYS);
        expected.sort();
        assert_eq!(files, expected, "round {round}: every key has its file");
        for name in &files {
            let bytes = fs::read(cp_dir.join(name)).unwrap();
            let payload = checkpoint::decode_for(&bytes, "TestItem", 1)
                .unwrap_or_else(|e| panic!("round {round}: {name} is torn: {e}"));
            let item: TestItem = postcard::from_bytes(payload).unwrap();
            assert_eq!(&item.key, name, "round {round}");
        }

        let mut publisher = Peer::publisher(&root, "burst", 0, &[]);
        assert_eq!(
            publisher.wait_line(|l| l.starts_with("reloaded ")),
            format!("reloaded {KEYS} quarantined 0"),
            "round {round}"
        );
        publisher.wait_published();
        publisher.kill();
        assert!(
            !cp_dir.join(checkpoint::QUARANTINE_DIR).exists(),
            "round {round}: nothing quarantined"
        );
    }
    eprintln!("{killed_mid_write} of {rounds} kills left a temp file behind (swept on reload)");
    assert!(
        killed_mid_write > 0,
        "none of {rounds} kills landed mid-write: no torn write was ever tested"
    );
}

/// A persistent topic is readable from its checkpoint files before its publisher is up; when
/// the publisher comes, its different values arrive as modifications, then `Synchronized`.
#[tokio::test]
async fn persistent_topic_is_read_from_files_before_the_publisher_is_up() {
    let root = Root::new();
    let dirs = root.dirs();
    let mut first = Peer::publisher(&root, "ps", 3, &["--persistent"]);
    first.wait_published_async().await;
    first.kill();
    let cp_dir = dirs.checkpoints("ps", "PersistentTestItem", true);
    assert_eq!(checkpoint_files(&cp_dir), keys(3));

    // Only files now: the socket is left by the killed publisher, but nothing listens on it.
    let mut sub = Subscription::<PersistentTestItem>::connect(&dirs, "ps");
    let mut from_files = Vec::new();
    for i in 0..3u64 {
        match next_event(&mut sub).await {
            Event::Create { key, value } => {
                assert_eq!(key, format!("k{i}"));
                assert!(peer_item_matches(&value.0, i, 16), "{value:?}");
                let bytes = fs::read(cp_dir.join(&key)).unwrap();
                let payload = checkpoint::decode_for(&bytes, "PersistentTestItem", 1).unwrap();
                assert_eq!(
                    postcard::from_bytes::<PersistentTestItem>(payload).unwrap(),
                    value
                );
                from_files.push(value);
            }
            other => panic!("expected the file of k{i}, got {other:?}"),
        }
    }
    assert!(!sub.is_synchronized(), "files are not a live publisher");

    let second = Peer::publisher(&root, "ps", 3, &["--persistent", "--size", "32"]);
    assert_eq!(
        second.wait_line_async(|l| l.starts_with("reloaded ")).await,
        "reloaded 3 quarantined 0"
    );
    let events = until_synchronized(&mut sub).await;
    assert_eq!(events.len(), 3, "{events:?}");
    for (i, event) in events.into_iter().enumerate() {
        match event {
            Event::Modify { key, old, new } => {
                assert_eq!(key, format!("k{i}"));
                assert_eq!(old, from_files[i]);
                assert!(peer_item_matches(&new.0, i as u64, 32), "{new:?}");
            }
            other => panic!("expected a modification of k{i}, got {other:?}"),
        }
    }
    assert!(sub.is_synchronized());
}

/// A persistent topic whose publisher comes and goes between two reconnect attempts of a
/// subscriber that was there first (an agent that publishes and dies at once): the subscriber
/// never reaches it live, yet hears each state it left behind in its files, deletes included.
#[tokio::test]
async fn a_publisher_that_came_and_went_between_attempts_is_read_from_its_files() {
    let root = Root::new();
    let dirs = root.dirs();
    let item = |key: &str, seq: u64| {
        PersistentTestItem(TestItem {
            key: key.into(),
            seq,
            sent_ns: 0,
            payload: vec![],
        })
    };
    let mut sub = Subscription::<PersistentTestItem>::connect(&dirs, "brief");
    // Nothing there yet: the first attempt fails, the (missing) files are read, no event.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sub.next())
            .await
            .is_err(),
        "an event before anything was published"
    );

    // `next` does no I/O between calls, so this publisher lives and dies unseen.
    let publication = Publication::<PersistentTestItem>::open(&dirs, "brief").unwrap();
    publication.publish(&item("a", 1)).unwrap();
    publication.publish(&item("b", 1)).unwrap();
    drop(publication);
    let mut created = vec![next_event(&mut sub).await, next_event(&mut sub).await];
    created.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        created,
        [
            Event::Create {
                key: "a".into(),
                value: item("a", 1)
            },
            Event::Create {
                key: "b".into(),
                value: item("b", 1)
            },
        ]
    );

    let publication = Publication::<PersistentTestItem>::open(&dirs, "brief").unwrap();
    publication.unpublish("a").unwrap();
    publication.publish(&item("b", 2)).unwrap();
    drop(publication);
    let mut changed = vec![next_event(&mut sub).await, next_event(&mut sub).await];
    changed.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        changed,
        [
            Event::Delete {
                key: "a".into(),
                old: item("a", 1)
            },
            Event::Modify {
                key: "b".into(),
                old: item("b", 1),
                new: item("b", 2)
            },
        ]
    );
    assert!(!sub.is_synchronized(), "files are not a live publisher");
    // Unchanged files are not read again: no event while the publisher stays away.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next())
            .await
            .is_err(),
        "unchanged files gave an event"
    );
}

/// `--restarted` signals the barrier before anyone connects: a subscriber gets every item
/// (several snapshot batches of them), then `Synchronized`, then `Restarted 1`, in that order.
#[tokio::test]
async fn restart_barrier_follows_the_whole_snapshot() {
    const KEYS: u64 = 300; // more than one snapshot batch
    let root = Root::new();
    let dirs = root.dirs();
    let publisher = Peer::publisher(&root, "rb", KEYS, &["--restarted"]);
    publisher.wait_published_async().await;

    let mut sub = Subscription::<TestItem>::connect(&dirs, "rb");
    let mut created = Vec::new();
    loop {
        match next_event(&mut sub).await {
            Event::Create { key, value } => {
                assert_eq!(key, value.key);
                created.push(key);
            }
            Event::Synchronized => break,
            other => panic!(
                "before Synchronized, after {} creates: {other:?}",
                created.len()
            ),
        }
    }
    created.sort();
    let mut expected = keys(KEYS);
    expected.sort();
    assert_eq!(created, expected);
    assert_eq!(next_event(&mut sub).await, Event::Restarted { counter: 1 });

    // A second subscriber, connecting later, sees the same order.
    let mut late = Subscription::<TestItem>::connect(&dirs, "rb");
    assert_eq!(until_synchronized(&mut late).await.len(), KEYS as usize);
    assert_eq!(next_event(&mut late).await, Event::Restarted { counter: 1 });
}

/// One publisher per topic: a second one, in another process or in this one, is refused while
/// the first lives, and may take over (reloading the map) once it is gone.
#[tokio::test]
async fn a_second_publisher_is_refused_while_the_first_lives() {
    let root = Root::new();
    let dirs = root.dirs();
    let mut other = Peer::publisher(&root, "two", 3, &[]);
    other.wait_published_async().await;

    match Publication::<TestItem>::open(&dirs, "two") {
        Err(Error::AlreadyPublished { socket, lock }) => {
            assert_eq!(socket, dirs.socket("two", "TestItem"));
            assert_eq!(lock, dirs.lock("two", "TestItem"));
        }
        Err(e) => panic!("expected AlreadyPublished, got {e}"),
        Ok(_) => panic!("a second publisher was allowed while the first lives"),
    }
    // Refusing did not disturb the live publisher.
    let mut sub = Subscription::<TestItem>::connect(&dirs, "two");
    assert_eq!(until_synchronized(&mut sub).await.len(), 3);

    other.kill();
    let mine = Publication::<TestItem>::open(&dirs, "two").expect("the lock died with its owner");
    assert_eq!(mine.keys(), keys(3));
    assert!(matches!(
        Publication::<TestItem>::open(&dirs, "two"),
        Err(Error::AlreadyPublished { .. })
    ));
}

/// A subscriber polled from a `select!` whose timer fires more often than the reconnect backoff
/// (every `next` cancelled after 300 ms, while the backoff grows to 1 s) still connects once
/// the publisher is up: the retry deadline survives the cancelled calls.
#[tokio::test]
async fn cancelled_next_calls_still_reach_the_reconnect() {
    let root = Root::new();
    let dirs = root.dirs();
    let mut sub = Subscription::<TestItem>::connect(&dirs, "late");
    // No publisher for 3 s: the backoff reaches its 1 s maximum.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let _ = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    }
    let publication = Publication::<TestItem>::open(&dirs, "late").unwrap();
    publication
        .publish(&TestItem {
            key: "k".into(),
            seq: 1,
            sent_ns: 0,
            payload: vec![],
        })
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sub.get("k").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reconnected while every next() was cancelled after 300 ms"
        );
        let _ = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    }
}

/// The publisher dies (SIGKILL, from the named crash point) inside the checkpoint write of its
/// third item: after the temp file is written, or after the rename before the directory sync.
/// The restarted publisher finds a whole old state or a whole new one, never a torn file, and
/// sweeps the temp file.
#[test]
fn killed_inside_a_checkpoint_write_the_publisher_restarts_whole() {
    use std::os::unix::process::ExitStatusExt;
    for (point, reloaded) in [
        ("checkpoint.after_temp", "reloaded 2 quarantined 0"),
        ("checkpoint.after_rename", "reloaded 3 quarantined 0"),
    ] {
        let root = Root::new();
        let cp_dir = root.dirs().checkpoints("fp", "TestItem", false);
        let mut armed = Peer::spawn_armed(
            &[
                "publish",
                "--root",
                root.arg(),
                "--agent",
                "fp",
                "--keys",
                "5",
            ],
            &format!("{point}:3"),
        );
        let status = armed.wait_exit();
        assert_eq!(status.signal(), Some(9), "{point}: {status}");
        assert!(
            armed.stderr().contains(&format!("failpoint {point} hit")),
            "{point}: {}",
            armed.stderr()
        );
        let temps: Vec<_> = std::fs::read_dir(&cp_dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert_eq!(
            temps.len(),
            usize::from(point == "checkpoint.after_temp"),
            "{point}"
        );

        let mut second = Peer::publisher(&root, "fp", 0, &[]);
        let line = second.wait_line(|l| l.starts_with("reloaded "));
        assert_eq!(line, reloaded, "{point}");
        second.wait_published();
        second.kill();
        assert!(
            !cp_dir.join(".k2.tmp").exists() && !cp_dir.join(checkpoint::QUARANTINE_DIR).exists(),
            "{point}: {:?}",
            checkpoint_files(&cp_dir)
        );
    }
}
