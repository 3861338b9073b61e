//! `powernode-agent introspect` against a real node: the real controller (in this process),
//! the real identitymgr (reading the sandbox's kernel command line), enrollmgr, heartbeatd,
//! execd and eventd; and, for modules and mounts, the real modulemgr, verifier and mountmgr
//! with a module from the `docker-registry` server on loopback. The view must show what those
//! agents publish, and, once they are stopped, still print, within its bound, saying they are
//! down.
//!
//! The modules test needs root (mounts), `docker-registry` and `mkfs.erofs`: without them it
//! skips, and fails instead under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{bin, node_root, spawn_agent, Finished};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use powernode_controller::server::RunningController;
use powernode_controller::storage::{NewTask, Storage};
use powernode_modules::testing::{TestRegistry, REGISTRY_BIN};
use powernode_pubsub::testing::require;
use powernode_pubsub::{Dirs, Subscription};
use powernode_types::{ControllerStatus, TaskState, TaskStatus, GLOBAL_KEY};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);
const UUID: &str = "3c9d0f51-7a2e-4b6c-9d8e-1f2a3b4c5d6e";
/// The agents of the first test.
const AGENTS: [&str; 5] = ["identitymgr", "enrollmgr", "heartbeatd", "execd", "eventd"];

/// Agents started under a root, stopped (SIGKILL) when dropped.
struct Agents {
    root: PathBuf,
    running: Vec<(&'static str, Child)>,
}

impl Agents {
    fn start(root: &Path, agents: &[&'static str]) -> Agents {
        Agents {
            root: root.to_owned(),
            running: agents
                .iter()
                .map(|a| (*a, spawn_agent(root, a, "")))
                .collect(),
        }
    }

    /// Sends `signal` to each of `agents` and waits for it to exit; SIGTERM must end it with 0.
    fn stop(&mut self, agents: &[&str], signal: Signal) {
        for agent in agents {
            let i = self.running.iter().position(|(a, _)| a == agent).unwrap();
            let (_, mut child) = self.running.remove(i);
            kill(Pid::from_raw(child.id() as i32), signal).unwrap();
            let deadline = Instant::now() + WAIT;
            let exit = loop {
                if let Some(exit) = child.try_wait().unwrap() {
                    break exit;
                }
                self.check(deadline, &format!("{agent} did not stop on {signal}"));
                std::thread::sleep(Duration::from_millis(50));
            };
            if signal == Signal::SIGTERM {
                assert!(exit.success(), "{agent} exited {exit:?}");
            }
        }
    }

    #[track_caller]
    fn check(&self, deadline: Instant, what: &str) {
        if Instant::now() >= deadline {
            common::fail_with_logs(&self.root, self.running.iter().map(|(a, _)| *a), what);
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, child) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `powernode-agent --root <root> introspect args...`, which must exit 0 within 15 s.
fn introspect(root: &Path, args: &[&str]) -> Finished {
    let started = Instant::now();
    let out = common::run(
        Command::new(bin())
            .arg("--root")
            .arg(root)
            .arg("introspect")
            .args(args)
            .env_remove("POWERNODE_ROOT"),
    );
    out.assert_code(0);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "introspect took {took:?}");
    out
}

/// The entry of `agent` in the view's `agents`.
#[track_caller]
fn agent<'a>(doc: &'a Value, agent: &str) -> &'a Value {
    doc["agents"]
        .as_array()
        .and_then(|all| all.iter().find(|a| a["agent"] == agent))
        .unwrap_or_else(|| panic!("no agent {agent} in {doc}"))
}

/// Whether the view's `publishers_down` names `publication`.
fn down(doc: &Value, publication: &str) -> bool {
    doc["publishers_down"]
        .as_array()
        .is_some_and(|all| all.iter().any(|p| p == publication))
}

/// What the binary says about netmgr when none runs: built or not.
fn netmgr_when_absent() -> &'static str {
    let out = common::run(Command::new(bin()).arg("agents"));
    out.assert_code(0);
    if out.stdout.lines().any(|l| l == "netmgr") {
        "not started"
    } else {
        "not built"
    }
}

/// Identity, enrollment, controller, a running task, events and agents, as the real agents
/// publish them; then, every agent stopped, the same view from their checkpoints, marked so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspect_shows_the_node_and_says_what_is_down() {
    let ctl_dir = tempfile::Builder::new().prefix("pnc").tempdir().unwrap();
    let (ctl, token): (RunningController, String) =
        common::controller(ctl_dir.path(), Duration::from_secs(3600)).await;
    let storage = Storage::open(&ctl_dir.path().join("data")).await.unwrap();
    let (_dir, root) = node_root();
    let url = format!("https://127.0.0.1:{}", ctl.addr().port());
    std::fs::write(root.join("etc/powernode/controller-ca.pem"), ctl.ca_pem()).unwrap();
    std::fs::create_dir_all(root.join("proc/sys/kernel/random")).unwrap();
    std::fs::write(root.join("proc/sys/kernel/random/boot_id"), "boot-41\n").unwrap();
    std::fs::write(root.join("etc/hostname"), "edge-41\n").unwrap();
    std::fs::write(
        root.join("proc/cmdline"),
        format!(
            "ro powernode.instance_uuid={UUID} powernode.bootstrap_token={token} \
             powernode.controller_url={url} powernode.ca_file=etc/powernode/controller-ca.pem\n"
        ),
    )
    .unwrap();
    let mut agents = Agents::start(&root, &AGENTS);

    // Up and enrolled: heartbeatd has reached the controller.
    let dirs = Dirs::under_root(&root);
    let mut status = Subscription::<ControllerStatus>::connect(&dirs, "heartbeatd");
    let deadline = Instant::now() + WAIT;
    while !status.get(GLOBAL_KEY).is_some_and(|s| s.reachable) {
        agents.check(deadline, "heartbeatd never reached the controller");
        let _ = tokio::time::timeout(Duration::from_millis(200), status.next()).await;
    }
    let nodes = storage.list_nodes().await.unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let node_id = nodes[0].id.clone();

    // A task that runs until it is stopped.
    let marker = format!("41.{}", std::process::id());
    let task = NewTask {
        node_id: &node_id,
        kind: "node.exec",
        args: &json!({"script": format!("echo started; sleep {marker}")}),
        timeout_s: 60,
        max_attempts: 1,
    };
    let task_id = storage
        .create_task(&task, powernode_controller::now_ms())
        .await
        .unwrap()
        .unwrap()
        .id;
    let mut tasks = Subscription::<TaskStatus>::connect(&dirs, "execd");
    let deadline = Instant::now() + WAIT;
    while !tasks
        .get(&task_id)
        .is_some_and(|s| s.state == TaskState::Running)
    {
        agents.check(deadline, "execd never ran the task");
        let _ = tokio::time::timeout(Duration::from_millis(200), tasks.next()).await;
    }

    let out = introspect(&root, &["--json"]);
    let doc = out.json();
    assert!(
        !out.stdout.contains(&token),
        "the bootstrap token is shown: {doc}"
    );
    assert_eq!(doc["root"], root.display().to_string());

    let identity = &doc["identity"];
    assert_eq!(identity["publication"], "identitymgr/NodeIdentity", "{doc}");
    assert_eq!(identity["publisher"], "up", "{doc}");
    assert_eq!(identity["from_checkpoint"], false, "{doc}");
    assert_eq!(identity["value"]["uuid"], UUID, "{doc}");
    assert_eq!(identity["value"]["source"], "KernelCmdline", "{doc}");
    assert_eq!(
        identity["value"]["controller_urls"],
        serde_json::json!([url]),
        "{doc}"
    );
    assert_eq!(identity["value"]["has_bootstrap_token"], true, "{doc}");
    assert_eq!(identity["value"]["hostname"], "edge-41", "{doc}");
    assert_eq!(identity["value"]["boot_id"], "boot-41", "{doc}");

    let enrollment = &doc["enrollment"]["value"];
    assert_eq!(doc["enrollment"]["publisher"], "up", "{doc}");
    assert_eq!(enrollment["state"], "Enrolled", "{doc}");
    assert_eq!(enrollment["node_id"], node_id.as_str(), "{doc}");
    let now = doc["now_ms"].as_u64().unwrap();
    assert!(
        enrollment["not_after_ms"]
            .as_u64()
            .is_some_and(|t| t > now + 3_000_000),
        "an hour-long certificate: {doc}"
    );
    assert!(enrollment["rotate_at_ms"].as_u64().is_some(), "{doc}");
    assert_eq!(enrollment["rotation_failing_since_ms"], Value::Null);

    let controller = &doc["controller"]["value"];
    assert_eq!(controller["reachable"], true, "{doc}");
    assert!(controller["last_success_ms"].as_u64().is_some(), "{doc}");
    assert_eq!(controller["heartbeat_interval_s"], 15, "{doc}");

    let shown = doc["tasks"]["items"]
        .as_array()
        .and_then(|all| all.iter().find(|t| t["id"] == task_id.as_str()))
        .unwrap_or_else(|| panic!("task {task_id} not shown: {doc}"));
    assert_eq!(shown["held"], true, "{doc}");
    assert_eq!(shown["kind"], "node.exec", "{doc}");
    assert_eq!(shown["status"]["state"], "Running", "{doc}");

    assert_eq!(doc["events"]["publisher"], "up", "{doc}");
    assert!(
        doc["events"]["value"]["pending"].as_u64().is_some(),
        "{doc}"
    );

    assert_eq!(doc["modules"]["publications"][0]["publisher"], "absent");
    assert_eq!(doc["modules"]["items"], json!([]));
    assert_eq!(doc["network"]["netmgr"], netmgr_when_absent(), "{doc}");
    assert_eq!(doc["network"]["status"]["publisher"], "absent", "{doc}");

    for name in AGENTS {
        let a = agent(&doc, name);
        assert_eq!(a["up"], true, "{name}: {doc}");
        assert_eq!(a["state"], "Running", "{name}: {doc}");
        assert_eq!(a["restarts"], 0, "{name}: {doc}");
    }
    let not_started = doc["agents_not_started"].as_array().unwrap();
    for name in ["verifier", "mountmgr", "modulemgr"] {
        assert!(not_started.iter().any(|a| a == name), "{name}: {doc}");
    }
    assert_eq!(doc["publishers_down"], json!([]), "{doc}");

    let page = introspect(&root, &[]);
    println!("introspect of the running node:\n{}", page.stdout);
    for part in [
        format!("  uuid            {UUID} (from KernelCmdline)\n"),
        format!("  node id         {node_id}\n"),
        "  reachable       yes\n".to_owned(),
        "  bootstrap       present (not shown)\n".to_owned(),
        format!("\n{task_id} "),
    ] {
        page.assert_stdout_contains(&part);
    }
    assert!(!page.stdout.contains(&token), "{page:?}");
    assert!(!page.stdout.contains("publisher down"), "{page:?}");

    // Every agent stopped (execd's drain kills the script), and identitymgr started and
    // stopped once more, so that it has a restart to show.
    agents.stop(&AGENTS, Signal::SIGTERM);
    let mut again = Agents::start(&root, &["identitymgr"]);
    let out = common::run(
        Command::new(bin())
            .arg("--root")
            .arg(&root)
            .args([
                "wait",
                "identitymgr/AgentStatus",
                "--field",
                "state=Running",
            ])
            .args(["--timeout", "15"]),
    );
    out.assert_code(0);
    again.stop(&["identitymgr"], Signal::SIGTERM);

    let out = introspect(&root, &["--json"]);
    let doc = out.json();
    let identity = &doc["identity"];
    assert_eq!(identity["publisher"], "down", "{doc}");
    assert_eq!(identity["from_checkpoint"], true, "{doc}");
    assert_eq!(
        identity["value"]["uuid"], UUID,
        "from the checkpoint: {doc}"
    );
    assert_eq!(doc["enrollment"]["publisher"], "down", "{doc}");
    assert_eq!(
        doc["enrollment"]["value"]["node_id"],
        node_id.as_str(),
        "{doc}"
    );
    assert_eq!(doc["controller"]["publisher"], "down", "{doc}");
    assert_eq!(doc["events"]["publisher"], "down", "{doc}");
    for publication in [
        "identitymgr/NodeIdentity",
        "enrollmgr/EnrollmentStatus",
        "heartbeatd/ControllerStatus",
        "eventd/EventdStatus",
    ] {
        assert!(down(&doc, publication), "{publication}: {doc}");
    }
    for name in AGENTS {
        let a = agent(&doc, name);
        assert_eq!(a["up"], false, "{name}: {doc}");
        assert_eq!(a["from_checkpoint"], true, "{name}: {doc}");
        assert_eq!(a["state"], "Stopping", "{name} stopped cleanly: {doc}");
    }
    assert_eq!(agent(&doc, "identitymgr")["restarts"], 1, "{doc}");

    let page = introspect(&root, &[]);
    println!("introspect with every agent stopped:\n{}", page.stdout);
    for part in [
        "\nidentity (identitymgr/NodeIdentity, publisher down: from its checkpoint):\n",
        "\ncontroller (heartbeatd/ControllerStatus, publisher down: from its checkpoint):\n",
        "down (last said Stopping)",
        "\npublisher down: identitymgr/NodeIdentity, ",
        "not from a running agent.\n",
    ] {
        page.assert_stdout_contains(part);
    }
    page.assert_stdout_contains(&format!("  uuid            {UUID} (from KernelCmdline)\n"));
}

/// With nothing ever run under the root, every section says it is not published; exit 0.
#[test]
fn introspect_of_an_empty_root_says_nothing_is_published() {
    let (_dir, root) = node_root();
    let doc = introspect(&root, &["--json"]).json();
    for section in ["identity", "enrollment", "controller", "events"] {
        assert_eq!(doc[section]["publisher"], "absent", "{section}: {doc}");
        assert_eq!(doc[section]["value"], Value::Null, "{section}: {doc}");
    }
    assert_eq!(doc["agents"], json!([]), "{doc}");
    let page = introspect(&root, &[]);
    page.assert_stdout_contains("  not published: identitymgr has not run under this root\n");
    page.assert_stdout_contains("  none has published an AgentStatus under this root\n");

    let help = common::run(Command::new(bin()).args(["introspect", "--help"]));
    help.assert_code(0);
    for part in [
        "Usage: powernode-agent introspect",
        "identity (identitymgr/NodeIdentity)",
        "enrollment (enrollmgr/EnrollmentStatus)",
        "controller (heartbeatd/ControllerStatus)",
        "modules (modulemgr/ModuleStatus)",
        "network status (netmgr/NetworkStatus)",
        "events (eventd/EventdStatus)",
    ] {
        help.assert_stdout_contains(part);
    }
}

/// A module pulled, verified and mounted: its state and digest, the mount's slot and layer;
/// modulemgr killed, the modules section comes from its checkpoint and says so.
#[test]
fn introspect_shows_modules_and_mounts() {
    if !require(&["root", REGISTRY_BIN, "mkfs.erofs"]) {
        return;
    }
    let (dir, root) = node_root();
    let registry = TestRegistry::start(&dir.path().join("registry")).unwrap();
    let key = common::trust_registry(&root, &registry);
    let reference = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(common::push_module(&registry, dir.path(), "tools", &key));

    let _unmount = Unmount(root.clone());
    let mut agents = Agents::start(&root, &["verifier", "mountmgr", "modulemgr"]);
    let attach = Command::new(bin())
        .arg("--root")
        .arg(&root)
        .args(["attach", &reference, "--name", "tools", "--timeout", "60"])
        .output()
        .unwrap();
    if !attach.status.success() {
        common::fail_with_logs(
            &root,
            ["modulemgr", "verifier", "mountmgr"],
            &format!("attach failed: {attach:?}"),
        );
    }

    let doc = introspect(&root, &["--json"]).json();
    let modules = &doc["modules"];
    assert_eq!(
        modules["publications"],
        json!([{"publication": "modulemgr/ModuleStatus", "publisher": "up", "from_checkpoint": false}]),
        "{doc}"
    );
    let tools = &modules["items"][0];
    assert_eq!(tools["name"], "tools", "{doc}");
    assert_eq!(tools["state"], "Active", "{doc}");
    assert_eq!(tools["reference"], reference.as_str(), "{doc}");
    let digest = tools["digest"].as_str().unwrap_or_default().to_owned();
    assert!(digest.starts_with("sha256:"), "{doc}");
    let mount = &doc["mounts"]["items"][0];
    assert_eq!(doc["mounts"]["publications"][0]["publisher"], "up");
    assert_eq!(mount["target"], "modules", "{doc}");
    assert_eq!(mount["state"], "Mounted", "{doc}");
    assert!(mount["slot"].is_string(), "{doc}");
    assert_eq!(mount["layers"].as_array().map(Vec::len), Some(1), "{doc}");

    let page = introspect(&root, &[]);
    println!("introspect with a module:\n{}", page.stdout);
    page.assert_stdout_contains("\nmodules (modulemgr/ModuleStatus):\n");
    page.assert_stdout_contains("\ntools   Active ");
    page.assert_stdout_contains(&digest[.."sha256:".len() + 12]);

    agents.stop(&["modulemgr"], Signal::SIGKILL);
    let doc = introspect(&root, &["--json"]).json();
    let modules = &doc["modules"];
    assert_eq!(modules["publications"][0]["publisher"], "down", "{doc}");
    assert_eq!(modules["publications"][0]["from_checkpoint"], true, "{doc}");
    assert_eq!(modules["items"][0]["state"], "Active", "{doc}");
    assert!(down(&doc, "modulemgr/ModuleStatus"), "{doc}");
    assert_eq!(doc["mounts"]["publications"][0]["publisher"], "up");
    assert_eq!(agent(&doc, "modulemgr")["up"], false, "{doc}");
    let page = introspect(&root, &[]);
    page.assert_stdout_contains(
        "\nmodules (modulemgr/ModuleStatus, publisher down: from its checkpoint):\n",
    );
    drop(agents);
}

/// Detaches what the module agents mounted under the root, also when the test fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        common::unmount_under(&self.0);
    }
}
