//! Checks for every value a source supplies. Nothing leaves a source unchecked: a value that
//! fails here is an error for that source, and the cascade moves on.

use agentbase::settings::split_url_list;
use base64::Engine as _;

/// Largest CA bundle accepted, in bytes (after base64 decoding).
pub const MAX_CA_BYTES: usize = 256 * 1024;
/// Shortest bootstrap token accepted.
pub const MIN_TOKEN_LEN: usize = 8;
/// Longest bootstrap token accepted.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest controller URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// A value that is not acceptable. Displays as `invalid <field>: <reason>`; the reason never
/// repeats a secret (a bootstrap token is described, not shown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ValueError {
    /// The key as the source spells it, e.g. `powernode.instance_uuid` or `INSTANCE_UUID`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

impl ValueError {
    /// An error for `field`.
    pub fn new(field: &str, reason: impl Into<String>) -> ValueError {
        ValueError {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A UUID in the canonical hyphenated form `8-4-4-4-12` hex digits (either case), returned in
/// lower case. The nil UUID (all zero) and the max UUID (all `f`) are rejected: firmware and
/// templates use them as "not set".
pub fn uuid(field: &str, value: &str) -> Result<String, ValueError> {
    let bad = |reason: &str| ValueError::new(field, format!("{} ({reason})", excerpt(value)));
    if value.is_empty() {
        return Err(ValueError::new(field, "empty"));
    }
    if value.len() != 36 {
        return Err(bad("a UUID is 36 characters: 8-4-4-4-12 hex digits"));
    }
    for (i, c) in value.char_indices() {
        let hyphen = matches!(i, 8 | 13 | 18 | 23);
        if hyphen && c != '-' {
            return Err(bad("a UUID is 8-4-4-4-12 hex digits separated by `-`"));
        }
        if !hyphen && !c.is_ascii_hexdigit() {
            return Err(bad("a UUID is 8-4-4-4-12 hex digits separated by `-`"));
        }
    }
    let lower = value.to_ascii_lowercase();
    let digits = || lower.chars().filter(|c| *c != '-');
    if digits().all(|c| c == '0') {
        return Err(bad("the nil UUID means \"not set\""));
    }
    if digits().all(|c| c == 'f') {
        return Err(bad("the all-ones UUID means \"not set\""));
    }
    Ok(lower)
}

/// The controller URLs of a comma-separated list (`https://a:8443,https://b:8443`): each a
/// [`controller_url`], in the order given, a repeated one kept once. One URL is a list of one.
/// An empty entry, or more than
/// [`MAX_CONTROLLER_URLS`](agentbase::settings::MAX_CONTROLLER_URLS), is an error.
pub fn controller_urls(field: &str, value: &str) -> Result<Vec<String>, ValueError> {
    let urls = split_url_list(value).map_err(|reason| ValueError::new(field, reason))?;
    urls.into_iter()
        .map(|url| controller_url(field, url))
        .collect()
}

/// A controller URL: `http` or `https`, with a host, at most [`MAX_URL_LEN`] bytes.
pub fn controller_url(field: &str, value: &str) -> Result<String, ValueError> {
    if value.is_empty() {
        return Err(ValueError::new(field, "empty"));
    }
    if value.len() > MAX_URL_LEN {
        return Err(ValueError::new(
            field,
            format!("longer than {MAX_URL_LEN} bytes"),
        ));
    }
    let url = reqwest::Url::parse(value)
        .map_err(|e| ValueError::new(field, format!("{}: {e}", excerpt(value))))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ValueError::new(
            field,
            format!("{}: scheme must be http or https", excerpt(value)),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ValueError::new(
            field,
            format!("{}: no host", excerpt(value)),
        ));
    }
    Ok(value.to_owned())
}

/// A bootstrap token: [`MIN_TOKEN_LEN`]..=[`MAX_TOKEN_LEN`] characters from `A-Z a-z 0-9` and
/// `- . _ ~ + / = :` (what JWTs, base64 and opaque API tokens use). The token itself never
/// appears in an error.
pub fn bootstrap_token(field: &str, value: &str) -> Result<String, ValueError> {
    if value.is_empty() {
        return Err(ValueError::new(field, "empty"));
    }
    let len = value.len();
    if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&len) {
        return Err(ValueError::new(
            field,
            format!("{len} characters; must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN}"),
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~+/=:".contains(c);
    if let Some(pos) = value.find(|c: char| !allowed(c)) {
        return Err(ValueError::new(
            field,
            format!(
                "character {} is not allowed (A-Z a-z 0-9 - . _ ~ + / = :)",
                pos + 1
            ),
        ));
    }
    Ok(value.to_owned())
}

/// A PEM CA bundle: text with at least one `-----BEGIN CERTIFICATE-----` …
/// `-----END CERTIFICATE-----` block, at most [`MAX_CA_BYTES`]. Returned with surrounding
/// whitespace trimmed and a final newline.
pub fn ca_pem(field: &str, value: &[u8]) -> Result<String, ValueError> {
    if value.len() > MAX_CA_BYTES {
        return Err(ValueError::new(
            field,
            format!("{} bytes; at most {MAX_CA_BYTES}", value.len()),
        ));
    }
    let text = std::str::from_utf8(value)
        .map_err(|_| ValueError::new(field, "not text (invalid UTF-8)"))?
        .trim();
    if text.is_empty() {
        return Err(ValueError::new(field, "empty"));
    }
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let Some(begin) = text.find(BEGIN) else {
        return Err(ValueError::new(field, format!("no `{BEGIN}` line")));
    };
    match text[begin..].find(END) {
        Some(end) if end > BEGIN.len() => {}
        _ => {
            return Err(ValueError::new(
                field,
                format!("no `{END}` after `{BEGIN}`"),
            ))
        }
    }
    if text.matches(BEGIN).count() != text.matches(END).count() {
        return Err(ValueError::new(
            field,
            "unbalanced BEGIN/END CERTIFICATE lines",
        ));
    }
    Ok(format!("{text}\n"))
}

/// A CA bundle given either as PEM text or as base64 of PEM text (for places that cannot hold
/// newlines, such as the kernel command line). Standard and URL-safe alphabets, padded or not.
pub fn ca_pem_or_base64(field: &str, value: &str) -> Result<String, ValueError> {
    if value.contains("-----BEGIN") {
        return ca_pem(field, value.as_bytes());
    }
    let decoded = decode_base64(value.trim())
        .map_err(|reason| ValueError::new(field, format!("neither PEM nor base64: {reason}")))?;
    ca_pem(field, &decoded)
}

/// Decodes base64 in the standard or URL-safe alphabet, with or without padding; whitespace
/// (line breaks) inside is ignored.
pub fn decode_base64(value: &str) -> Result<Vec<u8>, String> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let compact: String = value.chars().filter(|c| !c.is_whitespace()).collect();
    if compact.is_empty() {
        return Err("empty".to_owned());
    }
    let engines = [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD];
    let mut first_error = None;
    for engine in engines {
        match engine.decode(&compact) {
            Ok(bytes) => return Ok(bytes),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.map_or_else(|| "not base64".to_owned(), |e| e.to_string()))
}

/// A short, printable rendering of an untrusted value for an error message.
pub fn excerpt(value: &str) -> String {
    const MAX: usize = 48;
    let shown: String = value.chars().take(MAX).collect();
    if value.chars().count() > MAX {
        format!("{:?}…", shown)
    } else {
        format!("{shown:?}")
    }
}

/// The canonical hyphenated lower-case form of 16 bytes.
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The 16 bytes of a UUID already accepted by [`uuid`].
pub fn uuid_bytes(canonical: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = canonical.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// A random (version 4) UUID from the operating system's random source.
pub fn random_uuid() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Ok(format_uuid(&bytes))
}

/// The name-based (version 5, SHA-1) UUID of `name` in `namespace` (RFC 9562 §5.5).
pub fn name_uuid(namespace: &[u8; 16], name: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(namespace);
    sha.update(name.as_bytes());
    let digest = sha.digest().bytes();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    format_uuid(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ\n-----END CERTIFICATE-----\n";

    #[test]
    fn uuid_table() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            (
                "6F1E8C3A-92B4-4D7E-A1C2-0B3D4E5F6A7B",
                Ok("6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b"),
            ),
            (
                "6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b",
                Ok("6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b"),
            ),
            ("", Err("empty")),
            ("00000000-0000-0000-0000-000000000000", Err("nil UUID")),
            ("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF", Err("all-ones")),
            ("6f1e8c3a92b44d7ea1c20b3d4e5f6a7b", Err("36 characters")),
            ("{6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a}", Err("hex digits")),
            ("6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7g", Err("hex digits")),
            ("6f1e8c3a-92b44-d7e-a1c2-0b3d4e5f6a7b", Err("hex digits")),
            (
                "6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7\u{e9}",
                Err("36 characters"),
            ),
            ("not a uuid", Err("36 characters")),
        ];
        for (input, want) in cases {
            match (uuid("uuid", input), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want, "{input:?}"),
                (Err(e), Err(want)) => {
                    assert!(e.to_string().contains(want), "{input:?}: {e}");
                    assert!(e.to_string().starts_with("invalid uuid: "), "{e}");
                }
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn url_table() {
        let ok = [
            "https://controller.example.com",
            "http://10.0.0.1:8443/api",
            "https://[fd00::1]:443/",
        ];
        for value in ok {
            assert_eq!(controller_url("u", value).unwrap(), value);
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("controller.example.com", "relative URL"),
            ("ftp://example.com", "scheme must be http or https"),
            ("file:///etc/passwd", "scheme"),
            ("http://", "empty host"),
            ("https://exa mple.com", "invalid"),
        ];
        for (value, want) in bad {
            let err = controller_url("u", value).unwrap_err().to_string();
            assert!(err.contains(want), "{value:?}: {err}");
        }
        let long = format!("https://e.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(controller_url("u", &long).is_err());
    }

    #[test]
    fn url_list_table() {
        let ok: &[(&str, &[&str])] = &[
            ("https://a.example", &["https://a.example"]),
            (
                "https://a.example:8443,https://b.example:8443",
                &["https://a.example:8443", "https://b.example:8443"],
            ),
            (
                " https://a , http://10.0.0.2:80/api ",
                &["https://a", "http://10.0.0.2:80/api"],
            ),
            // Order kept, a repeat kept once.
            ("https://b,https://a,https://b", &["https://b", "https://a"]),
        ];
        for (value, want) in ok {
            assert_eq!(controller_urls("u", value).unwrap(), *want, "{value:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("https://a,,https://b", "empty entry"),
            ("https://a,", "empty entry"),
            (",https://a", "empty entry"),
            ("https://a,ftp://b", "scheme must be http or https"),
            ("https://a,b.example", "relative URL"),
        ];
        for (value, want) in bad {
            let err = controller_urls("powernode.controller_url", value)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{value:?}: {err}");
            assert!(
                err.starts_with("invalid powernode.controller_url: "),
                "{err}"
            );
        }
        let many = vec!["https://a"; agentbase::settings::MAX_CONTROLLER_URLS + 1]
            .iter()
            .enumerate()
            .map(|(i, u)| format!("{u}{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(controller_urls("u", &many).is_err());
    }

    #[test]
    fn token_table() {
        for ok in [
            "abcdefgh",
            "tok_123.abc-DEF~+/=:",
            &"a".repeat(MAX_TOKEN_LEN),
        ] {
            assert_eq!(bootstrap_token("t", ok).unwrap(), ok);
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("short", "5 characters"),
            ("has space in it", "character 4"),
            ("quote\"inside", "character 6"),
            ("secret-token\n", "character 13"),
        ];
        for (value, want) in bad {
            let err = bootstrap_token("t", value).unwrap_err().to_string();
            assert!(err.contains(want), "{value:?}: {err}");
            if !value.is_empty() {
                assert!(!err.contains(value.trim()), "token leaked: {err}");
            }
        }
        assert!(bootstrap_token("t", &"a".repeat(MAX_TOKEN_LEN + 1)).is_err());
    }

    #[test]
    fn pem_table() {
        assert_eq!(ca_pem("ca", PEM.as_bytes()).unwrap(), PEM);
        assert_eq!(
            ca_pem("ca", format!("\n\n{PEM}\n ").as_bytes()).unwrap(),
            PEM
        );
        let two = format!("{PEM}{PEM}");
        assert_eq!(ca_pem("ca", two.as_bytes()).unwrap(), two);
        let bad: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"   \n", "empty"),
            (b"hello", "no `-----BEGIN CERTIFICATE-----`"),
            (b"-----BEGIN CERTIFICATE-----\nabc\n", "no `-----END"),
            (
                b"-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n",
                "no `-----END",
            ),
            (b"\xff\xfe-----BEGIN", "UTF-8"),
        ];
        for (value, want) in bad {
            let err = ca_pem("ca", value).unwrap_err().to_string();
            assert!(err.contains(want), "{value:?}: {err}");
        }
        let huge = vec![b'a'; MAX_CA_BYTES + 1];
        assert!(ca_pem("ca", &huge).is_err());
    }

    #[test]
    fn pem_or_base64() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        assert_eq!(ca_pem_or_base64("ca", PEM).unwrap(), PEM);
        assert_eq!(ca_pem_or_base64("ca", &STANDARD.encode(PEM)).unwrap(), PEM);
        assert_eq!(
            ca_pem_or_base64("ca", &URL_SAFE_NO_PAD.encode(PEM)).unwrap(),
            PEM
        );
        let err = ca_pem_or_base64("ca", "!!!not base64!!!")
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither PEM nor base64"), "{err}");
        let err = ca_pem_or_base64("ca", &STANDARD.encode("just text")).unwrap_err();
        assert!(err.to_string().contains("no `-----BEGIN"), "{err}");
    }

    #[test]
    fn generated_uuids() {
        let a = random_uuid().unwrap();
        let b = random_uuid().unwrap();
        assert_ne!(a, b);
        assert_eq!(uuid("u", &a).unwrap(), a);
        assert_eq!(&a[14..15], "4", "version 4: {a}");
        assert!("89ab".contains(&a[19..20]), "RFC variant: {a}");

        // RFC 9562 test vector: v5 of "www.example.com" in the DNS namespace.
        let dns = uuid_bytes("6ba7b810-9dad-11d1-80b4-00c04fd430c8").unwrap();
        assert_eq!(
            name_uuid(&dns, "www.example.com"),
            "2ed6657d-e927-568b-95e1-2665a8aea6a2"
        );
        assert_eq!(uuid_bytes("nope"), None);
    }

    #[test]
    fn excerpt_is_bounded() {
        assert_eq!(excerpt("ab\n"), "\"ab\\n\"");
        let long = "x".repeat(100);
        assert!(excerpt(&long).chars().count() < 60);
    }
}
