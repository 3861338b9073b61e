//! The device's receive path against boringtun's protocol as the remote peer: which datagrams
//! may move a peer's endpoint.

use super::*;
use std::net::UdpSocket;

/// A random X25519 secret, as bytes.
fn secret() -> [u8; 32] {
    let mut bytes = [0; 32];
    getrandom::fill(&mut bytes).expect("random bytes");
    bytes
}

/// A device with no threads (datagrams are handed to it here), keyed, with one peer that has
/// no endpoint yet; and that peer's side of the tunnel.
fn device_and_remote() -> Option<(Arc<Device>, Tunn)> {
    if !powernode_pubsub::testing::require(&["root"]) {
        return None;
    }
    let name = format!("pnt{}", std::process::id());
    let Created { device, .. } = Device::create(&name, 1).expect("a device");
    let node = secret();
    let remote = x25519::StaticSecret::from(secret());
    let remote_public = x25519::PublicKey::from(&remote);
    let mut change = control::PeerChange::new(remote_public.to_bytes());
    change.allowed_ips = vec!["10.99.0.2/32".parse().unwrap()];
    let request = control::SetRequest {
        private_key: Some(node),
        peers: vec![change],
        ..control::SetRequest::default()
    };
    device.apply(request).expect("configured");
    let node_public = x25519::PublicKey::from(&x25519::StaticSecret::from(node));
    let remote = Tunn::new(remote, node_public, None, None, 7, None);
    Some((device, remote))
}

fn the_peer(device: &Device) -> Arc<Peer> {
    Arc::clone(device.read().peers.values().next().expect("a peer"))
}

fn give(device: &Device, datagram: &[u8], from: SocketAddr) {
    let mut out = out_buffer();
    device.receive(&device.read(), datagram, from, &mut out);
}

#[test]
fn the_endpoint_moves_on_data_not_on_an_initiation_nor_its_replay() {
    let Some((device, mut remote)) = device_and_remote() else {
        return;
    };
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let at = socket.local_addr().unwrap();
    let mut buf = vec![0; 2048];
    let initiation = match remote.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(packet) => packet.to_vec(),
        other => panic!("no initiation: {other:?}"),
    };

    give(&device, &initiation, at);
    let peer = the_peer(&device);
    assert!(
        lock(&peer.link).tunnel.is_some(),
        "a genuine initiation keeps its tunnel"
    );
    assert_eq!(
        lock(&peer.link).endpoint,
        None,
        "an initiation alone moved the endpoint"
    );
    let mut answer = vec![0; 2048];
    let (len, _) = socket
        .recv_from(&mut answer)
        .expect("the device answers the initiation");
    let response = answer[..len].to_vec();

    // The same initiation again, from elsewhere: the tunnel knows it for a replay.
    let elsewhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
    give(&device, &initiation, elsewhere);
    assert_eq!(
        lock(&peer.link).endpoint,
        None,
        "a replay moved the endpoint"
    );

    // The remote takes the response and confirms with a keepalive: data, from where it is.
    let keepalive = match remote.decapsulate(Some(at.ip()), &response, &mut buf) {
        TunnResult::WriteToNetwork(packet) => packet.to_vec(),
        other => panic!("the response was not taken: {other:?}"),
    };
    give(&device, &keepalive, at);
    assert_eq!(lock(&peer.link).endpoint, Some(at));
    let link = lock(&peer.link);
    let tunnel = link.tunnel.as_ref().expect("the tunnel stays");
    assert!(tunnel.stats().0.is_some(), "the handshake did not complete");
}

#[test]
fn data_for_a_peer_without_a_tunnel_makes_none() {
    let Some((device, mut remote)) = device_and_remote() else {
        return;
    };
    let mut buf = vec![0; 2048];
    // A data-shaped datagram naming the peer's index: stale or forged, it is dropped.
    let index = the_peer(&device).index;
    let mut datagram = vec![0u8; 48];
    datagram[0] = 4;
    datagram[4..8].copy_from_slice(&(index << 8).to_le_bytes());
    give(&device, &datagram, "127.0.0.1:9".parse().unwrap());
    let peer = the_peer(&device);
    assert!(lock(&peer.link).tunnel.is_none());
    assert_eq!(lock(&peer.link).endpoint, None);
    // And the remote's initiation is still taken afterwards.
    let initiation = match remote.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(packet) => packet.to_vec(),
        other => panic!("no initiation: {other:?}"),
    };
    give(&device, &initiation, "127.0.0.1:9".parse().unwrap());
    assert!(lock(&peer.link).tunnel.is_some());
}
