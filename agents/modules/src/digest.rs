//! OCI content digests. Only `sha256:` is accepted: it is what every module uses, and a strict
//! parse (64 lowercase hex digits) is what makes a digest safe to use as a file name.

use std::fmt;

/// A `sha256:<64 lowercase hex>` digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{text:?} is not a sha256 digest (want sha256:<64 lowercase hex digits>)")]
pub struct DigestError {
    text: String,
}

impl Digest {
    /// Parses `sha256:<hex>`.
    pub fn parse(text: &str) -> Result<Digest, DigestError> {
        let error = || DigestError {
            text: text.chars().take(80).collect(),
        };
        let hex = text.strip_prefix("sha256:").ok_or_else(error)?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(error());
        }
        Ok(Digest {
            hex: hex.to_owned(),
        })
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_sha256(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
    }

    /// The digest with the given raw SHA-256 value.
    pub fn from_sha256(raw: &[u8]) -> Digest {
        Digest { hex: hex(raw) }
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_is_strict() {
        let good = format!("sha256:{}", "0a".repeat(32));
        assert_eq!(Digest::parse(&good).unwrap().to_string(), good);
        for bad in [
            "sha256:".to_owned(),
            format!("sha512:{}", "0a".repeat(32)),
            format!("sha256:{}", "0A".repeat(32)),
            format!("sha256:{}/..", "0a".repeat(31)),
            format!("sha256:{}0", "0a".repeat(32)),
            "".to_owned(),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
