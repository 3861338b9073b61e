//! mountmgr heals and rolls back, in-process against the real kernel: drift at run time (a
//! layer or the overlay unmounted by hand, a slot directory removed, a stack mounted twice,
//! stray mounts) noticed through the mount table's poll and repaired to the record; the
//! confirmation window after a switch, whose checks run again and roll back; the mount path
//! switched with no gap (`MOVE_MOUNT_BENEATH`), and as a symlink where that is not used.
//! Needs root (each test says "skipped: needs root" otherwise).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mountmgr::record::RecordStore;
use powernode_pubsub::testing::require;
use powernode_pubsub::Subscription;
use powernode_types::{MountState, MountStatus, Slot};

/// How soon drift must be noticed (the agent starts repairing).
const NOTICED_WITHIN: Duration = Duration::from_secs(1);
/// How long a repaired target is watched for a repair of the agent's own mounts.
const QUIET: Duration = Duration::from_millis(1500);

/// The ids of the mounts under the test target and at the mount path.
fn mount_ids(sandbox: &Sandbox) -> Vec<u32> {
    let mut ids: Vec<u32> = sandbox
        .mounts_under(&sandbox.target_dir())
        .iter()
        .chain(mounts_at(&sandbox.mount_path()).iter())
        .map(|e| e.id)
        .collect();
    ids.sort();
    ids
}

/// Waits until slot `slot` of the test target has a mount: the agent has started building
/// there. How long that took.
async fn wait_building(sandbox: &Sandbox, slot: &str, since: Instant) -> Duration {
    let deadline = since + WAIT;
    while sandbox.slot_mounts(slot).is_empty() {
        assert!(Instant::now() < deadline, "nothing built in slot {slot}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    since.elapsed()
}

/// Waits for the status to report drift, then checks the repair is final: one `stack.drift`
/// event more than `before`, and for [`QUIET`] no mount under the target or at the mount path
/// changes (the agent's own mounts do not set off another repair).
async fn wait_repaired(
    sandbox: &Sandbox,
    status: &mut Subscription<MountStatus>,
    events: &mut Subscription<powernode_types::Event>,
    before: usize,
    want: &str,
) -> MountStatus {
    let s = wait_status(status, "drift reported", |s| {
        s.drift.as_deref().is_some_and(|d| d.contains(want))
    })
    .await;
    let raised = wait_events(events, "stack.drift", before + 1).await;
    let last = raised.last().unwrap();
    assert_eq!(field(last, "repaired"), Some("true"), "{last:?}");
    assert!(
        field(last, "found").is_some_and(|f| f.contains(want)),
        "{last:?}"
    );
    let ids = mount_ids(sandbox);
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        mount_ids(sandbox),
        ids,
        "the mounts changed again after the repair"
    );
    assert_eq!(
        events_of(events, "stack.drift").len(),
        before + 1,
        "repaired once"
    );
    assert_eq!(
        status.get(TARGET).unwrap().drift,
        s.drift,
        "no second repair"
    );
    s
}

/// Two layers at generation 1 in slot A, with the mount path: the starting point of the drift
/// tests.
async fn mounted_two_layers(
    sandbox: &Sandbox,
) -> (
    powernode_pubsub::Publication<powernode_types::MountConfig>,
    Agent,
    Subscription<MountStatus>,
) {
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let high = sandbox.image("high", &[("b.txt", "b")]);
    sandbox.settings_with_mount_path("confirm_window_s = 0");
    let (configs, agent, mut status) = start_agent(sandbox).await;
    configs
        .publish(&config(
            1,
            vec![layer("low", &low, 1), layer("high", &high, 2)],
        ))
        .unwrap();
    let s = wait_answer(&mut status, 1, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert_eq!(s.drift, None);
    assert_one_stack(sandbox, Slot::A, 2);
    assert_mount_path_shows(sandbox, "A");
    (configs, agent, status)
}

fn read_at(path: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(path.join(file)).ok()
}

fn lazy_unmount(path: &Path) {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_unmounted_by_hand_is_repaired() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let (_configs, agent, mut status) = mounted_two_layers(&sandbox).await;
    let mut events = event_subscription(&sandbox);

    // The overlay holds the layer, so only a lazy unmount takes it away.
    let changed = Instant::now();
    lazy_unmount(&sandbox.target_dir().join("A/layers/0-low"));
    let noticed = wait_building(&sandbox, "B", changed).await;
    assert!(noticed < NOTICED_WITHIN, "noticed after {noticed:?}");
    let s = wait_repaired(
        &sandbox,
        &mut status,
        &mut events,
        0,
        "0-low is not mounted",
    )
    .await;
    assert_eq!((s.generation, s.state), (1, MountState::Mounted));
    assert_eq!(s.slot, Some(Slot::B), "built again in the other slot");
    assert_one_stack(&sandbox, Slot::B, 2);
    assert_mount_path_shows(&sandbox, "B");
    assert_eq!(
        read_at(&sandbox.mount_path(), "a.txt").as_deref(),
        Some("a")
    );
    eprintln!("layer unmounted: repair started after {noticed:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overlay_unmounted_by_hand_is_repaired() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let (_configs, agent, mut status) = mounted_two_layers(&sandbox).await;
    let mut events = event_subscription(&sandbox);

    let changed = Instant::now();
    nix::mount::umount2(
        &sandbox.target_dir().join("A/merged"),
        nix::mount::MntFlags::empty(),
    )
    .unwrap();
    assert_eq!(
        sandbox.read("a.txt"),
        None,
        "current shows an empty directory"
    );
    let noticed = wait_building(&sandbox, "B", changed).await;
    assert!(noticed < NOTICED_WITHIN, "noticed after {noticed:?}");
    let s = wait_repaired(
        &sandbox,
        &mut status,
        &mut events,
        0,
        "merged is not mounted",
    )
    .await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 2);
    assert_eq!(sandbox.read("b.txt").as_deref(), Some("b"));
    assert_mount_path_shows(&sandbox, "B");
    eprintln!("overlay unmounted: repair started after {noticed:?}");
    agent.stop().await;
}

/// The slot directory removed from another mount namespace, where its mounts are ordinary
/// directories: the kernel then detaches the mounts on it in every namespace, this one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_slot_directory_is_repaired() {
    if !require(&["root", "mkfs.erofs", "unshare"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let (_configs, agent, mut status) = mounted_two_layers(&sandbox).await;
    let mut events = event_subscription(&sandbox);

    let slot = sandbox.target_dir().join("A");
    let script = format!(
        "grep -o ' {s}/[^ ]*' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l && rm -rf {s}",
        s = slot.display()
    );
    let changed = Instant::now();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let noticed = wait_building(&sandbox, "B", changed).await;
    assert!(noticed < NOTICED_WITHIN, "noticed after {noticed:?}");
    let s = wait_repaired(&sandbox, &mut status, &mut events, 0, "is not mounted").await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 2);
    assert!(!slot.exists());
    assert_eq!(sandbox.read("a.txt").as_deref(), Some("a"));
    assert_mount_path_shows(&sandbox, "B");
    eprintln!("slot removed: repair started after {noticed:?}");
    agent.stop().await;
}

/// Mounted twice: the stack at the mount path (the extra copy is taken off, nothing is
/// rebuilt), the overlay in its slot (built again), and a stray mount in the inactive slot
/// (unmounted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_mounted_twice_is_repaired() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let (_configs, agent, mut status) = mounted_two_layers(&sandbox).await;
    let mut events = event_subscription(&sandbox);
    let bind = |path: &Path| {
        nix::mount::mount(
            Some(path),
            path,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
    };

    // The mount path twice: a light repair, in place.
    let at = sandbox.mount_path();
    bind(&at);
    assert_eq!(mounts_at(&at).len(), 2);
    let s = wait_repaired(&sandbox, &mut status, &mut events, 0, "2 mounts").await;
    assert_eq!(s.slot, Some(Slot::A), "nothing rebuilt");
    assert_one_stack(&sandbox, Slot::A, 2);
    assert_mount_path_shows(&sandbox, "A");

    // The overlay twice in its slot: built again in the other slot.
    let changed = Instant::now();
    bind(&sandbox.target_dir().join("A/merged"));
    let noticed = wait_building(&sandbox, "B", changed).await;
    assert!(noticed < NOTICED_WITHIN, "noticed after {noticed:?}");
    let s = wait_repaired(&sandbox, &mut status, &mut events, 1, "mounted 2 times").await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 2);
    assert_mount_path_shows(&sandbox, "B");

    // A stray mount in the slot that is not active.
    let stray = sandbox.target_dir().join("A/stray");
    std::fs::create_dir_all(&stray).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &stray,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let s = wait_repaired(&sandbox, &mut status, &mut events, 2, "belong to no stack").await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 2);
    assert!(
        !sandbox.target_dir().join("A").exists(),
        "the stray slot removed"
    );

    // A program's own mount inside the union is not drift.
    std::fs::create_dir_all(sandbox.current().join("data")).unwrap();
    let inside = sandbox.target_dir().join("B/merged/data");
    nix::mount::mount(
        Some("tmpfs"),
        &inside,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    tokio::time::sleep(QUIET).await;
    assert_eq!(events_of(&events, "stack.drift").len(), 3);
    assert_eq!(status.get(TARGET).unwrap().slot, Some(Slot::B));
    assert_eq!(mounts_at(&inside).len(), 1);
    agent.stop().await;
}

/// A repair that cannot be done (the images of the applied stack are gone) is reported, and
/// tried again at growing intervals, not in a loop; it goes through once the images are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_fails_is_retried_not_looped() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let (_configs, agent, mut status) = mounted_two_layers(&sandbox).await;
    let mut events = event_subscription(&sandbox);
    let image = sandbox.root.join("store/low.erofs");
    let aside = sandbox.root.join("low.erofs.aside");
    std::fs::rename(&image, &aside).unwrap();

    nix::mount::umount2(
        &sandbox.target_dir().join("A/merged"),
        nix::mount::MntFlags::empty(),
    )
    .unwrap();
    let s = wait_status(&mut status, "a failed repair", |s| {
        s.drift
            .as_deref()
            .is_some_and(|d| d.contains("repair failed"))
    })
    .await;
    assert!(
        s.drift.as_deref().unwrap().contains("low.erofs"),
        "{:?}",
        s.drift
    );
    let raised = wait_events(&mut events, "stack.drift", 1).await;
    assert_eq!(field(&raised[0], "repaired"), Some("false"));
    let error = agent.ctx.health.current().last_error.unwrap_or_default();
    assert!(error.contains("repairing the mounts"), "{error}");
    // Backing off (1 s, 2 s, …): a handful of attempts in 3 s, one event.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(events_of(&events, "stack.drift").len(), 1);
    assert!(
        sandbox.slot_mounts("B").is_empty(),
        "failed builds discarded"
    );

    std::fs::rename(&aside, &image).unwrap();
    let s = wait_status(&mut status, "the repair", |s| s.slot == Some(Slot::B)).await;
    assert_eq!(s.generation, 1);
    assert_one_stack(&sandbox, Slot::B, 2);
    assert_mount_path_shows(&sandbox, "B");
    let raised = wait_events(&mut events, "stack.drift", 2).await;
    assert_eq!(field(&raised[1], "repaired"), Some("true"));
    agent.stop().await;
}

/// The confirmation window: a stack whose health check passes at the switch keeps the
/// previous stack mounted; a new stack during the window has the checks run once more first;
/// a check that starts failing a few seconds after its switch switches back, retires the
/// failed stack and answers its generation `RolledBack`; a window that passes retires the
/// previous stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_failing_after_the_switch_rolls_back() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let base = sandbox.image("base", &[("a.txt", "a")]);
    let tools = sandbox.image("tools", &[("t.txt", "tools")]);
    let extra = sandbox.image("extra", &[("e.txt", "extra")]);
    let broken = sandbox.root.join("broken");
    sandbox.settings_with_mount_path("confirm_window_s = 6\nconfirm_interval_s = 1");
    let (configs, agent, mut status) = start_agent(&sandbox).await;
    let mut events = event_subscription(&sandbox);
    let check = format!("test ! -e {}", broken.display());
    let tools_checked = || checked(layer("tools", &tools, 2), &["/bin/sh", "-c", &check], 5);

    configs
        .publish(&config(1, vec![layer("base", &base, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;
    assert_eq!(
        status.get(TARGET).unwrap().confirm_until_ms,
        None,
        "no checks, no window"
    );

    // Generation 2 passes its check at the switch: slot B, A kept for the window.
    let before = agentbase::health::now_ms();
    configs
        .publish(&config(2, vec![layer("base", &base, 1), tools_checked()]))
        .unwrap();
    let s = wait_answer(&mut status, 2, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    let until = s.confirm_until_ms.expect("a window");
    assert!(until >= before + 6000, "{until} vs {before}");
    assert_eq!(
        sandbox.slot_mounts("A").len(),
        3,
        "the previous stack is kept"
    );
    assert_mount_path_shows(&sandbox, "B");
    assert_eq!(
        read_at(&sandbox.mount_path(), "t.txt").as_deref(),
        Some("tools")
    );

    // Generation 3 during the window: checked once more (passes), A retired, 3 built there.
    configs
        .publish(&config(
            3,
            vec![
                layer("base", &base, 1),
                tools_checked(),
                layer("extra", &extra, 3),
            ],
        ))
        .unwrap();
    let s = wait_answer(&mut status, 3, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert!(s.confirm_until_ms.is_some());
    assert_eq!(sandbox.slot_mounts("B").len(), 4, "generation 2 kept now");

    // The check starts failing two seconds after the switch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let failed_at = Instant::now();
    std::fs::write(&broken, b"").unwrap();
    let s = wait_answer(&mut status, 3, MountState::RolledBack).await;
    let took = failed_at.elapsed();
    assert!(took < Duration::from_secs(4), "rolled back after {took:?}");
    assert_eq!(s.slot, Some(Slot::B), "generation 2's stack is back");
    assert_eq!(s.layers.len(), 2);
    assert_eq!(s.confirm_until_ms, None);
    let error = s.error.unwrap();
    assert!(
        error.contains("health check of tools exited with status 1"),
        "{error}"
    );
    assert!(error.contains("confirmation window"), "{error}");
    assert_one_stack(&sandbox, Slot::B, 2);
    assert_mount_path_shows(&sandbox, "B");
    assert_eq!(read_at(&sandbox.mount_path(), "e.txt"), None);
    let raised = wait_events(&mut events, "stack.rolled_back", 1).await;
    assert_eq!(field(&raised[0], "generation"), Some("3"));
    assert_eq!(field(&raised[0], "module"), Some("tools"));
    assert_eq!(field(&raised[0], "active_generation"), Some("2"));
    let record = RecordStore::new(sandbox.root.join("persist/powernode/mountmgr"))
        .load(TARGET)
        .unwrap()
        .unwrap();
    let applied = record.applied.unwrap();
    assert_eq!((applied.slot, applied.config.generation), (Slot::B, 2));

    // modulemgr answers with the stack before (generation 4 = generation 2's layers): nothing
    // is mounted again.
    std::fs::remove_file(&broken).unwrap();
    let ids = mount_ids(&sandbox);
    configs
        .publish(&config(4, vec![layer("base", &base, 1), tools_checked()]))
        .unwrap();
    let s = wait_answer(&mut status, 4, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_eq!(mount_ids(&sandbox), ids);

    // A window that passes: generation 5 switched to A, B retired after the window.
    configs
        .publish(&config(
            5,
            vec![
                layer("base", &base, 1),
                tools_checked(),
                layer("extra", &extra, 3),
            ],
        ))
        .unwrap();
    let s = wait_answer(&mut status, 5, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert!(!sandbox.slot_mounts("B").is_empty());
    let s = wait_status(&mut status, "the window to pass", |s| {
        s.generation == 5 && s.confirm_until_ms.is_none()
    })
    .await;
    assert_eq!(s.state, MountState::Mounted);
    assert_one_stack(&sandbox, Slot::A, 3);
    assert_eq!(events_of(&events, "stack.rolled_back").len(), 1);
    agent.stop().await;
}

/// A rollback to a stack kept through its window with a persistent upper: what the failed stack
/// wrote to the shared upper is there after the rollback (the kept overlay is mounted afresh,
/// not left serving what it had cached: a name it had looked up as missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_with_a_persistent_upper_sees_the_writes() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let base = sandbox.image("base", &[("a.txt", "a")]);
    let tools = sandbox.image("tools", &[("t.txt", "tools")]);
    let broken = sandbox.root.join("broken");
    sandbox.settings("[mounts]\nconfirm_window_s = 30\nconfirm_interval_s = 1\n");
    let (configs, agent, mut status) = start_agent(&sandbox).await;
    let persistent = |generation, layers| {
        let mut c = config(generation, layers);
        c.upper = powernode_types::UpperMode::Persistent {
            path: "persist/app-upper".into(),
        };
        c
    };
    configs
        .publish(&persistent(1, vec![layer("base", &base, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;
    // Looked up, and missing, through generation 1's overlay.
    assert_eq!(sandbox.read("state.txt"), None);

    let check = format!("test ! -e {}", broken.display());
    configs
        .publish(&persistent(
            2,
            vec![
                layer("base", &base, 1),
                checked(layer("tools", &tools, 2), &["/bin/sh", "-c", &check], 5),
            ],
        ))
        .unwrap();
    let s = wait_answer(&mut status, 2, MountState::Mounted).await;
    assert!(s.confirm_until_ms.is_some());
    std::fs::write(sandbox.current().join("state.txt"), "written by 2").unwrap();
    std::fs::write(&broken, b"").unwrap();
    let s = wait_answer(&mut status, 2, MountState::RolledBack).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert_eq!(sandbox.slot_mounts("A").len(), 2, "a layer and the overlay");
    assert!(sandbox.slot_mounts("B").is_empty());
    assert_eq!(sandbox.read("state.txt").as_deref(), Some("written by 2"));
    assert_eq!(sandbox.read("t.txt"), None);
    agent.stop().await;
}

/// A reader opening and reading a file at the mount path in a tight loop while the stack is
/// switched 1,000 times: every open and every read succeeds and finds one of the two stacks'
/// contents. Prints the switch times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_sees_no_gap_through_1000_switches() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let sandbox = Sandbox::new();
    sandbox.on_tmpfs();
    sandbox.settings_with_mount_path("confirm_window_s = 0");
    let (configs, agent, mut status) = start_agent(&sandbox).await;
    let report = switch_with_reader(&sandbox, &configs, &mut status, 1000).await;
    eprintln!("{report:?}");
    assert_eq!(report.failures, 0, "{report:?}");
    assert!(report.reads > report.switches, "{report:?}");
    agent.stop().await;
}

/// Without `MOVE_MOUNT_BENEATH` (`move_beneath = false`), the mount path is a symlink to
/// `current`: it follows every switch, is put back when removed by hand, and goes with the
/// last stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_move_beneath_the_mount_path_is_a_symlink() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let high = sandbox.image("high", &[("b.txt", "b")]);
    sandbox.settings_with_mount_path("confirm_window_s = 0\nmove_beneath = false");
    let (configs, agent, mut status) = start_agent(&sandbox).await;
    let mut events = event_subscription(&sandbox);
    let at = sandbox.mount_path();

    configs
        .publish(&config(1, vec![layer("low", &low, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;
    assert_eq!(std::fs::read_link(&at).unwrap(), sandbox.current());
    assert!(mounts_at(&at).is_empty());
    assert_eq!(read_at(&at, "a.txt").as_deref(), Some("a"));
    configs
        .publish(&config(2, vec![layer("high", &high, 1)]))
        .unwrap();
    wait_answer(&mut status, 2, MountState::Mounted).await;
    assert_eq!(read_at(&at, "b.txt").as_deref(), Some("b"));
    assert_eq!(read_at(&at, "a.txt"), None);

    // Removed by hand: put back at the next look at the mounts (the periodic one: removing a
    // symlink changes no mount). Made to happen now by a mount change elsewhere.
    std::fs::remove_file(&at).unwrap();
    let poke = sandbox.root.join("poke");
    std::fs::create_dir_all(&poke).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &poke,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let s = wait_status(&mut status, "the link put back", |s| s.drift.is_some()).await;
    assert!(s.drift.unwrap().contains("is not a symlink"));
    assert_eq!(std::fs::read_link(&at).unwrap(), sandbox.current());
    wait_events(&mut events, "stack.drift", 1).await;

    configs.publish(&config(3, Vec::new())).unwrap();
    wait_answer(&mut status, 3, MountState::Mounted).await;
    assert!(
        std::fs::symlink_metadata(&at).is_err(),
        "the link goes with the stack"
    );
    agent.stop().await;
}

/// What a run of switches under a reader found.
#[derive(Debug)]
pub struct GapReport {
    /// Switches made.
    pub switches: u64,
    /// Opens or reads at the mount path that failed or found neither stack's contents.
    pub failures: u64,
    /// Reads made.
    pub reads: u64,
    /// Median switch time (publish to `Mounted`), ms.
    pub median_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
}

/// Switches the test target between two one-layer stacks `switches` times (each answered
/// before the next) while a thread reads `probe.txt` at the mount path in a tight loop.
async fn switch_with_reader(
    sandbox: &Sandbox,
    configs: &powernode_pubsub::Publication<powernode_types::MountConfig>,
    status: &mut Subscription<MountStatus>,
    switches: u64,
) -> GapReport {
    let x = sandbox.image("x", &[("probe.txt", "x")]);
    let y = sandbox.image("y", &[("probe.txt", "y")]);
    configs
        .publish(&config(1, vec![layer("x", &x, 1)]))
        .unwrap();
    wait_answer(status, 1, MountState::Mounted).await;
    let probe = sandbox.mount_path().join("probe.txt");
    assert_eq!(std::fs::read_to_string(&probe).unwrap(), "x");

    let reader = reader::Reader::start(probe, &["x", "y"]);
    let mut times = Vec::with_capacity(switches as usize);
    for i in 0..switches {
        let generation = i + 2;
        let (name, image) = if i % 2 == 0 { ("y", &y) } else { ("x", &x) };
        let started = Instant::now();
        configs
            .publish(&config(generation, vec![layer(name, image, 1)]))
            .unwrap();
        wait_answer(status, generation, MountState::Mounted).await;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (failures, reads) = reader.stop();
    GapReport {
        switches,
        failures,
        reads,
        median_ms: reader::quantile(&mut times, 0.5),
        p95_ms: reader::quantile(&mut times, 0.95),
    }
}
