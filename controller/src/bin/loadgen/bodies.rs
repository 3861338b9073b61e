//! What simulated nodes send: heartbeats shaped as heartbeatd builds them (its modules,
//! mounts, network and enrollment reports, `agents/heartbeatd/src/report.rs`), event batches
//! as eventd delivers them (kinds, messages and fields as the agents raise them), task
//! outputs as execd reports them. Built with the node API's own types, so a body that stops
//! matching the contract stops compiling.

use std::sync::OnceLock;

use powernode_controller::wire::{
    EnrollmentReport, EventRecord, EventsRequest, HeartbeatRequest, Memory, ModuleReport,
};
use powernode_types::{NetworkState, NetworkStatus, PeerStatus, Severity};
use serde_json::{json, Map, Value};

/// A small deterministic generator (SplitMix64): the same seed gives the same fleet.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `stream` (e.g. a node's index) under `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// `bytes` random bytes as lower-case hex.
    pub fn hex(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes * 2);
        for _ in 0..bytes.div_ceil(8) {
            out.push_str(&format!("{:016x}", self.next_u64()));
        }
        out.truncate(bytes * 2);
        out
    }

    /// A random WireGuard public key: base64 of 32 bytes (42 characters, one holding the last
    /// 4 bits, then `=`), as netmgr reports it.
    pub fn wg_key(&mut self) -> String {
        const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        const LAST: &[u8] = b"AEIMQUYcgkosw048";
        let mut key: String = (0..42)
            .map(|_| char::from(B64[self.below(64) as usize]))
            .collect();
        key.push(char::from(LAST[self.below(16) as usize]));
        key.push('=');
        key
    }
}

/// The small heartbeat the controller's tests and `scripts/bench-controller.sh` have always
/// sent (~330 B): kept so those figures stay comparable.
pub fn small_heartbeat() -> Vec<u8> {
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

/// One module every simulated node runs.
struct Module {
    name: &'static str,
    version: &'static str,
    reference: String,
    digest: String,
}

/// The module stack of the fleet, bottom first: what a site's nodes typically run.
fn modules() -> &'static [Module] {
    static MODULES: OnceLock<Vec<Module>> = OnceLock::new();
    MODULES.get_or_init(|| {
        [
            ("base", "2.4.1"),
            ("kernel-extras", "6.1.119-1"),
            ("container-runtime", "1.7.22"),
            ("observability", "0.38.0"),
            ("wireguard-tools", "1.0.20210914"),
            ("site-config", "2026.12.1"),
            ("edge-proxy", "3.11.4"),
        ]
        .into_iter()
        .map(|(name, version)| {
            let digest = ring::digest::digest(
                &ring::digest::SHA256,
                format!("{name}@{version}").as_bytes(),
            );
            Module {
                name,
                version,
                reference: format!("registry.powernode.example/modules/{name}:{version}"),
                digest: format!("sha256:{}", hex(digest.as_ref())),
            }
        })
        .collect()
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A WireGuard peer of a simulated node.
#[derive(Clone, Debug)]
struct Peer {
    public_key: String,
    endpoint: String,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// What a simulated node reports, kept between heartbeats so that counters grow and the
/// node's identity, keys and addresses stay the same from one heartbeat to the next.
#[derive(Debug)]
pub struct NodeFacts {
    boot_id: String,
    uptime_base_s: u64,
    memory_total: u64,
    slot_b: bool,
    mount_generation: u64,
    public_key: String,
    endpoint: String,
    peers: Vec<Peer>,
    cert_fingerprint: String,
    not_after_ms: u64,
    /// The desired-state generation this node has applied.
    pub applied_generation: u64,
    /// Events raised so far, per agent (for their sequence numbers).
    event_seq: u64,
}

impl NodeFacts {
    /// A node's facts: `index` picks its overlay address, `cert_pem` its certificate.
    pub fn new(index: usize, rng: &mut Rng, cert_pem: &str, not_after_ms: u64) -> Self {
        let boot = rng.hex(16);
        let boot_id = format!(
            "{}-{}-{}-{}-{}",
            &boot[..8],
            &boot[8..12],
            &boot[12..16],
            &boot[16..20],
            &boot[20..]
        );
        let overlay = |i: u64| format!("10.{}.{}.{}", 64 + (i >> 16) % 64, (i >> 8) % 256, i % 256);
        let peers = (0..4)
            .map(|_| Peer {
                public_key: rng.wg_key(),
                endpoint: format!("{}:51820", overlay(rng.below(1 << 20))),
                rx_bytes: rng.below(1 << 30),
                tx_bytes: rng.below(1 << 30),
            })
            .collect();
        let fingerprint = ring::digest::digest(&ring::digest::SHA256, cert_pem.as_bytes());
        NodeFacts {
            boot_id,
            uptime_base_s: 3600 + rng.below(30 * 86_400),
            memory_total: [4u64, 8, 16, 32][rng.below(4) as usize] << 30,
            slot_b: rng.below(2) == 1,
            mount_generation: 1 + rng.below(12),
            public_key: rng.wg_key(),
            endpoint: format!("{}:51820", overlay(index as u64)),
            peers,
            cert_fingerprint: hex(fingerprint.as_ref()),
            not_after_ms,
            applied_generation: 0,
            event_seq: rng.below(10_000),
        }
    }

    /// The heartbeat body now: what heartbeatd would send for this node after
    /// `elapsed_s` seconds of the run, `now_ms` by the wall clock.
    pub fn heartbeat(&mut self, rng: &mut Rng, elapsed_s: u64, now_ms: u64) -> Vec<u8> {
        let stack = modules();
        let reports = stack
            .iter()
            .map(|m| ModuleReport {
                name: m.name.to_owned(),
                digest: Some(m.digest.clone()),
                state: Some("Active".to_owned()),
                reference: Some(m.reference.clone()),
                error: None,
                bytes_done: None,
                bytes_total: None,
            })
            .collect();
        let mut mounts = Map::new();
        mounts.insert(
            "root".to_owned(),
            json!({
                "generation": self.mount_generation,
                "state": "Mounted",
                "slot": if self.slot_b { "B" } else { "A" },
                "layers": stack.iter().map(|m| m.digest.as_str()).collect::<Vec<_>>(),
                "error": null,
            }),
        );
        for peer in &mut self.peers {
            peer.rx_bytes += rng.below(4 << 20);
            peer.tx_bytes += rng.below(4 << 20);
        }
        let network = NetworkStatus {
            state: NetworkState::Up,
            interface: "pn0".to_owned(),
            public_key: Some(self.public_key.clone()),
            peers_up: self.peers.len() as u32,
            userspace: false,
            error: None,
            generation: 3,
            listen_port: Some(51820),
            endpoints: vec![self.endpoint.clone()],
            peers: self
                .peers
                .iter()
                .map(|p| PeerStatus {
                    public_key: p.public_key.clone(),
                    endpoint: Some(p.endpoint.clone()),
                    last_handshake_ms: Some(now_ms.saturating_sub(rng.below(120_000))),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                })
                .collect(),
        };
        let network = match serde_json::to_value(network) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        };
        let lifetime_ms = 90 * 86_400_000;
        let request = HeartbeatRequest {
            boot_id: self.boot_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            arch: Some("x86_64".to_owned()),
            uptime_s: Some(self.uptime_base_s + elapsed_s),
            load: Some([
                round2(rng.unit() * 2.0),
                round2(rng.unit() * 1.5),
                round2(rng.unit()),
            ]),
            memory: Some(Memory {
                total_bytes: self.memory_total,
                available_bytes: self.memory_total / 100 * (30 + rng.below(50)),
            }),
            modules: reports,
            mounts: Some(mounts),
            network,
            applied_generation: Some(self.applied_generation),
            enrollment: Some(EnrollmentReport {
                state: "Enrolled".to_owned(),
                cert_fingerprint: Some(self.cert_fingerprint.clone()),
                not_after_ms: Some(self.not_after_ms),
                rotate_at_ms: Some(self.not_after_ms - lifetime_ms / 4),
                rotation_failing_since_ms: None,
                rotation_attempts: 0,
                last_error: None,
            }),
        };
        serde_json::to_vec(&request).unwrap_or_default()
    }

    /// A batch of 1 to 3 events as eventd delivers them: what the agents raise in ordinary
    /// operation (a module active, a download retried, a stack switched, ...).
    pub fn events(&mut self, rng: &mut Rng, now_ms: u64) -> Vec<u8> {
        let count = 1 + rng.below(3) as usize;
        let events = (0..count)
            .map(|_| {
                self.event_seq += 1;
                let (agent, severity, kind, message, fields) = self.event(rng);
                EventRecord {
                    id: rng.hex(16),
                    agent: agent.to_owned(),
                    seq: self.event_seq,
                    severity,
                    kind: kind.to_owned(),
                    message,
                    at_ms: now_ms.saturating_sub(rng.below(5_000)),
                    fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
                    dropped_before: 0,
                }
            })
            .collect();
        serde_json::to_vec(&EventsRequest { events }).unwrap_or_default()
    }

    #[allow(clippy::type_complexity)]
    fn event(
        &mut self,
        rng: &mut Rng,
    ) -> (
        &'static str,
        Severity,
        &'static str,
        String,
        Vec<(&'static str, String)>,
    ) {
        let stack = modules();
        let module = &stack[rng.below(stack.len() as u64) as usize];
        match rng.below(6) {
            0 => (
                "modulemgr",
                Severity::Info,
                "module.active",
                format!(
                    "module {} {} is active (stack generation {})",
                    module.name, module.version, self.mount_generation
                ),
                vec![
                    ("module", module.name.to_owned()),
                    ("reference", module.reference.clone()),
                    ("digest", module.digest.clone()),
                    ("version", module.version.to_owned()),
                    ("generation", self.mount_generation.to_string()),
                ],
            ),
            1 => {
                let attempt = [1u32, 4, 16][rng.below(3) as usize];
                let error = format!(
                    "GET https://registry.powernode.example/v2/modules/{}/blobs/{}: \
                     connection reset by peer",
                    module.name, module.digest
                );
                (
                    "modulemgr",
                    Severity::Warning,
                    "module.download_failing",
                    format!(
                        "downloading module {} failed (attempt {attempt}), retrying in 8.0s: \
                         {error}",
                        module.name
                    ),
                    vec![
                        ("module", module.name.to_owned()),
                        ("reference", module.reference.clone()),
                        ("error", error),
                        ("attempt", attempt.to_string()),
                        ("retry_in_ms", "8000".to_owned()),
                    ],
                )
            }
            2 => {
                let slot = if self.slot_b { "B" } else { "A" };
                let names: Vec<&str> = stack.iter().map(|m| m.name).collect();
                let digests: Vec<&str> = stack.iter().map(|m| m.digest.as_str()).collect();
                (
                    "mountmgr",
                    Severity::Info,
                    "stack.switched",
                    format!(
                        "target root switched to generation {} in slot {slot}: {}",
                        self.mount_generation,
                        names.join(", ")
                    ),
                    vec![
                        ("target", "root".to_owned()),
                        ("generation", self.mount_generation.to_string()),
                        ("slot", slot.to_owned()),
                        ("layers", names.join(",")),
                        ("digests", digests.join(",")),
                        (
                            "previous_generation",
                            self.mount_generation.saturating_sub(1).to_string(),
                        ),
                    ],
                )
            }
            3 => (
                "mountmgr",
                Severity::Warning,
                "stack.health_check_failed",
                format!(
                    "health check of target root failed (generation {}): unit \
                     edge-proxy.service is not active (failed)",
                    self.mount_generation
                ),
                vec![
                    ("target", "root".to_owned()),
                    ("generation", self.mount_generation.to_string()),
                    ("check", "edge-proxy.service".to_owned()),
                    ("error", "unit is not active (failed)".to_owned()),
                ],
            ),
            4 => (
                "heartbeatd",
                Severity::Info,
                "controller.reachable",
                "the controller is reachable again after 3 failed heartbeats".to_owned(),
                vec![
                    ("failures", "3".to_owned()),
                    (
                        "url",
                        "https://controller.powernode.example:8443".to_owned(),
                    ),
                ],
            ),
            _ => (
                "execd",
                Severity::Info,
                "agent.started",
                format!("execd {} started", env!("CARGO_PKG_VERSION")),
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_owned()),
                    ("boot_id", self.boot_id.clone()),
                ],
            ),
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The arguments of a `node.exec` task the operator gives a node (execd's `ExecArgs`).
pub fn task_args(rng: &mut Rng) -> Value {
    const SCRIPTS: &[&str] = &[
        "uptime\ndf -h /persist\n",
        "systemctl is-active edge-proxy.service\njournalctl -u edge-proxy.service -n 20 --no-pager\n",
        "ip -brief address\nwg show pn0 latest-handshakes\n",
        "cat /proc/loadavg\nfree -m\n",
    ];
    json!({
        "script": SCRIPTS[rng.below(SCRIPTS.len() as u64) as usize],
        "timeout_s": 30,
    })
}

/// What a node reports when it completes a task: a few lines of output, as execd would.
pub fn task_complete(rng: &mut Rng) -> Vec<u8> {
    let output = format!(
        " 14:{:02}:{:02} up {} days,  3:{:02},  0 users,  load average: {:.2}, {:.2}, {:.2}\n\
         Filesystem      Size  Used Avail Use% Mounted on\n\
         /dev/vda3        29G  {}G   {}G  {}% /persist\n",
        rng.below(60),
        rng.below(60),
        1 + rng.below(60),
        rng.below(60),
        rng.unit() * 2.0,
        rng.unit() * 1.5,
        rng.unit(),
        4 + rng.below(10),
        10 + rng.below(10),
        20 + rng.below(50),
    );
    serde_json::to_vec(&json!({"outcome": "Succeeded", "output": output})).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_controller::wire::TaskCompleteRequest;

    fn node() -> (NodeFacts, Rng) {
        let mut rng = Rng::new(7, 3);
        let facts = NodeFacts::new(3, &mut rng, "-----BEGIN CERTIFICATE-----", 1 << 42);
        (facts, rng)
    }

    #[test]
    fn a_heartbeat_is_a_few_kib_and_parses_as_the_contract() {
        let (mut facts, mut rng) = node();
        let body = facts.heartbeat(&mut rng, 10, 1_700_000_000_000);
        assert!((2048..8192).contains(&body.len()), "{} bytes", body.len());
        let parsed: HeartbeatRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.modules.len(), modules().len());
        let network = parsed.network.unwrap();
        let key = network["public_key"].as_str().unwrap();
        assert!(powernode_controller::networks::is_public_key(key), "{key}");
        let status: NetworkStatus = serde_json::from_value(Value::Object(network)).unwrap();
        assert_eq!(status.peers.len(), 4);
        assert!(status
            .peers
            .iter()
            .all(|p| powernode_controller::networks::is_public_key(&p.public_key)));
    }

    #[test]
    fn event_batches_pass_the_controllers_checks() {
        let (mut facts, mut rng) = node();
        for _ in 0..50 {
            let body = facts.events(&mut rng, 1_700_000_000_000);
            let batch: EventsRequest = serde_json::from_slice(&body).unwrap();
            assert!((1..=3).contains(&batch.events.len()));
            powernode_controller::events::validate_batch(&batch.events).unwrap();
        }
    }

    #[test]
    fn task_bodies_match_the_contract() {
        let mut rng = Rng::new(1, 1);
        let done: TaskCompleteRequest = serde_json::from_slice(&task_complete(&mut rng)).unwrap();
        assert!(done.output.contains("load average"));
        assert!(task_args(&mut rng)["script"].is_string());
    }

    #[test]
    fn the_generator_is_deterministic_and_spread() {
        let a: Vec<u64> = (0..5).map(|_| Rng::new(1, 2).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut rng = Rng::new(1, 2);
        let mean = (0..10_000).map(|_| rng.unit()).sum::<f64>() / 10_000.0;
        assert!((0.45..0.55).contains(&mean), "{mean}");
    }
}
