//! Tasks asked for on the node itself: `powernode-agent exec` and `sync` (docs/tasks.md,
//! "Local tasks").
//!
//! The CLI publishes the request as `operator/TaskConfig` (id `local-…`), exactly what
//! heartbeatd would publish for a leased task, so the same agent runs it the same way; it
//! follows that agent's `TaskStatus` until the task is final, then withdraws the request,
//! which lets the agent forget it. Interrupted (SIGINT, SIGTERM) or out of time, the CLI
//! withdraws the request first, which cancels the task. One CLI publishes at a time: a second
//! waits for the first.

use std::time::Duration;

use agentbase::tasks::{LOCAL_AGENT, LOCAL_PREFIX};
use anyhow::Context as _;
use powernode_pubsub::{Dirs, Error as PubsubError, Publication, Subscription};
use powernode_types::{TaskConfig, TaskState, TaskStatus};

/// How long a withdrawn request's agent gets to say the task ended.
const WITHDRAW_GRACE: Duration = Duration::from_secs(5);

/// How a local task ended.
#[derive(Debug)]
pub enum Ended {
    /// The agent gave its final status.
    Final(TaskStatus),
    /// The time ran out; the task was cancelled (its last status, if any).
    TimedOut(Option<TaskStatus>),
    /// The operator interrupted the CLI; the task was cancelled.
    Interrupted(Option<TaskStatus>),
}

/// Runs one task of `kind` with `args_json` through `agent` (the agent that owns the kind)
/// and returns how it ended. `timeout` bounds the whole wait, the wait for the publication
/// included.
pub async fn run(
    dirs: &Dirs,
    agent: &str,
    kind: &str,
    args_json: String,
    timeout: Duration,
) -> anyhow::Result<Ended> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Before anything is asked: an interrupt must always withdraw what was.
    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
    let requests = open(dirs, deadline).await?;
    let id = format!(
        "{LOCAL_PREFIX}{}-{}",
        agentbase::health::now_ms(),
        std::process::id()
    );
    let config = TaskConfig {
        id: id.clone(),
        kind: kind.to_owned(),
        args_json,
        lease_expires_at_ms: agentbase::health::now_ms()
            .saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
    };
    let mut statuses = Subscription::<TaskStatus>::connect(dirs, agent);
    requests
        .publish(&config)
        .with_context(|| format!("publishing the {kind} request"))?;
    let final_status = |s: &Subscription<TaskStatus>| {
        s.get(&id)
            .filter(|s| s.state != TaskState::Running)
            .cloned()
    };
    let ended = loop {
        if let Some(status) = final_status(&statuses) {
            break Ended::Final(status);
        }
        tokio::select! {
            _ = statuses.next() => {}
            () = tokio::time::sleep_until(deadline) => {
                break Ended::TimedOut(cancel(&requests, &mut statuses, &id).await);
            }
            _ = sigint.recv() => break Ended::Interrupted(cancel(&requests, &mut statuses, &id).await),
            _ = sigterm.recv() => break Ended::Interrupted(cancel(&requests, &mut statuses, &id).await),
        }
    };
    if matches!(ended, Ended::Final(_)) {
        withdraw(&requests, &mut statuses, &id).await;
    }
    Ok(ended)
}

fn signal(kind: tokio::signal::unix::SignalKind) -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).context("installing a signal handler")
}

/// Opens the operator's `TaskConfig` publication, waiting while another CLI holds it.
/// Requests left in it by a CLI that was killed are withdrawn (their tasks cancelled).
async fn open(
    dirs: &Dirs,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Publication<TaskConfig>> {
    let mut said = false;
    loop {
        match Publication::<TaskConfig>::open(dirs, LOCAL_AGENT) {
            Ok(requests) => {
                let leftovers = requests.keys();
                if !leftovers.is_empty() {
                    requests
                        .unpublish_many(&leftovers)
                        .context("withdrawing the requests a killed CLI left")?;
                }
                return Ok(requests);
            }
            Err(PubsubError::AlreadyPublished { .. }) => {
                if !said {
                    eprintln!("another local task is running; waiting for it");
                    said = true;
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!("another local task kept running past the timeout");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("opening operator/TaskConfig"),
        }
    }
}

/// Withdraws the request (cancelling the task) and waits, briefly, for its last status.
async fn cancel(
    requests: &Publication<TaskConfig>,
    statuses: &mut Subscription<TaskStatus>,
    id: &str,
) -> Option<TaskStatus> {
    if let Err(e) = requests.unpublish(id) {
        eprintln!("could not withdraw the request: {e}");
    }
    let grace = tokio::time::Instant::now() + WITHDRAW_GRACE;
    loop {
        match statuses.get(id) {
            Some(s) if s.state != TaskState::Running => return Some(s.clone()),
            _ => {}
        }
        if tokio::time::timeout_at(grace, statuses.next())
            .await
            .is_err()
        {
            return statuses.get(id).cloned();
        }
    }
}

/// Withdraws a finished request and waits, briefly, until its agent has forgotten it, so
/// the agent sees the withdrawal before this process (and its publication) goes away.
async fn withdraw(
    requests: &Publication<TaskConfig>,
    statuses: &mut Subscription<TaskStatus>,
    id: &str,
) {
    if requests.unpublish(id).is_err() {
        return;
    }
    let grace = tokio::time::Instant::now() + WITHDRAW_GRACE;
    while statuses.get(id).is_some() {
        if tokio::time::timeout_at(grace, statuses.next())
            .await
            .is_err()
        {
            return;
        }
    }
}
