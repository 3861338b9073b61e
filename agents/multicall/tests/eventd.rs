//! eventd, the real binary, journalling the events of an agent that this test plays (it
//! raises as `heartbeatd` through agentbase, as the real agent would), while eventd is killed
//! with SIGKILL at random moments of the burst.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentbase::{Context, Root, Settings};
use common::bin;
use powernode_types::node_api::EventRecord;
use powernode_types::Severity;

fn eventd(root: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("eventd.log"))
        .unwrap();
    Command::new(bin())
        .args(["run", "eventd", "--root"])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

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
    let mut child = Some(eventd(&root));
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
            child = Some(eventd(&root));
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
