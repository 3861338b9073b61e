//! What every powernode agent process does the same way.
//!
//! An agent crate exposes `run(ctx: Context) -> anyhow::Result<()>`; the multi-call binary maps
//! argv\[0\] to an agent and calls [`run_agent`], which
//!
//! 1. parses the common flags (`--root DIR`, `--help`),
//! 2. resolves the [`Root`] (flag, then `POWERNODE_ROOT`, then `/`),
//! 3. loads and validates the [`Settings`] from `<root>/etc/powernode`,
//! 4. starts logging ([`logging::init`]),
//! 5. limits malloc to one arena ([`memory`]), builds a multi-thread tokio runtime and installs the SIGTERM/SIGINT handler
//!    ([`shutdown::install`]),
//! 6. runs the agent's future with a [`Context`]; the agent calls [`Context::ready`] once it is
//!    serving, which sends `READY=1` to systemd,
//! 7. sends `STOPPING=1` when shutdown begins (or when the future returns), cancels the
//!    shutdown token, waits (bounded) for the tasks spawned on [`Context::tasks`], and returns.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     let args: Vec<_> = std::env::args_os().collect();
//!     let result = agentbase::run_agent("exampled", args, |ctx| async move {
//!         ctx.ready();
//!         let mut tick = tokio::time::interval(ctx.beat_interval());
//!         loop {
//!             tokio::select! {
//!                 _ = ctx.shutdown.cancelled() => break,
//!                 _ = tick.tick() => ctx.liveness.beat(),
//!             }
//!         }
//!         Ok(())
//!     });
//!     agentbase::exit_code("exampled", result)
//! }
//! ```

pub mod events;
pub mod fsutil;
pub mod health;
pub mod liveness;
pub mod logging;
pub mod memory;
pub mod notify;
pub mod root;
pub mod settings;
pub mod shutdown;
pub mod tasks;
pub mod timefmt;
pub mod watch;

use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::events::Events;
pub use crate::health::Health;
pub use crate::liveness::Liveness;
pub use crate::notify::Notifier;
pub use crate::root::Root;
pub use crate::settings::Settings;

/// How long, after the agent's future returns, the runtime waits for blocking tasks to finish
/// before the process moves on regardless.
pub const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long, after the agent's future returns, [`run_agent`] waits for the tasks spawned on
/// [`Context::tasks`] to finish. Tasks still running then are dropped (and the drop is logged);
/// systemd's own stop timeout and a second signal bound the wait from outside too.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an agent did not run to a clean finish. [`AgentError::exit_code`] gives the process
/// exit status.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The command line was wrong. Displays clap's message with the usage.
    #[error("{0}")]
    Usage(clap::Error),
    /// The settings files are unreadable or invalid.
    #[error("invalid settings: {0}")]
    Settings(#[from] settings::SettingsError),
    /// The tokio runtime could not be built.
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The signal handlers could not be installed.
    #[error(transparent)]
    Shutdown(#[from] shutdown::ShutdownError),
    /// The agent's `AgentStatus` publication could not be opened (e.g. another instance of
    /// the agent is running).
    #[error("publishing AgentStatus: {0}")]
    Health(#[from] powernode_pubsub::Error),
    /// The agent's own future failed.
    #[error(transparent)]
    Failed(anyhow::Error),
}

impl AgentError {
    /// The process exit status for this error: 2 for usage and configuration errors, 1 for
    /// everything else. (0 is success, i.e. no error.)
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Usage(_) | AgentError::Settings(_) => 2,
            AgentError::Runtime(_)
            | AgentError::Shutdown(_)
            | AgentError::Health(_)
            | AgentError::Failed(_) => 1,
        }
    }

    /// Whether [`run_agent`] already logged this error. Errors from before logging was set up
    /// (usage, settings) were not, and must be printed by the caller.
    pub fn was_logged(&self) -> bool {
        !matches!(self, AgentError::Usage(_) | AgentError::Settings(_))
    }
}

/// Turns the result of [`run_agent`] into the process exit status, printing to stderr the
/// errors that were not already logged (usage and settings errors).
pub fn exit_code(agent: &str, result: Result<(), AgentError>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            match &err {
                // clap renders its own "error: ..." with the usage and colours.
                AgentError::Usage(e) => {
                    let _ = e.print();
                }
                e if !e.was_logged() => eprintln!("{agent}: {e}"),
                _ => {}
            }
            std::process::ExitCode::from(err.exit_code())
        }
    }
}

/// Everything an agent's main future is given.
#[derive(Debug, Clone)]
pub struct Context {
    /// The agent's name, e.g. `identitymgr`.
    pub agent: &'static str,
    /// The path prefix for every file the agent touches.
    pub root: Root,
    /// The validated settings.
    pub settings: Settings,
    /// Cancelled on SIGTERM/SIGINT (and when the main future returns): every task stops on it.
    pub shutdown: CancellationToken,
    /// Spawn long-lived tasks here (`ctx.tasks.spawn(..)`): after the main future returns,
    /// [`run_agent`] cancels [`Context::shutdown`] and waits up to [`DRAIN_TIMEOUT`] for them.
    /// A task spawned with plain `tokio::spawn` is dropped as soon as the main future returns.
    pub tasks: TaskTracker,
    /// The agent's touch file and systemd watchdog.
    pub liveness: Liveness,
    /// systemd notification; a no-op unless started by systemd with `NOTIFY_SOCKET`.
    pub notifier: Notifier,
    /// The agent's published `AgentStatus`.
    pub health: Health,
    /// Where the agent's publications live.
    pub dirs: powernode_pubsub::Dirs,
    /// The agent's events: `ctx.events.raise(..)` (docs/events.md).
    pub events: Events,
    ready_sent: Arc<AtomicBool>,
}

impl Context {
    /// A context for `agent`, with systemd notification and watchdog taken from the
    /// environment, a fresh shutdown token and the agent's `AgentStatus` publication opened.
    /// Must be called inside a tokio runtime. [`run_agent`] builds one this way; agent tests
    /// can too.
    pub fn new(
        agent: &'static str,
        root: Root,
        settings: Settings,
    ) -> Result<Context, powernode_pubsub::Error> {
        let notifier = Notifier::from_env();
        let liveness =
            Liveness::with_notifier(&root, agent, notifier.clone(), notify::watchdog_interval());
        let dirs = powernode_pubsub::Dirs::under_root(root.base());
        let health = Health::open(&dirs, agent)?;
        let events = Events::open(&dirs, &root, agent)?;
        health.raise_with(events.clone());
        health.follow::<powernode_types::Event>(events.watch_health());
        if !settings.notes.is_empty() {
            health.report("settings", &settings.notes.join("; "));
        }
        Ok(Context {
            agent,
            root,
            settings,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            liveness,
            notifier,
            health,
            dirs,
            events,
            ready_sent: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Opens the agent's publication of topic `T` and follows its health: checkpoint files it
    /// moved aside are counted in the agent's `AgentStatus.quarantined_checkpoints` and, like
    /// checkpoint writes that keep failing, reported as an error until their cause is gone
    /// ([`Health::follow`]), so `powernode-agent status` shows them.
    pub fn open_publication<T: powernode_types::Topic>(
        &self,
    ) -> Result<powernode_pubsub::Publication<T>, powernode_pubsub::Error> {
        let publication = powernode_pubsub::Publication::<T>::open(&self.dirs, self.agent)?;
        self.health.follow::<T>(publication.watch_health());
        Ok(publication)
    }

    /// One turn of the agent's main loop: refreshes the touch file, the systemd watchdog and
    /// `AgentStatus.last_loop_ms` (each at most once per beat interval, so it is cheap to call
    /// on every iteration).
    pub fn beat(&self) {
        match self.liveness.try_beat() {
            Ok(true) => self.health.loop_beat(),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "liveness beat failed");
                self.health.loop_beat();
            }
        }
    }

    /// Tells systemd the agent has started (`READY=1`). Only the first call sends; later calls,
    /// from any clone, do nothing. A failure to send is logged, not returned.
    pub fn ready(&self) {
        if self.ready_sent.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(err) = self.notifier.ready() {
            tracing::warn!(error = %err, "could not notify systemd of readiness");
        }
        self.health.running();
        tracing::info!(agent = self.agent, "ready");
    }

    /// Whether [`Context::ready`] has been called.
    pub fn is_ready(&self) -> bool {
        self.ready_sent.load(Ordering::Acquire)
    }

    /// Sets the one-line status `systemctl status` shows. A failure to send is logged.
    pub fn status(&self, text: &str) {
        if let Err(err) = self.notifier.status(text) {
            tracing::debug!(error = %err, "could not send status to systemd");
        }
    }

    /// How often the main loop should call [`Liveness::beat`]: `touch_interval_s`, or the
    /// systemd watchdog interval if that is shorter.
    pub fn beat_interval(&self) -> Duration {
        let touch = self.settings.touch_interval();
        self.liveness
            .watchdog_interval()
            .map_or(touch, |w| w.min(touch))
    }
}

/// The flags every agent accepts.
#[derive(Debug, Parser)]
struct CommonArgs {
    /// Prefix for every path the agent uses (default: $POWERNODE_ROOT, else /).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

/// Parses the common flags. `Ok(None)` means help was requested and has been printed.
fn parse_args(agent: &'static str, args: Vec<OsString>) -> Result<Option<CommonArgs>, AgentError> {
    let command = CommonArgs::command()
        .name(agent)
        .bin_name(agent)
        .about(format!("powernode agent {agent}"));
    match command.try_get_matches_from(args) {
        Ok(matches) => CommonArgs::from_arg_matches(&matches)
            .map(Some)
            .map_err(AgentError::Usage),
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            let _ = e.print();
            Ok(None)
        }
        Err(e) => Err(AgentError::Usage(e)),
    }
}

/// Runs one agent process: flags, root, settings, logging, runtime, signals, systemd
/// notification around `main`. See the crate documentation for the order.
///
/// `args` is the whole command line, `args[0]` included (it is ignored: usage always names
/// `agent`). Returns `Ok(())` after `--help`. Map the result with [`exit_code`].
pub fn run_agent<F, Fut>(
    agent: &'static str,
    args: Vec<OsString>,
    main: F,
) -> Result<(), AgentError>
where
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let Some(args) = parse_args(agent, args)? else {
        return Ok(());
    };
    let root = Root::resolve(args.root);
    let settings = Settings::load(&root)?;
    logging::init(agent, &settings.log_level);
    tracing::info!(
        agent,
        root = %root.base().display(),
        version = env!("CARGO_PKG_VERSION"),
        "starting"
    );
    for note in &settings.notes {
        tracing::warn!(%note, "settings");
    }

    memory::limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(agent)
        .build()
        .map_err(|e| {
            tracing::error!(error = %e, "could not start the async runtime");
            AgentError::Runtime(e)
        })?;

    let result = runtime.block_on(async move {
        let ctx = Context::new(agent, root, settings).inspect_err(|e| {
            tracing::error!(error = %e, "could not publish the agent's status");
        })?;
        raise_started(&ctx);
        run_in_runtime(ctx, main).await
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    if result.is_ok() {
        tracing::info!(agent, "stopped");
    }
    result
}

async fn run_in_runtime<F, Fut>(ctx: Context, main: F) -> Result<(), AgentError>
where
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    shutdown::install(ctx.shutdown.clone()).inspect_err(|e| {
        tracing::error!(error = %e, "could not install signal handlers");
    })?;

    let stopping = Stopping::new(ctx.notifier.clone(), ctx.health.clone());
    {
        let stopping = stopping.clone();
        let token = ctx.shutdown.clone();
        tokio::spawn(async move {
            token.cancelled().await;
            stopping.send();
        });
    }

    let token = ctx.shutdown.clone();
    let notifier = ctx.notifier.clone();
    let tasks = ctx.tasks.clone();
    let outcome = main(ctx).await;
    token.cancel();
    stopping.send();
    drain(&tasks).await;
    outcome.map_err(|err| {
        tracing::error!(error = %format!("{err:#}"), "agent failed");
        if let Err(e) = notifier.status(&format!("failed: {err:#}")) {
            tracing::debug!(error = %e, "could not send status to systemd");
        }
        AgentError::Failed(err)
    })
}

/// The `agent.started` event: how many starts before this one, and whether the previous run
/// ended without a clean stop (its last `AgentStatus` was not Stopping).
fn raise_started(ctx: &Context) {
    let restarts = ctx.events.starts().saturating_sub(1).to_string();
    let unclean = ctx
        .health
        .previous_state()
        .is_some_and(|s| s != powernode_types::AgentState::Stopping);
    let (severity, message) = if unclean {
        (
            powernode_types::Severity::Warning,
            format!(
                "{} started; its previous run ended without a clean stop",
                ctx.agent
            ),
        )
    } else {
        (
            powernode_types::Severity::Info,
            format!("{} started", ctx.agent),
        )
    };
    ctx.events.report(
        severity,
        "agent.started",
        &message,
        &[
            ("restarts", &restarts),
            ("unclean_stop", if unclean { "true" } else { "false" }),
            ("version", env!("CARGO_PKG_VERSION")),
        ],
    );
}

/// Waits up to [`DRAIN_TIMEOUT`] for the tracked tasks to finish.
async fn drain(tasks: &TaskTracker) {
    tasks.close();
    if tasks.is_empty() {
        return;
    }
    tracing::debug!(tasks = tasks.len(), "waiting for tasks to finish");
    if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            tasks = tasks.len(),
            timeout_s = DRAIN_TIMEOUT.as_secs(),
            "tasks still running after the drain timeout, dropping them"
        );
    }
}

/// Sends `STOPPING=1` once, whichever of "shutdown requested" and "main returned" comes first.
#[derive(Clone)]
struct Stopping {
    notifier: Notifier,
    health: Health,
    sent: Arc<AtomicBool>,
}

impl Stopping {
    fn new(notifier: Notifier, health: Health) -> Stopping {
        Stopping {
            notifier,
            health,
            sent: Arc::new(AtomicBool::new(false)),
        }
    }

    fn send(&self) {
        if self.sent.swap(true, Ordering::AcqRel) {
            return;
        }
        self.health.stopping();
        if let Err(err) = self.notifier.stopping() {
            tracing::warn!(error = %err, "could not notify systemd of stopping");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_root_flag() {
        let parsed = parse_args("testagent", args(&["x", "--root", "/sandbox"]))
            .unwrap()
            .unwrap();
        assert_eq!(parsed.root, Some(PathBuf::from("/sandbox")));
        let parsed = parse_args("testagent", args(&["x"])).unwrap().unwrap();
        assert_eq!(parsed.root, None);
    }

    #[test]
    fn usage_errors_name_the_agent_and_exit_2() {
        let err = parse_args("testagent", args(&["x", "--bogus"])).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(!err.was_logged());
        let AgentError::Usage(clap_err) = &err else {
            panic!("not a usage error: {err:?}");
        };
        let text = clap_err.render().to_string();
        assert!(text.contains("--bogus"), "{text}");
        assert!(text.contains("Usage: testagent"), "{text}");
    }

    #[test]
    fn help_mentions_agent_and_root() {
        let help = CommonArgs::command()
            .name("testagent")
            .bin_name("testagent")
            .render_help()
            .to_string();
        assert!(help.contains("Usage: testagent"), "{help}");
        assert!(help.contains("--root <DIR>"), "{help}");
    }

    #[test]
    fn exit_codes() {
        let settings_err = AgentError::Settings(settings::SettingsError::Invalid {
            field: "touch_interval_s",
            value: "0".into(),
            reason: "must be between 1 and 3600 seconds".into(),
            origin: None,
        });
        assert_eq!(settings_err.exit_code(), 2);
        assert_eq!(AgentError::Failed(anyhow::anyhow!("boom")).exit_code(), 1);
        assert_eq!(
            AgentError::Runtime(std::io::Error::other("no threads")).exit_code(),
            1
        );
    }

    #[tokio::test]
    async fn quarantined_checkpoints_reach_agent_status() {
        use powernode_types::{AgentState, EventAck};
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::new("testagent", Root::new(dir.path()), Settings::default()).unwrap();
        let cp_dir = ctx.dirs.checkpoints("testagent", "EventAck", false);
        std::fs::create_dir_all(&cp_dir).unwrap();
        std::fs::write(cp_dir.join("broken"), b"not a checkpoint").unwrap();
        let publication = ctx.open_publication::<EventAck>().unwrap();
        assert_eq!(publication.status().quarantined.len(), 1);
        let status = ctx.health.current();
        assert_eq!(status.quarantined_checkpoints, 1);
        assert!(status.last_error.unwrap().contains("EventAck"));
        ctx.ready();
        assert_eq!(ctx.health.current().state, AgentState::Degraded);
    }

    /// A settings note (a directory named like a drop-in) keeps the agent Degraded and says why.
    #[tokio::test]
    async fn settings_notes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings {
            notes: vec!["agent.toml.d/x.toml is not a file: it is not read as settings".into()],
            ..Settings::default()
        };
        let ctx = Context::new("testagent", Root::new(dir.path()), settings).unwrap();
        ctx.ready();
        let status = ctx.health.current();
        assert_eq!(status.state, powernode_types::AgentState::Degraded);
        assert!(status.last_error.unwrap().contains("x.toml is not a file"));
    }

    /// A publication whose checkpoint writes fail makes the agent Degraded with the error, and
    /// Running again once the writes succeed; its own errors are untouched meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_checkpoint_writes_degrade_the_agent_until_they_succeed() {
        use powernode_pubsub::testing::{SmallTmpfs, TestItem};
        use powernode_types::AgentState;
        if !powernode_pubsub::testing::require(&["root", "mount"]) {
            return;
        }
        let disk = SmallTmpfs::mount("1m").unwrap();
        let ctx = Context::new("testagent", Root::new(disk.path()), Settings::default()).unwrap();
        let publication = ctx.open_publication::<TestItem>().unwrap();
        ctx.ready();
        let filler = disk.fill("filler").unwrap();
        publication
            .publish(&TestItem {
                key: "k".into(),
                seq: 1,
                sent_ns: 0,
                payload: vec![1; 64],
            })
            .unwrap();
        let wait = |want: AgentState| {
            let health = ctx.health.clone();
            async move {
                for _ in 0..400 {
                    if health.current().state == want {
                        return health.current();
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                panic!("not {want:?}: {:?}", health.current());
            }
        };
        let degraded = wait(AgentState::Degraded).await;
        assert!(
            degraded
                .last_error
                .as_deref()
                .unwrap()
                .contains("not written to disk"),
            "{degraded:?}"
        );
        std::fs::remove_file(filler).unwrap();
        let running = wait(AgentState::Running).await;
        assert_eq!(running.last_error, None);
        assert!(publication.is_durable("k"));
    }

    #[tokio::test]
    async fn beat_interval_is_the_shorter() {
        let dir = tempfile::tempdir().unwrap();
        let mut ctx =
            Context::new("testagent", Root::new(dir.path()), Settings::default()).unwrap();
        assert_eq!(ctx.beat_interval(), Duration::from_secs(15));
        ctx.liveness = Liveness::with_notifier(
            &ctx.root,
            "testagent",
            Notifier::disabled(),
            Some(Duration::from_secs(4)),
        );
        assert_eq!(ctx.beat_interval(), Duration::from_secs(4));
    }

    #[tokio::test]
    async fn ready_is_sent_once() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("notify.sock");
        let server = std::os::unix::net::UnixDatagram::bind(&sock).unwrap();
        server.set_nonblocking(true).unwrap();
        let mut ctx =
            Context::new("testagent", Root::new(dir.path()), Settings::default()).unwrap();
        ctx.notifier = Notifier::new(notify::NotifyAddr::Path(sock));
        assert!(!ctx.is_ready());
        ctx.ready();
        ctx.clone().ready();
        assert!(ctx.is_ready());
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(server.recv(&mut buf).is_err(), "READY=1 sent twice");
    }
}
