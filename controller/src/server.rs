//! `serve`: the data directory, the CA, the database and the TLS listener, put together.
//! Each accepted connection is TLS-handshaken here, its verified client certificate (if any)
//! and its peer address attached to every request on it, and served by hyper with the axum
//! router.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::extract::{ClientCert, PeerAddr};
use crate::api::{self, AppState, Policy};
use crate::ca::{self, CertAuthority};
use crate::events::{self, EventRetention};
use crate::fsutil::write_atomic;
use crate::secrets;
use crate::storage::Storage;
use crate::tls;

/// File name of the operator bearer token in the data directory (mode 0600).
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";
/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers must arrive within this, at least; it is also how long a kept-alive
/// connection may wait for its next request, so it is longer than the heartbeat interval
/// (see [`header_timeout`]).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection may wait for a request's headers: [`HEADER_TIMEOUT`], or two
/// heartbeat intervals and a little when that is longer. A node that keeps its connection
/// between heartbeats must find it open at the next one (with the timeout equal to the
/// interval, one heartbeat in a few raced the close and was lost).
fn header_timeout(heartbeat_interval_s: u32) -> Duration {
    HEADER_TIMEOUT.max(Duration::from_secs(u64::from(heartbeat_interval_s) * 2 + 5))
}
/// Connections get this long to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// What `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The data directory.
    pub data: PathBuf,
    /// Address to listen on (`127.0.0.1:0` picks a port).
    pub listen: SocketAddr,
    /// Lifetime of node certificates.
    pub cert_lifetime: Duration,
    /// Names the server certificate is issued for; empty means `localhost`, `127.0.0.1`,
    /// `::1` and the listen address.
    pub hostnames: Vec<String>,
    /// Heartbeat interval handed to nodes, seconds.
    pub heartbeat_interval_s: u32,
    /// The PostgreSQL database (`postgres://…`) several replicas share; `None` for the
    /// embedded SQLite database in `data`.
    pub database: Option<String>,
}

/// A controller bound to its port, ready to [`run`](Controller::run).
pub struct Controller {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
    state: AppState,
    storage: Storage,
    /// Cancelled once shutdown begins: held watches answer, the watch scanner stops.
    closing: CancellationToken,
    event_retention: EventRetention,
    ca_cert_path: PathBuf,
    local_addr: SocketAddr,
    /// See [`header_timeout`].
    header_timeout: Duration,
}

/// A controller serving on a task of this process until [`RunningController::stop`]: what the
/// tests of the controller and of the agents start, stop and start again on the same address.
pub struct RunningController {
    addr: SocketAddr,
    ca_pem: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningController {
    /// Binds and starts serving (inside a tokio runtime), events kept as by default.
    pub async fn start(opts: &ServeOptions) -> anyhow::Result<Self> {
        Self::start_with(opts, EventRetention::default()).await
    }

    /// [`RunningController::start`] keeping what nodes send as `policy` says (an
    /// [`EventRetention`] alone will do).
    pub async fn start_with(
        opts: &ServeOptions,
        policy: impl Into<Policy>,
    ) -> anyhow::Result<Self> {
        let controller = Controller::start_with(opts, policy).await?;
        let addr = controller.local_addr();
        let ca_path = controller.ca_cert_path().to_owned();
        let ca_pem = std::fs::read_to_string(&ca_path)
            .with_context(|| format!("reading {}", ca_path.display()))?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(controller.run(shutdown.clone()));
        Ok(RunningController {
            addr,
            ca_pem,
            shutdown,
            task,
        })
    }

    /// The address bound (the port chosen, when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate nodes pin, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Stops accepting, lets open requests finish, closes the database.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.context("the controller task panicked")?
    }
}

/// Creates the data directory (mode 0700) if needed.
pub fn ensure_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    }
    Ok(())
}

/// Reads the operator token from the data directory, creating it at first start.
fn operator_token_hash(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(OPERATOR_TOKEN_FILE);
    let token = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().to_owned(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let token = secrets::new_token()?;
            write_atomic(&path, format!("{token}\n").as_bytes(), 0o600)?;
            tracing::info!(path = %path.display(), "created the operator token");
            token
        }
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    anyhow::ensure!(!token.is_empty(), "{} is empty", path.display());
    Ok(secrets::sha256_hex(token.as_bytes()))
}

/// Writes `DIR/operator.toml` (mode 0600): how the operator commands run with `--data DIR`
/// reach this controller, its URL (the address bound, by a name its certificate has), its CA
/// certificate and the operator token file, as absolute paths. Rewritten at every start: the
/// port may have changed. A data directory whose path is not UTF-8 gets none (TOML is UTF-8);
/// the commands then need `--controller`, `--ca-file` and `--token-file`.
fn write_operator_config(
    dir: &Path,
    bound: SocketAddr,
    hostnames: &[String],
    ca_cert: &Path,
) -> anyhow::Result<()> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let url = format!("https://{}", operator_authority(bound, hostnames));
    let text = crate::client::config::operator_config_text(
        &url,
        &absolute(ca_cert),
        &absolute(&dir.join(OPERATOR_TOKEN_FILE)),
    );
    let path = dir.join(crate::client::config::OPERATOR_CONFIG_FILE);
    match text {
        Some(text) => {
            write_atomic(&path, text.as_bytes(), 0o600)?;
            tracing::debug!(path = %path.display(), %url, "wrote the operator settings");
        }
        None => tracing::warn!(
            dir = %dir.display(),
            "the data directory's path is not UTF-8: no operator.toml; operator commands need \
             --controller, --ca-file and --token-file"
        ),
    }
    Ok(())
}

/// `HOST:PORT` to reach a controller bound to `bound`: an unspecified address is reached on
/// loopback; the host is the address itself when the server certificate names it (the
/// default names do), else the first name the certificate has.
fn operator_authority(bound: SocketAddr, hostnames: &[String]) -> String {
    let ip = match bound.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let addr = SocketAddr::new(ip, bound.port());
    match hostnames.first() {
        Some(name) if !hostnames.contains(&ip.to_string()) => {
            format!("{name}:{}", bound.port())
        }
        _ => addr.to_string(),
    }
}

fn default_hostnames(listen: SocketAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let ip = listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        names.push(ip.to_string());
    }
    names
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("local_addr", &self.local_addr)
            .field("ca_cert_path", &self.ca_cert_path)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Opens (or creates) everything in the data directory and binds the listener; events
    /// are kept as by default.
    pub async fn start(opts: &ServeOptions) -> anyhow::Result<Self> {
        Self::start_with(opts, EventRetention::default()).await
    }

    /// [`Controller::start`] keeping what nodes send as `policy` says (an [`EventRetention`]
    /// alone will do). An argument rather than [`ServeOptions`] fields, so the struct
    /// literals of the agents' tests stand.
    pub async fn start_with(
        opts: &ServeOptions,
        policy: impl Into<Policy>,
    ) -> anyhow::Result<Self> {
        let policy = policy.into();
        ensure_data_dir(&opts.data)?;
        let ca = Arc::new(CertAuthority::load_or_create(&opts.data)?);
        let hostnames = if opts.hostnames.is_empty() {
            default_hostnames(opts.listen)
        } else {
            opts.hostnames.clone()
        };
        let (cert_pem, key_pem) = ca.ensure_server_cert(&opts.data, &hostnames)?;
        let tls_config = tls::server_config(ca.cert_der(), &cert_pem, &key_pem)?;
        let storage = match &opts.database {
            Some(url) => Storage::open_postgres(url).await?,
            None => Storage::open(&opts.data).await?,
        };
        let fingerprint = crate::secrets::sha256_hex(ca.cert_der());
        if let Some(pinned) = storage
            .pin_ca(&fingerprint, ca.cert_pem(), crate::now_ms())
            .await?
        {
            storage.close().await;
            anyhow::bail!(
                "the CA in {} (sha256 {fingerprint}) is not the fleet's (sha256 {pinned}): \
                 every controller of one database serves with the same CA; copy {} and {} \
                 from the data directory of a controller of this fleet",
                opts.data.display(),
                crate::ca::CA_CERT_FILE,
                crate::ca::CA_KEY_FILE,
            );
        }
        let closing = CancellationToken::new();
        let state = AppState::new(
            storage.clone(),
            ca.clone(),
            opts.cert_lifetime,
            opts.heartbeat_interval_s,
            operator_token_hash(&opts.data)?,
            policy,
            closing.clone(),
        );
        let listener = TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("cannot listen on {}", opts.listen))?;
        let local_addr = listener.local_addr()?;
        write_operator_config(&opts.data, local_addr, &hostnames, ca.cert_path())?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(tls_config),
            router: api::router(state.clone()),
            state,
            storage,
            closing,
            event_retention: policy.event_retention,
            ca_cert_path: ca.cert_path().to_owned(),
            local_addr,
            header_timeout: header_timeout(opts.heartbeat_interval_s),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The CA certificate nodes pin.
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert_path
    }

    /// Accepts connections until `shutdown` is cancelled, then lets open connections finish
    /// their requests (up to a bound) and closes the database. Event retention runs beside.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        tracker.spawn(events::retention_task(
            self.storage.clone(),
            self.event_retention,
            shutdown.clone(),
        ));
        tracker.spawn(
            self.state
                .watches()
                .clone()
                .run_scanner(self.storage.clone(), self.closing.clone()),
        );
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    // Replies are one or two small writes: without this, Nagle holds the
                    // last one back until the client's delayed ACK (tens of ms per call).
                    if let Err(err) = tcp.set_nodelay(true) {
                        tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
                    }
                    let acceptor = self.acceptor.clone();
                    let router = self.router.clone();
                    let shutdown = shutdown.clone();
                    tracker.spawn(serve_connection(
                        tcp,
                        peer,
                        acceptor,
                        router,
                        self.header_timeout,
                        shutdown,
                    ));
                }
                Err(err) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Held watches answer now rather than holding the drain up for their whole time.
        self.closing.cancel();
        tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = tracker.len(),
                "connections still open after drain timeout"
            );
        }
        self.storage.close().await;
        Ok(())
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::info!(%peer, error = %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let client = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| match ca::inspect(der) {
            Ok(info) => Some(Arc::new(info)),
            Err(err) => {
                tracing::warn!(%peer, error = %err, "verified client certificate does not parse");
                None
            }
        });
    let client = ClientCert(client);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(client.clone());
        req.extensions_mut().insert(PeerAddr(peer));
        let router = router.clone();
        async move { tower::ServiceExt::oneshot(router, req).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_connection_outlives_two_heartbeat_intervals() {
        assert_eq!(header_timeout(1), HEADER_TIMEOUT);
        assert_eq!(header_timeout(30), Duration::from_secs(65));
        assert_eq!(header_timeout(3600), Duration::from_secs(7205));
    }

    #[test]
    fn the_operator_url_names_what_the_certificate_names() {
        let defaults = |addr: &str| {
            let addr: SocketAddr = addr.parse().unwrap();
            operator_authority(addr, &default_hostnames(addr))
        };
        assert_eq!(defaults("127.0.0.1:8443"), "127.0.0.1:8443");
        assert_eq!(defaults("0.0.0.0:8443"), "127.0.0.1:8443");
        assert_eq!(defaults("[::]:8443"), "[::1]:8443");
        assert_eq!(defaults("192.0.2.7:8443"), "192.0.2.7:8443");
        let named = ["ctl.example".to_owned()];
        assert_eq!(
            operator_authority("0.0.0.0:8443".parse().unwrap(), &named),
            "ctl.example:8443"
        );
    }
}
