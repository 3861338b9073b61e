//! SIGTERM and SIGINT fan out to one [`CancellationToken`].
//!
//! The first signal cancels the token: every task that holds a clone of it sees
//! `cancelled()` resolve, finishes or reports its work, and the agent's main future returns
//! (DESIGN §7, "SIGTERM drains"). A second signal while draining means the operator has given
//! up waiting: it is logged and the process exits at once with [`FORCED_EXIT_CODE`], without
//! running destructors. Everything an agent must not lose is already on disk by then (events
//! are journalled before they are acknowledged, checkpoints are written atomically), so this is
//! the same as a `kill -9` the agent must survive anyway.
//!
//! The handlers are registered before [`install`] returns, so a signal that arrives right after
//! it is never lost to the default action. They stay registered for the life of the process;
//! once the runtime that ran the listening task is gone, further signals are ignored.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Exit status when a second signal arrives while draining (128 + SIGINT, as shells report an
/// interrupted command).
pub const FORCED_EXIT_CODE: i32 = 130;

/// The signal handlers could not be registered.
#[derive(Debug, thiserror::Error)]
#[error("registering a handler for {signal}: {source}")]
pub struct ShutdownError {
    /// The signal whose handler failed, e.g. `SIGTERM`.
    pub signal: &'static str,
    /// The underlying error.
    pub source: std::io::Error,
}

/// Cancels `token` on the first SIGTERM or SIGINT; exits the process with
/// [`FORCED_EXIT_CODE`] on the second. Must be called from within a tokio runtime (it spawns
/// the listening task there); the handlers are in place when it returns.
pub fn install(token: CancellationToken) -> Result<tokio::task::JoinHandle<()>, ShutdownError> {
    let register = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|source| ShutdownError {
            signal: name,
            source,
        })
    };
    let term = register(SignalKind::terminate(), "SIGTERM")?;
    let int = register(SignalKind::interrupt(), "SIGINT")?;
    Ok(tokio::spawn(listen(token, term, int)))
}

async fn listen(token: CancellationToken, mut term: Signal, mut int: Signal) {
    let first = next(&mut term, &mut int).await;
    tracing::info!(signal = first, "shutting down");
    token.cancel();
    let second = next(&mut term, &mut int).await;
    tracing::error!(
        signal = second,
        exit_code = FORCED_EXIT_CODE,
        "second signal while draining, exiting now"
    );
    std::process::exit(FORCED_EXIT_CODE);
}

/// Waits for the next SIGTERM or SIGINT and names it. If both streams end (the runtime is
/// shutting down), waits forever; the task is dropped with the runtime.
async fn next(term: &mut Signal, int: &mut Signal) -> &'static str {
    tokio::select! {
        Some(()) = term.recv() => "SIGTERM",
        Some(()) = int.recv() => "SIGINT",
        else => std::future::pending().await,
    }
}
