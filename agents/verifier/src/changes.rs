//! When the trust policies changed: inotify on the trust directory for promptness, a slow
//! poll for a directory that was replaced (or an inotify that cannot be had), and a short
//! settling time, so that an editor's temp files or a policy written in two steps count as one
//! change, taken once the files are still.
//!
//! A change is what alters the directory's listing: a file's name, size or modification time.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use agentbase::watch::DirWatch;
use tokio::time::{Instant, Interval};

/// How long the files must stay still before a change counts.
pub const SETTLE: Duration = Duration::from_millis(300);
/// How often the directory is listed besides inotify.
pub const POLL: Duration = Duration::from_secs(30);

/// One file as listed.
type Listed = (std::ffi::OsString, u64, Option<SystemTime>);

/// The changes of one directory.
pub struct PolicyChanges {
    dir: PathBuf,
    watch: Option<DirWatch>,
    poll: Interval,
    listing: Vec<Listed>,
    settle_until: Option<Instant>,
}

impl std::fmt::Debug for PolicyChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyChanges")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl PolicyChanges {
    /// Starts watching `dir` (created if missing) as it is now.
    pub fn new(dir: &Path) -> PolicyChanges {
        let watch = DirWatch::new(dir)
            .inspect_err(|e| {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the trust policies; polling every {}s", POLL.as_secs());
            })
            .ok();
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        PolicyChanges {
            dir: dir.to_owned(),
            watch,
            poll,
            listing: listing(dir),
            settle_until: None,
        }
    }

    /// Whether the directory was seen changing and has not been still long enough yet: a
    /// verdict reached now may be under the old policy or a half-written one.
    pub fn settling(&self) -> bool {
        self.settle_until.is_some()
    }

    /// Waits for the next change. Cancel-safe: what was seen so far is kept in `self`.
    pub async fn next(&mut self) {
        loop {
            let settle_until = self.settle_until;
            tokio::select! {
                changed = async { self.watch.as_mut()?.changed().await.ok() }, if self.watch.is_some() => {
                    if changed.is_none() {
                        tracing::warn!("watching the trust policies failed; polling every {}s", POLL.as_secs());
                        self.watch = None;
                    }
                    self.settle_until = Some(Instant::now() + SETTLE);
                }
                _ = self.poll.tick() => {
                    if listing(&self.dir) != self.listing && self.settle_until.is_none() {
                        self.settle_until = Some(Instant::now() + SETTLE);
                    }
                }
                () = tokio::time::sleep_until(settle_until.unwrap_or_else(Instant::now)), if settle_until.is_some() => {
                    self.settle_until = None;
                    let now = listing(&self.dir);
                    if now != self.listing {
                        self.listing = now;
                        return;
                    }
                }
            }
        }
    }
}

/// The directory's files: name, size and modification time, sorted by name. An unreadable
/// directory lists as empty (its reappearance is then a change).
fn listing(dir: &Path) -> Vec<Listed> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<Listed> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let meta = e.metadata().ok();
            (
                e.file_name(),
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            )
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_edit_is_one_change_once_the_files_are_still() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("default.toml"), "keys = []\n").unwrap();
        let mut changes = PolicyChanges::new(dir.path());

        // Written in two steps, close together: one change.
        std::fs::write(dir.path().join("default.toml"), "keys = [\"a.pub\"]\n").unwrap();
        std::fs::write(dir.path().join("a.pub"), "key").unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .expect("the edit is seen");
        assert!(
            tokio::time::timeout(SETTLE * 3, changes.next())
                .await
                .is_err(),
            "the two writes made one change"
        );

        // A file opened and closed unchanged is no change at all.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("a.pub"))
            .unwrap();
        assert!(tokio::time::timeout(SETTLE * 3, changes.next())
            .await
            .is_err());
    }
}
