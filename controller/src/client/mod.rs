//! The operator API's client, which the CLI speaks through: HTTPS (rustls with ring, pinned to
//! the controller's CA) with the operator's bearer token, one HTTP/1.1 connection per call.
//! A refusal comes back as the API said it ([`ClientError::Api`]); a controller that cannot
//! be reached says so, naming the URL.

pub mod args;
pub mod config;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_rustls::TlsConnector;

pub use args::ClientArgs;

use crate::wire::ErrorBody;
use config::{Settings, Token};

/// How long to wait for the TCP connection and the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read, bytes (a page of 1,000 events with their fields fits many times).
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Why a call did not get an answer, or got a refusal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The settings name a file that cannot be used.
    #[error("{what} {path}: {reason}")]
    Setup {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection: nothing listens there, or the host is unknown or down.
    #[error(
        "cannot reach the controller at {url}: {reason} (is `powernode-controller serve` \
         running?)"
    )]
    Unreachable {
        /// The URL.
        url: String,
        /// What the system said.
        reason: String,
    },
    /// The TLS handshake failed: most often a CA that is not the controller's.
    #[error("TLS with the controller at {url} failed: {reason} (is {ca} its CA certificate?)")]
    Tls {
        /// The URL.
        url: String,
        /// What rustls said.
        reason: String,
        /// The CA file used.
        ca: String,
    },
    /// The call took too long.
    #[error("the controller at {url} did not answer within {seconds} s")]
    Timeout {
        /// The URL.
        url: String,
        /// The bound.
        seconds: u64,
    },
    /// The HTTP exchange broke, or the answer is not what the API answers.
    #[error(
        "the controller at {url} answered {method} {path} with something unexpected: {reason}"
    )]
    Protocol {
        /// The URL.
        url: String,
        /// The method.
        method: Method,
        /// The path.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The API refused: its status, code and message.
    #[error("{message} ({code})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The machine-readable code.
        code: String,
        /// The API's message.
        message: String,
    },
}

impl ClientError {
    /// Whether the controller could not be reached at all (the CLI's exit code 3).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. } | ClientError::Timeout { .. }
        )
    }
}

impl From<crate::service::Error> for ClientError {
    /// A rule the CLI checks before it calls (the service's own), said as the API says it.
    fn from(err: crate::service::Error) -> Self {
        ClientError::Api {
            status: err.status(),
            code: err.code().to_owned(),
            message: err.to_string(),
        }
    }
}

/// A client of one controller.
#[derive(Clone)]
pub struct Client {
    url: String,
    host: String,
    port: u16,
    ca: String,
    token: String,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|e| ClientError::Setup {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

impl Client {
    /// A client for `settings`: reads the CA certificate and the token now, so that a bad
    /// file is named before anything is sent.
    pub fn new(settings: &Settings) -> Result<Client, ClientError> {
        let setup = |what, reason: String| ClientError::Setup {
            what,
            path: settings.ca_file.display().to_string(),
            reason,
        };
        let ca_pem = read("CA certificate", &settings.ca_file)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| setup("CA certificate", e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| setup("CA certificate", e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(setup(
                "CA certificate",
                "holds no PEM CERTIFICATE".to_owned(),
            ));
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup("CA certificate", e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let token = match &settings.token {
            Token::Inline(token) => token.trim().to_owned(),
            Token::File(path) => read("operator token", path)?.trim().to_owned(),
        };
        if token.is_empty() {
            let path = match &settings.token {
                Token::Inline(_) => "--token".to_owned(),
                Token::File(path) => path.display().to_string(),
            };
            return Err(ClientError::Setup {
                what: "operator token",
                path,
                reason: "is empty".to_owned(),
            });
        }
        let uri: Uri =
            format!("{}/", settings.url)
                .parse()
                .map_err(|e: hyper::http::uri::InvalidUri| ClientError::Setup {
                    what: "controller URL",
                    path: settings.url.clone(),
                    reason: e.to_string(),
                })?;
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        Ok(Client {
            url: settings.url.clone(),
            port: uri.port_u16().unwrap_or(443),
            host,
            ca: settings.ca_file.display().to_string(),
            token,
            tls: Arc::new(tls),
        })
    }

    /// The controller's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// `POST path` with `body` as JSON.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// `PUT path` with `body` as JSON.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    /// One call: connect, handshake, send, read the whole answer; a 2xx answer's JSON as `T`,
    /// anything else as the API's error.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let timeout = || ClientError::Timeout {
            url: self.url.clone(),
            seconds: CALL_TIMEOUT.as_secs(),
        };
        let (status, bytes) =
            tokio::time::timeout(CALL_TIMEOUT, self.exchange(&method, path, body))
                .await
                .map_err(|_| timeout())??;
        let protocol = |reason: String| ClientError::Protocol {
            url: self.url.clone(),
            method: method.clone(),
            path: path.to_owned(),
            reason,
        };
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| protocol(format!("{status} with a body that is not the API's: {e}")));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
            }),
            Err(_) => Err(protocol(format!(
                "{status} without the API's error body: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))),
        }
    }

    async fn exchange<B: Serialize>(
        &self,
        method: &Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(hyper::StatusCode, Bytes), ClientError> {
        let protocol = |reason: String| ClientError::Protocol {
            url: self.url.clone(),
            method: method.clone(),
            path: path.to_owned(),
            reason,
        };
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let connect = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let name = ServerName::try_from(self.host.clone())
                .map_err(|e| unreachable(format!("{:?} is not a host name: {e}", self.host)))?;
            TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| ClientError::Tls {
                    url: self.url.clone(),
                    reason: e.to_string(),
                    ca: self.ca.clone(),
                })
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "no connection within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })??;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| protocol(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(hyper::header::ACCEPT, "application/json");
        let payload = match body {
            Some(body) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(body).map_err(|e| protocol(e.to_string()))?
            }
            None => Vec::new(),
        };
        let request = request
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| protocol(e.to_string()))?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| protocol(e.to_string()));
        let result = match answer {
            Ok(answer) => {
                let status = answer.status();
                let limited = http_body_util::Limited::new(answer.into_body(), MAX_ANSWER);
                limited
                    .collect()
                    .await
                    .map(|b| (status, b.to_bytes()))
                    .map_err(|e| protocol(e.to_string()))
            }
            Err(e) => Err(e),
        };
        driver.abort();
        result
    }
}

/// `text` as one segment of a path or a value of a query: everything but the unreserved
/// characters percent-encoded, so an id with `/`, `?` or `%` in it cannot change the route.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `?k=v&…` of the pairs that have a value (empty when none has).
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cannot_change_the_route() {
        assert_eq!(encode("node-01"), "node-01");
        assert_eq!(encode("sha256:ab"), "sha256:ab");
        assert_eq!(encode("a/b?c=d%"), "a%2Fb%3Fc%3Dd%25");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(
            query(&[
                ("node", Some("n 1".into())),
                ("state", None),
                ("limit", Some("5".into()))
            ]),
            "?node=n%201&limit=5"
        );
        assert_eq!(query(&[("node", None)]), "");
    }
}
