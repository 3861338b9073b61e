//! The node's PKI on disk (`<persist>/pki/`, file names from [`powernode_transport::pki`]):
//! crash-safe writes, the key/certificate switch, its repair at start, and the checks that a
//! credential set is usable.
//!
//! # The switch
//!
//! Every file is written atomically: a temp file beside it, fsync, rename, fsync the directory.
//! The key and the certificate must also change *together*, which two renames cannot do
//! atomically, so [`Store::install`] stages and then switches:
//!
//! 1. `ca.pem` and `enrollment.json` are written (atomically each);
//! 2. `key.new.pem` (0600), then `cert.new.pem` are written (atomically each): once
//!    `cert.new.pem` exists the staged pair is complete;
//! 3. the current `cert.pem`, if any, is copied to `cert.<unix-ms>.pem` (the archive);
//! 4. `key.new.pem` is renamed over `key.pem`, then `cert.new.pem` over `cert.pem`, and the
//!    directory is fsynced.
//!
//! [`Store::repair`], run at every start before anything is read, finishes or undoes a switch
//! a crash interrupted:
//!
//! | staged files found | meaning | repair |
//! |---|---|---|
//! | `key.new.pem` only | crash during staging; `key.pem`/`cert.pem` are the old pair | delete `key.new.pem` |
//! | `key.new.pem` + `cert.new.pem` | staged, not switched | rename both (step 4) |
//! | `cert.new.pem` only | key already switched | rename `cert.new.pem` |
//!
//! After repair `key.pem` and `cert.pem` are always a matching pair (or both absent), and
//! [`Store::load`] checks that they are before anything uses them.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use powernode_transport::pki::PkiPaths;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};

/// The staged key of a switch in progress.
pub const KEY_NEW_FILE: &str = "key.new.pem";
/// The staged certificate of a switch in progress.
pub const CERT_NEW_FILE: &str = "cert.new.pem";
/// enrollmgr's own record of the enrollment (node id, controller URLs, token hash).
pub const META_FILE: &str = "enrollment.json";
/// Version of [`Meta`]'s format. 2: `controller_urls`, the node's list of controllers (1 knew
/// one URL, `controller_url`; such a file is still read).
pub const META_VERSION: u32 = 2;

/// What enrollmgr remembers about the enrollment beside the PEM files.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Format version ([`META_VERSION`]).
    pub version: u32,
    /// The id the controller gave the node.
    pub node_id: String,
    /// The controller URLs the node enrolled (or last rotated) with, in the order tried.
    pub controller_urls: Vec<String>,
    /// Of those, the one that answered the enrollment or the last rotation.
    pub controller_url: String,
    /// SHA-256 (hex) of the bootstrap token that was used, so an expired node does not try
    /// the same single-use token again.
    pub token_sha256: Option<String>,
    /// When the node enrolled, ms since the epoch.
    pub enrolled_at_ms: u64,
    /// When the current certificate was received, ms since the epoch: the start of its
    /// lifetime for rotation (controllers backdate `notBefore` for clock skew, which must not
    /// count as lifetime already used).
    pub cert_received_ms: u64,
}

/// [`Meta`] as format version 1 wrote it: one controller URL.
#[derive(Deserialize)]
struct MetaV1 {
    node_id: String,
    controller_url: String,
    token_sha256: Option<String>,
    enrolled_at_ms: u64,
    cert_received_ms: u64,
}

impl Meta {
    /// Reads `enrollment.json`: this version, or version 1 brought to it.
    pub fn parse(text: &str) -> Result<Meta, String> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let version = serde_json::from_str::<Version>(text)
            .map_err(|e| e.to_string())?
            .version;
        match version {
            META_VERSION => serde_json::from_str(text).map_err(|e| e.to_string()),
            1 => {
                let v1: MetaV1 = serde_json::from_str(text).map_err(|e| e.to_string())?;
                Ok(Meta {
                    version: META_VERSION,
                    node_id: v1.node_id,
                    controller_urls: vec![v1.controller_url.clone()],
                    controller_url: v1.controller_url,
                    token_sha256: v1.token_sha256,
                    enrolled_at_ms: v1.enrolled_at_ms,
                    cert_received_ms: v1.cert_received_ms,
                })
            }
            other => Err(format!(
                "version {other} (this enrollmgr reads 1 and {META_VERSION})"
            )),
        }
    }
}

/// Facts read from a node certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the DER, lowercase hex (the controller's fingerprint too).
    pub fingerprint: String,
    /// Start of validity, ms since the epoch.
    pub not_before_ms: u64,
    /// End of validity, ms since the epoch.
    pub not_after_ms: u64,
}

/// When rotation is due: at 75% of the lifetime, which starts when the certificate was
/// received (clamped into its validity) and ends at `notAfter`.
pub fn rotate_at_ms(cert: &CertInfo, received_ms: u64) -> u64 {
    let start = received_ms.clamp(cert.not_before_ms, cert.not_after_ms);
    let life = cert.not_after_ms - start;
    start + life / 4 * 3
}

/// A complete, checked credential set.
#[derive(Clone, Debug)]
pub struct Installed {
    /// The certificate's facts.
    pub cert: CertInfo,
    /// The enrollment record.
    pub meta: Meta,
}

impl Installed {
    /// When rotation is due.
    pub fn rotate_at_ms(&self) -> u64 {
        rotate_at_ms(&self.cert, self.meta.cert_received_ms)
    }
}

/// Why the PKI on disk cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Some of the files are there, some not.
    #[error("incomplete PKI in {dir}: {missing} missing")]
    Incomplete {
        /// The PKI directory.
        dir: PathBuf,
        /// Which file.
        missing: &'static str,
    },
    /// The files are there but not a usable set.
    #[error("{0}")]
    Invalid(#[from] CredentialError),
    /// `enrollment.json` is unreadable.
    #[error("{path}: {reason}")]
    BadMeta {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Why a certificate, key and CA do not make a usable credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    /// The certificate is not valid PEM/DER X.509.
    #[error("certificate: {0}")]
    BadCert(String),
    /// The key is not a valid PEM private key.
    #[error("key: {0}")]
    BadKey(String),
    /// The CA is not valid PEM.
    #[error("CA: {0}")]
    BadCa(String),
    /// The certificate is not for this key.
    #[error("the certificate's public key does not match the private key")]
    KeyMismatch,
    /// The certificate has expired (or is not valid yet).
    #[error("the certificate expired at {not_after_ms} ms")]
    Expired {
        /// End of validity.
        not_after_ms: u64,
    },
    /// The certificate does not chain to the CA (or is not a client certificate).
    #[error("the certificate does not verify against the CA: {0}")]
    Untrusted(String),
}

/// Reads a certificate's fingerprint and validity.
pub fn cert_info(cert_pem: &str) -> Result<CertInfo, CredentialError> {
    let der = first_cert(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CredentialError::BadCert(e.to_string()))?;
    let validity = cert.validity();
    let ms = |t: i64| u64::try_from(t).unwrap_or(0).saturating_mul(1000);
    Ok(CertInfo {
        fingerprint: sha256_hex(der.as_ref()),
        not_before_ms: ms(validity.not_before.timestamp()),
        not_after_ms: ms(validity.not_after.timestamp()),
    })
}

/// Checks that `cert_pem` is for `key_pem`, valid at `now_ms`, and chains to `ca_pem` as a
/// client certificate. Returns its facts.
pub fn check_credentials(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
    now_ms: u64,
) -> Result<CertInfo, CredentialError> {
    let info = cert_info(cert_pem)?;
    let der = first_cert(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CredentialError::BadCert(e.to_string()))?;
    let key =
        rcgen::KeyPair::from_pem(key_pem).map_err(|e| CredentialError::BadKey(e.to_string()))?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        return Err(CredentialError::KeyMismatch);
    }
    if now_ms >= info.not_after_ms || now_ms < info.not_before_ms {
        return Err(CredentialError::Expired {
            not_after_ms: info.not_after_ms,
        });
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| CredentialError::BadCa(e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| CredentialError::BadCa(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(CredentialError::BadCa("no certificate in the PEM".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| CredentialError::BadCa(e.to_string()))?;
    let intermediates = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .skip(1)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CredentialError::BadCert(e.to_string()))?;
    let now = UnixTime::since_unix_epoch(std::time::Duration::from_millis(now_ms));
    verifier
        .verify_client_cert(&der, &intermediates, now)
        .map_err(|e| CredentialError::Untrusted(e.to_string()))?;
    Ok(info)
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, CredentialError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| CredentialError::BadCert("no certificate in the PEM".into()))?
        .map_err(|e| CredentialError::BadCert(e.to_string()))
}

/// SHA-256 of `data`, lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What [`Store::install`] writes.
#[derive(Clone)]
pub struct NewCredentials<'a> {
    /// The new private key, PEM.
    pub key_pem: &'a str,
    /// The new certificate (chain), PEM.
    pub cert_pem: &'a str,
    /// The CA to pin, PEM.
    pub ca_pem: &'a str,
    /// The enrollment record.
    pub meta: &'a Meta,
}

/// The PKI directory, as enrollmgr manages it.
#[derive(Clone, Debug)]
pub struct Store {
    paths: PkiPaths,
}

impl Store {
    /// The store at `paths`.
    pub fn new(paths: PkiPaths) -> Self {
        Store { paths }
    }

    /// The file names.
    pub fn paths(&self) -> &PkiPaths {
        &self.paths
    }

    fn file(&self, name: &str) -> PathBuf {
        self.paths.dir().join(name)
    }

    /// The archive name for a certificate replaced at `ms`.
    pub fn archive_path(&self, ms: u64) -> PathBuf {
        self.file(&format!("cert.{ms}.pem"))
    }

    /// Finishes or undoes an interrupted switch (see the module documentation). Returns what
    /// it did, for the log, or `None` if there was nothing to repair.
    pub fn repair(&self) -> Result<Option<&'static str>, StoreError> {
        let key_new = self.file(KEY_NEW_FILE);
        let cert_new = self.file(CERT_NEW_FILE);
        let done = match (exists(&key_new)?, exists(&cert_new)?) {
            (false, false) => return Ok(None),
            (true, false) => {
                fs::remove_file(&key_new).map_err(io_at(&key_new))?;
                "removed a half-staged key (the switch had not begun)"
            }
            (true, true) => {
                rename(&key_new, &self.paths.key())?;
                rename(&cert_new, &self.paths.cert())?;
                "finished a staged key and certificate switch"
            }
            (false, true) => {
                rename(&cert_new, &self.paths.cert())?;
                "finished a certificate switch interrupted after the key"
            }
        };
        sync_dir(self.paths.dir())?;
        Ok(Some(done))
    }

    /// Reads and checks the credentials at `now_ms`: `Ok(None)` when there are none at all.
    /// Run [`Store::repair`] first.
    pub fn load(&self, now_ms: u64) -> Result<Option<Installed>, StoreError> {
        let cert = read_opt(&self.paths.cert())?;
        let key = read_opt(&self.paths.key())?;
        let ca = read_opt(&self.paths.ca())?;
        let meta_path = self.file(META_FILE);
        let meta = read_opt(&meta_path)?;
        let (cert, key) = match (cert, key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => return Err(self.incomplete("key.pem")),
            (None, Some(_)) => return Err(self.incomplete("cert.pem")),
        };
        let ca = ca.ok_or_else(|| self.incomplete("ca.pem"))?;
        let meta = meta.ok_or_else(|| self.incomplete(META_FILE))?;
        let meta = Meta::parse(&meta).map_err(|reason| StoreError::BadMeta {
            path: meta_path,
            reason,
        })?;
        let cert = check_credentials(&cert, &key, &ca, now_ms)?;
        Ok(Some(Installed { cert, meta }))
    }

    /// The enrollment record, if readable, whatever the state of the certificate.
    pub fn meta(&self) -> Option<Meta> {
        let text = fs::read_to_string(self.file(META_FILE)).ok()?;
        Meta::parse(&text).ok()
    }

    /// Writes new credentials with the crash-safe switch of the module documentation; the
    /// certificate being replaced, if any, is archived as `cert.<archive_ms>.pem`.
    pub fn install(&self, new: &NewCredentials<'_>, archive_ms: u64) -> Result<(), StoreError> {
        let dir = self.paths.dir();
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        // A leftover from an earlier crash must not mix with this switch.
        self.repair()?;
        write_atomic(&self.paths.ca(), new.ca_pem.as_bytes(), 0o644)?;
        let meta = serde_json::to_vec_pretty(new.meta).map_err(|e| StoreError::BadMeta {
            path: self.file(META_FILE),
            reason: e.to_string(),
        })?;
        write_atomic(&self.file(META_FILE), &meta, 0o644)?;
        write_atomic(&self.file(KEY_NEW_FILE), new.key_pem.as_bytes(), 0o600)?;
        failpoint::hit("pki.key_staged");
        write_atomic(&self.file(CERT_NEW_FILE), new.cert_pem.as_bytes(), 0o644)?;
        failpoint::hit("pki.both_staged");
        if let Some(old) = read_opt(&self.paths.cert())? {
            write_atomic(&self.archive_path(archive_ms), old.as_bytes(), 0o644)?;
        }
        rename(&self.file(KEY_NEW_FILE), &self.paths.key())?;
        failpoint::hit("pki.key_switched");
        rename(&self.file(CERT_NEW_FILE), &self.paths.cert())?;
        sync_dir(dir)
    }

    fn incomplete(&self, missing: &'static str) -> StoreError {
        StoreError::Incomplete {
            dir: self.paths.dir().to_owned(),
            missing,
        }
    }
}

/// Writes `data` to `path` atomically and durably with exactly `mode`
/// ([`powernode_atomicfile::write_atomic`]), as a [`StoreError`]. The directory must exist.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    powernode_atomicfile::write_atomic(path, data, mode).map_err(|e| StoreError::Io {
        path: e.path,
        source: e.source,
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::rename(from, to).map_err(io_at(from))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

fn exists(path: &Path) -> Result<bool, StoreError> {
    path.try_exists().map_err(io_at(path))
}

fn read_opt(path: &Path) -> Result<Option<String>, StoreError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io {
            path: path.to_owned(),
            source: e,
        }),
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair,
    };

    use super::*;

    const NOW_MS: u64 = 1_800_000_000_000; // 2027-01-15

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A node key and a client certificate for it, valid over the given years.
    fn node(ca: &Ca, from: i32, to: i32) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut params = CertificateParams::new(vec!["node-1".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = date_time_ymd(from, 1, 1);
        params.not_after = date_time_ymd(to, 1, 1);
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        (key.serialize_pem(), cert.pem())
    }

    fn meta() -> Meta {
        Meta {
            version: META_VERSION,
            node_id: "node-1".into(),
            controller_urls: vec![
                "https://ctl.example:8443".into(),
                "https://ctl-2.example:8443".into(),
            ],
            controller_url: "https://ctl-2.example:8443".into(),
            token_sha256: Some(sha256_hex(b"token")),
            enrolled_at_ms: NOW_MS,
            cert_received_ms: NOW_MS,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(PkiPaths::under(dir.path()));
        (dir, store)
    }

    fn install(store: &Store, ca: &Ca, key: &str, cert: &str, at: u64) {
        store
            .install(
                &NewCredentials {
                    key_pem: key,
                    cert_pem: cert,
                    ca_pem: &ca.pem,
                    meta: &meta(),
                },
                at,
            )
            .unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn install_load_and_rotate() {
        let (_dir, store) = store();
        let ca = ca();
        assert!(store.load(NOW_MS).unwrap().is_none());
        let (key1, cert1) = node(&ca, 2020, 2030);
        install(&store, &ca, &key1, &cert1, 1);
        let first = store.load(NOW_MS).unwrap().unwrap();
        assert_eq!(first.meta, meta());
        assert_eq!(mode(&store.paths().key()), 0o600);
        assert_eq!(
            first.cert.fingerprint,
            cert_info(&cert1).unwrap().fingerprint
        );
        // Nothing to archive on a first install.
        assert!(!store.archive_path(1).exists());

        let (key2, cert2) = node(&ca, 2020, 2030);
        install(&store, &ca, &key2, &cert2, 2);
        let second = store.load(NOW_MS).unwrap().unwrap();
        assert_ne!(second.cert.fingerprint, first.cert.fingerprint);
        assert_eq!(fs::read_to_string(store.archive_path(2)).unwrap(), cert1);
        assert_eq!(fs::read_to_string(store.paths().key()).unwrap(), key2);
        assert_eq!(mode(&store.paths().key()), 0o600);
        // No staged or temp files are left behind.
        let mut names: Vec<_> = fs::read_dir(store.paths().dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ca.pem",
                "cert.2.pem",
                "cert.pem",
                "enrollment.json",
                "key.pem"
            ]
        );
    }

    /// The three crash windows of the switch (module documentation), each left on disk as a
    /// crash would leave it: after repair the pair always matches.
    #[test]
    fn repair_every_crash_window() {
        let ca = ca();
        let (old_key, old_cert) = node(&ca, 2020, 2030);
        let (new_key, new_cert) = node(&ca, 2020, 2030);
        let setup = || {
            let (dir, store) = store();
            install(&store, &ca, &old_key, &old_cert, 1);
            (dir, store)
        };
        let stage = |store: &Store, name: &str, data: &str, mode: u32| {
            write_atomic(&store.paths().dir().join(name), data.as_bytes(), mode).unwrap();
        };
        let fingerprint = |pem: &str| cert_info(pem).unwrap().fingerprint;

        // 1. Crash after staging the key only: roll back to the old pair.
        let (_d1, s1) = setup();
        stage(&s1, KEY_NEW_FILE, &new_key, 0o600);
        assert!(s1.repair().unwrap().is_some());
        let loaded = s1.load(NOW_MS).unwrap().unwrap();
        assert_eq!(loaded.cert.fingerprint, fingerprint(&old_cert));
        assert!(!s1.paths().dir().join(KEY_NEW_FILE).exists());

        // 2. Crash after staging both: roll forward.
        let (_d2, s2) = setup();
        stage(&s2, KEY_NEW_FILE, &new_key, 0o600);
        stage(&s2, CERT_NEW_FILE, &new_cert, 0o644);
        assert!(s2.repair().unwrap().is_some());
        let loaded = s2.load(NOW_MS).unwrap().unwrap();
        assert_eq!(loaded.cert.fingerprint, fingerprint(&new_cert));
        assert_eq!(mode(&s2.paths().key()), 0o600);

        // 3. Crash between the two renames: key already new, cert staged.
        let (_d3, s3) = setup();
        write_atomic(&s3.paths().key(), new_key.as_bytes(), 0o600).unwrap();
        stage(&s3, CERT_NEW_FILE, &new_cert, 0o644);
        // Before repair the pair on disk does not match, and load says so.
        assert!(matches!(
            s3.load(NOW_MS),
            Err(StoreError::Invalid(CredentialError::KeyMismatch))
        ));
        assert!(s3.repair().unwrap().is_some());
        let loaded = s3.load(NOW_MS).unwrap().unwrap();
        assert_eq!(loaded.cert.fingerprint, fingerprint(&new_cert));

        // Nothing to repair on a clean directory.
        assert!(s3.repair().unwrap().is_none());
    }

    #[test]
    fn load_rejects_unusable_sets() {
        let ca = ca();
        let other_ca = self::ca();
        let (key, cert) = node(&ca, 2020, 2030);

        // Expired.
        let (_d, s) = store();
        let (old_key, old_cert) = node(&ca, 2000, 2001);
        install(&s, &ca, &old_key, &old_cert, 1);
        assert!(matches!(
            s.load(NOW_MS),
            Err(StoreError::Invalid(CredentialError::Expired { .. }))
        ));

        // Signed by another CA than the pinned one.
        let (_d, s) = store();
        s.install(
            &NewCredentials {
                key_pem: &key,
                cert_pem: &cert,
                ca_pem: &other_ca.pem,
                meta: &meta(),
            },
            1,
        )
        .unwrap();
        assert!(matches!(
            s.load(NOW_MS),
            Err(StoreError::Invalid(CredentialError::Untrusted(_)))
        ));

        // Certificate without its key.
        let (_d, s) = store();
        install(&s, &ca, &key, &cert, 1);
        fs::remove_file(s.paths().key()).unwrap();
        assert!(matches!(
            s.load(NOW_MS),
            Err(StoreError::Incomplete {
                missing: "key.pem",
                ..
            })
        ));

        // Corrupt metadata.
        let (_d, s) = store();
        install(&s, &ca, &key, &cert, 1);
        fs::write(s.paths().dir().join(META_FILE), "{").unwrap();
        assert!(matches!(s.load(NOW_MS), Err(StoreError::BadMeta { .. })));
    }

    /// A record written before the list of controller URLs (version 1) is read as a list of
    /// its one URL; a version this build does not know is refused.
    #[test]
    fn a_version_1_record_reads_as_a_list_of_one() {
        let ca = ca();
        let (key, cert) = node(&ca, 2020, 2030);
        let (_d, s) = store();
        install(&s, &ca, &key, &cert, 1);
        let v1 = r#"{
  "version": 1,
  "node_id": "node-1",
  "controller_url": "https://ctl.example:8443",
  "token_sha256": null,
  "enrolled_at_ms": 5,
  "cert_received_ms": 6
}"#;
        fs::write(s.paths().dir().join(META_FILE), v1).unwrap();
        let loaded = s.load(NOW_MS).unwrap().unwrap();
        assert_eq!(
            loaded.meta,
            Meta {
                version: META_VERSION,
                node_id: "node-1".into(),
                controller_urls: vec!["https://ctl.example:8443".into()],
                controller_url: "https://ctl.example:8443".into(),
                token_sha256: None,
                enrolled_at_ms: 5,
                cert_received_ms: 6,
            }
        );
        assert_eq!(s.meta(), Some(loaded.meta));
        let v9 = v1.replace("\"version\": 1", "\"version\": 9");
        fs::write(s.paths().dir().join(META_FILE), v9).unwrap();
        match s.load(NOW_MS) {
            Err(StoreError::BadMeta { reason, .. }) => {
                assert!(reason.contains("version 9"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rotation_is_due_at_three_quarters_of_the_lifetime() {
        let info = CertInfo {
            fingerprint: String::new(),
            not_before_ms: 1_000,
            not_after_ms: 9_000,
        };
        // Received at notBefore: 75% of the validity.
        assert_eq!(rotate_at_ms(&info, 1_000), 7_000);
        // A backdated notBefore (received later) does not count as lifetime used.
        assert_eq!(rotate_at_ms(&info, 5_000), 8_000);
        // Clock oddities are clamped into the validity.
        assert_eq!(rotate_at_ms(&info, 0), 7_000);
        assert_eq!(rotate_at_ms(&info, 20_000), 9_000);
    }
}
