//! Loopback stand-ins for the cloud metadata services: a small HTTP/1.1 responder on a tokio
//! `TcpListener` that checks the method, path and headers the way the real services do and
//! answers 200/400/401/403/404 — or never answers, to exercise timeouts.

#![allow(dead_code)] // each test file uses its own part of this

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use agentbase::settings::IdentitySettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One request as the server saw it. Header names are lower case.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    pub headers: HashMap<String, String>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// What to answer; `None` from a handler means "never answer".
pub struct Response {
    pub status: u16,
    pub body: String,
}

pub fn ok(body: &str) -> Option<Response> {
    Some(Response {
        status: 200,
        body: body.to_owned(),
    })
}

pub fn status(status: u16) -> Option<Response> {
    Some(Response {
        status,
        body: String::new(),
    })
}

type Handler = dyn Fn(&Request) -> Option<Response> + Send + Sync;

/// A running server; stops when dropped.
pub struct Server {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(
        handler: impl Fn(&Request) -> Option<Response> + Send + Sync + 'static,
    ) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handler: Arc<Handler> = Arc::new(handler);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    log.lock().unwrap().push(request.clone());
                    match handler(&request) {
                        Some(response) => {
                            let reply = format!(
                                "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                                response.status,
                                reason(response.status),
                                response.body.len(),
                                response.body
                            );
                            let _ = stream.write_all(reply.as_bytes()).await;
                            let _ = stream.shutdown().await;
                        }
                        None => {
                            // Hold the connection open and say nothing.
                            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                        }
                    }
                });
            }
        });
        Server {
            url,
            requests,
            task,
        }
    }

    /// The requests seen so far.
    pub fn seen(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let target = first.next()?.to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Request {
        method,
        target,
        headers,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Other",
    }
}

/// The session token the fake IMDSv2 hands out.
pub const AWS_TOKEN: &str = "AQAEAFakeSessionToken==";

/// AWS IMDSv2: PUT /latest/api/token needs the TTL header; every GET needs `required_token`
/// (401 otherwise, as the real service answers once IMDSv1 is disabled).
pub fn aws(
    instance_id: &'static str,
    user_data: Option<&'static str>,
    required_token: &'static str,
) -> impl Fn(&Request) -> Option<Response> + Send + Sync + 'static {
    move |r| match (r.method.as_str(), r.target.as_str()) {
        ("PUT", "/latest/api/token") => match r.header("X-aws-ec2-metadata-token-ttl-seconds") {
            Some(ttl) if ttl.parse::<u32>().is_ok_and(|t| (1..=21600).contains(&t)) => {
                ok(AWS_TOKEN)
            }
            _ => status(400),
        },
        ("GET", target) => {
            if r.header("X-aws-ec2-metadata-token") != Some(required_token) {
                return status(401);
            }
            match target {
                "/latest/meta-data/instance-id" => ok(instance_id),
                "/latest/user-data" => user_data.map_or_else(|| status(404), ok),
                _ => status(404),
            }
        }
        _ => status(405),
    }
}

/// Google Cloud: 403 unless `Metadata-Flavor` is `required_flavor`.
pub fn gcp(
    id: &'static str,
    user_data: Option<&'static str>,
    required_flavor: &'static str,
) -> impl Fn(&Request) -> Option<Response> + Send + Sync + 'static {
    move |r| {
        if r.header("Metadata-Flavor") != Some(required_flavor) {
            return status(403);
        }
        match (r.method.as_str(), r.target.as_str()) {
            ("GET", "/computeMetadata/v1/instance/id") => ok(id),
            ("GET", "/computeMetadata/v1/instance/attributes/user-data") => {
                user_data.map_or_else(|| status(404), ok)
            }
            _ => status(404),
        }
    }
}

/// Azure IMDS: 400 without `Metadata: true` or without an api-version.
pub fn azure(
    document: &'static str,
    user_data_b64: Option<&'static str>,
) -> impl Fn(&Request) -> Option<Response> + Send + Sync + 'static {
    move |r| {
        if r.header("Metadata") != Some("true") || !r.target.contains("api-version=") {
            return status(400);
        }
        let path = r.target.split('?').next().unwrap_or_default();
        match (r.method.as_str(), path) {
            ("GET", "/metadata/instance") => ok(document),
            ("GET", "/metadata/instance/compute/userData") => ok(user_data_b64.unwrap_or("")),
            _ => status(404),
        }
    }
}

/// A service at fixed paths without any header requirements (DigitalOcean, Hetzner).
pub fn plain(
    routes: &'static [(&'static str, &'static str)],
) -> impl Fn(&Request) -> Option<Response> + Send + Sync + 'static {
    move |r| {
        if r.method != "GET" {
            return status(405);
        }
        routes
            .iter()
            .find(|(path, _)| *path == r.target)
            .map_or_else(|| status(404), |(_, body)| ok(body))
    }
}

/// A base URL where nothing listens (connection refused).
pub async fn closed_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// Settings with every cloud pointed at `url` (use [`closed_url`] for "no cloud here").
pub fn settings_with_clouds(url: &str) -> IdentitySettings {
    IdentitySettings {
        source_timeout_ms: 300,
        aws_url: url.to_owned(),
        gcp_url: url.to_owned(),
        azure_url: url.to_owned(),
        digitalocean_url: url.to_owned(),
        hetzner_url: url.to_owned(),
        ..IdentitySettings::default()
    }
}

/// Writes `contents` at `rel` under `root`, creating directories.
pub fn write(root: &std::path::Path, rel: &str, contents: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

pub const UUID: &str = "6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b";
pub const PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----\n";
