//! The `current` symlink: which slot is the active stack.
//!
//! It is never edited in place. A switch writes the new link as `current.tmp` beside it,
//! renames that over `current` (rename(2) replaces a name atomically: every reader sees the
//! old slot or the new one, never nothing) and fsyncs the directory so the switch survives a
//! crash. This is Bottlerocket migrator's `flip_to_new_version`.

use std::io;
use std::path::{Path, PathBuf};

use powernode_types::Slot;

use crate::layout::{Layout, CURRENT, CURRENT_TMP};
use crate::sys::fsync_dir;

/// How a switch failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The new link could not be written or renamed: `current` is unchanged.
    #[error("switching {} to {}: {error}", .path.display(), .link.display())]
    NotSwitched {
        /// The `current` link.
        path: PathBuf,
        /// What it was to point to.
        link: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The rename happened but the directory could not be synced: `current` points to the
    /// new slot now, but a power loss could bring the old link back.
    #[error("syncing {} after the switch: {error}", .dir.display())]
    NotDurable {
        /// The target directory.
        dir: PathBuf,
        /// The error.
        error: io::Error,
    },
}

/// The slot `current` in `target_dir` points to; `None` if it is missing or points anywhere
/// else than `A/merged` or `B/merged`.
pub fn read(target_dir: &Path) -> Option<Slot> {
    let link = std::fs::read_link(target_dir.join(CURRENT)).ok()?;
    [Slot::A, Slot::B]
        .into_iter()
        .find(|slot| link == Layout::current_link(*slot))
}

/// Points `current` in `target_dir` at `slot`: link beside, rename over, fsync the directory.
pub fn switch(target_dir: &Path, slot: Slot) -> Result<(), SwitchError> {
    let path = target_dir.join(CURRENT);
    let tmp = target_dir.join(CURRENT_TMP);
    let link = Layout::current_link(slot);
    let not_switched = |error| SwitchError::NotSwitched {
        path: path.clone(),
        link: link.clone(),
        error,
    };
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(not_switched(e)),
    }
    std::os::unix::fs::symlink(&link, &tmp).map_err(not_switched)?;
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(not_switched(e));
    }
    fsync_dir(target_dir).map_err(|error| SwitchError::NotDurable {
        dir: target_dir.to_owned(),
        error,
    })
}

/// Removes `current` (and a stale `current.tmp`) and syncs the directory. Missing is fine.
pub fn remove(target_dir: &Path) -> io::Result<()> {
    for name in [CURRENT_TMP, CURRENT] {
        match std::fs::remove_file(target_dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match fsync_dir(target_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes a `current.tmp` left by a switch that was interrupted before its rename.
pub fn remove_stale_tmp(target_dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(target_dir.join(CURRENT_TMP)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_read_remove() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        switch(dir.path(), Slot::A).unwrap();
        assert_eq!(read(dir.path()), Some(Slot::A));
        assert_eq!(
            std::fs::read_link(dir.path().join(CURRENT)).unwrap(),
            PathBuf::from("A/merged")
        );
        // A stale temporary from an interrupted switch does not get in the way.
        std::os::unix::fs::symlink("junk", dir.path().join(CURRENT_TMP)).unwrap();
        switch(dir.path(), Slot::B).unwrap();
        assert_eq!(read(dir.path()), Some(Slot::B));
        assert!(!dir.path().join(CURRENT_TMP).exists());
        remove(dir.path()).unwrap();
        assert_eq!(read(dir.path()), None);
        remove(dir.path()).unwrap();
    }

    #[test]
    fn foreign_links_are_not_slots() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join(CURRENT)).unwrap();
        assert_eq!(read(dir.path()), None);
    }

    #[test]
    fn rename_over_a_directory_fails_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(CURRENT).join("x")).unwrap();
        let err = switch(dir.path(), Slot::A).unwrap_err();
        assert!(matches!(err, SwitchError::NotSwitched { .. }), "{err}");
        assert!(dir.path().join(CURRENT).join("x").is_dir());
        assert!(!dir.path().join(CURRENT_TMP).exists());
    }
}
