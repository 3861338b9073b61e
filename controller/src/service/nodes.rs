//! Nodes: who is calling (a node by its certificate, the operator by its token), which node an
//! operator request names, and the operator's list, detail and revocation.

use super::{Denied, Error, Service};
use crate::ca::CertInfo;
use crate::storage;
use crate::wire::{NodeDetail, NodeSummary, RevokeResponse};

/// Longest node id accepted from the operator.
pub const MAX_NODE_ID: usize = 128;

/// Whether a revoked node passes [`Service::authenticate_node`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokedNodes {
    /// Refused (403 `revoked`): everything a node asks but to deliver its events.
    Refused,
    /// Let in: a revoked node may still deliver its events, so the operator sees what it
    /// said up to and about its revocation (`enroll.revoked`).
    Accepted,
}

/// Checks a node id the operator names: 1 to [`MAX_NODE_ID`] of letters, digits, `-`, `_`
/// and `.` (what the controller gives out is `node-` and hex). Anything else cannot name a
/// node, and is refused as a bad request before the database is asked.
pub fn check_node_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_NODE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "node id {:?} must be 1 to {MAX_NODE_ID} of letters, digits, '-', '_' and '.'",
            id.chars().take(MAX_NODE_ID + 1).collect::<String>()
        )))
    }
}

/// The rule every operator change of a node's desired state (modules, network) and every new
/// task keeps: the node exists (the caller found it) and is not revoked. Shared with the CLI,
/// which checks the node it fetched before it asks a registry anything; the API checks again
/// when the change arrives.
pub fn check_assignable(id: &str, revoked_at_ms: Option<i64>) -> Result<(), Error> {
    match revoked_at_ms {
        Some(_) => Err(Error::NodeRevoked(id.to_owned())),
        None => Ok(()),
    }
}

impl Service {
    /// The operator, if `presented` is its bearer token.
    pub fn authorize_operator(&self, presented: Option<&str>) -> Result<(), Error> {
        let presented = presented.ok_or(Denied::BearerRequired)?;
        if crate::secrets::token_matches(presented, &self.inner.operator_token_hash) {
            Ok(())
        } else {
            Err(Denied::WrongBearer.into())
        }
    }

    /// The node of a verified client certificate: issued by this controller to an enrolled
    /// node whose id it names, not expired, and (unless `revoked` accepts it) not revoked.
    pub async fn authenticate_node(
        &self,
        cert: Option<&CertInfo>,
        revoked: RevokedNodes,
    ) -> Result<storage::Node, Error> {
        let cert = cert.ok_or(Denied::CertificateRequired)?;
        let node_id = cert
            .common_name
            .as_deref()
            .or_else(|| cert.alt_names.first().map(String::as_str))
            .ok_or(Denied::UnknownCertificate)?;
        let node = self
            .storage()
            .node_by_cert_fingerprint(&cert.fingerprint)
            .await?
            .ok_or(Denied::UnknownCertificate)?;
        if node.id != node_id {
            return Err(Denied::UnknownCertificate.into());
        }
        if cert.not_after_ms <= crate::now_ms() {
            return Err(Denied::CertificateExpired.into());
        }
        if node.revoked_at_ms.is_some() && revoked == RevokedNodes::Refused {
            return Err(Denied::Revoked(node.id).into());
        }
        Ok(node)
    }

    /// The node `id` names, which the operator may change: [`check_node_id`], it exists,
    /// [`check_assignable`].
    pub(crate) async fn assignable_node(&self, id: &str) -> Result<storage::Node, Error> {
        let node = self.existing_node(id).await?;
        check_assignable(&node.id, node.revoked_at_ms)?;
        Ok(node)
    }

    /// The node `id` names: [`check_node_id`], and it exists.
    pub(crate) async fn existing_node(&self, id: &str) -> Result<storage::Node, Error> {
        check_node_id(id)?;
        self.storage()
            .node(id)
            .await?
            .ok_or_else(|| Error::NoNode(id.to_owned()))
    }

    /// Every node with its latest heartbeat time and certificate expiry, by enrollment time.
    pub async fn list_nodes(&self) -> Result<Vec<NodeSummary>, Error> {
        let nodes = self.storage().list_nodes().await?;
        Ok(nodes.into_iter().collect())
    }

    /// One node: identity, certificates, latest heartbeat, desired state, last events.
    pub async fn node_detail(&self, id: &str) -> Result<NodeDetail, Error> {
        check_node_id(id)?;
        self.storage()
            .node_detail(id)
            .await?
            .ok_or_else(|| Error::NoNode(id.to_owned()))
    }

    /// Revokes a node: its certificates stop working at once, it cannot enroll again, and
    /// it stops being its network's peers' peer. Revoking twice keeps the first time.
    pub async fn revoke_node(&self, id: &str) -> Result<RevokeResponse, Error> {
        check_node_id(id)?;
        if !self.storage().revoke(id, crate::now_ms()).await? {
            return Err(Error::NoNode(id.to_owned()));
        }
        // Its network peers were re-derived: their watches look now.
        self.changed();
        tracing::info!(node_id = %id, "node revoked");
        Ok(RevokeResponse {
            revoked: id.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_names_not_paths() {
        for ok in ["node-0123456789abcdef", "node-missing", "a.b_c"] {
            assert!(check_node_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "é", &"n".repeat(MAX_NODE_ID + 1)] {
            let err = check_node_id(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_request", "{bad}");
        }
    }

    #[test]
    fn a_revoked_node_cannot_be_assigned_to() {
        assert!(check_assignable("n", None).is_ok());
        let err = check_assignable("n", Some(1)).unwrap_err();
        assert_eq!(
            (err.status(), err.code(), err.to_string()),
            (409, "node_revoked", "node n is revoked".to_owned())
        );
    }
}
