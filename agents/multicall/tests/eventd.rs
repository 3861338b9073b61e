//! eventd, the real binary, journalling the events of an agent that this test plays (it
//! raises as `heartbeatd` through agentbase, as the real agent would), while eventd is killed
//! with SIGKILL at random moments of the burst.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use agentbase::{Context, Root, Settings};
use common::{controller, node_root, resolved_identity, spawn_agent};
use powernode_types::node_api::EventRecord;
use powernode_types::Severity;

fn kill9(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Every event in eventd's journal.
fn journalled(root: &Path) -> Vec<EventRecord> {
    let dir = root.join("persist/powernode/eventd/journal");
    let (journal, _) = eventd::journal::Journal::open(&dir).unwrap();
    journal
        .all()
        .unwrap()
        .into_iter()
        .map(|(_, bytes)| postcard::from_bytes::<EventRecord>(&bytes).unwrap())
        .collect()
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

/// A node enrolled with the real controller (the real enrollmgr), then eventd: 300 events
/// raised while the controller is down reach it once it is back, each exactly once, and
/// eventd says what it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_raised_during_an_outage_reach_the_controller_once() {
    use powernode_controller::server::{RunningController, ServeOptions};
    use powernode_controller::storage::{EventQuery, Storage};
    use powernode_pubsub::{Dirs, Publication, Subscription};
    use powernode_types::{EventdStatus, NodeIdentity};

    let (dir, root) = node_root();
    let (ctl, token) = controller(dir.path(), Duration::from_secs(3600)).await;
    let addr = ctl.addr();
    let identity =
        Publication::<NodeIdentity>::open(&Dirs::under_root(&root), "identitymgr").unwrap();
    identity
        .publish(&resolved_identity(
            "uuid-events",
            token,
            &format!("https://127.0.0.1:{}", addr.port()),
            ctl.ca_pem(),
        ))
        .unwrap();
    let enrollmgr = spawn_agent(&root, "enrollmgr", "");
    let eventd = spawn_agent(&root, "eventd", "");
    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default()).unwrap();

    ctl.stop().await.unwrap();
    for i in 0..300u32 {
        ctx.events
            .raise(
                Severity::Warning,
                "test.outage",
                &i.to_string(),
                &[("i", &i.to_string())],
            )
            .unwrap();
    }
    let opts = ServeOptions {
        data: dir.path().join("data"),
        listen: addr,
        cert_lifetime: Duration::from_secs(3600),
        hostnames: Vec::new(),
        heartbeat_interval_s: 15,
    };
    let ctl = RunningController::start(&opts).await.unwrap();

    let storage = Storage::open(&opts.data).await.unwrap();
    let query = EventQuery {
        kind: Some("test.outage".into()),
        limit: 1000,
        ..EventQuery::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let stored = storage.events(&query).await.unwrap();
        if stored.len() >= 300 {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 300 delivered\n{}",
            stored.len(),
            std::fs::read_to_string(root.join("eventd.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let messages: BTreeSet<u32> = stored.iter().map(|e| e.message.parse().unwrap()).collect();
    assert_eq!(messages, (0..300).collect());
    assert_eq!(stored.len(), 300, "an event stored twice");
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
            .filter(|s| s.pending == 0 && s.delivered_total >= 300)
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
    storage.close().await;
    kill9(eventd);
    kill9(enrollmgr);
    ctl.stop().await.unwrap();
}
