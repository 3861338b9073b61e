//! netmgr's userspace WireGuard device: the data plane `wgdevice` runs where the kernel has
//! no WireGuard. boringtun's `noise` module is the protocol (handshakes, sessions, timers);
//! this module is the device around it: the TUN queues, the UDP sockets, cryptokey routing
//! ([`routes`]), the timers, and the UAPI socket `wg` and netmgr speak ([`control`]).
//!
//! **A peer costs nothing until it talks.** A configured peer is its key, its endpoint and its
//! allowed IPs, a few hundred bytes. Its tunnel (boringtun's `Tunn`, 11 KB: eight session
//! slots with room for two AEAD key schedules each) is made when a packet goes to it, when its
//! handshake arrives, or when it has a persistent keepalive, and is dropped again when the
//! protocol gives up on it (no session for 540 s, or a handshake unanswered for 90 s). A node
//! with 1,000 peers of which 10 talk holds 10 tunnels. boringtun's own device makes every
//! tunnel up front, 19 KiB a peer.
//!
//! Threads: one per TUN queue (packets from the node to its peers: route, encrypt, send), one
//! per UDP socket (datagrams from peers: find the peer, decrypt, check the source against the
//! peer's allowed IPs, write to the interface), one for the timers, one for the UAPI socket. Configuration is a read-write lock that the data path holds
//! for reading; each peer's tunnel has a lock of its own.

pub mod control;
pub mod routes;
pub mod tun;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;

use self::routes::Routes;
use self::tun::TunQueue;

/// Handshakes a second before the device answers with cookies (WireGuard's DoS defence).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// The largest packet read from the interface or a socket.
const MAX_PACKET: usize = (1 << 16) - 1;

/// Room a sealed packet needs beyond the plain one (header and tag), and the least a
/// handshake needs.
const SEAL_OVERHEAD: usize = 32;
const MIN_OUT_BUFFER: usize = 148;

/// How often the protocol's timers run (retransmissions, keepalives, rekeying).
const TICK: Duration = Duration::from_millis(250);

/// How long a socket thread blocks before it looks whether its socket is still the
/// device's (a new listen port replaces the sockets).
const SOCKET_POLL: Duration = Duration::from_secs(1);

/// The device: its configuration, peers and sockets, shared by its threads.
pub struct Device {
    state: RwLock<State>,
    /// A handle on the interface for writing decrypted packets (any queue takes writes).
    tun: TunQueue,
    /// Where a thread that cannot go on says why (the device then exits).
    fatal: Mutex<mpsc::Sender<String>>,
}

/// A device just made: its queues still to be read, and where its threads report failure.
struct Created {
    device: Arc<Device>,
    queues: Vec<TunQueue>,
    failures: mpsc::Receiver<String>,
}

/// The node's key, and what is derived from it.
struct Key {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    /// Answers floods of handshakes with cookies: the device's check, before any tunnel.
    limiter: Arc<RateLimiter>,
    /// The tunnels' own: a tunnel checks a handshake's MACs again, and must not count it
    /// against the limit a second time (nor answer with a cookie what the device let in).
    unlimited: Arc<RateLimiter>,
}

/// The device's configuration and peers.
#[derive(Default)]
struct State {
    key: Option<Key>,
    fwmark: u32,
    sockets: Option<Arc<Sockets>>,
    peers: HashMap<[u8; 32], Arc<Peer>>,
    /// Peers by the index their tunnel's sessions carry (the upper 24 bits of a receiver
    /// index).
    by_index: HashMap<u32, Arc<Peer>>,
    /// Who owns each allowed-IPs prefix (a prefix given to a peer is taken from any other).
    owners: HashMap<IpNet, Arc<Peer>>,
    /// `owners` as a longest-prefix table.
    routes: Routes<Arc<Peer>>,
    next_index: u32,
}

/// The listening sockets: IPv4, and IPv6 where the host has it, on one port.
struct Sockets {
    port: u16,
    v4: UdpSocket,
    v6: Option<UdpSocket>,
}

/// One peer.
struct Peer {
    public: x25519::PublicKey,
    /// The index its tunnel's sessions are numbered under (24 bits).
    index: u32,
    link: Mutex<Link>,
}

/// What a datagram claims to be, as far as it matters to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Initiation,
    Cookie,
    Data,
    Other,
}

/// A peer's changing half: its settings and its tunnel, when it has one.
#[derive(Default)]
struct Link {
    tunnel: Option<Box<Tunn>>,
    endpoint: Option<SocketAddr>,
    preshared: Option<[u8; 32]>,
    keepalive: u16,
    /// Bytes of tunnels already dropped (a tunnel counts its own).
    rx_bytes: u64,
    tx_bytes: u64,
    last_handshake: Option<SystemTime>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Link {
    /// A new tunnel to the peer, with the link's settings.
    fn make_tunnel(&self, key: &Key, peer: &Peer) -> Box<Tunn> {
        Box::new(Tunn::new(
            key.secret.clone(),
            peer.public,
            self.preshared,
            (self.keepalive > 0).then_some(self.keepalive),
            peer.index,
            Some(Arc::clone(&key.unlimited)),
        ))
    }

    /// The peer's tunnel, made now if it has none.
    fn tunnel(&mut self, key: &Key, peer: &Peer) -> &mut Tunn {
        if self.tunnel.is_none() {
            self.tunnel = Some(self.make_tunnel(key, peer));
        }
        self.tunnel.as_mut().expect("just made")
    }

    /// Reads the tunnel's handshake time into the link.
    fn note_handshake(&mut self) {
        if let Some(age) = self.tunnel.as_ref().and_then(|t| t.stats().0) {
            self.last_handshake = SystemTime::now().checked_sub(age);
        }
    }

    /// Drops the tunnel, keeping what it counted.
    fn drop_tunnel(&mut self) {
        self.note_handshake();
        if let Some(tunnel) = self.tunnel.take() {
            let (_, tx, rx, ..) = tunnel.stats();
            self.tx_bytes += tx as u64;
            self.rx_bytes += rx as u64;
        }
    }

    /// Bytes received and sent, over every tunnel the peer had.
    fn bytes(&self) -> (u64, u64) {
        let (tx, rx) = self.tunnel.as_ref().map_or((0, 0), |t| {
            let (_, tx, rx, ..) = t.stats();
            (tx as u64, rx as u64)
        });
        (self.rx_bytes + rx, self.tx_bytes + tx)
    }
}

impl Sockets {
    /// Binds `port` (0: one the kernel picks) on IPv4 and, when it can, IPv6.
    fn bind(port: u16, fwmark: u32) -> std::io::Result<Sockets> {
        let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
        let port = v4.local_addr()?.port();
        let v6 = match bind_v6(port) {
            Ok(v6) => Some(v6),
            Err(e) => {
                tracing::info!(port, error = %e, "no IPv6 socket; IPv4 only");
                None
            }
        };
        for socket in std::iter::once(&v4).chain(v6.as_ref()) {
            socket.set_read_timeout(Some(SOCKET_POLL))?;
            crate::sockbuf::enlarge(socket);
            if fwmark != 0 {
                set_fwmark(socket, fwmark)?;
            }
        }
        Ok(Sockets { port, v4, v6 })
    }

    fn send(&self, to: SocketAddr, packet: &[u8]) {
        let socket = match to {
            SocketAddr::V4(_) => Some(&self.v4),
            SocketAddr::V6(_) => self.v6.as_ref(),
        };
        if let Some(socket) = socket {
            // A datagram that cannot leave is lost, as on any network: the protocol retries.
            let _ = socket.send_to(packet, to);
        }
    }
}

fn bind_v6(port: u16) -> std::io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    // std binds IPv6 sockets dual-stack where the host says so; this one must be IPv6 only
    // to share the port with the IPv4 socket.
    // SAFETY: plain socket(2); the descriptor is owned by the UdpSocket from here on.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
    let addr = nix::sys::socket::SockaddrIn6::from(std::net::SocketAddrV6::new(
        Ipv6Addr::UNSPECIFIED,
        port,
        0,
        0,
    ));
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&socket), &addr)?;
    Ok(socket)
}

/// Marks the socket's packets with `fwmark` (0: unmarked).
fn set_fwmark(socket: &UdpSocket, fwmark: u32) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Mark, &fwmark)
        .map_err(std::io::Error::from)
}

impl State {
    fn is_current(&self, sockets: &Arc<Sockets>) -> bool {
        self.sockets
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, sockets))
    }

    fn send(&self, to: Option<SocketAddr>, packet: &[u8]) {
        if let (Some(to), Some(sockets)) = (to, &self.sockets) {
            sockets.send(to, packet);
        }
    }

    /// Whether `source` may come out of `peer`'s tunnel: it routes back to that peer.
    fn allows(&self, peer: &Arc<Peer>, source: IpAddr) -> bool {
        self.routes
            .find(source)
            .is_some_and(|owner| Arc::ptr_eq(owner, peer))
    }

    fn rebuild_routes(&mut self) {
        let mut routes = Routes::default();
        for (net, peer) in &self.owners {
            routes.insert(*net, Arc::clone(peer));
        }
        self.routes = routes;
    }

    /// A 24-bit index no peer has.
    fn free_index(&mut self) -> u32 {
        loop {
            self.next_index = (self.next_index + 1) & 0x00ff_ffff;
            if self.next_index != 0 && !self.by_index.contains_key(&self.next_index) {
                return self.next_index;
            }
        }
    }
}

/// Bytes the sealing side needs for a packet of up to [`MAX_PACKET`].
fn out_buffer() -> Vec<u8> {
    vec![0; (MAX_PACKET + SEAL_OVERHEAD).max(MIN_OUT_BUFFER)]
}

impl Device {
    /// Creates the interface `name` with `queues` queues, and the device around it, with no
    /// key and no peers, listening on a port the kernel picks until one is set.
    fn create(name: &str, queues: usize) -> Result<Created, String> {
        let queues = (0..queues.max(1))
            .map(|_| TunQueue::open(name))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| format!("creating the TUN interface {name}: {e}"))?;
        let tun = queues[0]
            .try_clone()
            .map_err(|e| format!("the TUN interface {name}: {e}"))?;
        let sockets = Sockets::bind(0, 0).map_err(|e| format!("binding a UDP socket: {e}"))?;
        let (fatal, failures) = mpsc::channel();
        let state = State {
            sockets: Some(Arc::new(sockets)),
            next_index: getrandom::u32().unwrap_or(1) & 0x00ff_ffff,
            ..State::default()
        };
        let device = Arc::new(Device {
            state: RwLock::new(state),
            tun,
            fatal: Mutex::new(fatal),
        });
        Ok(Created {
            device,
            queues,
            failures,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, why: String) {
        let _ = lock(&self.fatal).send(why);
    }

    /// Packets the node sends through the interface: to the peer their destination routes
    /// to, sealed, out of the socket towards its endpoint.
    fn outbound(&self, queue: TunQueue) {
        let mut packet = vec![0; MAX_PACKET];
        let mut sealed = out_buffer();
        loop {
            let len = match queue.read(&mut packet) {
                Ok(len) => len,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(format!("reading the TUN interface: {e}")),
            };
            let packet = &packet[..len];
            let Some(destination) = Tunn::dst_address(packet) else {
                continue;
            };
            let state = self.read();
            let (Some(key), Some(peer)) = (&state.key, state.routes.find(destination)) else {
                continue;
            };
            let mut link = lock(&peer.link);
            let endpoint = link.endpoint;
            match link.tunnel(key, peer).encapsulate(packet, &mut sealed) {
                TunnResult::WriteToNetwork(out) => state.send(endpoint, out),
                TunnResult::Err(e) => {
                    tracing::debug!(peer = %hex(&peer.public), error = ?e, "sealing")
                }
                _ => {}
            }
        }
    }

    /// Datagrams from peers on one socket, until the socket is no longer the device's.
    fn inbound(&self, sockets: Arc<Sockets>, v6: bool) {
        let socket = match (v6, &sockets.v6) {
            (false, _) => &sockets.v4,
            (true, Some(v6)) => v6,
            (true, None) => return,
        };
        let mut datagram = vec![0; MAX_PACKET];
        let mut out = out_buffer();
        loop {
            let received = socket.recv_from(&mut datagram);
            let state = self.read();
            if !state.is_current(&sockets) {
                return;
            }
            let (len, from) = match received {
                Ok(received) => received,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    tracing::warn!(error = %e, "receiving on the UDP socket");
                    drop(state);
                    std::thread::sleep(SOCKET_POLL);
                    continue;
                }
            };
            self.receive(&state, &datagram[..len], from, &mut out);
        }
    }

    /// One datagram from `from`.
    fn receive(&self, state: &State, datagram: &[u8], from: SocketAddr, out: &mut [u8]) {
        let Some(key) = &state.key else {
            return;
        };
        // MACs first (and cookies under load), before any work a stranger could make us do.
        let (peer, kind) = match key.limiter.verify_packet(Some(from.ip()), datagram, out) {
            Ok(Packet::HandshakeInit(init)) => {
                let peer = parse_handshake_anon(&key.secret, &key.public, &init)
                    .ok()
                    .and_then(|half| state.peers.get(&half.peer_static_public));
                (peer, Kind::Initiation)
            }
            Ok(Packet::HandshakeResponse(p)) => {
                (state.by_index.get(&(p.receiver_idx >> 8)), Kind::Other)
            }
            Ok(Packet::PacketCookieReply(p)) => {
                (state.by_index.get(&(p.receiver_idx >> 8)), Kind::Cookie)
            }
            Ok(Packet::PacketData(p)) => (state.by_index.get(&(p.receiver_idx >> 8)), Kind::Data),
            Err(TunnResult::WriteToNetwork(cookie)) => {
                state.send(Some(from), cookie);
                return;
            }
            Err(_) => return,
        };
        let Some(peer) = peer else {
            return;
        };
        let mut link = lock(&peer.link);
        // Only an initiation starts a tunnel; anything else for a peer with none is stale.
        let (mut tunnel, fresh) = match link.tunnel.take() {
            Some(tunnel) => (tunnel, false),
            None if kind == Kind::Initiation => (link.make_tunnel(key, peer), true),
            None => return,
        };
        let authentic = self.open(state, peer, &mut tunnel, datagram, kind, from, out);
        // A tunnel made for an initiation is kept only if the initiation was genuine.
        if !fresh || authentic {
            link.tunnel = Some(tunnel);
        }
        // The peer is where its genuine datagrams come from (roaming); a cookie proves
        // nothing of the sort. Nor does an initiation that made a tunnel: the tunnel that
        // would have known it for a replay was dropped, so the endpoint waits for the data
        // that follows a real handshake.
        if authentic && kind != Kind::Cookie && !(fresh && kind == Kind::Initiation) {
            link.endpoint = Some(from);
        }
    }

    /// Hands `datagram` (of `kind`) to `peer`'s tunnel and carries out what it says; whether
    /// the datagram proved to come from the peer (a handshake answered, a packet opened).
    #[allow(clippy::too_many_arguments)]
    fn open(
        &self,
        state: &State,
        peer: &Arc<Peer>,
        tunnel: &mut Tunn,
        datagram: &[u8],
        kind: Kind,
        from: SocketAddr,
        out: &mut [u8],
    ) -> bool {
        match tunnel.decapsulate(Some(from.ip()), datagram, out) {
            // A keepalive opened, or a cookie taken.
            TunnResult::Done => kind == Kind::Data,
            TunnResult::Err(_) => false,
            TunnResult::WriteToNetwork(reply) => {
                // A handshake response (2) or the keepalive that confirms one (4); never a
                // cookie (3), which the tunnel sends to a stranger too.
                let genuine = matches!(reply.first(), Some(2 | 4));
                state.send(Some(from), reply);
                // Packets that waited for the handshake go now.
                while let TunnResult::WriteToNetwork(queued) = tunnel.decapsulate(None, &[], out) {
                    state.send(Some(from), queued);
                }
                genuine
            }
            TunnResult::WriteToTunnelV4(packet, source) => {
                if state.allows(peer, source.into()) {
                    let _ = self.tun.write(packet);
                }
                true
            }
            TunnResult::WriteToTunnelV6(packet, source) => {
                if state.allows(peer, source.into()) {
                    let _ = self.tun.write(packet);
                }
                true
            }
        }
    }

    /// The protocol's timers, every [`TICK`]: handshake retries, keepalives, rekeying; a
    /// tunnel the protocol gave up on is dropped, and a peer with a persistent keepalive gets
    /// one back.
    fn timers(&self) {
        let mut out = out_buffer();
        let mut ticks: u32 = 0;
        loop {
            std::thread::sleep(TICK);
            ticks = ticks.wrapping_add(1);
            let state = self.read();
            let Some(key) = &state.key else {
                continue;
            };
            if ticks % 4 == 0 {
                key.limiter.reset_count();
            }
            for peer in state.peers.values() {
                let mut link = lock(&peer.link);
                let endpoint = link.endpoint;
                if link.tunnel.is_none() {
                    if link.keepalive == 0 {
                        continue;
                    }
                    // A persistent keepalive starts at once, as WireGuard's does when it is
                    // set: the first keepalive makes the handshake.
                    if let TunnResult::WriteToNetwork(packet) =
                        link.tunnel(key, peer).encapsulate(&[], &mut out)
                    {
                        state.send(endpoint, packet);
                    }
                    continue;
                }
                match link.tunnel(key, peer).update_timers(&mut out) {
                    TunnResult::WriteToNetwork(packet) => state.send(endpoint, packet),
                    TunnResult::Err(WireGuardError::ConnectionExpired) => link.drop_tunnel(),
                    _ => {}
                }
            }
        }
    }
}

impl Device {
    /// Carries out a checked `set`, whole or (when its sockets cannot be bound) not at all;
    /// the error number otherwise.
    fn apply(self: &Arc<Self>, request: control::SetRequest) -> Result<(), i32> {
        let (port, old_fwmark) = {
            let state = self.read();
            (state.sockets.as_ref().map(|s| s.port), state.fwmark)
        };
        let fwmark = request.fwmark.unwrap_or(old_fwmark);
        // Port 0 asks for any port, which the device has.
        let rebind = request
            .listen_port
            .filter(|wanted| *wanted != 0 && Some(*wanted) != port);
        let sockets = match rebind {
            Some(port) => Some(Arc::new(Sockets::bind(port, fwmark).map_err(|e| {
                tracing::warn!(port, error = %e, "binding the listen port");
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    control::errno::EADDRINUSE
                } else {
                    control::errno::EIO
                }
            })?)),
            None => None,
        };
        // A new mark on the sockets kept, before anything changes: it may fail.
        if fwmark != old_fwmark && sockets.is_none() {
            let state = self.read();
            if let Some(kept) = &state.sockets {
                for socket in std::iter::once(&kept.v4).chain(kept.v6.as_ref()) {
                    set_fwmark(socket, fwmark).map_err(|e| {
                        tracing::warn!(fwmark, error = %e, "marking the sockets");
                        control::errno::EIO
                    })?;
                }
            }
        }
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.fwmark = fwmark;
        if let Some(secret) = request.private_key {
            state.set_key(secret);
        }
        if let Some(sockets) = &sockets {
            state.sockets = Some(Arc::clone(sockets));
        }
        if request.replace_peers {
            state.peers.clear();
            state.by_index.clear();
            state.owners.clear();
        }
        for change in request.peers {
            state.change_peer(change);
        }
        state.rebuild_routes();
        drop(state);
        if let Some(sockets) = sockets {
            spawn_inbound(self, &sockets).map_err(|e| {
                self.fail(e);
                control::errno::EIO
            })?;
        }
        Ok(())
    }

    /// The device as `get=1` describes it (without the final `errno`).
    fn describe(&self) -> String {
        use std::fmt::Write;
        let state = self.read();
        let mut out = String::new();
        if let Some(key) = &state.key {
            let _ = writeln!(out, "private_key={}", ::hex::encode(key.secret.to_bytes()));
        }
        if let Some(sockets) = &state.sockets {
            let _ = writeln!(out, "listen_port={}", sockets.port);
        }
        if state.fwmark != 0 {
            let _ = writeln!(out, "fwmark={}", state.fwmark);
        }
        let mut allowed: HashMap<u32, Vec<IpNet>> = HashMap::new();
        for (net, peer) in &state.owners {
            allowed.entry(peer.index).or_default().push(*net);
        }
        let mut peers: Vec<&Arc<Peer>> = state.peers.values().collect();
        peers.sort_by_key(|p| *p.public.as_bytes());
        for peer in peers {
            let mut link = lock(&peer.link);
            link.note_handshake();
            let _ = writeln!(out, "public_key={}", hex(&peer.public));
            if let Some(psk) = &link.preshared {
                let _ = writeln!(out, "preshared_key={}", ::hex::encode(psk));
            }
            let _ = writeln!(out, "protocol_version=1");
            if let Some(endpoint) = link.endpoint {
                let _ = writeln!(out, "endpoint={endpoint}");
            }
            let since_epoch = link
                .last_handshake
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .unwrap_or_default();
            let (rx, tx) = link.bytes();
            let _ = writeln!(
                out,
                "last_handshake_time_sec={}\nlast_handshake_time_nsec={}\n\
                 tx_bytes={tx}\nrx_bytes={rx}\npersistent_keepalive_interval={}",
                since_epoch.as_secs(),
                since_epoch.subsec_nanos(),
                link.keepalive,
            );
            let mut nets = allowed.remove(&peer.index).unwrap_or_default();
            nets.sort();
            for net in nets {
                let _ = writeln!(out, "allowed_ip={net}");
            }
        }
        out
    }
}

impl State {
    /// A new private key (all zeros: none). Sessions made under another key are worthless,
    /// so every tunnel goes.
    fn set_key(&mut self, secret: [u8; 32]) {
        let key = (secret != [0; 32]).then(|| {
            let secret = x25519::StaticSecret::from(secret);
            let public = x25519::PublicKey::from(&secret);
            Key {
                limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
                unlimited: Arc::new(RateLimiter::new(&public, u64::MAX)),
                secret,
                public,
            }
        });
        if key.as_ref().map(|k| k.public) == self.key.as_ref().map(|k| k.public) {
            return;
        }
        self.key = key;
        for peer in self.peers.values() {
            lock(&peer.link).drop_tunnel();
        }
        // A peer with the device's own key is no peer (WireGuard drops it too).
        if let Some(own) = self.key.as_ref().map(|k| *k.public.as_bytes()) {
            self.remove_peer(&own);
        }
    }

    fn remove_peer(&mut self, key: &[u8; 32]) {
        if let Some(peer) = self.peers.remove(key) {
            self.by_index.remove(&peer.index);
            self.owners.retain(|_, p| !Arc::ptr_eq(p, &peer));
        }
    }

    /// One peer section of a `set`.
    fn change_peer(&mut self, change: control::PeerChange) {
        let key = change.public_key;
        if change.remove {
            self.remove_peer(&key);
            return;
        }
        if self
            .key
            .as_ref()
            .is_some_and(|k| *k.public.as_bytes() == key)
        {
            return;
        }
        let peer = match self.peers.get(&key) {
            Some(peer) => Arc::clone(peer),
            None if change.update_only => return,
            None => {
                let index = self.free_index();
                let peer = Arc::new(Peer {
                    public: x25519::PublicKey::from(key),
                    index,
                    link: Mutex::new(Link::default()),
                });
                self.peers.insert(key, Arc::clone(&peer));
                self.by_index.insert(index, Arc::clone(&peer));
                peer
            }
        };
        {
            let mut link = lock(&peer.link);
            if change.endpoint.is_some() {
                link.endpoint = change.endpoint;
            }
            // A tunnel is made with its preshared key and keepalive: a new one of either
            // takes a new tunnel (and handshake) for this peer.
            if let Some(psk) = change.preshared_key {
                let psk = (psk != [0; 32]).then_some(psk);
                if link.preshared != psk {
                    link.preshared = psk;
                    link.drop_tunnel();
                }
            }
            if let Some(keepalive) = change.keepalive {
                if link.keepalive != keepalive {
                    link.keepalive = keepalive;
                    link.drop_tunnel();
                }
            }
        }
        if change.replace_allowed_ips {
            self.owners.retain(|_, p| !Arc::ptr_eq(p, &peer));
        }
        for net in change.allowed_ips {
            self.owners.insert(net.trunc(), Arc::clone(&peer));
        }
    }
}

/// Runs the device on the interface `interface` with `threads` queues (a thread each),
/// serving the UAPI on `listener`, and calls `announce` once it runs; returns only when the
/// device cannot go on, and why.
pub fn run(
    interface: &str,
    threads: usize,
    listener: std::os::unix::net::UnixListener,
    announce: impl FnOnce() -> Result<(), String>,
) -> String {
    let Created {
        device,
        queues,
        failures,
    } = match Device::create(interface, threads) {
        Ok(created) => created,
        Err(e) => return e,
    };
    let spawn = |name: String, work: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name)
            .spawn(work)
            .map(drop)
            .map_err(|e| format!("starting a device thread: {e}"))
    };
    let mut started = Vec::new();
    for (n, queue) in queues.into_iter().enumerate() {
        let device = Arc::clone(&device);
        started.push(spawn(
            format!("tun{n}"),
            Box::new(move || device.outbound(queue)),
        ));
    }
    {
        let device = Arc::clone(&device);
        started.push(spawn("timers".into(), Box::new(move || device.timers())));
    }
    let sockets = device.read().sockets.clone();
    if let Some(sockets) = sockets {
        if let Err(e) = spawn_inbound(&device, &sockets) {
            return e;
        }
    }
    if let Some(Err(e)) = started.into_iter().find(Result::is_err) {
        return e;
    }
    {
        let device = Arc::clone(&device);
        let started = spawn(
            "uapi".into(),
            Box::new(move || {
                let error = control::serve(listener, &device);
                device.fail(format!("the UAPI socket: {error}"));
            }),
        );
        if let Err(e) = started {
            return e;
        }
    }
    if let Err(e) = announce() {
        return e;
    }
    failures
        .recv()
        .unwrap_or_else(|_| "every device thread ended".into())
}

/// Starts the threads that read `sockets`, one a socket: two threads on one socket would
/// decrypt a flow's datagrams side by side and hand them to the interface out of order,
/// which TCP takes for loss.
fn spawn_inbound(device: &Arc<Device>, sockets: &Arc<Sockets>) -> Result<(), String> {
    for v6 in [false, true] {
        if v6 && sockets.v6.is_none() {
            continue;
        }
        let (device, sockets) = (Arc::clone(device), Arc::clone(sockets));
        std::thread::Builder::new()
            .name(format!("udp{}-{}", if v6 { 6 } else { 4 }, sockets.port))
            .spawn(move || device.inbound(sockets, v6))
            .map_err(|e| format!("starting a socket thread: {e}"))?;
    }
    Ok(())
}

/// A key in the UAPI's spelling.
fn hex(key: &x25519::PublicKey) -> String {
    ::hex::encode(key.as_bytes())
}
