//! Tasks end to end: the real controller (in this process), the real enrollmgr, heartbeatd and
//! execd (the built `powernode-agent`). Tasks are created in the controller's database, as
//! `powernode-controller task create` does; the controller's watch tells heartbeatd at once,
//! heartbeatd leases them and hands `node.exec` to execd, and the outcome comes back to the
//! controller. The controller's heartbeat interval is 15 s, so a task finished within a few
//! seconds got there through the watch.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::enrolled::{is_final as final_state, EnrolledNode, WAIT};
use common::processes_with;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use powernode_pubsub::{Dirs, Subscription};
use powernode_types::{TaskState, TaskStatus, GLOBAL_KEY};
use serde_json::json;

/// A node with enrollmgr, heartbeatd and execd running against a controller.
async fn boot() -> EnrolledNode {
    EnrolledNode::boot("uuid-tasks", "", &["enrollmgr", "execd", "heartbeatd"]).await
}

/// execd's status of `id` once `done` says so.
async fn status_when(
    node: &EnrolledNode,
    id: &str,
    what: &str,
    done: impl Fn(&TaskStatus) -> bool,
) {
    let mut statuses = Subscription::<TaskStatus>::connect(&node.dirs(), "execd");
    let deadline = Instant::now() + WAIT;
    while !statuses.get(id).is_some_and(&done) {
        node.check(deadline, &format!("execd never showed task {id} {what}"));
        let _ = tokio::time::timeout(Duration::from_millis(200), statuses.next()).await;
    }
}

/// Waits until a process with `marker` in its command line runs (the script started).
async fn wait_for_process(node: &EnrolledNode, marker: &str) {
    let deadline = Instant::now() + WAIT;
    while processes_with(marker).is_empty() {
        node.check(deadline, "the script never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn work_files(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("run/powernode/execd/scripts"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A NodeScript succeeds with its output on the controller, well before the next heartbeat
/// (15 s away): the watch told heartbeatd, which leased it and handed it to execd. A script
/// that exits 3 fails with its output and exit status. Nothing is left in execd's work
/// directory once the controller has both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_exec_task_runs_and_its_output_reaches_the_controller() {
    let node = boot().await;
    let created = Instant::now();
    let id = node
        .create(
            "node.exec",
            json!({"script": "echo hello from the node; echo on stderr >&2"}),
            60,
        )
        .await;
    let task = node.task_when(&id, "finished", final_state).await;
    let took = created.elapsed();
    assert_eq!(task.state, "succeeded", "{task:?}");
    let output = task.output.unwrap();
    assert!(
        output.contains("hello from the node") && output.contains("on stderr"),
        "{output}"
    );
    assert!(
        took < Duration::from_secs(10),
        "created -> succeeded took {took:?}: the watch did not bring it"
    );
    println!("task created -> succeeded on the controller in {took:?}");

    let id = node
        .create("node.exec", json!({"script": "echo partial; exit 3"}), 60)
        .await;
    let task = node.task_when(&id, "finished", final_state).await;
    assert_eq!(task.state, "failed");
    let output = task.output.unwrap();
    assert!(
        output.contains("partial") && output.ends_with("[exit status 3]"),
        "{output}"
    );
    let deadline = Instant::now() + WAIT;
    while !work_files(&node.root).is_empty() {
        node.check(
            deadline,
            &format!(
                "execd's files of reported tasks were not removed: {:?}",
                work_files(&node.root)
            ),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A script past its timeout is killed with everything it started (no process with its
/// marker remains) and reported failed; a script naming an interpreter not on the list, and a
/// task of a kind no agent here runs, fail with the reason and run nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_refused_interpreters_and_unknown_kinds_fail_with_the_reason() {
    let node = boot().await;
    let marker = format!("31.{}", std::process::id());
    let id = node
        .create(
            "node.exec",
            json!({"script": format!("sleep {marker} & sleep {marker}"), "timeout_s": 1}),
            60,
        )
        .await;
    let task = node.task_when(&id, "finished", final_state).await;
    assert_eq!(task.state, "failed");
    assert!(task.output.unwrap().contains("timed out after 1 s"));
    assert_eq!(processes_with(&marker), Vec::<i32>::new(), "orphans left");

    let id = node
        .create(
            "node.exec",
            json!({"script": "true", "interpreter": "/usr/bin/perl"}),
            60,
        )
        .await;
    let task = node.task_when(&id, "finished", final_state).await;
    assert_eq!(task.state, "failed");
    assert!(task.output.unwrap().contains("not allowed"));

    let id = node.create("module.frobnicate", json!({}), 60).await;
    let task = node.task_when(&id, "finished", final_state).await;
    assert_eq!(task.state, "failed");
    assert!(task
        .output
        .unwrap()
        .contains("no agent on this node runs tasks of kind"));
}

/// A task cancelled on the controller while it runs (which `powernode-agent tasks` shows
/// held and Running): heartbeatd's renew hears `lease_lost`, withdraws the config, and execd
/// kills the script's group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_task_is_killed_on_the_node() {
    let node = boot().await;
    let marker = format!("32.{}", std::process::id());
    // A 2 s lease: renewed every second, so the cancel is heard within about a second.
    let id = node
        .create(
            "node.exec",
            json!({"script": format!("echo started; sleep {marker}")}),
            2,
        )
        .await;
    status_when(&node, &id, "Running", |s| s.state == TaskState::Running).await;
    wait_for_process(&node, &marker).await;
    // The operator on the node sees it held and running.
    let out = common::run(
        std::process::Command::new(common::bin())
            .arg("--root")
            .arg(&node.root)
            .args(["tasks", "--json"])
            .env_remove("POWERNODE_ROOT"),
    );
    out.assert_code(0);
    let shown = out.json();
    let task = shown
        .as_array()
        .and_then(|all| all.iter().find(|t| t["id"] == id.as_str()))
        .unwrap_or_else(|| panic!("tasks --json does not list {id}: {shown}"));
    assert_eq!(task["held"], true, "{task}");
    assert_eq!(task["status"]["state"], "Running", "{task}");
    node.storage
        .cancel_task(&id, powernode_controller::now_ms())
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !processes_with(&marker).is_empty() {
        node.check(deadline, "the cancelled script still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let task = node.storage.task(&id).await.unwrap().unwrap();
    assert_eq!(task.state, "cancelled");
}

/// execd killed with SIGKILL mid-task: the restarted execd kills what the script left running,
/// reports it Interrupted with the output so far, and does not run it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_running_when_execd_is_killed_is_reported_interrupted() {
    let mut node = boot().await;
    let marker = format!("33.{}", std::process::id());
    let runs = node.root.join("runs");
    let id = node
        .create(
            "node.exec",
            json!({"script": format!("echo ran >> {}; echo started; sleep {marker}", runs.display())}),
            60,
        )
        .await;
    status_when(&node, &id, "Running", |s| s.state == TaskState::Running).await;
    wait_for_process(&node, &marker).await;
    node.kill9("execd");
    node.start("execd");
    let task = node.task_when(&id, "finished", final_state).await;
    assert_eq!(task.state, "interrupted", "{task:?}");
    let output = task.output.unwrap();
    assert!(
        output.starts_with("started") && output.contains("not run again"),
        "{output}"
    );
    assert_eq!(processes_with(&marker), Vec::<i32>::new(), "orphans left");
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "ran\n",
        "run twice"
    );
}

/// SIGTERM drains execd: a script still running when its stop grace (`execd::STOP_GRACE`)
/// is over has its group killed, the task is reported Interrupted to the controller with its
/// output so far, and execd exits 0. (A script that ends within the grace keeps its outcome:
/// tests/drain.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_kills_the_running_script_and_reports_it_interrupted() {
    let mut node = boot().await;
    let marker = format!("34.{}", std::process::id());
    let id = node
        .create(
            "node.exec",
            json!({"script": format!("echo started; sleep {marker}")}),
            60,
        )
        .await;
    status_when(&node, &id, "Running", |s| s.state == TaskState::Running).await;
    wait_for_process(&node, &marker).await;
    let (_, execd) = node.agents.iter_mut().find(|(a, _)| *a == "execd").unwrap();
    kill(Pid::from_raw(execd.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + execd::STOP_GRACE + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = execd.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "execd did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "execd exited {exit:?}");
    assert_eq!(processes_with(&marker), Vec::<i32>::new(), "orphans left");
    let task = node.task_when(&id, "finished", final_state).await;
    assert_eq!(task.state, "interrupted", "{task:?}");
    assert!(task.output.unwrap().starts_with("started"));
}

/// `cert.rotate` (rotate now): enrollmgr rotates at once, long before 75 % of the hour-long
/// certificate; the task succeeds with the new fingerprint, which is the one the node now
/// publishes, and the controller has issued the node a second certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_rotate_rotates_now() {
    let node = boot().await;
    let dirs = Dirs::under_root(&node.root);
    let enrollment = Subscription::<powernode_types::EnrollmentStatus>::connect(&dirs, "enrollmgr");
    let before = {
        let deadline = Instant::now() + WAIT;
        let mut enrollment = enrollment;
        loop {
            if let Some(fp) = enrollment
                .get(GLOBAL_KEY)
                .and_then(|s| s.cert_fingerprint.clone())
            {
                break fp;
            }
            node.check(deadline, "no enrollment status");
            let _ = tokio::time::timeout(Duration::from_millis(200), enrollment.next()).await;
        }
    };
    let id = node.create("cert.rotate", json!({}), 60).await;
    let task = node.task_when(&id, "finished", final_state).await;
    assert_eq!(task.state, "succeeded", "{task:?}");
    let output = task.output.unwrap();
    assert!(output.contains(&format!("(was {before})")), "{output}");
    let mut enrollment =
        Subscription::<powernode_types::EnrollmentStatus>::connect(&dirs, "enrollmgr");
    let deadline = Instant::now() + WAIT;
    let after = loop {
        if let Some(fp) = enrollment
            .get(GLOBAL_KEY)
            .and_then(|s| s.cert_fingerprint.clone())
            .filter(|fp| *fp != before)
        {
            break fp;
        }
        node.check(deadline, "the node never published the new certificate");
        let _ = tokio::time::timeout(Duration::from_millis(200), enrollment.next()).await;
    };
    assert!(output.contains(&after), "{output} does not name {after}");
    let detail = node
        .storage
        .node_detail(&node.node_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(detail.certificates.len(), 2, "{:?}", detail.certificates);
}
