//! Verification of a downloaded module image: OCI digest, cosign signature, fs-verity.

use serde::{Deserialize, Serialize};

use crate::Topic;

/// A request to verify one image, published by modulemgr.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VerifyConfig {
    /// The module's name; the key.
    pub name: String,
    /// Path of the image in the digest store.
    pub image_path: String,
    /// The OCI digest the image must have, e.g. `sha256:…`.
    pub digest: String,
    /// The fs-verity digest from the manifest annotation, when the module carries one.
    pub fsverity_digest: Option<String>,
    /// Name of the trust policy the signature is checked against.
    pub trust_policy: String,
}

impl Topic for VerifyConfig {
    const NAME: &'static str = "VerifyConfig";
    const SCHEMA_VERSION: u32 = 1;
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
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.name.clone()
    }
}
