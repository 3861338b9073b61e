//! The agent's own health, published as `<agent>/AgentStatus` for `powernode-agent status`.
//!
//! The state moves Starting → Running (at [`crate::Context::ready`]) → Stopping (at shutdown),
//! and to Degraded while any reported error is outstanding. `last_loop_ms` follows the main
//! loop's liveness beats, so a wedged loop shows as a stale timestamp.
//!
//! Errors come from several sources at once: the agent's own logic ([`Health::report_error`]),
//! and each of its publications (a checkpoint write that keeps failing, files moved aside).
//! Each source sets and clears only its own error, so an error clears when its cause does and
//! never because another cause went away. `last_error` shows the latest outstanding one.

use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use powernode_pubsub::{Dirs, Publication, PublicationHealth};
use powernode_types::{AgentState, AgentStatus, Topic};
use tokio::sync::watch;

/// The error source of [`Health::report_error`]: the agent's own logic.
const AGENT_SOURCE: &str = "agent";

/// The publication of one agent's [`AgentStatus`], shared by every clone of the context.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    publication: Publication<AgentStatus>,
    current: Mutex<Current>,
    /// The state the agent's previous run last published, if its checkpoint survived.
    previous: Option<AgentState>,
    /// Where files moved aside are reported as events, once the agent's raiser exists.
    events: std::sync::OnceLock<crate::events::Events>,
}

/// The status and what it is derived from.
struct Current {
    status: AgentStatus,
    /// Outstanding errors by source, oldest report first.
    errors: Vec<(String, String)>,
    /// Files each publication moved aside, by topic.
    quarantined: Vec<(&'static str, u32)>,
}

impl Current {
    /// Derives `last_error`, the Degraded state and the quarantine count from the sources.
    fn settle(&mut self) {
        let s = &mut self.status;
        s.last_error = self
            .errors
            .last()
            .map(|(_, message)| match self.errors.len() {
                1 => message.clone(),
                n => format!("{message} (and {} more)", n - 1),
            });
        s.state = match (s.state, self.errors.is_empty()) {
            (AgentState::Running, false) => AgentState::Degraded,
            (AgentState::Degraded, true) => AgentState::Running,
            (state, _) => state,
        };
        s.quarantined_checkpoints = self.quarantined.iter().map(|(_, n)| n).sum();
    }
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("status", &self.lock().status)
            .finish()
    }
}

/// Milliseconds since the Unix epoch, the unit of every `*_ms` field.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Health {
    /// Opens `<agent>/AgentStatus` and publishes the Starting state. Must run inside a tokio
    /// runtime.
    pub fn open(dirs: &Dirs, agent: &str) -> Result<Health, powernode_pubsub::Error> {
        let publication = Publication::<AgentStatus>::open(dirs, agent)?;
        let now = now_ms();
        let status = AgentStatus {
            agent: agent.to_owned(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at_ms: now,
            last_loop_ms: now,
            state: AgentState::Starting,
            last_error: None,
            quarantined_checkpoints: 0,
        };
        let own = publication.watch_health();
        let previous = publication.get(agent).map(|s| s.state);
        let health = Health {
            inner: Arc::new(Inner {
                previous,
                events: std::sync::OnceLock::new(),
                publication,
                current: Mutex::new(Current {
                    status,
                    errors: Vec::new(),
                    quarantined: Vec::new(),
                }),
            }),
        };
        health.update(|_| {});
        health.follow::<AgentStatus>(own);
        Ok(health)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.inner.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the status and publishes it under one lock: two threads' updates are
    /// published in the order they were made, so a report racing the shutdown can never publish
    /// its Degraded after Stopping.
    fn update(&self, change: impl FnOnce(&mut Current)) {
        let mut current = self.lock();
        change(&mut current);
        current.settle();
        if let Err(e) = self.inner.publication.publish(&current.status) {
            // Health is best-effort: failing to report must not stop the agent's real work.
            tracing::warn!(error = %e, "could not publish AgentStatus");
        }
    }

    /// What the agent's previous run last said of itself (`Stopping` after a clean stop), if
    /// its status checkpoint survived (it does across restarts, not across reboots).
    pub fn previous_state(&self) -> Option<AgentState> {
        self.inner.previous
    }

    /// From now on, files a publication moves aside are also raised as
    /// `checkpoint.quarantined` events.
    pub fn raise_with(&self, events: crate::events::Events) {
        let _ = self.inner.events.set(events);
    }

    /// The agent is serving.
    pub fn running(&self) {
        self.update(|c| {
            if c.status.state == AgentState::Starting {
                c.status.state = AgentState::Running;
            }
        });
    }

    /// The agent is shutting down.
    pub fn stopping(&self) {
        self.update(|c| c.status.state = AgentState::Stopping);
    }

    /// The main loop went round (called on each liveness beat that touched the disk).
    pub fn loop_beat(&self) {
        self.update(|c| c.status.last_loop_ms = now_ms());
    }

    /// An error of the agent's own that stays until [`Health::clear_error`]: the agent is
    /// Degraded meanwhile.
    pub fn report_error(&self, message: &str) {
        self.report(AGENT_SOURCE, message);
    }

    /// The error reported with [`Health::report_error`] is resolved (errors of other sources
    /// stay).
    pub fn clear_error(&self) {
        self.clear(AGENT_SOURCE);
    }

    /// An error of `source` that stays until [`Health::clear`] of the same source; a new
    /// report of a source replaces its earlier one.
    pub fn report(&self, source: &str, message: &str) {
        let unchanged = self
            .lock()
            .errors
            .last()
            .is_some_and(|(s, m)| s == source && m == message);
        if unchanged {
            return;
        }
        self.update(|c| {
            c.errors.retain(|(s, _)| s != source);
            c.errors.push((source.to_owned(), message.to_owned()));
        });
    }

    /// The error of `source` is resolved.
    pub fn clear(&self, source: &str) {
        if self.lock().errors.iter().any(|(s, _)| s == source) {
            self.update(|c| c.errors.retain(|(s, _)| s != source));
        }
    }

    /// Reports, from now on, what the publication of topic `T` says of its checkpoints
    /// (writes failing and retried, files moved aside) as this agent's error of source
    /// `checkpoints/<T>`, and counts what it moved aside in `quarantined_checkpoints`.
    pub fn follow<T: Topic>(&self, mut rx: watch::Receiver<PublicationHealth>) {
        let first = rx.borrow_and_update().clone();
        self.apply_publication_health(T::NAME, &first);
        // Weak, so the task never keeps the health (and its publication) alive.
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(inner) = weak.upgrade() else { return };
                let now = rx.borrow_and_update().clone();
                Health { inner }.apply_publication_health(T::NAME, &now);
            }
            // The publication is closed: what it reported is no longer outstanding.
            if let Some(inner) = weak.upgrade() {
                Health { inner }.apply_publication_health(T::NAME, &PublicationHealth::default());
            }
        });
    }

    fn apply_publication_health(&self, topic: &'static str, h: &PublicationHealth) {
        let source = format!("checkpoints/{topic}");
        let count = h.quarantined.len() as u32;
        let known = self
            .lock()
            .quarantined
            .iter()
            .find(|(t, _)| *t == topic)
            .map_or(0, |(_, n)| *n);
        if count != known {
            if let Some(events) = self.inner.events.get() {
                for q in h.quarantined.iter().skip(known as usize) {
                    let moved_to = q.moved_to.display().to_string();
                    events.report(
                        powernode_types::Severity::Warning,
                        "checkpoint.quarantined",
                        &format!("a checkpoint of {topic} was moved aside: {}", q.reason),
                        &[("topic", topic), ("key", &q.key), ("moved_to", &moved_to)],
                    );
                }
            }
            self.update(|c| {
                c.quarantined.retain(|(t, _)| *t != topic);
                c.quarantined.push((topic, count));
            });
        }
        if let Some((key, error)) = h.not_durable.iter().next() {
            self.report(
                &source,
                &format!(
                    "{} item(s) of {topic} not written to disk, retrying (first: {key}: {error})",
                    h.not_durable.len()
                ),
            );
        } else if let Some(first) = h.quarantined.first() {
            self.report(
                &source,
                &format!(
                    "{} bad checkpoint file(s) of {topic} moved aside (first: {}: {})",
                    h.quarantined.len(),
                    first.key,
                    first.reason
                ),
            );
        } else {
            self.clear(&source);
        }
    }

    /// The status as last published.
    pub fn current(&self) -> AgentStatus {
        self.lock().status.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_pubsub::{Event, Subscription};

    #[tokio::test]
    async fn lifecycle_is_published() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs::under_root(tmp.path());
        let health = Health::open(&dirs, "testagent").unwrap();
        let mut sub = Subscription::<AgentStatus>::connect(&dirs, "testagent");
        let state = |e: Event<AgentStatus>| match e {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                Some((value.state, value.last_error))
            }
            _ => None,
        };
        assert_eq!(state(sub.next().await), Some((AgentState::Starting, None)));
        assert_eq!(sub.next().await, Event::Synchronized);
        health.running();
        assert_eq!(state(sub.next().await), Some((AgentState::Running, None)));
        health.report_error("disk full");
        assert_eq!(
            state(sub.next().await),
            Some((AgentState::Degraded, Some("disk full".into())))
        );
        health.clear_error();
        assert_eq!(state(sub.next().await), Some((AgentState::Running, None)));
        health.stopping();
        assert_eq!(state(sub.next().await), Some((AgentState::Stopping, None)));
        assert_eq!(health.current().pid, std::process::id());
    }
}
