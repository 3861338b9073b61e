//! `powernode-agent events` against the journal the real eventd writes (no controller, so
//! nothing is delivered): every event, oldest first; `--pending` adding what agents raised
//! while eventd was down; `--follow` printing what eventd journals next, ended by SIGTERM.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use agentbase::{Context, Root, Settings};
use common::{bin, run, spawn_agent, Running};
use powernode_types::Severity;

fn cli(root: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(bin());
    command.arg("--root").arg(root).args(args);
    command.env_remove("POWERNODE_ROOT");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_shows_the_journal_the_pending_and_what_follows() {
    let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();

    let out = run(&mut cli(&root, &["events"]));
    out.assert_code(0);
    assert_eq!(out.stdout, "");
    out.assert_stderr_contains("no event journal");

    let ctx = Context::new("heartbeatd", Root::new(&root), Settings::default()).unwrap();
    let mut eventd = spawn_agent(&root, "eventd", "");
    for i in 0..5u32 {
        ctx.events
            .raise(
                Severity::Warning,
                "test.cli",
                &format!("number {i}"),
                &[("i", &i.to_string())],
            )
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctx.events.pending() > 0 {
        assert!(Instant::now() < deadline, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = eventd.kill();
    let _ = eventd.wait();

    let out = run(&mut cli(&root, &["events"]));
    out.assert_code(0);
    let ours: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.contains("test.cli"))
        .collect();
    assert_eq!(ours.len(), 5, "{out:?}");
    for (i, line) in ours.iter().enumerate() {
        for part in [
            "heartbeatd",
            "Warning",
            &format!("number {i}"),
            &format!("i={i}"),
        ] {
            assert!(line.contains(part), "{part}: {line}");
        }
    }
    assert!(
        out.stdout.contains("agent.started"),
        "eventd's own events too"
    );

    // eventd down: two more raised, not yet journalled.
    for i in 5..7u32 {
        ctx.events
            .raise(Severity::Critical, "test.cli", &format!("number {i}"), &[])
            .unwrap();
    }
    let out = run(&mut cli(&root, &["events", "--pending", "--json"]));
    out.assert_code(0);
    let lines = out.json_lines();
    let ours: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "test.cli").collect();
    assert_eq!(ours.len(), 7, "{out:?}");
    assert!(ours[..5].iter().all(|l| l["stage"] == "journalled"));
    assert!(ours[5..]
        .iter()
        .all(|l| l["stage"] == "raised" && l["index"].is_null()));
    assert_eq!(ours[6]["message"], "number 6");
    assert_eq!(ours[6]["severity"], "Critical");
    let text = run(&mut cli(&root, &["events", "--pending"]));
    assert!(
        text.stdout.contains("[not yet journalled] number 6"),
        "{text:?}"
    );

    // --follow: what is there, then what eventd journals next; SIGTERM ends it with 0.
    let follow = Running::spawn(&mut cli(&root, &["events", "--follow", "--json"]));
    follow.stdout_line(|l| l.contains("number 4"));
    let eventd = spawn_agent(&root, "eventd", "");
    follow.stdout_line(|l| l.contains("number 6") && l.contains("journalled"));
    ctx.events
        .raise(Severity::Info, "test.cli", "after follow", &[])
        .unwrap();
    follow.stdout_line(|l| l.contains("after follow"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follow.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let done = follow.finish();
    done.assert_code(0);
    let mut eventd = eventd;
    let _ = eventd.kill();
    let _ = eventd.wait();

    let help = run(&mut cli(&root, &["events", "--help"]));
    help.assert_code(0);
    for part in [
        "--pending",
        "--follow",
        "--json",
        "not yet journalled",
        "read",
    ] {
        help.assert_stdout_contains(part);
    }
}
