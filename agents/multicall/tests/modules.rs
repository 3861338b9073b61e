//! Modules end to end on one node, with real parts only: the `docker-registry` server on
//! loopback, modules built by `mkfs.erofs`, signed in cosign's format, and the real
//! modulemgr, verifier and mountmgr processes mounting real erofs and overlayfs.
//!
//! Needs root (mounts), `docker-registry` and `mkfs.erofs`; each test says so and skips when
//! one is missing, and fails instead under `CI=true`. CI runs as root with both installed.

mod common;

use common::agents::Agents;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bin;
use powernode_modules::cosign::SigningKey;
use powernode_modules::format::host_architecture;
use powernode_modules::package::{self, BuildOptions, Built};
use powernode_modules::registry::{Credential, Registry, RegistryConfig};
use powernode_modules::testing::{TestRegistry, REGISTRY_BIN};
use powernode_pubsub::testing::require;
use powernode_pubsub::{Dirs, Subscription};
use powernode_types::{ModuleState, ModuleStatus, MountState, MountStatus, Topic};

/// The mount target modulemgr stacks at (settings default).
const TARGET: &str = "modules";

/// What these tests need of the machine ([`require`]: a skip, or a failure under `CI=true`).
fn can_run() -> bool {
    require(&["root", REGISTRY_BIN, "mkfs.erofs"])
}

/// A node: a root directory with settings and a trust policy, the three module agents, and a
/// registry.
struct Node {
    dir: tempfile::TempDir,
    registry: TestRegistry,
    key: SigningKey,
    agents: Agents,
    rt: tokio::runtime::Runtime,
    /// The registry's password for user `node`, if it wants one.
    password: Option<String>,
}

impl Node {
    fn new(require_signature: bool) -> Node {
        Node::with_registry_password(require_signature, None)
    }

    /// A node whose registry wants user `node` and `password`: the agents read it from the
    /// settings' password file.
    fn with_registry_password(require_signature: bool, password: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let registry = match password {
            None => TestRegistry::start(&dir.path().join("registry")),
            Some(p) => TestRegistry::start_with_password(&dir.path().join("registry"), "node", p),
        }
        .unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc/powernode/trust")).unwrap();
        let mut settings = format!(
            "[modules]\nplain_http = [\"{}\"]\nmax_backoff_s = 2\n",
            registry.host
        );
        if let Some(password) = password {
            fs::write(
                root.join("etc/powernode/registry.pass"),
                format!("{password}\n"),
            )
            .unwrap();
            settings.push_str(&format!(
                "[[modules.credentials]]\nregistry = \"{}\"\nusername = \"node\"\npassword_file = \"etc/powernode/registry.pass\"\n",
                registry.host
            ));
        }
        fs::write(root.join("etc/powernode/agent.toml"), settings).unwrap();
        let key = SigningKey::generate().unwrap();
        fs::write(
            root.join("etc/powernode/trust/cosign.pub"),
            key.public_key_pem(),
        )
        .unwrap();
        fs::write(
            root.join("etc/powernode/trust/default.toml"),
            format!("require_signature = {require_signature}\nkeys = [\"cosign.pub\"]\n"),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut node = Node {
            dir,
            registry,
            key,
            agents: Agents::default(),
            rt,
            password: password.map(str::to_owned),
        };
        for agent in ["verifier", "mountmgr", "modulemgr"] {
            node.start(agent);
        }
        node
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn registry_client(&self) -> Registry {
        Registry::new(RegistryConfig {
            plain_http: vec![self.registry.host.clone()],
            credentials: self
                .password
                .iter()
                .map(|password| Credential {
                    registry: self.registry.host.clone(),
                    username: "node".into(),
                    password: password.clone(),
                })
                .collect(),
            ..RegistryConfig::default()
        })
    }

    fn start(&mut self, agent: &str) {
        self.start_armed(agent, "");
    }

    /// Starts `agent` with the named crash points `failpoints` armed.
    fn start_armed(&mut self, agent: &str, failpoints: &str) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{agent}.log")))
            .unwrap();
        let child = Command::new(bin())
            .args(["run", agent, "--root"])
            .arg(self.root())
            .env("RUST_LOG", "info")
            .env("POWERNODE_FAILPOINTS", failpoints)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.add(agent, child);
    }

    /// SIGKILL to the agent's PID.
    fn kill9(&mut self, agent: &str) {
        self.agents.kill9(agent);
    }

    /// Waits (60 s at most) for `agent` to end by itself; its exit status.
    fn wait_exit(&mut self, agent: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.agents.try_exited(agent) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{agent} did not end:\n{}",
                self.log(agent)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self, agent: &str) -> String {
        fs::read_to_string(self.dir.path().join(format!("{agent}.log"))).unwrap_or_default()
    }

    /// Builds module `name` from `files`, pushes it as `modules/<name>:<version>` and, if
    /// `sign`, signs it with the node's trusted key. Returns the reference.
    fn publish(&self, name: &str, files: &[(&str, &[u8])], options: Publish) -> String {
        let built = self.build(name, files, &options);
        if let Some(edit) = options.edit_manifest {
            let text = fs::read_to_string(&built.manifest).unwrap();
            fs::write(&built.manifest, edit(&text)).unwrap();
        }
        let built = package::load_built(&built.manifest).unwrap();
        let repository = format!("{}/modules/{name}", self.registry.host);
        let registry = self.registry_client();
        self.rt
            .block_on(package::push(&registry, &repository, "1", &[built]))
            .unwrap();
        let reference = format!("{repository}:1");
        match options.signer {
            Signer::Trusted => {
                self.rt
                    .block_on(package::sign(&registry, &reference, &self.key))
                    .unwrap();
            }
            Signer::Other => {
                let other = SigningKey::generate().unwrap();
                self.rt
                    .block_on(package::sign(&registry, &reference, &other))
                    .unwrap();
            }
            Signer::None => {}
        }
        reference
    }

    fn build(&self, name: &str, files: &[(&str, &[u8])], options: &Publish) -> Built {
        let src = self.dir.path().join("src").join(name);
        for (path, data) in files {
            let path = src.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }
        package::build(
            &src,
            &BuildOptions {
                name: name.to_owned(),
                version: "1".to_owned(),
                priority: 50,
                architecture: options
                    .architecture
                    .unwrap_or(host_architecture())
                    .to_owned(),
                dependencies: options.dependencies.iter().map(|d| d.to_string()).collect(),
                services: Vec::new(),
                health_check: None,
            },
            &self.dir.path().join("out"),
        )
        .unwrap()
    }

    fn attach(&self, name: &str, reference: &str, priority: u32) {
        let out = Command::new(bin())
            .arg("--root")
            .arg(self.root())
            .args(["attach", reference, "--name", name, "--no-wait"])
            .args(["--priority", &priority.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    fn detach(&self, name: &str) {
        let out = Command::new(bin())
            .arg("--root")
            .arg(self.root())
            .args(["detach", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    /// Waits (60 s at most) until item `key` of `agent`'s topic `T` satisfies `done`; on
    /// timeout, panics with the last item and `logs`.
    fn wait_item<T: Topic + Clone + std::fmt::Debug>(
        &self,
        agent: &str,
        key: &str,
        done: impl Fn(&T) -> bool,
        logs: &[&str],
    ) -> T {
        let dirs = Dirs::under_root(self.root());
        self.rt.block_on(async {
            let mut sub = Subscription::<T>::connect(&dirs, agent);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(item) = sub.get(key).filter(|item| done(item)) {
                    return item.clone();
                }
                if tokio::time::timeout_at(deadline, sub.next()).await.is_err() {
                    let logs: Vec<String> = logs
                        .iter()
                        .map(|a| format!("{a} log:\n{}", self.log(a)))
                        .collect();
                    panic!("{key}: last {:?}\n{}", sub.get(key), logs.join("\n"));
                }
            }
        })
    }

    /// Waits until module `name`'s status satisfies `done`.
    fn wait_module(&self, name: &str, done: impl Fn(&ModuleStatus) -> bool) -> ModuleStatus {
        self.wait_item(
            "modulemgr",
            name,
            done,
            &["modulemgr", "verifier", "mountmgr"],
        )
    }

    fn wait_active(&self, name: &str) -> ModuleStatus {
        self.wait_module(name, |s| {
            assert_ne!(s.state, ModuleState::Failed, "{s:?}");
            s.state == ModuleState::Active
        })
    }

    fn wait_failed(&self, name: &str) -> ModuleStatus {
        self.wait_module(name, |s| {
            assert_ne!(s.state, ModuleState::Active, "{s:?}");
            s.state == ModuleState::Failed
        })
    }

    /// Waits until the mount status satisfies `done`.
    fn wait_mount(&self, done: impl Fn(&MountStatus) -> bool) -> MountStatus {
        self.wait_item("mountmgr", TARGET, done, &["mountmgr"])
    }

    /// Where a file is seen through the union.
    fn union_file_path(&self, path: &str) -> PathBuf {
        self.root()
            .join("run/powernode-mounts")
            .join(TARGET)
            .join("current")
            .join(path)
    }

    /// A file as seen through the union.
    fn union_file(&self, path: &str) -> Option<String> {
        fs::read_to_string(self.union_file_path(path)).ok()
    }

    /// Mount points under the node's root.
    fn mounts(&self) -> Vec<String> {
        common::mounts_under(&self.root())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agents.stop_all();
        common::unmount_under(&self.root());
    }
}

/// Polls `done` every 50 ms for up to `timeout_s` seconds; panics with `why()` if it never
/// holds.
fn wait_until(timeout_s: u64, mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    while !done() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Signer {
    Trusted,
    Other,
    None,
}

struct Publish {
    signer: Signer,
    architecture: Option<&'static str>,
    edit_manifest: Option<fn(&str) -> String>,
    dependencies: &'static [&'static str],
}

impl Default for Publish {
    fn default() -> Self {
        Publish {
            signer: Signer::Trusted,
            architecture: None,
            edit_manifest: None,
            dependencies: &[],
        }
    }
}

#[test]
fn two_modules_stack_by_priority_and_switch() {
    if !can_run() {
        return;
    }
    let node = Node::new(true);
    let base = node.publish(
        "base",
        &[("etc/base.txt", b"base"), ("shared.txt", b"from base")],
        Publish::default(),
    );
    let tools = node.publish(
        "tools",
        &[("bin/tool.txt", b"tool"), ("shared.txt", b"from tools")],
        Publish::default(),
    );
    node.attach("base", &base, 10);
    node.attach("tools", &tools, 20);
    let b = node.wait_active("base");
    let t = node.wait_active("tools");
    let mount = node.wait_mount(|m| {
        m.state == MountState::Mounted
            && m.layers.len() == 2
            && m.layers.contains(b.digest.as_ref().unwrap())
    });
    assert_eq!(
        mount.layers,
        vec![b.digest.clone().unwrap(), t.digest.clone().unwrap()],
        "bottom first"
    );
    assert_eq!(node.union_file("etc/base.txt").as_deref(), Some("base"));
    assert_eq!(node.union_file("bin/tool.txt").as_deref(), Some("tool"));
    assert_eq!(node.union_file("shared.txt").as_deref(), Some("from tools"));
    let first_slot = mount.slot;

    // base above tools now: a new stack in the other slot.
    node.attach("base", &base, 30);
    let mount = node
        .wait_mount(|m| m.state == MountState::Mounted && m.layers.first() == t.digest.as_ref());
    assert_ne!(
        mount.slot, first_slot,
        "the new stack is built in the other slot"
    );
    assert_eq!(node.union_file("shared.txt").as_deref(), Some("from base"));

    // tools removed: another switch, its files gone.
    node.detach("tools");
    let mount = node.wait_mount(|m| m.state == MountState::Mounted && m.layers.len() == 1);
    assert_eq!(mount.layers, vec![b.digest.clone().unwrap()]);
    assert_eq!(node.union_file("bin/tool.txt"), None);
    assert_eq!(node.union_file("etc/base.txt").as_deref(), Some("base"));

    // modulemgr killed and restarted: it re-fetches (from its store), re-verifies and finds
    // the stack already mounted: base is Active again, with no new stack and no new mount.
    let mut node = node;
    let mounts_before = node.mounts().len();
    let active_lines = |node: &Node| node.log("modulemgr").matches("module active").count();
    let before = active_lines(&node);
    node.kill9("modulemgr");
    node.start("modulemgr");
    wait_until(
        60,
        || active_lines(&node) != before,
        || node.log("modulemgr"),
    );
    node.wait_active("base");
    let after = node.wait_mount(|m| m.state == MountState::Mounted);
    assert_eq!(
        after.generation, mount.generation,
        "no new stack after a restart"
    );
    assert_eq!(node.mounts().len(), mounts_before, "nothing mounted twice");
}

#[test]
fn bad_modules_are_never_mounted() {
    if !can_run() {
        return;
    }
    let node = Node::new(true);
    let good = node.publish("good", &[("good.txt", b"good")], Publish::default());
    node.attach("good", &good, 10);
    node.wait_active("good");

    let other_arch = if host_architecture() == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let cases: Vec<(&str, Publish, &str)> = vec![
        (
            "wrongkey",
            Publish {
                signer: Signer::Other,
                ..Publish::default()
            },
            "signature",
        ),
        (
            "unsigned",
            Publish {
                signer: Signer::None,
                ..Publish::default()
            },
            "no signatures",
        ),
        (
            "badverity",
            Publish {
                edit_manifest: Some(|text| {
                    let v: serde_json::Value = serde_json::from_str(text).unwrap();
                    let old = v["annotations"][powernode_modules::format::FSVERITY_ANNOTATION]
                        .as_str()
                        .unwrap()
                        .to_owned();
                    text.replace(&old, &format!("sha256:{}", "0".repeat(64)))
                }),
                ..Publish::default()
            },
            "fs-verity digest mismatch",
        ),
        (
            "otherarch",
            Publish {
                architecture: Some(other_arch),
                ..Publish::default()
            },
            "no manifest for architecture",
        ),
    ];
    for (name, options, reason) in cases {
        let reference = node.publish(name, &[("x.txt", name.as_bytes())], options);
        node.attach(name, &reference, 20);
        let status = node.wait_failed(name);
        let error = status.error.unwrap_or_default();
        assert!(
            error.contains(reason),
            "{name}: {error:?} should say {reason:?}"
        );
    }

    // A blob tampered with in the registry's storage.
    let reference = node.publish("tampered", &[("t.txt", b"tampered")], Publish::default());
    let built = node.build("tampered", &[("t.txt", b"tampered")], &Publish::default());
    let blob = node
        .registry
        .blob_file(built.image_digest.strip_prefix("sha256:").unwrap());
    let mut data = fs::read(&blob).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    fs::write(&blob, data).unwrap();
    node.attach("tampered", &reference, 20);
    let status = node.wait_failed("tampered");
    assert!(
        status.error.as_deref().unwrap_or("").contains("digest"),
        "{status:?}"
    );

    // Through all of it the good stack stayed, and nothing bad was ever mounted.
    let mount = node.wait_mount(|m| m.state == MountState::Mounted);
    assert_eq!(mount.layers.len(), 1, "{mount:?}");
    assert_eq!(node.union_file("good.txt").as_deref(), Some("good"));
    assert_eq!(node.union_file("x.txt"), None);
    assert_eq!(node.union_file("t.txt"), None);
}

#[test]
fn download_resumes_after_kill9_and_registry_outage_is_retried() {
    if !can_run() {
        return;
    }
    let mut node = Node::new(true);
    // Random bytes do not compress: the image is as big as the file.
    let mut big = vec![0u8; 96 << 20];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut big).unwrap();
    let reference = node.publish("big", &[("big.bin", &big)], Publish::default());
    drop(big);

    // kill -9 modulemgr once part of the image is in the store.
    node.attach("big", &reference, 10);
    let store = node.root().join("persist/powernode/store/sha256");
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        let found = fs::read_dir(&store).ok().and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "partial"))
        });
        if let Some(p) = found.filter(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0)) {
            break p;
        }
        assert!(Instant::now() < deadline, "no partial download appeared");
        std::thread::sleep(Duration::from_micros(200));
    };
    node.kill9("modulemgr");
    let kept = fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    assert!(kept > 0, "the partial download survives the kill");

    // Registry down: modulemgr comes back, retries with backoff and says so.
    node.registry.stop();
    node.start("modulemgr");
    let status = node.wait_module("big", |s| {
        s.error.as_deref().is_some_and(|e| e.contains("retrying"))
    });
    assert_ne!(status.state, ModuleState::Failed);
    node.registry.resume().unwrap();
    let status = node.wait_active("big");
    assert_eq!(status.bytes_done, status.bytes_total.unwrap());
    assert!(
        node.log("modulemgr")
            .contains("resuming download at the end of the partial file"),
        "the download resumed at the partial file's end:\n{}",
        node.log("modulemgr")
    );
    assert_eq!(
        fs::read(node.union_file_path("big.bin")).unwrap().len(),
        96 << 20
    );
}

#[test]
fn a_damaged_stored_image_is_downloaded_again() {
    if !can_run() {
        return;
    }
    let node = Node::new(true);
    let files: &[(&str, &[u8])] = &[("m.txt", b"intact")];
    let reference = node.publish("mod", files, Publish::default());
    let built = node.build("mod", files, &Publish::default());
    // What a power cut between the store's rename and its sync, or a failing disk, can leave:
    // the blob under its name, the right length, one byte changed.
    let store = node.root().join("persist/powernode/store/sha256");
    fs::create_dir_all(&store).unwrap();
    let blob = store.join(built.image_digest.strip_prefix("sha256:").unwrap());
    let mut damaged = fs::read(&built.image).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x01;
    fs::write(&blob, damaged).unwrap();

    node.attach("mod", &reference, 10);
    node.wait_active("mod");
    assert_eq!(node.union_file("m.txt").as_deref(), Some("intact"));
    // The verifier does not hash the image with SHA-256 again: its fs-verity digest is what
    // finds the changed byte.
    assert!(
        node.log("verifier").contains("fs-verity digest mismatch"),
        "{}",
        node.log("verifier")
    );
    assert!(
        node.log("modulemgr").contains("downloading it again"),
        "{}",
        node.log("modulemgr")
    );
    assert_eq!(
        powernode_modules::digest::Digest::of(&fs::read(&blob).unwrap()).to_string(),
        built.image_digest
    );
}

#[test]
fn an_offline_restart_keeps_its_modules_and_follows_a_moved_tag_later() {
    if !can_run() {
        return;
    }
    let mut node = Node::new(true);
    let reference = node.publish("app", &[("app.txt", b"v1")], Publish::default());
    node.attach("app", &reference, 10);
    node.wait_active("app");

    // The node goes down; meanwhile the tag is moved to a new version, and the node comes back
    // without its registry.
    for agent in ["modulemgr", "verifier", "mountmgr"] {
        node.kill9(agent);
    }
    node.publish("app", &[("app.txt", b"v2")], Publish::default());
    node.registry.stop();
    for agent in ["verifier", "mountmgr", "modulemgr"] {
        node.start(agent);
    }
    wait_until(
        30,
        || {
            node.log("modulemgr")
                .contains("going on with the module as last resolved")
        },
        || {
            format!(
                "modulemgr did not go on offline:\n{}",
                node.log("modulemgr")
            )
        },
    );
    node.wait_active("app");
    assert_eq!(node.union_file("app.txt").as_deref(), Some("v1"));

    // The registry is back: the node finds the tag moved and follows it.
    node.registry.resume().unwrap();
    wait_until(
        60,
        || node.union_file("app.txt").as_deref() == Some("v2"),
        || format!("the moved tag was not followed:\n{}", node.log("modulemgr")),
    );
    node.wait_active("app");
}

#[test]
fn a_trust_policy_edit_checks_the_modules_again() {
    if !can_run() {
        return;
    }
    let node = Node::new(true);
    let good = node.publish("good", &[("good.txt", b"good")], Publish::default());
    node.attach("good", &good, 10);
    node.wait_active("good");
    let unsigned = Publish {
        signer: Signer::None,
        ..Publish::default()
    };
    let reference = node.publish("unsigned", &[("u.txt", b"unsigned")], unsigned);
    node.attach("unsigned", &reference, 20);
    let status = node.wait_failed("unsigned");
    assert!(status.error.unwrap_or_default().contains("no signatures"));

    let policy = node.root().join("etc/powernode/trust/default.toml");
    let write_policy = |require: bool| {
        fs::write(
            &policy,
            format!("require_signature = {require}\nkeys = [\"cosign.pub\"]\n"),
        )
        .unwrap()
    };
    // Signatures are no longer required: the unsigned module comes in.
    write_policy(false);
    node.wait_module("unsigned", |s| s.state == ModuleState::Active);
    assert_eq!(node.union_file("u.txt").as_deref(), Some("unsigned"));

    // Required again: it leaves the stack, the signed one stays.
    write_policy(true);
    let status = node.wait_module("unsigned", |s| s.state == ModuleState::Failed);
    assert!(status.error.unwrap_or_default().contains("no signatures"));
    wait_until(
        30,
        || node.union_file("u.txt").is_none(),
        || "the rejected module stayed stacked".into(),
    );
    assert_eq!(node.union_file("good.txt").as_deref(), Some("good"));
    node.wait_active("good");
}

#[test]
fn a_module_is_stacked_only_with_its_dependencies() {
    if !can_run() {
        return;
    }
    let node = Node::new(true);
    let needs_base = Publish {
        dependencies: &["base"],
        ..Publish::default()
    };
    let app = node.publish("app", &[("app.txt", b"app")], needs_base);
    node.attach("app", &app, 20);
    let status = node.wait_module("app", |s| s.error.is_some());
    assert_eq!(status.state, ModuleState::Mounting, "{status:?}");
    assert!(
        status
            .error
            .unwrap()
            .contains("depends on module base, which is not assigned"),
        "{}",
        node.log("modulemgr")
    );
    assert_eq!(node.union_file("app.txt"), None);

    let base = node.publish("base", &[("base.txt", b"base")], Publish::default());
    node.attach("base", &base, 10);
    node.wait_active("base");
    node.wait_active("app");
    assert_eq!(node.union_file("app.txt").as_deref(), Some("app"));
    assert_eq!(node.union_file("base.txt").as_deref(), Some("base"));

    // Without its dependency the module leaves the stack too, and waits.
    node.detach("base");
    let status = node.wait_module("app", |s| s.state == ModuleState::Mounting);
    assert!(status.error.unwrap_or_default().contains("base"));
    wait_until(
        30,
        || node.union_file("app.txt").is_none(),
        || "app stayed stacked without base".into(),
    );
}

#[test]
fn a_registry_password_comes_from_the_settings() {
    if !can_run() {
        return;
    }
    if !require(&["htpasswd"]) {
        return;
    }
    let node = Node::with_registry_password(true, Some("s3cret"));
    let reference = node.publish("private", &[("p.txt", b"private")], Publish::default());
    node.attach("private", &reference, 10);
    node.wait_active("private");
    assert_eq!(node.union_file("p.txt").as_deref(), Some("private"));
}

#[test]
fn an_upgrade_waiting_for_a_dependency_keeps_the_old_version() {
    if !can_run() {
        return;
    }
    let node = Node::new(true);
    let v1 = node.publish("tool", &[("tool.txt", b"v1")], Publish::default());
    node.attach("tool", &v1, 20);
    node.wait_active("tool");

    // The new version needs a module the node does not have yet.
    let needs_base = Publish {
        dependencies: &["base"],
        ..Publish::default()
    };
    let v2 = node.publish("tool2", &[("tool.txt", b"v2")], needs_base);
    node.attach("tool", &v2, 20);
    let status = node.wait_module("tool", |s| {
        s.state == ModuleState::Mounting && s.error.is_some()
    });
    assert!(status.error.unwrap().contains("base"));
    assert_eq!(node.union_file("tool.txt").as_deref(), Some("v1"));

    let base = node.publish("base", &[("base.txt", b"base")], Publish::default());
    node.attach("base", &base, 10);
    node.wait_active("base");
    node.wait_active("tool");
    assert_eq!(node.union_file("tool.txt").as_deref(), Some("v2"));
}

/// modulemgr dies (SIGKILL, at the named crash point) right after a downloaded image is
/// renamed into the store, before it is synced or verified. Restarted, it takes the stored
/// image as it is (checked again, not trusted), and the module becomes Active, mounted once.
#[test]
fn killed_right_after_storing_an_image_modulemgr_finishes_the_module() {
    use std::os::unix::process::ExitStatusExt;
    if !can_run() {
        return;
    }
    let mut node = Node::new(true);
    node.kill9("modulemgr");
    node.start_armed("modulemgr", "store.installed");
    let reference = node.publish("app", &[("app.txt", b"stored once")], Publish::default());
    node.attach("app", &reference, 10);
    let exit = node.wait_exit("modulemgr");
    assert_eq!(exit.signal(), Some(9), "{exit}");
    assert!(node
        .log("modulemgr")
        .contains("failpoint store.installed hit"));

    node.start("modulemgr");
    node.wait_active("app");
    assert_eq!(node.union_file("app.txt").as_deref(), Some("stored once"));
    let mut mounts = node.mounts();
    let all = mounts.len();
    mounts.sort();
    mounts.dedup();
    assert_eq!(mounts.len(), all, "a mount point mounted twice: {mounts:?}");
}

/// Writes the node's trust policy `default` (the verifier checks every module again).
fn write_policy(node: &Node, text: &str) {
    fs::write(node.root().join("etc/powernode/trust/default.toml"), text).unwrap();
}

/// A test Fulcio-style PKI (root CA, intermediate, a leaf for `release@corp.example` issued
/// through `https://issuer.corp.example`) and a transparency-log key, written as an operator
/// has them: `cosign.key` (the leaf's key, sealed with `COSIGN_PASSWORD`), `leaf.pem`,
/// `chain.pem` and `log.key` in `dir`; and as a node trusts them: `fulcio-root.pem` and
/// `log.pub` in `trust`.
fn keyless_pki(dir: &std::path::Path, trust: &std::path::Path, password: &str) {
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    let ca = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - Duration::from_secs(86_400);
        params.not_after = now + Duration::from_secs(86_400);
        params
    };
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let root_params = ca("test fulcio root");
    let root = root_params.self_signed(&root_key).unwrap();
    let intermediate_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let intermediate_params = ca("test fulcio intermediate");
    let intermediate = intermediate_params
        .signed_by(
            &intermediate_key,
            &Issuer::from_params(&root_params, &root_key),
        )
        .unwrap();

    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::Rfc822Name(
        "release@corp.example".try_into().unwrap(),
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    // Fulcio's OIDC issuer extension (v2: a DER UTF8String).
    let issuer = b"https://issuer.corp.example";
    let mut value = vec![0x0c, u8::try_from(issuer.len()).unwrap()];
    value.extend_from_slice(issuer);
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 57264, 1, 8],
        value,
    )];
    // Fulcio's leaves live ten minutes.
    params.not_before = now - Duration::from_secs(60);
    params.not_after = now + Duration::from_secs(600);
    let leaf = params
        .signed_by(
            &leaf_key,
            &Issuer::from_params(&intermediate_params, &intermediate_key),
        )
        .unwrap();

    let signing = SigningKey::from_pkcs8_der(&leaf_key.serialize_der()).unwrap();
    fs::write(
        dir.join("cosign.key"),
        signing.to_cosign_pem(password.as_bytes()).unwrap(),
    )
    .unwrap();
    fs::write(dir.join("leaf.pem"), leaf.pem()).unwrap();
    fs::write(
        dir.join("chain.pem"),
        format!("{}{}", intermediate.pem(), root.pem()),
    )
    .unwrap();
    let log_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    fs::write(dir.join("log.key"), log_key.serialize_pem()).unwrap();
    let log_public = SigningKey::from_pkcs8_der(&log_key.serialize_der()).unwrap();
    fs::write(trust.join("fulcio-root.pem"), root.pem()).unwrap();
    fs::write(trust.join("log.pub"), log_public.public_key_pem()).unwrap();
}

/// A `[keyless]` policy trusting the test root and log, for `identity` through `issuer`.
fn keyless_policy(identity: &str, issuer: &str) -> String {
    format!(
        "[keyless]\nroots = [\"fulcio-root.pem\"]\nidentity = '{identity}'\nissuer = '{issuer}'\n\
         log_keys = [\"log.pub\"]\n"
    )
}

/// The module is signed the way an operator signs for keyless nodes, by
/// `powernode-controller module sign` with a key, its certificate and chain and a log key;
/// the node's modulemgr, verifier and mountmgr take it under a `[keyless]` policy, and refuse
/// it while the identity or the issuer regex names someone else.
#[test]
fn a_module_signed_with_a_certificate_is_accepted_under_a_keyless_policy() {
    if !can_run() {
        return;
    }
    const PASSWORD: &str = "keyless test";
    let node = Node::new(true);
    let keys = node.dir.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    keyless_pki(&keys, &node.root().join("etc/powernode/trust"), PASSWORD);
    // Someone else's identity first.
    write_policy(
        &node,
        &keyless_policy(r"^ops@corp\.example$", r"^https://issuer\.corp\.example$"),
    );
    let unsigned = Publish {
        signer: Signer::None,
        ..Publish::default()
    };
    let reference = node.publish("tools", &[("tools.txt", b"keyless")], unsigned);
    // The operator's command, in this process (COSIGN_PASSWORD as cosign reads it).
    std::env::set_var("COSIGN_PASSWORD", PASSWORD);
    let file = |name: &str| keys.join(name).display().to_string();
    let args = [
        "powernode-controller".to_owned(),
        "module".into(),
        "sign".into(),
        reference.clone(),
        "--key".into(),
        file("cosign.key"),
        "--certificate".into(),
        file("leaf.pem"),
        "--certificate-chain".into(),
        file("chain.pem"),
        "--log-key".into(),
        file("log.key"),
        "--plain-http".into(),
    ];
    let exit = powernode_controller::cli::main_with_args(args.map(std::ffi::OsString::from));
    assert_eq!(
        format!("{exit:?}"),
        format!("{:?}", std::process::ExitCode::SUCCESS)
    );

    node.attach("tools", &reference, 10);
    let status = node.wait_failed("tools");
    let error = status.error.unwrap_or_default();
    assert!(
        error.contains(
            r"certificate SAN release@corp.example does not match identity ^ops@corp\.example$"
        ),
        "{error}"
    );
    // The right identity through another issuer: still refused (the verifier's verdict says
    // why; modulemgr keeps the module Failed).
    write_policy(
        &node,
        &keyless_policy(r"^release@corp\.example$", r"^https://accounts\.example$"),
    );
    let verdict = node.wait_item::<powernode_types::VerifyStatus>(
        "verifier",
        "tools",
        |s| s.reason.as_deref().is_some_and(|r| r.contains("issuer")),
        &["verifier"],
    );
    assert_eq!(verdict.state, powernode_types::VerifyState::Failed);
    assert!(
        verdict.reason.as_deref().unwrap_or_default().contains(
            r"certificate OIDC issuer https://issuer.corp.example does not match issuer ^https://accounts\.example$"
        ),
        "{verdict:?}"
    );
    assert_eq!(node.wait_failed("tools").state, ModuleState::Failed);
    assert_eq!(node.union_file("tools.txt"), None);
    // Both right: stacked.
    write_policy(
        &node,
        &keyless_policy(
            r"^release@corp\.example$",
            r"^https://issuer\.corp\.example$",
        ),
    );
    node.wait_module("tools", |s| s.state == ModuleState::Active);
    assert_eq!(node.union_file("tools.txt").as_deref(), Some("keyless"));
}

/// Copies the signatures of `digests` from `from` to `to`, as `cosign copy` carries them:
/// unchanged, still naming `from`.
fn copy_signatures(node: &Node, from: &str, to: &str, digests: &[&str]) {
    use powernode_modules::digest::Digest;
    let registry = node.registry_client();
    node.rt.block_on(async {
        for digest in digests {
            let signatures = registry
                .signatures(from, &Digest::parse(digest).unwrap())
                .await
                .unwrap();
            assert!(!signatures.is_empty(), "{from}@{digest} is not signed");
            package::store_signatures(&registry, to, digest, &signatures)
                .await
                .unwrap();
        }
    });
}

/// A module mirrored with `cosign copy` semantics (signed for the origin repository, pulled
/// from the mirror) is refused until the policy lists the origin; the same registry reached
/// by another name (`localhost:PORT` for `127.0.0.1:PORT`) likewise.
#[test]
fn a_mirrored_module_is_accepted_where_the_policy_names_its_origin() {
    if !can_run() {
        return;
    }
    let mut node = Node::new(true);
    let files: &[(&str, &[u8])] = &[("tools.txt", b"mirrored")];
    let origin_reference = node.publish("tools", files, Publish::default());
    let host = node.registry.host.clone();
    let origin = format!("{host}/modules/tools");
    let mirror = format!("{host}/mirror/tools");
    // The mirror holds the same manifests and blobs (builds are reproducible) and the
    // origin's signatures.
    let built = node.build("tools", files, &Publish::default());
    let registry = node.registry_client();
    let pushed = node
        .rt
        .block_on(package::push(&registry, &mirror, "1", &[built]))
        .unwrap();
    let digests: Vec<&str> = std::iter::once(pushed.index_digest.as_str())
        .chain(pushed.manifests.values().map(String::as_str))
        .collect();
    copy_signatures(&node, &origin, &mirror, &digests);

    node.attach("tools", &format!("{mirror}:1"), 10);
    let error = node.wait_failed("tools").error.unwrap_or_default();
    assert!(
        error.contains(&format!(
            "payload names repository {origin} not {mirror}, the one it was pulled from"
        )),
        "{error}"
    );
    write_policy(
        &node,
        &format!("keys = [\"cosign.pub\"]\nsigned_references = [\"{origin}\"]\n"),
    );
    node.wait_module("tools", |s| s.state == ModuleState::Active);
    assert_eq!(node.union_file("tools.txt").as_deref(), Some("mirrored"));

    // The origin by another name of its registry.
    node.detach("tools");
    wait_until(
        30,
        || node.union_file("tools.txt").is_none(),
        || "the detached module stayed stacked".into(),
    );
    let port = host.rsplit_once(':').unwrap().1;
    let alias = format!("localhost:{port}/modules/tools");
    fs::create_dir_all(node.root().join("etc/powernode/agent.toml.d")).unwrap();
    fs::write(
        node.root().join("etc/powernode/agent.toml.d/alias.toml"),
        format!("[modules]\nplain_http = [\"{host}\", \"localhost:{port}\"]\n"),
    )
    .unwrap();
    node.kill9("modulemgr");
    node.start("modulemgr");
    write_policy(&node, "keys = [\"cosign.pub\"]\n");
    node.attach("alias", &format!("{alias}:1"), 10);
    let status = node.wait_module("alias", |s| {
        s.state == ModuleState::Failed
            && s.error
                .as_deref()
                .is_some_and(|e| e.contains("payload names repository"))
    });
    assert!(
        status.error.unwrap_or_default().contains(&format!(
            "payload names repository {origin} not {alias}, the one it was pulled from"
        )),
        "{origin_reference}"
    );
    write_policy(
        &node,
        &format!("keys = [\"cosign.pub\"]\nsigned_references = [\"{host}/*\"]\n"),
    );
    node.wait_module("alias", |s| s.state == ModuleState::Active);
    assert_eq!(node.union_file("tools.txt").as_deref(), Some("mirrored"));
}

/// A module whose index alone was signed (`cosign sign` without `--recursive`) is refused
/// with an error that says so and says how to sign it.
#[test]
fn a_module_whose_index_alone_is_signed_is_refused_with_how_to_sign_it() {
    if !can_run() {
        return;
    }
    use powernode_modules::cosign;
    let node = Node::new(true);
    let unsigned = Publish {
        signer: Signer::None,
        ..Publish::default()
    };
    let reference = node.publish("tools", &[("tools.txt", b"index only")], unsigned);
    let repository = reference.rsplit_once(':').unwrap().0.to_owned();
    let registry = node.registry_client();
    let index = node.rt.block_on(async {
        let (_, index) = registry.fetch_manifest(&reference).await.unwrap();
        let signer = cosign::Signer {
            key: &node.key,
            certificate: None,
            log: None,
        };
        let signature = cosign::sign(
            &signer,
            &repository,
            &index.to_string(),
            std::time::SystemTime::now(),
        )
        .unwrap();
        package::store_signatures(&registry, &repository, &index.to_string(), &[signature])
            .await
            .unwrap();
        index
    });
    node.attach("tools", &reference, 10);
    let error = node.wait_failed("tools").error.unwrap_or_default();
    assert!(
        error.contains(&format!(
            "is not signed, only the index {index} it was chosen from is"
        )) && error.contains("sign recursively (`cosign sign --recursive REF`, or `powernode-controller module sign REF`"),
        "{error}"
    );
}
