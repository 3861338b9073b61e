//! The rustls client configuration: the controller's CA as the only root, and the node's
//! certificate when it has one. ring is the crypto provider (no OpenSSL, no aws-lc).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::TransportError;

/// What the node presents and trusts.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsIdentity {
    /// The controller's CA certificate(s), PEM: the only roots trusted.
    pub ca_pem: String,
    /// The node's certificate and key, once enrolled; `None` for enrollment itself.
    pub client: Option<ClientCert>,
}

/// The node's certificate chain and private key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// Leaf first.
    pub chain_pem: String,
    /// The private key (PKCS#8, SEC1 or PKCS#1).
    pub key_pem: String,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("ClientCert")
            .field("chain_pem", &self.chain_pem)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// Builds the rustls configuration for `identity`.
pub fn client_config(identity: &TlsIdentity) -> Result<rustls::ClientConfig, TransportError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| TransportError::Credentials(format!("{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(identity.ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| bad("controller CA", &e))?;
        roots.add(cert).map_err(|e| bad("controller CA", &e))?;
    }
    if roots.is_empty() {
        return Err(TransportError::Credentials(
            "controller CA: no certificate in the PEM".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?
        .with_root_certificates(roots);
    match &identity.client {
        None => Ok(builder.with_no_client_auth()),
        Some(client) => {
            let chain = CertificateDer::pem_slice_iter(client.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("node certificate", &e))?;
            if chain.is_empty() {
                return Err(TransportError::Credentials(
                    "node certificate: no certificate in the PEM".into(),
                ));
            }
            let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())
                .map_err(|e| bad("node key", &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad("node certificate and key", &e))
        }
    }
}
