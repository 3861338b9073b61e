//! Which repositories a signature's `docker-reference` may name.
//!
//! By default a signature must name the repository the module was pulled from: a signature
//! made for `registry.example/prod/tools` does not vouch for the same digest found in
//! `registry.example/staging/tools`. That refuses three honest cases, which a trust policy
//! allows by listing [`SignedReference`]s:
//! - a mirror filled with `cosign copy` (the signature names the origin, the node pulls from
//!   the mirror);
//! - a signature made with `cosign sign --sign-container-identity` (it names a repository the
//!   image was never pushed to, e.g. its production name);
//! - the same registry reached by another name (`10.0.0.5:5000` for `registry.example`).
//!
//! A listed entry is a repository (`registry/path`), matched exactly, or a prefix written
//! `registry/path/*` (or `registry/*`), matching every repository below it at any depth.
//! Before comparing, tags and digests are dropped, the registry's host name is lowercased and
//! Docker Hub's names (`index.docker.io`, `registry-1.docker.io`) become `docker.io`.

use std::fmt;

/// Docker Hub's canonical name, and the other names it goes by.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_ALIASES: [&str; 2] = ["index.docker.io", "registry-1.docker.io"];

/// One entry of a policy's `signed_references`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignedReference {
    /// Exactly this repository (`registry/path`).
    Repository(String),
    /// Every repository under this prefix (`registry` or `registry/path`, written with `/*`).
    Under(String),
}

impl SignedReference {
    /// Reads a policy entry: `registry/path` or `registry[/path]/*`. The error says what is
    /// wrong with it.
    pub fn parse(text: &str) -> Result<SignedReference, String> {
        if text.is_empty() {
            return Err("an empty reference".into());
        }
        if text.contains("://") {
            return Err(format!(
                "{text:?} is a URL; write registry/repository, without a scheme"
            ));
        }
        if text.contains('@') {
            return Err(format!(
                "{text:?} names a digest; list repositories (signatures are checked per digest already)"
            ));
        }
        let (body, prefix) = match text.strip_suffix("/*") {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.contains('*') {
            return Err(format!(
                "{text:?}: `*` may only be the whole last component (registry/path/*)"
            ));
        }
        let mut parts = body.split('/');
        let host = parts.next().unwrap_or_default();
        let path: Vec<&str> = parts.collect();
        if host.is_empty() {
            return Err(format!("{text:?} names no registry"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err(format!("{text:?}: {host:?} is not a registry host[:port]"));
        }
        if !prefix && path.is_empty() {
            return Err(format!(
                "{text:?} names a registry but no repository: write registry/repository, or \
                 registry/* for every repository of the registry"
            ));
        }
        for component in &path {
            if component.contains(':') {
                return Err(format!(
                    "{text:?} has a tag; list repositories (registry/path), without a tag"
                ));
            }
            if !valid_path_component(component) {
                return Err(format!(
                    "{text:?}: {component:?} is not a repository path component (lowercase \
                     letters, digits and . _ - between them)"
                ));
            }
        }
        let normal = canonical(body);
        Ok(if prefix {
            SignedReference::Under(normal)
        } else {
            SignedReference::Repository(normal)
        })
    }

    /// Whether a signature naming `repository` (already [`normalize`]d) is allowed.
    fn allows(&self, repository: &str) -> bool {
        match self {
            SignedReference::Repository(exact) => repository == exact,
            SignedReference::Under(prefix) => repository
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.starts_with('/')),
        }
    }
}

impl fmt::Display for SignedReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignedReference::Repository(repository) => f.write_str(repository),
            SignedReference::Under(prefix) => write!(f, "{prefix}/*"),
        }
    }
}

/// An OCI repository path component: lowercase alphanumerics, separated by `.`, `_`, `__`
/// or runs of `-`.
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    bytes
        .iter()
        .all(|&b| alnum(b) || matches!(b, b'.' | b'_' | b'-'))
}

/// `reference` without a trailing `@digest` or `:tag` (a `:` followed by a `/` is a port).
pub(super) fn repository_part(reference: &str) -> &str {
    let name = reference
        .split_once('@')
        .map_or(reference, |(name, _)| name);
    match name.rfind(':') {
        Some(colon) if !name[colon..].contains('/') => &name[..colon],
        _ => name,
    }
}

/// The form references are compared in: [`repository_part`], then [`canonical`].
pub(super) fn normalize(reference: &str) -> String {
    canonical(repository_part(reference))
}

/// `repository` (no tag or digest) with its host lowercased and Docker Hub's aliases as
/// `docker.io`.
fn canonical(repository: &str) -> String {
    let (host, path) = repository.split_once('/').unwrap_or((repository, ""));
    let mut host = host.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&host.as_str()) {
        host = DOCKER_HUB.to_owned();
    }
    if path.is_empty() {
        host
    } else {
        format!("{host}/{path}")
    }
}

/// Whether a signature whose payload names `named` may vouch for a module pulled from
/// `pulled`, under `allowed` (empty: only `pulled` itself).
pub(super) fn allowed(allowed: &[SignedReference], named: &str, pulled: &str) -> bool {
    let named = normalize(named);
    if allowed.is_empty() {
        named == normalize(pulled)
    } else {
        allowed.iter().any(|entry| entry.allows(&named))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_part_strips_tags_and_digests_but_not_ports() {
        for (reference, repository) in [
            ("registry.example/mods/tools", "registry.example/mods/tools"),
            (
                "registry.example/mods/tools:1.2",
                "registry.example/mods/tools",
            ),
            (
                "registry.example/mods/tools@sha256:ab",
                "registry.example/mods/tools",
            ),
            (
                "registry.example/mods/tools:1.2@sha256:ab",
                "registry.example/mods/tools",
            ),
            ("localhost:5000/tools", "localhost:5000/tools"),
            ("localhost:5000/tools:v1", "localhost:5000/tools"),
        ] {
            assert_eq!(repository_part(reference), repository, "{reference}");
        }
    }

    #[test]
    fn normalize_lowercases_the_host_and_names_docker_hub_once() {
        for (reference, normal) in [
            (
                "Registry.Example/mods/tools:1",
                "registry.example/mods/tools",
            ),
            (
                "index.docker.io/library/busybox",
                "docker.io/library/busybox",
            ),
            (
                "registry-1.docker.io/library/busybox",
                "docker.io/library/busybox",
            ),
            (
                "docker.io/library/busybox@sha256:ab",
                "docker.io/library/busybox",
            ),
            ("10.0.0.5:5000/mods/tools", "10.0.0.5:5000/mods/tools"),
        ] {
            assert_eq!(normalize(reference), normal, "{reference}");
        }
    }

    #[test]
    fn entries_parse_or_say_why_not() {
        let repo = |s: &str| Ok(SignedReference::Repository(s.into()));
        let under = |s: &str| Ok(SignedReference::Under(s.into()));
        for (text, parsed) in [
            ("registry.example/mods/tools", repo("registry.example/mods/tools")),
            ("REGISTRY.example/mods/tools", repo("registry.example/mods/tools")),
            ("127.0.0.1:5000/a/b", repo("127.0.0.1:5000/a/b")),
            ("index.docker.io/library/busybox", repo("docker.io/library/busybox")),
            ("registry.example/mods/*", under("registry.example/mods")),
            ("registry.example/*", under("registry.example")),
            ("Mirror.example:5000/*", under("mirror.example:5000")),
            ("[::1]:5000/a", repo("[::1]:5000/a")),
            ("", Err("an empty reference".into())),
            (
                "https://registry.example/a",
                Err("\"https://registry.example/a\" is a URL; write registry/repository, without a scheme".into()),
            ),
            (
                "registry.example/a@sha256:ab",
                Err("\"registry.example/a@sha256:ab\" names a digest; list repositories (signatures are checked per digest already)".into()),
            ),
            (
                "registry.example/a:1.0",
                Err("\"registry.example/a:1.0\" has a tag; list repositories (registry/path), without a tag".into()),
            ),
            (
                "registry.example",
                Err("\"registry.example\" names a registry but no repository: write registry/repository, or registry/* for every repository of the registry".into()),
            ),
            (
                "*",
                Err("\"*\": `*` may only be the whole last component (registry/path/*)".into()),
            ),
            (
                "registry.example/mods*",
                Err("\"registry.example/mods*\": `*` may only be the whole last component (registry/path/*)".into()),
            ),
            (
                "registry.example/*/tools",
                Err("\"registry.example/*/tools\": `*` may only be the whole last component (registry/path/*)".into()),
            ),
            ("/*", Err("\"/*\" names no registry".into())),
            ("/a/b", Err("\"/a/b\" names no registry".into())),
            (
                "reg istry/a",
                Err("\"reg istry/a\": \"reg istry\" is not a registry host[:port]".into()),
            ),
            (
                "registry.example/Mods/tools",
                Err("\"registry.example/Mods/tools\": \"Mods\" is not a repository path component (lowercase letters, digits and . _ - between them)".into()),
            ),
            (
                "registry.example/mods//tools",
                Err("\"registry.example/mods//tools\": \"\" is not a repository path component (lowercase letters, digits and . _ - between them)".into()),
            ),
            (
                "registry.example/mods/",
                Err("\"registry.example/mods/\": \"\" is not a repository path component (lowercase letters, digits and . _ - between them)".into()),
            ),
        ] {
            assert_eq!(SignedReference::parse(text), parsed, "{text:?}");
        }
    }

    #[test]
    fn entries_match_exactly_or_below_their_prefix() {
        let entries = |texts: &[&str]| -> Vec<SignedReference> {
            texts
                .iter()
                .map(|t| SignedReference::parse(t).unwrap())
                .collect()
        };
        let pulled = "mirror.example/mods/tools";
        for (list, named, ok) in [
            // The default: the pulled repository, whatever its tag or the host's case.
            (&[][..], "mirror.example/mods/tools", true),
            (&[][..], "MIRROR.example/mods/tools:1.0", true),
            (&[][..], "origin.example/mods/tools", false),
            // A list replaces the default.
            (
                &["origin.example/mods/tools"][..],
                "origin.example/mods/tools",
                true,
            ),
            (
                &["origin.example/mods/tools"][..],
                "mirror.example/mods/tools",
                false,
            ),
            (
                &["origin.example/mods/tools"][..],
                "origin.example/mods/tools2",
                false,
            ),
            (
                &["origin.example/mods/tools"][..],
                "origin.example/mods/tools/x",
                false,
            ),
            (
                &["origin.example/mods/*"][..],
                "origin.example/mods/tools",
                true,
            ),
            (
                &["origin.example/mods/*"][..],
                "origin.example/mods/a/b/c",
                true,
            ),
            (&["origin.example/mods/*"][..], "origin.example/mods", false),
            (
                &["origin.example/mods/*"][..],
                "origin.example/modsx/tools",
                false,
            ),
            (&["origin.example/*"][..], "origin.example/anything", true),
            (
                &["origin.example/*"][..],
                "origin.example.evil/anything",
                false,
            ),
            (
                &["origin.example:5000/*"][..],
                "origin.example:5000/a",
                true,
            ),
            (&["origin.example:5000/*"][..], "origin.example/a", false),
            (&["origin.example/*"][..], "origin.example:5000/a", false),
            (
                &["docker.io/library/*"][..],
                "index.docker.io/library/busybox",
                true,
            ),
            (
                &["origin.example/mods/*", "mirror.example/mods/tools"][..],
                "mirror.example/mods/tools",
                true,
            ),
        ] {
            assert_eq!(
                allowed(&entries(list), named, pulled),
                ok,
                "{list:?} naming {named}"
            );
        }
    }
}
