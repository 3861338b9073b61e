//! The module commands of the operator CLI end to end, and what the digest store keeps: the
//! real `powernode-agent verify` and `commit` against the `docker-registry` server on loopback,
//! with modules built by `mkfs.erofs` and signed in cosign's format, and the real modulemgr,
//! verifier and mountmgr processes mounting real erofs and overlayfs.
//!
//! `verify` needs `docker-registry` and `mkfs.erofs`; the others need root (mounts) too.
//! Without them a test skips, and fails instead under `CI=true`.

mod common;

use common::agents::Agents;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{node_root, spawn_agent, trust_registry};
use powernode_modules::cosign::SigningKey;
use powernode_modules::format::host_architecture;
use powernode_modules::package::{self, BuildOptions, Built};
use powernode_modules::registry::{Registry, RegistryConfig};
use powernode_modules::testing::{TestRegistry, REGISTRY_BIN};
use powernode_pubsub::testing::require;
use powernode_pubsub::{Dirs, Subscription};
use powernode_types::{MountState, MountStatus};
use serde_json::Value;

/// The mount target modulemgr stacks at (settings default).
const TARGET: &str = "modules";
/// How long a module may take to be pulled, verified and stacked, or its blob collected.
const WAIT: Duration = Duration::from_secs(90);

/// A node root with settings for a registry of its own and a trust policy requiring a
/// signature by `key` (`default`), plus `lab`, which lets unsigned modules through; the
/// module agents once [`Node::start_agents`] is called.
struct Node {
    dir: tempfile::TempDir,
    root: PathBuf,
    registry: TestRegistry,
    key: SigningKey,
    agents: Agents,
    rt: tokio::runtime::Runtime,
}

impl Node {
    fn new() -> Node {
        let (dir, root) = node_root();
        let registry = TestRegistry::start(&dir.path().join("registry")).unwrap();
        let key = trust_registry(&root, &registry);
        fs::write(
            root.join("etc/powernode/trust/lab.toml"),
            "require_signature = false\n",
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Node {
            dir,
            root,
            registry,
            key,
            agents: Agents::default(),
            rt,
        }
    }

    /// Starts the verifier, mountmgr and modulemgr (logging to `<root>/<agent>.log`).
    fn start_agents(&mut self) {
        for agent in ["verifier", "mountmgr", "modulemgr"] {
            self.start(agent);
        }
    }

    fn start(&mut self, agent: &str) {
        let child = spawn_agent(&self.root, agent, "");
        self.agents.add(agent, child);
    }

    /// SIGKILL to `agent`.
    fn kill9(&mut self, agent: &str) {
        self.agents.kill9(agent);
    }

    fn registry_client(&self) -> Registry {
        Registry::new(RegistryConfig {
            plain_http: vec![self.registry.host.clone()],
            ..RegistryConfig::default()
        })
    }

    /// Builds module `name` from `files` (version `tag`), pushes it as
    /// `modules/<name>:<tag>` and signs it with `signer` (if any): its reference and the
    /// built module (image, manifests, digests).
    fn push(
        &self,
        name: &str,
        tag: &str,
        files: &[(&str, &str)],
        signer: Option<&SigningKey>,
    ) -> (String, Built) {
        let work = tempfile::tempdir_in(self.dir.path()).unwrap().keep();
        let src = work.join("src");
        for (path, text) in files {
            fs::create_dir_all(src.join(path).parent().unwrap()).unwrap();
            fs::write(src.join(path), text).unwrap();
        }
        let options = BuildOptions {
            name: name.to_owned(),
            version: tag.to_owned(),
            priority: 50,
            architecture: host_architecture().to_owned(),
            dependencies: Vec::new(),
            services: Vec::new(),
            health_check: None,
        };
        let built = package::build(&src, &options, &work.join("out")).unwrap();
        let repository = format!("{}/modules/{name}", self.registry.host);
        let reference = format!("{repository}:{tag}");
        let registry = self.registry_client();
        self.rt.block_on(async {
            package::push(&registry, &repository, tag, std::slice::from_ref(&built))
                .await
                .unwrap();
            if let Some(key) = signer {
                package::sign(&registry, &reference, key).await.unwrap();
            }
        });
        (reference, built)
    }

    /// `powernode-agent --root <root> args...`, run to its end.
    fn cli(&self, args: &[&str]) -> Outcome {
        let out = Command::new(common::bin())
            .arg("--root")
            .arg(&self.root)
            .args(args)
            .env_remove("POWERNODE_ROOT")
            .output()
            .unwrap();
        Outcome {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `attach REF --name NAME [--priority P]`, waiting until it is Active.
    fn attach(&self, name: &str, reference: &str, priority: Option<u32>) {
        let priority = priority.map(|p| p.to_string());
        let mut args = vec!["attach", reference, "--name", name, "--timeout", "120"];
        if let Some(priority) = &priority {
            args.extend(["--priority", priority]);
        }
        let out = self.cli(&args);
        if out.code != Some(0) {
            self.fail(&format!("attach {name} ({reference}): {out:?}"));
        }
    }

    /// The digest store's blob of `digest` (`sha256:<hex>`).
    fn blob(&self, digest: &str) -> PathBuf {
        self.root
            .join("persist/powernode/store/sha256")
            .join(digest.strip_prefix("sha256:").unwrap())
    }

    /// Where the union is.
    fn union(&self) -> PathBuf {
        self.root
            .join("run/powernode-mounts")
            .join(TARGET)
            .join("current")
    }

    fn union_file(&self, path: &str) -> Option<String> {
        fs::read_to_string(self.union().join(path)).ok()
    }

    /// mountmgr's status of the modules' target once `done` accepts it.
    fn mount_status(&self, what: &str, done: impl Fn(&MountStatus) -> bool) -> MountStatus {
        let dirs = Dirs::under_root(&self.root);
        let found = self.rt.block_on(async {
            let mut sub = Subscription::<MountStatus>::connect(&dirs, "mountmgr");
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                if let Some(status) = sub.get(TARGET).filter(|s| done(s)) {
                    return Ok(status.clone());
                }
                if tokio::time::timeout_at(deadline, sub.next()).await.is_err() {
                    return Err(sub.get(TARGET).cloned());
                }
            }
        });
        found.unwrap_or_else(|last| self.fail(&format!("{what}: last MountStatus {last:?}")))
    }

    /// Polls `done` until it holds, failing the test with `what` and the logs after [`WAIT`].
    fn wait_until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            if Instant::now() > deadline {
                self.fail(what);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[track_caller]
    fn fail(&self, what: &str) -> ! {
        common::fail_with_logs(&self.root, ["modulemgr", "verifier", "mountmgr"], what)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agents.stop_all();
        common::unmount_under(&self.root);
    }
}

/// What a CLI command did.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The JSON `verify --json` prints.
fn verdict(node: &Node, args: &[&str]) -> (Outcome, Value) {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = node.cli(&all);
    let json = out.json();
    (out, json)
}

/// `verify` on a pulled reference: a module signed by the trusted key verifies and names its
/// signer; one signed by another key, and one whose image the registry serves changed, are
/// rejected with the reason and exit 1; a reference the registry does not have is an error
/// (exit 1, stderr), not a verdict. In JSON, the same verdicts with the digests.
#[test]
fn verify_a_pulled_module() {
    if !require(&[REGISTRY_BIN, "mkfs.erofs"]) {
        return;
    }
    let node = Node::new();
    let (good, built) = node.push("good", "1", &[("good.txt", "good")], Some(&node.key));
    let signer = format!("key {}", node.key.public_key().short_fingerprint());

    let out = node.cli(&["verify", &good]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .starts_with(&format!("verified {good}: {signer}; fs-verity sha256:")),
        "{out:?}"
    );
    let (out, json) = verdict(&node, &[&good]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(json["verified"], true, "{json}");
    assert_eq!(json["target"], good.as_str());
    assert_eq!(json["digest"], built.image_digest.as_str());
    assert_eq!(json["manifest_digest"], built.manifest_digest.as_str());
    assert_eq!(
        json["detail"],
        format!("{signer}; fs-verity {}", built.fsverity_digest).as_str()
    );

    // Signed, but not by a key the policy trusts.
    let other = SigningKey::generate().unwrap();
    let (foreign, _) = node.push("foreign", "1", &[("foreign.txt", "x")], Some(&other));
    let out = node.cli(&["verify", &foreign]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout
            .starts_with(&format!("REJECTED {foreign}: signature:")),
        "{out:?}"
    );
    assert!(
        out.stdout.contains(&format!(
            "no trusted key verifies it (tried 1 key: {}…)",
            node.key.public_key().short_fingerprint()
        )),
        "the reason names the keys tried: {out:?}"
    );
    let (out, json) = verdict(&node, &[&foreign]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(json["verified"], false, "{json}");
    assert!(
        json["detail"].as_str().unwrap().starts_with("signature:"),
        "{json}"
    );

    // Unsigned: refused by the default policy, let through by the lab one.
    let (unsigned, _) = node.push("unsigned", "1", &[("u.txt", "u")], None);
    let out = node.cli(&["verify", &unsigned]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("no signatures"), "{out:?}");
    let out = node.cli(&["verify", &unsigned, "--policy", "lab"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(": unsigned; fs-verity"), "{out:?}");

    // The registry serves other bytes than the signed manifest names.
    let (tampered, built) = node.push("tampered", "1", &[("t.txt", "original")], Some(&node.key));
    let blob = node
        .registry
        .blob_file(built.image_digest.strip_prefix("sha256:").unwrap());
    let mut bytes = fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&blob, bytes).unwrap();
    let out = node.cli(&["verify", &tampered]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.starts_with(&format!(
            "REJECTED {tampered}: image: blob {}",
            built.image_digest
        )),
        "{out:?}"
    );
    assert!(out.stdout.contains("arrived with digest"), "{out:?}");
    let (out, json) = verdict(&node, &[&tampered]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(json["verified"], false, "{json}");
    assert_eq!(json["digest"], built.image_digest.as_str());

    // Nothing to verify: an error, not a verdict.
    let missing = format!("{}/modules/nothing:1", node.registry.host);
    let out = node.cli(&["verify", &missing, "--json"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(out.stderr.contains("error:"), "{out:?}");
}

/// `verify` on a module built by `module build` (no registry, so no signature): any of its
/// files names it; the default policy refuses it for want of a signature, the lab policy
/// passes it; an image changed after the build is rejected for its fs-verity digest, in text
/// and in JSON.
#[test]
fn verify_a_built_module() {
    if !require(&[REGISTRY_BIN, "mkfs.erofs"]) {
        return;
    }
    let node = Node::new();
    let (_, built) = node.push("built", "1", &[("b.txt", "built")], None);
    let manifest = built.manifest.display().to_string();
    let image = built.image.display().to_string();

    let out = node.cli(&["verify", &manifest]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout
            .starts_with(&format!("REJECTED {manifest}: signature: no signatures")),
        "{out:?}"
    );
    for target in [&manifest, &image] {
        let (out, json) = verdict(&node, &[target, "--policy", "lab"]);
        assert_eq!(out.code, Some(0), "{target}: {out:?}");
        assert_eq!(json["verified"], true, "{json}");
        assert_eq!(json["digest"], built.image_digest.as_str());
        assert_eq!(json["manifest_digest"], built.manifest_digest.as_str());
        assert_eq!(
            json["detail"],
            format!("unsigned; fs-verity {}", built.fsverity_digest).as_str()
        );
    }

    let mut bytes = fs::read(&built.image).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x01;
    fs::write(&built.image, bytes).unwrap();
    let out = node.cli(&["verify", &manifest, "--policy", "lab"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.starts_with(&format!(
            "REJECTED {manifest}: fs-verity digest mismatch: the image's is sha256:"
        )),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains(&format!("the manifest says {}", built.fsverity_digest)),
        "{out:?}"
    );
    let (out, json) = verdict(&node, &[&manifest, "--policy", "lab"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(json["verified"], false, "{json}");
}

/// Mounts the erofs image `image` read-only at a new directory under `dir`, runs `look` on
/// it, and unmounts it.
fn with_image_mounted<T>(dir: &Path, image: &Path, look: impl FnOnce(&Path) -> T) -> T {
    let at = tempfile::tempdir_in(dir).unwrap();
    let out = Command::new("mount")
        .args(["-t", "erofs", "-o", "ro"])
        .arg(image)
        .arg(at.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "mount {}: {out:?}", image.display());
    let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| look(at.path())));
    let _ = nix::mount::umount2(at.path(), nix::mount::MntFlags::MNT_DETACH);
    seen.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `commit`: a file written into the stack and one deleted from a lower layer become a new
/// module image (the file, and a whiteout for the deletion), pushed to the registry; signed
/// and attached, that module brings both changes into a fresh stack. With mountmgr down,
/// `commit` takes the upper directory from the status mountmgr left and says so.
#[test]
fn commit_captures_the_writes_as_a_module() {
    if !require(&["root", REGISTRY_BIN, "mkfs.erofs"]) {
        return;
    }
    let mut node = Node::new();
    node.start_agents();
    let (base, _) = node.push(
        "base",
        "1",
        &[("base.txt", "base"), ("gone.txt", "deleted on the node")],
        Some(&node.key),
    );
    // 55: between what `attach` used to give every module (50) and the committed module's 60.
    node.attach("base", &base, Some(55));
    fs::write(node.union().join("hello.txt"), "written on the node").unwrap();
    fs::remove_file(node.union().join("gone.txt")).unwrap();

    let out_dir = node.dir.path().join("commit");
    let committed = format!("{}/committed/app:1", node.registry.host);
    let out = node.cli(&[
        "commit",
        "--name",
        "app",
        "--version",
        "1",
        "--out",
        out_dir.to_str().unwrap(),
        "--push",
        &committed,
        "--json",
    ]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let json = out.json();
    assert_eq!(json["mountmgr_running"], true, "{json}");
    let image = PathBuf::from(json["built"]["image"].as_str().unwrap());
    assert!(image.starts_with(&out_dir), "{json}");
    let image_digest = json["built"]["image_digest"].as_str().unwrap().to_owned();
    // The module manifest lists the written file, and the whiteout as an entry of mode 0.
    let files: Vec<(&str, u64)> = json["built"]["module"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["mode"].as_u64().unwrap()))
        .collect();
    assert_eq!(files, [("gone.txt", 0), ("hello.txt", 0o644)], "{json}");
    let status = node.mount_status("the stack is mounted", |s| s.state == MountState::Mounted);
    assert_eq!(json["upper_dir"], status.upper_dir.unwrap().as_str());
    with_image_mounted(node.dir.path(), &image, |at| {
        assert_eq!(
            fs::read_to_string(at.join("hello.txt")).unwrap(),
            "written on the node"
        );
        let whiteout = fs::symlink_metadata(at.join("gone.txt")).unwrap();
        assert!(
            whiteout.file_type().is_char_device() && whiteout.rdev() == 0,
            "gone.txt is a whiteout: {whiteout:?}"
        );
        assert!(
            !at.join("base.txt").exists(),
            "only the writes are captured"
        );
    });

    // In the registry: the pushed module is the image just built, intact.
    assert_eq!(json["pushed"]["reference"], committed.as_str(), "{json}");
    let pushed = node.cli(&["verify", &committed, "--policy", "lab", "--json"]);
    assert_eq!(pushed.code, Some(0), "{pushed:?}");
    assert_eq!(pushed.json()["digest"], image_digest.as_str(), "{pushed:?}");

    // Signed and attached without a priority, it is stacked at its manifest's (commit's
    // default, 60), above the base's 55: it brings both changes into a new stack (whose tmpfs
    // upper starts empty). Below the base, gone.txt would show again.
    node.rt
        .block_on(package::sign(
            &node.registry_client(),
            &committed,
            &node.key,
        ))
        .unwrap();
    node.attach("app", &committed, None);
    let status = node.mount_status("the committed module stacked", |s| {
        s.state == MountState::Mounted && s.layers.contains(&image_digest)
    });
    let upper = PathBuf::from(status.upper_dir.unwrap());
    assert_eq!(fs::read_dir(&upper).unwrap().count(), 0, "a fresh upper");
    assert_eq!(
        node.union_file("hello.txt").as_deref(),
        Some("written on the node")
    );
    assert_eq!(node.union_file("gone.txt"), None);
    assert_eq!(node.union_file("base.txt").as_deref(), Some("base"));

    // mountmgr down: its last status still says where the (still mounted) writes are.
    fs::write(node.union().join("later.txt"), "after the commit").unwrap();
    node.kill9("mountmgr");
    let out_dir = node.dir.path().join("commit-offline");
    let out = node.cli(&[
        "commit",
        "--name",
        "later",
        "--version",
        "1",
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("mountmgr is not running"), "{out:?}");
    let json = out.json();
    assert_eq!(json["mountmgr_running"], false, "{json}");
    assert_eq!(json["pushed"], Value::Null, "{json}");
    let image = PathBuf::from(json["built"]["image"].as_str().unwrap());
    with_image_mounted(node.dir.path(), &image, |at| {
        assert_eq!(
            fs::read_to_string(at.join("later.txt")).unwrap(),
            "after the commit"
        );
        assert!(!at.join("hello.txt").exists(), "{json}");
    });

    // A target mountmgr never had is refused with the reason.
    let out = node.cli(&[
        "commit",
        "--name",
        "x",
        "--version",
        "1",
        "--target",
        "nope",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains("no mount target \"nope\" (mountmgr has: modules)"),
        "{out:?}"
    );
}

/// The digest store's garbage collection: a module replaced by a new version has its old
/// image removed once the stack with the new one is mounted, and a module detached has its
/// image removed once the stack without it is mounted; the images of the mounted stack stay.
#[test]
fn the_store_keeps_only_what_is_stacked() {
    if !require(&["root", REGISTRY_BIN, "mkfs.erofs"]) {
        return;
    }
    let mut node = Node::new();
    node.start_agents();
    let (keep, kept) = node.push("keep", "1", &[("keep.txt", "keep")], Some(&node.key));
    let (app1, old) = node.push("app", "1", &[("app.txt", "one")], Some(&node.key));
    let (app2, new) = node.push("app", "2", &[("app.txt", "two")], Some(&node.key));
    node.attach("keep", &keep, Some(10));
    node.attach("app", &app1, Some(20));
    assert_eq!(node.union_file("app.txt").as_deref(), Some("one"));
    for built in [&kept, &old] {
        assert!(
            node.blob(&built.image_digest).is_file(),
            "{}",
            built.image_digest
        );
    }
    assert!(!node.blob(&new.image_digest).exists());

    // Replaced by version 2: version 1's image goes once the new stack is mounted.
    node.attach("app", &app2, Some(20));
    node.mount_status("version 2 stacked", |s| {
        s.state == MountState::Mounted
            && s.layers.contains(&new.image_digest)
            && !s.layers.contains(&old.image_digest)
    });
    assert_eq!(node.union_file("app.txt").as_deref(), Some("two"));
    node.wait_until("version 1's image collected", || {
        !node.blob(&old.image_digest).exists()
    });
    for built in [&kept, &new] {
        assert!(
            node.blob(&built.image_digest).is_file(),
            "{}",
            built.image_digest
        );
    }

    // Detached: its image goes once the stack without it is mounted.
    let out = node.cli(&["detach", "app"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let status = node.mount_status("the stack without app", |s| {
        s.state == MountState::Mounted && s.layers == [kept.image_digest.clone()]
    });
    assert_eq!(node.union_file("app.txt"), None);
    node.wait_until("version 2's image collected", || {
        !node.blob(&new.image_digest).exists()
    });
    for digest in &status.layers {
        assert!(
            node.blob(digest).is_file(),
            "a mounted layer's image: {digest}"
        );
    }
    let left: Vec<String> = fs::read_dir(node.root.join("persist/powernode/store/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        [kept.image_digest.strip_prefix("sha256:").unwrap()],
        "only the stacked image is left"
    );
}
