//! A node enrolled with a real controller: the controller runs in the test process, its
//! database is open beside it (tasks are created there, as `powernode-controller task create`
//! does), the node's identity is published as identitymgr would, and its agents run from the
//! built binary. The controller's heartbeat interval is 15 s, so what reaches the node within
//! a few seconds got there through the watch.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use powernode_controller::server::RunningController;
use powernode_controller::storage::{NewTask, Storage, Task};
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::{ControllerStatus, NodeIdentity, GLOBAL_KEY};

/// How long a node gets to do what a test waits for.
pub const WAIT: Duration = Duration::from_secs(60);

/// A node with its controller.
pub struct EnrolledNode {
    /// Holds the node's root.
    pub dir: tempfile::TempDir,
    /// The node's root.
    pub root: PathBuf,
    /// The controller's data directory.
    pub ctl_dir: tempfile::TempDir,
    /// The controller (`None` once a test stopped it).
    pub ctl: Option<RunningController>,
    /// The controller's database.
    pub storage: Storage,
    /// The node's id on the controller.
    pub node_id: String,
    _identity: Publication<NodeIdentity>,
    /// The agents started, by name.
    pub agents: Vec<(&'static str, Child)>,
}

impl EnrolledNode {
    /// Boots a node of identity `uuid` whose settings get `settings` appended, runs `agents`
    /// (heartbeatd among them) and returns once heartbeatd has reached the controller.
    pub async fn boot(uuid: &str, settings: &str, agents: &[&'static str]) -> EnrolledNode {
        Self::boot_with(uuid, agents, |root| {
            let toml = root.join("etc/powernode/agent.toml");
            let base = std::fs::read_to_string(&toml).unwrap();
            std::fs::write(&toml, format!("{base}{settings}")).unwrap();
        })
        .await
    }

    /// Boots a node of identity `uuid` whose root `prepare` has made ready (settings, trust
    /// policy) before `agents` (heartbeatd among them) start; returns once heartbeatd has
    /// reached the controller.
    pub async fn boot_with(
        uuid: &str,
        agents: &[&'static str],
        prepare: impl FnOnce(&Path),
    ) -> EnrolledNode {
        let ctl_dir = tempfile::Builder::new().prefix("pnc").tempdir().unwrap();
        let (ctl, token) = super::controller(ctl_dir.path(), Duration::from_secs(3600)).await;
        let storage = Storage::open(&ctl_dir.path().join("data")).await.unwrap();
        let (dir, root) = super::node_root();
        prepare(&root);
        let identity = Publication::open(&Dirs::under_root(&root), "identitymgr").unwrap();
        let url = format!("https://127.0.0.1:{}", ctl.addr().port());
        identity
            .publish(&super::resolved_identity(uuid, token, &url, ctl.ca_pem()))
            .unwrap();
        let mut node = EnrolledNode {
            dir,
            root,
            ctl_dir,
            ctl: Some(ctl),
            storage,
            node_id: String::new(),
            _identity: identity,
            agents: Vec::new(),
        };
        for agent in agents {
            node.start(agent);
        }
        let mut status =
            Subscription::<ControllerStatus>::connect(&Dirs::under_root(&node.root), "heartbeatd");
        let deadline = Instant::now() + WAIT;
        while !status.get(GLOBAL_KEY).is_some_and(|s| s.reachable) {
            node.check(deadline, "heartbeatd never reached the controller");
            let _ = tokio::time::timeout(Duration::from_millis(200), status.next()).await;
        }
        node.node_id = node.storage.list_nodes().await.unwrap()[0].id.clone();
        node
    }

    /// Starts (or starts again) `agent`, logging to `root/<agent>.log`.
    pub fn start(&mut self, agent: &'static str) {
        let child = super::spawn_agent(&self.root, agent, "");
        self.agents.retain(|(a, _)| *a != agent);
        self.agents.push((agent, child));
    }

    /// `kill -9` of `agent`, and waits for it.
    pub fn kill9(&mut self, agent: &str) {
        for (a, child) in &mut self.agents {
            if *a == agent {
                kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
                child.wait().unwrap();
            }
        }
    }

    /// Fails the test past `deadline` with `what` and every agent's log.
    #[track_caller]
    pub fn check(&self, deadline: Instant, what: &str) {
        if Instant::now() >= deadline {
            super::fail_with_logs(&self.root, self.agents.iter().map(|(a, _)| *a), what);
        }
    }

    /// The node's pubsub directories.
    pub fn dirs(&self) -> Dirs {
        Dirs::under_root(&self.root)
    }

    /// The node's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates a task of `kind` for this node (one attempt): its id.
    pub async fn create(&self, kind: &str, args: serde_json::Value, timeout_s: u32) -> String {
        create_task(&self.storage, &self.node_id, kind, args, timeout_s).await
    }

    /// The task once `done` says so.
    pub async fn task_when(&self, id: &str, what: &str, done: impl Fn(&Task) -> bool) -> Task {
        let deadline = Instant::now() + WAIT;
        loop {
            let task = self.storage.task(id).await.unwrap().unwrap();
            if done(&task) {
                return task;
            }
            self.check(deadline, &format!("task {id} never {what}: {task:?}"));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The task once it is final on the controller.
    pub async fn finished(&self, id: &str) -> Task {
        self.task_when(id, "finished", is_final).await
    }

    /// Creates a task and waits until it is final.
    pub async fn run(&self, kind: &str, args: serde_json::Value) -> Task {
        let id = self.create(kind, args, 120).await;
        self.finished(&id).await
    }
}

/// Creates a task of `kind` for `node_id` in the controller's database (one attempt), as
/// `powernode-controller task create` does: its id.
pub async fn create_task(
    storage: &Storage,
    node_id: &str,
    kind: &str,
    args: serde_json::Value,
    timeout_s: u32,
) -> String {
    let task = NewTask {
        node_id,
        kind,
        args: &args,
        timeout_s,
        max_attempts: 1,
    };
    storage
        .create_task(&task, powernode_controller::now_ms())
        .await
        .unwrap()
        .unwrap()
        .id
}

/// Whether the task has ended on the controller.
pub fn is_final(task: &Task) -> bool {
    !matches!(task.state.as_str(), "queued" | "leased")
}

impl Drop for EnrolledNode {
    fn drop(&mut self) {
        for (_, child) in &mut self.agents {
            let _ = child.kill();
            let _ = child.wait();
        }
        super::unmount_under(&self.root);
    }
}
