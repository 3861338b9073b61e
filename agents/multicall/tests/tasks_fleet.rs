//! Tasks across a fleet, with real nodes only: one real controller (in this process) and
//! nodes that are each a root of their own with the real identitymgr, enrollmgr, heartbeatd
//! and execd (the built `powernode-agent`) running against it. Each node finds its identity,
//! token and controller in its own `identity.cfg`, enrolls as a node of its own, and runs the
//! `node.exec` tasks the operator creates for it through the operator API
//! (`POST /api/v1/tasks`); the tests read the outcome back through the same API.
//!
//! The multi-call crate's tests have no HTTP client of their own, so the operator API is
//! spoken by a small python3 program (the standard library's `http.client` over `ssl`,
//! trusting only the controller's CA), one request per stdin line, one reply per stdout line.
//! python3 is one of the tools CI installs; without it the tests skip, and fail under
//! `CI=true` (`powernode_pubsub::testing::require`).
//!
//! Every script finds out where it runs from its own path (`$0`, which execd writes under
//! `<root>/run/powernode/execd/scripts/<task id>.script`): it prints it, so the output names
//! the node and the task that ran it, and appends a line to `<root>/ran` of the node that
//! ran it, so a script run twice, or on the wrong node, is seen.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{processes_with, spawn_agent};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{getpgid, getpgrp, Pid};
use powernode_controller::server::RunningController;
use powernode_controller::storage::{Storage, Task, TaskQuery};
use powernode_pubsub::testing::require;
use powernode_pubsub::{Dirs, Subscription};
use powernode_types::{ControllerStatus, EnrollmentStatus, GLOBAL_KEY};
use serde_json::{json, Value};

/// How long a node gets to come up, and a task to reach its final state.
const WAIT: Duration = Duration::from_secs(30);

/// How long 200 tasks get, from the first created to the last final. They take under 10 s
/// here; heartbeatd leases at most 8 at a time and, once those are done, leases more only
/// when the watch or a heartbeat (every 15 s) says so, so an unlucky run may wait a
/// heartbeat or two.
const ALL_DONE: Duration = Duration::from_secs(60);

/// The agents of a node, in the order they are started.
const AGENTS: [&str; 4] = ["identitymgr", "enrollmgr", "execd", "heartbeatd"];

/// Where execd writes the scripts it runs, under a node's root.
const SCRIPTS: &str = "run/powernode/execd/scripts";

/// What these tests need of the machine ([`require`]: a skip, or a failure under `CI=true`).
fn can_run() -> bool {
    require(&["python3"])
}

/// The operator API client: reads `{"method", "path", "body"?}` lines on stdin and answers
/// each with a `{"status", "body"}` line (status 0 and the error when the call failed). A
/// connection idle for more than 5 s is not used again (the controller may be closing it).
const OPERATOR_PY: &str = r#"
import http.client, json, ssl, sys, time
host, port, token_file, ca_file = sys.argv[1:5]
token = open(token_file).read().strip()
ctx = ssl.create_default_context(cafile=ca_file)
conn, used = None, 0.0
for line in sys.stdin:
    req = json.loads(line)
    if conn is not None and time.monotonic() - used > 5:
        conn.close()
        conn = None
    if conn is None:
        conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=20)
    headers = {"Authorization": "Bearer " + token}
    body = None
    if "body" in req:
        body = json.dumps(req["body"])
        headers["Content-Type"] = "application/json"
    try:
        conn.request(req["method"], req["path"], body=body, headers=headers)
        reply = conn.getresponse()
        data = reply.read()
        out = {"status": reply.status, "body": json.loads(data) if data else None}
    except Exception as e:
        conn.close()
        conn = None
        out = {"status": 0, "body": repr(e)}
    used = time.monotonic()
    print(json.dumps(out), flush=True)
"#;

/// The controller, serving on loopback, and its database opened beside it.
struct Ctl {
    dir: tempfile::TempDir,
    running: RunningController,
    storage: Storage,
}

impl Ctl {
    async fn start() -> Ctl {
        let dir = tempfile::Builder::new().prefix("pnc").tempdir().unwrap();
        // The bootstrap token made for one node is not used: each node gets its own.
        let (running, _) = common::controller(dir.path(), Duration::from_secs(3600)).await;
        let storage = Storage::open(&dir.path().join("data")).await.unwrap();
        Ctl {
            dir,
            running,
            storage,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.running.addr().port())
    }

    /// A fresh bootstrap token through the operator API.
    fn token(&self, operator: &mut Operator) -> String {
        let (status, reply) = operator.call("POST", "/api/v1/tokens", Some(json!({})));
        assert_eq!(status, 200, "token: {reply}");
        reply["token"].as_str().unwrap().to_owned()
    }

    /// A client of the operator API.
    fn operator(&self) -> Operator {
        let data = self.dir.path().join("data");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(OPERATOR_PY)
            .arg("127.0.0.1")
            .arg(self.running.addr().port().to_string())
            .arg(data.join("operator.token"))
            .arg(data.join("ca.crt.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Operator {
            child,
            input,
            output,
        }
    }

    /// Every task of `node`, as the controller's database has them (for waiting: cheaper than
    /// the API, and the serving controller sweeps expired leases every second).
    async fn tasks_of(&self, node: &str) -> Vec<Task> {
        let query = TaskQuery {
            node: Some(node.to_owned()),
            state: None,
            limit: 1000,
        };
        self.storage.tasks(&query).await.unwrap()
    }

    /// The task once `done` says so; fails the test with `node`'s logs past [`WAIT`].
    async fn task_when(
        &self,
        node: &Node,
        id: &str,
        what: &str,
        done: impl Fn(&Task) -> bool,
    ) -> Task {
        let deadline = Instant::now() + WAIT;
        loop {
            let task = self.storage.task(id).await.unwrap().unwrap();
            if done(&task) {
                return task;
            }
            node.check(deadline, &format!("task {id} never {what}: {task:?}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A python3 process speaking the operator API ([`OPERATOR_PY`]). Killed when dropped.
struct Operator {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Operator {
    /// `method path` with `body` as JSON: the status and the reply's JSON. Blocks (in place,
    /// so the controller serving on this runtime goes on) until the answer.
    fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = json!({"method": method, "path": path});
        if let Some(body) = body {
            request["body"] = body;
        }
        tokio::task::block_in_place(|| {
            writeln!(self.input, "{request}").unwrap();
            let mut line = String::new();
            let n = self.output.read_line(&mut line).unwrap();
            assert!(n > 0, "the operator client exited; asked {request}");
            let reply: Value = serde_json::from_str(&line).unwrap();
            let status = u16::try_from(reply["status"].as_u64().unwrap()).unwrap();
            (status, reply["body"].clone())
        })
    }

    /// `POST /api/v1/tasks`: the task created.
    fn create(&mut self, body: Value) -> Value {
        let (status, task) = self.call("POST", "/api/v1/tasks", Some(body.clone()));
        assert_eq!(status, 200, "create {body}: {task}");
        task
    }

    /// `GET /api/v1/tasks/{id}`: the task with its output.
    fn show(&mut self, id: &str) -> Value {
        let (status, task) = self.call("GET", &format!("/api/v1/tasks/{id}"), None);
        assert_eq!(status, 200, "show {id}: {task}");
        task
    }

    /// `GET /api/v1/tasks?node=…`: every task of `node`, without output.
    fn list(&mut self, node: &str) -> Vec<Value> {
        let (status, tasks) = self.call(
            "GET",
            &format!("/api/v1/tasks?node={node}&limit=1000"),
            None,
        );
        assert_eq!(status, 200, "list: {tasks}");
        tasks.as_array().unwrap().clone()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node: its own root with settings and `identity.cfg`, and its agents.
struct Node {
    _dir: tempfile::TempDir,
    root: PathBuf,
    agents: Vec<(&'static str, Child)>,
    /// The id the controller gave it, once [`Node::up`].
    id: String,
}

impl Node {
    /// A node named `name` (its host name) with uuid `uuid`, enrolling at `ctl` with `token`.
    /// Nothing runs yet.
    fn new(ctl: &Ctl, name: &str, uuid: &str, token: &str) -> Node {
        let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
        let root = dir.path().join("root");
        let write = |rel: &str, text: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        // Only identity.cfg names the node: no cloud is asked, nothing is generated.
        write(
            "etc/powernode/agent.toml",
            "[controller]\nmax_backoff_s = 1\nrequest_timeout_ms = 3000\n\
             [identity]\nsources = [\"IdentityCfg\"]\nallow_generated_uuid = false\n",
        );
        write("etc/powernode/ca.pem", ctl.running.ca_pem());
        write(
            "etc/powernode/identity.cfg",
            &format!(
                "INSTANCE_UUID={uuid}\nBOOTSTRAP_TOKEN={token}\nCONTROLLER_URL={}\n\
                 CA_FILE=etc/powernode/ca.pem\n",
                ctl.url()
            ),
        );
        write("etc/hostname", &format!("{name}\n"));
        let node = Node {
            _dir: dir,
            root,
            agents: Vec::new(),
            id: String::new(),
        };
        node.new_boot_id();
        node
    }

    /// Writes the boot id identitymgr reads (a new one for each boot).
    fn new_boot_id(&self) {
        let path = self.root.join("proc/sys/kernel/random/boot_id");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let n = std::fs::read_to_string(&path)
            .map(|t| t.trim().len())
            .unwrap_or(0);
        std::fs::write(path, format!("0f5e2b9c-1111-4222-8333-{n:012}\n")).unwrap();
    }

    /// Starts every agent.
    fn start_all(&mut self) {
        for agent in AGENTS {
            let child = spawn_agent(&self.root, agent, "");
            self.agents.push((agent, child));
        }
    }

    /// Waits until the node is enrolled (its id known) and heartbeatd has reached the
    /// controller (so its watch is held).
    async fn up(&mut self) {
        let dirs = Dirs::under_root(&self.root);
        let deadline = Instant::now() + WAIT;
        let mut enrollment = Subscription::<EnrollmentStatus>::connect(&dirs, "enrollmgr");
        self.id = loop {
            if let Some(id) = enrollment.get(GLOBAL_KEY).and_then(|s| s.node_id.clone()) {
                break id;
            }
            self.check(deadline, "the node never enrolled");
            let _ = tokio::time::timeout(Duration::from_millis(200), enrollment.next()).await;
        };
        let mut status = Subscription::<ControllerStatus>::connect(&dirs, "heartbeatd");
        while !status.get(GLOBAL_KEY).is_some_and(|s| s.reachable) {
            self.check(deadline, "heartbeatd never reached the controller");
            let _ = tokio::time::timeout(Duration::from_millis(200), status.next()).await;
        }
    }

    /// SIGKILL to every agent; each is waited for.
    fn kill_all(&mut self) {
        for (_, child) in &mut self.agents {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
            child.wait().unwrap();
        }
        self.agents.clear();
    }

    /// SIGKILL to the process group of every script this node's execd started (the shell
    /// whose command line names a script under the root leads its group), and of every
    /// process with one of `markers` in its command line; they must be gone within 2 s.
    fn kill_scripts(&self, markers: &[&str]) {
        let scripts = self.root.join(SCRIPTS).display().to_string();
        let all: Vec<&str> = markers.iter().copied().chain([scripts.as_str()]).collect();
        kill_groups_of(&all);
        let deadline = Instant::now() + Duration::from_secs(2);
        for marker in all {
            while !processes_with(marker).is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "{marker}: still running after SIGKILL to its group: {:?}",
                    processes_with(marker)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// A reboot's aftermath: `run/` is gone (a tmpfs), `persist/` stays, the boot id is new.
    fn wipe_run(&self) {
        std::fs::remove_dir_all(self.root.join("run")).unwrap();
        self.new_boot_id();
    }

    /// Fails the test past `deadline` with `what` and every agent's log.
    #[track_caller]
    fn check(&self, deadline: Instant, what: &str) {
        if Instant::now() >= deadline {
            common::fail_with_logs(&self.root, AGENTS, what);
        }
    }

    /// The lines of `<root>/ran`: one per script run on this node.
    fn ran(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("ran"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for (_, child) in &mut self.agents {
            let _ = child.kill();
            let _ = child.wait();
        }
        // What execd had running when it was killed (also when the test failed).
        kill_groups_of(&[&self.root.join(SCRIPTS).display().to_string()]);
    }
}

/// SIGKILL to the process group of every process with one of `markers` in its command line,
/// never to this test's own group (its agents, were any left, are in it).
fn kill_groups_of(markers: &[&str]) {
    let ours = getpgrp();
    let groups: BTreeSet<Pid> = markers
        .iter()
        .flat_map(|marker| processes_with(marker))
        .filter_map(|pid| getpgid(Some(Pid::from_raw(pid))).ok())
        .filter(|pgid| *pgid != ours)
        .collect();
    for pgid in groups {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

/// The start of every script here: `root` (of the node running it) and `id` (of its task)
/// from its own path, and a line `<id> <label>` appended to `<root>/ran`.
fn script_prelude(label: &str) -> String {
    format!(
        "root=\"${{0%/{SCRIPTS}/*}}\"\nid=$(basename \"$0\" .script)\n\
         echo \"$id {label}\" >> \"$root/ran\"\n"
    )
}

fn final_state(task: &Task) -> bool {
    !matches!(task.state.as_str(), "queued" | "leased")
}

/// Two nodes, each with its own agents, and 100 `node.exec` tasks for each created through
/// the operator API as fast as it takes them, for both nodes at once, while both are up:
/// every task succeeds, leased once (attempt 1), with its own output from its own node
/// (the script's path names the node's root and the task), and no script ran twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_run_200_tasks_each_once_on_its_own_node() {
    if !can_run() {
        return;
    }
    const PER_NODE: usize = 100;
    let started = Instant::now();
    let ctl = Ctl::start().await;
    let mut ops = [ctl.operator(), ctl.operator()];
    let mut nodes = Vec::new();
    for (name, uuid) in [
        ("edge-a", "3a1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a01"),
        ("edge-b", "3a1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a02"),
    ] {
        let token = ctl.token(&mut ops[0]);
        let mut node = Node::new(&ctl, name, uuid, &token);
        node.start_all();
        nodes.push(node);
    }
    for node in &mut nodes {
        node.up().await;
    }
    assert_ne!(nodes[0].id, nodes[1].id, "two nodes, one identity");
    let booted = started.elapsed();

    // Both nodes' tasks at once, each node's from a client of its own.
    let created = Instant::now();
    let made: Vec<BTreeMap<String, String>> = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = nodes
                .iter()
                .zip(ops.iter_mut())
                .enumerate()
                .map(|(n, (node, op))| {
                    let node_id = node.id.clone();
                    scope.spawn(move || {
                        let mut made = BTreeMap::new();
                        for i in 0..PER_NODE {
                            let label = format!("{n}-{i}");
                            let script = format!(
                                "{}echo \"task {label} ran as $0\"\nsleep 0.0{}\n",
                                script_prelude(&label),
                                i % 5
                            );
                            let task = op.create(json!({
                                "node": node_id,
                                "kind": "node.exec",
                                "args": {"script": script},
                                "timeout_s": 60,
                            }));
                            made.insert(task["id"].as_str().unwrap().to_owned(), label);
                        }
                        made
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    });
    let creating = created.elapsed();

    // Every task final, waited for on the controller.
    let deadline = Instant::now() + ALL_DONE;
    for node in &nodes {
        loop {
            let tasks = ctl.tasks_of(&node.id).await;
            let done = tasks.iter().filter(|t| final_state(t)).count();
            if tasks.len() == PER_NODE && done == PER_NODE {
                break;
            }
            node.check(
                deadline,
                &format!("{done} of {} tasks of {} final", tasks.len(), node.id),
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let running = created.elapsed();

    let op = &mut ops[0];
    for (n, node) in nodes.iter().enumerate() {
        let mine = &made[n];
        assert_eq!(mine.len(), PER_NODE, "task ids repeat");
        let listed = op.list(&node.id);
        let ids: BTreeSet<&str> = listed.iter().map(|t| t["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            mine.keys().map(String::as_str).collect(),
            "the API lists other tasks for {}",
            node.id
        );
        for (id, label) in mine {
            let task = op.show(id);
            assert_eq!(task["node_id"], node.id.as_str(), "{task}");
            assert_eq!(task["state"], "succeeded", "{task}");
            assert_eq!(task["outcome"], "Succeeded", "{task}");
            assert_eq!(task["attempts"], 1, "leased more than once: {task}");
            assert_eq!(task["late"], false, "{task}");
            let want = format!(
                "task {label} ran as {}/{SCRIPTS}/{id}.script",
                node.root.display()
            );
            assert_eq!(task["output"].as_str().unwrap().trim_end(), want, "{task}");
        }
        // Each script ran once, here: one line per task of this node, none of the other's.
        let ran = node.ran();
        let mut runs: BTreeMap<String, usize> = BTreeMap::new();
        for line in &ran {
            let (id, label) = line.split_once(' ').unwrap();
            assert_eq!(
                mine.get(id).map(String::as_str),
                Some(label),
                "{line}: not a task of {} with its arguments",
                node.id
            );
            *runs.entry(id.to_owned()).or_default() += 1;
        }
        assert_eq!(runs.len(), PER_NODE, "tasks that never ran on {}", node.id);
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "scripts run more than once: {twice:?}");
    }
    println!(
        "2 nodes up in {booted:?}; {} tasks created in {creating:?}, all succeeded \
         {running:?} after the first was created",
        2 * PER_NODE
    );
}

/// A node killed mid-task and rebooted. Two tasks with a 4 s lease run scripts that sleep on
/// their first run; every agent of the node is killed with SIGKILL and so is each script's
/// process group (nothing of the node survives a power cut), then `run/` is wiped (a tmpfs)
/// while `persist/` stays. On the controller the leases run out: the task with attempts left
/// goes back to the queue, the one on its last attempt fails, saying so. The node's agents
/// start again; the queued task is leased as attempt 2 and runs again — its script sees the
/// marker file of its first run and finishes at once — and succeeds. The failed one is not
/// run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_node_died_runs_again_after_the_reboot_or_fails_on_its_last_attempt() {
    if !can_run() {
        return;
    }
    let ctl = Ctl::start().await;
    let mut op = ctl.operator();
    let token = ctl.token(&mut op);
    let mut node = Node::new(
        &ctl,
        "edge-k",
        "3a1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a0c",
        &token,
    );
    node.start_all();
    node.up().await;

    // `sleep 9N.<pid>`: about a minute and a half, and a marker in the command line.
    let markers = [
        format!("91.{}", std::process::id()),
        format!("92.{}", std::process::id()),
    ];
    let mut ids = Vec::new();
    for (label, (marker, max_attempts)) in ["again", "last"].iter().zip(markers.iter().zip([2, 1]))
    {
        let script = format!(
            "{}if [ -e \"$root/first-$id\" ]; then echo \"second run of $id\"; exit 0; fi\n\
             touch \"$root/first-$id\"\necho \"first run of $id\"\nsleep {marker}\n",
            script_prelude(label)
        );
        let task = op.create(json!({
            "node": node.id,
            "kind": "node.exec",
            "args": {"script": script},
            "timeout_s": 4,
            "max_attempts": max_attempts,
        }));
        ids.push(task["id"].as_str().unwrap().to_owned());
    }
    let (again, last) = (ids[0].as_str(), ids[1].as_str());
    // Both scripts are in their first run's sleep.
    let deadline = Instant::now() + WAIT;
    while markers.iter().any(|m| processes_with(m).is_empty()) {
        node.check(deadline, "the scripts never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Power cut: every agent and every script, at once; then the boot wipes run/.
    node.kill_all();
    node.kill_scripts(&[&markers[0], &markers[1]]);
    node.wipe_run();
    let killed = Instant::now();

    // The node is down, so these are the tasks' states until it is back.
    let failed = ctl
        .task_when(&node, last, "failed by its expired lease", final_state)
        .await;
    let queued = ctl
        .task_when(&node, again, "back in the queue", |t| t.state == "queued")
        .await;
    let expired = killed.elapsed();
    assert_eq!(failed.state, "failed", "{failed:?}");
    assert_eq!(
        failed.reason.as_deref(),
        Some("the lease expired 1 time(s), the last attempt"),
        "{failed:?}"
    );
    assert_eq!(queued.attempts, 1, "{queued:?}");
    assert_eq!(
        queued.reason.as_deref(),
        Some("the lease of attempt 1 expired"),
        "{queued:?}"
    );
    assert!(
        expired <= Duration::from_secs(8),
        "a 4 s lease took {expired:?} to run out"
    );

    // The reboot: the same persist/, a fresh run/, every agent started again.
    node.start_all();
    let done = ctl.task_when(&node, again, "finished", final_state).await;
    let rebooted = killed.elapsed();
    let task = op.show(again);
    assert_eq!(task["state"], "succeeded", "{task}");
    assert_eq!(task["attempts"], 2, "{task}");
    assert_eq!(task["outcome"], "Succeeded", "{task}");
    assert_eq!(task["late"], false, "{task}");
    assert_eq!(
        task["output"].as_str().unwrap().trim_end(),
        format!("second run of {again}"),
        "{task}"
    );
    assert_eq!(done.attempts, 2);
    let task = op.show(last);
    assert_eq!(task["state"], "failed", "{task}");
    assert_eq!(task["attempts"], 1, "{task}");
    assert_eq!(task["outcome"], Value::Null, "no node reported it: {task}");

    // The first task's script ran twice (once per attempt), the failed one's once.
    let ran = node.ran();
    let count = |id: &str| {
        ran.iter()
            .filter(|l| l.starts_with(&format!("{id} ")))
            .count()
    };
    assert_eq!(count(again), 2, "{ran:?}");
    assert_eq!(count(last), 1, "{ran:?}");
    for marker in &markers {
        assert_eq!(processes_with(marker), Vec::<i32>::new(), "{marker} runs");
    }
    println!(
        "leases ran out {expired:?} after the kill; the task succeeded on attempt 2 \
         {rebooted:?} after it"
    );
}
