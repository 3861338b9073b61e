//! eventd's journal under failure, the real binary (built with the crash points): killed at
//! each crash point of append, compaction and delivery; a torn tail and a corrupt segment; a
//! journal over its bound; a persist directory that fills up. The events are raised by this
//! test through agentbase as `heartbeatd`, as the real agent would.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use agentbase::{Context, Root, Settings};
use common::{controller, node_root, resolved_identity, spawn_agent};
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::node_api::EventRecord;
use powernode_types::{AgentState, AgentStatus, EventdStatus, NodeIdentity, Severity};

const WAIT: Duration = Duration::from_secs(60);

fn kill9(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A fresh node root whose agents read `settings` (an agent.toml).
fn root_with(settings: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc/powernode")).unwrap();
    std::fs::write(root.join("etc/powernode/agent.toml"), settings).unwrap();
    (dir, root)
}

fn journal_dir(root: &Path) -> PathBuf {
    root.join("persist/powernode/eventd/journal")
}

/// The journal as a reader sees it (never repairing anything), decoded.
fn journalled(root: &Path) -> Vec<(u64, EventRecord)> {
    let view = eventd::view::read(&journal_dir(root), None).unwrap();
    view.records
        .into_iter()
        .map(|(i, b)| (i, postcard::from_bytes::<EventRecord>(&b).unwrap()))
        .collect()
}

/// The test's own events in the journal, by id: how many times each is there.
fn test_events(root: &Path, kind: &str) -> BTreeMap<String, (usize, EventRecord)> {
    let mut by_id: BTreeMap<String, (usize, EventRecord)> = BTreeMap::new();
    for (_, r) in journalled(root) {
        if r.agent == "heartbeatd" && r.kind == kind {
            by_id.entry(r.id.clone()).or_insert((0, r)).0 += 1;
        }
    }
    by_id
}

fn log(root: &Path) -> String {
    std::fs::read_to_string(root.join("eventd.log")).unwrap_or_default()
}

/// Waits until `done` holds, failing the test with `what` and eventd's log after [`WAIT`].
async fn until(root: &Path, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "not {what} within {WAIT:?}\n{}",
            log(root)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the child to die at its armed crash point.
async fn died_at(root: &Path, child: &mut Child, point: &str) {
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{point} not hit\n{}", log(root));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.signal(), Some(9), "{point}: {status}\n{}", log(root));
    let name = point.split(':').next().unwrap();
    assert!(
        log(root).contains(&format!("failpoint {name} hit")),
        "{point}\n{}",
        log(root)
    );
}

/// eventd's last AgentStatus and EventdStatus once `want` accepts them.
async fn eventd_until(
    root: &Path,
    what: &str,
    want: impl Fn(&AgentStatus, &EventdStatus) -> bool,
) -> (AgentStatus, EventdStatus) {
    let dirs = Dirs::under_root(root);
    let mut agent = Subscription::<AgentStatus>::connect(&dirs, "eventd");
    let mut status = Subscription::<EventdStatus>::connect(&dirs, "eventd");
    let deadline = Instant::now() + WAIT;
    loop {
        if let (Some(a), Some(s)) = (agent.get("eventd"), status.get("global")) {
            if want(a, s) {
                return (a.clone(), s.clone());
            }
        }
        assert!(
            Instant::now() < deadline,
            "eventd not {what}: {:?} {:?}\n{}",
            agent.get("eventd"),
            status.get("global"),
            log(root)
        );
        tokio::select! {
            _ = agent.next() => {}
            _ = status.next() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Whether eventd's only outstanding error, if any, is that it cannot deliver (these tests
/// run no controller, so eventd is Degraded by that alone, as docs/events.md says): the
/// journal itself is healthy.
fn journal_healthy(a: &AgentStatus) -> bool {
    matches!(a.state, AgentState::Running | AgentState::Degraded)
        && a.last_error
            .as_deref()
            .is_none_or(|e| e.starts_with("event delivery:") && !e.contains(" more)"))
}

/// What a restart after a crash must not have needed: a repair of the journal.
fn assert_no_repair(root: &Path, point: &str) {
    let view = eventd::view::read(&journal_dir(root), None).unwrap();
    assert!(view.damaged.is_empty(), "{point}: {:?}", view.damaged);
    let repaired = journalled(root)
        .iter()
        .any(|(_, r)| r.kind == "events.journal_repaired");
    assert!(
        !repaired,
        "{point}: the journal was repaired\n{}",
        log(root)
    );
    assert!(
        !journal_dir(root).join(".quarantine").exists(),
        "{point}: a segment was quarantined"
    );
    assert!(
        !journal_dir(root)
            .join(eventd::segment::COMPACT_TEMP)
            .exists(),
        "{point}: a compaction's temp file left"
    );
}

/// Killed after a batch is written and before it is synced: after the restart every event is
/// in the journal exactly once (the unacknowledged batch is acknowledged, not written again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_the_write_and_the_sync_every_event_is_journalled_once() {
    let (_dir, root) = root_with("");
    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default()).unwrap();
    let mut child = spawn_agent(&root, "eventd", "eventd.journal_written:3");
    for i in 0..200u32 {
        ctx.events
            .raise(Severity::Info, "test.crash", &i.to_string(), &[])
            .unwrap();
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    died_at(&root, &mut child, "eventd.journal_written").await;
    let child = spawn_agent(&root, "eventd", "");
    until(&root, "every event acknowledged", || {
        ctx.events.pending() == 0
    })
    .await;
    let events = test_events(&root, "test.crash");
    assert_eq!(events.len(), 200, "events lost");
    let twice: Vec<_> = events.values().filter(|(n, _)| *n > 1).collect();
    assert!(twice.is_empty(), "journalled twice: {twice:?}");
    assert_no_repair(&root, "eventd.journal_written");
    kill9(child);
}

/// One crash point of compaction: a journal bounded to 64 KiB, filled with Info events and
/// a Critical every tenth; eventd dies at `point` in its first compaction, restarts, and
/// every Critical is in the journal exactly once, nothing twice, with no repair.
async fn killed_in_compaction(point: &str) {
    let (_dir, root) = root_with("[events]\njournal_max_mib = 0.0625\n");
    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default()).unwrap();
    let mut child = spawn_agent(&root, "eventd", point);
    let filler = "x".repeat(1000);
    let mut criticals = 0;
    for i in 0..150u32 {
        let severity = if i % 10 == 9 {
            criticals += 1;
            Severity::Critical
        } else {
            Severity::Info
        };
        ctx.events
            .raise(severity, "test.compact", &format!("{i} {filler}"), &[])
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    died_at(&root, &mut child, point).await;
    let child = spawn_agent(&root, "eventd", "");
    until(&root, "every event acknowledged", || {
        ctx.events.pending() == 0
    })
    .await;
    let events = test_events(&root, "test.compact");
    let twice: Vec<_> = events.values().filter(|(n, _)| *n > 1).collect();
    assert!(twice.is_empty(), "{point}: journalled twice: {twice:?}");
    let kept = events
        .values()
        .filter(|(_, r)| r.severity == Severity::Critical)
        .count();
    assert_eq!(kept, criticals, "{point}: a Critical lost\n{}", log(&root));
    assert!(events.len() < 150, "{point}: nothing was dropped");
    assert_no_repair(&root, point);
    kill9(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_inside_a_compaction_the_journal_is_the_old_or_the_new_one() {
    tokio::join!(
        killed_in_compaction("eventd.compact_written"),
        killed_in_compaction("eventd.compact_renamed"),
        killed_in_compaction("eventd.compact_removing:2"),
    );
}

/// One crash point of delivery, against the real controller: eventd dies at `point` after
/// the controller accepted a batch; after the restart the controller holds every event
/// exactly once and the journal needed no repair.
async fn killed_in_delivery(point: &str) {
    use powernode_controller::storage::{EventQuery, Storage};
    let (dir, root) = node_root();
    let (ctl, token) = controller(dir.path(), Duration::from_secs(3600)).await;
    let identity =
        Publication::<NodeIdentity>::open(&Dirs::under_root(&root), "identitymgr").unwrap();
    identity
        .publish(&resolved_identity(
            &format!("uuid-{point}"),
            token,
            &format!("https://127.0.0.1:{}", ctl.addr().port()),
            ctl.ca_pem(),
        ))
        .unwrap();
    let enrollmgr = spawn_agent(&root, "enrollmgr", "");
    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default()).unwrap();
    for i in 0..50u32 {
        ctx.events
            .raise(Severity::Warning, "test.deliver", &i.to_string(), &[])
            .unwrap();
    }
    let mut child = spawn_agent(&root, "eventd", point);
    died_at(&root, &mut child, point).await;
    let child = spawn_agent(&root, "eventd", "");
    let storage = Storage::open(&dir.path().join("data")).await.unwrap();
    let query = EventQuery {
        kind: Some("test.deliver".into()),
        limit: 1000,
        ..EventQuery::default()
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let stored = storage.events(&query).await.unwrap();
        let ids: std::collections::BTreeSet<&str> = stored.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids.len(), stored.len(), "{point}: an event stored twice");
        if stored.len() == 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{point}: {} of 50 delivered\n{}",
            stored.len(),
            log(&root)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventd_until(&root, "with nothing pending", |_, s| s.pending == 0).await;
    assert_no_repair(&root, point);
    storage.close().await;
    kill9(child);
    kill9(enrollmgr);
    ctl.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_around_the_cursor_write_every_event_reaches_the_controller_once() {
    tokio::join!(
        killed_in_delivery("eventd.delivered"),
        killed_in_delivery("eventd.cursor_written"),
    );
}

/// Raises `n` events of `kind` and waits until eventd has acknowledged them all.
async fn raise_journalled(root: &Path, ctx: &Context, kind: &str, n: u32, filler: &str) {
    for i in 0..n {
        ctx.events
            .raise(Severity::Info, kind, &format!("{i} {filler}"), &[])
            .unwrap();
    }
    until(root, "every event acknowledged", || {
        ctx.events.pending() == 0
    })
    .await;
}

/// A torn tail (cut mid-record) and then a corrupt segment (bytes flipped): eventd raises
/// and journals `events.journal_repaired`, keeps every record outside the damaged part, and
/// goes on (Running, or Degraded only by the delivery this test has no controller for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_and_a_corrupt_segment_are_repaired_and_reported() {
    // 256 KiB: segments of 32 KiB, so a corrupt one is not the last.
    let (_dir, root) = root_with("[events]\njournal_max_mib = 0.25\n");
    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default()).unwrap();
    let child = spawn_agent(&root, "eventd", "");
    raise_journalled(&root, &ctx, "test.torn", 20, "").await;
    kill9(child);

    let before = journalled(&root);
    let listing = eventd::segment::list(&journal_dir(&root)).unwrap();
    let last = &listing.live.last().unwrap().path;
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let child = spawn_agent(&root, "eventd", "");
    until(&root, "the repair journalled", || {
        journalled(&root)
            .iter()
            .any(|(_, r)| r.kind == "events.journal_repaired" && r.message.contains("torn tail"))
    })
    .await;
    let after = journalled(&root);
    assert_eq!(
        after[..before.len() - 1],
        before[..before.len() - 1],
        "a record before the torn one lost"
    );
    eventd_until(&root, "healthy", |a, _| journal_healthy(a)).await;

    // Enough for several segments, then flip bytes in the middle of the first.
    raise_journalled(&root, &ctx, "test.corrupt", 100, &"y".repeat(1000)).await;
    kill9(child);
    let listing = eventd::segment::list(&journal_dir(&root)).unwrap();
    assert!(listing.live.len() >= 3, "{listing:?}");
    let first = &listing.live[0];
    let mut bytes = std::fs::read(&first.path).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 4] {
        *b ^= 0xff;
    }
    std::fs::write(&first.path, bytes).unwrap();
    // What lies past the damaged segment, read before eventd sees the damage.
    let later: Vec<(u64, EventRecord)> = eventd::view::read(&journal_dir(&root), None)
        .unwrap()
        .records
        .into_iter()
        .filter(|(i, _)| *i >= listing.live[1].first)
        .map(|(i, b)| (i, postcard::from_bytes(&b).unwrap()))
        .collect();
    assert!(!later.is_empty());
    let mut child = spawn_agent(&root, "eventd", "");
    until(&root, "the quarantine journalled", || {
        journalled(&root)
            .iter()
            .any(|(_, r)| r.kind == "events.journal_repaired" && r.message.contains("moved to"))
    })
    .await;
    let quarantined = std::fs::read_dir(journal_dir(&root).join(".quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1);
    let now = journalled(&root);
    for record in &later {
        assert!(now.contains(record), "{record:?} lost with the bad segment");
    }
    eventd_until(&root, "healthy", |a, _| journal_healthy(a)).await;
    assert!(child.try_wait().unwrap().is_none(), "eventd exited");
    kill9(child);
}

/// A journal bounded to 64 KiB, offered far more: it stays near its bound, every Critical is
/// kept, Errors outlive Infos, the drops are counted in EventdStatus and `events.dropped`,
/// and every event is either in the journal or counted in a `dropped_before` there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_drops_by_policy_and_says_so() {
    let (_dir, root) = root_with("[events]\njournal_max_mib = 0.0625\n");
    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default()).unwrap();
    let child = spawn_agent(&root, "eventd", "");
    let filler = "z".repeat(500);
    let mut raised = BTreeMap::new();
    for i in 0..400u32 {
        let severity = match i % 20 {
            19 => Severity::Critical,
            9 => Severity::Error,
            _ => Severity::Info,
        };
        ctx.events
            .raise(severity, "test.full", &format!("{i} {filler}"), &[])
            .unwrap();
        *raised.entry(severity).or_insert(0u64) += 1;
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    until(&root, "every event acknowledged", || {
        ctx.events.pending() == 0
    })
    .await;
    let (_, status) = eventd_until(&root, "reporting drops", |_, s| s.dropped_info > 0).await;
    assert_eq!(status.journal_max_bytes, 64 << 10);
    assert!(
        status.journal_bytes <= (64 << 10) + (16 << 10),
        "{status:?}"
    );

    let events = test_events(&root, "test.full");
    let count = |sev| events.values().filter(|(_, r)| r.severity == sev).count() as u64;
    assert_eq!(count(Severity::Critical), raised[&Severity::Critical]);
    assert!(count(Severity::Info) < raised[&Severity::Info]);
    let error_share = count(Severity::Error) as f64 / raised[&Severity::Error] as f64;
    let info_share = count(Severity::Info) as f64 / raised[&Severity::Info] as f64;
    assert!(error_share >= info_share, "Errors went before Infos");
    let counted: u64 = events.values().map(|(_, r)| r.dropped_before).sum();
    assert_eq!(
        events.len() as u64 + counted,
        400,
        "an event neither kept nor counted as dropped"
    );
    until(&root, "events.dropped journalled", || {
        journalled(&root).iter().any(|(_, r)| {
            r.kind == "events.dropped"
                && r.severity == Severity::Warning
                && r.fields.iter().any(|(k, v)| k == "info" && v != "0")
        })
    })
    .await;
    kill9(child);
}

/// The persist directory fills up (a small tmpfs): eventd goes Degraded saying why, does
/// not acknowledge what it could not journal (the agent keeps it), tears nothing, and once
/// space returns journals every event exactly once and clears the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_persist_directory_delays_but_loses_nothing() {
    if !powernode_pubsub::testing::require(&["root", "mount"]) {
        return;
    }
    let disk = powernode_pubsub::testing::SmallTmpfs::mount("8m").unwrap();
    let root = disk.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default()).unwrap();
    let child = spawn_agent(&root, "eventd", "");
    raise_journalled(&root, &ctx, "test.disk", 20, "").await;

    let filler = disk.fill("filler").unwrap();
    for i in 20..60u32 {
        // Not durable while the disk is full: published all the same, and retried.
        let _ = ctx
            .events
            .raise(Severity::Info, "test.disk", &i.to_string(), &[]);
    }
    let (agent, _) = eventd_until(&root, "Degraded by the journal", |a, _| {
        a.state == AgentState::Degraded
            && a.last_error
                .as_deref()
                .is_some_and(|e| e.contains("journal append failed"))
    })
    .await;
    let error = agent.last_error.unwrap_or_default();
    assert!(error.contains("No space left on device"), "{error}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        ctx.events.pending() > 0,
        "acknowledged what was not journalled"
    );
    assert!(eventd::view::read(&journal_dir(&root), None)
        .unwrap()
        .damaged
        .is_empty());

    std::fs::remove_file(filler).unwrap();
    until(&root, "every event acknowledged", || {
        ctx.events.pending() == 0
    })
    .await;
    eventd_until(&root, "healthy again", |a, _| journal_healthy(a)).await;
    let events = test_events(&root, "test.disk");
    let messages: std::collections::BTreeSet<u32> = events
        .values()
        .map(|(_, r)| r.message.trim().parse().unwrap())
        .collect();
    assert_eq!(messages, (0..60).collect(), "events lost");
    assert!(events.values().all(|(n, _)| *n == 1), "journalled twice");
    let listing = eventd::segment::list(&journal_dir(&root)).unwrap();
    let last = &listing.live.last().unwrap().path;
    let scan = eventd::segment::read(last, |_, _| true).unwrap();
    assert!(scan.bad.is_none(), "torn: {:?}", scan.bad);
    kill9(child);
    drop(ctx);
}
