//! Controller load generator and fleet simulator, for `scripts/bench-controller.sh`,
//! `scripts/bench-push.sh` and `scripts/bench-fleet.sh`.
//!
//! Against a running controller on loopback it creates N bootstrap tokens through the operator
//! API and enrolls N simulated nodes (Ed25519 key, CSR, `POST /node_api/v1/enroll`), each
//! calling from a source address of its own in 127.0.0.0/8 ([`http::source_ip`]), then runs
//! one of three modes:
//!
//! - `--mode heartbeat` (the default; [`bench`]): ONE persistent mTLS connection per node
//!   (HTTP/1.1 keep-alive, the node's own certificate), then the phases of `--phases`, each a
//!   warm-up followed by a measured window:
//!   - `paced`: every node heartbeats every `N / rate` seconds (staggered), so the controller
//!     is offered `--rate` heartbeats/s in total; latency is measured from the *scheduled*
//!     send time, so a late sender counts as latency (no coordinated omission);
//!   - `closed`: every node sends its next heartbeat as soon as the previous reply arrived —
//!     the most the controller (and this generator, on the same machine) can do.
//! - `--mode push` ([`bench`]): every node holds `GET /node_api/v1/watch` for `--hold-s`
//!   seconds (it prints `watching N` on stdout once all are sent, and samples the
//!   controller's RSS and descriptors), then gets `--tasks-per-node` tasks through the
//!   operator API and leases and completes them one at a time: the closed-loop task rate.
//! - `--mode fleet` ([`fleet`]): N nodes live as heartbeatd and eventd make a real node live
//!   — a heartbeat every `--interval-s` (staggered evenly) with a body of a few KiB, a lease
//!   after each, a watch held beside, event batches from a fraction of the nodes, tasks
//!   created through the operator API that the nodes lease and complete — and the
//!   controller's latency, errors, CPU and memory are measured over a window after warm-up.
//!
//! Prints human-readable lines to stderr and one JSON object as its last stdout line.
//! Everything is bounded: counts and durations are arguments, and it stops by itself.

mod bench;
mod bodies;
mod fleet;
mod http;
mod procfs;
mod setup;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// What the run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Paced and closed-loop heartbeats on persistent connections.
    Heartbeat,
    /// Held watches, then closed-loop tasks.
    Push,
    /// The fleet simulator.
    Fleet,
}

/// How a simulated node reaches the controller in `--mode fleet`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connections {
    /// One keep-alive connection for the node's calls and one for its watch, for the run
    /// (a connection the controller closed while idle is opened again, and counted).
    Persistent,
    /// A new connection (TCP + TLS handshake) for every call, watches included: what the
    /// node's transport does (`agents/transport/src/client.rs`).
    PerCall,
}

impl Connections {
    fn name(self) -> &'static str {
        match self {
            Connections::Persistent => "persistent",
            Connections::PerCall => "per-call",
        }
    }
}

/// Which heartbeat body `--mode heartbeat` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// The ~330 B body bench-controller has always sent.
    Small,
    /// The fleet's body of a few KiB (`bodies::NodeFacts::heartbeat`).
    Fleet,
}

/// Command-line options.
#[derive(Clone, Debug)]
pub struct Args {
    addr: String,
    data: std::path::PathBuf,
    nodes: usize,
    rate: f64,
    warmup: Option<Duration>,
    duration: Duration,
    controller_pid: Option<u32>,
    setup_concurrency: usize,
    threads: usize,
    mode: Mode,
    hold: Duration,
    tasks_per_node: usize,
    paced: bool,
    closed: bool,
    body: Body,
    interval: Duration,
    watch: bool,
    event_fraction: f64,
    task_fraction: f64,
    connections: Connections,
    seed: u64,
}

const USAGE: &str = "usage: loadgen --addr HOST:PORT --data DIR [--mode heartbeat|push|fleet] \
    [--nodes N] [--warmup-s S] [--duration-s S] [--controller-pid PID] \
    [--setup-concurrency C] [--threads T] [--seed N]\n\
    heartbeat: [--rate HB_PER_S] [--phases paced,closed] [--body small|fleet]\n\
    push:      [--hold-s S] [--tasks-per-node N]\n\
    fleet:     [--interval-s S] [--no-watch] [--event-fraction F] [--task-fraction F] \
    [--connections persistent|per-call]";

impl Args {
    /// The warm-up: as given, else 3 s, or in the fleet one interval and 5 s (every node has
    /// then heartbeated once before the window).
    fn warmup(&self) -> Duration {
        self.warmup.unwrap_or(match self.mode {
            Mode::Fleet => self.interval + Duration::from_secs(5),
            _ => Duration::from_secs(3),
        })
    }
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        addr: String::new(),
        data: std::path::PathBuf::new(),
        nodes: 1000,
        rate: 2000.0,
        warmup: None,
        duration: Duration::from_secs(20),
        controller_pid: None,
        setup_concurrency: 16,
        threads: 2,
        mode: Mode::Heartbeat,
        hold: Duration::from_secs(30),
        tasks_per_node: 5,
        paced: true,
        closed: true,
        body: Body::Small,
        interval: Duration::from_secs(30),
        watch: true,
        event_fraction: 0.05,
        task_fraction: 0.02,
        connections: Connections::Persistent,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value()?,
            "--data" => args.data = value()?.into(),
            "--nodes" => args.nodes = value()?.parse()?,
            "--rate" => args.rate = value()?.parse()?,
            "--warmup-s" => args.warmup = Some(Duration::try_from_secs_f64(value()?.parse()?)?),
            "--duration-s" => args.duration = Duration::try_from_secs_f64(value()?.parse()?)?,
            "--controller-pid" => args.controller_pid = Some(value()?.parse()?),
            "--setup-concurrency" => args.setup_concurrency = value()?.parse()?,
            "--threads" => args.threads = value()?.parse()?,
            "--seed" => args.seed = value()?.parse()?,
            "--mode" => {
                args.mode = match value()?.as_str() {
                    "heartbeat" => Mode::Heartbeat,
                    "push" => Mode::Push,
                    "fleet" => Mode::Fleet,
                    other => bail!("--mode is heartbeat, push or fleet, not {other}"),
                }
            }
            "--hold-s" => args.hold = Duration::try_from_secs_f64(value()?.parse()?)?,
            "--tasks-per-node" => args.tasks_per_node = value()?.parse()?,
            "--phases" => {
                let phases = value()?;
                (args.paced, args.closed) = (false, false);
                for phase in phases.split(',') {
                    match phase {
                        "paced" => args.paced = true,
                        "closed" => args.closed = true,
                        other => bail!("--phases lists paced and closed, not {other}"),
                    }
                }
            }
            "--body" => {
                args.body = match value()?.as_str() {
                    "small" => Body::Small,
                    "fleet" => Body::Fleet,
                    other => bail!("--body is small or fleet, not {other}"),
                }
            }
            "--interval-s" => args.interval = Duration::try_from_secs_f64(value()?.parse()?)?,
            "--no-watch" => args.watch = false,
            "--event-fraction" => args.event_fraction = value()?.parse()?,
            "--task-fraction" => args.task_fraction = value()?.parse()?,
            "--connections" => {
                args.connections = match value()?.as_str() {
                    "persistent" => Connections::Persistent,
                    "per-call" => Connections::PerCall,
                    other => bail!("--connections is persistent or per-call, not {other}"),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    anyhow::ensure!(!args.addr.is_empty(), "--addr is required\n{USAGE}");
    anyhow::ensure!(
        !args.data.as_os_str().is_empty(),
        "--data is required\n{USAGE}"
    );
    anyhow::ensure!(
        args.nodes > 0 && args.nodes <= 100_000,
        "--nodes out of range (1 to 100,000)"
    );
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(args.paced || args.closed, "--phases names no phase");
    anyhow::ensure!(
        args.duration > Duration::ZERO && args.duration <= Duration::from_secs(600),
        "--duration-s must be above 0 and at most 600"
    );
    anyhow::ensure!(
        args.warmup() <= Duration::from_secs(600),
        "--warmup-s at most 600"
    );
    anyhow::ensure!(
        args.interval >= Duration::from_millis(100) && args.interval <= Duration::from_secs(3600),
        "--interval-s must be 0.1 to 3600"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.event_fraction) && (0.0..=1.0).contains(&args.task_fraction),
        "--event-fraction and --task-fraction are fractions (0 to 1)"
    );
    Ok(args)
}

/// Seconds with one decimal, for the JSON.
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Milliseconds with two decimals, for the JSON.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The `p` quantile of `sorted` latencies (microseconds), in ms; `None` when there are none.
fn percentile_ms(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(f64::from(sorted[idx]) / 1000.0)
}

/// Microseconds from `from` to `to`, saturated to fit.
fn micros(from: Instant, to: Instant) -> u32 {
    u32::try_from(to.saturating_duration_since(from).as_micros()).unwrap_or(u32::MAX)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ca_pem = std::fs::read_to_string(args.data.join("ca.crt.pem")).context("ca.crt.pem")?;
    let operator = std::fs::read_to_string(args.data.join("operator.token"))
        .context("operator.token")?
        .trim()
        .to_owned();
    let target = http::Target::resolve(&args.addr).await?;
    let result = match args.mode {
        Mode::Heartbeat => bench::heartbeat(&args, &target, &ca_pem, &operator).await?,
        Mode::Push => bench::push(&args, &target, &ca_pem, &operator).await?,
        Mode::Fleet => fleet::run(&args, &target, &ca_pem, &operator).await?,
    };
    println!("{result}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_sorted_microseconds() {
        let sorted: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&sorted, 0.5), Some(51.0));
        assert_eq!(percentile_ms(&sorted, 0.99), Some(99.0));
        assert_eq!(percentile_ms(&sorted, 1.0), Some(100.0));
        assert_eq!(percentile_ms(&[], 0.5), None);
    }
}
