//! `powernode-controller module …` as an operator runs it: the real binary, the real
//! `mkfs.erofs`, a real registry (`docker-registry` on loopback), a real controller data
//! directory. What the commands made is checked with the library the nodes use.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::{heartbeat_body, post_json, TestServer};
use powernode_modules::cosign::{self, Policy, PublicKey, SigningKey, Verified};
use powernode_modules::digest::Digest;
use powernode_modules::format::host_architecture;
use powernode_modules::registry::{Registry, RegistryConfig};
use powernode_modules::testing::{TestRegistry, REGISTRY_BIN};
use powernode_pubsub::testing::require;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_powernode-controller");
const PASSWORD: &str = "correct horse";

/// Runs the binary with `args` and `COSIGN_PASSWORD` set to `password` (unset for `None`).
fn run_with(args: &[&str], password: Option<&str>) -> (i32, String, String) {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("COSIGN_PASSWORD");
    if let Some(password) = password {
        command.env("COSIGN_PASSWORD", password);
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the binary and parses its stdout as JSON; panics unless it exits 0.
fn run_json(args: &[&str], password: Option<&str>) -> Value {
    let (code, stdout, stderr) = run_with(args, password);
    assert_eq!(code, 0, "{args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// What these tests need of the machine ([`require`]: a skip, or a failure under `CI=true`).
fn tools_present() -> bool {
    require(&["mkfs.erofs", REGISTRY_BIN])
}

/// A module source tree with two files.
fn module_tree(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("bin/hello"), "#!/bin/sh\necho hello\n").unwrap();
    std::fs::set_permissions(
        dir.join("bin/hello"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(dir.join("etc/hello.conf"), "greeting = hello\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_push_keygen_sign_and_assign() {
    if !tools_present() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = |p: &str| tmp.path().join(p).to_str().unwrap().to_owned();
    module_tree(&tmp.path().join("src"));
    let arch = host_architecture();

    // build
    let built = run_json(
        &[
            "module",
            "build",
            &path("src"),
            "--name",
            "hello",
            "--version",
            "1.0",
            "--priority",
            "60",
            "--health-check",
            "/bin/hello --check",
            "--health-timeout",
            "5",
            "--out",
            &path("out"),
            "--json",
        ],
        None,
    );
    assert_eq!(built["architecture"], arch);
    let manifest_file = built["manifest"].as_str().unwrap().to_owned();
    assert!(Path::new(&manifest_file).is_file());
    assert!(Path::new(built["image"].as_str().unwrap()).is_file());
    assert!(built["size"].as_u64().unwrap() > 0);
    Digest::parse(built["fsverity_digest"].as_str().unwrap()).unwrap();

    // push
    let registry_server = TestRegistry::start(&tmp.path().join("registry")).unwrap();
    let host = registry_server.host.clone();
    let repository = format!("{host}/modules/hello");
    let tag_ref = format!("{repository}:1.0");
    let pushed = run_json(
        &[
            "module",
            "push",
            &manifest_file,
            "--to",
            &tag_ref,
            "--plain-http",
            "--json",
        ],
        None,
    );
    let pinned = pushed["pinned"].as_str().unwrap().to_owned();
    let index_digest = Digest::parse(pushed["index_digest"].as_str().unwrap()).unwrap();
    assert_eq!(pinned, format!("{repository}@{index_digest}"));
    assert_eq!(pushed["manifests"][arch], built["manifest_digest"]);

    // keygen: 0600 private key; no overwrite without --force; --force replaces.
    let keys = path("keys");
    let (code, _, stderr) = run_with(&["module", "keygen", "--out", &keys], Some(PASSWORD));
    assert_eq!(code, 0, "{stderr}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tmp.path().join("keys/cosign.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let public_pem = std::fs::read_to_string(tmp.path().join("keys/cosign.pub")).unwrap();
    let (code, _, stderr) = run_with(&["module", "keygen", "--out", &keys], Some(PASSWORD));
    assert_eq!(code, 1);
    assert!(stderr.contains("--force"), "{stderr}");
    let (code, _, stderr) = run_with(&["module", "keygen", "--out", &keys], None);
    assert_eq!(code, 1);
    assert!(stderr.contains("COSIGN_PASSWORD"), "{stderr}");

    // sign: the index and the platform manifest; twice adds nothing.
    let key = path("keys/cosign.key");
    let sign = [
        "module",
        "sign",
        &pinned,
        "--key",
        &key,
        "--plain-http",
        "--json",
    ];
    let signed = run_json(&sign, Some(PASSWORD));
    let signed = signed.as_array().unwrap();
    assert_eq!(signed.len(), 2, "{signed:?}");
    assert_eq!(signed[0]["digest"], index_digest.to_string());
    assert_eq!(signed[1]["digest"], built["manifest_digest"]);
    assert!(signed.iter().all(|s| s["signatures"] == 1));
    let again = run_json(&sign, Some(PASSWORD));
    assert!(again
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["signatures"] == 1 && s["already_signed"] == true));

    // sign with the wrong password: a clear error, nothing pushed.
    let (code, _, stderr) = run_with(&sign[..6], Some("wrong"));
    assert_eq!(code, 1);
    assert!(stderr.contains("cosign.key"), "{stderr}");
    assert!(stderr.to_lowercase().contains("password"), "{stderr}");

    // What a node sees: the module resolves for this architecture, and its signatures verify
    // with the public key.
    let registry = Registry::new(RegistryConfig {
        plain_http: vec![host.clone()],
        ..RegistryConfig::default()
    });
    let resolved = registry.resolve(&tag_ref, arch).await.unwrap();
    assert_eq!(resolved.module.name, "hello");
    assert_eq!(resolved.module.priority, 60);
    assert_eq!(resolved.index_digest.as_ref(), Some(&index_digest));
    assert_eq!(resolved.module.files.len(), 2);
    let policy = Policy {
        keys: vec![PublicKey::from_pem(&public_pem).unwrap()],
        keyless: None,
        require_signature: true,
        signed_references: Vec::new(),
    };
    for digest in [&resolved.manifest_digest, &index_digest] {
        let signatures = registry.signatures(&repository, digest).await.unwrap();
        assert_eq!(signatures.len(), 1, "{digest}");
        let verified = cosign::verify(
            &policy,
            &repository,
            &digest.to_string(),
            &signatures,
            SystemTime::now(),
        )
        .unwrap_or_else(|e| panic!("{digest}: {e}"));
        assert!(matches!(verified, Verified::Key { .. }), "{verified}");
        // Another key does not verify it.
        let other = Policy {
            keys: vec![SigningKey::generate().unwrap().public_key().clone()],
            ..policy.clone()
        };
        let now = SystemTime::now();
        assert!(
            cosign::verify(&other, &repository, &digest.to_string(), &signatures, now).is_err()
        );
    }

    // assign to an enrolled node of this architecture.
    let server = TestServer::start(Duration::from_secs(3600)).await;
    let data = server.data().to_str().unwrap().to_owned();
    let node = server
        .enroll_new_with_arch("uuid-modules", std::env::consts::ARCH)
        .await;
    let assigned = run_json(
        &[
            "module",
            "assign",
            "--node",
            &node.node_id,
            &pinned,
            "--priority",
            "hello=70",
            "--data",
            &data,
            "--plain-http",
            "--json",
        ],
        None,
    );
    assert_eq!(assigned["generation"], 1);
    let expected = json!([{"name": "hello", "reference": pinned, "priority": 70}]);
    assert_eq!(assigned["modules"], expected);

    // The next heartbeat carries it; the node's report shows in `node show`.
    let mut heartbeat = heartbeat_body(0);
    heartbeat["modules"] = json!([
        {"name": "hello", "state": "Active", "digest": resolved.manifest_digest.to_string(),
         "reference": pinned},
        {"name": "bad", "state": "Failed", "error": "signature 1: no trusted key verifies it"},
    ]);
    let (status, reply) = post_json(
        &server.as_node(&node),
        server.url("/node_api/v1/status/heartbeat"),
        &heartbeat,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["desired"]["generation"], 1);
    assert_eq!(reply["desired"]["modules"], expected);
    let (code, shown, stderr) = run_with(&["node", "show", &node.node_id, "--data", &data], None);
    assert_eq!(code, 0, "{stderr}");
    let short = &resolved.manifest_digest.to_string()[..15];
    assert!(
        shown.contains(&format!("  hello  Active  {short}…  {pinned}\n")),
        "{shown}"
    );
    assert!(
        shown.contains("  bad  Failed: signature 1: no trusted key verifies it\n"),
        "{shown}"
    );
    let shown = run_json(
        &["node", "show", &node.node_id, "--data", &data, "--json"],
        None,
    );
    assert_eq!(shown["modules_reported"][1]["state"], "Failed");

    // Errors: a reference with nothing behind it, an unknown node, a priority for a module
    // that is not assigned.
    let missing = format!("{host}/modules/nothing:1.0");
    for (args, wanted) in [
        (
            vec!["--node", &node.node_id, &missing],
            "cannot be assigned",
        ),
        (
            vec!["--node", "node-missing", &pinned],
            "no node node-missing",
        ),
        (
            vec!["--node", &node.node_id, &pinned, "--priority", "other=1"],
            "no module other",
        ),
    ] {
        let mut full = vec!["module", "assign", "--data", &data, "--plain-http"];
        full.extend(args);
        let (code, _, stderr) = run_with(&full, None);
        assert_eq!(code, 1, "{full:?}");
        assert!(stderr.contains(wanted), "{full:?}: {stderr}");
    }

    // --none clears the list.
    let cleared = run_json(
        &[
            "module",
            "assign",
            "--node",
            &node.node_id,
            "--none",
            "--data",
            &data,
            "--json",
        ],
        None,
    );
    assert_eq!(cleared["generation"], 2);
    assert_eq!(cleared["modules"], json!([]));
    server.stop().await;
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nothing.manifest.json");
    let (code, _, stderr) = run_with(
        &[
            "module",
            "push",
            missing.to_str().unwrap(),
            "--to",
            "127.0.0.1:1/modules/x:1",
            "--plain-http",
        ],
        None,
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is not a built module"), "{stderr}");
    assert!(stderr.contains("nothing.manifest.json"), "{stderr}");

    // A tag is required to push to.
    let (code, _, stderr) = run_with(
        &[
            "module",
            "push",
            "x.manifest.json",
            "--to",
            "127.0.0.1:1/modules/x",
        ],
        None,
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("name the tag"), "{stderr}");

    // Usage errors exit 2: neither references nor --none; both.
    let (code, _, _) = run_with(&["module", "assign", "--node", "n", "--data", "/x"], None);
    assert_eq!(code, 2);
    let (code, _, _) = run_with(
        &[
            "module", "assign", "--node", "n", "--none", "r", "--data", "/x",
        ],
        None,
    );
    assert_eq!(code, 2);

    // A key that does not exist.
    let (code, _, stderr) = run_with(
        &[
            "module",
            "sign",
            "127.0.0.1:1/m/x:1",
            "--key",
            "/nonexistent/cosign.key",
        ],
        Some(""),
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/cosign.key"), "{stderr}");
}

#[test]
fn signing_with_a_certificate_checks_its_inputs_first() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let signing = SigningKey::from_pkcs8_der(&pair.serialize_der()).unwrap();
    let key = tmp.path().join("cosign.key");
    std::fs::write(&key, signing.to_cosign_pem(PASSWORD.as_bytes()).unwrap()).unwrap();
    let key = key.to_str().unwrap();
    let certificate_for = |pair: &rcgen::KeyPair, name: &str| {
        let certificate = rcgen::CertificateParams::new(vec!["signer.example".to_owned()])
            .unwrap()
            .self_signed(pair)
            .unwrap();
        let path = tmp.path().join(name);
        std::fs::write(&path, certificate.pem()).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let own = certificate_for(&pair, "own.pem");
    let other = certificate_for(&rcgen::KeyPair::generate().unwrap(), "other.pem");
    let sign = |extra: &[&str]| {
        let mut args = vec!["module", "sign", "127.0.0.1:1/m/x:1", "--key", key];
        args.extend_from_slice(extra);
        run_with(&args, Some(PASSWORD))
    };
    // A certificate for another key: refused before the registry is asked anything.
    let (code, _, stderr) = sign(&["--certificate", &other]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("the certificate is not for this key (its public key differs)"),
        "{stderr}"
    );
    // A chain that is not one.
    let (code, _, stderr) = sign(&["--certificate", &own, "--certificate-chain", key]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("the chain: no PEM CERTIFICATE block"),
        "{stderr}"
    );
    // A log key that cannot be read.
    let (code, _, stderr) = sign(&["--certificate", &own, "--log-key", "/nonexistent/log.key"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/log.key"), "{stderr}");
    // A chain or a log key needs a certificate: usage errors.
    for flag in ["--certificate-chain", "--log-key"] {
        let (code, _, stderr) = sign(&[flag, &own]);
        assert_eq!(code, 2, "{flag}: {stderr}");
    }
}

/// One rule for a node's modules, whichever way they are set: a list a node would refuse is
/// refused (400, nothing stored), and a revoked node is refused by the API (409
/// `node_revoked`) and by `module assign` with the same message and code, with `--none` and
/// with references alike, before any registry is asked (this one does not exist). Its
/// network and its tasks are refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_refused_the_same_way_by_the_api_and_the_cli() {
    let server = TestServer::start(Duration::from_secs(3600)).await;
    let data = server.data().to_str().unwrap().to_owned();
    let node = server.enroll_new("uuid-revoked-assign").await;
    let id = node.node_id.as_str();
    let modules_path = format!("/api/v1/nodes/{id}/desired/modules");
    let reference = "registry.invalid/modules/tools:1";
    let list = json!({"modules": [{"name": "tools", "reference": reference}]});
    let (status, reply) = server.operator_put(&modules_path, &list).await;
    assert_eq!(
        (status, reply["generation"].as_u64()),
        (200, Some(1)),
        "{reply}"
    );
    let generation = || async {
        let (_, shown) = server.operator_get(&format!("/api/v1/nodes/{id}")).await;
        shown["desired"]["generation"].as_u64()
    };

    for bad in [
        json!({"modules": [{"name": "a/b", "reference": reference}]}),
        json!({"modules": [{"name": ".hidden", "reference": reference}]}),
        json!({"modules": [{"name": "tools", "reference": "not a reference"}]}),
        json!({"modules": [{"name": "tools", "reference": "r@sha256:00"}]}),
    ] {
        let (status, reply) = server.operator_put(&modules_path, &bad).await;
        assert_eq!(
            (status, common::code(&reply)),
            (400, "invalid_request"),
            "{bad}: {reply}"
        );
    }
    assert_eq!(generation().await, Some(1), "a refused list was stored");

    let (status, _) = server
        .operator_post(&format!("/api/v1/nodes/{id}/revoke"), &json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, reply) = server.operator_put(&modules_path, &list).await;
    assert_eq!(
        (status, common::code(&reply)),
        (409, "node_revoked"),
        "{reply}"
    );
    let message = reply["error"]["message"].as_str().unwrap().to_owned();
    assert_eq!(message, format!("node {id} is revoked"));

    let said = format!("error: {message} (node_revoked)");
    for references in [vec!["--none"], vec![reference]] {
        let mut args = vec!["module", "assign", "--node", id, "--data", &data];
        args.extend(references);
        let (code, out, stderr) = run_with(&args, None);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(stderr.trim(), said, "{args:?}");
    }
    assert_eq!(generation().await, Some(1), "a revoked node's list changed");

    let (status, reply) = server
        .operator_put(
            &format!("/api/v1/nodes/{id}/desired/network"),
            &json!({"network": null}),
        )
        .await;
    assert_eq!(
        (status, common::code(&reply)),
        (409, "node_revoked"),
        "{reply}"
    );
    let (status, reply) = server
        .operator_post("/api/v1/tasks", &json!({"node": id, "kind": "node.exec"}))
        .await;
    assert_eq!(
        (status, common::code(&reply)),
        (409, "node_revoked"),
        "{reply}"
    );
    server.stop().await;
}
