//! The WireGuard implementation that carries the overlay, as netmgr holds it: kernel WireGuard
//! (a `wireguard` link configured over generic netlink, [`crate::kernel`]) where the kernel has
//! it, else the userspace device ([`crate::device`], a process of its own configured over its
//! UAPI socket). `network.wireguard` in the settings may pin either.
//!
//! Both outlive netmgr: a kernel link by nature, the device as a process of its own. A netmgr
//! that starts adopts whichever runs ([`Dataplane::adopt`]); one that finds none makes one
//! ([`Dataplane::create`]). Both are read and changed through the same [`DeviceState`] and
//! [`Changes`], so what netmgr applies does not depend on which it is.

use std::time::Duration;

use agentbase::settings::WireguardChoice;
use agentbase::Root;

use crate::device::{self, Device};
use crate::kernel::{KernelError, Wireguard};
use crate::key::PrivateKey;
use crate::link::Netlink;
use crate::uapi::{Changes, DeviceState};

/// How often a kernel interface is looked for, to notice that it was deleted.
const KERNEL_WATCH: Duration = Duration::from_secs(1);

/// The WireGuard interface netmgr configures.
#[derive(Debug)]
pub enum Dataplane {
    /// Kernel WireGuard.
    Kernel(KernelLink),
    /// The userspace device.
    Userspace(Device),
}

/// A kernel WireGuard interface.
pub struct KernelLink {
    interface: String,
    adopted: bool,
    wireguard: Wireguard,
    netlink: Netlink,
}

impl std::fmt::Debug for KernelLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLink")
            .field("interface", &self.interface)
            .field("adopted", &self.adopted)
            .finish()
    }
}

/// Whether the kernel has WireGuard now (its generic netlink family is registered). A
/// kernel whose module is not yet loaded says no until a `wireguard` link is made.
pub async fn kernel_has_wireguard() -> bool {
    Wireguard::resolve().await.is_ok()
}

impl Dataplane {
    /// The WireGuard interface `interface` that runs already, of a kind `choice` allows: a
    /// kernel `wireguard` link, or a userspace device that answers. `None` otherwise.
    pub async fn adopt(
        root: &Root,
        netlink: &Netlink,
        interface: &str,
        choice: WireguardChoice,
    ) -> Option<Dataplane> {
        if choice != WireguardChoice::Userspace
            && netlink
                .wireguard_index(interface)
                .await
                .ok()
                .flatten()
                .is_some()
        {
            if let Ok(wireguard) = Wireguard::resolve().await {
                return Some(Dataplane::Kernel(KernelLink {
                    interface: interface.to_owned(),
                    adopted: true,
                    wireguard,
                    netlink: netlink.clone(),
                }));
            }
        }
        if choice == WireguardChoice::Kernel {
            return None;
        }
        Device::adopt(root, interface)
            .await
            .map(Dataplane::Userspace)
    }

    /// Makes the WireGuard interface `interface`: kernel WireGuard unless `choice` is
    /// `userspace` or (with `auto`) the kernel has none; then the userspace device.
    pub async fn create(
        root: &Root,
        netlink: &Netlink,
        interface: &str,
        choice: WireguardChoice,
    ) -> Result<Dataplane, String> {
        if choice != WireguardChoice::Userspace {
            match KernelLink::create(root, netlink, interface).await {
                Ok(Some(link)) => return Ok(Dataplane::Kernel(link)),
                Ok(None) if choice == WireguardChoice::Kernel => {
                    return Err(format!(
                        "{}; network.wireguard is \"kernel\" (\"auto\" would use the userspace \
                         device)",
                        KernelError::Missing
                    ));
                }
                Ok(None) => {
                    tracing::info!(%interface, "the kernel has no WireGuard; using the userspace device");
                }
                Err(e) => return Err(e),
            }
        }
        // A kernel link of this name, left from when the kernel's WireGuard was used, holds
        // the name the device's TUN interface needs.
        if let Ok(Some(index)) = netlink.wireguard_index(interface).await {
            tracing::info!(%interface, "deleting the kernel WireGuard interface: the userspace device replaces it");
            netlink.delete(index).await.map_err(|e| e.to_string())?;
        }
        Device::spawn(root, interface)
            .await
            .map(Dataplane::Userspace)
            .map_err(|e| e.to_string())
    }

    /// Its interface.
    pub fn interface(&self) -> &str {
        match self {
            Dataplane::Kernel(link) => &link.interface,
            Dataplane::Userspace(device) => &device.interface,
        }
    }

    /// Whether it was found running rather than made by this netmgr.
    pub fn adopted(&self) -> bool {
        match self {
            Dataplane::Kernel(link) => link.adopted,
            Dataplane::Userspace(device) => device.adopted,
        }
    }

    /// Whether it is the userspace device.
    pub fn is_userspace(&self) -> bool {
        matches!(self, Dataplane::Userspace(_))
    }

    /// The userspace device's pid; `None` for kernel WireGuard.
    pub fn pid(&self) -> Option<i32> {
        match self {
            Dataplane::Kernel(_) => None,
            Dataplane::Userspace(device) => Some(device.pid),
        }
    }

    /// What it is, for logs and events: `kernel WireGuard` or `the device (pid N)`.
    pub fn describe(&self) -> String {
        match self {
            Dataplane::Kernel(_) => "kernel WireGuard".to_owned(),
            Dataplane::Userspace(device) => format!("the userspace device (pid {})", device.pid),
        }
    }

    /// Reads its key, port and peers.
    pub async fn get(&self) -> Result<DeviceState, String> {
        match self {
            Dataplane::Kernel(link) => link
                .wireguard
                .get(&link.interface)
                .await
                .map_err(|e| e.to_string()),
            Dataplane::Userspace(device) => device.uapi.get().await.map_err(|e| e.to_string()),
        }
    }

    /// Makes `changes`, `key` being the node's key.
    pub async fn set(&self, changes: &Changes, key: &PrivateKey) -> Result<(), String> {
        match self {
            Dataplane::Kernel(link) => link
                .wireguard
                .set(&link.interface, changes, key)
                .await
                .map_err(|e| e.to_string()),
            Dataplane::Userspace(device) => device
                .uapi
                .set(&changes.request(key))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Resolves when it is gone: the device exited, or the kernel interface was deleted.
    /// Cancel-safe.
    pub async fn exited(&self) {
        match self {
            Dataplane::Kernel(link) => {
                while !link.is_gone() {
                    tokio::time::sleep(KERNEL_WATCH).await;
                }
            }
            Dataplane::Userspace(device) => device.exited().await,
        }
    }

    /// Whether it is gone.
    pub fn has_exited(&self) -> bool {
        match self {
            Dataplane::Kernel(link) => link.is_gone(),
            Dataplane::Userspace(device) => device.has_exited(),
        }
    }

    /// After it is gone: collects the device process and its files.
    pub fn reap(&self) {
        if let Dataplane::Userspace(device) = self {
            device.reap();
        }
    }

    /// Stops it: the device process ends, the kernel interface is deleted.
    pub async fn stop(self) {
        match self {
            Dataplane::Kernel(link) => {
                if let Ok(Some(index)) = link.netlink.wireguard_index(&link.interface).await {
                    if let Err(e) = link.netlink.delete(index).await {
                        tracing::warn!(interface = %link.interface, error = %e, "could not delete the WireGuard interface");
                    }
                }
            }
            Dataplane::Userspace(device) => device.stop().await,
        }
    }
}

impl KernelLink {
    /// Creates the kernel interface `interface`: `Ok(None)` when the kernel has no WireGuard.
    /// Creating the link first loads a WireGuard module that is not loaded yet, which is what
    /// registers the generic netlink family.
    async fn create(
        root: &Root,
        netlink: &Netlink,
        interface: &str,
    ) -> Result<Option<KernelLink>, String> {
        // A userspace device of this name (from when the kernel's was not used) holds the
        // name; it goes, and its TUN interface with it.
        if !device::recorded_interfaces(root).is_empty() {
            device::forget(root, interface).await;
        }
        let index = match netlink.wireguard_index(interface).await {
            Ok(Some(index)) => Some(index),
            Ok(None) => None,
            Err(e) => return Err(e.to_string()),
        };
        if index.is_none()
            && !netlink
                .add_wireguard(interface)
                .await
                .map_err(|e| e.to_string())?
        {
            return Ok(None);
        }
        match Wireguard::resolve().await {
            Ok(wireguard) => Ok(Some(KernelLink {
                interface: interface.to_owned(),
                adopted: false,
                wireguard,
                netlink: netlink.clone(),
            })),
            Err(KernelError::Missing) => {
                if let Ok(Some(index)) = netlink.wireguard_index(interface).await {
                    let _ = netlink.delete(index).await;
                }
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn is_gone(&self) -> bool {
        nix::net::if_::if_nametoindex(self.interface.as_str()).is_err()
    }
}
