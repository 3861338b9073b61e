//! The events benchmark's measurement (scripts/bench-events.sh runs it beside its floor):
//! events raised by one agent → journalled by the real eventd → accepted by the real
//! controller, a separate process on loopback. Prints one JSON line.
//!
//! ```text
//! bench-events --agent-bin B --controller-bin C --dir D [--count N] [--latency-count M]
//!              [--rate R] [--size S] [--controller-cpu K]
//! ```
//!
//! This process plays the raising agent (`heartbeatd`, through agentbase as the real agent
//! raises) and publishes the node's identity; it starts the real enrollmgr and eventd from
//! `--agent-bin` under a node root in `D`, and the controller from `--controller-bin` (pinned
//! to `--controller-cpu`: the controller is another machine in a fleet, so it does not share
//! the node's CPU). Two phases:
//!
//! - **throughput**: `N` events raised back to back; `events_per_s` is `N` over the time from
//!   the first raise until eventd has acknowledged the last (journalled and synced). The raiser
//!   waits while its pending events near the per-agent bound, so the rate is eventd's, not a
//!   rate bought by dropping events.
//! - **latency**: `M` events raised at `R` a second while the controller is up; the latency of
//!   each is the controller's receive time minus the raise time (one clock, milliseconds).
//!
//! Then every event of both phases is looked up on the controller by its message:
//! `events_lost` are missing ones, `events_duplicated` rows beyond one per event.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentbase::events::PENDING_CAP;
use agentbase::{Context, Root, Settings};
use powernode_controller::storage::{EventQuery, Storage};
use powernode_pubsub::{Dirs, Subscription};
use powernode_types::{EnrollmentState, EnrollmentStatus, Severity};

mod common;

use common::{Children, Res};

const USAGE: &str = "usage: bench-events --agent-bin B --controller-bin C --dir D [--count N] \
                     [--latency-count M] [--rate R] [--size S] [--controller-cpu K]";

struct Args {
    agent_bin: PathBuf,
    controller_bin: PathBuf,
    dir: PathBuf,
    count: u32,
    latency_count: u32,
    rate: u32,
    size: usize,
    controller_cpu: Option<u32>,
}

impl Args {
    fn parse() -> Res<Args> {
        let mut flags = BTreeMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let name = flag.strip_prefix("--").ok_or(USAGE)?.to_owned();
            let value = it.next().ok_or(USAGE)?;
            flags.insert(name, value);
        }
        let path =
            |name: &str| -> Res<PathBuf> { Ok(PathBuf::from(flags.get(name).ok_or(USAGE)?)) };
        let num = |name: &str, default: u32| -> Res<u32> {
            flags
                .get(name)
                .map_or(Ok(default), |v| v.parse().map_err(|_| USAGE.into()))
        };
        Ok(Args {
            agent_bin: path("agent-bin")?,
            controller_bin: path("controller-bin")?,
            dir: path("dir")?,
            count: num("count", 20_000)?,
            latency_count: num("latency-count", 2_000)?,
            rate: num("rate", 500)?.max(1),
            size: num("size", 1024)? as usize,
            controller_cpu: flags.get("controller-cpu").map(|v| v.parse()).transpose()?,
        })
    }
}

fn main() {
    common::main_with("bench-events", Args::parse, |args| async move {
        bench(&args).await
    });
}

async fn bench(args: &Args) -> Res<()> {
    let data = args.dir.join("controller");
    let root = args.dir.join("root");
    std::fs::create_dir_all(root.join("etc/powernode"))?;
    std::fs::write(
        root.join("etc/powernode/agent.toml"),
        "[controller]\nmax_backoff_s = 1\n",
    )?;
    let mut children = Children(Vec::new());

    let (controller, listen) = start_controller(args, &data)?;
    children.0.push(controller);
    let dirs = Dirs::under_root(&root);
    let _identity =
        common::publish_identity(&dirs, "bench-events", &args.controller_bin, &data, &listen)?;
    let enrollmgr = agent(args, &root, "enrollmgr")?;
    let enrollmgr_pid = enrollmgr.id();
    children.0.push(enrollmgr);
    wait_enrolled(&dirs).await?;
    let eventd = agent(args, &root, "eventd")?;
    let eventd_pid = eventd.id();
    children.0.push(eventd);

    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default())?;
    // The kernel keeps the peak of the whole resident set (VmHWM), most of which is the
    // multi-call binary's code, shared and file-backed; eventd's own memory (RssAnon) has no
    // kept peak, so it is sampled.
    let anon_peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let anon_peak = anon_peak.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(kib) = status_kib(eventd_pid, "RssAnon:") {
                    anon_peak.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let padding = "x".repeat(args.size.saturating_sub(200));

    // Throughput: back to back, until eventd has acknowledged the last.
    let node = [std::process::id(), eventd_pid, enrollmgr_pid];
    let cpu_before = cpu_ticks(&node)?;
    let start = Instant::now();
    for i in 0..args.count {
        while ctx.events.pending() >= PENDING_CAP - 100 {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        ctx.events.raise(
            Severity::Info,
            "bench.throughput",
            &i.to_string(),
            &[("padding", &padding)],
        )?;
        if i % 32 == 0 {
            tokio::task::yield_now().await;
        }
    }
    while ctx.events.pending() > 0 {
        if start.elapsed() > Duration::from_secs(600) {
            return Err("eventd did not acknowledge the burst within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let events_per_s = f64::from(args.count) / start.elapsed().as_secs_f64();
    // The node's CPU time per event over the burst (the raiser, eventd, enrollmgr): unlike
    // the rate, it hardly moves when other work shares the machine.
    let cpu_after = cpu_ticks(&node)?;
    let us_per_tick = 1e6 / clock_ticks_per_s();
    let per_event =
        |i: usize| (cpu_after[i] - cpu_before[i]) as f64 * us_per_tick / f64::from(args.count);
    let (raiser_us, eventd_us, enrollmgr_us) = (per_event(0), per_event(1), per_event(2));

    // Let delivery of the burst finish, so the latency phase measures a controller that is
    // up and idle, not the tail of the burst's backlog.
    wait_stored(&data, "bench.throughput", args.count as usize).await?;
    let delivered_per_s = f64::from(args.count) / start.elapsed().as_secs_f64();

    // Latency: a steady rate.
    let period = Duration::from_secs(1) / args.rate;
    let mut next = tokio::time::Instant::now();
    for i in 0..args.latency_count {
        tokio::time::sleep_until(next).await;
        next += period;
        ctx.events.raise(
            Severity::Info,
            "bench.latency",
            &i.to_string(),
            &[("padding", &padding)],
        )?;
    }
    let latency_events = wait_stored(&data, "bench.latency", args.latency_count as usize).await?;
    let mut latencies: Vec<i64> = latency_events
        .values()
        .flatten()
        .map(|(at, received)| received - at)
        .collect();
    latencies.sort_unstable();
    let throughput_events = wait_stored(&data, "bench.throughput", args.count as usize).await?;

    let (lost, duplicated) = [
        (throughput_events, args.count),
        (latency_events, args.latency_count),
    ]
    .iter()
    .fold((0, 0), |(lost, dup), (stored, count)| {
        let missing = (0..*count).filter(|i| !stored.contains_key(i)).count();
        let extra: usize = stored.values().map(|rows| rows.len() - 1).sum();
        (lost + missing, dup + extra)
    });
    let rss_mib = status_kib(eventd_pid, "VmHWM:")? as f64 / 1024.0;
    sampler.abort();
    let anon_mib = anon_peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0;
    println!(
        "{{\"events\":{},\"latency_events\":{},\"rate\":{},\"size\":{},\
         \"events_per_s\":{events_per_s:.0},\"delivered_per_s\":{delivered_per_s:.0},\"raise_to_controller_p50_ms\":{},\
         \"raise_to_controller_p99_ms\":{},\"raise_to_controller_max_ms\":{},\
         \"events_lost\":{lost},\"events_duplicated\":{duplicated},\
         \"eventd_peak_rss_mib\":{rss_mib:.1},\"eventd_peak_anon_mib\":{anon_mib:.1},\
         \"node_cpu_us_per_event\":{:.2},\"raiser_cpu_us_per_event\":{raiser_us:.2},\
         \"eventd_cpu_us_per_event\":{eventd_us:.2},\"enrollmgr_cpu_us_per_event\":{enrollmgr_us:.2}}}",
        args.count,
        args.latency_count,
        args.rate,
        args.size,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(0),
        raiser_us + eventd_us + enrollmgr_us,
    );
    Ok(())
}

/// The controller on a free loopback port: the child and the address it listens on.
fn start_controller(args: &Args, data: &Path) -> Res<(Child, String)> {
    let out = args.dir.join("controller.out");
    let mut command = match args.controller_cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(&args.controller_bin);
            c
        }
        None => Command::new(&args.controller_bin),
    };
    let child = command
        .args(["serve", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        // Every event of the run is counted: none may be trimmed by retention (100,000 a node
        // by default) before it is.
        .args(["--event-retention-count", "10000000"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::fs::File::create(args.dir.join("controller.log"))?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if let Some(addr) = text.lines().find_map(|l| l.strip_prefix("listening on ")) {
            return Ok((child, addr.trim().to_owned()));
        }
        if Instant::now() > deadline {
            return Err("the controller did not start (see controller.log)".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `powernode-agent run <agent> --root <root>`, logging to `<dir>/<agent>.log`.
fn agent(args: &Args, root: &Path, name: &str) -> Res<Child> {
    common::agent(&args.agent_bin, &args.dir, root, name)
}

async fn wait_enrolled(dirs: &Dirs) -> Res<()> {
    let mut status = Subscription::<EnrollmentStatus>::connect(dirs, "enrollmgr");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if status
            .get(powernode_types::GLOBAL_KEY)
            .is_some_and(|s| s.state == EnrollmentState::Enrolled)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("the node did not enroll within 60 s (see enrollmgr.log)".into());
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), status.next()).await;
    }
}

/// The controller's events of `kind` by message number: (raised, received) ms of each row,
/// once at least `want` distinct messages are stored (at most 600 s: then what there is, and
/// the missing ones count as lost).
async fn wait_stored(data: &Path, kind: &str, want: usize) -> Res<BTreeMap<u32, Vec<(i64, i64)>>> {
    let storage = Storage::open(data).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    // Read on from the last row seen: the reader shares the node's CPU with eventd.
    let mut by_message: BTreeMap<u32, Vec<(i64, i64)>> = BTreeMap::new();
    let mut after = None;
    loop {
        let page = storage
            .events(&EventQuery {
                kind: Some(kind.to_owned()),
                after,
                limit: 20_000,
                ..EventQuery::default()
            })
            .await?;
        for e in &page {
            let n: u32 = e.message.parse()?;
            by_message
                .entry(n)
                .or_default()
                .push((e.at_ms, e.received_ms));
        }
        match page.last() {
            Some(last) => after = Some(last.cursor),
            None if by_message.len() >= want || Instant::now() > deadline => break,
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    storage.close().await;
    Ok(by_message)
}

/// The `p`th percentile of sorted values (nearest rank).
fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// CPU time (user + system, all threads) of each of `pids` so far, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> Res<Vec<u64>> {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            // The command name, in parentheses, may hold spaces: count fields after it.
            let after = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest)
                .unwrap_or_default();
            let fields: Vec<&str> = after.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the line: the 12th and 13th after the name.
            let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            match (tick(11), tick(12)) {
                (Some(user), Some(system)) => Ok(user + system),
                _ => Err(format!("no CPU times in /proc/{pid}/stat").into()),
            }
        })
        .collect()
}

/// The kernel's clock ticks a second (`sysconf(_SC_CLK_TCK)`).
fn clock_ticks_per_s() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        _ => 100.0,
    }
}

/// A `/proc/<pid>/status` figure in KiB: `VmHWM:` (the peak resident set), `RssAnon:`.
fn status_kib(pid: u32, key: &str) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {key} for pid {pid}").into())
}
