//! The node's WireGuard key: an X25519 private key generated once and kept at
//! `persist/powernode/netmgr/private.key` (mode 0600, written atomically), and WireGuard's
//! two spellings of keys: base64 (configuration, `wg`, [`NetworkStatus`]) and hex (the UAPI).
//!
//! The private key is never logged (its `Debug` hides it), never published and never leaves
//! this process except into the device over its UAPI socket. The file holds the key in base64
//! and a newline, as `wg genkey` writes it, so an operator can inspect the pair with `wg pubkey`.
//!
//! [`NetworkStatus`]: powernode_types::NetworkStatus

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use boringtun::x25519;

/// The file under `persist/powernode` holding the key.
pub const KEY_FILE: &str = "netmgr/private.key";

/// Length of a WireGuard key.
pub const KEY_LEN: usize = 32;

/// A WireGuard public key (or any 32-byte key in its public spellings).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// Parses base64 (the standard alphabet with padding, as `wg` writes keys) of 32 bytes.
    pub fn from_base64(text: &str) -> Result<PublicKey, KeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::NotBase64)?;
        <[u8; KEY_LEN]>::try_from(bytes.as_slice())
            .map(PublicKey)
            .map_err(|_| KeyError::Length(bytes.len()))
    }

    /// Parses the UAPI's lower-case hex of 32 bytes.
    pub fn from_hex(text: &str) -> Result<PublicKey, KeyError> {
        let bytes = hex::decode(text).map_err(|_| KeyError::NotHex)?;
        <[u8; KEY_LEN]>::try_from(bytes.as_slice())
            .map(PublicKey)
            .map_err(|_| KeyError::Length(bytes.len()))
    }

    /// Base64, as `wg` and the controller spell keys.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// Hex, as the UAPI spells keys.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_base64())
    }
}

/// Why a key does not parse (the text itself is never quoted: it may be a private key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not base64.
    #[error("not base64")]
    NotBase64,
    /// Not hex.
    #[error("not hex")]
    NotHex,
    /// Not 32 bytes.
    #[error("{0} bytes, not 32")]
    Length(usize),
}

/// The node's private key. Its `Debug` shows only the public half; its bytes are overwritten
/// when it is dropped.
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// A new random key (clamped as X25519 wants; `wg genkey` does the same).
    pub fn generate() -> Result<PrivateKey, getrandom::Error> {
        let mut bytes = [0u8; KEY_LEN];
        getrandom::fill(&mut bytes)?;
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Ok(PrivateKey(bytes))
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519::StaticSecret::from(self.0);
        PublicKey(x25519::PublicKey::from(&secret).to_bytes())
    }

    /// Hex, for the UAPI's `private_key=` (the one place the key is spelled out).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The bytes, for kernel WireGuard's `SET_DEVICE` (the one other place the key leaves
    /// this type; the caller wipes the message it goes into).
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0
    }

    /// From the UAPI's hex (a device's `get` names its private key).
    pub fn from_hex(text: &str) -> Result<PrivateKey, KeyError> {
        PublicKey::from_hex(text).map(|k| PrivateKey(k.0))
    }

    fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    fn from_base64(text: &str) -> Result<PrivateKey, KeyError> {
        PublicKey::from_base64(text).map(|k| PrivateKey(k.0))
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        for byte in &mut self.0 {
            // SAFETY: `byte` is a valid, aligned, exclusive reference into our own array; a
            // volatile write only keeps the compiler from eliding the wipe.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

/// How [`load_or_create`] got the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Read from the file.
    Loaded,
    /// There was no file: generated and written.
    Generated,
    /// The file did not hold a key: moved aside to the path given, a new key generated.
    Replaced(PathBuf),
}

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading, moving aside or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The system's random source failed.
    #[error("generating a key: {0}")]
    Random(getrandom::Error),
}

/// The key at `path`: read, or generated and written (0600, atomically) when there is none.
/// A file that does not hold a key is moved aside (`<path>.bad-<ms>`) and a new key made:
/// the node must have a key to be anyone's peer, and the old one is unusable anyway.
pub fn load_or_create(path: &Path) -> Result<(PrivateKey, Origin), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut origin = Origin::Generated;
    match std::fs::read_to_string(path) {
        Ok(text) => match PrivateKey::from_base64(&text) {
            Ok(key) => return Ok((key, Origin::Loaded)),
            Err(_) => {
                let aside = path.with_extension(format!("key.bad-{}", agentbase::health::now_ms()));
                std::fs::rename(path, &aside).map_err(io)?;
                origin = Origin::Replaced(aside);
            }
        },
        // Not UTF-8 is as bad as not base64.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            let aside = path.with_extension(format!("key.bad-{}", agentbase::health::now_ms()));
            std::fs::rename(path, &aside).map_err(io)?;
            origin = Origin::Replaced(aside);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let key = PrivateKey::generate().map_err(KeyFileError::Random)?;
    let mut text = key.to_base64();
    text.push('\n');
    agentbase::fsutil::write_atomic(path, text.as_bytes(), 0o600).map_err(io)?;
    Ok((key, origin))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn generated_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netmgr/private.key");
        let (key, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, Origin::Generated);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, origin) = load_or_create(&path).unwrap();
        assert_eq!(origin, Origin::Loaded);
        assert_eq!(key.public_key(), again.public_key());
    }

    #[test]
    fn a_file_without_a_key_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        std::fs::write(&path, "not a key\n").unwrap();
        let (_, origin) = load_or_create(&path).unwrap();
        let Origin::Replaced(aside) = origin else {
            panic!("{origin:?}")
        };
        assert_eq!(std::fs::read_to_string(aside).unwrap(), "not a key\n");
        assert_eq!(load_or_create(&path).unwrap().1, Origin::Loaded);
    }

    #[test]
    fn public_key_matches_wireguard() {
        // `echo YBt0…TGI= | wg pubkey` prints QhzJ…tms=.
        let private =
            PrivateKey::from_base64("YBt0Cw0ygMUqPz1Ii3ZqCrAL0dY6wJnwvJz4iILQTGI=").unwrap();
        let public = private.public_key();
        assert_eq!(
            public.to_base64(),
            "QhzJxYbpni9C1R1PJobJuws/i0WWw5gw+/ihUhuvtms="
        );
        assert_eq!(public, PublicKey::from_hex(&public.to_hex()).unwrap());
        assert_eq!(public, PublicKey::from_base64(&public.to_base64()).unwrap());
        assert!(
            !format!("{private:?}").contains("YBt0"),
            "Debug shows the secret"
        );
    }

    #[test]
    fn bad_public_keys() {
        assert_eq!(PublicKey::from_base64("%%%"), Err(KeyError::NotBase64));
        assert_eq!(PublicKey::from_base64("AAAA"), Err(KeyError::Length(3)));
        assert_eq!(PublicKey::from_hex("zz"), Err(KeyError::NotHex));
    }
}
