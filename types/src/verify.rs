//! Verification of a downloaded module image: cosign signature, fs-verity digest.

use serde::{Deserialize, Serialize};

use crate::Topic;

/// A request to verify one image, published by modulemgr.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VerifyConfig {
    /// The module's name; the key.
    pub name: String,
    /// Path of the image (the manifest's one layer) in the digest store: the complete blob
    /// once `complete`, before that the file it is being downloaded into.
    pub image_path: String,
    /// The OCI digest the image must have, e.g. `sha256:…` (the layer's digest).
    pub digest: String,
    /// The image's size in bytes (the layer's, as the manifest gives it).
    pub size: u64,
    /// Whether `image_path` is the complete image, which the store has taken in only after it
    /// hashed to `digest`. A config is first published with `false` when the download starts:
    /// the verifier may hash the image as it arrives, but gives no verdict until the same
    /// config comes again with `true` (and the complete blob's path). A download that fails
    /// for good withdraws the config; one that starts over changes nothing here, the verdict
    /// waits for the complete file either way.
    pub complete: bool,
    /// The module's platform manifest exactly as pulled: the verifier checks that it hashes to
    /// `manifest_digest`, names `digest` as its layer, and reads the fs-verity annotation from it.
    pub manifest: String,
    /// The digest of `manifest`: what the signatures sign.
    pub manifest_digest: String,
    /// The repository the module came from (`registry/path`), which a signature's
    /// `docker-reference` must name.
    pub repository: String,
    /// The cosign signatures found for `manifest_digest` (none when the module is unsigned).
    /// modulemgr fetches them while the image downloads, so a config that is not `complete`
    /// may have none yet; the complete one carries them, and only it is judged.
    pub signatures: Vec<CosignSignature>,
    /// The digest of the index `manifest` was chosen from, when that index has signatures and
    /// `manifest` has none: the index alone was signed (`cosign sign` without `--recursive`).
    /// It only makes the verifier's refusal say so; it vouches for nothing.
    pub signed_index: Option<String>,
    /// Name of the trust policy the signature is checked against.
    pub trust_policy: String,
    /// Counts the times this image was downloaded anew for the module after a damaged stored
    /// copy was found: a new count makes an otherwise equal config news to the verifier, which
    /// then checks the new copy instead of letting its verdict on the old one stand.
    pub attempt: u32,
}

/// One cosign signature as stored in the registry (a layer of the `sha256-<hex>.sig` manifest).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CosignSignature {
    /// The simple-signing payload (JSON) the signature is over.
    pub payload: String,
    /// The signature, base64 (annotation `dev.cosignproject.cosign/signature`).
    pub signature: String,
    /// The signing certificate, PEM (keyless; annotation `dev.sigstore.cosign/certificate`).
    pub certificate: Option<String>,
    /// The certificate chain, PEM (keyless; annotation `dev.sigstore.cosign/chain`).
    pub chain: Option<String>,
    /// The transparency-log bundle, JSON (annotation `dev.sigstore.cosign/bundle`).
    pub bundle: Option<String>,
}

impl Topic for VerifyConfig {
    const NAME: &'static str = "VerifyConfig";
    const SCHEMA_VERSION: u32 = 4;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.name.clone()
    }
}

/// The verifier's verdict on one image, published by verifier.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VerifyStatus {
    /// The module's name; the key.
    pub name: String,
    /// The digest this verdict is about; modulemgr ignores a verdict for another digest.
    pub digest: String,
    /// The manifest (and so the signatures' subject) the verdict is about: the same image can
    /// come with another manifest, whose verdict must not stand for this one.
    pub manifest_digest: String,
    /// The verdict.
    pub state: VerifyState,
    /// Why verification failed, if it did.
    pub reason: Option<String>,
}

/// Verification progress of one image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerifyState {
    /// Checks are running.
    Verifying,
    /// Every check passed; the image may be mounted.
    Verified,
    /// A check failed (see `reason`); the image must not be mounted.
    Failed,
}

impl Topic for VerifyStatus {
    const NAME: &'static str = "VerifyStatus";
    const SCHEMA_VERSION: u32 = 2;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.name.clone()
    }
}
