//! `ipcmonitor`, started through a symlink of that name, against real publishers.

mod common;

use common::{agent_status, enrollment, run, Running, Sandbox};
use powernode_types::{AgentState, AgentStatus, EnrollmentState};
use serde_json::Value;

fn find<'a>(list: &'a Value, publication: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["publication"] == publication)
        .unwrap_or_else(|| panic!("{publication} not listed: {list}"))
}

#[test]
fn list_shows_item_counts_and_whether_publishers_are_up() {
    let sandbox = Sandbox::new();
    let empty = run(&mut sandbox.ipcmonitor(&["--list"]));
    empty.assert_code(0);
    assert!(
        empty.stdout.starts_with("no publications under"),
        "{empty:?}"
    );

    let _alpha = sandbox.publish("alpha", &[agent_status("alpha", AgentState::Running)]);
    let beta = sandbox.publish("beta", &[agent_status("beta", AgentState::Running)]);
    let enroll = sandbox.publish("enrollmgr", &[enrollment(EnrollmentState::Enrolled)]);
    drop(beta);
    drop(enroll);

    let listed = run(&mut sandbox.ipcmonitor(&["--list", "--json"]));
    listed.assert_code(0);
    let list = listed.json();
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    let alpha = find(&list, "alpha/AgentStatus");
    assert_eq!(
        (&alpha["items"], &alpha["up"]),
        (&Value::from(1), &Value::from(true))
    );
    let beta = find(&list, "beta/AgentStatus");
    assert_eq!(
        (&beta["items"], &beta["up"]),
        (&Value::from(1), &Value::from(false))
    );
    let enroll = find(&list, "enrollmgr/EnrollmentStatus");
    assert_eq!(enroll["persistent"], true);
    assert_eq!(
        (&enroll["items"], &enroll["up"]),
        (&Value::from(1), &Value::from(false))
    );

    let text = run(&mut sandbox.ipcmonitor(&["--list"]));
    text.assert_code(0);
    let lines: Vec<Vec<&str>> = text
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec!["PUBLICATION", "ITEMS", "PUBLISHER", "STORAGE"],
            vec!["alpha/AgentStatus", "1", "up", "run"],
            vec!["beta/AgentStatus", "1", "down", "run"],
            vec!["enrollmgr/EnrollmentStatus", "1", "down", "persist"],
        ],
        "{text:?}"
    );
}

#[test]
fn show_prints_items_live_or_from_checkpoint_files() {
    let sandbox = Sandbox::new();
    let _alpha = sandbox.publish("alpha", &[agent_status("alpha", AgentState::Running)]);
    drop(sandbox.publish("enrollmgr", &[enrollment(EnrollmentState::Enrolled)]));

    let shown = run(&mut sandbox.ipcmonitor(&["alpha/AgentStatus", "--json"]));
    shown.assert_code(0);
    let lines = shown.json_lines();
    assert_eq!(lines.len(), 2, "{shown:?}");
    assert_eq!(lines[0]["event"], "snapshot");
    assert_eq!(lines[0]["publisher"], "up");
    assert_eq!(lines[1]["event"], "item");
    assert_eq!(lines[1]["key"], "alpha");
    assert_eq!(lines[1]["value"]["state"], "Running");
    assert_eq!(lines[1]["value"]["pid"], std::process::id());

    let text = run(&mut sandbox.ipcmonitor(&["enrollmgr/EnrollmentStatus"]));
    text.assert_code(0);
    assert!(
        text.stdout
            .starts_with("enrollmgr/EnrollmentStatus: publisher down ("),
        "{text:?}"
    );
    text.assert_stdout_contains("1 item from checkpoint files in ");
    text.assert_stdout_contains("\n[global]\n{\n");
    text.assert_stdout_contains("  \"state\": \"Enrolled\"");

    let missing_key = run(&mut sandbox.ipcmonitor(&["alpha/AgentStatus", "--key", "nope"]));
    missing_key.assert_code(1);
    missing_key.assert_stderr_contains("no item with key \"nope\"");

    let unknown = run(&mut sandbox.ipcmonitor(&["alpha/NoSuchTopic"]));
    unknown.assert_code(1);
    unknown.assert_stderr_contains("not a topic this build knows");

    let usage = run(&mut sandbox.ipcmonitor(&["not-a-publication"]));
    usage.assert_code(2);
}

#[test]
fn follow_reports_changes_and_the_publisher_going_and_coming() {
    let sandbox = Sandbox::new();
    let alpha = sandbox.publish("alpha", &[agent_status("alpha", AgentState::Starting)]);

    let child =
        Running::spawn(&mut sandbox.ipcmonitor(&["alpha/AgentStatus", "--follow", "--json"]));
    let event = |line: &str, want: &str| {
        serde_json::from_str::<Value>(line).is_ok_and(|v| v["event"] == want)
    };
    child.stdout_line(|l| event(l, "synchronized"));

    alpha
        .publish(&agent_status("alpha", AgentState::Degraded))
        .unwrap();
    let modify: Value = serde_json::from_str(&child.stdout_line(|l| event(l, "modify"))).unwrap();
    assert_eq!(modify["key"], "alpha");
    assert_eq!(modify["value"]["state"], "Degraded");

    drop(alpha);
    child.stdout_line(|l| event(l, "publisher_down"));

    let alpha = sandbox.publish::<AgentStatus>("alpha", &[]);
    child.stdout_line(|l| event(l, "publisher_up"));
    alpha.unpublish("alpha").unwrap();
    let delete: Value = serde_json::from_str(&child.stdout_line(|l| event(l, "delete"))).unwrap();
    assert_eq!(delete["key"], "alpha");
}

#[test]
fn follow_waits_for_a_publisher_that_has_not_started() {
    let sandbox = Sandbox::new();
    let child = Running::spawn(&mut sandbox.ipcmonitor(&["alpha/AgentStatus", "--follow"]));
    child.stdout_line(|l| l.starts_with("alpha/AgentStatus: publisher down"));

    let _alpha = sandbox.publish("alpha", &[agent_status("alpha", AgentState::Running)]);
    child.stdout_line(|l| l.starts_with("publisher up"));
    child.stdout_line(|l| l == "create alpha");
    child.stdout_line(|l| l.contains("\"state\": \"Running\""));
}
