//! Image references (`registry/repository[:tag][@sha256:…]`), parsed by hand.
//!
//! `oci-spec` parses references with one large regular expression compiled on first use; the
//! compilation alone takes over 20 MiB of heap, more than modulemgr's whole memory budget. The
//! grammar is small enough to check directly (distribution spec, and the docker rule for a
//! name without a registry), and only `sha256` digests are accepted, as everywhere here.

use oci_client::Reference;

use crate::digest::Digest;

/// The longest repository name accepted (distribution spec: 255 characters).
const MAX_REPOSITORY: usize = 255;
/// The registry a name without one refers to (the docker convention, as `oci-spec` has it).
const DEFAULT_REGISTRY: &str = "docker.io";

/// Why a reference does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// Empty text.
    #[error("empty reference")]
    Empty,
    /// The registry part is not `host[:port]`.
    #[error("registry {0:?} is not host[:port]")]
    Registry(String),
    /// A path component breaks the grammar.
    #[error("repository component {0:?} is not lowercase letters and digits joined by '.', '_', '__' or '-'")]
    Component(String),
    /// The repository is too long.
    #[error("repository is longer than {MAX_REPOSITORY} characters")]
    TooLong,
    /// The tag breaks the grammar.
    #[error(
        "tag {0:?} is not 1-128 of letters, digits, '_', '.', '-' (not starting with '.' or '-')"
    )]
    Tag(String),
    /// The digest is not a sha256 digest.
    #[error("digest: {0}")]
    Digest(String),
}

/// Parses `text` into an `oci-client` reference.
pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
    if text.is_empty() {
        return Err(ReferenceError::Empty);
    }
    let (name_tag, digest) = match text.split_once('@') {
        Some((name_tag, digest)) => {
            let digest =
                Digest::parse(digest).map_err(|e| ReferenceError::Digest(e.to_string()))?;
            (name_tag, Some(digest.to_string()))
        }
        None => (text, None),
    };
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        check_tag(tag)?;
    }
    let (registry, repository) = split_registry(name);
    if registry != DEFAULT_REGISTRY || name.starts_with(DEFAULT_REGISTRY) {
        check_registry(&registry)?;
    }
    if repository.is_empty() {
        return Err(ReferenceError::Component(String::new()));
    }
    for component in repository.split('/') {
        check_component(component)?;
    }
    if repository.len() > MAX_REPOSITORY {
        return Err(ReferenceError::TooLong);
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.to_owned(), digest)
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest),
        (tag, None) => {
            Reference::with_tag(registry, repository, tag.unwrap_or("latest").to_owned())
        }
    })
}

/// The docker rule: the first component is a registry if it has a `.` or a `:` or is
/// `localhost`, and there is more after it.
fn split_registry(name: &str) -> (String, String) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_owned(), rest.to_owned())
        }
        Some(_) => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
        None => (DEFAULT_REGISTRY.to_owned(), format!("library/{name}")),
    }
}

/// Whether `label` is one label of a DNS name: 1 to 63 letters, digits and hyphens, not
/// starting or ending with a hyphen.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

fn check_registry(registry: &str) -> Result<(), ReferenceError> {
    let bad = || ReferenceError::Registry(registry.chars().take(100).collect());
    let (host, port) = match registry.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
    }
    if host.is_empty() || host.len() > 253 || !host.split('.').all(is_dns_label) {
        return Err(bad());
    }
    Ok(())
}

fn check_component(component: &str) -> Result<(), ReferenceError> {
    let bad = || ReferenceError::Component(component.chars().take(100).collect());
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    // Separators between alphanumeric runs: one '.', one or two '_', or any number of '-'.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), ReferenceError> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ReferenceError::Tag(tag.chars().take(130).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same answers as `oci-spec`'s regular expression, on references of every shape.
    #[test]
    fn agrees_with_oci_spec() {
        let digest = format!("sha256:{}", "a1".repeat(32));
        let cases = [
            "127.0.0.1:5000/modules/tools:1.0".to_owned(),
            "127.0.0.1:5000/modules/tools".to_owned(),
            format!("127.0.0.1:5000/modules/tools@{digest}"),
            format!("127.0.0.1:5000/modules/tools:1.0@{digest}"),
            "localhost/a/b:latest".to_owned(),
            "localhost:5000/a".to_owned(),
            "registry.example.com/team/app.v2:v1.2.3-rc_1".to_owned(),
            "ghcr.io/a__b/c-d/e---f:x".to_owned(),
            "busybox".to_owned(),
            "library/busybox:1".to_owned(),
            "reg.example/a/b/c/d/e".to_owned(),
        ];
        for case in &cases {
            let ours = parse(case).unwrap_or_else(|e| panic!("{case}: {e}"));
            let theirs: Reference = case.parse().unwrap();
            assert_eq!(ours.registry(), theirs.registry(), "{case}");
            assert_eq!(ours.repository(), theirs.repository(), "{case}");
            assert_eq!(ours.tag(), theirs.tag(), "{case}");
            assert_eq!(ours.digest(), theirs.digest(), "{case}");
        }
        let bad = [
            "",
            "Reg.example/UPPER/case",
            "reg.example/a//b",
            "reg.example/a/",
            "reg.example/-a",
            "reg.example/a-",
            "reg.example/a.-b",
            "reg.example/a___b",
            "reg.example:port/a",
            "reg.example/a:",
            "reg.example/a:.tag",
            "reg.example/a@sha256:short",
            "reg.example/a@md5:00",
            "reg.example/a:t@",
            "-bad.example/a",
            "reg.example/a b",
        ];
        for case in bad {
            assert!(parse(case).is_err(), "{case:?} should not parse");
            assert!(
                case.parse::<Reference>().is_err() || case.contains("md5"),
                "{case:?}: oci-spec accepts it"
            );
        }
        assert!(parse(&format!("reg.example/{}", "a".repeat(300))).is_err());
    }
}
