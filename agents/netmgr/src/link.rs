//! The overlay interface's addresses, MTU, state and routes, over rtnetlink (no `ip`
//! subprocess), kernel WireGuard's interface itself, and the node's own addresses for
//! `NetworkStatus.endpoints`.
//!
//! Routes netmgr adds carry their own routing protocol number, [`ROUTE_PROTOCOL`], so that
//! netmgr finds and removes exactly its own routes and never one an operator or another
//! daemon put on the interface.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkWireguard, RouteMessageBuilder};

/// The MTU of the overlay interface: 1500 less WireGuard's overhead over IPv6 (80 bytes).
pub const MTU: u32 = 1420;

/// The routing protocol number of netmgr's routes (`ip route` shows `proto 150`; unassigned
/// in `/etc/iproute2/rt_protos`).
pub const ROUTE_PROTOCOL: u8 = 150;

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {0}")]
    Socket(std::io::Error),
    /// A request failed.
    #[error("{what}: {source}")]
    Request {
        /// What was asked.
        what: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LinkError {
    let what = what.into();
    move |source| LinkError::Request { what, source }
}

/// What asking for a kernel WireGuard interface did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// It was made.
    Made,
    /// The kernel has no WireGuard: it does not know the link kind.
    Unsupported,
    /// An interface of that name is there already.
    NameTaken,
}

/// A netlink connection of the network namespace netmgr runs in.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the socket; its connection runs as a task of the current tokio runtime.
    pub fn connect() -> Result<Netlink, LinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The index of the interface called `name`, if there is one.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, LinkError> {
        Ok(self.link_named(name).await?.map(|l| l.header.index))
    }

    /// The index of the kernel WireGuard interface called `name`, if there is one (an
    /// interface of that name of another kind is not).
    pub async fn wireguard_index(&self, name: &str) -> Result<Option<u32>, LinkError> {
        Ok(self
            .link_named(name)
            .await?
            .filter(is_wireguard)
            .map(|l| l.header.index))
    }

    /// The interface called `name`, if there is one.
    async fn link_named(&self, name: &str) -> Result<Option<LinkMessage>, LinkError> {
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            // ENODEV: no such interface.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(request(format!("looking up interface {name}"))(e)),
        }
    }

    /// Creates the kernel WireGuard interface `name`.
    pub async fn add_wireguard(&self, name: &str) -> Result<Added, LinkError> {
        match self
            .handle
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await
        {
            Ok(()) => Ok(Added::Made),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EOPNOTSUPP => {
                Ok(Added::Unsupported)
            }
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {
                Ok(Added::NameTaken)
            }
            Err(e) => Err(request(format!("creating WireGuard interface {name}"))(e)),
        }
    }

    /// Deletes the interface `index` (an interface already gone is not an error).
    pub async fn delete(&self, index: u32) -> Result<(), LinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(request(format!("deleting interface {index}"))(e)),
        }
    }

    /// Whether the interface with `index` is up.
    pub async fn is_up(&self, index: u32) -> Result<bool, LinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .map_err(request(format!("reading interface {index}")))?;
        Ok(link.is_some_and(|l| l.header.flags.contains(LinkFlags::Up)))
    }

    /// Gives the interface `index` the MTU [`MTU`], brings it up and makes `address` its one
    /// address (others netmgr finds there are removed: a changed overlay address replaces
    /// the old one).
    pub async fn configure(&self, index: u32, address: Ipv4Net) -> Result<(), LinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .map_err(request(format!("reading interface {index}")))?;
        let mtu = link.as_ref().and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        });
        let up = link.is_some_and(|l| l.header.flags.contains(LinkFlags::Up));
        if mtu != Some(MTU) || !up {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(MTU).up().build())
                .execute()
                .await
                .map_err(request(format!("setting interface {index} up, MTU {MTU}")))?;
        }
        let mut have = false;
        for message in self.addresses(Some(index)).await? {
            let Some(IpAddr::V4(addr)) = address_of(&message) else {
                continue;
            };
            if addr == address.addr() && message.header.prefix_len == address.prefix_len() {
                have = true;
                continue;
            }
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(request(format!(
                    "removing address {addr} from interface {index}"
                )))?;
        }
        if !have {
            self.handle
                .address()
                .add(index, IpAddr::V4(address.addr()), address.prefix_len())
                .replace()
                .execute()
                .await
                .map_err(request(format!("adding address {address}")))?;
        }
        Ok(())
    }

    /// Makes netmgr's routes through interface `index` exactly `wanted` (in the main table).
    pub async fn set_routes(&self, index: u32, wanted: &BTreeSet<IpNet>) -> Result<(), LinkError> {
        let mut have = BTreeSet::new();
        for route in self.own_routes(index).await? {
            match destination_of(&route) {
                Some(net) if wanted.contains(&net) => {
                    have.insert(net);
                }
                dest => {
                    self.handle
                        .route()
                        .del(route)
                        .execute()
                        .await
                        .map_err(request(format!("removing route {dest:?}")))?;
                }
            }
        }
        for net in wanted.difference(&have) {
            let message = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(net.addr(), net.prefix_len())
                .map_err(|e| LinkError::Request {
                    what: format!("route {net}: {e}"),
                    source: rtnetlink::Error::RequestFailed,
                })?
                .output_interface(index)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .build();
            self.handle
                .route()
                .add(message)
                .replace()
                .execute()
                .await
                .map_err(request(format!("adding route {net} via interface {index}")))?;
        }
        Ok(())
    }

    /// netmgr's routes through interface `index` now, by destination.
    pub async fn routes(&self, index: u32) -> Result<BTreeSet<IpNet>, LinkError> {
        Ok(self
            .own_routes(index)
            .await?
            .iter()
            .filter_map(destination_of)
            .collect())
    }

    async fn own_routes(&self, index: u32) -> Result<Vec<RouteMessage>, LinkError> {
        let mut own = Vec::new();
        for family in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(family)
                .execute()
                .try_collect()
                .await
                .map_err(request("listing routes"))?;
            own.extend(routes.into_iter().filter(|r| {
                r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                    && r.header.table == RouteHeader::RT_TABLE_MAIN
                    && r.attributes.contains(&RouteAttribute::Oif(index))
            }));
        }
        Ok(own)
    }

    async fn addresses(&self, index: Option<u32>) -> Result<Vec<AddressMessage>, LinkError> {
        let mut request_ = self.handle.address().get();
        if let Some(index) = index {
            request_ = request_.set_link_index_filter(index);
        }
        request_
            .execute()
            .try_collect()
            .await
            .map_err(request("listing addresses"))
    }

    /// The node's IPv4 addresses other than loopback and those of interface `except`, best
    /// first: those of the interfaces the default routes leave by, then the rest, each group
    /// in address order.
    pub async fn local_ipv4(&self, except: Option<u32>) -> Result<Vec<Ipv4Addr>, LinkError> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(request("listing routes"))?;
        let default_links: BTreeSet<u32> = routes
            .iter()
            .filter(|r| {
                r.header.table == RouteHeader::RT_TABLE_MAIN
                    && r.header.destination_prefix_length == 0
            })
            .filter_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(index) => Some(*index),
                    _ => None,
                })
            })
            .collect();
        let mut out: Vec<(bool, Ipv4Addr)> = self
            .addresses(None)
            .await?
            .iter()
            .filter(|m| m.header.family == AddressFamily::Inet && Some(m.header.index) != except)
            .filter_map(|m| match address_of(m) {
                Some(IpAddr::V4(a)) if !a.is_loopback() && !a.is_unspecified() => {
                    Some((!default_links.contains(&m.header.index), a))
                }
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out.into_iter().map(|(_, a)| a).collect())
    }
}

/// Whether a link is of kind `wireguard`.
fn is_wireguard(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Wireguard))),
        _ => false,
    })
}

/// The address of an address message (`IFA_LOCAL`, else `IFA_ADDRESS`).
fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let find = |local: bool| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    find(true).or_else(|| find(false))
}

/// The destination network of a route message.
fn destination_of(route: &RouteMessage) -> Option<IpNet> {
    let len = route.header.destination_prefix_length;
    let addr = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
        _ => None,
    });
    let addr = match (addr, route.header.address_family) {
        (Some(addr), _) => addr,
        // The default route has no destination attribute.
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    IpNet::new(addr, len).ok()
}
