//! The transport against a real TLS server on loopback (tokio-rustls, certificates from a real
//! CA made with rcgen): pinning, client certificates, rotation, every kind of failure, and
//! failing over between several controller URLs.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{closed_port, silent};
use powernode_transport::pki::PkiPaths;
use powernode_transport::{ClientCert, ControllerClient, TlsIdentity, TransportError};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A CA that can issue server and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for `names`, issued by this CA.
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        (
            params.signed_by(&key, &self.issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }
}

/// An HTTPS server on 127.0.0.1 that verifies client certificates against `ca` when given
/// (but lets clients without one in), answering by path:
/// echo → the request body; whoami → the client certificate's DER as hex (or null);
/// denied → 401 with a controller error body; oops → 500 plain text; garbage → 200 not JSON;
/// busy → 503 with a controller error body; slow → never answers.
async fn server(ca: &Ca) -> SocketAddr {
    // Left running for the rest of the test process, as a controller that never goes away.
    let running =
        std::mem::ManuallyDrop::new(Server::start(ca, "127.0.0.1:0".parse().unwrap(), false).await);
    running.addr
}

/// A running [`server`] that counts the connections it accepted and stops when dropped.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// A server on `addr`; with `busy`, every request is answered 503. Each connection
    /// carries one request.
    async fn start(ca: &Ca, addr: SocketAddr, busy: bool) -> Server {
        Server::serve(ca, addr, busy, false).await
    }

    /// [`Server::start`], but with `keep_alive` a connection carries requests until the
    /// client closes it.
    async fn serve(ca: &Ca, addr: SocketAddr, busy: bool, keep_alive: bool) -> Server {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .unwrap();
        let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| hex(c.as_ref()));
                    loop {
                        let (path, body) = read_request(&mut tls).await;
                        if path.is_empty() {
                            return; // the client closed the connection
                        }
                        let (status, reply) = match path.as_str() {
                        _ if busy => (
                            "503 Service Unavailable",
                            json!({"error": {"code": "unavailable", "message": "try another"}})
                                .to_string(),
                        ),
                        "/node_api/v1/echo" => ("200 OK", body),
                        "/node_api/v1/whoami" => ("200 OK", json!({ "cert": peer }).to_string()),
                        "/node_api/v1/denied" => (
                            "401 Unauthorized",
                            json!({"error": {"code": "bad_token", "message": "token not known"}})
                                .to_string(),
                        ),
                        "/node_api/v1/oops" => {
                            ("500 Internal Server Error", "internal error".into())
                        }
                        "/node_api/v1/garbage" => ("200 OK", "this is not json".into()),
                        "/node_api/v1/slow" => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        _ => (
                            "404 Not Found",
                            json!({"error": {"code": "not_found", "message": path}}).to_string(),
                        ),
                    };
                        let close = if keep_alive {
                            ""
                        } else {
                            "connection: close\r\n"
                        };
                        let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{close}\r\n",
                    reply.len()
                );
                        let _ = tls.write_all(head.as_bytes()).await;
                        let _ = tls.write_all(reply.as_bytes()).await;
                        if !keep_alive {
                            let _ = tls.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        Server {
            addr,
            accepted,
            task,
        }
    }
}

async fn read_request(tls: &mut (impl AsyncReadExt + Unpin)) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = tls.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return (String::new(), String::new());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while buf.len() < header_end + len {
        let n = tls.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    (
        path,
        String::from_utf8_lossy(&buf[header_end..]).to_string(),
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn der_hex(pem: &str) -> String {
    hex(CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref())
}

fn identity(ca: &Ca, client: Option<(String, String)>) -> TlsIdentity {
    TlsIdentity {
        ca_pem: ca.pem.clone(),
        client: client.map(|(chain_pem, key_pem)| ClientCert { chain_pem, key_pem }),
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the server at `addr` that pins `ca` and presents no certificate.
fn anonymous(ca: &Ca, addr: SocketAddr) -> ControllerClient {
    ControllerClient::new(&[url(addr)], &identity(ca, None), TIMEOUT).unwrap()
}

/// The controller URL of a server at `addr`.
fn url(addr: SocketAddr) -> String {
    format!("https://127.0.0.1:{}", addr.port())
}

#[tokio::test]
async fn round_trip_with_the_pinned_ca_and_no_client_certificate() {
    let ca = Ca::new();
    let addr = server(&ca).await;
    let client = anonymous(&ca, addr);
    let reply: Value = client
        .post("echo", &json!({"hello": "controller", "n": 3}))
        .await
        .unwrap();
    assert_eq!(reply, json!({"hello": "controller", "n": 3}));
    let who: Value = client.post("whoami", &json!({})).await.unwrap();
    assert_eq!(who, json!({"cert": null}));
}

#[tokio::test]
async fn presents_the_node_certificate_and_picks_up_a_rotated_one() {
    let ca = Ca::new();
    let addr = server(&ca).await;
    let first = ca.issue(&["node-1"]);
    let url = format!("https://localhost:{}/", addr.port());
    let client =
        ControllerClient::new(&[url], &identity(&ca, Some(first.clone())), TIMEOUT).unwrap();
    let who: Value = client.post("whoami", &json!({})).await.unwrap();
    assert_eq!(who["cert"], json!(der_hex(&first.0)));

    let rotated = ca.issue(&["node-1"]);
    client
        .set_identity(&identity(&ca, Some(rotated.clone())))
        .unwrap();
    let who: Value = client.post("whoami", &json!({})).await.unwrap();
    assert_eq!(
        who["cert"],
        json!(der_hex(&rotated.0)),
        "the rotated certificate is used without a new client"
    );
}

/// Calls in quick succession share one connection; a rotated certificate, or a pause longer
/// than `KEEP_IDLE`, makes the next call open a new one.
#[tokio::test]
async fn a_burst_shares_a_connection_until_it_idles_or_the_identity_changes() {
    let ca = Ca::new();
    let server = Server::serve(&ca, "127.0.0.1:0".parse().unwrap(), false, true).await;
    let first = ca.issue(&["node-1"]);
    let client = ControllerClient::new(
        &[url(server.addr)],
        &identity(&ca, Some(first.clone())),
        TIMEOUT,
    )
    .unwrap();
    for n in 0..5 {
        let reply: Value = client.post("echo", &json!({ "n": n })).await.unwrap();
        assert_eq!(reply, json!({ "n": n }));
    }
    let who: Value = client.get("whoami", TIMEOUT).await.unwrap();
    assert_eq!(who["cert"], json!(der_hex(&first.0)));
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "one connection for the burst"
    );

    let rotated = ca.issue(&["node-1"]);
    client
        .set_identity(&identity(&ca, Some(rotated.clone())))
        .unwrap();
    let who: Value = client.post("whoami", &json!({})).await.unwrap();
    assert_eq!(who["cert"], json!(der_hex(&rotated.0)));
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        2,
        "a new one for the new certificate"
    );

    tokio::time::sleep(powernode_transport::KEEP_IDLE + Duration::from_millis(300)).await;
    let _: Value = client.post("echo", &json!({})).await.unwrap();
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        3,
        "none kept past KEEP_IDLE"
    );
}

#[tokio::test]
async fn a_controller_of_another_ca_is_refused() {
    let ca = Ca::new();
    let addr = server(&ca).await;
    let other = Ca::new();
    let client = ControllerClient::new(&[url(addr)], &identity(&other, None), TIMEOUT).unwrap();
    let err = client
        .post::<_, Value>("echo", &json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::CaMismatch { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn controller_errors_are_typed() {
    let ca = Ca::new();
    let addr = server(&ca).await;
    let client = anonymous(&ca, addr);

    let err = client
        .post::<_, Value>("denied", &json!({}))
        .await
        .unwrap_err();
    match &err {
        TransportError::Status {
            status,
            code,
            message,
            ..
        } => {
            assert_eq!(
                (*status, code.as_str(), message.as_str()),
                (401, "bad_token", "token not known")
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.code(), Some("bad_token"));
    assert!(!err.is_retryable());

    let err = client
        .post::<_, Value>("oops", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransportError::Status { status: 500, code, .. } if code == "unknown"),
        "{err:?}"
    );
    assert!(err.is_retryable());

    let err = client
        .post::<_, Value>("garbage", &json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::BadReply { .. }), "{err:?}");
}

#[tokio::test]
async fn a_controller_that_does_not_answer_times_out() {
    let ca = Ca::new();
    let addr = server(&ca).await;
    let client = ControllerClient::new(
        &[url(addr)],
        &identity(&ca, None),
        Duration::from_millis(300),
    )
    .unwrap();
    let err = client
        .post::<_, Value>("slow", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Timeout {
                timeout_ms: 300,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_controller_that_is_down_is_a_retryable_connect_error() {
    let ca = Ca::new();
    let client =
        ControllerClient::new(&[url(closed_port())], &identity(&ca, None), TIMEOUT).unwrap();
    let err = client
        .post::<_, Value>("echo", &json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
    assert!(err.is_retryable());
}

#[test]
fn bad_urls_and_credentials_are_refused_up_front() {
    let ca = Ca::new();
    for url in ["http://127.0.0.1:1", "not a url", "https://"] {
        let err = ControllerClient::new(&[url], &identity(&ca, None), TIMEOUT).unwrap_err();
        assert!(matches!(err, TransportError::Url { .. }), "{url}: {err:?}");
        // One bad URL in a list makes the list bad: it is a configuration error.
        let err = ControllerClient::new(
            &["https://good.example", url],
            &identity(&ca, None),
            TIMEOUT,
        )
        .unwrap_err();
        assert!(matches!(err, TransportError::Url { .. }), "{url}: {err:?}");
    }
    let none: &[&str] = &[];
    let err = ControllerClient::new(none, &identity(&ca, None), TIMEOUT).unwrap_err();
    assert!(matches!(err, TransportError::Url { .. }), "{err:?}");
    let broken = TlsIdentity {
        ca_pem: "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n".into(),
        client: None,
    };
    assert!(matches!(
        ControllerClient::new(&["https://x"], &broken, TIMEOUT),
        Err(TransportError::Credentials(_))
    ));
    let empty = TlsIdentity {
        ca_pem: String::new(),
        client: None,
    };
    assert!(matches!(
        ControllerClient::new(&["https://x"], &empty, TIMEOUT),
        Err(TransportError::Credentials(_))
    ));
    let (cert, _) = ca.issue(&["node"]);
    let (_, other_key) = ca.issue(&["node"]);
    let mismatched = identity(&ca, Some((cert, other_key)));
    let err = ControllerClient::new(&["https://x"], &mismatched, TIMEOUT).unwrap_err();
    assert!(matches!(err, TransportError::Credentials(_)), "{err:?}");
}

#[test]
fn pki_files_load_as_an_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = PkiPaths::under(tmp.path());
    assert!(
        matches!(pki.load(), Err(TransportError::Credentials(m)) if m.contains("not enrolled"))
    );
    std::fs::create_dir_all(pki.dir()).unwrap();
    let ca = Ca::new();
    std::fs::write(pki.ca(), &ca.pem).unwrap();
    assert_eq!(pki.load().unwrap(), identity(&ca, None));
    let (cert, key) = ca.issue(&["node"]);
    std::fs::write(pki.cert(), &cert).unwrap();
    assert!(matches!(pki.load(), Err(TransportError::Credentials(m)) if m.contains("key.pem")));
    std::fs::write(pki.key(), &key).unwrap();
    assert_eq!(pki.load().unwrap(), identity(&ca, Some((cert, key))));
}

/// A refused port and a silent listener before a live controller: the call reaches the live
/// one, which becomes current, and the next call goes straight to it.
#[tokio::test]
async fn fails_over_past_unreachable_urls_and_stays_with_the_one_that_answers() {
    let ca = Ca::new();
    let live = Server::start(&ca, "127.0.0.1:0".parse().unwrap(), false).await;
    let (hung, hung_accepted) = silent().await;
    let timeout = Duration::from_millis(500);
    let urls = [url(closed_port()), url(hung), url(live.addr)];
    let client = ControllerClient::new(&urls, &identity(&ca, None), timeout).unwrap();
    assert_eq!(client.current_url(), urls[0]);
    assert_eq!(client.urls().collect::<Vec<_>>(), urls);

    let reply: Value = client.post("echo", &json!({"n": 1})).await.unwrap();
    assert_eq!(reply, json!({"n": 1}));
    assert_eq!(client.current_url(), urls[2]);
    assert_eq!(
        hung_accepted.load(Ordering::SeqCst),
        1,
        "the silent one was tried"
    );
    assert_eq!(live.accepted.load(Ordering::SeqCst), 1);

    let started = Instant::now();
    let reply: Value = client.post("echo", &json!({"n": 2})).await.unwrap();
    assert_eq!(reply, json!({"n": 2}));
    assert!(
        started.elapsed() < timeout,
        "the second call waited on an unreachable URL: {:?}",
        started.elapsed()
    );
    assert_eq!(hung_accepted.load(Ordering::SeqCst), 1, "not tried again");
    assert_eq!(live.accepted.load(Ordering::SeqCst), 2);
    // A GET goes the same way.
    let who: Value = client.get("whoami", timeout).await.unwrap();
    assert_eq!(who, json!({"cert": null}));
    assert_eq!(client.current_url(), urls[2]);
}

/// The current controller goes away: the client moves to the other; that one goes away and
/// the first comes back: it moves back.
#[tokio::test]
async fn moves_to_the_other_controller_and_back_as_they_come_and_go() {
    let ca = Ca::new();
    let first = Server::start(&ca, "127.0.0.1:0".parse().unwrap(), false).await;
    let second = Server::start(&ca, "127.0.0.1:0".parse().unwrap(), false).await;
    let (first_addr, second_addr) = (first.addr, second.addr);
    let urls = [url(first_addr), url(second_addr)];
    let client = ControllerClient::new(&urls, &identity(&ca, None), TIMEOUT).unwrap();
    let _: Value = client.post("echo", &json!({})).await.unwrap();
    assert_eq!(client.current_url(), urls[0]);

    drop(first);
    let _: Value = client.post("echo", &json!({})).await.unwrap();
    assert_eq!(client.current_url(), urls[1]);
    let _: Value = client.post("echo", &json!({})).await.unwrap();
    assert_eq!(second.accepted.load(Ordering::SeqCst), 2);

    let first = restart(&ca, first_addr).await;
    drop(second);
    let _: Value = client.post("echo", &json!({})).await.unwrap();
    assert_eq!(client.current_url(), urls[0]);
    assert_eq!(first.accepted.load(Ordering::SeqCst), 1);
}

/// A server on `addr` again, once the port is free (the old listener closes asynchronously).
async fn restart(ca: &Ca, addr: SocketAddr) -> Server {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpListener::bind(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never came free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server::start(ca, addr, false).await
}

/// An answer from a live controller — 401, 500, a reply that is not JSON — is the answer:
/// another replica would give the same, so the client neither asks it nor moves. A 503 is a
/// controller that cannot serve now: the next is asked.
#[tokio::test]
async fn a_live_controllers_answer_is_final_except_503() {
    let ca = Ca::new();
    let first = Server::start(&ca, "127.0.0.1:0".parse().unwrap(), false).await;
    let second = Server::start(&ca, "127.0.0.1:0".parse().unwrap(), false).await;
    let urls = [url(first.addr), url(second.addr)];
    let client = ControllerClient::new(&urls, &identity(&ca, None), TIMEOUT).unwrap();
    for call in ["denied", "oops", "garbage"] {
        let err = client.post::<_, Value>(call, &json!({})).await.unwrap_err();
        assert!(!err.is_unreachable(), "{call}: {err:?}");
    }
    assert_eq!(first.accepted.load(Ordering::SeqCst), 3);
    assert_eq!(
        second.accepted.load(Ordering::SeqCst),
        0,
        "the other replica was asked"
    );
    assert_eq!(client.current_url(), urls[0]);

    let busy = Server::start(&ca, "127.0.0.1:0".parse().unwrap(), true).await;
    let urls = [url(busy.addr), url(second.addr)];
    let client = ControllerClient::new(&urls, &identity(&ca, None), TIMEOUT).unwrap();
    let reply: Value = client.post("echo", &json!({"n": 5})).await.unwrap();
    assert_eq!(reply, json!({"n": 5}));
    assert_eq!(client.current_url(), urls[1]);
    assert_eq!(busy.accepted.load(Ordering::SeqCst), 1);

    // Every URL busy: the 503 itself, retryable.
    let client = ControllerClient::new(&[url(busy.addr)], &identity(&ca, None), TIMEOUT).unwrap();
    let err = client
        .post::<_, Value>("echo", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Status { status: 503, .. }) && err.is_retryable(),
        "{err:?}"
    );
}

/// No URL reachable: the call fails with the first error that retrying may cure, in the
/// order tried — never with a final refusal of one URL while another may come back — and the
/// current URL stays.
#[tokio::test]
async fn when_every_url_fails_the_error_is_the_first_retryable_one() {
    let ca = Ca::new();
    let timeout = Duration::from_millis(300);
    let (hung, _) = silent().await;
    let closed = closed_port();

    let client =
        ControllerClient::new(&[url(closed), url(hung)], &identity(&ca, None), timeout).unwrap();
    let err = client
        .post::<_, Value>("echo", &json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
    assert_eq!(client.current_url(), url(closed));

    let client =
        ControllerClient::new(&[url(hung), url(closed)], &identity(&ca, None), timeout).unwrap();
    let err = client
        .post::<_, Value>("echo", &json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains(&url(hung)), "{err}");

    // A controller of another CA first, then one that is down: the caller sees "down", which
    // it retries, not the mismatch.
    let other_ca = Ca::new();
    let impostor = server(&other_ca).await;
    let client =
        ControllerClient::new(&[url(impostor), url(closed)], &identity(&ca, None), timeout)
            .unwrap();
    let err = client
        .post::<_, Value>("echo", &json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
    // The impostor alone: the mismatch, as with one URL.
    let client = ControllerClient::new(&[url(impostor)], &identity(&ca, None), timeout).unwrap();
    let err = client
        .post::<_, Value>("echo", &json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::CaMismatch { .. }), "{err:?}");
}
