//! Notices changes to a directory at once (inotify): modulemgr's local assignments, so
//! `attach` does not wait for a poll, and the verifier's trust policies, so an edit re-checks
//! the modules. Callers keep a slow poll as a safety net: a directory that is replaced, or an
//! inotify that cannot be had, only delays a change to the next poll.

use std::os::fd::AsFd;
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;

/// A watch on one directory.
pub struct DirWatch {
    fd: AsyncFd<InotifyFd>,
}

impl std::fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatch").finish_non_exhaustive()
    }
}

impl DirWatch {
    /// Watches `dir` (created if missing) for files created, written, moved or removed.
    pub fn new(dir: &Path) -> std::io::Result<DirWatch> {
        std::fs::create_dir_all(dir)?;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        inotify.add_watch(
            dir,
            AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_CREATE,
        )?;
        // SAFETY: `InotifyFd` owns the inotify descriptor and returns that same open
        // descriptor from every `as_raw_fd` call; it is closed only when the `AsyncFd` (its
        // owner) is dropped.
        let fd = unsafe { AsyncFd::register(InotifyFd(inotify)) }?;
        Ok(DirWatch { fd })
    }

    /// Waits until something changed in the directory (the events themselves are drained:
    /// the caller re-reads the directory).
    pub async fn changed(&mut self) -> std::io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(events) if !events.is_empty() => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// `AsyncFd` wants `AsRawFd`, which `Inotify` does not implement (it has `AsFd`).
struct InotifyFd(Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_fd().as_raw_fd()
    }
}
