//! `powernode-agent exec` and `sync`: the node's own tasks, run by the agents that run the
//! controller's ([`crate::local_task`]).

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use agentbase::Root;
use anyhow::Context as _;
use ipcmonitor::tool::Exit;
use powernode_pubsub::{inspect, Dirs, Subscription};
use powernode_types::{
    ControllerStatus, ModuleConfig, ModuleState, ModuleStatus, TaskState, TaskStatus, Topic,
    GLOBAL_KEY,
};
use serde_json::json;

use crate::local_task::{self, Ended};

/// The agent that runs NodeScripts.
const EXEC_AGENT: &str = "execd";
/// The agent that runs `node.sync`.
const SYNC_AGENT: &str = "modulemgr";
/// The agent that talks to the controller.
const HEARTBEAT_AGENT: &str = "heartbeatd";
/// Beyond the script's own timeout, how long execd gets to kill it and say so.
const EXEC_GRACE: Duration = Duration::from_secs(10);

/// Fails with a clear error when `agent` is not running: a request would only wait.
async fn require_running(dirs: &Dirs, agent: &str) -> anyhow::Result<()> {
    if inspect::is_listening(&dirs.socket(agent, TaskStatus::NAME)).await {
        return Ok(());
    }
    anyhow::bail!("{agent} is not running on this node (see `powernode-agent status`)")
}

/// `exec SCRIPT`: runs the script through execd; its output goes to stdout.
pub async fn exec(
    root: &Root,
    script: &Path,
    interpreter: Option<String>,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<Exit> {
    let text = if script == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the script from stdin")?;
        text
    } else {
        std::fs::read_to_string(script)
            .with_context(|| format!("reading the script {}", script.display()))?
    };
    let dirs = Dirs::under_root(root.base());
    require_running(&dirs, EXEC_AGENT).await?;
    let mut args = json!({"script": text, "timeout_s": timeout.as_secs().max(1)});
    if let Some(interpreter) = interpreter {
        args["interpreter"] = json!(interpreter);
    }
    let ended = local_task::run(
        &dirs,
        EXEC_AGENT,
        "node.exec",
        args.to_string(),
        timeout + EXEC_GRACE,
    )
    .await?;
    let status = match ended {
        Ended::Final(status) => status,
        Ended::TimedOut(last) => {
            report_json(json, last.as_ref());
            anyhow::bail!("execd did not finish the script in time; it was cancelled")
        }
        Ended::Interrupted(last) => {
            report_json(json, last.as_ref());
            eprintln!("interrupted; the script was cancelled");
            return Ok(Exit::Failure);
        }
    };
    if json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        print!("{}", status.output);
        if !status.output.is_empty() && !status.output.ends_with('\n') {
            println!();
        }
    }
    Ok(exit_of(&status))
}

/// `sync`: heartbeat now, resolve every module again, re-check the stack; waits until the
/// modules have settled.
pub async fn sync(root: &Root, timeout: Duration, json: bool) -> anyhow::Result<Exit> {
    let dirs = Dirs::under_root(root.base());
    require_running(&dirs, SYNC_AGENT).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let heartbeatd_up =
        inspect::is_listening(&dirs.socket(HEARTBEAT_AGENT, ControllerStatus::NAME)).await;
    let mut controller = Subscription::<ControllerStatus>::connect(&dirs, HEARTBEAT_AGENT);
    let before = if heartbeatd_up {
        first_value(&mut controller).await
    } else {
        None
    };
    let ended = local_task::run(&dirs, SYNC_AGENT, "node.sync", "{}".into(), timeout).await?;
    let status = match ended {
        Ended::Final(status) => status,
        Ended::TimedOut(_) => anyhow::bail!("the modules did not settle in time"),
        Ended::Interrupted(_) => {
            eprintln!("interrupted");
            return Ok(Exit::Failure);
        }
    };
    let heartbeat = if heartbeatd_up {
        heartbeat_after(&mut controller, before.as_ref(), deadline).await
    } else {
        json!({"sent": false, "why": "heartbeatd is not running"})
    };
    let modules = settled_modules(&dirs, deadline).await;
    if json {
        println!(
            "{}",
            json!({"heartbeat": heartbeat, "task": status, "modules": modules})
        );
    } else {
        match heartbeat["sent"].as_bool() {
            Some(true) => println!(
                "heartbeat: sent; desired state generation {}",
                heartbeat["applied_generation"]
            ),
            _ => println!(
                "heartbeat: not sent: {}",
                heartbeat["why"].as_str().unwrap_or("unknown")
            ),
        }
        println!("{}", status.output);
    }
    Ok(exit_of(&status))
}

fn exit_of(status: &TaskStatus) -> Exit {
    if status.state == TaskState::Succeeded {
        Exit::Success
    } else {
        Exit::Failure
    }
}

fn report_json(json: bool, status: Option<&TaskStatus>) {
    if let (true, Some(status)) = (json, status) {
        if let Ok(text) = serde_json::to_string(status) {
            println!("{text}");
        }
    }
}

/// heartbeatd's status as it is now (bounded wait for the first snapshot).
async fn first_value(sub: &mut Subscription<ControllerStatus>) -> Option<ControllerStatus> {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !sub.is_synchronized() {
            sub.next().await;
        }
    })
    .await;
    sub.get(GLOBAL_KEY).cloned()
}

/// Waits for the heartbeat the sync asked for: a success or a failure after `before`.
async fn heartbeat_after(
    sub: &mut Subscription<ControllerStatus>,
    before: Option<&ControllerStatus>,
    deadline: tokio::time::Instant,
) -> serde_json::Value {
    let newer = |s: &ControllerStatus| match before {
        None => s.last_success_ms.is_some() || s.consecutive_failures > 0,
        Some(b) => {
            s.last_success_ms > b.last_success_ms || s.consecutive_failures > b.consecutive_failures
        }
    };
    loop {
        if let Some(s) = sub.get(GLOBAL_KEY).filter(|s| newer(s)) {
            return if s.reachable {
                json!({"sent": true, "applied_generation": s.applied_generation,
                       "last_success_ms": s.last_success_ms})
            } else {
                json!({"sent": false, "why": s.last_error.clone()
                    .unwrap_or_else(|| "the controller is unreachable".into())})
            };
        }
        if tokio::time::timeout_at(deadline, sub.next()).await.is_err() {
            return json!({"sent": false, "why": "no heartbeat happened in time (is the node enrolled?)"});
        }
    }
}

/// The modules once every one heartbeatd assigns has a final status on its reference (a
/// heartbeat's new assignment may have come after modulemgr's sync), or at `deadline`.
async fn settled_modules(dirs: &Dirs, deadline: tokio::time::Instant) -> Vec<ModuleStatus> {
    let mut assigned = Subscription::<ModuleConfig>::connect(dirs, HEARTBEAT_AGENT);
    let mut statuses = Subscription::<ModuleStatus>::connect(dirs, SYNC_AGENT);
    loop {
        let settled = statuses.is_synchronized()
            && statuses
                .items()
                .all(|(_, s)| matches!(s.state, ModuleState::Active | ModuleState::Failed))
            && assigned.items().all(|(name, c)| {
                statuses.get(name).is_some_and(|s| {
                    s.reference == c.reference
                        && matches!(s.state, ModuleState::Active | ModuleState::Failed)
                })
            });
        if settled {
            return statuses.items().map(|(_, s)| s.clone()).collect();
        }
        let next = async {
            tokio::select! {
                _ = assigned.next() => {}
                _ = statuses.next() => {}
            }
        };
        if tokio::time::timeout_at(deadline, next).await.is_err() {
            return statuses.items().map(|(_, s)| s.clone()).collect();
        }
    }
}
