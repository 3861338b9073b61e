//! Controller load generator for `scripts/bench-controller.sh` (issue 3).
//!
//! Against a running controller on loopback: creates N bootstrap tokens through the operator
//! API, enrolls N simulated nodes (Ed25519 key, CSR, `POST /node_api/v1/enroll`), opens ONE
//! persistent mTLS connection per node (HTTP/1.1 keep-alive, the node's own certificate), then
//! runs two phases, each a warm-up followed by a measured window:
//!
//! - `paced`: every node heartbeats every `N / rate` seconds (staggered), so the controller is
//!   offered `--rate` heartbeats/s in total; latency is measured from the *scheduled* send
//!   time, so a late sender counts as latency (no coordinated omission).
//! - `closed`: every node sends its next heartbeat as soon as the previous reply arrived —
//!   the most the controller (and this generator, on the same machine) can do.
//!
//! With `--mode push` (for `scripts/bench-push.sh`) it runs instead:
//!
//! - `watch`: every node holds `GET /node_api/v1/watch` for `--hold-s` seconds; once all are
//!   sent it prints `watching N` on stdout (the driver measures a real node meanwhile), and
//!   samples the controller's RSS and open descriptors every second;
//! - `tasks`: `--tasks-per-node` tasks are created for every node through the operator API,
//!   then every node leases one (`max 1`) and completes it, back to back, until none is left:
//!   the closed-loop task rate.
//!
//! Prints human-readable lines to stderr and one JSON object as its last stdout line.
//! Everything is bounded: counts and durations are arguments, and it stops by itself.
//!
//! The HTTP/1.1 client is written out here (request line, headers, `content-length` body),
//! over tokio-rustls with the ring provider and the controller CA as the only root, so the
//! binary needs no dependency the controller does not already have.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Command-line options.
struct Args {
    addr: String,
    data: std::path::PathBuf,
    nodes: usize,
    rate: f64,
    warmup: Duration,
    duration: Duration,
    controller_pid: Option<u32>,
    setup_concurrency: usize,
    threads: usize,
    push: bool,
    hold: Duration,
    tasks_per_node: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        addr: String::new(),
        data: std::path::PathBuf::new(),
        nodes: 1000,
        rate: 2000.0,
        warmup: Duration::from_secs(3),
        duration: Duration::from_secs(20),
        controller_pid: None,
        setup_concurrency: 16,
        threads: 2,
        push: false,
        hold: Duration::from_secs(30),
        tasks_per_node: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value()?,
            "--data" => args.data = value()?.into(),
            "--nodes" => args.nodes = value()?.parse()?,
            "--rate" => args.rate = value()?.parse()?,
            "--warmup-s" => args.warmup = Duration::from_secs_f64(value()?.parse()?),
            "--duration-s" => args.duration = Duration::from_secs_f64(value()?.parse()?),
            "--controller-pid" => args.controller_pid = Some(value()?.parse()?),
            "--setup-concurrency" => args.setup_concurrency = value()?.parse()?,
            "--threads" => args.threads = value()?.parse()?,
            "--mode" => {
                args.push = match value()?.as_str() {
                    "heartbeat" => false,
                    "push" => true,
                    other => bail!("--mode is heartbeat or push, not {other}"),
                }
            }
            "--hold-s" => args.hold = Duration::from_secs_f64(value()?.parse()?),
            "--tasks-per-node" => args.tasks_per_node = value()?.parse()?,
            other => bail!(
                "unknown argument {other}\nusage: loadgen --addr HOST:PORT --data DIR \
                 [--nodes N] [--rate HB_PER_S] [--warmup-s S] [--duration-s S] \
                 [--controller-pid PID] [--setup-concurrency C] [--threads T] \
                 [--mode heartbeat|push] [--hold-s S] [--tasks-per-node N]"
            ),
        }
    }
    anyhow::ensure!(!args.addr.is_empty(), "--addr is required");
    anyhow::ensure!(!args.data.as_os_str().is_empty(), "--data is required");
    anyhow::ensure!(
        args.nodes > 0 && args.nodes <= 100_000,
        "--nodes out of range"
    );
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(
        args.duration <= Duration::from_secs(600),
        "--duration-s at most 600"
    );
    Ok(args)
}

/// One keep-alive HTTP/1.1 connection over TLS.
struct Conn {
    tls: TlsStream<TcpStream>,
    host: String,
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// Longest time any single request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Conn {
    async fn open(addr: &str, config: Arc<rustls::ClientConfig>) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).to_owned();
        let name = ServerName::try_from(host.clone())?;
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        Ok(Self {
            tls,
            host: addr.to_owned(),
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(1024),
        })
    }

    /// POST `body` (JSON) to `path`; the status and the reply body.
    async fn post(
        &mut self,
        path: &str,
        bearer: Option<&str>,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.request("POST", path, bearer, Some(body)),
        )
        .await
        .context("request timed out")?
    }

    /// GET `path`, waiting up to `timeout` (a held watch takes long); the status and body.
    async fn get(&mut self, path: &str, timeout: Duration) -> anyhow::Result<(u16, Vec<u8>)> {
        tokio::time::timeout(timeout, self.request("GET", path, None, None))
            .await
            .context("request timed out")?
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&[u8]>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        self.out.clear();
        let mut head = String::with_capacity(256);
        write!(head, "{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.host)?;
        if let Some(body) = body {
            write!(
                head,
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            )?;
        }
        if let Some(token) = bearer {
            write!(head, "authorization: Bearer {token}\r\n")?;
        }
        head.push_str("\r\n");
        self.out.extend_from_slice(head.as_bytes());
        self.out.extend_from_slice(body.unwrap_or_default());
        self.tls.write_all(&self.out).await?;
        self.tls.flush().await?;
        // Headers.
        let header_end = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                break pos + 4;
            }
            if self.buf.len() > 64 * 1024 {
                bail!("reply headers too long");
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..header_end]).context("reply head")?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .context("no status line")?
            .parse()
            .context("bad status")?;
        let mut length = None;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.trim().parse::<usize>()?);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    bail!("chunked replies are not supported by this client");
                }
            }
        }
        let length = length.context("reply without content-length")?;
        while self.buf.len() < header_end + length {
            self.fill().await?;
        }
        let reply = self.buf[header_end..header_end + length].to_vec();
        self.buf.drain(..header_end + length);
        Ok((status, reply))
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.tls.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed by the controller");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn tls_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A simulated node's id, certificate and key.
struct Node {
    id: String,
    cert_pem: String,
    key_pem: String,
}

/// Creates tokens and enrolls `n` nodes, `concurrency` at a time, each worker on one
/// anonymous keep-alive connection.
async fn enroll_all(args: &Args, ca_pem: &str, operator: &str) -> anyhow::Result<Vec<Node>> {
    let anon = Arc::new(tls_config(ca_pem, None)?);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.setup_concurrency.max(1) {
        let anon = anon.clone();
        let next = next.clone();
        let addr = args.addr.clone();
        let operator = operator.to_owned();
        let total = args.nodes as u64;
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr, anon).await?;
            let mut nodes = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let (status, body) = conn
                    .post("/api/v1/tokens", Some(&operator), b"{\"ttl_s\":3600}")
                    .await?;
                anyhow::ensure!(status == 200, "token create: HTTP {status}");
                let body: Value = serde_json::from_slice(&body)?;
                let token = body["token"].as_str().context("no token")?.to_owned();
                let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
                let mut params = CertificateParams::new(Vec::<String>::new())?;
                params.distinguished_name.push(DnType::CommonName, "node");
                let csr = params.serialize_request(&key)?.pem()?;
                let request = json!({
                    "bootstrap_token": token,
                    "csr_pem": csr,
                    "identity": {"uuid": format!("bench-{i:06}"), "hostname": format!("bench-{i}"),
                                 "arch": "x86_64", "boot_id": "b-1"},
                    "agent_version": "loadgen",
                });
                let (status, body) = conn
                    .post("/node_api/v1/enroll", None, &serde_json::to_vec(&request)?)
                    .await?;
                anyhow::ensure!(
                    status == 200,
                    "enroll: HTTP {status} {}",
                    String::from_utf8_lossy(&body)
                );
                let body: Value = serde_json::from_slice(&body)?;
                nodes.push(Node {
                    id: body["node_id"].as_str().context("no node_id")?.to_owned(),
                    cert_pem: body["cert_pem"].as_str().context("no cert_pem")?.to_owned(),
                    key_pem: key.serialize_pem(),
                });
            }
            anyhow::Ok(nodes)
        }));
    }
    let mut all = Vec::with_capacity(args.nodes);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
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
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let idx = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.latencies_us[idx]) / 1000.0
    }
    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
}

/// utime + stime of a process, seconds (from /proc/PID/stat, in clock ticks of 100 Hz).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // After the command: state is field 3 (index 0 here); utime 14 and stime 15 → 11, 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

const HEARTBEAT_PATH: &str = "/node_api/v1/status/heartbeat";

fn heartbeat_body() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "boot_id": "b-1",
        "agent_version": "loadgen",
        "arch": "x86_64",
        "uptime_s": 42,
        "load": [0.1, 0.2, 0.3],
        "memory": {"total_bytes": 4_000_000_000u64, "available_bytes": 2_000_000_000u64},
        "modules": [{"name": "tools", "digest": "sha256:00", "state": "Active"}],
        "mounts": {"stack": "a"},
        "network": {"state": "Down"},
        "applied_generation": 0,
    }))
    .unwrap_or_default()
}

/// Runs one phase over all connections: `interval` Some = paced, None = closed loop.
/// Returns the connections for the next phase.
async fn phase(
    args: &Args,
    conns: Vec<Conn>,
    interval: Option<Duration>,
) -> anyhow::Result<(PhaseResult, Vec<Conn>)> {
    let body = Arc::new(heartbeat_body());
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + args.warmup;
    let measure_to = measure_from + args.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let n = conns.len();
    let mut tasks = Vec::with_capacity(n);
    for (i, mut conn) in conns.into_iter().enumerate() {
        let body = body.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
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
                let result = conn.post(HEARTBEAT_PATH, None, &body).await;
                let done = Instant::now();
                let in_window = sent >= measure_from && done <= measure_to;
                match result {
                    Ok((200, _)) => {
                        if in_window {
                            ok += 1;
                            let us = done.duration_since(sent).as_micros();
                            lat.push(u32::try_from(us).unwrap_or(u32::MAX));
                        }
                    }
                    Ok((status, reply)) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!(
                                "loadgen: heartbeat HTTP {status}: {}",
                                String::from_utf8_lossy(&reply)
                            );
                        }
                    }
                    Err(err) => {
                        // The connection is unusable; this node stops (counted as errors).
                        eprintln!("loadgen: node {i}: {err:#}");
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
        "heartbeats_per_s": (r.rate() * 10.0).round() / 10.0,
        "p50_ms": (r.percentile_ms(0.5) * 100.0).round() / 100.0,
        "p99_ms": (r.percentile_ms(0.99) * 100.0).round() / 100.0,
        "max_ms": (r.percentile_ms(1.0) * 100.0).round() / 100.0,
        "errors": r.errors,
        "samples": r.latencies_us.len(),
        "controller_cpu_pct": cpu.map(|c| c.round()),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ca_pem = std::fs::read_to_string(args.data.join("ca.crt.pem")).context("ca.crt.pem")?;
    let operator = std::fs::read_to_string(args.data.join("operator.token"))
        .context("operator.token")?
        .trim()
        .to_owned();

    let t = Instant::now();
    let nodes = enroll_all(&args, &ca_pem, &operator).await?;
    let enroll_s = t.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} tokens created and nodes enrolled in {enroll_s:.1} s ({:.0}/s)",
        nodes.len(),
        nodes.len() as f64 / enroll_s
    );

    // One mTLS connection per node, opened `setup_concurrency` at a time.
    let t = Instant::now();
    let conns = connect_all(&args, &ca_pem, &nodes).await?;
    let connect_s = t.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} mTLS connections opened in {connect_s:.1} s",
        conns.len()
    );
    if args.push {
        let watched = watch_phase(&args, conns).await?;
        let conns = connect_all(&args, &ca_pem, &nodes).await?;
        let tasks = tasks_phase(&args, &ca_pem, &operator, &nodes, conns).await?;
        println!(
            "{}",
            json!({
                "nodes": args.nodes,
                "enroll_s": (enroll_s * 10.0).round() / 10.0,
                "watch": watched,
                "tasks": tasks,
            })
        );
        return Ok(());
    }

    let interval = Duration::from_secs_f64(args.nodes as f64 / args.rate);
    eprintln!(
        "loadgen: paced: each node every {:.0} ms (offered {:.0}/s), {:.0} s warm-up + {:.0} s",
        interval.as_secs_f64() * 1000.0,
        args.rate,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64()
    );
    let (paced, conns) = phase(&args, conns, Some(interval)).await?;
    let paced_json = report("paced", &paced);
    eprintln!(
        "loadgen: closed loop: {} nodes back to back, {:.0} s warm-up + {:.0} s",
        conns.len(),
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64()
    );
    let (closed, conns) = phase(&args, conns, None).await?;
    let closed_json = report("closed", &closed);
    drop(conns);

    println!(
        "{}",
        json!({
            "nodes": args.nodes,
            "enroll_s": (enroll_s * 10.0).round() / 10.0,
            "connect_s": (connect_s * 10.0).round() / 10.0,
            "offered_per_s": args.rate,
            "paced": paced_json,
            "closed": closed_json,
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

/// One mTLS connection per node, `setup_concurrency` opened at a time.
async fn connect_all(args: &Args, ca_pem: &str, nodes: &[Node]) -> anyhow::Result<Vec<Conn>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(args.setup_concurrency.max(1)));
    let mut opens = Vec::with_capacity(nodes.len());
    for node in nodes {
        let config = Arc::new(tls_config(ca_pem, Some((&node.cert_pem, &node.key_pem)))?);
        let addr = args.addr.clone();
        let sem = sem.clone();
        opens.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            Conn::open(&addr, config).await
        }));
    }
    let mut conns = Vec::with_capacity(nodes.len());
    for open in opens {
        conns.push(open.await??);
    }
    Ok(conns)
}

/// Open descriptors of a process.
fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A `kB` line of /proc/PID/status, in MiB.
fn status_mib(pid: u32, key: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
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
        "controller_rss_mib": (rss * 10.0).round() / 10.0,
        "controller_fds": fds,
    }))
}

/// `--tasks-per-node` tasks for every node, then every node leases and completes one at a
/// time until none is left: the closed-loop rate.
async fn tasks_phase(
    args: &Args,
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
        let (addr, operator) = (args.addr.clone(), operator.to_owned());
        creators.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr, anon).await?;
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
        "create_s": (create_s * 10.0).round() / 10.0,
        "seconds": (seconds * 100.0).round() / 100.0,
        "tasks_per_s": rate.round(),
        "errors": errors,
    }))
}
