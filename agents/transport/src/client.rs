//! The client every node agent uses to call the controller's node API: HTTP/1.1 (hyper) over
//! rustls (ring). A connection outlives its call by [`KEEP_IDLE`] at most, for the next call
//! of a burst (eventd posting batch after batch): a node calls a few times a minute, so
//! between bursts it holds no connection on the controller, which a fleet of idle connections
//! would cost memory. A new certificate ([`ControllerClient::set_identity`]) closes the kept
//! connection, so the next call carries it.
//!
//! # Several controllers
//!
//! The client holds a list of controller URLs (replicas of one controller, on one database)
//! and one of them is *current*. A call goes to the current URL; when that controller cannot
//! be reached ([`TransportError::is_unreachable`]: connection refused or failed, no answer in
//! time, a failed TLS handshake, or 503 from a controller that cannot serve now) the same call
//! goes to the next URL, and so on around the list, each attempt with the call's whole timeout.
//! The first URL that answers — with a reply or with an error of its own, which another replica
//! would answer the same — becomes current, so later calls go straight to it. When every URL
//! failed, the call fails (with the first error that retrying may cure) and the caller's
//! [`Backoff`](crate::Backoff) spaces the next round; the current URL stays where it was.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::TransportError;
use crate::tls::{client_config, TlsIdentity};

/// Where the node API lives under the controller URL (DESIGN §5).
pub const API_PREFIX: &str = "node_api/v1/";

/// The largest reply accepted, so a broken or hostile controller cannot exhaust memory.
pub const MAX_REPLY: usize = 4 * 1024 * 1024;

/// How long a connection stays open after its call for the next one (module documentation).
pub const KEEP_IDLE: Duration = Duration::from_secs(1);

/// A connection to the controller — one of the node's list of controller URLs, failing over
/// between them (module documentation) — with the node's current TLS identity.
///
/// Cheap to share (`&self` everywhere). After certificate rotation,
/// [`ControllerClient::set_identity`] swaps the TLS identity in place, so every agent picks the
/// new certificate up without a restart.
pub struct ControllerClient {
    /// In the order given; never empty.
    endpoints: Vec<Endpoint>,
    /// Index into `endpoints` of the URL calls go to first.
    current: AtomicUsize,
    timeout: Duration,
    tls: RwLock<Arc<rustls::ClientConfig>>,
    /// Bumped by each [`ControllerClient::set_identity`]: a connection made before is not
    /// used again.
    identity: AtomicU64,
    /// The connection kept after the last call, for [`KEEP_IDLE`].
    parked: Arc<Mutex<Option<Parked>>>,
    /// Numbers the parked connections, so a late reaper cannot close a newer one.
    parks: AtomicU64,
}

/// An open connection to one endpoint, with the task that drives it.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// Closes the connection when dropped.
    _driver: AbortOnDrop,
}

/// A connection kept after its call.
struct Parked {
    endpoint: usize,
    identity: u64,
    serial: u64,
    conn: Conn,
}

/// One controller URL, parsed.
struct Endpoint {
    /// The URL as given, for [`ControllerClient::current_url`].
    url: String,
    /// `https://host:port/prefix/`, for messages.
    base: String,
    /// The path prefix of `base` (origin form, ends with `/`), for the request line.
    path: String,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for ControllerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerClient")
            .field("urls", &self.urls().collect::<Vec<_>>())
            .field("current", &self.current_url())
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

impl Endpoint {
    /// `url` (`https://host[:port][/prefix]`) parsed.
    fn parse(url: &str) -> Result<Endpoint, TransportError> {
        let bad = |reason: &str| TransportError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the controller is only spoken to over https"));
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name =
            ServerName::try_from(bare_host.clone()).map_err(|e| bad(&e.to_string()))?;
        let port = uri.port_u16().unwrap_or(443);
        let path = uri.path().trim_end_matches('/');
        let base = format!("https://{}:{port}{path}/", uri.host().unwrap_or_default());
        let path = format!("{path}/");
        Ok(Endpoint {
            url: url.to_owned(),
            base,
            path,
            host: bare_host,
            port,
            server_name,
        })
    }
}

impl ControllerClient {
    /// A client for the controller at `urls` (each `https://host[:port][/prefix]`, tried in
    /// this order; the first is current to begin with), trusting only `identity`'s CA, each
    /// attempt at a call (connect, handshake, request and reply) bounded by `timeout`.
    pub fn new<U: AsRef<str>>(
        urls: &[U],
        identity: &TlsIdentity,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let endpoints = urls
            .iter()
            .map(|url| Endpoint::parse(url.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(TransportError::Url {
                url: String::new(),
                reason: "no controller URL".to_owned(),
            });
        }
        let tls = Arc::new(client_config(identity)?);
        Ok(ControllerClient {
            endpoints,
            current: AtomicUsize::new(0),
            timeout,
            tls: RwLock::new(tls),
            identity: AtomicU64::new(0),
            parked: Arc::new(Mutex::new(None)),
            parks: AtomicU64::new(0),
        })
    }

    /// The URL calls go to first: the one that answered last (or the first of the list, until
    /// one has).
    pub fn current_url(&self) -> &str {
        &self.endpoints[self.current_index()].url
    }

    /// Every URL of the client, in the order they are tried from the first.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().map(|e| e.url.as_str())
    }

    fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.endpoints.len()
    }

    /// Replaces the TLS identity (after enrollment or rotation); calls already under way finish
    /// with the old one.
    pub fn set_identity(&self, identity: &TlsIdentity) -> Result<(), TransportError> {
        let tls = Arc::new(client_config(identity)?);
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = tls;
        self.identity.fetch_add(1, Ordering::SeqCst);
        *self.parked.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    /// `POST <url>/node_api/v1/<call>` with `body` as JSON; the reply's JSON as `Resp`.
    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        call: &str,
        body: &Req,
    ) -> Result<Resp, TransportError> {
        let body = serde_json::to_vec(body).map_err(|e| TransportError::BadReply {
            url: format!(
                "{}{API_PREFIX}{}",
                self.endpoints[self.current_index()].base,
                call.trim_start_matches('/')
            ),
            detail: format!("encoding the request: {e}"),
        })?;
        self.call(Method::POST, call, Some(Bytes::from(body)), self.timeout)
            .await
    }

    /// `GET <url>/node_api/v1/<call>` (`call` may carry a query), the reply's JSON as `Resp`,
    /// waiting up to `timeout` rather than the client's own: for the watch, which the
    /// controller holds for most of a minute.
    pub async fn get<Resp: DeserializeOwned>(
        &self,
        call: &str,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        self.call(Method::GET, call, None, timeout).await
    }

    /// One round: the current URL, then each next one while the controller there cannot be
    /// reached (module documentation).
    async fn call<Resp: DeserializeOwned>(
        &self,
        method: Method,
        call: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let call = call.trim_start_matches('/');
        let start = self.current_index();
        let count = self.endpoints.len();
        let mut failed: Option<TransportError> = None;
        for i in (0..count).map(|k| (start + k) % count) {
            let endpoint = &self.endpoints[i];
            let outcome = self
                .attempt(i, method.clone(), call, body.clone(), timeout)
                .await;
            match outcome {
                Err(e) if e.is_unreachable() => {
                    if count > 1 {
                        tracing::debug!(url = %endpoint.url, error = %e, "controller unreachable; trying the next URL");
                    }
                    // The first error retrying may cure is the one to report: a URL further
                    // on that refuses for good (a CA mismatch) must not stop the caller's
                    // retries while the others may come back.
                    if failed.as_ref().is_none_or(|f| !f.is_retryable()) {
                        failed = Some(e);
                    }
                }
                outcome => {
                    if i != start && self.current.swap(i, Ordering::Relaxed) != i {
                        tracing::info!(url = %endpoint.url, "controller URL in use changed");
                    }
                    return outcome;
                }
            }
        }
        // Every URL was tried and set `failed`; a client has at least one.
        Err(failed.unwrap_or_else(|| TransportError::Url {
            url: String::new(),
            reason: "no controller URL".to_owned(),
        }))
    }

    /// One attempt at endpoint `index`, bounded by `timeout`.
    async fn attempt<Resp: DeserializeOwned>(
        &self,
        index: usize,
        method: Method,
        call: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Resp, TransportError> {
        let endpoint = &self.endpoints[index];
        let url = format!("{}{API_PREFIX}{call}", endpoint.base);
        let target = format!("{}{API_PREFIX}{call}", endpoint.path);
        let exchange = self.exchange(index, method, &url, &target, body);
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                url,
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// One call: `url` for messages, `target` (origin form) for the request line.
    async fn exchange<Resp: DeserializeOwned>(
        &self,
        index: usize,
        method: Method,
        url: &str,
        target: &str,
        body: Option<Bytes>,
    ) -> Result<Resp, TransportError> {
        let endpoint = &self.endpoints[index];
        let request = || {
            let mut request = Request::builder()
                .method(method.clone())
                .uri(target)
                .header(
                    hyper::header::HOST,
                    format!("{}:{}", endpoint.host, endpoint.port),
                )
                .header(hyper::header::ACCEPT, "application/json");
            if body.is_some() {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            request
                .body(Full::new(body.clone().unwrap_or_default()))
                .map_err(|e| TransportError::Connect {
                    url: url.to_owned(),
                    detail: e.to_string(),
                })
        };
        let (response, mut conn) = match self.unpark(index) {
            Some(mut conn) => match conn.sender.try_send_request(request()?).await {
                Ok(response) => (response, conn),
                Err(mut e) => match e.take_message() {
                    // Closed while it was kept, before the request went out: a new one.
                    Some(request) => self.fresh_exchange(endpoint, url, request).await?,
                    None => return Err(http_error(url, e.error())),
                },
            },
            None => self.fresh_exchange(endpoint, url, request()?).await?,
        };
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| TransportError::BadReply {
                url: url.to_owned(),
                detail: format!("reading the reply: {e}"),
            })?
            .to_bytes();
        // The reply is read whole: the connection is free for the next call.
        if conn.sender.ready().await.is_ok() {
            self.park(index, conn);
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
                url: url.to_owned(),
                status: status.as_u16(),
                code,
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| TransportError::BadReply {
            url: url.to_owned(),
            detail: e.to_string(),
        })
    }
}

impl ControllerClient {
    /// A new connection to `endpoint`, and `request` sent on it.
    async fn fresh_exchange(
        &self,
        endpoint: &Endpoint,
        url: &str,
        request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Conn), TransportError> {
        let mut conn = self.connect(endpoint, url).await?;
        let response = conn
            .sender
            .send_request(request)
            .await
            .map_err(|e| http_error(url, &e))?;
        Ok((response, conn))
    }

    /// Connects to `endpoint`: TCP, the TLS handshake with the current identity, HTTP/1.1.
    async fn connect(&self, endpoint: &Endpoint, url: &str) -> Result<Conn, TransportError> {
        let connect = |detail: String| TransportError::Connect {
            url: url.to_owned(),
            detail,
        };
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => TransportError::Refused {
                    url: url.to_owned(),
                    detail: e.to_string(),
                },
                _ => connect(e.to_string()),
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        let stream = TlsConnector::from(tls)
            .connect(endpoint.server_name.clone(), tcp)
            .await
            .map_err(|e| handshake_error(url, e))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect(e.to_string()))?;
        // Drives the connection until the `Conn` is dropped (after its call or its time
        // kept, or at a timeout). A connection that dies early makes the send fail, so
        // nothing waits on it.
        let driver = AbortOnDrop(tokio::spawn(async move {
            let _ = connection.await;
        }));
        Ok(Conn {
            sender,
            _driver: driver,
        })
    }

    /// The kept connection, if it is to endpoint `index`, made with the current identity and
    /// still open.
    fn unpark(&self, index: usize) -> Option<Conn> {
        let parked = self
            .parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        let usable = parked.endpoint == index
            && parked.identity == self.identity.load(Ordering::SeqCst)
            && !parked.conn.sender.is_closed();
        usable.then_some(parked.conn)
    }

    /// Keeps `conn` for [`KEEP_IDLE`], in place of any connection kept before.
    fn park(&self, index: usize, conn: Conn) {
        let serial = self.parks.fetch_add(1, Ordering::Relaxed);
        *self.parked.lock().unwrap_or_else(|e| e.into_inner()) = Some(Parked {
            endpoint: index,
            identity: self.identity.load(Ordering::SeqCst),
            serial,
            conn,
        });
        let slot = Arc::downgrade(&self.parked);
        tokio::spawn(async move {
            tokio::time::sleep(KEEP_IDLE).await;
            if let Some(slot) = slot.upgrade() {
                let mut parked = slot.lock().unwrap_or_else(|e| e.into_inner());
                if parked.as_ref().is_some_and(|p| p.serial == serial) {
                    *parked = None;
                }
            }
        });
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A failed TLS handshake: a certificate the pinned CA does not vouch for is a CA mismatch;
/// anything else (our certificate refused, protocol trouble) a handshake failure.
fn handshake_error(url: &str, e: std::io::Error) -> TransportError {
    let url = url.to_owned();
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(reason)) => TransportError::CaMismatch {
            url,
            detail: format!("invalid peer certificate: {reason:?}"),
        },
        Some(other) => TransportError::Handshake {
            url,
            detail: other.to_string(),
        },
        None => TransportError::Handshake {
            url,
            detail: e.to_string(),
        },
    }
}

/// An HTTP-level failure: the connection dropped, or the peer did not speak HTTP.
fn http_error(url: &str, e: &hyper::Error) -> TransportError {
    let detail = std::iter::successors(Some(e as &dyn std::error::Error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ");
    if e.is_parse() {
        TransportError::BadReply {
            url: url.to_owned(),
            detail,
        }
    } else {
        TransportError::Connect {
            url: url.to_owned(),
            detail,
        }
    }
}
