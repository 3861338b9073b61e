//! The node's enrollment with the controller and the life of its certificate.

use serde::{Deserialize, Serialize};

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
    /// The controller this node is enrolled with.
    pub controller_url: Option<String>,
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
    // v2: `rotation_attempts`.
    const SCHEMA_VERSION: u32 = 2;
    const PERSISTENT: bool = true;
    fn key(&self) -> String {
        GLOBAL_KEY.to_owned()
    }
}
