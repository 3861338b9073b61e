//! Keys in cosign's file formats: `cosign.pub` (PEM `PUBLIC KEY`, an ECDSA P-256
//! SubjectPublicKeyInfo) and `cosign.key` (PEM `ENCRYPTED SIGSTORE PRIVATE KEY`: a JSON envelope
//! holding the PKCS#8 key sealed with nacl/secretbox under an scrypt-derived key).

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use crypto_secretbox::aead::{Aead, KeyInit};
use crypto_secretbox::{Key, Nonce, XSalsa20Poly1305};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{
    EcdsaKeyPair, KeyPair as _, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1,
    ECDSA_P256_SHA256_ASN1_SIGNING,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::Error;
use crate::digest::hex;

/// PEM label cosign v2 writes for `cosign.key`.
pub const PRIVATE_KEY_LABEL: &str = "ENCRYPTED SIGSTORE PRIVATE KEY";
/// PEM label older cosign releases wrote; still read.
pub const LEGACY_PRIVATE_KEY_LABEL: &str = "ENCRYPTED COSIGN PRIVATE KEY";

/// Larger key files are refused before any parsing.
const MAX_KEY_FILE_BYTES: usize = 64 * 1024;
/// DER prefix of a P-256 SubjectPublicKeyInfo, up to the uncompressed point: SEQUENCE {
/// SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes + unused-bits byte) }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P256_POINT_LEN: usize = 65;

// N = 32768 as cosign has long written (newer releases write 65536); the file carries the
// parameters, so cosign reads either, and so do we.
const SCRYPT_LOG_N: u8 = 15;
const SCRYPT_R: u32 = 8;
const SCRYPT_P: u32 = 1;
/// The largest N accepted when reading (128 MiB of scrypt memory at r = 8): a key file must not
/// make us allocate gigabytes.
const SCRYPT_MAX_LOG_N: u8 = 17;
const SALT_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const KDF_NAME: &str = "scrypt";
const CIPHER_NAME: &str = "nacl/secretbox";

/// The PEM blocks of `text`, as (label, DER) pairs, in order.
pub(crate) fn pem_blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        loop {
            match lines.next() {
                Some(line) if line == end => break,
                Some(line) if line.starts_with("-----") => {
                    return Err(format!("PEM block {label} ends with {line:?}"));
                }
                Some(line) => body.push_str(line),
                None => return Err(format!("PEM block {label} has no END line")),
            }
        }
        let der = BASE64
            .decode(body.as_bytes())
            .map_err(|e| format!("PEM block {label} is not valid base64: {e}"))?;
        blocks.push((label.to_owned(), der));
    }
    Ok(blocks)
}

/// `der` as a PEM block with 64-character lines.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn key_error(what: &'static str, reason: impl Into<String>) -> Error {
    Error::Key {
        what,
        reason: reason.into(),
    }
}

/// A trusted ECDSA P-256 public key, as in `cosign.pub`; also the form of a Rekor log's key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    spki: Vec<u8>,
    fingerprint: String,
}

impl PublicKey {
    /// Reads a PEM `PUBLIC KEY` block (the `cosign.pub` format).
    pub fn from_pem(pem: &str) -> Result<PublicKey, Error> {
        if pem.len() > MAX_KEY_FILE_BYTES {
            return Err(key_error("public key", "the PEM text is too large"));
        }
        let blocks = pem_blocks(pem).map_err(|e| key_error("public key", e))?;
        let Some((_, der)) = blocks.into_iter().find(|(label, _)| label == "PUBLIC KEY") else {
            return Err(key_error("public key", "no PEM PUBLIC KEY block"));
        };
        PublicKey::from_der(&der)
    }

    /// Reads a DER SubjectPublicKeyInfo.
    pub fn from_der(der: &[u8]) -> Result<PublicKey, Error> {
        // cosign generates P-256 keys, whose SPKI encoding has exactly one form: anything else
        // is either another algorithm or not DER.
        if der.len() != P256_SPKI_PREFIX.len() + P256_POINT_LEN
            || der[..P256_SPKI_PREFIX.len()] != P256_SPKI_PREFIX
            || der[P256_SPKI_PREFIX.len()] != 0x04
        {
            return Err(key_error(
                "public key",
                "not an ECDSA P-256 SubjectPublicKeyInfo (the only key type cosign generates)",
            ));
        }
        let fingerprint = hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
        Ok(PublicKey {
            spki: der.to_vec(),
            fingerprint,
        })
    }

    fn from_point(point: &[u8]) -> PublicKey {
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(point);
        let fingerprint = hex(ring::digest::digest(&ring::digest::SHA256, &spki).as_ref());
        PublicKey { spki, fingerprint }
    }

    /// SHA-256 of the SubjectPublicKeyInfo DER, 64 hex digits. For a Rekor key this is the
    /// log's ID.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The first 16 hex digits of [`PublicKey::fingerprint`], as used in messages.
    pub fn short_fingerprint(&self) -> &str {
        &self.fingerprint[..16]
    }

    /// The SubjectPublicKeyInfo DER.
    pub fn to_der(&self) -> &[u8] {
        &self.spki
    }

    /// The `cosign.pub` text.
    pub fn to_pem(&self) -> String {
        pem_encode("PUBLIC KEY", &self.spki)
    }

    /// Whether `signature` (DER ECDSA) is this key's signature over `message` with SHA-256.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_ASN1,
            &self.spki[P256_SPKI_PREFIX.len()..],
        )
        .verify(message, signature)
        .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short_fingerprint())
    }
}

/// An ECDSA P-256 signing key, as in `cosign.key`.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    /// Kept to write `cosign.key`; wiped on drop.
    pkcs8: Zeroizing<Vec<u8>>,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public.short_fingerprint())
    }
}

/// The JSON inside a `cosign.key` PEM block (field names as cosign writes them).
#[derive(Serialize, Deserialize)]
struct EncryptedKey {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Serialize, Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    salt: String,
}

#[derive(Serialize, Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Serialize, Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<SigningKey, Error> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                .map_err(|_| Error::Crypto("generating an ECDSA P-256 key"))?;
        SigningKey::from_pkcs8_der(pkcs8.as_ref())
    }

    /// Reads an unencrypted PKCS#8 DER ECDSA P-256 key (what `cosign.key` seals).
    pub fn from_pkcs8_der(der: &[u8]) -> Result<SigningKey, Error> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &SystemRandom::new())
                .map_err(|e| {
                    key_error(
                        "private key",
                        format!("not an ECDSA P-256 PKCS#8 key ({e})"),
                    )
                })?;
        let public = PublicKey::from_point(pair.public_key().as_ref());
        Ok(SigningKey {
            pair,
            pkcs8: Zeroizing::new(der.to_vec()),
            public,
        })
    }

    /// Reads an unencrypted PKCS#8 PEM `PRIVATE KEY` block (as openssl and rcgen write an
    /// ECDSA P-256 key).
    pub fn from_pkcs8_pem(pem: &str) -> Result<SigningKey, Error> {
        if pem.len() > MAX_KEY_FILE_BYTES {
            return Err(key_error("private key", "the PEM text is too large"));
        }
        let blocks = pem_blocks(pem).map_err(|e| key_error("private key", e))?;
        let Some((_, der)) = blocks.into_iter().find(|(label, _)| label == "PRIVATE KEY") else {
            return Err(key_error("private key", "no PEM PRIVATE KEY block"));
        };
        SigningKey::from_pkcs8_der(&Zeroizing::new(der))
    }

    /// Reads a `cosign.key` file sealed with `password` (cosign reads it from `COSIGN_PASSWORD`).
    pub fn from_cosign_pem(pem: &str, password: &[u8]) -> Result<SigningKey, Error> {
        if pem.len() > MAX_KEY_FILE_BYTES {
            return Err(key_error("private key", "the PEM text is too large"));
        }
        let blocks = pem_blocks(pem).map_err(|e| key_error("private key", e))?;
        let Some((_, sealed)) = blocks
            .iter()
            .find(|(label, _)| label == PRIVATE_KEY_LABEL || label == LEGACY_PRIVATE_KEY_LABEL)
        else {
            let found: Vec<&str> = blocks.iter().map(|(label, _)| label.as_str()).collect();
            return Err(key_error(
                "private key",
                format!("no PEM {PRIVATE_KEY_LABEL} block (found: {found:?})"),
            ));
        };
        let envelope: EncryptedKey = serde_json::from_slice(sealed).map_err(|e| {
            key_error(
                "private key",
                format!("the sealed key is not cosign's JSON envelope: {e}"),
            )
        })?;
        if envelope.kdf.name != KDF_NAME {
            return Err(key_error(
                "private key",
                format!("unsupported KDF {:?} (want scrypt)", envelope.kdf.name),
            ));
        }
        if envelope.cipher.name != CIPHER_NAME {
            return Err(key_error(
                "private key",
                format!(
                    "unsupported cipher {:?} (want nacl/secretbox)",
                    envelope.cipher.name
                ),
            ));
        }
        let ScryptParams { n, r, p } = envelope.kdf.params;
        let log_n = n.trailing_zeros();
        if !n.is_power_of_two()
            || log_n < 1
            || log_n > u32::from(SCRYPT_MAX_LOG_N)
            || r != SCRYPT_R
            || p != SCRYPT_P
        {
            return Err(key_error(
                "private key",
                format!(
                    "unsupported scrypt parameters N={n}, r={r}, p={p} (want r={SCRYPT_R}, \
                     p={SCRYPT_P}, N a power of two up to 2^{SCRYPT_MAX_LOG_N})"
                ),
            ));
        }
        let decode = |what: &'static str, text: &str| {
            BASE64
                .decode(text)
                .map_err(|e| key_error("private key", format!("{what} is not valid base64: {e}")))
        };
        let salt = decode("the salt", &envelope.kdf.salt)?;
        let nonce = decode("the nonce", &envelope.cipher.nonce)?;
        let ciphertext = decode("the ciphertext", &envelope.ciphertext)?;
        if nonce.len() != NONCE_LEN {
            return Err(key_error(
                "private key",
                format!("the nonce has {} bytes, not {NONCE_LEN}", nonce.len()),
            ));
        }
        let key = derive_key(password, &salt, log_n as u8)?;
        let plaintext = XSalsa20Poly1305::new(Key::from_slice(key.as_slice()))
            .decrypt(Nonce::from_slice(&nonce), ciphertext.as_slice())
            .map_err(|_| Error::WrongPassword)?;
        SigningKey::from_pkcs8_der(&Zeroizing::new(plaintext))
    }

    /// This key as a `cosign.key` file sealed with `password`, in the format cosign v2 writes.
    pub fn to_cosign_pem(&self, password: &[u8]) -> Result<String, Error> {
        let rng = SystemRandom::new();
        let mut salt = [0u8; SALT_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut salt)
            .and_then(|()| rng.fill(&mut nonce))
            .map_err(|_| Error::Crypto("drawing a salt and a nonce"))?;
        let key = derive_key(password, &salt, SCRYPT_LOG_N)?;
        let ciphertext = XSalsa20Poly1305::new(Key::from_slice(key.as_slice()))
            .encrypt(Nonce::from_slice(&nonce), self.pkcs8.as_slice())
            .map_err(|_| Error::Crypto("sealing the private key"))?;
        let envelope = EncryptedKey {
            kdf: Kdf {
                name: KDF_NAME.to_owned(),
                params: ScryptParams {
                    n: 1 << SCRYPT_LOG_N,
                    r: SCRYPT_R,
                    p: SCRYPT_P,
                },
                salt: BASE64.encode(salt),
            },
            cipher: Cipher {
                name: CIPHER_NAME.to_owned(),
                nonce: BASE64.encode(nonce),
            },
            ciphertext: BASE64.encode(ciphertext),
        };
        let json = serde_json::to_vec(&envelope)
            .map_err(|_| Error::Crypto("encoding the key envelope"))?;
        Ok(pem_encode(PRIVATE_KEY_LABEL, &json))
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The `cosign.pub` text of the public half.
    pub fn public_key_pem(&self) -> String {
        self.public.to_pem()
    }

    /// Signs `payload` (ECDSA P-256, SHA-256) and returns the DER signature in base64: the value
    /// of the signature annotation.
    pub fn sign(&self, payload: &[u8]) -> Result<String, Error> {
        let signature = self
            .pair
            .sign(&SystemRandom::new(), payload)
            .map_err(|_| Error::Crypto("signing"))?;
        Ok(BASE64.encode(signature.as_ref()))
    }
}

fn derive_key(password: &[u8], salt: &[u8], log_n: u8) -> Result<Zeroizing<[u8; 32]>, Error> {
    let params = scrypt::Params::new(log_n, SCRYPT_R, SCRYPT_P, 32)
        .map_err(|_| key_error("private key", "invalid scrypt parameters"))?;
    let mut key = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(password, salt, &params, key.as_mut_slice())
        .map_err(|_| key_error("private key", "scrypt failed"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_and_rejects_broken_blocks() {
        let der: Vec<u8> = (0..=255).collect();
        let text = pem_encode("THING", &der);
        assert!(text.lines().all(|line| line.len() <= 64));
        assert_eq!(pem_blocks(&text).unwrap(), vec![("THING".to_owned(), der)]);
        assert!(pem_blocks("-----BEGIN X-----\nAAAA\n").is_err());
        assert!(pem_blocks("-----BEGIN X-----\n!!!!\n-----END X-----\n").is_err());
        assert!(pem_blocks("-----BEGIN X-----\nAAAA\n-----END Y-----\n").is_err());
        assert_eq!(pem_blocks("no pem here").unwrap(), vec![]);
    }

    #[test]
    fn public_key_rejects_other_encodings() {
        let key = SigningKey::generate().unwrap();
        let der = key.public_key().to_der().to_vec();
        assert!(PublicKey::from_der(&der).is_ok());
        assert!(PublicKey::from_der(&der[..der.len() - 1]).is_err());
        let mut compressed = der.clone();
        compressed[P256_SPKI_PREFIX.len()] = 0x02;
        assert!(PublicKey::from_der(&compressed).is_err());
        assert!(PublicKey::from_der(b"").is_err());
    }
}
