//! systemd service notification (`sd_notify(3)`) without libsystemd.
//!
//! When systemd starts a unit with `Type=notify` or `WatchdogSec=`, it passes the address of a
//! unix datagram socket in `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket) and the
//! watchdog period in `WATCHDOG_USEC`. Each notification is one datagram of `KEY=value` lines.
//! When `NOTIFY_SOCKET` is unset — started by hand, by `device-steps.sh`, or in a test — every
//! call here is a no-op.

use std::ffi::{OsStr, OsString};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable holding the notification socket address.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// A notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is set to something that is neither an absolute path nor `@name`.
    #[error("{NOTIFY_SOCKET_ENV}={value:?}: unsupported address (want /path or @abstract)")]
    BadAddress {
        /// The value found in the environment.
        value: OsString,
    },
    /// The datagram could not be sent.
    #[error("sending {message:?} to notify socket {addr}: {source}")]
    Send {
        /// The socket address, as written in `NOTIFY_SOCKET`.
        addr: String,
        /// The first line of the message that failed.
        message: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    /// A socket bound at a filesystem path.
    Path(PathBuf),
    /// A Linux abstract socket (`@name` in `NOTIFY_SOCKET`; the name excludes the `@`).
    Abstract(Vec<u8>),
}

impl NotifyAddr {
    /// Parses a `NOTIFY_SOCKET` value.
    pub fn parse(value: &OsStr) -> Result<NotifyAddr, NotifyError> {
        let bytes = value.as_encoded_bytes();
        match bytes.first() {
            Some(b'/') => Ok(NotifyAddr::Path(PathBuf::from(value))),
            Some(b'@') if bytes.len() > 1 => Ok(NotifyAddr::Abstract(bytes[1..].to_vec())),
            _ => Err(NotifyError::BadAddress {
                value: value.to_owned(),
            }),
        }
    }

    fn socket_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            NotifyAddr::Path(path) => SocketAddr::from_pathname(path),
            NotifyAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)
            }
        }
    }
}

impl std::fmt::Display for NotifyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotifyAddr::Path(path) => write!(f, "{}", path.display()),
            NotifyAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

/// Sends notifications to systemd, or nothing when there is no notification socket.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    addr: Option<NotifyAddr>,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`. An unset or empty variable gives a no-op notifier; an
    /// unusable value is logged once and also gives a no-op notifier, since an agent must not
    /// refuse to run because of how it was started.
    pub fn from_env() -> Notifier {
        match std::env::var_os(NOTIFY_SOCKET_ENV) {
            None => Notifier::disabled(),
            Some(value) if value.is_empty() => Notifier::disabled(),
            Some(value) => match NotifyAddr::parse(&value) {
                Ok(addr) => Notifier::new(addr),
                Err(err) => {
                    tracing::warn!(error = %err, "systemd notification disabled");
                    Notifier::disabled()
                }
            },
        }
    }

    /// A notifier sending to `addr`.
    pub fn new(addr: NotifyAddr) -> Notifier {
        Notifier { addr: Some(addr) }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { addr: None }
    }

    /// Whether notifications are sent anywhere.
    pub fn is_enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// `READY=1`: start-up finished.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1")
    }

    /// `WATCHDOG=1`: the service is alive.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }

    /// `STATUS=<text>`: a one-line status shown by `systemctl status`. Newlines in `text` are
    /// replaced by spaces so they cannot inject other assignments.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        self.send(&format!("STATUS={}", text.replace('\n', " ")))
    }

    /// Sends `message` (one or more `KEY=value` lines) as one datagram.
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        let Some(addr) = &self.addr else {
            return Ok(());
        };
        let fail = |source| NotifyError::Send {
            addr: addr.to_string(),
            message: message.lines().next().unwrap_or_default().to_owned(),
            source,
        };
        let socket = UnixDatagram::unbound().map_err(fail)?;
        let sockaddr = addr.socket_addr().map_err(fail)?;
        socket
            .send_to_addr(message.as_bytes(), &sockaddr)
            .map_err(fail)?;
        Ok(())
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)`
/// recommends. `None` when no watchdog is configured, when the value is unusable, or when
/// `WATCHDOG_PID` names another process.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] with the environment values and our pid passed in.
pub fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    our_pid: u32,
) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid.filter(|p| !p.is_empty()) {
        if pid.trim().parse::<u32>().ok()? != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn bound() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (dir, server, Notifier::new(NotifyAddr::Path(path)))
    }

    fn recv(server: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = server.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_each_message_as_one_datagram() {
        let (_dir, server, notifier) = bound();
        assert!(notifier.is_enabled());
        notifier.ready().unwrap();
        notifier.watchdog().unwrap();
        notifier.status("syncing\nREADY=1").unwrap();
        notifier.stopping().unwrap();
        assert_eq!(recv(&server), "READY=1");
        assert_eq!(recv(&server), "WATCHDOG=1");
        assert_eq!(recv(&server), "STATUS=syncing READY=1");
        assert_eq!(recv(&server), "STOPPING=1");
    }

    #[test]
    fn abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("powernode-agentbase-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let addr = NotifyAddr::parse(OsStr::new(&format!("@{name}"))).unwrap();
        assert_eq!(addr, NotifyAddr::Abstract(name.clone().into_bytes()));
        Notifier::new(addr).ready().unwrap();
        assert_eq!(recv(&server), "READY=1");
    }

    #[test]
    fn disabled_is_a_noop() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready().unwrap();
        n.watchdog().unwrap();
        n.stopping().unwrap();
        n.status("x").unwrap();
    }

    #[test]
    fn missing_socket_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.sock");
        let err = Notifier::new(NotifyAddr::Path(path.clone()))
            .ready()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("READY=1"), "{text}");
    }

    #[test]
    fn parse_addresses() {
        assert_eq!(
            NotifyAddr::parse(OsStr::new("/run/systemd/notify")).unwrap(),
            NotifyAddr::Path(PathBuf::from("/run/systemd/notify"))
        );
        for bad in ["", "@", "relative/sock", "vsock:2:1234"] {
            assert!(NotifyAddr::parse(OsStr::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn watchdog_interval_table() {
        let me = 4242;
        let cases: &[(Option<&str>, Option<&str>, Option<Duration>)] = &[
            (None, None, None),
            (Some("30000000"), None, Some(Duration::from_secs(15))),
            (
                Some("30000000"),
                Some("4242"),
                Some(Duration::from_secs(15)),
            ),
            (Some("30000000"), Some(""), Some(Duration::from_secs(15))),
            (Some("30000000"), Some("1"), None),
            (Some("30000000"), Some("junk"), None),
            (Some("0"), None, None),
            (Some("-5"), None, None),
            (Some("abc"), None, None),
            (Some("1000"), None, Some(Duration::from_micros(500))),
        ];
        for (usec, pid, want) in cases {
            assert_eq!(
                watchdog_interval_from(*usec, *pid, me),
                *want,
                "usec={usec:?} pid={pid:?}"
            );
        }
    }
}
