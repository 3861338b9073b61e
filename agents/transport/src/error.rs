//! What can go wrong talking to the controller, one variant per thing a caller handles
//! differently.

/// A failed call to the controller.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The controller URL or a call's path does not make a valid URL.
    #[error("invalid controller URL {url:?}: {reason}")]
    Url {
        /// What was given.
        url: String,
        /// Why it is not valid.
        reason: String,
    },
    /// The CA, certificate or key cannot be used to build a TLS configuration.
    #[error("TLS material: {0}")]
    Credentials(String),
    /// The controller's certificate does not chain to the pinned CA (or does not name the
    /// host): a different controller, or a man in the middle.
    #[error("controller at {url} is not signed by the pinned CA: {detail}")]
    CaMismatch {
        /// The URL called.
        url: String,
        /// What the TLS layer reported.
        detail: String,
    },
    /// The TLS handshake failed otherwise, e.g. the controller refused our certificate.
    #[error("TLS handshake with {url} failed: {detail}")]
    Handshake {
        /// The URL called.
        url: String,
        /// What the TLS layer reported.
        detail: String,
    },
    /// The controller's host answered the TCP connect with a refusal: nothing listens on the
    /// port (the controller is down or restarting). Costs the controller nothing, unlike
    /// every other failure.
    #[error("cannot connect to {url}: {detail}")]
    Refused {
        /// The URL called.
        url: String,
        /// Why.
        detail: String,
    },
    /// No connection could be made otherwise (unreachable, DNS), or it broke before an answer.
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The URL called.
        url: String,
        /// Why.
        detail: String,
    },
    /// The controller did not answer in time.
    #[error("{url} did not answer within {timeout_ms} ms")]
    Timeout {
        /// The URL called.
        url: String,
        /// The limit that passed.
        timeout_ms: u64,
    },
    /// The controller answered with an error status and its `{"error":{"code","message"}}`.
    #[error("{url} answered {status} {code}: {message}")]
    Status {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The error code from the body (`"unknown"` when the body had none).
        code: String,
        /// The message from the body.
        message: String,
    },
    /// The answer is not what the protocol says (bad JSON, wrong shape, too large).
    #[error("bad reply from {url}: {detail}")]
    BadReply {
        /// The URL called.
        url: String,
        /// What was wrong.
        detail: String,
    },
}

impl TransportError {
    /// Whether trying again later may succeed: the network or the controller may come back.
    /// A refusal by the controller (4xx), a CA mismatch or bad credentials will not change by
    /// retrying the same call.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransportError::Connect { .. }
            | TransportError::Refused { .. }
            | TransportError::Timeout { .. }
            | TransportError::Handshake { .. } => true,
            TransportError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            TransportError::BadReply { .. } => true,
            TransportError::Url { .. }
            | TransportError::Credentials(_)
            | TransportError::CaMismatch { .. } => false,
        }
    }

    /// Whether the controller at the URL called could not be reached — nothing listens, the
    /// connection failed or broke before an answer, no answer in time, the TLS handshake
    /// failed (including a certificate the pinned CA does not vouch for: not the controller),
    /// or it answered 503 (it cannot serve now) — so that another of the node's controller
    /// URLs should be tried. Any other answer comes from a live controller, and another
    /// replica on the same database would answer the same.
    pub fn is_unreachable(&self) -> bool {
        match self {
            TransportError::Refused { .. }
            | TransportError::Connect { .. }
            | TransportError::Timeout { .. }
            | TransportError::Handshake { .. }
            | TransportError::CaMismatch { .. } => true,
            TransportError::Status { status, .. } => *status == 503,
            TransportError::Url { .. }
            | TransportError::Credentials(_)
            | TransportError::BadReply { .. } => false,
        }
    }

    /// The controller's error code, for a [`TransportError::Status`].
    pub fn code(&self) -> Option<&str> {
        match self {
            TransportError::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}
