//! What `GET /node_api/v1/watch` waits on: each watched node's desired-state generation and
//! queued tasks, kept current by one scanner for the whole controller.
//!
//! A held watch is a future parked on a [`tokio::sync::watch`] receiver: no thread, a few
//! hundred bytes. The scanner notices a change however it was made — by this process's
//! operator API (which also pokes it, so there is no wait), by another replica, or by a lease
//! expiring — through the database's own account of which nodes' watch states changed
//! ([`crate::storage::ChangeProbe`]: SQLite's change log, PostgreSQL's notifications), looked
//! at every [`SCAN_INTERVAL`]; then it reads the state of those nodes that are watched, and
//! wakes the watchers of those whose state changed. A heartbeat changes no watch state and
//! costs the scanner nothing. Expired leases are swept every [`SWEEP_INTERVAL`], which returns
//! their tasks to the queue and so wakes their node's watch too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::storage::{Changes, Storage, WatchState};

/// How often the scanner asks the database what changed.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(100);
/// How often expired task leases are swept back to the queue (or failed).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Changed nodes read one by one up to this many; past it, one query reads them all.
const READ_ONE_BY_ONE: usize = 64;

/// The watched nodes' states; shared by the watch handlers and the scanner.
#[derive(Debug, Default)]
pub struct WatchHub {
    nodes: Mutex<HashMap<String, watch::Sender<WatchState>>>,
    poke: Notify,
}

impl WatchHub {
    /// A receiver of `node`'s state; `current` (just read from the database) seeds it when
    /// the node is not watched yet, or when it is newer than what the hub holds.
    pub fn subscribe(&self, node: &str, current: WatchState) -> watch::Receiver<WatchState> {
        let mut nodes = self.lock();
        let sender = nodes
            .entry(node.to_owned())
            .or_insert_with(|| watch::Sender::new(current));
        sender.send_if_modified(|held| newer(held, current));
        sender.subscribe()
    }

    /// Hands `node`'s watchers `current` (just read from the database) if it is newer than
    /// what the hub holds.
    pub fn offer(&self, node: &str, current: WatchState) {
        if let Some(sender) = self.lock().get(node) {
            sender.send_if_modified(|held| newer(held, current));
        }
    }

    /// Asks the scanner to look now: this process just changed something a node may watch.
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Nodes watched now (for tests and the log).
    pub fn watched(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<WatchState>>> {
        // Every update under the lock is one insert, send or retain: a panic cannot leave it
        // half done.
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands each watched node its state from `states`, waking its watchers if it changed,
    /// and forgets nodes nobody watches any more.
    fn update(&self, states: &HashMap<String, WatchState>) {
        let mut nodes = self.lock();
        nodes.retain(|_, sender| sender.receiver_count() > 0);
        for (node, sender) in nodes.iter() {
            let now = states.get(node).copied().unwrap_or_default();
            sender.send_if_modified(|held| {
                let changed = *held != now;
                *held = now;
                changed
            });
        }
    }

    /// Keeps the watched states current until `closing` is cancelled (see the module doc).
    /// A failing database is logged and tried again at the next interval.
    pub async fn run_scanner(self: Arc<Self>, storage: Storage, closing: CancellationToken) {
        let mut probe = None;
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                () = closing.cancelled() => return,
                () = self.poke.notified() => {}
                () = tokio::time::sleep(SCAN_INTERVAL) => {}
            }
            if last_sweep.elapsed() >= SWEEP_INTERVAL {
                last_sweep = Instant::now();
                if let Err(err) = storage.expire_leases(crate::now_ms()).await {
                    tracing::warn!(error = %err, "sweeping expired task leases failed");
                }
            }
            if probe.is_none() {
                match storage.change_probe().await {
                    Ok(p) => probe = Some(p),
                    Err(err) => {
                        tracing::warn!(error = %err, "watch scanner cannot open its connection");
                        continue;
                    }
                }
            }
            let Some(p) = probe.as_mut() else { continue };
            let changes = match p.changed().await {
                Ok(changes) => changes,
                Err(err) => {
                    tracing::warn!(error = %err, "watch scanner lost its connection");
                    probe = None;
                    continue;
                }
            };
            if let Err(err) = self.refresh(&storage, changes).await {
                tracing::warn!(error = %err, "reading the watched states failed");
                // Read everything again with a new probe: what the failed read was to tell
                // must not be lost.
                probe = None;
            }
        }
    }

    /// Reads the state of the watched nodes among `changes` and hands it to their watchers.
    async fn refresh(
        &self,
        storage: &Storage,
        changes: Changes,
    ) -> Result<(), crate::storage::StorageError> {
        let nodes = match changes {
            Changes::None => return Ok(()),
            Changes::All => None,
            Changes::Nodes(nodes) => Some(self.watched_among(nodes)),
        };
        match nodes {
            Some(nodes) if nodes.is_empty() => {}
            Some(nodes) if nodes.len() <= READ_ONE_BY_ONE => {
                for node in nodes {
                    let state = storage.watch_state(&node).await?;
                    self.set(&node, state);
                }
            }
            _ if self.watched() == 0 => {}
            _ => self.update(&storage.watch_states().await?),
        }
        Ok(())
    }

    /// Those of `nodes` that are watched now.
    fn watched_among(&self, nodes: std::collections::HashSet<String>) -> Vec<String> {
        let held = self.lock();
        nodes
            .into_iter()
            .filter(|node| held.get(node).is_some_and(|s| s.receiver_count() > 0))
            .collect()
    }

    /// Hands `node`'s watchers `state` (just read), waking them if it changed.
    fn set(&self, node: &str, state: WatchState) {
        if let Some(sender) = self.lock().get(node) {
            sender.send_if_modified(|held| {
                let changed = *held != state;
                *held = state;
                changed
            });
        }
    }
}

/// Whether `current` is ahead of `held` (replacing it if so): a fresh read never moves a
/// watch back to a state it has already seen pass.
fn newer(held: &mut WatchState, current: WatchState) -> bool {
    if current.generation > held.generation
        || (current.generation == held.generation && current.tasks_queued != held.tasks_queued)
    {
        *held = current;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(generation: u64, tasks_queued: u64) -> WatchState {
        WatchState {
            generation,
            tasks_queued,
        }
    }

    #[test]
    fn a_subscriber_sees_a_newer_read_and_never_an_older_one() {
        let hub = WatchHub::default();
        let first = hub.subscribe("n", state(3, 0));
        assert_eq!(*first.borrow(), state(3, 0));
        let second = hub.subscribe("n", state(2, 0));
        assert_eq!(*second.borrow(), state(3, 0), "an older read moved it back");
        let third = hub.subscribe("n", state(4, 1));
        assert_eq!(*third.borrow(), state(4, 1));
        assert!(first.has_changed().unwrap());
    }

    #[test]
    fn an_update_wakes_only_changed_nodes_and_forgets_unwatched_ones() {
        let hub = WatchHub::default();
        let a = hub.subscribe("a", state(1, 0));
        let b = hub.subscribe("b", state(1, 0));
        drop(hub.subscribe("gone", state(1, 0)));
        let states = HashMap::from([("a".to_owned(), state(2, 0)), ("b".to_owned(), state(1, 0))]);
        hub.update(&states);
        assert!(a.has_changed().unwrap());
        assert!(!b.has_changed().unwrap());
        assert_eq!(hub.watched(), 2);
    }
}
