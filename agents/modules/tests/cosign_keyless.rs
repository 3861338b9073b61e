//! Keyless cosign signatures: a test Fulcio-like PKI (root, intermediate, leaf with an email SAN
//! and the OIDC issuer extension) and a test Rekor key; one valid signature, then each forgery
//! a keyless verifier must refuse, and a real Fulcio/Rekor signature from 2021.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use powernode_modules::cosign::{
    self, CosignSignature, Error, KeylessRoot, Policy, PublicKey, Rejection, SigningKey, Verified,
};
use powernode_modules::digest::Digest;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

const REPOSITORY: &str = "registry.example/modules/tools";
const IDENTITY: &str = "ci@corp.example";
const ISSUER: &str = "https://token.actions.example";
/// 2024-01-01T00:00:00Z; test leaves are valid for ten minutes from here.
const T0: i64 = 1_704_067_200;
const LEAF_LIFETIME: Duration = Duration::from_secs(600);
/// When the test log "integrated" the entries: a minute into the leaf's life.
const LOGGED: i64 = T0 + 60;
const OID_ISSUER_V1: &[u64] = &[1, 3, 6, 1, 4, 1, 57264, 1, 1];
const OID_ISSUER_V2: &[u64] = &[1, 3, 6, 1, 4, 1, 57264, 1, 8];

fn digest(byte: u8) -> String {
    format!("sha256:{}", format!("{byte:02x}").repeat(32))
}

/// A CA: its parameters and key (to issue with) and its certificate.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str, parent: Option<&Ca>, path_len: Option<u8>) -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "sigstore.example");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(path_len.map_or(
        BasicConstraints::Unconstrained,
        BasicConstraints::Constrained,
    ));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2040, 1, 1);
    let certificate = match parent {
        None => params.self_signed(&key),
        Some(parent) => params.signed_by(&key, &Issuer::from_params(&parent.params, &parent.key)),
    }
    .unwrap();
    Ca {
        pem: certificate.pem(),
        params,
        key,
    }
}

/// What goes into a leaf's OIDC issuer extensions.
#[derive(Clone, Copy)]
enum OidcIssuer<'a> {
    V2(&'a str),
    V1(&'a str),
}

/// A leaf certificate and its key, as the verifier's signing key and as rcgen's.
struct Leaf {
    pem: String,
    key: SigningKey,
    pair: KeyPair,
}

/// A Fulcio-like leaf issued by `issuer` for `email`, valid from T0 for ten minutes.
fn leaf(issuer: &Ca, email: &str, oidc: OidcIssuer<'_>) -> Leaf {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::Rfc822Name(email.try_into().unwrap())];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    params.custom_extensions = vec![match oidc {
        OidcIssuer::V2(url) => {
            let mut der = vec![0x0c, u8::try_from(url.len()).unwrap()];
            der.extend_from_slice(url.as_bytes());
            CustomExtension::from_oid_content(OID_ISSUER_V2, der)
        }
        OidcIssuer::V1(url) => {
            CustomExtension::from_oid_content(OID_ISSUER_V1, url.as_bytes().to_vec())
        }
    }];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2024, 1, 1) + LEAF_LIFETIME;
    let certificate = params
        .signed_by(&key, &Issuer::from_params(&issuer.params, &issuer.key))
        .unwrap();
    Leaf {
        pem: certificate.pem(),
        key: SigningKey::from_pkcs8_der(&key.serialize_der()).unwrap(),
        pair: key,
    }
}

/// A Rekor bundle for a hashedrekord entry recording `payload_sha256` (hex), `signature`
/// (base64) and `certificate_pem`, integrated at `integrated_time`, signed by `log`. The
/// canonical JSON is written out by hand here, independently of the verifier's.
fn bundle(
    log: &SigningKey,
    payload_sha256: &str,
    signature: &str,
    certificate_pem: &str,
    integrated_time: i64,
) -> String {
    let body = serde_json::json!({
        "apiVersion": "0.0.1",
        "kind": "hashedrekord",
        "spec": {
            "data": {"hash": {"algorithm": "sha256", "value": payload_sha256}},
            "signature": {
                "content": signature,
                "publicKey": {"content": BASE64.encode(certificate_pem)},
            },
        },
    });
    let body = BASE64.encode(body.to_string());
    let log_id = log.public_key().fingerprint();
    let canonical = format!(
        r#"{{"body":"{body}","integratedTime":{integrated_time},"logID":"{log_id}","logIndex":4242}}"#
    );
    serde_json::json!({
        "SignedEntryTimestamp": log.sign(canonical.as_bytes()).unwrap(),
        "Payload": {
            "body": body,
            "integratedTime": integrated_time,
            "logIndex": 4242,
            "logID": log_id,
        },
    })
    .to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Digest::of(bytes).hex().to_owned()
}

/// The test PKI and log, and a leaf issued to `IDENTITY` through `ISSUER`.
struct World {
    root: Ca,
    intermediate: Ca,
    rekor: SigningKey,
    leaf: Leaf,
}

impl World {
    fn new() -> World {
        let root = ca("test fulcio root", None, Some(1));
        let intermediate = ca("test fulcio intermediate", Some(&root), Some(0));
        let leaf = leaf(&intermediate, IDENTITY, OidcIssuer::V2(ISSUER));
        World {
            root,
            intermediate,
            rekor: SigningKey::generate().unwrap(),
            leaf,
        }
    }

    fn policy_for(&self, identity: &str, issuer: &str) -> Policy {
        Policy {
            keys: Vec::new(),
            keyless: Some(
                KeylessRoot::new(
                    &self.root.pem,
                    identity,
                    issuer,
                    vec![self.rekor.public_key().clone()],
                )
                .unwrap(),
            ),
            require_signature: true,
            signed_references: Vec::new(),
        }
    }

    fn policy(&self) -> Policy {
        self.policy_for(r"^ci@corp\.example$", r"^https://token\.actions\.example$")
    }

    /// The chain annotation as cosign writes it: intermediates, then the root.
    fn chain(&self) -> String {
        format!("{}{}", self.intermediate.pem, self.root.pem)
    }

    /// A complete, valid keyless signature over `payload` by `leaf`.
    fn sign_with(&self, payload: &[u8], leaf: &Leaf) -> CosignSignature {
        let signature = leaf.key.sign(payload).unwrap();
        CosignSignature {
            payload: String::from_utf8(payload.to_vec()).unwrap(),
            bundle: Some(bundle(
                &self.rekor,
                &sha256_hex(payload),
                &signature,
                &leaf.pem,
                LOGGED,
            )),
            signature,
            certificate: Some(leaf.pem.clone()),
            chain: Some(self.chain()),
        }
    }

    fn sign(&self, payload: &[u8]) -> CosignSignature {
        self.sign_with(payload, &self.leaf)
    }
}

fn payload() -> Vec<u8> {
    cosign::payload(REPOSITORY, &digest(1))
}

fn verify(policy: &Policy, signature: &CosignSignature) -> Result<Verified, Error> {
    cosign::verify(
        policy,
        REPOSITORY,
        &digest(1),
        std::slice::from_ref(signature),
        SystemTime::now(),
    )
}

/// The one reason the one signature was refused.
fn rejection(result: Result<Verified, Error>) -> Rejection {
    match result {
        Err(Error::Rejected(mut rejected)) if rejected.len() == 1 => rejected.remove(0).reason,
        other => panic!("expected one rejected signature, got {other:?}"),
    }
}

#[test]
fn valid_keyless_signature_is_accepted() {
    let world = World::new();
    let verified = verify(&world.policy(), &world.sign(&payload())).unwrap();
    assert_eq!(
        verified,
        Verified::Keyless {
            identity: IDENTITY.into(),
            issuer: ISSUER.into()
        }
    );
    assert_eq!(
        verified.to_string(),
        format!("keyless {IDENTITY} ({ISSUER})")
    );
}

#[test]
fn issuer_from_the_deprecated_extension_is_accepted() {
    let world = World::new();
    let v1 = leaf(&world.intermediate, IDENTITY, OidcIssuer::V1(ISSUER));
    let verified = verify(&world.policy(), &world.sign_with(&payload(), &v1)).unwrap();
    assert!(matches!(verified, Verified::Keyless { issuer, .. } if issuer == ISSUER));
}

#[test]
fn forgery_garbage_signature_beside_a_valid_certificate_and_bundle() {
    let world = World::new();
    let mut forged = world.sign(&payload());
    forged.signature = BASE64.encode([0x30u8; 70]);
    assert_eq!(
        rejection(verify(&world.policy(), &forged)),
        Rejection::CertificateSignature
    );

    // A well-formed signature by another key fares no better.
    forged.signature = SigningKey::generate().unwrap().sign(&payload()).unwrap();
    let reason = rejection(verify(&world.policy(), &forged));
    assert_eq!(reason, Rejection::CertificateSignature);
    assert_eq!(
        reason.to_string(),
        "the signature does not verify with the certificate's key"
    );
}

#[test]
fn forgery_valid_bundle_for_another_artifact() {
    let world = World::new();
    let mut forged = world.sign(&payload());
    let other = world.sign(&cosign::payload(REPOSITORY, &digest(2)));
    forged.bundle = other.bundle;
    let reason = rejection(verify(&world.policy(), &forged));
    assert!(
        matches!(&reason, Rejection::Unbound(why) if why.contains("not this payload")),
        "{reason}"
    );
    assert!(reason
        .to_string()
        .starts_with("the bundle's log entry is not for this signature"));
}

#[test]
fn forgery_valid_bundle_recording_another_signature_or_certificate() {
    let world = World::new();
    let genuine = world.sign(&payload());
    // ECDSA signatures are randomised: a second signature of the same payload differs.
    let mut forged = genuine.clone();
    forged.signature = world.leaf.key.sign(&payload()).unwrap();
    let reason = rejection(verify(&world.policy(), &forged));
    assert!(
        matches!(&reason, Rejection::Unbound(why) if why.contains("different signature")),
        "{reason}"
    );

    // Same identity, another certificate: the log entry names the other one.
    let twin = leaf(&world.intermediate, IDENTITY, OidcIssuer::V2(ISSUER));
    let mut forged = world.sign_with(&payload(), &twin);
    forged.bundle = Some(bundle(
        &world.rekor,
        &sha256_hex(&payload()),
        &forged.signature,
        &world.leaf.pem,
        LOGGED,
    ));
    let reason = rejection(verify(&world.policy(), &forged));
    assert!(
        matches!(&reason, Rejection::Unbound(why) if why.contains("different certificate")),
        "{reason}"
    );
}

#[test]
fn forgery_identity_does_not_match() {
    let world = World::new();
    let policy = world.policy_for(r"^ops@corp\.example$", ".*");
    let reason = rejection(verify(&policy, &world.sign(&payload())));
    assert_eq!(
        reason.to_string(),
        r"certificate SAN ci@corp.example does not match identity ^ops@corp\.example$"
    );
    assert!(matches!(reason, Rejection::Identity { .. }));
}

#[test]
fn forgery_issuer_does_not_match() {
    let world = World::new();
    let policy = world.policy_for(".*", r"^https://accounts\.example$");
    let reason = rejection(verify(&policy, &world.sign(&payload())));
    assert_eq!(
        reason,
        Rejection::Issuer {
            issuer: ISSUER.into(),
            pattern: r"^https://accounts\.example$".into()
        }
    );
}

#[test]
fn forgery_leaf_from_an_untrusted_ca() {
    let world = World::new();
    // An unrelated CA, its chain in the annotation.
    let evil_root = ca("evil root", None, None);
    let mut forged = world.sign_with(
        &payload(),
        &leaf(&evil_root, IDENTITY, OidcIssuer::V2(ISSUER)),
    );
    forged.chain = Some(evil_root.pem.clone());
    let reason = rejection(verify(&world.policy(), &forged));
    assert!(
        matches!(&reason, Rejection::Chain(why) if why.contains("no trusted root")),
        "{reason}"
    );

    // An intermediate that chains to that CA, not to ours.
    let stray = ca("test fulcio intermediate", Some(&evil_root), Some(0));
    let mut forged = world.sign_with(&payload(), &leaf(&stray, IDENTITY, OidcIssuer::V2(ISSUER)));
    forged.chain = Some(format!("{}{}", stray.pem, evil_root.pem));
    let reason = rejection(verify(&world.policy(), &forged));
    assert!(
        matches!(&reason, Rejection::Chain(why) if why.contains("evil root")),
        "{reason}"
    );

    // An impostor with our root's exact name.
    let impostor = ca("test fulcio root", None, Some(1));
    let mut forged = world.sign_with(
        &payload(),
        &leaf(&impostor, IDENTITY, OidcIssuer::V2(ISSUER)),
    );
    forged.chain = Some(impostor.pem.clone());
    let reason = rejection(verify(&world.policy(), &forged));
    assert!(
        matches!(&reason, Rejection::Chain(why) if why.contains("does not verify")),
        "{reason}"
    );
}

#[test]
fn chain_must_reach_a_policy_root_through_real_cas() {
    let world = World::new();
    // Without the intermediate the leaf's issuer is unknown.
    let mut signature = world.sign(&payload());
    signature.chain = None;
    assert!(matches!(
        rejection(verify(&world.policy(), &signature)),
        Rejection::Chain(_)
    ));

    // A root that allows no intermediates below it.
    let strict_root = ca("strict root", None, Some(0));
    let intermediate = ca("under strict root", Some(&strict_root), None);
    let mut signature = world.sign_with(
        &payload(),
        &leaf(&intermediate, IDENTITY, OidcIssuer::V2(ISSUER)),
    );
    signature.chain = Some(intermediate.pem.clone());
    let policy = Policy {
        keyless: Some(
            KeylessRoot::new(
                &strict_root.pem,
                ".*",
                ".*",
                vec![world.rekor.public_key().clone()],
            )
            .unwrap(),
        ),
        ..world.policy()
    };
    let reason = rejection(verify(&policy, &signature));
    assert!(
        matches!(&reason, Rejection::Chain(why) if why.contains("allows 0 intermediates")),
        "{reason}"
    );

    // A leaf cannot act as a CA for another leaf.
    let leaf_as_ca = Ca {
        pem: world.leaf.pem.clone(),
        // Fulcio leaves have an empty subject: so does this "CA".
        params: {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = DistinguishedName::new();
            params
        },
        key: KeyPair::try_from(world.leaf.pair.serialize_der().as_slice()).unwrap(),
    };
    let mut signature = world.sign_with(
        &payload(),
        &leaf(&leaf_as_ca, IDENTITY, OidcIssuer::V2(ISSUER)),
    );
    signature.chain = Some(format!("{}{}", world.leaf.pem, world.chain()));
    let reason = rejection(verify(&world.policy(), &signature));
    assert!(
        matches!(&reason, Rejection::Chain(why) if why.contains("is not a CA")),
        "{reason}"
    );
}

#[test]
fn forgery_integrated_time_outside_the_certificate_validity() {
    let world = World::new();
    for integrated_time in [T0 - 60, T0 + 3600] {
        let mut signature = world.sign(&payload());
        signature.bundle = Some(bundle(
            &world.rekor,
            &sha256_hex(&payload()),
            &signature.signature,
            &world.leaf.pem,
            integrated_time,
        ));
        let reason = rejection(verify(&world.policy(), &signature));
        assert!(
            matches!(reason, Rejection::OutsideValidity { .. }),
            "{reason}"
        );
    }
    let mut signature = world.sign(&payload());
    signature.bundle = Some(bundle(
        &world.rekor,
        &sha256_hex(&payload()),
        &signature.signature,
        &world.leaf.pem,
        T0 + 3600,
    ));
    assert_eq!(
        rejection(verify(&world.policy(), &signature)).to_string(),
        "integrated time 2024-01-01T01:00:00Z is outside the certificate's validity \
         (2024-01-01T00:00:00Z to 2024-01-01T00:10:00Z)"
    );
}

#[test]
fn entry_logged_in_our_future_is_refused() {
    let world = World::new();
    let an_hour_before = UNIX_EPOCH + Duration::from_secs((LOGGED - 3600) as u64);
    let result = cosign::verify(
        &world.policy(),
        REPOSITORY,
        &digest(1),
        &[world.sign(&payload())],
        an_hour_before,
    );
    assert!(matches!(rejection(result), Rejection::FutureEntry(_)));
}

#[test]
fn forgery_tampered_set() {
    let world = World::new();
    let genuine = world.sign(&payload());
    let mut bundle: serde_json::Value =
        serde_json::from_str(genuine.bundle.as_deref().unwrap()).unwrap();

    // Another time inside the validity, without the log's signature over it.
    let mut moved = bundle.clone();
    moved["Payload"]["integratedTime"] = serde_json::json!(LOGGED + 1);
    let mut forged = genuine.clone();
    forged.bundle = Some(moved.to_string());
    assert!(matches!(
        rejection(verify(&world.policy(), &forged)),
        Rejection::BadSet(_)
    ));

    // A flipped bit in the SET itself.
    let mut set = BASE64
        .decode(bundle["SignedEntryTimestamp"].as_str().unwrap())
        .unwrap();
    let last = set.len() - 1;
    set[last] ^= 1;
    bundle["SignedEntryTimestamp"] = serde_json::json!(BASE64.encode(set));
    let mut forged = genuine.clone();
    forged.bundle = Some(bundle.to_string());
    assert!(matches!(
        rejection(verify(&world.policy(), &forged)),
        Rejection::BadSet(_)
    ));
}

#[test]
fn bundle_from_an_untrusted_log_or_no_bundle() {
    let world = World::new();
    let mut signature = world.sign(&payload());
    let other_log = SigningKey::generate().unwrap();
    signature.bundle = Some(bundle(
        &other_log,
        &sha256_hex(&payload()),
        &signature.signature,
        &world.leaf.pem,
        LOGGED,
    ));
    let reason = rejection(verify(&world.policy(), &signature));
    assert!(matches!(reason, Rejection::UnknownLog { .. }), "{reason}");

    signature.bundle = None;
    assert_eq!(
        rejection(verify(&world.policy(), &signature)),
        Rejection::NoBundle
    );
}

#[test]
fn payload_claims_still_apply_to_keyless_signatures() {
    let world = World::new();
    let signature = world.sign(&cosign::payload(REPOSITORY, &digest(7)));
    assert!(matches!(
        rejection(verify(&world.policy(), &signature)),
        Rejection::PayloadDigest { .. }
    ));
}

#[test]
fn policy_kinds_and_signature_kinds_must_meet() {
    let world = World::new();
    let keyless_signature = world.sign(&payload());
    let key = SigningKey::generate().unwrap();
    let key_signature = CosignSignature {
        payload: String::from_utf8(payload()).unwrap(),
        signature: key.sign(&payload()).unwrap(),
        certificate: None,
        chain: None,
        bundle: None,
    };
    let keys_only = Policy {
        keys: vec![key.public_key().clone()],
        keyless: None,
        require_signature: true,
        signed_references: Vec::new(),
    };
    assert!(matches!(
        rejection(verify(&keys_only, &keyless_signature)),
        Rejection::UntrustedKey { .. }
    ));
    let nobody = Policy {
        require_signature: true,
        ..Policy::default()
    };
    assert_eq!(
        rejection(verify(&nobody, &keyless_signature)),
        Rejection::NothingTrusted
    );
    let keyless_only = world.policy();
    assert_eq!(
        rejection(verify(&keyless_only, &key_signature)),
        Rejection::NoCertificate
    );
    // Both kinds trusted: a key signature and a keyless one each pass; a failing keyless one
    // reports both reasons.
    let both = Policy {
        keys: vec![key.public_key().clone()],
        ..world.policy()
    };
    assert!(verify(&both, &key_signature).is_ok());
    assert!(matches!(
        verify(&both, &keyless_signature),
        Ok(Verified::Keyless { .. })
    ));
    let mut forged = keyless_signature.clone();
    forged.signature = BASE64.encode([1u8; 64]);
    let reason = rejection(verify(&both, &forged));
    assert!(matches!(reason, Rejection::Both { .. }), "{reason}");
    assert!(
        reason
            .to_string()
            .contains("; as a keyless signature: the signature does not verify"),
        "{reason}"
    );
}

#[test]
fn keyless_root_refuses_unusable_configuration() {
    let world = World::new();
    let rekor = vec![world.rekor.public_key().clone()];
    assert!(matches!(
        KeylessRoot::new("", ".*", ".*", rekor.clone()),
        Err(Error::TrustRoot(_))
    ));
    assert!(matches!(
        KeylessRoot::new(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            ".*",
            ".*",
            rekor.clone()
        ),
        Err(Error::TrustRoot(_))
    ));
    assert!(matches!(
        KeylessRoot::new(&world.root.pem, "(", ".*", rekor.clone()),
        Err(Error::Regex {
            what: "identity",
            ..
        })
    ));
    assert!(matches!(
        KeylessRoot::new(&world.root.pem, ".*", "[", rekor),
        Err(Error::Regex { what: "issuer", .. })
    ));
    assert!(matches!(
        KeylessRoot::new(&world.root.pem, ".*", ".*", Vec::new()),
        Err(Error::TrustRoot(_))
    ));
}

#[test]
fn mangled_keyless_fields_are_errors_not_panics() {
    let world = World::new();
    let policy = world.policy();
    let genuine = world.sign(&payload());
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    for round in 0..400 {
        let mut signature = genuine.clone();
        let field = match round % 4 {
            0 => signature.certificate.as_mut().unwrap(),
            1 => signature.chain.as_mut().unwrap(),
            2 => signature.bundle.as_mut().unwrap(),
            _ => &mut signature.signature,
        };
        let mut bytes = std::mem::take(field).into_bytes();
        if next(3) == 0 {
            bytes.truncate(next(bytes.len() + 1));
        } else {
            for _ in 0..=next(4) {
                let at = next(bytes.len());
                bytes[at] = b"AZaz09+/=-{}\":,\n x"[next(18)];
            }
        }
        *field = String::from_utf8(bytes).unwrap();
        // Any outcome but a panic.
        let _ = verify(&policy, &signature);
    }
}

/// A real keyless signature: Fulcio's 2021 root, a leaf issued to flavio@castelli.me, Rekor's
/// production key and bundle; from sigstore-rs's test data. Certificates of that time carry no
/// OIDC issuer extension, so the one thing that fails is that check: every cryptographic check
/// before it (signature, chain, SET, entry binding, validity) passed on real data.
const REAL_FULCIO_ROOT: &str = "-----BEGIN CERTIFICATE-----
MIIB+DCCAX6gAwIBAgITNVkDZoCiofPDsy7dfm6geLbuhzAKBggqhkjOPQQDAzAq
MRUwEwYDVQQKEwxzaWdzdG9yZS5kZXYxETAPBgNVBAMTCHNpZ3N0b3JlMB4XDTIx
MDMwNzAzMjAyOVoXDTMxMDIyMzAzMjAyOVowKjEVMBMGA1UEChMMc2lnc3RvcmUu
ZGV2MREwDwYDVQQDEwhzaWdzdG9yZTB2MBAGByqGSM49AgEGBSuBBAAiA2IABLSy
A7Ii5k+pNO8ZEWY0ylemWDowOkNa3kL+GZE5Z5GWehL9/A9bRNA3RbrsZ5i0Jcas
taRL7Sp5fp/jD5dxqc/UdTVnlvS16an+2Yfswe/QuLolRUCrcOE2+2iA5+tzd6Nm
MGQwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwHQYDVR0OBBYE
FMjFHQBBmiQpMlEk6w2uSu1KBtPsMB8GA1UdIwQYMBaAFMjFHQBBmiQpMlEk6w2u
Su1KBtPsMAoGCCqGSM49BAMDA2gAMGUCMH8liWJfMui6vXXBhjDgY4MwslmN/TJx
Ve/83WrFomwmNf056y1X48F9c4m3a3ozXAIxAKjRay5/aj/jsKKGIkmQatjI8uup
Hr/+CxFvaJWmpYqNkLDGRU+9orzh5hI2RrcuaQ==
-----END CERTIFICATE-----";
const REAL_REKOR_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G2Y+2tabdTV5BcGiBIx0a9fAFwr
kBbmLSGtks4L3qX6yYY0zufBnhC8Ur/iy55GhWP/9A/bY2LhC30M9+RYtw==
-----END PUBLIC KEY-----";
const REAL_LEAF: &str = "-----BEGIN CERTIFICATE-----
MIICdzCCAfygAwIBAgITA+PsaKjaEZqn7IY94b1e/jJnizAKBggqhkjOPQQDAzAq
MRUwEwYDVQQKEwxzaWdzdG9yZS5kZXYxETAPBgNVBAMTCHNpZ3N0b3JlMB4XDTIx
MTAyMDA3MjUxNloXDTIxMTAyMDA3NDUxNVowADBZMBMGByqGSM49AgEGCCqGSM49
AwEHA0IABINewQBS1f4AmNIENdL+U/HJotMSM7ZNnkTnYefxwV9TErpvnAZ0+DzL
yfAAVaeJtKjFvbOTb8F1yhJFU0XY+RijggEpMIIBJTAOBgNVHQ8BAf8EBAMCB4Aw
EwYDVR0lBAwwCgYIKwYBBQUHAwMwDAYDVR0TAQH/BAIwADAdBgNVHQ4EFgQUMf1R
MMsqNFBrWbx8mRNdxOkEEYswHwYDVR0jBBgwFoAUyMUdAEGaJCkyUSTrDa5K7UoG
0+wwgY0GCCsGAQUFBwEBBIGAMH4wfAYIKwYBBQUHMAKGcGh0dHA6Ly9wcml2YXRl
Y2EtY29udGVudC02MDNmZTdlNy0wMDAwLTIyMjctYmY3NS1mNGY1ZTgwZDI5NTQu
c3RvcmFnZS5nb29nbGVhcGlzLmNvbS9jYTM2YTFlOTYyNDJiOWZjYjE0Ni9jYS5j
cnQwIAYDVR0RAQH/BBYwFIESZmxhdmlvQGNhc3RlbGxpLm1lMAoGCCqGSM49BAMD
A2kAMGYCMQC3Y2ulPTsPmNS4czaKeje0BnOQHz5e6NBX0Bqx9Xca+t2kOi17sopc
/v/xH1xLuPoCMQDKND4WjHfKqXXOeUvZ9A96DqrEwGaqGMtnIuN4JzZYaULZrx9g
oXqqo/C9QnOHTto=
-----END CERTIFICATE-----";
const REAL_SIGNATURE: &str =
    "MEUCIGqWScz7s9aP2sGXNFKeqivw3B6kPRs56AITIHnvd5igAiEA1kzbaV2Y5yPE81EN92NUFOl31LLJSvwsjFQ07m2XqaA=";
const REAL_SET: &str =
    "MEUCIDBGJijj2FqU25yRWzlEWHqE64XKwUvychBs1bSM1PaKAiEAwcR2u81c42TLBk3lWJqhtB7SnM7Lh0OYEl6Bfa7ZA4s=";
const REAL_BODY: &str = concat!(
    "eyJhcGlWZXJzaW9uIjoiMC4wLjEiLCJraW5kIjoicmVrb3JkIiwic3BlYyI6eyJkYXRhIjp7Imhhc2giOnsiYWxn",
    "b3JpdGhtIjoic2hhMjU2IiwidmFsdWUiOiJlNzgwMWRlOTM1NTEyZTIyYjIzN2M3YjU3ZTQyY2E0ZDIwZTIxMzRi",
    "ZGYxYjk4Zjk3NmM4ZjU1ZDljZmU0MDY3In19LCJzaWduYXR1cmUiOnsiY29udGVudCI6Ik1FVUNJR3FXU2N6N3M5",
    "YVAyc0dYTkZLZXFpdnczQjZrUFJzNTZBSVRJSG52ZDVpZ0FpRUExa3piYVYyWTV5UEU4MUVOOTJOVUZPbDMxTExK",
    "U3Z3c2pGUTA3bTJYcWFBPSIsImZvcm1hdCI6Ing1MDkiLCJwdWJsaWNLZXkiOnsiY29udGVudCI6IkxTMHRMUzFD",
    "UlVkSlRpQkRSVkpVU1VaSlEwRlVSUzB0TFMwdENrMUpTVU5rZWtORFFXWjVaMEYzU1VKQlowbFVRU3RRYzJGTGFt",
    "RkZXbkZ1TjBsWk9UUmlNV1V2YWtwdWFYcEJTMEpuWjNGb2EycFBVRkZSUkVGNlFYRUtUVkpWZDBWM1dVUldVVkZM",
    "UlhkNGVtRlhaSHBrUnpsNVdsTTFhMXBZV1hoRlZFRlFRbWRPVmtKQlRWUkRTRTV3V2pOT01HSXpTbXhOUWpSWVJG",
    "UkplQXBOVkVGNVRVUkJNMDFxVlhoT2JHOVlSRlJKZUUxVVFYbE5SRUV6VGtSVmVFNVdiM2RCUkVKYVRVSk5SMEo1",
    "Y1VkVFRUUTVRV2RGUjBORGNVZFRUVFE1Q2tGM1JVaEJNRWxCUWtsT1pYZFJRbE14WmpSQmJVNUpSVTVrVEN0Vkww",
    "aEtiM1JOVTAwM1drNXVhMVJ1V1dWbWVIZFdPVlJGY25CMmJrRmFNQ3RFZWt3S2VXWkJRVlpoWlVwMFMycEdkbUpQ",
    "VkdJNFJqRjVhRXBHVlRCWVdTdFNhV3BuWjBWd1RVbEpRa3BVUVU5Q1owNVdTRkU0UWtGbU9FVkNRVTFEUWpSQmR3",
    "cEZkMWxFVmxJd2JFSkJkM2REWjFsSlMzZFpRa0pSVlVoQmQwMTNSRUZaUkZaU01GUkJVVWd2UWtGSmQwRkVRV1JD",
    "WjA1V1NGRTBSVVpuVVZWTlpqRlNDazFOYzNGT1JrSnlWMko0T0cxU1RtUjRUMnRGUlZsemQwaDNXVVJXVWpCcVFr",
    "Sm5kMFp2UVZWNVRWVmtRVVZIWVVwRGEzbFZVMVJ5UkdFMVN6ZFZiMGNLTUN0M2QyZFpNRWREUTNOSFFWRlZSa0oz",
    "UlVKQ1NVZEJUVWcwZDJaQldVbExkMWxDUWxGVlNFMUJTMGRqUjJnd1pFaEJOa3g1T1hkamJXd3lXVmhTYkFwWk1r",
    "VjBXVEk1ZFdSSFZuVmtRekF5VFVST2JWcFVaR3hPZVRCM1RVUkJkMHhVU1hsTmFtTjBXVzFaTTA1VE1XMU9SMWt4",
    "V2xSbmQxcEVTVFZPVkZGMUNtTXpVblpqYlVadVdsTTFibUl5T1c1aVIxWm9ZMGRzZWt4dFRuWmlVemxxV1ZSTk1s",
    "bFVSbXhQVkZsNVRrUkthVTlYV21wWmFrVXdUbWs1YWxsVE5Xb0tZMjVSZDBsQldVUldVakJTUVZGSUwwSkNXWGRH",
    "U1VWVFdtMTRhR1J0YkhaUlIwNW9Zek5TYkdKSGVIQk1iVEZzVFVGdlIwTkRjVWRUVFRRNVFrRk5SQXBCTW10QlRV",
    "ZFpRMDFSUXpOWk1uVnNVRlJ6VUcxT1V6UmplbUZMWldwbE1FSnVUMUZJZWpWbE5rNUNXREJDY1hnNVdHTmhLM1F5",
    "YTA5cE1UZHpiM0JqQ2k5MkwzaElNWGhNZFZCdlEwMVJSRXRPUkRSWGFraG1TM0ZZV0U5bFZYWmFPVUU1TmtSeGNr",
    "VjNSMkZ4UjAxMGJrbDFUalJLZWxwWllWVk1Xbko0T1djS2IxaHhjVzh2UXpsUmJrOUlWSFJ2UFFvdExTMHRMVVZP",
    "UkNCRFJWSlVTVVpKUTBGVVJTMHRMUzB0Q2c9PSJ9fX19",
);
const REAL_REPOSITORY: &str = "registry-testing.svc.lan/kubewarden/disallow-service-nodeport";
const REAL_DIGEST: &str = "sha256:5f481572d088dc4023afb35fced9530ced3d9b03bf7299c6f492163cb9f0452e";

#[test]
fn real_fulcio_and_rekor_signature_passes_every_cryptographic_check() {
    let bundle = serde_json::json!({
        "SignedEntryTimestamp": REAL_SET,
        "Payload": {
            "body": REAL_BODY,
            "integratedTime": 1_634_714_717,
            "logIndex": 783_607,
            "logID": "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d",
        },
    });
    let rekor = PublicKey::from_pem(REAL_REKOR_KEY).unwrap();
    assert_eq!(
        rekor.fingerprint(),
        "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d"
    );
    let policy = Policy {
        keys: Vec::new(),
        keyless: Some(
            KeylessRoot::new(
                REAL_FULCIO_ROOT,
                r"^flavio@castelli\.me$",
                ".*",
                vec![rekor],
            )
            .unwrap(),
        ),
        require_signature: true,
        signed_references: Vec::new(),
    };
    let mut signature = CosignSignature {
        payload: String::from_utf8(cosign::payload(REAL_REPOSITORY, REAL_DIGEST)).unwrap(),
        signature: REAL_SIGNATURE.into(),
        certificate: Some(REAL_LEAF.into()),
        chain: None,
        bundle: Some(bundle.to_string()),
    };
    let check = |signature: &CosignSignature| {
        cosign::verify(
            &policy,
            REAL_REPOSITORY,
            REAL_DIGEST,
            std::slice::from_ref(signature),
            SystemTime::now(),
        )
    };
    assert_eq!(rejection(check(&signature)), Rejection::NoIssuer);

    // And each real check does bite on this real data.
    signature.payload = signature.payload.replace("nodeport", "n0deport");
    assert_eq!(
        rejection(check(&signature)),
        Rejection::CertificateSignature
    );
}

/// `cosign::sign` with the world's leaf key, its certificate and chain, and the world's log
/// key, at the time the test log integrates entries.
fn sign_with_certificate(world: &World) -> CosignSignature {
    let certificate =
        cosign::SigningCertificate::new(&world.leaf.key, &world.leaf.pem, Some(&world.chain()))
            .unwrap();
    let signer = cosign::Signer {
        key: &world.leaf.key,
        certificate: Some(&certificate),
        log: Some(&world.rekor),
    };
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(LOGGED).unwrap());
    cosign::sign(&signer, REPOSITORY, &digest(1), at).unwrap()
}

#[test]
fn a_signature_made_with_a_certificate_and_a_log_key_is_what_the_verifier_checks() {
    let world = World::new();
    let signature = sign_with_certificate(&world);
    assert_eq!(signature.payload.as_bytes(), payload());
    assert_eq!(
        signature.certificate.as_deref(),
        Some(world.leaf.pem.as_str())
    );
    assert_eq!(signature.chain, Some(world.chain()));
    // The bundle, read independently of the verifier: the entry records this payload, this
    // signature and this certificate, and the SET is the log key's over the canonical JSON
    // written out by hand.
    let bundle: serde_json::Value =
        serde_json::from_str(signature.bundle.as_deref().unwrap()).unwrap();
    let body = bundle["Payload"]["body"].as_str().unwrap();
    let entry: serde_json::Value = serde_json::from_slice(&BASE64.decode(body).unwrap()).unwrap();
    assert_eq!(
        entry,
        serde_json::json!({
            "apiVersion": "0.0.1",
            "kind": "hashedrekord",
            "spec": {
                "data": {"hash": {"algorithm": "sha256", "value": sha256_hex(&payload())}},
                "signature": {
                    "content": signature.signature,
                    "publicKey": {"content": BASE64.encode(&world.leaf.pem)},
                },
            },
        })
    );
    let log_id = world.rekor.public_key().fingerprint();
    assert_eq!(bundle["Payload"]["logID"], log_id);
    assert_eq!(bundle["Payload"]["integratedTime"], LOGGED);
    let canonical =
        format!(r#"{{"body":"{body}","integratedTime":{LOGGED},"logID":"{log_id}","logIndex":0}}"#);
    let set = BASE64
        .decode(bundle["SignedEntryTimestamp"].as_str().unwrap())
        .unwrap();
    assert!(world
        .rekor
        .public_key()
        .verifies(canonical.as_bytes(), &set));

    assert_eq!(
        verify(&world.policy(), &signature).unwrap(),
        Verified::Keyless {
            identity: IDENTITY.into(),
            issuer: ISSUER.into()
        }
    );
    // Refused for another identity, another issuer, another log.
    assert!(matches!(
        rejection(verify(
            &world.policy_for(r"^release@corp\.example$", ".*"),
            &signature
        )),
        Rejection::Identity { .. }
    ));
    assert!(matches!(
        rejection(verify(
            &world.policy_for(".*", r"^https://accounts\.example$"),
            &signature
        )),
        Rejection::Issuer { .. }
    ));
    let other_log = Policy {
        keyless: Some(
            KeylessRoot::new(
                &world.root.pem,
                ".*",
                ".*",
                vec![SigningKey::generate().unwrap().public_key().clone()],
            )
            .unwrap(),
        ),
        ..world.policy()
    };
    assert!(matches!(
        rejection(verify(&other_log, &signature)),
        Rejection::UnknownLog { .. }
    ));
}

#[test]
fn signing_with_a_certificate_checks_what_it_is_given() {
    let world = World::new();
    // Without a log key: a certificate-bearing signature without a bundle, which a keyless
    // policy refuses (nothing proves when it was made).
    let certificate =
        cosign::SigningCertificate::new(&world.leaf.key, &world.leaf.pem, None).unwrap();
    let unlogged = cosign::sign(
        &cosign::Signer {
            key: &world.leaf.key,
            certificate: Some(&certificate),
            log: None,
        },
        REPOSITORY,
        &digest(1),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(unlogged.chain, None);
    assert_eq!(unlogged.bundle, None);
    assert_eq!(
        rejection(verify(&world.policy(), &unlogged)),
        Rejection::NoBundle
    );

    // A certificate for another key, a chain or certificate that is no certificate, a log
    // without a certificate: refused before anything is signed.
    let other = SigningKey::generate().unwrap();
    let error = |result: Result<cosign::SigningCertificate, Error>| result.unwrap_err().to_string();
    assert_eq!(
        error(cosign::SigningCertificate::new(
            &other,
            &world.leaf.pem,
            None
        )),
        "signing certificate: the certificate is not for this key (its public key differs)"
    );
    assert_eq!(
        error(cosign::SigningCertificate::new(
            &world.leaf.key,
            &other.public_key_pem(),
            None
        )),
        "signing certificate: the certificate: no PEM CERTIFICATE block"
    );
    assert_eq!(
        error(cosign::SigningCertificate::new(
            &world.leaf.key,
            &world.leaf.pem,
            Some("no pem\n")
        )),
        "signing certificate: the chain: no PEM CERTIFICATE block"
    );
    let garbage = error(cosign::SigningCertificate::new(
        &world.leaf.key,
        &world.leaf.pem,
        Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
    ));
    assert!(
        garbage.starts_with(
            "signing certificate: the chain: certificate 1: not an X.509 certificate: "
        ),
        "{garbage}"
    );
    let no_certificate = cosign::sign(
        &cosign::Signer {
            key: &world.leaf.key,
            certificate: None,
            log: Some(&world.rekor),
        },
        REPOSITORY,
        &digest(1),
        SystemTime::now(),
    );
    assert_eq!(
        no_certificate.unwrap_err().to_string(),
        "signing certificate: a transparency-log bundle needs a certificate to record"
    );
}
