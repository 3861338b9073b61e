//! The watch: one long-poll (`GET /node_api/v1/watch`) held beside the periodic heartbeat, so
//! that a desired state the operator just set reaches the node within a second rather than at
//! its next heartbeat.
//!
//! The watcher is a task of its own. The main loop hands it a [`WatchTarget`] after every
//! successful heartbeat and every lease that got tasks (the client, the generation applied,
//! and an epoch that counts those) and takes it away while it does not heartbeat. The watcher
//! asks the controller to answer once the node's generation passes the one applied or a task
//! is queued; when the answer carries a newer generation it wakes the main loop to heartbeat
//! at once (which fetches and publishes the new desired state), when it says tasks are queued
//! it wakes the main loop to lease them. Then, and after anything else than a plain time-out
//! (an error, a controller too old to know the call), it waits for the epoch to move before
//! it watches again: the watch can never make the node call the controller in a loop — a
//! lease that got nothing (the node holds all it may) does not move the epoch, so the watch
//! waits for the next heartbeat.

use std::sync::Arc;
use std::time::Duration;

use powernode_transport::ControllerClient;
use powernode_types::node_api::{task_limits, WatchResponse};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// The node API call.
pub const WATCH_CALL: &str = "watch";
/// How long the controller is asked to hold a watch: under the idle timeouts of common
/// proxies.
pub const HOLD: Duration = Duration::from_secs(task_limits::DEFAULT_WATCH_S as u64);

/// What the watcher needs, as of the latest successful heartbeat.
#[derive(Clone, Debug)]
pub struct WatchTarget {
    /// The controller client the heartbeat used.
    pub client: Arc<ControllerClient>,
    /// The desired-state generation the node has applied.
    pub generation: u64,
    /// Successful heartbeats so far: a new value means a new heartbeat went through.
    pub epoch: u64,
}

/// What the watcher decides after an answer (or a failure).
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Watch again at once.
    Again,
    /// Wake the main loop to heartbeat, then wait for it.
    Heartbeat,
    /// Wake the main loop to lease the queued tasks, then wait for it.
    Lease,
    /// Wait for the next successful heartbeat.
    WaitForHeartbeat,
}

/// The decision for an answer to a watch asked with what `target` had, given the generation
/// the node has applied by now (`applied`, which a heartbeat meanwhile may have moved on).
pub fn decide(answer: &WatchResponse, applied: u64) -> Next {
    if answer.generation > applied {
        Next::Heartbeat
    } else if answer.changed && answer.tasks_queued > 0 {
        Next::Lease
    } else {
        Next::Again
    }
}

/// Runs the watcher until `shutdown`: see the module documentation. `grace` is added to the
/// hold for the whole call (connect, handshake, the held request, the reply).
pub async fn run(
    mut targets: watch::Receiver<Option<WatchTarget>>,
    news: Arc<Notify>,
    tasks_queued: Arc<Notify>,
    grace: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let target = tokio::select! {
            () = shutdown.cancelled() => return,
            target = targets.wait_for(Option::is_some) => match target {
                Ok(t) => t.clone(),
                Err(_) => return, // the main loop is gone
            },
        };
        let Some(target) = target else { continue };
        let call = format!(
            "{WATCH_CALL}?generation={}&timeout_s={}",
            target.generation,
            HOLD.as_secs()
        );
        let answer = tokio::select! {
            () = shutdown.cancelled() => return,
            answer = target.client.get::<WatchResponse>(&call, HOLD + grace) => answer,
        };
        let applied = targets
            .borrow()
            .as_ref()
            .map_or(target.generation, |t| t.generation);
        let next = match &answer {
            Ok(answer) => decide(answer, applied),
            Err(error) => {
                tracing::debug!(%error, "watch failed; watching again after the next heartbeat");
                Next::WaitForHeartbeat
            }
        };
        match next {
            Next::Again => continue,
            Next::Heartbeat => {
                if let Ok(answer) = &answer {
                    tracing::info!(
                        generation = answer.generation,
                        applied,
                        "the controller has a new desired state; heartbeating now"
                    );
                }
                news.notify_one();
            }
            Next::Lease => tasks_queued.notify_one(),
            Next::WaitForHeartbeat => {}
        }
        let epoch = target.epoch;
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = targets.wait_for(|t| t.as_ref().is_some_and(|t| t.epoch != epoch)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(generation: u64, tasks_queued: u64, changed: bool) -> WatchResponse {
        WatchResponse {
            generation,
            tasks_queued,
            changed,
        }
    }

    #[test]
    fn only_a_newer_generation_makes_a_heartbeat() {
        let table = [
            // (answer, applied by now, next)
            (answer(5, 0, true), 4, Next::Heartbeat),
            (answer(5, 0, true), 5, Next::Again), // a heartbeat meanwhile applied it
            (answer(4, 0, false), 4, Next::Again), // timed out
            (answer(4, 2, true), 4, Next::Lease),
            (answer(6, 2, true), 4, Next::Heartbeat),
        ];
        for (answer, applied, next) in table {
            assert_eq!(
                decide(&answer, applied),
                next,
                "{answer:?} applied {applied}"
            );
        }
    }
}
