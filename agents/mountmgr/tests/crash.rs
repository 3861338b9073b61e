//! The real binary killed with SIGKILL in the middle of a switch, then restarted.
//! Needs root and `target/debug/powernode-agent` (built here if possible, else skipped).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use powernode_pubsub::testing::{require, skip};
use powernode_pubsub::Subscription;
use powernode_types::{AgentState, AgentStatus, MountState, Slot};

/// The multi-call binary, freshly built; `None` (after [`skip`]) if it cannot be had.
fn agent_binary() -> Option<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let binary = target_dir.join("debug/powernode-agent");
    // Always ask cargo: a no-op when fresh, and a stale binary would test old code.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo)
        // With the crash points, as the powernode-agent tests build it: the same binary.
        .args([
            "build",
            "--quiet",
            "-p",
            "powernode-agent",
            "--features",
            "failpoints",
        ])
        .current_dir(&workspace)
        .stdin(Stdio::null())
        .spawn();
    let built = match &mut build {
        Ok(child) => {
            let deadline = std::time::Instant::now() + Duration::from_secs(900);
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status.success(),
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break false;
                    }
                }
            }
        }
        Err(_) => false,
    };
    match (built, binary.is_file()) {
        (true, true) => Some(binary),
        (false, true) => {
            eprintln!(
                "warning: `cargo build -p powernode-agent` failed; using the existing binary"
            );
            Some(binary)
        }
        (_, false) => {
            skip(&format!(
                "needs {}, which is missing and could not be built",
                binary.display()
            ));
            None
        }
    }
}

/// The agent process; killed with SIGKILL if the test ends while it runs.
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(binary: &Path, sandbox: &Sandbox) -> Process {
        Process::start_armed(binary, sandbox, "")
    }

    /// Starts the agent with the named crash points `failpoints` armed.
    fn start_armed(binary: &Path, sandbox: &Sandbox, failpoints: &str) -> Process {
        let log_path = sandbox.root.join("mountmgr.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new(binary)
            .args(["run", "mountmgr", "--root"])
            .arg(&sandbox.root)
            .env("POWERNODE_FAILPOINTS", failpoints)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Process {
            child,
            log: log_path,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end by itself; its exit status.
    fn wait_exit(mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- mountmgr log ---\n{log}");
        }
    }
}

/// Waits until the agent process `pid` says it is serving (it has recovered).
async fn wait_ready(sandbox: &Sandbox, pid: u32) {
    let mut health = Subscription::<AgentStatus>::connect(&sandbox.dirs(), "mountmgr");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(s) = health.get("mountmgr") {
            if s.pid == pid && matches!(s.state, AgentState::Running | AgentState::Degraded) {
                return;
            }
        }
        if tokio::time::timeout_at(deadline, health.next())
            .await
            .is_err()
        {
            panic!("agent {pid} not ready: {:?}", health.get("mountmgr"));
        }
    }
}

/// Waits until slot B's overlay is mounted (the new stack is built and being checked).
async fn wait_b_built(sandbox: &Sandbox) {
    let merged = sandbox.target_dir().join("B/merged");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !sandbox
        .slot_mounts("B")
        .iter()
        .any(|m| m.mount_point == merged && m.fs_type == "overlay")
    {
        assert!(tokio::time::Instant::now() < deadline, "slot B never built");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_switch_leaves_one_consistent_stack() {
    if !require(&["root"]) {
        return;
    }
    let Some(binary) = agent_binary() else {
        return;
    };
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let high = sandbox.image("high", &[("b.txt", "b")]);
    let gate = sandbox.root.join("gate");
    let configs = config_publisher(&sandbox);
    let mut status = status_subscription(&sandbox);
    let process = Process::start(&binary, &sandbox);

    configs
        .publish(&config(1, vec![layer("low", &low, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;
    assert_one_stack(&sandbox, Slot::A, 1);

    // Generation 2's health check waits for the gate: the agent is killed while it checks.
    let wait_for_gate = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    let checked_high = checked(
        layer("high", &high, 2),
        &["/bin/sh", "-c", &wait_for_gate],
        60,
    );
    configs
        .publish(&config(2, vec![layer("low", &low, 1), checked_high]))
        .unwrap();
    wait_answer(&mut status, 2, MountState::Mounting).await;
    wait_b_built(&sandbox).await;
    process.kill9();

    // At the instant of the kill: the old stack is whole and current, B is half-switched.
    assert_eq!(sandbox.current_link(), Some(PathBuf::from("A/merged")));
    assert_eq!(sandbox.slot_mounts("A").len(), 3);
    assert_eq!(sandbox.slot_mounts("B").len(), 4, "B was built when killed");

    // Restart with modulemgr away, so the recovery alone is observed.
    drop(configs);
    let process = Process::start(&binary, &sandbox);
    wait_ready(&sandbox, process.pid()).await;
    assert_one_stack(&sandbox, Slot::A, 1);
    let s = wait_answer(&mut status, 1, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert_eq!(sandbox.read("a.txt").as_deref(), Some("a"));
    let log = std::fs::read_to_string(sandbox.root.join("mountmgr.log")).unwrap();
    assert!(log.contains("adopt slot A (generation 1)"), "{log}");

    // modulemgr back (its checkpoint still holds generation 2): converges to B.
    std::fs::write(&gate, b"").unwrap();
    let _configs = config_publisher(&sandbox);
    let s = wait_answer(&mut status, 2, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 2);

    // SIGTERM: exit 0, the active stack stays.
    let exit = process.terminate();
    assert!(exit.success(), "{exit}");
    assert_one_stack(&sandbox, Slot::B, 2);
}

/// The agent dies (SIGKILL, from the named crash point) at each step of switching from
/// generation 1 (slot A) to generation 2 (slot B): after building B, after recording the
/// intent, after renaming `current`, after recording the result. At the instant of death
/// `current` names A before the rename and B after it; restarted, the agent recovers one
/// consistent stack and converges to generation 2 in slot B, with nothing leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_each_step_of_a_switch_it_recovers_one_stack() {
    if !require(&["root"]) {
        return;
    }
    let Some(binary) = agent_binary() else {
        return;
    };
    for (point, current_at_death) in [
        ("mountmgr.built", "A/merged"),
        ("mountmgr.intent_recorded", "A/merged"),
        ("mountmgr.switched", "B/merged"),
        ("mountmgr.result_recorded", "B/merged"),
    ] {
        killed_at_then_recovered(&binary, point, current_at_death, None).await;
    }
}

/// Switches from generation 1 (slot A) to generation 2 (slot B) with the agent armed to die at
/// `point` (its second hit is generation 2's switch); checks `current` and, with the mount path
/// (`path_at_death` set), the stack the path shows at the instant of death (always a whole
/// one); restarts the agent and checks it converges to generation 2 in slot B, the mount path
/// showing exactly that stack, nothing leaked, and SIGTERM leaving it so.
async fn killed_at_then_recovered(
    binary: &Path,
    point: &str,
    current_at_death: &str,
    path_at_death: Option<&str>,
) {
    use std::os::unix::process::ExitStatusExt;
    let sandbox = Sandbox::new();
    if path_at_death.is_some() {
        sandbox.settings_with_mount_path("confirm_window_s = 0");
    }
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let high = sandbox.image("high", &[("b.txt", "b")]);
    let configs = config_publisher(&sandbox);
    let mut status = status_subscription(&sandbox);
    let process = Process::start_armed(binary, &sandbox, &format!("{point}:2"));
    configs
        .publish(&config(1, vec![layer("low", &low, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;
    if path_at_death.is_some() {
        assert_mount_path_shows(&sandbox, "A");
    }
    configs
        .publish(&config(
            2,
            vec![layer("low", &low, 1), layer("high", &high, 2)],
        ))
        .unwrap();
    let log_path = sandbox.root.join("mountmgr.log");
    let exit = process.wait_exit();
    assert_eq!(exit.signal(), Some(9), "{point}: {exit}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains(&format!("failpoint {point} hit")),
        "{point}: {log}"
    );
    assert_eq!(
        sandbox.current_link(),
        Some(PathBuf::from(current_at_death)),
        "{point}"
    );
    if let Some(slot) = path_at_death {
        let top = mounts_at(&sandbox.mount_path())
            .last()
            .map(|e| e.dev.clone());
        assert_eq!(top, overlay_dev(&sandbox, slot), "{point}");
        assert!(
            std::fs::read_to_string(sandbox.mount_path().join("a.txt")).is_ok(),
            "{point}: the mount path shows a whole stack"
        );
    }

    let process = Process::start(binary, &sandbox);
    let s = wait_answer(&mut status, 2, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B), "{point}");
    if path_at_death.is_some() {
        // Put right by the first look at the mounts after the start.
        let settled = || {
            let at = mounts_at(&sandbox.mount_path());
            at.len() == 1 && Some(at[0].dev.clone()) == overlay_dev(&sandbox, "B")
        };
        let deadline = std::time::Instant::now() + WAIT;
        while !settled() {
            assert!(
                std::time::Instant::now() < deadline,
                "{point}: the mount path never settled: {:#?}",
                mounts_at(&sandbox.mount_path())
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_mount_path_shows(&sandbox, "B");
        assert_eq!(
            std::fs::read_to_string(sandbox.mount_path().join("b.txt")).unwrap(),
            "b",
            "{point}"
        );
    }
    assert_one_stack(&sandbox, Slot::B, 2);
    assert_eq!(sandbox.read("b.txt").as_deref(), Some("b"), "{point}");
    let exit = process.terminate();
    assert!(exit.success(), "{point}: {exit}");
    assert_one_stack(&sandbox, Slot::B, 2);
    if path_at_death.is_some() {
        assert_mount_path_shows(&sandbox, "B");
    }
}

/// The target's `MountStatus` as the agent's checkpoint holds it (the agent is not running).
fn checkpointed_status(sandbox: &Sandbox) -> Option<serde_json::Value> {
    let dir = sandbox.dirs().checkpoints("mountmgr", "MountStatus", false);
    let info = powernode_types::registry::lookup("MountStatus").unwrap();
    powernode_pubsub::checkpoint::read_dir(&dir, "MountStatus")
        .unwrap()
        .into_iter()
        .find(|item| item.key == TARGET)
        .map(|item| {
            let (_, bytes) = item.payload.unwrap();
            (info.decode_json)(&bytes).unwrap()
        })
}

/// SIGTERM while generation 2's health check holds its switch open (DESIGN §7, "SIGTERM
/// drains"): the agent exits 0 without switching; the new slot is discarded, the old stack
/// is whole and current, the record names it with no switch under way, and the status left
/// in the checkpoint says generation 1 mounted in slot A (not generation 2 `Mounting`). The
/// next start adopts that stack as it is, then converges to generation 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_health_check_keeps_the_old_stack_consistent() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let Some(binary) = agent_binary() else {
        return;
    };
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let high = sandbox.image("high", &[("b.txt", "b")]);
    let gate = sandbox.root.join("gate");
    let configs = config_publisher(&sandbox);
    let mut status = status_subscription(&sandbox);
    let process = Process::start(&binary, &sandbox);
    configs
        .publish(&config(1, vec![layer("low", &low, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;

    let wait_for_gate = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    let checked_high = checked(
        layer("high", &high, 2),
        &["/bin/sh", "-c", &wait_for_gate],
        60,
    );
    configs
        .publish(&config(2, vec![layer("low", &low, 1), checked_high]))
        .unwrap();
    wait_answer(&mut status, 2, MountState::Mounting).await;
    wait_b_built(&sandbox).await;
    let exit = process.terminate();
    assert!(exit.success(), "{exit}");

    assert_one_stack(&sandbox, Slot::A, 1);
    assert_eq!(sandbox.read("a.txt").as_deref(), Some("a"));
    let layout = mountmgr::layout::Layout::new(&sandbox.root).unwrap();
    let record = mountmgr::record::RecordStore::new(layout.records_dir())
        .load(TARGET)
        .unwrap()
        .expect("no record");
    let applied = record.applied.expect("the record names no stack");
    assert_eq!(
        (applied.slot, applied.config.generation),
        (Slot::A, 1),
        "{applied:?}"
    );
    assert_eq!(record.switching_to, None);
    let left = checkpointed_status(&sandbox).expect("no MountStatus checkpoint");
    assert_eq!(left["generation"], 1, "{left}");
    assert_eq!(left["state"], "Mounted", "{left}");
    assert_eq!(left["slot"], "A", "{left}");

    // The next start adopts the stack without repairing anything, then switches.
    drop(configs);
    let process = Process::start(&binary, &sandbox);
    wait_ready(&sandbox, process.pid()).await;
    assert_one_stack(&sandbox, Slot::A, 1);
    let log = std::fs::read_to_string(sandbox.root.join("mountmgr.log")).unwrap();
    assert!(log.contains("adopt slot A (generation 1)"), "{log}");
    std::fs::write(&gate, b"").unwrap();
    let _configs = config_publisher(&sandbox);
    let s = wait_answer(&mut status, 2, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 2);
    let exit = process.terminate();
    assert!(exit.success(), "{exit}");
}

/// The same with the mount path switched beneath (`MOVE_MOUNT_BENEATH`), and one more crash
/// point, after moving the mount path: the path shows A until it is moved and B after, a whole
/// stack at every instant; restarted, the agent adopts the stack `current` names and puts the
/// mount path right (one mount there, a copy of B's overlay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_each_step_of_a_gapless_switch_it_recovers_one_stack() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let Some(binary) = agent_binary() else {
        return;
    };
    for (point, current_at_death, path_at_death) in [
        ("mountmgr.built", "A/merged", "A"),
        ("mountmgr.intent_recorded", "A/merged", "A"),
        ("mountmgr.switched", "B/merged", "A"),
        ("mountmgr.path_switched", "B/merged", "B"),
        ("mountmgr.result_recorded", "B/merged", "B"),
    ] {
        killed_at_then_recovered(&binary, point, current_at_death, Some(path_at_death)).await;
    }
}

/// The record of the test target, as the agent left it.
fn record(sandbox: &Sandbox) -> mountmgr::record::Record {
    let layout = mountmgr::layout::Layout::new(&sandbox.root).unwrap();
    mountmgr::record::RecordStore::new(layout.records_dir())
        .load(TARGET)
        .unwrap()
        .expect("no record")
}

/// Generation 1 (`v.txt` = 1, no check) in slot A, then generation 2 (`v.txt` = 2, a check
/// that fails once `broken` exists) switched to in slot B, its confirmation window open:
/// the window's end (`confirm_until_ms`) and generation 1's image.
async fn switched_into_a_window(
    sandbox: &Sandbox,
    configs: &powernode_pubsub::Publication<powernode_types::MountConfig>,
    status: &mut Subscription<powernode_types::MountStatus>,
    broken: &Path,
) -> (u64, PathBuf) {
    let old = sandbox.image("old", &[("v.txt", "1")]);
    let new = sandbox.image("new", &[("v.txt", "2")]);
    let check = format!("test ! -e {}", broken.display());
    configs
        .publish(&config(1, vec![layer("app", &old, 1)]))
        .unwrap();
    wait_answer(status, 1, MountState::Mounted).await;
    configs
        .publish(&config(
            2,
            vec![checked(
                layer("app", &new, 1),
                &["/bin/sh", "-c", &check],
                5,
            )],
        ))
        .unwrap();
    let s = wait_answer(status, 2, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    let until = s.confirm_until_ms.expect("a confirmation window");
    assert_eq!(
        sandbox.slot_mounts("A").len(),
        3,
        "the previous stack is kept"
    );
    assert_eq!(sandbox.read("v.txt").as_deref(), Some("2"));
    (until, old)
}

/// An agent running in a sandbox whose confirmation windows last `window_s` (checks every
/// second), switched into one ([`switched_into_a_window`]).
struct InWindow {
    sandbox: Sandbox,
    /// The file whose existence makes generation 2's check fail.
    broken: PathBuf,
    configs: powernode_pubsub::Publication<powernode_types::MountConfig>,
    status: Subscription<powernode_types::MountStatus>,
    process: Process,
    /// The window's end.
    until: u64,
    /// Generation 1's image.
    old_image: PathBuf,
}

async fn in_a_window(binary: &Path, window_s: u64) -> InWindow {
    let sandbox = Sandbox::new();
    sandbox.settings(&format!(
        "[mounts]\nconfirm_window_s = {window_s}\nconfirm_interval_s = 1\n"
    ));
    let broken = sandbox.root.join("broken");
    let configs = config_publisher(&sandbox);
    let mut status = status_subscription(&sandbox);
    let process = Process::start(binary, &sandbox);
    let (until, old_image) = switched_into_a_window(&sandbox, &configs, &mut status, &broken).await;
    InWindow {
        sandbox,
        broken,
        configs,
        status,
        process,
        until,
        old_image,
    }
}

/// Killed (SIGKILL) in the confirmation window of the switch from generation 1 (slot A) to
/// generation 2 (slot B), with generation 1's image removed from the store meanwhile (its
/// mounts hold it; a modulemgr from before it kept the window's images collected it):
/// restarted, the agent keeps slot A mounted, resumes the window with its recorded deadline,
/// and when generation 2's check fails it switches back to generation 1 and answers
/// generation 2 `RolledBack`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_confirmation_window_still_rolls_back() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let Some(binary) = agent_binary() else {
        return;
    };
    let InWindow {
        sandbox,
        broken,
        configs: _configs,
        mut status,
        process,
        until,
        old_image,
    } = in_a_window(&binary, 120).await;
    process.kill9();

    let window = record(&sandbox).window.expect("the window is not recorded");
    assert_eq!(window.until_ms, until);
    assert_eq!(
        (window.previous.slot, window.previous.config.generation),
        (Slot::A, 1)
    );
    std::fs::remove_file(&old_image).unwrap();

    let process = Process::start(&binary, &sandbox);
    wait_ready(&sandbox, process.pid()).await;
    let mut events = event_subscription(&sandbox);
    let recovered = wait_events(&mut events, "stack.recovered", 1).await;
    let recovered = recovered.last().unwrap();
    assert_eq!(field(recovered, "decision"), Some("adopt"), "{recovered:?}");
    assert!(
        field(recovered, "done")
            .unwrap()
            .contains("kept generation 1 in slot A for the rest of the confirmation window"),
        "{recovered:?}"
    );
    assert_eq!(recovered.severity, powernode_types::Severity::Info);
    assert_eq!(
        sandbox.slot_mounts("A").len(),
        3,
        "slot A kept for the window"
    );
    assert_eq!(sandbox.slot_mounts("B").len(), 3);
    assert_eq!(sandbox.current_link(), Some(PathBuf::from("B/merged")));
    let s = status.get(TARGET).cloned().unwrap();
    assert_eq!((s.generation, s.state), (2, MountState::Mounted));
    assert_eq!(s.confirm_until_ms, Some(until), "the same deadline");

    // The check starts failing: back to generation 1, whose image is gone from the store
    // but held by its mounts.
    std::fs::write(&broken, b"").unwrap();
    let s = wait_answer(&mut status, 2, MountState::RolledBack).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert_eq!(s.confirm_until_ms, None);
    let error = s.error.unwrap();
    assert!(
        error.contains("in the confirmation window; generation 1 is active again"),
        "{error}"
    );
    assert_one_stack(&sandbox, Slot::A, 1);
    assert_eq!(sandbox.read("v.txt").as_deref(), Some("1"));
    let rolled_back = wait_events(&mut events, "stack.rolled_back", 1).await;
    assert_eq!(field(&rolled_back[0], "active_generation"), Some("1"));
    let after = record(&sandbox);
    let applied = after.applied.unwrap();
    assert_eq!((applied.slot, applied.config.generation), (Slot::A, 1));
    assert_eq!(after.window, None);

    let exit = process.terminate();
    assert!(exit.success(), "{exit}");
    assert_one_stack(&sandbox, Slot::A, 1);
}

/// Stopped (SIGTERM) in a confirmation window and started again 4 s later: the previous
/// stack stays mounted meanwhile, and the resumed window ends at the deadline recorded at the
/// switch, not a full window after the restart; passing, it retires the previous stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_resumed_after_a_restart_ends_at_its_deadline() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let Some(binary) = agent_binary() else {
        return;
    };
    let InWindow {
        sandbox,
        configs: _configs,
        mut status,
        process,
        until,
        ..
    } = in_a_window(&binary, 10).await;
    let exit = process.terminate();
    assert!(exit.success(), "{exit}");
    assert_eq!(sandbox.slot_mounts("A").len(), 3, "kept through the stop");
    assert_eq!(record(&sandbox).window.map(|w| w.until_ms), Some(until));

    tokio::time::sleep(Duration::from_secs(4)).await;
    let process = Process::start(&binary, &sandbox);
    wait_ready(&sandbox, process.pid()).await;
    assert_eq!(
        sandbox.slot_mounts("A").len(),
        3,
        "slot A kept for the window"
    );
    let s = wait_status(&mut status, "the window to pass", |s| {
        s.generation == 2 && s.confirm_until_ms.is_none()
    })
    .await;
    let ended = agentbase::health::now_ms();
    assert_eq!(s.state, MountState::Mounted);
    // A window started afresh at the restart would end 4 s later than this.
    assert!(
        ended + 100 >= until && ended < until + 3_000,
        "the window ended at {ended}, its deadline was {until}"
    );
    assert_one_stack(&sandbox, Slot::B, 1);
    assert_eq!(record(&sandbox).window, None);
    let exit = process.terminate();
    assert!(exit.success(), "{exit}");
    assert_one_stack(&sandbox, Slot::B, 1);
}

/// A reboot in the confirmation window of the switch from generation 1 (slot A) to
/// generation 2 (slot B), generation 1's image still in the store: started again with
/// nothing mounted, the agent builds generation 1 first and switches to generation 2 from it,
/// so the window goes on to its recorded deadline with slot A to switch back to; when
/// generation 2's check then fails, generation 1 is active again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reboot_in_the_confirmation_window_can_still_roll_back() {
    if !require(&["root", "mkfs.erofs"]) {
        return;
    }
    let Some(binary) = agent_binary() else {
        return;
    };
    let InWindow {
        sandbox,
        broken,
        configs,
        status,
        process,
        until,
        ..
    } = in_a_window(&binary, 120).await;
    let exit = process.terminate();
    assert!(exit.success(), "{exit}");
    drop((configs, status));
    sandbox.reboot();
    assert!(sandbox.mounts_under(&sandbox.target_dir()).is_empty());

    let process = Process::start(&binary, &sandbox);
    wait_ready(&sandbox, process.pid()).await;
    let mut status = status_subscription(&sandbox);
    let s = wait_status(&mut status, "generation 2 mounted again", |s| {
        s.generation == 2 && s.state == MountState::Mounted
    })
    .await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_eq!(s.confirm_until_ms, Some(until), "the window's recorded end");
    assert_eq!(
        sandbox.slot_mounts("A").len(),
        3,
        "generation 1 built again"
    );
    assert_eq!(sandbox.slot_mounts("B").len(), 3);
    assert_eq!(sandbox.current_link(), Some(PathBuf::from("B/merged")));
    assert_eq!(sandbox.read("v.txt").as_deref(), Some("2"));
    let mut events = event_subscription(&sandbox);
    let recovered = wait_events(&mut events, "stack.recovered", 1).await;
    let recovered = recovered.last().unwrap();
    assert_eq!(
        field(recovered, "decision"),
        Some("rebuild"),
        "{recovered:?}"
    );
    assert!(
        field(recovered, "done")
            .unwrap()
            .contains("building generation 1 in slot A first"),
        "{recovered:?}"
    );
    assert_eq!(record(&sandbox).window.map(|w| w.until_ms), Some(until));

    std::fs::write(&broken, b"").unwrap();
    let s = wait_answer(&mut status, 2, MountState::RolledBack).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert_eq!(s.confirm_until_ms, None);
    assert_one_stack(&sandbox, Slot::A, 1);
    assert_eq!(sandbox.read("v.txt").as_deref(), Some("1"));
    let exit = process.terminate();
    assert!(exit.success(), "{exit}");
}
