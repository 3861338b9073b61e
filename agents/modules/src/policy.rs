//! Trust policies: `etc/powernode/trust/<name>.toml`, naming the keys (and, for keyless
//! signatures, the certificate roots, identity and issuer) a module's signature must match,
//! and the repositories a signature may name.
//!
//! ```toml
//! require_signature = true            # default; false accepts unsigned modules
//! keys = ["cosign.pub"]               # PEM public keys, relative to etc/powernode/trust/
//! signed_references = ["registry.example/modules/*"]  # optional; default: the pulled repository
//! [keyless]                           # optional
//! roots = ["fulcio-root.pem"]         # PEM CA certificates
//! identity = '^ops@example\.com$'     # regex on the certificate's SAN (email or URI)
//! issuer = '^https://issuer\.example$' # regex on the OIDC issuer extension
//! log_keys = ["rekor.pub"]            # transparency-log public keys (PEM)
//! ```
//!
//! Keys and keyless roots may both be given: a signature passes if either accepts it.
//! `signed_references` lists the repositories a signature's `docker-reference` may name, each
//! exact (`registry/path`) or a prefix (`registry/path/*`); when given it replaces the default,
//! the repository the module was pulled from ([`crate::cosign::references`]).

use std::path::{Path, PathBuf};

use crate::cosign::{self, KeylessRoot, Policy, PublicKey, SignedReference};
use powernode_types::VerifyConfig;
use serde::Deserialize;

/// The directory under the root.
pub const DIR: &str = "etc/powernode/trust";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default = "yes")]
    require_signature: bool,
    #[serde(default)]
    keys: Vec<String>,
    signed_references: Option<Vec<String>>,
    keyless: Option<KeylessFile>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeylessFile {
    roots: Vec<String>,
    identity: String,
    issuer: String,
    log_keys: Vec<String>,
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("trust policy {name} ({path}): {reason}")]
pub struct PolicyError {
    name: String,
    path: PathBuf,
    reason: String,
}

/// Loads policy `name` from `dir`.
pub fn load(dir: &Path, name: &str) -> Result<Policy, PolicyError> {
    let path = dir.join(format!("{name}.toml"));
    let error = |reason: String| PolicyError {
        name: name.to_owned(),
        path: path.clone(),
        reason,
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(error("not a valid policy name".into()));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| error(e.to_string()))?;
    let file: PolicyFile = toml::from_str(&text).map_err(|e| error(e.to_string()))?;
    let read = |rel: &str| -> Result<String, PolicyError> {
        if rel.is_empty() || Path::new(rel).is_absolute() {
            return Err(error(format!(
                "{rel:?}: name files relative to the policy's directory"
            )));
        }
        let p = dir.join(rel);
        std::fs::read_to_string(&p).map_err(|e| error(format!("{}: {e}", p.display())))
    };
    let signed_references = match &file.signed_references {
        None => Vec::new(),
        Some(list) if list.is_empty() => {
            return Err(error(
                "signed_references is empty, which would refuse every signature; leave it out \
                 to allow only the repository a module is pulled from"
                    .into(),
            ));
        }
        Some(list) => list
            .iter()
            .map(|text| {
                SignedReference::parse(text).map_err(|e| error(format!("signed_references: {e}")))
            })
            .collect::<Result<_, _>>()?,
    };
    let mut keys = Vec::new();
    for rel in &file.keys {
        keys.push(PublicKey::from_pem(&read(rel)?).map_err(|e| error(format!("{rel}: {e}")))?);
    }
    let keyless = match &file.keyless {
        None => None,
        Some(k) => {
            let mut roots = String::new();
            for rel in &k.roots {
                roots.push_str(&read(rel)?);
                roots.push('\n');
            }
            let mut log_keys = Vec::new();
            for rel in &k.log_keys {
                log_keys.push(
                    PublicKey::from_pem(&read(rel)?).map_err(|e| error(format!("{rel}: {e}")))?,
                );
            }
            Some(
                KeylessRoot::new(&roots, &k.identity, &k.issuer, log_keys)
                    .map_err(|e| error(e.to_string()))?,
            )
        }
    };
    if file.require_signature && keys.is_empty() && keyless.is_none() {
        return Err(error(
            "requires a signature but names no keys and no keyless root".into(),
        ));
    }
    Ok(Policy {
        keys,
        keyless,
        require_signature: file.require_signature,
        signed_references,
    })
}

/// Why the signature check of `config` failed, as `VerifyStatus` says it: `error`, except
/// that an unsigned platform manifest chosen from a signed index says so and what to do.
pub fn explain(config: &VerifyConfig, error: cosign::Error) -> String {
    match (&error, &config.signed_index) {
        (cosign::Error::NoSignatures, Some(index)) => format!(
            "the platform manifest {} is not signed, only the index {index} it was chosen \
             from is, and a node checks the manifest for its architecture: sign recursively \
             (`cosign sign --recursive REF`, or `powernode-controller module sign REF`, which \
             always does)",
            config.manifest_digest
        ),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cosign::SigningKey;

    /// A trust directory with two keys, a log key, a test root certificate and files that
    /// are not what a policy wants.
    struct Dir {
        dir: tempfile::TempDir,
        /// Key file name by fingerprint.
        names: Vec<(String, &'static str)>,
    }

    impl Dir {
        fn new() -> Dir {
            let dir = tempfile::tempdir().unwrap();
            let mut names = Vec::new();
            for name in ["cosign.pub", "other.pub", "rekor.pub"] {
                let key = SigningKey::generate().unwrap();
                std::fs::write(dir.path().join(name), key.public_key_pem()).unwrap();
                names.push((key.public_key().fingerprint().to_owned(), name));
            }
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let root = params.self_signed(&ca_key).unwrap();
            std::fs::write(dir.path().join("root.pem"), root.pem()).unwrap();
            std::fs::write(dir.path().join("garbage.pub"), "not a key\n").unwrap();
            std::fs::write(
                dir.path().join("rsa.pem"),
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            )
            .unwrap();
            Dir { dir, names }
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }

        /// Writes `text` as policy `p` and loads it: what it amounts to, or the error with
        /// the directory written as `DIR`.
        fn load(&self, text: &str) -> Result<String, String> {
            std::fs::write(self.path().join("p.toml"), text).unwrap();
            load(self.path(), "p")
                .map(|policy| self.describe(&policy))
                .map_err(|e| {
                    e.to_string()
                        .replace(&self.path().display().to_string(), "DIR")
                })
        }

        /// A policy as one line: its keys by file name, its keyless identity and issuer, its
        /// references.
        fn describe(&self, policy: &Policy) -> String {
            let keys: Vec<&str> = policy
                .keys
                .iter()
                .map(|key| {
                    self.names
                        .iter()
                        .find(|(fingerprint, _)| fingerprint == key.fingerprint())
                        .map_or("?", |(_, name)| name)
                })
                .collect();
            let keyless = policy.keyless.as_ref().map_or("none".to_owned(), |k| {
                format!("{} / {}", k.identity(), k.issuer())
            });
            let references: Vec<String> = policy
                .signed_references
                .iter()
                .map(ToString::to_string)
                .collect();
            format!(
                "require_signature={} keys={keys:?} keyless={keyless} signed_references={references:?}",
                policy.require_signature
            )
        }
    }

    const KEYLESS: &str = "[keyless]\nroots = [\"root.pem\"]\nidentity = '^ci@corp\\.example$'\n\
                           issuer = '^https://issuer\\.example$'\nlog_keys = [\"rekor.pub\"]\n";

    #[test]
    fn every_field_and_its_default() {
        let dir = Dir::new();
        let ok = |s: &str| Ok(s.to_owned());
        let both = format!("keys = [\"cosign.pub\"]\n{KEYLESS}");
        for (text, expected) in [
            (
                "keys = [\"cosign.pub\"]\n",
                ok(
                    r#"require_signature=true keys=["cosign.pub"] keyless=none signed_references=[]"#,
                ),
            ),
            (
                "keys = [\"cosign.pub\", \"other.pub\"]\nrequire_signature = true\n",
                ok(
                    r#"require_signature=true keys=["cosign.pub", "other.pub"] keyless=none signed_references=[]"#,
                ),
            ),
            (
                "require_signature = false\n",
                ok(r#"require_signature=false keys=[] keyless=none signed_references=[]"#),
            ),
            (
                "require_signature = false\nkeys = [\"other.pub\"]\n",
                ok(
                    r#"require_signature=false keys=["other.pub"] keyless=none signed_references=[]"#,
                ),
            ),
            (
                KEYLESS,
                ok(
                    r#"require_signature=true keys=[] keyless=^ci@corp\.example$ / ^https://issuer\.example$ signed_references=[]"#,
                ),
            ),
            // Keys and keyless together: either may accept a signature.
            (
                &both,
                ok(
                    r#"require_signature=true keys=["cosign.pub"] keyless=^ci@corp\.example$ / ^https://issuer\.example$ signed_references=[]"#,
                ),
            ),
            (
                "keys = [\"cosign.pub\"]\nsigned_references = [\"Registry.example/mods/tools\", \
                 \"mirror.example:5000/*\", \"index.docker.io/library/busybox\"]\n",
                ok(
                    r#"require_signature=true keys=["cosign.pub"] keyless=none signed_references=["registry.example/mods/tools", "mirror.example:5000/*", "docker.io/library/busybox"]"#,
                ),
            ),
        ] {
            assert_eq!(dir.load(text), expected, "{text}");
        }
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let dir = Dir::new();
        let err = |reason: &str| Err(format!("trust policy p (DIR/p.toml): {reason}"));
        let keyless = |replace: (&str, &str)| KEYLESS.replace(replace.0, replace.1);
        let cases: Vec<(String, Result<String, String>)> = vec![
            (
                String::new(),
                err("requires a signature but names no keys and no keyless root"),
            ),
            (
                "keys = []\n".into(),
                err("requires a signature but names no keys and no keyless root"),
            ),
            (
                "keys = [\"cosign.pub\"]\ntrust_everything = true\n".into(),
                err("TOML parse error at line 2, column 1\n  |\n2 | trust_everything = true\n  | ^^^^^^^^^^^^^^^^\nunknown field `trust_everything`, expected one of `require_signature`, `keys`, `signed_references`, `keyless`\n"),
            ),
            (
                "key = [\"cosign.pub\"]\n".into(),
                err("TOML parse error at line 1, column 1\n  |\n1 | key = [\"cosign.pub\"]\n  | ^^^\nunknown field `key`, expected one of `require_signature`, `keys`, `signed_references`, `keyless`\n"),
            ),
            (
                keyless(("[keyless]\n", "[keyless]\nsubject = 'x'\n")),
                err("TOML parse error at line 2, column 1\n  |\n2 | subject = 'x'\n  | ^^^^^^^\nunknown field `subject`, expected one of `roots`, `identity`, `issuer`, `log_keys`\n"),
            ),
            (
                "keys = \"cosign.pub\"\n".into(),
                err("TOML parse error at line 1, column 8\n  |\n1 | keys = \"cosign.pub\"\n  |        ^^^^^^^^^^^^\ninvalid type: string \"cosign.pub\", expected a sequence\n"),
            ),
            (
                "require_signature = \"yes\"\nkeys = [\"cosign.pub\"]\n".into(),
                err("TOML parse error at line 1, column 21\n  |\n1 | require_signature = \"yes\"\n  |                     ^^^^^\ninvalid type: string \"yes\", expected a boolean\n"),
            ),
            (
                "keys = [\"cosign.pub\"\n".into(),
                err("TOML parse error at line 1, column 21\n  |\n1 | keys = [\"cosign.pub\"\n  |                     ^\nunclosed array, expected `]`\n"),
            ),
            (
                "keys = [\"cosign.pub\"]\nkeys = [\"other.pub\"]\n".into(),
                err("TOML parse error at line 2, column 1\n  |\n2 | keys = [\"other.pub\"]\n  | ^^^^\nduplicate key\n"),
            ),
            (
                keyless(("log_keys = [\"rekor.pub\"]\n", "")),
                err("TOML parse error at line 1, column 1\n  |\n1 | [keyless]\n  | ^^^^^^^^^\nmissing field `log_keys`\n"),
            ),
            (
                keyless(("identity = '^ci@corp\\.example$'\n", "")),
                err("TOML parse error at line 1, column 1\n  |\n1 | [keyless]\n  | ^^^^^^^^^\nmissing field `identity`\n"),
            ),
            // Files the policy names.
            (
                "keys = [\"missing.pub\"]\n".into(),
                err("DIR/missing.pub: No such file or directory (os error 2)"),
            ),
            (
                "keys = [\"/etc/cosign.pub\"]\n".into(),
                err("\"/etc/cosign.pub\": name files relative to the policy's directory"),
            ),
            (
                "keys = [\"\"]\n".into(),
                err("\"\": name files relative to the policy's directory"),
            ),
            (
                "keys = [\"garbage.pub\"]\n".into(),
                err("garbage.pub: public key: no PEM PUBLIC KEY block"),
            ),
            (
                "keys = [\"rsa.pem\"]\n".into(),
                err("rsa.pem: public key: not an ECDSA P-256 SubjectPublicKeyInfo (the only key type cosign generates)"),
            ),
            (
                keyless(("roots = [\"root.pem\"]", "roots = [\"missing.pem\"]")),
                err("DIR/missing.pem: No such file or directory (os error 2)"),
            ),
            (
                keyless(("roots = [\"root.pem\"]", "roots = [\"cosign.pub\"]")),
                err("keyless trust root: no PEM CERTIFICATE block among the roots"),
            ),
            (
                keyless(("roots = [\"root.pem\"]", "roots = []")),
                err("keyless trust root: no PEM CERTIFICATE block among the roots"),
            ),
            (
                keyless(("log_keys = [\"rekor.pub\"]", "log_keys = [\"missing.pub\"]")),
                err("DIR/missing.pub: No such file or directory (os error 2)"),
            ),
            (
                keyless(("log_keys = [\"rekor.pub\"]", "log_keys = [\"root.pem\"]")),
                err("root.pem: public key: no PEM PUBLIC KEY block"),
            ),
            (
                keyless(("log_keys = [\"rekor.pub\"]", "log_keys = []")),
                err("keyless trust root: a keyless root needs at least one Rekor key: without the log, a stolen short-lived certificate would sign forever"),
            ),
            // Regexes.
            (
                keyless(("identity = '^ci@corp\\.example$'", "identity = '^ci@(corp'")),
                err("invalid identity regex \"^ci@(corp\": regex parse error:\n    ^ci@(corp\n        ^\nerror: unclosed group"),
            ),
            (
                keyless(("issuer = '^https://issuer\\.example$'", "issuer = '[z-a]'")),
                err("invalid issuer regex \"[z-a]\": regex parse error:\n    [z-a]\n     ^^^\nerror: invalid character class range, the start must be <= the end"),
            ),
            // References.
            (
                "keys = [\"cosign.pub\"]\nsigned_references = []\n".into(),
                err("signed_references is empty, which would refuse every signature; leave it out to allow only the repository a module is pulled from"),
            ),
            (
                "keys = [\"cosign.pub\"]\nsigned_references = [\"registry.example/mods/tools:1.0\"]\n".into(),
                err("signed_references: \"registry.example/mods/tools:1.0\" has a tag; list repositories (registry/path), without a tag"),
            ),
            (
                "keys = [\"cosign.pub\"]\nsigned_references = [\"*\"]\n".into(),
                err("signed_references: \"*\": `*` may only be the whole last component (registry/path/*)"),
            ),
            (
                "keys = [\"cosign.pub\"]\nsigned_references = [\"registry.example\"]\n".into(),
                err("signed_references: \"registry.example\" names a registry but no repository: write registry/repository, or registry/* for every repository of the registry"),
            ),
            (
                "keys = [\"cosign.pub\"]\nsigned_references = \"registry.example/*\"\n".into(),
                err("TOML parse error at line 2, column 21\n  |\n2 | signed_references = \"registry.example/*\"\n  |                     ^^^^^^^^^^^^^^^^^^^^\ninvalid type: string \"registry.example/*\", expected a sequence\n"),
            ),
        ];
        let wrong: Vec<String> = cases
            .into_iter()
            .filter_map(|(text, expected)| {
                let loaded = dir.load(&text);
                (loaded != expected)
                    .then(|| format!("{text}\n  got:  {loaded:?}\n  want: {expected:?}"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn names_and_missing_files() {
        let dir = Dir::new();
        for name in ["", "../p", "a/b", ".hidden"] {
            let error = load(dir.path(), name).unwrap_err().to_string();
            assert!(
                error.ends_with(": not a valid policy name"),
                "{name:?}: {error}"
            );
        }
        let error = load(dir.path(), "absent").unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "trust policy absent ({}/absent.toml): No such file or directory (os error 2)",
                dir.path().display()
            )
        );
    }

    #[test]
    fn an_unsigned_platform_manifest_of_a_signed_index_is_explained() {
        let mut config = VerifyConfig {
            name: "tools".into(),
            image_path: String::new(),
            digest: String::new(),
            size: 0,
            complete: true,
            manifest: String::new(),
            manifest_digest: format!("sha256:{}", "ab".repeat(32)),
            repository: "registry.example/mods/tools".into(),
            signatures: Vec::new(),
            signed_index: None,
            trust_policy: "default".into(),
            attempt: 0,
        };
        assert_eq!(
            explain(&config, cosign::Error::NoSignatures),
            "no signatures and the policy requires one"
        );
        config.signed_index = Some(format!("sha256:{}", "cd".repeat(32)));
        assert_eq!(
            explain(&config, cosign::Error::NoSignatures),
            format!(
                "the platform manifest sha256:{} is not signed, only the index sha256:{} it \
                 was chosen from is, and a node checks the manifest for its architecture: sign \
                 recursively (`cosign sign --recursive REF`, or `powernode-controller module \
                 sign REF`, which always does)",
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
        // Other failures are cosign's own.
        assert_eq!(
            explain(&config, cosign::Error::TooManySignatures(40)),
            "40 signatures found; at most 32 are checked"
        );
    }
}
