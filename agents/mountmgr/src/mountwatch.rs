//! Noticing changes of the mount table as they happen: the kernel marks `/proc/self/mountinfo`
//! readable with `POLLPRI | POLLERR` each time a mount is added, moved or removed in the
//! process's mount namespace (proc(5)). A thread waits in poll(2) and wakes the agent through a
//! channel that holds at most one pending wake-up, so a burst of changes (a build mounts a
//! dozen things) costs one look at the table.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::mountinfo::MOUNTINFO;

/// How long one poll(2) waits before the thread checks whether the agent still listens.
const POLL_SLICE: Duration = Duration::from_millis(500);

/// Wakes when the mount table has changed. Dropping it stops the thread (within
/// [`POLL_SLICE`]).
#[derive(Debug)]
pub struct MountWatch {
    rx: mpsc::Receiver<()>,
}

impl MountWatch {
    /// Starts watching.
    pub fn start() -> io::Result<MountWatch> {
        let file = File::open(MOUNTINFO)?;
        let (tx, rx) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("mountwatch".to_owned())
            .spawn(move || watch(&file, &tx))?;
        Ok(MountWatch { rx })
    }

    /// Waits for the next change (changes since the last call count as one). Pends forever
    /// if the watching thread has ended (its error is logged).
    pub async fn changed(&mut self) {
        if self.rx.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

fn watch(file: &File, tx: &mpsc::Sender<()>) {
    let slice = i32::try_from(POLL_SLICE.as_millis()).unwrap_or(500);
    while !tx.is_closed() {
        let mut fds = [libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        }];
        // SAFETY: `fds` is a live array of one pollfd for the call; `file` stays open.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, slice) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(error = %e, "watching the mount table failed; drift is noticed at the periodic check only");
            return;
        }
        if rc > 0 && fds[0].revents & (libc::POLLPRI | libc::POLLERR) != 0 {
            // Full means a wake-up is already pending: this change is in it.
            let _ = tx.try_send(());
        }
    }
}
