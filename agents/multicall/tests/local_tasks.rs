//! `powernode-agent exec` and `sync` on a node without a controller: the CLI publishes the
//! request as `operator/TaskConfig`, the real execd or modulemgr runs it, and the CLI prints
//! the outcome and withdraws the request, after which the agent forgets the task.

mod common;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, node_root, processes_with, spawn_agent};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use powernode_pubsub::{Dirs, Subscription};
use powernode_types::TaskStatus;

const WAIT: Duration = Duration::from_secs(30);

/// A node root with some agents running.
struct Node {
    _dir: tempfile::TempDir,
    root: PathBuf,
    agents: Vec<Child>,
}

impl Node {
    async fn with(agents: &[&str]) -> Node {
        let (dir, root) = node_root();
        let children = agents.iter().map(|a| spawn_agent(&root, a, "")).collect();
        let node = Node {
            _dir: dir,
            root,
            agents: children,
        };
        for agent in agents {
            let ready = Command::new(bin())
                .arg("--root")
                .arg(&node.root)
                .args([
                    "wait",
                    &format!("{agent}/AgentStatus"),
                    "--field",
                    "state=Running",
                ])
                .args(["--timeout", "30"])
                .output()
                .unwrap();
            assert!(ready.status.success(), "{agent} never ran: {ready:?}");
        }
        node
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin());
        command.arg("--root").arg(&self.root).args(args);
        command
    }

    fn write_script(&self, name: &str, text: &str) -> PathBuf {
        let path = self.root.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `agent`'s task statuses, once its publication has synchronized.
    async fn statuses(&self, agent: &str) -> Vec<TaskStatus> {
        let mut sub = Subscription::<TaskStatus>::connect(&Dirs::under_root(&self.root), agent);
        tokio::time::timeout(WAIT, async {
            while !sub.is_synchronized() {
                sub.next().await;
            }
        })
        .await
        .unwrap();
        sub.items().map(|(_, s)| s.clone()).collect()
    }
}

impl Drop for Node {
    /// SIGTERM first: execd drains by killing the scripts it runs, so a failed test leaves
    /// none behind.
    fn drop(&mut self) {
        for child in &mut self.agents {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
        for child in &mut self.agents {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A CLI run in the background, killed if the test ends first.
struct Background(Child);

impl Node {
    /// Starts `exec SCRIPT` in the background with a script that runs `sleep SECONDS`, and
    /// returns once the sleep runs (`SECONDS` tells this test's scripts apart).
    async fn exec_sleeping(&self, seconds: u32) -> Background {
        let script =
            self.write_script(&format!("sleep{seconds}.sh"), &format!("sleep {seconds}\n"));
        let cli = Background(
            self.cli(&["exec", script.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_until("the script started", || {
            !processes_with(&format!("sleep {seconds}")).is_empty()
        })
        .await;
        cli
    }
}

/// Polls `done` until it holds; fails the test with `what` after [`WAIT`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_a_script_through_execd_and_says_how_it_ended() {
    let node = Node::with(&["execd"]).await;

    let script = node.write_script("hello.sh", "echo hello from $0\necho to stderr >&2\n");
    let out = node
        .cli(&["exec", script.to_str().unwrap()])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("hello from"), "{stdout}");
    assert!(stdout.contains("to stderr"), "{stdout}");

    // From stdin, with --json.
    let mut child = node
        .cli(&["exec", "-", "--json", "--interpreter", "/bin/bash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo $BASH_VERSION | cut -c1-1; exit 3\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(status["state"], "Failed", "{stdout}");
    assert!(
        status["output"]
            .as_str()
            .unwrap()
            .contains("[exit status 3]"),
        "{stdout}"
    );
    assert!(
        status["id"].as_str().unwrap().starts_with("local-"),
        "{stdout}"
    );

    // An interpreter off the list is refused.
    let out = node
        .cli(&[
            "exec",
            script.to_str().unwrap(),
            "--interpreter",
            "/usr/bin/perl",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("not allowed"), "{stdout}{stderr}");

    // Out of time: killed, with what it printed.
    let slow = node.write_script("slow.sh", "echo started\nsleep 30\n");
    let out = node
        .cli(&["exec", slow.to_str().unwrap(), "--timeout", "1"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("started"), "{stdout}");
    assert!(stdout.contains("timed out"), "{stdout}");

    // Every request was withdrawn and execd forgot every task.
    assert_eq!(node.statuses("execd").await, Vec::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupting_exec_cancels_the_script() {
    let node = Node::with(&["execd"]).await;
    let mut cli = node.exec_sleeping(300).await;
    kill(Pid::from_raw(cli.0.id() as i32), Signal::SIGINT).unwrap();
    let out = cli.0.wait().unwrap();
    assert_eq!(out.code(), Some(1));
    wait_until("the script is gone with its cancellation", || {
        processes_with("sleep 300").is_empty()
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while !node.statuses("execd").await.is_empty() {
        assert!(Instant::now() < deadline, "execd kept the cancelled task");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_sync_say_when_their_agent_is_not_running() {
    let (_dir, root) = node_root();
    for args in [vec!["exec", "/dev/null"], vec!["sync"]] {
        let out = Command::new(bin())
            .arg("--root")
            .arg(&root)
            .args(&args)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains("is not running"), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_without_a_controller_reconciles_the_local_modules() {
    let node = Node::with(&["modulemgr"]).await;
    let out = node.cli(&["sync"]).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("heartbeat: not sent: heartbeatd is not running"),
        "{stdout}"
    );
    assert!(stdout.contains("synced 0 module(s)"), "{stdout}");
    assert_eq!(node.statuses("modulemgr").await, Vec::new());
}

/// A request left behind by a CLI that was killed is withdrawn by the next one, so its task
/// does not run on forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cli_leaves_nothing_running_after_the_next() {
    let node = Node::with(&["execd"]).await;
    let mut cli = node.exec_sleeping(301).await;
    cli.0.kill().unwrap();
    cli.0.wait().unwrap();
    let quick = node.write_script("quick.sh", "echo quick\n");
    let out = node
        .cli(&["exec", quick.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until("the killed CLI's script is gone", || {
        processes_with("sleep 301").is_empty()
    })
    .await;
}
