//! The controller's rules, each in one place: what a request may ask, what must exist for it,
//! who may ask it, and what a change wakes. The node API, the operator API and (through the
//! operator API) the CLI all go through here; the HTTP layer only parses, calls and
//! serializes, and [`crate::storage`] only stores what it is handed.
//!
//! One module per area: [`enrollment`] (enroll, rotate), [`tokens`], [`nodes`] (list, show,
//! revoke, who is calling), [`heartbeat`], [`desired`] (modules, network), [`tasks`],
//! [`watch`], [`scripts`], [`events`], [`networks`] (networks, membership, forwards). Every
//! refusal is an [`Error`], whose [`Error::status`] and [`Error::code`] are what the API
//! answers (`{"error": {"code", "message"}}`, docs/api.md) and whose message is what the CLI
//! prints.

pub mod desired;
pub mod enrollment;
pub mod events;
pub mod heartbeat;
pub mod networks;
pub mod nodes;
pub mod scripts;
pub mod tasks;
pub mod tokens;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ca::{CaError, CertAuthority};
use crate::events::{BatchError, EventRetention};
use crate::networks::Refusal;
use crate::secrets::RandomError;
use crate::storage::{Storage, StorageError};
use crate::watch::WatchHub;

/// What the operator may tune of the service (`serve` flags).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Lifetime of node certificates.
    pub cert_lifetime: Duration,
    /// Heartbeat interval handed to nodes, seconds.
    pub heartbeat_interval_s: u32,
    /// How long and how many events are kept.
    pub event_retention: EventRetention,
    /// Bytes of a task's output stored; more is cut, with a marker.
    pub task_output_max: usize,
}

/// The rules over one database and one CA; cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Service {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    storage: Storage,
    ca: Arc<CertAuthority>,
    settings: Settings,
    operator_token_hash: String,
    watches: Arc<WatchHub>,
    closing: CancellationToken,
}

impl Service {
    /// The service over `storage` and `ca`; the operator's bearer token is the one whose
    /// SHA-256 hex is `operator_token_hash`; held watches answer when `closing` is cancelled.
    pub fn new(
        storage: Storage,
        ca: Arc<CertAuthority>,
        settings: Settings,
        operator_token_hash: String,
        closing: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                storage,
                ca,
                settings,
                operator_token_hash,
                watches: Arc::default(),
                closing,
            }),
        }
    }

    /// The database.
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// The CA.
    pub fn ca(&self) -> &CertAuthority {
        &self.inner.ca
    }

    /// The tunables.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The watched nodes' states (the server runs its scanner).
    pub fn watches(&self) -> &Arc<WatchHub> {
        &self.inner.watches
    }

    /// Cancelled when the controller shuts down.
    pub fn closing(&self) -> &CancellationToken {
        &self.inner.closing
    }

    /// Something a node may watch changed: its watch looks now rather than at the next scan.
    fn changed(&self) {
        self.inner.watches.poke();
    }
}

/// Why the service refused a request or failed it. Each variant has one HTTP status and one
/// machine-readable code ([`Error::status`], [`Error::code`]); its message (`Display`) is what
/// the API's `error.message` and the CLI say.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value of the request breaks a rule (the message says which): 400 `invalid_request`.
    #[error("{0}")]
    Invalid(String),
    /// A query parameter breaks a rule: 400 `invalid_query`.
    #[error("{0}")]
    InvalidQuery(String),
    /// A CSR that does not parse or whose signature does not verify: 400 `invalid_csr`.
    #[error("{0}")]
    InvalidCsr(String),
    /// Not `sha256:` and 64 lowercase hex digits: 400 `invalid_digest`.
    #[error("{0}")]
    InvalidDigest(String),
    /// An event batch breaks a limit: 400 `invalid_event` or `duplicate_event_id`, 413
    /// `batch_too_large`.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// A script over the size limit: 413 `script_too_large`.
    #[error("the script is {size} bytes, over the {max}-byte limit")]
    ScriptTooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The caller is not let in (see [`Denied`]): 401, or 403 `revoked` for a revoked node.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// No node with this id: 404 `not_found`.
    #[error("no node {0}")]
    NoNode(String),
    /// No task with this id (or not the calling node's): 404 `not_found`.
    #[error("no task {0}")]
    NoTask(String),
    /// No script with this digest: 404 `not_found`.
    #[error("no script {0}")]
    NoScript(String),
    /// No task leased to the calling node names this script: 404 `not_found`, as if it did
    /// not exist, so a node learns neither the text nor the existence of other scripts.
    #[error("no script {0} for this node (none of its leased tasks names it)")]
    NoScriptForNode(String),
    /// The operator asked for a change to a revoked node: 409 `node_revoked`.
    #[error("node {0} is revoked")]
    NodeRevoked(String),
    /// The node holds no lease on the task now: 409 `lease_lost`.
    #[error("task {id} is not leased to this node (it is {state})")]
    LeaseLost {
        /// The task.
        id: String,
        /// Its state.
        state: String,
    },
    /// The node never leased the task: 409 `not_leased`.
    #[error("task {0} was never leased to this node")]
    NotLeased(String),
    /// The task is final already: 409 `task_finished`.
    #[error("task {id} is {state} already")]
    TaskFinished {
        /// The task.
        id: String,
        /// Its final state.
        state: String,
    },
    /// A network, membership or forward rule (its own status and code, [`Refusal`]).
    #[error(transparent)]
    Network(Refusal),
    /// The database failed: 503 `database_unavailable` when it cannot be reached or cannot
    /// serve now (the client tries again, or another replica), else 500 `internal`.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The CA failed to sign: 500 `internal`.
    #[error(transparent)]
    Ca(CaError),
    /// No randomness: 500 `internal`.
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl From<Refusal> for Error {
    /// A missing or revoked node is the same error whichever area finds it.
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NoNode(node) => Error::NoNode(node),
            Refusal::Revoked(node) => Error::NodeRevoked(node),
            other => Error::Network(other),
        }
    }
}

impl From<CaError> for Error {
    /// A CSR the CA cannot use is the caller's fault; anything else is the controller's.
    fn from(err: CaError) -> Self {
        match err {
            CaError::BadCsr(_) => Error::InvalidCsr(err.to_string()),
            other => Error::Ca(other),
        }
    }
}

impl Error {
    /// The HTTP status the API answers.
    pub fn status(&self) -> u16 {
        match self {
            Error::Invalid(_)
            | Error::InvalidQuery(_)
            | Error::InvalidCsr(_)
            | Error::InvalidDigest(_) => 400,
            Error::Batch(BatchError::TooMany(_)) => 413,
            Error::Batch(_) => 400,
            Error::ScriptTooLarge { .. } => 413,
            Error::Denied(Denied::Revoked(_)) => 403,
            Error::Denied(_) => 401,
            Error::NoNode(_)
            | Error::NoTask(_)
            | Error::NoScript(_)
            | Error::NoScriptForNode(_) => 404,
            Error::NodeRevoked(_)
            | Error::LeaseLost { .. }
            | Error::NotLeased(_)
            | Error::TaskFinished { .. } => 409,
            Error::Network(refusal) => refusal.status(),
            Error::Storage(err) if err.is_unavailable() => 503,
            Error::Storage(_) | Error::Ca(_) | Error::Random(_) => 500,
        }
    }

    /// The machine-readable code the API answers (docs/api.md lists them).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid(_) => "invalid_request",
            Error::InvalidQuery(_) => "invalid_query",
            Error::InvalidCsr(_) => "invalid_csr",
            Error::InvalidDigest(_) => "invalid_digest",
            Error::Batch(BatchError::TooMany(_)) => "batch_too_large",
            Error::Batch(BatchError::Invalid { .. }) => "invalid_event",
            Error::Batch(BatchError::Duplicate(_)) => "duplicate_event_id",
            Error::ScriptTooLarge { .. } => "script_too_large",
            Error::Denied(denied) => denied.code(),
            Error::NoNode(_)
            | Error::NoTask(_)
            | Error::NoScript(_)
            | Error::NoScriptForNode(_) => "not_found",
            Error::NodeRevoked(_) => "node_revoked",
            Error::LeaseLost { .. } => "lease_lost",
            Error::NotLeased(_) => "not_leased",
            Error::TaskFinished { .. } => "task_finished",
            Error::Network(refusal) => refusal.code(),
            Error::Storage(err) if err.is_unavailable() => "database_unavailable",
            Error::Storage(_) | Error::Ca(_) | Error::Random(_) => "internal",
        }
    }

    /// Whether this is the controller's failure rather than a refusal of the request: the
    /// API logs its cause and tells the client only "internal error". An unavailable database
    /// is not: the client is told so, to try again.
    pub fn is_internal(&self) -> bool {
        self.status() == 500
    }
}

/// Why a caller is not let in: a node's client certificate, a bootstrap token, the operator's
/// bearer token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// A node call without a client certificate: `client_certificate_required`.
    #[error("this call needs the node's client certificate")]
    CertificateRequired,
    /// A certificate this controller did not issue to an enrolled node (or whose name is not
    /// that node's): `unknown_certificate`.
    #[error("the client certificate was not issued to an enrolled node")]
    UnknownCertificate,
    /// An expired certificate: `certificate_expired`.
    #[error("the client certificate has expired")]
    CertificateExpired,
    /// A revoked node asking for anything but to deliver its events, or enrolling again:
    /// 403 `revoked`.
    #[error("node {0} is revoked")]
    Revoked(String),
    /// No such bootstrap token: `invalid_token`.
    #[error("unknown bootstrap token")]
    UnknownToken,
    /// The bootstrap token was used already: `token_used`.
    #[error("bootstrap token already used")]
    TokenUsed,
    /// The bootstrap token expired: `token_expired`.
    #[error("bootstrap token expired")]
    TokenExpired,
    /// The bootstrap token is bound to another node uuid: `token_node_mismatch`.
    #[error("bootstrap token is bound to another node")]
    TokenNodeMismatch,
    /// An operator call without `Authorization: Bearer …`: `unauthorized`.
    #[error("a bearer token is required")]
    BearerRequired,
    /// An operator call with another token: `unauthorized`.
    #[error("wrong bearer token")]
    WrongBearer,
}

impl Denied {
    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Denied::CertificateRequired => "client_certificate_required",
            Denied::UnknownCertificate => "unknown_certificate",
            Denied::CertificateExpired => "certificate_expired",
            Denied::Revoked(_) => "revoked",
            Denied::UnknownToken => "invalid_token",
            Denied::TokenUsed => "token_used",
            Denied::TokenExpired => "token_expired",
            Denied::TokenNodeMismatch => "token_node_mismatch",
            Denied::BearerRequired | Denied::WrongBearer => "unauthorized",
        }
    }
}

/// Longest identity field, version, boot id or node id accepted.
pub const MAX_FIELD: usize = 256;

/// Checks a free-text field a node or the operator sends (identity, versions, boot ids): not
/// empty, at most [`MAX_FIELD`] bytes, no control characters.
pub fn check_field(name: &str, value: &str) -> Result<(), Error> {
    if value.trim().is_empty() {
        return Err(Error::Invalid(format!("{name} must not be empty")));
    }
    if value.len() > MAX_FIELD || value.chars().any(char::is_control) {
        return Err(Error::Invalid(format!(
            "{name} must be at most {MAX_FIELD} printable characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_one_status_and_code() {
        let cases: Vec<(Error, u16, &str)> = vec![
            (Error::Invalid("x".into()), 400, "invalid_request"),
            (Error::NoNode("n".into()), 404, "not_found"),
            (Error::NodeRevoked("n".into()), 409, "node_revoked"),
            (Error::Denied(Denied::Revoked("n".into())), 403, "revoked"),
            (Error::Denied(Denied::WrongBearer), 401, "unauthorized"),
            (
                Error::Batch(BatchError::TooMany(2000)),
                413,
                "batch_too_large",
            ),
            (
                Error::TaskFinished {
                    id: "t".into(),
                    state: "failed".into(),
                },
                409,
                "task_finished",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!((err.status(), err.code()), (status, code), "{err}");
        }
    }

    #[test]
    fn a_missing_or_revoked_node_is_one_error_whichever_area_finds_it() {
        let revoked = Error::from(Refusal::Revoked("node-1".into()));
        let direct = Error::NodeRevoked("node-1".into());
        assert_eq!(
            (revoked.status(), revoked.code(), revoked.to_string()),
            (direct.status(), direct.code(), direct.to_string())
        );
        assert!(matches!(
            Error::from(Refusal::NoNode("x".into())),
            Error::NoNode(_)
        ));
    }

    #[test]
    fn fields_are_printable_and_bounded() {
        assert!(check_field("f", "ok").is_ok());
        assert!(check_field("f", " ").is_err());
        assert!(check_field("f", "a\nb").is_err());
        assert!(check_field("f", &"x".repeat(MAX_FIELD + 1)).is_err());
    }
}
