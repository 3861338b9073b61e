//! Enrolling the simulated nodes, and opening their connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use rcgen::{CertificateParams, DnType, KeyPair};
use serde_json::{json, Value};

use crate::http::{source_ip, tls_config, Conn, Target};

/// A simulated node's id, certificate and TLS identity.
pub struct Node {
    /// Its index: its source address and name (`bench-{index}`).
    pub index: usize,
    /// The controller's id for it.
    pub id: String,
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// The end of the certificate's validity, ms since the epoch.
    pub not_after_ms: u64,
    /// A client configuration with its certificate and key.
    pub config: Arc<rustls::ClientConfig>,
}

/// Creates a token for each of `count` nodes and enrolls them, `concurrency` at a time, each
/// worker on one anonymous keep-alive connection; the nodes in index order.
pub async fn enroll_all(
    target: &Target,
    count: usize,
    concurrency: usize,
    ca_pem: &str,
    operator: &str,
) -> anyhow::Result<Vec<Node>> {
    let anon = Arc::new(tls_config(ca_pem, None)?);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.clamp(1, count) {
        let anon = anon.clone();
        let next = next.clone();
        let target = target.clone();
        let operator = operator.to_owned();
        let ca_pem = ca_pem.to_owned();
        let total = count as u64;
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&target, None, anon).await?;
            let mut nodes = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                nodes.push(enroll_one(&mut conn, i as usize, &operator, &ca_pem).await?);
            }
            anyhow::Ok(nodes)
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort_by_key(|n| n.index);
    Ok(all)
}

async fn enroll_one(
    conn: &mut Conn,
    index: usize,
    operator: &str,
    ca_pem: &str,
) -> anyhow::Result<Node> {
    let (status, body) = conn.post("/api/v1/tokens", Some(operator), b"{}").await?;
    anyhow::ensure!(
        status == 200,
        "token create: HTTP {status} {}",
        String::from_utf8_lossy(&body)
    );
    let body: Value = serde_json::from_slice(&body)?;
    let token = body["token"].as_str().context("no token")?.to_owned();
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, "node");
    let csr = params.serialize_request(&key)?.pem()?;
    let request = json!({
        "bootstrap_token": token,
        "csr_pem": csr,
        "identity": {"uuid": format!("bench-{index:06}"), "hostname": format!("bench-{index}"),
                     "arch": "x86_64", "boot_id": "b-1"},
        "agent_version": "loadgen",
    });
    let (status, body) = conn
        .post("/node_api/v1/enroll", None, &serde_json::to_vec(&request)?)
        .await?;
    anyhow::ensure!(
        status == 200,
        "enroll: HTTP {status} {}",
        String::from_utf8_lossy(&body)
    );
    let body: Value = serde_json::from_slice(&body)?;
    let cert_pem = body["cert_pem"].as_str().context("no cert_pem")?.to_owned();
    let key_pem = key.serialize_pem();
    let config = Arc::new(tls_config(ca_pem, Some((&cert_pem, &key_pem)))?);
    Ok(Node {
        index,
        id: body["node_id"].as_str().context("no node_id")?.to_owned(),
        not_after_ms: body["not_after_ms"].as_u64().unwrap_or_default(),
        cert_pem,
        config,
    })
}

/// One mTLS connection per node, from the node's own source address, `concurrency` opened
/// at a time.
pub async fn connect_all(
    target: &Target,
    nodes: &[Node],
    concurrency: usize,
) -> anyhow::Result<Vec<Conn>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut opens = Vec::with_capacity(nodes.len());
    for node in nodes {
        let config = node.config.clone();
        let source = source_ip(node.index);
        let target = target.clone();
        let sem = sem.clone();
        opens.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await?;
            anyhow::Ok(Conn::open(&target, Some(source), config).await?)
        }));
    }
    let mut conns = Vec::with_capacity(nodes.len());
    for open in opens {
        conns.push(open.await??);
    }
    Ok(conns)
}
