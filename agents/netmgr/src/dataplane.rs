//! The WireGuard implementation that carries the overlay, as netmgr holds it: kernel WireGuard
//! (a `wireguard` link configured over generic netlink, [`crate::kernel`]) where the kernel has
//! it, else the userspace device ([`crate::device`], a process of its own configured over its
//! UAPI socket). `network.wireguard` in the settings may pin either.
//!
//! Both outlive netmgr: a kernel link by nature, the device as a process of its own. A netmgr
//! that starts adopts whichever runs ([`Dataplane::adopt`]); one that finds none makes one
//! ([`Dataplane::create`]). Both are read and changed through the same [`DeviceState`] and
//! [`Changes`], so what netmgr applies does not depend on which it is.

use std::path::PathBuf;
use std::time::Duration;

use agentbase::settings::WireguardChoice;
use agentbase::Root;

use crate::device::{self, Device};
use crate::kernel::{KernelError, Wireguard};
use crate::key::PrivateKey;
use crate::link::{Added, Netlink};
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
    root: Root,
}

impl std::fmt::Debug for KernelLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLink")
            .field("interface", &self.interface)
            .field("adopted", &self.adopted)
            .finish()
    }
}

/// Whether the kernel has WireGuard (its generic netlink family is registered; asking for it
/// loads a module that is not loaded yet).
pub async fn kernel_has_wireguard() -> bool {
    Wireguard::resolve().await.is_ok()
}

/// The marker of a kernel interface netmgr made or adopted: `run/powernode/netmgr/kernel/
/// <iface>`. A kernel interface has no process and no pid file, and outlives netmgr: the
/// marker is how a later netmgr (or `device-steps.sh --stop`) knows which interface to delete
/// when the network is left, even without the record of what was applied.
pub fn kernel_marker(root: &Root, interface: &str) -> PathBuf {
    marker_dir(root).join(interface)
}

fn marker_dir(root: &Root) -> PathBuf {
    root.run_dir().join("netmgr").join("kernel")
}

/// The interfaces with a kernel marker under `root`.
pub fn marked_kernel_interfaces(root: &Root) -> Vec<String> {
    device::names_in(&marker_dir(root), "")
}

/// Deletes the kernel interface of a marker, if it is still a `wireguard` link, and the
/// marker.
pub async fn delete_marked(root: &Root, netlink: &Netlink, interface: &str) {
    match netlink.wireguard_index(interface).await {
        Ok(Some(index)) => {
            tracing::info!(%interface, "deleting the kernel WireGuard interface");
            if let Err(e) = netlink.delete(index).await {
                // The marker stays: the next try finds the interface again.
                tracing::warn!(%interface, error = %e, "could not delete the WireGuard interface");
                return;
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(%interface, error = %e, "could not look for the WireGuard interface");
            return;
        }
    }
    let _ = std::fs::remove_file(kernel_marker(root, interface));
}

/// Writes the marker of `interface` (before its link is made: a link must never exist
/// unmarked, or no later netmgr would adopt or delete it).
fn mark(root: &Root, interface: &str) -> Result<(), String> {
    let marker = kernel_marker(root, interface);
    marker
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&marker, b""))
        .map_err(|e| format!("marking {} as netmgr's: {e}", marker.display()))
}

impl Dataplane {
    /// The WireGuard interface `interface` that runs already, of a kind `choice` allows: a
    /// kernel `wireguard` link netmgr made, or a userspace device that answers. `None`
    /// otherwise.
    pub async fn adopt(
        root: &Root,
        netlink: &Netlink,
        interface: &str,
        choice: WireguardChoice,
    ) -> Option<Dataplane> {
        // Only a kernel interface netmgr made (marked): one an operator made is not taken over.
        if choice != WireguardChoice::Userspace
            && kernel_marker(root, interface).exists()
            && netlink
                .wireguard_index(interface)
                .await
                .ok()
                .flatten()
                .is_some()
        {
            if let Ok(wireguard) = Wireguard::resolve().await {
                return Some(Dataplane::Kernel(KernelLink::new(
                    root, netlink, interface, wireguard, true,
                )));
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
        // A kernel link of this name that netmgr made, from when the kernel's WireGuard was
        // used, holds the name the device's TUN interface needs. One netmgr did not make is
        // left alone (the device then fails to start, saying why).
        if kernel_marker(root, interface).exists() {
            tracing::info!(%interface, "the userspace device replaces the kernel WireGuard interface");
            delete_marked(root, netlink, interface).await;
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
                delete_marked(&link.root, &link.netlink, &link.interface).await;
            }
            Dataplane::Userspace(device) => device.stop().await,
        }
    }
}

impl KernelLink {
    fn new(
        root: &Root,
        netlink: &Netlink,
        interface: &str,
        wireguard: Wireguard,
        adopted: bool,
    ) -> KernelLink {
        KernelLink {
            interface: interface.to_owned(),
            adopted,
            wireguard,
            netlink: netlink.clone(),
            root: root.clone(),
        }
    }

    /// Creates the kernel interface `interface` (marked as netmgr's first): `Ok(None)` when
    /// the kernel has no WireGuard. When the name is taken: a marked `wireguard` link is
    /// netmgr's and adopted; a userspace device holding it (from when the kernel's WireGuard
    /// was not used) is stopped once the kernel has shown it has WireGuard, and the link made
    /// again; anything else is an error that names the interface.
    async fn create(
        root: &Root,
        netlink: &Netlink,
        interface: &str,
    ) -> Result<Option<KernelLink>, String> {
        let was_marked = kernel_marker(root, interface).exists();
        mark(root, interface)?;
        let unmark = || {
            let _ = std::fs::remove_file(kernel_marker(root, interface));
        };
        // What was marked before this call stays marked: it may name a link of netmgr's.
        let unmark_new = || {
            if !was_marked {
                unmark();
            }
        };
        let mut added = match netlink.add_wireguard(interface).await {
            Ok(added) => added,
            Err(e) => {
                unmark_new();
                return Err(e.to_string());
            }
        };
        if added == Added::NameTaken {
            // Asking for the family loads the module, so `Missing` means there is none; the
            // name being taken says nothing about that (the kernel checks the name first).
            let wireguard = match Wireguard::resolve().await {
                Ok(wireguard) => wireguard,
                Err(KernelError::Missing) => {
                    unmark_new();
                    return Ok(None);
                }
                Err(e) => return Err(e.to_string()),
            };
            let ours =
                was_marked && matches!(netlink.wireguard_index(interface).await, Ok(Some(_)));
            if ours {
                tracing::info!(%interface, "adopting the kernel WireGuard interface netmgr made");
                return Ok(Some(KernelLink::new(
                    root, netlink, interface, wireguard, true,
                )));
            }
            if !device::recorded_interfaces(root).is_empty() {
                match Device::adopt(root, interface).await {
                    Some(device) => {
                        tracing::info!(%interface, pid = device.pid, "kernel WireGuard replaces the userspace device");
                        device.stop().await;
                    }
                    None => device::forget(root, interface).await,
                }
                added = netlink
                    .add_wireguard(interface)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        match added {
            Added::Made => {}
            Added::Unsupported => {
                unmark();
                return Ok(None);
            }
            Added::NameTaken => {
                unmark_new();
                return Err(format!(
                    "an interface called {interface} that is not netmgr's is in the way of \
                     kernel WireGuard"
                ));
            }
        }
        match Wireguard::resolve().await {
            Ok(wireguard) => Ok(Some(KernelLink::new(
                root, netlink, interface, wireguard, false,
            ))),
            Err(e) => {
                delete_marked(root, netlink, interface).await;
                match e {
                    KernelError::Missing => Ok(None),
                    e => Err(e.to_string()),
                }
            }
        }
    }

    /// Whether the interface is gone (deleted): only the kernel saying there is no such
    /// device counts, not a failure to ask.
    fn is_gone(&self) -> bool {
        matches!(
            nix::net::if_::if_nametoindex(self.interface.as_str()),
            Err(nix::errno::Errno::ENODEV)
        )
    }
}
