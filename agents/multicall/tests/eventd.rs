//! eventd, the real binary, journalling the events of an agent that this test plays (it
//! raises as `heartbeatd` through agentbase, as the real agent would), while eventd is killed
//! with SIGKILL at random moments of the burst.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use agentbase::{Context, Root, Settings};
use common::{controller, journalled, node_root, now_ms, resolved_identity, spawn_agent};
use powernode_controller::server::{RunningController, ServeOptions};
use powernode_controller::storage::{EventQuery, Storage, StoredEvent};
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::node_api::EventRecord;
use powernode_types::{EventdStatus, NodeIdentity, Severity};

fn kill9(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// 2,000 events raised while eventd is killed five times: every one is journalled (none
/// lost), and once eventd has acknowledged them the raiser holds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_eventd_during_a_burst_loses_nothing() {
    let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default()).unwrap();
    let mut child = Some(spawn_agent(&root, "eventd", ""));
    let mut kills = 0;
    for i in 0..2000u32 {
        // Sequence numbers come from agentbase; the id is what the controller counts by.
        ctx.events
            .raise(Severity::Info, "test.burst", &i.to_string(), &[])
            .unwrap();
        if i % 400 == 199 {
            kill9(child.take().unwrap());
            kills += 1;
            tokio::time::sleep(Duration::from_millis(u64::from(i % 7) * 10)).await;
            child = Some(spawn_agent(&root, "eventd", ""));
        }
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(kills, 5);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctx.events.pending() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} events never acknowledged\n{}",
            ctx.events.pending(),
            std::fs::read_to_string(root.join("eventd.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill9(child.take().unwrap());
    let burst: Vec<EventRecord> = journalled(&root)
        .into_iter()
        .filter(|e| e.agent == "heartbeatd" && e.kind == "test.burst")
        .collect();
    let messages: BTreeSet<u32> = burst.iter().map(|e| e.message.parse().unwrap()).collect();
    assert_eq!(messages, (0..2000).collect(), "events lost");
    let ids: BTreeSet<&str> = burst.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 2000, "one id per event");
    // eventd journals its own events too: one agent.started per start.
    let starts = journalled(&root)
        .iter()
        .filter(|e| e.agent == "eventd" && e.kind == "agent.started")
        .count();
    assert!(starts >= 1, "eventd's own events are journalled");
}

/// A node enrolled with the real controller by the real enrollmgr; the controller's data
/// directory is `dir/data`.
struct EnrolledNode {
    dir: tempfile::TempDir,
    root: PathBuf,
    controller: Option<RunningController>,
    addr: std::net::SocketAddr,
    enrollmgr: Option<Child>,
    /// What identitymgr would publish, held for the node's life.
    _identity: Publication<NodeIdentity>,
}

impl EnrolledNode {
    async fn new(uuid: &str) -> EnrolledNode {
        let (dir, root) = node_root();
        let (ctl, token) = controller(dir.path(), Duration::from_secs(3600)).await;
        let addr = ctl.addr();
        let identity =
            Publication::<NodeIdentity>::open(&Dirs::under_root(&root), "identitymgr").unwrap();
        identity
            .publish(&resolved_identity(
                uuid,
                token,
                &format!("https://127.0.0.1:{}", addr.port()),
                ctl.ca_pem(),
            ))
            .unwrap();
        let enrollmgr = Some(spawn_agent(&root, "enrollmgr", ""));
        EnrolledNode {
            dir,
            root,
            controller: Some(ctl),
            addr,
            enrollmgr,
            _identity: identity,
        }
    }

    fn options(&self) -> ServeOptions {
        ServeOptions {
            data: self.dir.path().join("data"),
            listen: self.addr,
            cert_lifetime: Duration::from_secs(3600),
            hostnames: Vec::new(),
            heartbeat_interval_s: 15,
            database: None,
        }
    }

    /// Stops the controller (its port stays this node's).
    async fn stop_controller(&mut self) {
        if let Some(ctl) = self.controller.take() {
            ctl.stop().await.unwrap();
        }
    }

    /// Starts the controller again on the same port and data.
    async fn start_controller(&mut self) {
        assert!(self.controller.is_none());
        self.controller = Some(RunningController::start(&self.options()).await.unwrap());
    }

    /// Every stored event of `kind` (raised by `agent`, if given), oldest first, once at least
    /// `want` are stored (or the deadline passed: then what there is, for the caller's
    /// assertion to show).
    async fn stored(
        &self,
        kind: &str,
        agent: Option<&str>,
        want: usize,
        within: Duration,
    ) -> Vec<StoredEvent> {
        let storage = Storage::open(&self.options().data).await.unwrap();
        let deadline = Instant::now() + within;
        let all = loop {
            let mut all: Vec<StoredEvent> = Vec::new();
            loop {
                let page = storage
                    .events(&EventQuery {
                        kind: Some(kind.into()),
                        after: all.last().map(|e| e.cursor),
                        limit: 1000,
                        ..EventQuery::default()
                    })
                    .await
                    .unwrap();
                if page.is_empty() {
                    break;
                }
                all.extend(page);
            }
            all.retain(|e| agent.is_none_or(|a| e.agent == a));
            if all.len() >= want || Instant::now() >= deadline {
                break all;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        storage.close().await;
        all
    }

    fn log(&self, agent: &str) -> String {
        std::fs::read_to_string(self.root.join(format!("{agent}.log"))).unwrap_or_default()
    }

    async fn end(mut self) {
        if let Some(child) = self.enrollmgr.take() {
            kill9(child);
        }
        self.stop_controller().await;
    }
}

/// The numbers in the messages of `events`, and how many events carried each.
fn message_counts(events: &[StoredEvent]) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for e in events {
        *counts.entry(e.message.parse::<u32>().unwrap()).or_default() += 1;
    }
    counts
}

/// A node enrolled with the real controller (the real enrollmgr), then eventd: 1,000 events
/// raised while the controller is down (stopped, not mocked) reach it once it is back, each
/// exactly once, and eventd says what it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_raised_during_an_outage_reach_the_controller_once() {
    let mut node = EnrolledNode::new("uuid-events").await;
    let eventd = spawn_agent(&node.root, "eventd", "");
    let ctx = Context::new("heartbeatd", Root::new(&node.root), Settings::default()).unwrap();

    node.stop_controller().await;
    for i in 0..1000u32 {
        ctx.events
            .raise(
                Severity::Warning,
                "test.outage",
                &i.to_string(),
                &[("i", &i.to_string())],
            )
            .unwrap();
    }
    node.start_controller().await;

    let stored = node
        .stored("test.outage", None, 1000, Duration::from_secs(90))
        .await;
    assert_eq!(
        message_counts(&stored),
        (0..1000).map(|i| (i, 1)).collect(),
        "each of the 1,000 events stored exactly once\n{}",
        node.log("eventd")
    );
    let ids: BTreeSet<&str> = stored.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 1000, "one id per event");
    assert_eq!(
        stored[7].fields,
        [("i".to_owned(), stored[7].message.clone())]
    );
    assert_eq!(stored[7].agent, "heartbeatd");
    assert_eq!(stored[7].severity, Severity::Warning);

    let mut status = Subscription::<EventdStatus>::connect(&ctx.dirs, "eventd");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = status
            .get("global")
            .filter(|s| s.pending == 0 && s.delivered_total >= 1000)
        {
            assert!(
                s.last_delivery_ms.is_some() && s.last_error.is_none(),
                "{s:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", status.get("global"));
        let _ = tokio::time::timeout(Duration::from_millis(200), status.next()).await;
    }
    kill9(eventd);
    node.end().await;
}

/// 10,000 events raised while eventd is killed with SIGKILL 20 times, each at a random
/// moment: the controller holds exactly the 10,000, none lost, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kills_of_eventd_during_10000_events_lose_and_duplicate_nothing() {
    const EVENTS: u32 = 10_000;
    const KILLS: u32 = 20;
    let node = EnrolledNode::new("uuid-kills").await;
    let ctx = Context::new("heartbeatd", Root::new(&node.root), Settings::default()).unwrap();
    let seed = now_ms();
    let mut rng = Rng(seed | 1);
    // The kill moments: KILLS distinct random points of the burst.
    let mut kill_at = BTreeSet::new();
    while kill_at.len() < KILLS as usize {
        kill_at.insert(rng.below(EVENTS));
    }
    let mut eventd = Some(spawn_agent(&node.root, "eventd", ""));
    for i in 0..EVENTS {
        // The per-agent bound is not what this test is about: keep under it, as an agent
        // raising this fast on a real node would not (its own test is in agentbase).
        while ctx.events.pending() >= agentbase::events::PENDING_CAP - 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ctx.events
            .raise(Severity::Info, "test.kills", &i.to_string(), &[])
            .unwrap();
        if kill_at.contains(&i) {
            kill9(eventd.take().unwrap());
            // Down for 0 to 90 ms: sometimes the raiser outruns it, sometimes not.
            tokio::time::sleep(Duration::from_millis(u64::from(rng.below(10)) * 10)).await;
            eventd = Some(spawn_agent(&node.root, "eventd", ""));
        }
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let stored = node
        .stored(
            "test.kills",
            None,
            EVENTS as usize,
            Duration::from_secs(120),
        )
        .await;
    let counts = message_counts(&stored);
    let lost: Vec<u32> = (0..EVENTS).filter(|i| !counts.contains_key(i)).collect();
    let twice: Vec<u32> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(i, _)| *i)
        .collect();
    assert!(
        lost.is_empty() && twice.is_empty(),
        "seed {seed}: {} lost (first {:?}), {} stored twice (first {:?})\n{}",
        lost.len(),
        &lost[..lost.len().min(10)],
        twice.len(),
        &twice[..twice.len().min(10)],
        node.log("eventd")
    );
    assert_eq!(stored.len(), EVENTS as usize);
    kill9(eventd.take().unwrap());
    node.end().await;
}

/// An agent killed with SIGKILL right after `raise` returned (the `events.raised` crash
/// point: the event is on disk, nothing after it ran) and never restarted: eventd reads the
/// event from the dead agent's checkpoint and the controller gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_right_after_raising_still_delivers_the_event() {
    let node = EnrolledNode::new("uuid-raiser").await;
    let eventd = spawn_agent(&node.root, "eventd", "");
    // The verifier's first raise is its agent.started; the point kills it there.
    let mut raiser = spawn_agent(&node.root, "verifier", "events.raised");
    let status = raiser.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the verifier was to die at events.raised\n{}",
        node.log("verifier")
    );
    assert!(node.log("verifier").contains("failpoint events.raised hit"));
    let started = node
        .stored(
            "agent.started",
            Some("verifier"),
            1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(
        started.len(),
        1,
        "the dead agent's one event, once\n{}",
        node.log("eventd")
    );
    kill9(eventd);
    node.end().await;
}

/// A journal holding an event the controller refuses (its kind breaks the controller's
/// rule; a version skew or a bug could write one) between good ones: the controller refuses
/// the batch whole, so eventd sends its events one by one, delivers the good ones, passes over
/// the bad one and raises `events.refused` — delivery never stops on one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_controller_refuses_does_not_stop_delivery() {
    let node = EnrolledNode::new("uuid-refused").await;
    let record = |seq: u64, kind: &str| EventRecord {
        id: format!("{seq:032x}"),
        agent: "heartbeatd".into(),
        seq,
        severity: Severity::Info,
        kind: kind.into(),
        message: seq.to_string(),
        at_ms: now_ms(),
        fields: Vec::new(),
        dropped_before: 0,
    };
    let records = [
        record(1, "test.refused"),
        record(2, "Not A Kind!"),
        record(3, "test.refused"),
    ];
    {
        let dir = node.root.join("persist/powernode/eventd/journal");
        let (mut journal, _) = eventd::journal::Journal::open(&dir).unwrap();
        let payloads: Vec<Vec<u8>> = records
            .iter()
            .map(|r| postcard::to_stdvec(r).unwrap())
            .collect();
        journal.append(&payloads).unwrap();
    }
    let eventd = spawn_agent(&node.root, "eventd", "");
    let good = node
        .stored("test.refused", None, 2, Duration::from_secs(30))
        .await;
    let messages: Vec<&str> = good.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(messages, ["1", "3"], "{}", node.log("eventd"));
    let refused = node
        .stored("events.refused", Some("eventd"), 1, Duration::from_secs(30))
        .await;
    assert_eq!(refused.len(), 1, "{}", node.log("eventd"));
    let field = |name: &str| {
        refused[0]
            .fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("id").as_deref(), Some(records[1].id.as_str()));
    assert_eq!(field("kind").as_deref(), Some("Not A Kind!"));
    assert!(
        field("error").is_some_and(|e| e.contains("400")),
        "{:?}",
        refused[0].fields
    );
    kill9(eventd);
    node.end().await;
}

/// xorshift64: random moments, reproducible from the seed the test prints when it fails.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % u64::from(n)) as u32
    }
}
