//! Tasks against a real controller: the operator creates, lists, shows and cancels them
//! (`/api/v1/tasks`, and the binary's `task` and `tasks` commands on the data directory); a
//! node leases, renews and completes its own over mTLS (`/node_api/v1/tasks/…`) and
//! long-polls `/node_api/v1/watch` for a new desired state or a queued task.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::http::{Client, Connected, RequestBuilder};
use common::{
    code, heartbeat_body, parse, post_json, run, run_ok, status_json, NodeCreds, TestServer,
};
use powernode_types::node_api::{
    task_limits, DesiredModule, LeasedTask, TaskLeaseResponse, TaskRenewResponse,
};
use serde_json::{json, Value};
use tokio::task::{JoinHandle, JoinSet};

const LIFETIME: Duration = Duration::from_secs(3600);
/// The default output cap (`serve --task-output-max`), bytes: the contract's number, not the
/// controller's constant, so that a change of the default shows here.
const DEFAULT_OUTPUT_MAX: usize = 65_536;
/// An id no task has.
const NO_SUCH_TASK: &str = "task-0000000000000000";

/// The controller's clock, as the node API's `…_at_ms` fields carry it.
fn now_ms() -> u64 {
    u64::try_from(powernode_controller::now_ms()).unwrap()
}

/// Sleeps until the controller's clock reads `at_ms` (at once if it is past).
async fn sleep_until_ms(at_ms: u64) {
    let wait = at_ms.saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

/// Sends `request`: the reply's status and JSON body.
async fn reply_of(request: RequestBuilder) -> (u16, Value) {
    status_json(request.send().await.unwrap()).await
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
        reply_of(request).await
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

    /// Leases up to `max` tasks; the lease must hand out `id` and nothing else.
    async fn lease_only(&self, id: &str, max: u32) -> LeasedTask {
        let mut tasks = self.lease(max).await;
        assert_eq!(leased_ids(&tasks), [id], "lease of up to {max}: {tasks:?}");
        tasks.remove(0)
    }

    /// Leases up to 10 tasks; there must be none, for the reason `why` says.
    async fn assert_none_to_lease(&self, why: &str) {
        let tasks = self.lease(10).await;
        assert!(tasks.is_empty(), "{why}: {tasks:?}");
    }

    /// `POST /tasks/{id}/renew`, with no body yet.
    fn renew_request(&self, id: &str) -> RequestBuilder {
        self.http.post(self.url(&format!("/tasks/{id}/renew")))
    }

    /// Renews with `{}` as the body.
    async fn renew(&self, id: &str) -> (u16, Value) {
        reply_of(self.renew_request(id).json(&json!({}))).await
    }

    /// Renews with no body at all.
    async fn renew_bare(&self, id: &str) -> (u16, Value) {
        reply_of(self.renew_request(id)).await
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

    /// Completes `id` with `outcome` and `output`; the reply must be a 200 saying the task is
    /// now in `state`, and whether the completion was `late`.
    async fn complete_as(&self, id: &str, outcome: &str, output: &str, state: &str, late: bool) {
        let (status, reply) = self.complete(id, outcome, output).await;
        assert_eq!(status, 200, "complete {id}: {reply}");
        assert_eq!(
            reply,
            json!({"state": state, "late": late}),
            "complete {id}"
        );
    }

    /// Sends a heartbeat; the reply's `tasks_queued`, which must be there.
    async fn heartbeat_tasks_queued(&self) -> u64 {
        let (status, reply) = post_json(
            &self.http,
            self.url("/status/heartbeat"),
            &heartbeat_body(0),
        )
        .await;
        assert_eq!(status, 200, "heartbeat: {reply}");
        reply["tasks_queued"]
            .as_u64()
            .unwrap_or_else(|| panic!("no tasks_queued in {reply}"))
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

    /// [`NodeApi::watch`], which must answer 200: the reply.
    async fn watch_ok(&self, query: &str, within: Duration) -> Value {
        let (status, reply) = self.watch(query, within).await;
        assert_eq!(status, 200, "watch?{query}: {reply}");
        reply
    }

    /// A `GET /watch?query` connected (TLS and HTTP up) but not sent yet.
    async fn watch_connected(&self, query: &str) -> Connected {
        self.http
            .get(self.url(&format!("/watch?{query}")))
            .connect()
            .await
            .unwrap()
    }

    /// Sends a connected `GET /watch?query` with [`send_watch`] and checks, 300 ms on, that
    /// it is held (not answered yet).
    async fn hold_watch(&self, query: &str) -> JoinHandle<(u16, Value, Instant)> {
        let handle = send_watch(self.watch_connected(query).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !handle.is_finished(),
            "watch?{query}, with nothing new for it, is held"
        );
        handle
    }
}

/// A heartbeat's reply counts the tasks queued for its node, and only its node's: what lets
/// the node skip the lease call when there is nothing (most heartbeats).
#[tokio::test]
async fn a_heartbeat_reply_counts_the_tasks_queued_for_its_node() {
    let (server, node, api) = start_with_node("uuid-hb-count").await;
    let other = server.enroll_new("uuid-hb-other").await;
    let other_api = NodeApi::new(&server, &other);
    assert_eq!(api.heartbeat_tasks_queued().await, 0);
    let first = create_for(&server, &node, "node.exec", json!({})).await;
    create_for(&server, &node, "node.exec", json!({})).await;
    create_for(&server, &other, "node.exec", json!({})).await;
    assert_eq!(api.heartbeat_tasks_queued().await, 2);
    assert_eq!(other_api.heartbeat_tasks_queued().await, 1);
    api.lease_only(&first, 1).await;
    assert_eq!(
        api.heartbeat_tasks_queued().await,
        1,
        "a leased task is not queued"
    );
    assert_eq!(api.lease(8).await.len(), 1);
    assert_eq!(api.heartbeat_tasks_queued().await, 0);
    assert_eq!(other_api.heartbeat_tasks_queued().await, 1);
}

/// A watch's reply.
fn watch_reply(generation: u64, tasks_queued: u64, changed: bool) -> Value {
    json!({"generation": generation, "tasks_queued": tasks_queued, "changed": changed})
}

/// Sends a connected watch on a task of its own: the handle answers with status, body and
/// when the answer came.
fn send_watch(watch: Connected) -> JoinHandle<(u16, Value, Instant)> {
    send_counted_watch(watch, Arc::default())
}

/// [`send_watch`], adding 1 to `answered` as soon as the answer comes.
fn send_counted_watch(
    watch: Connected,
    answered: Arc<AtomicUsize>,
) -> JoinHandle<(u16, Value, Instant)> {
    tokio::spawn(async move {
        let reply = watch.send().await.unwrap();
        let at = Instant::now();
        answered.fetch_add(1, Ordering::SeqCst);
        let (status, body) = status_json(reply).await;
        (status, body, at)
    })
}

/// Waits for a watch sent with [`send_watch`], at most `within`.
async fn answer(
    handle: JoinHandle<(u16, Value, Instant)>,
    within: Duration,
) -> (u16, Value, Instant) {
    tokio::time::timeout(within, handle)
        .await
        .unwrap_or_else(|_| panic!("the watch was not answered within {within:?}"))
        .unwrap()
}

/// Waits (at most 10 s) for a watch held by [`NodeApi::hold_watch`]: it must answer 200 with
/// `want` less than 2 s after `since`, when `what` happened.
async fn assert_answered_soon(
    handle: JoinHandle<(u16, Value, Instant)>,
    since: Instant,
    what: &str,
    want: Value,
) {
    let (status, reply, at) = answer(handle, Duration::from_secs(10)).await;
    let took = at.saturating_duration_since(since);
    println!("watch answered {took:?} after {what}");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, want, "after {what}");
    assert!(
        took < Duration::from_secs(2),
        "answered {took:?} after {what}"
    );
}

/// A controller with one node enrolled as `uuid`, and that node's side of the task calls.
async fn start_with_node(uuid: &str) -> (TestServer, NodeCreds, NodeApi) {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new(uuid).await;
    let api = NodeApi::new(&server, &node);
    (server, node, api)
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

/// Creates a `node.exec` task for `node` with `extra` fields and leases it (a lease of 1
/// that must hand out that task): its id and the lease.
async fn lease_new(
    server: &TestServer,
    node: &NodeCreds,
    api: &NodeApi,
    extra: Value,
) -> (String, LeasedTask) {
    let id = create_for(server, node, "node.exec", extra).await;
    let leased = api.lease_only(&id, 1).await;
    (id, leased)
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

/// [`show`], whose task must have the fields of `want` (see [`assert_fields`]): the task.
async fn assert_shows(server: &TestServer, id: &str, want: Value) -> Value {
    let task = show(server, id).await;
    assert_fields(&task, &want);
    task
}

/// Each field of the object `want` is in `task` with the same value (a field `task` lacks
/// is null).
#[track_caller]
fn assert_fields(task: &Value, want: &Value) {
    for (key, value) in want.as_object().unwrap() {
        assert_eq!(&task[key], value, "{key} of {task}");
    }
}

/// The task's outcome, in lower case.
fn outcome_of(task: &Value) -> Option<String> {
    task["outcome"].as_str().map(str::to_lowercase)
}

/// A reply refused with `status` and the error code `want_code`; `what` names the call.
#[track_caller]
fn assert_refused((status, reply): (u16, Value), want_status: u16, want_code: &str, what: &str) {
    assert_eq!(
        (status, code(&reply)),
        (want_status, want_code),
        "{what}: {reply}"
    );
}

/// A reply refusing a body that is not JSON or not the call's: 400, `malformed_json` or
/// `invalid_request`; `what` names the body.
#[track_caller]
fn assert_bad_body((status, reply): (u16, Value), what: &str) {
    assert_eq!(status, 400, "{what}: {reply}");
    assert!(
        ["malformed_json", "invalid_request"].contains(&code(&reply)),
        "{what}: {reply}"
    );
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

fn leased_ids(tasks: &[LeasedTask]) -> Vec<String> {
    tasks.iter().map(|t| t.id.clone()).collect()
}

/// `POST /api/v1/tasks/{id}/cancel` with no body.
async fn cancel(server: &TestServer, id: &str) -> (u16, Value) {
    let request = server
        .anonymous()
        .post(server.url(&format!("/api/v1/tasks/{id}/cancel")))
        .bearer_auth(&server.operator_token);
    reply_of(request).await
}

/// [`cancel`], which must work and leave the task cancelled: the task.
async fn cancel_ok(server: &TestServer, id: &str) -> Value {
    let (status, task) = cancel(server, id).await;
    assert_eq!(status, 200, "cancel {id}: {task}");
    assert_fields(&task, &json!({"id": id, "state": "cancelled"}));
    task
}

/// `PUT /api/v1/nodes/{node}/desired/{what}` with `body`; it must work. Answers the
/// generation in the reply.
async fn put_desired(
    server: &TestServer,
    node: &NodeCreds,
    what: &str,
    body: &Value,
) -> Option<u64> {
    let path = format!("/api/v1/nodes/{}/desired/{what}", node.node_id);
    let (status, reply) = server.operator_put(&path, body).await;
    assert_eq!(status, 200, "{path}: {reply}");
    reply["generation"].as_u64()
}

/// A watch held at `generation - 1` ([`NodeApi::hold_watch`]) hears, within 2 s, the operator
/// set `node`'s desired `what` to `body`, which must make `generation`.
async fn watch_hears_desired(
    server: &TestServer,
    node: &NodeCreds,
    api: &NodeApi,
    what: &str,
    body: &Value,
    generation: u64,
) {
    let query = format!("generation={}&timeout_s=20", generation - 1);
    let handle = api.hold_watch(&query).await;
    let put_at = Instant::now();
    assert_eq!(
        put_desired(server, node, what, body).await,
        Some(generation)
    );
    let set = format!("the operator set the desired {what}");
    assert_answered_soon(handle, put_at, &set, watch_reply(generation, 0, true)).await;
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
    api.complete_as(id, "Succeeded", output, "succeeded", false)
        .await;
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

/// `task create` of the binary on `data`, for `node_id`, of `kind`: it must work and print
/// the new task's id, which it answers.
async fn create_with_binary(data: &str, node_id: &str, kind: &str) -> String {
    let args = [
        "task", "create", "--data", data, "--node", node_id, "--kind", kind,
    ];
    let id = run_ok(&args).await.trim().to_owned();
    assert_task_id(&id);
    id
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

/// Every one of `words` is in `out`.
#[track_caller]
fn assert_mentions(out: &str, words: &[&str]) {
    for word in words {
        assert!(out.contains(word), "{word} not in:\n{out}");
    }
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
                        let output = format!("done {}", task.id);
                        api.complete_as(&task.id, "Succeeded", &output, "succeeded", false)
                            .await;
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
        assert_fields(
            task,
            &json!({
                "node_id": nodes[n].node_id,
                "attempts": 1,
                "late": false,
                "lease_expires_at_ms": null,
            }),
        );
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
    let (server, node, api) = start_with_node("uuid-expiry").await;
    let id = create_for(
        &server,
        &node,
        "node.exec",
        json!({"timeout_s": 1, "max_attempts": 2}),
    )
    .await;

    let before = now_ms();
    let first = api.lease_only(&id, 10).await;
    assert_eq!(first.attempt, 1, "{first:?}");
    assert_eq!(first.timeout_s, 1);
    let expires = first.lease_expires_at_ms;
    assert!(
        expires >= before + 1000 && expires <= now_ms() + 1000,
        "lease_expires_at_ms {expires} is not lease time + 1 s (leased at {before}..)"
    );
    api.assert_none_to_lease("a running lease is not given out again")
        .await;
    assert_shows(
        &server,
        &id,
        json!({"state": "leased", "attempts": 1, "lease_expires_at_ms": expires}),
    )
    .await;

    // Nothing but the background sweep can return it now: the held watch hears it.
    let (status, reply) = api
        .watch("generation=0&timeout_s=10", Duration::from_secs(6))
        .await;
    let heard = now_ms();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, watch_reply(0, 1, true));
    assert!(
        heard >= expires,
        "the task was queued again {} ms before its lease ran out",
        expires - heard
    );
    println!(
        "expired lease back in the queue {} ms after it ran out",
        heard - expires
    );

    let second = api.lease_only(&id, 10).await;
    assert_eq!(second.attempt, 2, "{second:?}");
    let second_expires = second.lease_expires_at_ms;

    // Not completed either: this was the last attempt.
    let failed = wait_while_state(&server, &id, "leased", Duration::from_secs(5)).await;
    assert!(
        now_ms() >= second_expires,
        "failed before the lease ran out"
    );
    assert_fields(
        &failed,
        &json!({"state": "failed", "attempts": 2, "lease_expires_at_ms": null, "late": false}),
    );
    let reason = failed["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        reason.contains("expire"),
        "the reason says the lease expired: {failed}"
    );
    assert!(failed["finished_at_ms"].is_u64(), "{failed}");
    api.assert_none_to_lease("a failed task is not leased")
        .await;
    assert_refused(api.renew(&id).await, 409, "lease_lost", "renew");

    // The node finishes after all: its word is taken, marked late; again, the same answer.
    for _ in 0..2 {
        api.complete_as(&id, "Succeeded", "finished after all", "succeeded", true)
            .await;
    }
    let done = assert_shows(
        &server,
        &id,
        json!({"state": "succeeded", "late": true, "output": "finished after all"}),
    )
    .await;
    assert_eq!(outcome_of(&done).as_deref(), Some("succeeded"), "{done}");
    server.stop().await;
}

/// A completion that comes while an expired task waits in the queue ends it: the node's
/// outcome, late; renewing it is refused as a lost lease; it is not leased again.
#[tokio::test]
async fn a_late_completion_of_a_requeued_task_ends_it() {
    let (server, node, api) = start_with_node("uuid-late").await;
    let (id, _) = lease_new(&server, &node, &api, json!({"timeout_s": 1})).await;
    let reply = api
        .watch_ok("generation=0&timeout_s=10", Duration::from_secs(6))
        .await;
    assert_eq!(reply["tasks_queued"].as_u64(), Some(1), "{reply}");
    // A queued task has no lease.
    assert_shows(
        &server,
        &id,
        json!({"state": "queued", "attempts": 1, "lease_expires_at_ms": null}),
    )
    .await;

    assert_refused(api.renew(&id).await, 409, "lease_lost", "renew");
    api.complete_as(&id, "Failed", "exit 3", "failed", true)
        .await;
    api.assert_none_to_lease("a completed task is not leased")
        .await;
    assert_shows(
        &server,
        &id,
        json!({
            "state": "failed",
            "attempts": 1,
            "late": true,
            "output": "exit 3",
            "lease_expires_at_ms": null,
        }),
    )
    .await;
    server.stop().await;
}

/// A completion that comes just after the lease ran out is late, whether or not a sweep has
/// put the task back in the queue yet: lateness is the lease's end, not the sweep's timing.
#[tokio::test]
async fn a_completion_just_past_the_lease_is_late() {
    let (server, node, api) = start_with_node("uuid-just-late").await;
    let (id, leased) = lease_new(&server, &node, &api, json!({"timeout_s": 1})).await;
    sleep_until_ms(leased.lease_expires_at_ms + 30).await;
    api.complete_as(&id, "Succeeded", "just too late", "succeeded", true)
        .await;
    assert_shows(
        &server,
        &id,
        json!({"state": "succeeded", "late": true, "attempts": 1}),
    )
    .await;
    api.assert_none_to_lease("a completed task is not leased")
        .await;
    server.stop().await;
}

/// A renew that comes after the lease ran out is refused (409 `lease_lost`), even before a
/// sweep has put the task back: the lease ended at `lease_expires_at_ms`, as `complete` (late)
/// sees it. Otherwise the expired lease of a last attempt could be revived and the task never
/// fail. (The renew is connected beforehand and sent 2 ms past the end, so it lands before
/// the once-a-second sweep but for a 1-in-hundreds phase.)
#[tokio::test]
async fn a_renew_past_the_lease_is_refused() {
    let (server, node, api) = start_with_node("uuid-renew-late").await;
    let (id, leased) = lease_new(
        &server,
        &node,
        &api,
        json!({"timeout_s": 1, "max_attempts": 1}),
    )
    .await;
    let expires = leased.lease_expires_at_ms;
    let renew = api
        .renew_request(&id)
        .json(&json!({}))
        .connect()
        .await
        .unwrap();
    sleep_until_ms(expires + 2).await;
    assert_refused(
        status_json(renew.send().await.unwrap()).await,
        409,
        "lease_lost",
        &format!("renewed after the lease ran out at {expires}"),
    );
    let failed = wait_while_state(&server, &id, "leased", Duration::from_secs(3)).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    server.stop().await;
}

/// Stopping the controller does not wait for held watches to run out: they are answered and
/// the controller stops within a few seconds (not the watch's 60 s nor the 20 s drain).
#[tokio::test]
async fn stopping_the_controller_ends_held_watches() {
    let (server, _, api) = start_with_node("uuid-watch-stop").await;
    let handle = api.hold_watch("generation=0&timeout_s=60").await;
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
    let (server, node, api) = start_with_node("uuid-renew").await;
    let (id, leased) = lease_new(&server, &node, &api, json!({"timeout_s": 2})).await;
    let mut last = leased.lease_expires_at_ms;

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
    assert_shows(
        &server,
        &id,
        json!({"state": "leased", "attempts": 1, "lease_expires_at_ms": last}),
    )
    .await;

    api.complete_as(&id, "Succeeded", "ok", "succeeded", false)
        .await;
    let done = assert_shows(
        &server,
        &id,
        json!({"state": "succeeded", "late": false, "lease_expires_at_ms": null}),
    )
    .await;
    assert!(done["finished_at_ms"].is_u64(), "{done}");
    server.stop().await;
}

/// Completion rules: idempotent; only the node that leased the task may complete it (404 for
/// another node and for an unknown id, 409 `not_leased` for one never leased); each outcome
/// gives its state; an output past the cap is stored cut at a character boundary with a
/// marker line, one at the cap whole; a malformed body is refused and leaves the task leased.
#[tokio::test]
async fn completing_a_task_follows_the_rules() {
    let (server, node, api) = start_with_node("uuid-complete-a").await;
    let other = server.enroll_new("uuid-complete-b").await;
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
    assert_eq!(leased_ids(&leased), tasks, "all seven, oldest first");
    let never = create_for(&server, &node, "a.never", json!({})).await;
    let [ok, fail, interrupt, big, utf8, exact, malformed] =
        <[String; 7]>::try_from(tasks).unwrap();

    // Another node, an unknown id: not found, nothing changes.
    let before = show(&server, &ok).await;
    let completed = other_api.complete(&ok, "Succeeded", "mine now").await;
    assert_refused(completed, 404, "not_found", "another node's complete");
    let renewed = other_api.renew(&ok).await;
    assert_refused(renewed, 404, "not_found", "another node's renew");
    let after = show(&server, &ok).await;
    assert_eq!(
        after, before,
        "another node's calls leave the task as it was"
    );
    assert_eq!(after["state"], "leased");
    let completed = api.complete(NO_SUCH_TASK, "Succeeded", "").await;
    assert_refused(completed, 404, "not_found", "complete of an unknown id");
    let renewed = api.renew(NO_SUCH_TASK).await;
    assert_refused(renewed, 404, "not_found", "renew of an unknown id");

    // Never leased: not the node's to complete yet.
    let completed = api.complete(&never, "Succeeded", "").await;
    assert_refused(completed, 409, "not_leased", "complete of a queued task");
    assert_shows(&server, &never, json!({"state": "queued", "attempts": 0})).await;

    // Idempotent: the same answer again, and a second, different word changes nothing.
    for _ in 0..2 {
        api.complete_as(&ok, "Succeeded", "all good", "succeeded", false)
            .await;
    }
    api.complete_as(&ok, "Failed", "changed my mind", "succeeded", false)
        .await;
    assert_shows(
        &server,
        &ok,
        json!({"output": "all good", "output_truncated": false}),
    )
    .await;

    for (id, outcome, state) in [
        (&fail, "Failed", "failed"),
        (&interrupt, "Interrupted", "interrupted"),
    ] {
        api.complete_as(id, outcome, "why", state, false).await;
        let shown = assert_shows(&server, id, json!({"state": state, "output": "why"})).await;
        assert_eq!(outcome_of(&shown).as_deref(), Some(state), "{shown}");
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
    api.complete_as(&exact, "Succeeded", &output, "succeeded", false)
        .await;
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
        let text = String::from_utf8_lossy(body);
        assert_bad_body(api.post_raw(&path, body).await, &text);
    }
    assert_shows(
        &server,
        &malformed,
        json!({"state": "leased", "outcome": null}),
    )
    .await;
    api.complete_as(&malformed, "Succeeded", "", "succeeded", false)
        .await;

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
    let (server, node, api) = start_with_node("uuid-cancel").await;

    let queued = create_for(&server, &node, "c.queued", json!({})).await;
    let task = cancel_ok(&server, &queued).await;
    assert!(
        task["reason"]
            .as_str()
            .is_some_and(|r| r.to_lowercase().contains("operator")),
        "the reason names the operator: {task}"
    );
    assert!(task["finished_at_ms"].is_u64(), "{task}");
    api.assert_none_to_lease("a cancelled task is not leased")
        .await;
    let reply = api
        .watch_ok("generation=0&timeout_s=1", Duration::from_secs(4))
        .await;
    assert_eq!(
        reply,
        watch_reply(0, 0, false),
        "a cancelled task is not queued"
    );

    let running = create_for(&server, &node, "c.running", json!({})).await;
    api.lease_only(&running, 10).await;
    let task = cancel_ok(&server, &running).await;
    assert_eq!(task["lease_expires_at_ms"], Value::Null, "{task}");
    assert_refused(api.renew(&running).await, 409, "lease_lost", "renew");
    for _ in 0..2 {
        api.complete_as(&running, "Succeeded", "did it anyway", "cancelled", true)
            .await;
    }
    assert_shows(
        &server,
        &running,
        json!({"state": "cancelled", "late": true, "output": "did it anyway"}),
    )
    .await;

    let finished = create_for(&server, &node, "c.finished", json!({})).await;
    api.lease_only(&finished, 10).await;
    api.complete_as(&finished, "Succeeded", "", "succeeded", false)
        .await;
    for id in [&finished, &queued, &running] {
        assert_refused(cancel(&server, id).await, 409, "task_finished", id);
    }
    assert_eq!(show(&server, &finished).await["state"], "succeeded");
    let cancelled = cancel(&server, NO_SUCH_TASK).await;
    assert_refused(cancelled, 404, "not_found", "cancel of an unknown id");
    server.stop().await;
}

/// The watch: runs out with `changed` false when nothing for its node happens (another
/// node's changes do not count); is answered within 2 s by new desired modules and network
/// from the operator API, by modules another writer of the database sets, and by a task the
/// binary creates in another process; answers at once while a task is queued or the
/// generation asked is behind; refuses a bad query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_is_held_until_something_changes_for_its_node() {
    let (server, node, api) = start_with_node("uuid-watch").await;
    let other = server.enroll_new("uuid-watch-other").await;
    let modules = json!({"modules": [
        {"name": "tools", "reference": "registry.local/modules/tools:1", "priority": 10}
    ]});

    // Nothing for this node: timeout_s=1 runs out, whatever happens to another node.
    let watch = api.watch_connected("generation=0&timeout_s=1").await;
    let start = Instant::now();
    let handle = send_watch(watch);
    assert_eq!(
        put_desired(&server, &other, "modules", &modules).await,
        Some(1)
    );
    create_for(&server, &other, "w.other", json!({})).await;
    let (status, reply, at) = answer(handle, Duration::from_secs(5)).await;
    let waited = at - start;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, watch_reply(0, 0, false));
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(3),
        "timeout_s=1 answered after {waited:?}"
    );

    // Held, then answered by a new desired state, then by a new desired network.
    watch_hears_desired(&server, &node, &api, "modules", &modules, 1).await;
    let network = json!({"network": {
        "interface": "pn0", "address": "10.88.0.7/16", "listen_port": 51820, "peers": []
    }});
    watch_hears_desired(&server, &node, &api, "network", &network, 2).await;

    // Held, then answered by modules another writer of the database sets (as `module assign`
    // does from its own process): the controller notices without being told.
    let handle = api.hold_watch("generation=2&timeout_s=20").await;
    let storage = server.storage().await;
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
    let what = "another writer set the desired modules";
    assert_answered_soon(handle, set_at, what, watch_reply(3, 0, true)).await;

    // Held, then answered by a task the binary creates in another process.
    let handle = api.hold_watch("generation=3&timeout_s=20").await;
    let data = server.data();
    create_with_binary(data.to_str().unwrap(), &node.node_id, "w.cli").await;
    let created_at = Instant::now();
    let what = "`task create` exited";
    assert_answered_soon(handle, created_at, what, watch_reply(3, 1, true)).await;

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
        assert_eq!(reply, watch_reply(3, 1, true), "{query}");
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
        let reply = api.watch(query, Duration::from_secs(5)).await;
        assert_refused(reply, 400, "invalid_query", &format!("?{query}"));
    }
    let request = server
        .anonymous()
        .get(server.url("/node_api/v1/watch?generation=0&timeout_s=1"));
    assert_refused(
        reply_of(request).await,
        401,
        "client_certificate_required",
        "a watch without a certificate",
    );
    server.stop().await;
}

/// 300 watches of one node held at once (all connected before any is sent, none answered
/// before the change) are all answered within 2 s of one task being created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_held_watches_all_hear_one_task() {
    const WATCHES: usize = 300;
    let (server, node, api) = start_with_node("uuid-many-watches").await;

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
    let watches: Vec<_> = connected
        .into_iter()
        .map(|watch| send_counted_watch(watch, answered.clone()))
        .collect();
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
        for handle in watches {
            let (status, body, at) = handle.await.unwrap();
            assert_eq!(status, 200, "{body}");
            assert_eq!(body, watch_reply(0, 1, true));
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
    let (server, node, api) = start_with_node("uuid-bad-lease").await;
    let id = create_for(&server, &node, "l.one", json!({})).await;

    for body in [
        json!({"max": 0}),
        json!({"max": task_limits::MAX_LEASE + 1}),
        json!({"max": -1}),
        json!({"max": "1"}),
        json!({}),
        json!({"max": 1, "extra": true}),
    ] {
        let reply = api.lease_raw(&body).await;
        assert_refused(reply, 400, "invalid_request", &body.to_string());
    }
    let reply = api.post_raw("/tasks/lease", br#"{"max": "#).await;
    assert_bad_body(reply, "a cut-off body");
    assert_eq!(
        show(&server, &id).await["state"],
        "queued",
        "nothing was leased"
    );

    // The largest lease is fine.
    api.lease_only(&id, task_limits::MAX_LEASE).await;
    assert_eq!(api.lease(task_limits::MAX_LEASE).await, Vec::new());

    // No certificate: refused as the other node calls refuse it.
    let anonymous = server.anonymous();
    let task_call = json!({"max": 1, "outcome": "Succeeded"});
    for (path, body) in [
        ("/node_api/v1/tasks/lease".to_owned(), task_call.clone()),
        (format!("/node_api/v1/tasks/{id}/renew"), task_call.clone()),
        (format!("/node_api/v1/tasks/{id}/complete"), task_call),
        ("/node_api/v1/events".to_owned(), json!({"events": []})),
    ] {
        let reply = post_json(&anonymous, server.url(&path), &body).await;
        assert_refused(reply, 401, "client_certificate_required", &path);
    }
    assert_eq!(show(&server, &id).await["state"], "leased");

    // A revoked node gets nothing.
    create_for(&server, &node, "l.two", json!({})).await;
    let path = format!("/api/v1/nodes/{}/revoke", node.node_id);
    let (status, reply) = server.operator_post(&path, &json!({})).await;
    assert_eq!(status, 200, "{reply}");
    let reply = api.lease_raw(&json!({"max": 1})).await;
    assert_refused(reply, 403, "revoked", "a revoked node's lease");
    server.stop().await;
}

/// Creating through the operator API: defaults, bounds of every field, unknown node, the
/// operator token; lists filter by node and state and keep the newest `limit`, oldest first;
/// a lease hands out the oldest first.
#[tokio::test]
async fn created_tasks_are_checked_listed_and_leased_oldest_first() {
    let (server, node, api) = start_with_node("uuid-create").await;
    let other = server.enroll_new("uuid-create-other").await;

    let before = now_ms();
    let task = create(&server, json!({"node": node.node_id, "kind": "node.exec"})).await;
    assert_task_id(&id_of(&task));
    assert_fields(
        &task,
        &json!({
            "node_id": node.node_id,
            "kind": "node.exec",
            "args": {},
            "state": "queued",
            "attempts": 0,
            "max_attempts": 3,
            "timeout_s": 300,
            "lease_expires_at_ms": null,
            "finished_at_ms": null,
            "reason": null,
            "outcome": null,
            "output_truncated": false,
            "late": false,
        }),
    );
    let created_at = task["created_at_ms"].as_u64().unwrap();
    assert!(created_at >= before && created_at <= now_ms());
    assert_eq!(task["updated_at_ms"], created_at);
    assert_shows(
        &server,
        &id_of(&task),
        json!({"output": null, "kind": "node.exec"}),
    )
    .await;

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
        let reply = server.operator_post("/api/v1/tasks", &body).await;
        assert_refused(reply, 400, "invalid_request", &body.to_string());
    }
    let (status, reply) = server
        .operator_post("/api/v1/tasks", &json!({"kind": "k"}))
        .await;
    assert_eq!(status, 400, "no node: {reply}");
    let reply = server
        .operator_post("/api/v1/tasks", &json!({"node": "node-nope", "kind": "k"}))
        .await;
    assert_refused(reply, 404, "not_found", "an unknown node");
    let reply = server
        .operator_get(&format!("/api/v1/tasks/{NO_SUCH_TASK}"))
        .await;
    assert_refused(reply, 404, "not_found", "an unknown task");
    let request = server
        .anonymous()
        .post(server.url("/api/v1/tasks"))
        .json(&json!({"node": node.node_id, "kind": "k"}));
    let (status, _) = reply_of(request).await;
    assert_eq!(status, 401, "the operator API wants its token");
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
        let reply = server.operator_get(&format!("/api/v1/tasks?{query}")).await;
        assert_refused(reply, 400, "invalid_query", &format!("?{query}"));
    }
    assert_eq!(list(&server, "limit=1000").await.len(), 8 + mine.len());

    // A lease takes the oldest first.
    assert_eq!(leased_ids(&api.lease(2).await), &mine[..2]);
    let leased = api.lease(10).await;
    assert_eq!(leased_ids(&leased), &mine[2..]);
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

/// The binary against a running controller (found through its data directory): `task create`
/// (plain and `--json`), `tasks`, `task show`, `task cancel` through the operator API, the
/// controller and its node seeing what the commands did, and the exit codes of failures (1)
/// and usage errors (2).
#[tokio::test]
async fn task_commands_round_trip_through_the_api() {
    let (server, node, api) = start_with_node("uuid-task-cli").await;
    let data = server.data();
    let data = data.to_str().unwrap();
    let node_id = node.node_id.as_str();

    let out = run_ok(&[
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
    let first: Value = parse(&out);
    let first_id = id_of(&first);
    assert_task_id(&first_id);
    assert_fields(
        &first,
        &json!({
            "node_id": node_id,
            "kind": "node.exec",
            "args": {"cmd": ["uptime"]},
            "timeout_s": 30,
            "max_attempts": 2,
            "state": "queued",
            "attempts": 0,
        }),
    );

    let second_id = create_with_binary(data, node_id, "node.reboot").await;

    let out = run_ok(&["tasks", "--data", data, "--node", node_id, "--json"]).await;
    let listed: Vec<Value> = parse(&out);
    assert_eq!(ids(&listed), [first_id.as_str(), second_id.as_str()]);
    let out = run_ok(&["tasks", "--data", data, "--limit", "1", "--json"]).await;
    let listed: Vec<Value> = parse(&out);
    assert_eq!(ids(&listed), [second_id.as_str()], "the newest one");
    let out = run_ok(&["tasks", "--data", data]).await;
    assert_mentions(
        &out,
        &[&first_id, &second_id, "node.exec", "node.reboot", "queued"],
    );

    // The controller sees what the command wrote; the node leases it.
    assert_shows(&server, &first_id, json!({"args": {"cmd": ["uptime"]}})).await;
    let leased = api.lease_only(&first_id, 1).await;
    assert_eq!(leased.args, json!({"cmd": ["uptime"]}));
    assert_eq!(leased.timeout_s, 30);
    api.complete_as(&first_id, "Succeeded", "up 3 days", "succeeded", false)
        .await;

    let out = run_ok(&["task", "show", &first_id, "--data", data, "--json"]).await;
    let shown: Value = parse(&out);
    assert_fields(
        &shown,
        &json!({"state": "succeeded", "attempts": 1, "output": "up 3 days"}),
    );
    let out = run_ok(&["task", "show", &first_id, "--data", data]).await;
    assert_mentions(&out, &[&first_id, "succeeded", "up 3 days"]);
    let out = run_ok(&["tasks", "--data", data, "--state", "queued", "--json"]).await;
    let listed: Vec<Value> = parse(&out);
    assert_eq!(ids(&listed), [second_id.as_str()]);

    run_ok(&["task", "cancel", &second_id, "--data", data]).await;
    assert_eq!(show(&server, &second_id).await["state"], "cancelled");
    api.assert_none_to_lease("cancelled by the command").await;

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
