//! The binary as an operator runs it: `serve` as a real process, `token create`,
//! `nodes list --json` and `node show` through its operator API, SIGTERM to stop; where the
//! operator commands find the controller (flags over the data directory over the environment
//! over the config file), and what they say when it is not running.

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

    // On the run's backend: the restart below finds its data again in the same database.
    let database = common::database::fresh().await;
    let backend = common::database::serve_args(database.as_deref());
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
        .args(&backend)
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
    for secret in [
        "ca.key.pem",
        "server.key.pem",
        "operator.token",
        "operator.toml",
    ] {
        let mode = std::fs::metadata(data.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret}");
    }

    // The CLI calls the running server: DATA/operator.toml says where it is.
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
    let mut older = common::heartbeat_body(0);
    older.as_object_mut().unwrap().remove("enrollment");
    assert_eq!(post_json(&node, heartbeat.clone(), &older).await.0, 200);
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

    // With the controller stopped, an operator command names the URL it could not reach and
    // what to check, and exits 3 (a script may wait and try again).
    let (code, out, stderr) = run(&["nodes", "list", "--data", data_s]);
    assert_eq!(code, 3, "{stderr}");
    assert!(out.is_empty(), "{out}");
    assert!(
        stderr.contains(&format!("cannot reach the controller at https://{addr}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("is `powernode-controller serve` running?"),
        "{stderr}"
    );

    // A restart keeps the CA and the server certificate.
    let ca_before = std::fs::read(data.join("ca.crt.pem")).unwrap();
    let server_before = std::fs::read(data.join("server.crt.pem")).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--data", data_s, "--listen", "127.0.0.1:0"])
        .args(&backend)
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

/// A URL nothing listens at.
const DOWN: &str = "https://127.0.0.1:1";

/// Runs the binary with `args` and only `env` of the POWERNODE_* and XDG variables (the
/// developer's own settings must not count): exit code, stdout, stderr.
async fn run_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args);
    for var in [
        "POWERNODE_CONTROLLER",
        "POWERNODE_TOKEN_FILE",
        "POWERNODE_CA_FILE",
        "POWERNODE_CONTROLLER_CONFIG",
        "XDG_CONFIG_HOME",
        "HOME",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let out = command.output().await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The node ids `nodes list --json` printed, or the failure.
fn listed(result: (i32, String, String)) -> Vec<String> {
    let (code, out, stderr) = result;
    assert_eq!(code, 0, "{stderr}");
    let nodes: Vec<Value> = serde_json::from_str(&out).unwrap();
    nodes
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Each setting comes from the first of: its flag, `--data DIR`, the environment, the config
/// file (`--config`, `$POWERNODE_CONTROLLER_CONFIG`, `$XDG_CONFIG_HOME/powernode/
/// controller.toml`); what is wrong or missing is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_then_the_data_directory_then_env_then_the_file() {
    let server = common::TestServer::start(Duration::from_secs(3600)).await;
    let node = server.enroll_new("uuid-settings").await;
    let data = server.data();
    let data_s = data.to_str().unwrap();
    let ca = data.join("ca.crt.pem");
    let ca_s = ca.to_str().unwrap();
    let token = data.join("operator.token");
    let token_s = token.to_str().unwrap();
    let home = tempfile::tempdir().unwrap();
    let home_s = home.path().to_str().unwrap();
    let xdg = ("XDG_CONFIG_HOME", home_s);
    let list = ["nodes", "list", "--json"];

    // Nothing anywhere: what to set, and where.
    let (code, _, stderr) = run_env(&list, &[xdg]).await;
    assert_eq!(code, 1, "{stderr}");
    for part in [
        "no controller URL",
        "--controller",
        "$POWERNODE_CONTROLLER",
        &format!("{home_s}/powernode/controller.toml"),
    ] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }

    // The default config file alone (relative paths are its neighbours').
    std::fs::create_dir_all(home.path().join("powernode")).unwrap();
    std::fs::copy(&ca, home.path().join("powernode/ca.pem")).unwrap();
    std::fs::write(
        home.path().join("powernode/controller.toml"),
        format!(
            "url = \"{}\"\nca_file = \"ca.pem\"\ntoken_file = \"{token_s}\"\n",
            server.base
        ),
    )
    .unwrap();
    assert_eq!(
        listed(run_env(&list, &[xdg]).await),
        [node.node_id.as_str()]
    );

    // The environment over the file: the URL of the environment is the one tried.
    let env_down = [xdg, ("POWERNODE_CONTROLLER", DOWN)];
    let (code, _, stderr) = run_env(&list, &env_down).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the controller at {DOWN}")),
        "{stderr}"
    );
    // A flag over the environment.
    let flagged = [list.as_slice(), &["--controller", &server.base]].concat();
    assert_eq!(listed(run_env(&flagged, &env_down).await).len(), 1);
    // --data over the environment, a flag over --data.
    let data_args = [list.as_slice(), &["--data", data_s]].concat();
    assert_eq!(listed(run_env(&data_args, &env_down).await).len(), 1);
    let over_data = [data_args.as_slice(), &["--controller", DOWN]].concat();
    assert_eq!(run_env(&over_data, &[xdg]).await.0, 3);

    // --config and $POWERNODE_CONTROLLER_CONFIG name the file instead of the default one.
    let other = home.path().join("other.toml");
    std::fs::write(
        &other,
        format!("url = \"{DOWN}\"\nca_file = \"{ca_s}\"\ntoken_file = \"{token_s}\"\n"),
    )
    .unwrap();
    let other_s = other.to_str().unwrap();
    let by_flag = [list.as_slice(), &["--config", other_s]].concat();
    assert_eq!(run_env(&by_flag, &[xdg]).await.0, 3);
    let by_env = [xdg, ("POWERNODE_CONTROLLER_CONFIG", other_s)];
    assert_eq!(run_env(&list, &by_env).await.0, 3);
    let (code, _, stderr) = run_env(
        &[
            list.as_slice(),
            &["--config", "/nonexistent/controller.toml"],
        ]
        .concat(),
        &[xdg],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("/nonexistent/controller.toml") && stderr.contains("--config"),
        "{stderr}"
    );

    // The token: a flag over the environment over the file; a wrong one is the API's 401.
    let wrong = home.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let wrong_s = wrong.to_str().unwrap();
    let env_wrong = [xdg, ("POWERNODE_TOKEN_FILE", wrong_s)];
    let (code, _, stderr) = run_env(&list, &env_wrong).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("wrong bearer token (unauthorized)"),
        "{stderr}"
    );
    let good_flag = [list.as_slice(), &["--token-file", token_s]].concat();
    assert_eq!(listed(run_env(&good_flag, &env_wrong).await).len(), 1);
    let inline = std::fs::read_to_string(&token).unwrap();
    let inline_flag = [list.as_slice(), &["--token", inline.trim()]].concat();
    assert_eq!(listed(run_env(&inline_flag, &env_wrong).await).len(), 1);

    // The CA: another CA's certificate fails the handshake, and the message names the file.
    let stranger = home.path().join("stranger.pem");
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&stranger, params.self_signed(&key).unwrap().pem()).unwrap();
    let stranger_s = stranger.to_str().unwrap();
    let (code, _, stderr) = run_env(&list, &[xdg, ("POWERNODE_CA_FILE", stranger_s)]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("TLS with the controller") && stderr.contains(stranger_s),
        "{stderr}"
    );
    server.stop().await;
}
