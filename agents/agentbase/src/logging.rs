//! Process-wide logging: journald when the host has one, stderr otherwise.
//!
//! The journald socket is looked up at the real host path `/run/systemd/journal/socket`, not
//! under the [`Root`](crate::Root): a sandboxed agent still logs to the host's journal. Entries
//! carry `SYSLOG_IDENTIFIER=<agent>`, so `journalctl -t <agent>` shows one agent. On stderr
//! every line starts with `<agent>: `, so the interleaved output of several agents started by
//! hand or by a test can be told apart.
//!
//! `RUST_LOG`, when set and non-empty, overrides the configured level.

use std::fmt;
use std::io::IsTerminal;
use std::path::Path;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Where journald listens on the host.
pub const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// Where [`init`] sent the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// The host's journald.
    Journald,
    /// Standard error.
    Stderr,
    /// A global subscriber was already installed (by an earlier `init` or by a test); nothing
    /// was changed.
    AlreadySet,
}

/// Installs the process's global tracing subscriber for `agent` at `level` (a level or an
/// `EnvFilter` directive list; `RUST_LOG` overrides it). Never fails: without journald, or if
/// its layer cannot be built, logs go to stderr; an invalid filter falls back to `info` with a
/// warning; a second call leaves the first subscriber in place.
pub fn init(agent: &str, level: &str) -> Sink {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, filter_error) = build_filter(level, rust_log.as_deref());

    let journald = if Path::new(JOURNALD_SOCKET).exists() {
        tracing_journald::layer()
            .map(|layer| layer.with_syslog_identifier(agent.to_owned()))
            .map_err(|e| e.to_string())
    } else {
        Err(format!("{JOURNALD_SOCKET} does not exist"))
    };
    let (journald, journald_error) = match journald {
        Ok(layer) => (Some(layer), None),
        Err(e) => (None, Some(e)),
    };
    let stderr = journald.is_none().then(|| stderr_layer(agent));
    let sink = if journald.is_some() {
        Sink::Journald
    } else {
        Sink::Stderr
    };

    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init();
    if installed.is_err() {
        return Sink::AlreadySet;
    }
    if let Some(err) = filter_error {
        tracing::warn!(error = %err, "invalid log filter, using info");
    }
    if let Some(reason) = journald_error.filter(|_| Path::new(JOURNALD_SOCKET).exists()) {
        tracing::warn!(reason = %reason, "journald unavailable, logging to stderr");
    }
    sink
}

/// Installs a stderr-only subscriber for an interactive tool (ipcmonitor, the operator CLI):
/// what the libraries it uses warn about (a publisher of another schema version, a protocol
/// violation) reaches the person running it, not the journal. `RUST_LOG` overrides `level`.
pub fn init_tool(tool: &str, level: &str) -> Sink {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, _) = build_filter(level, rust_log.as_deref());
    match tracing_subscriber::registry()
        .with(filter)
        .with(stderr_layer(tool))
        .try_init()
    {
        Ok(()) => Sink::Stderr,
        Err(_) => Sink::AlreadySet,
    }
}

/// The filter to use: `RUST_LOG` if set and non-empty, else `level`; `info` if that does not
/// parse, together with the parse error.
fn build_filter(level: &str, rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let wanted = rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(level);
    match EnvFilter::builder().parse(wanted) {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new("info"), Some(format!("{wanted:?}: {e}"))),
    }
}

/// A stderr fmt layer whose lines start with `<agent>: `.
fn stderr_layer<S>(agent: &str) -> impl tracing_subscriber::Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(AgentPrefix {
            agent: agent.to_owned(),
            inner: tracing_subscriber::fmt::format(),
        })
}

/// Writes `<agent>: ` before each event, then formats it as `inner` does.
struct AgentPrefix<F> {
    agent: String,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for AgentPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{}: ", self.agent)?;
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_names_the_agent() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(AgentPrefix {
                agent: "identitymgr".to_owned(),
                inner: tracing_subscriber::fmt::format(),
            });
        let subscriber = tracing_subscriber::registry()
            .with(build_filter("info", None).0)
            .with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(source = "cmdline", "identity found");
            tracing::debug!("filtered out");
            tracing::warn!("second line");
        });
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        for line in &lines {
            assert!(line.starts_with("identitymgr: "), "{line}");
        }
        assert!(lines[0].contains("identity found") && lines[0].contains("source=\"cmdline\""));
        assert!(lines[1].contains("WARN"));
    }

    #[test]
    fn rust_log_overrides_level() {
        let cases: &[(&str, Option<&str>, &str, bool)] = &[
            ("info", None, "info", false),
            ("info", Some("debug"), "debug", false),
            ("info", Some("  "), "info", false),
            ("warn,pubsub=trace", None, "pubsub=trace,warn", false),
            ("info", Some("x=loud"), "info", true),
        ];
        for (level, rust_log, want, errs) in cases {
            let (filter, err) = build_filter(level, *rust_log);
            assert_eq!(
                filter.to_string(),
                *want,
                "level={level} RUST_LOG={rust_log:?}"
            );
            assert_eq!(err.is_some(), *errs, "level={level} RUST_LOG={rust_log:?}");
        }
    }

    #[test]
    fn init_twice_keeps_the_first() {
        let first = init("testagent", "info");
        assert_ne!(first, Sink::AlreadySet);
        assert_eq!(init("testagent", "debug"), Sink::AlreadySet);
        tracing::info!("logging works after init");
    }
}
