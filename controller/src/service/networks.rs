//! Overlay networks, membership and port forwards. The request's own values are checked here
//! with the rules of [`crate::networks`]; what depends on the stored state (a free address, a
//! route that overlaps another member's, a revoked node) is checked by the storage in the same
//! transaction as the change. Every change answers the nodes whose desired state it
//! re-derived, and wakes their watches.

use super::{Error, Service};
use crate::networks::{self, Cidr, Forward, Refusal};
use crate::storage::Bumped;
use crate::wire::{
    AddForwardRequest, CreateNetworkRequest, DeleteNetworkResponse, ForwardResponse,
    ForwardsParams, JoinNetworkRequest, JoinResponse, LeaveResponse, Network, NetworkDetail,
    NodeGeneration,
};

/// Checks a network to create: its name, CIDR and port (default [`networks::DEFAULT_PORT`]).
pub fn check_create(req: &CreateNetworkRequest) -> Result<(Cidr, u16), Error> {
    networks::check_name(&req.name)?;
    let cidr = networks::network_cidr(&req.cidr)?;
    let port = match req.port {
        None => networks::DEFAULT_PORT,
        Some(p) => networks::check_port("port", p)?,
    };
    Ok((cidr, port))
}

/// Checks a join's own values (its routes are checked against the network when stored).
pub fn check_join(req: &JoinNetworkRequest) -> Result<(), Error> {
    super::nodes::check_node_id(&req.node)?;
    if let Some(endpoint) = &req.endpoint {
        networks::check_endpoint(endpoint)?;
    }
    Ok(())
}

/// Checks a forward's node, protocol, port and (when adding) target: the port.
pub fn check_forward(node: &str, proto: &str, port: u32, to: Option<&str>) -> Result<u16, Error> {
    super::nodes::check_node_id(node)?;
    networks::check_proto(proto)?;
    let port = networks::check_port("port", port)?;
    if let Some(to) = to {
        networks::check_target(to)?;
    }
    Ok(port)
}

/// A port as a path names it.
pub fn parse_port(text: &str) -> Result<u32, Error> {
    text.parse::<u32>()
        .map_err(|_| Refusal::Invalid(format!("port must be 1 to 65535, not {text:?}")).into())
}

impl Service {
    /// The nodes `bumped` names, their watches woken.
    fn updated(&self, what: &str, bumped: Bumped) -> Vec<NodeGeneration> {
        if !bumped.is_empty() {
            self.changed();
            tracing::info!(change = what, updated = ?bumped, "desired networks re-derived");
        }
        NodeGeneration::list(bumped)
    }

    /// A new, empty network ([`check_create`]).
    pub async fn create_network(&self, req: &CreateNetworkRequest) -> Result<Network, Error> {
        let (cidr, port) = check_create(req)?;
        let network = self
            .storage()
            .create_network(&req.name, cidr, port, crate::now_ms())
            .await??;
        tracing::info!(network = %network.name, cidr = %network.cidr, port, "network created");
        Ok(network)
    }

    /// Every network with its member count, by name.
    pub async fn list_networks(&self) -> Result<Vec<Network>, Error> {
        let networks = self.storage().networks().await?;
        Ok(networks.into_iter().collect())
    }

    /// The network, its members (address, key, endpoint used, what they reported) and their
    /// forwards.
    pub async fn network(&self, name: &str) -> Result<NetworkDetail, Error> {
        networks::check_name(name)?;
        self.storage()
            .network_detail(name)
            .await?
            .ok_or_else(|| Refusal::NoNetwork(name.to_owned()).into())
    }

    /// Deletes a network without members.
    pub async fn delete_network(&self, name: &str) -> Result<DeleteNetworkResponse, Error> {
        networks::check_name(name)?;
        self.storage().delete_network(name).await??;
        tracing::info!(network = %name, "network deleted");
        Ok(DeleteNetworkResponse {
            deleted: name.to_owned(),
        })
    }

    /// Makes a node a member of network `name` ([`check_join`]): it gets the lowest free
    /// address; joining the same network again replaces its routes and endpoint.
    pub async fn join_network(
        &self,
        name: &str,
        req: &JoinNetworkRequest,
    ) -> Result<JoinResponse, Error> {
        networks::check_name(name)?;
        check_join(req)?;
        let (member, bumped) = self
            .storage()
            .join_network(
                name,
                &req.node,
                &req.announce,
                req.endpoint.as_deref(),
                crate::now_ms(),
            )
            .await??;
        tracing::info!(network = %name, node_id = %member.node_id, address = %member.address,
            "node joined network");
        Ok(JoinResponse {
            updated: self.updated("join", bumped),
            member,
        })
    }

    /// Takes `node` out of network `name`: its address is free, its forwards go, its desired
    /// network is `null`.
    pub async fn leave_network(&self, name: &str, node: &str) -> Result<LeaveResponse, Error> {
        networks::check_name(name)?;
        super::nodes::check_node_id(node)?;
        let (left, bumped) = self
            .storage()
            .leave_network(name, node, crate::now_ms())
            .await??;
        tracing::info!(network = %name, node_id = %node, address = %left.address,
            "node left network");
        Ok(LeaveResponse {
            updated: self.updated("leave", bumped),
            left,
        })
    }

    /// Forwards a member's port ([`check_forward`]).
    pub async fn add_forward(&self, req: &AddForwardRequest) -> Result<ForwardResponse, Error> {
        let port = check_forward(&req.node, &req.proto, req.port, Some(&req.to))?;
        let (forward, bumped) = self
            .storage()
            .add_forward(&req.node, &req.proto, port, &req.to, crate::now_ms())
            .await??;
        tracing::info!(node_id = %req.node, proto = %req.proto, port, to = %req.to,
            "forward added");
        Ok(ForwardResponse {
            updated: self.updated("forward add", bumped),
            forward,
        })
    }

    /// Forwards by node, protocol and port (only `params.node`'s when it names one).
    pub async fn list_forwards(&self, params: &ForwardsParams) -> Result<Vec<Forward>, Error> {
        if let Some(node) = &params.node {
            super::nodes::check_node_id(node).map_err(|e| Error::InvalidQuery(e.to_string()))?;
        }
        Ok(self.storage().forwards(params.node.as_deref()).await?)
    }

    /// Removes `node`'s `proto` forward of `port`.
    pub async fn remove_forward(
        &self,
        node: &str,
        proto: &str,
        port: u32,
    ) -> Result<ForwardResponse, Error> {
        let port = check_forward(node, proto, port, None)?;
        let (forward, bumped) = self
            .storage()
            .remove_forward(node, proto, port, crate::now_ms())
            .await??;
        tracing::info!(node_id = %node, proto = %proto, port, "forward removed");
        Ok(ForwardResponse {
            updated: self.updated("forward remove", bumped),
            forward,
        })
    }
}
