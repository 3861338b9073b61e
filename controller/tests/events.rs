//! Fleet events against a real controller: `POST /node_api/v1/events` over mTLS, validated
//! all-or-nothing and idempotent; `GET /api/v1/events` with filters and paging; retention;
//! the `events` and `node show` commands of the binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{code, heartbeat_body, post_json, NodeCreds, TestServer};
use powernode_controller::events::{EventRetention, MAX_BATCH, MAX_BODY, MAX_FIELD_VALUE};
use powernode_controller::wire::EventRecord;
use serde_json::{json, Value};

const LIFETIME: Duration = Duration::from_secs(3600);
const BIN: &str = env!("CARGO_BIN_EXE_powernode-controller");

fn event(id: &str, severity: &str, kind: &str, at_ms: u64) -> Value {
    json!({
        "id": id, "agent": "modulemgr", "seq": 1, "severity": severity, "kind": kind,
        "message": format!("event {id}"), "at_ms": at_ms,
        "fields": [["module", "tools"], ["attempt", "2"]], "dropped_before": 0,
    })
}

fn batch(events: &[Value]) -> Value {
    json!({ "events": events })
}

async fn send(server: &TestServer, node: &NodeCreds, body: &Value) -> (u16, Value) {
    post_json(
        &server.as_node(node),
        server.url("/node_api/v1/events"),
        body,
    )
    .await
}

/// Every stored event, through the operator API.
async fn all_events(server: &TestServer) -> Vec<Value> {
    let (status, reply) = server.operator_get("/api/v1/events?limit=1000").await;
    assert_eq!(status, 200, "{reply}");
    reply["events"].as_array().unwrap().clone()
}

fn ids(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["id"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_batch_is_stored_once_with_node_and_receive_time() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-ev").await;
    let first = batch(&[
        event("e-1", "Info", "module.started", 1000),
        event("e-2", "Warning", "module.slow", 2000),
        event("e-3", "Critical", "cert.rotation_failing", 3000),
    ]);
    let before = powernode_controller::now_ms();
    let (status, reply) = send(&server, &node, &first).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"accepted": 3, "duplicates": 0}));

    // The same batch again: nothing new.
    let (status, reply) = send(&server, &node, &first).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"accepted": 0, "duplicates": 3}));

    // Old and new mixed.
    let mixed = batch(&[
        event("e-3", "Critical", "cert.rotation_failing", 3000),
        event("e-4", "Error", "module.failed", 4000),
    ]);
    let (_, reply) = send(&server, &node, &mixed).await;
    assert_eq!(reply, json!({"accepted": 1, "duplicates": 1}));

    let stored = all_events(&server).await;
    assert_eq!(ids(&stored), ["e-1", "e-2", "e-3", "e-4"]);
    let e2 = &stored[1];
    assert_eq!(e2["node_id"], node.node_id.as_str());
    assert_eq!(e2["severity"], "Warning");
    assert_eq!(e2["kind"], "module.slow");
    assert_eq!(e2["agent"], "modulemgr");
    assert_eq!(e2["at_ms"], 2000);
    assert_eq!(e2["fields"], json!([["module", "tools"], ["attempt", "2"]]));
    let received = e2["received_ms"].as_i64().unwrap();
    assert!(received >= before && received <= powernode_controller::now_ms());

    // The wire type round-trips what the operator API shows.
    let sent: EventRecord =
        serde_json::from_value(event("e-2", "Warning", "module.slow", 2000)).unwrap();
    assert_eq!(e2["message"], sent.message.as_str());

    // The same id from another node is that node's own event.
    let other = server.enroll_new("uuid-ev-2").await;
    let (_, reply) = send(&server, &other, &batch(&[event("e-1", "Info", "x", 1)])).await;
    assert_eq!(reply, json!({"accepted": 1, "duplicates": 0}));

    // A full batch of the largest size is fine; an empty one too.
    let full: Vec<Value> = (0..MAX_BATCH)
        .map(|i| event(&format!("full-{i}"), "Info", "load.test", 5000))
        .collect();
    let (status, reply) = send(&server, &node, &batch(&full)).await;
    assert_eq!((status, reply["accepted"].as_u64()), (200, Some(1000)));
    let (status, reply) = send(&server, &node, &batch(&[])).await;
    assert_eq!(
        (status, reply),
        (200, json!({"accepted": 0, "duplicates": 0}))
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_batches_are_refused_whole() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-bad-ev").await;
    let good = event("good-1", "Info", "module.started", 1);
    let http = server.as_node(&node);
    let url = server.url("/node_api/v1/events");
    let raw = |body: Vec<u8>| {
        let request = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        async move { common::status_json(request.send().await.unwrap()).await }
    };

    let (status, reply) = raw(br#"{"events": [{"id": "#.to_vec()).await;
    assert_eq!((status, code(&reply)), (400, "malformed_json"));

    let too_many: Vec<Value> = (0..=MAX_BATCH)
        .map(|i| event(&format!("m-{i}"), "Info", "x", 1))
        .collect();
    let (status, reply) = send(&server, &node, &batch(&too_many)).await;
    assert_eq!((status, code(&reply)), (413, "batch_too_large"), "{reply}");

    let mut huge = batch(std::slice::from_ref(&good));
    huge["pad"] = json!("a".repeat(MAX_BODY));
    let (status, reply) = send(&server, &node, &huge).await;
    assert_eq!((status, code(&reply)), (413, "body_too_large"));

    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "unknown severity",
            event("s-1", "Fatal", "x", 1),
            "invalid_request",
            "Fatal",
        ),
        (
            "bad kind",
            event("k-1", "Info", "Module.Failed", 1),
            "invalid_event",
            "kind",
        ),
        (
            "field too long",
            {
                let mut e = event("f-1", "Info", "x", 1);
                e["fields"] = json!([["k", "v".repeat(MAX_FIELD_VALUE + 1)]]);
                e
            },
            "invalid_event",
            "field \"k\"",
        ),
        (
            "bad id",
            event("has space", "Info", "x", 1),
            "invalid_event",
            "id",
        ),
        (
            "unknown field",
            {
                let mut e = event("u-1", "Info", "x", 1);
                e["node_id"] = json!("node-other");
                e
            },
            "invalid_request",
            "node_id",
        ),
    ];
    for (name, bad, want_code, mentions) in cases {
        let (status, reply) = send(&server, &node, &batch(&[good.clone(), bad])).await;
        assert_eq!((status, code(&reply)), (400, want_code), "{name}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{name}: {message}");
    }

    let twice = batch(&[good.clone(), event("d-1", "Info", "x", 1), good.clone()]);
    let (status, reply) = send(&server, &node, &twice).await;
    assert_eq!((status, code(&reply)), (400, "duplicate_event_id"));
    assert!(reply["error"]["message"]
        .as_str()
        .unwrap()
        .contains("good-1"));

    assert!(all_events(&server).await.is_empty(), "nothing is stored");
    server.stop().await;
}

/// Events need an enrolled node's certificate; a revoked node may still deliver them (its
/// last events, `enroll.revoked` among them, are what the operator wants to see), while its
/// heartbeat is refused.
#[tokio::test]
async fn only_an_enrolled_node_may_send_events_and_a_revoked_one_still_may() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-auth-ev").await;
    let body = batch(&[event("a-1", "Info", "x", 1)]);
    let (status, reply) = post_json(
        &server.anonymous(),
        server.url("/node_api/v1/events"),
        &body,
    )
    .await;
    assert_eq!((status, code(&reply)), (401, "client_certificate_required"));

    let (status, _) = server
        .anonymous()
        .post(server.url(&format!("/api/v1/nodes/{}/revoke", node.node_id)))
        .bearer_auth(&server.operator_token)
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(status, 200);
    let (status, reply) = send(&server, &node, &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["accepted"], 1, "{reply}");
    assert_eq!(ids(&all_events(&server).await), ["a-1"]);
    let (status, reply) = post_json(
        &server.as_node(&node),
        server.url("/node_api/v1/status/heartbeat"),
        &heartbeat_body(0),
    )
    .await;
    assert_eq!((status, code(&reply)), (403, "revoked"));

    // The operator API wants its token.
    let reply = server
        .anonymous()
        .get(server.url("/api/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401);
    server.stop().await;
}

#[tokio::test]
async fn operator_query_filters_and_pages() {
    let server = TestServer::start(LIFETIME).await;
    let a = server.enroll_new("uuid-qa").await;
    let b = server.enroll_new("uuid-qb").await;
    // 2023-11-14T22:13:20Z is 1_700_000_000_000.
    let t0 = 1_700_000_000_000u64;
    send(
        &server,
        &a,
        &batch(&[
            event("a-info", "Info", "module.started", t0),
            event("a-warn", "Warning", "module.slow", t0 + 1000),
            event("a-crit", "Critical", "cert.rotation_failing", t0 + 2000),
        ]),
    )
    .await;
    send(
        &server,
        &b,
        &batch(&[
            event("b-err", "Error", "module.failed", t0 + 500),
            event("b-info", "Info", "module.started", t0 + 3000),
        ]),
    )
    .await;

    let query = |q: String| {
        let server = &server;
        async move {
            let (status, reply) = server.operator_get(&format!("/api/v1/events?{q}")).await;
            assert_eq!(status, 200, "{q}: {reply}");
            let events: Vec<String> = reply["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_owned())
                .collect();
            (events, reply["next"].as_i64().unwrap())
        }
    };
    let (all, _) = query(String::new()).await;
    assert_eq!(all, ["a-info", "a-warn", "a-crit", "b-err", "b-info"]);
    assert_eq!(
        query(format!("node={}", b.node_id)).await.0,
        ["b-err", "b-info"]
    );
    assert_eq!(
        query("severity=warning".into()).await.0,
        ["a-warn", "a-crit", "b-err"]
    );
    assert_eq!(query("severity=Error".into()).await.0, ["a-crit", "b-err"]);
    assert_eq!(
        query("kind=module.started".into()).await.0,
        ["a-info", "b-info"]
    );
    assert_eq!(
        query(format!("since={}", t0 + 1000)).await.0,
        ["a-warn", "a-crit", "b-info"]
    );
    assert_eq!(
        query("since=2023-11-14T22:13:22Z".into()).await.0,
        ["a-crit", "b-info"]
    );
    assert_eq!(
        query(format!("node={}&severity=info&since={}", a.node_id, t0 + 1))
            .await
            .0,
        ["a-warn", "a-crit"]
    );

    // Paging: two at a time, following `next`, until a page is empty.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let (page, next) = query(format!("limit=2&after={after}")).await;
        assert!(page.len() <= 2);
        if page.is_empty() {
            assert_eq!(next, after, "an empty page keeps the cursor");
            break;
        }
        seen.extend(page);
        after = next;
    }
    assert_eq!(seen, all);

    for bad in [
        "severity=fatal",
        "limit=0",
        "limit=1001",
        "since=yesterday",
        "after=x",
        "colour=red",
    ] {
        let (status, reply) = server.operator_get(&format!("/api/v1/events?{bad}")).await;
        assert_eq!((status, code(&reply)), (400, "invalid_query"), "{bad}");
    }

    // `node show` carries the node's last events, oldest first.
    let many: Vec<Value> = (0..12)
        .map(|i| event(&format!("n-{i:02}"), "Info", "x", t0 + 10_000 + i))
        .collect();
    send(&server, &a, &batch(&many)).await;
    let (status, reply) = server
        .operator_get(&format!("/api/v1/nodes/{}", a.node_id))
        .await;
    assert_eq!(status, 200);
    let last: Vec<&str> = reply["last_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (2..12).map(|i| format!("n-{i:02}")).collect();
    assert_eq!(last, want);
    server.stop().await;
}

#[tokio::test]
async fn retention_by_count_per_node_and_by_age() {
    let retention = EventRetention {
        max_per_node: 3,
        ..EventRetention::default()
    };
    let server = TestServer::start_with(LIFETIME, retention).await;
    let a = server.enroll_new("uuid-ra").await;
    let b = server.enroll_new("uuid-rb").await;
    let five: Vec<Value> = (1..=5)
        .map(|i| event(&format!("a-{i}"), "Info", "x", i))
        .collect();
    let (_, reply) = send(&server, &a, &batch(&five)).await;
    assert_eq!(reply, json!({"accepted": 5, "duplicates": 0}));
    send(&server, &b, &batch(&[event("b-1", "Info", "x", 1)])).await;
    assert_eq!(
        ids(&all_events(&server).await),
        ["a-3", "a-4", "a-5", "b-1"]
    );

    // By age: events received 31 days ago, put in through the storage with that receive
    // time, go at the next sweep; the recent ones stay.
    let storage = server.storage().await;
    let now = powernode_controller::now_ms();
    let old: EventRecord = serde_json::from_value(event("b-old", "Info", "x", 1)).unwrap();
    let month_ago = now - 31 * 86_400 * 1000;
    let stored = storage
        .insert_events(&b.node_id, &[old], month_ago, &retention)
        .await
        .unwrap();
    assert_eq!(stored.accepted, 1);
    assert_eq!(all_events(&server).await.len(), 5);
    assert_eq!(storage.trim_events(now, &retention).await.unwrap(), 1);
    assert_eq!(
        ids(&all_events(&server).await),
        ["a-3", "a-4", "a-5", "b-1"]
    );

    // A lowered count is applied by the sweep to every node.
    let tighter = EventRetention {
        max_per_node: 1,
        ..retention
    };
    assert_eq!(storage.trim_events(now, &tighter).await.unwrap(), 2);
    assert_eq!(ids(&all_events(&server).await), ["a-5", "b-1"]);
    storage.close().await;
    server.stop().await;
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// Multi-threaded: the commands run as processes the test waits on, while the controller they
// call runs on this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_command_prints_filters_and_follows() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-cli-ev").await;
    let data = server.data();
    let data_s = data.to_str().unwrap();
    send(
        &server,
        &node,
        &batch(&[
            event("c-1", "Info", "module.started", 1_700_000_000_000),
            event("c-2", "Error", "module.failed", 1_700_000_001_000),
        ]),
    )
    .await;

    let (status, out, stderr) = run(&["events", "--json", "--data", data_s]);
    assert_eq!(status, 0, "{stderr}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ids(&lines), ["c-1", "c-2"]);
    assert_eq!(lines[1]["node_id"], node.node_id.as_str());
    assert_eq!(lines[1]["severity"], "Error");

    let (_, out, _) = run(&[
        "events",
        "--json",
        "--severity",
        "warning",
        "--node",
        &node.node_id,
        "--data",
        data_s,
    ]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (_, out, _) = run(&["events", "--json", "--limit", "1", "--data", data_s]);
    assert!(out.contains("\"c-2\"") && !out.contains("\"c-1\""), "{out}");
    let (_, out, _) = run(&[
        "events",
        "--json",
        "--since",
        "2023-11-14T22:13:21Z",
        "--data",
        data_s,
    ]);
    assert_eq!(out.lines().count(), 1, "{out}");

    let (status, out, _) = run(&["events", "--data", data_s]);
    assert_eq!(status, 0);
    let mut rows = out.lines();
    assert!(rows.next().unwrap().starts_with("TIME"), "{out}");
    let row = rows.next().unwrap();
    assert!(
        row.starts_with("2023-11-14T22:13:20.000Z")
            && row.contains("Info")
            && row.contains("module.started")
            && row.contains("module=tools attempt=2"),
        "{row}"
    );

    let (status, out, _) = run(&["node", "show", &node.node_id, "--data", data_s]);
    assert_eq!(status, 0);
    assert!(
        out.contains("last events:\n") && out.contains("module.failed"),
        "{out}"
    );

    let (status, _, _) = run(&["events", "--severity", "fatal", "--data", data_s]);
    assert_eq!(status, 2);

    // --follow prints what exists, then what arrives.
    let mut child = Command::new(BIN)
        .args(["events", "--follow", "--json", "--data", data_s])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let next_id = || {
        let line = lines_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        let value: Value = serde_json::from_str(&line).unwrap();
        value["id"].as_str().unwrap().to_owned()
    };
    assert_eq!(next_id(), "c-1");
    assert_eq!(next_id(), "c-2");
    send(&server, &node, &batch(&[event("c-3", "Info", "x", 1)])).await;
    assert_eq!(next_id(), "c-3");
    child.kill().unwrap();
    child.wait().unwrap();
    server.stop().await;
}
