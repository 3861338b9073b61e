//! `--mode heartbeat` (`scripts/bench-controller.sh`) and `--mode push`
//! (`scripts/bench-push.sh`): one persistent connection per node, closed loops and paced
//! phases.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::bodies::{small_heartbeat, NodeFacts, Rng};
use crate::http::{tls_config, Conn, Target};
use crate::procfs::{cpu_seconds, fd_count, status_mib};
use crate::setup::{connect_all, enroll_all, Node};
use crate::{micros, percentile_ms, round1, round2, Args, Body};

const HEARTBEAT_PATH: &str = "/node_api/v1/status/heartbeat";

/// Enrolls the nodes and opens one connection each, with the times it took.
async fn setup(
    args: &Args,
    target: &Target,
    ca_pem: &str,
    operator: &str,
) -> anyhow::Result<(Vec<Node>, Vec<Conn>, f64, f64)> {
    let t = Instant::now();
    let nodes = enroll_all(target, args.nodes, args.setup_concurrency, ca_pem, operator).await?;
    let enroll_s = t.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} tokens created and nodes enrolled in {enroll_s:.1} s ({:.0}/s)",
        nodes.len(),
        nodes.len() as f64 / enroll_s
    );
    let t = Instant::now();
    let conns = connect_all(target, &nodes, args.setup_concurrency).await?;
    let connect_s = t.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} mTLS connections opened in {connect_s:.1} s",
        conns.len()
    );
    Ok((nodes, conns, enroll_s, connect_s))
}

/// `--mode heartbeat`: the phases of `--phases` over one connection per node.
pub async fn heartbeat(
    args: &Args,
    target: &Target,
    ca_pem: &str,
    operator: &str,
) -> anyhow::Result<Value> {
    let (nodes, mut conns, enroll_s, connect_s) = setup(args, target, ca_pem, operator).await?;
    let bodies: Vec<Vec<u8>> = match args.body {
        Body::Small => vec![small_heartbeat()],
        Body::Fleet => nodes
            .iter()
            .map(|n| {
                let mut rng = Rng::new(args.seed, n.index as u64);
                NodeFacts::new(n.index, &mut rng, &n.cert_pem, n.not_after_ms).heartbeat(
                    &mut rng,
                    0,
                    u64::try_from(powernode_controller::now_ms()).unwrap_or_default(),
                )
            })
            .collect(),
    };
    let body_bytes = bodies.iter().map(Vec::len).sum::<usize>() / bodies.len();
    let bodies = Arc::new(bodies);
    let mut out = json!({
        "nodes": args.nodes,
        "enroll_s": round1(enroll_s),
        "connect_s": round1(connect_s),
        "offered_per_s": args.rate,
        "body_bytes": body_bytes,
    });
    if args.paced {
        let interval = Duration::from_secs_f64(args.nodes as f64 / args.rate);
        eprintln!(
            "loadgen: paced: each node every {:.0} ms (offered {:.0}/s), {:.0} s warm-up + \
             {:.0} s",
            interval.as_secs_f64() * 1000.0,
            args.rate,
            args.warmup().as_secs_f64(),
            args.duration.as_secs_f64()
        );
        let (paced, rest) = phase(args, conns, bodies.clone(), Some(interval)).await?;
        out["paced"] = report("paced", &paced);
        conns = rest;
    }
    if args.closed {
        eprintln!(
            "loadgen: closed loop: {} nodes back to back, {:.0} s warm-up + {:.0} s",
            conns.len(),
            args.warmup().as_secs_f64(),
            args.duration.as_secs_f64()
        );
        let (closed, _) = phase(args, conns, bodies, None).await?;
        out["closed"] = report("closed", &closed);
    }
    Ok(out)
}

/// What one phase measured.
struct PhaseResult {
    ok: u64,
    errors: u64,
    seconds: f64,
    latencies_us: Vec<u32>,
    controller_cpu_s: Option<f64>,
}

impl PhaseResult {
    fn percentile_ms(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies_us, p).unwrap_or(f64::NAN)
    }
    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
}

/// Runs one phase over all connections: `interval` Some = paced, None = closed loop. Node
/// `i` sends `bodies[i % len]`. Returns the connections for the next phase.
async fn phase(
    args: &Args,
    conns: Vec<Conn>,
    bodies: Arc<Vec<Vec<u8>>>,
    interval: Option<Duration>,
) -> anyhow::Result<(PhaseResult, Vec<Conn>)> {
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + args.warmup();
    let measure_to = measure_from + args.duration;
    let stop = Arc::new(AtomicBool::new(false));
    // Refusals logged so far, by all nodes: the first few say why, the rest are counted.
    let logged = Arc::new(AtomicU64::new(0));
    let n = conns.len();
    let mut tasks = Vec::with_capacity(n);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let bodies = bodies.clone();
        let stop = stop.clone();
        let logged = logged.clone();
        tasks.push(tokio::spawn(async move {
            let body = &bodies[i % bodies.len()];
            let mut lat = Vec::new();
            let (mut ok, mut errors) = (0u64, 0u64);
            let mut next = match interval {
                Some(iv) => start + iv.mul_f64(i as f64 / n as f64),
                None => start,
            };
            tokio::time::sleep_until(next.into()).await;
            loop {
                if Instant::now() >= measure_to || stop.load(Ordering::Relaxed) {
                    break;
                }
                let sent = match interval {
                    Some(_) => next,
                    None => Instant::now(),
                };
                let result = conn.post(HEARTBEAT_PATH, None, body).await;
                let done = Instant::now();
                let in_window = sent >= measure_from && done <= measure_to;
                match result {
                    Ok((200, _)) => {
                        if in_window {
                            ok += 1;
                            lat.push(micros(sent, done));
                        }
                    }
                    Ok((status, reply)) => {
                        errors += 1;
                        if logged.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!(
                                "loadgen: heartbeat HTTP {status}: {}",
                                String::from_utf8_lossy(&reply)
                            );
                        }
                    }
                    Err(err) => {
                        // The connection is unusable; this node stops (counted as errors).
                        eprintln!("loadgen: node {i}: {err}");
                        return (ok, errors + 1, lat, None);
                    }
                }
                if let Some(iv) = interval {
                    next += iv;
                    tokio::time::sleep_until(next.into()).await;
                }
            }
            (ok, errors, lat, Some(conn))
        }));
    }
    let cpu_at = |pid: Option<u32>| pid.and_then(cpu_seconds);
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = cpu_at(args.controller_pid);
    tokio::time::sleep_until(measure_to.into()).await;
    let cpu1 = cpu_at(args.controller_pid);
    stop.store(true, Ordering::Relaxed);
    let mut result = PhaseResult {
        ok: 0,
        errors: 0,
        seconds: args.duration.as_secs_f64(),
        latencies_us: Vec::new(),
        controller_cpu_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
    };
    let mut conns = Vec::with_capacity(n);
    for task in tasks {
        let (ok, errors, lat, conn) = task.await?;
        result.ok += ok;
        result.errors += errors;
        result.latencies_us.extend(lat);
        conns.extend(conn);
    }
    result.latencies_us.sort_unstable();
    Ok((result, conns))
}

fn report(name: &str, r: &PhaseResult) -> Value {
    let cpu = r.controller_cpu_s.map(|c| c / r.seconds * 100.0);
    eprintln!(
        "loadgen: {name:6}: {:.0} heartbeats/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, \
         {} errors, controller CPU {}",
        r.rate(),
        r.percentile_ms(0.5),
        r.percentile_ms(0.99),
        r.percentile_ms(1.0),
        r.errors,
        cpu.map_or("?".to_owned(), |c| format!("{c:.0}%")),
    );
    json!({
        "heartbeats_per_s": round1(r.rate()),
        "p50_ms": round2(r.percentile_ms(0.5)),
        "p99_ms": round2(r.percentile_ms(0.99)),
        "max_ms": round2(r.percentile_ms(1.0)),
        "errors": r.errors,
        "samples": r.latencies_us.len(),
        "controller_cpu_pct": cpu.map(f64::round),
    })
}

/// `--mode push`: held watches, then closed-loop tasks.
pub async fn push(
    args: &Args,
    target: &Target,
    ca_pem: &str,
    operator: &str,
) -> anyhow::Result<Value> {
    let (nodes, conns, enroll_s, _) = setup(args, target, ca_pem, operator).await?;
    let watched = watch_phase(args, conns).await?;
    let conns = connect_all(target, &nodes, args.setup_concurrency).await?;
    let tasks = tasks_phase(args, target, ca_pem, operator, &nodes, conns).await?;
    Ok(json!({
        "nodes": args.nodes,
        "enroll_s": round1(enroll_s),
        "watch": watched,
        "tasks": tasks,
    }))
}

/// Every node holds a watch for `--hold-s`; the controller's memory and descriptors meanwhile.
async fn watch_phase(args: &Args, conns: Vec<Conn>) -> anyhow::Result<Value> {
    let n = conns.len();
    let hold_s = args.hold.as_secs().clamp(1, 270);
    let mut watchers = Vec::with_capacity(n);
    for mut conn in conns {
        let path = format!("/node_api/v1/watch?generation=0&timeout_s={}", hold_s + 30);
        watchers.push(tokio::spawn(async move {
            conn.get(&path, Duration::from_secs(hold_s + 60)).await
        }));
    }
    // Let every request reach the controller before the driver is told.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("watching {n}");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    eprintln!("loadgen: {n} watches held for {hold_s} s");
    let (mut rss, mut fds) = (0.0f64, 0usize);
    let until = Instant::now() + Duration::from_secs(hold_s);
    while Instant::now() < until {
        if let Some(pid) = args.controller_pid {
            rss = rss.max(status_mib(pid, "VmRSS:").unwrap_or(0.0));
            fds = fds.max(fd_count(pid).unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let answered = watchers.iter().filter(|w| w.is_finished()).count();
    for w in &watchers {
        w.abort();
    }
    eprintln!(
        "loadgen: watch: controller RSS up to {rss:.1} MiB, {fds} descriptors; {answered} of {n} \
         watches answered early"
    );
    Ok(json!({
        "watching_nodes": n,
        "answered_early": answered,
        "controller_rss_mib": round1(rss),
        "controller_fds": fds,
    }))
}

/// `--tasks-per-node` tasks for every node, then every node leases and completes one at a
/// time until none is left: the closed-loop rate.
async fn tasks_phase(
    args: &Args,
    target: &Target,
    ca_pem: &str,
    operator: &str,
    nodes: &[Node],
    conns: Vec<Conn>,
) -> anyhow::Result<Value> {
    let t = Instant::now();
    let anon = Arc::new(tls_config(ca_pem, None)?);
    let next = Arc::new(AtomicU64::new(0));
    let ids: Arc<Vec<String>> = Arc::new(nodes.iter().map(|n| n.id.clone()).collect());
    let total = (nodes.len() * args.tasks_per_node) as u64;
    let mut creators = Vec::new();
    for _ in 0..args.setup_concurrency.max(1) {
        let (anon, next, ids) = (anon.clone(), next.clone(), ids.clone());
        let (target, operator) = (target.clone(), operator.to_owned());
        creators.push(tokio::spawn(async move {
            let mut conn = Conn::open(&target, None, anon).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let node = &ids[(i as usize) % ids.len()];
                let body = json!({"node": node, "kind": "bench.noop", "timeout_s": 60});
                let (status, reply) = conn
                    .post(
                        "/api/v1/tasks",
                        Some(&operator),
                        &serde_json::to_vec(&body)?,
                    )
                    .await?;
                anyhow::ensure!(
                    status == 200,
                    "task create: HTTP {status} {}",
                    String::from_utf8_lossy(&reply)
                );
            }
        }));
    }
    for c in creators {
        c.await??;
    }
    let create_s = t.elapsed().as_secs_f64();
    eprintln!("loadgen: {total} tasks created in {create_s:.1} s");

    let t = Instant::now();
    let mut runners = Vec::with_capacity(conns.len());
    for mut conn in conns {
        runners.push(tokio::spawn(async move {
            let (mut done, mut errors) = (0u64, 0u64);
            loop {
                let (status, reply) = conn
                    .post("/node_api/v1/tasks/lease", None, b"{\"max\":1}")
                    .await?;
                if status != 200 {
                    errors += 1;
                    anyhow::ensure!(errors < 10, "lease: HTTP {status}");
                    continue;
                }
                let reply: Value = serde_json::from_slice(&reply)?;
                let Some(task) = reply["tasks"].as_array().and_then(|t| t.first()) else {
                    return anyhow::Ok((done, errors));
                };
                let id = task["id"].as_str().context("no task id")?;
                let path = format!("/node_api/v1/tasks/{id}/complete");
                let (status, _) = conn
                    .post(
                        &path,
                        None,
                        b"{\"outcome\":\"Succeeded\",\"output\":\"ok\"}",
                    )
                    .await?;
                if status == 200 {
                    done += 1;
                } else {
                    errors += 1;
                }
            }
        }));
    }
    let (mut done, mut errors) = (0u64, 0u64);
    for r in runners {
        let (d, e) = r.await??;
        done += d;
        errors += e;
    }
    let seconds = t.elapsed().as_secs_f64();
    let rate = done as f64 / seconds;
    eprintln!(
        "loadgen: {done} tasks leased and completed by {} nodes in {seconds:.1} s: {rate:.0}/s, \
         {errors} errors",
        nodes.len()
    );
    Ok(json!({
        "tasks": done,
        "create_s": round1(create_s),
        "seconds": round2(seconds),
        "tasks_per_s": rate.round(),
        "errors": errors,
    }))
}
