//! The overlay across a fleet with the real controller (issue 12, "Tests"; docs/network.md):
//! each node a root of its own whose enrollmgr, heartbeatd and netmgr (the built
//! `powernode-agent`) run in a network namespace of its own (`ip netns exec`), the namespaces
//! joined by veth pairs on a bridge in a namespace of the test's own (the underlay,
//! 192.0.2.0/24). The controller runs in this process on a thread that has entered the
//! bridge's namespace, with a tokio runtime of its own there, listening on the bridge's
//! address (192.0.2.254): the nodes enroll with it and heartbeat to it over the underlay.
//! Each node's identity is published by the test, as identitymgr would. The operator's part
//! (network create, join, leave, forward add and remove) is done on the controller's database
//! after the operator API's own checks (`powernode_controller::service::networks`); the
//! running controller's watch carries each change to the nodes concerned.
//!
//! - Three nodes: a TCP transfer of a few MB between every pair of overlay addresses; `wg show`
//!   lists the interface, both peers and their handshakes; one node leaves: unreachable from
//!   the others within seconds while the other pair keeps its session (same handshake) and its
//!   traffic; it rejoins with the same address and the same key.
//! - A port forward on one node to a server on another's overlay address, reached from a
//!   namespace outside the overlay; removed: refused; another nftables table on the node is
//!   left as it was.
//! - A node whose netmgr is killed with SIGKILL and started again changes no member's desired
//!   network (the controller's generations stay) and keeps its key and its sessions.
//!
//! Needs root, `ip`, `wg`, `nft` and `nsenter`: skipped without them, a failure under CI=true.
//! Processes, namespaces and files are removed by guards, also when a test fails.

mod common;

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::netns::{self, has_link, underlay_address, Sink, Underlay, BRIDGE_HOST};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use powernode_controller::service::networks::{check_create, check_forward, check_join};
use powernode_controller::storage::{MemberDetail, Storage};
use powernode_controller::wire::{CreateNetworkRequest, JoinNetworkRequest};
use powernode_pubsub::testing::require;
use powernode_pubsub::{Dirs, Publication};
use powernode_types::{ControllerStatus, NetworkState, NetworkStatus, NodeIdentity, GLOBAL_KEY};

/// How long the test waits for what it expects before it fails.
const WAIT: Duration = Duration::from_secs(30);
/// How soon a node that left must be unreachable from the others.
const LEAVE_WITHIN: Duration = Duration::from_secs(10);
/// The network's name, CIDR and listen port.
const NETWORK: &str = "lab";
const CIDR: &str = "10.88.0.0/16";
const PORT: u16 = 51820;
/// The port of the test's TCP servers.
const SINK_PORT: u16 = 7000;
/// The bytes of one transfer between two nodes.
const TRANSFER: usize = 4 << 20;
/// The agents of every node, in the order they are started.
const AGENTS: [&str; 3] = ["enrollmgr", "heartbeatd", "netmgr"];

fn needs() -> bool {
    require(&["root", "ip", "wg", "nft", "nsenter"])
}

/// Node `i`'s overlay address: the controller hands them out lowest first, in join order.
fn overlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 88, 0, i as u8 + 1)
}

/// The controller, in this process, on a thread of its own inside the underlay bridge's
/// namespace; stopped when dropped.
struct Ctl {
    url: String,
    ca_pem: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ctl {
    /// Starts it on 192.0.2.254 in `underlay`'s bridge namespace, its data under `dir`.
    fn start(underlay: &Underlay, dir: &Path) -> Ctl {
        let netns_path = format!("/run/netns/{}", underlay.bridge());
        let dir = dir.to_owned();
        let (started, started_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            // Before the runtime: its threads, and every socket, belong to the underlay.
            netns::enter_netns(&netns_path);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listen = SocketAddr::from((underlay_address(BRIDGE_HOST), 0));
                let (running, _) =
                    common::controller_on(&dir, Duration::from_secs(3600), listen).await;
                let _ = started.send((running.addr(), running.ca_pem().to_owned()));
                let _ = stop_rx.await;
                running.stop().await.unwrap();
            });
        });
        let (addr, ca_pem) = started_rx
            .recv_timeout(WAIT)
            .expect("the controller did not start");
        Ctl {
            url: format!("https://{addr}"),
            ca_pem,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One node: its namespace, root, id on the controller and agents.
struct Node {
    n: u8,
    ns: String,
    root: PathBuf,
    node_id: String,
    agents: Vec<(&'static str, Child)>,
    _identity: Publication<NodeIdentity>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn log(&self, file: &str) -> String {
        std::fs::read_to_string(self.root.join(file)).unwrap_or_default()
    }

    fn key_file(&self) -> String {
        self.log("persist/powernode/netmgr/private.key")
    }

    fn device_pid(&self) -> i32 {
        netns::device_pid(&self.root).expect("a device pid file")
    }
}

/// The controller, the nodes, the underlay; everything goes when it is dropped: the nodes'
/// processes first, then the controller, then the namespaces.
struct Fleet {
    nodes: Vec<Node>,
    storage: Storage,
    runtime: tokio::runtime::Runtime,
    ctl: Ctl,
    _ctl_dir: tempfile::TempDir,
    underlay: Underlay,
}

impl Fleet {
    /// `count` nodes on the underlay, each enrolled and heartbeating.
    fn boot(count: u8) -> Fleet {
        let underlay = Underlay::new();
        let ctl_dir = tempfile::Builder::new().prefix("pnc").tempdir().unwrap();
        let ctl = Ctl::start(&underlay, ctl_dir.path());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let storage = runtime
            .block_on(Storage::open(&ctl_dir.path().join("data")))
            .unwrap();
        let mut fleet = Fleet {
            nodes: Vec::new(),
            storage,
            runtime,
            ctl,
            _ctl_dir: ctl_dir,
            underlay,
        };
        for n in 1..=count {
            fleet.add_node(n);
        }
        for i in 0..fleet.nodes.len() {
            let root = fleet.nodes[i].root.clone();
            let reachable = fleet.runtime.block_on(common::wait_item(
                &root,
                "heartbeatd",
                GLOBAL_KEY,
                WAIT,
                |s: &ControllerStatus| s.reachable,
            ));
            if reachable.is_err() {
                fleet.fail(&format!("node {} never reached the controller", i + 1));
            }
        }
        let enrolled = fleet.runtime.block_on(fleet.storage.list_nodes()).unwrap();
        for node in &mut fleet.nodes {
            node.node_id = enrolled
                .iter()
                .find(|e| e.uuid == uuid(node.n))
                .unwrap_or_else(|| panic!("node {} is not enrolled", node.n))
                .id
                .clone();
        }
        fleet
    }

    /// Node `n`: its namespace, root, identity (with a bootstrap token of its own) and agents.
    fn add_node(&mut self, n: u8) {
        let ns = self.underlay.add(n);
        let (dir, root) = common::node_root();
        // These tests read the userspace device (its pid, `wg` in its namespaces): pinned to it
        // on every kernel.
        let toml = root.join("etc/powernode/agent.toml");
        let base = std::fs::read_to_string(&toml).unwrap();
        std::fs::write(
            &toml,
            format!("{base}[network]\nwireguard = \"userspace\"\n"),
        )
        .unwrap();
        let token = self
            .runtime
            .block_on(powernode_controller::tokens::create(
                &self.storage,
                Duration::from_secs(600),
                None,
            ))
            .unwrap()
            .token;
        let identity = {
            let _in_runtime = self.runtime.enter();
            Publication::open(&Dirs::under_root(&root), "identitymgr").unwrap()
        };
        identity
            .publish(&common::resolved_identity(
                &uuid(n),
                token,
                &self.ctl.url,
                &self.ctl.ca_pem,
            ))
            .unwrap();
        // Noted before its agents start: the guard stops whatever did start.
        self.nodes.push(Node {
            n,
            ns,
            root,
            node_id: String::new(),
            agents: Vec::new(),
            _identity: identity,
            _dir: dir,
        });
        let node = self.nodes.last_mut().unwrap();
        for agent in AGENTS {
            let child = netns::spawn_in(&node.ns, &node.root, agent);
            node.agents.push((agent, child));
        }
    }

    /// Every node's agents' logs and device log, the last lines of each.
    fn logs(&self) -> String {
        let mut text = String::new();
        for node in &self.nodes {
            let files = AGENTS
                .iter()
                .map(|a| format!("{a}.log"))
                .chain(["run/powernode/netmgr/device/pn0.log".to_owned()]);
            for file in files {
                let log = node.log(&file);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                text += &format!("--- node {} {file}\n{tail}\n", node.n);
            }
        }
        text
    }

    /// Fails the test with `what` and the nodes' logs.
    #[track_caller]
    fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.logs());
    }

    /// Node `i`'s status once `done` accepts it.
    fn wait_status(
        &self,
        i: usize,
        what: &str,
        done: impl Fn(&NetworkStatus) -> bool,
    ) -> NetworkStatus {
        let found = self.runtime.block_on(common::wait_item(
            &self.nodes[i].root,
            "netmgr",
            GLOBAL_KEY,
            WAIT,
            done,
        ));
        found.unwrap_or_else(|last| {
            self.fail(&format!("node {}: no status with {what}: {last:#?}", i + 1))
        })
    }

    /// The operator creates the network, as `network create` does.
    fn create_network(&self) {
        let request = CreateNetworkRequest {
            name: NETWORK.into(),
            cidr: CIDR.into(),
            port: Some(PORT.into()),
        };
        let (cidr, port) = check_create(&request).unwrap();
        let now = powernode_controller::now_ms();
        self.runtime
            .block_on(self.storage.create_network(NETWORK, cidr, port, now))
            .unwrap()
            .unwrap();
    }

    /// The operator joins node `i`, as `network join` does: its overlay address.
    fn join(&self, i: usize) -> String {
        let request = JoinNetworkRequest {
            node: self.nodes[i].node_id.clone(),
            announce: Vec::new(),
            endpoint: None,
        };
        check_join(&request).unwrap();
        let now = powernode_controller::now_ms();
        let joined = self.runtime.block_on(self.storage.join_network(
            NETWORK,
            &request.node,
            &request.announce,
            None,
            now,
        ));
        joined.unwrap().unwrap().0.address
    }

    /// Creates the network and joins every node.
    fn join_all(&self) {
        self.create_network();
        for i in 0..self.nodes.len() {
            assert_eq!(self.join(i), overlay(i).to_string());
        }
    }

    /// The operator takes node `i` out, as `network leave` does.
    fn leave(&self, i: usize) {
        let now = powernode_controller::now_ms();
        let left = self.runtime.block_on(self.storage.leave_network(
            NETWORK,
            &self.nodes[i].node_id,
            now,
        ));
        assert_eq!(left.unwrap().unwrap().0.address, overlay(i).to_string());
    }

    /// The operator forwards `proto` `port` of node `i` to `to`, as `network forward add`
    /// does.
    fn add_forward(&self, i: usize, proto: &str, port: u16, to: SocketAddr) {
        let to = to.to_string();
        let port = check_forward(&self.nodes[i].node_id, proto, port.into(), Some(&to)).unwrap();
        let now = powernode_controller::now_ms();
        let added = self.runtime.block_on(self.storage.add_forward(
            &self.nodes[i].node_id,
            proto,
            port,
            &to,
            now,
        ));
        added.unwrap().unwrap();
    }

    /// The operator removes that forward, as `network forward remove` does.
    fn remove_forward(&self, i: usize, proto: &str, port: u16) {
        let port = check_forward(&self.nodes[i].node_id, proto, port.into(), None).unwrap();
        let now = powernode_controller::now_ms();
        let removed = self.runtime.block_on(self.storage.remove_forward(
            &self.nodes[i].node_id,
            proto,
            port,
            now,
        ));
        removed.unwrap().unwrap();
    }

    /// Node `i` as the controller's `network show` has it.
    fn member(&self, i: usize) -> MemberDetail {
        let detail = self
            .runtime
            .block_on(self.storage.network_detail(NETWORK))
            .unwrap()
            .expect("the network");
        detail
            .members
            .into_iter()
            .find(|m| m.member.node_id == self.nodes[i].node_id)
            .unwrap_or_else(|| panic!("node {} is not a member", i + 1))
    }

    /// Node `i`'s public key as the controller has it.
    fn key(&self, i: usize) -> String {
        self.member(i).public_key.expect("a reported key")
    }

    /// A TCP server on every node (on all its addresses).
    fn sinks(&self) {
        for node in &self.nodes {
            Sink::start(&node.ns, SocketAddr::from(([0, 0, 0, 0], SINK_PORT)));
        }
    }

    /// `bytes` from node `from` to node `to`'s server over the overlay.
    fn transfer(&self, from: usize, to: usize, bytes: usize) -> std::io::Result<()> {
        self.transfer_within(from, to, bytes, Duration::from_secs(3))
    }

    /// [`Fleet::transfer`] where connecting, and each read and write, may take `timeout`.
    fn transfer_within(
        &self,
        from: usize,
        to: usize,
        bytes: usize,
        timeout: Duration,
    ) -> std::io::Result<()> {
        let addr = SocketAddr::from((overlay(to), SINK_PORT));
        netns::transfer(&self.nodes[from].ns, addr, bytes, timeout)
    }

    /// Waits until a transfer of a few MB from node `from` to node `to` succeeds.
    fn wait_transfer(&self, from: usize, to: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.transfer(from, to, TRANSFER) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => self.fail(&format!(
                    "node {} cannot send to node {} over the overlay: {e}",
                    from + 1,
                    to + 1
                )),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Waits until node `to` is unreachable from node `from` (two attempts in a row fail);
    /// fails the test if it is not by `deadline`.
    fn wait_unreachable(&self, from: usize, to: usize, deadline: Instant) {
        let mut failed = 0;
        while failed < 2 {
            match self.transfer_within(from, to, 4, Duration::from_secs(1)) {
                Ok(()) => failed = 0,
                Err(_) => failed += 1,
            }
            if failed < 2 && Instant::now() >= deadline {
                self.fail(&format!("node {} still reaches node {}", from + 1, to + 1));
            }
        }
    }

    /// Transfers between every ordered pair of `nodes`.
    fn wait_pairs(&self, nodes: &[usize]) {
        for &from in nodes {
            for &to in nodes {
                if from != to {
                    self.wait_transfer(from, to);
                }
            }
        }
    }

    /// `wg <args>` on node `i`'s device.
    fn wg(&self, i: usize, args: &[&str]) -> String {
        netns::wg(self.nodes[i].device_pid(), args)
    }

    /// Node `i`'s peers' latest handshakes (Unix seconds), by public key.
    fn handshakes(&self, i: usize) -> HashMap<String, u64> {
        self.wg(i, &["show", "pn0", "latest-handshakes"])
            .lines()
            .map(|line| {
                let (key, at) = line.split_once('\t').expect("key TAB time");
                (key.to_owned(), at.trim().parse().unwrap())
            })
            .collect()
    }

    /// SIGKILL of node `i`'s `agent`, and waits for it.
    fn kill9(&mut self, i: usize, agent: &str) {
        let (_, child) = self.nodes[i]
            .agents
            .iter_mut()
            .find(|(a, _)| *a == agent)
            .unwrap();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
    }

    /// Starts node `i`'s `agent` again.
    fn restart(&mut self, i: usize, agent: &'static str) {
        let node = &mut self.nodes[i];
        let child = netns::spawn_in(&node.ns, &node.root, agent);
        node.agents.retain(|(a, _)| *a != agent);
        node.agents.push((agent, child));
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            for (_, child) in &mut node.agents {
                let _ = child.kill();
                let _ = child.wait();
            }
            // The device, whatever netmgr did with it.
            for pid in common::processes_with(&node.root.display().to_string()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        self.runtime.block_on(self.storage.close());
    }
}

fn uuid(n: u8) -> String {
    format!("uuid-fleet-{n}")
}

/// Handshake times (Unix seconds) read twice through `wg` may differ by a second of rounding.
fn same_handshake(before: u64, after: u64) -> bool {
    before.abs_diff(after) <= 2
}

#[test]
fn three_nodes_on_the_controllers_network_reach_each_other_and_one_leaves_and_rejoins() {
    if !needs() {
        return;
    }
    let fleet = Fleet::boot(3);
    fleet.join_all();
    fleet.sinks();
    fleet.wait_pairs(&[0, 1, 2]);
    let keys: Vec<String> = (0..3).map(|i| fleet.key(i)).collect();

    // wireguard-tools reads each device: the interface, its port, both peers, and a recent
    // handshake with each.
    let now_s = common::now_ms() / 1000;
    for i in 0..3 {
        let shown = fleet.wg(i, &["show", "pn0"]);
        assert!(shown.contains("interface: pn0"), "{shown}");
        assert!(
            shown.contains(&format!("listening port: {PORT}")),
            "{shown}"
        );
        for (p, key) in keys.iter().enumerate().filter(|(p, _)| *p != i) {
            assert!(shown.contains(&format!("peer: {key}")), "{shown}");
            assert!(
                shown.contains(&format!("allowed ips: {}/32", overlay(p))),
                "{shown}"
            );
        }
        assert_eq!(shown.matches("latest handshake").count(), 2, "{shown}");
        let handshakes = fleet.handshakes(i);
        assert_eq!(handshakes.len(), 2, "{handshakes:?}");
        for at in handshakes.values() {
            assert!(now_s.abs_diff(*at) < 60, "a handshake at {at}, now {now_s}");
        }
    }

    // Node 3 leaves: the others lose it within seconds; their own session stays as it was.
    let one_two = fleet.handshakes(0)[&keys[1]];
    let two_one = fleet.handshakes(1)[&keys[0]];
    let key_file = fleet.nodes[2].key_file();
    fleet.leave(2);
    let deadline = Instant::now() + LEAVE_WITHIN;
    fleet.wait_unreachable(0, 2, deadline);
    fleet.wait_unreachable(1, 2, deadline);
    fleet.wait_unreachable(2, 0, deadline);
    fleet.wait_unreachable(2, 1, deadline);
    netns::wait_until(WAIT, "node 3's pn0 goes", || {
        !has_link(&fleet.nodes[2].ns, "pn0")
    });
    for (from, to) in [(0, 1), (1, 0)] {
        if let Err(e) = fleet.transfer(from, to, TRANSFER) {
            fleet.fail(&format!(
                "node {} to node {} after node 3 left: {e}",
                from + 1,
                to + 1
            ));
        }
    }
    let shown = fleet.wg(0, &["show", "pn0", "peers"]);
    assert_eq!(shown.trim(), keys[1], "{shown}");
    let (one_two_after, two_one_after) =
        (fleet.handshakes(0)[&keys[1]], fleet.handshakes(1)[&keys[0]]);
    assert!(
        same_handshake(one_two, one_two_after) && same_handshake(two_one, two_one_after),
        "the session of nodes 1 and 2 was renewed: {one_two} {two_one} then {one_two_after} {two_one_after}"
    );

    // It rejoins: the same address (the lowest free one), the same key, reachable again.
    assert_eq!(fleet.join(2), overlay(2).to_string());
    fleet.wait_pairs(&[0, 1, 2]);
    assert_eq!(fleet.key(2), keys[2]);
    assert_eq!(fleet.nodes[2].key_file(), key_file);
    let status = fleet.wait_status(2, "Up", |s| s.state == NetworkState::Up);
    assert_eq!(status.public_key.as_ref(), Some(&keys[2]));
}

#[test]
fn a_port_forward_reaches_a_server_over_the_overlay_until_it_is_removed() {
    if !needs() {
        return;
    }
    let mut fleet = Fleet::boot(2);
    // A client outside the overlay, on the underlay.
    let client = fleet.underlay.add(9);
    // Another table on node 1, there before any forward (listed with its handles: a table
    // deleted and made again would have others).
    let ns = fleet.nodes[0].ns.clone();
    let nft = |args: &[&str]| {
        let mut command = vec!["ip", "netns", "exec", ns.as_str(), "nft"];
        command.extend_from_slice(args);
        netns::sh(&command);
    };
    nft(&["add", "table", "ip", "other"]);
    nft(&[
        "add",
        "chain",
        "ip",
        "other",
        "input",
        "{ type filter hook input priority 10 ; policy accept ; }",
    ]);
    nft(&[
        "add", "rule", "ip", "other", "input", "tcp", "dport", "12345", "accept",
    ]);
    let list = |table: &str| {
        std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns, "nft", "-a", "list", "table", "ip", table,
            ])
            .output()
            .unwrap()
    };
    let other = list("other").stdout;

    fleet.join_all();
    let (port, target) = (8080, SocketAddr::from((overlay(1), 9000)));
    let server = Sink::start(&fleet.nodes[1].ns, SocketAddr::from(([0, 0, 0, 0], 9000)));
    fleet.sinks();
    fleet.wait_transfer(0, 1);

    // Node 1 forwards its port 8080 to node 2's server: the client reaches it through node
    // 1's underlay address, and the server sees node 1's overlay address.
    fleet.add_forward(0, "tcp", port, target);
    let via = SocketAddr::from((underlay_address(1), port));
    let deadline = Instant::now() + WAIT;
    while let Err(e) = netns::transfer(&client, via, TRANSFER, Duration::from_secs(3)) {
        if Instant::now() >= deadline {
            fleet.fail(&format!("no transfer through the forward: {e}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let peers = server.peers();
    assert_eq!(
        peers.last().map(SocketAddr::ip),
        Some(overlay(0).into()),
        "{peers:?}"
    );
    let rules = String::from_utf8(list("powernode").stdout).unwrap();
    assert!(rules.contains(&format!("dnat to {target}")), "{rules}");

    // Removed: refused.
    fleet.remove_forward(0, "tcp", port);
    let deadline = Instant::now() + WAIT;
    loop {
        match netns::transfer(&client, via, 4, Duration::from_secs(3)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
            outcome if Instant::now() >= deadline => {
                fleet.fail(&format!("the removed forward still answers: {outcome:?}"))
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    assert!(
        !list("powernode").status.success(),
        "netmgr's table outlived its last forward"
    );
    assert_eq!(
        String::from_utf8(list("other").stdout).unwrap(),
        String::from_utf8(other).unwrap(),
        "the other table changed"
    );
    // The overlay itself carries on.
    fleet.wait_transfer(0, 1);
}

#[test]
fn a_netmgr_killed_and_restarted_changes_no_members_network_and_keeps_its_key() {
    if !needs() {
        return;
    }
    let mut fleet = Fleet::boot(3);
    fleet.join_all();
    fleet.sinks();
    fleet.wait_pairs(&[0, 1, 2]);
    let generations: Vec<u64> = (0..3).map(|i| fleet.member(i).generation).collect();
    let key = fleet.key(0);
    let key_file = fleet.nodes[0].key_file();
    let device = fleet.nodes[0].device_pid();
    let applied = fleet
        .wait_status(0, "Up", |s| s.state == NetworkState::Up)
        .generation;
    let session = fleet.handshakes(1)[&key];

    // SIGKILL: the data plane carries on while netmgr is away.
    fleet.kill9(0, "netmgr");
    if let Err(e) = fleet.transfer(1, 0, TRANSFER) {
        fleet.fail(&format!(
            "no transfer to node 1 while its netmgr is away: {e}"
        ));
    }
    fleet.restart(0, "netmgr");
    netns::wait_until(WAIT, "the new netmgr adopts the device", || {
        fleet.nodes[0]
            .log("netmgr.log")
            .contains("adopted the running WireGuard interface")
    });
    let status = fleet.wait_status(0, "Up with the key", |s| {
        s.state == NetworkState::Up && s.public_key.is_some() && !s.endpoints.is_empty()
    });
    assert_eq!(status.public_key.as_ref(), Some(&key));
    assert_eq!(status.generation, applied);

    // A heartbeat well after the restarted netmgr is up (heartbeatd has its status by then)
    // has brought that status to the controller: no member's desired network moved.
    let up_at_ms = powernode_controller::now_ms();
    let deadline = Instant::now() + WAIT;
    let member = loop {
        let member = fleet.member(0);
        if member.last_heartbeat_ms > Some(up_at_ms + 1_000) {
            break member;
        }
        if Instant::now() >= deadline {
            fleet.fail("no heartbeat of node 1 after its netmgr was restarted");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        member.reported.as_ref().and_then(|r| r.state.as_deref()),
        Some("Up")
    );
    assert_eq!(member.public_key.as_ref(), Some(&key));
    let after: Vec<u64> = (0..3).map(|i| fleet.member(i).generation).collect();
    assert_eq!(after, generations, "a netmgr restart changed the topology");

    // The same key, the same device, the same sessions.
    assert_eq!(fleet.nodes[0].key_file(), key_file);
    assert_eq!(fleet.nodes[0].device_pid(), device);
    for (from, to) in [(0, 1), (1, 0), (0, 2), (2, 0)] {
        if let Err(e) = fleet.transfer(from, to, TRANSFER) {
            fleet.fail(&format!(
                "node {} to node {} after the restart: {e}",
                from + 1,
                to + 1
            ));
        }
    }
    let again = fleet.handshakes(1)[&key];
    assert!(
        same_handshake(session, again),
        "node 2's session with node 1 was renewed: {session} then {again}"
    );
}
