//! Bootstrap tokens: how long one may live and whom it may be bound to. Minting and storing
//! (only the hash is kept) is [`crate::tokens`].

use std::time::Duration;

use super::{check_field, Error, Service};
use crate::tokens::{self, TokenError};
use crate::wire::{CreateTokenRequest, CreateTokenResponse};

/// Longest lifetime of a bootstrap token, seconds (a year): a token is a credential, and one
/// that outlives every plan for it is a leak waiting to happen.
pub const MAX_TTL_S: u64 = 366 * 86_400;

impl Service {
    /// A new bootstrap token, shown once: `ttl_s` 1 to [`MAX_TTL_S`] (default one hour);
    /// `node_uuid`, when given, a printable identity the token is then bound to.
    pub async fn create_token(
        &self,
        req: &CreateTokenRequest,
    ) -> Result<CreateTokenResponse, Error> {
        let ttl = match req.ttl_s {
            None => tokens::DEFAULT_TTL,
            Some(s) if (1..=MAX_TTL_S).contains(&s) => Duration::from_secs(s),
            Some(_) => {
                return Err(Error::Invalid(format!(
                    "ttl_s must be 1 to {MAX_TTL_S} (a year)"
                )))
            }
        };
        if let Some(uuid) = &req.node_uuid {
            check_field("node_uuid", uuid)?;
        }
        tokens::create(self.storage(), ttl, req.node_uuid.as_deref())
            .await
            .map_err(|err| match err {
                TokenError::Random(e) => Error::Random(e),
                TokenError::Storage(e) => Error::Storage(e),
            })
    }
}
