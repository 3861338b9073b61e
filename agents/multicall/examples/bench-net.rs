//! The network benchmark's measurement (scripts/bench-net.sh sets up the namespaces and
//! wireguard-go, then runs it): TCP throughput over the bare underlay, over wireguard-go and
//! over netmgr's tunnel, and the time netmgr takes to apply a large `NetworkConfig`. Prints
//! one JSON line.
//!
//! ```text
//! bench-net --agent-bin B --dir D --ns-a NS --ns-b NS --underlay-a IP --underlay-b IP
//!           --wireguard-go-b IP [--seconds S] [--rounds R] [--peers N] [--apply-rounds K]
//! ```
//!
//! Two nodes, `a` and `b`, one in each network namespace (joined by the script's veth pair,
//! whose addresses are `--underlay-a` and `--underlay-b`). This process plays heartbeatd for
//! both: it starts the real netmgr from `B` in each namespace under a node root in `D`,
//! reads each one's public key from its `NetworkStatus` and publishes each a
//! `NetworkConfig` with the other as its one peer (overlay 10.88.0.0/16, port 51820, the MTU
//! netmgr sets: 1420). Then:
//!
//! - **throughput**: an `iperf3` server in `b`; `R` rounds, each one `S`-second TCP run from
//!   `a` to `b` over the underlay, over wireguard-go (`b` at `--wireguard-go-b`, set up by the
//!   script) and over netmgr's tunnel, interleaved; medians of the receiver's Mbit/s.
//! - **apply**: `K` times, node `a` goes back to its one real peer, then gets a configuration
//!   of `N` peers (the real one and `N - 1` with fresh random keys, distinct /32s, endpoints):
//!   the time from publishing it to `NetworkStatus` saying that generation is applied and
//!   `Up`; then the same with one of those peers changed (its endpoint). Medians.
//! - **memory**: the peak RSS (`VmHWM`) of each node's netmgr and device process, the larger
//!   of the two nodes' for each, after the throughput rounds (`…_one_peer`) and at the end;
//!   and their own memory (`RssAnon`, without the pages of the shared binary) at both points.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::{NetworkConfig, NetworkState, NetworkStatus, WgPeer, GLOBAL_KEY};

mod common;

use common::{Children, Res};

const USAGE: &str = "usage: bench-net --agent-bin B --dir D --ns-a NS --ns-b NS --underlay-a IP \
                     --underlay-b IP --wireguard-go-b IP [--seconds S] [--rounds R] \
                     [--peers N] [--apply-rounds K]";
/// netmgr's WireGuard port on both nodes.
const PORT: u16 = 51820;
/// Longest wait for a node to reach a state (start, handshake, a configuration applied).
const WAIT: Duration = Duration::from_secs(60);

struct Args {
    agent_bin: PathBuf,
    dir: PathBuf,
    ns: [String; 2],
    underlay: [String; 2],
    wireguard_go_b: String,
    seconds: u32,
    rounds: u32,
    peers: u32,
    apply_rounds: u32,
}

impl Args {
    fn parse() -> Res<Args> {
        let flags = common::flags(USAGE)?;
        let get = |name: &str| -> Res<String> { Ok(flags.get(name).ok_or(USAGE)?.clone()) };
        let number = |name: &str, default: u32| -> Res<u32> {
            flags
                .get(name)
                .map_or(Ok(default), |v| v.parse().map_err(|_| USAGE.into()))
        };
        let args = Args {
            agent_bin: get("agent-bin")?.into(),
            dir: get("dir")?.into(),
            ns: [get("ns-a")?, get("ns-b")?],
            underlay: [get("underlay-a")?, get("underlay-b")?],
            wireguard_go_b: get("wireguard-go-b")?,
            seconds: number("seconds", 10)?,
            rounds: number("rounds", 3)?,
            peers: number("peers", 1000)?,
            apply_rounds: number("apply-rounds", 3)?,
        };
        if args.rounds == 0 || args.apply_rounds == 0 || !(2..=60_000).contains(&args.peers) {
            return Err(USAGE.into());
        }
        Ok(args)
    }
}

fn main() {
    common::main_with("bench-net", Args::parse, |args| async move {
        bench(&args).await
    });
}

/// One node: its namespace, root, the configuration this process publishes for it as
/// heartbeatd, and its status as netmgr publishes it.
struct Node {
    ns: String,
    root: PathBuf,
    underlay: String,
    overlay: String,
    config: Publication<NetworkConfig>,
    status: Subscription<NetworkStatus>,
    netmgr_pid: u32,
}

impl Node {
    /// Waits until the node's status satisfies `done`, [`WAIT`] at most.
    async fn until(&mut self, what: &str, done: impl Fn(&NetworkStatus) -> bool) -> Res<()> {
        common::until(&mut self.status, what, WAIT, |s| {
            s.get(GLOBAL_KEY).is_some_and(&done)
        })
        .await
        .map_err(|e| format!("{} ({}): {e}", self.ns, self.root.display()).into())
    }

    /// Publishes `config` and returns how long netmgr took to say it is applied and Up.
    async fn apply(&mut self, config: &NetworkConfig) -> Res<Duration> {
        let generation = config.generation;
        let started = Instant::now();
        self.config.publish(config)?;
        self.until(&format!("generation {generation} Up"), |s| {
            s.generation == generation && s.state == NetworkState::Up
        })
        .await?;
        let took = started.elapsed();
        let peers = self.status.get(GLOBAL_KEY).map_or(0, |s| s.peers.len());
        if peers != config.peers.len() {
            return Err(format!(
                "generation {generation}: the device has {peers} peers, not {}",
                config.peers.len()
            )
            .into());
        }
        Ok(took)
    }

    fn public_key(&self) -> Res<String> {
        self.status
            .get(GLOBAL_KEY)
            .and_then(|s| s.public_key.clone())
            .ok_or_else(|| format!("{}: no public key", self.ns).into())
    }

    /// The pid of the node's device, from its pid file.
    fn device_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.root.join("run/powernode/netmgr/device/pn0.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Kills the nodes' devices (netmgr leaves them running by design) when the benchmark ends.
struct Devices(Vec<PathBuf>);

impl Drop for Devices {
    fn drop(&mut self) {
        for root in &self.0 {
            let pid_file = root.join("run/powernode/netmgr/device/pn0.pid");
            if let Some(pid) = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

async fn bench(args: &Args) -> Res<()> {
    let roots: Vec<PathBuf> = ["a", "b"].iter().map(|n| args.dir.join(n)).collect();
    // Dropped after `children` (declared later): netmgr first, which would restart a device
    // that dies, then the devices.
    let _devices = Devices(roots.clone());
    let mut children = Children(Vec::new());
    children.0.push(in_netns(
        &args.ns[1],
        "iperf3",
        &["-s"],
        &args.dir.join("iperf3.log"),
    )?);

    let mut nodes = Vec::new();
    for (i, root) in roots.iter().enumerate() {
        std::fs::create_dir_all(root.join("etc/powernode"))?;
        // The benchmark measures the userspace device (its throughput, its memory), also on
        // a kernel that has WireGuard.
        std::fs::write(
            root.join("etc/powernode/agent.toml"),
            "[network]\nwireguard = \"userspace\"\n",
        )?;
        let dirs = Dirs::under_root(root);
        let config = Publication::<NetworkConfig>::open(&dirs, "heartbeatd")?;
        let log = root.join("netmgr.log");
        let root_arg = root.display().to_string();
        let agent_bin = args.agent_bin.display().to_string();
        let netmgr = in_netns(
            &args.ns[i],
            &agent_bin,
            &["run", "netmgr", "--root", &root_arg],
            &log,
        )?;
        let netmgr_pid = netmgr.id();
        children.0.push(netmgr);
        nodes.push(Node {
            ns: args.ns[i].clone(),
            root: root.clone(),
            underlay: args.underlay[i].clone(),
            overlay: format!("10.88.0.{}", i + 1),
            config,
            status: Subscription::connect(&dirs, "netmgr"),
            netmgr_pid,
        });
    }
    for node in &mut nodes {
        node.until("a public key", |s| s.public_key.is_some())
            .await?;
    }
    let keys = [nodes[0].public_key()?, nodes[1].public_key()?];
    let mut generation = 1;
    for i in 0..2 {
        let peer = one_peer(&nodes[1 - i], &keys[1 - i]);
        let config = network_config(&nodes[i], generation, vec![peer]);
        nodes[i].apply(&config).await?;
    }
    let overlay_b = nodes[1].overlay.clone();
    for target in [&overlay_b, &args.wireguard_go_b] {
        wait_reachable(&args.ns[0], target).await?;
    }

    // Throughput, interleaved.
    let paths = [
        ("veth", args.underlay[1].clone()),
        ("wireguard-go", args.wireguard_go_b.clone()),
        ("netmgr", overlay_b.clone()),
    ];
    let mut mbit: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 1..=args.rounds {
        for (name, addr) in &paths {
            let rate = iperf3(&args.ns[0], addr, args.seconds).await?;
            eprintln!("  round {round}: {name:<12} {rate:8.0} Mbit/s");
            mbit.entry(name).or_default().push(rate);
        }
    }

    let one_peer_peak = memory_kib(&nodes, "VmHWM")?;
    let one_peer_anon = memory_kib(&nodes, "RssAnon")?;

    // Applying N peers, then one changed among them, on node a.
    let b_peer = one_peer(&nodes[1], &keys[1]);
    let mut apply_ms = Vec::new();
    let mut change_ms = Vec::new();
    for round in 1..=args.apply_rounds {
        generation += 1;
        let config = network_config(&nodes[0], generation, vec![b_peer.clone()]);
        nodes[0].apply(&config).await?;

        let mut peers = vec![b_peer.clone()];
        for n in 1..args.peers {
            peers.push(random_peer(n)?);
        }
        generation += 1;
        let config = network_config(&nodes[0], generation, peers.clone());
        let took = nodes[0].apply(&config).await?;
        apply_ms.push(took.as_secs_f64() * 1000.0);

        // The middle peer moves to another endpoint: changed in place on the device.
        let changed = peers.len() / 2;
        peers[changed].endpoint = Some(format!("198.18.255.254:{}", PORT + round as u16));
        generation += 1;
        let config = network_config(&nodes[0], generation, peers);
        let took_one = nodes[0].apply(&config).await?;
        change_ms.push(took_one.as_secs_f64() * 1000.0);
        eprintln!(
            "  apply round {round}: {} peers {:.1} ms, one changed {:.1} ms",
            args.peers,
            took.as_secs_f64() * 1000.0,
            took_one.as_secs_f64() * 1000.0
        );
    }
    // The tunnel still carries traffic with N peers configured.
    wait_reachable(&args.ns[0], &overlay_b).await?;

    let peak = memory_kib(&nodes, "VmHWM")?;
    let anon = memory_kib(&nodes, "RssAnon")?;

    let (veth, wireguard_go, netmgr) = (
        median(mbit["veth"].clone()),
        median(mbit["wireguard-go"].clone()),
        median(mbit["netmgr"].clone()),
    );
    let json = serde_json::json!({
        "rounds": args.rounds,
        "seconds": args.seconds,
        "veth_mbit_s": round1(veth),
        "wireguard_go_mbit_s": round1(wireguard_go),
        "netmgr_mbit_s": round1(netmgr),
        "netmgr_vs_wireguard_go": (netmgr / wireguard_go * 1000.0).round() / 1000.0,
        "veth_rounds_mbit_s": each_round(&mbit["veth"]),
        "wireguard_go_rounds_mbit_s": each_round(&mbit["wireguard-go"]),
        "netmgr_rounds_mbit_s": each_round(&mbit["netmgr"]),
        "peers": args.peers,
        "apply_1000_peers_ms": round1(median(apply_ms.clone())),
        "change_one_of_1000_ms": round1(median(change_ms.clone())),
        "apply_rounds_ms": each_round(&apply_ms),
        "change_rounds_ms": each_round(&change_ms),
        "netmgr_rss_mib": mib(peak.0),
        "device_rss_mib": mib(peak.1),
        "netmgr_rss_mib_one_peer": mib(one_peer_peak.0),
        "device_rss_mib_one_peer": mib(one_peer_peak.1),
        "netmgr_anon_mib": mib(anon.0),
        "device_anon_mib": mib(anon.1),
        "netmgr_anon_mib_one_peer": mib(one_peer_anon.0),
        "device_anon_mib_one_peer": mib(one_peer_anon.1),
    });
    println!("{json}");
    Ok(())
}

/// `node` as its peer's configuration names it.
fn one_peer(node: &Node, key: &str) -> WgPeer {
    WgPeer {
        public_key: key.to_owned(),
        endpoint: Some(format!("{}:{PORT}", node.underlay)),
        allowed_ips: vec![format!("{}/32", node.overlay)],
        keepalive_s: None,
    }
}

/// The `n`th made-up peer: a fresh key, the /32 10.88.(1 + n / 250).(n % 250 + 1), an
/// endpoint in the benchmarking range 198.18.0.0/15 (nothing answers there).
fn random_peer(n: u32) -> Res<WgPeer> {
    let key = netmgr::key::PrivateKey::generate()?.public_key();
    let (hi, lo) = (1 + n / 250, n % 250 + 1);
    Ok(WgPeer {
        public_key: key.to_base64(),
        endpoint: Some(format!("198.18.{hi}.{lo}:{PORT}")),
        allowed_ips: vec![format!("10.88.{hi}.{lo}/32")],
        keepalive_s: None,
    })
}

fn network_config(node: &Node, generation: u64, peers: Vec<WgPeer>) -> NetworkConfig {
    NetworkConfig {
        generation,
        interface: "pn0".into(),
        address: format!("{}/16", node.overlay),
        listen_port: PORT,
        peers,
        network: "bench".into(),
        forwards: Vec::new(),
    }
}

/// `ip netns exec NS PROGRAM ARGS…` (which execs: the child is the program), its output to
/// `log`.
fn in_netns(ns: &str, program: &str, args: &[&str], log: &Path) -> Res<Child> {
    let log = std::fs::File::create(log)?;
    Ok(Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .env_remove("POWERNODE_ROOT")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// Waits until `addr` answers from namespace `ns` ([`WAIT`] at most): a TCP connection to a
/// port where nothing listens, refused (or accepted) once packets go both ways.
async fn wait_reachable(ns: &str, addr: &str) -> Res<()> {
    let deadline = Instant::now() + WAIT;
    let target = std::net::SocketAddr::new(addr.parse()?, 1);
    let netns = std::fs::File::open(format!("/run/netns/{ns}"))?;
    loop {
        let netns = netns.try_clone()?;
        // A thread of its own, whose sockets are made in `ns` (a pool thread is reused).
        let connect = std::thread::spawn(move || -> Result<bool, String> {
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns: {e}"))?;
            Ok(
                match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
                    Ok(_) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
                },
            )
        });
        let answered = tokio::task::spawn_blocking(move || connect.join())
            .await?
            .map_err(|_| "the connecting thread panicked")??;
        if answered {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{addr} does not answer from {ns} within {WAIT:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One `iperf3` TCP run from namespace `ns` to the server at `addr`: the receiver's Mbit/s.
async fn iperf3(ns: &str, addr: &str, seconds: u32) -> Res<f64> {
    let (ns, to) = (ns.to_owned(), addr.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("ip")
            .args(["netns", "exec", &ns, "iperf3", "-J", "-c", &to, "-t"])
            .arg(seconds.to_string())
            .stdin(Stdio::null())
            .output()
    })
    .await??;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "iperf3 to {addr}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(error) = report.get("error") {
        return Err(format!("iperf3 to {addr}: {error}").into());
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bits| bits / 1e6)
        .ok_or_else(|| format!("iperf3 to {addr}: no received rate in its report").into())
}

/// `field` of `/proc/<pid>/status` (`VmHWM`: the peak RSS so far; `RssAnon`: the process's
/// own memory now, without the shared binary's pages) of the nodes' netmgr and of their
/// devices, KiB: the larger node's of each.
fn memory_kib(nodes: &[Node], field: &str) -> Res<(u64, u64)> {
    let mut netmgr = 0;
    let mut device = 0;
    for node in nodes {
        netmgr = netmgr.max(status_kib(node.netmgr_pid, field)?);
        let pid = node
            .device_pid()
            .ok_or_else(|| format!("{}: no device pid file", node.ns))?;
        device = device.max(status_kib(pid, field)?);
    }
    Ok((netmgr, device))
}

/// `field` of `/proc/<pid>/status`, KiB.
fn status_kib(pid: u32, field: &str) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("pid {pid}: no {field}").into())
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Each round's figure, to one decimal.
fn each_round(values: &[f64]) -> Vec<f64> {
    values.iter().map(|x| round1(*x)).collect()
}

fn mib(kib: u64) -> f64 {
    round1(kib as f64 / 1024.0)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
