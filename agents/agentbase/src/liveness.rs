//! The touch file that proves an agent's main loop is still turning (as EVE's agents do).
//!
//! Each agent's main loop calls [`Liveness::beat`] every time round. A beat refreshes the mtime
//! of `<run>/<agent>.touch` and, when systemd runs the agent with a watchdog, sends
//! `WATCHDOG=1`. Beats are rate-limited — the disk and the socket are touched at most once per
//! second, or once per watchdog interval if that is shorter — so calling it in a hot loop costs
//! one clock read and one atomic load.
//!
//! A watcher (the operator CLI, a test, a supervisor) decides an agent is stuck when the touch
//! file is older than a few times `touch_interval_s`.

use std::fs::{FileTimes, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::notify::{self, Notifier, NotifyError};
use crate::root::Root;

/// The most often a beat touches the disk.
pub const MIN_BEAT_GAP: Duration = Duration::from_secs(1);

/// A beat failed.
#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    /// The touch file or its directory could not be created or updated.
    #[error("touching {}: {source}", path.display())]
    Touch {
        /// The file or directory that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// `WATCHDOG=1` could not be sent.
    #[error(transparent)]
    Watchdog(#[from] NotifyError),
}

/// An agent's touch file and systemd watchdog. Cheap to clone; clones share the rate limit.
#[derive(Debug, Clone)]
pub struct Liveness {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    notifier: Notifier,
    watchdog: Option<Duration>,
    min_gap: Duration,
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last beat, plus one; 0 before the first beat.
    last: AtomicU64,
    /// Whether the last beat failed, so a failure is logged once and a recovery once.
    failing: AtomicBool,
}

impl Liveness {
    /// The touch file `<run>/<agent>.touch` under `root`, with the watchdog taken from the
    /// environment (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn new(root: &Root, agent: &str) -> Liveness {
        Liveness::with_notifier(
            root,
            agent,
            Notifier::from_env(),
            notify::watchdog_interval(),
        )
    }

    /// Like [`Liveness::new`], with the notifier and the watchdog interval given explicitly
    /// (`None`: no watchdog, never send `WATCHDOG=1`).
    pub fn with_notifier(
        root: &Root,
        agent: &str,
        notifier: Notifier,
        watchdog: Option<Duration>,
    ) -> Liveness {
        let min_gap = watchdog.map_or(MIN_BEAT_GAP, |w| w.min(MIN_BEAT_GAP));
        Liveness::from_parts(root.touch_file(agent), notifier, watchdog, min_gap)
    }

    fn from_parts(
        path: PathBuf,
        notifier: Notifier,
        watchdog: Option<Duration>,
        min_gap: Duration,
    ) -> Liveness {
        Liveness {
            inner: Arc::new(Inner {
                path,
                notifier,
                watchdog,
                min_gap,
                epoch: Instant::now(),
                last: AtomicU64::new(0),
                failing: AtomicBool::new(false),
            }),
        }
    }

    /// The touch file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How often systemd wants `WATCHDOG=1`, if it runs us with a watchdog. A main loop must
    /// beat at least this often.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.inner.watchdog
    }

    /// Proves the main loop is alive. Never fails: a failure is logged once (and a recovery
    /// once), so a full or read-only run directory cannot stop an agent or flood its log.
    pub fn beat(&self) {
        match self.try_beat() {
            Ok(_) => {
                if self.inner.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %self.inner.path.display(), "liveness beat recovered");
                }
            }
            Err(err) => {
                if !self.inner.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %err, "liveness beat failed");
                }
            }
        }
    }

    /// Like [`Liveness::beat`], but reports what happened: `Ok(true)` if this call touched the
    /// file, `Ok(false)` if it was within the rate limit (or another thread beat at the same
    /// moment). A touch failure is reported after the watchdog has still been fed: the process
    /// is alive even when its run directory is not writable.
    pub fn try_beat(&self) -> Result<bool, LivenessError> {
        let inner = &self.inner;
        let now = u64::try_from(inner.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let last = inner.last.load(Ordering::Relaxed);
        let gap = u64::try_from(inner.min_gap.as_nanos()).unwrap_or(u64::MAX);
        if last != 0 && now.saturating_sub(last) < gap {
            return Ok(false);
        }
        if inner
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return Ok(false);
        }
        let touched = touch(&inner.path);
        if inner.watchdog.is_some() {
            inner.notifier.watchdog()?;
        }
        touched.map(|()| true)
    }
}

/// Creates `path` (and its directory) if needed and sets its access and modification times to
/// now.
fn touch(path: &Path) -> Result<(), LivenessError> {
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |source| LivenessError::Touch { path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail(dir))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(fail(path))?;
    let now = SystemTime::now();
    file.set_times(FileTimes::new().set_accessed(now).set_modified(now))
        .map_err(fail(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::NotifyAddr;
    use std::os::unix::net::UnixDatagram;

    fn mtime(path: &Path) -> SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    fn set_old_mtime(path: &Path) -> SystemTime {
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let file = OpenOptions::new().write(true).open(path).unwrap();
        file.set_modified(old).unwrap();
        assert_eq!(mtime(path), old);
        old
    }

    #[test]
    fn first_beat_creates_dir_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let live = Liveness::with_notifier(&root, "testagent", Notifier::disabled(), None);
        assert_eq!(
            live.path(),
            dir.path().join("run/powernode/testagent.touch")
        );
        assert!(live.try_beat().unwrap());
        assert!(live.path().is_file());
    }

    #[test]
    fn beat_moves_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.touch");
        let live = Liveness::from_parts(path.clone(), Notifier::disabled(), None, Duration::ZERO);
        assert!(live.try_beat().unwrap());
        let old = set_old_mtime(&path);
        let before = SystemTime::now() - Duration::from_secs(1);
        assert!(live.try_beat().unwrap());
        let after = mtime(&path);
        assert!(after > old);
        assert!(after >= before, "mtime {after:?} older than {before:?}");
    }

    #[test]
    fn beats_are_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let live = Liveness::with_notifier(&root, "hot", Notifier::disabled(), None);
        assert!(live.try_beat().unwrap());
        let old = set_old_mtime(live.path());
        let clone = live.clone();
        for _ in 0..10_000 {
            assert!(!clone.try_beat().unwrap());
            live.beat();
        }
        assert_eq!(
            mtime(live.path()),
            old,
            "a rate-limited beat touched the disk"
        );
    }

    #[test]
    fn watchdog_is_fed_on_beat() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&sock).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let root = Root::new(dir.path());
        let notifier = Notifier::new(NotifyAddr::Path(sock));
        let live = Liveness::with_notifier(&root, "wd", notifier, Some(Duration::from_secs(10)));
        assert_eq!(live.watchdog_interval(), Some(Duration::from_secs(10)));
        assert!(live.try_beat().unwrap());
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn short_watchdog_shortens_the_gap() {
        let root = Root::new("/r");
        let live = Liveness::with_notifier(
            &root,
            "wd",
            Notifier::disabled(),
            Some(Duration::from_millis(200)),
        );
        assert_eq!(live.inner.min_gap, Duration::from_millis(200));
        let live = Liveness::with_notifier(&root, "wd", Notifier::disabled(), None);
        assert_eq!(live.inner.min_gap, MIN_BEAT_GAP);
    }

    #[test]
    fn touch_failure_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // The run directory's parent is a regular file, so it cannot be created.
        std::fs::write(dir.path().join("run"), "").unwrap();
        let root = Root::new(dir.path());
        let live = Liveness::with_notifier(&root, "broken", Notifier::disabled(), None);
        let err = live.try_beat().unwrap_err();
        assert!(
            err.to_string().contains("run/powernode"),
            "error does not name the path: {err}"
        );
        // beat() swallows it.
        live.beat();
    }
}
