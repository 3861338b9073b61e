//! Where mountmgr keeps things, and the names it accepts as path components.
//!
//! ```text
//! <root>/run/powernode-mounts/<target>/
//!     base/                     empty, mode 0555: the bottom lower of every stack
//!     A/ B/                     the two slots
//!         layers/<i>-<name>/    one read-only erofs mount per layer, i = 0 at the bottom
//!         upper/                tmpfs holding upper/ and work/ (UpperMode::Tmpfs)
//!         merged/               the overlay
//!     current -> A/merged       the active stack; replaced by rename(2), never edited
//! <root>/persist/powernode/mountmgr/<target>.json(.sha256)   the applied stack (record.rs)
//! ```

use std::path::{Component, Path, PathBuf};

use powernode_types::Slot;

/// The directory every target lives in, relative to the root.
pub const MOUNTS_DIR: &str = "run/powernode-mounts";
/// The directory the applied-stack records live in, relative to the root.
pub const RECORDS_DIR: &str = "persist/powernode/mountmgr";
/// The symlink naming the active slot's `merged/`.
pub const CURRENT: &str = "current";
/// What a new `current` is written as before it is renamed over the old one.
pub const CURRENT_TMP: &str = "current.tmp";
/// Longest accepted target name.
pub const MAX_NAME: usize = 64;

/// A target or layer name that cannot be a path component.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} name {name:?} is not usable: {reason}")]
pub struct NameError {
    /// `target` or `layer`.
    pub what: &'static str,
    /// The name as given.
    pub name: String,
    /// Why it is refused.
    pub reason: &'static str,
}

/// A persistent upper path that is not a plain relative path under the root.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("persistent upper path {path:?}: {reason}")]
pub struct UpperPathError {
    /// The path as given.
    pub path: String,
    /// Why it is refused.
    pub reason: &'static str,
}

/// Checks that a target name can name a directory: 1 to [`MAX_NAME`] characters out of
/// `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn check_target_name(name: &str) -> Result<(), NameError> {
    let error = |reason| NameError {
        what: "target",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(error("empty"));
    }
    if name.len() > MAX_NAME {
        return Err(error("longer than 64 characters"));
    }
    if name.starts_with('.') {
        return Err(error("starts with a dot"));
    }
    if !name.bytes().all(is_name_byte) {
        return Err(error("only letters, digits, '.', '_' and '-' are allowed"));
    }
    Ok(())
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// The directory name of layer `index` called `name`: `<index>-<name>` with every character
/// outside `A-Z a-z 0-9 . _ -` replaced by `_` and the name cut at 48 bytes. The index keeps
/// two layers apart even when their names sanitise alike.
pub fn layer_dir_name(index: usize, name: &str) -> String {
    let clean: String = name
        .bytes()
        .take(48)
        .map(|b| if is_name_byte(b) { b as char } else { '_' })
        .collect();
    format!("{index}-{clean}")
}

/// Resolves a persistent upper directory: a relative path without `..`, under the root.
pub fn persistent_dir(root: &Path, rel: &str) -> Result<PathBuf, UpperPathError> {
    let error = |reason| UpperPathError {
        path: rel.to_owned(),
        reason,
    };
    let path = Path::new(rel);
    if rel.is_empty() {
        return Err(error("empty"));
    }
    let mut out = root.to_owned();
    let mut parts = 0;
    for component in path.components() {
        match component {
            Component::Normal(part) => {
                out.push(part);
                parts += 1;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(error("must be relative to the root, not absolute"))
            }
            Component::ParentDir => return Err(error("must not contain \"..\"")),
        }
    }
    if parts == 0 {
        return Err(error("names the root itself"));
    }
    Ok(out)
}

/// The letter of a slot, as used in paths.
pub fn slot_name(slot: Slot) -> &'static str {
    match slot {
        Slot::A => "A",
        Slot::B => "B",
    }
}

/// The slot that is not `slot`.
pub fn other(slot: Slot) -> Slot {
    match slot {
        Slot::A => Slot::B,
        Slot::B => Slot::A,
    }
}

/// The paths of one root. Built from the canonical root, so that the paths it hands out are
/// exactly the ones the kernel prints in mountinfo.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
    mounts: PathBuf,
    records: PathBuf,
}

impl Layout {
    /// The layout under `root`, which must exist (it is canonicalised).
    pub fn new(root: &Path) -> std::io::Result<Layout> {
        let root = std::fs::canonicalize(root)?;
        Ok(Layout {
            mounts: root.join(MOUNTS_DIR),
            records: root.join(RECORDS_DIR),
            root,
        })
    }

    /// The canonical root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/run/powernode-mounts`.
    pub fn mounts_dir(&self) -> &Path {
        &self.mounts
    }

    /// `<root>/persist/powernode/mountmgr`.
    pub fn records_dir(&self) -> &Path {
        &self.records
    }

    /// `<mounts>/<target>`.
    pub fn target_dir(&self, target: &str) -> PathBuf {
        self.mounts.join(target)
    }

    /// `<mounts>/<target>/base`.
    pub fn base_dir(&self, target: &str) -> PathBuf {
        self.target_dir(target).join("base")
    }

    /// `<mounts>/<target>/<slot>`.
    pub fn slot_dir(&self, target: &str, slot: Slot) -> PathBuf {
        self.target_dir(target).join(slot_name(slot))
    }

    /// `<mounts>/<target>/<slot>/layers`.
    pub fn layers_dir(&self, target: &str, slot: Slot) -> PathBuf {
        self.slot_dir(target, slot).join("layers")
    }

    /// `<mounts>/<target>/<slot>/upper`: the tmpfs mount point.
    pub fn upper_mount(&self, target: &str, slot: Slot) -> PathBuf {
        self.slot_dir(target, slot).join("upper")
    }

    /// The overlay's upper directory (where the stack's writes are) for `upper`: in the slot's
    /// tmpfs, or in the persistent directory. What `powernode-agent commit` captures.
    pub fn upper_dir(
        &self,
        target: &str,
        slot: Slot,
        upper: &powernode_types::UpperMode,
    ) -> Result<PathBuf, UpperPathError> {
        Ok(match upper {
            powernode_types::UpperMode::Tmpfs => self.upper_mount(target, slot).join("upper"),
            powernode_types::UpperMode::Persistent { path } => {
                persistent_dir(&self.root, path)?.join("upper")
            }
        })
    }

    /// `<mounts>/<target>/<slot>/merged`: the overlay.
    pub fn merged(&self, target: &str, slot: Slot) -> PathBuf {
        self.slot_dir(target, slot).join("merged")
    }

    /// `<mounts>/<target>/current`.
    pub fn current(&self, target: &str) -> PathBuf {
        self.target_dir(target).join(CURRENT)
    }

    /// What `current` points to for `slot`: a relative link, so it stays right whatever the
    /// root is mounted as.
    pub fn current_link(slot: Slot) -> PathBuf {
        Path::new(slot_name(slot)).join("merged")
    }

    /// The names of the target directories that exist.
    pub fn existing_targets(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.mounts) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names() {
        for good in ["app", "root-fs", "a.b_c-1", &"x".repeat(64)] {
            assert_eq!(check_target_name(good), Ok(()), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "ä", &"x".repeat(65)] {
            assert!(check_target_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn layer_dir_names() {
        assert_eq!(layer_dir_name(0, "tools"), "0-tools");
        assert_eq!(layer_dir_name(3, "org/x y:z"), "3-org_x_y_z");
        assert_eq!(layer_dir_name(1, "../.."), "1-.._..");
        assert_eq!(layer_dir_name(2, &"n".repeat(100)).len(), 2 + 48);
    }

    #[test]
    fn persistent_dirs() {
        let root = Path::new("/r");
        assert_eq!(
            persistent_dir(root, "persist/app").unwrap(),
            PathBuf::from("/r/persist/app")
        );
        assert_eq!(
            persistent_dir(root, "./persist//app/").unwrap(),
            PathBuf::from("/r/persist/app")
        );
        for (bad, why) in [
            ("/persist/app", "absolute"),
            ("persist/../../etc", ".."),
            ("..", ".."),
            ("", "empty"),
            (".", "root itself"),
        ] {
            let err = persistent_dir(root, bad).unwrap_err();
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn paths() {
        let layout = Layout {
            root: PathBuf::from("/r"),
            mounts: PathBuf::from("/r/run/powernode-mounts"),
            records: PathBuf::from("/r/persist/powernode/mountmgr"),
        };
        assert_eq!(
            layout.merged("app", Slot::B),
            PathBuf::from("/r/run/powernode-mounts/app/B/merged")
        );
        assert_eq!(Layout::current_link(Slot::A), PathBuf::from("A/merged"));
        assert_eq!(other(Slot::A), Slot::B);
    }
}
