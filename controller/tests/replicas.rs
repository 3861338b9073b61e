//! Two controller replicas on one PostgreSQL database serve one fleet: nodes spread over both,
//! each through the node's own transport (powernode-transport) given both URLs. Replica A is
//! killed with SIGKILL mid-run; its nodes must heartbeat through B at their next heartbeat, no
//! task may be handed to a node twice, and no event may be lost or stored twice.
//!
//! Runs in the PostgreSQL pass of the suite (`make unit-postgres`): replicas need a shared
//! database, which the embedded SQLite one is not.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bin, client, database, heartbeat_body, NodeCreds};
use powernode_controller::ca::{CA_CERT_FILE, CA_KEY_FILE};
use powernode_controller::server::OPERATOR_TOKEN_FILE;
use powernode_transport::{ClientCert, ControllerClient, TlsIdentity};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How often a simulated node heartbeats (and leases, and sends events).
const INTERVAL: Duration = Duration::from_secs(2);
/// Nodes per replica.
const NODES_PER_REPLICA: usize = 3;
/// Tasks created for every node.
const TASKS_PER_NODE: usize = 12;

/// A `powernode-controller serve` process.
struct Replica {
    child: Child,
    base: String,
}

impl Replica {
    /// Starts a replica on `database` with the data directory `data`; `Err` with its stderr if
    /// it exits instead of listening.
    async fn start(data: &Path, database: &str) -> Result<Replica, String> {
        let mut child = Command::new(bin())
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--heartbeat-interval", "2s"])
            .args(["--database", database])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        match lines.next_line().await.unwrap() {
            Some(line) => {
                let addr = line.strip_prefix("listening on ").unwrap().to_owned();
                // The rest of its stdout is not read: keep the pipe drained.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Ok(Replica {
                    child,
                    base: format!("https://{addr}"),
                })
            }
            None => {
                let out = child.wait_with_output().await.unwrap();
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        }
    }

    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// The operator's side, against one replica.
struct Operator {
    http: common::http::Client,
    base: String,
    token: String,
}

impl Operator {
    async fn call(&self, method: hyper::Method, path: &str, body: Option<&Value>) -> Value {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let (status, reply) = common::status_json(request.send().await.unwrap()).await;
        assert_eq!(status, 200, "{path}: {reply}");
        reply
    }

    async fn enroll(&self, uuid: &str, ca_pem: &str) -> NodeCreds {
        let token = self
            .call(hyper::Method::POST, "/api/v1/tokens", Some(&json!({})))
            .await["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let body = common::enroll_body(&token, &common::csr_pem(&key), uuid);
        let (status, reply) = common::post_json(
            &client(ca_pem, None),
            format!("{}/node_api/v1/enroll", self.base),
            &body,
        )
        .await;
        assert_eq!(status, 200, "enroll: {reply}");
        NodeCreds {
            node_id: reply["node_id"].as_str().unwrap().to_owned(),
            cert_pem: reply["cert_pem"].as_str().unwrap().to_owned(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// What one simulated node saw.
#[derive(Debug, Default)]
struct NodeLog {
    /// When each heartbeat was answered, and by which URL.
    heartbeats: Vec<(Instant, String)>,
    /// Every task id a lease handed this node, in order.
    leased: Vec<String>,
    /// Every event id the controller accepted from this node.
    events_sent: Vec<String>,
}

/// A node: heartbeat, lease and complete, send an event, every [`INTERVAL`], until `stop`.
/// Calls that fail are kept and sent again next time, as the node's agents do.
async fn run_node(node: NodeCreds, client: ControllerClient, stop: Arc<AtomicBool>) -> NodeLog {
    let mut log = NodeLog::default();
    let mut pending_events: Vec<Value> = Vec::new();
    let mut to_complete: Vec<String> = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        if client
            .post::<_, Value>("status/heartbeat", &heartbeat_body(0))
            .await
            .is_ok()
        {
            log.heartbeats
                .push((Instant::now(), client.current_url().to_owned()));
        }
        if let Ok(reply) = client
            .post::<_, Value>("tasks/lease", &json!({ "max": 4 }))
            .await
        {
            for task in reply["tasks"].as_array().unwrap() {
                let id = task["id"].as_str().unwrap().to_owned();
                log.leased.push(id.clone());
                to_complete.push(id);
            }
        }
        let mut still = Vec::new();
        for id in to_complete.drain(..) {
            let body = json!({ "outcome": "Succeeded", "output": format!("ran {id}") });
            if client
                .post::<_, Value>(&format!("tasks/{id}/complete"), &body)
                .await
                .is_err()
            {
                still.push(id);
            }
        }
        to_complete = still;
        seq += 1;
        let id = format!("{}-ev-{seq}", node.node_id);
        pending_events.push(json!({
            "id": id, "agent": "heartbeatd", "seq": seq, "severity": "Info",
            "kind": "test.tick", "message": format!("tick {seq}"), "at_ms": seq,
            "fields": [["replica", client.current_url()]], "dropped_before": 0,
        }));
        if client
            .post::<_, Value>("events", &json!({ "events": pending_events }))
            .await
            .is_ok()
        {
            log.events_sent.extend(
                pending_events
                    .drain(..)
                    .map(|e| e["id"].as_str().unwrap().to_owned()),
            );
        }
        tokio::time::sleep(INTERVAL).await;
    }
    log
}

/// Holds `node`'s watch on the replica at `base` while `operator` (another replica) queues a
/// task for it: the watch must answer that something changed, not time out.
async fn watch_on_a_hears_b(node: &NodeCreds, ca_pem: &str, base: &str, operator: &Operator) {
    let http = client(ca_pem, Some((&node.cert_pem, &node.key_pem)));
    let watch = |query: String| {
        let request = http.get(format!("{base}/node_api/v1/watch?{query}"));
        async move { common::status_json(request.send().await.unwrap()).await }
    };
    // A generation no node reaches: the watch times out, telling the current one.
    let (status, now) = watch(format!("generation={}&timeout_s=1", u64::MAX)).await;
    assert_eq!((status, &now["changed"]), (200, &json!(false)), "{now}");
    let generation = now["generation"].as_u64().unwrap();
    let held = tokio::spawn(watch(format!("generation={generation}&timeout_s=30")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !held.is_finished(),
        "the watch answered before anything changed"
    );
    let body = json!({ "node": node.node_id, "kind": "test.wake", "timeout_s": 3 });
    let task = operator
        .call(hyper::Method::POST, "/api/v1/tasks", Some(&body))
        .await;
    let (status, answer) = held.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed"], json!(true), "{answer}");
    assert_eq!(answer["tasks_queued"], json!(1), "{answer}");
    // Out of the way of the task count checked later.
    let id = task["id"].as_str().unwrap();
    operator
        .call(
            hyper::Method::POST,
            &format!("/api/v1/tasks/{id}/cancel"),
            None,
        )
        .await;
}

/// The list of a listing reply: the reply itself, or its `key`.
fn items<'a>(reply: &'a Value, key: &str) -> &'a Vec<Value> {
    reply
        .as_array()
        .or_else(|| reply[key].as_array())
        .unwrap_or_else(|| panic!("no list of {key} in {reply}"))
}

fn copy_fleet_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in [CA_CERT_FILE, CA_KEY_FILE, OPERATOR_TOKEN_FILE] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_serve_one_fleet_and_a_killed_one_loses_nothing() {
    let Some(db) = database::fresh().await else {
        eprintln!(
            "replicas need PostgreSQL: this test runs in the PostgreSQL pass \
             (make unit-postgres, scripts/with-postgres.sh)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = |name: &str| -> PathBuf { dir.path().join(name) };

    let mut a = Replica::start(&data("a"), &db).await.unwrap();
    copy_fleet_files(&data("a"), &data("b"));
    let b = Replica::start(&data("b"), &db).await.unwrap();

    // A controller with a CA of its own is refused by the fleet's database.
    let refused = Replica::start(&data("stranger"), &db).await.err().unwrap();
    assert!(refused.contains("is not the fleet's"), "{refused}");

    let ca_pem = std::fs::read_to_string(data("a").join(CA_CERT_FILE)).unwrap();
    let token = std::fs::read_to_string(data("a").join(OPERATOR_TOKEN_FILE)).unwrap();
    let operator = |base: &str| Operator {
        http: client(&ca_pem, None),
        base: base.to_owned(),
        token: token.trim().to_owned(),
    };
    let (op_a, op_b) = (operator(&a.base), operator(&b.base));

    // Nodes spread over both: a node enrolled through one replica is known to the other.
    let mut nodes = Vec::new();
    for i in 0..2 * NODES_PER_REPLICA {
        let (first, second, op) = if i % 2 == 0 {
            (&a.base, &b.base, &op_a)
        } else {
            (&b.base, &a.base, &op_b)
        };
        let creds = op.enroll(&format!("uuid-replica-{i}"), &ca_pem).await;
        let identity = TlsIdentity {
            ca_pem: ca_pem.clone(),
            client: Some(ClientCert {
                chain_pem: creds.cert_pem.clone(),
                key_pem: creds.key_pem.clone(),
            }),
        };
        let urls = [first.clone(), second.clone()];
        let client = ControllerClient::new(&urls, &identity, Duration::from_secs(5)).unwrap();
        nodes.push((creds, client, i % 2 == 0));
    }
    // A watch held on replica A wakes when the operator queues a task through replica B.
    watch_on_a_hears_b(&nodes[0].0, &ca_pem, &a.base, &op_b).await;

    // Tasks created through either replica, with a short timeout: a lease whose reply died
    // with replica A goes back to the queue soon and is handed out once more, to the node
    // that never saw it.
    let mut created: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, (creds, _, _)) in nodes.iter().enumerate() {
        for t in 0..TASKS_PER_NODE {
            let op = if (i + t) % 2 == 0 { &op_a } else { &op_b };
            let body = json!({ "node": creds.node_id, "kind": "test.work", "timeout_s": 3 });
            let task = op
                .call(hyper::Method::POST, "/api/v1/tasks", Some(&body))
                .await;
            created
                .entry(creds.node_id.clone())
                .or_default()
                .insert(task["id"].as_str().unwrap().to_owned());
        }
    }
    // Both replicas see every node.
    assert!(
        items(
            &op_b.call(hyper::Method::GET, "/api/v1/nodes", None).await,
            "nodes"
        )
        .len()
            >= 2 * NODES_PER_REPLICA
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut runs = Vec::new();
    for (creds, client, on_a) in nodes {
        let id = creds.node_id.clone();
        runs.push((
            id,
            on_a,
            tokio::spawn(run_node(creds, client, Arc::clone(&stop))),
        ));
    }
    tokio::time::sleep(INTERVAL * 3).await;
    let killed_at = Instant::now();
    a.kill().await;
    // Long enough for the lost leases to expire and every task to be run.
    tokio::time::sleep(INTERVAL * 8).await;
    stop.store(true, Ordering::Release);

    for (node_id, on_a, run) in runs {
        let log = run.await.unwrap();
        // Heartbeats: through its first replica before the kill; through B after it, the
        // first one at the node's next heartbeat (an interval, with a second of slack for a
        // busy machine), not a backoff later.
        let before: Vec<_> = log
            .heartbeats
            .iter()
            .filter(|(t, _)| *t < killed_at)
            .collect();
        let after: Vec<_> = log
            .heartbeats
            .iter()
            .filter(|(t, _)| *t >= killed_at)
            .collect();
        let first_url = if on_a { &a.base } else { &b.base };
        assert!(
            !before.is_empty() && before.iter().all(|(_, url)| url == first_url),
            "{node_id} before the kill: {before:?}"
        );
        assert!(
            after.iter().all(|(_, url)| *url == b.base),
            "{node_id} after the kill: {after:?}"
        );
        let resumed = after.first().expect("no heartbeat after the kill").0;
        let last_before = before.last().unwrap().0;
        assert!(
            resumed - last_before <= INTERVAL * 2 + Duration::from_secs(1),
            "{node_id}: {:?} without a heartbeat across the kill",
            resumed - last_before
        );

        // Tasks: each handed to its own node once, and each run to success.
        let leased: BTreeSet<String> = log.leased.iter().cloned().collect();
        assert_eq!(
            leased.len(),
            log.leased.len(),
            "{node_id} got a task twice: {:?}",
            log.leased
        );
        assert_eq!(&leased, &created[&node_id], "{node_id} leased other tasks");
        let tasks = op_b
            .call(
                hyper::Method::GET,
                &format!("/api/v1/tasks?node={node_id}&limit=1000"),
                None,
            )
            .await;
        for task in items(&tasks, "tasks") {
            if task["kind"] != "test.wake" {
                assert_eq!(task["state"], "succeeded", "{task}");
            }
        }

        // Events: every one the controller accepted is stored, once.
        let events = op_b
            .call(
                hyper::Method::GET,
                &format!("/api/v1/events?node={node_id}&limit=1000"),
                None,
            )
            .await;
        let stored: Vec<&str> = items(&events, "events")
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        let unique: BTreeSet<&str> = stored.iter().copied().collect();
        assert_eq!(
            unique.len(),
            stored.len(),
            "{node_id}: an event stored twice"
        );
        let sent: BTreeSet<&str> = log.events_sent.iter().map(String::as_str).collect();
        assert!(
            sent.is_subset(&unique),
            "{node_id}: accepted events missing: {:?}",
            sent.difference(&unique).collect::<Vec<_>>()
        );
        assert!(!sent.is_empty());
    }
}
