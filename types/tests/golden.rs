//! Golden encodings: a checked-in postcard encoding of every topic type, per schema version.
//!
//! Each topic has samples in which every field holds a distinct, non-default value, so that
//! reordering, retyping, adding or removing a field changes the bytes; further samples run
//! through every variant of the topic's enums, so that adding, removing or reordering a variant
//! changes them too. The bytes must equal `golden/<Name>.v<SCHEMA_VERSION>.hex`.
//!
//! Rule: a golden file, once written, never changes. When a type's encoding changes, bump its
//! `SCHEMA_VERSION` and run `UPDATE_GOLDEN=1 cargo test -p powernode-types --test golden`,
//! which writes the files that are missing (and only those); check them in beside the old ones.

use std::fmt::Debug;
use std::path::PathBuf;

use powernode_types::*;

const UPDATE_HINT: &str = "UPDATE_GOLDEN=1 cargo test -p powernode-types --test golden";

/// Collects every topic's outcome, so that one run reports (or writes) all of them.
#[derive(Default)]
struct Golden {
    covered: Vec<&'static str>,
    failures: Vec<String>,
}

impl Golden {
    fn check<T: Topic + PartialEq + Debug>(&mut self, samples: Vec<T>) {
        self.covered.push(T::NAME);
        if let Err(failure) = check_topic(&samples) {
            self.failures.push(failure);
        }
    }

    /// Every sample of the golden file of `T`'s schema `version` must upgrade
    /// ([`Topic::upgrade`]) to the item at its place in `expected`: checkpoints written by the
    /// agents before an upgrade stay readable after it.
    fn check_upgrade<T: Topic + PartialEq + Debug>(&mut self, version: u32, expected: Vec<T>) {
        if let Err(failure) = check_upgrade(version, &expected) {
            self.failures.push(failure);
        }
    }
}

fn check_upgrade<T: Topic + PartialEq + Debug>(version: u32, expected: &[T]) -> Result<(), String> {
    let name = T::NAME;
    let file = format!("{name}.v{version}.hex");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(&file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{name}: cannot read {}: {e}", path.display()))?;
    let golden: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if golden.len() != expected.len() {
        return Err(format!(
            "{file}: {} samples, {} expected after the upgrade",
            golden.len(),
            expected.len()
        ));
    }
    for (i, (hex, want)) in golden.iter().zip(expected).enumerate() {
        let bytes = from_hex(hex).ok_or_else(|| format!("{file}: sample {i} is not hex"))?;
        match T::upgrade(version, &bytes) {
            Some(got) if &got == want => {}
            Some(got) => {
                return Err(format!(
                    "{file}: sample {i} upgrades to {got:?}, not {want:?}"
                ))
            }
            None => {
                return Err(format!(
                    "{file}: sample {i} does not upgrade to {name} v{}",
                    T::SCHEMA_VERSION
                ))
            }
        }
        // An item of the current version is not mistaken for an old one.
        if let Ok(current) = postcard::to_stdvec(want) {
            if current != bytes && T::upgrade(version, &current).as_ref() == Some(want) {
                return Err(format!(
                    "{name}: a v{} item also reads as v{version}",
                    T::SCHEMA_VERSION
                ));
            }
        }
    }
    Ok(())
}

fn check_topic<T: Topic + PartialEq + Debug>(samples: &[T]) -> Result<(), String> {
    let name = T::NAME;
    let version = T::SCHEMA_VERSION;
    let file = format!("{name}.v{version}.hex");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(&file);

    let encoded: Vec<String> = samples
        .iter()
        .map(|s| postcard::to_stdvec(s).map(|b| to_hex(&b)))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{name}: cannot encode a sample: {e}"))?;

    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var_os("UPDATE_GOLDEN").is_none() {
                return Err(format!(
                    "no golden encoding of {name} v{version} (tests/golden/{file}): \
                     run {UPDATE_HINT} and check the file in"
                ));
            }
            let header = format!(
                "# {name} schema v{version}: postcard encoding of each sample in tests/golden.rs, \
                 one per line. Never edit; bump SCHEMA_VERSION instead.\n"
            );
            std::fs::write(&path, header + &encoded.join("\n") + "\n")
                .map_err(|e| format!("{name}: cannot write {}: {e}", path.display()))?;
            eprintln!("wrote {}", path.display());
            return Ok(());
        }
        Err(e) => return Err(format!("{name}: cannot read {}: {e}", path.display())),
    };

    let golden: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if golden != encoded {
        let first_diff = (0..golden.len().max(encoded.len()))
            .find(|&i| golden.get(i).copied() != encoded.get(i).map(String::as_str))
            .unwrap_or(0);
        return Err(format!(
            "encoding of {name} changed without a SCHEMA_VERSION bump (tests/golden/{file}, \
             sample {first_diff} differs; {} golden samples, {} now): bump \
             {name}::SCHEMA_VERSION and run {UPDATE_HINT}",
            golden.len(),
            encoded.len()
        ));
    }

    // Round trip: the checked-in bytes decode to the samples, typed and through the registry.
    let info = registry::lookup(name).ok_or_else(|| format!("{name} is not in registry::all()"))?;
    for (i, (hex, sample)) in golden.iter().zip(samples).enumerate() {
        let bytes = from_hex(hex).ok_or_else(|| format!("{file}: sample {i} is not hex"))?;
        let decoded: T = postcard::from_bytes(&bytes)
            .map_err(|e| format!("{name}: golden sample {i} does not decode: {e}"))?;
        if &decoded != sample {
            return Err(format!(
                "{name}: golden sample {i} decodes to {decoded:?}, not {sample:?}"
            ));
        }
        let json = (info.decode_json)(&bytes)
            .map_err(|e| format!("{name}: registry cannot decode golden sample {i}: {e}"))?;
        if json != serde_json::to_value(sample).expect("sample to JSON") {
            return Err(format!(
                "{name}: registry decodes golden sample {i} to {json}"
            ));
        }
    }
    Ok(())
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => u8::from_str_radix(std::str::from_utf8(&[*hi, *lo]).ok()?, 16).ok(),
            _ => None,
        })
        .collect()
}

/// `base`, then `base` with `set` applied for each of `values`.
fn with_each<T: Clone, V: Clone>(base: T, values: &[V], set: fn(&mut T, V)) -> Vec<T> {
    let mut out = vec![base.clone()];
    for v in values {
        let mut s = base.clone();
        set(&mut s, v.clone());
        out.push(s);
    }
    out
}

// Every variant of every enum, in declaration order. `enum_lists_are_complete` fails when a
// variant is missing here, so a new variant reaches the golden samples.
const AGENT_STATES: &[AgentState] = &[
    AgentState::Starting,
    AgentState::Running,
    AgentState::Degraded,
    AgentState::Stopping,
];
const IDENTITY_STATES: &[IdentityState] = &[IdentityState::Resolved, IdentityState::Unresolvable];
const IDENTITY_SOURCES: &[IdentitySource] = &[
    IdentitySource::KernelCmdline,
    IdentitySource::FwCfg,
    IdentitySource::Aws,
    IdentitySource::Gcp,
    IdentitySource::Azure,
    IdentitySource::DigitalOcean,
    IdentitySource::Hetzner,
    IdentitySource::Dmi,
    IdentitySource::IdentityCfg,
    IdentitySource::Generated,
];
const ENROLLMENT_STATES: &[EnrollmentState] = &[
    EnrollmentState::NotEnrolled,
    EnrollmentState::Enrolling,
    EnrollmentState::Enrolled,
    EnrollmentState::Rotating,
    EnrollmentState::RotationFailing,
    EnrollmentState::BadToken,
    EnrollmentState::Revoked,
    EnrollmentState::CertExpired,
    EnrollmentState::CaMismatch,
    EnrollmentState::Failed,
];
const MODULE_STATES: &[ModuleState] = &[
    ModuleState::Resolving,
    ModuleState::Downloading,
    ModuleState::Verifying,
    ModuleState::Mounting,
    ModuleState::Active,
    ModuleState::Failed,
];
const VERIFY_STATES: &[VerifyState] = &[
    VerifyState::Verifying,
    VerifyState::Verified,
    VerifyState::Failed,
];
const MOUNT_STATES: &[MountState] = &[
    MountState::Mounting,
    MountState::Mounted,
    MountState::Failed,
    MountState::RolledBack,
];
const SLOTS: &[Slot] = &[Slot::A, Slot::B];
const NETWORK_STATES: &[NetworkState] = &[
    NetworkState::Down,
    NetworkState::Configuring,
    NetworkState::Up,
    NetworkState::Failed,
];
const TASK_STATES: &[TaskState] = &[
    TaskState::Running,
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Interrupted,
];
const SEVERITIES: &[Severity] = &[
    Severity::Info,
    Severity::Warning,
    Severity::Error,
    Severity::Critical,
];
fn upper_modes() -> Vec<UpperMode> {
    vec![
        UpperMode::Tmpfs,
        UpperMode::Persistent {
            path: "/persist/powernode/upper/root".into(),
        },
    ]
}

fn s(text: &str) -> String {
    text.to_owned()
}

/// `samples` with their URL list cut to its first entry: what an item of the versions that
/// held one URL upgrades to.
fn first_url_only<T: Clone>(samples: &[T], urls: fn(&mut T) -> &mut Vec<String>) -> Vec<T> {
    samples
        .iter()
        .cloned()
        .map(|mut x| {
            urls(&mut x).truncate(1);
            x
        })
        .collect()
}

fn run_all(g: &mut Golden) {
    g.check(with_each(
        AgentStatus {
            agent: s("modulemgr"),
            pid: 4242,
            version: s("0.1.0-test"),
            started_at_ms: 1_700_000_000_001,
            last_loop_ms: 1_700_000_000_002,
            state: AgentState::Degraded,
            last_error: Some(s("registry unreachable")),
            quarantined_checkpoints: 3,
        },
        AGENT_STATES,
        |x, v| x.state = v,
    ));

    let identity = NodeIdentity {
        state: IdentityState::Unresolvable,
        uuid: Some(s("6f1c2a3e-0000-4000-8000-000000000001")),
        source: Some(IdentitySource::FwCfg),
        boot_id: s("b0b0b0b0-0000-4000-8000-000000000002"),
        hostname: s("edge-07"),
        arch: s("arm64"),
        dmi_uuid: Some(s("d1d1d1d1-0000-4000-8000-000000000003")),
        bootstrap_token: Some(s("tok-abc123")),
        controller_urls: vec![
            s("https://controller.example:8443"),
            s("https://controller-2.example:8443"),
        ],
        ca_pem: Some(s(
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )),
        last_error: Some(s("aws metadata timed out")),
    };
    let mut samples = with_each(identity.clone(), IDENTITY_STATES, |x, v| x.state = v);
    samples.extend(
        with_each(identity, IDENTITY_SOURCES, |x, v| x.source = Some(v))
            .into_iter()
            .skip(1),
    );
    // v1 held the first URL alone.
    g.check_upgrade(1, first_url_only(&samples, |x| &mut x.controller_urls));
    g.check(samples);

    let enrollment = with_each(
        EnrollmentStatus {
            state: EnrollmentState::RotationFailing,
            node_id: Some(s("node-0001")),
            cert_fingerprint: Some(s("9a8b7c6d")),
            not_before_ms: Some(1_700_000_000_011),
            not_after_ms: Some(1_700_000_000_012),
            rotate_at_ms: Some(1_700_000_000_013),
            controller_urls: vec![
                s("https://controller.example:8443"),
                s("https://controller-2.example:8443"),
            ],
            rotation_failing_since_ms: Some(1_700_000_000_014),
            rotation_attempts: 15,
            last_error: Some(s("rotate: 503 Service Unavailable")),
        },
        ENROLLMENT_STATES,
        |x, v| x.state = v,
    );
    // v2 held the first URL alone.
    g.check_upgrade(2, first_url_only(&enrollment, |x| &mut x.controller_urls));
    g.check(enrollment);

    let controller = ControllerStatus {
        reachable: true,
        last_success_ms: Some(1_700_000_000_021),
        consecutive_failures: 2,
        clock_skew_ms: Some(-1_500),
        heartbeat_interval_s: 30,
        applied_generation: 7,
        last_error: Some(s("heartbeat: connection reset")),
        controller_url: Some(s("https://controller-2.example:8443")),
    };
    // v1 did not say which URL was in use.
    g.check_upgrade(
        1,
        vec![ControllerStatus {
            controller_url: None,
            ..controller.clone()
        }],
    );
    g.check(vec![controller]);

    g.check(vec![ModuleConfig {
        name: s("tools"),
        reference: s("registry.example/modules/tools:1.2"),
        priority: 20,
        generation: 8,
    }]);

    g.check(with_each(
        ModuleStatus {
            name: s("tools"),
            reference: s("registry.example/modules/tools:1.2"),
            state: ModuleState::Downloading,
            digest: Some(s("sha256:aaaa")),
            bytes_done: 1_024,
            bytes_total: Some(4_096),
            error: Some(s("pull interrupted")),
        },
        MODULE_STATES,
        |x, v| x.state = v,
    ));

    g.check(vec![VerifyConfig {
        name: s("tools"),
        image_path: s("/persist/powernode/store/sha256/aaaa"),
        digest: s("sha256:aaaa"),
        size: 268_435_456,
        complete: true,
        manifest: s("{\"schemaVersion\":2}"),
        manifest_digest: s("sha256:dddd"),
        repository: s("registry.example/modules/tools"),
        signatures: vec![
            CosignSignature {
                payload: s("{\"critical\":{}}"),
                signature: s("MEUCIQ=="),
                certificate: None,
                chain: None,
                bundle: None,
            },
            CosignSignature {
                payload: s("{\"critical\":{},\"optional\":null}"),
                signature: s("MEYCIQ=="),
                certificate: Some(s("-----BEGIN CERTIFICATE-----")),
                chain: Some(s("-----BEGIN CERTIFICATE----- chain")),
                bundle: Some(s("{\"SignedEntryTimestamp\":\"\"}")),
            },
        ],
        signed_index: Some(s("sha256:eeee")),
        trust_policy: s("default"),
        attempt: 2,
    }]);

    g.check(with_each(
        VerifyStatus {
            name: s("tools"),
            digest: s("sha256:aaaa"),
            manifest_digest: s("sha256:dddd"),
            state: VerifyState::Verified,
            reason: Some(s("signature checked against key ops-2024")),
        },
        VERIFY_STATES,
        |x, v| x.state = v,
    ));

    g.check(with_each(
        MountConfig {
            target: s("root"),
            generation: 9,
            layers: vec![
                MountLayer {
                    name: s("base"),
                    image_path: s("/persist/powernode/store/sha256/cccc"),
                    digest: s("sha256:cccc"),
                    priority: 10,
                    health_check: None,
                },
                MountLayer {
                    name: s("tools"),
                    image_path: s("/persist/powernode/store/sha256/aaaa"),
                    digest: s("sha256:aaaa"),
                    priority: 20,
                    health_check: Some(HealthCheck {
                        command: vec![s("bin/check"), s("--quick")],
                        timeout_s: 5,
                    }),
                },
            ],
            upper: UpperMode::Persistent {
                path: s("/persist/powernode/upper/root"),
            },
        },
        &upper_modes(),
        |x, v| x.upper = v,
    ));

    let mount_status = MountStatus {
        target: s("root"),
        generation: 9,
        state: MountState::Mounted,
        slot: Some(Slot::B),
        layers: vec![s("sha256:cccc"), s("sha256:aaaa")],
        error: Some(s("previous generation rolled back")),
        upper_dir: Some(s("/var/lib/powernode/mounts/root/b/upper/upper")),
        drift: Some(s("slot B: merged is not mounted; rebuilt in slot A")),
        confirm_until_ms: Some(1_700_000_060_000),
    };
    let mut samples = with_each(mount_status.clone(), MOUNT_STATES, |x, v| x.state = v);
    samples.extend(
        with_each(mount_status, SLOTS, |x, v| x.slot = Some(v))
            .into_iter()
            .skip(1),
    );
    // v2 had no drift and no confirmation window; v1 no upper directory either.
    let v2: Vec<MountStatus> = samples
        .iter()
        .map(|x| MountStatus {
            drift: None,
            confirm_until_ms: None,
            ..x.clone()
        })
        .collect();
    let v1 = v2
        .iter()
        .map(|x| MountStatus {
            upper_dir: None,
            ..x.clone()
        })
        .collect();
    g.check_upgrade(2, v2);
    g.check_upgrade(1, v1);
    g.check(samples);

    g.check(vec![NetworkConfig {
        generation: 10,
        interface: s("pn0"),
        address: s("10.88.0.7/16"),
        listen_port: 51_820,
        peers: vec![WgPeer {
            public_key: s("cGVlcg=="),
            endpoint: Some(s("203.0.113.5:51820")),
            allowed_ips: vec![s("10.88.0.1/32"), s("10.99.0.0/16")],
            keepalive_s: Some(25),
        }],
        network: s("lab"),
        forwards: vec![
            PortForward {
                proto: ForwardProto::Tcp,
                port: 8080,
                to: s("10.88.0.9:80"),
            },
            PortForward {
                proto: ForwardProto::Udp,
                port: 5353,
                to: s("10.88.0.9:53"),
            },
        ],
    }]);

    g.check(with_each(
        NetworkStatus {
            state: NetworkState::Up,
            interface: s("pn0"),
            public_key: Some(s("bm9kZQ==")),
            peers_up: 4,
            userspace: true,
            error: Some(s("peer 203.0.113.9 unreachable")),
            generation: 10,
            listen_port: Some(51_820),
            endpoints: vec![s("192.0.2.7:51820"), s("[2001:db8::7]:51820")],
            peers: vec![PeerStatus {
                public_key: s("cGVlcg=="),
                endpoint: Some(s("203.0.113.5:51820")),
                last_handshake_ms: Some(1_700_000_000_050),
                rx_bytes: 123_456,
                tx_bytes: 654_321,
            }],
        },
        NETWORK_STATES,
        |x, v| x.state = v,
    ));

    g.check(vec![TaskConfig {
        id: s("task-0001"),
        kind: s("module.commit"),
        args_json: s(r#"{"module":"tools"}"#),
        lease_expires_at_ms: 1_700_000_000_031,
    }]);

    g.check(with_each(
        TaskStatus {
            id: s("task-0001"),
            kind: s("module.commit"),
            state: TaskState::Succeeded,
            output: s("committed sha256:dddd"),
            started_at_ms: 1_700_000_000_041,
            finished_at_ms: Some(1_700_000_000_042),
        },
        TASK_STATES,
        |x, v| x.state = v,
    ));

    g.check(with_each(
        Event {
            id: s("node-0001/modulemgr/17"),
            agent: s("modulemgr"),
            seq: 17,
            severity: Severity::Warning,
            kind: s("module.verify_failed"),
            message: s("signature does not match"),
            at_ms: 1_700_000_000_051,
            fields: vec![(s("module"), s("tools")), (s("digest"), s("sha256:aaaa"))],
            dropped_before: 3,
        },
        SEVERITIES,
        |x, v| x.severity = v,
    ));

    g.check(vec![EventAck {
        agent: s("modulemgr"),
        through_seq: 16,
    }]);

    g.check(vec![EventdStatus {
        journal_len: 120,
        journal_bytes: 48_200,
        journal_max_bytes: 67_108_864,
        pending: 5,
        delivered_total: 115,
        last_delivery_ms: Some(1_700_000_000_061),
        last_error: Some(s("events: 502 Bad Gateway")),
        dropped_info: 7,
        dropped_warning: 9,
        dropped_error: 2,
    }]);
}

#[test]
fn every_topic_matches_its_golden_encoding() {
    let mut g = Golden::default();
    run_all(&mut g);

    let listed: Vec<&str> = registry::all().iter().map(|i| i.name).collect();
    let no_samples: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|n| !g.covered.contains(n))
        .collect();
    let unlisted: Vec<&str> = g
        .covered
        .iter()
        .copied()
        .filter(|n| !listed.contains(n))
        .collect();
    if !no_samples.is_empty() {
        g.failures.push(format!(
            "topics without golden samples in tests/golden.rs: {no_samples:?}"
        ));
    }
    if !unlisted.is_empty() {
        g.failures.push(format!(
            "topics with golden samples but missing from registry::all(): {unlisted:?}"
        ));
    }

    assert!(g.failures.is_empty(), "\n{}\n", g.failures.join("\n"));
}

/// Checks that `all` lists every variant of `E`, in declaration order: variant `i` encodes with
/// discriminant `i`, and discriminant `all.len()` does not decode.
fn check_enum<E: serde::Serialize + serde::de::DeserializeOwned + Debug>(name: &str, all: &[E]) {
    for (i, v) in all.iter().enumerate() {
        let bytes = postcard::to_stdvec(v).unwrap();
        assert_eq!(
            bytes[0] as usize, i,
            "{name}: {v:?} is listed at {i}, declared at {}",
            bytes[0]
        );
    }
    let next = [all.len() as u8];
    let decoded = postcard::from_bytes::<E>(&next);
    assert!(
        decoded.is_err(),
        "{name} has a variant the golden samples do not list ({decoded:?}): add it to tests/golden.rs"
    );
}

#[test]
fn enum_lists_are_complete() {
    check_enum("AgentState", AGENT_STATES);
    check_enum("IdentityState", IDENTITY_STATES);
    check_enum("IdentitySource", IDENTITY_SOURCES);
    check_enum("EnrollmentState", ENROLLMENT_STATES);
    check_enum("ModuleState", MODULE_STATES);
    check_enum("VerifyState", VERIFY_STATES);
    check_enum("MountState", MOUNT_STATES);
    check_enum("Slot", SLOTS);
    check_enum("UpperMode", &upper_modes());
    check_enum("NetworkState", NETWORK_STATES);
    check_enum("TaskState", TASK_STATES);
    check_enum("Severity", SEVERITIES);
}
