//! `--mode fleet`: a fleet of simulated nodes living as real nodes do, and what it costs the
//! controller.
//!
//! Each node, as heartbeatd and eventd make a real one behave (`agents/heartbeatd/src/lib.rs`,
//! `tasks.rs`, `watch.rs`):
//!
//! - **heartbeats** every `--interval-s`, the fleet staggered evenly over the interval, with
//!   the body heartbeatd builds (modules, mounts, network with its peers, enrollment, load,
//!   memory: a few KiB, `bodies::NodeFacts::heartbeat`), reporting the generation the last
//!   reply handed it as applied;
//! - **leases** (`POST /tasks/lease`, up to 8) after a successful heartbeat whose reply counts
//!   tasks queued for it (`tasks_queued` above 0, or absent) and whenever its watch says tasks
//!   are queued, and **completes** what it got at once;
//! - **holds a watch** (`GET /watch?generation=G&timeout_s=55`), armed after its first
//!   heartbeat: watched again at once after a plain time-out; after an answer that says
//!   tasks are queued (or a new generation) it wakes the node to lease (or heartbeat) and
//!   waits for that to go through before it watches again, so the watch never loops;
//! - **raises events**: with probability `--event-fraction` per interval, at a random moment
//!   of it, one batch of 1 to 3 events (`POST /events`).
//!
//! Meanwhile an operator creates `node.exec` tasks through `POST /api/v1/tasks`,
//! `nodes × --task-fraction` per interval, each for a random node, at an even pace.
//!
//! Connections (`--connections`): `persistent`, one keep-alive connection for the node's calls
//! and one for its watch, both from the node's own source address; or `per-call`, a new
//! connection for every call as the node's transport does. Either way a node always calls
//! from its own address in 127.0.0.0/8, so 10,000 nodes do not share one address's ephemeral
//! ports.
//!
//! Measured over the window after the warm-up: heartbeats/s achieved and their latency from
//! the *scheduled* send time (a heartbeat held up by a slow earlier call counts the wait: no
//! coordinated omission); every failed call by call and kind (`heartbeat:timeout`,
//! `watch:dropped`, `events:http_503`, …); the controller's CPU from `/proc/<pid>/stat`
//! (utime + stime over the window, % of one core), its `VmRSS` at the end of the window (all
//! connections and watches still held), `VmHWM`, and `rss_kib_per_node`: (`VmRSS` at the end
//! − `VmRSS` before the first enrollment) / nodes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use powernode_controller::wire::{
    task_limits, EventsResponse, HeartbeatResponse, TaskLeaseResponse, WatchResponse,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::bodies::{task_args, task_complete, NodeFacts, Rng};
use crate::http::{source_ip, tls_config, CallError, Conn, Target, REQUEST_TIMEOUT};
use crate::procfs::{cpu_seconds, fd_count, open_files_limit, status_kib};
use crate::setup::{connect_all, enroll_all, Node};
use crate::{micros, percentile_ms, round1, round2, Args, Connections};

const HEARTBEAT_PATH: &str = "/node_api/v1/status/heartbeat";
const LEASE_PATH: &str = "/node_api/v1/tasks/lease";
const EVENTS_PATH: &str = "/node_api/v1/events";
/// Most tasks a node holds at once (heartbeatd's `tasks::MAX_HELD`).
const MAX_HELD: u32 = 8;
/// How long a watch is held (heartbeatd's `watch::HOLD`).
const WATCH_HOLD_S: u32 = task_limits::DEFAULT_WATCH_S;
/// Failures of one kind logged to stderr; the rest are only counted.
const LOGGED_PER_KIND: u64 = 3;

/// What the nodes share: the clock of the run and the error counts.
struct Shared {
    target: Target,
    persistent: bool,
    nodes: usize,
    interval: Duration,
    event_fraction: f64,
    start: Instant,
    measure_from: Instant,
    measure_to: Instant,
    /// Cancelled at the end of the window: held watches are dropped.
    stop: CancellationToken,
    /// Failed calls by (in the window, "call:kind").
    errors: Mutex<BTreeMap<(bool, String), u64>>,
    /// Tasks the operator created, by id, and when: for the create → lease latency.
    created: Mutex<HashMap<String, Instant>>,
    /// Watches held now.
    watches_held: AtomicI64,
    /// Watch answers in the window: time-outs (nothing new) and news.
    watch_timeouts: AtomicU64,
    watch_news: AtomicU64,
    /// Connections found closed by the controller while idle, opened again (persistent).
    idle_reconnects: AtomicU64,
}

impl Shared {
    fn in_window(&self, at: Instant) -> bool {
        at >= self.measure_from
    }

    /// Counts a failed `call` (`kind`: `timeout`, `http_503`, …) at `at`; logs the first few
    /// of each kind.
    fn failed(&self, call: &str, kind: &str, at: Instant, detail: &dyn std::fmt::Display) {
        let key = format!("{call}:{kind}");
        let total = {
            let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            *errors.entry((self.in_window(at), key.clone())).or_default() += 1;
            errors
                .iter()
                .filter(|((_, k), _)| *k == key)
                .map(|(_, n)| n)
                .sum::<u64>()
        };
        if total <= LOGGED_PER_KIND {
            eprintln!("loadgen: {key}: {detail}");
        }
    }

    /// Counts a reply that is not 2xx.
    fn refused(&self, call: &str, status: u16, at: Instant, reply: &[u8]) {
        let detail = String::from_utf8_lossy(&reply[..reply.len().min(300)]).into_owned();
        self.failed(call, &format!("http_{status}"), at, &detail);
    }
}

/// What woke a node's main loop, from its watch.
#[derive(Debug, Clone, Copy)]
enum Wake {
    /// Tasks are queued: lease.
    Lease,
    /// A new desired-state generation: heartbeat now.
    Heartbeat,
}

/// One node's way to the controller: its address, identity and (persistent) connection.
struct Client {
    shared: Arc<Shared>,
    source: IpAddr,
    config: Arc<rustls::ClientConfig>,
    conn: Option<Conn>,
}

impl Client {
    /// One call; a persistent connection is kept for the next, a broken one dropped (and
    /// opened again by the next call), a per-call one closed.
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), CallError> {
        if let Some(conn) = &mut self.conn {
            if conn.closed_while_idle().await {
                self.conn = None;
                self.shared.idle_reconnects.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => Conn::open(&self.shared.target, Some(self.source), self.config.clone()).await?,
        };
        let result = conn.call(method, path, None, body, timeout).await;
        if result.is_ok() {
            if self.shared.persistent {
                self.conn = Some(conn);
            } else {
                conn.close().await;
            }
        }
        result
    }
}

/// What one node measured in the window.
#[derive(Default)]
struct Stats {
    heartbeats: u64,
    heartbeat_us: Vec<u32>,
    heartbeat_bytes: u64,
    leases: u64,
    leases_with_tasks: u64,
    lease_us: Vec<u32>,
    tasks_completed: u64,
    complete_us: Vec<u32>,
    task_to_lease_us: Vec<u32>,
    event_batches: u64,
    events: u64,
    events_us: Vec<u32>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.heartbeats += other.heartbeats;
        self.heartbeat_us.extend(other.heartbeat_us);
        self.heartbeat_bytes += other.heartbeat_bytes;
        self.leases += other.leases;
        self.leases_with_tasks += other.leases_with_tasks;
        self.lease_us.extend(other.lease_us);
        self.tasks_completed += other.tasks_completed;
        self.complete_us.extend(other.complete_us);
        self.task_to_lease_us.extend(other.task_to_lease_us);
        self.event_batches += other.event_batches;
        self.events += other.events;
        self.events_us.extend(other.events_us);
    }
}

/// One simulated node's main loop: heartbeats, leases, completions and events.
struct Sim {
    shared: Arc<Shared>,
    client: Client,
    facts: NodeFacts,
    rng: Rng,
    stats: Stats,
    /// Successful heartbeats and leases that got tasks, and the generation applied: what
    /// the watch waits on.
    epoch: watch::Sender<(u64, u64)>,
}

impl Sim {
    async fn run(mut self, index: usize, mut wake: mpsc::Receiver<Wake>) -> Stats {
        let shared = self.shared.clone();
        let offset = index as f64 / shared.nodes as f64;
        let mut next_heartbeat = shared.start + shared.interval.mul_f64(offset);
        let mut next_events = shared.start + shared.interval.mul_f64(self.rng.unit());
        /// What the loop waits for next.
        enum Due {
            Heartbeat,
            Events,
            End,
        }
        while Instant::now() < shared.measure_to {
            // The end first: what is due at the end (or later) is not sent.
            let (at, due) = [
                (shared.measure_to, Due::End),
                (next_heartbeat, Due::Heartbeat),
                (next_events, Due::Events),
            ]
            .into_iter()
            .min_by_key(|(at, _)| *at)
            .unwrap_or((shared.measure_to, Due::End));
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(at.into()) => match due {
                    Due::Heartbeat => {
                        self.heartbeat(Some(at)).await;
                        next_heartbeat += shared.interval;
                    }
                    Due::Events => {
                        if self.rng.unit() < shared.event_fraction {
                            self.events(at).await;
                        }
                        next_events += shared.interval;
                    }
                    Due::End => break,
                },
                Some(woken) = wake.recv() => match woken {
                    Wake::Lease => self.lease().await,
                    Wake::Heartbeat => self.heartbeat(None).await,
                },
            }
        }
        // Connections (and the watch, which waits on `epoch`) are held until the controller
        // has been measured.
        shared.stop.cancelled().await;
        self.stats
    }

    /// A heartbeat, `scheduled` then (a periodic one, measured from then) or now (one the
    /// watch asked for, not measured); then a lease if the reply counts queued tasks, as
    /// heartbeatd does.
    async fn heartbeat(&mut self, scheduled: Option<Instant>) {
        let shared = self.shared.clone();
        let sent = scheduled.unwrap_or_else(Instant::now);
        let elapsed = sent.saturating_duration_since(shared.start).as_secs();
        let now_ms = u64::try_from(powernode_controller::now_ms()).unwrap_or_default();
        let body = self.facts.heartbeat(&mut self.rng, elapsed, now_ms);
        let result = self
            .client
            .call("POST", HEARTBEAT_PATH, Some(&body), REQUEST_TIMEOUT)
            .await;
        let done = Instant::now();
        let reply = match result {
            Ok((200, reply)) => reply,
            Ok((status, reply)) => return shared.refused("heartbeat", status, sent, &reply),
            Err(e) => return shared.failed("heartbeat", e.kind(), sent, &e),
        };
        let reply: HeartbeatResponse = match serde_json::from_slice(&reply) {
            Ok(reply) => reply,
            Err(e) => return shared.failed("heartbeat", "bad_body", sent, &e),
        };
        if scheduled.is_some() && shared.in_window(sent) {
            self.stats.heartbeats += 1;
            self.stats.heartbeat_us.push(micros(sent, done));
            self.stats.heartbeat_bytes += body.len() as u64;
        }
        // Applied at once: the fleet is not told to change anything, so this is the
        // generation it had.
        self.facts.applied_generation = reply.desired.generation;
        self.epoch.send_modify(|(epoch, generation)| {
            (*epoch, *generation) = (*epoch + 1, reply.desired.generation)
        });
        if reply.tasks_queued != Some(0) {
            self.lease().await;
        }
    }

    /// Leases up to [`MAX_HELD`] tasks and completes each at once.
    async fn lease(&mut self) {
        let shared = self.shared.clone();
        let sent = Instant::now();
        let body = format!("{{\"max\":{MAX_HELD}}}");
        let result = self
            .client
            .call("POST", LEASE_PATH, Some(body.as_bytes()), REQUEST_TIMEOUT)
            .await;
        let done = Instant::now();
        let reply = match result {
            Ok((200, reply)) => reply,
            Ok((status, reply)) => return shared.refused("lease", status, sent, &reply),
            Err(e) => return shared.failed("lease", e.kind(), sent, &e),
        };
        let reply: TaskLeaseResponse = match serde_json::from_slice(&reply) {
            Ok(reply) => reply,
            Err(e) => return shared.failed("lease", "bad_body", sent, &e),
        };
        let in_window = shared.in_window(sent);
        if in_window {
            self.stats.leases += 1;
            self.stats.lease_us.push(micros(sent, done));
            if !reply.tasks.is_empty() {
                self.stats.leases_with_tasks += 1;
            }
        }
        for task in &reply.tasks {
            let created = shared
                .created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&task.id);
            if let Some(created) = created.filter(|c| shared.in_window(*c)) {
                self.stats.task_to_lease_us.push(micros(created, done));
            }
        }
        for task in &reply.tasks {
            self.complete(&task.id).await;
        }
        if !reply.tasks.is_empty() {
            self.epoch.send_modify(|(epoch, _)| *epoch += 1);
        }
    }

    async fn complete(&mut self, id: &str) {
        let shared = self.shared.clone();
        let path = format!("/node_api/v1/tasks/{id}/complete");
        let body = task_complete(&mut self.rng);
        let sent = Instant::now();
        match self
            .client
            .call("POST", &path, Some(&body), REQUEST_TIMEOUT)
            .await
        {
            Ok((200, _)) => {
                if shared.in_window(sent) {
                    self.stats.tasks_completed += 1;
                    self.stats.complete_us.push(micros(sent, Instant::now()));
                }
            }
            Ok((status, reply)) => shared.refused("complete", status, sent, &reply),
            Err(e) => shared.failed("complete", e.kind(), sent, &e),
        }
    }

    /// A batch of events, `scheduled` then.
    async fn events(&mut self, scheduled: Instant) {
        let shared = self.shared.clone();
        let now_ms = u64::try_from(powernode_controller::now_ms()).unwrap_or_default();
        let body = self.facts.events(&mut self.rng, now_ms);
        let result = self
            .client
            .call("POST", EVENTS_PATH, Some(&body), REQUEST_TIMEOUT)
            .await;
        let done = Instant::now();
        let reply = match result {
            Ok((200, reply)) => reply,
            Ok((status, reply)) => return shared.refused("events", status, scheduled, &reply),
            Err(e) => return shared.failed("events", e.kind(), scheduled, &e),
        };
        match serde_json::from_slice::<EventsResponse>(&reply) {
            Ok(stored) => {
                if shared.in_window(scheduled) {
                    self.stats.event_batches += 1;
                    self.stats.events += stored.accepted + stored.duplicates;
                    self.stats.events_us.push(micros(scheduled, done));
                }
            }
            Err(e) => shared.failed("events", "bad_body", scheduled, &e),
        }
    }
}

/// A node's watch, until the end of the window.
async fn watch_loop(
    mut client: Client,
    mut epoch: watch::Receiver<(u64, u64)>,
    wake: mpsc::Sender<Wake>,
) {
    let shared = client.shared.clone();
    let timeout = Duration::from_secs(u64::from(WATCH_HOLD_S) + 30);
    // The epoch the last watch was armed at; a new watch waits for a newer one, except
    // after a plain time-out.
    let mut armed_at = 0u64;
    let mut again = false;
    loop {
        let generation = if again {
            epoch.borrow().1
        } else {
            loop {
                let (at, generation) = *epoch.borrow_and_update();
                if at > armed_at {
                    armed_at = at;
                    break generation;
                }
                if epoch.changed().await.is_err() {
                    return;
                }
            }
        };
        again = false;
        let path = format!("/node_api/v1/watch?generation={generation}&timeout_s={WATCH_HOLD_S}");
        shared.watches_held.fetch_add(1, Ordering::Relaxed);
        let result = client.call("GET", &path, None, timeout).await;
        shared.watches_held.fetch_sub(1, Ordering::Relaxed);
        let done = Instant::now();
        let reply = match result {
            Ok((200, reply)) => reply,
            Ok((status, reply)) => {
                shared.refused("watch", status, done, &reply);
                continue;
            }
            Err(e) => {
                shared.failed("watch", e.kind(), done, &e);
                continue;
            }
        };
        let answer: WatchResponse = match serde_json::from_slice(&reply) {
            Ok(answer) => answer,
            Err(e) => {
                shared.failed("watch", "bad_body", done, &e);
                continue;
            }
        };
        let counter = if answer.changed {
            &shared.watch_news
        } else {
            &shared.watch_timeouts
        };
        if shared.in_window(done) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if !answer.changed {
            again = true;
        } else if answer.generation > generation {
            let _ = wake.send(Wake::Heartbeat).await;
        } else {
            let _ = wake.send(Wake::Lease).await;
        }
    }
}

/// The operator: `rate` `node.exec` tasks a second for random nodes, from the start to the
/// end of the window. How many it created in the window, and how many failed.
async fn create_tasks(
    shared: Arc<Shared>,
    ids: Vec<String>,
    rate: f64,
    ca_pem: String,
    operator: String,
    seed: u64,
) -> anyhow::Result<u64> {
    if rate <= 0.0 {
        return Ok(0);
    }
    let anon = Arc::new(tls_config(&ca_pem, None)?);
    let mut conn: Option<Conn> = None;
    let mut rng = Rng::new(seed, u64::MAX);
    let step = Duration::from_secs_f64(1.0 / rate);
    let mut next = shared.start;
    let mut created = 0u64;
    while next < shared.measure_to {
        tokio::time::sleep_until(next.into()).await;
        let node = &ids[rng.below(ids.len() as u64) as usize];
        let body = json!({"node": node, "kind": "node.exec", "args": task_args(&mut rng),
                          "timeout_s": 60});
        let body = serde_json::to_vec(&body)?;
        let sent = next;
        next += step;
        let mut open = match conn.take() {
            Some(open) => open,
            None => match Conn::open(&shared.target, None, anon.clone()).await {
                Ok(open) => open,
                Err(e) => {
                    shared.failed("task_create", e.kind(), sent, &e);
                    continue;
                }
            },
        };
        match open.post("/api/v1/tasks", Some(&operator), &body).await {
            Ok((200, reply)) => {
                conn = Some(open);
                let reply: Value = serde_json::from_slice(&reply).unwrap_or_default();
                let Some(id) = reply["id"].as_str() else {
                    shared.failed("task_create", "bad_body", sent, &"no task id");
                    continue;
                };
                shared
                    .created
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.to_owned(), Instant::now());
                if shared.in_window(sent) {
                    created += 1;
                }
            }
            Ok((status, reply)) => {
                conn = Some(open);
                shared.refused("task_create", status, sent, &reply);
            }
            Err(e) => shared.failed("task_create", e.kind(), sent, &e),
        }
    }
    Ok(created)
}

/// Descriptors this process needs: every held connection, and room for the rest.
fn descriptors_needed(args: &Args) -> u64 {
    let per_node = match (args.connections, args.watch) {
        (Connections::Persistent, true) => 2,
        (Connections::Persistent, false) | (Connections::PerCall, true) => 1,
        (Connections::PerCall, false) => 0,
    };
    // Per call: the calls in flight at once, a fraction of the fleet.
    let in_flight = match args.connections {
        Connections::PerCall => (args.nodes as u64 / 10).max(64),
        Connections::Persistent => 0,
    };
    args.nodes as u64 * per_node + in_flight + args.setup_concurrency as u64 + 64
}

/// `--mode fleet`.
pub async fn run(
    args: &Args,
    target: &Target,
    ca_pem: &str,
    operator: &str,
) -> anyhow::Result<Value> {
    let pid = args.controller_pid;
    let needed = descriptors_needed(args);
    if let Some(limit) = open_files_limit() {
        anyhow::ensure!(
            limit >= needed,
            "{} nodes ({} connections, watch {}) need about {needed} descriptors; the limit is \
             {limit}: raise it (ulimit -n) or simulate fewer nodes",
            args.nodes,
            args.connections.name(),
            if args.watch { "on" } else { "off" },
        );
    }
    let rss_before_kib = pid.and_then(|pid| status_kib(pid, "VmRSS:"));

    let setup_started = Instant::now();
    let nodes = enroll_all(target, args.nodes, args.setup_concurrency, ca_pem, operator).await?;
    let enroll_s = setup_started.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: fleet: {} tokens created and nodes enrolled in {enroll_s:.1} s ({:.0}/s), \
         {} at a time",
        nodes.len(),
        nodes.len() as f64 / enroll_s,
        args.setup_concurrency
    );
    let t = Instant::now();
    let persistent = args.connections == Connections::Persistent;
    let (mut calls, mut watches) = (Vec::new(), Vec::new());
    if persistent {
        calls = connect_all(target, &nodes, args.setup_concurrency).await?;
        if args.watch {
            watches = connect_all(target, &nodes, args.setup_concurrency).await?;
        }
    }
    let connect_s = t.elapsed().as_secs_f64();
    let setup_s = setup_started.elapsed().as_secs_f64();
    if persistent {
        eprintln!(
            "loadgen: fleet: {} mTLS connections opened in {connect_s:.1} s",
            calls.len() + watches.len()
        );
    }

    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + args.warmup();
    let measure_to = measure_from + args.duration;
    let shared = Arc::new(Shared {
        target: target.clone(),
        persistent,
        nodes: nodes.len(),
        interval: args.interval,
        event_fraction: args.event_fraction,
        start,
        measure_from,
        measure_to,
        stop: CancellationToken::new(),
        errors: Mutex::default(),
        created: Mutex::default(),
        watches_held: AtomicI64::new(0),
        watch_timeouts: AtomicU64::new(0),
        watch_news: AtomicU64::new(0),
        idle_reconnects: AtomicU64::new(0),
    });
    eprintln!(
        "loadgen: fleet: {} nodes, a heartbeat each every {:.1} s ({:.0}/s), {} connections, \
         watches {}, events from {:.0}% and tasks for {:.0}% of the nodes per interval; \
         {:.0} s warm-up + {:.0} s measured",
        nodes.len(),
        args.interval.as_secs_f64(),
        nodes.len() as f64 / args.interval.as_secs_f64(),
        args.connections.name(),
        if args.watch { "held" } else { "off" },
        args.event_fraction * 100.0,
        args.task_fraction * 100.0,
        args.warmup().as_secs_f64(),
        args.duration.as_secs_f64(),
    );

    let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
    let task_rate = nodes.len() as f64 * args.task_fraction / args.interval.as_secs_f64();
    let creator = tokio::spawn(create_tasks(
        shared.clone(),
        ids,
        task_rate,
        ca_pem.to_owned(),
        operator.to_owned(),
        args.seed,
    ));
    let mut calls = calls.into_iter();
    let mut watches = watches.into_iter();
    let mut sims = Vec::with_capacity(nodes.len());
    let mut watchers = Vec::with_capacity(nodes.len());
    for node in nodes {
        let Node {
            index,
            cert_pem,
            not_after_ms,
            config,
            ..
        } = node;
        let mut rng = Rng::new(args.seed, index as u64);
        let facts = NodeFacts::new(index, &mut rng, &cert_pem, not_after_ms);
        let (epoch_tx, epoch_rx) = watch::channel((0u64, 0u64));
        let (wake_tx, wake_rx) = mpsc::channel(4);
        let client = |conn: Option<Conn>| Client {
            shared: shared.clone(),
            source: source_ip(index),
            config: config.clone(),
            conn,
        };
        if args.watch {
            let watcher = client(watches.next());
            let stop = shared.stop.clone();
            watchers.push(tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = watch_loop(watcher, epoch_rx, wake_tx) => {}
                }
            }));
        }
        let sim = Sim {
            shared: shared.clone(),
            client: client(calls.next()),
            facts,
            rng,
            stats: Stats::default(),
            epoch: epoch_tx,
        };
        sims.push(tokio::spawn(sim.run(index, wake_rx)));
    }

    let own_pid = std::process::id();
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = pid.and_then(cpu_seconds);
    let own0 = cpu_seconds(own_pid);
    eprintln!(
        "loadgen: fleet: warm-up done, {} watches held; measuring {:.0} s",
        shared.watches_held.load(Ordering::Relaxed),
        args.duration.as_secs_f64()
    );
    tokio::time::sleep_until(measure_to.into()).await;
    let cpu1 = pid.and_then(cpu_seconds);
    let own1 = cpu_seconds(own_pid);
    let rss_end_kib = pid.and_then(|pid| status_kib(pid, "VmRSS:"));
    let hwm_kib = pid.and_then(|pid| status_kib(pid, "VmHWM:"));
    let fds = pid.and_then(fd_count);
    let held_at_end = shared.watches_held.load(Ordering::Relaxed);
    shared.stop.cancel();

    let created = creator.await?.context("creating tasks")?;
    let mut stats = Stats::default();
    for sim in sims {
        stats.merge(sim.await?);
    }
    for watcher in watchers {
        watcher.await?;
    }
    for v in [
        &mut stats.heartbeat_us,
        &mut stats.lease_us,
        &mut stats.complete_us,
        &mut stats.task_to_lease_us,
        &mut stats.events_us,
    ] {
        v.sort_unstable();
    }

    let window_s = args.duration.as_secs_f64();
    let per_s = |n: u64| round1(n as f64 / window_s);
    let ms = |v: &[u32], p: f64| percentile_ms(v, p).map(round2);
    let cpu_pct = cpu0
        .zip(cpu1)
        .map(|(a, b)| ((b - a) / window_s * 1000.0).round() / 10.0);
    let own_cpu_pct = own0
        .zip(own1)
        .map(|(a, b)| ((b - a) / window_s * 1000.0).round() / 10.0);
    let rss_kib_per_node = rss_before_kib
        .zip(rss_end_kib)
        .map(|(before, end)| round2((end as f64 - before as f64) / args.nodes as f64));
    let errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner());
    let by_kind = |window: bool| -> BTreeMap<String, u64> {
        errors
            .iter()
            .filter(|((w, _), _)| *w == window)
            .map(|((_, k), n)| (k.clone(), *n))
            .collect()
    };
    let (window_errors, warmup_errors) = (by_kind(true), by_kind(false));
    let error_count = window_errors.values().sum::<u64>();
    let warmup_error_count = warmup_errors.values().sum::<u64>();
    let mib = |kib: Option<u64>| kib.map(|k| round1(k as f64 / 1024.0));
    let expected = args.nodes as f64 / args.interval.as_secs_f64();

    eprintln!(
        "loadgen: fleet: {:.1} heartbeats/s (expected {expected:.1}), p50 {} ms, p99 {} ms, \
         max {} ms; {error_count} errors in the window, {warmup_error_count} in the warm-up; \
         controller CPU {}% of one core, RSS {} MiB ({} KiB per node), {held_at_end} watches \
         held",
        stats.heartbeats as f64 / window_s,
        fmt_ms(ms(&stats.heartbeat_us, 0.5)),
        fmt_ms(ms(&stats.heartbeat_us, 0.99)),
        fmt_ms(ms(&stats.heartbeat_us, 1.0)),
        cpu_pct.map_or("?".to_owned(), |c| c.to_string()),
        mib(rss_end_kib).map_or("?".to_owned(), |m| m.to_string()),
        rss_kib_per_node.map_or("?".to_owned(), |k| k.to_string()),
    );
    for (kind, n) in &window_errors {
        eprintln!("loadgen: fleet:   {kind}: {n}");
    }

    Ok(json!({
        "mode": "fleet",
        "nodes": args.nodes,
        "connections": args.connections.name(),
        "watch": args.watch,
        "interval_s": args.interval.as_secs_f64(),
        "warmup_s": args.warmup().as_secs_f64(),
        "window_s": window_s,
        "setup": {
            "enroll_s": round1(enroll_s),
            "enroll_per_s": (args.nodes as f64 / enroll_s).round(),
            "connect_s": round1(connect_s),
            "total_s": round1(setup_s),
            "concurrency": args.setup_concurrency,
        },
        "heartbeats_per_s": per_s(stats.heartbeats),
        "expected_per_s": round1(expected),
        "heartbeats": stats.heartbeats,
        "heartbeat_body_bytes": stats.heartbeat_bytes.checked_div(stats.heartbeats),
        "p50_ms": ms(&stats.heartbeat_us, 0.5),
        "p99_ms": ms(&stats.heartbeat_us, 0.99),
        "max_ms": ms(&stats.heartbeat_us, 1.0),
        "errors": error_count,
        "errors_by_kind": window_errors,
        "warmup_errors": warmup_error_count,
        "warmup_errors_by_kind": warmup_errors,
        "leases": {
            "per_s": per_s(stats.leases),
            "with_tasks": stats.leases_with_tasks,
            "p50_ms": ms(&stats.lease_us, 0.5),
            "p99_ms": ms(&stats.lease_us, 0.99),
        },
        "tasks": {
            "created": created,
            "completed": stats.tasks_completed,
            "complete_p99_ms": ms(&stats.complete_us, 0.99),
            "create_to_lease_p50_ms": ms(&stats.task_to_lease_us, 0.5),
            "create_to_lease_p99_ms": ms(&stats.task_to_lease_us, 0.99),
        },
        "events": {
            "batches": stats.event_batches,
            "events": stats.events,
            "p50_ms": ms(&stats.events_us, 0.5),
            "p99_ms": ms(&stats.events_us, 0.99),
        },
        "watches": {
            "held_at_end": held_at_end,
            "timed_out": shared.watch_timeouts.load(Ordering::Relaxed),
            "answered_with_news": shared.watch_news.load(Ordering::Relaxed),
        },
        "idle_reconnects": shared.idle_reconnects.load(Ordering::Relaxed),
        "controller_cpu_pct": cpu_pct,
        "controller_rss_mib": mib(rss_end_kib),
        "controller_hwm_mib": mib(hwm_kib),
        "controller_rss_before_mib": mib(rss_before_kib),
        "rss_kib_per_node": rss_kib_per_node,
        "controller_fds": fds,
        "loadgen_cpu_pct": own_cpu_pct,
    }))
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("?".to_owned(), |v| v.to_string())
}
