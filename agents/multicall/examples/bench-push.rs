//! The push benchmark's real node (scripts/bench-push.sh runs it while the load generator's
//! simulated nodes hold their watches): how fast a change on the controller reaches a real
//! node. Prints one JSON line.
//!
//! ```text
//! bench-push --agent-bin B --controller-bin C --data D --listen ADDR --dir DIR [--rounds N]
//! ```
//!
//! It publishes the node's identity (with a token made by `C token create`) under a node root
//! in `DIR`, starts the real enrollmgr, heartbeatd and execd from `B`, and waits until the
//! node heartbeats. Then, `N` times each, one at a time:
//!
//! - **desired → node**: the node's desired modules are set in the controller's database (as
//!   `powernode-controller module assign` does from its own process; the operator API does the
//!   same and also wakes the watch scanner at once, so this is the slower path) and the time
//!   until heartbeatd has published that generation's `ModuleConfig` is taken;
//! - **task → start**: a `node.exec` task is created the same way, and the time until execd
//!   publishes its `TaskStatus` (Running, or already finished) is taken.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use powernode_controller::storage::{NewTask, Storage};
use powernode_controller::wire::DesiredModule;
use powernode_pubsub::{Dirs, Subscription};
use powernode_types::{ControllerStatus, ModuleConfig, TaskStatus, GLOBAL_KEY};

mod common;

use common::{Children, Res};

const USAGE: &str = "usage: bench-push --agent-bin B --controller-bin C --data D --listen ADDR \
                     --dir DIR [--rounds N]";
/// Longest a single change may take to reach the node before the run fails.
const TOO_LONG: Duration = Duration::from_secs(60);

struct Args {
    agent_bin: PathBuf,
    controller_bin: PathBuf,
    data: PathBuf,
    listen: String,
    dir: PathBuf,
    rounds: u32,
}

impl Args {
    fn parse() -> Res<Args> {
        let mut flags = std::collections::HashMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let name = flag.strip_prefix("--").ok_or(USAGE)?.to_owned();
            flags.insert(name, it.next().ok_or(USAGE)?);
        }
        let get = |name: &str| -> Res<String> { Ok(flags.get(name).ok_or(USAGE)?.clone()) };
        Ok(Args {
            agent_bin: get("agent-bin")?.into(),
            controller_bin: get("controller-bin")?.into(),
            data: get("data")?.into(),
            listen: get("listen")?,
            dir: get("dir")?.into(),
            rounds: flags
                .get("rounds")
                .map_or(Ok(20), |v| v.parse().map_err(|_| USAGE))?,
        })
    }
}

fn main() {
    common::main_with("bench-push", Args::parse, |args| async move {
        bench(&args).await
    });
}

async fn bench(args: &Args) -> Res<()> {
    let root = args.dir.join("root");
    std::fs::create_dir_all(root.join("etc/powernode"))?;
    std::fs::write(
        root.join("etc/powernode/agent.toml"),
        "[controller]\nmax_backoff_s = 1\n",
    )?;
    let dirs = Dirs::under_root(&root);
    let _identity = common::publish_identity(
        &dirs,
        "bench-push-real-node",
        &args.controller_bin,
        &args.data,
        &args.listen,
    )?;
    let mut children = Children(Vec::new());
    for name in ["enrollmgr", "execd", "heartbeatd"] {
        children.0.push(agent(args, &root, name)?);
    }
    let mut status = Subscription::<ControllerStatus>::connect(&dirs, "heartbeatd");
    until(&mut status, "the node's first heartbeat", |s| {
        s.get(GLOBAL_KEY).is_some_and(|s| s.reachable)
    })
    .await?;
    let storage = Storage::open(&args.data).await?;
    let node_id = storage
        .list_nodes()
        .await?
        .into_iter()
        .find(|n| n.uuid == "bench-push-real-node")
        .ok_or("the real node is not on the controller")?
        .id;
    // Let the first watch reach the controller after the first heartbeat.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut modules = Subscription::<ModuleConfig>::connect(&dirs, "heartbeatd");
    let mut desired = Vec::new();
    for round in 0..args.rounds {
        let module = [DesiredModule {
            name: "bench".into(),
            reference: format!("registry.invalid/bench:{round}"),
            priority: 10,
        }];
        let set = Instant::now();
        let generation = storage
            .set_desired_modules(&node_id, &module, powernode_controller::now_ms())
            .await?
            .ok_or("no such node")?;
        until(&mut modules, "the new desired modules on the node", |m| {
            m.get("bench").is_some_and(|c| c.generation == generation)
        })
        .await?;
        desired.push(set.elapsed().as_micros() as i64);
        // The watch is held again after the heartbeat that fetched it.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut statuses = Subscription::<TaskStatus>::connect(&dirs, "execd");
    let mut started = Vec::new();
    let args_json = serde_json::json!({"script": "true"});
    for _ in 0..args.rounds {
        let task = NewTask {
            node_id: &node_id,
            kind: "node.exec",
            args: &args_json,
            timeout_s: 60,
            max_attempts: 1,
        };
        let created = Instant::now();
        let id = storage
            .create_task(&task, powernode_controller::now_ms())
            .await?
            .ok_or("no such node")?
            .id;
        until(&mut statuses, "the task started on the node", |s| {
            s.get(&id).is_some()
        })
        .await?;
        started.push(created.elapsed().as_micros() as i64);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    storage.close().await;
    desired.sort_unstable();
    started.sort_unstable();
    println!(
        "{{\"rounds\":{},\"desired_to_node_p50_ms\":{:.1},\"desired_to_node_p99_ms\":{:.1},\
         \"task_to_start_p50_ms\":{:.1},\"task_to_start_p99_ms\":{:.1}}}",
        args.rounds,
        percentile_ms(&desired, 0.5),
        percentile_ms(&desired, 0.99),
        percentile_ms(&started, 0.5),
        percentile_ms(&started, 0.99),
    );
    Ok(())
}

/// Waits until `done` holds for the subscription, [`TOO_LONG`] at most.
async fn until<T: powernode_types::Topic>(
    sub: &mut Subscription<T>,
    what: &str,
    done: impl Fn(&Subscription<T>) -> bool,
) -> Res<()> {
    let deadline = Instant::now() + TOO_LONG;
    while !done(sub) {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {TOO_LONG:?}").into());
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), sub.next()).await;
    }
    Ok(())
}

/// `powernode-agent run <agent> --root <root>`, logging to `<dir>/<agent>.log`.
fn agent(args: &Args, root: &Path, name: &str) -> Res<Child> {
    common::agent(&args.agent_bin, &args.dir, root, name)
}

/// The `p` quantile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}
