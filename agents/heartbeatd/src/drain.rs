//! What heartbeatd does on SIGTERM (DESIGN §7, "SIGTERM drains"; docs/tasks.md, "SIGTERM").
//!
//! The main loop stops taking work: no heartbeat, lease or renewal is started any more. What
//! it has to say is said: the completions it holds — the owners' final `TaskStatus`es not yet
//! reported, and the `Failed`/`Interrupted` reports it made itself — are sent with
//! `POST /tasks/{id}/complete`, for at most [`REPORT_BOUND`]. Then the agent exits.
//!
//! A node stopped in order (`scripts/device-steps.sh --stop`, the units' ordering) stops the
//! task runners first: their last publication is the `Interrupted` status of what they ran,
//! so heartbeatd, stopped after them, reports those tasks instead of leaving their leases to
//! run out on the controller (which would give a task that is not safe to run again to the
//! node a second time).
//!
//! - **The owners' last word.** Each owner's follower, on shutdown, goes on reading its
//!   subscription until the owner's connection ends (an owner that stopped has left its last
//!   statuses in the socket, then the end of the connection) or nothing more comes for
//!   [`SETTLE`] (the owner runs on), and hands the main loop what it holds a last time
//!   ([`last_statuses`]). The main loop takes them until every follower is done.
//! - **Reports.** Sent as at any time ([`crate::tasks::Tasks::report`]); one that fails for
//!   want of the controller is sent again every [`RETRY`] until the bound.
//! - **What is left.** A task its owner still runs is left as it is: its config stays
//!   published and a restarted heartbeatd renews and reports it. A report not sent within the
//!   bound is not lost while the node is up: the owner's status and heartbeatd's `TaskConfig`
//!   are checkpointed under `run/`, so the next heartbeatd reports it; after a reboot the lease
//!   runs out on the controller.

use std::time::Duration;

use powernode_pubsub::{Event, Subscription};
use powernode_types::TaskStatus;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::tasks::OwnerStatuses;
use crate::Agent;

/// The longest heartbeatd spends on its reports after SIGTERM: well inside agentbase's
/// drain (`agentbase::DRAIN_TIMEOUT`) and the units' stop timeout.
pub const REPORT_BOUND: Duration = Duration::from_secs(5);
/// How long a follower waits, after SIGTERM, for one more status before it takes what it
/// holds as the owner's last word.
pub const SETTLE: Duration = Duration::from_millis(100);
/// The delay before a report that failed for want of the controller is sent again while
/// draining.
pub const RETRY: Duration = Duration::from_millis(250);

impl Agent {
    /// Shutdown: takes the owners' last statuses, sends every report held, within
    /// [`REPORT_BOUND`]. `task_statuses` is the followers' channel (closed once every follower
    /// has said its last word).
    pub(crate) async fn drain(
        &mut self,
        task_statuses: &mut mpsc::Receiver<OwnerStatuses>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + REPORT_BOUND;
        while let Ok(Some(statuses)) = tokio::time::timeout_at(deadline, task_statuses.recv()).await
        {
            self.tasks.statuses(&statuses);
        }
        let target = match self.target() {
            Ok(target) => target,
            Err(reason) => {
                tracing::debug!(%reason, "stopping; no controller to report tasks to");
                return Ok(());
            }
        };
        if let Err(error) = self.client(&target) {
            tracing::warn!(%error, "stopping; no controller client to report tasks with");
            return Ok(());
        }
        let Some(client) = self.connection.as_ref().map(|c| c.client.clone()) else {
            return Ok(());
        };
        let mut failures = 0u32;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.report(&client)).await {
                Ok(Ok(())) => {
                    if failures > 0 {
                        tracing::info!(failures, "stopping; every task report sent");
                    }
                    return Ok(());
                }
                Ok(Err(error)) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(%error, "stopping; a task report failed, sending it again");
                    }
                }
                Err(_) => break,
            }
            if tokio::time::timeout_at(deadline, tokio::time::sleep(RETRY))
                .await
                .is_err()
            {
                break;
            }
        }
        tracing::warn!(
            bound_s = REPORT_BOUND.as_secs(),
            failures,
            "stopping with task reports not sent; heartbeatd sends them when it starts again"
        );
        Ok(())
    }
}

/// A follower's last word, on shutdown: reads what `statuses` still has to say until the
/// owner's connection ends or nothing comes for [`SETTLE`], then sends the main loop every
/// status it holds.
pub(crate) async fn last_statuses(
    agent: &'static str,
    statuses: &mut Subscription<TaskStatus>,
    to_main: &mpsc::Sender<OwnerStatuses>,
) {
    loop {
        match tokio::time::timeout(SETTLE, statuses.next()).await {
            Ok(Event::Disconnected) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let statuses = statuses.items().map(|(_, s)| s.clone()).collect();
    let _ = to_main.send(OwnerStatuses { agent, statuses }).await;
}
