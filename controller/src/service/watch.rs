//! The long-poll a node holds so that a new desired state or a queued task reaches it at once
//! instead of at its next heartbeat ([`crate::watch`] keeps the states current).

use std::time::Duration;

use super::{Error, Service};
use crate::storage::{self, WatchState};
use crate::wire::{task_limits, WatchParams, WatchResponse};

impl Service {
    /// Answers when `node`'s generation is past `params.generation` or a task is queued for
    /// it (`changed`), or when the time is up or the controller shuts down (`changed` false).
    pub async fn watch(
        &self,
        node: &storage::Node,
        params: &WatchParams,
    ) -> Result<WatchResponse, Error> {
        let timeout_s = params.timeout_s.unwrap_or(task_limits::DEFAULT_WATCH_S);
        if !(1..=task_limits::MAX_WATCH_S).contains(&timeout_s) {
            return Err(Error::InvalidQuery(format!(
                "timeout_s must be 1 to {}",
                task_limits::MAX_WATCH_S
            )));
        }
        let node = &node.id;
        // Watched before it is read: a change committed between the two is then either in the
        // read or seen by the scanner, which only looks at watched nodes.
        let mut rx = self.watches().subscribe(node, WatchState::default());
        let current = self.storage().watch_state(node).await?;
        self.watches().offer(node, current);
        let news = |s: &WatchState| s.generation > params.generation || s.tasks_queued > 0;
        let answer = |s: WatchState| WatchResponse {
            generation: s.generation,
            tasks_queued: s.tasks_queued,
            changed: news(&s),
        };
        if news(&current) {
            return Ok(answer(current));
        }
        let deadline = tokio::time::sleep(Duration::from_secs(timeout_s.into()));
        tokio::pin!(deadline);
        loop {
            let seen = *rx.borrow_and_update();
            if news(&seen) {
                return Ok(answer(seen));
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                () = &mut deadline => break,
                () = self.closing().cancelled() => break,
            }
        }
        let last = *rx.borrow();
        Ok(answer(last))
    }
}
