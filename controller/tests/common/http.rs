//! A small HTTPS client for the tests: one connection per request, rustls (ring) pinned to the
//! controller's CA, optional client certificate, hyper HTTP/1.1. (reqwest is not used: its
//! rustls feature, unified across the workspace, would change how other crates' clients build.)

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde_json::Value;
use tokio_rustls::TlsConnector;

/// Any failure: connect, handshake, HTTP.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A client with a fixed TLS configuration.
#[derive(Clone)]
pub struct Client {
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    /// A client using `tls`.
    pub fn new(tls: rustls::ClientConfig) -> Self {
        Self { tls: Arc::new(tls) }
    }

    /// A request with `method` to `url`.
    pub fn request(&self, method: Method, url: impl AsRef<str>) -> RequestBuilder {
        RequestBuilder {
            client: self.clone(),
            method,
            url: url.as_ref().to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// GET.
    pub fn get(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::GET, url)
    }

    /// POST.
    pub fn post(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::POST, url)
    }

    /// PUT.
    pub fn put(&self, url: impl AsRef<str>) -> RequestBuilder {
        self.request(Method::PUT, url)
    }
}

/// A request being built.
pub struct RequestBuilder {
    client: Client,
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RequestBuilder {
    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer_auth(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// Raw body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// JSON body with its content type.
    pub fn json(self, value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).unwrap();
        self.header("content-type", "application/json").body(body)
    }

    /// Connects, handshakes, sends, reads the whole reply.
    pub async fn send(self) -> Result<Response, Error> {
        tokio::time::timeout(Duration::from_secs(20), self.send_inner()).await?
    }

    async fn send_inner(self) -> Result<Response, Error> {
        self.connect_inner().await?.send().await
    }

    /// Connects and handshakes (TCP, TLS, HTTP/1.1) now, within the same 20 s as
    /// [`RequestBuilder::send`]; the request goes out with [`Connected::send`]. For tests
    /// that must know a request reached the server before they act, e.g. that a long poll is
    /// held.
    pub async fn connect(self) -> Result<Connected, Error> {
        tokio::time::timeout(Duration::from_secs(20), self.connect_inner()).await?
    }

    async fn connect_inner(self) -> Result<Connected, Error> {
        let uri: Uri = self.url.parse()?;
        let host = uri
            .host()
            .ok_or("no host")?
            .trim_matches(['[', ']'])
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        let name = ServerName::try_from(host.clone())?;
        let tls = TlsConnector::from(self.client.tls.clone())
            .connect(name, tcp)
            .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let driver = tokio::spawn(conn);
        let mut request = Request::builder()
            .method(self.method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header("host", format!("{host}:{port}"));
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(Bytes::from(self.body)))?;
        Ok(Connected {
            sender,
            driver,
            request,
        })
    }
}

/// A request whose connection is up and whose request is not sent yet.
pub struct Connected {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<hyper::Result<()>>,
    request: Request<Full<Bytes>>,
}

impl Connected {
    /// Sends the request and reads the whole reply, however long it takes (the caller
    /// bounds it).
    pub async fn send(mut self) -> Result<Response, Error> {
        let reply = self.sender.send_request(self.request).await?;
        let status = reply.status();
        let body = reply.into_body().collect().await?.to_bytes();
        self.driver.abort();
        Ok(Response { status, body })
    }
}

/// A whole reply.
pub struct Response {
    status: StatusCode,
    body: Bytes,
}

impl Response {
    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body as JSON.
    pub async fn json(self) -> Result<Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}
