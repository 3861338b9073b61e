//! The operator CLI (`powernode-agent`) against real publishers.

mod common;

use common::{agent_status, bin, enrollment, run, Running, Sandbox};
use powernode_types::{AgentState, AgentStatus, EnrollmentState};
use serde_json::Value;

#[test]
fn status_with_nothing_running_says_so() {
    let sandbox = Sandbox::new();
    let out = run(&mut sandbox.cli(&["status"]));
    out.assert_code(0);
    assert_eq!(
        out.stdout,
        format!("no agents running under {}\n", sandbox.root().display())
    );

    // The root can come from the environment too.
    let out = run(std::process::Command::new(bin())
        .args(["status", "--json"])
        .env("POWERNODE_ROOT", sandbox.root()));
    out.assert_code(0);
    let doc = out.json();
    assert_eq!(doc["root"], sandbox.root().display().to_string());
    assert_eq!(doc["agents"], Value::Array(vec![]));
}

#[test]
fn status_shows_agents_up_and_down() {
    let sandbox = Sandbox::new();
    let _alpha = sandbox.publish("alpha", &[agent_status("alpha", AgentState::Running)]);
    let mut beta_status = agent_status("beta", AgentState::Degraded);
    beta_status.last_error = Some("disk full".into());
    drop(sandbox.publish("beta", &[beta_status]));

    let out = run(&mut sandbox.cli(&["status", "--json"]));
    out.assert_code(0);
    let doc = out.json();
    let alpha = &doc["agents"][0];
    assert_eq!(alpha["agent"], "alpha");
    assert_eq!(alpha["up"], true);
    assert_eq!(alpha["from_checkpoint"], false);
    assert_eq!(alpha["state"], "Running");
    assert_eq!(alpha["pid"], std::process::id());
    assert!(alpha["uptime_s"].as_u64().is_some_and(|s| s >= 90), "{doc}");
    let beta = &doc["agents"][1];
    assert_eq!(beta["agent"], "beta");
    assert_eq!(beta["up"], false);
    assert_eq!(beta["from_checkpoint"], true);
    assert_eq!(beta["state"], "Degraded");
    assert_eq!(beta["last_error"], "disk full");
    assert_eq!(beta["uptime_s"], Value::Null);
    assert_eq!(doc["publishers_down"], 1);
    let publications = doc["publications"].as_array().unwrap();
    assert_eq!(publications.len(), 2);
    assert_eq!(publications[1]["publication"], "beta/AgentStatus");
    assert_eq!(publications[1]["from_checkpoint"], true);

    let text = run(&mut sandbox.cli(&["status"]));
    text.assert_code(0);
    text.assert_stdout_contains("down (last said Degraded)");
    text.assert_stdout_contains("disk full");
    text.assert_stdout_contains("down (from checkpoint files)");
    text.assert_stdout_contains("1 of 2 publishers down");
}

#[test]
fn wait_returns_when_the_field_matches() {
    let sandbox = Sandbox::new();
    let alpha = sandbox.publish("alpha", &[agent_status("alpha", AgentState::Starting)]);
    let child = Running::spawn(&mut sandbox.cli(&[
        "wait",
        "alpha/AgentStatus",
        "--key",
        "alpha",
        "--field",
        "state=Running",
        "--field",
        "quarantined_checkpoints=0",
        "--timeout",
        "30",
    ]));
    let waiting = child.stderr_line(|l| l.starts_with("waiting up to"));
    assert!(waiting.contains("state=Running"), "{waiting}");

    alpha
        .publish(&agent_status("alpha", AgentState::Running))
        .unwrap();
    let out = child.finish();
    out.assert_code(0);
    let item = out.json();
    assert_eq!(item["key"], "alpha");
    assert_eq!(item["value"]["state"], "Running");
}

#[test]
fn wait_is_satisfied_by_the_checkpoint_of_a_persistent_topic() {
    let sandbox = Sandbox::new();
    drop(sandbox.publish("enrollmgr", &[enrollment(EnrollmentState::Enrolled)]));
    let out = run(&mut sandbox.cli(&[
        "wait",
        "enrollmgr/EnrollmentStatus",
        "--field",
        "state=Enrolled",
        "--field",
        "node_id=node-1",
        "--timeout",
        "10",
    ]));
    out.assert_code(0);
    assert_eq!(out.json()["value"]["state"], "Enrolled");
}

#[test]
fn wait_times_out_saying_what_it_saw() {
    let sandbox = Sandbox::new();
    let _alpha = sandbox.publish("alpha", &[agent_status("alpha", AgentState::Running)]);
    let out = run(&mut sandbox.cli(&[
        "wait",
        "alpha/AgentStatus",
        "--field",
        "state=Stopping",
        "--timeout",
        "0.5",
    ]));
    out.assert_code(1);
    assert!(out.stdout.is_empty(), "{out:?}");
    out.assert_stderr_contains("timed out after 500ms");
    out.assert_stderr_contains("last seen: item \"alpha\": {");
    out.assert_stderr_contains("\"state\":\"Running\"");

    let out = run(&mut sandbox.cli(&["wait", "nobody/AgentStatus", "--timeout", "0.3"]));
    out.assert_code(1);
    out.assert_stderr_contains("last seen: publisher not up");
}

#[test]
fn wait_usage_errors_exit_2() {
    let sandbox = Sandbox::new();
    for args in [
        &["wait", "alpha/NoSuchTopic", "--field", "state=Running"][..],
        &["wait", "alpha/AgentStatus", "--field", "no-equals-sign"],
        &["wait", "alpha/AgentStatus", "--timeout", "soon"],
        &["wait", "alpha/AgentStatus", "--key", "../etc"],
        &["wait", "no-slash"],
        &["wait"],
    ] {
        let out = run(&mut sandbox.cli(args));
        assert_eq!(out.code(), Some(2), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: {out:?}");
    }
}

#[test]
fn run_starts_programs_by_name() {
    let sandbox = Sandbox::new();
    let out = run(&mut sandbox.cli(&["run", "nosuch"]));
    out.assert_code(2);
    out.assert_stderr_contains("\"nosuch\"");
    out.assert_stderr_contains("valid names: ipcmonitor");

    let _alpha = sandbox.publish("alpha", &[agent_status("alpha", AgentState::Running)]);
    // --root before `run` is passed on to the program.
    let out = run(&mut sandbox.cli(&["run", "ipcmonitor", "--list", "--json"]));
    out.assert_code(0);
    assert_eq!(out.json()[0]["publication"], "alpha/AgentStatus");

    let help = run(&mut sandbox.cli(&["run", "ipcmonitor", "--help"]));
    help.assert_code(0);
    help.assert_stdout_contains("Usage: ipcmonitor");
}

#[test]
fn agents_lists_the_agents_of_the_dispatch_table() {
    let out = run(std::process::Command::new(bin()).arg("agents"));
    out.assert_code(0);
    assert_eq!(
        out.stdout,
        "identitymgr\nenrollmgr\nheartbeatd\nmodulemgr\nverifier\nmountmgr\neventd\nexecd\nnetmgr\n"
    );
}

#[test]
fn version_and_help() {
    let out = run(std::process::Command::new(bin()).args(["version", "--json"]));
    out.assert_code(0);
    let doc = out.json();
    assert_eq!(doc["name"], "powernode-agent");
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        doc["git_sha"].as_str().is_some_and(|s| !s.is_empty()),
        "{doc}"
    );
    assert!(
        doc["rustc"]
            .as_str()
            .is_some_and(|s| s.starts_with("rustc ")),
        "{doc}"
    );

    for command in ["status", "wait", "version", "agents", "run"] {
        let out = run(std::process::Command::new(bin()).args([command, "--help"]));
        assert_eq!(out.code(), Some(0), "{command}: {out:?}");
        assert!(
            out.stdout
                .contains(&format!("Usage: powernode-agent {command}")),
            "{command}: {out:?}"
        );
    }
    let out = run(&mut std::process::Command::new(bin()));
    assert_eq!(out.code(), Some(2), "no command is a usage error: {out:?}");
}

/// The key of an `AgentStatus` is the agent's name, whatever the publication is called.
#[test]
fn status_lists_every_item_of_an_agent_status_publication() {
    let sandbox = Sandbox::new();
    let _p = sandbox.publish::<AgentStatus>(
        "alpha",
        &[
            agent_status("alpha", AgentState::Running),
            agent_status("alpha-helper", AgentState::Starting),
        ],
    );
    let doc = run(&mut sandbox.cli(&["status", "--json"])).json();
    let agents: Vec<&str> = doc["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent"].as_str().unwrap())
        .collect();
    assert_eq!(agents, ["alpha", "alpha-helper"]);
}
