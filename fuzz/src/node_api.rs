//! The node API's JSON bodies, both ways: the requests the controller extracts from a node or
//! an operator, and the replies a node's transport decodes.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use powernode_controller::api::extract::JsonBody;
use powernode_controller::ca::CertAuthority;
use powernode_controller::wire::{
    CreateTokenRequest, EnrollRequest, EnrollResponse, HeartbeatRequest, HeartbeatResponse,
    RotateRequest, RotateResponse, SetModulesRequest, SetNetworkRequest,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The bodies [`body`] picks from with its first byte, in that order.
pub const BODIES: &[&str] = &[
    "EnrollRequest",
    "RotateRequest",
    "HeartbeatRequest",
    "CreateTokenRequest",
    "SetModulesRequest",
    "SetNetworkRequest",
    "EnrollResponse",
    "RotateResponse",
    "HeartbeatResponse",
];

/// The first byte picks a body type ([`BODIES`], modulo their number), the rest is the JSON.
/// Requests go through the controller's own extractor ([`JsonBody`]: size, syntax, shape) and,
/// for enroll and rotate, its CSR parser; replies through `serde_json::from_slice`, as the
/// node's transport decodes them.
///
/// Properties: a refused request is the client's fault (4xx), never an internal error; the
/// extractor never waits on a body already in memory; whatever decodes serialises to JSON
/// that decodes to the same JSON again.
pub fn body(data: &[u8]) {
    let Some((&pick, json)) = data.split_first() else {
        return;
    };
    match usize::from(pick) % BODIES.len() {
        0 => {
            if let Some(request) = request::<EnrollRequest>(json) {
                let _ = CertAuthority::parse_csr(&request.csr_pem);
            }
        }
        1 => {
            if let Some(request) = request::<RotateRequest>(json) {
                let _ = CertAuthority::parse_csr(&request.csr_pem);
            }
        }
        2 => drop(request::<HeartbeatRequest>(json)),
        3 => drop(request::<CreateTokenRequest>(json)),
        4 => drop(request::<SetModulesRequest>(json)),
        5 => drop(request::<SetNetworkRequest>(json)),
        6 => reply::<EnrollResponse>(json),
        7 => reply::<RotateResponse>(json),
        _ => reply::<HeartbeatResponse>(json),
    }
}

/// Extracts `body` as the controller's handlers do.
fn request<T: DeserializeOwned + Serialize + Send + 'static>(body: &[u8]) -> Option<T> {
    let request = Request::builder()
        .method("POST")
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_vec()))
        .expect("a request with a valid header builds");
    match ready(JsonBody::<T>::from_request(request, &())) {
        Ok(body) => {
            round_trip(&body.value);
            Some(body.value)
        }
        Err(e) => {
            assert!(
                e.status().is_client_error(),
                "{} for a bad body",
                e.status()
            );
            None
        }
    }
}

/// Decodes `json` as the transport decodes a reply.
fn reply<T: DeserializeOwned + Serialize>(json: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<T>(json) {
        round_trip(&value);
    }
}

/// `value` as JSON decodes to a value with the same JSON.
fn round_trip<T: DeserializeOwned + Serialize>(value: &T) {
    let json = serde_json::to_value(value).expect("a decoded body serialises");
    let again: T = serde_json::from_value(json.clone()).expect("its JSON decodes again");
    assert_eq!(
        serde_json::to_value(&again).expect("serialises"),
        json,
        "JSON round trip"
    );
}

/// Runs a future that must not wait: the body is in memory, so extraction finishes in one poll.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("extracting an in-memory body waited"),
    }
}
