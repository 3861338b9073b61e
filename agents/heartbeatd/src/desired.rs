//! The desired state of a heartbeat reply, checked and then handed to the agents as
//! `heartbeatd/ModuleConfig` (one item per module) and `heartbeatd/NetworkConfig` (`global`).

use std::collections::BTreeSet;

use powernode_pubsub::Publication;
use powernode_types::node_api::DesiredState;
use powernode_types::{ForwardProto, ModuleConfig, NetworkConfig, PortForward, WgPeer, GLOBAL_KEY};

/// Why a desired state was not applied.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// The controller sent something no agent should act on.
    #[error("desired state generation {generation} refused: {reason}")]
    Invalid {
        /// The generation refused.
        generation: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Publishing failed (checkpoint write).
    #[error("publishing {topic}: {source}")]
    Publish {
        /// The topic.
        topic: &'static str,
        /// The pubsub error.
        source: powernode_pubsub::Error,
    },
}

/// Checks what a reply's desired state asks for before any of it is published: module names
/// must be unique, valid keys, and references non-empty.
pub fn validate(desired: &DesiredState) -> Result<(), DesiredError> {
    let invalid = |reason: String| DesiredError::Invalid {
        generation: desired.generation,
        reason,
    };
    let mut names = BTreeSet::new();
    for module in &desired.modules {
        powernode_pubsub::validate_key(&module.name)
            .map_err(|e| invalid(format!("module name: {e}")))?;
        if !names.insert(module.name.as_str()) {
            return Err(invalid(format!("module {:?} listed twice", module.name)));
        }
        if module.reference.trim().is_empty() {
            return Err(invalid(format!(
                "module {:?} has no reference",
                module.name
            )));
        }
    }
    if let Some(network) = &desired.network {
        if network.interface.is_empty() || network.address.is_empty() {
            return Err(invalid("network without interface or address".to_owned()));
        }
        if let Some(f) = network.forwards.iter().find(|f| proto(&f.proto).is_none()) {
            return Err(invalid(format!(
                "port forward {}: protocol {:?} is neither tcp nor udp",
                f.port, f.proto
            )));
        }
    }
    Ok(())
}

/// The `ModuleConfig` items of `desired`.
pub fn module_configs(desired: &DesiredState) -> Vec<ModuleConfig> {
    desired
        .modules
        .iter()
        .map(|m| ModuleConfig {
            name: m.name.clone(),
            reference: m.reference.clone(),
            priority: m.priority,
            generation: desired.generation,
        })
        .collect()
}

/// The `NetworkConfig` of `desired`, if it has a network.
pub fn network_config(desired: &DesiredState) -> Option<NetworkConfig> {
    desired.network.as_ref().map(|n| NetworkConfig {
        generation: desired.generation,
        interface: n.interface.clone(),
        address: n.address.clone(),
        listen_port: n.listen_port,
        peers: n
            .peers
            .iter()
            .map(|p| WgPeer {
                public_key: p.public_key.clone(),
                endpoint: p.endpoint.clone(),
                allowed_ips: p.allowed_ips.clone(),
                keepalive_s: p.keepalive_s,
            })
            .collect(),
        network: n.network.clone(),
        forwards: n
            .forwards
            .iter()
            .filter_map(|f| {
                Some(PortForward {
                    proto: proto(&f.proto)?,
                    port: f.port,
                    to: f.to.clone(),
                })
            })
            .collect(),
    })
}

/// A port forward's protocol, from its name on the wire.
fn proto(name: &str) -> Option<ForwardProto> {
    match name {
        "tcp" => Some(ForwardProto::Tcp),
        "udp" => Some(ForwardProto::Udp),
        _ => None,
    }
}

/// Publishes `desired` (validated first): every module as an item, modules no longer listed
/// unpublished, the network published or unpublished. Publishing an unchanged item writes
/// nothing, so applying the same state again is cheap.
pub fn apply(
    desired: &DesiredState,
    modules: &Publication<ModuleConfig>,
    network: &Publication<NetworkConfig>,
) -> Result<(), DesiredError> {
    validate(desired)?;
    let publish_err = |topic| move |source| DesiredError::Publish { topic, source };
    let wanted = module_configs(desired);
    for item in &wanted {
        modules.publish(item).map_err(publish_err("ModuleConfig"))?;
    }
    let names: BTreeSet<&str> = wanted.iter().map(|m| m.name.as_str()).collect();
    for key in modules.keys() {
        if !names.contains(key.as_str()) {
            modules
                .unpublish(&key)
                .map_err(publish_err("ModuleConfig"))?;
        }
    }
    match network_config(desired) {
        Some(config) => network
            .publish(&config)
            .map_err(publish_err("NetworkConfig"))?,
        None => network
            .unpublish(GLOBAL_KEY)
            .map_err(publish_err("NetworkConfig"))?,
    }
    Ok(())
}

/// The newest generation found among the published desired state (after a restart, when
/// `ControllerStatus` is gone but the configuration checkpoints are not).
pub fn published_generation(
    modules: &Publication<ModuleConfig>,
    network: &Publication<NetworkConfig>,
) -> Option<u64> {
    modules
        .keys()
        .iter()
        .filter_map(|k| modules.get(k).map(|m| m.generation))
        .chain(network.get(GLOBAL_KEY).map(|n| n.generation))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::node_api::{DesiredModule, DesiredNetwork};

    fn module(name: &str, reference: &str) -> DesiredModule {
        DesiredModule {
            name: name.to_owned(),
            reference: reference.to_owned(),
            priority: 1,
        }
    }

    fn state(modules: Vec<DesiredModule>, network: Option<DesiredNetwork>) -> DesiredState {
        DesiredState {
            generation: 7,
            modules,
            network,
        }
    }

    #[test]
    fn validation_table() {
        let net = |interface: &str| DesiredNetwork {
            interface: interface.to_owned(),
            address: "10.88.0.7/16".to_owned(),
            listen_port: 51820,
            peers: Vec::new(),
            network: "lab".to_owned(),
            forwards: Vec::new(),
        };
        let forward = |proto: &str| DesiredNetwork {
            forwards: vec![powernode_types::node_api::PortForward {
                proto: proto.to_owned(),
                port: 8080,
                to: "10.88.0.9:80".to_owned(),
            }],
            ..net("pn0")
        };
        let cases = [
            (state(vec![], None), true),
            (
                state(vec![module("tools", "r/tools:1")], Some(net("pn0"))),
                true,
            ),
            (
                state(vec![module("a", "r/a"), module("a", "r/b")], None),
                false,
            ),
            (state(vec![module("../x", "r/x")], None), false),
            (state(vec![module(".hidden", "r/x")], None), false),
            (state(vec![module("", "r/x")], None), false),
            (state(vec![module("x", " ")], None), false),
            (state(vec![], Some(net(""))), false),
            (state(vec![], Some(forward("tcp"))), true),
            (state(vec![], Some(forward("sctp"))), false),
        ];
        for (desired, ok) in cases {
            assert_eq!(validate(&desired).is_ok(), ok, "{desired:?}");
        }
    }

    #[tokio::test]
    async fn apply_publishes_and_unpublishes() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = powernode_pubsub::Dirs::under_root(tmp.path());
        let modules = Publication::<ModuleConfig>::open(&dirs, "heartbeatd").unwrap();
        let network = Publication::<NetworkConfig>::open(&dirs, "heartbeatd").unwrap();
        let first = DesiredState {
            generation: 3,
            modules: vec![module("tools", "r/tools:1"), module("base", "r/base:2")],
            network: Some(DesiredNetwork {
                interface: "pn0".to_owned(),
                address: "10.88.0.7/16".to_owned(),
                listen_port: 51820,
                peers: Vec::new(),
                network: "lab".to_owned(),
                forwards: Vec::new(),
            }),
        };
        apply(&first, &modules, &network).unwrap();
        assert_eq!(modules.keys(), ["base", "tools"]);
        assert_eq!(modules.get("tools").unwrap().generation, 3);
        assert_eq!(network.get(GLOBAL_KEY).unwrap().interface, "pn0");
        assert_eq!(published_generation(&modules, &network), Some(3));

        let second = DesiredState {
            generation: 4,
            modules: vec![module("tools", "r/tools:2")],
            network: None,
        };
        apply(&second, &modules, &network).unwrap();
        assert_eq!(modules.keys(), ["tools"]);
        assert_eq!(modules.get("tools").unwrap().reference, "r/tools:2");
        assert!(network.get(GLOBAL_KEY).is_none());
        assert_eq!(published_generation(&modules, &network), Some(4));

        // A refused state changes nothing.
        let bad = state(vec![module("x", "r"), module("x", "r")], None);
        assert!(apply(&bad, &modules, &network).is_err());
        assert_eq!(modules.keys(), ["tools"]);
    }
}
