//! enrollmgr killed (SIGKILL, at a named crash point) inside the PKI switch of a certificate
//! rotation, then restarted: the real binary against the real controller (in this process, on
//! loopback, with 8 s certificates). DESIGN §7: it restarts cleanly at any instant and
//! converges to the same state — a key and certificate that belong together, the same node,
//! never enrolled again.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::bin;
use powernode_controller::server::{RunningController, ServeOptions};
use powernode_controller::storage::Storage;
use powernode_pubsub::{Dirs, Event, Publication, Subscription};
use powernode_transport::pki::PkiPaths;
use powernode_transport::ControllerClient;
use powernode_types::node_api::{HeartbeatRequest, HeartbeatResponse};
use powernode_types::{
    EnrollmentState, EnrollmentStatus, IdentitySource, IdentityState, NodeIdentity,
};

const WAIT: Duration = Duration::from_secs(30);

/// The controller with a fresh token for one node.
async fn controller(dir: &Path) -> (RunningController, String) {
    let opts = ServeOptions {
        data: dir.join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        cert_lifetime: Duration::from_secs(8),
        hostnames: Vec::new(),
        heartbeat_interval_s: 15,
    };
    let running = RunningController::start(&opts).await.unwrap();
    let storage = Storage::open(&opts.data).await.unwrap();
    let token = powernode_controller::tokens::create(&storage, Duration::from_secs(600), None)
        .await
        .unwrap()
        .token;
    storage.close().await;
    (running, token)
}

/// `powernode-agent run enrollmgr` under `root`, logging to `root/enrollmgr.log`.
fn enrollmgr(root: &Path, failpoints: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("enrollmgr.log"))
        .unwrap();
    Command::new(bin())
        .args(["run", "enrollmgr", "--root"])
        .arg(root)
        .env("POWERNODE_FAILPOINTS", failpoints)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn wait_status(
    root: &Path,
    what: &str,
    want: impl Fn(&EnrollmentStatus) -> bool,
) -> EnrollmentStatus {
    let mut sub = Subscription::<EnrollmentStatus>::connect(&Dirs::under_root(root), "enrollmgr");
    let found = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Create { value, .. } | Event::Modify { new: value, .. } = sub.next().await
            {
                if want(&value) {
                    return value;
                }
            }
        }
    })
    .await;
    let log = std::fs::read_to_string(root.join("enrollmgr.log")).unwrap_or_default();
    found.unwrap_or_else(|_| panic!("no EnrollmentStatus {what} within {WAIT:?}\n{log}"))
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..(WAIT.as_millis() / 20) {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("enrollmgr did not die at its crash point");
}

/// One crash point: enroll, die at the rotation's switch, restart, converge.
async fn kill_at(point: &str) {
    let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc/powernode")).unwrap();
    std::fs::write(
        root.join("etc/powernode/agent.toml"),
        "[controller]\nmax_backoff_s = 1\nrequest_timeout_ms = 3000\n",
    )
    .unwrap();
    let (ctl, token) = controller(dir.path()).await;
    let url = format!("https://127.0.0.1:{}", ctl.addr().port());
    let identity =
        Publication::<NodeIdentity>::open(&Dirs::under_root(&root), "identitymgr").unwrap();
    identity
        .publish(&NodeIdentity {
            state: IdentityState::Resolved,
            uuid: Some(format!("uuid-{point}")),
            source: Some(IdentitySource::IdentityCfg),
            boot_id: "boot-1".into(),
            hostname: "edge-1".into(),
            arch: "amd64".into(),
            dmi_uuid: None,
            bootstrap_token: Some(token),
            controller_url: Some(url.clone()),
            ca_pem: Some(ctl.ca_pem().to_owned()),
            last_error: None,
        })
        .unwrap();

    // Hit 1 is the enrollment's switch, hit 2 the rotation's (at 6 s of 8).
    let mut child = enrollmgr(&root, &format!("{point}:2"));
    let first = wait_status(&root, "Enrolled", |s| s.state == EnrollmentState::Enrolled).await;
    let exit = wait_exit(&mut child).await;
    assert_eq!(exit.signal(), Some(9), "{point}: {exit}");
    let log = std::fs::read_to_string(root.join("enrollmgr.log")).unwrap();
    assert!(
        log.contains(&format!("failpoint {point} hit")),
        "{point}: {log}"
    );

    let mut child = enrollmgr(&root, "");
    let after = wait_status(&root, "Enrolled with a rotated certificate", |s| {
        s.state == EnrollmentState::Enrolled && s.cert_fingerprint != first.cert_fingerprint
    })
    .await;
    assert_eq!(after.node_id, first.node_id, "{point}: enrolled again");
    // The pair on disk belongs together and the controller takes it.
    let pki = PkiPaths::under(root.join("persist/powernode"))
        .load()
        .unwrap_or_else(|e| panic!("{point}: {e}"));
    let client = ControllerClient::new(&url, &pki, Duration::from_secs(5)).unwrap();
    let body: HeartbeatRequest =
        serde_json::from_value(serde_json::json!({"boot_id": "boot-1", "agent_version": "0.1.0"}))
            .unwrap();
    let _: HeartbeatResponse = client
        .post("status/heartbeat", &body)
        .await
        .unwrap_or_else(|e| panic!("{point}: heartbeat with the PKI on disk: {e}"));
    let quarantine = root.join("persist/powernode/pki/.quarantine");
    assert!(!quarantine.exists(), "{point}");
    let _ = child.kill();
    let _ = child.wait();
    ctl.stop().await.unwrap();
}

/// The three windows of the switch, each in its own node and controller, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_inside_the_pki_switch_enrollmgr_keeps_one_identity() {
    tokio::join!(
        kill_at("pki.key_staged"),
        kill_at("pki.both_staged"),
        kill_at("pki.key_switched"),
    );
}
