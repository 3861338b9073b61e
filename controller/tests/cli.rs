//! The binary as an operator runs it: `serve` as a real process, `token create`,
//! `nodes list --json` and `node show` against its data directory, SIGTERM to stop.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{client, csr_pem, enroll_body, post_json};
use rcgen::KeyPair;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_powernode-controller");

/// `ms` as `node show` prints a time (RFC 3339, seconds).
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn serve_token_create_enroll_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap();

    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--data",
            data_s,
            "--listen",
            "127.0.0.1:0",
            "--cert-lifetime",
            "20s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listen = lines.next().unwrap().unwrap();
    let addr = listen.strip_prefix("listening on ").unwrap().to_owned();
    let ca_line = lines.next().unwrap().unwrap();
    let ca_path = ca_line.strip_prefix("ca certificate ").unwrap().to_owned();
    let ca_pem = std::fs::read_to_string(&ca_path).unwrap();

    use std::os::unix::fs::PermissionsExt;
    for secret in ["ca.key.pem", "server.key.pem", "operator.token"] {
        let mode = std::fs::metadata(data.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }

    // The CLI works on the database while the server runs.
    let (code, token, stderr) = run(&["token", "create", "--ttl", "10m", "--data", data_s]);
    assert_eq!(code, 0, "{stderr}");
    let token = token.trim().to_owned();
    assert_eq!(token.len(), 64);

    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (status, reply) = post_json(
        &client(&ca_pem, None),
        format!("https://{addr}/node_api/v1/enroll"),
        &enroll_body(&token, &csr_pem(&key), "uuid-cli"),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let node_id = reply["node_id"].as_str().unwrap().to_owned();
    let not_after = reply["not_after_ms"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        not_after - now <= 21_000 && not_after - now >= 15_000,
        "--cert-lifetime 20s"
    );

    let (code, out, stderr) = run(&["nodes", "list", "--json", "--data", data_s]);
    assert_eq!(code, 0, "{stderr}");
    let nodes: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes[0]["id"], node_id.as_str());
    assert_eq!(nodes[0]["uuid"], "uuid-cli");
    assert_eq!(nodes[0]["hostname"], "edge-1");
    assert_eq!(nodes[0]["cert_not_after_ms"], not_after);

    let (code, out, _) = run(&["nodes", "list", "--data", data_s]);
    assert_eq!(code, 0);
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.contains(&node_id) && out.contains("never"), "{out}");

    let (code, out, _) = run(&["node", "show", &node_id, "--json", "--data", data_s]);
    assert_eq!(code, 0);
    let detail: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(detail["desired"]["generation"], 0);
    assert_eq!(detail["enrollment"], Value::Null, "{detail}");
    let (_, out, _) = run(&["node", "show", &node_id, "--data", data_s]);
    assert!(
        out.contains("certificate:     - (no heartbeat has reported it)"),
        "{out}"
    );

    // A heartbeat that reports failing rotation: `node show` says since when, how often, why.
    let cert_pem = reply["cert_pem"].as_str().unwrap().to_owned();
    let node = client(&ca_pem, Some((&cert_pem, &key.serialize_pem())));
    let since_ms = now - 60_000;
    let mut hb = common::heartbeat_body(0);
    hb["enrollment"] = serde_json::json!({
        "state": "RotationFailing",
        "cert_fingerprint": "ab12",
        "not_after_ms": not_after,
        "rotate_at_ms": since_ms,
        "rotation_failing_since_ms": since_ms,
        "rotation_attempts": 3,
        "last_error": "controller answered 503 unavailable",
    });
    let heartbeat = format!("https://{addr}/node_api/v1/status/heartbeat");
    let (status, reply) = post_json(&node, heartbeat.clone(), &hb).await;
    assert_eq!(status, 200, "{reply}");
    let (code, out, stderr) = run(&["node", "show", &node_id, "--data", data_s]);
    assert_eq!(code, 0, "{stderr}");
    let line = out
        .lines()
        .find(|l| l.starts_with("certificate:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("expires "), "{line}");
    assert!(
        line.ends_with(
            "rotation failing since {since} (3 attempts): controller answered 503 unavailable"
                .replace("{since}", &rfc3339(since_ms))
                .as_str()
        ),
        "{line}"
    );
    let (_, out, _) = run(&["node", "show", &node_id, "--json", "--data", data_s]);
    let detail: Value = serde_json::from_str(&out).unwrap();
    let enrollment = &detail["enrollment"];
    assert_eq!(enrollment["state"], "RotationFailing", "{detail}");
    assert_eq!(enrollment["rotation_failing_since_ms"], since_ms);
    assert_eq!(enrollment["rotation_attempts"], 3);
    let changed = enrollment["changed_at_ms"].as_i64().unwrap();

    // The same report again, then a heartbeat without one (an older agent): the stored
    // state stays as it was, unchanged since the first report.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(post_json(&node, heartbeat.clone(), &hb).await.0, 200);
    assert_eq!(
        post_json(&node, heartbeat.clone(), &common::heartbeat_body(0))
            .await
            .0,
        200
    );
    let (_, out, _) = run(&["node", "show", &node_id, "--json", "--data", data_s]);
    let detail: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(detail["enrollment"]["changed_at_ms"], changed, "{detail}");
    assert_eq!(detail["enrollment"]["rotation_attempts"], 3);

    let (code, _, stderr) = run(&["node", "show", "node-nope", "--data", data_s]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no node node-nope"), "{stderr}");

    let (code, _, _) = run(&["token", "create", "--ttl", "forever", "--data", data_s]);
    assert_eq!(code, 2);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));

    // A restart keeps the CA and the server certificate.
    let ca_before = std::fs::read(data.join("ca.crt.pem")).unwrap();
    let server_before = std::fs::read(data.join("server.crt.pem")).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--data", data_s, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("listening on "));
    assert_eq!(std::fs::read(data.join("ca.crt.pem")).unwrap(), ca_before);
    assert_eq!(
        std::fs::read(data.join("server.crt.pem")).unwrap(),
        server_before
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
