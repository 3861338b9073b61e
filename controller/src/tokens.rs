//! Bootstrap tokens: made here, stored only as their hash, shown to the operator once.

use std::time::Duration;

use crate::secrets::{self, RandomError};
use crate::storage::{Storage, StorageError};
use crate::wire::CreateTokenResponse;

/// Lifetime of a token when none is given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Failure to create a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No randomness.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Creates a token valid for `ttl`, optionally bound to the node with identity `node_uuid`.
pub async fn create(
    storage: &Storage,
    ttl: Duration,
    node_uuid: Option<&str>,
) -> Result<CreateTokenResponse, TokenError> {
    let token = secrets::new_token()?;
    let now = crate::now_ms();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let expires_at_ms = now.saturating_add(ttl_ms);
    storage
        .create_token(
            &secrets::sha256_hex(token.as_bytes()),
            now,
            expires_at_ms,
            node_uuid,
        )
        .await?;
    tracing::info!(
        expires_at_ms,
        bound = node_uuid.is_some(),
        "bootstrap token created"
    );
    Ok(CreateTokenResponse {
        token,
        expires_at_ms,
    })
}
