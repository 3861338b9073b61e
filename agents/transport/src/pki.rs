//! Where the node's credentials live: `<persist>/pki/`, written by enrollmgr (atomically, key
//! mode 0600) and read by every agent that talks to the controller. This module is the one
//! place that names those files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::TransportError;
use crate::tls::{ClientCert, TlsIdentity};

/// The controller's CA, as pinned at enrollment.
pub const CA_FILE: &str = "ca.pem";
/// The node's current certificate chain.
pub const CERT_FILE: &str = "cert.pem";
/// The node's private key (mode 0600).
pub const KEY_FILE: &str = "key.pem";

/// The PKI directory of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiPaths {
    dir: PathBuf,
}

impl PkiPaths {
    /// `<persist_dir>/pki`, where `persist_dir` is `<root>/persist/powernode`.
    pub fn under(persist_dir: impl AsRef<Path>) -> Self {
        PkiPaths {
            dir: persist_dir.as_ref().join("pki"),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }

    /// The certificate file.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    /// The key file.
    pub fn key(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// Reads the identity: the CA (required), and the certificate and key when both exist.
    pub fn load(&self) -> Result<TlsIdentity, TransportError> {
        let read = |path: PathBuf| -> Result<Option<String>, TransportError> {
            match fs::read_to_string(&path) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(TransportError::Credentials(format!(
                    "{}: {e}",
                    path.display()
                ))),
            }
        };
        let ca_pem = read(self.ca())?.ok_or_else(|| {
            TransportError::Credentials(format!("{}: missing (not enrolled?)", self.ca().display()))
        })?;
        let client = match (read(self.cert())?, read(self.key())?) {
            (Some(chain_pem), Some(key_pem)) => Some(ClientCert { chain_pem, key_pem }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(TransportError::Credentials(format!(
                    "{}: missing beside its certificate",
                    self.key().display()
                )))
            }
            (None, Some(_)) => {
                return Err(TransportError::Credentials(format!(
                    "{}: missing beside its key",
                    self.cert().display()
                )))
            }
        };
        Ok(TlsIdentity { ca_pem, client })
    }
}
