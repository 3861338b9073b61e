//! Many items and unequal subscribers: a large table synchronizes exactly, and a slow subscriber
//! neither holds back the publisher nor a fast subscriber, and still converges (coalesced).

mod common;

use std::collections::BTreeMap;

use common::*;
use powernode_pubsub::testing::TestItem;
use powernode_pubsub::{Event, Publication, Subscription};

/// A publisher process with 10,000 keys; a fresh subscriber gets exactly 10,000 creates with
/// the right values, then `Synchronized`, and nothing else.
#[tokio::test]
async fn ten_thousand_items_synchronize_to_a_fresh_subscriber() {
    const KEYS: u64 = 10_000;
    let root = Root::on_tmpfs();
    let dirs = root.dirs();
    let publisher = Peer::publisher(&root, "many", KEYS, &[]);
    // 10,000 checkpoint writes: allow for a slow disk when /dev/shm is not usable.
    publisher
        .wait_line_async_within(5 * DEADLINE, |l| l.starts_with("published "))
        .await;

    let mut sub = Subscription::<TestItem>::connect(&dirs, "many");
    let events = until_synchronized(&mut sub).await;
    assert_eq!(events.len(), KEYS as usize);
    let mut got = BTreeMap::new();
    for event in events {
        match event {
            Event::Create { key, value } => {
                let i: u64 = key[1..].parse().unwrap();
                assert!(peer_item_matches(&value, i, 16), "{value:?}");
                assert!(got.insert(key, value).is_none(), "created twice");
            }
            other => panic!("before Synchronized: {other:?}"),
        }
    }
    assert_eq!(got.len(), KEYS as usize);
    assert_eq!(sub.len(), KEYS as usize);
    assert!(sub.is_synchronized());
}

/// Final seq of each key after publishing seq `0..total` over `keys` keys (key = seq % keys).
fn final_seqs(total: u64, keys: u64) -> BTreeMap<String, u64> {
    (total - keys..total)
        .map(|s| (format!("k{}", s % keys), s))
        .collect()
}

/// Per-key seqs of a `subscribe` child's create/modify lines, checking they only grow (values
/// may be skipped, never reordered); and how many such lines there were.
fn peer_progress(lines: &[String]) -> (BTreeMap<String, u64>, usize) {
    let mut seqs: BTreeMap<String, u64> = BTreeMap::new();
    let mut updates = 0;
    for line in lines {
        let mut words = line.split(' ');
        let (Some("create" | "modify"), Some(key), Some(seq)) =
            (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let seq: u64 = seq.parse().unwrap();
        let prev = seqs.insert(key.to_owned(), seq);
        assert!(prev.is_none_or(|p| p < seq), "{key}: {seq} after {prev:?}");
        updates += 1;
    }
    (seqs, updates)
}

/// An in-process publisher rewrites 100 keys 3,000 times while a subscriber process takes 20 ms
/// per event and an in-test subscriber reads at full speed. The publish loop finishes and the
/// fast subscriber reaches every final value while the slow one has shown only a fraction of the
/// updates; the slow one then converges too, having skipped most intermediate values.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_subscriber_holds_back_neither_publisher_nor_fast_subscriber() {
    const KEYS: u64 = 100;
    const UPDATES: u64 = 3_000;
    const SIZE: usize = 1024;
    let total = KEYS + UPDATES;
    let root = Root::on_tmpfs();
    let dirs = root.dirs();
    let publication = Publication::<TestItem>::open(&dirs, "sf").unwrap();
    for s in 0..KEYS {
        publication
            .publish(&test_item(&format!("k{s}"), s, SIZE))
            .unwrap();
    }

    let slow = Peer::subscriber(&root, "sf", &["--sleep-ms", "20"]);
    slow.wait_line_async(|l| l == "synchronized").await;
    let mut fast = Subscription::<TestItem>::connect(&dirs, "sf");
    assert_eq!(until_synchronized(&mut fast).await.len(), KEYS as usize);

    let finals = final_seqs(total, KEYS);
    let fast_finals = finals.clone();
    let fast_task = tokio::spawn(async move {
        let mut seqs: BTreeMap<String, u64> =
            fast.items().map(|(k, v)| (k.to_owned(), v.seq)).collect();
        let mut updates = 0u64;
        while seqs != fast_finals {
            match next_event(&mut fast).await {
                Event::Modify { key, old, new } => {
                    assert!(old.seq < new.seq, "{key}: {} after {}", new.seq, old.seq);
                    assert_eq!(new.payload, vec![(new.seq % 251) as u8; SIZE]);
                    seqs.insert(key, new.seq);
                    updates += 1;
                }
                other => panic!("fast subscriber: {other:?}"),
            }
        }
        (updates, fast)
    });

    for s in KEYS..total {
        publication
            .publish(&test_item(&format!("k{}", s % KEYS), s, SIZE))
            .unwrap();
        if s % 16 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let slow_at_publish_end = peer_progress(&slow.lines()).1;

    let (fast_updates, fast) = fast_task.await.unwrap();
    let (slow_seqs, slow_at_fast_done) = peer_progress(&slow.lines());
    eprintln!(
        "{UPDATES} publishes; fast subscriber: {fast_updates} updates; slow subscriber: \
         {slow_at_publish_end} when publishing ended, {slow_at_fast_done} when the fast one was done"
    );
    // If publishing waited for the slow subscriber, it would have read nearly everything by now.
    assert!(
        slow_at_fast_done < (KEYS + UPDATES / 2) as usize,
        "slow subscriber showed {slow_at_fast_done} updates by the time the fast one had all"
    );
    assert_ne!(
        slow_seqs, finals,
        "the slow subscriber cannot be done already"
    );

    // The slow one converges too, with intermediate values skipped.
    let final_lines: Vec<String> = finals
        .iter()
        .map(|(k, s)| format!("modify {k} {s}"))
        .collect();
    for line in &final_lines {
        slow.wait_line_async(|l| l == line).await;
    }
    let (slow_seqs, slow_updates) = peer_progress(&slow.lines());
    assert_eq!(slow_seqs, finals);
    eprintln!("slow subscriber converged after {slow_updates} updates (incl. {KEYS} creates)");
    assert!(
        slow_updates < total as usize,
        "coalescing: {slow_updates} updates shown for {total} publishes"
    );
    assert_eq!(publication.status().subscribers, 2);
    assert!(fast.is_synchronized());
}
