//! The HTTP/1.1 client, written out here (request line, headers, `content-length` body) over
//! tokio-rustls with the ring provider and the controller CA as the only root, so the binary
//! needs no dependency the controller does not already have. A connection can be bound to a
//! source address first, so that tens of thousands of them spread over 127.0.0.0/8 instead of
//! running out of the ephemeral ports of one address.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Longest time any single request (or a connect and its handshake) may take before it counts
/// as failed, unless the caller says otherwise: the node agents' default
/// (`controller.request_timeout_ms`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a call did not get a reply. An HTTP status, whatever it is, is a reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// TCP connect or TLS handshake failed.
    #[error("connect to {addr}: {detail}")]
    Connect {
        /// Where to.
        addr: SocketAddr,
        /// What failed.
        detail: String,
    },
    /// No reply within the time allowed.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection broke (or the controller closed it) before the reply was complete.
    #[error("connection dropped: {0}")]
    Dropped(String),
    /// The reply was not HTTP/1.1 this client understands.
    #[error("bad reply: {0}")]
    BadReply(String),
}

impl CallError {
    /// A short name for counting errors by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Connect { .. } => "connect",
            CallError::Timeout(_) => "timeout",
            CallError::Dropped(_) => "dropped",
            CallError::BadReply(_) => "bad_reply",
        }
    }
}

/// The controller: its address (`HOST:PORT` as `serve` printed it, resolved once) and the
/// name its certificate is checked against.
#[derive(Clone, Debug)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    name: ServerName<'static>,
    host: String,
}

impl Target {
    /// Resolves `HOST:PORT`.
    pub async fn resolve(host_port: &str) -> anyhow::Result<Self> {
        let addr = match host_port.parse() {
            Ok(addr) => addr,
            Err(_) => tokio::net::lookup_host(host_port)
                .await?
                .next()
                .ok_or_else(|| anyhow::anyhow!("{host_port} resolves to nothing"))?,
        };
        let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Self {
            addr,
            name: ServerName::try_from(host.to_owned())?,
            host: host_port.to_owned(),
        })
    }
}

/// The source address of simulated node `index`: 127.1.0.1 onward, 254 per /24 (no `.0`,
/// no `.255`), so every node has an address of its own, as a real fleet does.
pub fn source_ip(index: usize) -> IpAddr {
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    let block = index / 254;
    let host = 1 + index % 254;
    let [_, _, b, c] = (256 + block).to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(127, b, c, host as u8))
}

/// One keep-alive HTTP/1.1 connection over TLS.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    host: String,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Conn {
    /// Connects to `addr` (from `source` when given, any port) and shakes hands, within
    /// [`REQUEST_TIMEOUT`].
    pub async fn open(
        target: &Target,
        source: Option<IpAddr>,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self, CallError> {
        tokio::time::timeout(REQUEST_TIMEOUT, Self::open_now(target, source, config))
            .await
            .map_err(|_| CallError::Connect {
                addr: target.addr,
                detail: format!("no connection within {REQUEST_TIMEOUT:?}"),
            })?
    }

    async fn open_now(
        target: &Target,
        source: Option<IpAddr>,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Self, CallError> {
        let addr = target.addr;
        let failed = |what: &str, e: std::io::Error| CallError::Connect {
            addr,
            detail: format!("{what}: {e}"),
        };
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| failed("socket", e))?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| failed(&format!("bind {ip}"), e))?;
        }
        let tcp = socket.connect(addr).await.map_err(|e| failed("tcp", e))?;
        tcp.set_nodelay(true).map_err(|e| failed("nodelay", e))?;
        let tls = TlsConnector::from(config)
            .connect(target.name.clone(), tcp)
            .await
            .map_err(|e| failed("tls", e))?;
        Ok(Self {
            tls,
            host: target.host.clone(),
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(1024),
        })
    }

    /// POST `body` (JSON) to `path` within [`REQUEST_TIMEOUT`]; the status and the reply body.
    pub async fn post(
        &mut self,
        path: &str,
        bearer: Option<&str>,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), CallError> {
        self.call("POST", path, bearer, Some(body), REQUEST_TIMEOUT)
            .await
    }

    /// GET `path`, waiting up to `timeout` (a held watch takes long); the status and body.
    pub async fn get(
        &mut self,
        path: &str,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), CallError> {
        self.call("GET", path, None, None, timeout).await
    }

    /// One request and its reply, within `timeout`. After an error the connection is in an
    /// unknown state: drop it.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(u16, Vec<u8>), CallError> {
        tokio::time::timeout(timeout, self.request(method, path, bearer, body))
            .await
            .map_err(|_| CallError::Timeout(timeout))?
    }

    /// Whether the controller closed this idle connection (its keep-alive policy), as a
    /// pooled HTTP client notices before it reuses one: looks without waiting.
    pub async fn closed_while_idle(&mut self) -> bool {
        // `fill` is polled once: a read that would block leaves it pending, and dropping it
        // then loses nothing.
        matches!(
            tokio::time::timeout(Duration::ZERO, self.fill()).await,
            Ok(Err(_))
        )
    }

    /// Says goodbye (TLS close_notify, then FIN), as a client that is done with the
    /// connection does; errors do not matter any more.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tls.shutdown()).await;
    }

    async fn request(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), CallError> {
        let bad = |what: String| CallError::BadReply(what);
        self.out.clear();
        let mut head = String::with_capacity(256);
        // Writing to a String cannot fail.
        let _ = write!(head, "{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        if let Some(body) = body {
            let _ = write!(
                head,
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            );
        }
        if let Some(token) = bearer {
            let _ = write!(head, "authorization: Bearer {token}\r\n");
        }
        head.push_str("\r\n");
        self.out.extend_from_slice(head.as_bytes());
        self.out.extend_from_slice(body.unwrap_or_default());
        let dropped = |e: std::io::Error| CallError::Dropped(e.to_string());
        self.tls.write_all(&self.out).await.map_err(dropped)?;
        self.tls.flush().await.map_err(dropped)?;
        // Headers.
        let header_end = loop {
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                break pos + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(bad("reply headers too long".into()));
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..header_end])
            .map_err(|_| bad("reply head is not UTF-8".into()))?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status line".into()))?;
        let mut length = None;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(
                        value
                            .trim()
                            .parse::<usize>()
                            .map_err(|_| bad(format!("content-length {value}")))?,
                    );
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    return Err(bad(
                        "chunked replies are not supported by this client".into()
                    ));
                }
            }
        }
        let length = length.ok_or_else(|| bad("reply without content-length".into()))?;
        while self.buf.len() < header_end + length {
            self.fill().await?;
        }
        let reply = self.buf[header_end..header_end + length].to_vec();
        self.buf.drain(..header_end + length);
        Ok((status, reply))
    }

    async fn fill(&mut self) -> Result<(), CallError> {
        let mut chunk = [0u8; 4096];
        let n = self
            .tls
            .read(&mut chunk)
            .await
            .map_err(|e| CallError::Dropped(e.to_string()))?;
        if n == 0 {
            return Err(CallError::Dropped(
                "connection closed by the controller".into(),
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A client configuration trusting only the controller CA, with the node's certificate and
/// key as its identity when given (rustls defaults otherwise, as the node's transport has).
pub fn tls_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_are_distinct_and_never_network_or_broadcast() {
        assert_eq!(source_ip(0), IpAddr::V4(Ipv4Addr::new(127, 1, 0, 1)));
        assert_eq!(source_ip(253), IpAddr::V4(Ipv4Addr::new(127, 1, 0, 254)));
        assert_eq!(source_ip(254), IpAddr::V4(Ipv4Addr::new(127, 1, 1, 1)));
        assert_eq!(
            source_ip(254 * 256),
            IpAddr::V4(Ipv4Addr::new(127, 2, 0, 1))
        );
        let all: std::collections::HashSet<_> = (0..100_000).map(source_ip).collect();
        assert_eq!(all.len(), 100_000);
        assert!(all.iter().all(|ip| match ip {
            IpAddr::V4(v4) => {
                let [a, _, _, d] = v4.octets();
                a == 127 && d != 0 && d != 255
            }
            IpAddr::V6(_) => false,
        }));
    }
}
