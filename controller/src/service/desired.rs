//! Desired state the operator sets directly: a node's module list and its network. Both keep
//! the rule of [`super::nodes::check_assignable`] (the node exists and is not revoked), bump the
//! node's generation and wake its watch.
//!
//! What is checked here is what the controller can know: names, references and addresses by
//! their syntax, and that nothing is listed twice. Whether a reference has an image for the
//! node's architecture is the registry's to say: `module assign` asks it before it sends the
//! list, and the node's verifier checks every image it pulls.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use powernode_modules::format::{is_module_name, MAX_MODULE_NAME};

use super::{Error, Service};
use crate::networks::{self, Cidr};
use crate::wire::{DesiredModule, DesiredNetwork, GenerationResponse};

/// Most modules one node may be given.
pub const MAX_MODULES: usize = 64;
/// Longest interface name (Linux: 15 bytes and the terminating zero).
pub const MAX_INTERFACE: usize = 15;

/// Checks a module list: at most [`MAX_MODULES`]; each name a module name (the rule modulemgr
/// and `module build` keep), each reference an OCI reference (`registry/repo:tag` or
/// `…@sha256:…`), no name twice.
pub fn check_modules(modules: &[DesiredModule]) -> Result<(), Error> {
    if modules.len() > MAX_MODULES {
        return Err(Error::Invalid(format!(
            "at most {MAX_MODULES} modules, not {}",
            modules.len()
        )));
    }
    let mut names = HashSet::new();
    for module in modules {
        if !is_module_name(&module.name) {
            return Err(Error::Invalid(format!(
                "module name {:?} must be 1 to {MAX_MODULE_NAME} of letters, digits, '-', '_' \
                 and '.', not starting with '.'",
                module.name
            )));
        }
        if let Err(e) = powernode_modules::reference::parse(&module.reference) {
            return Err(Error::Invalid(format!(
                "module {}: reference {:?} is not an OCI reference: {e}",
                module.name, module.reference
            )));
        }
        if !names.insert(module.name.as_str()) {
            return Err(Error::Invalid(format!(
                "module {} is listed twice; a node runs one of each name",
                module.name
            )));
        }
    }
    Ok(())
}

/// Checks a network set by hand, value by value, with the rules the overlay networks keep
/// ([`crate::networks`]): the interface a name of 1 to [`MAX_INTERFACE`] of `A-Za-z0-9_.-`,
/// the address an IPv4 host address with its prefix (`10.88.0.7/16`), a listen port, every
/// peer's key a WireGuard key, its endpoint `HOST:PORT` and its allowed IPs CIDRs, every
/// forward's protocol, port and target. How they fit together (an overlay address per peer,
/// no key twice) the node checks, refusing a whole configuration that does not.
pub fn check_network(network: &DesiredNetwork) -> Result<(), Error> {
    let invalid = |message: String| Err(Error::Invalid(message));
    let name = &network.interface;
    if name.is_empty()
        || name.len() > MAX_INTERFACE
        || name == "."
        || name == ".."
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return invalid(format!(
            "interface {name:?} must be 1 to {MAX_INTERFACE} of A-Za-z0-9_.-"
        ));
    }
    check_address(&network.address)?;
    if network.listen_port == 0 {
        return invalid("listen_port must be 1 to 65535".to_owned());
    }
    if !network.network.is_empty() {
        networks::check_name(&network.network)?;
    }
    for (n, peer) in network.peers.iter().enumerate() {
        if !networks::is_public_key(&peer.public_key) {
            return invalid(format!(
                "peer {n}: public key {:?} is not a WireGuard key (base64 of 32 bytes)",
                peer.public_key
            ));
        }
        if let Some(endpoint) = &peer.endpoint {
            networks::check_endpoint(endpoint)?;
        }
        if peer.allowed_ips.is_empty() {
            return invalid(format!("peer {n} has no allowed IPs"));
        }
        for ip in &peer.allowed_ips {
            Cidr::parse(ip).map_err(|e| Error::Invalid(format!("peer {n}: allowed IP {e}")))?;
        }
    }
    for forward in &network.forwards {
        networks::check_proto(&forward.proto)?;
        networks::check_port("forward port", u32::from(forward.port))?;
        networks::check_target(&forward.to)?;
    }
    Ok(())
}

/// An overlay address: `a.b.c.d/p`, prefix 1 to 32, and (below /31) neither its network's
/// own nor its broadcast address.
fn check_address(text: &str) -> Result<(), Error> {
    let bad = || {
        Error::Invalid(format!(
            "address {text:?} must be an IPv4 address and prefix, e.g. 10.88.0.7/16"
        ))
    };
    let (ip, prefix) = text.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let prefix: u32 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(bad)?;
    if prefix < 31 {
        let host_bits = u32::MAX >> prefix;
        let host = u32::from(ip) & host_bits;
        if host == 0 || host == host_bits {
            return Err(Error::Invalid(format!(
                "address {text} is its network's own or broadcast address"
            )));
        }
    }
    Ok(())
}

impl Service {
    /// Replaces node `id`'s module list ([`check_modules`]) and bumps its generation.
    pub async fn set_modules(
        &self,
        id: &str,
        modules: &[DesiredModule],
    ) -> Result<GenerationResponse, Error> {
        check_modules(modules)?;
        let node = self.assignable_node(id).await?;
        let generation = self
            .storage()
            .set_desired_modules(&node.id, modules, crate::now_ms())
            .await?
            .ok_or_else(|| Error::NoNode(node.id.clone()))?;
        self.changed();
        tracing::info!(node_id = %node.id, generation, modules = modules.len(),
            "desired modules set");
        Ok(GenerationResponse { generation })
    }

    /// Replaces (or, with `None`, removes) node `id`'s network ([`check_network`]) and bumps
    /// its generation.
    pub async fn set_network(
        &self,
        id: &str,
        network: Option<&DesiredNetwork>,
    ) -> Result<GenerationResponse, Error> {
        if let Some(network) = network {
            check_network(network)?;
        }
        let node = self.assignable_node(id).await?;
        let generation = self
            .storage()
            .set_desired_network(&node.id, network, crate::now_ms())
            .await?
            .ok_or_else(|| Error::NoNode(node.id.clone()))?;
        self.changed();
        tracing::info!(node_id = %node.id, generation, "desired network set");
        Ok(GenerationResponse { generation })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{PortForward, WgPeer};

    fn module(name: &str, reference: &str) -> DesiredModule {
        DesiredModule {
            name: name.into(),
            reference: reference.into(),
            priority: 0,
        }
    }

    #[test]
    fn module_lists_keep_the_node_s_rules() {
        let pinned = format!(
            "registry.local:5000/modules/tools@sha256:{}",
            "a".repeat(64)
        );
        assert!(check_modules(&[
            module("tools", "registry.local/modules/tools:1"),
            module("base", &pinned),
        ])
        .is_ok());
        for bad in [
            vec![module("", "r:1")],
            vec![module(".hidden", "r:1")],
            vec![module("a/b", "r:1")],
            vec![module("tools", "")],
            vec![module("tools", "Registry/UPPER:1")],
            vec![module("tools", "r@sha256:00")],
            vec![module("a", "r:1"), module("a", "r:2")],
        ] {
            let err = check_modules(&bad).unwrap_err();
            assert_eq!(err.code(), "invalid_request", "{bad:?}");
        }
        let many: Vec<_> = (0..=MAX_MODULES)
            .map(|i| module(&format!("m{i}"), "r:1"))
            .collect();
        assert!(check_modules(&many).is_err());
    }

    fn network() -> DesiredNetwork {
        DesiredNetwork {
            interface: "pn0".into(),
            address: "10.88.0.7/16".into(),
            listen_port: 51820,
            peers: vec![WgPeer {
                public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
                endpoint: Some("203.0.113.5:51820".into()),
                allowed_ips: vec!["10.88.0.2/32".into()],
                keepalive_s: Some(25),
            }],
            network: "lab".into(),
            forwards: vec![PortForward {
                proto: "tcp".into(),
                port: 8080,
                to: "10.88.0.2:80".into(),
            }],
        }
    }

    #[test]
    fn a_network_by_hand_is_checked_value_by_value() {
        assert!(check_network(&network()).is_ok());
        let bad: [fn(&mut DesiredNetwork); 9] = [
            |n| n.interface = "a very long interface".into(),
            |n| n.interface = "pn/0".into(),
            |n| n.address = "10.88.0.0/16".into(),
            |n| n.address = "10.88.0.7".into(),
            |n| n.listen_port = 0,
            |n| n.peers[0].public_key = "AAAA".into(),
            |n| n.peers[0].allowed_ips = vec!["10.88.0.2/16".into()],
            |n| n.peers[0].endpoint = Some("nowhere".into()),
            |n| n.forwards[0].proto = "sctp".into(),
        ];
        for change in bad {
            let mut n = network();
            change(&mut n);
            assert_eq!(
                check_network(&n).map_err(|e| e.code()),
                Err("invalid_request"),
                "{n:?}"
            );
        }
    }
}
