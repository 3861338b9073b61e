//! NodeScripts over HTTP: the operator stores, lists and reads them under `/api/v1/scripts`;
//! a node fetches the one a task leased to it names, under `/node_api/v1/scripts/{digest}`.
//!
//! A script is UTF-8 text stored under `sha256:<hex>` of its bytes, so the same text always
//! gets the same digest and adding it again changes nothing. Nodes check the digest of what
//! they fetch before running it (docs/tasks.md): the controller is trusted to deliver, not
//! to be honest about content.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use powernode_modules::digest::Digest;

use super::extract::{AuthedNode, JsonBody, Operator};
use super::AppState;
use crate::errors::ApiError;
use crate::storage::Script;
use crate::wire::{AddScriptRequest, ScriptResponse};

/// Largest script stored, bytes of UTF-8. A node receives the text as a JSON string, in which
/// a byte may take up to six (`\u0001`): 512 KiB keeps the worst case (3 MiB) under the
/// node's 4 MiB reply limit (`powernode_transport::MAX_REPLY`). Still 32 times what a task's
/// inline arguments may hold.
pub const MAX_SCRIPT: usize = 512 * 1024;
/// Largest `POST /api/v1/scripts` body: room for any script within [`MAX_SCRIPT`] however
/// its JSON escapes it; the script's own size is checked after.
pub const MAX_ADD_BODY: usize = 4 * 1024 * 1024;

/// Parses a digest named in a path or by the operator: 400 `invalid_digest` unless it is
/// `sha256:` and 64 lowercase hex digits.
pub fn parse_digest(text: &str) -> Result<Digest, ApiError> {
    Digest::parse(text).map_err(|e| ApiError::bad_request("invalid_digest", e.to_string()))
}

/// Checks a script the operator gives (over the API or the CLI): its digest, or 413
/// `script_too_large`.
pub fn check_script(script: &str) -> Result<Digest, ApiError> {
    if script.len() > MAX_SCRIPT {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "script_too_large",
            format!(
                "the script is {} bytes, over the {MAX_SCRIPT}-byte limit",
                script.len()
            ),
        ));
    }
    Ok(Digest::of(script.as_bytes()))
}

fn digest_of(path: Result<Path<String>, PathRejection>) -> Result<Digest, ApiError> {
    let Path(text) = path.map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))?;
    parse_digest(&text)
}

/// `POST /api/v1/scripts {"script"}`: stores the script (once, however often it is added);
/// its digest, size and when it was first stored.
pub async fn add(
    _: Operator,
    State(state): State<AppState>,
    body: JsonBody<AddScriptRequest, MAX_ADD_BODY>,
) -> Result<Json<Script>, ApiError> {
    let script = body.value.script;
    let digest = check_script(&script)?;
    let stored = state
        .storage()
        .add_script(&digest.to_string(), &script, crate::now_ms())
        .await?;
    tracing::info!(digest = %stored.digest, size = stored.size, "script stored");
    Ok(Json(stored))
}

/// `GET /api/v1/scripts`: every stored script without its text, oldest first.
pub async fn list(
    _: Operator,
    State(state): State<AppState>,
) -> Result<Json<Vec<Script>>, ApiError> {
    Ok(Json(state.storage().scripts().await?))
}

/// `GET /api/v1/scripts/{digest}`: one script with its text.
pub async fn show(
    _: Operator,
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Script>, ApiError> {
    let digest = digest_of(path)?.to_string();
    state
        .storage()
        .script(&digest)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no script {digest}")))
}

/// `GET /node_api/v1/scripts/{digest}`: the script's text, if a task leased to the calling
/// node names it. Any other script is 404 as if it did not exist, so a node learns neither
/// the text nor the existence of scripts that are not its to run.
pub async fn fetch(
    State(state): State<AppState>,
    authed: AuthedNode,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ScriptResponse>, ApiError> {
    let digest = digest_of(path)?.to_string();
    let script = state
        .storage()
        .script_for_node(&authed.node.id, &digest)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no script {digest} for this node (none of its leased tasks names it)"
            ))
        })?;
    tracing::info!(node_id = %authed.node.id, %digest, "script fetched");
    Ok(Json(ScriptResponse { digest, script }))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            (over.status(), over.code()),
            (StatusCode::PAYLOAD_TOO_LARGE, "script_too_large")
        );
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
