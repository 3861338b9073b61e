//! Writes the seed corpora, `fuzz/corpus/<target>/seed-*`, with the project's own encoders
//! (plus the edge cases beside them), and the cosign fixture `fuzz/fixtures/cosign.json`.
//!
//! ```sh
//! cargo run -p powernode-fuzz --example seeds               # rewrite the seed-* files
//! cargo run -p powernode-fuzz --example seeds -- --new-keys # and a new cosign fixture
//! ```
//!
//! Files the fuzzer found (added after `afl-cmin`) are named otherwise and left alone. The
//! cosign fixture is kept unless `--new-keys` is given or it is missing: new keys make the
//! fuzzer-found cosign inputs stale (they still replay, they just reach less).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use mountmgr::record::{AppliedStack, LoopRecord, Record};
use powernode_controller::wire::*;
use powernode_fuzz::fixture::{Cosign, CosignFixture};
use powernode_fuzz::modules::{ARCHITECTURE, REPOSITORY};
use powernode_fuzz::mounts::RECORD_TARGET;
use powernode_modules::cosign::{self, CosignSignature, SigningKey};
use powernode_modules::digest::Digest;
use powernode_modules::format::*;
use powernode_pubsub::checkpoint;
use powernode_pubsub::frame::{Frame, Hello, PROTOCOL_VERSION};
use powernode_types::{registry, HealthCheck, MountConfig, MountLayer, Severity, Slot, UpperMode};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

type Seeds = Vec<(String, Vec<u8>)>;

fn main() {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let new_keys = std::env::args().any(|a| a == "--new-keys");
    let fixture_path = fuzz.join("fixtures/cosign.json");
    let existing = fs::read_to_string(&fixture_path)
        .ok()
        .and_then(|text| serde_json::from_str::<CosignFixture>(&text).ok());
    let fixture = match existing {
        Some(fixture) if !new_keys => fixture,
        _ => {
            let fixture = new_cosign_fixture();
            let text = serde_json::to_string_pretty(&fixture).expect("fixture serialises");
            fs::write(&fixture_path, text + "\n").expect("write the fixture");
            fixture
        }
    };
    // The fixture must build its policies, or every cosign input would be refused for nothing.
    let cosign = Cosign::new(fixture);

    let corpora: Vec<(&str, Seeds)> = vec![
        ("pubsub_frame", frames()),
        ("pubsub_checkpoint", checkpoints()),
        ("topic_item", topic_items()),
        ("mountmgr_record", records()),
        ("mountmgr_mountinfo", mountinfos()),
        ("agentbase_settings", settings()),
        ("oci_index", indexes()),
        ("oci_manifest", manifests()),
        ("module_manifest", module_manifests()),
        ("cosign_signature_layers", signature_layers(&cosign)),
        ("cosign_keyless_bundle", keyless_bundles(&cosign)),
        ("node_api_body", node_api_bodies()),
        ("eventd_journal", journal_segments()),
        ("netmgr_uapi", uapi_texts()),
    ];
    // `--only NAME` rewrites one corpus: the others' seeds hold fresh random keys each run.
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    for (target, seeds) in corpora {
        if only.as_deref().is_some_and(|o| o != target) {
            continue;
        }
        assert!(
            powernode_fuzz::target(target).is_some(),
            "no target {target}"
        );
        let dir = fuzz.join("corpus").join(target);
        fs::create_dir_all(&dir).expect("create the corpus directory");
        for entry in fs::read_dir(&dir).expect("list the corpus").flatten() {
            if entry.file_name().to_string_lossy().starts_with("seed-") {
                fs::remove_file(entry.path()).expect("remove an old seed");
            }
        }
        for (name, bytes) in &seeds {
            // Every seed must pass its own target: a seed that crashes is a finding, not a seed.
            (powernode_fuzz::target(target).unwrap().run)(bytes);
            fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
        }
        println!("{target}: {} seeds", seeds.len());
    }
}

/// The golden encodings of every topic type at its current version (types/tests/golden).
fn golden_items() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../types/tests/golden");
    registry::all()
        .iter()
        .map(|info| {
            let path = golden.join(format!("{}.v{}.hex", info.name, info.schema_version));
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            let items = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .map(|l| unhex(l.trim()))
                .collect();
            (info.name, items)
        })
        .collect()
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn frames() -> Seeds {
    let hello = Frame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        topic: "NodeIdentity",
        schema_version: 1,
        persistent: true,
        generation: 1_700_000_000_123,
    });
    let mut seeds: Seeds = vec![
        ("hello".into(), hello.encode()),
        ("delete".into(), Frame::Delete { key: "global" }.encode()),
        ("synchronized".into(), Frame::Synchronized.encode()),
        (
            "restarted".into(),
            Frame::Restarted { counter: 300 }.encode(),
        ),
        ("empty".into(), Vec::new()),
        ("unknown-tag".into(), vec![9]),
        (
            "long-varint".into(),
            vec![
                4, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ),
    ];
    let mut burst = Vec::new();
    hello.encode_into(&mut burst);
    for (name, items) in golden_items() {
        let frame = Frame::Update {
            key: name,
            value: &items[0],
        };
        seeds.push((format!("update-{name}"), frame.encode()));
        frame.encode_into(&mut burst);
    }
    Frame::Synchronized.encode_into(&mut burst);
    seeds.push(("burst".into(), burst.clone()));
    burst.truncate(burst.len() / 2);
    seeds.push(("burst-truncated".into(), burst));
    seeds
}

fn checkpoints() -> Seeds {
    let mut seeds: Seeds = golden_items()
        .into_iter()
        .map(|(name, items)| {
            let version = registry::lookup(name).unwrap().schema_version;
            (
                name.to_owned(),
                checkpoint::encode(name, version, &items[0]),
            )
        })
        .collect();
    seeds.push((
        "unknown-topic".into(),
        checkpoint::encode("Demo", 1, b"\x03abc"),
    ));
    seeds.push(("empty-payload".into(), checkpoint::encode("T", 0, b"")));
    seeds.push(("magic-only".into(), b"PNCK".to_vec()));
    let mut format2 = checkpoint::encode("T", 1, b"x");
    format2[4] = 2;
    seeds.push(("format-2".into(), format2));
    seeds
}

fn topic_items() -> Seeds {
    let names = powernode_fuzz::pubsub::topic_names();
    let mut seeds = Seeds::new();
    for (name, items) in golden_items() {
        let pick = names
            .iter()
            .position(|n| *n == name)
            .expect("a listed topic") as u8;
        for (i, item) in items.into_iter().enumerate() {
            let mut bytes = vec![pick];
            bytes.extend(item);
            seeds.push((format!("{name}-{i}"), bytes));
        }
    }
    seeds
}

fn mount_config(generation: u64) -> MountConfig {
    MountConfig {
        target: RECORD_TARGET.into(),
        generation,
        layers: vec![
            MountLayer {
                name: "base".into(),
                image_path: "/persist/powernode/store/sha256/aaaa".into(),
                digest: "sha256:aaaa".into(),
                priority: 10,
                health_check: None,
            },
            MountLayer {
                name: "tools".into(),
                image_path: "/persist/powernode/store/sha256/bbbb".into(),
                digest: "sha256:bbbb".into(),
                priority: 20,
                health_check: Some(HealthCheck {
                    command: vec!["bin/check".into(), "--quick".into()],
                    timeout_s: 5,
                }),
            },
        ],
        upper: UpperMode::Persistent {
            path: "persist/powernode/upper/app".into(),
        },
    }
}

fn records() -> Seeds {
    let full = Record {
        applied: Some(AppliedStack {
            slot: Slot::A,
            config: mount_config(3),
        }),
        switching_to: Some(AppliedStack {
            slot: Slot::B,
            config: MountConfig {
                upper: UpperMode::Tmpfs,
                ..mount_config(4)
            },
        }),
        loops: vec![LoopRecord {
            slot: Slot::B,
            device: "/dev/loop7".into(),
            image: "/persist/powernode/store/sha256/bbbb".into(),
        }],
        ..Record::new(RECORD_TARGET)
    };
    let json = |r: &Record| serde_json::to_vec_pretty(r).expect("a record serialises");
    vec![
        ("empty".into(), json(&Record::new(RECORD_TARGET))),
        ("full".into(), json(&full)),
        ("other-target".into(), json(&Record::new("other"))),
        (
            "version-2".into(),
            json(&Record {
                version: 2,
                ..Record::new(RECORD_TARGET)
            }),
        ),
        ("torn".into(), json(&full)[..200].to_vec()),
    ]
}

fn mountinfos() -> Seeds {
    let lines = [
        "22 27 0:21 / /proc rw,relatime - proc proc rw",
        "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard",
        "42 27 0:39 / /run/powernode-mounts/app/A/layers/0-tools ro,relatime - erofs /tmp/img\\040one.erofs ro,user_xattr",
        "43 27 0:40 / /run/powernode-mounts/app/A/upper rw,relatime - tmpfs tmpfs rw,mode=755",
        "44 27 0:41 / /run/powernode-mounts/app/A/merged rw,relatime master:3 shared:7 - overlay overlay rw,lowerdir=/a:/b,upperdir=/u,workdir=/w",
        "45 44 0:42 / /run/powernode-mounts/app/A/merged rw - tmpfs tmpfs rw",
    ];
    vec![
        ("table".into(), (lines.join("\n") + "\n").into_bytes()),
        ("one".into(), lines[2].as_bytes().to_vec()),
        (
            "no-separator".into(),
            b"22 27 0:21 / /proc rw proc proc rw\n".to_vec(),
        ),
        (
            "escapes".into(),
            b"1 0 0:1 / /a\\011b\\012c\\134d\\777 rw - x /s\\04 \n".to_vec(),
        ),
        (
            "blank-lines".into(),
            b"\n  \n1 0 0:1 / / rw - ext4 /dev/vda rw\n\n".to_vec(),
        ),
    ]
}

fn uapi_texts() -> Seeds {
    let key = |b: u8| format!("{b:02x}").repeat(32);
    let get = format!(
        "private_key={}\nlisten_port=51820\nown_public_key={}\npublic_key={}\n\
         endpoint=192.0.2.2:51820\nallowed_ip=10.88.0.2/32\nallowed_ip=fd00::2/128\n\
         persistent_keepalive_interval=25\nlast_handshake_time_sec=5\n\
         last_handshake_time_nsec=300000000\nrx_bytes=1024\ntx_bytes=2048\n\
         public_key={}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
         rx_bytes=0\ntx_bytes=0\nerrno=0\n",
        key(0x11),
        key(0x22),
        key(0x33),
        key(0x44)
    );
    let set = format!(
        "private_key={}\nlisten_port=51820\nreplace_peers=true\npublic_key={}\n\
         remove=true\npublic_key={}\nendpoint=192.0.2.3:51820\n\
         persistent_keepalive_interval=0\nreplace_allowed_ips=true\n\
         allowed_ip=10.88.0.3/32\n\n",
        key(0x11),
        key(0x33),
        key(0x55)
    );
    vec![
        ("get".into(), get.into_bytes()),
        ("set".into(), set.into_bytes()),
        ("errno".into(), b"errno=-22\n".to_vec()),
        (
            "huge-handshake".into(),
            format!(
                "public_key={}\nlast_handshake_time_sec=18446744073709551615\n\
                 last_handshake_time_nsec=4294967295\nerrno=0\n",
                key(0x66)
            )
            .into_bytes(),
        ),
    ]
}

fn settings() -> Seeds {
    let full = "\
log_level = \"info,powernode_pubsub=debug\"
touch_interval_s = 15

[pubsub]
connect_timeout_ms = 2000

[identity]
source_timeout_ms = 50
sources = [\"KernelCmdline\", \"Dmi\", \"IdentityCfg\"]
allow_generated_uuid = false
aws_url = \"http://127.0.0.1:8080/\"

[controller]
url = \"https://ctl.example:8443\"
request_timeout_ms = 10000
heartbeat_interval_s = 30
max_backoff_s = 60

[modules]
plain_http = [\"127.0.0.1:5000\"]
upper = \"persist/powernode/upper\"
trust_policy = \"default\"

[[modules.credentials]]
registry = \"reg.example\"
username = \"node\"
password_file = \"etc/powernode/registry.pass\"
";
    let seeds: &[(&str, &str)] = &[
        ("full", full),
        ("empty", ""),
        ("level", "log_level = \"debug\"\n"),
        ("dropins", "log_level = \"warn\"\0[controller]\nheartbeat_interval_s = 5\n\0touch_interval_s = 60\n"),
        ("table-replaced", "[identity]\nsources = [\"Dmi\"]\0identity = 3\n"),
        ("bad-level", "log_level = \"verbose\"\n"),
        ("out-of-range", "touch_interval_s = 0\n"),
        ("unknown-key", "[pubsub]\nconnect_timeout = 1\n"),
        ("syntax", "[controller\nurl = \n"),
        ("bad-url", "[controller]\nurl = \"http://ctl:80\"\n"),
        ("unicode", "log_level = \"\u{e9}t\u{e9}\"\n# \u{1f600}\n[modules]\nupper = \"a/../b\"\n"),
    ];
    seeds
        .iter()
        .map(|(name, text)| ((*name).to_owned(), text.as_bytes().to_vec()))
        .collect()
}

fn descriptor(media_type: &str, data: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: Digest::of(data).to_string(),
        size: data.len() as u64,
        artifact_type: None,
        platform: None,
        annotations: BTreeMap::new(),
    }
}

fn module_manifest_value() -> ModuleManifest {
    ModuleManifest {
        name: "tools".into(),
        version: "1.4.2".into(),
        priority: 20,
        architecture: ARCHITECTURE.into(),
        dependencies: vec!["base".into()],
        services: vec!["tools.service".into()],
        files: vec![
            FileSpec {
                path: "bin/tool".into(),
                mode: 0o755,
                size: 12_345,
            },
            FileSpec {
                path: "lib/systemd/system/tools.service".into(),
                mode: 0o644,
                size: 210,
            },
        ],
        health_check: Some(HealthCheckSpec {
            command: vec!["bin/tool".into(), "--version".into()],
            timeout_s: 10,
        }),
    }
}

/// A module's platform manifest and config blob, as `package::push` writes them.
fn module_manifest_pair() -> (Vec<u8>, Vec<u8>) {
    let config = serde_json::to_vec(&module_manifest_value()).unwrap();
    let mut layer = descriptor(LAYER_MEDIA_TYPE, b"erofs image bytes");
    let verity = format!("sha256:{}", "ab".repeat(32));
    layer
        .annotations
        .insert(FSVERITY_ANNOTATION.into(), verity.clone());
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config: descriptor(CONFIG_MEDIA_TYPE, &config),
        layers: vec![layer],
        annotations: BTreeMap::from([(FSVERITY_ANNOTATION.to_owned(), verity)]),
    };
    (serde_json::to_vec(&manifest).unwrap(), config)
}

fn indexes() -> Seeds {
    let (manifest, _) = module_manifest_pair();
    let entry = |architecture: &str| Descriptor {
        artifact_type: Some(ARTIFACT_TYPE.into()),
        platform: Some(Platform {
            architecture: architecture.into(),
            os: "linux".into(),
        }),
        ..descriptor(OCI_MANIFEST, &manifest)
    };
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(OCI_INDEX.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        manifests: vec![entry(ARCHITECTURE), entry("arm64")],
    };
    let json = |i: &ImageIndex| serde_json::to_vec(i).unwrap();
    vec![
        ("two-platforms".into(), json(&index)),
        (
            "no-platform".into(),
            json(&ImageIndex {
                manifests: vec![descriptor(OCI_MANIFEST, &manifest)],
                media_type: None,
                artifact_type: None,
                ..index.clone()
            }),
        ),
        (
            "minimal".into(),
            br#"{"schemaVersion":2,"manifests":[]}"#.to_vec(),
        ),
        ("not-an-object".into(), b"[2]".to_vec()),
    ]
}

fn manifests() -> Seeds {
    let (manifest, config) = module_manifest_pair();
    let mut resolution = manifest.clone();
    resolution.push(0);
    resolution.extend_from_slice(&config);
    let mut two_layers: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layer = two_layers["layers"][0].clone();
    two_layers["layers"].as_array_mut().unwrap().push(layer);
    vec![
        ("manifest".into(), manifest.clone()),
        ("resolution".into(), resolution),
        (
            "two-layers".into(),
            serde_json::to_vec(&two_layers).unwrap(),
        ),
        (
            "wrong-config".into(),
            [&manifest[..], b"\0", br#"{"name":"x"}"#].concat(),
        ),
    ]
}

fn module_manifests() -> Seeds {
    let full = module_manifest_value();
    let minimal = ModuleManifest {
        dependencies: Vec::new(),
        services: Vec::new(),
        files: Vec::new(),
        health_check: None,
        ..full.clone()
    };
    vec![
        ("full".into(), serde_json::to_vec_pretty(&full).unwrap()),
        ("minimal".into(), serde_json::to_vec(&minimal).unwrap()),
        (
            "unknown-field".into(),
            br#"{"name":"a","version":"1","priority":1,"architecture":"amd64","extra":1}"#.to_vec(),
        ),
    ]
}

// --- cosign -------------------------------------------------------------------------------

/// 2024-01-01T00:00:00Z: the keyless leaf is valid for ten minutes from here.
const T0: i64 = 1_704_067_200;
const IDENTITY: &str = "ci@corp.example";
const ISSUER: &str = "https://token.actions.example";
const OID_ISSUER_V2: &[u64] = &[1, 3, 6, 1, 4, 1, 57264, 1, 8];

fn ca_params(name: &str, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sigstore.example");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2040, 1, 1);
    params
}

/// A new cosign key, a root → intermediate → leaf PKI (P-256 throughout: the fuzzer checks the
/// chain on every input that gets that far, and P-256 is the cheapest to check) and a log key,
/// with one valid signature of each kind. The private keys are dropped.
fn new_cosign_fixture() -> CosignFixture {
    let (manifest, _) = module_manifest_pair();
    let manifest_digest = Digest::of(&manifest).to_string();
    let payload = cosign::payload(REPOSITORY, &manifest_digest);
    let payload_text = String::from_utf8(payload.clone()).unwrap();

    let key = SigningKey::generate().unwrap();
    let key_signature = CosignSignature {
        payload: payload_text.clone(),
        signature: key.sign(&payload).unwrap(),
        certificate: None,
        chain: None,
        bundle: None,
    };

    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let root_key = KeyPair::generate_for(alg).unwrap();
    let root_params = ca_params("fuzz fulcio root", 1);
    let root = root_params.self_signed(&root_key).unwrap();
    let mid_key = KeyPair::generate_for(alg).unwrap();
    let mid_params = ca_params("fuzz fulcio intermediate", 0);
    let mid = mid_params
        .signed_by(&mid_key, &Issuer::from_params(&root_params, &root_key))
        .unwrap();
    let leaf_key = KeyPair::generate_for(alg).unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.distinguished_name = DistinguishedName::new();
    leaf_params.subject_alt_names = vec![SanType::Rfc822Name(IDENTITY.try_into().unwrap())];
    leaf_params.is_ca = IsCa::ExplicitNoCa;
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    let mut issuer_der = vec![0x0c, ISSUER.len() as u8];
    issuer_der.extend_from_slice(ISSUER.as_bytes());
    leaf_params.custom_extensions =
        vec![CustomExtension::from_oid_content(OID_ISSUER_V2, issuer_der)];
    leaf_params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    leaf_params.not_after = rcgen::date_time_ymd(2024, 1, 1) + std::time::Duration::from_secs(600);
    let leaf = leaf_params
        .signed_by(&leaf_key, &Issuer::from_params(&mid_params, &mid_key))
        .unwrap();
    let leaf_signer = SigningKey::from_pkcs8_der(&leaf_key.serialize_der()).unwrap();
    let signature = leaf_signer.sign(&payload).unwrap();

    let rekor = SigningKey::generate().unwrap();
    let body = serde_json::json!({
        "apiVersion": "0.0.1",
        "kind": "hashedrekord",
        "spec": {
            "data": {"hash": {"algorithm": "sha256", "value": Digest::of(&payload).hex()}},
            "signature": {
                "content": signature,
                "publicKey": {"content": BASE64.encode(leaf.pem())},
            },
        },
    });
    let body = BASE64.encode(body.to_string());
    let log_id = rekor.public_key().fingerprint().to_owned();
    let logged = T0 + 60;
    let canonical = format!(
        r#"{{"body":"{body}","integratedTime":{logged},"logID":"{log_id}","logIndex":4242}}"#
    );
    let bundle = serde_json::json!({
        "SignedEntryTimestamp": rekor.sign(canonical.as_bytes()).unwrap(),
        "Payload": {"body": body, "integratedTime": logged, "logIndex": 4242, "logID": log_id},
    });
    CosignFixture {
        repository: REPOSITORY.into(),
        manifest_digest,
        now_s: (T0 + 3600) as u64,
        key_pem: key.public_key_pem(),
        roots_pem: root.pem(),
        identity: IDENTITY.into(),
        issuer: ISSUER.into(),
        rekor_pem: rekor.public_key_pem(),
        key_signature,
        keyless_signature: CosignSignature {
            payload: payload_text,
            signature,
            certificate: Some(leaf.pem()),
            chain: Some(format!("{}{}", mid.pem(), root.pem())),
            bundle: Some(bundle.to_string()),
        },
    }
}

fn signature_layers(cosign: &Cosign) -> Seeds {
    let fixture = &cosign.fixture;
    let both = [
        fixture.key_signature.clone(),
        fixture.keyless_signature.clone(),
    ];
    let seed = |signatures: &[CosignSignature], payload: &[u8]| {
        let mut bytes = cosign::signature_manifest(signatures).manifest;
        bytes.push(0);
        bytes.extend_from_slice(payload);
        bytes
    };
    let payload = fixture.key_signature.payload.as_bytes();
    vec![
        ("both".into(), seed(&both, payload)),
        ("key".into(), seed(&both[..1], payload)),
        ("keyless".into(), seed(&both[1..], payload)),
        ("none".into(), seed(&[], b"")),
        ("wrong-payload".into(), seed(&both[..1], b"{}")),
    ]
}

fn keyless_bundles(cosign: &Cosign) -> Seeds {
    let valid = &cosign.fixture.keyless_signature;
    let (certificate, chain, bundle) = (
        valid.certificate.clone().unwrap(),
        valid.chain.clone().unwrap(),
        valid.bundle.clone().unwrap(),
    );
    let join = |parts: &[&str]| parts.join("\0").into_bytes();
    let mut rekord: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    rekord["Payload"]["logIndex"] = 4243.into();
    let root_only = cosign.fixture.roots_pem.as_str();
    vec![
        ("valid".into(), join(&[&certificate, &chain, &bundle])),
        ("chain-bundle".into(), join(&[&chain, &bundle])),
        ("bundle-only".into(), join(&[&bundle])),
        ("root-chain".into(), join(&[root_only, &bundle])),
        ("bad-set".into(), join(&[&chain, &rekord.to_string()])),
        ("empty-bundle".into(), join(&[&chain, "{}"])),
    ]
}

fn node_api_bodies() -> Seeds {
    let csr = {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let params = CertificateParams::new(vec!["node".to_owned()]).unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    };
    let pick = |name: &str| {
        powernode_fuzz::node_api::BODIES
            .iter()
            .position(|b| *b == name)
            .unwrap() as u8
    };
    let seed = |name: &str, json: Vec<u8>| (name.to_owned(), [vec![pick(name)], json].concat());
    let identity = Identity {
        uuid: "6f1c2b0e-9d7a-4c1e-8f00-0123456789ab".into(),
        hostname: "node-1".into(),
        arch: "x86_64".into(),
        boot_id: "0b7e3f2a-1111-2222-3333-444455556666".into(),
    };
    let network = DesiredNetwork {
        interface: "pn0".into(),
        address: "10.77.0.2/24".into(),
        listen_port: 51820,
        peers: vec![WgPeer {
            public_key: BASE64.encode([7u8; 32]),
            endpoint: Some("198.51.100.1:51820".into()),
            allowed_ips: vec!["10.77.0.0/24".into()],
            keepalive_s: Some(25),
        }],
        network: "lab".into(),
        forwards: vec![powernode_types::node_api::PortForward {
            proto: "tcp".into(),
            port: 8080,
            to: "10.77.0.3:80".into(),
        }],
    };
    let module = DesiredModule {
        name: "tools".into(),
        reference: format!("{REPOSITORY}:1.4.2"),
        priority: 20,
    };
    vec![
        seed(
            "EnrollRequest",
            json(&EnrollRequest {
                bootstrap_token: "pn_bootstrap_0123456789".into(),
                csr_pem: csr.clone(),
                identity,
                agent_version: "0.1.0".into(),
            }),
        ),
        seed("RotateRequest", json(&RotateRequest { csr_pem: csr })),
        seed(
            "HeartbeatRequest",
            json(&HeartbeatRequest {
                boot_id: "0b7e3f2a".into(),
                agent_version: "0.1.0".into(),
                arch: Some("x86_64".into()),
                uptime_s: Some(3600),
                load: Some([0.5, 0.25, 0.125]),
                memory: Some(Memory {
                    total_bytes: 8 << 30,
                    available_bytes: 6 << 30,
                }),
                modules: vec![ModuleReport {
                    name: "tools".into(),
                    digest: Some(format!("sha256:{}", "cd".repeat(32))),
                    state: Some("Active".into()),
                    reference: Some(module.reference.clone()),
                    error: None,
                    bytes_done: Some(10),
                    bytes_total: Some(20),
                }],
                mounts: Some(serde_json::Map::from_iter([(
                    "app".to_owned(),
                    serde_json::json!({"slot": "A"}),
                )])),
                network: None,
                applied_generation: Some(7),
                enrollment: None,
            }),
        ),
        seed(
            "CreateTokenRequest",
            json(&CreateTokenRequest {
                ttl_s: Some(600),
                node_uuid: Some("6f1c2b0e".into()),
            }),
        ),
        seed(
            "SetModulesRequest",
            json(&SetModulesRequest {
                modules: vec![module.clone()],
            }),
        ),
        seed(
            "SetNetworkRequest",
            json(&SetNetworkRequest {
                network: Some(network.clone()),
            }),
        ),
        seed(
            "EnrollResponse",
            json(&EnrollResponse {
                node_id: "n-1".into(),
                cert_pem: dummy_pem("CERTIFICATE"),
                ca_chain_pem: dummy_pem("CERTIFICATE"),
                not_after_ms: 1_800_000_000_000,
            }),
        ),
        seed(
            "RotateResponse",
            json(&RotateResponse {
                cert_pem: dummy_pem("CERTIFICATE"),
                ca_chain_pem: String::new(),
                not_after_ms: 1,
            }),
        ),
        seed(
            "HeartbeatResponse",
            json(&HeartbeatResponse {
                server_time_ms: 1_700_000_000_000,
                next_interval_s: 30,
                desired: DesiredState {
                    generation: 7,
                    modules: vec![module],
                    network: Some(network),
                },
                tasks_queued: Some(2),
            }),
        ),
        (
            "malformed".into(),
            [vec![pick("HeartbeatRequest")], b"{\"boot_id\":".to_vec()].concat(),
        ),
        (
            "not-an-object".into(),
            [vec![pick("EnrollRequest")], b"[]".to_vec()].concat(),
        ),
    ]
}

/// A PEM block of `label` around a few bytes: replies carry PEM the node stores, not parses.
fn dummy_pem(label: &str) -> String {
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        BASE64.encode(b"not a real certificate")
    )
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("a body serialises")
}

/// Segments as eventd writes them: a few real records, one cut mid-record (a power cut), one
/// with a flipped byte (a bad disk), one empty, one with zeros past the end.
fn journal_segments() -> Seeds {
    use eventd::segment::frame;
    use powernode_types::node_api::EventRecord;
    let record = |seq: u64, severity: Severity, fields: Vec<(String, String)>| EventRecord {
        id: format!("{seq:032x}"),
        agent: "enrollmgr".into(),
        seq,
        severity,
        kind: "cert.rotation_failing".into(),
        message: format!("rotation failing ({seq} attempts)"),
        at_ms: 1_796_000_000_000 + seq,
        fields,
        dropped_before: seq % 3,
    };
    let mut whole = Vec::new();
    for (seq, severity) in [
        (1, Severity::Info),
        (2, Severity::Warning),
        (3, Severity::Error),
        (4, Severity::Critical),
    ] {
        let fields = vec![("attempts".to_owned(), seq.to_string())];
        let payload = postcard::to_stdvec(&record(seq, severity, fields)).unwrap();
        frame(&mut whole, &payload).unwrap();
    }
    let torn = whole[..whole.len() - 5].to_vec();
    let mut flipped = whole.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let zeros = [whole.clone(), vec![0; 16]].concat();
    let mut not_a_record = Vec::new();
    frame(&mut not_a_record, b"not postcard").unwrap();
    vec![
        ("four".to_owned(), whole),
        ("torn".to_owned(), torn),
        ("flipped".to_owned(), flipped),
        ("zeros".to_owned(), zeros),
        ("empty".to_owned(), Vec::new()),
        ("not-a-record".to_owned(), not_a_record),
    ]
}
