//! What the disk may do to a publisher: fill up, grow a directory where a checkpoint file
//! belongs, lose the checkpoint directory, or have a file where it belongs. None of it may fail
//! a publish or stop a publisher; every change stays published, is reported as not durable, is
//! written once it can be, and the report clears when it is.

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use powernode_pubsub::checkpoint::{self, QUARANTINE_DIR};
use powernode_pubsub::inspect;
use powernode_pubsub::testing::{PersistentTestItem, SmallTmpfs, TestItem};
use powernode_pubsub::{Dirs, Event, Publication, PublicationHealth, Subscription};
use tokio::sync::watch;

/// Waits until the publication's health satisfies `pred`, failing the test after [`DEADLINE`].
async fn health_until(
    rx: &mut watch::Receiver<PublicationHealth>,
    what: &str,
    pred: impl Fn(&PublicationHealth) -> bool,
) -> PublicationHealth {
    let found = tokio::time::timeout(DEADLINE, rx.wait_for(|h| pred(h)))
        .await
        .map(|r| r.map(|h| h.clone()));
    match found {
        Ok(Ok(h)) => h,
        _ => panic!("no health {what} within {DEADLINE:?}: {:?}", *rx.borrow()),
    }
}

fn stray_temps(dir: &std::path::Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// A full disk: publishes still succeed and reach subscribers, the keys are reported not
/// durable with the error, no temp file is left behind, and when space returns the retry
/// writes the current values (including one republished unchanged meanwhile) and the report
/// clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_delays_checkpoints_but_loses_nothing() {
    if !powernode_pubsub::testing::require(&["root", "mount"]) {
        return;
    }
    let disk = SmallTmpfs::mount("1m").unwrap();
    let dirs = Dirs::under_root(disk.path());
    let publication = Publication::<PersistentTestItem>::open(&dirs, "full").unwrap();
    let mut health = publication.watch_health();
    let item = |key: &str, seq| PersistentTestItem(test_item(key, seq, 64));
    publication.publish(&item("before", 1)).unwrap();
    let mut sub = Subscription::<PersistentTestItem>::connect(&dirs, "full");
    until_synchronized(&mut sub).await;

    let filler = disk.fill("filler").unwrap();
    publication.publish(&item("during", 2)).unwrap();
    publication.publish(&item("before", 3)).unwrap();
    for _ in 0..2 {
        match next_event(&mut sub).await {
            Event::Create { .. } | Event::Modify { .. } => {}
            other => panic!("expected the change to be delivered, got {other:?}"),
        }
    }
    assert!(!publication.is_durable("during"));
    let h = health_until(&mut health, "with two keys not durable", |h| {
        h.not_durable.len() == 2
    })
    .await;
    assert!(
        h.not_durable["during"].contains("No space left on device"),
        "{h:?}"
    );
    let cp_dir = dirs.checkpoints("full", "PersistentTestItem", true);
    assert_eq!(stray_temps(&cp_dir), Vec::<String>::new());
    // Republishing an unchanged value while the disk is full is still not durable.
    publication.publish(&item("during", 2)).unwrap();
    assert!(!publication.is_durable("during"));

    fs::remove_file(filler).unwrap();
    health_until(&mut health, "with every key durable", |h| {
        h.not_durable.is_empty()
    })
    .await;
    assert!(publication.is_durable("during") && publication.is_durable("before"));
    for (key, seq) in [("before", 3), ("during", 2)] {
        let bytes = fs::read(cp_dir.join(key)).unwrap();
        let payload = checkpoint::decode_for(&bytes, "PersistentTestItem", 1).unwrap();
        let on_disk: PersistentTestItem = postcard::from_bytes(payload).unwrap();
        assert_eq!(on_disk.0.seq, seq, "{key}");
    }
}

/// A directory where a key's checkpoint file belongs, found at open or appearing later, is
/// moved aside and reported; the item is written; nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_in_a_checkpoint_files_place_is_moved_aside() {
    let root = Root::new();
    let dirs = root.dirs();
    let cp_dir = dirs.checkpoints("obstacle", "TestItem", false);
    fs::create_dir_all(cp_dir.join("k0/inside")).unwrap();
    let publication = Publication::<TestItem>::open(&dirs, "obstacle").unwrap();
    let mut health = publication.watch_health();
    assert_eq!(publication.status().quarantined.len(), 1);
    assert_eq!(publication.status().items, 0);

    fs::create_dir_all(cp_dir.join("k1/inside")).unwrap();
    publication.publish(&test_item("k0", 1, 8)).unwrap();
    publication.publish(&test_item("k1", 1, 8)).unwrap();
    let h = health_until(&mut health, "with both obstacles", |h| {
        h.quarantined.len() == 2
    })
    .await;
    assert!(h.not_durable.is_empty(), "{h:?}");
    assert!(h.quarantined[1].reason.contains("directory"), "{h:?}");
    assert_eq!(checkpoint_files(&cp_dir), ["k0", "k1"]);
    assert_eq!(
        fs::read_dir(cp_dir.join(QUARANTINE_DIR)).unwrap().count(),
        2
    );
}

/// A regular file where the checkpoint directory belongs (or the agent's directory), and the
/// directory deleted under a running publisher: the publisher opens, moves the file aside,
/// and writes every item again into a new directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_checkpoint_directory_is_made_again() {
    let root = Root::new();
    let dirs = root.dirs();
    let cp_dir = dirs.checkpoints("replaced", "PersistentTestItem", true);
    fs::create_dir_all(cp_dir.parent().unwrap().parent().unwrap()).unwrap();
    fs::write(cp_dir.parent().unwrap(), b"not a directory").unwrap();
    let publication = Publication::<PersistentTestItem>::open(&dirs, "replaced").unwrap();
    let status = publication.status();
    assert_eq!(status.quarantined.len(), 1, "{status:?}");
    assert!(status.quarantined[0].moved_to.exists());
    let item = |key: &str| PersistentTestItem(test_item(key, 1, 8));
    publication.publish(&item("a")).unwrap();
    publication.publish(&item("b")).unwrap();
    assert_eq!(checkpoint_files(&cp_dir), ["a", "b"]);

    fs::remove_dir_all(&cp_dir).unwrap();
    fs::write(&cp_dir, b"in the way").unwrap();
    let mut health = publication.watch_health();
    publication.publish(&item("c")).unwrap();
    let h = health_until(&mut health, "back to durable", |h| {
        h.not_durable.is_empty() && h.quarantined.len() == 2
    })
    .await;
    assert!(h.quarantined[1].moved_to.exists(), "{h:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(checkpoint_files(&cp_dir), ["a", "b", "c"]);
}

/// Files whose names are no key are moved aside at load, not left to be counted as items.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_named_like_no_key_are_quarantined() {
    let root = Root::new();
    let dirs = root.dirs();
    let cp_dir = dirs.checkpoints("names", "TestItem", false);
    fs::create_dir_all(&cp_dir).unwrap();
    fs::write(cp_dir.join("has space"), b"x").unwrap();
    fs::write(cp_dir.join("semi;colon"), b"x").unwrap();
    let publication = Publication::<TestItem>::open(&dirs, "names").unwrap();
    publication.publish(&test_item("good", 1, 8)).unwrap();
    let mut reasons: Vec<_> = publication
        .status()
        .quarantined
        .iter()
        .map(|q| (q.key.clone(), q.reason.contains("not a key")))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("has space".to_owned(), true),
            ("semi;colon".to_owned(), true)
        ]
    );
    let info = inspect::list(&dirs)
        .into_iter()
        .find(|i| i.agent == "names")
        .unwrap();
    assert_eq!(info.checkpoint_count(), 1);
}

/// The checkpoint directory deleted under a running publisher and made again by someone else
/// with a stale file in it: an unpublish alone notices (its file is gone because the directory
/// is), the directory is reopened, every item written again and the stale file removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_directory_is_noticed_and_its_stale_files_removed() {
    let root = Root::new();
    let dirs = root.dirs();
    let publication = Publication::<TestItem>::open(&dirs, "deleted").unwrap();
    let mut health = publication.watch_health();
    publication.publish(&test_item("a", 1, 8)).unwrap();
    publication.publish(&test_item("b", 1, 8)).unwrap();
    let cp_dir = dirs.checkpoints("deleted", "TestItem", false);
    fs::remove_dir_all(&cp_dir).unwrap();
    fs::create_dir(&cp_dir).unwrap();
    fs::write(
        cp_dir.join("stale"),
        checkpoint::encode("TestItem", 1, b"old"),
    )
    .unwrap();
    publication.unpublish("a").unwrap();
    assert!(!publication.is_durable("a"), "the deletion went unnoticed");
    health_until(&mut health, "durable again", |h| h.not_durable.is_empty()).await;
    assert_eq!(checkpoint_files(&cp_dir), ["b"]);
}

/// A symlink to a directory where the agent's checkpoint directory belongs is a directory,
/// not an obstacle: nothing is moved aside, the files go where it points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_directory_is_never_moved_aside() {
    let root = Root::new();
    let dirs = root.dirs();
    let elsewhere = root.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    let agent_dir = dirs.persist_status().join("sym");
    fs::create_dir_all(dirs.persist_status()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &agent_dir).unwrap();
    let publication = Publication::<PersistentTestItem>::open(&dirs, "sym").unwrap();
    publication
        .publish(&PersistentTestItem(test_item("k", 1, 8)))
        .unwrap();
    assert!(publication.status().quarantined.is_empty());
    assert!(fs::symlink_metadata(&agent_dir).unwrap().is_symlink());
    assert_eq!(
        checkpoint_files(&elsewhere.join("PersistentTestItem")),
        ["k"]
    );
}

/// `unpublish_many` removes a range of items as one unpublish each would: the files are gone,
/// a subscriber sees each delete, keys not held are passed over, and a directory standing
/// where one of the files belongs is moved aside without stopping the others' removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_many_removes_every_file_and_tells_subscribers() {
    let root = Root::new();
    let dirs = root.dirs();
    let publication = Publication::<TestItem>::open(&dirs, "many").unwrap();
    for key in ["a", "b", "c", "d"] {
        publication.publish(&test_item(key, 1, 8)).unwrap();
    }
    let mut sub = Subscription::<TestItem>::connect(&dirs, "many");
    until_synchronized(&mut sub).await;
    let cp_dir = dirs.checkpoints("many", "TestItem", false);
    fs::remove_file(cp_dir.join("c")).unwrap();
    fs::create_dir(cp_dir.join("c")).unwrap();

    publication
        .unpublish_many(&["a", "c", "never-published", "d"])
        .unwrap();

    let mut deleted = Vec::new();
    while deleted.len() < 3 {
        match next_event(&mut sub).await {
            Event::Delete { key, .. } => deleted.push(key),
            other => panic!("expected deletes, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, ["a", "c", "d"]);
    assert_eq!(publication.keys(), ["b"]);
    assert_eq!(checkpoint_files(&cp_dir), ["b"]);
    let status = publication.status();
    assert!(status.not_durable.is_empty(), "{status:?}");
    assert_eq!(status.quarantined.len(), 1, "{status:?}");
    assert_eq!(status.quarantined[0].key, "c");
}

/// An invalid key refuses the whole `unpublish_many`: nothing is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_many_with_an_invalid_key_removes_nothing() {
    let root = Root::new();
    let dirs = root.dirs();
    let publication = Publication::<TestItem>::open(&dirs, "refused").unwrap();
    publication.publish(&test_item("a", 1, 8)).unwrap();
    assert!(publication.unpublish_many(&["a", "../x"]).is_err());
    assert_eq!(publication.keys(), ["a"]);
    assert_eq!(
        checkpoint_files(&dirs.checkpoints("refused", "TestItem", false)),
        ["a"]
    );
}
