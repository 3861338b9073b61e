//! enrollmgr killed (SIGKILL, at a named crash point) inside the PKI switch of a certificate
//! rotation, then restarted: the real binary against the real controller (in this process, on
//! loopback, with 8 s certificates). DESIGN §7: it restarts cleanly at any instant and
//! converges to the same state — a key and certificate that belong together, the same node,
//! never enrolled again.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use common::{controller, node_root, resolved_identity, spawn_agent};
use powernode_pubsub::{Dirs, Event, Publication, Subscription};
use powernode_transport::pki::PkiPaths;
use powernode_transport::ControllerClient;
use powernode_types::node_api::{HeartbeatRequest, HeartbeatResponse};
use powernode_types::{EnrollmentState, EnrollmentStatus, NodeIdentity};

const WAIT: Duration = Duration::from_secs(30);

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
    let (dir, root) = node_root();
    let (ctl, token) = controller(dir.path(), Duration::from_secs(8)).await;
    let url = format!("https://127.0.0.1:{}", ctl.addr().port());
    let identity =
        Publication::<NodeIdentity>::open(&Dirs::under_root(&root), "identitymgr").unwrap();
    identity
        .publish(&resolved_identity(
            &format!("uuid-{point}"),
            token,
            &url,
            ctl.ca_pem(),
        ))
        .unwrap();

    // Hit 1 is the enrollment's switch, hit 2 the rotation's (at 6 s of 8).
    let mut child = spawn_agent(&root, "enrollmgr", &format!("{point}:2"));
    let first = wait_status(&root, "Enrolled", |s| s.state == EnrollmentState::Enrolled).await;
    let exit = wait_exit(&mut child).await;
    assert_eq!(exit.signal(), Some(9), "{point}: {exit}");
    let log = std::fs::read_to_string(root.join("enrollmgr.log")).unwrap();
    assert!(
        log.contains(&format!("failpoint {point} hit")),
        "{point}: {log}"
    );

    let mut child = spawn_agent(&root, "enrollmgr", "");
    let after = wait_status(&root, "Enrolled with a rotated certificate", |s| {
        s.state == EnrollmentState::Enrolled && s.cert_fingerprint != first.cert_fingerprint
    })
    .await;
    assert_eq!(after.node_id, first.node_id, "{point}: enrolled again");
    // The pair on disk belongs together and the controller takes it.
    let pki = PkiPaths::under(root.join("persist/powernode"))
        .load()
        .unwrap_or_else(|e| panic!("{point}: {e}"));
    let client = ControllerClient::new(&[url], &pki, Duration::from_secs(5)).unwrap();
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
