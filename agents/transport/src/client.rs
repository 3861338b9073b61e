//! The client every node agent uses to call the controller's node API.

use std::error::Error as _;
use std::sync::RwLock;
use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::TransportError;
use crate::tls::{client_config, TlsIdentity};

/// Where the node API lives under the controller URL (DESIGN §5).
pub const API_PREFIX: &str = "node_api/v1/";

/// The largest reply accepted, so a broken or hostile controller cannot exhaust memory.
pub const MAX_REPLY: usize = 4 * 1024 * 1024;

/// A connection to the controller with the node's current TLS identity.
///
/// Cheap to share (`&self` everywhere). After certificate rotation, [`ControllerClient::set_identity`]
/// swaps the TLS identity in place, so every agent picks the new certificate up without a restart.
pub struct ControllerClient {
    base: reqwest::Url,
    timeout: Duration,
    http: RwLock<reqwest::Client>,
}

impl std::fmt::Debug for ControllerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerClient")
            .field("base", &self.base.as_str())
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

impl ControllerClient {
    /// A client for the controller at `url` (https only), trusting only `identity`'s CA, each
    /// request bounded by `timeout` (connect included).
    pub fn new(
        url: &str,
        identity: &TlsIdentity,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let bad = |reason: &str| TransportError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let mut base = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        if base.scheme() != "https" {
            return Err(bad("the controller is only spoken to over https"));
        }
        if base.host_str().is_none() {
            return Err(bad("no host"));
        }
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let http = build(identity, timeout)?;
        Ok(ControllerClient {
            base,
            timeout,
            http: RwLock::new(http),
        })
    }

    /// Replaces the TLS identity (after enrollment or rotation); calls already under way finish
    /// with the old one.
    pub fn set_identity(&self, identity: &TlsIdentity) -> Result<(), TransportError> {
        let http = build(identity, self.timeout)?;
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = http;
        Ok(())
    }

    /// `POST <url>/node_api/v1/<call>` with `body` as JSON; the reply's JSON as `Resp`.
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        call: &str,
        body: &Req,
    ) -> Result<Resp, TransportError> {
        let url = self
            .base
            .join(API_PREFIX)
            .and_then(|u| u.join(call.trim_start_matches('/')))
            .map_err(|e| TransportError::Url {
                url: format!("{}{API_PREFIX}{call}", self.base),
                reason: e.to_string(),
            })?;
        let http = self.http.read().unwrap_or_else(|e| e.into_inner()).clone();
        let shown = url.to_string();
        let mut response = http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| self.classify(&shown, e))?;
        let status = response.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.classify(&shown, e))?
        {
            if bytes.len() + chunk.len() > MAX_REPLY {
                return Err(TransportError::BadReply {
                    url: shown,
                    detail: format!("reply larger than {MAX_REPLY} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => (b.error.code, b.error.message),
                Err(_) => (
                    "unknown".to_owned(),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
                ),
            };
            return Err(TransportError::Status {
                url: shown,
                status: status.as_u16(),
                code,
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| TransportError::BadReply {
            url: shown,
            detail: e.to_string(),
        })
    }

    /// Sorts a reqwest error into what the caller can act on.
    fn classify(&self, url: &str, e: reqwest::Error) -> TransportError {
        let url = url.to_owned();
        if e.is_timeout() {
            return TransportError::Timeout {
                url,
                timeout_ms: self.timeout.as_millis() as u64,
            };
        }
        if let Some(tls) = rustls_error(&e) {
            let detail = tls.to_string();
            return match tls {
                rustls::Error::InvalidCertificate(_) => TransportError::CaMismatch { url, detail },
                _ => TransportError::Handshake { url, detail },
            };
        }
        if e.is_connect() {
            return TransportError::Connect {
                url,
                detail: chain(&e),
            };
        }
        if e.is_body() || e.is_decode() {
            return TransportError::BadReply {
                url,
                detail: chain(&e),
            };
        }
        TransportError::Connect {
            url,
            detail: chain(&e),
        }
    }
}

fn build(identity: &TlsIdentity, timeout: Duration) -> Result<reqwest::Client, TransportError> {
    let config = client_config(identity)?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            TransportError::Credentials(format!("building the HTTPS client: {}", chain(&e)))
        })
}

/// The rustls error somewhere in `e`'s cause chain (io::Error hides its inner error from
/// `source()`, so look inside those too).
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(tls) = rustls_error(inner) {
                return Some(tls);
            }
        }
        next = err.source();
    }
    None
}

/// The whole cause chain, for a log line.
fn chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(err) = next {
        out.push_str(": ");
        out.push_str(&err.to_string());
        next = err.source();
    }
    out
}
