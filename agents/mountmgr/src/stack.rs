//! One stack in one slot: planned from a `MountConfig`, built (layers, upper, overlay),
//! compared with what mountinfo says is mounted, and torn down.
//!
//! Mount calls are short and made inline by the agent's task; the one step that can take long,
//! the health checks, lives in [`crate::check`] and is async.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use powernode_types::{HealthCheck, MountConfig, MountLayer, Slot, UpperMode};

use crate::layout::{self, Layout, NameError, UpperPathError};
use crate::mountinfo::{self, MountEntry, MountinfoError};
use crate::record::LoopRecord;
use crate::sys::{self, SysError, Unmounted};

/// Why a stack could not be planned, built or torn down. The display is what `MountStatus`
/// reports, so it names the layer and the path that failed.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The target name cannot be a directory name.
    #[error(transparent)]
    Target(#[from] NameError),
    /// Two layers have the same name.
    #[error("layer name {0:?} appears twice")]
    DuplicateLayer(String),
    /// A layer's image cannot be used.
    #[error("layer {name}: image {path}: {error}")]
    Image {
        /// The layer.
        name: String,
        /// The image path as given.
        path: String,
        /// What is wrong with it.
        error: io::Error,
    },
    /// A layer's image lies outside the agent's root.
    #[error("layer {name}: image {} is outside the root {}", .path.display(), .root.display())]
    OutsideRoot {
        /// The layer.
        name: String,
        /// The resolved image path.
        path: PathBuf,
        /// The root.
        root: PathBuf,
    },
    /// The persistent upper path is refused.
    #[error(transparent)]
    UpperPath(#[from] UpperPathError),
    /// The persistent upper directory resolves to somewhere it must not be.
    #[error("persistent upper {}: {reason}", .path.display())]
    UpperPlace {
        /// The resolved directory.
        path: PathBuf,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A path cannot be written into overlay options.
    #[error("path {} contains ',', ':' or '\\\\', which overlay options cannot carry", .0.display())]
    UnusablePath(PathBuf),
    /// Mounting a layer failed.
    #[error("layer {name}: {error}")]
    MountLayer {
        /// The layer.
        name: String,
        /// The mount error.
        error: SysError,
    },
    /// Mounting the upper tmpfs failed.
    #[error("upper: {0}")]
    MountUpper(SysError),
    /// Mounting the overlay failed.
    #[error("overlay: {0}")]
    MountOverlay(SysError),
    /// The new overlay's root cannot be read.
    #[error("the new stack's root {} is not readable: {error}", .path.display())]
    Unreadable {
        /// The merged directory.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// A directory could not be created or removed.
    #[error("{action} {}: {error}", .path.display())]
    Dir {
        /// `creating` or `removing`.
        action: &'static str,
        /// The directory.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The mount table could not be read.
    #[error(transparent)]
    Mountinfo(#[from] MountinfoError),
    /// The applied-stack record could not be read (not corrupt: unreadable). Recovery stops
    /// rather than take the target for empty and unmount what is running.
    #[error("cannot read the record of the applied stack ({0}); leaving the target as it is")]
    RecordUnreadable(String),
    /// An unmount failed.
    #[error(transparent)]
    Unmount(SysError),
    /// Mounts remain under a directory after unmounting: it is not removed, since removing
    /// would reach into them.
    #[error("{} still has mounts after unmounting; not removing it", .0.display())]
    StillMounted(PathBuf),
}

/// Where a stack's writes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpperPlan {
    /// A tmpfs mounted at `mount_point`, holding `upper/` and `work/`.
    Tmpfs {
        /// The tmpfs mount point (`<slot>/upper`).
        mount_point: PathBuf,
    },
    /// A directory under the root holding `upper/` and `work/`; shared by the slots.
    Persistent {
        /// The canonical directory.
        dir: PathBuf,
    },
}

impl UpperPlan {
    /// The overlay's `upperdir`.
    pub fn upperdir(&self) -> PathBuf {
        match self {
            UpperPlan::Tmpfs { mount_point } => mount_point.join("upper"),
            UpperPlan::Persistent { dir } => dir.join("upper"),
        }
    }

    /// The overlay's `workdir`.
    pub fn workdir(&self) -> PathBuf {
        match self {
            UpperPlan::Tmpfs { mount_point } => mount_point.join("work"),
            UpperPlan::Persistent { dir } => dir.join("work"),
        }
    }
}

/// One layer of a planned stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedLayer {
    /// The module's name.
    pub name: String,
    /// The image's digest.
    pub digest: String,
    /// The canonical image path.
    pub image: PathBuf,
    /// Where it is mounted: `<slot>/layers/<index>-<name>`.
    pub mount_point: PathBuf,
    /// The module's health check.
    pub health_check: Option<HealthCheck>,
}

/// A stack ready to be built in a slot, every path resolved and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The target.
    pub target: String,
    /// The slot it is built in.
    pub slot: Slot,
    /// The layers, bottom first.
    pub layers: Vec<PlannedLayer>,
    /// The upper layer.
    pub upper: UpperPlan,
    /// The empty bottom lower.
    pub base: PathBuf,
    /// `<target>/<slot>`.
    pub slot_dir: PathBuf,
    /// `<slot>/merged`.
    pub merged: PathBuf,
}

impl Plan {
    /// The layers' digests, bottom first (what `MountStatus.layers` reports).
    pub fn digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }

    /// The overlay's option string. `lowerdir` lists the top layer first and ends with the
    /// empty base. A persistent upper is shared by both slots during a switch, which overlay
    /// allows only with `index=off`.
    pub fn overlay_options(&self) -> String {
        let lowers: Vec<String> = self
            .layers
            .iter()
            .rev()
            .map(|l| l.mount_point.display().to_string())
            .chain(std::iter::once(self.base.display().to_string()))
            .collect();
        let mut options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            self.upper.upperdir().display(),
            self.upper.workdir().display()
        );
        if matches!(self.upper, UpperPlan::Persistent { .. }) {
            options.push_str(",index=off");
        }
        options
    }
}

/// The layers of `config` in stacking order, bottom first: by priority (higher above), equal
/// priorities by name (the name that sorts later above).
pub fn ordered_layers(layers: &[MountLayer]) -> Vec<&MountLayer> {
    let mut ordered: Vec<&MountLayer> = layers.iter().collect();
    ordered.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then_with(|| a.name.cmp(&b.name))
    });
    ordered
}

/// Whether two configurations mount the same stack (same images in the same order, same
/// upper): then a new generation needs no rebuild.
pub fn same_stack(a: &MountConfig, b: &MountConfig) -> bool {
    let key = |c: &MountConfig| -> Vec<(String, String, String)> {
        ordered_layers(&c.layers)
            .into_iter()
            .map(|l| (l.name.clone(), l.image_path.clone(), l.digest.clone()))
            .collect()
    };
    a.upper == b.upper && key(a) == key(b)
}

/// Resolves and checks everything `config` needs to be built in `slot`. Touches the
/// filesystem only to resolve images and create a persistent upper directory.
pub fn plan(layout: &Layout, config: &MountConfig, slot: Slot) -> Result<Plan, StackError> {
    plan_with(layout, config, slot, Images::Present)
}

/// The plan of a stack that is mounted in `slot` already, to compare with the mount table or
/// to remount its overlay: as [`plan`], except that an image removed since it was mounted is
/// taken at the path it had. The stack a confirmation window keeps is the case: its mounts
/// hold its images open, so switching back to it does not need the store to keep them (a
/// modulemgr from before it kept them for the window did not).
pub fn plan_mounted(layout: &Layout, config: &MountConfig, slot: Slot) -> Result<Plan, StackError> {
    plan_with(layout, config, slot, Images::MayBeRemoved)
}

/// Whether a plan's images must exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Images {
    /// They are to be mounted: each must be a regular file under the root.
    Present,
    /// They are mounted already; one that is gone is taken at the path it had.
    MayBeRemoved,
}

fn plan_with(
    layout: &Layout,
    config: &MountConfig,
    slot: Slot,
    images: Images,
) -> Result<Plan, StackError> {
    layout::check_target_name(&config.target)?;
    let mut names = BTreeSet::new();
    for layer in &config.layers {
        if !names.insert(layer.name.as_str()) {
            return Err(StackError::DuplicateLayer(layer.name.clone()));
        }
    }
    let target = &config.target;
    let layers_dir = layout.layers_dir(target, slot);
    let mut layers = Vec::with_capacity(config.layers.len());
    for (index, layer) in ordered_layers(&config.layers).into_iter().enumerate() {
        let image = match resolve_image(layout.root(), layer) {
            Err(StackError::Image { error, .. })
                if images == Images::MayBeRemoved && error.kind() == io::ErrorKind::NotFound =>
            {
                removed_image(layout.root(), layer)?
            }
            resolved => resolved?,
        };
        layers.push(PlannedLayer {
            name: layer.name.clone(),
            digest: layer.digest.clone(),
            image,
            mount_point: layers_dir.join(layout::layer_dir_name(index, &layer.name)),
            health_check: layer.health_check.clone(),
        });
    }
    let upper = match &config.upper {
        UpperMode::Tmpfs => UpperPlan::Tmpfs {
            mount_point: layout.upper_mount(target, slot),
        },
        UpperMode::Persistent { path } => {
            let dir = layout::persistent_dir(layout.root(), path)?;
            UpperPlan::Persistent {
                dir: resolve_persistent(layout, &dir)?,
            }
        }
    };
    let plan = Plan {
        target: target.clone(),
        slot,
        layers,
        upper,
        base: layout.base_dir(target),
        slot_dir: layout.slot_dir(target, slot),
        merged: layout.merged(target, slot),
    };
    let option_paths = plan.layers.iter().map(|l| l.mount_point.clone()).chain([
        plan.base.clone(),
        plan.upper.upperdir(),
        plan.upper.workdir(),
    ]);
    for path in option_paths {
        let text = path.display().to_string();
        if text.contains([',', ':', '\\']) {
            return Err(StackError::UnusablePath(path));
        }
    }
    Ok(plan)
}

/// An image path: absolute, or relative to the root; it must resolve to a regular file under
/// the root.
fn resolve_image(root: &Path, layer: &MountLayer) -> Result<PathBuf, StackError> {
    let image_error = |error| StackError::Image {
        name: layer.name.clone(),
        path: layer.image_path.clone(),
        error,
    };
    if layer.image_path.is_empty() {
        return Err(image_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty path",
        )));
    }
    let given = Path::new(&layer.image_path);
    let joined = if given.is_absolute() {
        given.to_owned()
    } else {
        root.join(given)
    };
    let image = std::fs::canonicalize(&joined).map_err(image_error)?;
    if !image.starts_with(root) {
        return Err(StackError::OutsideRoot {
            name: layer.name.clone(),
            path: image,
            root: root.to_owned(),
        });
    }
    let meta = std::fs::metadata(&image).map_err(image_error)?;
    if !meta.is_file() {
        return Err(image_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(image)
}

/// The path an image removed since it was mounted had: its directory (the store's, which
/// stays) resolved as [`resolve_image`] would, and its file name. It must be under the root.
fn removed_image(root: &Path, layer: &MountLayer) -> Result<PathBuf, StackError> {
    let given = Path::new(&layer.image_path);
    let joined = if given.is_absolute() {
        given.to_owned()
    } else {
        root.join(given)
    };
    let image_error = |error| StackError::Image {
        name: layer.name.clone(),
        path: layer.image_path.clone(),
        error,
    };
    let (Some(dir), Some(file)) = (joined.parent(), joined.file_name()) else {
        return Err(image_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no file name",
        )));
    };
    let image = std::fs::canonicalize(dir).map_err(image_error)?.join(file);
    if !image.starts_with(root) {
        return Err(StackError::OutsideRoot {
            name: layer.name.clone(),
            path: image,
            root: root.to_owned(),
        });
    }
    Ok(image)
}

/// Creates a persistent upper directory (with `upper/` and `work/`) and checks where it
/// really is: under the root, outside mountmgr's own mount tree.
fn resolve_persistent(layout: &Layout, dir: &Path) -> Result<PathBuf, StackError> {
    for sub in ["upper", "work"] {
        create_dir_all(&dir.join(sub))?;
    }
    let real = std::fs::canonicalize(dir).map_err(|error| StackError::Dir {
        action: "resolving",
        path: dir.to_owned(),
        error,
    })?;
    if !real.starts_with(layout.root()) {
        return Err(StackError::UpperPlace {
            path: real,
            reason: "resolves outside the root",
        });
    }
    if real.starts_with(layout.mounts_dir()) {
        return Err(StackError::UpperPlace {
            path: real,
            reason: "is inside mountmgr's own mount directory",
        });
    }
    Ok(real)
}

fn create_dir_all(path: &Path) -> Result<(), StackError> {
    std::fs::create_dir_all(path).map_err(|error| StackError::Dir {
        action: "creating",
        path: path.to_owned(),
        error,
    })
}

fn create_dir(path: &Path) -> Result<(), StackError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(StackError::Dir {
            action: "creating",
            path: path.to_owned(),
            error: e,
        }),
        _ => Ok(()),
    }
}

/// Builds `plan` in its slot, which must be clean ([`clean`]): mounts every layer, the upper
/// and the overlay, and reads the overlay's root. Every loop device bound is handed to
/// `on_loop` as soon as its mount exists, so the caller can record it. On error the slot is
/// left half-built: the caller cleans it.
pub fn build(plan: &Plan, on_loop: &mut dyn FnMut(LoopRecord)) -> Result<(), StackError> {
    create_dir_all(&plan.base)?;
    // The base is the bottom lower: empty and read-only, so nothing lands in it by mistake.
    std::fs::set_permissions(&plan.base, std::fs::Permissions::from_mode(0o555)).map_err(
        |error| StackError::Dir {
            action: "protecting",
            path: plan.base.clone(),
            error,
        },
    )?;
    create_dir_all(&plan.slot_dir.join("layers"))?;
    create_dir(&plan.merged)?;
    for layer in &plan.layers {
        create_dir(&layer.mount_point)?;
        let device = sys::mount_erofs(&layer.image, &layer.mount_point).map_err(|error| {
            StackError::MountLayer {
                name: layer.name.clone(),
                error,
            }
        })?;
        tracing::debug!(target = %plan.target, layer = %layer.name, digest = %layer.digest, "layer mounted");
        if let Some(device) = device {
            on_loop(LoopRecord {
                slot: plan.slot,
                device,
                image: layer.image.clone(),
            });
        }
    }
    if let UpperPlan::Tmpfs { mount_point } = &plan.upper {
        create_dir(mount_point)?;
        sys::mount_tmpfs(mount_point).map_err(StackError::MountUpper)?;
        create_dir(&plan.upper.upperdir())?;
        create_dir(&plan.upper.workdir())?;
    }
    sys::mount_overlay(&plan.overlay_options(), &plan.merged).map_err(StackError::MountOverlay)?;
    let unreadable = |error| StackError::Unreadable {
        path: plan.merged.clone(),
        error,
    };
    let mut entries = std::fs::read_dir(&plan.merged).map_err(unreadable)?;
    if let Some(Err(e)) = entries.next() {
        return Err(unreadable(e));
    }
    Ok(())
}

/// Whether the mounts in `plan`'s slot are exactly the stack `plan` describes: each layer's
/// erofs from its image (or from a recorded loop device bound to it), the upper tmpfs if any,
/// the overlay, each once, nothing else. `Err` says what differs.
pub fn verify_mounted(
    plan: &Plan,
    entries: &[MountEntry],
    loops: &[LoopRecord],
) -> Result<(), String> {
    let in_slot = mountinfo::under(entries, &plan.slot_dir);
    let find = |path: &Path, fs_type: &str| -> Result<&MountEntry, String> {
        let found: Vec<&&MountEntry> = in_slot.iter().filter(|e| e.mount_point == path).collect();
        match found.as_slice() {
            [] => Err(format!("{} is not mounted", path.display())),
            [e] if e.fs_type == fs_type => Ok(e),
            [e] => Err(format!(
                "{} is {}, not {fs_type}",
                path.display(),
                e.fs_type
            )),
            _ => Err(format!(
                "{} is mounted {} times",
                path.display(),
                found.len()
            )),
        }
    };
    let mut expected = 1;
    for layer in &plan.layers {
        let entry = find(&layer.mount_point, "erofs")?;
        let from_loop = loops
            .iter()
            .any(|l| l.slot == plan.slot && l.device == entry.source && l.image == layer.image);
        if entry.source != layer.image && !from_loop {
            return Err(format!(
                "{} is mounted from {}, not {}",
                layer.mount_point.display(),
                entry.source.display(),
                layer.image.display()
            ));
        }
        expected += 1;
    }
    if let UpperPlan::Tmpfs { mount_point } = &plan.upper {
        find(mount_point, "tmpfs")?;
        expected += 1;
    }
    find(&plan.merged, "overlay")?;
    if in_slot.len() != expected {
        return Err(format!(
            "{} mounts in {}, expected {expected}",
            in_slot.len(),
            plan.slot_dir.display()
        ));
    }
    Ok(())
}

/// The order a slot's mounts come off: the overlay (and anything on it) first, then the
/// layers, then the upper tmpfs, then anything else; deeper paths before shallower within each.
fn teardown_order<'a>(dir: &Path, entries: &[&'a MountEntry]) -> Vec<&'a MountEntry> {
    let rank = |e: &MountEntry| -> u8 {
        let Ok(rel) = e.mount_point.strip_prefix(dir) else {
            return 3;
        };
        // `dir` is a slot or a whole target; skip the slot letter in the latter case.
        let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy());
        let first = parts.next();
        let part = match first.as_deref() {
            Some("A" | "B") => parts.next(),
            _ => first,
        };
        match part.as_deref() {
            Some("merged") => 0,
            Some("layers") => 1,
            Some("upper") => 2,
            _ => 3,
        }
    };
    let mut ordered = mountinfo::unmount_order(entries);
    ordered.sort_by_key(|e| rank(e));
    ordered
}

/// Unmounts every mount strictly below `dir` except those below one of `keep`, in
/// [`teardown_order`]. Returns how many were detached lazily (busy).
pub fn unmount_under(dir: &Path, keep: &[PathBuf]) -> Result<usize, StackError> {
    let entries = mountinfo::read()?;
    let below: Vec<&MountEntry> = mountinfo::under(&entries, dir)
        .into_iter()
        .filter(|e| !keep.iter().any(|k| e.mount_point.starts_with(k)))
        .collect();
    let mut lazy = 0;
    for entry in teardown_order(dir, &below) {
        match sys::unmount(&entry.mount_point).map_err(StackError::Unmount)? {
            Unmounted::Lazy => {
                tracing::warn!(mount_point = %entry.mount_point.display(), "mount was busy; detached lazily");
                lazy += 1;
            }
            Unmounted::Clean | Unmounted::NotMounted => {
                tracing::debug!(mount_point = %entry.mount_point.display(), fs_type = %entry.fs_type, "unmounted");
            }
        }
    }
    Ok(lazy)
}

/// Removes `dir` and everything in it, after checking with a fresh mount table that nothing
/// is mounted at or below it, and without ever crossing into another filesystem.
pub fn remove_tree(dir: &Path) -> Result<(), StackError> {
    let entries = mountinfo::read()?;
    if entries.iter().any(|e| e.mount_point.starts_with(dir)) {
        return Err(StackError::StillMounted(dir.to_owned()));
    }
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(StackError::Dir {
                action: "removing",
                path: dir.to_owned(),
                error,
            })
        }
    };
    remove_same_dev(dir, meta.dev()).map_err(|error| StackError::Dir {
        action: "removing",
        path: dir.to_owned(),
        error,
    })
}

fn remove_same_dev(path: &Path, dev: u64) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.dev() != dev {
        return Err(io::Error::other(format!(
            "{} is on another filesystem",
            path.display()
        )));
    }
    if meta.is_dir() {
        // The base directory is made read-only; make it writable again to empty it.
        if meta.permissions().mode() & 0o200 == 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
        }
        for entry in std::fs::read_dir(path)? {
            remove_same_dev(&entry?.path(), dev)?;
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Unmounts everything in `target`'s `slot` and removes the slot directory.
pub fn clean_slot(layout: &Layout, target: &str, slot: Slot) -> Result<usize, StackError> {
    let dir = layout.slot_dir(target, slot);
    let lazy = unmount_under(&dir, &[])?;
    remove_tree(&dir)?;
    Ok(lazy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, priority: u32, image: &str) -> MountLayer {
        MountLayer {
            name: name.to_owned(),
            image_path: image.to_owned(),
            digest: format!("sha256:{name}"),
            priority,
            health_check: None,
        }
    }

    fn config(layers: Vec<MountLayer>, upper: UpperMode) -> MountConfig {
        MountConfig {
            target: "app".to_owned(),
            generation: 1,
            layers,
            upper,
        }
    }

    /// A root with image files `a`, `b`, `c` in `store/`.
    fn root_with_images() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        for name in ["a", "b", "c"] {
            std::fs::write(dir.path().join("store").join(name), b"image").unwrap();
        }
        let layout = Layout::new(dir.path()).unwrap();
        (dir, layout)
    }

    #[test]
    fn order_is_priority_then_name() {
        let layers = vec![
            layer("top", 30, ""),
            layer("zeta", 10, ""),
            layer("alpha", 10, ""),
            layer("bottom", 0, ""),
        ];
        let names: Vec<&str> = ordered_layers(&layers)
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["bottom", "alpha", "zeta", "top"]);
    }

    #[test]
    fn plan_resolves_and_orders() {
        let (_dir, layout) = root_with_images();
        let root = layout.root().to_owned();
        let c = config(
            vec![
                layer("hi", 20, &root.join("store/a").display().to_string()),
                layer("lo", 10, "store/b"),
            ],
            UpperMode::Tmpfs,
        );
        let plan = plan(&layout, &c, Slot::B).unwrap();
        assert_eq!(plan.digests(), ["sha256:lo", "sha256:hi"]);
        assert_eq!(plan.layers[0].image, root.join("store/b"));
        let slot = root.join("run/powernode-mounts/app/B");
        assert_eq!(plan.layers[1].mount_point, slot.join("layers/1-hi"));
        let options = plan.overlay_options();
        let want = format!(
            "lowerdir={s}/layers/1-hi:{s}/layers/0-lo:{base},upperdir={s}/upper/upper,workdir={s}/upper/work",
            s = slot.display(),
            base = root.join("run/powernode-mounts/app/base").display()
        );
        assert_eq!(options, want);
    }

    #[test]
    fn plan_refuses_bad_input() {
        let (_dir, layout) = root_with_images();
        let outside = tempfile::NamedTempFile::new().unwrap();
        let cases: Vec<(MountConfig, &str)> = vec![
            (
                config(vec![layer("x", 1, "store/missing")], UpperMode::Tmpfs),
                "layer x: image store/missing: No such file or directory",
            ),
            (
                config(vec![layer("x", 1, "store")], UpperMode::Tmpfs),
                "not a regular file",
            ),
            (
                config(vec![layer("x", 1, "")], UpperMode::Tmpfs),
                "empty path",
            ),
            (
                config(
                    vec![layer("x", 1, &outside.path().display().to_string())],
                    UpperMode::Tmpfs,
                ),
                "is outside the root",
            ),
            (
                config(
                    vec![layer("x", 1, "store/../../../etc/passwd")],
                    UpperMode::Tmpfs,
                ),
                "outside the root",
            ),
            (
                config(
                    vec![layer("x", 1, "store/a"), layer("x", 2, "store/b")],
                    UpperMode::Tmpfs,
                ),
                "appears twice",
            ),
            (
                config(
                    vec![layer("x", 1, "store/a")],
                    UpperMode::Persistent {
                        path: "/etc".into(),
                    },
                ),
                "not absolute",
            ),
            (
                config(
                    vec![layer("x", 1, "store/a")],
                    UpperMode::Persistent {
                        path: "persist/../..".into(),
                    },
                ),
                "\"..\"",
            ),
            (
                config(
                    vec![layer("x", 1, "store/a")],
                    UpperMode::Persistent {
                        path: "run/powernode-mounts/app/A".into(),
                    },
                ),
                "inside mountmgr's own mount directory",
            ),
        ];
        for (c, want) in cases {
            let err = plan(&layout, &c, Slot::A).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
        let mut bad_target = config(vec![layer("x", 1, "store/a")], UpperMode::Tmpfs);
        bad_target.target = "../etc".into();
        assert!(plan(&layout, &bad_target, Slot::A).is_err());
    }

    /// A stack mounted already plans with an image removed since (the store collected it),
    /// at the path it had; one that is to be mounted does not. Anything else wrong with the
    /// image is refused either way.
    #[test]
    fn a_mounted_stack_plans_without_its_removed_images() {
        let (_dir, layout) = root_with_images();
        let root = layout.root().to_owned();
        let c = config(
            vec![layer("x", 1, "store/a"), layer("y", 2, "store/gone")],
            UpperMode::Tmpfs,
        );
        let err = plan(&layout, &c, Slot::A).unwrap_err().to_string();
        assert!(err.contains("store/gone"), "{err}");
        let kept = plan_mounted(&layout, &c, Slot::A).unwrap();
        assert_eq!(kept.layers[1].image, root.join("store/gone"));
        assert_eq!(kept.layers[0].image, root.join("store/a"));
        let outside = config(vec![layer("x", 1, "/nonexistent/gone")], UpperMode::Tmpfs);
        let err = plan_mounted(&layout, &outside, Slot::A).unwrap_err();
        assert!(matches!(err, StackError::Image { .. }), "{err}");
        let escaping = config(vec![layer("x", 1, "/tmp/gone")], UpperMode::Tmpfs);
        let err = plan_mounted(&layout, &escaping, Slot::A).unwrap_err();
        assert!(matches!(err, StackError::OutsideRoot { .. }), "{err}");
    }

    #[test]
    fn persistent_upper_uses_index_off() {
        let (_dir, layout) = root_with_images();
        let c = config(
            vec![layer("x", 1, "store/a")],
            UpperMode::Persistent {
                path: "persist/app-upper".into(),
            },
        );
        let plan = plan(&layout, &c, Slot::A).unwrap();
        let dir = layout.root().join("persist/app-upper");
        assert!(dir.join("upper").is_dir() && dir.join("work").is_dir());
        assert!(plan.overlay_options().ends_with(&format!(
            "upperdir={d}/upper,workdir={d}/work,index=off",
            d = dir.display()
        )));
    }

    #[test]
    fn same_stack_ignores_generation_and_health_checks() {
        let a = config(
            vec![layer("x", 1, "i1"), layer("y", 2, "i2")],
            UpperMode::Tmpfs,
        );
        let mut b = a.clone();
        b.generation = 9;
        b.layers.reverse();
        b.layers[0].health_check = Some(HealthCheck {
            command: vec!["true".into()],
            timeout_s: 1,
        });
        assert!(same_stack(&a, &b));
        b.layers[0].priority = 0;
        assert!(!same_stack(&a, &b), "order changed");
        let mut c = a.clone();
        c.upper = UpperMode::Persistent { path: "p".into() };
        assert!(!same_stack(&a, &c));
    }

    fn entry(id: u32, mount_point: &str, fs_type: &str, source: &str) -> MountEntry {
        MountEntry {
            id,
            parent: 1,
            dev: format!("0:{id}"),
            mount_point: PathBuf::from(mount_point),
            fs_type: fs_type.to_owned(),
            source: PathBuf::from(source),
            super_options: String::new(),
        }
    }

    #[test]
    fn verify_mounted_table() {
        let (_dir, layout) = root_with_images();
        let root = layout.root().to_owned();
        let c = config(vec![layer("lo", 1, "store/a")], UpperMode::Tmpfs);
        let plan = plan(&layout, &c, Slot::A).unwrap();
        let s = |rel: &str| {
            root.join("run/powernode-mounts/app/A")
                .join(rel)
                .display()
                .to_string()
        };
        let image = root.join("store/a").display().to_string();
        let good = vec![
            entry(10, &s("layers/0-lo"), "erofs", &image),
            entry(11, &s("upper"), "tmpfs", "tmpfs"),
            entry(12, &s("merged"), "overlay", "overlay"),
        ];
        assert_eq!(verify_mounted(&plan, &good, &[]), Ok(()));

        let mut missing = good.clone();
        missing.remove(2);
        assert!(verify_mounted(&plan, &missing, &[])
            .unwrap_err()
            .contains("not mounted"));

        let mut twice = good.clone();
        twice.push(entry(13, &s("merged"), "overlay", "overlay"));
        assert!(verify_mounted(&plan, &twice, &[])
            .unwrap_err()
            .contains("2 times"));

        let mut other_image = good.clone();
        other_image[0].source = PathBuf::from("/elsewhere");
        assert!(verify_mounted(&plan, &other_image, &[])
            .unwrap_err()
            .contains("mounted from"));

        let mut extra = good.clone();
        extra.push(entry(14, &s("layers/9-stray"), "erofs", "/x"));
        assert!(verify_mounted(&plan, &extra, &[])
            .unwrap_err()
            .contains("expected 3"));

        let mut via_loop = good.clone();
        via_loop[0].source = PathBuf::from("/dev/loop7");
        let loops = [LoopRecord {
            slot: Slot::A,
            device: PathBuf::from("/dev/loop7"),
            image: root.join("store/a"),
        }];
        assert_eq!(verify_mounted(&plan, &via_loop, &loops), Ok(()));
        assert!(verify_mounted(&plan, &via_loop, &[]).is_err());
    }

    #[test]
    fn teardown_order_is_overlay_layers_upper() {
        let t = "/m/app";
        let entries = [
            entry(1, "/m/app/A/layers/0-x", "erofs", "/i"),
            entry(2, "/m/app/A/layers/1-y", "erofs", "/j"),
            entry(3, "/m/app/A/upper", "tmpfs", "tmpfs"),
            entry(4, "/m/app/A/merged", "overlay", "overlay"),
            entry(5, "/m/app/B/layers/0-x", "erofs", "/i"),
            entry(6, "/m/app/stray", "tmpfs", "tmpfs"),
        ];
        let refs: Vec<&MountEntry> = entries.iter().collect();
        let ids: Vec<u32> = teardown_order(Path::new(t), &refs)
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [4, 5, 2, 1, 3, 6]);
        let slot_refs: Vec<&MountEntry> = entries[..4].iter().collect();
        let ids: Vec<u32> = teardown_order(Path::new("/m/app/A"), &slot_refs)
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [4, 2, 1, 3]);
    }

    #[test]
    fn remove_tree_handles_the_read_only_base() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        std::fs::create_dir_all(t.join("base")).unwrap();
        std::fs::create_dir_all(t.join("A/layers/0-x")).unwrap();
        std::fs::set_permissions(t.join("base"), std::fs::Permissions::from_mode(0o555)).unwrap();
        remove_tree(&t).unwrap();
        assert!(!t.exists());
        remove_tree(&t).unwrap();
    }
}
