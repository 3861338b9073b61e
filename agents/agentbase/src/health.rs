//! The agent's own health, published as `<agent>/AgentStatus` for `powernode-agent status`.
//!
//! The state moves Starting → Running (at [`crate::Context::ready`]) → Stopping (at shutdown),
//! and to Degraded while an error the agent reported is outstanding. `last_loop_ms` follows
//! the main loop's liveness beats, so a wedged loop shows as a stale timestamp.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use powernode_pubsub::{Dirs, Publication};
use powernode_types::{AgentState, AgentStatus};

/// The publication of one agent's [`AgentStatus`], shared by every clone of the context.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    publication: Publication<AgentStatus>,
    current: Mutex<AgentStatus>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("status", &*self.lock())
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
            quarantined_checkpoints: publication.status().quarantined.len() as u32,
        };
        let health = Health {
            inner: Arc::new(Inner {
                publication,
                current: Mutex::new(status),
            }),
        };
        health.publish();
        Ok(health)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AgentStatus> {
        self.inner.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut AgentStatus)) {
        change(&mut self.lock());
        self.publish();
    }

    fn publish(&self) {
        let status = self.lock().clone();
        if let Err(e) = self.inner.publication.publish(&status) {
            // Health is best-effort: failing to report must not stop the agent's real work.
            tracing::warn!(error = %e, "could not publish AgentStatus");
        }
    }

    /// The agent is serving.
    pub fn running(&self) {
        self.update(|s| {
            if s.state == AgentState::Starting {
                s.state = if s.last_error.is_some() {
                    AgentState::Degraded
                } else {
                    AgentState::Running
                };
            }
        });
    }

    /// The agent is shutting down.
    pub fn stopping(&self) {
        self.update(|s| s.state = AgentState::Stopping);
    }

    /// The main loop went round (called on each liveness beat that touched the disk).
    pub fn loop_beat(&self) {
        self.update(|s| s.last_loop_ms = now_ms());
    }

    /// An error that stays until [`Health::clear_error`]: the agent is Degraded meanwhile.
    pub fn report_error(&self, message: &str) {
        self.update(|s| {
            s.last_error = Some(message.to_owned());
            if s.state == AgentState::Running {
                s.state = AgentState::Degraded;
            }
        });
    }

    /// The reported error is resolved.
    pub fn clear_error(&self) {
        self.update(|s| {
            s.last_error = None;
            if s.state == AgentState::Degraded {
                s.state = AgentState::Running;
            }
        });
    }

    /// Adds checkpoint files another of the agent's publications moved aside at start-up.
    pub fn add_quarantined(&self, count: usize) {
        if count > 0 {
            self.update(|s| s.quarantined_checkpoints += count as u32);
        }
    }

    /// The status as last published.
    pub fn current(&self) -> AgentStatus {
        self.lock().clone()
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
