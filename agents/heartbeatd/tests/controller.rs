//! heartbeatd against the real controller: in-process on 127.0.0.1, a temporary data
//! directory, real mTLS. The node is enrolled by the test (enroll endpoint, PKI files,
//! `EnrollmentStatus` published as enrollmgr would) and the agent runs in-process on a
//! temporary root with its own `proc` files.

// The controller's own test helpers: TLS client pinned to its CA, CSRs made the way a node
// makes them, request bodies.
#[path = "../../../controller/tests/common/mod.rs"]
mod common;
// Controllers that cannot be reached, from the transport's own failover tests.
#[path = "../../transport/tests/common/mod.rs"]
mod unreachable;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentbase::{Context, Root, Settings};
use powernode_controller::server::{RunningController, ServeOptions};
use powernode_pubsub::{Publication, Subscription};
use powernode_types::{
    ControllerStatus, EnrollmentState, EnrollmentStatus, IdentitySource, IdentityState,
    ModuleConfig, NetworkConfig, NodeIdentity, Topic, GLOBAL_KEY,
};
use rcgen::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use unreachable::{closed_port, silent};

const BOOT_ID: &str = "2f0c8a8e-3c1e-4c59-9d7e-5b6f7a8b9c0d";
const MEM_TOTAL_KB: u64 = 2_048_000;
const MEM_AVAILABLE_KB: u64 = 1_024_000;
const WAIT: Duration = Duration::from_secs(20);

/// A running controller that can be stopped and started again on the same port and data.
struct Ctl {
    _dir: tempfile::TempDir,
    data: PathBuf,
    addr: SocketAddr,
    lifetime: Duration,
    /// The heartbeat interval handed to nodes, seconds.
    interval_s: u32,
    ca_pem: String,
    operator_token: String,
    running: Option<RunningController>,
}

impl Ctl {
    async fn start(lifetime: Duration) -> Ctl {
        Ctl::start_with_interval(lifetime, 1).await
    }

    /// A controller that hands nodes a heartbeat interval of `interval_s`.
    async fn start_with_interval(lifetime: Duration, interval_s: u32) -> Ctl {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut ctl = Ctl {
            _dir: dir,
            data,
            addr: "127.0.0.1:0".parse().unwrap(),
            lifetime,
            interval_s,
            ca_pem: String::new(),
            operator_token: String::new(),
            running: None,
        };
        ctl.resume().await;
        ctl.operator_token = std::fs::read_to_string(ctl.data.join("operator.token"))
            .unwrap()
            .trim()
            .to_owned();
        ctl
    }

    /// Starts (again) on the same address and data directory.
    async fn resume(&mut self) {
        let opts = ServeOptions {
            data: self.data.clone(),
            listen: self.addr,
            cert_lifetime: self.lifetime,
            hostnames: Vec::new(),
            heartbeat_interval_s: self.interval_s,
            database: None,
        };
        let running = RunningController::start(&opts).await.unwrap();
        self.addr = running.addr();
        self.ca_pem = running.ca_pem().to_owned();
        self.running = Some(running);
    }

    async fn stop(&mut self) {
        self.running.take().unwrap().stop().await.unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    async fn operator(&self, method: hyper::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = common::client(&self.ca_pem, None)
            .request(method, self.url(path))
            .bearer_auth(&self.operator_token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (status, body) = common::status_json(request.send().await.unwrap()).await;
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    async fn set_modules(&self, node_id: &str, modules: Value) -> u64 {
        let reply = self
            .operator(
                hyper::Method::PUT,
                &format!("/api/v1/nodes/{node_id}/desired/modules"),
                Some(json!({ "modules": modules })),
            )
            .await;
        reply["generation"].as_u64().unwrap()
    }

    async fn node(&self, node_id: &str) -> Value {
        self.operator(
            hyper::Method::GET,
            &format!("/api/v1/nodes/{node_id}"),
            None,
        )
        .await
    }

    /// Enrolls a node: its key, certificate and the CA, as enrollmgr would write them.
    async fn enroll(&self, uuid: &str) -> Creds {
        let token = self
            .operator(hyper::Method::POST, "/api/v1/tokens", Some(json!({})))
            .await["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let reply = common::client(&self.ca_pem, None)
            .post(self.url("/node_api/v1/enroll"))
            .json(&common::enroll_body(&token, &common::csr_pem(&key), uuid))
            .send()
            .await
            .unwrap();
        let (status, body) = common::status_json(reply).await;
        assert_eq!(status, 200, "{body}");
        Creds {
            node_id: body["node_id"].as_str().unwrap().to_owned(),
            cert_pem: body["cert_pem"].as_str().unwrap().to_owned(),
            key_pem: key.serialize_pem(),
            ca_pem: body["ca_chain_pem"].as_str().unwrap().to_owned(),
            not_after_ms: body["not_after_ms"].as_u64().unwrap(),
        }
    }

    /// Rotates `creds` through the node API (with the current certificate).
    async fn rotate(&self, creds: &Creds) -> Creds {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let reply = common::client(&self.ca_pem, Some((&creds.cert_pem, &creds.key_pem)))
            .post(self.url("/node_api/v1/certificates/rotate"))
            .json(&json!({ "csr_pem": common::csr_pem(&key) }))
            .send()
            .await
            .unwrap();
        let (status, body) = common::status_json(reply).await;
        assert_eq!(status, 200, "{body}");
        Creds {
            node_id: creds.node_id.clone(),
            cert_pem: body["cert_pem"].as_str().unwrap().to_owned(),
            key_pem: key.serialize_pem(),
            ca_pem: body["ca_chain_pem"].as_str().unwrap().to_owned(),
            not_after_ms: body["not_after_ms"].as_u64().unwrap(),
        }
    }
}

#[derive(Clone)]
struct Creds {
    node_id: String,
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
    not_after_ms: u64,
}

impl Creds {
    fn fingerprint(&self) -> String {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A node root with the other agents' topics published by the test, and heartbeatd running.
struct Node {
    tmp: tempfile::TempDir,
    dirs: powernode_pubsub::Dirs,
    _identity: Publication<NodeIdentity>,
    enrollment: Publication<EnrollmentStatus>,
    max_backoff_s: u64,
    /// The controller URLs enrollmgr would publish.
    urls: Vec<String>,
    agent: Option<(Context, tokio::task::JoinHandle<anyhow::Result<()>>)>,
}

impl Node {
    async fn new(ctl: &Ctl, creds: &Creds) -> Node {
        Node::with_max_backoff(ctl, creds, 4).await
    }

    /// A node whose failed heartbeats back off up to `max_backoff_s`.
    async fn with_max_backoff(ctl: &Ctl, creds: &Creds, max_backoff_s: u64) -> Node {
        Node::with_urls(creds, max_backoff_s, vec![ctl.url("")]).await
    }

    /// A node enrolled with the controller URLs `urls`.
    async fn with_urls(creds: &Creds, max_backoff_s: u64, urls: Vec<String>) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "proc/uptime", "4242.17 8000.00\n");
        write(root, "proc/loadavg", "0.25 0.50 0.75 1/234 5678\n");
        write(
            root,
            "proc/meminfo",
            &format!(
                "MemTotal:       {MEM_TOTAL_KB} kB\nMemFree:          100 kB\n\
                 MemAvailable:   {MEM_AVAILABLE_KB} kB\n"
            ),
        );
        let dirs = powernode_pubsub::Dirs::under_root(root);
        let identity = Publication::<NodeIdentity>::open(&dirs, "identitymgr").unwrap();
        identity
            .publish(&NodeIdentity {
                state: IdentityState::Resolved,
                uuid: Some("6a1f3f0e-0000-4000-8000-000000000001".to_owned()),
                source: Some(IdentitySource::IdentityCfg),
                boot_id: BOOT_ID.to_owned(),
                hostname: "edge-1".to_owned(),
                arch: "amd64".to_owned(),
                dmi_uuid: None,
                bootstrap_token: None,
                controller_urls: Vec::new(),
                ca_pem: None,
                last_error: None,
            })
            .unwrap();
        let enrollment = Publication::<EnrollmentStatus>::open(&dirs, "enrollmgr").unwrap();
        let mut node = Node {
            tmp,
            dirs,
            _identity: identity,
            enrollment,
            max_backoff_s,
            urls,
            agent: None,
        };
        node.install(creds);
        node.start();
        node
    }

    /// Writes the PKI files (atomically, as enrollmgr does) and publishes the enrollment.
    fn install(&mut self, creds: &Creds) {
        let pki = self.tmp.path().join("persist/powernode/pki");
        std::fs::create_dir_all(&pki).unwrap();
        for (name, text) in [
            ("ca.pem", &creds.ca_pem),
            ("cert.pem", &creds.cert_pem),
            ("key.pem", &creds.key_pem),
        ] {
            let tmp = pki.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, pki.join(name)).unwrap();
        }
        self.enrollment
            .publish(&EnrollmentStatus {
                state: EnrollmentState::Enrolled,
                node_id: Some(creds.node_id.clone()),
                cert_fingerprint: Some(creds.fingerprint()),
                not_before_ms: None,
                not_after_ms: Some(creds.not_after_ms),
                rotate_at_ms: None,
                controller_urls: self.urls.clone(),
                rotation_failing_since_ms: None,
                rotation_attempts: 0,
                last_error: None,
            })
            .unwrap();
    }

    fn start(&mut self) {
        let mut settings = Settings::default();
        settings.controller.heartbeat_interval_s = 1;
        settings.controller.max_backoff_s = self.max_backoff_s;
        settings.controller.request_timeout_ms = 3_000;
        let ctx = Context::new("heartbeatd", Root::new(self.tmp.path()), settings).unwrap();
        let task = tokio::spawn(heartbeatd::run(ctx.clone()));
        self.agent = Some((ctx, task));
    }

    async fn stop(&mut self) {
        let (ctx, task) = self.agent.take().unwrap();
        ctx.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("heartbeatd stops at once on shutdown")
            .unwrap()
            .unwrap();
    }

    fn subscribe<T: Topic>(&self) -> Subscription<T> {
        Subscription::<T>::connect(&self.dirs, "heartbeatd")
    }
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Waits until the subscription's items satisfy `done`.
async fn wait_for<T: Topic>(
    sub: &mut Subscription<T>,
    what: &str,
    mut done: impl FnMut(&Subscription<T>) -> bool,
) {
    let waited = tokio::time::timeout(WAIT, async {
        while !done(sub) {
            sub.next().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

/// Polls the operator API until the node's latest heartbeat satisfies `done`; returns it.
async fn wait_heartbeat(ctl: &Ctl, node_id: &str, mut done: impl FnMut(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let node = ctl.node(node_id).await;
        let hb = &node["last_heartbeat"];
        if !hb.is_null() && done(hb) {
            return hb.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out; last heartbeat {hb}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn status(sub: &Subscription<ControllerStatus>) -> Option<&ControllerStatus> {
    sub.get(GLOBAL_KEY)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_publishes_the_desired_state() {
    let ctl = Ctl::start(Duration::from_secs(3600)).await;
    let creds = ctl.enroll("6a1f3f0e-0000-4000-8000-000000000001").await;
    let mut node = Node::new(&ctl, &creds).await;
    let mut statuses = node.subscribe::<ControllerStatus>();
    let mut modules = node.subscribe::<ModuleConfig>();
    let mut network = node.subscribe::<NetworkConfig>();

    wait_for(&mut statuses, "reachable", |s| {
        status(s).is_some_and(|s| s.reachable)
    })
    .await;
    let st = status(&statuses).unwrap().clone();
    assert_eq!(st.consecutive_failures, 0);
    assert_eq!(
        st.heartbeat_interval_s, 1,
        "the controller's interval is used"
    );
    assert!(st.last_success_ms.is_some());
    assert!(st.clock_skew_ms.unwrap().abs() < 5_000, "{st:?}");
    assert_eq!(st.last_error, None);

    // What the controller stored is what the node reported.
    let hb = wait_heartbeat(&ctl, &creds.node_id, |_| true).await;
    assert_eq!(hb["boot_id"], BOOT_ID);
    assert_eq!(hb["agent_version"], env!("CARGO_PKG_VERSION"));
    let body = &hb["body"];
    assert_eq!(body["arch"], "amd64");
    assert_eq!(body["uptime_s"], 4242);
    assert_eq!(body["load"], json!([0.25, 0.5, 0.75]));
    assert_eq!(body["memory"]["total_bytes"], MEM_TOTAL_KB * 1024);
    assert_eq!(body["memory"]["available_bytes"], MEM_AVAILABLE_KB * 1024);
    assert_eq!(body["modules"], json!([]));
    assert_eq!(body["applied_generation"], 0);

    // Desired modules → ModuleConfig items of that generation.
    let g1 = ctl
        .set_modules(
            &creds.node_id,
            json!([
                {"name": "tools", "reference": "registry.test/modules/tools:1", "priority": 10},
                {"name": "base", "reference": "registry.test/modules/base:3", "priority": 1},
            ]),
        )
        .await;
    wait_for(&mut modules, "two modules", |m| {
        m.len() == 2 && m.items().all(|(_, v)| v.generation == g1)
    })
    .await;
    let tools = modules.get("tools").unwrap();
    assert_eq!(tools.reference, "registry.test/modules/tools:1");
    assert_eq!(tools.priority, 10);
    wait_for(&mut statuses, "applied generation", |s| {
        status(s).is_some_and(|s| s.applied_generation == g1)
    })
    .await;
    wait_heartbeat(&ctl, &creds.node_id, |hb| {
        hb["applied_generation"].as_u64() == Some(g1)
    })
    .await;

    // A module that disappears is unpublished.
    let g2 = ctl
        .set_modules(
            &creds.node_id,
            json!([{"name": "tools", "reference": "registry.test/modules/tools:2", "priority": 10}]),
        )
        .await;
    wait_for(&mut modules, "base removed", |m| {
        m.len() == 1 && m.get("tools").is_some_and(|t| t.generation == g2)
    })
    .await;
    assert_eq!(
        modules.get("tools").unwrap().reference,
        "registry.test/modules/tools:2"
    );

    // Network: published, then unpublished when the controller sets it to null.
    let reply = ctl
        .operator(
            hyper::Method::PUT,
            &format!("/api/v1/nodes/{}/desired/network", creds.node_id),
            Some(json!({"network": {
                "interface": "pn0", "address": "10.88.0.7/16", "listen_port": 51820,
                "peers": [{"public_key": "cGVlci1wdWJsaWMta2V5LW9mLTMyLWJ5dGVzLi4uLi4=",
                           "endpoint": "203.0.113.1:51820",
                           "allowed_ips": ["10.88.0.1/32"], "keepalive_s": 25}]}})),
        )
        .await;
    let g3 = reply["generation"].as_u64().unwrap();
    wait_for(&mut network, "network", |n| {
        n.get(GLOBAL_KEY).is_some_and(|n| n.generation == g3)
    })
    .await;
    let net = network.get(GLOBAL_KEY).unwrap();
    assert_eq!(net.interface, "pn0");
    assert_eq!(net.peers[0].keepalive_s, Some(25));
    assert_eq!(net.peers[0].endpoint.as_deref(), Some("203.0.113.1:51820"));
    let reply = ctl
        .operator(
            hyper::Method::PUT,
            &format!("/api/v1/nodes/{}/desired/network", creds.node_id),
            Some(json!({"network": null})),
        )
        .await;
    let g4 = reply["generation"].as_u64().unwrap();
    wait_for(&mut network, "network removed", |n| n.is_empty()).await;
    wait_for(&mut statuses, "generation g4", |s| {
        status(s).is_some_and(|s| s.applied_generation == g4)
    })
    .await;
    // The modules stay, from the generation that changed them.
    assert_eq!(modules.get("tools").unwrap().generation, g2);

    // A restarted agent reports the generation it had applied from its first heartbeat on.
    node.stop().await;
    let restarted_at = now_ms();
    node.start();
    let hb = wait_heartbeat(&ctl, &creds.node_id, |hb| {
        hb["received_at_ms"].as_u64().unwrap() > restarted_at
    })
    .await;
    assert_eq!(hb["applied_generation"].as_u64(), Some(g4));
    node.stop().await;
}

/// The controller stopped (its port refuses connections): the node keeps trying within one
/// interval rather than waiting out its (here 60 s) backoff, and is back within about one
/// interval of the controller's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_outage_retries_within_the_interval_and_recovers() {
    let mut ctl = Ctl::start(Duration::from_secs(3600)).await;
    let creds = ctl.enroll("6a1f3f0e-0000-4000-8000-000000000002").await;
    let mut node = Node::with_max_backoff(&ctl, &creds, 60).await;
    let mut statuses = node.subscribe::<ControllerStatus>();
    wait_for(&mut statuses, "reachable", |s| {
        status(s).is_some_and(|s| s.reachable)
    })
    .await;

    ctl.stop().await;
    wait_for(&mut statuses, "unreachable", |s| {
        status(s).is_some_and(|s| !s.reachable)
    })
    .await;
    let first = status(&statuses).unwrap().clone();
    assert_eq!(first.consecutive_failures, 1);
    assert!(
        first.last_error.as_deref().unwrap().contains("connect"),
        "{first:?}"
    );
    assert!(first.last_success_ms.is_some(), "the last success is kept");
    // Refused connections are retried every 0.5-1 s (the 1 s interval, spread), not after
    // the backoff's 1, 2, 4, 8 s: in 8 s at least 7 attempts, where backoff makes 4 at most.
    let down_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    wait_for(&mut statuses, "failures grow", |s| {
        status(s).is_some_and(|s| s.consecutive_failures >= 7)
    })
    .await;
    let failures = status(&statuses).unwrap().consecutive_failures;
    assert!(
        failures <= 18,
        "{failures} failures in {:?}: faster than half the interval",
        down_at.elapsed()
    );

    ctl.resume().await;
    let back_at = tokio::time::Instant::now();
    wait_for(&mut statuses, "reachable again", |s| {
        status(s).is_some_and(|s| s.reachable && s.consecutive_failures == 0)
    })
    .await;
    // One interval (1 s) and a TLS handshake; the backoff would have been 6-10 s.
    let recovery = back_at.elapsed();
    assert!(
        recovery < Duration::from_secs(3),
        "back {recovery:?} after the controller"
    );
    assert_eq!(status(&statuses).unwrap().last_error, None);
    node.stop().await;
    ctl.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_enrollment_and_picks_up_a_rotated_certificate() {
    // Certificates live 10 s: heartbeats after the first one expired prove the new one is used.
    let ctl = Ctl::start(Duration::from_secs(10)).await;
    let creds = ctl.enroll("6a1f3f0e-0000-4000-8000-000000000003").await;
    let mut node = Node::new(&ctl, &creds).await;
    let mut statuses = node.subscribe::<ControllerStatus>();
    wait_for(&mut statuses, "reachable", |s| {
        status(s).is_some_and(|s| s.reachable)
    })
    .await;

    // Not enrolled: nothing is sent, and the status says why.
    let mut waiting = node.enrollment.get(GLOBAL_KEY).unwrap();
    waiting.state = EnrollmentState::Enrolling;
    node.enrollment.publish(&waiting).unwrap();
    wait_for(&mut statuses, "waiting", |s| {
        status(s).is_some_and(|s| {
            !s.reachable
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("not enrolled"))
        })
    })
    .await;
    assert_eq!(status(&statuses).unwrap().consecutive_failures, 0);

    // Rotation halfway through the first certificate's life.
    let rotate_at = creds.not_after_ms - 5_000;
    tokio::time::sleep(Duration::from_millis(rotate_at.saturating_sub(now_ms()))).await;
    let rotated = ctl.rotate(&creds).await;
    assert_ne!(rotated.fingerprint(), creds.fingerprint());
    node.install(&rotated);

    // Heartbeats keep succeeding after the first certificate expired.
    let hb = wait_heartbeat(&ctl, &creds.node_id, |hb| {
        hb["received_at_ms"].as_u64().unwrap() > creds.not_after_ms + 500
    })
    .await;
    assert_eq!(hb["boot_id"], BOOT_ID);
    wait_for(&mut statuses, "reachable with the new certificate", |s| {
        status(s).is_some_and(|s| s.reachable && s.last_success_ms > Some(creds.not_after_ms))
    })
    .await;
    node.stop().await;
}

/// The watch: with an hour between heartbeats, a module the operator assigns still reaches
/// the node's ModuleConfig within a second or two, because heartbeatd holds a long-poll that
/// the controller answers at once and then heartbeats. Twice, so the watch is held again after
/// the first answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_watch_brings_a_new_desired_state_at_once() {
    let ctl = Ctl::start_with_interval(Duration::from_secs(3600), 3600).await;
    let creds = ctl.enroll("6a1f3f0e-0000-4000-8000-000000000001").await;
    let node = Node::new(&ctl, &creds).await;
    let mut statuses = node.subscribe::<ControllerStatus>();
    let mut modules = node.subscribe::<ModuleConfig>();
    wait_for(&mut statuses, "the hour-long interval", |s| {
        status(s).is_some_and(|s| s.reachable && s.heartbeat_interval_s == 3600)
    })
    .await;
    for round in 1..=2 {
        // Let the watcher get its request to the controller after the last heartbeat.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let name = format!("tools{round}");
        let assigned = std::time::Instant::now();
        let generation = ctl
            .set_modules(
                &creds.node_id,
                json!([{"name": name, "reference": "registry.test/modules/tools:1", "priority": 1}]),
            )
            .await;
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while modules
                .get(&name)
                .is_none_or(|m| m.generation != generation)
            {
                modules.next().await;
            }
        })
        .await;
        let took = assigned.elapsed();
        assert!(
            waited.is_ok(),
            "round {round}: the assignment did not reach the node within 5 s \
             (the next heartbeat is an hour away)"
        );
        println!("round {round}: operator call -> ModuleConfig in {took:?}");
    }
}

/// Several controller URLs: a refused port and a hung listener before the live controller.
/// heartbeatd reaches the live one, says so in `ControllerStatus.controller_url`, and stays
/// with it (the hung one is not tried again). The controller is then stopped and started on
/// the address of the first URL: heartbeatd moves to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_between_controller_urls_and_follows_the_controller() {
    let mut ctl = Ctl::start(Duration::from_secs(3600)).await;
    let creds = ctl.enroll("6a1f3f0e-0000-4000-8000-000000000001").await;
    let first = closed_port();
    let (hung, hung_accepted) = silent().await;
    let first_url = format!("https://127.0.0.1:{}", first.port());
    let live_url = ctl.url("");
    let urls = vec![
        first_url.clone(),
        format!("https://127.0.0.1:{}", hung.port()),
        live_url.clone(),
    ];
    let mut node = Node::with_urls(&creds, 2, urls).await;
    let mut statuses = node.subscribe::<ControllerStatus>();
    wait_for(&mut statuses, "reachable through the third URL", |s| {
        status(s).is_some_and(|s| s.reachable && s.controller_url.as_deref() == Some(&live_url))
    })
    .await;
    assert_eq!(hung_accepted.load(Ordering::SeqCst), 1);
    // Three more heartbeats (the interval is 1 s) and the watch: all to the live controller.
    let seen = now_ms();
    wait_heartbeat(&ctl, &creds.node_id, |hb| {
        hb["received_at_ms"].as_u64().unwrap() > seen + 2_500
    })
    .await;
    assert_eq!(
        hung_accepted.load(Ordering::SeqCst),
        1,
        "the hung controller was tried again"
    );
    assert_eq!(status(&statuses).unwrap().consecutive_failures, 0);

    // The controller moves to the first URL's address (same data, same CA).
    ctl.stop().await;
    ctl.addr = first;
    ctl.resume().await;
    assert_eq!(ctl.url(""), first_url);
    wait_for(&mut statuses, "reachable through the first URL", |s| {
        status(s).is_some_and(|s| s.reachable && s.controller_url.as_deref() == Some(&first_url))
    })
    .await;
    let moved = now_ms();
    wait_heartbeat(&ctl, &creds.node_id, |hb| {
        hb["received_at_ms"].as_u64().unwrap() > moved
    })
    .await;
    node.stop().await;
}
