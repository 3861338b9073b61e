//! identitymgr end to end: the built binary, `powernode-agent run identitymgr --root R`, against
//! a sandbox root, watched through the operator CLI.

mod common;

use std::net::TcpListener;
use std::path::Path;

use common::{run, Running, Sandbox};
use serde_json::Value;

const UUID: &str = "6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b";

fn write(root: &Path, rel: &str, contents: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

/// A loopback base URL where nothing listens: every cloud source fails fast.
fn closed_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

/// Settings for a sandbox: no real metadata service is ever asked.
fn settings(root: &Path, extra: &str) {
    let url = closed_url();
    write(
        root,
        "etc/powernode/agent.toml",
        &format!(
            "touch_interval_s = 1\n[identity]\nsource_timeout_ms = 300\n\
             aws_url = \"{url}\"\ngcp_url = \"{url}\"\nazure_url = \"{url}\"\n\
             digitalocean_url = \"{url}\"\nhetzner_url = \"{url}\"\n{extra}"
        ),
    );
}

fn start(sandbox: &Sandbox) -> Running {
    Running::spawn(&mut sandbox.cli(&["run", "identitymgr"]))
}

/// `wait identitymgr/NodeIdentity --field state=<state>`: the item as JSON.
fn wait_for(sandbox: &Sandbox, state: &str) -> Value {
    let out = run(&mut sandbox.cli(&[
        "wait",
        "identitymgr/NodeIdentity",
        "--field",
        &format!("state={state}"),
        "--timeout",
        "15",
    ]));
    out.assert_code(0);
    let doc = out.json();
    assert_eq!(doc["key"], "global", "{doc}");
    doc["value"].clone()
}

/// SIGTERM, then exit 0, then `AgentStatus` Stopping in the checkpoint.
fn stop(sandbox: &Sandbox, child: Running) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    child.finish().assert_code(0);
    let status = run(&mut sandbox.cli(&["status", "--json"]));
    let doc = status.json();
    let agent = doc["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == "identitymgr")
        .unwrap_or_else(|| panic!("no identitymgr in {doc}"))
        .clone();
    assert_eq!(agent["state"], "Stopping", "{doc}");
    assert_eq!(agent["up"], false, "{doc}");
}

#[test]
fn resolves_from_the_kernel_command_line() {
    let sandbox = Sandbox::new();
    let root = sandbox.root();
    settings(&root, "");
    write(
        &root,
        "proc/cmdline",
        &format!(
            "BOOT_IMAGE=/vmlinuz ro powernode.instance_uuid={} \
             powernode.bootstrap_token=boot-token-123 \
             powernode.controller_url=https://controller.example:8443,https://controller-2.example:8443\n",
            UUID.to_uppercase()
        ),
    );
    write(
        &root,
        "proc/sys/kernel/random/boot_id",
        "0f5e2b9c-1111-4222-8333-444455556666\n",
    );
    write(&root, "etc/hostname", "# set by the installer\nnode-7\n");
    write(
        &root,
        "sys/class/dmi/id/product_uuid",
        "00000000-0000-0000-0000-000000000000\n",
    );

    let child = start(&sandbox);
    let item = wait_for(&sandbox, "Resolved");
    assert_eq!(item["uuid"], UUID, "{item}");
    assert_eq!(item["source"], "KernelCmdline", "{item}");
    assert_eq!(
        item["boot_id"], "0f5e2b9c-1111-4222-8333-444455556666",
        "{item}"
    );
    assert_eq!(item["hostname"], "node-7", "{item}");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    assert_eq!(item["arch"], arch, "{item}");
    assert_eq!(
        item["dmi_uuid"],
        Value::Null,
        "an all-zero DMI UUID is not reported: {item}"
    );
    assert_eq!(item["bootstrap_token"], "boot-token-123", "{item}");
    assert_eq!(
        item["controller_urls"],
        serde_json::json!([
            "https://controller.example:8443",
            "https://controller-2.example:8443"
        ]),
        "{item}"
    );
    assert_eq!(item["ca_pem"], Value::Null, "{item}");
    assert_eq!(item["last_error"], Value::Null, "{item}");

    // Ready once published.
    let out = run(&mut sandbox.cli(&[
        "wait",
        "identitymgr/AgentStatus",
        "--field",
        "state=Running",
        "--timeout",
        "15",
    ]));
    out.assert_code(0);
    stop(&sandbox, child);
}

#[test]
fn unresolvable_until_identity_cfg_appears() {
    let sandbox = Sandbox::new();
    let root = sandbox.root();
    settings(&root, "allow_generated_uuid = false\n");
    write(&root, "proc/cmdline", "ro quiet\n");

    let child = start(&sandbox);
    let item = wait_for(&sandbox, "Unresolvable");
    assert_eq!(item["uuid"], Value::Null, "{item}");
    let error = item["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("{item}"));
    for source in [
        "KernelCmdline: no powernode.* identity parameters",
        "FwCfg: no ",
        "Aws: ",
        "Gcp: ",
        "Azure: ",
        "DigitalOcean: ",
        "Hetzner: ",
        "Dmi: no ",
        "IdentityCfg: no ",
    ] {
        assert!(error.contains(source), "{source:?} missing from {error}");
    }
    assert!(
        !root.join("etc/powernode/identity.cfg").exists(),
        "nothing generated when generation is off"
    );

    // The operator provides identity.cfg; the next retry picks it up.
    write(
        &root,
        "etc/powernode/identity.cfg",
        &format!("# provisioned\nexport INSTANCE_UUID='{UUID}'\nBOOTSTRAP_TOKEN=\"cfg-token-1\"\n"),
    );
    let item = wait_for(&sandbox, "Resolved");
    assert_eq!(item["uuid"], UUID, "{item}");
    assert_eq!(item["source"], "IdentityCfg", "{item}");
    assert_eq!(item["bootstrap_token"], "cfg-token-1", "{item}");
    // The agent is no longer degraded.
    let out = run(&mut sandbox.cli(&[
        "wait",
        "identitymgr/AgentStatus",
        "--field",
        "state=Running",
        "--timeout",
        "15",
    ]));
    out.assert_code(0);
    assert_eq!(out.json()["value"]["last_error"], Value::Null);
    stop(&sandbox, child);
}

/// What stands in a checkpoint's way at start — a directory where the `NodeIdentity` file
/// belongs, a regular file where the `AgentStatus` directory belongs — is moved aside and
/// reported: the agent starts, resolves, says Degraded with the reason, and restarts cleanly.
#[test]
fn obstacles_where_checkpoints_belong_are_moved_aside() {
    let sandbox = Sandbox::new();
    let root = sandbox.root();
    settings(&root, "");
    write(
        &root,
        "proc/cmdline",
        &format!("ro powernode.instance_uuid={UUID}\n"),
    );
    let run_dir = root.join("run/powernode/identitymgr");
    std::fs::create_dir_all(run_dir.join("NodeIdentity/global/inside")).unwrap();
    std::fs::write(run_dir.join("AgentStatus"), "not a directory").unwrap();

    let child = start(&sandbox);
    let item = wait_for(&sandbox, "Resolved");
    assert_eq!(item["uuid"], UUID, "{item}");
    let out = run(&mut sandbox.cli(&[
        "wait",
        "identitymgr/AgentStatus",
        "--field",
        "state=Degraded",
        "--timeout",
        "15",
    ]));
    out.assert_code(0);
    let status = out.json()["value"].clone();
    assert_eq!(status["quarantined_checkpoints"], 2, "{status}");
    assert!(
        status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("moved aside")),
        "{status}"
    );
    for moved in ["NodeIdentity/.quarantine", ".quarantine"] {
        assert_eq!(
            std::fs::read_dir(run_dir.join(moved)).unwrap().count(),
            1,
            "{moved}"
        );
    }
    stop(&sandbox, child);
    let child = start(&sandbox);
    wait_for(&sandbox, "Resolved");
    stop(&sandbox, child);
}
