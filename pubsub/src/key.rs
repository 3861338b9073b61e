//! Which strings are valid keys and names.
//!
//! A key is also the checkpoint file's name, so it must be a safe, portable file name that can
//! never collide with the publisher's own bookkeeping files (which all start with a dot).

use crate::error::{Error, Result};

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 200;

/// Checks that `key` can be used as an item key (and hence a checkpoint file name).
pub fn validate_key(key: &str) -> Result<()> {
    let refuse = |reason| {
        Err(Error::InvalidKey {
            key: key.to_owned(),
            reason,
        })
    };
    if key.is_empty() {
        return refuse("empty");
    }
    if key.len() > MAX_KEY_LEN {
        return refuse("longer than 200 bytes");
    }
    if key.starts_with('.') {
        return refuse("starts with '.'");
    }
    if !key.bytes().all(is_key_byte) {
        return refuse("only ASCII letters, digits and . _ - : @ + are allowed");
    }
    Ok(())
}

fn is_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@' | b'+')
}

/// Checks an agent or topic name, which become directory and socket names.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what,
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let long = "k".repeat(MAX_KEY_LEN + 1);
        let table: &[(&str, bool)] = &[
            ("global", true),
            ("sha256:abcdef", true),
            ("mod-1.2_x@y+z", true),
            ("", false),
            (".hidden", false),
            ("a/b", false),
            ("..", false),
            ("sp ace", false),
            ("naïve", false),
            (&long, false),
        ];
        for (key, ok) in table {
            assert_eq!(validate_key(key).is_ok(), *ok, "key {key:?}");
        }
    }

    #[test]
    fn names() {
        assert!(validate_name("agent", "identitymgr").is_ok());
        assert!(validate_name("topic", "NodeIdentity").is_ok());
        assert!(validate_name("agent", "a/b").is_err());
        assert!(validate_name("agent", "..").is_err());
        assert!(validate_name("agent", "").is_err());
    }
}
