//! SIGTERM drains (DESIGN §7; docs/architecture.md, "Agent lifecycle"): the built
//! `powernode-agent`, a real controller in this process.
//!
//! - Every agent of the dispatch table (`powernode-agent agents`, so an agent added later is
//!   covered) reaches its main loop, is sent SIGTERM, exits 0 within a bound and leaves its
//!   `AgentStatus` saying Stopping.
//! - eventd, stopped while the controller could not be reached, delivers what it journalled
//!   in its last delivery.
//! - heartbeatd, stopped just as its task runner published an `Interrupted` status, reports it
//!   while it drains, even though the controller refused the first try.
//! - execd lets a script that ends within its stop grace keep its outcome.
//! - The whole node stopped with `scripts/device-steps.sh --stop` while a `node.exec` task
//!   runs: the task is `interrupted` on the controller, with its output so far, when the
//!   script returns; no agent process is left and each one stopped cleanly.
//!
//! A controller made unreachable on demand is a TCP proxy in this process ([`Proxy`]) in front
//! of the real one: forwarding, or closing every connection it accepts (and counting them).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bin, node_root, resolved_identity, spawn_agent};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use powernode_controller::server::RunningController;
use powernode_controller::storage::{EventQuery, NewTask, Storage, StoredEvent, Task};
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::{
    AgentState, AgentStatus, ControllerStatus, EnrollmentState, EnrollmentStatus, NodeIdentity,
    Severity, TaskConfig, TaskState, TaskStatus, GLOBAL_KEY,
};
use serde_json::json;

/// How long a test waits for what it expects before it fails.
const WAIT: Duration = Duration::from_secs(30);
/// How long an agent with nothing to drain may take to exit after SIGTERM.
const EXIT_BOUND: Duration = Duration::from_secs(10);

// --- Processes

fn sigterm(pid: u32) {
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGTERM).unwrap();
}

/// The exit status of `child` once it has exited, or `None` after `within`.
fn exited_within(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` has exited (a zombie has: nobody may have reaped it yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Whether an agent's log says it stopped cleanly: agentbase logs `stopped` only when the
/// agent's run ended without an error, on its way to exit status 0.
fn stopped_cleanly(log: &str) -> bool {
    log.lines().any(|l| l.contains(" agentbase: stopped ")) && !log.contains("agent failed")
}

/// Processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| !gone(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

/// `agent`'s entry in `powernode-agent status --json` under `root` (read from its checkpoint
/// when the agent is not running).
fn status_of(root: &Path, agent: &str) -> serde_json::Value {
    let out = common::run(
        Command::new(bin())
            .arg("--root")
            .arg(root)
            .args(["status", "--json"])
            .env_remove("POWERNODE_ROOT"),
    );
    let doc = out.json();
    doc["agents"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["agent"] == agent))
        .unwrap_or_else(|| panic!("no {agent} in {doc}"))
        .clone()
}

/// Settings every agent can start with in a sandbox: no cloud metadata service is asked (each
/// fails fast on a closed loopback port), the controller retried often.
fn sandbox_settings(root: &Path) {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    std::fs::create_dir_all(root.join("etc/powernode")).unwrap();
    std::fs::write(
        root.join("etc/powernode/agent.toml"),
        format!(
            "touch_interval_s = 1\n\
             [identity]\nsource_timeout_ms = 300\naws_url = \"{closed}\"\ngcp_url = \"{closed}\"\n\
             azure_url = \"{closed}\"\ndigitalocean_url = \"{closed}\"\nhetzner_url = \"{closed}\"\n\
             [controller]\nmax_backoff_s = 1\nrequest_timeout_ms = 3000\n"
        ),
    )
    .unwrap();
}

/// Writes `contents` at `rel` under `root`.
fn write(root: &Path, rel: &str, contents: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

// --- A controller that can be made unreachable

/// A TCP proxy on loopback in front of the controller: forwards, or closes every connection
/// it accepts (a controller that cannot be reached) and counts them.
struct Proxy {
    addr: SocketAddr,
    forward: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(to: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let forward = Arc::new(AtomicBool::new(true));
        let refused = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn({
            let (forward, refused) = (forward.clone(), refused.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !forward.load(Ordering::SeqCst) {
                        refused.fetch_add(1, Ordering::SeqCst);
                        drop(inbound);
                        continue;
                    }
                    tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            forward,
            refused,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// From now on every new connection is closed at once.
    fn refuse(&self) {
        self.forward.store(false, Ordering::SeqCst);
    }

    /// From now on new connections reach the controller.
    fn forward(&self) {
        self.forward.store(true, Ordering::SeqCst);
    }

    /// Connections closed since the proxy started.
    fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

// --- A node of separately started agents

/// A node against a real controller, reached through a [`Proxy`]; agents started one by one.
struct Node {
    _dir: tempfile::TempDir,
    root: PathBuf,
    _ctl_dir: tempfile::TempDir,
    _ctl: RunningController,
    storage: Storage,
    proxy: Proxy,
    _identity: Publication<NodeIdentity>,
    agents: Vec<(&'static str, Child)>,
}

impl Node {
    /// The controller, the proxy, and the identity identitymgr would publish, naming the
    /// proxy as the controller. `drop_in` is written as `agent.toml.d/50-test.toml`.
    async fn new(uuid: &str, drop_in: &str) -> Node {
        let ctl_dir = tempfile::Builder::new().prefix("pnc").tempdir().unwrap();
        let (ctl, token) = common::controller(ctl_dir.path(), Duration::from_secs(3600)).await;
        let storage = Storage::open(&ctl_dir.path().join("data")).await.unwrap();
        let proxy = Proxy::start(ctl.addr()).await;
        let (dir, root) = node_root();
        write(&root, "etc/powernode/agent.toml.d/50-test.toml", drop_in);
        let identity = Publication::open(&Dirs::under_root(&root), "identitymgr").unwrap();
        identity
            .publish(&resolved_identity(uuid, token, &proxy.url(), ctl.ca_pem()))
            .unwrap();
        Node {
            _dir: dir,
            root,
            _ctl_dir: ctl_dir,
            _ctl: ctl,
            storage,
            proxy,
            _identity: identity,
            agents: Vec::new(),
        }
    }

    fn dirs(&self) -> Dirs {
        Dirs::under_root(&self.root)
    }

    fn start(&mut self, agent: &'static str) {
        let child = spawn_agent(&self.root, agent, "");
        self.agents.push((agent, child));
    }

    /// Fails the test past `deadline` with `what` and every agent's log.
    #[track_caller]
    fn check(&self, deadline: Instant, what: &str) {
        if Instant::now() >= deadline {
            self.fail(what);
        }
    }

    #[track_caller]
    fn fail(&self, what: &str) -> ! {
        common::fail_with_logs(&self.root, self.agents.iter().map(|(a, _)| *a), what)
    }

    fn child(&mut self, agent: &str) -> &mut Child {
        &mut self.agents.iter_mut().find(|(a, _)| *a == agent).unwrap().1
    }

    /// SIGTERM to `agent`; its exit status and how long it took, failing the test if it is
    /// still running after `within`.
    fn stop(&mut self, agent: &str, within: Duration) -> (ExitStatus, Duration) {
        let at = Instant::now();
        sigterm(self.child(agent).id());
        (self.exited(agent, within), at.elapsed())
    }

    /// `agent`'s exit status once it has exited, failing the test if it is still running
    /// after `within`.
    fn exited(&mut self, agent: &str, within: Duration) -> ExitStatus {
        match exited_within(self.child(agent), within) {
            Some(exit) => exit,
            None => self.fail(&format!("{agent} still running {within:?} after SIGTERM")),
        }
    }

    /// Waits until `agent`'s `T` item `key` satisfies `done`.
    async fn until<T: powernode_types::Topic>(
        &self,
        agent: &str,
        key: &str,
        what: &str,
        done: impl Fn(&T) -> bool,
    ) {
        let mut sub = Subscription::<T>::connect(&self.dirs(), agent);
        let deadline = Instant::now() + WAIT;
        while !sub.get(key).is_some_and(&done) {
            self.check(deadline, what);
            let _ = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
        }
    }

    async fn enrolled(&self) {
        self.until::<EnrollmentStatus>("enrollmgr", GLOBAL_KEY, "the node never enrolled", |s| {
            s.state == EnrollmentState::Enrolled
        })
        .await;
    }

    async fn reachable(&self) {
        self.until::<ControllerStatus>(
            "heartbeatd",
            GLOBAL_KEY,
            "heartbeatd never reached the controller",
            |s| s.reachable,
        )
        .await;
    }

    async fn node_id(&self) -> String {
        self.storage.list_nodes().await.unwrap()[0].id.clone()
    }

    async fn create(&self, script: &str) -> String {
        let node_id = self.node_id().await;
        let args = json!({ "script": script });
        common::enrolled::create_task(&self.storage, &node_id, "node.exec", args, 60).await
    }

    async fn task(&self, id: &str) -> Task {
        self.storage.task(id).await.unwrap().unwrap()
    }

    /// The task once it is final on the controller.
    async fn finished(&self, id: &str) -> Task {
        let deadline = Instant::now() + WAIT;
        loop {
            let task = self.task(id).await;
            if common::enrolled::is_final(&task) {
                return task;
            }
            self.check(deadline, &format!("task {id} never finished: {task:?}"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The stored events of `kind`.
    async fn stored(&self, kind: &str) -> Vec<StoredEvent> {
        let query = EventQuery {
            kind: Some(kind.to_owned()),
            limit: 1000,
            ..EventQuery::default()
        };
        self.storage.events(&query).await.unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for (_, child) in &mut self.agents {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// --- Every agent

/// Each agent of the dispatch table, alone in a sandbox with what it needs to reach its main
/// loop (its `AgentStatus` Running or Degraded, published by this process), is sent SIGTERM:
/// it exits 0 within [`EXIT_BOUND`], logs that it stopped, and its `AgentStatus` checkpoint
/// says Stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_of_the_dispatch_table_exits_0_on_sigterm_and_says_stopping() {
    let listed = common::run(Command::new(bin()).arg("agents"));
    listed.assert_code(0);
    let agents: Vec<String> = listed.stdout.lines().map(str::to_owned).collect();
    assert!(
        agents.iter().any(|a| a == "identitymgr") && agents.len() >= 8,
        "{agents:?}"
    );
    for agent in &agents {
        let (_dir, root) = node_root();
        sandbox_settings(&root);
        // What identitymgr resolves from; harmless to every other agent.
        write(
            &root,
            "proc/cmdline",
            "ro powernode.instance_uuid=6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b\n",
        );
        let mut child = spawn_agent(&root, agent, "");
        let pid = child.id();
        let mut health = Subscription::<AgentStatus>::connect(&Dirs::under_root(&root), agent);
        let deadline = Instant::now() + WAIT;
        while !health.get(agent).is_some_and(|s| {
            s.pid == pid && matches!(s.state, AgentState::Running | AgentState::Degraded)
        }) {
            if Instant::now() >= deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                common::fail_with_logs(&root, [agent.as_str()], &format!("{agent} never ran"));
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), health.next()).await;
        }
        sigterm(pid);
        let Some(exit) = exited_within(&mut child, EXIT_BOUND) else {
            let _ = child.kill();
            let _ = child.wait();
            common::fail_with_logs(
                &root,
                [agent.as_str()],
                &format!("{agent} still running {EXIT_BOUND:?} after SIGTERM"),
            );
        };
        if exit.code() != Some(0) {
            common::fail_with_logs(&root, [agent.as_str()], &format!("{agent} exited {exit}"));
        }
        let status = status_of(&root, agent);
        assert_eq!(status["state"], "Stopping", "{agent}: {status}");
        assert_eq!(status["up"], false, "{agent}: {status}");
        assert_eq!(status["pid"], pid, "{agent}: {status}");
        let log = std::fs::read_to_string(root.join(format!("{agent}.log"))).unwrap();
        assert!(
            stopped_cleanly(&log),
            "{agent} did not log that it stopped:\n{log}"
        );
    }
}

// --- eventd

/// eventd is stopped while the controller cannot be reached (the proxy closes every
/// connection): the events it journalled, none of which the controller has, are delivered in
/// its last delivery once the controller is back, before it exits 0. Its delivery had failed
/// three times before (backoff 1, 2, 4 s with `max_backoff_s = 60`), so its own next try was
/// seconds away: only the drain can have delivered them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventd_delivers_what_it_journalled_when_stopped() {
    let mut node = Node::new("uuid-drain-eventd", "[controller]\nmax_backoff_s = 60\n").await;
    node.start("enrollmgr");
    node.enrolled().await;
    node.proxy.refuse();
    let refused_before = node.proxy.refused();
    node.start("eventd");
    // This process plays an agent raising events.
    let raiser = agentbase::Context::new(
        "heartbeatd",
        agentbase::Root::new(&node.root),
        agentbase::Settings::default(),
    )
    .unwrap();
    for i in 0..50u32 {
        raiser
            .events
            .raise(Severity::Warning, "test.drain", &i.to_string(), &[])
            .unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while raiser.events.pending() > 0 || node.proxy.refused() < refused_before + 3 {
        node.check(
            deadline,
            &format!(
                "{} events not acknowledged, {} delivery attempts refused",
                raiser.events.pending(),
                node.proxy.refused() - refused_before
            ),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(node.stored("test.drain").await.len(), 0, "delivered early");

    node.proxy.forward();
    let (exit, took) = node.stop("eventd", eventd::FLUSH_TIMEOUT + EXIT_BOUND);
    if exit.code() != Some(0) {
        node.fail(&format!("eventd exited {exit}"));
    }
    let stored = node.stored("test.drain").await;
    let mut messages: Vec<u32> = stored.iter().map(|e| e.message.parse().unwrap()).collect();
    messages.sort_unstable();
    if messages != (0..50).collect::<Vec<_>>() {
        node.fail(&format!(
            "eventd exited after {took:?} with {} of the 50 events delivered: {messages:?}",
            stored.len()
        ));
    }
    let status = status_of(&node.root, "eventd");
    assert_eq!(status["state"], "Stopping", "{status}");
}

// --- heartbeatd

/// heartbeatd holds a task whose runner (played by this process as execd) publishes it
/// `Interrupted` and goes away, and heartbeatd is sent SIGTERM at that moment, while the
/// controller refuses connections; the controller is back half a second later. heartbeatd
/// takes the runner's last status, sends the report again until the controller takes it, and
/// exits 0: the task is `interrupted` on the controller, with its output, as heartbeatd
/// exits — not left leased until its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeatd_reports_the_last_statuses_when_stopped() {
    let mut node = Node::new("uuid-drain-heartbeatd", "").await;
    let statuses = Publication::<TaskStatus>::open(&node.dirs(), "execd").unwrap();
    node.start("enrollmgr");
    node.start("heartbeatd");
    node.reachable().await;
    let id = node.create("echo started; sleep 600").await;
    node.until::<TaskConfig>("heartbeatd", &id, "the task never reached the node", |_| {
        true
    })
    .await;
    let running = TaskStatus {
        id: id.clone(),
        kind: "node.exec".into(),
        state: TaskState::Running,
        output: String::new(),
        started_at_ms: common::now_ms(),
        finished_at_ms: None,
    };
    statuses.publish(&running).unwrap();
    node.proxy.refuse();
    statuses
        .publish(&TaskStatus {
            state: TaskState::Interrupted,
            output: "started\n[interrupted: execd was stopped; the script and everything it \
                     started were killed]"
                .into(),
            finished_at_ms: Some(common::now_ms()),
            ..running
        })
        .unwrap();
    drop(statuses);
    let at = Instant::now();
    sigterm(node.child("heartbeatd").id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.proxy.forward();
    let exit = node.exited("heartbeatd", heartbeatd::drain::REPORT_BOUND + EXIT_BOUND);
    if exit.code() != Some(0) {
        node.fail(&format!("heartbeatd exited {exit}"));
    }
    let task = node.task(&id).await;
    if task.state != "interrupted" {
        node.fail(&format!(
            "heartbeatd exited {:?} after SIGTERM, the task is {task:?}",
            at.elapsed()
        ));
    }
    assert!(
        task.output
            .as_deref()
            .unwrap_or_default()
            .starts_with("started"),
        "{task:?}"
    );
}

// --- execd

/// execd is sent SIGTERM while a script that ends two seconds later runs: the script keeps
/// its outcome (it is not killed within `execd::STOP_GRACE`), execd exits 0, and the
/// controller has the task `succeeded` with all its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execd_lets_a_script_that_ends_within_its_grace_finish() {
    let mut node = Node::new("uuid-drain-execd", "").await;
    for agent in ["enrollmgr", "execd", "heartbeatd"] {
        node.start(agent);
    }
    node.reachable().await;
    let id = node.create("echo started; sleep 2; echo finished").await;
    node.until::<TaskStatus>("execd", &id, "execd never ran the task", |s| {
        s.state == TaskState::Running
    })
    .await;
    let (exit, took) = node.stop("execd", execd::STOP_GRACE + EXIT_BOUND);
    if exit.code() != Some(0) {
        node.fail(&format!("execd exited {exit}"));
    }
    let task = node.finished(&id).await;
    if task.state != "succeeded" {
        node.fail(&format!(
            "execd exited after {took:?}; the task is {task:?}"
        ));
    }
    let output = task.output.unwrap_or_default();
    assert!(
        output.contains("started") && output.contains("finished"),
        "{output}"
    );
}

// --- The whole node

/// The agents device-steps.sh starts under `root`, by pid file; SIGKILLs those still
/// running when dropped (a test that failed half-way), with any process of `marker`.
struct Booted {
    root: PathBuf,
    agents: Vec<String>,
    pids: Vec<(String, i32)>,
    marker: String,
}

impl Booted {
    /// The pid of each agent whose pid file is there now.
    fn pid_files(&self) -> Vec<(String, i32)> {
        self.agents
            .iter()
            .filter_map(|agent| {
                let file = self.root.join(format!("run/powernode/{agent}.pid"));
                let pid = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
                Some((agent.clone(), pid))
            })
            .collect()
    }

    fn logs(&self) -> String {
        self.pids
            .iter()
            .map(|(agent, _)| {
                let log = self.root.join(format!("run/powernode/{agent}.log"));
                format!(
                    "--- {agent}.log\n{}\n",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        for (agent, pid) in self.pids.iter().chain(&self.pid_files()) {
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(agent.as_str()));
            if ours && !gone(*pid) {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
        for pid in processes_with(&self.marker) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// `scripts/device-steps.sh --root ROOT args...`, run to its end (at most `within`).
fn device_steps(root: &Path, args: &[&str], within: Duration) -> common::Finished {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/device-steps.sh");
    let mut command = Command::new("bash");
    command
        .arg(script)
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("POWERNODE_ROOT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let Some(status) = exited_within(&mut child, within) else {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "device-steps.sh {args:?} still running after {within:?}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let out = child.wait_with_output().unwrap();
    common::Finished {
        status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The node booted by `scripts/device-steps.sh` against a real controller runs a `node.exec`
/// task whose script never ends by itself; `device-steps.sh --stop` then drains the node. When
/// it returns: the task is `interrupted` on the controller with the output the script had
/// written (execd reported it, heartbeatd — stopped after it — sent the report), the script
/// and every agent have exited, each agent's log says it stopped cleanly (agentbase logs it
/// only on the way to exit status 0) and its `AgentStatus` says Stopping; heartbeatd was
/// stopped after the task runners and eventd last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_stopped_by_device_steps_while_a_task_runs_reports_it_interrupted() {
    if !powernode_pubsub::testing::require(&["bash"]) {
        return;
    }
    let ctl_dir = tempfile::Builder::new().prefix("pnc").tempdir().unwrap();
    let (ctl, token) = common::controller(ctl_dir.path(), Duration::from_secs(3600)).await;
    let storage = Storage::open(&ctl_dir.path().join("data")).await.unwrap();
    let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
    let root = dir.path().join("root");
    sandbox_settings(&root);
    write(&root, "etc/powernode/controller-ca.pem", ctl.ca_pem());
    write(
        &root,
        "proc/cmdline",
        &format!(
            "ro powernode.instance_uuid=7a1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7c \
             powernode.bootstrap_token={token} \
             powernode.controller_url=https://127.0.0.1:{} \
             powernode.ca_file=/etc/powernode/controller-ca.pem\n",
            ctl.addr().port()
        ),
    );
    write(
        &root,
        "proc/sys/kernel/random/boot_id",
        "0f5e2b9c-1111-4222-8333-444455556666\n",
    );
    write(&root, "etc/hostname", "drained\n");
    let marker = format!("41.{}", std::process::id());
    let listed = device_steps(&root, &["--list"], WAIT);
    listed.assert_code(0);
    let agents: Vec<String> = listed.stdout.lines().map(str::to_owned).collect();
    let mut booted = Booted {
        root: root.clone(),
        agents: agents.clone(),
        pids: Vec::new(),
        marker: marker.clone(),
    };
    let bin_dir = bin().parent().unwrap().to_str().unwrap().to_owned();
    let boot = device_steps(
        &root,
        &["--bin", &bin_dir, "--timeout", "60"],
        Duration::from_secs(180),
    );
    booted.pids = booted.pid_files();
    if boot.code() != Some(0) {
        panic!(
            "device-steps.sh did not boot the node: {boot:?}\n{}",
            booted.logs()
        );
    }
    assert_eq!(booted.pids.len(), agents.len(), "{boot:?}");

    let node_id = storage.list_nodes().await.unwrap()[0].id.clone();
    let args = json!({ "script": format!("echo started; sleep {marker}") });
    let id = storage
        .create_task(
            &NewTask {
                node_id: &node_id,
                kind: "node.exec",
                args: &args,
                timeout_s: 60,
                max_attempts: 1,
            },
            powernode_controller::now_ms(),
        )
        .await
        .unwrap()
        .unwrap()
        .id;
    let mut statuses = Subscription::<TaskStatus>::connect(&Dirs::under_root(&root), "execd");
    let deadline = Instant::now() + WAIT;
    while !statuses
        .get(&id)
        .is_some_and(|s| s.state == TaskState::Running)
        || processes_with(&marker).is_empty()
    {
        if Instant::now() >= deadline {
            panic!("the task never ran\n{}", booted.logs());
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), statuses.next()).await;
    }
    drop(statuses);

    let stop = device_steps(&root, &["--stop"], Duration::from_secs(180));
    if stop.code() != Some(0) {
        panic!("device-steps.sh --stop failed: {stop:?}\n{}", booted.logs());
    }
    let task = storage.task(&id).await.unwrap().unwrap();
    if task.state != "interrupted" {
        panic!(
            "the task is {task:?} once the node has stopped\n{stop:?}\n{}",
            booted.logs()
        );
    }
    let output = task.output.clone().unwrap_or_default();
    assert!(
        output.starts_with("started") && output.contains("[interrupted: execd was stopped"),
        "{output}"
    );
    assert_eq!(
        processes_with(&marker),
        Vec::<i32>::new(),
        "the script runs on"
    );
    for (agent, pid) in &booted.pids {
        assert!(gone(*pid), "{agent} (pid {pid}) still runs\n{stop:?}");
        let log = std::fs::read_to_string(root.join(format!("run/powernode/{agent}.log")))
            .unwrap_or_default();
        assert!(
            stopped_cleanly(&log),
            "{agent} did not stop cleanly\n{}",
            booted.logs()
        );
        let status = status_of(&root, agent);
        assert_eq!(status["state"], "Stopping", "{agent}: {status}");
    }
    let order: Vec<&str> = stop
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("device-steps: stopping "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let at = |agent: &str| {
        order
            .iter()
            .position(|a| *a == agent)
            .unwrap_or_else(|| panic!("{agent} not stopped: {order:?}"))
    };
    assert_eq!(order.len(), agents.len(), "{order:?}");
    assert!(at("execd") < at("heartbeatd"), "{order:?}");
    assert!(at("modulemgr") < at("heartbeatd"), "{order:?}");
    assert_eq!(order.last(), Some(&"eventd"), "{order:?}");
    storage.close().await;
    drop(ctl);
}
