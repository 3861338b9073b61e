//! mountmgr in-process against real erofs images, overlayfs and tmpfs in a temporary root.
//! Needs root (each test says "skipped: needs root" otherwise).

mod common;

use common::*;
use mountmgr::record::RecordStore;
use powernode_pubsub::testing::require;
use powernode_types::{MountState, Slot, UpperMode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_layers_compose_and_writes_land_in_upper() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "from low"), ("shared.txt", "low")]);
    let high = sandbox.image("high", &[("b.txt", "from high"), ("shared.txt", "high")]);
    let (configs, agent, mut status) = start_agent(&sandbox).await;

    let low_layer = layer("low", &low, 10);
    let high_layer = layer("high", &high, 20);
    // Listed top first on purpose: the order comes from the priorities.
    configs
        .publish(&config(1, vec![high_layer.clone(), low_layer.clone()]))
        .unwrap();
    let s = wait_answer(&mut status, 1, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert_eq!(
        s.layers,
        [low_layer.digest.clone(), high_layer.digest.clone()]
    );
    assert_eq!(s.error, None);
    assert_one_stack(&sandbox, Slot::A, 2);

    assert_eq!(sandbox.read("a.txt").as_deref(), Some("from low"));
    assert_eq!(sandbox.read("b.txt").as_deref(), Some("from high"));
    assert_eq!(sandbox.read("shared.txt").as_deref(), Some("high"));

    std::fs::write(sandbox.current().join("written.txt"), "hello").unwrap();
    let upper = sandbox.target_dir().join("A/upper/upper/written.txt");
    assert_eq!(std::fs::read_to_string(upper).unwrap(), "hello");
    // The layers stay read-only.
    let erofs = sandbox.target_dir().join("A/layers/0-low/a.txt");
    assert!(std::fs::write(erofs, "x").is_err());

    agent.stop().await;
    // SIGTERM leaves the active stack mounted.
    assert_one_stack(&sandbox, Slot::A, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_switch_slots_and_retire_the_old_one() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "from low"), ("shared.txt", "low")]);
    let high = sandbox.image("high", &[("b.txt", "from high"), ("shared.txt", "high")]);
    let (configs, agent, mut status) = start_agent(&sandbox).await;

    configs
        .publish(&config(
            1,
            vec![layer("low", &low, 10), layer("high", &high, 20)],
        ))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;
    assert_eq!(sandbox.read("shared.txt").as_deref(), Some("high"));

    // Priorities swapped: same layers, another order, so another stack.
    configs
        .publish(&config(
            2,
            vec![layer("low", &low, 30), layer("high", &high, 20)],
        ))
        .unwrap();
    let s = wait_answer(&mut status, 2, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 2);
    assert!(!sandbox.target_dir().join("A").exists(), "old slot removed");
    assert_eq!(sandbox.read("shared.txt").as_deref(), Some("low"));

    // A layer removed.
    configs
        .publish(&config(3, vec![layer("low", &low, 30)]))
        .unwrap();
    let s = wait_answer(&mut status, 3, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert_eq!(s.layers.len(), 1);
    assert_one_stack(&sandbox, Slot::A, 1);
    assert_eq!(sandbox.read("b.txt"), None);
    assert_eq!(sandbox.read("a.txt").as_deref(), Some("from low"));

    // A new generation of the same stack: answered, nothing remounted.
    let before = sandbox.mounts_under(&sandbox.target_dir());
    configs
        .publish(&config(4, vec![layer("low", &low, 30)]))
        .unwrap();
    let s = wait_answer(&mut status, 4, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::A));
    assert_eq!(sandbox.mounts_under(&sandbox.target_dir()), before);

    // No layers: everything of the target goes.
    configs.publish(&config(5, Vec::new())).unwrap();
    let s = wait_answer(&mut status, 5, MountState::Mounted).await;
    assert_eq!(s.slot, None);
    assert!(s.layers.is_empty());
    assert!(sandbox.mounts_under(&sandbox.target_dir()).is_empty());
    assert_eq!(sandbox.current_link(), None);

    // And back.
    configs
        .publish(&config(6, vec![layer("high", &high, 1)]))
        .unwrap();
    let s = wait_answer(&mut status, 6, MountState::Mounted).await;
    assert!(s.slot.is_some());
    assert_eq!(sandbox.read("b.txt").as_deref(), Some("from high"));

    // MountConfig withdrawn: torn down, status withdrawn.
    configs.unpublish(common::TARGET).unwrap();
    wait_no_status(&mut status).await;
    assert!(sandbox.mounts_under(&sandbox.target_dir()).is_empty());
    assert!(!sandbox.target_dir().exists());
    assert!(
        !RecordStore::new(sandbox.root.join("persist/powernode/mountmgr"))
            .path(TARGET)
            .exists()
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_and_keeps_the_running_stack() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let good = sandbox.image("good", &[("a.txt", "good")]);
    let garbage = sandbox.garbage_image("junk");
    let outside = tempfile::NamedTempFile::new().unwrap();
    let (configs, agent, mut status) = start_agent(&sandbox).await;

    configs
        .publish(&config(1, vec![layer("good", &good, 1)]))
        .unwrap();
    let mounted = wait_answer(&mut status, 1, MountState::Mounted).await;

    let missing = sandbox.root.join("store/missing.erofs");
    let mut persistent_escape = config(6, vec![layer("good", &good, 1)]);
    persistent_escape.upper = UpperMode::Persistent {
        path: "../escape".into(),
    };
    let cases = vec![
        (
            config(2, vec![layer("good", &good, 1), layer("junk", &garbage, 2)]),
            vec![
                "layer junk: mount erofs".to_owned(),
                format!("{}: Invalid argument (os error 22)", garbage.display()),
            ],
        ),
        (
            config(3, vec![layer("gone", &missing, 2)]),
            vec![
                "layer gone: image".to_owned(),
                "No such file or directory".to_owned(),
            ],
        ),
        (
            config(4, vec![layer("far", outside.path(), 2)]),
            vec!["is outside the root".to_owned()],
        ),
        (
            config(5, vec![layer("good", &good, 1), layer("good", &good, 2)]),
            vec!["appears twice".to_owned()],
        ),
        (
            persistent_escape,
            vec!["must not contain \"..\"".to_owned()],
        ),
    ];
    for (c, wants) in cases {
        let generation = c.generation;
        configs.publish(&c).unwrap();
        let s = wait_answer(&mut status, generation, MountState::Failed).await;
        let error = s.error.clone().unwrap();
        for want in wants {
            assert!(
                error.contains(&want),
                "generation {generation}: {error:?} lacks {want:?}"
            );
        }
        // The running stack is untouched and still reported.
        assert_eq!(s.slot, mounted.slot);
        assert_eq!(s.layers, mounted.layers);
        assert_one_stack(&sandbox, Slot::A, 1);
        assert_eq!(sandbox.read("a.txt").as_deref(), Some("good"));
        assert!(
            !sandbox.target_dir().join("B").exists(),
            "failed slot cleaned"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_gate_the_switch() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let base = sandbox.image("base", &[("a.txt", "a")]);
    let tools = sandbox.image("tools", &[("bin/tool", "#!/bin/sh\nexit 0\n")]);
    let (configs, agent, mut status) = start_agent(&sandbox).await;

    configs
        .publish(&config(1, vec![layer("base", &base, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;

    let failing = checked(
        layer("tools", &tools, 2),
        &["/bin/sh", "-c", "echo tool is broken >&2; exit 3"],
        10,
    );
    configs
        .publish(&config(2, vec![layer("base", &base, 1), failing]))
        .unwrap();
    let s = wait_answer(&mut status, 2, MountState::Failed).await;
    assert_eq!(
        s.error.as_deref(),
        Some("health check of tools exited with status 3: tool is broken")
    );
    assert_eq!(s.slot, Some(Slot::A));
    assert_one_stack(&sandbox, Slot::A, 1);

    let slow = checked(layer("tools", &tools, 2), &["/bin/sh", "-c", "sleep 30"], 1);
    configs
        .publish(&config(3, vec![layer("base", &base, 1), slow]))
        .unwrap();
    let s = wait_answer(&mut status, 3, MountState::Failed).await;
    assert!(s.error.unwrap().contains("did not finish within 1 s"));
    assert_one_stack(&sandbox, Slot::A, 1);

    // Passing, and run inside the new stack: both layers are visible from its cwd.
    let passing = checked(
        layer("tools", &tools, 2),
        &[
            "/bin/sh",
            "-c",
            "test -f a.txt && test -f bin/tool && test \"$POWERNODE_STACK\" = \"$PWD\"",
        ],
        10,
    );
    configs
        .publish(&config(4, vec![layer("base", &base, 1), passing]))
        .unwrap();
    let s = wait_answer(&mut status, 4, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_adopts_the_mounted_stack() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let high = sandbox.image("high", &[("b.txt", "b")]);
    let (configs, agent, mut status) = start_agent(&sandbox).await;
    configs
        .publish(&config(
            1,
            vec![layer("low", &low, 1), layer("high", &high, 2)],
        ))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;
    std::fs::write(sandbox.current().join("kept.txt"), "upper survives").unwrap();
    let before = sandbox.mounts_under(&sandbox.target_dir());
    agent.stop().await;

    let agent = Agent::start(&sandbox.root).await;
    // Give it time to act on the (unchanged) config too.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = sandbox.mounts_under(&sandbox.target_dir());
    assert_eq!(after, before, "the same mounts, none added, none remounted");
    assert_one_stack(&sandbox, Slot::A, 2);
    assert_eq!(sandbox.read("kept.txt").as_deref(), Some("upper survives"));
    let s = wait_answer(&mut status, 1, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::A));

    // A repeat of generation 1 with other contents does nothing: the generation is the version.
    configs
        .publish(&config(1, vec![layer("low", &low, 1)]))
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(sandbox.mounts_under(&sandbox.target_dir()), before);

    // And it still works.
    configs
        .publish(&config(2, vec![layer("high", &high, 1)]))
        .unwrap();
    let s = wait_answer(&mut status, 2, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reboot_the_recorded_stack_is_rebuilt() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let high = sandbox.image("high", &[("b.txt", "b")]);
    {
        let (configs, agent, mut status) = start_agent(&sandbox).await;
        configs
            .publish(&config(
                1,
                vec![layer("low", &low, 1), layer("high", &high, 2)],
            ))
            .unwrap();
        wait_answer(&mut status, 1, MountState::Mounted).await;
        agent.stop().await;
    }
    // modulemgr is not up yet.
    sandbox.reboot();

    let agent = Agent::start(&sandbox.root).await;
    let mut status = status_subscription(&sandbox);
    let s = wait_answer(&mut status, 1, MountState::Mounted).await;
    assert!(s.slot.is_some());
    let slot = s.slot.unwrap();
    assert_one_stack(&sandbox, slot, 2);
    assert_eq!(sandbox.read("a.txt").as_deref(), Some("a"));
    assert_eq!(sandbox.read("b.txt").as_deref(), Some("b"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_not_trusted() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let (configs, agent, mut status) = start_agent(&sandbox).await;
    configs
        .publish(&config(1, vec![layer("low", &low, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;
    agent.stop().await;
    drop(configs);

    let record = sandbox.root.join("persist/powernode/mountmgr/app.json");
    let mut bytes = std::fs::read(&record).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&record, bytes).unwrap();

    let agent = Agent::start(&sandbox.root).await;
    // Nothing matches a record it does not have: everything of the target is unmounted.
    assert!(sandbox.mounts_under(&sandbox.target_dir()).is_empty());
    assert!(!record.exists());
    let moved = std::fs::read_dir(record.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("app.json.corrupt-")
        });
    assert!(moved, "corrupt record moved aside");
    let error = agent.ctx.health.current().last_error.unwrap_or_default();
    assert!(error.contains("corrupt"), "{error}");
    wait_no_status(&mut status).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rename_rolls_back() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let high = sandbox.image("high", &[("b.txt", "b")]);
    let (configs, agent, mut status) = start_agent(&sandbox).await;
    configs
        .publish(&config(1, vec![layer("low", &low, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;

    // rename(2) cannot replace a non-empty directory: the switch itself fails.
    let current = sandbox.current();
    std::fs::remove_file(&current).unwrap();
    std::fs::create_dir_all(current.join("blocker")).unwrap();
    configs
        .publish(&config(
            2,
            vec![layer("low", &low, 1), layer("high", &high, 2)],
        ))
        .unwrap();
    let s = wait_answer(&mut status, 2, MountState::RolledBack).await;
    assert!(s.error.unwrap().contains("switching"));
    assert_eq!(s.slot, Some(Slot::A));
    assert_eq!(sandbox.slot_mounts("A").len(), 3, "old stack still mounted");
    assert!(sandbox.slot_mounts("B").is_empty(), "new stack torn down");
    assert!(current.join("blocker").is_dir());

    // With the obstacle gone the next generation switches.
    std::fs::remove_dir_all(&current).unwrap();
    configs
        .publish(&config(
            3,
            vec![layer("low", &low, 1), layer("high", &high, 2)],
        ))
        .unwrap();
    let s = wait_answer(&mut status, 3, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    assert_one_stack(&sandbox, Slot::B, 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_upper_keeps_writes_across_switches() {
    if !require(&["root"]) {
        return;
    }
    let sandbox = Sandbox::new();
    let low = sandbox.image("low", &[("a.txt", "a")]);
    let high = sandbox.image("high", &[("b.txt", "b")]);
    let (configs, agent, mut status) = start_agent(&sandbox).await;
    let persistent = |generation, layers| {
        let mut c = config(generation, layers);
        c.upper = UpperMode::Persistent {
            path: "persist/app-upper".into(),
        };
        c
    };
    configs
        .publish(&persistent(1, vec![layer("low", &low, 1)]))
        .unwrap();
    wait_answer(&mut status, 1, MountState::Mounted).await;
    std::fs::write(sandbox.current().join("state.txt"), "kept").unwrap();
    assert!(sandbox
        .root
        .join("persist/app-upper/upper/state.txt")
        .is_file());

    // The new overlay shares upper/ and work/ with the old one while both are mounted.
    configs
        .publish(&persistent(
            2,
            vec![layer("low", &low, 1), layer("high", &high, 2)],
        ))
        .unwrap();
    let s = wait_answer(&mut status, 2, MountState::Mounted).await;
    assert_eq!(s.slot, Some(Slot::B));
    let mounts = sandbox.slot_mounts("B");
    assert_eq!(
        mounts.len(),
        3,
        "two layers and the overlay, no tmpfs: {mounts:#?}"
    );
    assert!(sandbox.slot_mounts("A").is_empty());
    assert_eq!(sandbox.read("state.txt").as_deref(), Some("kept"));
    assert_eq!(sandbox.read("b.txt").as_deref(), Some("b"));
    // (`index=off` shows in mountinfo only where the kernel's default is on; the option
    // string itself is checked by a unit test of `stack`.)
    agent.stop().await;
}
