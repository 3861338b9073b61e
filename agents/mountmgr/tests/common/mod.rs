//! Shared helpers of mountmgr's integration tests: a sandbox root that unmounts whatever is
//! left under it when dropped, real erofs images made with `mkfs.erofs`, the agent run
//! in-process with the sandbox's settings, waiting for `MountStatus`, and the agent's events.

#![allow(dead_code)]

pub mod reader;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agentbase::{Context, Root, Settings};
use mountmgr::mountinfo::{self, MountEntry};
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::{
    Event, HealthCheck, MountConfig, MountLayer, MountState, MountStatus, Slot, UpperMode,
};

/// How long a test waits for the agent to answer.
pub const WAIT: Duration = Duration::from_secs(30);
/// The target every test uses.
pub const TARGET: &str = "app";
/// The settings every sandbox starts with: no confirmation window, so that a switch retires
/// the old slot at once (the tests of the window set one).
pub const BASE_SETTINGS: &str = "[mounts]\nconfirm_window_s = 0\n";
/// The mount path the tests that use one set, under the sandbox's root.
pub const MOUNT_PATH: &str = "/opt/powernode";

/// A temporary root. Dropping it lazily unmounts every mount below it (deepest first), even
/// when the test failed, then removes it.
pub struct Sandbox {
    dir: tempfile::TempDir,
    /// The canonical root path (what mountinfo shows).
    pub root: PathBuf,
}

impl Sandbox {
    /// A fresh sandbox with an image store and [`BASE_SETTINGS`].
    pub fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(root.join("store")).unwrap();
        let sandbox = Sandbox { dir, root };
        sandbox.settings(BASE_SETTINGS);
        sandbox
    }

    /// Writes `etc/powernode/agent.toml` (what the agent, in-process or not, loads at start).
    pub fn settings(&self, toml: &str) {
        let etc = self.root.join("etc/powernode");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("agent.toml"), toml).unwrap();
    }

    /// Settings with [`MOUNT_PATH`] for the test target, and `mounts` added to `[mounts]`.
    pub fn settings_with_mount_path(&self, mounts: &str) {
        self.settings(&format!(
            "[modules]\nmount_target = \"{TARGET}\"\n[mounts]\nmount_path = \"{MOUNT_PATH}\"\n{mounts}\n"
        ));
    }

    /// Puts the sandbox's `run/` and `persist/` on tmpfs (unmounted with the sandbox), so that
    /// a test of many switches does not wait on the disk's fsyncs.
    pub fn on_tmpfs(&self) {
        for dir in ["run", "persist"] {
            let at = self.root.join(dir);
            std::fs::create_dir_all(&at).unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                &at,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("mode=0755"),
            )
            .unwrap();
        }
    }

    /// [`MOUNT_PATH`] under the sandbox's root.
    pub fn mount_path(&self) -> PathBuf {
        self.root.join(MOUNT_PATH.trim_start_matches('/'))
    }

    /// The pubsub directories of the sandbox.
    pub fn dirs(&self) -> Dirs {
        Dirs::under_root(&self.root)
    }

    /// An erofs image named `name` holding `files` (path, contents), made with mkfs.erofs.
    pub fn image(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let src = self.root.join("src").join(name);
        std::fs::create_dir_all(&src).unwrap();
        for (path, contents) in files {
            let path = src.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, contents).unwrap();
        }
        let image = self.root.join("store").join(format!("{name}.erofs"));
        let out = Command::new("mkfs.erofs")
            .arg(&image)
            .arg(&src)
            .output()
            .expect("mkfs.erofs (erofs-utils) must be installed");
        assert!(
            out.status.success(),
            "mkfs.erofs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        image
    }

    /// A file of random bytes posing as an image.
    pub fn garbage_image(&self, name: &str) -> PathBuf {
        let image = self.root.join("store").join(format!("{name}.erofs"));
        let mut bytes = vec![0u8; 64 * 1024];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for b in bytes.iter_mut() {
            // xorshift: random enough to be no filesystem, no dependency needed.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&image, bytes).unwrap();
        image
    }

    /// `run/powernode-mounts/<target>`.
    pub fn target_dir(&self) -> PathBuf {
        self.root.join("run/powernode-mounts").join(TARGET)
    }

    /// `current` of the test target.
    pub fn current(&self) -> PathBuf {
        self.target_dir().join("current")
    }

    /// What `current` points to (`A/merged`, …), if it exists.
    pub fn current_link(&self) -> Option<PathBuf> {
        std::fs::read_link(self.current()).ok()
    }

    /// Mounts below `dir`, in mount order.
    pub fn mounts_under(&self, dir: &Path) -> Vec<MountEntry> {
        let entries = mountinfo::read().unwrap();
        mountinfo::under(&entries, dir)
            .into_iter()
            .cloned()
            .collect()
    }

    /// Mounts below a slot of the test target.
    pub fn slot_mounts(&self, slot: &str) -> Vec<MountEntry> {
        self.mounts_under(&self.target_dir().join(slot))
    }

    /// Reads a file through `current`.
    pub fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.current().join(path)).ok()
    }
}

impl Sandbox {
    /// What a reboot does to the node: every mount under the root gone, `run/` empty;
    /// `persist/` (the records, the images) stays.
    pub fn reboot(&self) {
        let entries = mountinfo::read().unwrap();
        for e in mountinfo::unmount_order(&mountinfo::under(&entries, &self.root)) {
            nix::mount::umount2(&e.mount_point, nix::mount::MntFlags::empty()).unwrap();
        }
        remove_all(&self.root.join("run"));
    }
}

/// Removes `path` and everything below it, read-only directories (erofs trees copied out,
/// slot bases) included.
fn remove_all(path: &Path) {
    fn walk(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::symlink_metadata(p) {
            if meta.is_dir() {
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
                if let Ok(entries) = std::fs::read_dir(p) {
                    for e in entries.flatten() {
                        walk(&e.path());
                    }
                }
            }
        }
    }
    walk(path);
    std::fs::remove_dir_all(path).unwrap();
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let Ok(entries) = mountinfo::read() else {
            return;
        };
        let below = mountinfo::under(&entries, &self.root);
        for entry in mountinfo::unmount_order(&below) {
            let _ = nix::mount::umount2(&entry.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
        // `dir` (the TempDir) is dropped after this, removing the now unmounted tree.
    }
}

/// A layer of `image` called `name` at `priority`.
pub fn layer(name: &str, image: &Path, priority: u32) -> MountLayer {
    MountLayer {
        name: name.to_owned(),
        image_path: image.display().to_string(),
        digest: format!(
            "sha256:{name}-{}",
            image.file_name().unwrap().to_string_lossy()
        ),
        priority,
        health_check: None,
    }
}

/// `layer` with a health check.
pub fn checked(mut layer: MountLayer, command: &[&str], timeout_s: u32) -> MountLayer {
    layer.health_check = Some(HealthCheck {
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        timeout_s,
    });
    layer
}

/// A config of the test target.
pub fn config(generation: u64, layers: Vec<MountLayer>) -> MountConfig {
    MountConfig {
        target: TARGET.to_owned(),
        generation,
        layers,
        upper: UpperMode::Tmpfs,
    }
}

/// The agent running in-process.
pub struct Agent {
    /// Its context (cancel `shutdown` to stop it).
    pub ctx: Context,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    /// Starts `mountmgr::run` on `root` with the settings there; returns once it has
    /// recovered (is ready).
    pub async fn start(root: &Path) -> Agent {
        let settings = Settings::load(&Root::new(root)).unwrap();
        let ctx = Context::new("mountmgr", Root::new(root), settings).unwrap();
        let handle = tokio::spawn(mountmgr::run(ctx.clone()));
        let deadline = tokio::time::Instant::now() + WAIT;
        while !ctx.is_ready() {
            assert!(!handle.is_finished(), "mountmgr ended before it was ready");
            assert!(tokio::time::Instant::now() < deadline, "mountmgr not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Agent { ctx, handle }
    }

    /// Stops it (as SIGTERM would) and checks it ended cleanly.
    pub async fn stop(self) {
        self.ctx.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("mountmgr did not stop");
        result.unwrap().unwrap();
    }
}

/// The publisher of `MountConfig`, as modulemgr.
pub fn config_publisher(sandbox: &Sandbox) -> Publication<MountConfig> {
    Publication::<MountConfig>::open(&sandbox.dirs(), "modulemgr").unwrap()
}

/// modulemgr's `MountConfig` publication (open before the agent starts, as on a node), the
/// agent, and a subscription to its status.
pub async fn start_agent(
    sandbox: &Sandbox,
) -> (Publication<MountConfig>, Agent, Subscription<MountStatus>) {
    let configs = config_publisher(sandbox);
    let agent = Agent::start(&sandbox.root).await;
    (configs, agent, status_subscription(sandbox))
}

/// A subscription to `mountmgr/MountStatus`.
pub fn status_subscription(sandbox: &Sandbox) -> Subscription<MountStatus> {
    Subscription::<MountStatus>::connect(&sandbox.dirs(), "mountmgr")
}

/// Waits until the test target's status satisfies `pred`; returns it.
pub async fn wait_status(
    sub: &mut Subscription<MountStatus>,
    what: &str,
    pred: impl Fn(&MountStatus) -> bool,
) -> MountStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = sub.get(TARGET) {
            if pred(status) {
                return status.clone();
            }
        }
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(_) => {}
            Err(_) => panic!(
                "timed out waiting for {what}; last status {:?}",
                sub.get(TARGET)
            ),
        }
    }
}

/// Waits for generation `generation` to be answered with `state`.
pub async fn wait_answer(
    sub: &mut Subscription<MountStatus>,
    generation: u64,
    state: MountState,
) -> MountStatus {
    wait_status(sub, &format!("generation {generation} {state:?}"), |s| {
        s.generation == generation && s.state == state
    })
    .await
}

/// Waits until the test target has no status.
pub async fn wait_no_status(sub: &mut Subscription<MountStatus>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while sub.get(TARGET).is_some() {
        if tokio::time::timeout_at(deadline, sub.next()).await.is_err() {
            panic!("status still there: {:?}", sub.get(TARGET));
        }
    }
}

/// A subscription to mountmgr's events.
pub fn event_subscription(sandbox: &Sandbox) -> Subscription<Event> {
    Subscription::<Event>::connect(&sandbox.dirs(), "mountmgr")
}

/// The events of `kind` mountmgr has raised (and eventd, absent here, not acknowledged).
pub fn events_of(events: &Subscription<Event>, kind: &str) -> Vec<Event> {
    let mut found: Vec<Event> = events
        .items()
        .map(|(_, e)| e)
        .filter(|e| e.kind == kind)
        .cloned()
        .collect();
    found.sort_by_key(|e| e.seq);
    found
}

/// Waits until `events` holds `count` events of `kind`; returns them.
pub async fn wait_events(events: &mut Subscription<Event>, kind: &str, count: usize) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = events_of(events, kind);
        if found.len() >= count {
            return found;
        }
        if tokio::time::timeout_at(deadline, events.next())
            .await
            .is_err()
        {
            panic!("timed out waiting for {count} {kind} events: {found:#?}");
        }
    }
}

/// The value of field `key` of `event`.
pub fn field<'a>(event: &'a Event, key: &str) -> Option<&'a str> {
    event
        .fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The mounts exactly at `path`, bottom first.
pub fn mounts_at(path: &Path) -> Vec<MountEntry> {
    let entries = mountinfo::read().unwrap();
    mountinfo::stack_at(&entries, path)
        .into_iter()
        .cloned()
        .collect()
}

/// The device of the overlay mounted in `slot` of the test target.
pub fn overlay_dev(sandbox: &Sandbox, slot: &str) -> Option<String> {
    mounts_at(&sandbox.target_dir().join(slot).join("merged"))
        .last()
        .map(|e| e.dev.clone())
}

/// Checks that the mount path carries exactly one mount, a copy of `slot`'s overlay.
pub fn assert_mount_path_shows(sandbox: &Sandbox, slot: &str) {
    let at = mounts_at(&sandbox.mount_path());
    assert_eq!(at.len(), 1, "one mount at the mount path: {at:#?}");
    assert_eq!(
        Some(at[0].dev.clone()),
        overlay_dev(sandbox, slot),
        "the mount path shows slot {slot}: {at:#?}"
    );
}

/// Checks that exactly one complete stack is mounted for the test target, in `slot`, with
/// `layers` erofs mounts, its tmpfs and its overlay, each mount point once, and that
/// `current` names it.
pub fn assert_one_stack(sandbox: &Sandbox, slot: Slot, layers: usize) {
    let name = match slot {
        Slot::A => "A",
        Slot::B => "B",
    };
    let other = if name == "A" { "B" } else { "A" };
    let all = sandbox.mounts_under(&sandbox.target_dir());
    let mine = sandbox.slot_mounts(name);
    assert_eq!(
        all.len(),
        mine.len(),
        "mounts outside slot {name}: {all:#?}"
    );
    assert!(sandbox.slot_mounts(other).is_empty());
    let count = |fs: &str| mine.iter().filter(|e| e.fs_type == fs).count();
    assert_eq!(count("erofs"), layers, "{mine:#?}");
    assert_eq!(count("tmpfs"), 1, "{mine:#?}");
    assert_eq!(count("overlay"), 1, "{mine:#?}");
    assert_eq!(mine.len(), layers + 2, "{mine:#?}");
    let mut points: Vec<&PathBuf> = mine.iter().map(|e| &e.mount_point).collect();
    points.sort();
    points.dedup();
    assert_eq!(
        points.len(),
        mine.len(),
        "a mount point is mounted twice: {mine:#?}"
    );
    assert_eq!(
        sandbox.current_link(),
        Some(PathBuf::from(format!("{name}/merged")))
    );
}
