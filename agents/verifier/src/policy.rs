//! Trust policies: `etc/powernode/trust/<name>.toml`, naming the keys (and, for keyless
//! signatures, the certificate roots, identity and issuer) a module's signature must match.
//!
//! ```toml
//! require_signature = true            # default; false accepts unsigned modules
//! keys = ["cosign.pub"]               # PEM public keys, relative to etc/powernode/trust/
//! [keyless]                           # optional
//! roots = ["fulcio-root.pem"]         # PEM CA certificates
//! identity = '^ops@example\.com$'     # regex on the certificate's SAN (email or URI)
//! issuer = '^https://issuer\.example$' # regex on the OIDC issuer extension
//! log_keys = ["rekor.pub"]            # transparency-log public keys (PEM)
//! ```

use std::path::{Path, PathBuf};

use powernode_modules::cosign::{KeylessRoot, Policy, PublicKey};
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
        let p = dir.join(rel);
        std::fs::read_to_string(&p).map_err(|e| error(format!("{}: {e}", p.display())))
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
    })
}
