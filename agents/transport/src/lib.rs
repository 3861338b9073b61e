//! The node's one way to talk to the controller (DESIGN §5), used by enrollmgr, heartbeatd and
//! eventd alike:
//!
//! * HTTPS (hyper HTTP/1.1 over rustls with the ring provider; no OpenSSL anywhere), the controller's CA from
//!   enrollment pinned as the only root, the node's certificate as client identity;
//! * a list of controller URLs (replicas), failing over to the next when one cannot be
//!   reached and staying with the one that answers ([`ControllerClient`]);
//! * a timeout on every request, connect included;
//! * typed errors ([`TransportError`]) that say whether retrying can help, and
//!   [`Backoff`] (exponential, with jitter) for the retries;
//! * [`ControllerClient::set_identity`] swaps in a rotated certificate without a restart;
//! * [`pki`] names the files the credentials live in.

mod backoff;
mod client;
mod error;
pub mod pki;
mod tls;

pub use backoff::Backoff;
pub use client::{ControllerClient, API_PREFIX, KEEP_IDLE, MAX_REPLY};
pub use error::TransportError;
pub use tls::{client_config, ClientCert, TlsIdentity};
