//! The events modulemgr, the verifier and mountmgr raise, each from its real scenario, read
//! back from the real controller: a node enrolled by the real enrollmgr, its events delivered
//! by the real eventd, its modules built by `mkfs.erofs`, pushed to the `docker-registry`
//! server on loopback, signed in cosign's format, and mounted as real erofs and overlayfs.
//!
//! Needs root (mounts), `docker-registry` and `mkfs.erofs`: without them a test skips, and
//! fails instead under `CI=true`.

mod common;

use common::agents::Agents;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{bin, node_root, resolved_identity, spawn_agent};
use powernode_controller::server::RunningController;
use powernode_controller::storage::{EventQuery, Storage, StoredEvent};
use powernode_modules::cosign::SigningKey;
use powernode_modules::format::{host_architecture, HealthCheckSpec};
use powernode_modules::package::{self, BuildOptions, Built};
use powernode_modules::registry::{Registry, RegistryConfig};
use powernode_modules::testing::{TestRegistry, REGISTRY_BIN};
use powernode_pubsub::testing::require;
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::node_api::EventRecord;
use powernode_types::{Event, ModuleState, ModuleStatus, NodeIdentity, Severity};

/// How long an event may take from its scenario to the controller.
const EVENT_DEADLINE: Duration = Duration::from_secs(60);

fn can_run() -> bool {
    require(&["root", REGISTRY_BIN, "mkfs.erofs"])
}

/// A node enrolled with a controller of its own, running enrollmgr, eventd and the three
/// module agents, with a registry and a trusted signing key.
struct Node {
    dir: tempfile::TempDir,
    root: PathBuf,
    registry: TestRegistry,
    key: SigningKey,
    rt: tokio::runtime::Runtime,
    _controller: RunningController,
    storage: Storage,
    _identity: Publication<NodeIdentity>,
    agents: Agents,
}

impl Node {
    fn new() -> Node {
        let (dir, root) = node_root();
        let registry = TestRegistry::start(&dir.path().join("registry")).unwrap();
        let etc = root.join("etc/powernode");
        fs::create_dir_all(etc.join("agent.toml.d")).unwrap();
        fs::write(
            etc.join("agent.toml.d/modules.toml"),
            format!(
                "[modules]\nplain_http = [\"{}\"]\nmax_backoff_s = 1\n",
                registry.host
            ),
        )
        .unwrap();
        let key = SigningKey::generate().unwrap();
        fs::create_dir_all(etc.join("trust")).unwrap();
        fs::write(etc.join("trust/cosign.pub"), key.public_key_pem()).unwrap();
        fs::write(
            etc.join("trust/default.toml"),
            "require_signature = true\nkeys = [\"cosign.pub\"]\n",
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (controller, token) =
            rt.block_on(common::controller(dir.path(), Duration::from_secs(3600)));
        let storage = rt
            .block_on(Storage::open(&dir.path().join("data")))
            .unwrap();
        let identity = {
            let _in_runtime = rt.enter();
            let identity =
                Publication::<NodeIdentity>::open(&Dirs::under_root(&root), "identitymgr").unwrap();
            let url = format!("https://127.0.0.1:{}", controller.addr().port());
            identity
                .publish(&resolved_identity(
                    "uuid-module-events",
                    token,
                    &url,
                    controller.ca_pem(),
                ))
                .unwrap();
            identity
        };
        let mut node = Node {
            dir,
            root,
            registry,
            key,
            rt,
            _controller: controller,
            storage,
            _identity: identity,
            agents: Agents::default(),
        };
        for agent in ["enrollmgr", "eventd", "verifier", "mountmgr", "modulemgr"] {
            node.start(agent, "");
        }
        node
    }

    /// Starts `agent` with the crash points `failpoints` armed.
    fn start(&mut self, agent: &str, failpoints: &str) {
        let child = spawn_agent(&self.root, agent, failpoints);
        self.agents.add(agent, child);
    }

    fn take(&mut self, agent: &str) -> Child {
        self.agents.take(agent)
    }

    /// SIGKILL to the agent's PID.
    fn kill9(&mut self, agent: &str) {
        let mut child = self.take(agent);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits for `agent` to end by itself (at an armed crash point); its exit status.
    fn wait_exit(&mut self, agent: &str) -> std::process::ExitStatus {
        let mut child = self.take(agent);
        let deadline = Instant::now() + EVENT_DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{agent} did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self, agent: &str) -> String {
        fs::read_to_string(self.root.join(format!("{agent}.log"))).unwrap_or_default()
    }

    /// Builds module `name` (one file), pushes it as `modules/<name>:1`, signs it with
    /// `signer`. The reference and what was built.
    fn publish(
        &self,
        name: &str,
        signer: &SigningKey,
        health_check: Option<&[&str]>,
    ) -> (String, Built) {
        let src = self.dir.path().join("src").join(name);
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join(format!("{name}.txt")), name).unwrap();
        let options = BuildOptions {
            name: name.to_owned(),
            version: "1".to_owned(),
            priority: 50,
            architecture: host_architecture().to_owned(),
            dependencies: Vec::new(),
            services: Vec::new(),
            health_check: health_check.map(|command| HealthCheckSpec {
                command: command.iter().map(|c| (*c).to_owned()).collect(),
                timeout_s: 20,
            }),
        };
        let built = package::build(&src, &options, &self.dir.path().join("out")).unwrap();
        let registry = Registry::new(RegistryConfig {
            plain_http: vec![self.registry.host.clone()],
            ..RegistryConfig::default()
        });
        let repository = format!("{}/modules/{name}", self.registry.host);
        let reference = format!("{repository}:1");
        self.rt.block_on(async {
            let pushed = package::load_built(&built.manifest).unwrap();
            package::push(&registry, &repository, "1", &[pushed])
                .await
                .unwrap();
            package::sign(&registry, &reference, signer).await.unwrap();
        });
        (reference, built)
    }

    /// `powernode-agent attach`: a local assignment, which modulemgr follows.
    fn attach(&self, name: &str, reference: &str, priority: u32) {
        let out = Command::new(bin())
            .arg("--root")
            .arg(&self.root)
            .args(["attach", reference, "--name", name, "--no-wait"])
            .args(["--priority", &priority.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    /// The controller's events of `kind`, oldest first.
    fn events(&self, kind: &str) -> Vec<StoredEvent> {
        let query = EventQuery {
            kind: Some(kind.to_owned()),
            limit: 1000,
            ..EventQuery::default()
        };
        self.rt.block_on(self.storage.events(&query)).unwrap()
    }

    /// Waits until the controller holds an event of `kind` that `wanted` accepts; on timeout
    /// fails with every event it holds and the agents' logs.
    fn wait_event(&self, kind: &str, wanted: impl Fn(&StoredEvent) -> bool) -> StoredEvent {
        let deadline = Instant::now() + EVENT_DEADLINE;
        loop {
            if let Some(e) = self.events(kind).into_iter().find(|e| wanted(e)) {
                return e;
            }
            if Instant::now() > deadline {
                let all = self.rt.block_on(self.storage.events(&EventQuery {
                    limit: 1000,
                    ..EventQuery::default()
                }));
                let all: Vec<String> = all
                    .unwrap()
                    .iter()
                    .map(|e| format!("{} {:?} {} {:?}", e.kind, e.severity, e.message, e.fields))
                    .collect();
                let logs: Vec<String> = ["modulemgr", "verifier", "mountmgr", "eventd"]
                    .iter()
                    .map(|a| format!("--- {a} log\n{}", self.log(a)))
                    .collect();
                panic!(
                    "no wanted {kind} event on the controller; it holds:\n{}\n{}",
                    all.join("\n"),
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until eventd has journalled (and acknowledged) every event `agent` raised.
    fn journalled(&self, agent: &str) {
        let dirs = Dirs::under_root(&self.root);
        self.rt.block_on(async {
            let mut sub = Subscription::<Event>::connect(&dirs, agent);
            let deadline = tokio::time::Instant::now() + EVENT_DEADLINE;
            while !(sub.is_synchronized() && sub.is_empty()) {
                let next = tokio::time::timeout_at(deadline, sub.next()).await;
                assert!(next.is_ok(), "{agent} still holds {} events", sub.len());
            }
        });
    }

    /// Every event in eventd's journal (eventd must not be running).
    fn journal(&self) -> Vec<EventRecord> {
        common::journalled(&self.root)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agents.stop_all();
        common::unmount_under(&self.root);
    }
}

/// The value of field `key` of `e` (the test fails if it has none).
#[track_caller]
fn field<'a>(e: &'a StoredEvent, key: &str) -> &'a str {
    e.fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no field {key} in {e:?}"))
}

fn has(e: &StoredEvent, key: &str, value: &str) -> bool {
    e.fields.iter().any(|(k, v)| k == key && v == value)
}

/// A good module: `module.active` from modulemgr and `stack.switched` from mountmgr, with the
/// image's digest and the stack's generation; a restart of modulemgr brings it back Active
/// without raising it again.
#[test]
fn a_good_module_is_active_and_its_stack_switched() {
    if !can_run() {
        return;
    }
    let mut node = Node::new();
    let (reference, built) = node.publish("good", &node.key, None);
    node.attach("good", &reference, 10);

    let active = node.wait_event("module.active", |e| has(e, "module", "good"));
    assert_eq!(active.agent, "modulemgr");
    assert_eq!(active.severity, Severity::Info);
    assert!(!active.node_id.is_empty());
    assert_eq!(field(&active, "digest"), built.image_digest);
    assert_eq!(field(&active, "reference"), reference);
    assert_eq!(field(&active, "version"), "1");
    let generation = field(&active, "generation");

    let switched = node.wait_event("stack.switched", |e| has(e, "generation", generation));
    assert_eq!(switched.agent, "mountmgr");
    assert_eq!(switched.severity, Severity::Info);
    assert_eq!(switched.node_id, active.node_id);
    assert_eq!(field(&switched, "target"), "modules");
    assert_eq!(field(&switched, "layers"), "good");
    assert_eq!(field(&switched, "digests"), built.image_digest);
    assert_eq!(field(&switched, "slot"), "A");

    // modulemgr killed and restarted: the module is Active again ("module active" logged
    // once more, after any raise), and nothing new is raised for it.
    let lines = |node: &Node| node.log("modulemgr").matches("module active").count();
    let before = lines(&node);
    node.kill9("modulemgr");
    node.start("modulemgr", "");
    let deadline = Instant::now() + EVENT_DEADLINE;
    while lines(&node) == before {
        assert!(Instant::now() < deadline, "{}", node.log("modulemgr"));
        std::thread::sleep(Duration::from_millis(50));
    }
    node.journalled("modulemgr");
    node.kill9("eventd");
    let journal = node.journal();
    let raised = |kind: &str| {
        journal
            .iter()
            .filter(|e| e.agent == "modulemgr" && e.kind == kind)
            .count()
    };
    assert_eq!(raised("agent.started"), 2, "both starts are journalled");
    assert_eq!(raised("module.active"), 1, "{journal:#?}");
}

/// A module signed by a key the trust policy does not name: `module.rejected` from the
/// verifier, with its reason. A module whose image was tampered with in the registry:
/// `module.download_failed` from modulemgr (the download's digest check catches it before the
/// verifier sees it).
#[test]
fn a_rejected_module_and_a_tampered_one_raise_errors() {
    if !can_run() {
        return;
    }
    let node = Node::new();
    let untrusted = SigningKey::generate().unwrap();
    let (reference, built) = node.publish("wrongkey", &untrusted, None);
    node.attach("wrongkey", &reference, 10);
    let rejected = node.wait_event("module.rejected", |e| has(e, "module", "wrongkey"));
    assert_eq!(rejected.agent, "verifier");
    assert_eq!(rejected.severity, Severity::Error);
    assert_eq!(field(&rejected, "digest"), built.image_digest);
    assert!(
        field(&rejected, "reason").starts_with("signature"),
        "{rejected:?}"
    );
    assert!(rejected.message.contains("wrongkey"), "{rejected:?}");
    assert_eq!(field(&rejected, "trust_policy"), "default");
    assert!(reference.starts_with(field(&rejected, "repository")));

    let (reference, built) = node.publish("tampered", &node.key, None);
    let blob = node
        .registry
        .blob_file(built.image_digest.strip_prefix("sha256:").unwrap());
    let mut data = fs::read(&blob).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    fs::write(&blob, data).unwrap();
    node.attach("tampered", &reference, 20);
    let failed = node.wait_event("module.download_failed", |e| has(e, "module", "tampered"));
    assert_eq!(failed.agent, "modulemgr");
    assert_eq!(failed.severity, Severity::Error);
    assert_eq!(field(&failed, "reference"), reference);
    assert!(field(&failed, "error").contains("digest"), "{failed:?}");
    assert!(
        node.events("module.active").is_empty(),
        "neither module may become active"
    );
}

/// The registry stopped: `module.download_failing` at the first failed attempt and at the
/// fourth, not at every retry; started again: `module.download_recovered` with the count,
/// then `module.active`.
#[test]
fn a_stopped_registry_raises_download_failing_then_recovered() {
    if !can_run() {
        return;
    }
    let mut node = Node::new();
    let (reference, _) = node.publish("app", &node.key, None);
    node.registry.stop();
    node.attach("app", &reference, 10);

    let first = node.wait_event("module.download_failing", |e| has(e, "module", "app"));
    assert_eq!(first.agent, "modulemgr");
    assert_eq!(first.severity, Severity::Warning);
    assert_eq!(field(&first, "attempt"), "1");
    assert_eq!(field(&first, "reference"), reference);
    assert_eq!(field(&first, "retry_in_ms"), "500");
    assert!(!field(&first, "error").is_empty());
    node.wait_event("module.download_failing", |e| has(e, "attempt", "4"));

    node.registry.resume().unwrap();
    let recovered = node.wait_event("module.download_recovered", |e| has(e, "module", "app"));
    assert_eq!(recovered.severity, Severity::Info);
    let failed: u32 = field(&recovered, "failed_attempts").parse().unwrap();
    assert!(failed >= 4, "{recovered:?}");
    assert!(field(&recovered, "failing_for_ms").parse::<u64>().unwrap() >= 1000);
    node.wait_event("module.active", |e| has(e, "module", "app"));

    let attempts: Vec<u32> = node
        .events("module.download_failing")
        .iter()
        .map(|e| field(e, "attempt").parse().unwrap())
        .collect();
    assert_eq!(attempts[..2], [1, 4], "raised at growing intervals");
    assert!(
        attempts.iter().all(|a| [1, 4, 16].contains(a)),
        "{attempts:?}"
    );
    assert!(attempts.len() < failed as usize, "not one per retry");
}

/// A module whose health check fails in the new stack: `stack.health_check_failed` from
/// mountmgr with the check, its output and the generation that stays; that stack is never
/// switched to.
#[test]
fn a_failing_health_check_refuses_the_switch() {
    if !can_run() {
        return;
    }
    let node = Node::new();
    let (reference, _) = node.publish("good", &node.key, None);
    node.attach("good", &reference, 10);
    let active = node.wait_event("module.active", |e| has(e, "module", "good"));
    let good_generation = field(&active, "generation").to_owned();

    let check = ["/bin/sh", "-c", "echo self-test failed >&2; exit 3"];
    let (reference, built) = node.publish("checked", &node.key, Some(&check));
    node.attach("checked", &reference, 20);
    let refused = node.wait_event("stack.health_check_failed", |e| has(e, "module", "checked"));
    assert_eq!(refused.agent, "mountmgr");
    assert_eq!(refused.severity, Severity::Error);
    assert_eq!(field(&refused, "check"), check.join(" "));
    assert_eq!(field(&refused, "output"), "self-test failed");
    assert!(
        field(&refused, "reason").contains("exited with status 3"),
        "{refused:?}"
    );
    assert_eq!(field(&refused, "digest"), built.image_digest);
    assert_eq!(field(&refused, "active_generation"), good_generation);
    assert_ne!(field(&refused, "generation"), good_generation);
    let refused_generation = field(&refused, "generation");
    assert!(
        !node
            .events("stack.switched")
            .iter()
            .any(|e| has(e, "generation", refused_generation)),
        "the refused stack was switched to"
    );
}

/// A module whose health check passes at its switch and fails a few seconds later, inside
/// mountmgr's confirmation window: `stack.rolled_back` with the check and the generation
/// active again; modulemgr marks the module Failed with the reason and keeps it out: the next
/// stack (another module attached) is built without it, and it comes back only when its
/// assignment changes (another reference).
#[test]
fn a_module_failing_its_check_after_the_switch_is_rolled_back_and_kept_out() {
    if !can_run() {
        return;
    }
    let mut node = Node::new();
    // A short window, read by mountmgr at its start.
    node.kill9("mountmgr");
    fs::write(
        node.root.join("etc/powernode/agent.toml.d/mounts.toml"),
        "[mounts]\nconfirm_window_s = 30\nconfirm_interval_s = 1\n",
    )
    .unwrap();
    node.start("mountmgr", "");
    let (reference, _) = node.publish("good", &node.key, None);
    node.attach("good", &reference, 10);
    let active = node.wait_event("module.active", |e| has(e, "module", "good"));
    let good_generation = field(&active, "generation").to_owned();

    let broken = node.root.join("broken");
    let check = format!("test ! -e {}", broken.display());
    let (reference, built) =
        node.publish("flaky", &node.key, Some(&["/bin/sh", "-c", check.as_str()]));
    node.attach("flaky", &reference, 20);
    let switched = node.wait_event("stack.switched", |e| field(e, "layers").contains("flaky"));
    let flaky_generation = field(&switched, "generation").to_owned();
    node.wait_event("module.active", |e| has(e, "module", "flaky"));
    std::thread::sleep(Duration::from_secs(2));
    fs::write(&broken, b"").unwrap();

    let rolled = node.wait_event("stack.rolled_back", |e| has(e, "module", "flaky"));
    assert_eq!(rolled.agent, "mountmgr");
    assert_eq!(rolled.severity, Severity::Error);
    assert_eq!(field(&rolled, "generation"), flaky_generation);
    assert_eq!(field(&rolled, "active_generation"), good_generation);
    assert_eq!(field(&rolled, "digest"), built.image_digest);
    assert_eq!(field(&rolled, "check"), format!("/bin/sh -c {check}"));
    let dirs = Dirs::under_root(&node.root);
    let failed = node.rt.block_on(async {
        let mut sub = Subscription::<ModuleStatus>::connect(&dirs, "modulemgr");
        let deadline = tokio::time::Instant::now() + EVENT_DEADLINE;
        loop {
            if let Some(s) = sub.get("flaky").filter(|s| s.state == ModuleState::Failed) {
                return s.clone();
            }
            let next = tokio::time::timeout_at(deadline, sub.next()).await;
            assert!(next.is_ok(), "flaky not Failed: {:?}", sub.get("flaky"));
        }
    });
    let error = failed.error.unwrap_or_default();
    assert!(error.contains("confirmation window"), "{error}");

    // Kept out: the next stack (another module) is built without it, although its check
    // would pass again now.
    fs::remove_file(&broken).unwrap();
    let (reference, _) = node.publish("other", &node.key, None);
    node.attach("other", &reference, 30);
    let next = node.wait_event("stack.switched", |e| field(e, "layers").contains("other"));
    assert_eq!(field(&next, "layers"), "good,other", "{next:?}");
    node.wait_event("module.active", |e| has(e, "module", "other"));
    let with_flaky = node
        .events("stack.switched")
        .into_iter()
        .filter(|e| field(e, "layers").contains("flaky"))
        .count();
    assert_eq!(with_flaky, 1, "flaky was stacked again");
    assert!(node.events("stack.health_check_failed").is_empty());

    // Its assignment changes (another reference): it is fetched and stacked again.
    let (reference, _) = node.publish("steady", &node.key, None);
    node.attach("flaky", &reference, 20);
    let back = node.wait_event("stack.switched", |e| {
        field(e, "layers") == "good,flaky,other"
    });
    assert_ne!(field(&back, "generation"), flaky_generation);
}

/// mountmgr killed with SIGKILL in the middle of a switch (after `current` moved, before the
/// result was recorded) and restarted: `stack.recovered`, a Warning saying which switch was
/// cut short and what was adopted. The restart before it, outside any switch, raised an Info
/// one.
#[test]
fn mountmgr_killed_mid_switch_reports_its_recovery() {
    use std::os::unix::process::ExitStatusExt;
    if !can_run() {
        return;
    }
    let mut node = Node::new();
    let (reference, _) = node.publish("low", &node.key, None);
    node.attach("low", &reference, 10);
    let active = node.wait_event("module.active", |e| has(e, "module", "low"));
    let first: u64 = field(&active, "generation").parse().unwrap();

    node.kill9("mountmgr");
    node.start("mountmgr", "mountmgr.switched");
    let steady = node.wait_event("stack.recovered", |e| has(e, "interrupted_switch", "false"));
    assert_eq!(steady.severity, Severity::Info);
    assert_eq!(field(&steady, "decision"), "adopt");
    assert_eq!(field(&steady, "generation"), first.to_string());

    let (reference, _) = node.publish("high", &node.key, None);
    node.attach("high", &reference, 20);
    let exit = node.wait_exit("mountmgr");
    assert_eq!(exit.signal(), Some(9), "{exit}");
    assert!(node
        .log("mountmgr")
        .contains("failpoint mountmgr.switched hit"));

    node.start("mountmgr", "");
    let recovered = node.wait_event("stack.recovered", |e| has(e, "interrupted_switch", "true"));
    assert_eq!(recovered.agent, "mountmgr");
    assert_eq!(recovered.severity, Severity::Warning);
    assert_eq!(field(&recovered, "target"), "modules");
    assert_eq!(field(&recovered, "decision"), "adopt");
    let second = first + 1;
    assert_eq!(field(&recovered, "generation"), second.to_string());
    assert_eq!(field(&recovered, "slot"), "B");
    assert_eq!(
        field(&recovered, "found"),
        format!(
            "record: generation {first} in slot A, switching to generation {second} in slot B; current: B"
        )
    );
    assert!(
        field(&recovered, "done").contains("had moved current"),
        "{recovered:?}"
    );
    // The adopted stack is the one modulemgr asked for: its new module is active.
    node.wait_event("module.active", |e| has(e, "module", "high"));
}
