//! NodeScripts: UTF-8 text stored under `sha256:<hex>` of its bytes, so the same text always
//! gets the same digest and adding it again changes nothing. A node may fetch only a script a
//! task leased to it names, and checks the digest of what it fetched before it runs it
//! (docs/tasks.md): the controller is trusted to deliver, not to be honest about content.

use powernode_modules::digest::Digest;

use super::{Error, Service};
use crate::storage;
use crate::wire::{Script, ScriptResponse};

/// Largest script stored, bytes of UTF-8. A node receives the text as a JSON string, in which
/// a byte may take up to six (`\u0001`): 512 KiB keeps the worst case (3 MiB) under the
/// node's 4 MiB reply limit (`powernode_transport::MAX_REPLY`). Still 32 times what a task's
/// inline arguments may hold.
pub const MAX_SCRIPT: usize = 512 * 1024;
/// Largest `POST /api/v1/scripts` body: room for any script within [`MAX_SCRIPT`] however
/// its JSON escapes it; the script's own size is checked after.
pub const MAX_ADD_BODY: usize = 4 * 1024 * 1024;

/// A digest named in a path or by the operator: `sha256:` and 64 lowercase hex digits.
pub fn parse_digest(text: &str) -> Result<Digest, Error> {
    Digest::parse(text).map_err(|e| Error::InvalidDigest(e.to_string()))
}

/// Checks a script the operator gives: its digest, or [`Error::ScriptTooLarge`].
pub fn check_script(script: &str) -> Result<Digest, Error> {
    if script.len() > MAX_SCRIPT {
        return Err(Error::ScriptTooLarge {
            size: script.len(),
            max: MAX_SCRIPT,
        });
    }
    Ok(Digest::of(script.as_bytes()))
}

impl Service {
    /// Stores a script (once, however often it is added): its digest, size and when it was
    /// first stored.
    pub async fn add_script(&self, script: &str) -> Result<Script, Error> {
        let digest = check_script(script)?;
        let stored = self
            .storage()
            .add_script(&digest.to_string(), script, crate::now_ms())
            .await?;
        tracing::info!(digest = %stored.digest, size = stored.size, "script stored");
        Ok(stored)
    }

    /// Every stored script without its text, oldest first.
    pub async fn list_scripts(&self) -> Result<Vec<Script>, Error> {
        let scripts = self.storage().scripts().await?;
        Ok(scripts.into_iter().collect())
    }

    /// One script with its text.
    pub async fn script(&self, digest: &str) -> Result<Script, Error> {
        let digest = parse_digest(digest)?.to_string();
        self.storage()
            .script(&digest)
            .await?
            .ok_or(Error::NoScript(digest))
    }

    /// The script's text for `node`, if a task leased to it names it; any other script is
    /// [`Error::NoScriptForNode`], as if it did not exist.
    pub async fn fetch_script(
        &self,
        node: &storage::Node,
        digest: &str,
    ) -> Result<ScriptResponse, Error> {
        let digest = parse_digest(digest)?.to_string();
        let script = self
            .storage()
            .script_for_node(&node.id, &digest)
            .await?
            .ok_or_else(|| Error::NoScriptForNode(digest.clone()))?;
        tracing::info!(node_id = %node.id, %digest, "script fetched");
        Ok(ScriptResponse { digest, script })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::AddScriptRequest;

    #[test]
    fn digests_are_strict_and_scripts_capped() {
        let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(check_script("").unwrap().to_string(), empty);
        assert_eq!(parse_digest(empty).unwrap().to_string(), empty);
        for bad in [
            "",
            "sha256:",
            "sha256:ABC",
            &empty.to_uppercase(),
            &empty[7..],
        ] {
            assert_eq!(
                parse_digest(bad).unwrap_err().code(),
                "invalid_digest",
                "{bad}"
            );
        }
        assert!(check_script(&"x".repeat(MAX_SCRIPT)).is_ok());
        let over = check_script(&"x".repeat(MAX_SCRIPT + 1)).unwrap_err();
        assert_eq!((over.status(), over.code()), (413, "script_too_large"));
    }

    #[test]
    fn the_worst_escaped_script_fits_the_node_reply() {
        // What the node's transport accepts (powernode_transport::MAX_REPLY).
        const NODE_MAX_REPLY: usize = 4 * 1024 * 1024;
        let worst = "\u{1}".repeat(MAX_SCRIPT);
        let reply = serde_json::to_vec(&ScriptResponse {
            digest: check_script(&worst).unwrap().to_string(),
            script: worst,
        })
        .unwrap();
        assert!(reply.len() < NODE_MAX_REPLY, "{}", reply.len());
        let body = serde_json::to_vec(&AddScriptRequest {
            script: "\u{1}".repeat(MAX_SCRIPT),
        })
        .unwrap();
        assert!(body.len() <= MAX_ADD_BODY, "{}", body.len());
    }
}
