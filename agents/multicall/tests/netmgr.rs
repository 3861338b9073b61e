//! netmgr between real nodes (docs/network.md): the built `powernode-agent`, each node's
//! netmgr in a network namespace of its own, the namespaces joined by veth pairs on a bridge
//! in a namespace of the test's own (the underlay, 192.0.2.0/24), the overlay 10.88.0.0/16
//! on the userspace WireGuard device, `wg` (wireguard-tools) reading it. The test plays
//! heartbeatd: it publishes each node's `heartbeatd/NetworkConfig`, built from the public keys
//! the other nodes' netmgr published.
//!
//! - Three nodes reach each other over TCP between every pair of overlay addresses; `wg show`
//!   lists the peers and their handshakes; removing one peer leaves the other's session as it
//!   was (same handshake); a node whose configuration is withdrawn loses its interface and
//!   keeps its key.
//! - A TCP stream through the tunnel survives `kill -9` of netmgr, the restarted netmgr adopts
//!   the device and keeps the key; `kill -9` of the device: restarted, reported, traffic
//!   resumes; SIGTERM: netmgr exits 0 and the device keeps running.
//! - Bad configurations are refused whole, each with its reason, while the last good one keeps
//!   carrying traffic.
//!
//! Needs root, `ip`, `wg` and `nsenter`: skipped without them, a failure under CI=true.
//! Namespaces, processes and files are removed by a guard, also when a test fails.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{self, gone, in_netns, underlay_address, Sink, Underlay};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::{Event, NetworkConfig, NetworkState, NetworkStatus, WgPeer, GLOBAL_KEY};

/// How long a test waits for what it expects before it fails.
const WAIT: Duration = Duration::from_secs(20);
/// WireGuard's port on every node.
const PORT: u16 = 51820;
/// The port of the test's TCP servers on the overlay.
const ECHO_PORT: u16 = 7000;

fn needs() -> bool {
    powernode_pubsub::testing::require(&["root", "ip", "wg", "nsenter"])
}

/// One node: its namespace, root, addresses, netmgr and the NetworkConfig the test publishes.
struct Node {
    n: u8,
    ns: String,
    root: PathBuf,
    netmgr: Option<Child>,
    config: Publication<NetworkConfig>,
}

impl Node {
    fn underlay(&self) -> Ipv4Addr {
        underlay_address(self.n)
    }

    fn overlay(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 88, 0, self.n)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("netmgr.log")).unwrap_or_default()
    }

    fn device_log(&self) -> String {
        std::fs::read_to_string(self.root.join("run/powernode/netmgr/device/pn0.log"))
            .unwrap_or_default()
    }

    fn device_pid(&self) -> Option<i32> {
        netns::device_pid(&self.root)
    }

    fn key_file(&self) -> String {
        std::fs::read_to_string(self.root.join("persist/powernode/netmgr/private.key")).unwrap()
    }
}

/// The test's namespaces and nodes; everything goes when it is dropped (the processes
/// first, then the namespaces with the underlay).
struct Net {
    nodes: Vec<Node>,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    underlay: Underlay,
}

impl Net {
    /// `count` nodes on a bridge, each netmgr started on the userspace device (what these
    /// tests are about, on every kernel).
    fn new(count: u8) -> Net {
        Net::with_wireguard(count, |_| "userspace")
    }

    /// `count` nodes on a bridge, each netmgr started with `network.wireguard` as `choice`
    /// says for its node (1-based).
    fn with_wireguard(count: u8, choice: impl Fn(u8) -> &'static str) -> Net {
        // Short paths: a socket path must fit in 107 bytes.
        let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut net = Net {
            nodes: Vec::new(),
            runtime,
            _dir: dir,
            underlay: Underlay::new(),
        };
        for n in 1..=count {
            let ns = net.underlay.add(n);
            let root = net._dir.path().join(format!("n{n}"));
            std::fs::create_dir_all(root.join("etc/powernode")).unwrap();
            write_wireguard_choice(&root, choice(n));
            let config = {
                let _in_runtime = net.runtime.enter();
                Publication::<NetworkConfig>::open(&Dirs::under_root(&root), "heartbeatd").unwrap()
            };
            net.nodes.push(Node {
                n,
                ns,
                root,
                netmgr: None,
                config,
            });
        }
        for i in 0..net.nodes.len() {
            net.start(i);
        }
        net
    }

    /// Starts node `i`'s netmgr in its namespace, logging to `<root>/netmgr.log`.
    fn start(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.netmgr = Some(netns::spawn_in(&node.ns, &node.root, "netmgr"));
    }

    /// SIGKILL of node `i`'s netmgr (`ip netns exec` execs it: the child is netmgr).
    fn kill_netmgr(&mut self, i: usize) {
        let mut child = self.nodes[i].netmgr.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Node `i`'s status once `pred` holds; fails the test with netmgr's log at the deadline.
    fn wait_status(
        &self,
        i: usize,
        what: &str,
        pred: impl Fn(&NetworkStatus) -> bool,
    ) -> NetworkStatus {
        let node = &self.nodes[i];
        let found = self.runtime.block_on(common::wait_item(
            &node.root, "netmgr", GLOBAL_KEY, WAIT, pred,
        ));
        found.unwrap_or_else(|last| {
            panic!(
                "node {}: no status with {what} within {WAIT:?}; last {last:#?}\n--- netmgr.log\n{}\n--- device log\n{}",
                node.n,
                node.log(),
                node.device_log()
            )
        })
    }

    /// Node `i`'s public key, once its netmgr published it.
    fn public_key(&self, i: usize) -> String {
        self.wait_status(i, "a public key", |s| s.public_key.is_some())
            .public_key
            .unwrap()
    }

    /// Node `i`'s configuration with `peers` (indexes) as its peers.
    fn config(&self, i: usize, peers: &[usize], generation: u64) -> NetworkConfig {
        let node = &self.nodes[i];
        NetworkConfig {
            generation,
            interface: "pn0".into(),
            address: format!("{}/16", node.overlay()),
            listen_port: PORT,
            peers: peers
                .iter()
                .map(|&p| WgPeer {
                    public_key: self.public_key(p),
                    endpoint: Some(format!("{}:{PORT}", self.nodes[p].underlay())),
                    allowed_ips: vec![format!("{}/32", self.nodes[p].overlay())],
                    keepalive_s: None,
                })
                .collect(),
            network: "lab".into(),
            forwards: Vec::new(),
        }
    }

    fn publish(&self, i: usize, config: &NetworkConfig) {
        self.nodes[i].config.publish(config).unwrap();
    }

    /// Every node configured with every other as its peer, and Up.
    fn full_mesh(&self, generation: u64) {
        self.full_mesh_without_waiting(generation);
        for i in 0..self.nodes.len() {
            self.wait_status(i, "state Up", |s| {
                s.state == NetworkState::Up && s.generation == generation
            });
        }
    }

    /// Every node configured with every other as its peer.
    fn full_mesh_without_waiting(&self, generation: u64) {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        for i in 0..self.nodes.len() {
            let others: Vec<usize> = all.iter().copied().filter(|&p| p != i).collect();
            self.publish(i, &self.config(i, &others, generation));
        }
    }

    /// Starts a TCP server on node `i`'s overlay address.
    fn echo_server(&self, i: usize) {
        Sink::start(
            &self.nodes[i].ns,
            SocketAddr::from((self.nodes[i].overlay(), ECHO_PORT)),
        );
    }

    /// A few bytes from node `from` to node `to`'s server over the overlay, counted there.
    fn roundtrip(&self, from: usize, to: usize, timeout: Duration) -> std::io::Result<()> {
        let addr = SocketAddr::from((self.nodes[to].overlay(), ECHO_PORT));
        netns::transfer(&self.nodes[from].ns, addr, 4, timeout)
    }

    /// Waits until node `from` reaches node `to` over the overlay.
    fn wait_reachable(&self, from: usize, to: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.roundtrip(from, to, Duration::from_secs(2)) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!(
                    "node {} does not reach node {} over the overlay: {e}\n--- netmgr.log {}\n{}\n--- netmgr.log {}\n{}",
                    from + 1,
                    to + 1,
                    from + 1,
                    self.nodes[from].log(),
                    to + 1,
                    self.nodes[to].log()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// `wg <args>` against node `i`'s device, from inside its mount and network namespaces:
    /// its standard output; fails the test unless `wg` succeeded.
    fn wg(&self, i: usize, args: &[&str]) -> String {
        netns::wg(self.nodes[i].device_pid().expect("a device pid file"), args)
    }

    /// Node `i`'s events so far (none is acknowledged: no eventd runs).
    fn events(&self, i: usize) -> Vec<Event> {
        let root = self.nodes[i].root.clone();
        self.runtime.block_on(async {
            let mut sub = Subscription::<Event>::connect(&Dirs::under_root(&root), "netmgr");
            let _ = tokio::time::timeout(WAIT, async {
                while !sub.is_synchronized() {
                    sub.next().await;
                }
            })
            .await;
            sub.items().map(|(_, e)| e.clone()).collect()
        })
    }

    fn wait_event(&self, i: usize, kind: &str) -> Event {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(event) = self.events(i).into_iter().find(|e| e.kind == kind) {
                return event;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: no {kind} event\n{}",
                i + 1,
                self.nodes[i].log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.netmgr.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            // The device (or devices) of this root, whatever netmgr did with them.
            for pid in common::processes_with(&node.root.display().to_string()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Sets `network.wireguard` in the node's settings (read when netmgr starts).
fn write_wireguard_choice(root: &std::path::Path, choice: &str) {
    std::fs::write(
        root.join("etc/powernode/agent.toml"),
        format!("[network]\nwireguard = \"{choice}\"\n"),
    )
    .unwrap();
}

/// Whether the kernel of the namespace `ns` can make a `wireguard` link.
fn kernel_has_wireguard(ns: &str) -> bool {
    let made = std::process::Command::new("ip")
        .args(["-n", ns, "link", "add", "pnprobe", "type", "wireguard"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    if made {
        netns::sh(&["ip", "-n", ns, "link", "del", "pnprobe"]);
    }
    made
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    netns::wait_until(WAIT, what, cond);
}

#[test]
fn three_nodes_reach_each_other_and_one_peer_leaves_without_disturbing_another() {
    if !needs() {
        return;
    }
    let net = Net::new(3);
    let keys: Vec<String> = (0..3).map(|i| net.public_key(i)).collect();
    for i in 0..3 {
        let status = net.wait_status(i, "state Down before any config", |s| {
            s.public_key.is_some()
        });
        assert_eq!(status.state, NetworkState::Down);
        assert!(status.userspace);
    }
    net.full_mesh(1);
    for i in 0..3 {
        net.echo_server(i);
    }
    for from in 0..3 {
        for to in 0..3 {
            if from != to {
                net.wait_reachable(from, to);
            }
        }
    }

    // wireguard-tools reads the device: the interface, both peers, their handshakes as Unix
    // times (the device's socket turns boringtun's ages into times).
    let handshakes = net.wg(0, &["show", "pn0", "latest-handshakes"]);
    assert_eq!(handshakes.lines().count(), 2, "{handshakes}");
    let now_s = common::now_ms() / 1000;
    for line in handshakes.lines() {
        let at: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            now_s - at < 60,
            "a handshake at {at}, now {now_s}: {handshakes}"
        );
    }
    let shown = net.wg(0, &["show", "pn0"]);
    assert!(shown.contains("interface: pn0"), "{shown}");
    assert!(
        shown.contains(&format!("listening port: {PORT}")),
        "{shown}"
    );
    for key in &keys[1..] {
        assert!(shown.contains(&format!("peer: {key}")), "{shown}");
    }
    assert_eq!(shown.matches("latest handshake").count(), 2, "{shown}");
    assert!(!shown.contains("years"), "{shown}");

    // The status: both peers up, the node's underlay address as an endpoint.
    let status = net.wait_status(0, "two peers up", |s| s.peers_up == 2);
    assert_eq!(status.listen_port, Some(PORT));
    assert!(
        status.endpoints.contains(&format!("192.0.2.1:{PORT}")),
        "{status:#?}"
    );
    assert!(!status.endpoints.iter().any(|e| e.starts_with("10.88.")));
    net.wait_event(0, "network.interface_up");
    net.wait_event(0, "network.peer_up");

    // Node 1 drops node 3: its session with node 2 is the same one (no new handshake).
    let before = status
        .peers
        .iter()
        .find(|p| p.public_key == keys[1])
        .unwrap()
        .clone();
    net.publish(0, &net.config(0, &[1], 2));
    let status = net.wait_status(0, "generation 2 with one peer", |s| {
        s.generation == 2 && s.state == NetworkState::Up && s.peers.len() == 1
    });
    net.wait_reachable(0, 1);
    let after = net
        .wait_status(0, "node 2 still a peer, the new traffic counted", |s| {
            s.peers.len() == 1 && s.peers[0].tx_bytes > before.tx_bytes
        })
        .peers[0]
        .clone();
    assert_eq!(after.public_key, keys[1], "{status:#?}");
    let (b, a) = (
        before.last_handshake_ms.unwrap(),
        after.last_handshake_ms.unwrap(),
    );
    assert!(
        a.abs_diff(b) < 1_000,
        "node 2's handshake changed: {b} then {a}"
    );
    assert!(
        after.rx_bytes > before.rx_bytes,
        "{before:?} then {after:?}"
    );
    let shown = net.wg(0, &["show", "pn0", "peers"]);
    assert_eq!(shown.trim(), keys[1], "{shown}");
    assert!(
        net.roundtrip(0, 2, Duration::from_secs(2)).is_err(),
        "node 1 still reaches node 3"
    );
    // Nodes 2 and 3 are unaffected.
    net.wait_reachable(1, 2);

    // Node 3 leaves the network: its interface and device go, its key stays.
    let device = net.nodes[2].device_pid().unwrap();
    let key_file = net.nodes[2].key_file();
    net.nodes[2].config.unpublish(GLOBAL_KEY).unwrap();
    let status = net.wait_status(2, "state Down", |s| s.state == NetworkState::Down);
    assert_eq!(status.public_key.as_ref(), Some(&keys[2]));
    assert_eq!(status.generation, 0);
    wait_until("node 3's device exits", || gone(device));
    assert!(
        !netns::has_link(&net.nodes[2].ns, "pn0"),
        "pn0 is still there"
    );
    assert_eq!(net.nodes[2].key_file(), key_file);
    net.wait_event(2, "network.left");
    // It comes back with the same key.
    net.publish(2, &net.config(2, &[1], 3));
    net.wait_status(2, "state Up again", |s| s.state == NetworkState::Up);
    assert_eq!(net.public_key(2), keys[2]);
    net.wait_reachable(2, 1);
}

/// A TCP stream from node 1 to node 2 over the overlay, counting the bytes node 2 received
/// and noting any error on either side.
struct Stream {
    received: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Stream {
    fn start(net: &Net) -> Stream {
        let received = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let addr = SocketAddr::from((net.nodes[1].overlay(), ECHO_PORT + 1));
        let listener = in_netns(&net.nodes[1].ns, move || TcpListener::bind(addr).unwrap());
        {
            let (received, failed) = (received.clone(), failed.clone());
            std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                let mut buf = [0u8; 65536];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            failed.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
        }
        let mut stream = in_netns(&net.nodes[0].ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap()
        });
        {
            let (failed, stop) = (failed.clone(), stop.clone());
            std::thread::spawn(move || {
                let chunk = [7u8; 1024];
                while !stop.load(Ordering::Relaxed) {
                    if stream.write_all(&chunk).is_err() {
                        failed.store(true, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        }
        Stream {
            received,
            failed,
            stop,
        }
    }

    /// Fails the test unless bytes keep arriving for `during` with no error.
    fn assert_flowing(&self, during: Duration, what: &str) {
        let start = self.received.load(Ordering::Relaxed);
        std::thread::sleep(during);
        let end = self.received.load(Ordering::Relaxed);
        assert!(
            !self.failed.load(Ordering::Relaxed),
            "{what}: the stream broke"
        );
        assert!(
            end > start + 10_000,
            "{what}: {} bytes in {during:?}",
            end - start
        );
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn the_data_plane_outlives_netmgr_and_a_dead_device_is_restarted() {
    if !needs() {
        return;
    }
    let mut net = Net::new(2);
    let key = net.public_key(0);
    let key_file = net.nodes[0].key_file();
    net.full_mesh(1);
    net.echo_server(1);
    net.wait_reachable(0, 1);
    let stream = Stream::start(&net);
    stream.assert_flowing(Duration::from_secs(1), "before any kill");
    let device = net.nodes[0].device_pid().unwrap();

    // kill -9 of netmgr: the stream keeps flowing, through the same device.
    net.kill_netmgr(0);
    stream.assert_flowing(Duration::from_secs(3), "netmgr killed");
    assert!(!gone(device), "the device died with netmgr");
    net.start(0);
    net.wait_status(0, "a live status from the new netmgr", |s| {
        s.state == NetworkState::Up && s.generation == 1
    });
    wait_until("the new netmgr adopts the device", || {
        net.nodes[0]
            .log()
            .contains("adopted the running WireGuard interface")
    });
    assert_eq!(net.nodes[0].device_pid(), Some(device));
    assert_eq!(net.public_key(0), key, "a restart changed the key");
    assert_eq!(net.nodes[0].key_file(), key_file);
    stream.assert_flowing(Duration::from_secs(1), "netmgr restarted");

    // kill -9 of the device: restarted, re-configured, reported; traffic resumes.
    kill(Pid::from_raw(device), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    wait_until("a new device", || {
        net.nodes[0].device_pid().is_some_and(|p| p != device)
    });
    let restarted = killed.elapsed();
    let event = net.wait_event(0, "network.device_restarted");
    assert!(event.message.contains(&device.to_string()), "{event:?}");
    net.wait_status(0, "Up with the new device", |s| {
        s.state == NetworkState::Up && s.error.is_none()
    });
    net.wait_reachable(0, 1);
    assert!(
        restarted < Duration::from_secs(5),
        "the device was restarted {restarted:?} after it died"
    );
    drop(stream);

    // SIGTERM: netmgr exits 0 and leaves the device running.
    let device = net.nodes[0].device_pid().unwrap();
    let mut child = net.nodes[0].netmgr.take().unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", net.nodes[0].log());
    assert!(!gone(device), "SIGTERM of netmgr stopped the device");
    net.wait_reachable(0, 1);
}

#[test]
fn bad_configs_are_refused_and_the_last_good_one_keeps_carrying_traffic() {
    if !needs() {
        return;
    }
    let net = Net::new(2);
    net.full_mesh(1);
    net.echo_server(1);
    net.wait_reachable(0, 1);
    let good = net.config(0, &[1], 1);
    let own_key = net.public_key(0);

    // A UDP socket on the port a config asks for, in node 1's namespace.
    let _taken = in_netns(&net.nodes[0].ns, || {
        std::net::UdpSocket::bind("0.0.0.0:51999").unwrap()
    });
    type Change = fn(&mut NetworkConfig, &str);
    let bad: &[(&str, Change, &str)] = &[
        (
            "bad CIDR",
            |c, _| c.address = "10.88.0.1/40".into(),
            "not IPv4 CIDR",
        ),
        (
            "bad key",
            |c, _| c.peers[0].public_key = "bm90IGEga2V5".into(),
            "not base64 of 32 bytes",
        ),
        (
            "address outside the network",
            |c, _| c.peers[0].allowed_ips = vec!["10.99.0.2/32".into()],
            "inside the network",
        ),
        (
            "own key among the peers",
            |c, own| {
                let mut me = c.peers[0].clone();
                me.public_key = own.to_owned();
                me.allowed_ips = vec!["10.88.0.9/32".into()];
                c.peers.push(me);
            },
            "own key",
        ),
        (
            "duplicate peer",
            |c, _| {
                let mut again = c.peers[0].clone();
                again.allowed_ips = vec!["10.88.0.9/32".into()];
                c.peers.push(again);
            },
            "listed twice",
        ),
        (
            "overlapping /32",
            |c, _| {
                let mut other = c.peers[0].clone();
                other.public_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into();
                c.peers.push(other);
            },
            "both have",
        ),
        (
            "port in use",
            |c, _| c.listen_port = 51999,
            "cannot be bound",
        ),
    ];
    for (n, (name, change, word)) in bad.iter().enumerate() {
        let mut config = good.clone();
        config.generation = 10 + n as u64;
        change(&mut config, &own_key);
        net.publish(0, &config);
        let status = net.wait_status(0, &format!("{name} refused"), |s| {
            s.state == NetworkState::Failed
                && s.error
                    .as_deref()
                    .is_some_and(|e| e.starts_with(&format!("generation {}:", config.generation)))
        });
        let error = status.error.unwrap();
        assert!(error.contains(word), "{name}: {error:?} lacks {word:?}");
        assert_eq!(
            status.generation, 1,
            "{name}: the last good one is not kept"
        );
        net.wait_reachable(0, 1);
    }
    let rejected = net
        .events(0)
        .into_iter()
        .filter(|e| e.kind == "network.config_rejected")
        .count();
    assert_eq!(rejected, bad.len());
    let shown = net.wg(0, &["show", "pn0", "listen-port"]);
    assert_eq!(shown.trim(), PORT.to_string());

    // An operator's `wg set` on a configured peer changes it in place, as WireGuard's own
    // devices do; its tunnel carries on.
    let peer = net.public_key(1);
    net.wg(
        0,
        &["set", "pn0", "peer", &peer, "persistent-keepalive", "5"],
    );
    let shown = net.wg(0, &["show", "pn0", "persistent-keepalive"]);
    assert_eq!(shown.trim(), format!("{peer}\t5"));
    net.wait_reachable(0, 1);
    let shown = net.wg(0, &["show", "pn0", "peers"]);
    assert_eq!(shown.trim(), peer);

    // A good one again: Up, the error gone.
    let mut config = good.clone();
    config.generation = 20;
    net.publish(0, &config);
    let status = net.wait_status(0, "Up at generation 20", |s| {
        s.state == NetworkState::Up && s.generation == 20
    });
    assert_eq!(status.error, None);
    net.wait_reachable(0, 1);
}

#[test]
fn the_data_plane_is_kernel_wireguard_where_the_kernel_has_it_else_the_device() {
    if !needs() {
        return;
    }
    // Node 1 insists on the kernel's WireGuard; node 2 takes what there is.
    let mut net = Net::with_wireguard(2, |n| if n == 1 { "kernel" } else { "auto" });
    let kernel = kernel_has_wireguard(&net.nodes[0].ns);
    net.full_mesh_without_waiting(1);
    let two = net.wait_status(1, "node 2 Up", |s| s.state == NetworkState::Up);
    assert_eq!(
        two.userspace, !kernel,
        "auto picks the kernel's where there is one"
    );
    if kernel {
        let one = net.wait_status(0, "node 1 Up on the kernel", |s| {
            s.state == NetworkState::Up
        });
        assert!(!one.userspace);
        assert!(
            net.nodes[0].device_pid().is_none(),
            "a device process runs too"
        );
        let details = std::process::Command::new("ip")
            .args(["-n", &net.nodes[0].ns, "-d", "link", "show", "pn0"])
            .output()
            .unwrap();
        let details = String::from_utf8_lossy(&details.stdout);
        assert!(details.contains("wireguard"), "{details}");
        net.echo_server(1);
        net.wait_reachable(0, 1);
        // kill -9 of netmgr: the kernel's interface stays, and the next netmgr adopts it.
        net.kill_netmgr(0);
        assert!(netns::has_link(&net.nodes[0].ns, "pn0"));
        net.start(0);
        wait_until("the new netmgr adopts the kernel interface", || {
            net.nodes[0]
                .log()
                .contains("adopted the running WireGuard interface")
        });
        net.wait_reachable(0, 1);
        // Withdrawn: the interface goes.
        net.nodes[0].config.unpublish(GLOBAL_KEY).unwrap();
        wait_until("pn0 deleted", || !netns::has_link(&net.nodes[0].ns, "pn0"));
        return;
    }
    // No WireGuard in this kernel: node 1 fails with the reason, makes nothing, and says so.
    let one = net.wait_status(0, "node 1 Failed", |s| s.state == NetworkState::Failed);
    let error = one.error.unwrap_or_default();
    assert!(error.contains("the kernel has no WireGuard"), "{error}");
    assert!(
        error.contains("network.wireguard"),
        "the error names the setting: {error}"
    );
    assert!(
        !one.userspace,
        "it reports the kernel's, which the settings ask for"
    );
    net.wait_event(0, "network.apply_failed");
    assert!(
        !netns::has_link(&net.nodes[0].ns, "pn0"),
        "an interface was made anyway"
    );
    assert!(
        net.nodes[0].device_pid().is_none(),
        "a device was started anyway"
    );
    // The same node on auto: the userspace device, and the overlay works.
    net.kill_netmgr(0);
    write_wireguard_choice(&net.nodes[0].root, "auto");
    net.start(0);
    let one = net.wait_status(0, "node 1 Up on auto", |s| s.state == NetworkState::Up);
    assert!(one.userspace);
    assert!(net.nodes[0]
        .log()
        .contains("the kernel has no WireGuard; using the userspace device"));
    net.echo_server(1);
    net.wait_reachable(0, 1);
}
