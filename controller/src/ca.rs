//! The controller's certificate authority: created at first start, kept in the data
//! directory, and used to sign node certificates (from their CSRs) and the server's own
//! TLS certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::fsutil::{write_atomic, WriteError};
use crate::secrets::{self, RandomError};

/// File name of the CA certificate in the data directory (nodes pin it).
pub const CA_CERT_FILE: &str = "ca.crt.pem";
/// File name of the CA private key (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key.pem";
/// File name of the server's TLS certificate.
pub const SERVER_CERT_FILE: &str = "server.crt.pem";
/// File name of the server's TLS private key (mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key.pem";

/// How long the CA certificate is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long the server's TLS certificate is valid.
const SERVER_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// A server certificate this close to expiry is re-issued at start.
const SERVER_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// Certificates start being valid this long before they are issued, for clock skew.
const BACKDATE: Duration = Duration::from_secs(60);

/// Errors of the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file of the CA could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file of the CA could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The CA key or certificate on disk is not usable.
    #[error("{path} is not a usable CA file: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What rcgen said.
        #[source]
        source: rcgen::Error,
    },
    /// The CA certificate exists without its key, or the key without its certificate.
    #[error(
        "{present} exists but {missing} does not: restore it or remove both to create a new CA"
    )]
    HalfPresent {
        /// The file found.
        present: PathBuf,
        /// The file missing.
        missing: PathBuf,
    },
    /// The node's CSR could not be parsed, or its signature does not verify.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(rcgen::Error),
    /// rcgen failed to build or sign a certificate.
    #[error("cannot {what}: {source}")]
    Sign {
        /// What was being done.
        what: &'static str,
        /// What rcgen said.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate we issued could not be parsed back.
    #[error("cannot parse a certificate: {0}")]
    Parse(String),
    /// No randomness.
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// A certificate just issued, with what the database keeps about it.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Facts about it.
    pub info: CertInfo,
}

/// What the controller records and checks about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER encoding, lowercase hex.
    pub fingerprint: String,
    /// Subject common name, if any.
    pub common_name: Option<String>,
    /// DNS names and IP addresses of the subject alternative name extension.
    pub alt_names: Vec<String>,
    /// Start of validity, milliseconds since the epoch.
    pub not_before_ms: i64,
    /// End of validity, milliseconds since the epoch.
    pub not_after_ms: i64,
}

/// Parses a DER certificate into the facts the controller uses.
pub fn inspect(der: &[u8]) -> Result<CertInfo, CaError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CaError::Parse(e.to_string()))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    let mut alt_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => alt_names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        alt_names.push(std::net::IpAddr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        alt_names.push(std::net::IpAddr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let validity = cert.validity();
    Ok(CertInfo {
        serial: secrets::hex(cert.raw_serial()),
        fingerprint: secrets::sha256_hex(der),
        common_name,
        alt_names,
        not_before_ms: validity.not_before.timestamp().saturating_mul(1000),
        not_after_ms: validity.not_after.timestamp().saturating_mul(1000),
    })
}

/// The CA: its certificate and the key that signs with it.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
    cert_path: PathBuf,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Loads the CA from `dir`, or creates it (ECDSA P-256, self-signed) when neither of its
    /// files exists. One file without the other is an error, never silently replaced.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::create(&cert_path, &key_path),
            (true, false) => Err(CaError::HalfPresent {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::HalfPresent {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&read(key_path)?).map_err(|source| CaError::Corrupt {
            path: key_path.to_owned(),
            source,
        })?;
        let corrupt = |source| CaError::Corrupt {
            path: cert_path.to_owned(),
            source,
        };
        let cert_der = pem_to_der(&cert_pem).map_err(corrupt)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(corrupt)?;
        Ok(Self {
            issuer,
            cert_pem,
            cert_der,
            cert_path: cert_path.to_owned(),
        })
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let sign = |what| move |source| CaError::Sign { what, source };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(sign("generate the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "powernode controller CA");
        dn.push(DnType::OrganizationName, "powernode");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_LIFETIME);
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(sign("self-sign the CA certificate"))?;
        // Key first: a crash between the two writes leaves a key without a certificate,
        // which the next start reports rather than overwrites.
        write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "created a new controller CA");
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
            cert_path: cert_path.to_owned(),
        })
    }

    /// The CA certificate, PEM: the chain handed to nodes.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER: the only trust anchor of client verification.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Where the CA certificate is kept.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Parses and verifies a node's CSR (Ed25519, ECDSA or RSA), without signing it.
    pub fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
        CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)
    }

    /// Signs a node certificate for the key of `csr`: subject CN = `node_id` (also the only
    /// SAN), client-auth only, valid for `lifetime`. Whatever else the CSR asked for is ignored.
    pub fn sign_node(
        &self,
        csr: &CertificateSigningRequestParams,
        node_id: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, CaError> {
        let sign = |what| move |source| CaError::Sign { what, source };
        let mut params =
            CertificateParams::new(vec![node_id.to_owned()]).map_err(sign("name the node"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, lifetime);
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key.clone(),
        };
        let cert = request
            .signed_by(&self.issuer)
            .map_err(sign("sign the node certificate"))?;
        let info = inspect(cert.der())?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            info,
        })
    }

    /// Returns the server's TLS certificate and key (PEM) from `dir`, issuing a new pair when
    /// they are missing, unreadable, not from this CA, near expiry, or for other host names.
    pub fn ensure_server_cert(
        &self,
        dir: &Path,
        hostnames: &[String],
    ) -> Result<(String, String), CaError> {
        let cert_path = dir.join(SERVER_CERT_FILE);
        let key_path = dir.join(SERVER_KEY_FILE);
        if let Some(pair) = self.usable_server_cert(&cert_path, &key_path, hostnames) {
            return Ok(pair);
        }
        let sign = |what| move |source| CaError::Sign { what, source };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(sign("generate the server key"))?;
        let mut params =
            CertificateParams::new(hostnames.to_vec()).map_err(sign("name the server"))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            hostnames.first().map(String::as_str).unwrap_or("localhost"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, SERVER_LIFETIME);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(sign("sign the server certificate"))?;
        let key_pem = key.serialize_pem();
        write_atomic(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), ?hostnames, "issued the server certificate");
        Ok((cert.pem(), key_pem))
    }

    fn usable_server_cert(
        &self,
        cert_path: &Path,
        key_path: &Path,
        hostnames: &[String],
    ) -> Option<(String, String)> {
        let cert_pem = std::fs::read_to_string(cert_path).ok()?;
        let key_pem = std::fs::read_to_string(key_path).ok()?;
        KeyPair::from_pem(&key_pem).ok()?;
        let der = pem_to_der(&cert_pem).ok()?;
        let (_, cert) = X509Certificate::from_der(&der).ok()?;
        let (_, ca) = X509Certificate::from_der(&self.cert_der).ok()?;
        cert.verify_signature(Some(ca.public_key())).ok()?;
        let info = inspect(&der).ok()?;
        let renew_at = info
            .not_after_ms
            .saturating_sub(SERVER_RENEW_BEFORE.as_millis() as i64);
        let mut have = info.alt_names.clone();
        let mut want: Vec<String> = hostnames.iter().map(|h| normalise_host(h)).collect();
        have.sort();
        want.sort();
        (crate::now_ms() < renew_at && have == want).then_some((cert_pem, key_pem))
    }
}

/// Spells an IP address the way [`inspect`] reports it, so host lists compare.
fn normalise_host(host: &str) -> String {
    host.parse::<std::net::IpAddr>()
        .map(|ip| ip.to_string())
        .unwrap_or_else(|_| host.to_owned())
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, rcgen::Error> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.to_vec())
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
}

fn random_serial() -> Result<SerialNumber, RandomError> {
    let mut bytes = secrets::random_bytes::<16>()?;
    // Positive, and no leading zero byte, so the DER integer is exactly these 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ed25519_csr(cn: &str) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn creates_then_reloads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = CertAuthority::load_or_create(dir.path()).unwrap();
        let second = CertAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_pem(), second.cert_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refuses_half_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        CertAuthority::load_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            CertAuthority::load_or_create(dir.path()),
            Err(CaError::HalfPresent { .. })
        ));
    }

    #[test]
    fn signs_an_ed25519_csr_with_the_node_id() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(dir.path()).unwrap();
        let csr = CertAuthority::parse_csr(&ed25519_csr("whatever the node asked")).unwrap();
        let issued = ca
            .sign_node(&csr, "node-0123", Duration::from_secs(60))
            .unwrap();
        assert_eq!(issued.info.common_name.as_deref(), Some("node-0123"));
        assert_eq!(issued.info.alt_names, vec!["node-0123".to_owned()]);
        let der = pem_to_der(&issued.cert_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let (_, ca_cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let again = ca
            .sign_node(&csr, "node-0123", Duration::from_secs(60))
            .unwrap();
        assert_ne!(again.info.serial, issued.info.serial);
    }

    #[test]
    fn rejects_garbage_csr() {
        assert!(matches!(
            CertAuthority::parse_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            ),
            Err(CaError::BadCsr(_))
        ));
        assert!(CertAuthority::parse_csr("not pem").is_err());
    }

    #[test]
    fn server_cert_is_kept_then_reissued_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(dir.path()).unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (first, _) = ca.ensure_server_cert(dir.path(), &names).unwrap();
        let (kept, _) = ca.ensure_server_cert(dir.path(), &names).unwrap();
        assert_eq!(first, kept);
        let (other, _) = ca
            .ensure_server_cert(dir.path(), &["ctl.example".to_owned()])
            .unwrap();
        assert_ne!(first, other);
    }
}
