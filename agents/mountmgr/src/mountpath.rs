//! The mount path (`[mounts] mount_path`): where the union of one target is put for programs to
//! use directly, such as `/opt/powernode`, instead of through the `current` symlink.
//!
//! Two ways, chosen once at start ([`Mode`]):
//!
//! - **Beneath** (Linux 6.5+, `MOVE_MOUNT_BENEATH`): the path carries a copy of the active
//!   stack's overlay mount (`open_tree(2)` + `move_mount(2)`, the same filesystem as
//!   `<slot>/merged`). A switch mounts a copy of the new overlay *beneath* the old one, then
//!   unmounts the old one from above: every lookup of the path, at every instant, lands in one
//!   whole tree, the old or the new.
//! - **Symlink** (older kernels, or `move_beneath = false`): the path is a symlink to the
//!   target's `current`, so the rename of `current` switches it too. A program that resolves
//!   the path sees the old stack or the new one, as through `current`.
//!
//! The mounts exactly at the path belong to mountmgr; what a program mounts below it (inside the
//! union) is left alone. Which mount at the path is which is told by the filesystem's device
//! (`major:minor` in mountinfo), which a copy shares with the overlay it was made from.

use std::io;
use std::path::{Path, PathBuf};

use crate::mountinfo::{self, MountEntry, MountinfoError};
use crate::sys::{self, SysError};

/// Most actions one [`MountPath::reconcile`] takes before giving up (each one removes or adds
/// one mount at the path).
const MAX_STEPS: usize = 16;

/// How the union is put at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A copy of the active overlay mounted at the path; switched beneath.
    Beneath,
    /// A symlink to the target's `current`.
    Symlink,
}

/// Why the path could not be made to show a stack.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// A mount or unmount failed.
    #[error("mount path: {0}")]
    Sys(#[from] SysError),
    /// The mount table could not be read.
    #[error("mount path: {0}")]
    Mountinfo(#[from] MountinfoError),
    /// The stack to show is not mounted.
    #[error("mount path {}: the stack at {} is not mounted", .path.display(), .merged.display())]
    NotMounted {
        /// The mount path.
        path: PathBuf,
        /// The overlay that should be there.
        merged: PathBuf,
    },
    /// The path cannot be made what the mode needs.
    #[error("mount path {}: {error}", .path.display())]
    Place {
        /// The mount path.
        path: PathBuf,
        /// What is in the way.
        error: io::Error,
    },
    /// The mounts at the path did not settle.
    #[error("mount path {}: still not the active stack after {MAX_STEPS} steps", .0.display())]
    Unsettled(PathBuf),
}

/// The mount path of one target.
#[derive(Debug, Clone)]
pub struct MountPath {
    /// The path, under the root.
    pub path: PathBuf,
    /// How the union is put there.
    pub mode: Mode,
    /// The target's `current` (what the symlink names in [`Mode::Symlink`]).
    pub current: PathBuf,
}

impl MountPath {
    /// Makes the path ready for its mode: a directory for [`Mode::Beneath`] (an old symlink of
    /// ours is replaced), nothing to do yet for [`Mode::Symlink`] (the link is made with the
    /// first stack).
    pub fn prepare(&self) -> Result<(), PathError> {
        let place = |error| PathError::Place {
            path: self.path.clone(),
            error,
        };
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).map_err(place)?;
        }
        if self.mode == Mode::Beneath {
            if std::fs::read_link(&self.path).is_ok() {
                std::fs::remove_file(&self.path).map_err(place)?;
            }
            match std::fs::create_dir(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(place(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// The mounts at the path, bottom first.
    pub fn mounts<'a>(&self, entries: &'a [MountEntry]) -> Vec<&'a MountEntry> {
        mountinfo::stack_at(entries, &self.path)
    }

    /// How the path differs from showing the overlay at `merged` (`None`: nothing active, so
    /// nothing of ours should be there). `Ok` if it shows exactly that.
    pub fn check(&self, entries: &[MountEntry], merged: Option<&Path>) -> Result<(), String> {
        match self.mode {
            Mode::Beneath => {
                let stack = self.mounts(entries);
                let want = merged.map(|m| overlay_dev(entries, m));
                match (want, stack.as_slice()) {
                    (None, []) => Ok(()),
                    (None, _) => Err(format!(
                        "{} has {} mounts and no stack is active",
                        self.path.display(),
                        stack.len()
                    )),
                    (Some(None), _) => Ok(()), // The stack itself is not mounted: its check says so.
                    (Some(Some(_)), []) => Err(format!("{} is not mounted", self.path.display())),
                    (Some(Some(dev)), [one]) if one.dev == dev => Ok(()),
                    (Some(Some(dev)), _) => {
                        let ours = stack.iter().filter(|e| e.dev == dev).count();
                        Err(format!(
                            "{} has {} mounts, {ours} of them the active stack{}",
                            self.path.display(),
                            stack.len(),
                            if stack.last().is_some_and(|e| e.dev == dev) {
                                ", on top"
                            } else {
                                ", not on top"
                            }
                        ))
                    }
                }
            }
            Mode::Symlink => {
                let link = std::fs::read_link(&self.path).ok();
                match (merged, link) {
                    (None, None) => Ok(()),
                    (None, Some(_)) => Ok(()), // A dangling link to a torn-down `current`.
                    (Some(_), Some(link)) if link == self.current => Ok(()),
                    (Some(_), Some(link)) => Err(format!(
                        "{} points to {}, not {}",
                        self.path.display(),
                        link.display(),
                        self.current.display()
                    )),
                    (Some(_), None) => Err(format!(
                        "{} is not a symlink to {}",
                        self.path.display(),
                        self.current.display()
                    )),
                }
            }
        }
    }

    /// Puts the stack whose overlay is at `merged` at the path, for a switch: in
    /// [`Mode::Beneath`] beneath whatever is on top there (or on the bare path), leaving the
    /// old stack on top for [`MountPath::reconcile`] to take away; in [`Mode::Symlink`] the
    /// link to `current` (already renamed) is made if it is missing.
    pub fn stage(&self, merged: &Path) -> Result<(), PathError> {
        match self.mode {
            Mode::Beneath => {
                let entries = mountinfo::read()?;
                let covered = !self.mounts(&entries).is_empty();
                sys::mount_copy(merged, &self.path, covered)?;
                Ok(())
            }
            Mode::Symlink => self.reconcile(Some(merged)).map(|_| ()),
        }
    }

    /// Makes the path show exactly the overlay at `merged` (`None`: nothing of ours), from
    /// whatever is there: a stack switched beneath the old one (the old one is unmounted from
    /// above), a path unmounted by hand, a stack mounted twice. In [`Mode::Beneath`] the path
    /// never shows less than a whole tree on the way, as long as it showed one before; it can
    /// show an older stack for an instant while a covered mount is taken out. Returns what it
    /// did, in words (empty: nothing was needed).
    pub fn reconcile(&self, merged: Option<&Path>) -> Result<Vec<String>, PathError> {
        let mut done = Vec::new();
        if self.mode == Mode::Symlink {
            let wrong = match merged {
                Some(_) => std::fs::read_link(&self.path).ok() != Some(self.current.clone()),
                None => false,
            };
            if wrong {
                self.link()?;
                done.push(format!(
                    "pointed {} to {}",
                    self.path.display(),
                    self.current.display()
                ));
            }
            return Ok(done);
        }
        for _ in 0..MAX_STEPS {
            let entries = mountinfo::read()?;
            let stack = self.mounts(&entries);
            let want = match merged {
                Some(m) => Some(
                    overlay_dev(&entries, m).ok_or_else(|| PathError::NotMounted {
                        path: self.path.clone(),
                        merged: m.to_owned(),
                    })?,
                ),
                None => None,
            };
            let (Some(top), Some(dev)) = (stack.last(), want.as_deref()) else {
                match (stack.last(), merged) {
                    (None, None) => return Ok(done),
                    (None, Some(m)) => {
                        sys::mount_copy(m, &self.path, false)?;
                        done.push(format!(
                            "mounted the active stack at {}",
                            self.path.display()
                        ));
                    }
                    (Some(_), _) => {
                        sys::unmount(&self.path)?;
                        done.push(format!(
                            "unmounted a stray mount at {}",
                            self.path.display()
                        ));
                    }
                }
                continue;
            };
            let below = stack.len().checked_sub(2).map(|i| stack[i]);
            if top.dev == dev && stack.len() == 1 {
                return Ok(done);
            }
            if top.dev == dev || below.is_some_and(|b| b.dev == dev) {
                // Either the active stack is on top of others (mounted twice, or something
                // left beneath it), or it is right beneath the mount on top: take the top off.
                sys::unmount(&self.path)?;
                done.push(format!(
                    "unmounted the mount on top at {}",
                    self.path.display()
                ));
            } else if let Some(m) = merged {
                sys::mount_copy(m, &self.path, true)?;
                done.push(format!(
                    "mounted the active stack beneath the top mount at {}",
                    self.path.display()
                ));
            }
        }
        Err(PathError::Unsettled(self.path.clone()))
    }

    /// Takes everything of ours off the path: every mount at it, or our symlink.
    pub fn clear(&self) -> Result<(), PathError> {
        match self.mode {
            Mode::Beneath => self.reconcile(None).map(|_| ()),
            Mode::Symlink => {
                if std::fs::read_link(&self.path).ok() == Some(self.current.clone()) {
                    std::fs::remove_file(&self.path).map_err(|error| PathError::Place {
                        path: self.path.clone(),
                        error,
                    })?;
                }
                Ok(())
            }
        }
    }

    /// Points the path at `current`: a new link beside it, renamed over it (an empty directory
    /// there is removed first; anything else is in the way).
    fn link(&self) -> Result<(), PathError> {
        let place = |error| PathError::Place {
            path: self.path.clone(),
            error,
        };
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).map_err(place)?;
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.is_dir() {
                std::fs::remove_dir(&self.path).map_err(place)?;
            }
        }
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".powernode-tmp");
        let tmp = PathBuf::from(tmp);
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(place(e)),
            _ => {}
        }
        std::os::unix::fs::symlink(&self.current, &tmp).map_err(place)?;
        if let Err(e) = std::fs::rename(&tmp, &self.path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(place(e));
        }
        if let Some(parent) = self.path.parent() {
            sys::fsync_dir(parent).map_err(place)?;
        }
        Ok(())
    }
}

/// The device of the overlay mounted at `merged` (the last one there, if several).
fn overlay_dev(entries: &[MountEntry], merged: &Path) -> Option<String> {
    mountinfo::stack_at(entries, merged)
        .last()
        .filter(|e| e.fs_type == "overlay")
        .map(|e| e.dev.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u32, parent: u32, mount_point: &str, dev: &str, fs_type: &str) -> MountEntry {
        MountEntry {
            id,
            parent,
            dev: dev.to_owned(),
            mount_point: PathBuf::from(mount_point),
            fs_type: fs_type.to_owned(),
            source: PathBuf::from(fs_type),
            super_options: String::new(),
        }
    }

    #[test]
    fn check_table() {
        let path = MountPath {
            path: PathBuf::from("/r/opt/pn"),
            mode: Mode::Beneath,
            current: PathBuf::from("/r/run/powernode-mounts/app/current"),
        };
        let merged_a = Path::new("/r/m/app/A/merged");
        let slots = vec![
            entry(2, 1, "/r/m/app/A/merged", "0:50", "overlay"),
            entry(3, 1, "/r/m/app/B/merged", "0:60", "overlay"),
        ];
        let with = |extra: &[MountEntry]| {
            let mut all = slots.clone();
            all.extend_from_slice(extra);
            all
        };
        let at = |id, parent, dev| entry(id, parent, "/r/opt/pn", dev, "overlay");
        /// Mounts at or below the path, the active stack's overlay, what the check says.
        type Row<'a> = (Vec<MountEntry>, Option<&'a Path>, Result<(), &'a str>);
        let rows: Vec<Row> = vec![
            (vec![at(10, 1, "0:50")], Some(merged_a), Ok(())),
            (vec![], Some(merged_a), Err("is not mounted")),
            (vec![], None, Ok(())),
            (vec![at(10, 1, "0:50")], None, Err("no stack is active")),
            // Mounted twice.
            (
                vec![at(10, 1, "0:50"), at(11, 10, "0:50")],
                Some(merged_a),
                Err("2 mounts, 2 of them the active stack, on top"),
            ),
            // The old stack still on top of the new one (a switch cut short).
            (
                vec![at(11, 10, "0:60"), at(10, 1, "0:50")],
                Some(merged_a),
                Err("2 mounts, 1 of them the active stack, not on top"),
            ),
            // Something mounted inside the union is not ours to judge.
            (
                vec![
                    at(10, 1, "0:50"),
                    entry(12, 10, "/r/opt/pn/data", "0:70", "tmpfs"),
                ],
                Some(merged_a),
                Ok(()),
            ),
        ];
        for (i, (extra, merged, want)) in rows.into_iter().enumerate() {
            let got = path.check(&with(&extra), merged);
            match want {
                Ok(()) => assert_eq!(got, Ok(()), "row {i}"),
                Err(text) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(text)),
                    "row {i}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn symlink_mode() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join("run/powernode-mounts/app/current");
        let path = MountPath {
            path: dir.path().join("opt/pn"),
            mode: Mode::Symlink,
            current: current.clone(),
        };
        let merged = Path::new("/x/A/merged");
        path.prepare().unwrap();
        assert!(path.check(&[], Some(merged)).is_err());
        // An empty directory in the way is replaced.
        std::fs::create_dir_all(&path.path).unwrap();
        assert_eq!(path.reconcile(Some(merged)).unwrap().len(), 1);
        assert_eq!(std::fs::read_link(&path.path).unwrap(), current);
        assert_eq!(path.check(&[], Some(merged)), Ok(()));
        assert!(path.reconcile(Some(merged)).unwrap().is_empty());
        path.clear().unwrap();
        assert!(std::fs::symlink_metadata(&path.path).is_err());
        // A directory with something in it is not ours to remove.
        std::fs::create_dir_all(path.path.join("x")).unwrap();
        assert!(path.stage(merged).is_err());
        assert!(path.path.join("x").is_dir());
    }
}
