//! enrollmgr against a real in-process controller (127.0.0.1, temp data dir, real TLS): the
//! agent runs in-process with a temp root; the test plays identitymgr by publishing
//! `NodeIdentity`.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentbase::{Context, Root, Settings};
use powernode_controller::server::{RunningController, ServeOptions};
use powernode_controller::storage::Storage;
use powernode_pubsub::{Dirs, Event, Publication, Subscription};
use powernode_transport::pki::PkiPaths;
use powernode_transport::ControllerClient;
use powernode_types::node_api::{HeartbeatRequest, HeartbeatResponse};
use powernode_types::{
    EnrollmentState, EnrollmentStatus, IdentitySource, IdentityState, NodeIdentity,
};
use tokio_util::sync::CancellationToken;

/// A controller that can be stopped and started again on the same data dir and port.
struct Ctl {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    lifetime: Duration,
    ca_pem: String,
    running: Option<RunningController>,
}

impl Ctl {
    async fn start(lifetime: Duration) -> Ctl {
        let mut ctl = Ctl {
            dir: tempfile::tempdir().unwrap(),
            addr: "127.0.0.1:0".parse().unwrap(),
            lifetime,
            ca_pem: String::new(),
            running: None,
        };
        ctl.up().await;
        ctl
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    async fn up(&mut self) {
        let opts = ServeOptions {
            data: self.data(),
            listen: self.addr,
            cert_lifetime: self.lifetime,
            hostnames: Vec::new(),
            heartbeat_interval_s: 15,
            database: None,
        };
        let running = RunningController::start(&opts).await.unwrap();
        self.addr = running.addr();
        self.ca_pem = running.ca_pem().to_owned();
        self.running = Some(running);
    }

    async fn down(&mut self) {
        self.running.take().unwrap().stop().await.unwrap();
    }

    async fn storage(&self) -> Storage {
        Storage::open(&self.data()).await.unwrap()
    }

    async fn token(&self) -> String {
        let storage = self.storage().await;
        let token = powernode_controller::tokens::create(&storage, Duration::from_secs(600), None)
            .await
            .unwrap()
            .token;
        storage.close().await;
        token
    }

    /// Fingerprints of the certificates the controller issued to `node_id`.
    async fn issued(&self, node_id: &str) -> Vec<String> {
        let storage = self.storage().await;
        let detail = storage.node_detail(node_id).await.unwrap().unwrap();
        storage.close().await;
        detail
            .certificates
            .into_iter()
            .map(|c| c.fingerprint)
            .collect()
    }
}

/// A node: a temp root, the NodeIdentity it is given, and the agent when running.
struct Node {
    root: tempfile::TempDir,
    identity: Publication<NodeIdentity>,
    agent: Option<(
        CancellationToken,
        tokio::task::JoinHandle<anyhow::Result<()>>,
    )>,
}

impl Node {
    fn new() -> Node {
        let root = tempfile::tempdir().unwrap();
        let identity = Publication::open(&Dirs::under_root(root.path()), "identitymgr").unwrap();
        Node {
            root,
            identity,
            agent: None,
        }
    }

    fn dirs(&self) -> Dirs {
        Dirs::under_root(self.root.path())
    }

    fn pki(&self) -> PkiPaths {
        PkiPaths::under(Root::new(self.root.path()).persist_dir())
    }

    fn give(&self, uuid: &str, token: Option<&str>, url: &str, ca_pem: Option<&str>) {
        self.give_urls(uuid, token, &[url], ca_pem);
    }

    /// [`Node::give`] with a list of controller URLs.
    fn give_urls(&self, uuid: &str, token: Option<&str>, urls: &[&str], ca_pem: Option<&str>) {
        self.identity
            .publish(&NodeIdentity {
                state: IdentityState::Resolved,
                uuid: Some(uuid.to_owned()),
                source: Some(IdentitySource::IdentityCfg),
                boot_id: "boot-1".into(),
                hostname: "edge-1".into(),
                arch: "amd64".into(),
                dmi_uuid: None,
                bootstrap_token: token.map(str::to_owned),
                controller_urls: urls.iter().map(|u| u.to_string()).collect(),
                ca_pem: ca_pem.map(str::to_owned),
                last_error: None,
            })
            .unwrap();
    }

    fn start(&mut self) {
        let mut settings = Settings::default();
        settings.controller.max_backoff_s = 1;
        settings.controller.request_timeout_ms = 3000;
        let ctx = Context::new("enrollmgr", Root::new(self.root.path()), settings).unwrap();
        let shutdown = ctx.shutdown.clone();
        let task = tokio::spawn(enrollmgr::run(ctx));
        self.agent = Some((shutdown, task));
    }

    async fn stop(&mut self) {
        let (shutdown, task) = self.agent.take().unwrap();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("agent stops on shutdown")
            .unwrap()
            .unwrap();
    }

    /// Waits (up to `limit`) for an EnrollmentStatus matching `want`.
    async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        want: impl Fn(&EnrollmentStatus) -> bool,
    ) -> EnrollmentStatus {
        let mut sub = Subscription::<EnrollmentStatus>::connect(&self.dirs(), "enrollmgr");
        let mut last = None;
        let found = tokio::time::timeout(limit, async {
            loop {
                if let Event::Create { value, .. } | Event::Modify { new: value, .. } =
                    sub.next().await
                {
                    if want(&value) {
                        return value;
                    }
                    last = Some(value);
                }
            }
        })
        .await;
        match found {
            Ok(status) => status,
            Err(_) => panic!("no EnrollmentStatus {what} within {limit:?}; last: {last:#?}"),
        }
    }
}

fn fingerprint_of(cert_pem: &str) -> String {
    let cert = enrollmgr::store::cert_info(cert_pem).unwrap();
    cert.fingerprint
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A heartbeat over mTLS with the PKI on disk, the way heartbeatd calls.
async fn heartbeat(node: &Node, url: &str) -> Result<HeartbeatResponse, String> {
    let identity = node.pki().load().map_err(|e| e.to_string())?;
    let client = ControllerClient::new(&[url], &identity, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    let body: HeartbeatRequest =
        serde_json::from_value(serde_json::json!({"boot_id": "boot-1", "agent_version": "0.1.0"}))
            .unwrap();
    client
        .post("status/heartbeat", &body)
        .await
        .map_err(|e| e.to_string())
}

const WAIT: Duration = Duration::from_secs(15);

/// A node given a fresh token, the controller's URL and CA, started and waited for until
/// Enrolled: the node and its first Enrolled status.
async fn enrolled_node(ctl: &Ctl, uuid: &str) -> (Node, EnrollmentStatus) {
    let mut node = Node::new();
    let token = ctl.token().await;
    node.give(uuid, Some(&token), &ctl.url(), Some(&ctl.ca_pem));
    node.start();
    let status = node
        .wait_for(WAIT, "Enrolled", |s| s.state == EnrollmentState::Enrolled)
        .await;
    (node, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolls_once_and_not_again_after_restart() {
    let ctl = Ctl::start(Duration::from_secs(3600)).await;
    let (mut node, status) = enrolled_node(&ctl, "uuid-fresh").await;
    let pki = node.pki();
    let cert_pem = std::fs::read_to_string(pki.cert()).unwrap();
    assert!(pki.key().exists() && pki.ca().exists());
    assert_eq!(mode(&pki.key()), 0o600);
    assert_eq!(std::fs::read_to_string(pki.ca()).unwrap(), ctl.ca_pem);
    let node_id = status.node_id.clone().unwrap();
    let fingerprint = status.cert_fingerprint.clone().unwrap();
    assert_eq!(fingerprint, fingerprint_of(&cert_pem));
    assert_eq!(ctl.issued(&node_id).await, vec![fingerprint.clone()]);
    assert_eq!(status.controller_urls, [ctl.url()]);
    assert!(status.last_error.is_none() && status.rotation_failing_since_ms.is_none());
    let (nb, na, rot) = (
        status.not_before_ms.unwrap(),
        status.not_after_ms.unwrap(),
        status.rotate_at_ms.unwrap(),
    );
    assert!(nb < rot && rot < na, "{nb} {rot} {na}");
    // The certificate is one the controller accepts over mTLS.
    heartbeat(&node, &ctl.url()).await.unwrap();

    node.stop().await;
    node.start();
    // Published again from the files on disk...
    let again = node
        .wait_for(WAIT, "Enrolled after restart", |s| {
            s.state == EnrollmentState::Enrolled
        })
        .await;
    assert_eq!(
        again.cert_fingerprint.as_deref(),
        Some(fingerprint.as_str())
    );
    // ...and no second enrollment: the single-use token would have failed (BadToken), and the
    // controller issued no other certificate.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sub_status = node.wait_for(WAIT, "current", |_| true).await;
    assert_eq!(sub_status.state, EnrollmentState::Enrolled);
    assert_eq!(ctl.issued(&node_id).await, vec![fingerprint]);
    node.stop().await;
}

/// Given a list whose first URL is down, the node enrolls and rotates through the controller
/// that answers, keeps the whole list, and records which one answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolls_and_rotates_through_the_controller_that_answers() {
    let ctl = Ctl::start(Duration::from_secs(8)).await;
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let live = ctl.url();
    let mut node = Node::new();
    let token = ctl.token().await;
    node.give_urls(
        "uuid-list",
        Some(&token),
        &[&down, &live],
        Some(&ctl.ca_pem),
    );
    node.start();
    let enrolled = node
        .wait_for(WAIT, "Enrolled", |s| s.state == EnrollmentState::Enrolled)
        .await;
    assert_eq!(enrolled.controller_urls, [down.clone(), live.clone()]);
    let meta = || {
        let text = std::fs::read_to_string(node.pki().dir().join("enrollment.json")).unwrap();
        enrollmgr::store::Meta::parse(&text).unwrap()
    };
    assert_eq!(meta().controller_url, live);
    assert_eq!(meta().controller_urls, [down.clone(), live.clone()]);

    let old_fp = enrolled.cert_fingerprint.clone().unwrap();
    let rotated = node
        .wait_for(WAIT, "Enrolled with a new certificate", |s| {
            s.state == EnrollmentState::Enrolled && s.cert_fingerprint.as_ref() != Some(&old_fp)
        })
        .await;
    assert_eq!(rotated.controller_urls, [down, live.clone()]);
    assert_eq!(meta().controller_url, live);
    heartbeat(&node, &live).await.unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_reused_tokens_are_bad_tokens() {
    let ctl = Ctl::start(Duration::from_secs(3600)).await;

    let mut wrong = Node::new();
    wrong.give(
        "uuid-wrong",
        Some("not-a-token"),
        &ctl.url(),
        Some(&ctl.ca_pem),
    );
    wrong.start();
    let status = wrong
        .wait_for(WAIT, "BadToken", |s| s.state == EnrollmentState::BadToken)
        .await;
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("invalid_token"),
        "{status:?}"
    );
    assert!(!wrong.pki().cert().exists() && !wrong.pki().key().exists());

    let token = ctl.token().await;
    let mut first = Node::new();
    first.give("uuid-first", Some(&token), &ctl.url(), Some(&ctl.ca_pem));
    first.start();
    first
        .wait_for(WAIT, "Enrolled", |s| s.state == EnrollmentState::Enrolled)
        .await;

    let mut second = Node::new();
    second.give("uuid-second", Some(&token), &ctl.url(), Some(&ctl.ca_pem));
    second.start();
    let status = second
        .wait_for(WAIT, "BadToken", |s| s.state == EnrollmentState::BadToken)
        .await;
    assert!(
        status.last_error.as_deref().unwrap().contains("token_used"),
        "{status:?}"
    );

    // A new token (NodeIdentity changes) lets the refused node enroll.
    let token = ctl.token().await;
    second.give("uuid-second", Some(&token), &ctl.url(), Some(&ctl.ca_pem));
    second
        .wait_for(WAIT, "Enrolled with a new token", |s| {
            s.state == EnrollmentState::Enrolled
        })
        .await;

    for node in [&mut wrong, &mut first, &mut second] {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_ca_is_a_ca_mismatch_and_no_ca_is_refused() {
    let ctl = Ctl::start(Duration::from_secs(3600)).await;
    let other = Ctl::start(Duration::from_secs(3600)).await;
    let token = ctl.token().await;

    let mut node = Node::new();
    node.give("uuid-mitm", Some(&token), &ctl.url(), Some(&other.ca_pem));
    node.start();
    let status = node
        .wait_for(WAIT, "CaMismatch", |s| {
            s.state == EnrollmentState::CaMismatch
        })
        .await;
    assert!(status.last_error.is_some());
    assert!(!node.pki().cert().exists());
    node.stop().await;

    let mut no_ca = Node::new();
    no_ca.give("uuid-noca", Some(&token), &ctl.url(), None);
    no_ca.start();
    let status = no_ca
        .wait_for(WAIT, "NotEnrolled for lack of a CA", |s| {
            s.state == EnrollmentState::NotEnrolled && s.last_error.is_some()
        })
        .await;
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("no controller CA"),
        "{status:?}"
    );
    no_ca.stop().await;

    // The token was never used: a node with the right CA enrolls with it.
    let mut good = Node::new();
    good.give("uuid-good", Some(&token), &ctl.url(), Some(&ctl.ca_pem));
    good.start();
    good.wait_for(WAIT, "Enrolled", |s| s.state == EnrollmentState::Enrolled)
        .await;
    good.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_at_three_quarters_and_the_new_cert_works() {
    let ctl = Ctl::start(Duration::from_secs(8)).await;
    let (mut node, first) = enrolled_node(&ctl, "uuid-rotate").await;
    let old_fp = first.cert_fingerprint.clone().unwrap();
    let old_cert = std::fs::read_to_string(node.pki().cert()).unwrap();

    let rotated = node
        .wait_for(WAIT, "Enrolled with a new certificate", |s| {
            s.state == EnrollmentState::Enrolled && s.cert_fingerprint.as_ref() != Some(&old_fp)
        })
        .await;
    let new_fp = rotated.cert_fingerprint.clone().unwrap();
    assert_eq!(
        new_fp,
        fingerprint_of(&std::fs::read_to_string(node.pki().cert()).unwrap())
    );
    assert_eq!(rotated.node_id, first.node_id);
    assert!(rotated.not_after_ms.unwrap() > first.not_after_ms.unwrap());
    assert_eq!(mode(&node.pki().key()), 0o600);

    // The old certificate is archived as cert.<unix-ms>.pem.
    let archived: Vec<_> = std::fs::read_dir(node.pki().dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("cert.") && n != "cert.pem")
        .collect();
    assert!(!archived.is_empty(), "no archived certificate");
    let contents: Vec<_> = archived
        .iter()
        .map(|n| std::fs::read_to_string(node.pki().dir().join(n)).unwrap())
        .collect();
    assert!(contents.contains(&old_cert), "{archived:?}");
    let ms: u64 = archived[0]
        .trim_start_matches("cert.")
        .trim_end_matches(".pem")
        .parse()
        .unwrap();
    assert!(ms >= first.rotate_at_ms.unwrap());

    // The controller knows both, and accepts the new one over mTLS.
    let issued = ctl.issued(first.node_id.as_deref().unwrap()).await;
    assert!(issued.contains(&old_fp) && issued.contains(&new_fp));
    heartbeat(&node, &ctl.url()).await.unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_failing_while_the_controller_is_down_then_recovers() {
    let mut ctl = Ctl::start(Duration::from_secs(24)).await;
    let (mut node, first) = enrolled_node(&ctl, "uuid-down").await;
    let old_fp = first.cert_fingerprint.clone().unwrap();
    ctl.down().await;

    let failing = node
        .wait_for(Duration::from_secs(30), "RotationFailing", |s| {
            s.state == EnrollmentState::RotationFailing
        })
        .await;
    let since = failing.rotation_failing_since_ms.unwrap();
    assert!(since >= first.rotate_at_ms.unwrap());
    assert!(
        failing.last_error.as_deref().unwrap().contains("connect"),
        "{failing:?}"
    );
    // Still the old, valid certificate.
    assert_eq!(failing.cert_fingerprint.as_deref(), Some(old_fp.as_str()));
    // Retries (backoff capped at 1 s here) keep the first failure's time.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let later = node.wait_for(WAIT, "current", |_| true).await;
    assert_eq!(later.state, EnrollmentState::RotationFailing);
    assert_eq!(later.rotation_failing_since_ms, Some(since));

    ctl.up().await;
    let recovered = node
        .wait_for(WAIT, "Enrolled after the controller is back", |s| {
            s.state == EnrollmentState::Enrolled && s.cert_fingerprint.as_ref() != Some(&old_fp)
        })
        .await;
    assert!(recovered.rotation_failing_since_ms.is_none());
    assert!(recovered.last_error.is_none());
    heartbeat(&node, &ctl.url()).await.unwrap();
    node.stop().await;
    ctl.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_revoked_at_rotation() {
    let ctl = Ctl::start(Duration::from_secs(8)).await;
    let (mut node, first) = enrolled_node(&ctl, "uuid-revoked").await;
    let storage = ctl.storage().await;
    assert!(storage
        .revoke(
            first.node_id.as_deref().unwrap(),
            powernode_controller::now_ms()
        )
        .await
        .unwrap());
    storage.close().await;
    let status = node
        .wait_for(WAIT, "Revoked", |s| s.state == EnrollmentState::Revoked)
        .await;
    assert!(status.last_error.as_deref().unwrap().contains("revoked"));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_needs_a_new_token() {
    let ctl = Ctl::start(Duration::from_secs(3)).await;
    let (mut node, first) = enrolled_node(&ctl, "uuid-expired").await;
    // Stopped before rotation is due, started again after the certificate expired.
    node.stop().await;
    let wait = (first.not_after_ms.unwrap() + 500).saturating_sub(agentbase::health::now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    node.start();
    let expired = node
        .wait_for(WAIT, "CertExpired", |s| {
            s.state == EnrollmentState::CertExpired
        })
        .await;
    assert_eq!(expired.cert_fingerprint, first.cert_fingerprint);
    assert!(expired.last_error.as_deref().unwrap().contains("expired"));
    // The used token is not tried again; a new one re-enrolls the same node.
    let token = ctl.token().await;
    node.give("uuid-expired", Some(&token), &ctl.url(), Some(&ctl.ca_pem));
    let again = node
        .wait_for(WAIT, "Enrolled again", |s| {
            s.state == EnrollmentState::Enrolled && s.cert_fingerprint != first.cert_fingerprint
        })
        .await;
    assert_eq!(again.node_id, first.node_id);
    node.stop().await;
}

/// `persist` fills up while rotation is due: the agent stays up, publishes RotationFailing
/// with the write error (its status is reported not durable, the agent Degraded), and once
/// space is back it rotates and its status reaches the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_during_rotation_keeps_the_agent_up() {
    use powernode_pubsub::testing::SmallTmpfs;
    use powernode_types::{AgentState, AgentStatus};
    if !powernode_pubsub::testing::require(&["root", "mount"]) {
        return;
    }
    let disk = SmallTmpfs::mount("2m").unwrap();
    let ctl = Ctl::start(Duration::from_secs(14)).await;
    let mut node = Node::new();
    std::os::unix::fs::symlink(disk.path(), node.root.path().join("persist")).unwrap();
    let token = ctl.token().await;
    node.give("uuid-full", Some(&token), &ctl.url(), Some(&ctl.ca_pem));
    node.start();
    let first = node
        .wait_for(WAIT, "Enrolled", |s| s.state == EnrollmentState::Enrolled)
        .await;
    let filler = disk.fill("filler").unwrap();

    let failing = node
        .wait_for(WAIT, "RotationFailing", |s| {
            s.state == EnrollmentState::RotationFailing
        })
        .await;
    assert!(
        failing
            .last_error
            .as_deref()
            .unwrap()
            .contains("No space left on device"),
        "{failing:?}"
    );
    let mut agent = Subscription::<AgentStatus>::connect(&node.dirs(), "enrollmgr");
    let degraded = tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Create { value, .. } | Event::Modify { new: value, .. } =
                agent.next().await
            {
                if value.state == AgentState::Degraded {
                    return value;
                }
            }
        }
    })
    .await
    .expect("enrollmgr reports Degraded while the disk is full");
    assert!(degraded.last_error.is_some(), "{degraded:?}");
    assert!(
        !node.agent.as_ref().unwrap().1.is_finished(),
        "enrollmgr exited on a full disk"
    );

    std::fs::remove_file(filler).unwrap();
    let rotated = node
        .wait_for(WAIT, "Enrolled with a new certificate", |s| {
            s.state == EnrollmentState::Enrolled && s.cert_fingerprint != first.cert_fingerprint
        })
        .await;
    // The status on disk catches up: a boot now would read the new certificate's facts.
    let cp = node
        .dirs()
        .checkpoints("enrollmgr", "EnrollmentStatus", true)
        .join("global");
    let on_disk = tokio::time::timeout(WAIT, async {
        loop {
            let status = std::fs::read(&cp).ok().and_then(|bytes| {
                let payload = powernode_pubsub::checkpoint::decode_for(
                    &bytes,
                    "EnrollmentStatus",
                    <EnrollmentStatus as powernode_types::Topic>::SCHEMA_VERSION,
                )
                .ok()?
                .to_vec();
                postcard::from_bytes::<EnrollmentStatus>(&payload).ok()
            });
            match status {
                Some(s) if s.cert_fingerprint == rotated.cert_fingerprint => return s,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the rotated status reaches the disk");
    assert_eq!(on_disk.state, EnrollmentState::Enrolled);
    node.stop().await;
}
