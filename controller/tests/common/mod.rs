//! Test helpers: an in-process controller on 127.0.0.1:0 with a real data directory, real TLS
//! clients pinned to its CA, and node keys/CSRs made the way a node makes them (Ed25519).

#![allow(dead_code)]

pub mod database;
pub mod http;
pub mod pgcluster;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use powernode_controller::events::EventRetention;
use powernode_controller::server::{RunningController, ServeOptions};
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

/// A running controller.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    /// The PostgreSQL database, when the run is on PostgreSQL.
    pub database: Option<String>,
    pub base: String,
    pub ca_pem: String,
    pub operator_token: String,
    running: RunningController,
}

impl TestServer {
    pub async fn start(cert_lifetime: Duration) -> Self {
        Self::start_with(cert_lifetime, EventRetention::default()).await
    }

    /// [`TestServer::start`] keeping events as `event_retention` says.
    pub async fn start_with(cert_lifetime: Duration, event_retention: EventRetention) -> Self {
        Self::start_on(cert_lifetime, event_retention, database::fresh().await).await
    }

    /// [`TestServer::start_with`] on `database` (PostgreSQL), or the embedded SQLite one.
    pub async fn start_on(
        cert_lifetime: Duration,
        event_retention: EventRetention,
        database: Option<String>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let opts = ServeOptions {
            data: dir.path().join("data"),
            listen: "127.0.0.1:0".parse().unwrap(),
            cert_lifetime,
            hostnames: Vec::new(),
            heartbeat_interval_s: 15,
            database: database.clone(),
        };
        let running = RunningController::start_with(&opts, event_retention)
            .await
            .unwrap();
        let base = format!("https://127.0.0.1:{}", running.addr().port());
        let ca_pem = running.ca_pem().to_owned();
        let operator_token = std::fs::read_to_string(opts.data.join("operator.token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            dir,
            database,
            base,
            ca_pem,
            operator_token,
            running,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The controller's database, opened beside it (on the backend of the run).
    pub async fn storage(&self) -> powernode_controller::storage::Storage {
        match &self.database {
            Some(url) => powernode_controller::storage::Storage::open_postgres(url).await,
            None => powernode_controller::storage::Storage::open(&self.data()).await,
        }
        .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A client that trusts only this controller's CA and sends no certificate.
    pub fn anonymous(&self) -> http::Client {
        client(&self.ca_pem, None)
    }

    /// A client presenting `node`'s certificate.
    pub fn as_node(&self, node: &NodeCreds) -> http::Client {
        client(&self.ca_pem, Some((&node.cert_pem, &node.key_pem)))
    }

    /// Creates a bootstrap token through the operator API.
    pub async fn token(&self, body: Value) -> String {
        let (status, reply) = self.operator_post("/api/v1/tokens", &body).await;
        assert_eq!(status, 200, "{reply}");
        reply["token"].as_str().unwrap().to_owned()
    }

    /// Enrolls a fresh node with a fresh token; panics unless it works.
    pub async fn enroll_new(&self, uuid: &str) -> NodeCreds {
        self.enroll_new_with_arch(uuid, "x86_64").await
    }

    /// [`TestServer::enroll_new`] for a node that reports `arch`.
    pub async fn enroll_new_with_arch(&self, uuid: &str, arch: &str) -> NodeCreds {
        let token = self.token(json!({})).await;
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut body = enroll_body(&token, &csr_pem(&key), uuid);
        body["identity"]["arch"] = json!(arch);
        let reply = self
            .anonymous()
            .post(self.url("/node_api/v1/enroll"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
        let body: Value = reply.json().await.unwrap();
        NodeCreds {
            node_id: body["node_id"].as_str().unwrap().to_owned(),
            cert_pem: body["cert_pem"].as_str().unwrap().to_owned(),
            key_pem: key.serialize_pem(),
        }
    }

    /// `GET path` on the operator API with the operator token: status and JSON body.
    pub async fn operator_get(&self, path: &str) -> (u16, Value) {
        self.operator_call::<()>(Method::GET, path, None).await
    }

    /// `POST path` with `body` as JSON on the operator API with the operator token: status
    /// and JSON body.
    pub async fn operator_post(&self, path: &str, body: &impl serde::Serialize) -> (u16, Value) {
        self.operator_call(Method::POST, path, Some(body)).await
    }

    /// `PUT path` with `body` as JSON on the operator API with the operator token: status
    /// and JSON body.
    pub async fn operator_put(&self, path: &str, body: &impl serde::Serialize) -> (u16, Value) {
        self.operator_call(Method::PUT, path, Some(body)).await
    }

    /// `method path` on the operator API with the operator token, and `body` as JSON where
    /// there is one: status and JSON body.
    async fn operator_call<B: serde::Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> (u16, Value) {
        let mut request = self
            .anonymous()
            .request(method, self.url(path))
            .bearer_auth(&self.operator_token);
        if let Some(body) = body {
            request = request.json(body);
        }
        status_json(request.send().await.unwrap()).await
    }

    pub async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}

/// A node's certificate and key.
#[derive(Clone)]
pub struct NodeCreds {
    pub node_id: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> http::Client {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    http::Client::new(config)
}

pub fn csr_pem(key: &KeyPair) -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "node");
    params.serialize_request(key).unwrap().pem().unwrap()
}

pub fn enroll_body(token: &str, csr_pem: &str, uuid: &str) -> Value {
    json!({
        "bootstrap_token": token,
        "csr_pem": csr_pem,
        "identity": {"uuid": uuid, "hostname": "edge-1", "arch": "x86_64", "boot_id": "b-1"},
        "agent_version": "0.1.0",
    })
}

pub fn heartbeat_body(applied_generation: u64) -> Value {
    json!({
        "boot_id": "b-1",
        "agent_version": "0.1.0",
        "arch": "x86_64",
        "uptime_s": 42,
        "load": [0.1, 0.2, 0.3],
        "memory": {"total_bytes": 1024, "available_bytes": 512},
        "modules": [{"name": "tools", "digest": "sha256:00", "state": "Active"}],
        "mounts": {"stack": "a"},
        "network": {"state": "Down"},
        "enrollment": {"state": "Enrolled", "rotation_attempts": 0},
        "applied_generation": applied_generation,
        "something_newer": {"ignored": true},
    })
}

/// `POST url` with `body` as JSON through `client`: the reply's status and JSON body.
pub async fn post_json(
    client: &http::Client,
    url: String,
    body: &impl serde::Serialize,
) -> (u16, Value) {
    status_json(client.post(url).json(body).send().await.unwrap()).await
}

/// Status and JSON body of a reply.
pub async fn status_json(reply: http::Response) -> (u16, Value) {
    let status = reply.status().as_u16();
    let body = reply.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// The `error.code` of a JSON error body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// The controller binary of this build. Known only to the controller's own tests: this file is
/// also compiled into other crates' tests (heartbeatd's), which do not run the binary.
pub fn bin() -> &'static str {
    match option_env!("CARGO_BIN_EXE_powernode-controller") {
        Some(bin) => bin,
        None => panic!("the controller binary is known only to the controller's own tests"),
    }
}

/// Runs the binary with `args`: exit code, stdout, stderr.
pub async fn run(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(bin())
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the binary with `args`; it must exit 0. Answers its stdout.
pub async fn run_ok(args: &[&str]) -> String {
    let (exit, out, stderr) = run(args).await;
    assert_eq!(exit, 0, "{args:?}: {stderr}");
    out
}

/// The JSON a command printed.
pub fn parse<T: serde::de::DeserializeOwned>(out: &str) -> T {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}
