//! The PostgreSQL server goes down under a running controller: every call answers 503
//! `database_unavailable` (nothing half done), the controller keeps running, and once the
//! server is back it serves again — heartbeats, the operator API and held watches — with
//! everything stored before the outage still there.
//!
//! Runs in the PostgreSQL pass of the suite (`make unit-postgres`), on a cluster of its own:
//! the run's shared server must stay up for the other tests.

mod common;

use std::time::{Duration, Instant};

use common::pgcluster::PgCluster;
use common::{code, database, heartbeat_body, post_json, TestServer};
use powernode_controller::events::EventRetention;
use serde_json::{json, Value};

const LIFETIME: Duration = Duration::from_secs(3600);

async fn heartbeat(server: &TestServer, node: &common::NodeCreds) -> (u16, Value) {
    post_json(
        &server.as_node(node),
        server.url("/node_api/v1/status/heartbeat"),
        &heartbeat_body(0),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_answers_503_and_the_controller_recovers() {
    if database::fresh().await.is_none() {
        eprintln!(
            "runs in the PostgreSQL pass (make unit-postgres, scripts/with-postgres.sh), \
             on a PostgreSQL cluster of its own"
        );
        return;
    }
    let cluster = PgCluster::start();
    let db = database::create_on(&cluster.url()).await;
    let server = TestServer::start_on(LIFETIME, EventRetention::default(), Some(db)).await;
    let node = server.enroll_new("uuid-outage").await;
    assert_eq!(heartbeat(&server, &node).await.0, 200);

    cluster.stop_server();
    let (status, reply) = heartbeat(&server, &node).await;
    assert_eq!(
        (status, code(&reply)),
        (503, "database_unavailable"),
        "{reply}"
    );
    let (status, reply) = server.operator_get("/api/v1/nodes").await;
    assert_eq!(
        (status, code(&reply)),
        (503, "database_unavailable"),
        "{reply}"
    );
    let body = json!({ "node": node.node_id, "kind": "test.outage" });
    let (status, reply) = server.operator_post("/api/v1/tasks", &body).await;
    assert_eq!(
        (status, code(&reply)),
        (503, "database_unavailable"),
        "{reply}"
    );

    cluster.start_server();
    // The pool opens new connections as they are asked for: the first call after the restart
    // may still find a dead one.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, reply) = heartbeat(&server, &node).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{reply}");
        assert!(
            Instant::now() < deadline,
            "no heartbeat 30 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, nodes) = server.operator_get("/api/v1/nodes").await;
    assert_eq!(status, 200, "{nodes}");
    assert!(nodes.to_string().contains(&node.node_id), "{nodes}");

    // Held watches are served again: the change listener reconnected.
    let http = server.as_node(&node);
    let watch = |query: String| {
        let request = http.get(server.url(&format!("/node_api/v1/watch?{query}")));
        async move { common::status_json(request.send().await.unwrap()).await }
    };
    let (status, now) = watch(format!("generation={}&timeout_s=1", u64::MAX)).await;
    assert_eq!(status, 200, "{now}");
    let generation = now["generation"].as_u64().unwrap();
    let held = tokio::spawn(watch(format!("generation={generation}&timeout_s=30")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, task) = server.operator_post("/api/v1/tasks", &body).await;
    assert_eq!(status, 200, "{task}");
    let (status, answer) = held.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changed"], json!(true), "{answer}");
    server.stop().await;
}
