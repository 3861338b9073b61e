//! modulemgr's tasks end to end: the real controller (in this process), the `docker-registry`
//! server on loopback, and a node of real agents (enrollmgr, heartbeatd, modulemgr, verifier,
//! mountmgr) mounting real erofs and overlayfs. Tasks are created in the controller's
//! database; the controller's watch brings them to the node, modulemgr runs them, and the
//! outcome comes back to the controller.
//!
//! Needs root (mounts), `docker-registry` and `mkfs.erofs`: skipped without them, a failure
//! under `CI=true`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::enrolled::{EnrolledNode, WAIT};
use powernode_controller::storage::Task;
use powernode_modules::cosign::SigningKey;
use powernode_modules::format::host_architecture;
use powernode_modules::package::{self, BuildOptions};
use powernode_modules::registry::{Registry, RegistryConfig};
use powernode_modules::testing::{TestRegistry, REGISTRY_BIN};
use powernode_pubsub::testing::require;
use powernode_pubsub::{Dirs, Subscription};
use powernode_types::node_api::DesiredModule;
use powernode_types::{ModuleState, ModuleStatus};
use serde_json::{json, Value};

/// The agents of the node, in start order.
const AGENTS: [&str; 5] = [
    "verifier",
    "mountmgr",
    "modulemgr",
    "enrollmgr",
    "heartbeatd",
];

fn can_run() -> bool {
    require(&["root", REGISTRY_BIN, "mkfs.erofs"])
}

/// A node with the module agents, enrolled with a controller, and a registry.
struct Node {
    node: EnrolledNode,
    registry: TestRegistry,
    _registry_dir: tempfile::TempDir,
    key: SigningKey,
}

impl std::ops::Deref for Node {
    type Target = EnrolledNode;
    fn deref(&self) -> &EnrolledNode {
        &self.node
    }
}

impl Node {
    async fn boot() -> Node {
        let registry_dir = tempfile::tempdir().unwrap();
        let registry = TestRegistry::start(registry_dir.path()).unwrap();
        let mut key = None;
        let node = EnrolledNode::boot_with("uuid-modtasks", &AGENTS, |root| {
            key = Some(common::trust_registry(root, &registry));
        })
        .await;
        Node {
            node,
            registry,
            _registry_dir: registry_dir,
            key: key.unwrap(),
        }
    }

    fn registry_client(&self) -> Registry {
        Registry::new(RegistryConfig {
            plain_http: vec![self.registry.host.clone()],
            ..RegistryConfig::default()
        })
    }

    /// Builds module `name` holding `files`, pushes it as `modules/<name>:1` (moving the tag
    /// if it is there) and signs it with the node's trusted key: its reference.
    async fn push(&self, name: &str, files: &[(&str, &str)]) -> String {
        let work = tempfile::tempdir_in(self.dir.path()).unwrap();
        let src = work.path().join("src");
        for (path, text) in files {
            fs::create_dir_all(src.join(path).parent().unwrap()).unwrap();
            fs::write(src.join(path), text).unwrap();
        }
        let options = BuildOptions {
            name: name.to_owned(),
            version: "1".to_owned(),
            priority: 50,
            architecture: host_architecture().to_owned(),
            dependencies: Vec::new(),
            services: Vec::new(),
            health_check: None,
        };
        let built = package::build(&src, &options, &work.path().join("out")).unwrap();
        let registry = self.registry_client();
        let repository = format!("{}/modules/{name}", self.registry.host);
        package::push(&registry, &repository, "1", &[built])
            .await
            .unwrap();
        let reference = format!("{repository}:1");
        package::sign(&registry, &reference, &self.key)
            .await
            .unwrap();
        reference
    }

    /// modulemgr's status of `name` once `done` says so.
    async fn module_when(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(Option<&ModuleStatus>) -> bool,
    ) {
        let mut statuses =
            Subscription::<ModuleStatus>::connect(&Dirs::under_root(&self.root), "modulemgr");
        let deadline = Instant::now() + WAIT;
        loop {
            if statuses.is_synchronized() && done(statuses.get(name)) {
                return;
            }
            self.check(
                deadline,
                &format!("module {name} never {what}: {:?}", statuses.get(name)),
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), statuses.next()).await;
        }
    }

    /// Where the union is.
    fn union(&self) -> PathBuf {
        self.root.join("run/powernode-mounts/modules/current")
    }

    fn union_file(&self, path: &str) -> Option<String> {
        fs::read_to_string(self.union().join(path)).ok()
    }
}

#[track_caller]
fn assert_task(task: &Task, state: &str, output_has: &str) {
    assert_eq!(task.state, state, "{task:?}");
    let output = task.output.as_deref().unwrap_or_default();
    assert!(
        output.contains(output_has),
        "the output of {} lacks {output_has:?}: {output}",
        task.kind
    );
}

fn cli_json(root: &Path, args: &[&str]) -> (i32, Value, String) {
    let out = Command::new(common::bin())
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        value,
        format!("{stdout}{stderr}"),
    )
}

/// attach → Active; the tag moves and `node.sync` brings the new image; `powernode-agent sync`
/// heartbeats and reports; bad arguments and the controller's own modules are refused;
/// detach → out of the stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_sync_and_detach_run_as_tasks() {
    if !can_run() {
        return;
    }
    let node = Node::boot().await;
    let reference = node.push("tools", &[("tools.txt", "one")]).await;

    let task = node
        .run("module.attach", json!({"reference": reference}))
        .await;
    assert_task(&task, "succeeded", "tools is active");
    assert_eq!(node.union_file("tools.txt").as_deref(), Some("one"));

    // The tag moves; a sync resolves it again.
    node.push("tools", &[("tools.txt", "two")]).await;
    let task = node.run("node.sync", json!({})).await;
    assert_task(&task, "succeeded", "tools: active, sha256:");
    assert_task(&task, "succeeded", "(was sha256:");
    assert_eq!(node.union_file("tools.txt").as_deref(), Some("two"));

    // The same on the node: a heartbeat, and nothing changed.
    let (code, sync, text) = cli_json(&node.root, &["sync", "--json", "--timeout", "60"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(sync["heartbeat"]["sent"], true, "{text}");
    assert_eq!(sync["task"]["state"], "Succeeded", "{text}");
    let modules = sync["modules"].as_array().unwrap();
    assert!(
        modules
            .iter()
            .any(|m| m["name"] == "tools" && m["state"] == "Active"),
        "{text}"
    );
    assert!(
        !sync["task"]["output"].as_str().unwrap().contains("(was"),
        "{text}"
    );

    // Bad arguments, and a name the controller assigns, are refused with the reason.
    let task = node.run("module.attach", json!({"name": "x"})).await;
    assert_task(&task, "failed", "expected");
    let base = node.push("base", &[("base.txt", "base")]).await;
    node.storage
        .set_desired_modules(
            &node.node_id,
            &[DesiredModule {
                name: "base".into(),
                reference: base,
                priority: 10,
            }],
            powernode_controller::now_ms(),
        )
        .await
        .unwrap()
        .unwrap();
    node.module_when("base", "became active", |m| {
        m.is_some_and(|m| m.state == ModuleState::Active)
    })
    .await;
    let task = node.run("module.detach", json!({"name": "base"})).await;
    assert_task(&task, "failed", "assigned by the controller");
    assert_eq!(node.union_file("base.txt").as_deref(), Some("base"));

    let task = node.run("module.detach", json!({"name": "tools"})).await;
    assert_task(&task, "succeeded", "tools is detached");
    assert_eq!(node.union_file("tools.txt"), None);
    assert!(!node
        .root
        .join("etc/powernode/modules.d/tools.toml")
        .exists());
    node.module_when("tools", "went away", |m| m.is_none())
        .await;
}

/// What is written into the stack, committed as a module by a task, is in the registry and
/// can be assigned like any other: it then becomes a layer of the stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_task_pushes_the_writes_and_the_module_can_be_assigned() {
    if !can_run() {
        return;
    }
    let node = Node::boot().await;
    let base = node.push("base", &[("base.txt", "base")]).await;
    let task = node
        .run("module.attach", json!({"reference": base, "priority": 10}))
        .await;
    assert_task(&task, "succeeded", "base is active");
    fs::write(node.union().join("hello.txt"), "written on the node").unwrap();

    let committed = format!("{}/committed/app:1", node.registry.host);
    let task = node
        .run(
            "module.commit",
            json!({"name": "app", "version": "1", "priority": 60, "reference": committed}),
        )
        .await;
    assert_eq!(task.state, "succeeded", "{task:?}");
    let output: Value = serde_json::from_str(task.output.as_deref().unwrap()).unwrap();
    assert_eq!(output["reference"], committed.as_str());
    let image_digest = output["image_digest"].as_str().unwrap().to_owned();
    assert!(output["index_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert!(
        fs::read_dir(node.root.join("persist/powernode/modulemgr/commit"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "the commit's files were left behind"
    );

    // The operator signs it (as `powernode-controller module sign` does) and assigns it.
    package::sign(&node.registry_client(), &committed, &node.key)
        .await
        .unwrap();
    node.storage
        .set_desired_modules(
            &node.node_id,
            &[DesiredModule {
                name: "app".into(),
                reference: committed,
                priority: 60,
            }],
            powernode_controller::now_ms(),
        )
        .await
        .unwrap()
        .unwrap();
    node.module_when("app", "became active with the committed image", |m| {
        m.is_some_and(|m| {
            m.state == ModuleState::Active && m.digest.as_deref() == Some(&image_digest)
        })
    })
    .await;
    assert_eq!(
        node.union_file("hello.txt").as_deref(),
        Some("written on the node")
    );

    // A commit with nothing to push to is refused with the reason.
    let task = node
        .run(
            "module.commit",
            json!({"name": "app", "version": "2", "reference": "not a reference"}),
        )
        .await;
    assert_eq!(task.state, "failed", "{task:?}");
}
