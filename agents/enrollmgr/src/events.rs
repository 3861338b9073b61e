//! The events enrollmgr raises (docs/events.md, "Events raised"): what each says and carries.
//! When each is raised is the state machine's business (the crate documentation); this module
//! only builds them, so kinds and fields are found in one place.

use agentbase::timefmt::rfc3339_ms;
use agentbase::Events;
use powernode_types::{EnrollmentState, Severity};

use crate::store::Installed;
use crate::Failing;

/// The node enrolled: `enroll.enrolled`.
pub const ENROLLED: &str = "enroll.enrolled";
/// A new certificate is installed: `cert.rotated`.
pub const ROTATED: &str = "cert.rotated";
/// Rotation keeps failing: `cert.rotation_failing`, raised every heartbeat interval.
pub const ROTATION_FAILING: &str = "cert.rotation_failing";
/// The controller refused the bootstrap token.
pub const BAD_TOKEN: &str = "enroll.bad_token";
/// The controller revoked this node.
pub const REVOKED: &str = "enroll.revoked";
/// The controller's certificate does not chain to the pinned CA.
pub const CA_MISMATCH: &str = "enroll.ca_mismatch";
/// The certificate expired before it could be rotated.
pub const CERT_EXPIRED: &str = "cert.expired";
/// Any other refusal (an unusable PKI on disk, a request the controller will never accept).
pub const FAILED: &str = "enroll.failed";

/// `enroll.enrolled` (Info): node id, uuid, certificate expiry, fingerprint, controller.
pub fn enrolled(events: &Events, installed: &Installed, uuid: &str) {
    let not_after_ms = installed.cert.not_after_ms.to_string();
    let not_after = rfc3339_ms(installed.cert.not_after_ms);
    events.report(
        Severity::Info,
        ENROLLED,
        &format!(
            "enrolled as {}; certificate valid until {not_after}",
            installed.meta.node_id
        ),
        &[
            ("node_id", &installed.meta.node_id),
            ("uuid", uuid),
            ("not_after_ms", &not_after_ms),
            ("not_after", &not_after),
            ("fingerprint", &installed.cert.fingerprint),
            ("controller_url", &installed.meta.controller_url),
        ],
    );
}

/// `cert.rotated` (Info): the new expiry and fingerprint, the old fingerprint, and how long
/// rotation had been failing when it had.
pub fn rotated(events: &Events, old: &Installed, new: &Installed, failing: Option<&Failing>) {
    let not_after_ms = new.cert.not_after_ms.to_string();
    let not_after = rfc3339_ms(new.cert.not_after_ms);
    let attempts = failing.map_or(0, |f| f.attempts).to_string();
    let mut fields = vec![
        ("node_id", new.meta.node_id.as_str()),
        ("not_after_ms", &not_after_ms),
        ("not_after", &not_after),
        ("fingerprint", &new.cert.fingerprint),
        ("previous_fingerprint", &old.cert.fingerprint),
        ("failed_attempts", &attempts),
    ];
    let since_ms = failing.map(|f| f.since_ms.to_string());
    if let Some(since) = &since_ms {
        fields.push(("failing_since_ms", since));
    }
    events.report(
        Severity::Info,
        ROTATED,
        &format!("certificate rotated; new one valid until {not_after}"),
        &fields,
    );
}

/// `cert.rotation_failing` (Critical): since when, how many attempts, the last error, and when
/// the current certificate expires (after which the node needs a new bootstrap token).
pub fn rotation_failing(events: &Events, current: &Installed, failing: &Failing) {
    let since_ms = failing.since_ms.to_string();
    let since = rfc3339_ms(failing.since_ms);
    let attempts = failing.attempts.to_string();
    let not_after_ms = current.cert.not_after_ms.to_string();
    let not_after = rfc3339_ms(current.cert.not_after_ms);
    let state = format!("{:?}", failing.state);
    events.report(
        Severity::Critical,
        ROTATION_FAILING,
        &format!(
            "certificate rotation failing since {since} ({attempts} attempts): {}; the certificate expires {not_after}",
            failing.error
        ),
        &[
            ("since_ms", &since_ms),
            ("since", &since),
            ("attempts", &attempts),
            ("last_error", &failing.error),
            ("not_after_ms", &not_after_ms),
            ("not_after", &not_after),
            ("state", &state),
            ("node_id", &current.meta.node_id),
        ],
    );
}

/// The kind and severity of a refusal published as `state`.
pub fn refusal_kind(state: EnrollmentState) -> (&'static str, Severity) {
    match state {
        EnrollmentState::BadToken => (BAD_TOKEN, Severity::Error),
        // The node stops talking to the controller for good: Critical.
        EnrollmentState::Revoked => (REVOKED, Severity::Critical),
        // Someone else may be answering for the controller: Critical.
        EnrollmentState::CaMismatch => (CA_MISMATCH, Severity::Critical),
        EnrollmentState::CertExpired => (CERT_EXPIRED, Severity::Critical),
        _ => (FAILED, Severity::Error),
    }
}

/// The refusal event for `state` (see [`refusal_kind`]): the controller's (or the files')
/// reason, the controller asked, and the certificate still on disk, if any.
pub fn refused(
    events: &Events,
    state: EnrollmentState,
    reason: &str,
    controller_url: Option<&str>,
    cert: Option<&Installed>,
) {
    let (kind, severity) = refusal_kind(state);
    let state_name = format!("{state:?}");
    let mut fields = vec![("reason", reason), ("state", state_name.as_str())];
    if let Some(url) = controller_url {
        fields.push(("controller_url", url));
    }
    let not_after_ms = cert.map(|c| c.cert.not_after_ms.to_string());
    if let Some(c) = cert {
        fields.push(("node_id", &c.meta.node_id));
    }
    if let Some(ms) = &not_after_ms {
        fields.push(("not_after_ms", ms));
    }
    events.report(
        severity,
        kind,
        &format!("enrollment refused ({state_name}): {reason}"),
        &fields,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_a_valid_kind_of_its_own() {
        let states = [
            EnrollmentState::BadToken,
            EnrollmentState::Revoked,
            EnrollmentState::CaMismatch,
            EnrollmentState::CertExpired,
            EnrollmentState::Failed,
        ];
        let kinds: std::collections::BTreeSet<_> =
            states.iter().map(|s| refusal_kind(*s).0).collect();
        assert_eq!(kinds.len(), states.len());
        for kind in kinds
            .into_iter()
            .chain([ENROLLED, ROTATED, ROTATION_FAILING])
        {
            agentbase::events::check_kind(kind).unwrap();
        }
    }
}
