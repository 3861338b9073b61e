//! Randomness and digests: bootstrap and operator tokens, ids, serials, fingerprints.

use ring::rand::{SecureRandom, SystemRandom};

/// Failure of the operating system's random number generator.
#[derive(Debug, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| RandomError)?;
    Ok(out)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Lowercase hex SHA-256 of `data`: how tokens are stored and certificates fingerprinted.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// A fresh secret token: 32 random bytes as 64 hex characters.
pub fn new_token() -> Result<String, RandomError> {
    Ok(hex(&random_bytes::<32>()?))
}

/// Whether `presented` is the secret whose SHA-256 hex is `expected_hash`, compared in
/// constant time over the digests.
pub fn token_matches(presented: &str, expected_hash: &str) -> bool {
    let got = sha256_hex(presented.as_bytes());
    got.len() == expected_hash.len()
        && got
            .bytes()
            .zip(expected_hash.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_and_compare() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let token = new_token().unwrap();
        assert_eq!(token.len(), 64);
        assert!(token_matches(&token, &sha256_hex(token.as_bytes())));
        assert!(!token_matches("other", &sha256_hex(token.as_bytes())));
        assert_ne!(new_token().unwrap(), token);
    }
}
