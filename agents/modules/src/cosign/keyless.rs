//! Keyless (Fulcio certificate + Rekor bundle) signatures: verification, and the signing side
//! of a certificate-bearing signature made with a key ([`SigningCertificate`],
//! [`transparency_bundle`]), as `cosign sign --key K --certificate C --certificate-chain CH`
//! makes one.
//!
//! A keyless signature is trusted when all of these hold, checked in this order so that the
//! first failure is the most basic one:
//! 1. the signature verifies over the payload with the leaf certificate's key;
//! 2. the leaf chains, through intermediates from the chain annotation, to a policy root, each
//!    issuer a CA valid at the log's integrated time whose signature verifies;
//! 3. the bundle's SignedEntryTimestamp verifies with the key of the Rekor log it names;
//! 4. the log entry (a `hashedrekord` or `rekord` v0.0.1 body) names this payload's SHA-256,
//!    this signature and this certificate;
//! 5. the integrated time falls within the leaf's validity;
//! 6. a leaf SAN (email or URI) matches the identity regex and its Fulcio OIDC-issuer extension
//!    matches the issuer regex.
//!
//! Steps 1 and 4 are the ones a verifier is easily tempted to skip: without 1, any signature
//! bytes pass beside a valid certificate; without 4, a genuine bundle for another artifact makes
//! any signature look logged.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use regex::{Regex, RegexBuilder};
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::der_parser::oid::Oid;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::time::ASN1Time;
use x509_parser::x509::SubjectPublicKeyInfo;

use powernode_types::text::rfc3339;

use super::keys::{pem_blocks, pem_encode, PublicKey, SigningKey};
use super::{Error, Rejection};
use crate::digest::hex;

/// Fulcio's OIDC issuer extension, the raw issuer URL as the extension value (deprecated).
const OID_FULCIO_ISSUER_V1: &str = "1.3.6.1.4.1.57264.1.1";
/// Fulcio's OIDC issuer extension, a DER UTF8String.
const OID_FULCIO_ISSUER_V2: &str = "1.3.6.1.4.1.57264.1.8";
/// Longer chains are refused: Fulcio's has one intermediate.
const MAX_CHAIN_DEPTH: usize = 4;
/// A chain annotation with more certificates is refused unread: each one that claims the right
/// name costs a signature check.
const MAX_CHAIN_CERTIFICATES: usize = 8;
/// How far in the future an integrated time may lie, for clock skew between the log and us.
const MAX_CLOCK_SKEW_S: i64 = 600;
/// Compiled-regex size limit: the patterns come from configuration, not from an attacker, but
/// a typo should fail loudly rather than eat memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The trust a policy places in keyless signatures: the Fulcio roots certificates must chain to,
/// who may sign (a SAN regex) and through which OIDC issuer (an issuer regex), and the Rekor
/// logs whose bundles prove a signature was logged while its certificate was valid.
///
/// The regexes are unanchored, like cosign's `--certificate-identity-regexp`: write `^…$` to
/// match the whole value.
#[derive(Clone, Debug)]
pub struct KeylessRoot {
    roots: Vec<Vec<u8>>,
    identity: Regex,
    issuer: Regex,
    rekor_keys: Vec<PublicKey>,
}

impl KeylessRoot {
    /// A keyless root from PEM root certificates (one or more `CERTIFICATE` blocks), the
    /// identity and issuer regexes, and the Rekor public keys.
    pub fn new(
        roots_pem: &str,
        identity: &str,
        issuer: &str,
        rekor_keys: Vec<PublicKey>,
    ) -> Result<KeylessRoot, Error> {
        let blocks = pem_blocks(roots_pem).map_err(Error::TrustRoot)?;
        let roots: Vec<Vec<u8>> = blocks
            .into_iter()
            .filter(|(label, _)| label == "CERTIFICATE")
            .map(|(_, der)| der)
            .collect();
        if roots.is_empty() {
            return Err(Error::TrustRoot(
                "no PEM CERTIFICATE block among the roots".into(),
            ));
        }
        for (i, der) in roots.iter().enumerate() {
            parse_certificate(der)
                .map_err(|e| Error::TrustRoot(format!("root certificate {}: {e}", i + 1)))?;
        }
        if rekor_keys.is_empty() {
            return Err(Error::TrustRoot(
                "a keyless root needs at least one Rekor key: without the log, a stolen \
                 short-lived certificate would sign forever"
                    .into(),
            ));
        }
        Ok(KeylessRoot {
            roots,
            identity: compile("identity", identity)?,
            issuer: compile("issuer", issuer)?,
            rekor_keys,
        })
    }

    /// The identity regex.
    pub fn identity(&self) -> &str {
        self.identity.as_str()
    }

    /// The OIDC issuer regex.
    pub fn issuer(&self) -> &str {
        self.issuer.as_str()
    }
}

fn compile(what: &'static str, pattern: &str) -> Result<Regex, Error> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| Error::Regex {
            what,
            pattern: pattern.to_owned(),
            reason: e.to_string(),
        })
}

/// The bundle annotation: Rekor's promise (SET) that an entry was logged at a time.
#[derive(Deserialize)]
struct Bundle {
    #[serde(rename = "SignedEntryTimestamp")]
    signed_entry_timestamp: String,
    #[serde(rename = "Payload")]
    payload: BundlePayload,
}

/// The signed part of a bundle. The field order is the sorted key order: serialised compactly
/// it is the canonical JSON the SET signs (the values are a base64 string, integers and a hex
/// string, none of which canonicalisation escapes differently).
#[derive(Deserialize, Serialize)]
struct BundlePayload {
    body: String,
    #[serde(rename = "integratedTime")]
    integrated_time: i64,
    #[serde(rename = "logID")]
    log_id: String,
    #[serde(rename = "logIndex")]
    log_index: i64,
}

/// A `hashedrekord` (or older `rekord`) v0.0.1 log entry, the fields that bind it to a signature.
#[derive(Deserialize)]
struct LogEntry {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    spec: LogSpec,
}

#[derive(Deserialize)]
struct LogSpec {
    data: LogData,
    signature: LogSignature,
}

#[derive(Deserialize)]
struct LogData {
    hash: Option<LogHash>,
}

#[derive(Deserialize)]
struct LogHash {
    algorithm: String,
    value: String,
}

#[derive(Deserialize)]
struct LogSignature {
    content: String,
    #[serde(rename = "publicKey")]
    public_key: LogPublicKey,
}

#[derive(Deserialize)]
struct LogPublicKey {
    content: String,
}

fn malformed(field: &'static str, reason: impl Into<String>) -> Rejection {
    Rejection::Malformed {
        field,
        reason: reason.into(),
    }
}

/// What a keyless signature proved: the matching SAN and the OIDC issuer.
pub(super) struct Signer {
    pub identity: String,
    pub issuer: String,
}

/// Checks one keyless signature; see the module documentation for what and in which order.
pub(super) fn verify(
    root: &KeylessRoot,
    certificate: &str,
    chain: Option<&str>,
    bundle: Option<&str>,
    payload: &[u8],
    signature: &[u8],
    now: SystemTime,
) -> Result<Signer, Rejection> {
    let leaf_der = first_certificate(certificate).map_err(|e| malformed("certificate", e))?;
    let leaf = parse_certificate(&leaf_der).map_err(|e| malformed("certificate", e))?;

    // 1. The signature itself, with the certificate's key.
    let payload_algorithm = payload_algorithm(leaf.public_key())
        .ok_or_else(|| malformed("certificate", "its key is neither ECDSA P-256 nor P-384"))?;
    verify_with(leaf.public_key(), payload_algorithm, payload, signature)
        .map_err(|()| Rejection::CertificateSignature)?;

    let bundle = bundle.ok_or(Rejection::NoBundle)?;
    let bundle: Bundle =
        serde_json::from_str(bundle).map_err(|e| malformed("bundle", e.to_string()))?;
    let integrated_time = bundle.payload.integrated_time;
    let at = ASN1Time::from_timestamp(integrated_time).map_err(|_| {
        malformed(
            "bundle",
            format!("integrated time {integrated_time} is out of range"),
        )
    })?;

    // 2. The chain, at the time the log saw the signature.
    let mut intermediates_der = Vec::new();
    if let Some(chain) = chain {
        for (label, der) in pem_blocks(chain).map_err(|e| malformed("chain", e))? {
            if label == "CERTIFICATE" {
                intermediates_der.push(der);
            }
        }
    }
    if intermediates_der.len() > MAX_CHAIN_CERTIFICATES {
        return Err(malformed(
            "chain",
            format!(
                "{} certificates, more than the {MAX_CHAIN_CERTIFICATES} accepted",
                intermediates_der.len()
            ),
        ));
    }
    let mut intermediates = Vec::with_capacity(intermediates_der.len());
    for (i, der) in intermediates_der.iter().enumerate() {
        intermediates.push(
            parse_certificate(der)
                .map_err(|e| malformed("chain", format!("certificate {}: {e}", i + 1)))?,
        );
    }
    let mut roots = Vec::with_capacity(root.roots.len());
    for der in &root.roots {
        // Parsed when the root was built; cannot fail now, but never panic on it.
        roots.push(parse_certificate(der).map_err(Rejection::Chain)?);
    }
    check_leaf_usage(&leaf).map_err(Rejection::Chain)?;
    build_chain(&leaf, &intermediates, &roots, at).map_err(Rejection::Chain)?;

    // 3. The log's signature over the entry.
    check_set(&bundle, &root.rekor_keys)?;

    // 4. The entry is about this payload, this signature, this certificate.
    check_binding(&bundle.payload.body, payload, signature, &leaf_der)
        .map_err(Rejection::Unbound)?;

    // 5. Logged while the certificate was valid, and not in our future.
    let validity = leaf.validity();
    if !validity.is_valid_at(at) {
        return Err(Rejection::OutsideValidity {
            time: rfc3339(integrated_time),
            not_before: rfc3339(validity.not_before.timestamp()),
            not_after: rfc3339(validity.not_after.timestamp()),
        });
    }
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if integrated_time > now_s.saturating_add(MAX_CLOCK_SKEW_S) {
        return Err(Rejection::FutureEntry(rfc3339(integrated_time)));
    }

    // 6. Who signed, through whom.
    let sans = identities(&leaf).map_err(|e| malformed("certificate", e))?;
    if sans.is_empty() {
        return Err(Rejection::NoIdentity);
    }
    let Some(identity) = sans.iter().find(|san| root.identity.is_match(san)) else {
        return Err(Rejection::Identity {
            san: sans.join(", "),
            pattern: root.identity.as_str().to_owned(),
        });
    };
    let issuer = oidc_issuer(&leaf)
        .map_err(|e| malformed("certificate", e))?
        .ok_or(Rejection::NoIssuer)?;
    if !root.issuer.is_match(&issuer) {
        return Err(Rejection::Issuer {
            issuer,
            pattern: root.issuer.as_str().to_owned(),
        });
    }
    Ok(Signer {
        identity: identity.clone(),
        issuer,
    })
}

/// A certificate for a signing key, with its chain: what a certificate-bearing signature
/// carries in its certificate and chain annotations.
#[derive(Clone, Debug)]
pub struct SigningCertificate {
    /// The leaf, PEM.
    certificate: String,
    /// The chain (intermediates, then the root), PEM.
    chain: Option<String>,
}

impl SigningCertificate {
    /// `certificate_pem` (the leaf: its first `CERTIFICATE` block) for `key`, and the chain
    /// above it. Refused when the leaf's public key is not `key`'s (a signature it could never
    /// vouch for), or when a certificate does not parse.
    pub fn new(
        key: &SigningKey,
        certificate_pem: &str,
        chain_pem: Option<&str>,
    ) -> Result<SigningCertificate, Error> {
        let bad = |e: String| Error::Certificate(format!("the certificate: {e}"));
        let leaf_der = first_certificate(certificate_pem).map_err(bad)?;
        let leaf = parse_certificate(&leaf_der).map_err(bad)?;
        if leaf.public_key().raw != key.public_key().to_der() {
            return Err(Error::Certificate(
                "the certificate is not for this key (its public key differs)".into(),
            ));
        }
        let chain = match chain_pem {
            None => None,
            Some(pem) => {
                let blocks =
                    pem_blocks(pem).map_err(|e| Error::Certificate(format!("the chain: {e}")))?;
                let mut chain = String::new();
                for (i, (label, der)) in blocks.iter().enumerate() {
                    if label != "CERTIFICATE" {
                        continue;
                    }
                    parse_certificate(der).map_err(|e| {
                        Error::Certificate(format!("the chain: certificate {}: {e}", i + 1))
                    })?;
                    chain.push_str(&pem_encode("CERTIFICATE", der));
                }
                if chain.is_empty() {
                    return Err(Error::Certificate(
                        "the chain: no PEM CERTIFICATE block".into(),
                    ));
                }
                Some(chain)
            }
        };
        Ok(SigningCertificate {
            certificate: pem_encode("CERTIFICATE", &leaf_der),
            chain,
        })
    }

    /// The leaf, PEM: the certificate annotation.
    pub fn certificate(&self) -> &str {
        &self.certificate
    }

    /// The chain, PEM: the chain annotation.
    pub fn chain(&self) -> Option<&str> {
        self.chain.as_deref()
    }
}

/// A transparency-log bundle for a signature, signed by the log's own key rather than
/// returned by a Rekor server: a `hashedrekord` v0.0.1 entry recording the payload's SHA-256,
/// `signature` (base64) and `certificate_pem`, integrated at `integrated_time` (seconds since
/// the epoch) as entry `log_index`, and the SignedEntryTimestamp `log` makes over it. Its log
/// ID is the fingerprint of `log`'s public key, which a policy lists in `log_keys`.
pub fn transparency_bundle(
    log: &SigningKey,
    payload: &[u8],
    signature: &str,
    certificate_pem: &str,
    integrated_time: i64,
    log_index: i64,
) -> Result<String, Error> {
    let entry = serde_json::json!({
        "apiVersion": "0.0.1",
        "kind": "hashedrekord",
        "spec": {
            "data": {"hash": {
                "algorithm": "sha256",
                "value": hex(ring::digest::digest(&ring::digest::SHA256, payload).as_ref()),
            }},
            "signature": {
                "content": signature,
                "publicKey": {"content": BASE64.encode(certificate_pem)},
            },
        },
    });
    let payload = BundlePayload {
        body: BASE64.encode(entry.to_string()),
        integrated_time,
        log_id: log.public_key().fingerprint().to_owned(),
        log_index,
    };
    // The same canonical form `check_set` verifies (see BundlePayload).
    let canonical =
        serde_json::to_vec(&payload).map_err(|_| Error::Crypto("encoding the log entry"))?;
    let set = log.sign(&canonical)?;
    let bundle = serde_json::json!({
        "SignedEntryTimestamp": set,
        "Payload": payload,
    });
    Ok(bundle.to_string())
}

fn first_certificate(pem: &str) -> Result<Vec<u8>, String> {
    pem_blocks(pem)?
        .into_iter()
        .find(|(label, _)| label == "CERTIFICATE")
        .map(|(_, der)| der)
        .ok_or_else(|| "no PEM CERTIFICATE block".to_owned())
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rest, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".into());
    }
    Ok(certificate)
}

/// A readable name for a certificate in messages (Fulcio leaves have an empty subject).
fn describe(certificate: &X509Certificate<'_>) -> String {
    let subject = certificate.subject().to_string();
    if subject.is_empty() {
        "the leaf certificate".to_owned()
    } else {
        format!("certificate {subject:?}")
    }
}

fn check_leaf_usage(leaf: &X509Certificate<'_>) -> Result<(), String> {
    let key_usage = leaf
        .key_usage()
        .map_err(|e| format!("leaf key usage: {e}"))?;
    if key_usage.is_some_and(|ku| !ku.value.digital_signature()) {
        return Err("the leaf certificate's key usage does not allow digital signatures".into());
    }
    let extended = leaf
        .extended_key_usage()
        .map_err(|e| format!("leaf extended key usage: {e}"))?;
    if extended.is_some_and(|eku| !eku.value.code_signing && !eku.value.any) {
        return Err("the leaf certificate's extended key usage does not allow code signing".into());
    }
    Ok(())
}

/// Walks from `leaf` up to a trusted root. Each step picks an issuer whose subject is the
/// child's issuer name and that passes [`check_issuer`]; a root ends the walk.
fn build_chain(
    leaf: &X509Certificate<'_>,
    intermediates: &[X509Certificate<'_>],
    roots: &[X509Certificate<'_>],
    at: ASN1Time,
) -> Result<(), String> {
    let mut child = leaf;
    for cas_below in 0..MAX_CHAIN_DEPTH {
        let issuer_name = child.issuer().as_raw();
        let mut failure = None;
        for root in roots.iter().filter(|r| r.subject().as_raw() == issuer_name) {
            match check_issuer(root, child, cas_below, at) {
                Ok(()) => return Ok(()),
                Err(e) => failure = Some(e),
            }
        }
        let mut next = None;
        for candidate in intermediates.iter().filter(|c| {
            c.subject().as_raw() == issuer_name && c.subject().as_raw() != c.issuer().as_raw()
        }) {
            match check_issuer(candidate, child, cas_below, at) {
                Ok(()) => {
                    next = Some(candidate);
                    break;
                }
                Err(e) => failure = Some(e),
            }
        }
        match next {
            Some(intermediate) => child = intermediate,
            None => {
                return Err(failure.unwrap_or_else(|| {
                    format!(
                        "no trusted root or intermediate is the issuer {:?} of {}",
                        child.issuer().to_string(),
                        describe(child)
                    )
                }));
            }
        }
    }
    Err(format!(
        "no trusted root within {MAX_CHAIN_DEPTH} certificates"
    ))
}

/// Whether `issuer` may have issued `child`: a CA allowed to sign certificates, with room for
/// `cas_below` intermediates beneath it, valid at `at`, whose key verifies `child`'s signature.
fn check_issuer(
    issuer: &X509Certificate<'_>,
    child: &X509Certificate<'_>,
    cas_below: usize,
    at: ASN1Time,
) -> Result<(), String> {
    let name = describe(issuer);
    let constraints = issuer
        .basic_constraints()
        .map_err(|e| format!("{name}: basic constraints: {e}"))?;
    let Some(constraints) = constraints.filter(|bc| bc.value.ca) else {
        return Err(format!("{name} is not a CA"));
    };
    if let Some(limit) = constraints.value.path_len_constraint {
        if cas_below > limit as usize {
            return Err(format!(
                "{name} allows {limit} intermediates below it, not {cas_below}"
            ));
        }
    }
    let key_usage = issuer
        .key_usage()
        .map_err(|e| format!("{name}: key usage: {e}"))?;
    if key_usage.is_some_and(|ku| !ku.value.key_cert_sign()) {
        return Err(format!("{name} may not sign certificates"));
    }
    if !issuer.validity().is_valid_at(at) {
        return Err(format!(
            "{name} was not valid at {} (valid {} to {})",
            rfc3339(at.timestamp()),
            rfc3339(issuer.validity().not_before.timestamp()),
            rfc3339(issuer.validity().not_after.timestamp()),
        ));
    }
    let algorithm =
        certificate_algorithm(issuer.public_key(), &child.signature_algorithm.algorithm)
            .ok_or_else(|| {
                format!(
                    "{name}'s key cannot check the signature algorithm of {}",
                    describe(child)
                )
            })?;
    verify_with(
        issuer.public_key(),
        algorithm,
        child.tbs_certificate.as_ref(),
        &child.signature_value.data,
    )
    .map_err(|()| {
        format!(
            "the signature on {} does not verify with {name}'s key",
            describe(child)
        )
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyType {
    P256,
    P384,
    Rsa,
    Ed25519,
}

fn key_type(spki: &SubjectPublicKeyInfo<'_>) -> Option<KeyType> {
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref()?.data;
        if curve == OID_EC_P256.as_bytes() {
            Some(KeyType::P256)
        } else if curve == OID_NIST_EC_P384.as_bytes() {
            Some(KeyType::P384)
        } else {
            None
        }
    } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
        Some(KeyType::Rsa)
    } else if *algorithm == OID_SIG_ED25519 {
        Some(KeyType::Ed25519)
    } else {
        None
    }
}

/// How cosign signs a payload with a key of this type.
fn payload_algorithm(
    spki: &SubjectPublicKeyInfo<'_>,
) -> Option<&'static dyn VerificationAlgorithm> {
    match key_type(spki)? {
        KeyType::P256 => Some(&signature::ECDSA_P256_SHA256_ASN1),
        KeyType::P384 => Some(&signature::ECDSA_P384_SHA384_ASN1),
        KeyType::Rsa | KeyType::Ed25519 => None,
    }
}

/// The ring algorithm for a certificate signature `oid` made with a key of this type.
fn certificate_algorithm(
    spki: &SubjectPublicKeyInfo<'_>,
    oid: &Oid<'_>,
) -> Option<&'static dyn VerificationAlgorithm> {
    let key = key_type(spki)?;
    let algorithm: &'static dyn VerificationAlgorithm = if *oid == OID_SIG_ECDSA_WITH_SHA256 {
        match key {
            KeyType::P256 => &signature::ECDSA_P256_SHA256_ASN1,
            KeyType::P384 => &signature::ECDSA_P384_SHA256_ASN1,
            _ => return None,
        }
    } else if *oid == OID_SIG_ECDSA_WITH_SHA384 {
        match key {
            KeyType::P256 => &signature::ECDSA_P256_SHA384_ASN1,
            KeyType::P384 => &signature::ECDSA_P384_SHA384_ASN1,
            _ => return None,
        }
    } else if key == KeyType::Rsa && *oid == OID_PKCS1_SHA256WITHRSA {
        &signature::RSA_PKCS1_2048_8192_SHA256
    } else if key == KeyType::Rsa && *oid == OID_PKCS1_SHA384WITHRSA {
        &signature::RSA_PKCS1_2048_8192_SHA384
    } else if key == KeyType::Rsa && *oid == OID_PKCS1_SHA512WITHRSA {
        &signature::RSA_PKCS1_2048_8192_SHA512
    } else if key == KeyType::Ed25519 && *oid == OID_SIG_ED25519 {
        &signature::ED25519
    } else {
        return None;
    };
    Some(algorithm)
}

fn verify_with(
    spki: &SubjectPublicKeyInfo<'_>,
    algorithm: &'static dyn VerificationAlgorithm,
    message: &[u8],
    signature: &[u8],
) -> Result<(), ()> {
    // ring takes the BIT STRING's content: the EC point, the RSAPublicKey or the Ed25519 key.
    UnparsedPublicKey::new(algorithm, &spki.subject_public_key.data)
        .verify(message, signature)
        .map_err(|_| ())
}

fn check_set(bundle: &Bundle, rekor_keys: &[PublicKey]) -> Result<(), Rejection> {
    let log_id = bundle.payload.log_id.as_str();
    let Some(key) = rekor_keys.iter().find(|key| key.fingerprint() == log_id) else {
        let trusted: Vec<&str> = rekor_keys
            .iter()
            .map(PublicKey::short_fingerprint)
            .collect();
        return Err(Rejection::UnknownLog {
            log_id: log_id.chars().take(64).collect(),
            trusted: trusted.join(", "),
        });
    };
    // The canonical JSON is exact only for these character sets (see BundlePayload).
    if BASE64.decode(&bundle.payload.body).is_err() {
        return Err(malformed("bundle", "the entry body is not base64"));
    }
    let canonical =
        serde_json::to_vec(&bundle.payload).map_err(|e| malformed("bundle", e.to_string()))?;
    let set = BASE64
        .decode(bundle.signed_entry_timestamp.trim())
        .map_err(|_| malformed("bundle", "the SignedEntryTimestamp is not base64"))?;
    if !key.verifies(&canonical, &set) {
        return Err(Rejection::BadSet(key.short_fingerprint().to_owned()));
    }
    Ok(())
}

fn check_binding(
    body: &str,
    payload: &[u8],
    signature: &[u8],
    leaf_der: &[u8],
) -> Result<(), String> {
    let body = BASE64
        .decode(body)
        .map_err(|_| "the entry body is not base64".to_owned())?;
    let entry: LogEntry = serde_json::from_slice(&body)
        .map_err(|e| format!("the entry body is not a hashedrekord entry: {e}"))?;
    if entry.api_version != "0.0.1" || !matches!(entry.kind.as_str(), "hashedrekord" | "rekord") {
        return Err(format!(
            "the entry is {} v{}, not hashedrekord v0.0.1",
            entry.kind, entry.api_version
        ));
    }
    let payload_hex = hex(ring::digest::digest(&ring::digest::SHA256, payload).as_ref());
    let Some(hash) = entry.spec.data.hash else {
        return Err("the entry records no artifact hash".into());
    };
    if hash.algorithm != "sha256" || !hash.value.eq_ignore_ascii_case(&payload_hex) {
        return Err(format!(
            "it is for artifact {}:{}, not this payload (sha256:{payload_hex})",
            hash.algorithm.chars().take(16).collect::<String>(),
            hash.value.chars().take(128).collect::<String>(),
        ));
    }
    let logged_signature = BASE64
        .decode(entry.spec.signature.content.trim())
        .map_err(|_| "the entry's signature is not base64".to_owned())?;
    if logged_signature != signature {
        return Err("it records a different signature".into());
    }
    let logged_pem = BASE64
        .decode(entry.spec.signature.public_key.content.trim())
        .map_err(|_| "the entry's public key is not base64".to_owned())?;
    let logged_pem = String::from_utf8(logged_pem)
        .map_err(|_| "the entry's public key is not PEM".to_owned())?;
    let logged_certificate =
        first_certificate(&logged_pem).map_err(|e| format!("the entry's public key: {e}"))?;
    if logged_certificate != leaf_der {
        return Err("it records a different certificate".into());
    }
    Ok(())
}

/// The leaf's email and URI SANs.
fn identities(leaf: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| format!("subject alternative name: {e}"))?;
    let Some(san) = san else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::RFC822Name(email) => Some((*email).to_owned()),
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

/// The Fulcio OIDC issuer: the v2 extension (DER UTF8String) if present, else v1 (raw).
fn oidc_issuer(leaf: &X509Certificate<'_>) -> Result<Option<String>, String> {
    let mut v1 = None;
    for extension in leaf.extensions() {
        let oid = extension.oid.to_id_string();
        if oid == OID_FULCIO_ISSUER_V2 {
            let text = der_utf8_string(extension.value)
                .ok_or_else(|| "the OIDC issuer extension is not a UTF8String".to_owned())?;
            return Ok(Some(text.to_owned()));
        }
        if oid == OID_FULCIO_ISSUER_V1 {
            let text = std::str::from_utf8(extension.value)
                .map_err(|_| "the OIDC issuer extension is not UTF-8".to_owned())?;
            v1 = Some(text.to_owned());
        }
    }
    Ok(v1)
}

/// The text of a DER UTF8String (tag 12) that fills `der` exactly.
fn der_utf8_string(der: &[u8]) -> Option<&str> {
    let (&tag, rest) = der.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[count..])
    };
    if rest.len() != len {
        return None;
    }
    std::str::from_utf8(rest).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_string_parser_is_exact() {
        assert_eq!(der_utf8_string(b"\x0c\x03abc"), Some("abc"));
        assert_eq!(der_utf8_string(b"\x0c\x81\x03abc"), Some("abc"));
        assert_eq!(der_utf8_string(b"\x0c\x04abc"), None);
        assert_eq!(der_utf8_string(b"\x0c\x02abc"), None);
        assert_eq!(der_utf8_string(b"\x13\x03abc"), None);
        assert_eq!(der_utf8_string(b"\x0c\x85\xff\xff\xff\xff\xff"), None);
        assert_eq!(der_utf8_string(b""), None);
    }
}
