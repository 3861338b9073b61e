//! The events of enrollmgr, heartbeatd and identitymgr, each from its real scenario: the real
//! agents (the built `powernode-agent`), the real eventd journalling and delivering, the real
//! controller storing — queried here through its storage, as an operator's `events` would.
//! Intervals are short through the node's settings and the controller's options, so each
//! scenario takes seconds.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{resolved_identity, spawn_agent};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use powernode_controller::server::{RunningController, ServeOptions};
use powernode_controller::storage::{EventQuery, NodeEnrollment, Storage, StoredEvent};
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::{EnrollmentState, EnrollmentStatus, NodeIdentity, Severity};

/// How long a scenario waits for what it expects before it fails.
const WAIT: Duration = Duration::from_secs(45);

/// A controller that can be stopped and started again on the same data dir and port.
struct Ctl {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    lifetime: Duration,
    heartbeat_interval_s: u32,
    ca_pem: String,
    running: Option<RunningController>,
    storage: Option<Storage>,
}

impl Ctl {
    async fn start(lifetime: Duration, heartbeat_interval_s: u32) -> Ctl {
        let mut ctl = Ctl {
            dir: tempfile::Builder::new().prefix("pnc").tempdir().unwrap(),
            addr: "127.0.0.1:0".parse().unwrap(),
            lifetime,
            heartbeat_interval_s,
            ca_pem: String::new(),
            running: None,
            storage: None,
        };
        ctl.up().await;
        ctl.storage = Some(Storage::open(&ctl.data()).await.unwrap());
        ctl
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn storage(&self) -> &Storage {
        self.storage.as_ref().unwrap()
    }

    async fn up(&mut self) {
        let opts = ServeOptions {
            data: self.data(),
            listen: self.addr,
            cert_lifetime: self.lifetime,
            hostnames: Vec::new(),
            heartbeat_interval_s: self.heartbeat_interval_s,
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

    async fn token(&self) -> String {
        powernode_controller::tokens::create(self.storage(), Duration::from_secs(600), None)
            .await
            .unwrap()
            .token
    }

    /// The one node enrolled, once there is one.
    async fn node_id(&self, node: &Node) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(n) = self.storage().list_nodes().await.unwrap().first() {
                return n.id.clone();
            }
            node.check(deadline, "no node enrolled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// At least `n` events of `kind`, oldest first, once the controller holds them.
    async fn events(&self, node: &Node, kind: &str, n: usize) -> Vec<StoredEvent> {
        let query = EventQuery {
            kind: Some(kind.to_owned()),
            limit: 1000,
            ..EventQuery::default()
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let stored = self.storage().events(&query).await.unwrap();
            if stored.len() >= n {
                return stored;
            }
            node.check(
                deadline,
                &format!("{} of {n} {kind} events stored", stored.len()),
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every event of `agent` once the controller holds all it raised in `starts` runs: a
    /// start takes its numbers from a block of 1,000 of its own (agentbase), so each block
    /// must be there from its first number on, without a hole.
    async fn all_of(&self, node: &Node, agent: &str, starts: usize) -> Vec<StoredEvent> {
        let query = EventQuery {
            limit: 1000,
            ..EventQuery::default()
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let mine: Vec<StoredEvent> = self
                .storage()
                .events(&query)
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.agent == agent)
                .collect();
            let mut blocks = std::collections::BTreeMap::<i64, Vec<i64>>::new();
            for e in &mine {
                blocks.entry((e.seq - 1) / 1000).or_default().push(e.seq);
            }
            let whole = blocks.iter_mut().all(|(block, seqs)| {
                seqs.sort_unstable();
                seqs.iter()
                    .copied()
                    .eq(block * 1000 + 1..=block * 1000 + seqs.len() as i64)
            });
            if whole && blocks.len() == starts {
                return mine;
            }
            node.check(
                deadline,
                &format!("not all {agent} events of {starts} starts: {blocks:?}"),
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node's enrollment state as stored from its heartbeats, once `wanted` accepts it.
    async fn enrollment(
        &self,
        node: &Node,
        node_id: &str,
        wanted: impl Fn(&NodeEnrollment) -> bool,
    ) -> NodeEnrollment {
        let deadline = Instant::now() + WAIT;
        loop {
            let stored = self.storage().node_enrollment(node_id).await.unwrap();
            if let Some(e) = stored.filter(|e| wanted(e)) {
                return e;
            }
            node.check(deadline, "the enrollment state wanted was never stored");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A node root with short intervals, the agents running in it (killed when dropped), and the
/// `NodeIdentity` the test publishes when it plays identitymgr.
struct Node {
    _dir: tempfile::TempDir,
    root: PathBuf,
    agents: Vec<(&'static str, Child)>,
    identity: Option<Publication<NodeIdentity>>,
}

impl Node {
    /// Heartbeats every `interval_s` (until the controller says otherwise), retries at most
    /// every second, `controller.unreachable` after `unreachable_after` intervals.
    fn new(interval_s: u32, unreachable_after: u32, extra: &str) -> Node {
        let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
        let root = dir.path().join("root");
        write(
            &root,
            "etc/powernode/agent.toml",
            &format!(
                "touch_interval_s = 1\n{extra}\n[controller]\nmax_backoff_s = 1\n\
                 request_timeout_ms = 3000\nheartbeat_interval_s = {interval_s}\n\
                 unreachable_after_intervals = {unreachable_after}\n"
            ),
        );
        Node {
            _dir: dir,
            root,
            agents: Vec::new(),
            identity: None,
        }
    }

    fn start(&mut self, agent: &'static str) {
        self.agents
            .push((agent, spawn_agent(&self.root, agent, "")));
    }

    /// Kills `agent` with SIGKILL; starts it again unless `stay_down`.
    fn kill(&mut self, agent: &str, stay_down: bool) {
        let i = self.agents.iter().position(|(a, _)| *a == agent).unwrap();
        let (name, mut child) = self.agents.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        if !stay_down {
            self.start(name);
        }
    }

    fn pid(&self, agent: &str) -> Pid {
        let (_, child) = self.agents.iter().find(|(a, _)| *a == agent).unwrap();
        Pid::from_raw(i32::try_from(child.id()).unwrap())
    }

    /// Publishes `identity` as identitymgr would.
    fn give(&mut self, identity: NodeIdentity) {
        let root = self.root.clone();
        let publication = self.identity.get_or_insert_with(|| {
            Publication::open(&Dirs::under_root(root), "identitymgr").unwrap()
        });
        publication.publish(&identity).unwrap();
    }

    fn dirs(&self) -> Dirs {
        Dirs::under_root(&self.root)
    }

    /// Fails the test past `deadline` with `what` and every agent's log.
    #[track_caller]
    fn check(&self, deadline: Instant, what: &str) {
        if Instant::now() >= deadline {
            common::fail_with_logs(&self.root, self.agents.iter().map(|(a, _)| *a), what);
        }
    }

    /// enrollmgr's status, once `wanted` accepts it.
    async fn enrollment(
        &self,
        sub: &mut Subscription<EnrollmentStatus>,
        what: &str,
        wanted: impl Fn(&EnrollmentStatus) -> bool,
    ) -> EnrollmentStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = sub.get("global").filter(|s| wanted(s)) {
                return s.clone();
            }
            self.check(deadline, &format!("enrollmgr never published {what}"));
            let _ = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
        }
    }
}

impl Node {
    /// Waits until enrollmgr's `EnrollmentStatus` checkpoint on disk is in `state`:
    /// subscribers see a publish before its checkpoint is written, and a kill in between
    /// would have the restart read the state before it.
    async fn checkpointed(&self, state: EnrollmentState) {
        let file = self
            .dirs()
            .checkpoints("enrollmgr", "EnrollmentStatus", true)
            .join("global");
        let deadline = Instant::now() + WAIT;
        loop {
            let on_disk = std::fs::read(&file).ok().and_then(|bytes| {
                let payload = powernode_pubsub::checkpoint::decode_for(
                    &bytes,
                    "EnrollmentStatus",
                    <EnrollmentStatus as powernode_types::Topic>::SCHEMA_VERSION,
                )
                .ok()?
                .to_vec();
                postcard::from_bytes::<EnrollmentStatus>(&payload).ok()
            });
            if on_disk.is_some_and(|s| s.state == state) {
                return;
            }
            self.check(deadline, &format!("{state:?} never checkpointed"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for (_, child) in &mut self.agents {
            // A stopped process dies of SIGKILL as well.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn write(root: &Path, rel: &str, contents: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

/// The value of `name` in `event`'s fields; fails the test if it has none.
#[track_caller]
fn field<'a>(event: &'a StoredEvent, name: &str) -> &'a str {
    event
        .fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no field {name} in {event:?}"))
}

#[track_caller]
fn number(event: &StoredEvent, name: &str) -> u64 {
    field(event, name)
        .parse()
        .unwrap_or_else(|e| panic!("field {name} of {event:?}: {e}"))
}

/// A node enrolls and then rotates its certificate (4 s lifetime, so at 3 s): the controller
/// holds one `enroll.enrolled` with the node id and expiry it issued, and a `cert.rotated`
/// with the new expiry, from the certificate enrolled with to a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_and_rotated_reach_the_controller() {
    let ctl = Ctl::start(Duration::from_secs(4), 15).await;
    let mut node = Node::new(15, 3, "");
    let token = ctl.token().await;
    node.give(resolved_identity(
        "uuid-enroll",
        token,
        &ctl.url(),
        &ctl.ca_pem,
    ));
    node.start("enrollmgr");
    node.start("eventd");

    let node_id = ctl.node_id(&node).await;
    let enrolled = ctl.events(&node, "enroll.enrolled", 1).await;
    let e = &enrolled[0];
    assert_eq!(
        (e.agent.as_str(), e.severity),
        ("enrollmgr", Severity::Info)
    );
    assert_eq!(e.node_id, node_id);
    assert_eq!(field(e, "node_id"), node_id);
    assert_eq!(field(e, "uuid"), "uuid-enroll");
    assert_eq!(field(e, "controller_url"), ctl.url());
    let detail = ctl.storage().node_detail(&node_id).await.unwrap().unwrap();
    let first = detail.certificates.last().unwrap();
    assert_eq!(field(e, "fingerprint"), first.fingerprint);
    assert_eq!(number(e, "not_after_ms") as i64, first.not_after_ms);
    assert!(field(e, "not_after").ends_with('Z'), "{e:?}");

    let rotated = ctl.events(&node, "cert.rotated", 1).await;
    let r = &rotated[0];
    assert_eq!(r.severity, Severity::Info);
    assert_eq!(field(r, "previous_fingerprint"), first.fingerprint);
    assert_ne!(field(r, "fingerprint"), first.fingerprint);
    assert!(
        number(r, "not_after_ms") as i64 > first.not_after_ms,
        "{r:?}"
    );
    assert_eq!(field(r, "failed_attempts"), "0");
    let issued: Vec<String> = ctl
        .storage()
        .node_detail(&node_id)
        .await
        .unwrap()
        .unwrap()
        .certificates
        .into_iter()
        .map(|c| c.fingerprint)
        .collect();
    assert!(
        issued.iter().any(|f| f == field(r, "fingerprint")),
        "{issued:?}"
    );
    // Enrolled once: a rotation is not an enrollment.
    let again = ctl.events(&node, "enroll.enrolled", 1).await;
    assert_eq!(again.len(), 1, "{again:?}");
}

/// The controller is stopped while rotation is due: enrollmgr raises `cert.rotation_failing`
/// at the first failure and then once per heartbeat interval (2 s, from the controller,
/// while retries come every second), each with the same `since`, more attempts, the error
/// and the expiry. Once the controller is back (enrollmgr held still with SIGSTOP so its
/// retry cannot win the race), heartbeatd's heartbeat tells the controller since when
/// rotation has been failing; then rotation succeeds and the next heartbeat says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_failing_every_interval_and_in_the_heartbeat() {
    // Rotation at 24 s, expiry at 32 s: room for four failures and the heartbeat.
    let mut ctl = Ctl::start(Duration::from_secs(32), 2).await;
    let mut node = Node::new(2, 3, "");
    let token = ctl.token().await;
    node.give(resolved_identity(
        "uuid-failing",
        token,
        &ctl.url(),
        &ctl.ca_pem,
    ));
    node.start("enrollmgr");
    node.start("eventd");
    node.start("heartbeatd");
    let mut status = Subscription::<EnrollmentStatus>::connect(&node.dirs(), "enrollmgr");
    let first = node
        .enrollment(&mut status, "Enrolled", |s| {
            s.state == EnrollmentState::Enrolled
        })
        .await;
    let node_id = ctl.node_id(&node).await;
    ctl.enrollment(&node, &node_id, |e| e.report.state == "Enrolled")
        .await;
    ctl.down().await;

    // Four attempts, about a second apart with jitter, span more than the 2 s interval, so
    // the second cert.rotation_failing is raised before enrollmgr is held still. (Three spanned
    // 1.95 s once, and the second was never raised.)
    let failing = node
        .enrollment(&mut status, "RotationFailing after 4 attempts", |s| {
            s.state == EnrollmentState::RotationFailing && s.rotation_attempts >= 4
        })
        .await;
    let since = failing.rotation_failing_since_ms.unwrap();
    assert!(since >= first.rotate_at_ms.unwrap(), "{failing:?}");
    kill(node.pid("enrollmgr"), Signal::SIGSTOP).unwrap();
    ctl.up().await;

    let stored = ctl
        .enrollment(&node, &node_id, |e| e.report.state == "RotationFailing")
        .await;
    let held = failing.rotation_attempts;
    assert_eq!(stored.report.rotation_failing_since_ms, Some(since));
    // Not `>= held`: enrollmgr, stopped right after this test saw its last attempt, may not
    // have sent that update to heartbeatd yet (a subscriber whose connection was busy gets it
    // from the publisher's connection task, which a stopped process does not run).
    assert!(stored.report.rotation_attempts >= 1, "{stored:?}");
    assert_eq!(stored.report.not_after_ms, first.not_after_ms);
    assert_eq!(stored.report.cert_fingerprint, first.cert_fingerprint);
    assert!(
        stored
            .report
            .last_error
            .as_deref()
            .unwrap()
            .contains("connect"),
        "{stored:?}"
    );
    kill(node.pid("enrollmgr"), Signal::SIGCONT).unwrap();

    let rotated = ctl.events(&node, "cert.rotated", 1).await;
    let attempts_at_rotation = number(&rotated[0], "failed_attempts");
    assert!(attempts_at_rotation >= u64::from(held), "{rotated:?}");
    assert_eq!(number(&rotated[0], "failing_since_ms"), since);
    let raised = ctl.events(&node, "cert.rotation_failing", 2).await;
    for (i, e) in raised.iter().enumerate() {
        assert_eq!(
            (e.agent.as_str(), e.severity),
            ("enrollmgr", Severity::Critical)
        );
        assert_eq!(number(e, "since_ms"), since, "{e:?}");
        assert_eq!(Some(number(e, "not_after_ms")), first.not_after_ms);
        assert!(field(e, "last_error").contains("connect"), "{e:?}");
        assert_eq!(field(e, "state"), "RotationFailing");
        if i > 0 {
            let before = &raised[i - 1];
            assert!(
                number(e, "attempts") > number(before, "attempts"),
                "{raised:?}"
            );
            // Every interval (2 s), not every retry (1 s).
            assert!(e.at_ms - before.at_ms >= 1900, "{raised:?}");
        }
    }
    assert_eq!(
        number(&raised[0], "attempts"),
        1,
        "raised at the first failure"
    );
    ctl.enrollment(&node, &node_id, |e| {
        e.report.state == "Enrolled" && e.report.rotation_failing_since_ms.is_none()
    })
    .await;
}

/// A wrong bootstrap token: `enroll.bad_token` (Error) with the controller's reason, raised
/// once; it reaches the controller after the operator hands the node a good token and it
/// enrolls (before that the node has no certificate to deliver with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_reaches_the_controller_once_the_node_enrolls() {
    let ctl = Ctl::start(Duration::from_secs(3600), 15).await;
    let mut node = Node::new(15, 3, "");
    node.give(resolved_identity(
        "uuid-badtoken",
        "not-a-token-the-controller-made".into(),
        &ctl.url(),
        &ctl.ca_pem,
    ));
    node.start("enrollmgr");
    node.start("eventd");
    let mut status = Subscription::<EnrollmentStatus>::connect(&node.dirs(), "enrollmgr");
    node.enrollment(&mut status, "BadToken", |s| {
        s.state == EnrollmentState::BadToken
    })
    .await;
    let token = ctl.token().await;
    node.give(resolved_identity(
        "uuid-badtoken",
        token,
        &ctl.url(),
        &ctl.ca_pem,
    ));
    ctl.events(&node, "enroll.enrolled", 1).await;

    ctl.events(&node, "enroll.bad_token", 1).await;
    let all = ctl.all_of(&node, "enrollmgr", 1).await;
    let refused: Vec<&StoredEvent> = all
        .iter()
        .filter(|e| e.kind == "enroll.bad_token")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    let e = &refused[0];
    assert_eq!(
        (e.agent.as_str(), e.severity),
        ("enrollmgr", Severity::Error)
    );
    assert!(field(e, "reason").contains("invalid_token"), "{e:?}");
    assert!(
        field(e, "reason").contains("unknown bootstrap token"),
        "{e:?}"
    );
    assert_eq!(field(e, "state"), "BadToken");
    assert_eq!(field(e, "controller_url"), ctl.url());
}

/// The identity pins another controller's CA: `enroll.ca_mismatch` (Critical), delivered once
/// the right CA comes and the node enrolls with the same, unused token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_mismatch_reaches_the_controller_once_the_node_enrolls() {
    let ctl = Ctl::start(Duration::from_secs(3600), 15).await;
    let other = Ctl::start(Duration::from_secs(3600), 15).await;
    let mut node = Node::new(15, 3, "");
    let token = ctl.token().await;
    node.give(resolved_identity(
        "uuid-mitm",
        token.clone(),
        &ctl.url(),
        &other.ca_pem,
    ));
    node.start("enrollmgr");
    node.start("eventd");
    let mut status = Subscription::<EnrollmentStatus>::connect(&node.dirs(), "enrollmgr");
    let mismatch = node
        .enrollment(&mut status, "CaMismatch", |s| {
            s.state == EnrollmentState::CaMismatch
        })
        .await;
    node.give(resolved_identity(
        "uuid-mitm",
        token,
        &ctl.url(),
        &ctl.ca_pem,
    ));
    ctl.events(&node, "enroll.enrolled", 1).await;

    ctl.events(&node, "enroll.ca_mismatch", 1).await;
    let all = ctl.all_of(&node, "enrollmgr", 1).await;
    let refused: Vec<&StoredEvent> = all
        .iter()
        .filter(|e| e.kind == "enroll.ca_mismatch")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    let e = &refused[0];
    assert_eq!(e.severity, Severity::Critical);
    assert_eq!(Some(field(e, "reason")), mismatch.last_error.as_deref());
    assert_eq!(field(e, "state"), "CaMismatch");
    assert_eq!(field(e, "controller_url"), ctl.url());
}

/// The certificate expires while enrollmgr is down (3 s lifetime, killed before rotation):
/// started again it raises `cert.expired` (Critical) with the expiry, and a second restart
/// into the same refusal raises nothing; the event reaches the controller once a new token
/// has re-enrolled the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_raised_once_and_delivered_after_re_enrollment() {
    let ctl = Ctl::start(Duration::from_secs(3), 15).await;
    let mut node = Node::new(15, 3, "");
    let token = ctl.token().await;
    node.give(resolved_identity(
        "uuid-expired",
        token,
        &ctl.url(),
        &ctl.ca_pem,
    ));
    node.start("enrollmgr");
    node.start("eventd");
    let mut status = Subscription::<EnrollmentStatus>::connect(&node.dirs(), "enrollmgr");
    let first = node
        .enrollment(&mut status, "Enrolled", |s| {
            s.state == EnrollmentState::Enrolled
        })
        .await;
    node.kill("enrollmgr", true);
    let expiry = first.not_after_ms.unwrap();
    let wait = (expiry + 300).saturating_sub(common::now_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
    node.start("enrollmgr");
    node.enrollment(&mut status, "CertExpired", |s| {
        s.state == EnrollmentState::CertExpired
    })
    .await;
    node.checkpointed(EnrollmentState::CertExpired).await;
    node.kill("enrollmgr", false);
    // The restarted agent is in the same refusal (its own agent.started says it ran).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let token = ctl.token().await;
    node.give(resolved_identity(
        "uuid-expired",
        token,
        &ctl.url(),
        &ctl.ca_pem,
    ));

    ctl.events(&node, "enroll.enrolled", 2).await;
    // eventd delivers in the order it journalled, which across a restart of the raiser is
    // not the order raised: wait until every start's events are all there, without holes.
    let all = ctl.all_of(&node, "enrollmgr", 3).await;
    let expired: Vec<&StoredEvent> = all.iter().filter(|e| e.kind == "cert.expired").collect();
    assert_eq!(expired.len(), 1, "once, not per restart: {expired:?}");
    let e = &expired[0];
    assert_eq!(
        (e.agent.as_str(), e.severity),
        ("enrollmgr", Severity::Critical)
    );
    assert_eq!(number(e, "not_after_ms"), expiry);
    assert_eq!(Some(field(e, "node_id")), first.node_id.as_deref());
    assert!(field(e, "reason").contains("expired"), "{e:?}");
    assert_eq!(field(e, "state"), "CertExpired");
}

/// The operator revokes the node (through the controller's storage, as `node revoke` does):
/// at its next rotation the node is told, raises `enroll.revoked` (Critical), and the
/// controller still takes that event from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_says_so_to_the_controller() {
    let ctl = Ctl::start(Duration::from_secs(4), 15).await;
    let mut node = Node::new(15, 3, "");
    let token = ctl.token().await;
    node.give(resolved_identity(
        "uuid-revoked",
        token,
        &ctl.url(),
        &ctl.ca_pem,
    ));
    node.start("enrollmgr");
    node.start("eventd");
    let node_id = ctl.node_id(&node).await;
    ctl.events(&node, "enroll.enrolled", 1).await;
    assert!(ctl
        .storage()
        .revoke(&node_id, powernode_controller::now_ms())
        .await
        .unwrap());

    let revoked = ctl.events(&node, "enroll.revoked", 1).await;
    let e = &revoked[0];
    assert_eq!(
        (e.agent.as_str(), e.severity),
        ("enrollmgr", Severity::Critical)
    );
    assert_eq!(e.node_id, node_id);
    assert_eq!(field(e, "node_id"), node_id);
    assert!(field(e, "reason").contains("revoked"), "{e:?}");
    assert_eq!(field(e, "state"), "Revoked");
    // Once: the refusal is final, nothing retries it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = ctl.all_of(&node, "enrollmgr", 1).await;
    assert_eq!(all.iter().filter(|e| e.kind == "enroll.revoked").count(), 1);
}

/// The controller is away for more than two heartbeat intervals (1 s each): heartbeatd raises
/// `controller.unreachable` once, however many heartbeats fail, and `controller.reachable`
/// with the outage's length when it is back; both reach the controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_outage_is_raised_once_and_its_end_with_its_length() {
    let mut ctl = Ctl::start(Duration::from_secs(3600), 1).await;
    let mut node = Node::new(1, 2, "");
    let token = ctl.token().await;
    node.give(resolved_identity(
        "uuid-outage",
        token,
        &ctl.url(),
        &ctl.ca_pem,
    ));
    node.start("enrollmgr");
    node.start("eventd");
    node.start("heartbeatd");
    let node_id = ctl.node_id(&node).await;
    ctl.enrollment(&node, &node_id, |e| e.report.state == "Enrolled")
        .await;

    ctl.down().await;
    let down_for = Instant::now();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    ctl.up().await;

    ctl.events(&node, "controller.reachable", 1).await;
    let all = ctl.all_of(&node, "heartbeatd", 1).await;
    let of = |kind: &str| -> Vec<StoredEvent> {
        all.iter().filter(|e| e.kind == kind).cloned().collect()
    };
    let (reachable, unreachable) = (of("controller.reachable"), of("controller.unreachable"));
    let outage_max = u64::try_from(down_for.elapsed().as_millis()).unwrap();
    assert_eq!(unreachable.len(), 1, "raised once: {unreachable:?}");
    let u = &unreachable[0];
    assert_eq!(
        (u.agent.as_str(), u.severity),
        ("heartbeatd", Severity::Error)
    );
    assert!(number(u, "for_ms") > 2000, "more than 2 intervals: {u:?}");
    assert!(number(u, "failures") >= 2, "{u:?}");
    assert_eq!(field(u, "intervals"), "2");
    assert_eq!(field(u, "url"), ctl.url());
    assert!(!field(u, "last_error").is_empty());
    assert!(number(u, "since_ms") >= u.at_ms as u64 - number(u, "for_ms") - 10);

    assert_eq!(reachable.len(), 1, "{reachable:?}");
    let r = &reachable[0];
    assert_eq!(
        (r.agent.as_str(), r.severity),
        ("heartbeatd", Severity::Info)
    );
    let outage_ms = number(r, "outage_ms");
    assert!(outage_ms >= 3500 && outage_ms <= outage_max, "{r:?}");
    assert!(outage_ms > number(u, "for_ms"));
    assert_eq!(
        field(r, "outage"),
        agentbase::timefmt::human_ms(outage_ms),
        "{r:?}"
    );
    assert!(number(r, "failures") >= number(u, "failures"), "{r:?}");
    assert_eq!(number(r, "since_ms"), number(u, "since_ms"));
}

/// The real identitymgr, first with no source that names the node (every cloud source
/// points at a closed port): `identity.unresolvable` once, with every source's reason as a
/// field, though the cascade is retried; then identity.cfg appears with the node's uuid and
/// what enrollment needs: `identity.resolved` from IdentityCfg. Both reach the controller
/// once the node enrolls with what identity.cfg says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_unresolvable_then_resolved_reach_the_controller() {
    const UUID: &str = "6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b";
    let ctl = Ctl::start(Duration::from_secs(3600), 15).await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let mut node = Node::new(
        15,
        3,
        &format!(
            "[identity]\nsource_timeout_ms = 300\nallow_generated_uuid = false\n\
             aws_url = \"{closed}\"\ngcp_url = \"{closed}\"\nazure_url = \"{closed}\"\n\
             digitalocean_url = \"{closed}\"\nhetzner_url = \"{closed}\"\n"
        ),
    );
    write(&node.root, "proc/cmdline", "ro quiet\n");
    write(&node.root, "etc/hostname", "edge-7\n");
    write(
        &node.root,
        "proc/sys/kernel/random/boot_id",
        "0f5e2b9c-1111-4222-8333-444455556666\n",
    );
    write(&node.root, "etc/powernode/ca.pem", &ctl.ca_pem);
    node.start("identitymgr");
    node.start("enrollmgr");
    node.start("eventd");
    // Retries at 1 s and 3 s fail the same way.
    let mut status = Subscription::<EnrollmentStatus>::connect(&node.dirs(), "enrollmgr");
    node.enrollment(&mut status, "NotEnrolled", |s| {
        s.state == EnrollmentState::NotEnrolled
            && s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("unresolvable"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let token = ctl.token().await;
    write(
        &node.root,
        "etc/powernode/identity.cfg",
        &format!(
            "INSTANCE_UUID={UUID}\nBOOTSTRAP_TOKEN={token}\nCONTROLLER_URL={}\n\
             CA_FILE=etc/powernode/ca.pem\n",
            ctl.url()
        ),
    );

    ctl.events(&node, "identity.resolved", 1).await;
    let all = ctl.all_of(&node, "identitymgr", 1).await;
    let of = |kind: &str| -> Vec<StoredEvent> {
        all.iter().filter(|e| e.kind == kind).cloned().collect()
    };
    let (resolved, unresolvable) = (of("identity.resolved"), of("identity.unresolvable"));
    assert_eq!(
        unresolvable.len(),
        1,
        "once, not per retry: {unresolvable:?}"
    );
    let u = &unresolvable[0];
    assert_eq!(
        (u.agent.as_str(), u.severity),
        ("identitymgr", Severity::Error)
    );
    for source in [
        "KernelCmdline",
        "FwCfg",
        "Aws",
        "Gcp",
        "Azure",
        "DigitalOcean",
        "Hetzner",
        "Dmi",
        "IdentityCfg",
    ] {
        assert!(!field(u, source).is_empty(), "{source}: {u:?}");
    }
    assert!(field(u, "KernelCmdline").contains("no powernode.* identity parameters"));

    assert_eq!(resolved.len(), 1, "{resolved:?}");
    let r = &resolved[0];
    assert_eq!(
        (r.agent.as_str(), r.severity),
        ("identitymgr", Severity::Info)
    );
    assert_eq!(field(r, "source"), "IdentityCfg");
    assert_eq!(field(r, "uuid"), UUID);
    assert_eq!(field(r, "hostname"), "edge-7");
    let enrolled = ctl.events(&node, "enroll.enrolled", 1).await;
    assert_eq!(field(&enrolled[0], "uuid"), UUID);
}

/// The node's PKI on disk made unusable (the certificate overwritten, as a bad disk would)
/// under an enrolled node: enrollmgr, restarted, refuses to go on with it and raises
/// `enroll.failed` (Error) with the reason. With no usable certificate the node cannot reach
/// the controller, so the event is read where an operator on the node reads it: its journal,
/// through `powernode-agent events --json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_pki_on_disk_raises_enroll_failed_on_the_node() {
    let ctl = Ctl::start(Duration::from_secs(3600), 15).await;
    let mut node = Node::new(15, 3, "");
    let token = ctl.token().await;
    node.give(resolved_identity(
        "uuid-pki",
        token,
        &ctl.url(),
        &ctl.ca_pem,
    ));
    node.start("enrollmgr");
    node.start("eventd");
    let mut status = Subscription::<EnrollmentStatus>::connect(&node.dirs(), "enrollmgr");
    node.enrollment(&mut status, "Enrolled", |s| {
        s.state == EnrollmentState::Enrolled
    })
    .await;
    node.kill("enrollmgr", true);
    let cert = powernode_transport::pki::PkiPaths::under(node.root.join("persist/powernode"))
        .dir()
        .join(powernode_transport::pki::CERT_FILE);
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n").unwrap();
    node.start("enrollmgr");
    // enrollmgr goes Failed, then tries its (already used) bootstrap token and goes BadToken:
    // a subscriber may see only the second state (delivery is state-based), so the event on
    // the node's journal is what this test waits for, not the Failed state.
    let deadline = Instant::now() + WAIT;
    let event = loop {
        let out = common::run(
            std::process::Command::new(common::bin())
                .arg("--root")
                .arg(&node.root)
                .args(["events", "--json"])
                .env_remove("POWERNODE_ROOT"),
        );
        out.assert_code(0);
        let found = out
            .json_lines()
            .into_iter()
            .find(|e| e["kind"] == "enroll.failed");
        if let Some(event) = found {
            break event;
        }
        node.check(deadline, "enroll.failed never journalled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(event["agent"], "enrollmgr");
    assert_eq!(event["severity"], "Error");
    let text = event.to_string();
    assert!(
        text.contains("unusable"),
        "the reason travels with the event: {text}"
    );
}
