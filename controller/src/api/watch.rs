//! `GET /node_api/v1/watch?generation=G[&timeout_s=S]`: the long-poll a node holds so that a
//! new desired state or a queued task reaches it at once instead of at its next heartbeat.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::extract::AuthedNode;
use super::AppState;
use crate::errors::ApiError;
use crate::storage::WatchState;
use crate::wire::{task_limits, WatchResponse};

/// The query of a watch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    /// The desired-state generation the node has.
    pub generation: u64,
    /// How long to hold the request, seconds (default
    /// [`task_limits::DEFAULT_WATCH_S`], at most [`task_limits::MAX_WATCH_S`]).
    pub timeout_s: Option<u32>,
}

/// Answers when the node's generation is past `generation` or a task is queued for it
/// (`changed`), or when the time is up or the controller shuts down (`changed` false).
pub async fn watch(
    State(state): State<AppState>,
    authed: AuthedNode,
    params: Result<Query<WatchParams>, QueryRejection>,
) -> Result<Json<WatchResponse>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let timeout_s = params.timeout_s.unwrap_or(task_limits::DEFAULT_WATCH_S);
    if !(1..=task_limits::MAX_WATCH_S).contains(&timeout_s) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("timeout_s must be 1 to {}", task_limits::MAX_WATCH_S),
        ));
    }
    let node = &authed.node.id;
    // Watched before it is read: a change committed between the two is then either in the
    // read or seen by the scanner, which only looks at watched nodes.
    let mut rx = state.watches().subscribe(node, WatchState::default());
    let current = state.storage().watch_state(node).await?;
    state.watches().offer(node, current);
    let news = |s: &WatchState| s.generation > params.generation || s.tasks_queued > 0;
    let answer = |s: WatchState| {
        Json(WatchResponse {
            generation: s.generation,
            tasks_queued: s.tasks_queued,
            changed: news(&s),
        })
    };
    if news(&current) {
        return Ok(answer(current));
    }
    let deadline = tokio::time::sleep(std::time::Duration::from_secs(timeout_s.into()));
    tokio::pin!(deadline);
    loop {
        let seen = *rx.borrow_and_update();
        if news(&seen) {
            return Ok(answer(seen));
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break },
            () = &mut deadline => break,
            () = state.closing().cancelled() => break,
        }
    }
    let last = *rx.borrow();
    Ok(answer(last))
}
