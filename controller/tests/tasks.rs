//! Tasks against a real controller: the operator creates, lists, shows and cancels them
//! (`/api/v1/tasks`, and the binary's `task` and `tasks` commands on the data directory); a
//! node leases, renews and completes its own over mTLS (`/node_api/v1/tasks/…`) and
//! long-polls `/node_api/v1/watch` for a new desired state or a queued task.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{Client, Connected};
use common::{code, post_json, status_json, NodeCreds, TestServer};
use powernode_controller::storage::Storage;
use powernode_types::node_api::{
    task_limits, DesiredModule, LeasedTask, TaskLeaseResponse, TaskRenewResponse,
};
use serde_json::{json, Value};
use tokio::task::JoinSet;

const LIFETIME: Duration = Duration::from_secs(3600);
const BIN: &str = env!("CARGO_BIN_EXE_powernode-controller");
/// The default output cap (`serve --task-output-max`), bytes: the contract's number, not the
/// controller's constant, so that a change of the default shows here.
const DEFAULT_OUTPUT_MAX: usize = 65_536;
/// An id no task has.
const NO_SUCH_TASK: &str = "task-0000000000000000";

/// The controller's clock, as the node API's `…_at_ms` fields carry it.
fn now_ms() -> u64 {
    u64::try_from(powernode_controller::now_ms()).unwrap()
}

/// A node's side of the task calls: its mTLS client and the controller's address.
#[derive(Clone)]
struct NodeApi {
    http: Client,
    base: String,
}

impl NodeApi {
    fn new(server: &TestServer, node: &NodeCreds) -> Self {
        Self {
            http: server.as_node(node),
            base: server.base.clone(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/node_api/v1{path}", self.base)
    }

    /// `POST path` with a raw body declared as JSON.
    async fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let request = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_vec());
        status_json(request.send().await.unwrap()).await
    }

    async fn lease_raw(&self, body: &Value) -> (u16, Value) {
        post_json(&self.http, self.url("/tasks/lease"), body).await
    }

    /// Leases up to `max` tasks; the reply must be a 200 of exactly the wire type.
    async fn lease(&self, max: u32) -> Vec<LeasedTask> {
        let (status, reply) = self.lease_raw(&json!({ "max": max })).await;
        assert_eq!(status, 200, "lease: {reply}");
        serde_json::from_value::<TaskLeaseResponse>(reply.clone())
            .unwrap_or_else(|e| panic!("lease reply {reply}: {e}"))
            .tasks
    }

    /// Renews with `{}` as the body.
    async fn renew(&self, id: &str) -> (u16, Value) {
        post_json(
            &self.http,
            self.url(&format!("/tasks/{id}/renew")),
            &json!({}),
        )
        .await
    }

    /// Renews with no body at all.
    async fn renew_bare(&self, id: &str) -> (u16, Value) {
        let request = self.http.post(self.url(&format!("/tasks/{id}/renew")));
        status_json(request.send().await.unwrap()).await
    }

    async fn complete(&self, id: &str, outcome: &str, output: &str) -> (u16, Value) {
        let body = json!({ "outcome": outcome, "output": output });
        post_json(
            &self.http,
            self.url(&format!("/tasks/{id}/complete")),
            &body,
        )
        .await
    }

    /// `GET /watch?query`, answered within `within` or the test fails.
    async fn watch(&self, query: &str, within: Duration) -> (u16, Value) {
        let request = self.http.get(self.url(&format!("/watch?{query}")));
        let reply = tokio::time::timeout(within, request.send())
            .await
            .unwrap_or_else(|_| panic!("watch?{query} not answered within {within:?}"))
            .unwrap();
        status_json(reply).await
    }

    /// A `GET /watch?query` connected (TLS and HTTP up) but not sent yet.
    async fn watch_connected(&self, query: &str) -> Connected {
        self.http
            .get(self.url(&format!("/watch?{query}")))
            .connect()
            .await
            .unwrap()
    }
}

/// Sends a connected watch on a task of its own: the handle answers with status, body and
/// when the answer came.
fn send_watch(watch: Connected) -> tokio::task::JoinHandle<(u16, Value, Instant)> {
    tokio::spawn(async move {
        let reply = watch.send().await.unwrap();
        let at = Instant::now();
        let (status, body) = status_json(reply).await;
        (status, body, at)
    })
}

/// Waits for a watch sent with [`send_watch`], at most `within`.
async fn answer(
    handle: tokio::task::JoinHandle<(u16, Value, Instant)>,
    within: Duration,
) -> (u16, Value, Instant) {
    tokio::time::timeout(within, handle)
        .await
        .unwrap_or_else(|_| panic!("the watch was not answered within {within:?}"))
        .unwrap()
}

/// Creates a task through the operator API; it must work.
async fn create(server: &TestServer, body: Value) -> Value {
    let (status, task) = server.operator_post("/api/v1/tasks", &body).await;
    assert_eq!(status, 200, "create {body}: {task}");
    task
}

/// Creates a task of `kind` for `node` with `extra` fields, and answers its id.
async fn create_for(server: &TestServer, node: &NodeCreds, kind: &str, extra: Value) -> String {
    let mut body = json!({ "node": node.node_id, "kind": kind });
    for (key, value) in extra.as_object().unwrap() {
        body[key] = value.clone();
    }
    id_of(&create(server, body).await)
}

fn id_of(task: &Value) -> String {
    task["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {task}"))
        .to_owned()
}

/// `GET /api/v1/tasks/{id}`; it must exist.
async fn show(server: &TestServer, id: &str) -> Value {
    let (status, task) = server.operator_get(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(status, 200, "show {id}: {task}");
    task
}

/// `GET /api/v1/tasks?query`: the array.
async fn list(server: &TestServer, query: &str) -> Vec<Value> {
    let (status, tasks) = server.operator_get(&format!("/api/v1/tasks?{query}")).await;
    assert_eq!(status, 200, "list ?{query}: {tasks}");
    tasks
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {tasks}"))
        .clone()
}

fn ids(tasks: &[Value]) -> Vec<String> {
    tasks.iter().map(id_of).collect()
}

/// `POST /api/v1/tasks/{id}/cancel` with no body.
async fn cancel(server: &TestServer, id: &str) -> (u16, Value) {
    let reply = server
        .anonymous()
        .post(server.url(&format!("/api/v1/tasks/{id}/cancel")))
        .bearer_auth(&server.operator_token)
        .send()
        .await
        .unwrap();
    status_json(reply).await
}

/// Polls `show` until the task leaves `state` or `within` has passed; answers the task.
async fn wait_while_state(server: &TestServer, id: &str, state: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let task = show(server, id).await;
        if task["state"] != state || Instant::now() >= deadline {
            return task;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Completes `id` with `output`, longer than the default cap, and checks what `show` has: the
/// output's start, at most the cap, then a marker line `[output truncated: N bytes more]`
/// whose N is what was left out. Answers how many bytes were kept.
async fn complete_cut(server: &TestServer, api: &NodeApi, id: &str, output: &str) -> usize {
    assert!(output.len() > DEFAULT_OUTPUT_MAX);
    let (status, reply) = api.complete(id, "Succeeded", output).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"state": "succeeded", "late": false}));
    let shown = show(server, id).await;
    assert_eq!(shown["output_truncated"], true, "{}", shown["id"]);
    let stored = shown["output"].as_str().unwrap();
    assert!(
        stored.len() < output.len(),
        "{} bytes stored of {}",
        stored.len(),
        output.len()
    );
    let tail: String = stored
        .chars()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let body = stored.strip_suffix('\n').unwrap_or(stored);
    let (kept, marker) = body
        .rsplit_once("\n[output truncated: ")
        .unwrap_or_else(|| panic!("no marker line at the end: …{tail:?}"));
    let more: usize = marker
        .strip_suffix(" bytes more]")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the marker line ends {marker:?}"));
    assert!(
        output.starts_with(kept),
        "what is kept is the output's start"
    );
    assert!(
        kept.len() <= DEFAULT_OUTPUT_MAX,
        "{} bytes kept of a {DEFAULT_OUTPUT_MAX}-byte cap",
        kept.len()
    );
    assert_eq!(kept.len() + more, output.len(), "kept + the marker's count");
    kept.len()
}

/// Runs the binary with `args`: exit code, stdout, stderr.
async fn run(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `task-` and 16 hex digits.
fn assert_task_id(id: &str) {
    let hex = id
        .strip_prefix("task-")
        .unwrap_or_else(|| panic!("{id:?} does not start with task-"));
    assert!(
        hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id:?} is not task- and 16 hex digits"
    );
}

/// 200 tasks on two nodes, drained by 16 concurrent lease loops (8 a node, 7 tasks a call):
/// every task is handed out exactly once, only to its own node, with its kind and args, and
/// ends `succeeded` as its node said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_leases_hand_out_every_task_once_and_only_to_its_node() {
    let server = TestServer::start(LIFETIME).await;
    let nodes = [
        server.enroll_new("uuid-conc-a").await,
        server.enroll_new("uuid-conc-b").await,
    ];
    let mut created: Vec<BTreeSet<String>> = Vec::new();
    let mut args_of: HashMap<String, Value> = HashMap::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut mine = BTreeSet::new();
        for i in 0..100 {
            let args = json!({ "node": n, "i": i });
            let id = create_for(&server, node, "load.test", json!({ "args": args })).await;
            args_of.insert(id.clone(), args);
            mine.insert(id);
        }
        assert_eq!(mine.len(), 100, "ids are unique");
        created.push(mine);
    }

    let mut loops = JoinSet::new();
    for (n, node) in nodes.iter().enumerate() {
        let api = NodeApi::new(&server, node);
        for _ in 0..8 {
            let api = api.clone();
            loops.spawn(async move {
                let mut got = Vec::new();
                loop {
                    let tasks = api.lease(7).await;
                    if tasks.is_empty() {
                        break;
                    }
                    assert!(tasks.len() <= 7, "asked for 7, got {}", tasks.len());
                    for task in tasks {
                        let (status, reply) = api
                            .complete(&task.id, "Succeeded", &format!("done {}", task.id))
                            .await;
                        assert_eq!(status, 200, "complete {}: {reply}", task.id);
                        assert_eq!(reply, json!({"state": "succeeded", "late": false}));
                        got.push(task);
                    }
                }
                (n, got)
            });
        }
    }
    let mut leased: Vec<Vec<LeasedTask>> = vec![Vec::new(), Vec::new()];
    while let Some(joined) = loops.join_next().await {
        let (n, got) = joined.unwrap();
        leased[n].extend(got);
    }

    for (n, got) in leased.iter().enumerate() {
        let unique: BTreeSet<String> = got.iter().map(|t| t.id.clone()).collect();
        assert_eq!(
            unique.len(),
            got.len(),
            "node {n}: a task was leased more than once"
        );
        let foreign: Vec<&String> = unique.difference(&created[n]).collect();
        assert!(
            foreign.is_empty(),
            "node {n} got others' tasks: {foreign:?}"
        );
        let missing: Vec<&String> = created[n].difference(&unique).collect();
        assert!(missing.is_empty(), "node {n} never got {missing:?}");
        for task in got {
            assert_eq!(task.attempt, 1, "{task:?}");
            assert_eq!(task.kind, "load.test");
            assert_eq!(task.timeout_s, 300, "the default timeout");
            assert_eq!(task.args, args_of[&task.id], "{task:?}");
        }
    }

    let succeeded = list(&server, "state=succeeded&limit=1000").await;
    let all: BTreeSet<String> = created.iter().flatten().cloned().collect();
    assert_eq!(succeeded.len(), 200);
    assert_eq!(ids(&succeeded).into_iter().collect::<BTreeSet<_>>(), all);
    for task in &succeeded {
        let n = usize::from(created[1].contains(&id_of(task)));
        assert_eq!(task["node_id"], nodes[n].node_id.as_str(), "{task}");
        assert_eq!(task["attempts"], 1, "{task}");
        assert_eq!(task["late"], false, "{task}");
        assert_eq!(task["lease_expires_at_ms"], Value::Null, "{task}");
        assert!(task["finished_at_ms"].is_u64(), "{task}");
    }
    assert!(list(&server, "state=queued&limit=1000").await.is_empty());
    assert!(list(&server, "state=leased&limit=1000").await.is_empty());
    let of_b = list(&server, &format!("node={}&limit=1000", nodes[1].node_id)).await;
    assert_eq!(
        ids(&of_b).into_iter().collect::<BTreeSet<_>>(),
        created[1],
        "?node= lists that node's tasks only"
    );
    let shown = show(&server, created[0].first().unwrap()).await;
    assert_eq!(
        shown["output"],
        format!("done {}", created[0].first().unwrap())
    );
    server.stop().await;
}

/// A lease that runs out, with no call to the controller in between, puts the task back in
/// the queue (a held watch hears it from the background sweep); it is leased again as
/// attempt 2; when that one runs out too, with `max_attempts` 2, the task fails with a reason
/// that says the lease expired. The node's completion after that is still taken, as late.
#[tokio::test]
async fn an_expired_lease_is_given_again_then_fails_the_task() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-expiry").await;
    let api = NodeApi::new(&server, &node);
    let id = create_for(
        &server,
        &node,
        "node.exec",
        json!({"timeout_s": 1, "max_attempts": 2}),
    )
    .await;

    let before = now_ms();
    let first = api.lease(10).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!((first[0].id.as_str(), first[0].attempt), (id.as_str(), 1));
    assert_eq!(first[0].timeout_s, 1);
    let expires = first[0].lease_expires_at_ms;
    assert!(
        expires >= before + 1000 && expires <= now_ms() + 1000,
        "lease_expires_at_ms {expires} is not lease time + 1 s (leased at {before}..)"
    );
    assert!(
        api.lease(10).await.is_empty(),
        "a running lease is not given out again"
    );
    let shown = show(&server, &id).await;
    assert_eq!(shown["state"], "leased", "{shown}");
    assert_eq!(shown["attempts"], 1, "{shown}");
    assert_eq!(shown["lease_expires_at_ms"], expires, "{shown}");

    // Nothing but the background sweep can return it now: the held watch hears it.
    let (status, reply) = api
        .watch("generation=0&timeout_s=10", Duration::from_secs(6))
        .await;
    let heard = now_ms();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"generation": 0, "tasks_queued": 1, "changed": true})
    );
    assert!(
        heard >= expires,
        "the task was queued again {} ms before its lease ran out",
        expires - heard
    );
    println!(
        "expired lease back in the queue {} ms after it ran out",
        heard - expires
    );

    let second = api.lease(10).await;
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!((second[0].id.as_str(), second[0].attempt), (id.as_str(), 2));
    let second_expires = second[0].lease_expires_at_ms;

    // Not completed either: this was the last attempt.
    let failed = wait_while_state(&server, &id, "leased", Duration::from_secs(5)).await;
    assert!(
        now_ms() >= second_expires,
        "failed before the lease ran out"
    );
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["attempts"], 2, "{failed}");
    let reason = failed["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        reason.contains("expire"),
        "the reason says the lease expired: {failed}"
    );
    assert_eq!(failed["lease_expires_at_ms"], Value::Null, "{failed}");
    assert!(failed["finished_at_ms"].is_u64(), "{failed}");
    assert_eq!(failed["late"], false, "{failed}");
    assert!(
        api.lease(10).await.is_empty(),
        "a failed task is not leased"
    );
    let (status, reply) = api.renew(&id).await;
    assert_eq!((status, code(&reply)), (409, "lease_lost"), "{reply}");

    // The node finishes after all: its word is taken, marked late; again, the same answer.
    for _ in 0..2 {
        let (status, reply) = api.complete(&id, "Succeeded", "finished after all").await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply, json!({"state": "succeeded", "late": true}));
    }
    let done = show(&server, &id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["late"], true, "{done}");
    assert_eq!(done["output"], "finished after all", "{done}");
    assert_eq!(
        done["outcome"].as_str().map(str::to_lowercase).as_deref(),
        Some("succeeded"),
        "{done}"
    );
    server.stop().await;
}

/// A completion that comes while an expired task waits in the queue ends it: the node's
/// outcome, late; renewing it is refused as a lost lease; it is not leased again.
#[tokio::test]
async fn a_late_completion_of_a_requeued_task_ends_it() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-late").await;
    let api = NodeApi::new(&server, &node);
    let id = create_for(&server, &node, "node.exec", json!({"timeout_s": 1})).await;
    assert_eq!(api.lease(1).await.len(), 1);
    let (status, reply) = api
        .watch("generation=0&timeout_s=10", Duration::from_secs(6))
        .await;
    assert_eq!((status, reply["tasks_queued"].as_u64()), (200, Some(1)));
    let requeued = show(&server, &id).await;
    assert_eq!(requeued["state"], "queued", "{requeued}");
    assert_eq!(requeued["attempts"], 1, "{requeued}");
    assert_eq!(
        requeued["lease_expires_at_ms"],
        Value::Null,
        "a queued task has no lease: {requeued}"
    );

    let (status, reply) = api.renew(&id).await;
    assert_eq!((status, code(&reply)), (409, "lease_lost"), "{reply}");
    let (status, reply) = api.complete(&id, "Failed", "exit 3").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"state": "failed", "late": true}));
    assert!(
        api.lease(10).await.is_empty(),
        "a completed task is not leased"
    );
    let done = show(&server, &id).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["attempts"], 1, "{done}");
    assert_eq!(done["late"], true, "{done}");
    assert_eq!(done["output"], "exit 3", "{done}");
    assert_eq!(done["lease_expires_at_ms"], Value::Null, "{done}");
    server.stop().await;
}

/// A completion that comes just after the lease ran out is late, whether or not a sweep has
/// put the task back in the queue yet: lateness is the lease's end, not the sweep's timing.
#[tokio::test]
async fn a_completion_just_past_the_lease_is_late() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-just-late").await;
    let api = NodeApi::new(&server, &node);
    let id = create_for(&server, &node, "node.exec", json!({"timeout_s": 1})).await;
    let leased = api.lease(1).await;
    assert_eq!(leased.len(), 1);
    let expires = leased[0].lease_expires_at_ms;
    let wait = (expires + 30).saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (status, reply) = api.complete(&id, "Succeeded", "just too late").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"state": "succeeded", "late": true}));
    let done = show(&server, &id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["late"], true, "{done}");
    assert_eq!(done["attempts"], 1, "{done}");
    assert!(
        api.lease(10).await.is_empty(),
        "a completed task is not leased"
    );
    server.stop().await;
}

/// A renew that comes after the lease ran out is refused (409 `lease_lost`), even before a
/// sweep has put the task back: the lease ended at `lease_expires_at_ms`, as `complete` (late)
/// sees it. Otherwise the expired lease of a last attempt could be revived and the task never
/// fail. (The renew is connected beforehand and sent 2 ms past the end, so it lands before
/// the once-a-second sweep but for a 1-in-hundreds phase.)
#[tokio::test]
async fn a_renew_past_the_lease_is_refused() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-renew-late").await;
    let api = NodeApi::new(&server, &node);
    let id = create_for(
        &server,
        &node,
        "node.exec",
        json!({"timeout_s": 1, "max_attempts": 1}),
    )
    .await;
    let leased = api.lease(1).await;
    assert_eq!(leased.len(), 1);
    let expires = leased[0].lease_expires_at_ms;
    let renew = api
        .http
        .post(api.url(&format!("/tasks/{id}/renew")))
        .json(&json!({}))
        .connect()
        .await
        .unwrap();
    let wait = (expires + 2).saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (status, reply) = status_json(renew.send().await.unwrap()).await;
    assert_eq!(
        (status, code(&reply)),
        (409, "lease_lost"),
        "renewed after the lease ran out at {expires}: {reply}"
    );
    let failed = wait_while_state(&server, &id, "leased", Duration::from_secs(3)).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    server.stop().await;
}

/// Stopping the controller does not wait for held watches to run out: they are answered and
/// the controller stops within a few seconds (not the watch's 60 s nor the 20 s drain).
#[tokio::test]
async fn stopping_the_controller_ends_held_watches() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-watch-stop").await;
    let api = NodeApi::new(&server, &node);
    let handle = send_watch(api.watch_connected("generation=0&timeout_s=60").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!handle.is_finished(), "the watch is held");
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), server.stop())
        .await
        .expect("stop waits for the held watch");
    let stopped = start.elapsed();
    println!("stopped {stopped:?} after being asked, with a watch held");
    assert!(stopped < Duration::from_secs(5), "stop took {stopped:?}");
    let (status, reply, _) = answer(handle, Duration::from_secs(5)).await;
    assert!([200, 503].contains(&status), "{status}: {reply}");
}

/// Renewing every 0.5 s keeps a 2 s lease for 4 s: each renew moves its end to now + 2 s, no
/// lease call gets the task meanwhile, and the completion after is on time.
#[tokio::test]
async fn renewing_keeps_a_lease() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-renew").await;
    let api = NodeApi::new(&server, &node);
    let id = create_for(&server, &node, "node.exec", json!({"timeout_s": 2})).await;
    let leased = api.lease(1).await;
    assert_eq!(leased.len(), 1);
    let mut last = leased[0].lease_expires_at_ms;

    let start = Instant::now();
    let mut renewals = 0;
    while start.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = now_ms();
        let (status, reply) = if renewals % 2 == 0 {
            api.renew_bare(&id).await
        } else {
            api.renew(&id).await
        };
        assert_eq!(status, 200, "renew {renewals}: {reply}");
        let renewed: TaskRenewResponse = serde_json::from_value(reply.clone())
            .unwrap_or_else(|e| panic!("renew reply {reply}: {e}"));
        let until = renewed.lease_expires_at_ms;
        assert!(
            until >= before + 2000 && until <= now_ms() + 2000,
            "renew {renewals}: lease_expires_at_ms {until} is not now + 2 s ({before}..)"
        );
        assert!(until >= last, "a renew moved the lease's end back");
        last = until;
        let stolen = api.lease(5).await;
        assert!(
            stolen.is_empty(),
            "a renewed lease was given out: {stolen:?}"
        );
        renewals += 1;
    }
    assert!(renewals >= 6, "only {renewals} renewals");
    let shown = show(&server, &id).await;
    assert_eq!(shown["state"], "leased", "{shown}");
    assert_eq!(shown["attempts"], 1, "{shown}");
    assert_eq!(shown["lease_expires_at_ms"], last, "{shown}");

    let (status, reply) = api.complete(&id, "Succeeded", "ok").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"state": "succeeded", "late": false}));
    let done = show(&server, &id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["late"], false, "{done}");
    assert_eq!(done["lease_expires_at_ms"], Value::Null, "{done}");
    assert!(done["finished_at_ms"].is_u64(), "{done}");
    server.stop().await;
}

/// Completion rules: idempotent; only the node that leased the task may complete it (404 for
/// another node and for an unknown id, 409 `not_leased` for one never leased); each outcome
/// gives its state; an output past the cap is stored cut at a character boundary with a
/// marker line, one at the cap whole; a malformed body is refused and leaves the task leased.
#[tokio::test]
async fn completing_a_task_follows_the_rules() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-complete-a").await;
    let other = server.enroll_new("uuid-complete-b").await;
    let api = NodeApi::new(&server, &node);
    let other_api = NodeApi::new(&server, &other);
    let mut tasks = Vec::new();
    for kind in [
        "a.ok",
        "a.fail",
        "a.interrupt",
        "a.big",
        "a.utf8",
        "a.exact",
        "a.malformed",
    ] {
        tasks.push(create_for(&server, &node, kind, json!({})).await);
    }
    let leased = api.lease(10).await;
    assert_eq!(
        leased.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        tasks,
        "all seven, oldest first"
    );
    let never = create_for(&server, &node, "a.never", json!({})).await;
    let [ok, fail, interrupt, big, utf8, exact, malformed] =
        <[String; 7]>::try_from(tasks).unwrap();

    // Another node, an unknown id: not found, nothing changes.
    let before = show(&server, &ok).await;
    let (status, reply) = other_api.complete(&ok, "Succeeded", "mine now").await;
    assert_eq!((status, code(&reply)), (404, "not_found"), "{reply}");
    let (status, reply) = other_api.renew(&ok).await;
    assert_eq!((status, code(&reply)), (404, "not_found"), "{reply}");
    let after = show(&server, &ok).await;
    assert_eq!(
        after, before,
        "another node's calls leave the task as it was"
    );
    assert_eq!(after["state"], "leased");
    let (status, reply) = api.complete(NO_SUCH_TASK, "Succeeded", "").await;
    assert_eq!((status, code(&reply)), (404, "not_found"), "{reply}");
    let (status, reply) = api.renew(NO_SUCH_TASK).await;
    assert_eq!((status, code(&reply)), (404, "not_found"), "{reply}");

    // Never leased: not the node's to complete yet.
    let (status, reply) = api.complete(&never, "Succeeded", "").await;
    assert_eq!((status, code(&reply)), (409, "not_leased"), "{reply}");
    let shown = show(&server, &never).await;
    assert_eq!(
        (&shown["state"], &shown["attempts"]),
        (&json!("queued"), &json!(0))
    );

    // Idempotent: the same answer again, and a second, different word changes nothing.
    for _ in 0..2 {
        let (status, reply) = api.complete(&ok, "Succeeded", "all good").await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply, json!({"state": "succeeded", "late": false}));
    }
    let (status, reply) = api.complete(&ok, "Failed", "changed my mind").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"state": "succeeded", "late": false}));
    let shown = show(&server, &ok).await;
    assert_eq!(shown["output"], "all good", "{shown}");
    assert_eq!(shown["output_truncated"], false, "{shown}");

    for (id, outcome, state) in [
        (&fail, "Failed", "failed"),
        (&interrupt, "Interrupted", "interrupted"),
    ] {
        let (status, reply) = api.complete(id, outcome, "why").await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply, json!({"state": state, "late": false}));
        let shown = show(&server, id).await;
        assert_eq!(shown["state"], state, "{shown}");
        assert_eq!(shown["output"], "why", "{shown}");
        assert_eq!(
            shown["outcome"].as_str().map(str::to_lowercase).as_deref(),
            Some(state),
            "{shown}"
        );
    }

    // 100,000 bytes of output: stored cut, with a marker line saying how much more there was.
    let output: String = (0..100_000u32)
        .map(|i| char::from(b'a' + u8::try_from(i % 26).unwrap()))
        .collect();
    let kept = complete_cut(&server, &api, &big, &output).await;
    assert!(
        kept >= DEFAULT_OUTPUT_MAX - 1024,
        "only {kept} bytes kept of a {DEFAULT_OUTPUT_MAX}-byte cap"
    );
    // Cut at a character boundary: 3-byte characters do not divide the cap.
    let output = "€".repeat(40_000);
    let kept = complete_cut(&server, &api, &utf8, &output).await;
    assert!(kept >= DEFAULT_OUTPUT_MAX - 3, "only {kept} bytes kept");
    // Exactly the cap: kept whole.
    let output = "x".repeat(DEFAULT_OUTPUT_MAX);
    let (status, reply) = api.complete(&exact, "Succeeded", &output).await;
    assert_eq!(
        (status, &reply["state"]),
        (200, &json!("succeeded")),
        "{reply}"
    );
    let shown = show(&server, &exact).await;
    assert_eq!(shown["output_truncated"], false);
    assert!(
        shown["output"] == output.as_str(),
        "an output at the cap is kept whole"
    );

    // Malformed completions: refused, the task stays leased.
    let path = format!("/tasks/{malformed}/complete");
    let bodies: [&[u8]; 5] = [
        br#"{"outcome": "Succeeded", "output": "#,
        br#"{"outcome": "Exploded", "output": ""}"#,
        br#"{"outcome": "succeeded"}"#,
        br#"{"output": "no outcome"}"#,
        br#"{"outcome": "Succeeded", "output": 7}"#,
    ];
    for body in bodies {
        let (status, reply) = api.post_raw(&path, body).await;
        let text = String::from_utf8_lossy(body);
        assert_eq!(status, 400, "{text}: {reply}");
        assert!(
            ["malformed_json", "invalid_request"].contains(&code(&reply)),
            "{text}: {reply}"
        );
    }
    let shown = show(&server, &malformed).await;
    assert_eq!(shown["state"], "leased", "{shown}");
    assert_eq!(shown["outcome"], Value::Null, "{shown}");
    let (status, reply) = api.complete(&malformed, "Succeeded", "").await;
    assert_eq!((status, reply["state"].as_str()), (200, Some("succeeded")));

    // Lists leave the output out; `show` has it.
    let listed = list(&server, &format!("node={}", node.node_id)).await;
    assert_eq!(listed.len(), 8);
    for task in &listed {
        assert!(
            task.get("output").is_none_or(Value::is_null),
            "a list carries no output: {}",
            task["id"]
        );
    }
    server.stop().await;
}

/// Cancelling: a queued task is never leased; a leased one loses its lease (renew answers
/// 409 `lease_lost`) and the node's completion after leaves it cancelled, late, with the
/// output kept; a final task cannot be cancelled (409 `task_finished`); unknown is 404.
#[tokio::test]
async fn a_cancelled_task_is_not_run_and_a_finished_one_cannot_be_cancelled() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-cancel").await;
    let api = NodeApi::new(&server, &node);

    let queued = create_for(&server, &node, "c.queued", json!({})).await;
    let (status, task) = cancel(&server, &queued).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["id"], queued.as_str());
    assert_eq!(task["state"], "cancelled", "{task}");
    assert!(
        task["reason"]
            .as_str()
            .is_some_and(|r| r.to_lowercase().contains("operator")),
        "the reason names the operator: {task}"
    );
    assert!(task["finished_at_ms"].is_u64(), "{task}");
    assert!(
        api.lease(10).await.is_empty(),
        "a cancelled task is not leased"
    );
    let (status, reply) = api
        .watch("generation=0&timeout_s=1", Duration::from_secs(4))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        reply,
        json!({"generation": 0, "tasks_queued": 0, "changed": false}),
        "a cancelled task is not queued"
    );

    let running = create_for(&server, &node, "c.running", json!({})).await;
    assert_eq!(api.lease(10).await.len(), 1);
    let (status, task) = cancel(&server, &running).await;
    assert_eq!(
        (status, &task["state"]),
        (200, &json!("cancelled")),
        "{task}"
    );
    assert_eq!(task["lease_expires_at_ms"], Value::Null, "{task}");
    let (status, reply) = api.renew(&running).await;
    assert_eq!((status, code(&reply)), (409, "lease_lost"), "{reply}");
    for _ in 0..2 {
        let (status, reply) = api.complete(&running, "Succeeded", "did it anyway").await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply, json!({"state": "cancelled", "late": true}));
    }
    let shown = show(&server, &running).await;
    assert_eq!(shown["state"], "cancelled", "{shown}");
    assert_eq!(shown["late"], true, "{shown}");
    assert_eq!(shown["output"], "did it anyway", "{shown}");

    let finished = create_for(&server, &node, "c.finished", json!({})).await;
    assert_eq!(api.lease(10).await.len(), 1);
    assert_eq!(api.complete(&finished, "Succeeded", "").await.0, 200);
    for id in [&finished, &queued, &running] {
        let (status, reply) = cancel(&server, id).await;
        assert_eq!(
            (status, code(&reply)),
            (409, "task_finished"),
            "{id}: {reply}"
        );
    }
    assert_eq!(show(&server, &finished).await["state"], "succeeded");
    let (status, reply) = cancel(&server, NO_SUCH_TASK).await;
    assert_eq!((status, code(&reply)), (404, "not_found"), "{reply}");
    server.stop().await;
}

/// The watch: runs out with `changed` false when nothing for its node happens (another
/// node's changes do not count); is answered within 2 s by new desired modules and network
/// from the operator API, by modules another writer of the database sets, and by a task the
/// binary creates in another process; answers at once while a task is queued or the
/// generation asked is behind; refuses a bad query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_is_held_until_something_changes_for_its_node() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-watch").await;
    let other = server.enroll_new("uuid-watch-other").await;
    let api = NodeApi::new(&server, &node);
    let modules = json!({"modules": [
        {"name": "tools", "reference": "registry.local/modules/tools:1", "priority": 10}
    ]});

    // Nothing for this node: timeout_s=1 runs out, whatever happens to another node.
    let watch = api.watch_connected("generation=0&timeout_s=1").await;
    let start = Instant::now();
    let handle = send_watch(watch);
    let path = format!("/api/v1/nodes/{}/desired/modules", other.node_id);
    let (status, reply) = server.operator_put(&path, &modules).await;
    assert_eq!((status, reply["generation"].as_u64()), (200, Some(1)));
    create_for(&server, &other, "w.other", json!({})).await;
    let (status, reply, at) = answer(handle, Duration::from_secs(5)).await;
    let waited = at - start;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"generation": 0, "tasks_queued": 0, "changed": false})
    );
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(3),
        "timeout_s=1 answered after {waited:?}"
    );

    // Held, then answered by a new desired state.
    let handle = send_watch(api.watch_connected("generation=0&timeout_s=20").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!handle.is_finished(), "a watch with nothing new is held");
    let put_at = Instant::now();
    let path = format!("/api/v1/nodes/{}/desired/modules", node.node_id);
    let (status, reply) = server.operator_put(&path, &modules).await;
    assert_eq!((status, reply["generation"].as_u64()), (200, Some(1)));
    let (status, reply, at) = answer(handle, Duration::from_secs(10)).await;
    let took = at.saturating_duration_since(put_at);
    println!("watch answered {took:?} after the operator set the desired modules");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"generation": 1, "tasks_queued": 0, "changed": true})
    );
    assert!(took < Duration::from_secs(2), "answered after {took:?}");

    // Held, then answered by a new desired network.
    let handle = send_watch(api.watch_connected("generation=1&timeout_s=20").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !handle.is_finished(),
        "a watch at the current generation is held"
    );
    let put_at = Instant::now();
    let network = json!({"network": {
        "interface": "pn0", "address": "10.88.0.7/16", "listen_port": 51820, "peers": []
    }});
    let path = format!("/api/v1/nodes/{}/desired/network", node.node_id);
    let (status, reply) = server.operator_put(&path, &network).await;
    assert_eq!(
        (status, reply["generation"].as_u64()),
        (200, Some(2)),
        "{reply}"
    );
    let (status, reply, at) = answer(handle, Duration::from_secs(10)).await;
    let took = at.saturating_duration_since(put_at);
    println!("watch answered {took:?} after the operator set the desired network");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"generation": 2, "tasks_queued": 0, "changed": true})
    );
    assert!(took < Duration::from_secs(2), "answered after {took:?}");

    // Held, then answered by modules another writer of the database sets (as `module assign`
    // does from its own process): the controller notices without being told.
    let handle = send_watch(api.watch_connected("generation=2&timeout_s=20").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !handle.is_finished(),
        "a watch at the current generation is held"
    );
    let storage = Storage::open(&server.data()).await.unwrap();
    let assigned = [DesiredModule {
        name: "hello".into(),
        reference: "registry.local/modules/hello:2".into(),
        priority: 70,
    }];
    let generation = storage
        .set_desired_modules(&node.node_id, &assigned, powernode_controller::now_ms())
        .await
        .unwrap();
    let set_at = Instant::now();
    storage.close().await;
    assert_eq!(generation, Some(3));
    let (status, reply, at) = answer(handle, Duration::from_secs(10)).await;
    let took = at.saturating_duration_since(set_at);
    println!("watch answered {took:?} after another writer set the desired modules");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"generation": 3, "tasks_queued": 0, "changed": true})
    );
    assert!(took < Duration::from_secs(2), "answered after {took:?}");

    // Held, then answered by a task the binary creates in another process.
    let handle = send_watch(api.watch_connected("generation=3&timeout_s=20").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !handle.is_finished(),
        "a watch at the current generation is held"
    );
    let data = server.data();
    let (exit, out, stderr) = run(&[
        "task",
        "create",
        "--data",
        data.to_str().unwrap(),
        "--node",
        &node.node_id,
        "--kind",
        "w.cli",
    ])
    .await;
    let created_at = Instant::now();
    assert_eq!(exit, 0, "{stderr}");
    assert_task_id(out.trim());
    let (status, reply, at) = answer(handle, Duration::from_secs(10)).await;
    let took = at.saturating_duration_since(created_at);
    println!("watch answered {took:?} after `task create` exited");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"generation": 3, "tasks_queued": 1, "changed": true})
    );
    assert!(took < Duration::from_secs(2), "answered after {took:?}");

    // A queued task, or a generation behind: at once, whatever timeout was asked.
    for query in [
        "generation=3",
        "generation=3&timeout_s=300",
        "generation=0&timeout_s=5",
    ] {
        let start = Instant::now();
        let (status, reply) = api.watch(query, Duration::from_secs(5)).await;
        let took = start.elapsed();
        assert_eq!(status, 200, "{query}: {reply}");
        assert_eq!(
            reply,
            json!({"generation": 3, "tasks_queued": 1, "changed": true}),
            "{query}"
        );
        assert!(took < Duration::from_secs(1), "{query}: {took:?}");
    }

    // Bad queries.
    for query in [
        "",
        "timeout_s=5",
        "generation=abc",
        "generation=-1",
        "generation=1&timeout_s=0",
        "generation=1&timeout_s=301",
    ] {
        let (status, reply) = api.watch(query, Duration::from_secs(5)).await;
        assert_eq!(
            (status, code(&reply)),
            (400, "invalid_query"),
            "?{query}: {reply}"
        );
    }
    let (status, reply) = status_json(
        server
            .anonymous()
            .get(server.url("/node_api/v1/watch?generation=0&timeout_s=1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code(&reply)), (401, "client_certificate_required"));
    server.stop().await;
}

/// 300 watches of one node held at once (all connected before any is sent, none answered
/// before the change) are all answered within 2 s of one task being created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_held_watches_all_hear_one_task() {
    const WATCHES: usize = 300;
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-many-watches").await;
    let api = NodeApi::new(&server, &node);

    let mut connecting = JoinSet::new();
    for _ in 0..WATCHES {
        let api = api.clone();
        connecting.spawn(async move { api.watch_connected("generation=0&timeout_s=20").await });
    }
    let mut connected = Vec::with_capacity(WATCHES);
    while let Some(watch) = connecting.join_next().await {
        connected.push(watch.unwrap());
    }
    let answered = Arc::new(AtomicUsize::new(0));
    let mut watches = JoinSet::new();
    for watch in connected {
        let answered = answered.clone();
        watches.spawn(async move {
            let reply = watch.send().await.unwrap();
            let at = Instant::now();
            answered.fetch_add(1, Ordering::SeqCst);
            let (status, body) = status_json(reply).await;
            (status, body, at)
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        answered.load(Ordering::SeqCst),
        0,
        "watches answered with nothing new"
    );

    let created_at = Instant::now();
    create_for(&server, &node, "w.many", json!({})).await;
    let mut slowest = Duration::ZERO;
    let mut count = 0;
    let all = async {
        while let Some(joined) = watches.join_next().await {
            let (status, body, at) = joined.unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body,
                json!({"generation": 0, "tasks_queued": 1, "changed": true})
            );
            slowest = slowest.max(at.saturating_duration_since(created_at));
            count += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(25), all)
        .await
        .expect("every watch is answered");
    println!("{count} watches answered, the last {slowest:?} after the task was created");
    assert_eq!(count, WATCHES);
    assert!(
        slowest < Duration::from_secs(2),
        "the last after {slowest:?}"
    );
    server.stop().await;
}

/// A lease asks for 1 to 100 tasks in a well-formed body; it needs an enrolled, unrevoked
/// node's certificate, as the other node calls do.
#[tokio::test]
async fn a_bad_lease_is_refused() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-bad-lease").await;
    let api = NodeApi::new(&server, &node);
    let id = create_for(&server, &node, "l.one", json!({})).await;

    for body in [
        json!({"max": 0}),
        json!({"max": task_limits::MAX_LEASE + 1}),
        json!({"max": -1}),
        json!({"max": "1"}),
        json!({}),
        json!({"max": 1, "extra": true}),
    ] {
        let (status, reply) = api.lease_raw(&body).await;
        assert_eq!(
            (status, code(&reply)),
            (400, "invalid_request"),
            "{body}: {reply}"
        );
    }
    let (status, reply) = api.post_raw("/tasks/lease", br#"{"max": "#).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        ["malformed_json", "invalid_request"].contains(&code(&reply)),
        "{reply}"
    );
    assert_eq!(
        show(&server, &id).await["state"],
        "queued",
        "nothing was leased"
    );

    // The largest lease is fine.
    let leased = api.lease(task_limits::MAX_LEASE).await;
    assert_eq!(
        leased.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        [id.as_str()]
    );
    assert_eq!(api.lease(task_limits::MAX_LEASE).await, Vec::new());

    // No certificate: refused as the other node calls refuse it.
    let anonymous = server.anonymous();
    for path in [
        "/node_api/v1/tasks/lease".to_owned(),
        format!("/node_api/v1/tasks/{id}/renew"),
        format!("/node_api/v1/tasks/{id}/complete"),
    ] {
        let (status, reply) = post_json(
            &anonymous,
            server.url(&path),
            &json!({"max": 1, "outcome": "Succeeded"}),
        )
        .await;
        assert_eq!(
            (status, code(&reply)),
            (401, "client_certificate_required"),
            "{path}: {reply}"
        );
    }
    let (status, reply) = post_json(
        &anonymous,
        server.url("/node_api/v1/events"),
        &json!({"events": []}),
    )
    .await;
    assert_eq!(
        (status, code(&reply)),
        (401, "client_certificate_required"),
        "{reply}"
    );
    assert_eq!(show(&server, &id).await["state"], "leased");

    // A revoked node gets nothing.
    create_for(&server, &node, "l.two", json!({})).await;
    let path = format!("/api/v1/nodes/{}/revoke", node.node_id);
    let (status, reply) = server.operator_post(&path, &json!({})).await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = api.lease_raw(&json!({"max": 1})).await;
    assert_eq!((status, code(&reply)), (403, "revoked"), "{reply}");
    server.stop().await;
}

/// Creating through the operator API: defaults, bounds of every field, unknown node, the
/// operator token; lists filter by node and state and keep the newest `limit`, oldest first;
/// a lease hands out the oldest first.
#[tokio::test]
async fn created_tasks_are_checked_listed_and_leased_oldest_first() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-create").await;
    let other = server.enroll_new("uuid-create-other").await;
    let api = NodeApi::new(&server, &node);

    let before = now_ms();
    let task = create(&server, json!({"node": node.node_id, "kind": "node.exec"})).await;
    assert_task_id(&id_of(&task));
    assert_eq!(task["node_id"], node.node_id.as_str());
    assert_eq!(task["kind"], "node.exec");
    assert_eq!(task["args"], json!({}));
    assert_eq!(task["state"], "queued");
    assert_eq!(task["attempts"], 0);
    assert_eq!(task["max_attempts"], 3);
    assert_eq!(task["timeout_s"], 300);
    assert_eq!(task["lease_expires_at_ms"], Value::Null);
    assert_eq!(task["finished_at_ms"], Value::Null);
    assert_eq!(task["reason"], Value::Null);
    assert_eq!(task["outcome"], Value::Null);
    assert_eq!(task["output_truncated"], false);
    assert_eq!(task["late"], false);
    let created_at = task["created_at_ms"].as_u64().unwrap();
    assert!(created_at >= before && created_at <= now_ms());
    assert_eq!(task["updated_at_ms"], created_at);
    let shown = show(&server, &id_of(&task)).await;
    assert_eq!(shown["output"], Value::Null, "{shown}");
    assert_eq!(shown["kind"], "node.exec");

    // Bounds that pass.
    let longest_kind = format!("node.{}", "a".repeat(task_limits::MAX_KIND - 5));
    assert_eq!(longest_kind.len(), task_limits::MAX_KIND);
    let big_args = json!({"pad": "x".repeat(task_limits::MAX_ARGS - 20)});
    for (body, field, want) in [
        (json!({"kind": longest_kind}), "kind", json!(longest_kind)),
        (json!({"kind": "a_1.b2_c.d"}), "kind", json!("a_1.b2_c.d")),
        (
            json!({"kind": "k", "args": [1, "two"]}),
            "args",
            json!([1, "two"]),
        ),
        (
            json!({"kind": "k", "args": big_args}),
            "args",
            big_args.clone(),
        ),
        (json!({"kind": "k", "timeout_s": 1}), "timeout_s", json!(1)),
        (
            json!({"kind": "k", "timeout_s": 86_400}),
            "timeout_s",
            json!(86_400),
        ),
        (
            json!({"kind": "k", "max_attempts": 1}),
            "max_attempts",
            json!(1),
        ),
        (
            json!({"kind": "k", "max_attempts": 100}),
            "max_attempts",
            json!(100),
        ),
    ] {
        let mut body = body;
        body["node"] = json!(other.node_id);
        let task = create(&server, body.clone()).await;
        assert_eq!(task[field], want, "{body}");
    }

    // Bounds that do not.
    let too_long = "a".repeat(task_limits::MAX_KIND + 1);
    let too_big = json!({"pad": "x".repeat(task_limits::MAX_ARGS)});
    for body in [
        json!({"kind": ""}),
        json!({"kind": "Node.exec"}),
        json!({"kind": "node..exec"}),
        json!({"kind": "node."}),
        json!({"kind": ".node"}),
        json!({"kind": "1node"}),
        json!({"kind": "node.1exec"}),
        json!({"kind": "node-exec"}),
        json!({"kind": "node exec"}),
        json!({"kind": too_long}),
        json!({"kind": "k", "args": too_big}),
        json!({"kind": "k", "timeout_s": 0}),
        json!({"kind": "k", "timeout_s": 86_401}),
        json!({"kind": "k", "max_attempts": 0}),
        json!({"kind": "k", "max_attempts": 101}),
        json!({"kind": "k", "priority": 1}),
        json!({"kind": 7}),
    ] {
        let mut body = body;
        body["node"] = json!(node.node_id);
        let (status, reply) = server.operator_post("/api/v1/tasks", &body).await;
        assert_eq!(
            (status, code(&reply)),
            (400, "invalid_request"),
            "{body}: {reply}"
        );
    }
    let (status, reply) = server
        .operator_post("/api/v1/tasks", &json!({"kind": "k"}))
        .await;
    assert_eq!(status, 400, "no node: {reply}");
    let (status, reply) = server
        .operator_post("/api/v1/tasks", &json!({"node": "node-nope", "kind": "k"}))
        .await;
    assert_eq!((status, code(&reply)), (404, "not_found"), "{reply}");
    let (status, reply) = server
        .operator_get(&format!("/api/v1/tasks/{NO_SUCH_TASK}"))
        .await;
    assert_eq!((status, code(&reply)), (404, "not_found"), "{reply}");
    let reply = server
        .anonymous()
        .post(server.url("/api/v1/tasks"))
        .json(&json!({"node": node.node_id, "kind": "k"}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 401, "the operator API wants its token");
    assert_eq!(
        list(&server, &format!("node={}", node.node_id)).await.len(),
        1
    );

    // Lists: by node, by state, the newest `limit` oldest first.
    let mut mine = vec![id_of(&task)];
    for i in 0..4 {
        mine.push(create_for(&server, &node, "node.exec", json!({"args": {"i": i}})).await);
    }
    let listed = list(&server, &format!("node={}", node.node_id)).await;
    assert_eq!(ids(&listed), mine);
    let listed = list(&server, &format!("node={}&limit=2", node.node_id)).await;
    assert_eq!(ids(&listed), &mine[3..]);
    assert_eq!(list(&server, "").await.len(), 8 + mine.len());
    assert_eq!(list(&server, "limit=3").await.len(), 3);
    let listed = list(&server, &format!("node={}&state=queued", other.node_id)).await;
    assert_eq!(listed.len(), 8);
    assert!(listed
        .iter()
        .all(|t| t["node_id"] == other.node_id.as_str()));

    for query in ["limit=0", "limit=1001", "state=running", "colour=red"] {
        let (status, reply) = server.operator_get(&format!("/api/v1/tasks?{query}")).await;
        assert_eq!(
            (status, code(&reply)),
            (400, "invalid_query"),
            "?{query}: {reply}"
        );
    }
    assert_eq!(list(&server, "limit=1000").await.len(), 8 + mine.len());

    // A lease takes the oldest first.
    let leased = api.lease(2).await;
    assert_eq!(
        leased.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        &mine[..2]
    );
    let leased = api.lease(10).await;
    assert_eq!(
        leased.iter().map(|t| t.id.clone()).collect::<Vec<_>>(),
        &mine[2..]
    );
    assert_eq!(leased[0].args, json!({"i": 1}));
    let listed = list(&server, &format!("node={}&state=leased", node.node_id)).await;
    assert_eq!(ids(&listed), mine);
    assert!(
        list(&server, &format!("node={}&state=queued", node.node_id))
            .await
            .is_empty()
    );
    server.stop().await;
}

/// The binary on the data directory of a running controller: `task create` (plain and
/// `--json`), `tasks`, `task show`, `task cancel`, the controller and its node seeing what the
/// commands wrote, and the exit codes of failures (1) and usage errors (2).
#[tokio::test]
async fn task_commands_round_trip_through_the_database() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-task-cli").await;
    let api = NodeApi::new(&server, &node);
    let data = server.data();
    let data = data.to_str().unwrap();
    let node_id = node.node_id.as_str();

    let (exit, out, stderr) = run(&[
        "task",
        "create",
        "--data",
        data,
        "--node",
        node_id,
        "--kind",
        "node.exec",
        "--args",
        r#"{"cmd": ["uptime"]}"#,
        "--timeout",
        "30s",
        "--max-attempts",
        "2",
        "--json",
    ])
    .await;
    assert_eq!(exit, 0, "{stderr}");
    let first: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let first_id = id_of(&first);
    assert_task_id(&first_id);
    assert_eq!(first["node_id"], node_id);
    assert_eq!(first["kind"], "node.exec");
    assert_eq!(first["args"], json!({"cmd": ["uptime"]}));
    assert_eq!(first["timeout_s"], 30);
    assert_eq!(first["max_attempts"], 2);
    assert_eq!(first["state"], "queued");
    assert_eq!(first["attempts"], 0);

    let (exit, out, stderr) = run(&[
        "task",
        "create",
        "--data",
        data,
        "--node",
        node_id,
        "--kind",
        "node.reboot",
    ])
    .await;
    assert_eq!(exit, 0, "{stderr}");
    let second_id = out.trim().to_owned();
    assert_task_id(&second_id);

    let (exit, out, stderr) = run(&["tasks", "--data", data, "--node", node_id, "--json"]).await;
    assert_eq!(exit, 0, "{stderr}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(ids(&listed), [first_id.as_str(), second_id.as_str()]);
    let (exit, out, _) = run(&["tasks", "--data", data, "--limit", "1", "--json"]).await;
    assert_eq!(exit, 0);
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(ids(&listed), [second_id.as_str()], "the newest one");
    let (exit, out, stderr) = run(&["tasks", "--data", data]).await;
    assert_eq!(exit, 0, "{stderr}");
    for word in [&first_id, &second_id, "node.exec", "node.reboot", "queued"] {
        assert!(out.contains(word), "{word} not in:\n{out}");
    }

    // The controller sees what the command wrote; the node leases it.
    let shown = show(&server, &first_id).await;
    assert_eq!(shown["args"], json!({"cmd": ["uptime"]}));
    let leased = api.lease(1).await;
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].id, first_id);
    assert_eq!(leased[0].args, json!({"cmd": ["uptime"]}));
    assert_eq!(leased[0].timeout_s, 30);
    let (status, _) = api.complete(&first_id, "Succeeded", "up 3 days").await;
    assert_eq!(status, 200);

    let (exit, out, stderr) = run(&["task", "show", &first_id, "--data", data, "--json"]).await;
    assert_eq!(exit, 0, "{stderr}");
    let shown: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(shown["state"], "succeeded", "{shown}");
    assert_eq!(shown["attempts"], 1);
    assert_eq!(shown["output"], "up 3 days");
    let (exit, out, _) = run(&["task", "show", &first_id, "--data", data]).await;
    assert_eq!(exit, 0);
    for word in [first_id.as_str(), "succeeded", "up 3 days"] {
        assert!(out.contains(word), "{word} not in:\n{out}");
    }
    let (exit, out, _) = run(&["tasks", "--data", data, "--state", "queued", "--json"]).await;
    assert_eq!(exit, 0);
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(ids(&listed), [second_id.as_str()]);

    let (exit, _, stderr) = run(&["task", "cancel", &second_id, "--data", data]).await;
    assert_eq!(exit, 0, "{stderr}");
    assert_eq!(show(&server, &second_id).await["state"], "cancelled");
    assert!(api.lease(10).await.is_empty(), "cancelled by the command");

    // Failures: 1.
    for args in [
        vec!["task", "cancel", second_id.as_str(), "--data", data],
        vec!["task", "cancel", first_id.as_str(), "--data", data],
        vec!["task", "cancel", NO_SUCH_TASK, "--data", data],
        vec!["task", "show", NO_SUCH_TASK, "--data", data],
        vec![
            "task",
            "create",
            "--data",
            data,
            "--node",
            "node-nope",
            "--kind",
            "k",
        ],
    ] {
        let (exit, _, stderr) = run(&args).await;
        assert_eq!(exit, 1, "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?} says why");
    }
    // Usage errors: 2.
    for args in [
        vec!["task", "create", "--data", data, "--node", node_id],
        vec!["task", "create", "--data", data, "--kind", "k"],
        vec!["task", "show", "--data", data],
    ] {
        let (exit, _, stderr) = run(&args).await;
        assert_eq!(exit, 2, "{args:?}: {stderr}");
    }
    assert_eq!(
        list(&server, "").await.len(),
        2,
        "no failed command created a task"
    );
    server.stop().await;
}
