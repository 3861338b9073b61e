//! `node.exec` with scripts named by digest, end to end: the real controller (in this process)
//! stores the scripts; the real enrollmgr, heartbeatd and execd (the built `powernode-agent`)
//! lease the task, fetch the script over mTLS, check its digest and run it. Also: the
//! interpreters a node allows are its `[exec] interpreters` setting.

mod common;

use std::time::{Duration, Instant};

use common::enrolled::{EnrolledNode, WAIT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use powernode_controller::storage::Task;
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::{Event, Severity, TaskConfig, TaskState, TaskStatus};
use serde_json::json;

/// A node with enrollmgr, heartbeatd and execd running against a controller.
struct Node(EnrolledNode);

impl std::ops::Deref for Node {
    type Target = EnrolledNode;
    fn deref(&self) -> &EnrolledNode {
        &self.0
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut EnrolledNode {
        &mut self.0
    }
}

impl Node {
    /// Boots a node whose `etc/powernode/agent.toml` gets `settings` appended.
    async fn boot(settings: &str) -> Node {
        Node(
            EnrolledNode::boot(
                "uuid-digest",
                settings,
                &["enrollmgr", "execd", "heartbeatd"],
            )
            .await,
        )
    }

    /// Stores `text` as the operator does (`script add`): its digest.
    async fn add_script(&self, text: &str) -> String {
        let digest = powernode_controller::service::scripts::check_script(text)
            .unwrap()
            .to_string();
        self.storage
            .add_script(&digest, text, powernode_controller::now_ms())
            .await
            .unwrap()
            .digest
    }

    /// Replaces the text stored under `digest`, behind the controller's back.
    async fn tamper(&self, digest: &str, text: &str) {
        let db = self.ctl_dir.path().join("data/controller.db");
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        let changed = sqlx::query("UPDATE scripts SET content = ? WHERE digest = ?")
            .bind(text)
            .bind(digest)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
        pool.close().await;
        assert_eq!(changed, 1, "no script {digest} to tamper with");
    }

    /// Creates a `node.exec` task with `args` and waits for it to end on the controller.
    async fn exec(&self, args: serde_json::Value) -> Task {
        self.0.run("node.exec", args).await
    }

    /// The first event of `kind` execd raised, once it has.
    async fn event(&self, kind: &str) -> Event {
        let mut events = Subscription::<Event>::connect(&Dirs::under_root(&self.root), "execd");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((_, event)) = events.items().find(|(_, e)| e.kind == kind) {
                return event.clone();
            }
            self.check(deadline, &format!("execd never raised {kind}"));
            let _ = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
        }
    }
}

/// The task's output, which it must have.
fn output(task: &Task) -> &str {
    task.output
        .as_deref()
        .unwrap_or_else(|| panic!("no output: {task:?}"))
}

/// A task naming a stored script by digest runs it, and its output reaches the controller. A
/// script whose stored text no longer matches its digest (the row changed behind the
/// controller's back) is refused with both digests, raises a Critical event, and runs nothing.
/// A digest no script has fails with the controller's refusal; arguments naming both a text
/// and a digest, or neither, fail with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_named_by_digest_runs_and_a_tampered_one_is_refused() {
    let node = Node::boot("").await;
    let text = "echo \"stored script ran as $0\"\necho on stderr >&2\n";
    let digest = node.add_script(text).await;
    let created = Instant::now();
    let task = node.exec(json!({ "script_digest": digest })).await;
    assert_eq!(task.state, "succeeded", "{task:?}");
    let out = output(&task);
    assert!(
        out.contains("stored script ran as") && out.contains("on stderr"),
        "{out}"
    );
    println!(
        "task by digest created -> succeeded in {:?}",
        created.elapsed()
    );

    let marker = node.root.join("tampered-script-ran");
    let good = "echo good\n";
    let good_digest = node.add_script(good).await;
    let evil = format!("touch {}\n", marker.display());
    node.tamper(&good_digest, &evil).await;
    let task = node.exec(json!({ "script_digest": good_digest })).await;
    assert_eq!(task.state, "failed", "{task:?}");
    let out = output(&task);
    let evil_digest = powernode_controller::service::scripts::check_script(&evil)
        .unwrap()
        .to_string();
    assert!(
        out.contains("refused") && out.contains(&good_digest) && out.contains(&evil_digest),
        "the reason names neither digest: {out}"
    );
    assert!(!marker.exists(), "the tampered script ran");
    let event = node.event("task.script_digest_mismatch").await;
    assert_eq!(event.severity, Severity::Critical, "{event:?}");
    let field = |name: &str| {
        event
            .fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("task_id").as_deref(), Some(task.id.as_str()));
    assert_eq!(field("digest"), Some(good_digest.clone()));
    assert_eq!(field("received_digest"), Some(evil_digest));

    let unknown = format!("sha256:{}", "0".repeat(64));
    let task = node.exec(json!({ "script_digest": unknown })).await;
    assert_eq!(task.state, "failed", "{task:?}");
    let out = output(&task);
    assert!(
        out.contains("refused") && out.contains("404") && out.contains(&unknown),
        "{out}"
    );

    let task = node
        .exec(json!({ "script": "true", "script_digest": digest }))
        .await;
    assert_eq!(task.state, "failed");
    assert!(output(&task).contains("both"), "{task:?}");
    let task = node.exec(json!({ "timeout_s": 5 })).await;
    assert_eq!(task.state, "failed");
    assert!(output(&task).contains("need `script`"), "{task:?}");
    let task = node.exec(json!({ "script_digest": "sha256:abc" })).await;
    assert_eq!(task.state, "failed");
    assert!(output(&task).contains("not a sha256 digest"), "{task:?}");
}

/// `[exec] interpreters` replaces the built-in list: with only `/bin/bash` allowed, a script
/// naming no interpreter runs under bash (the first entry), one naming bash runs, and one
/// naming `/bin/sh` — allowed by default — is refused with the list of those allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interpreters_allowed_are_the_setting() {
    let node = Node::boot("[exec]\ninterpreters = [\"/bin/bash\"]\n").await;
    let digest = node.add_script("echo \"bash ${BASH_VERSINFO[0]}\"\n").await;
    let task = node.exec(json!({ "script_digest": digest })).await;
    assert_eq!(task.state, "succeeded", "{task:?}");
    let out = output(&task);
    assert!(
        out.starts_with("bash ") && out.trim() != "bash",
        "not run by bash: {out}"
    );
    let task = node
        .exec(json!({ "script_digest": digest, "interpreter": "/bin/bash" }))
        .await;
    assert_eq!(task.state, "succeeded", "{task:?}");

    let marker = node.root.join("sh-ran");
    let task = node
        .exec(json!({
            "script": format!("touch {}", marker.display()),
            "interpreter": "/bin/sh",
        }))
        .await;
    assert_eq!(task.state, "failed", "{task:?}");
    let out = output(&task);
    assert!(
        out.contains("\"/bin/sh\" is not allowed (allowed: /bin/bash;"),
        "{out}"
    );
    assert!(!marker.exists(), "a refused interpreter ran");
}

/// With the controller gone, a fetch is tried again with backoff for as long as the task's
/// timeout allows, and the task then fails saying so (attempts and the last error). The task
/// is handed to execd as heartbeatd would (heartbeatd is stopped, and the test publishes its
/// `TaskConfig`), since a controller that is down leases nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_is_retried_until_the_task_times_out_while_the_controller_is_away() {
    let mut node = Node::boot("").await;
    let digest = node.add_script("echo never\n").await;
    for (agent, child) in &mut node.agents {
        if *agent == "heartbeatd" {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
            child.wait().unwrap();
        }
    }
    node.ctl.take().unwrap().stop().await.unwrap();
    let dirs = Dirs::under_root(&node.root);
    let configs = Publication::<TaskConfig>::open(&dirs, "heartbeatd").unwrap();
    let id = "task-00000000000000aa";
    let started = Instant::now();
    configs
        .publish(&TaskConfig {
            id: id.to_owned(),
            kind: "node.exec".to_owned(),
            args_json: json!({ "script_digest": digest, "timeout_s": 3 }).to_string(),
            lease_expires_at_ms: common::now_ms() + 60_000,
        })
        .unwrap();
    let mut statuses = Subscription::<TaskStatus>::connect(&dirs, "execd");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = statuses.get(id).filter(|s| s.state != TaskState::Running) {
            break s.clone();
        }
        node.check(deadline, "execd never finished the task");
        let _ = tokio::time::timeout(Duration::from_millis(200), statuses.next()).await;
    };
    let took = started.elapsed();
    assert_eq!(status.state, TaskState::Failed, "{status:?}");
    assert!(
        status
            .output
            .contains(&format!("could not fetch script {digest}"))
            && status.output.contains("within the task's 3 s")
            && status.output.contains("cannot connect"),
        "{}",
        status.output
    );
    let attempts: u32 = status
        .output
        .split(" s (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no attempt count: {}", status.output));
    assert!(
        attempts >= 3,
        "{attempts} attempt(s) in 3 s: {}",
        status.output
    );
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(10),
        "failed after {took:?}, not at the task's timeout"
    );
}
