//! The OpenAPI document: generated from the handlers and wire types, it lists every route the
//! router serves (each documented route reaches its handler rather than the router's
//! "no such route"), it is what `GET /api/v1/openapi.json` and `powernode-controller openapi`
//! answer, every reference in it resolves, the bodies are the wire types', and docs/api.md
//! has every route.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{code, status_json, TestServer};
use hyper::Method;
use serde_json::Value;

/// Every (method, path) the document lists.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
            if item.get(method).is_some() {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

/// `path` with each `{param}` filled in.
fn concrete(path: &str) -> String {
    path.replace("{id}", "node-x")
        .replace("{digest}", "sha256:00")
        .replace("{name}", "lab")
        .replace("{node}", "node-x")
        .replace("{proto}", "tcp")
        .replace("{port}", "80")
}

/// Every `$ref` in `value`.
fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

/// The schema an operation's request body or a response refers to, by name.
fn schema_name(content: &Value) -> Option<&str> {
    let schema = &content["content"]["application/json"]["schema"];
    schema["$ref"]
        .as_str()
        .or_else(|| schema["items"]["$ref"].as_str())
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_the_router_serves() {
    let doc = serde_json::to_value(powernode_controller::api::openapi()).unwrap();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let ops = operations(&doc);
    assert!(ops.len() >= 30, "{ops:?}");

    let server = TestServer::start(Duration::from_secs(3600)).await;
    let http = server.anonymous();

    // Served, and the same document the library and the binary make.
    let (status, served) = status_json(
        http.get(server.url("/api/v1/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(served, doc);
    let printed = common::run_ok(&["openapi"]).await;
    assert_eq!(common::parse::<Value>(&printed), doc);

    // Each documented route reaches a handler: whatever it answers an anonymous caller, it is
    // not the router's fallback for an unknown route or method.
    for (method, path) in &ops {
        let method: Method = method.parse().unwrap();
        let mut request = http.request(method.clone(), server.url(&concrete(path)));
        if method == Method::POST || method == Method::PUT {
            request = request.json(&serde_json::json!({}));
        }
        let (status, body) = status_json(request.send().await.unwrap()).await;
        let fallback = (status == 404 && body["error"]["message"] == "no such route")
            || (status == 405 && code(&body) == "method_not_allowed");
        assert!(
            !fallback,
            "{method} {path} is documented but not routed: {body}"
        );
        assert!(
            status < 500,
            "{method} {path}: {status} {body} (an anonymous call must be refused, not fail)"
        );
    }
    // And the fallback does answer what is neither: the check above can fail.
    let (status, body) = status_json(
        http.get(server.url("/api/v1/nowhere"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["message"].as_str()),
        (404, Some("no such route"))
    );
    server.stop().await;
}

#[test]
fn every_reference_resolves_and_the_bodies_are_the_wire_types() {
    let doc = serde_json::to_value(powernode_controller::api::openapi()).unwrap();
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{r} is not a component schema"));
        assert!(schemas.contains_key(name), "{r} does not resolve");
    }

    // Request and answer bodies, by route.
    let op = |method: &str, path: &str| -> &Value {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not documented");
        op
    };
    for (method, path, request, answer) in [
        (
            "post",
            "/node_api/v1/enroll",
            Some("EnrollRequest"),
            "EnrollResponse",
        ),
        (
            "post",
            "/node_api/v1/status/heartbeat",
            Some("HeartbeatRequest"),
            "HeartbeatResponse",
        ),
        (
            "post",
            "/node_api/v1/events",
            Some("EventsRequest"),
            "EventsResponse",
        ),
        ("get", "/node_api/v1/watch", None, "WatchResponse"),
        ("get", "/api/v1/nodes", None, "NodeSummary"),
        ("get", "/api/v1/nodes/{id}", None, "NodeDetail"),
        (
            "put",
            "/api/v1/nodes/{id}/desired/modules",
            Some("SetModulesRequest"),
            "GenerationResponse",
        ),
        (
            "put",
            "/api/v1/nodes/{id}/desired/network",
            Some("SetNetworkRequest"),
            "GenerationResponse",
        ),
        (
            "post",
            "/api/v1/tokens",
            Some("CreateTokenRequest"),
            "CreateTokenResponse",
        ),
        ("post", "/api/v1/tasks", Some("CreateTaskRequest"), "Task"),
        ("get", "/api/v1/events", None, "EventsPage"),
        (
            "post",
            "/api/v1/networks/{name}/join",
            Some("JoinNetworkRequest"),
            "JoinResponse",
        ),
        (
            "delete",
            "/api/v1/forwards/{node}/{proto}/{port}",
            None,
            "ForwardResponse",
        ),
    ] {
        let op = op(method, path);
        assert_eq!(
            schema_name(&op["requestBody"]),
            request,
            "{method} {path} request"
        );
        assert_eq!(
            schema_name(&op["responses"]["200"]),
            Some(answer),
            "{method} {path} answer"
        );
        // Every refusal is the one error body.
        for (status, response) in op["responses"].as_object().unwrap() {
            if !status.starts_with('2') {
                assert_eq!(
                    schema_name(response),
                    Some("ErrorBody"),
                    "{method} {path} {status}"
                );
            }
        }
    }

    // The wire types as they travel: required fields, nested types.
    let required = |name: &str| -> Vec<&str> {
        schemas[name]["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    assert!(required("SetModulesRequest").contains(&"modules"));
    assert!(required("DesiredModule").contains(&"name"));
    assert!(required("DesiredModule").contains(&"reference"));
    assert!(
        !required("DesiredModule").contains(&"priority"),
        "priority has a default"
    );
    assert!(required("ErrorBody").contains(&"error"));
    assert_eq!(
        required("ErrorDetail")
            .iter()
            .copied()
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["code", "message"])
    );

    // Who may call: the operator's token on /api/v1 (the document itself is public), the
    // node's certificate on the node API but enroll (which carries a bootstrap token).
    for (method, path) in operations(&doc) {
        let security = &doc["paths"][&path][method.to_lowercase()]["security"];
        let schemes: Vec<&str> = security
            .as_array()
            .map(|s| {
                s.iter()
                    .flat_map(|r| r.as_object().unwrap().keys().map(String::as_str))
                    .collect()
            })
            .unwrap_or_default();
        let want: &[&str] = match path.as_str() {
            "/api/v1/openapi.json" | "/node_api/v1/enroll" => &[],
            p if p.starts_with("/api/v1/") => &["operator_token"],
            _ => &["node_certificate"],
        };
        assert_eq!(schemes, want, "{method} {path}");
    }
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["operator_token"]["scheme"], "bearer");
    assert_eq!(schemes["node_certificate"]["type"], "mutualTLS");
}

#[test]
fn docs_api_md_has_every_route() {
    let doc = serde_json::to_value(powernode_controller::api::openapi()).unwrap();
    let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md");
    let text = std::fs::read_to_string(&page).unwrap();
    for (method, path) in operations(&doc) {
        let wanted = format!("`{method} {path}");
        assert!(
            text.contains(&wanted),
            "{} does not list {method} {path}",
            page.display()
        );
    }
}
