//! What others may do wrong: corrupt checkpoint files, hostile or foreign clients on the socket,
//! items too large for a frame. None of it may crash a publisher or starve its good subscribers.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use powernode_pubsub::checkpoint::{self, QUARANTINE_DIR};
use powernode_pubsub::frame::{Frame, Hello, MAX_FRAME, MAX_ITEM, PROTOCOL_VERSION};
use powernode_pubsub::testing::{require, TestItem};
use powernode_pubsub::{Dirs, Error, Event, Publication, Subscription, MAX_KEY_LEN};
use tokio_seqpacket::UnixSeqpacket;

/// Writes into the checkpoint directory of `<agent>/TestItem`: a valid k0, and k1 with a flipped
/// payload byte, k2 truncated, k3 written by schema version 2, k4 whose CRC is good but whose
/// payload is not a TestItem, plus a stale temp file of k9.
/// Returns the valid item.
fn prepare_bad_checkpoints(dirs: &Dirs, agent: &str) -> TestItem {
    let dir = dirs.checkpoints(agent, "TestItem", false);
    fs::create_dir_all(&dir).unwrap();
    let file = |item: &TestItem, version| {
        checkpoint::encode("TestItem", version, &postcard::to_stdvec(item).unwrap())
    };
    let good = test_item("k0", 7, 16);
    fs::write(dir.join("k0"), file(&good, 1)).unwrap();
    let mut flipped = file(&test_item("k1", 8, 16), 1);
    *flipped.last_mut().unwrap() ^= 0x10;
    fs::write(dir.join("k1"), flipped).unwrap();
    let whole = file(&test_item("k2", 9, 16), 1);
    fs::write(dir.join("k2"), &whole[..whole.len() - 3]).unwrap();
    fs::write(dir.join("k3"), file(&test_item("k3", 10, 16), 2)).unwrap();
    fs::write(
        dir.join("k4"),
        checkpoint::encode("TestItem", 1, &[0xff; 3]),
    )
    .unwrap();
    let temp = file(&test_item("k9", 11, 16), 1);
    fs::write(dir.join(".k9.tmp"), &temp[..temp.len() / 2]).unwrap();
    good
}

/// What `.quarantine/` holds, as the keys the files were moved from.
fn quarantined_keys(dir: &Path) -> Vec<String> {
    let mut keys: Vec<String> = fs::read_dir(dir.join(QUARANTINE_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .map(|name| name.split('.').next().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

/// Bad checkpoint files are reported, moved aside and never served; the good one is served; the
/// stale temp file is swept. Checked with a publisher process and with an in-process publication.
#[tokio::test]
async fn corrupt_checkpoints_are_quarantined_not_trusted() {
    // A publisher process.
    let root = Root::new();
    let dirs = root.dirs();
    let good = prepare_bad_checkpoints(&dirs, "cc");
    let cp_dir = dirs.checkpoints("cc", "TestItem", false);
    let publisher = Peer::publisher(&root, "cc", 0, &[]);
    publisher.wait_published_async().await;
    let lines = publisher.lines();
    assert_eq!(lines[0], "reloaded 1 quarantined 4", "{lines:?}");
    let mut reported: Vec<&str> = lines[1..5].iter().map(String::as_str).collect();
    reported.sort();
    assert!(
        reported[0].starts_with("quarantined k1 CRC mismatch"),
        "{reported:?}"
    );
    assert!(
        reported[1].starts_with("quarantined k2 truncated"),
        "{reported:?}"
    );
    assert_eq!(
        reported[2], "quarantined k3 schema version 2, expected 1",
        "{reported:?}"
    );
    assert!(
        reported[3].starts_with("quarantined k4 does not decode as TestItem"),
        "{reported:?}"
    );
    assert!(lines[5].starts_with("published 0 "), "{lines:?}");
    assert_eq!(checkpoint_files(&cp_dir), ["k0"]);
    assert_eq!(quarantined_keys(&cp_dir), ["k1", "k2", "k3", "k4"]);
    assert!(!cp_dir.join(".k9.tmp").exists(), "stale temp file swept");

    let mut sub = Subscription::<TestItem>::connect(&dirs, "cc");
    let events = until_synchronized(&mut sub).await;
    assert_eq!(
        events,
        [Event::Create {
            key: "k0".into(),
            value: good.clone()
        }]
    );
    drop(publisher);

    // The same, in this process: the findings are in the publication's status.
    let root = Root::new();
    let dirs = root.dirs();
    let good = prepare_bad_checkpoints(&dirs, "cc");
    let cp_dir = dirs.checkpoints("cc", "TestItem", false);
    let publication = Publication::<TestItem>::open(&dirs, "cc").unwrap();
    let status = publication.status();
    assert_eq!(status.items, 1);
    let mut keys: Vec<&str> = status.quarantined.iter().map(|q| q.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["k1", "k2", "k3", "k4"]);
    for q in &status.quarantined {
        assert!(q.moved_to.starts_with(cp_dir.join(QUARANTINE_DIR)), "{q:?}");
        assert!(q.moved_to.is_file(), "{q:?}");
    }
    assert_eq!(publication.keys(), ["k0"]);
    assert_eq!(publication.get("k0"), Some(good));
    assert!(!cp_dir.join(".k9.tmp").exists());
}

/// Clients that break the protocol in every way `raw-client` knows are dropped (and counted),
/// while a good subscriber connected all along keeps getting every new publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_dropped_and_good_subscribers_carry_on() {
    let root = Root::new();
    let dirs = root.dirs();
    let publication = Publication::<TestItem>::open(&dirs, "hc").unwrap();
    for i in 0..5 {
        publication
            .publish(&test_item(&format!("k{i}"), i, 16))
            .unwrap();
    }
    let mut good = Subscription::<TestItem>::connect(&dirs, "hc");
    assert_eq!(until_synchronized(&mut good).await.len(), 5);
    let socket = publication.socket_path().to_str().unwrap().to_owned();

    let kinds = ["garbage", "truncated", "oversized", "wrong-topic"];
    for (n, kind) in kinds.into_iter().enumerate() {
        let mut client = Peer::spawn(&["raw-client", "--socket", &socket, "--send", kind]);
        let status = client.wait_exit_async().await;
        assert!(status.success(), "{kind}: {status}");
        let lines = client.lines();
        // Every kind gets the publisher's Hello (sent even on a bad one, to say what it is), then
        // is hung up on; a client past the handshake may see some of the snapshot first.
        assert_eq!(
            lines.first().map(String::as_str),
            Some("hello"),
            "{kind}: {lines:?}"
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some("closed"),
            "{kind}: {lines:?}"
        );
        assert!(
            lines[1..lines.len() - 1]
                .iter()
                .all(|l| l == "frame" || l == "synchronized"),
            "{kind}: {lines:?}"
        );
        if kind == "truncated" || kind == "wrong-topic" {
            assert_eq!(
                lines,
                ["hello", "closed"],
                "{kind}: no snapshot before a good Hello"
            );
        }
        let status = publication.status();
        assert_eq!(status.dropped_peers, n as u64 + 1, "{kind}");
        assert_eq!(status.refused_peers, 0, "{kind}");

        let key = format!("after-{kind}");
        let item = test_item(&key, 100 + n as u64, 16);
        publication.publish(&item).unwrap();
        assert_eq!(
            next_event(&mut good).await,
            Event::Create { key, value: item },
            "after {kind}"
        );
    }
    assert_eq!(
        publication.status().subscribers,
        1,
        "only the good one is left"
    );
    assert!(good.is_synchronized());
}

/// Returns a path of the peer binary that uid 65534 may execute: the built one if every directory
/// above it and the file itself are world-executable, else a copy in `dir`.
fn peer_bin_for_nobody(dir: &Path) -> PathBuf {
    let bin = peer_bin();
    let world_x = |p: &Path| fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
    if bin.ancestors().all(world_x) {
        return bin;
    }
    let copy = dir.join("pubsub-peer");
    fs::copy(&bin, &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(
        copy.ancestors().all(world_x),
        "{} is not reachable",
        copy.display()
    );
    copy
}

/// Even with the socket directory opened up by mistake, a process of another user (neither root,
/// nor the agents' uid or gid) is refused by the `SO_PEERCRED` check; root is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_another_uid_are_refused() {
    // Root runs a client as uid 65534.
    if !require(&["root"]) {
        return;
    }
    let root = Root::new();
    let dirs = root.dirs();
    let publication = Publication::<TestItem>::open(&dirs, "uid").unwrap();
    publication.publish(&test_item("k0", 0, 16)).unwrap();

    // Open the way to the socket for everyone: the mistake the credential check guards against.
    let agent_dir = dirs.agent_run_dir("uid");
    for dir in agent_dir
        .ancestors()
        .take_while(|d| d.starts_with(root.path()))
    {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let socket = publication.socket_path().to_owned();
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o777)).unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = peer_bin_for_nobody(bin_dir.path());
    let args = [
        "raw-client",
        "--socket",
        socket.to_str().unwrap(),
        "--send",
        "hello",
    ];

    let mut cmd = Command::new(&bin);
    cmd.args(args).uid(65534).gid(65534);
    let mut nobody = Peer::spawn_command("raw-client as uid 65534".into(), cmd);
    let status = nobody.wait_exit_async().await;
    // Exiting 0 with "closed" means it connected and sent its Hello: the file permissions let it
    // through, and the publisher hung up without answering.
    assert!(status.success(), "{status}: {:?}", nobody.lines());
    assert_eq!(nobody.lines(), ["closed"]);
    let st = publication.status();
    assert_eq!(st.refused_peers, 1);
    assert_eq!(st.dropped_peers, 0);

    let as_root = Peer::spawn_command("raw-client as root".into(), {
        let mut cmd = Command::new(&bin);
        cmd.args(args);
        cmd
    });
    as_root.wait_line_async(|l| l == "synchronized").await;
    assert_eq!(as_root.lines(), ["hello", "frame", "synchronized"]);
    assert_eq!(publication.status().refused_peers, 1);
}

/// A test item under `key` whose postcard encoding is exactly `size` bytes.
fn item_of_encoded_size(key: &str, size: usize) -> TestItem {
    let mut item = test_item(key, 1, 0);
    let empty = postcard::to_stdvec(&item).unwrap().len();
    // The payload's length prefix grows by a byte at each power of 128: shrink to compensate.
    for n in (size.saturating_sub(empty + 8)..=size - empty).rev() {
        item.payload = vec![0x5a; n];
        if postcard::to_stdvec(&item).unwrap().len() == size {
            return item;
        }
    }
    panic!("no payload gives an encoding of {size} bytes");
}

/// The size policy: an item whose encoding exceeds `MAX_ITEM` is refused at publish time with
/// `ItemTooLarge`, leaving no file and no trace; one exactly at the limit, under the longest key,
/// is delivered — directly, in a snapshot, and with the restart barrier after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_larger_than_a_frame_are_refused_and_the_limit_is_delivered() {
    let root = Root::new();
    let dirs = root.dirs();
    let publication = Publication::<TestItem>::open(&dirs, "big").unwrap();
    publication.publish(&test_item("small", 1, 16)).unwrap();
    let mut sub = Subscription::<TestItem>::connect(&dirs, "big");
    assert_eq!(until_synchronized(&mut sub).await.len(), 1);

    let key = "b".repeat(MAX_KEY_LEN);
    let too_large = item_of_encoded_size(&key, MAX_ITEM + 1);
    match publication.publish(&too_large) {
        Err(Error::ItemTooLarge {
            topic,
            key: k,
            size,
            limit,
        }) => {
            assert_eq!(
                (topic, k.as_str(), size, limit),
                ("TestItem", key.as_str(), MAX_ITEM + 1, MAX_ITEM)
            );
        }
        other => panic!("expected ItemTooLarge, got {other:?}"),
    }
    let cp_dir = dirs.checkpoints("big", "TestItem", false);
    assert_eq!(
        checkpoint_files(&cp_dir),
        ["small"],
        "no file for the refused item"
    );
    assert_eq!(
        fs::read_dir(&cp_dir).unwrap().count(),
        1,
        "no temp file either"
    );
    assert_eq!(publication.keys(), ["small"]);
    assert!(publication.get(&key).is_none());

    // Still working: the next publish, exactly at the limit, is delivered and checkpointed.
    let at_limit = item_of_encoded_size(&key, MAX_ITEM);
    publication.publish(&at_limit).unwrap();
    assert_eq!(
        next_event(&mut sub).await,
        Event::Create {
            key: key.clone(),
            value: at_limit.clone()
        }
    );
    let bytes = fs::read(cp_dir.join(&key)).unwrap();
    let payload = checkpoint::decode_for(&bytes, "TestItem", 1).unwrap();
    assert_eq!(payload.len(), MAX_ITEM);
    let small2 = test_item("small2", 2, 16);
    publication.publish(&small2).unwrap();
    assert_eq!(
        next_event(&mut sub).await,
        Event::Create {
            key: "small2".into(),
            value: small2
        }
    );

    // In a snapshot, followed by Synchronized and the restart barrier. The publisher's messages
    // must stay within MAX_FRAME whatever is packed behind the largest item: the item's frame is
    // MAX_FRAME - 2 bytes, and a counter of 200 makes Restarted 3 bytes, so packing all three
    // into one message would overflow by 2 bytes (the subscriber then refuses the message,
    // reconnects, gets the same snapshot, and never synchronizes).
    publication.unpublish("small").unwrap();
    publication.unpublish("small2").unwrap();
    for _ in 0..200 {
        publication.signal_restarted();
    }
    let conn = UnixSeqpacket::connect(publication.socket_path())
        .await
        .unwrap();
    let hello = Frame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        topic: "TestItem",
        schema_version: 1,
        persistent: false,
        generation: 0,
    });
    conn.send(&hello.encode()).await.unwrap();
    let mut buf = vec![0u8; 2 * MAX_FRAME];
    let mut frames: Vec<String> = Vec::new();
    while !frames.last().is_some_and(|f| f.starts_with("restarted")) {
        let info = tokio::time::timeout(DEADLINE, conn.recv(&mut buf))
            .await
            .expect("publisher sends the snapshot")
            .unwrap();
        let len = info.bytes_read();
        assert!(len > 0, "publisher hung up after {frames:?}");
        assert!(
            len <= MAX_FRAME,
            "a {len}-byte message exceeds MAX_FRAME ({MAX_FRAME}) after {frames:?}"
        );
        for f in Frame::decode_all(&buf[..len]) {
            frames.push(match f.unwrap() {
                Frame::Hello(_) => "hello".into(),
                Frame::Update { key, value } => format!("update {} {}", key.len(), value.len()),
                Frame::Delete { .. } => "delete".into(),
                Frame::Synchronized => "synchronized".into(),
                Frame::Restarted { counter } => format!("restarted {counter}"),
            });
        }
    }
    assert_eq!(
        frames,
        [
            "hello".to_owned(),
            format!("update {MAX_KEY_LEN} {MAX_ITEM}"),
            "synchronized".to_owned(),
            "restarted 200".to_owned()
        ]
    );
    drop(conn);

    let mut fresh = Subscription::<TestItem>::connect(&dirs, "big");
    let events = until_synchronized(&mut fresh).await;
    assert_eq!(
        events,
        [Event::Create {
            key: key.clone(),
            value: at_limit
        }]
    );
    assert_eq!(
        next_event(&mut fresh).await,
        Event::Restarted { counter: 200 }
    );
}

/// A reader of `TestItem` whose second field is a bool: a `TestItem` whose `seq` is 0 or 1
/// decodes as one, any other does not. It stands for a publisher whose items stop decoding.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct NarrowReader {
    key: String,
    flag: bool,
}

impl powernode_types::Topic for NarrowReader {
    const NAME: &'static str = "TestItem";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.key.clone()
    }
}

/// An item that arrives well-framed but does not decode is never kept: the subscriber drops the
/// key (a Delete event) instead of acting on the value the publisher has replaced.
#[tokio::test]
async fn an_undecodable_item_drops_its_key() {
    let root = Root::new();
    let dirs = root.dirs();
    let publication = Publication::<TestItem>::open(&dirs, "nd").unwrap();
    publication.publish(&test_item("k0", 0, 4)).unwrap();
    let mut sub = Subscription::<NarrowReader>::connect(&dirs, "nd");
    let events = until_synchronized(&mut sub).await;
    let k0 = NarrowReader {
        key: "k0".into(),
        flag: false,
    };
    assert_eq!(
        events,
        [Event::Create {
            key: "k0".into(),
            value: k0.clone()
        }]
    );

    publication.publish(&test_item("k0", 7, 4)).unwrap();
    assert_eq!(
        next_event(&mut sub).await,
        Event::Delete {
            key: "k0".into(),
            old: k0
        }
    );
    assert!(sub.get("k0").is_none());

    publication.publish(&test_item("k0", 1, 4)).unwrap();
    let k0 = NarrowReader {
        key: "k0".into(),
        flag: true,
    };
    assert_eq!(
        next_event(&mut sub).await,
        Event::Create {
            key: "k0".into(),
            value: k0
        }
    );
}
