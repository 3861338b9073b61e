//! Cryptokey routing: which peer an address belongs to, by the longest allowed-IPs prefix
//! that contains it. The same table answers both questions WireGuard asks: the peer a packet
//! read from the interface goes to (its destination), and whether a packet that came out of
//! a peer's tunnel may enter (its source must route back to that peer).
//!
//! A node's peers are mostly /32s, with a few shorter prefixes for announced routes, so the
//! table is one hash map per prefix length in use, searched from the longest: a lookup is one
//! or two hash probes.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Addresses to values by longest prefix match, IPv4 and IPv6 apart.
#[derive(Debug)]
pub struct Routes<T> {
    v4: Lengths<u32, T>,
    v6: Lengths<u128, T>,
}

/// One map per prefix length, longest first; keys are the masked addresses.
#[derive(Debug)]
struct Lengths<K, T>(Vec<(u8, HashMap<K, T>)>);

impl<K: std::hash::Hash + Eq, T> Lengths<K, T> {
    fn insert(&mut self, len: u8, key: K, value: T) {
        let at = match self.0.binary_search_by(|(l, _)| len.cmp(l)) {
            Ok(at) => at,
            Err(at) => {
                self.0.insert(at, (len, HashMap::new()));
                at
            }
        };
        self.0[at].1.insert(key, value);
    }

    fn find(&self, mask: impl Fn(u8) -> K) -> Option<&T> {
        self.0.iter().find_map(|(len, map)| map.get(&mask(*len)))
    }
}

impl<T> Default for Routes<T> {
    fn default() -> Self {
        Routes {
            v4: Lengths(Vec::new()),
            v6: Lengths(Vec::new()),
        }
    }
}

impl<T> Routes<T> {
    /// Routes `net` to `value`, replacing what it routed to before (the later of two peers
    /// naming the same prefix wins, as in WireGuard).
    pub fn insert(&mut self, net: IpNet, value: T) {
        let len = net.prefix_len();
        match net.trunc() {
            IpNet::V4(net) => self.v4.insert(len, u32::from(net.addr()), value),
            IpNet::V6(net) => self.v6.insert(len, u128::from(net.addr()), value),
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub fn find(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(addr) => {
                let addr = u32::from(addr);
                self.v4
                    .find(|len| addr & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0))
            }
            IpAddr::V6(addr) => {
                let addr = u128::from(addr);
                self.v6
                    .find(|len| addr & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(entries: &[(&str, &'static str)]) -> Routes<&'static str> {
        let mut routes = Routes::default();
        for (net, peer) in entries {
            routes.insert(net.parse().unwrap(), *peer);
        }
        routes
    }

    #[test]
    fn the_longest_prefix_wins() {
        let routes = routes(&[
            ("10.88.0.0/16", "gateway"),
            ("10.88.0.2/32", "b"),
            ("10.88.1.0/24", "c"),
            ("0.0.0.0/0", "default"),
            ("fd00::/64", "v6"),
            ("fd00::1/128", "v6-host"),
        ]);
        let table = [
            ("10.88.0.2", Some("b")),
            ("10.88.0.3", Some("gateway")),
            ("10.88.1.200", Some("c")),
            ("192.0.2.1", Some("default")),
            ("fd00::1", Some("v6-host")),
            ("fd00::2", Some("v6")),
            ("fd01::1", None),
        ];
        for (addr, want) in table {
            assert_eq!(routes.find(addr.parse().unwrap()).copied(), want, "{addr}");
        }
    }

    #[test]
    fn a_prefix_is_masked_and_the_later_value_replaces_the_earlier() {
        let routes = routes(&[("10.88.7.9/16", "a"), ("10.88.0.0/16", "b")]);
        assert_eq!(routes.find("10.88.200.1".parse().unwrap()), Some(&"b"));
        assert_eq!(routes.find("10.89.0.1".parse().unwrap()), None);
    }
}
