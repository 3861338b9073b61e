//! Overlay networks against a real controller: the operator creates networks, joins and
//! removes nodes and forwards their ports (`/api/v1/networks`, `/api/v1/forwards`, and the
//! binary's `network` and `networks` commands on the data directory); nodes report their
//! WireGuard keys and endpoints in heartbeats over mTLS and get the derived network — their
//! address, every other member as a peer, their forwards — in the replies.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    code, heartbeat_body, parse, post_json, run, run_ok, status_json, NodeCreds, TestServer,
};
use hyper::Method;
use powernode_types::node_api::{DesiredNetwork, HeartbeatResponse, WgPeer};
use serde_json::{json, Value};

const LIFETIME: Duration = Duration::from_secs(3600);
/// The keepalive every peer gets: the contract's number, not the controller's constant.
const KEEPALIVE_S: u16 = 25;

/// A WireGuard public key as `wg` prints it (32 bytes, base64), made of `c`.
fn key(c: char) -> String {
    format!("{}A=", c.to_string().repeat(42))
}

/// netmgr's `NetworkStatus` as heartbeatd sends it.
fn net_status(public_key: Option<&str>, endpoints: &[&str], peers: Value) -> Value {
    json!({
        "state": "Up", "interface": "pn0", "public_key": public_key, "peers_up": 0,
        "userspace": true, "error": null, "generation": 1, "listen_port": 51820,
        "endpoints": endpoints, "peers": peers,
    })
}

/// Sends a heartbeat of `node` with `network` as its `network` object; the reply must be a
/// 200 of the wire type.
async fn heartbeat(server: &TestServer, node: &NodeCreds, network: Value) -> HeartbeatResponse {
    let mut body = heartbeat_body(0);
    body["network"] = network;
    let url = server.url("/node_api/v1/status/heartbeat");
    let (status, reply) = post_json(&server.as_node(node), url, &body).await;
    assert_eq!(status, 200, "heartbeat of {}: {reply}", node.node_id);
    serde_json::from_value(reply.clone()).unwrap_or_else(|e| panic!("{e}: {reply}"))
}

/// The desired network and generation a heartbeat of `node` (reporting `{"state": "Down"}`,
/// which changes nothing) is answered.
async fn desired(server: &TestServer, node: &NodeCreds) -> (Option<DesiredNetwork>, u64) {
    let reply = heartbeat(server, node, json!({"state": "Down"})).await;
    (reply.desired.network, reply.desired.generation)
}

/// The desired network of `node`, which must have one.
async fn network_of(server: &TestServer, node: &NodeCreds) -> DesiredNetwork {
    desired(server, node)
        .await
        .0
        .unwrap_or_else(|| panic!("{} has no desired network", node.node_id))
}

async fn create(server: &TestServer, body: Value) -> (u16, Value) {
    server.operator_post("/api/v1/networks", &body).await
}

async fn create_ok(server: &TestServer, name: &str, cidr: &str) {
    let (status, reply) = create(server, json!({"name": name, "cidr": cidr})).await;
    assert_eq!(status, 200, "create {name}: {reply}");
}

async fn join(server: &TestServer, network: &str, body: Value) -> (u16, Value) {
    let path = format!("/api/v1/networks/{network}/join");
    server.operator_post(&path, &body).await
}

/// Joins `node` to `network`; it must work. Answers the address.
async fn join_ok(server: &TestServer, network: &str, node: &NodeCreds) -> String {
    let (status, reply) = join(server, network, json!({"node": node.node_id})).await;
    assert_eq!(status, 200, "join {}: {reply}", node.node_id);
    reply["address"].as_str().unwrap().to_owned()
}

async fn leave(server: &TestServer, network: &str, node: &NodeCreds) -> (u16, Value) {
    let path = format!("/api/v1/networks/{network}/leave");
    server
        .operator_post(&path, &json!({"node": node.node_id}))
        .await
}

async fn operator_delete(server: &TestServer, path: &str) -> (u16, Value) {
    let request = server
        .anonymous()
        .request(Method::DELETE, server.url(path))
        .bearer_auth(&server.operator_token);
    status_json(request.send().await.unwrap()).await
}

/// The reply must be a refusal with `want_status` and `want_code` whose message mentions
/// `mention`.
#[track_caller]
fn assert_refused(
    (status, reply): &(u16, Value),
    want_status: u16,
    want_code: &str,
    mention: &str,
) {
    assert_eq!((*status, code(reply)), (want_status, want_code), "{reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(mention),
        "{mention:?} not in the message {message:?}"
    );
}

/// The node ids of an `updated` list.
fn updated(reply: &Value) -> BTreeSet<String> {
    reply["updated"]
        .as_array()
        .unwrap_or_else(|| panic!("no updated list: {reply}"))
        .iter()
        .map(|u| u["node_id"].as_str().unwrap().to_owned())
        .collect()
}

fn ids(nodes: &[&NodeCreds]) -> BTreeSet<String> {
    nodes.iter().map(|n| n.node_id.clone()).collect()
}

/// The peer with `public_key` in `network`.
#[track_caller]
fn peer<'a>(network: &'a DesiredNetwork, public_key: &str) -> &'a WgPeer {
    network
        .peers
        .iter()
        .find(|p| p.public_key == public_key)
        .unwrap_or_else(|| panic!("no peer {public_key} in {network:?}"))
}

fn peer_keys(network: &DesiredNetwork) -> Vec<&str> {
    network
        .peers
        .iter()
        .map(|p| p.public_key.as_str())
        .collect()
}

/// Addresses are handed out lowest first, never twice, never the network or broadcast
/// address; a leave frees one and the next join takes it; a full /30 refuses a third node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_are_allocated_lowest_first_never_twice_and_reused() {
    let server = TestServer::start(LIFETIME).await;
    create_ok(&server, "lab", "10.88.0.0/24").await;
    let mut nodes = Vec::new();
    for i in 0..4 {
        nodes.push(server.enroll_new(&format!("uuid-alloc-{i}")).await);
    }
    let [a, b, c, d] = [&nodes[0], &nodes[1], &nodes[2], &nodes[3]];
    assert_eq!(join_ok(&server, "lab", a).await, "10.88.0.1");
    assert_eq!(join_ok(&server, "lab", b).await, "10.88.0.2");
    assert_eq!(join_ok(&server, "lab", c).await, "10.88.0.3");
    // Joining again keeps the address.
    assert_eq!(join_ok(&server, "lab", b).await, "10.88.0.2");
    let (status, reply) = leave(&server, "lab", b).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["address"], "10.88.0.2");
    assert_eq!(
        join_ok(&server, "lab", d).await,
        "10.88.0.2",
        "the freed address"
    );
    assert_eq!(join_ok(&server, "lab", b).await, "10.88.0.4");
    let (status, shown) = server.operator_get("/api/v1/networks/lab").await;
    assert_eq!(status, 200, "{shown}");
    let addresses: Vec<&str> = shown["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["address"].as_str().unwrap())
        .collect();
    assert_eq!(
        addresses,
        ["10.88.0.1", "10.88.0.2", "10.88.0.3", "10.88.0.4"]
    );
    assert_eq!(shown["member_count"], 4);
    // Each member's desired address carries the network's prefix.
    assert_eq!(network_of(&server, d).await.address, "10.88.0.2/24");

    // A /30 has two host addresses: .1 and .2, never .0 or .3.
    create_ok(&server, "tiny", "10.99.0.0/30").await;
    let more = [
        server.enroll_new("uuid-alloc-e").await,
        server.enroll_new("uuid-alloc-f").await,
        server.enroll_new("uuid-alloc-g").await,
    ];
    assert_eq!(join_ok(&server, "tiny", &more[0]).await, "10.99.0.1");
    assert_eq!(join_ok(&server, "tiny", &more[1]).await, "10.99.0.2");
    let full = join(&server, "tiny", json!({"node": more[2].node_id})).await;
    assert_refused(&full, 409, "network_full", "no free address");
    let (status, reply) = leave(&server, "tiny", &more[0]).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(join_ok(&server, "tiny", &more[2]).await, "10.99.0.1");
    server.stop().await;
}

/// Three members: as their heartbeats bring keys and endpoints, each is given the two others
/// as peers (its /32 and announced routes, the endpoint chosen by the rules); a new key bumps
/// the others' generation and not its own; a restarting netmgr that reports nothing changes
/// nothing; a leave takes the peer from the others and gives the leaver `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_get_each_other_as_peers_from_their_heartbeats() {
    let server = TestServer::start(LIFETIME).await;
    create_ok(&server, "lab", "10.88.0.0/16").await;
    let a = server.enroll_new("uuid-peer-a").await;
    let b = server.enroll_new("uuid-peer-b").await;
    let c = server.enroll_new("uuid-peer-c").await;
    let (status, reply) = join(
        &server,
        "lab",
        json!({"node": a.node_id, "announce": ["192.168.10.0/24"]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["announce"], json!(["192.168.10.0/24"]));
    assert_eq!(updated(&reply), ids(&[&a]));
    let (status, reply) = join(
        &server,
        "lab",
        json!({"node": b.node_id, "endpoint": "b.example.net:4500"}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    join_ok(&server, "lab", &c).await;

    // No keys reported yet: addresses, no peers.
    let before = network_of(&server, &a).await;
    assert_eq!(
        (
            before.interface.as_str(),
            before.address.as_str(),
            before.listen_port
        ),
        ("pn0", "10.88.0.1/16", 51820)
    );
    assert_eq!(before.network, "lab");
    assert!(before.peers.is_empty(), "{before:?}");

    // Each reports its key; a and b their endpoints, c none.
    let (ka, kb, kc) = (key('a'), key('b'), key('c'));
    heartbeat(
        &server,
        &a,
        net_status(Some(&ka), &["192.0.2.1:51820"], json!([])),
    )
    .await;
    heartbeat(
        &server,
        &b,
        net_status(Some(&kb), &["192.0.2.2:51820"], json!([])),
    )
    .await;
    let c_reply = heartbeat(&server, &c, net_status(Some(&kc), &[], json!([]))).await;
    // c's own reply already has a and b.
    let c_net = c_reply.desired.network.unwrap();
    assert_eq!(peer_keys(&c_net), [ka.as_str(), kb.as_str()]);

    let a_net = network_of(&server, &a).await;
    assert_eq!(peer_keys(&a_net), [kb.as_str(), kc.as_str()], "by address");
    let to_b = peer(&a_net, &kb);
    assert_eq!(to_b.allowed_ips, ["10.88.0.2/32"]);
    assert_eq!(
        to_b.endpoint.as_deref(),
        Some("b.example.net:4500"),
        "the operator's endpoint"
    );
    assert_eq!(to_b.keepalive_s, Some(KEEPALIVE_S));
    let to_c = peer(&a_net, &kc);
    assert_eq!(to_c.allowed_ips, ["10.88.0.3/32"]);
    assert_eq!(
        to_c.endpoint.as_deref(),
        Some("127.0.0.1:51820"),
        "nothing reported: where its heartbeats come from, with the network's port"
    );
    let b_net = network_of(&server, &b).await;
    assert_eq!(peer_keys(&b_net), [ka.as_str(), kc.as_str()]);
    let to_a = peer(&b_net, &ka);
    assert_eq!(to_a.allowed_ips, ["10.88.0.1/32", "192.168.10.0/24"]);
    assert_eq!(
        to_a.endpoint.as_deref(),
        Some("192.0.2.1:51820"),
        "the first endpoint a reported"
    );

    // The same report again, or a netmgr restarting (no key, no endpoints): nothing changes.
    let (_, gen_a) = desired(&server, &a).await;
    let (_, gen_b) = desired(&server, &b).await;
    let (_, gen_c) = desired(&server, &c).await;
    heartbeat(&server, &c, net_status(Some(&kc), &[], json!([]))).await;
    heartbeat(&server, &a, net_status(None, &[], json!([]))).await;
    heartbeat(&server, &b, json!({"state": "Configuring"})).await;
    assert_eq!(desired(&server, &a).await.1, gen_a);
    assert_eq!(desired(&server, &b).await.1, gen_b);
    assert_eq!(desired(&server, &c).await.1, gen_c);
    assert_eq!(network_of(&server, &b).await, b_net, "b kept a's key");

    // b watches; c's new key wakes it, bumps a and b, and not c.
    let watch = server
        .as_node(&b)
        .get(server.url(&format!("/node_api/v1/watch?generation={gen_b}")))
        .connect()
        .await
        .unwrap();
    let watching = tokio::spawn(watch.send());
    let kc2 = key('d');
    let c_reply = heartbeat(&server, &c, net_status(Some(&kc2), &[], json!([]))).await;
    assert_eq!(
        c_reply.desired.generation, gen_c,
        "c's own network is the same"
    );
    let woke = tokio::time::timeout(Duration::from_secs(5), watching)
        .await
        .expect("b's watch answers when its peer's key changes")
        .unwrap()
        .unwrap();
    let (status, woke) = status_json(woke).await;
    assert_eq!(status, 200, "{woke}");
    assert_eq!(woke["changed"], true, "{woke}");
    let (a_net, a_gen) = desired(&server, &a).await;
    let (b_net, b_gen) = desired(&server, &b).await;
    assert_eq!((a_gen, b_gen), (gen_a + 1, gen_b + 1));
    let (a_net, b_net) = (a_net.unwrap(), b_net.unwrap());
    assert_eq!(peer_keys(&a_net), [kb.as_str(), kc2.as_str()]);
    assert_eq!(peer_keys(&b_net), [ka.as_str(), kc2.as_str()]);

    // c reports an endpoint: the others dial it there now.
    heartbeat(
        &server,
        &c,
        net_status(
            Some(&kc2),
            &["192.0.2.3:51820", "10.1.1.3:51820"],
            json!([]),
        ),
    )
    .await;
    let a_net = network_of(&server, &a).await;
    assert_eq!(
        peer(&a_net, &kc2).endpoint.as_deref(),
        Some("192.0.2.3:51820")
    );

    // What nodes report shows in `network show`: keys, endpoints used, their peers.
    let handshake_ms = powernode_controller::now_ms() as u64 - 5_000;
    heartbeat(
        &server,
        &a,
        net_status(
            Some(&ka),
            &["192.0.2.1:51820"],
            json!([{"public_key": kb, "endpoint": "192.0.2.2:51820",
                    "last_handshake_ms": handshake_ms, "rx_bytes": 1234, "tx_bytes": 5678}]),
        ),
    )
    .await;
    let (status, shown) = server.operator_get("/api/v1/networks/lab").await;
    assert_eq!(status, 200, "{shown}");
    let members = shown["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let shown_a = &members[0];
    assert_eq!(shown_a["node_id"], a.node_id.as_str());
    assert_eq!(shown_a["public_key"], ka.as_str());
    assert_eq!(shown_a["endpoint_used"], "192.0.2.1:51820");
    assert_eq!(shown_a["endpoint_source"], "reported");
    assert_eq!(shown_a["reported"]["state"], "Up");
    let reported_peer = &shown_a["reported"]["peers"][0];
    assert_eq!(reported_peer["node_id"], b.node_id.as_str());
    assert_eq!(reported_peer["last_handshake_ms"], handshake_ms);
    assert_eq!(
        (&reported_peer["rx_bytes"], &reported_peer["tx_bytes"]),
        (&json!(1234), &json!(5678))
    );
    assert_eq!(members[1]["endpoint_source"], "operator");
    assert_eq!(members[1]["endpoint_used"], "b.example.net:4500");

    // c leaves: the others lose it, c gets null.
    let (_, gen_c) = desired(&server, &c).await;
    let (status, reply) = leave(&server, "lab", &c).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(updated(&reply), ids(&[&a, &b, &c]));
    let (c_net, c_gen) = desired(&server, &c).await;
    assert_eq!((c_net, c_gen), (None, gen_c + 1));
    assert_eq!(peer_keys(&network_of(&server, &a).await), [kb.as_str()]);
    assert_eq!(peer_keys(&network_of(&server, &b).await), [ka.as_str()]);
    // c's key is kept: joining again makes it a peer at once, with its old address back.
    let (status, reply) = join(&server, "lab", json!({"node": c.node_id})).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["address"], "10.88.0.3");
    assert_eq!(
        peer_keys(&network_of(&server, &a).await),
        [kb.as_str(), kc2.as_str()]
    );
    server.stop().await;
}

/// Two members reporting the same key are no one's peers (a clone must not take the other's
/// traffic, and a node refuses a configuration with a key twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_two_members_report_is_given_to_no_one() {
    let server = TestServer::start(LIFETIME).await;
    create_ok(&server, "lab", "10.88.0.0/16").await;
    let a = server.enroll_new("uuid-clone-a").await;
    let b = server.enroll_new("uuid-clone-b").await;
    let c = server.enroll_new("uuid-clone-c").await;
    for n in [&a, &b, &c] {
        join_ok(&server, "lab", n).await;
    }
    heartbeat(&server, &a, net_status(Some(&key('a')), &[], json!([]))).await;
    heartbeat(&server, &b, net_status(Some(&key('a')), &[], json!([]))).await;
    heartbeat(&server, &c, net_status(Some(&key('c')), &[], json!([]))).await;
    assert!(network_of(&server, &c).await.peers.is_empty());
    heartbeat(&server, &b, net_status(Some(&key('b')), &[], json!([]))).await;
    let c_net = network_of(&server, &c).await;
    let (ka, kb) = (key('a'), key('b'));
    assert_eq!(peer_keys(&c_net), [ka.as_str(), kb.as_str()]);
    server.stop().await;
}

/// Forwards travel in the member's desired network, sorted; the same one again changes
/// nothing; a clash or a non-member is refused; removing and leaving take them away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_travel_in_the_desired_network() {
    let server = TestServer::start(LIFETIME).await;
    create_ok(&server, "lab", "10.88.0.0/16").await;
    let a = server.enroll_new("uuid-fwd-a").await;
    let outsider = server.enroll_new("uuid-fwd-out").await;
    join_ok(&server, "lab", &a).await;
    let (_, gen) = desired(&server, &a).await;
    let add = |body: Value| {
        let server = &server;
        async move { server.operator_post("/api/v1/forwards", &body).await }
    };
    let tcp = json!({"node": a.node_id, "proto": "tcp", "port": 8080, "to": "10.88.0.2:80"});
    let (status, reply) = add(tcp.clone()).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(updated(&reply), ids(&[&a]));
    assert_eq!(
        (&reply["proto"], &reply["port"], &reply["to"]),
        (&json!("tcp"), &json!(8080), &json!("10.88.0.2:80"))
    );
    let udp = json!({"node": a.node_id, "proto": "udp", "port": 53, "to": "10.88.0.3:53"});
    assert_eq!(add(udp).await.0, 200);
    let (net, gen_now) = desired(&server, &a).await;
    assert_eq!(gen_now, gen + 2);
    let forwards = serde_json::to_value(net.unwrap().forwards).unwrap();
    assert_eq!(
        forwards,
        json!([{"proto": "tcp", "port": 8080, "to": "10.88.0.2:80"},
               {"proto": "udp", "port": 53, "to": "10.88.0.3:53"}])
    );
    // The same again: nothing changes.
    let (status, reply) = add(tcp.clone()).await;
    assert_eq!(status, 200, "{reply}");
    assert!(updated(&reply).is_empty(), "{reply}");
    assert_eq!(desired(&server, &a).await.1, gen_now);
    // The same port elsewhere, the listen port, a non-member, an unknown node.
    let mut elsewhere = tcp.clone();
    elsewhere["to"] = json!("10.88.0.9:80");
    assert_refused(&add(elsewhere).await, 409, "forward_exists", "10.88.0.2:80");
    let listen = json!({"node": a.node_id, "proto": "udp", "port": 51820, "to": "10.88.0.3:1"});
    assert_refused(&add(listen).await, 409, "port_conflict", "51820");
    let out = json!({"node": outsider.node_id, "proto": "tcp", "port": 1, "to": "10.88.0.3:1"});
    assert_refused(&add(out).await, 409, "not_a_member", &outsider.node_id);
    let ghost = json!({"node": "node-0000000000000000", "proto": "tcp", "port": 1,
                       "to": "10.88.0.3:1"});
    assert_refused(&add(ghost).await, 404, "not_found", "node-0000000000000000");

    let (status, list) = server
        .operator_get(&format!("/api/v1/forwards?node={}", a.node_id))
        .await;
    assert_eq!(status, 200, "{list}");
    let ports: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["port"])
        .collect();
    assert_eq!(ports, [&json!(8080), &json!(53)]);

    let path = format!("/api/v1/forwards/{}/tcp/8080", a.node_id);
    let (status, reply) = operator_delete(&server, &path).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(updated(&reply), ids(&[&a]));
    let net = network_of(&server, &a).await;
    assert_eq!(net.forwards.len(), 1);
    assert_eq!(net.forwards[0].proto, "udp");
    assert_refused(
        &operator_delete(&server, &path).await,
        404,
        "not_found",
        "8080",
    );
    assert_refused(
        &operator_delete(&server, &format!("/api/v1/forwards/{}/sctp/1", a.node_id)).await,
        400,
        "invalid_request",
        "proto",
    );

    // Leaving takes the rest.
    let (status, reply) = leave(&server, "lab", &a).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["forwards_removed"], 1);
    let (status, list) = server.operator_get("/api/v1/forwards").await;
    assert_eq!((status, list), (200, json!([])));
    server.stop().await;
}

/// Every bad request is refused with its status and code, and the message says what is
/// wrong; no token is 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_clear_codes() {
    let server = TestServer::start(LIFETIME).await;
    let a = server.enroll_new("uuid-bad-a").await;
    let b = server.enroll_new("uuid-bad-b").await;
    let bad_creates = [
        (json!({"name": "v6", "cidr": "fd00::/64"}), "cidr"),
        (json!({"name": "wide", "cidr": "10.0.0.0/7"}), "8 to 30"),
        (json!({"name": "narrow", "cidr": "10.0.0.0/31"}), "8 to 30"),
        (
            json!({"name": "hostbits", "cidr": "10.88.0.1/16"}),
            "host bits",
        ),
        (json!({"name": "junk", "cidr": "ten"}), "cidr"),
        (json!({"name": "lo", "cidr": "127.0.0.0/8"}), "not usable"),
        (
            json!({"name": "Lab", "cidr": "10.88.0.0/16"}),
            "network name",
        ),
        (
            json!({"name": "a_b", "cidr": "10.88.0.0/16"}),
            "network name",
        ),
        (json!({"name": "", "cidr": "10.88.0.0/16"}), "network name"),
        (
            json!({"name": "p0", "cidr": "10.88.0.0/16", "port": 0}),
            "port",
        ),
        (
            json!({"name": "pbig", "cidr": "10.88.0.0/16", "port": 70000}),
            "port",
        ),
    ];
    for (body, mention) in bad_creates {
        let reply = create(&server, body.clone()).await;
        assert_refused(&reply, 400, "invalid_request", mention);
    }
    let unknown_field = create(
        &server,
        json!({"name": "x", "cidr": "10.1.0.0/16", "size": 1}),
    )
    .await;
    assert_refused(&unknown_field, 400, "invalid_request", "size");
    let unauthenticated = server
        .anonymous()
        .post(server.url("/api/v1/networks"))
        .json(&json!({"name": "lab", "cidr": "10.88.0.0/16"}))
        .send()
        .await
        .unwrap();
    assert_eq!(status_json(unauthenticated).await.0, 401);

    let (status, made) = create(
        &server,
        json!({"name": "lab", "cidr": "10.88.0.0/16", "port": 51999}),
    )
    .await;
    assert_eq!(status, 200, "{made}");
    assert_eq!(made["listen_port"], 51999);
    let again = create(&server, json!({"name": "lab", "cidr": "10.77.0.0/16"})).await;
    assert_refused(&again, 409, "network_exists", "lab");
    create_ok(&server, "other", "10.77.0.0/16").await;

    let no_network = join(&server, "nope", json!({"node": a.node_id})).await;
    assert_refused(&no_network, 404, "not_found", "nope");
    let no_node = join(&server, "lab", json!({"node": "node-0000000000000000"})).await;
    assert_refused(&no_node, 404, "not_found", "node-0000000000000000");
    for endpoint in ["nohost", "host:0", "[::1]", "a b:1"] {
        let reply = join(
            &server,
            "lab",
            json!({"node": a.node_id, "endpoint": endpoint}),
        )
        .await;
        assert_refused(&reply, 400, "invalid_request", "endpoint");
    }
    let inside = join(
        &server,
        "lab",
        json!({"node": a.node_id, "announce": ["10.88.5.0/24"]}),
    )
    .await;
    assert_refused(&inside, 409, "route_conflict", "10.88.0.0/16");
    let bad_route = join(
        &server,
        "lab",
        json!({"node": a.node_id, "announce": ["192.168.1.1/24"]}),
    )
    .await;
    assert_refused(&bad_route, 400, "invalid_request", "host bits");
    let (status, reply) = join(
        &server,
        "lab",
        json!({"node": a.node_id, "announce": ["192.168.0.0/16"]}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let overlapping = join(
        &server,
        "lab",
        json!({"node": b.node_id, "announce": ["192.168.7.0/24"]}),
    )
    .await;
    assert_refused(&overlapping, 409, "route_conflict", &a.node_id);
    let elsewhere = join(&server, "other", json!({"node": a.node_id})).await;
    assert_refused(&elsewhere, 409, "in_another_network", "lab");
    assert_refused(
        &leave(&server, "other", &a).await,
        409,
        "not_a_member",
        "other",
    );

    let bad_forwards = [
        (
            json!({"node": a.node_id, "proto": "sctp", "port": 1, "to": "10.88.0.2:1"}),
            "proto",
        ),
        (
            json!({"node": a.node_id, "proto": "tcp", "port": 0, "to": "10.88.0.2:1"}),
            "port",
        ),
        (
            json!({"node": a.node_id, "proto": "tcp", "port": 1, "to": "host:1"}),
            "a.b.c.d:port",
        ),
        (
            json!({"node": a.node_id, "proto": "tcp", "port": 1, "to": "10.88.0.2"}),
            "a.b.c.d:port",
        ),
        (
            json!({"node": a.node_id, "proto": "tcp", "port": 1, "to": "10.88.0.2:0"}),
            "a.b.c.d:port",
        ),
    ];
    for (body, mention) in bad_forwards {
        let reply = server.operator_post("/api/v1/forwards", &body).await;
        assert_refused(&reply, 400, "invalid_request", mention);
    }

    assert_refused(
        &operator_delete(&server, "/api/v1/networks/lab").await,
        409,
        "network_not_empty",
        "1 member",
    );
    assert_refused(
        &operator_delete(&server, "/api/v1/networks/nope").await,
        404,
        "not_found",
        "nope",
    );
    let (status, reply) = operator_delete(&server, "/api/v1/networks/other").await;
    assert_eq!((status, reply), (200, json!({"deleted": "other"})));
    assert_refused(
        &server.operator_get("/api/v1/networks/other").await,
        404,
        "not_found",
        "other",
    );
    let (status, list) = server.operator_get("/api/v1/networks").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list,
        json!([{"name": "lab", "cidr": "10.88.0.0/16", "listen_port": 51999,
                "created_at_ms": made["created_at_ms"], "member_count": 1}])
    );
    server.stop().await;
}

/// A revoked member stops being a peer at once; a revoked node cannot join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_nodes_are_no_ones_peers_and_cannot_join() {
    let server = TestServer::start(LIFETIME).await;
    create_ok(&server, "lab", "10.88.0.0/16").await;
    let a = server.enroll_new("uuid-rev-a").await;
    let b = server.enroll_new("uuid-rev-b").await;
    let c = server.enroll_new("uuid-rev-c").await;
    join_ok(&server, "lab", &a).await;
    join_ok(&server, "lab", &b).await;
    heartbeat(&server, &a, net_status(Some(&key('a')), &[], json!([]))).await;
    heartbeat(&server, &b, net_status(Some(&key('b')), &[], json!([]))).await;
    let (a_net, a_gen) = desired(&server, &a).await;
    assert_eq!(a_net.unwrap().peers.len(), 1);

    let (status, reply) = server
        .operator_post(&format!("/api/v1/nodes/{}/revoke", b.node_id), &json!({}))
        .await;
    assert_eq!(status, 200, "{reply}");
    let (a_net, gen_now) = desired(&server, &a).await;
    assert!(a_net.unwrap().peers.is_empty(), "b is revoked");
    assert_eq!(gen_now, a_gen + 1);
    let (status, shown) = server.operator_get("/api/v1/networks/lab").await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["members"][1]["revoked"], true);

    let (status, reply) = server
        .operator_post(&format!("/api/v1/nodes/{}/revoke", c.node_id), &json!({}))
        .await;
    assert_eq!(status, 200, "{reply}");
    let refused = join(&server, "lab", json!({"node": c.node_id})).await;
    assert_refused(&refused, 409, "node_revoked", &c.node_id);
    // The revoked member can still be taken out, freeing its address.
    let (status, reply) = leave(&server, "lab", &b).await;
    assert_eq!(status, 200, "{reply}");
    server.stop().await;
}

/// The binary's `network` and `networks` commands on the data directory of a running
/// controller: what they change reaches the nodes' heartbeat replies; refusals exit 1 with
/// the reason, usage errors 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_manages_networks_on_the_data_directory() {
    let server = TestServer::start(LIFETIME).await;
    let data = server.data();
    let data = data.to_str().unwrap();
    let a = server.enroll_new("uuid-cli-a").await;
    let b = server.enroll_new("uuid-cli-b").await;

    let out = run_ok(&[
        "network",
        "create",
        "lab",
        "--cidr",
        "10.77.0.0/24",
        "--data",
        data,
    ])
    .await;
    assert_eq!(out, "network lab 10.77.0.0/24 port 51820\n");
    let listed: Vec<Value> = parse(&run_ok(&["networks", "--json", "--data", data]).await);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["name"], "lab");
    let table = run_ok(&["networks", "--data", data]).await;
    assert!(
        table.starts_with("NAME") && table.contains("10.77.0.0/24"),
        "{table}"
    );

    let out = run_ok(&[
        "network",
        "join",
        "lab",
        "--node",
        &a.node_id,
        "--announce",
        "192.168.5.0/24",
        "--data",
        data,
    ])
    .await;
    assert!(
        out.starts_with(&format!("{} is in lab as 10.77.0.1\n", a.node_id)),
        "{out}"
    );
    let joined: Value = parse(
        &run_ok(&[
            "network",
            "join",
            "lab",
            "--node",
            &b.node_id,
            "--endpoint",
            "gw.example:51820",
            "--json",
            "--data",
            data,
        ])
        .await,
    );
    assert_eq!(joined["address"], "10.77.0.2");
    assert_eq!(joined["endpoint"], "gw.example:51820");

    // The nodes see it: b's key reaches a; a's route reaches b.
    heartbeat(&server, &a, net_status(Some(&key('a')), &[], json!([]))).await;
    heartbeat(&server, &b, net_status(Some(&key('b')), &[], json!([]))).await;
    let a_net = network_of(&server, &a).await;
    assert_eq!(a_net.address, "10.77.0.1/24");
    assert_eq!(
        peer(&a_net, &key('b')).endpoint.as_deref(),
        Some("gw.example:51820")
    );
    let b_net = network_of(&server, &b).await;
    assert_eq!(
        peer(&b_net, &key('a')).allowed_ips,
        ["10.77.0.1/32", "192.168.5.0/24"]
    );

    let out = run_ok(&[
        "network",
        "forward",
        "add",
        "--node",
        &a.node_id,
        "--proto",
        "tcp",
        "--port",
        "2222",
        "--to",
        "10.77.0.2:22",
        "--data",
        data,
    ])
    .await;
    assert!(
        out.starts_with(&format!("{} tcp 2222 -> 10.77.0.2:22\n", a.node_id)),
        "{out}"
    );
    let forwards: Vec<Value> = parse(
        &run_ok(&[
            "network", "forward", "list", "--node", &a.node_id, "--json", "--data", data,
        ])
        .await,
    );
    assert_eq!(forwards.len(), 1);
    assert_eq!(forwards[0]["to"], "10.77.0.2:22");
    assert_eq!(network_of(&server, &a).await.forwards.len(), 1);

    let shown: Value = parse(&run_ok(&["network", "show", "lab", "--json", "--data", data]).await);
    assert_eq!(shown["members"][0]["public_key"], key('a').as_str());
    assert_eq!(shown["members"][0]["forwards"][0]["port"], 2222);
    let text = run_ok(&["network", "show", "lab", "--data", data]).await;
    let key_b = key('b');
    for word in [
        a.node_id.as_str(),
        b.node_id.as_str(),
        "10.77.0.1",
        "192.168.5.0/24",
        "gw.example:51820",
        "set by the operator",
        "tcp 2222 -> 10.77.0.2:22",
        key_b.as_str(),
    ] {
        assert!(text.contains(word), "{word} not in:\n{text}");
    }

    // Refusals exit 1 with the reason; usage errors 2.
    let (exit, _, stderr) = run(&[
        "network", "join", "nope", "--node", &a.node_id, "--data", data,
    ])
    .await;
    assert_eq!(exit, 1);
    assert!(stderr.contains("no network nope"), "{stderr}");
    let (exit, _, stderr) = run(&[
        "network",
        "create",
        "bad",
        "--cidr",
        "10.0.0.0/31",
        "--data",
        data,
    ])
    .await;
    assert_eq!(exit, 1);
    assert!(stderr.contains("8 to 30"), "{stderr}");
    let (exit, _, stderr) = run(&["network", "delete", "lab", "--data", data]).await;
    assert_eq!(exit, 1);
    assert!(stderr.contains("2 member(s)"), "{stderr}");
    let (exit, _, _) = run(&["network", "create", "x", "--data", data]).await;
    assert_eq!(exit, 2, "--cidr is required");

    let out = run_ok(&[
        "network", "forward", "remove", "--node", &a.node_id, "--proto", "tcp", "--port", "2222",
        "--data", data,
    ])
    .await;
    assert!(out.starts_with("removed "), "{out}");
    assert!(network_of(&server, &a).await.forwards.is_empty());
    let out = run_ok(&[
        "network", "leave", "lab", "--node", &b.node_id, "--data", data,
    ])
    .await;
    assert!(
        out.starts_with(&format!("{} left lab (10.77.0.2 is free", b.node_id)),
        "{out}"
    );
    assert_eq!(desired(&server, &b).await.0, None);
    assert!(network_of(&server, &a).await.peers.is_empty());
    run_ok(&[
        "network", "leave", "lab", "--node", &a.node_id, "--data", data,
    ])
    .await;
    assert_eq!(
        run_ok(&["network", "delete", "lab", "--data", data]).await,
        "deleted lab\n"
    );
    let listed: Vec<Value> = parse(&run_ok(&["networks", "--json", "--data", data]).await);
    assert!(listed.is_empty());
    server.stop().await;
}
