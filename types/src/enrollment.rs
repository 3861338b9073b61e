//! The node's enrollment with the controller and the life of its certificate.

use serde::{Deserialize, Serialize};

use crate::topic::upgrade_from;
use crate::{Topic, GLOBAL_KEY};

/// Enrollment and certificate state, published by enrollmgr.
///
/// Persistent, so that after a reboot subscribers know the node is enrolled (and with which
/// certificate) before enrollmgr is up again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EnrollmentStatus {
    /// Where enrollment stands.
    pub state: EnrollmentState,
    /// The id the controller gave this node.
    pub node_id: Option<String>,
    /// SHA-256 fingerprint of the current node certificate, hex.
    pub cert_fingerprint: Option<String>,
    /// Start of the current certificate's validity.
    pub not_before_ms: Option<u64>,
    /// End of the current certificate's validity.
    pub not_after_ms: Option<u64>,
    /// When rotation is due (75% of the lifetime).
    pub rotate_at_ms: Option<u64>,
    /// The controller URLs this node enrolled (or last rotated) with, in the order they are
    /// tried; empty while it holds no certificate.
    pub controller_urls: Vec<String>,
    /// Since when rotation has been failing (enrollmgr raises `cert.rotation_failing` while
    /// set, and heartbeatd reports it to the controller).
    pub rotation_failing_since_ms: Option<u64>,
    /// Failed rotation attempts since `rotation_failing_since_ms` (0 while rotation is not
    /// failing).
    pub rotation_attempts: u32,
    /// The last enrollment or rotation error, if any.
    pub last_error: Option<String>,
}

/// Enrollment state machine of enrollmgr.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EnrollmentState {
    /// No certificate, no attempt in progress (e.g. no bootstrap token yet).
    NotEnrolled,
    /// An enroll request is in flight or being retried.
    Enrolling,
    /// Holding a valid certificate.
    Enrolled,
    /// Rotation is due and a rotate request is in flight; the current certificate is still valid.
    Rotating,
    /// Rotation has failed at least once; the current certificate is still valid.
    RotationFailing,
    /// The controller refused the bootstrap token; retrying will not help without a new one.
    BadToken,
    /// The controller revoked this node.
    Revoked,
    /// The certificate expired before it could be rotated; re-enrollment is needed.
    CertExpired,
    /// The controller's CA does not match the one this node trusts.
    CaMismatch,
    /// Any other failure (see `last_error`).
    Failed,
}

impl Topic for EnrollmentStatus {
    const NAME: &'static str = "EnrollmentStatus";
    // v2: `rotation_attempts`. v3: `controller_urls` (a list) instead of `controller_url`.
    const SCHEMA_VERSION: u32 = 3;
    const PERSISTENT: bool = true;
    fn key(&self) -> String {
        GLOBAL_KEY.to_owned()
    }
    fn upgrade(schema_version: u32, payload: &[u8]) -> Option<Self> {
        match schema_version {
            2 => upgrade_from::<EnrollmentStatusV2, _>(payload),
            _ => None,
        }
    }
}

/// [`EnrollmentStatus`] as schema version 2 encoded it: one controller URL at most.
#[derive(Deserialize)]
struct EnrollmentStatusV2 {
    state: EnrollmentState,
    node_id: Option<String>,
    cert_fingerprint: Option<String>,
    not_before_ms: Option<u64>,
    not_after_ms: Option<u64>,
    rotate_at_ms: Option<u64>,
    controller_url: Option<String>,
    rotation_failing_since_ms: Option<u64>,
    rotation_attempts: u32,
    last_error: Option<String>,
}

impl From<EnrollmentStatusV2> for EnrollmentStatus {
    fn from(v2: EnrollmentStatusV2) -> EnrollmentStatus {
        EnrollmentStatus {
            state: v2.state,
            node_id: v2.node_id,
            cert_fingerprint: v2.cert_fingerprint,
            not_before_ms: v2.not_before_ms,
            not_after_ms: v2.not_after_ms,
            rotate_at_ms: v2.rotate_at_ms,
            controller_urls: v2.controller_url.into_iter().collect(),
            rotation_failing_since_ms: v2.rotation_failing_since_ms,
            rotation_attempts: v2.rotation_attempts,
            last_error: v2.last_error,
        }
    }
}
