//! Enrollment and certificate rotation: a bootstrap token and a CSR make a node and its first
//! certificate; an enrolled node's CSR makes its next one.

use super::{check_field, Denied, Error, Service};
use crate::ca::{CertAuthority, CertInfo};
use crate::secrets;
use crate::storage::{self, EnrollError};
use crate::wire::{EnrollRequest, EnrollResponse, RotateRequest, RotateResponse};

fn parse_csr(csr_pem: &str) -> Result<rcgen::CertificateSigningRequestParams, Error> {
    CertAuthority::parse_csr(csr_pem).map_err(Error::from)
}

impl Service {
    /// Enrolls a node: its identity and agent version are checked, then its CSR (before the
    /// token is consumed, so that a bad CSR does not burn the token), then in one transaction
    /// the token is consumed, the node found by uuid or made, and its certificate issued.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<EnrollResponse, Error> {
        check_field("identity.uuid", &req.identity.uuid)?;
        check_field("identity.hostname", &req.identity.hostname)?;
        check_field("identity.arch", &req.identity.arch)?;
        check_field("identity.boot_id", &req.identity.boot_id)?;
        check_field("agent_version", &req.agent_version)?;
        let csr = parse_csr(&req.csr_pem)?;
        let token_hash = secrets::sha256_hex(req.bootstrap_token.as_bytes());
        let lifetime = self.settings().cert_lifetime;
        let (node, issued) = self
            .storage()
            .enroll(&token_hash, &req.identity, crate::now_ms(), |node_id| {
                self.ca().sign_node(&csr, node_id, lifetime)
            })
            .await
            .map_err(|err| match err {
                EnrollError::UnknownToken => Denied::UnknownToken.into(),
                EnrollError::TokenUsed => Denied::TokenUsed.into(),
                EnrollError::TokenExpired => Denied::TokenExpired.into(),
                EnrollError::TokenNodeMismatch => Denied::TokenNodeMismatch.into(),
                EnrollError::Revoked(id) => Denied::Revoked(id).into(),
                EnrollError::Ca(e) => Error::from(e),
                EnrollError::Storage(e) => Error::Storage(e),
            })?;
        tracing::info!(
            node_id = %node.id,
            uuid = %node.uuid,
            hostname = %node.hostname,
            serial = %issued.info.serial,
            agent_version = %req.agent_version,
            "node enrolled"
        );
        Ok(EnrollResponse {
            node_id: node.id,
            cert_pem: issued.cert_pem,
            ca_chain_pem: self.ca().cert_pem().to_owned(),
            not_after_ms: issued.info.not_after_ms,
        })
    }

    /// A new certificate for `node`, which called with `presented`. Its previous certificates
    /// stay valid until they expire.
    pub async fn rotate(
        &self,
        node: &storage::Node,
        presented: &CertInfo,
        req: &RotateRequest,
    ) -> Result<RotateResponse, Error> {
        let csr = parse_csr(&req.csr_pem)?;
        let issued = self
            .ca()
            .sign_node(&csr, &node.id, self.settings().cert_lifetime)?;
        self.storage()
            .record_cert(&node.id, &issued.info, crate::now_ms())
            .await?;
        tracing::info!(
            node_id = %node.id,
            old_serial = %presented.serial,
            serial = %issued.info.serial,
            "certificate rotated"
        );
        Ok(RotateResponse {
            cert_pem: issued.cert_pem,
            ca_chain_pem: self.ca().cert_pem().to_owned(),
            not_after_ms: issued.info.not_after_ms,
        })
    }
}
