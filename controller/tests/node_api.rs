//! The node and operator APIs against a real controller: real TLS, real certificates from the
//! controller's CA, a real SQLite file.

mod common;

use std::time::Duration;

use common::{
    client, code, csr_pem, enroll_body, heartbeat_body, post_json, status_json, TestServer,
};
use powernode_controller::ca::{inspect, CertAuthority};
use rcgen::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use x509_parser::prelude::{FromDer, X509Certificate};

const LIFETIME: Duration = Duration::from_secs(3600);

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn enroll_gives_a_cert_from_the_ca_and_tokens_are_single_use() {
    let server = TestServer::start(LIFETIME).await;
    let token = server.token(json!({"ttl_s": 600})).await;
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let body = enroll_body(&token, &csr_pem(&key), "uuid-1");
    let (status, reply) = post_json(
        &server.anonymous(),
        server.url("/node_api/v1/enroll"),
        &body,
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let node_id = reply["node_id"].as_str().unwrap();
    assert_eq!(reply["ca_chain_pem"].as_str().unwrap(), server.ca_pem);
    let cert_der = der(reply["cert_pem"].as_str().unwrap());
    let ca_der = der(&server.ca_pem);
    let (_, cert) = X509Certificate::from_der(&cert_der).unwrap();
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();
    let info = inspect(&cert_der).unwrap();
    assert_eq!(info.common_name.as_deref(), Some(node_id));
    assert_eq!(reply["not_after_ms"].as_i64().unwrap(), info.not_after_ms);
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );

    // The same token again: refused, with its own code.
    let (status, reply) = post_json(
        &server.anonymous(),
        server.url("/node_api/v1/enroll"),
        &body,
    )
    .await;
    assert_eq!((status, code(&reply)), (401, "token_used"));

    // A wrong token.
    let wrong = enroll_body("not-a-token", &csr_pem(&key), "uuid-1");
    let (status, reply) = post_json(
        &server.anonymous(),
        server.url("/node_api/v1/enroll"),
        &wrong,
    )
    .await;
    assert_eq!((status, code(&reply)), (401, "invalid_token"));

    // Re-enrolling the same uuid with a new token finds the same node.
    let again = server.token(json!({})).await;
    let (status, reply) = post_json(
        &server.anonymous(),
        server.url("/node_api/v1/enroll"),
        &enroll_body(&again, &csr_pem(&key), "uuid-1"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply["node_id"].as_str().unwrap(), node_id);
    server.stop().await;
}

#[tokio::test]
async fn expired_bound_and_malformed_enrollments_are_refused() {
    let server = TestServer::start(LIFETIME).await;
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let enroll = |body: Value| {
        let request = server
            .anonymous()
            .post(server.url("/node_api/v1/enroll"))
            .json(&body);
        async move { status_json(request.send().await.unwrap()).await }
    };

    let short = server.token(json!({"ttl_s": 1})).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, reply) = enroll(enroll_body(&short, &csr_pem(&key), "uuid-2")).await;
    assert_eq!((status, code(&reply)), (401, "token_expired"));

    let bound = server.token(json!({"node_uuid": "uuid-bound"})).await;
    let (status, reply) = enroll(enroll_body(&bound, &csr_pem(&key), "uuid-other")).await;
    assert_eq!((status, code(&reply)), (401, "token_node_mismatch"));

    // A malformed CSR is a 400 and does not burn the token.
    let (status, reply) = enroll(enroll_body(&bound, "garbage", "uuid-bound")).await;
    assert_eq!((status, code(&reply)), (400, "invalid_csr"));
    let (status, reply) = enroll(enroll_body(&bound, &csr_pem(&key), "uuid-bound")).await;
    assert_eq!(status, 200, "{reply}");

    // Missing fields and wrong types.
    let (status, reply) = enroll(json!({"bootstrap_token": 5})).await;
    assert_eq!((status, code(&reply)), (400, "invalid_request"));
    server.stop().await;
}

#[tokio::test]
async fn heartbeat_needs_a_client_cert_from_this_ca() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-hb").await;

    let (status, reply) = post_json(
        &server.as_node(&node),
        server.url("/node_api/v1/status/heartbeat"),
        &heartbeat_body(0),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["next_interval_s"], 15);
    assert!(reply["server_time_ms"].as_i64().unwrap() > 0);
    assert_eq!(
        reply["desired"],
        json!({"generation": 0, "modules": [], "network": null})
    );

    // No client certificate.
    let (status, reply) = post_json(
        &server.anonymous(),
        server.url("/node_api/v1/status/heartbeat"),
        &heartbeat_body(0),
    )
    .await;
    assert_eq!((status, code(&reply)), (401, "client_certificate_required"));

    // A certificate from another CA, for the same node id: the handshake fails.
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = CertAuthority::load_or_create(other_dir.path()).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let csr = CertAuthority::parse_csr(&csr_pem(&key)).unwrap();
    let forged = other_ca.sign_node(&csr, &node.node_id, LIFETIME).unwrap();
    let result = client(
        &server.ca_pem,
        Some((&forged.cert_pem, &key.serialize_pem())),
    )
    .post(server.url("/node_api/v1/status/heartbeat"))
    .json(&heartbeat_body(0))
    .send()
    .await;
    assert!(
        result.is_err(),
        "a foreign certificate must not get an answer"
    );

    // Still fine with the real one.
    let reply = server
        .as_node(&node)
        .post(server.url("/node_api/v1/status/heartbeat"))
        .json(&heartbeat_body(0))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-bad").await;
    let http = server.as_node(&node);
    let hb = server.url("/node_api/v1/status/heartbeat");

    let send = |request: common::http::RequestBuilder| async move {
        status_json(request.send().await.unwrap()).await
    };
    let json_post = |body: Vec<u8>| {
        http.post(&hb)
            .header("content-type", "application/json")
            .body(body)
    };

    let (status, reply) = send(json_post(b"{\"boot_id\": ".to_vec())).await;
    assert_eq!((status, code(&reply)), (400, "malformed_json"));

    let (status, reply) = send(json_post(
        br#"{"boot_id": 7, "agent_version": "x"}"#.to_vec(),
    ))
    .await;
    assert_eq!((status, code(&reply)), (400, "invalid_request"));

    let mut huge = b"{\"pad\": \"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 200 * 1024));
    huge.extend(b"\"}");
    let (status, reply) = send(json_post(huge)).await;
    assert_eq!((status, code(&reply)), (413, "body_too_large"));

    let (status, reply) = send(
        http.post(&hb)
            .header("content-type", "text/plain")
            .body("hello"),
    )
    .await;
    assert_eq!((status, code(&reply)), (415, "unsupported_media_type"));

    let (status, reply) = send(http.get(&hb)).await;
    assert_eq!((status, code(&reply)), (405, "method_not_allowed"));

    let (status, reply) = send(http.get(server.url("/node_api/v1/nope"))).await;
    assert_eq!((status, code(&reply)), (404, "not_found"));

    // Operator API without or with a wrong bearer token.
    let (status, reply) = send(server.anonymous().get(server.url("/api/v1/nodes"))).await;
    assert_eq!((status, code(&reply)), (401, "unauthorized"));
    let (status, _) = send(
        server
            .anonymous()
            .get(server.url("/api/v1/nodes"))
            .bearer_auth("wrong"),
    )
    .await;
    assert_eq!(status, 401);
    server.stop().await;
}

#[tokio::test]
async fn revoked_node_is_refused() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-rev").await;
    let reply = server
        .anonymous()
        .post(server.url(&format!("/api/v1/nodes/{}/revoke", node.node_id)))
        .bearer_auth(&server.operator_token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);

    let (status, reply) = post_json(
        &server.as_node(&node),
        server.url("/node_api/v1/status/heartbeat"),
        &heartbeat_body(0),
    )
    .await;
    assert_eq!((status, code(&reply)), (403, "revoked"));

    // Nor can it come back with a new token.
    let token = server.token(json!({})).await;
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (status, reply) = post_json(
        &server.anonymous(),
        server.url("/node_api/v1/enroll"),
        &enroll_body(&token, &csr_pem(&key), "uuid-rev"),
    )
    .await;
    assert_eq!((status, code(&reply)), (403, "revoked"));
    server.stop().await;
}

#[tokio::test]
async fn rotate_issues_a_new_cert_and_keeps_the_old_one_valid() {
    let server = TestServer::start(LIFETIME).await;
    let old = server.enroll_new("uuid-rot").await;
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (status, reply) = post_json(
        &server.as_node(&old),
        server.url("/node_api/v1/certificates/rotate"),
        &json!({"csr_pem": csr_pem(&key)}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let new = common::NodeCreds {
        node_id: old.node_id.clone(),
        cert_pem: reply["cert_pem"].as_str().unwrap().to_owned(),
        key_pem: key.serialize_pem(),
    };
    let old_info = inspect(&der(&old.cert_pem)).unwrap();
    let new_info = inspect(&der(&new.cert_pem)).unwrap();
    assert_ne!(old_info.serial, new_info.serial);
    assert_ne!(old_info.fingerprint, new_info.fingerprint);
    assert_eq!(new_info.common_name.as_deref(), Some(old.node_id.as_str()));

    // Rotation without a client certificate is refused.
    let (status, _) = post_json(
        &server.anonymous(),
        server.url("/node_api/v1/certificates/rotate"),
        &json!({"csr_pem": csr_pem(&key)}),
    )
    .await;
    assert_eq!(status, 401);

    for creds in [&old, &new] {
        let reply = server
            .as_node(creds)
            .post(server.url("/node_api/v1/status/heartbeat"))
            .json(&heartbeat_body(0))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
    }
    server.stop().await;
}

#[tokio::test]
async fn expired_client_cert_fails_the_handshake() {
    // X.509 times have whole seconds: 4 s leaves at least 3 s for the first heartbeat.
    let server = TestServer::start(Duration::from_secs(4)).await;
    let node = server.enroll_new("uuid-exp").await;
    let not_after_ms = inspect(&der(&node.cert_pem)).unwrap().not_after_ms;
    let reply = server
        .as_node(&node)
        .post(server.url("/node_api/v1/status/heartbeat"))
        .json(&heartbeat_body(0))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let now_ms = powernode_controller::now_ms();
    let wait_ms = u64::try_from(not_after_ms + 1100 - now_ms).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let result = server
        .as_node(&node)
        .post(server.url("/node_api/v1/status/heartbeat"))
        .json(&heartbeat_body(0))
        .send()
        .await;
    assert!(
        result.is_err(),
        "an expired certificate must not get an answer"
    );
    server.stop().await;
}

#[tokio::test]
async fn desired_state_changes_reach_the_next_heartbeat() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-des").await;
    let operator = server.anonymous();
    let modules = json!({"modules": [
        {"name": "tools", "reference": "registry.local/modules/tools:1", "priority": 10}
    ]});
    let (status, reply) = status_json(
        operator
            .put(server.url(&format!("/api/v1/nodes/{}/desired/modules", node.node_id)))
            .bearer_auth(&server.operator_token)
            .json(&modules)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, reply["generation"].as_u64()), (200, Some(1)));

    let network = json!({"network": {
        "interface": "pn0", "address": "10.88.0.7/16", "listen_port": 51820,
        "peers": [{"public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "endpoint": null, "allowed_ips": ["10.88.0.0/16"], "keepalive_s": 25}],
        "network": "lab", "forwards": [{"proto": "tcp", "port": 8080, "to": "10.88.0.2:80"}]
    }});
    let (status, reply) = status_json(
        operator
            .put(server.url(&format!("/api/v1/nodes/{}/desired/network", node.node_id)))
            .bearer_auth(&server.operator_token)
            .json(&network)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, reply["generation"].as_u64()), (200, Some(2)));

    // A network a node would refuse (a key that is not one) is refused here, nothing stored.
    let mut bad_key = network.clone();
    bad_key["network"]["peers"][0]["public_key"] = json!("AAAA");
    let (status, reply) = status_json(
        operator
            .put(server.url(&format!("/api/v1/nodes/{}/desired/network", node.node_id)))
            .bearer_auth(&server.operator_token)
            .json(&bad_key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code(&reply)), (400, "invalid_request"), "{reply}");

    // Unknown node and duplicate module names.
    let (status, reply) = status_json(
        operator
            .put(server.url("/api/v1/nodes/node-missing/desired/modules"))
            .bearer_auth(&server.operator_token)
            .json(&modules)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, code(&reply)), (404, "not_found"));
    let twice = json!({"modules": [
        {"name": "a", "reference": "r:1"}, {"name": "a", "reference": "r:2"}
    ]});
    let (status, _) = status_json(
        operator
            .put(server.url(&format!("/api/v1/nodes/{}/desired/modules", node.node_id)))
            .bearer_auth(&server.operator_token)
            .json(&twice)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);

    let (status, reply) = post_json(
        &server.as_node(&node),
        server.url("/node_api/v1/status/heartbeat"),
        &heartbeat_body(0),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply["desired"]["generation"], 2);
    assert_eq!(reply["desired"]["modules"], modules["modules"]);
    assert_eq!(reply["desired"]["network"], network["network"]);

    // The operator sees the node, its heartbeat and its desired state.
    let (status, reply) = status_json(
        operator
            .get(server.url(&format!("/api/v1/nodes/{}", node.node_id)))
            .bearer_auth(&server.operator_token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply["id"], node.node_id.as_str());
    assert_eq!(reply["desired"]["generation"], 2);
    assert_eq!(reply["last_heartbeat"]["body"]["uptime_s"], 42);
    assert_eq!(reply["certificates"].as_array().unwrap().len(), 1);
    let (status, reply) = status_json(
        operator
            .get(server.url("/api/v1/nodes"))
            .bearer_auth(&server.operator_token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(reply.as_array().unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn heartbeat_history_is_bounded() {
    let server = TestServer::start(LIFETIME).await;
    let node = server.enroll_new("uuid-hist").await;
    let http = server.as_node(&node);
    for _ in 0..(powernode_controller::storage::HEARTBEAT_HISTORY + 5) {
        let reply = http
            .post(server.url("/node_api/v1/status/heartbeat"))
            .json(&heartbeat_body(0))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
    }
    let storage = server.storage().await;
    assert_eq!(
        storage.heartbeat_count(&node.node_id).await.unwrap(),
        powernode_controller::storage::HEARTBEAT_HISTORY
    );
    storage.close().await;
    server.stop().await;
}
