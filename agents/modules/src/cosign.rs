//! Cosign-compatible signatures of module manifests: the formats, the keys, and verification
//! against a trust policy that defends against the forgeries keyless verifiers tend to miss.
//!
//! # Format (cosign v2, tag scheme)
//! The signatures of the manifest `sha256:<hex>` live in the same repository under the tag
//! [`signature_tag`] `sha256-<hex>.sig`: an OCI image manifest ([`signature_manifest`]) with one
//! layer per signature. A layer is the simple-signing [`payload`] (media type
//! [`SIMPLESIGNING_MEDIA_TYPE`]) and carries the base64 DER ECDSA signature in
//! [`SIGNATURE_ANNOTATION`]; a keyless signature adds the Fulcio certificate
//! ([`CERTIFICATE_ANNOTATION`]), its chain ([`CHAIN_ANNOTATION`]) and the Rekor bundle
//! ([`BUNDLE_ANNOTATION`]). Pulling reverses this: [`signature_layers`] reads the manifest and
//! [`SignatureLayer::with_payload`] checks each fetched payload blob against its descriptor.
//!
//! # Keys
//! [`SigningKey`] generates, signs, and reads and writes `cosign.key` (scrypt + nacl/secretbox,
//! password from the caller); [`PublicKey`] is `cosign.pub` (and a Rekor log's key).
//!
//! # Signing
//! [`sign`] makes one signature with a [`Signer`]: a key alone, or a key with its
//! [`SigningCertificate`] (and chain) and, given a log key, a [`transparency_bundle`] — the
//! certificate-bearing signature a keyless policy verifies.
//!
//! # Verification
//! [`verify`] checks the signatures found for a manifest against a [`Policy`]: trusted keys, an
//! optional [`KeylessRoot`] (Fulcio roots, identity and issuer regexes, Rekor keys) and whether
//! a signature is required. One signature that passes is enough; otherwise the [`Error`] says,
//! for each signature, why it failed. A signature passes when
//! - a trusted key verifies it over the payload bytes (ECDSA P-256, SHA-256), or it is a keyless
//!   signature and, in this order:
//!   1. it verifies over the payload with the leaf certificate's key (a valid certificate
//!      beside garbage signature bytes proves nothing);
//!   2. the leaf chains through the chain annotation's intermediates to a policy root, every
//!      issuer a CA valid at the integrated time whose signature verifies;
//!   3. the bundle's SignedEntryTimestamp verifies with the key of the Rekor log it names;
//!   4. the log entry (`hashedrekord`, or the older `rekord`, v0.0.1) names the SHA-256 of
//!      this payload, this signature and this certificate (a genuine bundle for another
//!      artifact proves nothing);
//!   5. the integrated time lies within the leaf's validity;
//!   6. a SAN (email or URI) matches the identity regex and the Fulcio OIDC-issuer extension
//!      the issuer regex;
//! - and its payload is a `cosign container image signature` naming this manifest digest and
//!   this repository (tags and digests stripped before comparing), or, when the policy lists
//!   [`SignedReference`]s, a repository the list allows (mirrors, `--sign-container-identity`,
//!   another name of the registry: see [`references`]).
//!
//! Input is untrusted: every field is size-limited, and garbage base64, JSON, PEM or DER yields
//! an error, never a panic.

mod keyless;
mod keys;
pub mod references;

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub use keyless::{transparency_bundle, KeylessRoot, SigningCertificate};
pub use keys::{PublicKey, SigningKey, LEGACY_PRIVATE_KEY_LABEL, PRIVATE_KEY_LABEL};
pub use powernode_types::CosignSignature;
pub use references::SignedReference;

use crate::digest::Digest;
use crate::format::{Descriptor, ImageManifest, OCI_MANIFEST};

/// Media type of a signature layer: the simple-signing payload.
pub const SIMPLESIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 DER ECDSA signature over the payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Layer annotation holding the signing certificate, PEM (keyless).
pub const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
/// Layer annotation holding the certificate chain, PEM (keyless).
pub const CHAIN_ANNOTATION: &str = "dev.sigstore.cosign/chain";
/// Layer annotation holding the Rekor bundle, JSON (keyless).
pub const BUNDLE_ANNOTATION: &str = "dev.sigstore.cosign/bundle";
/// `critical.type` of a cosign image signature payload.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Media type of the signature manifest's config blob.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// At most this many signatures are checked for one manifest.
pub const MAX_SIGNATURES: usize = 32;
/// The largest payload, signature, certificate, chain or bundle accepted.
pub const MAX_FIELD_BYTES: usize = 256 * 1024;

/// Why an operation failed. For [`verify`], the Display text is the precise reason.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The manifest digest is not `sha256:<64 lowercase hex>`.
    #[error("{0:?} is not a sha256 manifest digest (want sha256:<64 lowercase hex digits>)")]
    ManifestDigest(String),
    /// No signature was found and the policy requires one.
    #[error("no signatures and the policy requires one")]
    NoSignatures,
    /// More signatures than [`MAX_SIGNATURES`].
    #[error("{0} signatures found; at most {MAX_SIGNATURES} are checked")]
    TooManySignatures(usize),
    /// Signatures were found but none satisfies the policy; why, for each.
    #[error("no signature satisfies the policy: {}", join(.0))]
    Rejected(Vec<Rejected>),
    /// A key file or key is unusable.
    #[error("{what}: {reason}")]
    Key {
        /// `public key` or `private key`.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The `cosign.key` password does not open the key.
    #[error("cannot decrypt the private key: wrong password (or a corrupt key file)")]
    WrongPassword,
    /// A keyless policy regex does not compile.
    #[error("invalid {what} regex {pattern:?}: {reason}")]
    Regex {
        /// `identity` or `issuer`.
        what: &'static str,
        /// The pattern.
        pattern: String,
        /// The compiler's complaint.
        reason: String,
    },
    /// The keyless trust root is unusable.
    #[error("keyless trust root: {0}")]
    TrustRoot(String),
    /// A signing certificate or its chain is unusable.
    #[error("signing certificate: {0}")]
    Certificate(String),
    /// A pulled signature layer does not match its descriptor.
    #[error("signature layer {digest}: {reason}")]
    Layer {
        /// The layer's digest.
        digest: String,
        /// What does not match.
        reason: String,
    },
    /// The system's random generator or the crypto library failed.
    #[error("cryptographic failure while {0}")]
    Crypto(&'static str),
}

/// Why one signature (1-based `index` in the list given to [`verify`]) was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("signature {index}: {reason}")]
pub struct Rejected {
    /// Position in the list, from 1.
    pub index: usize,
    /// The reason.
    pub reason: Rejection,
}

fn join(rejected: &[Rejected]) -> String {
    let parts: Vec<String> = rejected.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

/// Why a signature does not satisfy the policy. Values taken from the signature are cleaned
/// (control characters replaced) and shortened before they are shown.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A field is not what its format requires.
    #[error("{field} is malformed: {reason}")]
    Malformed {
        /// `payload`, `signature`, `certificate`, `chain` or `bundle`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A field is larger than [`MAX_FIELD_BYTES`].
    #[error("{field} is {size} bytes, more than the {MAX_FIELD_BYTES} accepted")]
    TooLarge {
        /// Which field.
        field: &'static str,
        /// Its size.
        size: usize,
    },
    /// The policy trusts neither keys nor keyless signatures.
    #[error("the policy trusts no key and no keyless identity")]
    NothingTrusted,
    /// None of the policy's keys verifies the signature.
    #[error("no trusted key verifies it (tried {}: {})", count(.tried.len(), "key"), .tried.join(", "))]
    UntrustedKey {
        /// Short fingerprints of the keys tried.
        tried: Vec<String>,
    },
    /// A key-based signature, but the policy trusts keyless signatures only.
    #[error("it carries no certificate, and the policy trusts keyless signatures only")]
    NoCertificate,
    /// Both ways failed: the keys did not verify it, and as a keyless signature it failed too.
    #[error("{key}; as a keyless signature: {keyless}")]
    Both {
        /// Why the keys did not accept it.
        key: Box<Rejection>,
        /// Why the keyless check did not.
        keyless: Box<Rejection>,
    },
    /// The payload is not a cosign image signature.
    #[error("payload type is {0:?}, not {SIGNATURE_TYPE:?}")]
    PayloadType(String),
    /// The payload signs another manifest.
    #[error("payload names digest {found} not {expected}")]
    PayloadDigest {
        /// The digest in the payload.
        found: String,
        /// The manifest digest being verified.
        expected: String,
    },
    /// The payload signs another repository, and the policy lists no `signed_references`.
    #[error(
        "payload names repository {found} not {expected}, the one it was pulled from (for a \
         mirror, a copy, a signature made with --sign-container-identity or another name of \
         the registry, list {found} in the trust policy's signed_references)"
    )]
    PayloadReference {
        /// The `docker-reference` in the payload.
        found: String,
        /// The repository being verified.
        expected: String,
    },
    /// The payload names a repository the policy's `signed_references` do not allow.
    #[error("payload names repository {found}, which the policy's signed_references ({allowed}) do not allow")]
    PayloadReferenceNotAllowed {
        /// The `docker-reference` in the payload.
        found: String,
        /// The policy's list, comma-separated.
        allowed: String,
    },
    /// The signature does not verify with the certificate's key.
    #[error("the signature does not verify with the certificate's key")]
    CertificateSignature,
    /// The certificate does not chain to a policy root.
    #[error("certificate does not chain to a trusted root: {0}")]
    Chain(String),
    /// A keyless signature without a bundle.
    #[error("keyless signature without a bundle (no proof it was logged while the certificate was valid)")]
    NoBundle,
    /// The bundle names a log the policy does not trust.
    #[error("bundle names log {log_id}, not a trusted Rekor log (trusted: {trusted})")]
    UnknownLog {
        /// The bundle's `logID`.
        log_id: String,
        /// Short fingerprints of the trusted Rekor keys.
        trusted: String,
    },
    /// The bundle's SET does not verify.
    #[error("the bundle's SignedEntryTimestamp does not verify with Rekor key {0}")]
    BadSet(String),
    /// The log entry is about another artifact, signature or certificate.
    #[error("the bundle's log entry is not for this signature: {0}")]
    Unbound(String),
    /// The entry was logged outside the certificate's validity.
    #[error("integrated time {time} is outside the certificate's validity ({not_before} to {not_after})")]
    OutsideValidity {
        /// The bundle's integrated time.
        time: String,
        /// Start of the certificate's validity.
        not_before: String,
        /// End of the certificate's validity.
        not_after: String,
    },
    /// The entry claims to be logged in the future.
    #[error("integrated time {0} is in the future")]
    FutureEntry(String),
    /// The certificate names no signer.
    #[error("the certificate has no email or URI SAN")]
    NoIdentity,
    /// No SAN matches the identity regex.
    #[error("certificate SAN {san} does not match identity {pattern}")]
    Identity {
        /// The certificate's email and URI SANs.
        san: String,
        /// The identity regex.
        pattern: String,
    },
    /// The certificate has no Fulcio OIDC issuer extension.
    #[error("the certificate has no Fulcio OIDC issuer extension")]
    NoIssuer,
    /// The OIDC issuer does not match the issuer regex.
    #[error("certificate OIDC issuer {issuer} does not match issuer {pattern}")]
    Issuer {
        /// The certificate's issuer.
        issuer: String,
        /// The issuer regex.
        pattern: String,
    },
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `text` fit for a message: control characters replaced, at most 200 characters.
fn clean(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().nth(200).is_some() {
        out.push('…');
    }
    out
}

/// What made a manifest acceptable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verified {
    /// A signature by a trusted key.
    Key {
        /// The key's fingerprint ([`PublicKey::fingerprint`]).
        fingerprint: String,
    },
    /// A keyless signature by an allowed identity.
    Keyless {
        /// The certificate SAN that matched the identity regex.
        identity: String,
        /// The certificate's OIDC issuer.
        issuer: String,
    },
    /// No signature passed, and the policy does not require one.
    Unsigned {
        /// Why each signature present failed (empty when there were none).
        rejected: Vec<Rejected>,
    },
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verified::Key { fingerprint } => {
                write!(f, "key {}", fingerprint.get(..16).unwrap_or(fingerprint))
            }
            Verified::Keyless { identity, issuer } => write!(f, "keyless {identity} ({issuer})"),
            Verified::Unsigned { rejected } if rejected.is_empty() => f.write_str("unsigned"),
            Verified::Unsigned { rejected } => write!(f, "unsigned ({})", join(rejected)),
        }
    }
}

/// What a manifest must carry to be accepted.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Keys whose signatures are trusted.
    pub keys: Vec<PublicKey>,
    /// Keyless signatures trusted, if any.
    pub keyless: Option<KeylessRoot>,
    /// Whether a manifest without a valid signature is refused (otherwise it is
    /// [`Verified::Unsigned`]).
    pub require_signature: bool,
    /// The repositories a signature's `docker-reference` may name; empty: only the repository
    /// the manifest was pulled from ([`references`]).
    pub signed_references: Vec<SignedReference>,
}

/// The simple-signing payload. Field order is cosign's (also the sorted order), so the bytes
/// are those cosign signs.
#[derive(Serialize, Deserialize)]
struct SimpleSigning {
    critical: Critical,
    #[serde(default)]
    optional: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Serialize, Deserialize)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Serialize, Deserialize)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Serialize, Deserialize)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

fn parse_manifest_digest(manifest_digest: &str) -> Result<Digest, Error> {
    Digest::parse(manifest_digest)
        .map_err(|_| Error::ManifestDigest(manifest_digest.chars().take(80).collect()))
}

/// The tag the signatures of `manifest_digest` live under: `sha256-<hex>.sig`.
pub fn signature_tag(manifest_digest: &str) -> Result<String, Error> {
    let digest = parse_manifest_digest(manifest_digest)?;
    Ok(format!("sha256-{}.sig", digest.hex()))
}

/// The exact bytes signed for `manifest_digest` in the repository `docker_reference`
/// (`registry/path`, no tag).
pub fn payload(docker_reference: &str, manifest_digest: &str) -> Vec<u8> {
    let payload = SimpleSigning {
        critical: Critical {
            identity: Identity {
                docker_reference: docker_reference.to_owned(),
            },
            image: Image {
                docker_manifest_digest: manifest_digest.to_owned(),
            },
            kind: SIGNATURE_TYPE.to_owned(),
        },
        optional: None,
    };
    to_json(&payload)
}

/// How [`sign`] signs: with a key alone (`cosign sign --key`), or with a key and its
/// certificate (`--certificate`, `--certificate-chain`), optionally logged.
#[derive(Clone, Copy, Debug)]
pub struct Signer<'a> {
    /// The signing key.
    pub key: &'a SigningKey,
    /// The key's certificate and chain, for a certificate-bearing signature.
    pub certificate: Option<&'a SigningCertificate>,
    /// A transparency log's key: the signature carries a bundle this key signed
    /// ([`transparency_bundle`]). Needs a certificate (the log entry records it).
    pub log: Option<&'a SigningKey>,
}

/// A signature of `manifest_digest` naming `docker_reference`, made by `signer` at `now`
/// (the bundle's integrated time).
pub fn sign(
    signer: &Signer<'_>,
    docker_reference: &str,
    manifest_digest: &str,
    now: SystemTime,
) -> Result<CosignSignature, Error> {
    parse_manifest_digest(manifest_digest)?;
    let payload = payload(docker_reference, manifest_digest);
    let signature = signer.key.sign(&payload)?;
    let bundle = match (signer.log, signer.certificate) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(Error::Certificate(
                "a transparency-log bundle needs a certificate to record".into(),
            ))
        }
        (Some(log), Some(certificate)) => {
            let integrated_time = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            Some(transparency_bundle(
                log,
                &payload,
                &signature,
                certificate.certificate(),
                integrated_time,
                0,
            )?)
        }
    };
    Ok(CosignSignature {
        payload: String::from_utf8_lossy(&payload).into_owned(),
        signature,
        certificate: signer.certificate.map(|c| c.certificate().to_owned()),
        chain: signer
            .certificate
            .and_then(SigningCertificate::chain)
            .map(str::to_owned),
        bundle,
    })
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    // Only plain structs of strings, numbers and string-keyed maps come here.
    serde_json::to_vec(value).expect("serialising plain data cannot fail")
}

/// A blob to push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Its digest, `sha256:<hex>`.
    pub digest: String,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl Blob {
    fn of(data: Vec<u8>) -> Blob {
        Blob {
            digest: Digest::of(&data).to_string(),
            data,
        }
    }
}

/// What to push under [`signature_tag`]: the config blob, one payload blob per signature, then
/// the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureManifest {
    /// The config blob.
    pub config: Blob,
    /// The payload blobs, in the order of the signatures given.
    pub layers: Vec<Blob>,
    /// The manifest JSON (media type [`OCI_MANIFEST`]).
    pub manifest: Vec<u8>,
}

/// The config blob cosign writes: an empty image config whose `diff_ids` are the payloads.
#[derive(Serialize)]
struct SignatureConfig {
    architecture: &'static str,
    created: &'static str,
    history: Vec<History>,
    os: &'static str,
    rootfs: RootFs,
    config: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct History {
    created: &'static str,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

/// cosign's zero time: signatures carry no creation time, so identical signatures are
/// identical blobs.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The signature manifest holding `signatures` (all for the same manifest digest).
pub fn signature_manifest(signatures: &[CosignSignature]) -> SignatureManifest {
    let layers: Vec<Blob> = signatures
        .iter()
        .map(|s| Blob::of(s.payload.as_bytes().to_vec()))
        .collect();
    let config = SignatureConfig {
        architecture: "",
        created: ZERO_TIME,
        history: layers
            .iter()
            .map(|_| History { created: ZERO_TIME })
            .collect(),
        os: "",
        rootfs: RootFs {
            kind: "layers",
            diff_ids: layers.iter().map(|l| l.digest.clone()).collect(),
        },
        config: BTreeMap::new(),
    };
    let config = Blob::of(to_json(&config));
    let descriptors = signatures
        .iter()
        .zip(&layers)
        .map(|(signature, layer)| {
            let mut annotations = BTreeMap::new();
            annotations.insert(SIGNATURE_ANNOTATION.to_owned(), signature.signature.clone());
            for (key, value) in [
                (CERTIFICATE_ANNOTATION, &signature.certificate),
                (CHAIN_ANNOTATION, &signature.chain),
                (BUNDLE_ANNOTATION, &signature.bundle),
            ] {
                if let Some(value) = value {
                    annotations.insert(key.to_owned(), value.clone());
                }
            }
            Descriptor {
                media_type: SIMPLESIGNING_MEDIA_TYPE.to_owned(),
                digest: layer.digest.clone(),
                size: layer.data.len() as u64,
                artifact_type: None,
                platform: None,
                annotations,
            }
        })
        .collect();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_owned()),
        artifact_type: None,
        config: Descriptor {
            media_type: CONFIG_MEDIA_TYPE.to_owned(),
            digest: config.digest.clone(),
            size: config.data.len() as u64,
            artifact_type: None,
            platform: None,
            annotations: BTreeMap::new(),
        },
        layers: descriptors,
        annotations: BTreeMap::new(),
    };
    SignatureManifest {
        config,
        layers,
        manifest: to_json(&manifest),
    }
}

/// A signature layer as described by a pulled signature manifest; its payload blob is fetched
/// separately and joined with [`SignatureLayer::with_payload`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureLayer {
    /// The payload blob's digest.
    pub digest: String,
    /// The payload blob's size.
    pub size: u64,
    /// [`SIGNATURE_ANNOTATION`].
    pub signature: String,
    /// [`CERTIFICATE_ANNOTATION`].
    pub certificate: Option<String>,
    /// [`CHAIN_ANNOTATION`].
    pub chain: Option<String>,
    /// [`BUNDLE_ANNOTATION`].
    pub bundle: Option<String>,
}

/// The signature layers of a signature manifest: layers of [`SIMPLESIGNING_MEDIA_TYPE`] with a
/// signature annotation (others are not signatures and are skipped, as cosign does).
pub fn signature_layers(manifest: &ImageManifest) -> Vec<SignatureLayer> {
    manifest
        .layers
        .iter()
        .filter(|layer| layer.media_type == SIMPLESIGNING_MEDIA_TYPE)
        .filter_map(|layer| {
            let annotation = |key: &str| layer.annotations.get(key).cloned();
            Some(SignatureLayer {
                digest: layer.digest.clone(),
                size: layer.size,
                signature: annotation(SIGNATURE_ANNOTATION)?,
                certificate: annotation(CERTIFICATE_ANNOTATION),
                chain: annotation(CHAIN_ANNOTATION),
                bundle: annotation(BUNDLE_ANNOTATION),
            })
        })
        .collect()
}

impl SignatureLayer {
    /// Joins the fetched payload blob, after checking it is the one the descriptor names.
    pub fn with_payload(self, payload: &[u8]) -> Result<CosignSignature, Error> {
        let error = |reason: String| Error::Layer {
            digest: clean(&self.digest),
            reason,
        };
        if payload.len() > MAX_FIELD_BYTES {
            return Err(error(format!(
                "the payload is {} bytes, more than the {MAX_FIELD_BYTES} accepted",
                payload.len()
            )));
        }
        if payload.len() as u64 != self.size {
            return Err(error(format!(
                "the payload is {} bytes, the descriptor says {}",
                payload.len(),
                self.size
            )));
        }
        let actual = Digest::of(payload).to_string();
        if actual != self.digest {
            return Err(error(format!("the payload's digest is {actual}")));
        }
        let payload = String::from_utf8(payload.to_vec())
            .map_err(|_| error("the payload is not UTF-8".into()))?;
        Ok(CosignSignature {
            payload,
            signature: self.signature,
            certificate: self.certificate,
            chain: self.chain,
            bundle: self.bundle,
        })
    }
}

/// Checks `signatures`, found for `manifest_digest` in `repository` (`registry/path`), against
/// `policy`. Accepts when any one signature satisfies the policy; otherwise the error (or, when
/// signatures are optional, [`Verified::Unsigned`]) says why each failed. `now` only bounds a
/// keyless signature's log time: certificates are judged at the time the log saw the signature,
/// since Fulcio's expire minutes after issue.
pub fn verify(
    policy: &Policy,
    repository: &str,
    manifest_digest: &str,
    signatures: &[CosignSignature],
    now: SystemTime,
) -> Result<Verified, Error> {
    let expected = parse_manifest_digest(manifest_digest)?;
    if signatures.is_empty() {
        return if policy.require_signature {
            Err(Error::NoSignatures)
        } else {
            Ok(Verified::Unsigned {
                rejected: Vec::new(),
            })
        };
    }
    if signatures.len() > MAX_SIGNATURES {
        return Err(Error::TooManySignatures(signatures.len()));
    }
    let mut rejected = Vec::new();
    for (i, signature) in signatures.iter().enumerate() {
        match check(policy, repository, &expected, signature, now) {
            Ok(verified) => return Ok(verified),
            Err(reason) => rejected.push(Rejected {
                index: i + 1,
                reason,
            }),
        }
    }
    if policy.require_signature {
        Err(Error::Rejected(rejected))
    } else {
        Ok(Verified::Unsigned { rejected })
    }
}

fn check(
    policy: &Policy,
    repository: &str,
    expected: &Digest,
    signature: &CosignSignature,
    now: SystemTime,
) -> Result<Verified, Rejection> {
    for (field, value) in [
        ("payload", Some(&signature.payload)),
        ("signature", Some(&signature.signature)),
        ("certificate", signature.certificate.as_ref()),
        ("chain", signature.chain.as_ref()),
        ("bundle", signature.bundle.as_ref()),
    ] {
        let size = value.map_or(0, String::len);
        if size > MAX_FIELD_BYTES {
            return Err(Rejection::TooLarge { field, size });
        }
    }
    let raw_signature =
        BASE64
            .decode(signature.signature.trim())
            .map_err(|e| Rejection::Malformed {
                field: "signature",
                reason: format!("not base64 ({e})"),
            })?;
    let payload = signature.payload.as_bytes();
    // Who signed comes first: claims in a payload nobody trusted signed mean nothing.
    let verified = authenticate(policy, signature, payload, &raw_signature, now)?;
    check_claims(payload, repository, expected, &policy.signed_references)?;
    Ok(verified)
}

fn authenticate(
    policy: &Policy,
    signature: &CosignSignature,
    payload: &[u8],
    raw_signature: &[u8],
    now: SystemTime,
) -> Result<Verified, Rejection> {
    let key_rejection = if policy.keys.is_empty() {
        None
    } else {
        if let Some(key) = policy
            .keys
            .iter()
            .find(|key| key.verifies(payload, raw_signature))
        {
            return Ok(Verified::Key {
                fingerprint: key.fingerprint().to_owned(),
            });
        }
        Some(Rejection::UntrustedKey {
            tried: policy
                .keys
                .iter()
                .map(|key| format!("{}…", key.short_fingerprint()))
                .collect(),
        })
    };
    match (&signature.certificate, &policy.keyless, key_rejection) {
        (Some(certificate), Some(root), key_rejection) => {
            match keyless::verify(
                root,
                certificate,
                signature.chain.as_deref(),
                signature.bundle.as_deref(),
                payload,
                raw_signature,
                now,
            ) {
                Ok(signer) => Ok(Verified::Keyless {
                    identity: signer.identity,
                    issuer: signer.issuer,
                }),
                Err(keyless) => Err(match key_rejection {
                    Some(key) => Rejection::Both {
                        key: Box::new(key),
                        keyless: Box::new(keyless),
                    },
                    None => keyless,
                }),
            }
        }
        (_, _, Some(key_rejection)) => Err(key_rejection),
        (None, Some(_), None) => Err(Rejection::NoCertificate),
        (_, None, None) => Err(Rejection::NothingTrusted),
    }
}

fn check_claims(
    payload: &[u8],
    repository: &str,
    expected: &Digest,
    signed_references: &[SignedReference],
) -> Result<(), Rejection> {
    let parsed: SimpleSigning =
        serde_json::from_slice(payload).map_err(|e| Rejection::Malformed {
            field: "payload",
            reason: format!("not a simple-signing document ({e})"),
        })?;
    let critical = parsed.critical;
    if critical.kind != SIGNATURE_TYPE {
        return Err(Rejection::PayloadType(clean(&critical.kind)));
    }
    let expected = expected.to_string();
    if critical.image.docker_manifest_digest != expected {
        return Err(Rejection::PayloadDigest {
            found: clean(&critical.image.docker_manifest_digest),
            expected,
        });
    }
    let named = &critical.identity.docker_reference;
    if references::allowed(signed_references, named, repository) {
        return Ok(());
    }
    let found = clean(references::repository_part(named));
    Err(if signed_references.is_empty() {
        Rejection::PayloadReference {
            found,
            expected: clean(references::repository_part(repository)),
        }
    } else {
        let allowed: Vec<String> = signed_references.iter().map(ToString::to_string).collect();
        Rejection::PayloadReferenceNotAllowed {
            found,
            allowed: allowed.join(", "),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_shortens_and_neutralises() {
        assert_eq!(clean("a\nb"), "a?b");
        assert_eq!(clean(&"x".repeat(300)).chars().count(), 201);
    }

    #[test]
    fn payload_is_cosigns_byte_layout() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let text = String::from_utf8(payload("reg.example/a/b", &digest)).unwrap();
        assert_eq!(
            text,
            format!(
                "{{\"critical\":{{\"identity\":{{\"docker-reference\":\"reg.example/a/b\"}},\
                 \"image\":{{\"docker-manifest-digest\":\"{digest}\"}},\
                 \"type\":\"cosign container image signature\"}},\"optional\":null}}"
            )
        );
    }
}
