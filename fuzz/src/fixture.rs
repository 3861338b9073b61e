//! The fixed signing world the cosign targets verify against: a cosign key, a Fulcio-like PKI
//! and a Rekor-like log key, with one valid signature of each kind.
//!
//! The fuzzer cannot forge ECDSA signatures, so without fixed keys it could never get past a
//! signature check to the parsing behind it. `fuzz/fixtures/cosign.json` holds public material
//! only, written once by `examples/seeds.rs` (which made the keys and threw them away); the
//! seed corpora hold signatures made by the same keys.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use powernode_modules::cosign::{CosignSignature, KeylessRoot, Policy, PublicKey};
use serde::{Deserialize, Serialize};

/// The fixture file's contents.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CosignFixture {
    /// `registry/path` the signatures are for.
    pub repository: String,
    /// The signed manifest digest.
    pub manifest_digest: String,
    /// The verifier's clock, seconds since the epoch (fixed, so that runs are repeatable).
    pub now_s: u64,
    /// `cosign.pub` of the key-based signer.
    pub key_pem: String,
    /// The keyless PKI's root certificate, PEM.
    pub roots_pem: String,
    /// The SAN the keyless leaf carries.
    pub identity: String,
    /// The OIDC issuer the keyless leaf carries.
    pub issuer: String,
    /// The log's public key, PEM.
    pub rekor_pem: String,
    /// A valid signature by `key_pem`.
    pub key_signature: CosignSignature,
    /// A valid keyless signature (certificate, chain, bundle).
    pub keyless_signature: CosignSignature,
}

/// The fixture with its policies built.
#[derive(Debug)]
pub struct Cosign {
    /// The file's contents.
    pub fixture: CosignFixture,
    /// Trusts the key and the keyless root; a signature is required.
    pub policy: Policy,
    /// Trusts the keyless root only; a signature is required.
    pub keyless_policy: Policy,
    /// [`CosignFixture::now_s`] as a time.
    pub now: SystemTime,
}

/// The fixture as checked in.
pub const COSIGN_JSON: &str = include_str!("../fixtures/cosign.json");

/// The checked-in fixture, parsed once.
pub fn cosign() -> &'static Cosign {
    static COSIGN: OnceLock<Cosign> = OnceLock::new();
    COSIGN.get_or_init(|| {
        let fixture: CosignFixture =
            serde_json::from_str(COSIGN_JSON).expect("fuzz/fixtures/cosign.json parses");
        Cosign::new(fixture)
    })
}

impl Cosign {
    /// Builds the policies of `fixture`.
    pub fn new(fixture: CosignFixture) -> Cosign {
        let key = PublicKey::from_pem(&fixture.key_pem).expect("fixture key");
        let rekor = PublicKey::from_pem(&fixture.rekor_pem).expect("fixture log key");
        // Anchored exact matches, the way an operator should write them.
        let keyless = KeylessRoot::new(
            &fixture.roots_pem,
            &format!("^{}$", regex_escape(&fixture.identity)),
            &format!("^{}$", regex_escape(&fixture.issuer)),
            vec![rekor],
        )
        .expect("fixture keyless root");
        Cosign {
            policy: Policy {
                keys: vec![key],
                keyless: Some(keyless.clone()),
                require_signature: true,
                signed_references: Vec::new(),
            },
            keyless_policy: Policy {
                keys: Vec::new(),
                keyless: Some(keyless),
                require_signature: true,
                signed_references: Vec::new(),
            },
            now: UNIX_EPOCH + Duration::from_secs(fixture.now_s),
            fixture,
        }
    }
}

/// `text` with the regex metacharacters escaped.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if r"\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
