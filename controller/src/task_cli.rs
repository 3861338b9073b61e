//! `powernode-controller task create|show|cancel` and `tasks`: tasks through the operator API
//! (`/api/v1/tasks`), whose rules ([`crate::service::tasks`]) are the only ones; a node
//! watching learns of a new task at once.

use std::time::Duration;

use clap::{Args, Subcommand};
use powernode_types::text::{columns, one_line, rfc3339_millis};

use crate::client::{encode, query, ClientArgs};
use crate::duration::parse_duration;
use crate::service::tasks as rules;
use crate::wire::{CreateTaskRequest, Task};

/// `task …` subcommands.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Queue a task for a node; prints its id (the whole task with --json).
    Create(CreateArgs),
    /// Show one task: its state, attempts, times, and the node's output.
    Show(ShowArgs),
    /// Cancel a queued or leased task: it is not leased again, and its node learns it when
    /// it next renews or completes.
    Cancel(CancelArgs),
}

/// `task show` arguments.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The task id (as `task create` or `tasks` prints it).
    id: String,
    #[command(flatten)]
    client: ClientArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `task cancel` arguments.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The task id.
    id: String,
    #[command(flatten)]
    client: ClientArgs,
}

/// `task create` arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The node that is to run it.
    #[arg(long, value_name = "ID")]
    node: String,
    /// What to do: node.exec, module.attach, cert.rotate, ...
    #[arg(long, value_name = "K")]
    kind: String,
    /// Its arguments, as JSON.
    #[arg(long, value_name = "JSON", default_value = "{}", value_parser = parse_json)]
    args: serde_json::Value,
    /// How long one attempt may run before its lease expires (renewed leases run longer).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    timeout: Duration,
    /// Leases the task gets before an expired one fails it.
    #[arg(long, value_name = "N", default_value_t = rules::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,
    /// Print the task as JSON instead of its id.
    #[arg(long)]
    json: bool,
}

/// `tasks` arguments.
#[derive(Debug, Args)]
pub struct TasksArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Only this node's tasks.
    #[arg(long, value_name = "ID")]
    node: Option<String>,
    /// Only tasks in this state: queued, leased, succeeded, failed, interrupted, cancelled.
    #[arg(long, value_name = "S")]
    state: Option<String>,
    /// The newest N (listed oldest first).
    #[arg(long, value_name = "N", default_value_t = rules::DEFAULT_LIST)]
    limit: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// Runs a `task` subcommand.
pub async fn run(command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::Create(args) => create(args).await,
        TaskCommand::Show(ShowArgs { id, client, json }) => {
            let task: Task = client
                .client()?
                .get(&format!("/api/v1/tasks/{}", encode(&id)))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&task)?);
            } else {
                print!("{}", task_text(&task));
            }
            Ok(())
        }
        TaskCommand::Cancel(CancelArgs { id, client }) => {
            let _: Task = client
                .client()?
                .post(&format!("/api/v1/tasks/{}/cancel", encode(&id)), &())
                .await?;
            println!("cancelled {id}");
            Ok(())
        }
    }
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let timeout_s = u32::try_from(args.timeout.as_secs()).unwrap_or(u32::MAX);
    let req = CreateTaskRequest {
        node: args.node,
        kind: args.kind,
        args: args.args,
        timeout_s: Some(timeout_s),
        max_attempts: Some(args.max_attempts),
    };
    let task: Task = args.client.client()?.post("/api/v1/tasks", &req).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&task)?);
    } else {
        println!("{}", task.id);
    }
    Ok(())
}

/// Runs `tasks`.
pub async fn list(args: TasksArgs) -> anyhow::Result<()> {
    let path = format!(
        "/api/v1/tasks{}",
        query(&[
            ("node", args.node),
            ("state", args.state),
            ("limit", Some(args.limit.to_string())),
        ])
    );
    let tasks: Vec<Task> = args.client.client()?.get(&path).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tasks)?);
    } else {
        println!(
            "{}",
            row(["ID", "NODE", "KIND", "STATE", "ATTEMPTS", "CREATED"])
        );
        for task in &tasks {
            println!("{}", task_row(task));
        }
    }
    Ok(())
}

fn row(cells: [&str; 6]) -> String {
    columns(&cells, &[21, 21, 16, 11, 8])
}

/// One task as a row of `tasks`.
fn task_row(t: &Task) -> String {
    row([
        &t.id,
        &t.node_id,
        &t.kind,
        &t.state,
        &format!("{}/{}", t.attempts, t.max_attempts),
        &rfc3339_millis(t.created_at_ms),
    ])
}

/// `task show` as text: one `name: value` a line, then the output as the node sent it.
fn task_text(t: &Task) -> String {
    let mut lines = vec![
        format!("id:           {}", t.id),
        format!("node:         {}", t.node_id),
        format!("kind:         {}", t.kind),
        format!("args:         {}", t.args),
        format!("state:        {}", t.state),
        format!(
            "attempts:     {} of {} (lease {} s)",
            t.attempts, t.max_attempts, t.timeout_s
        ),
        format!("created:      {}", rfc3339_millis(t.created_at_ms)),
    ];
    if let Some(expires) = t.lease_expires_at_ms {
        lines.push(format!("lease until:  {}", rfc3339_millis(expires)));
    }
    if let Some(finished) = t.finished_at_ms {
        lines.push(format!("finished:     {}", rfc3339_millis(finished)));
    }
    if let Some(reason) = &t.reason {
        lines.push(format!("reason:       {}", one_line(reason)));
    }
    if let Some(outcome) = &t.outcome {
        let late = if t.late {
            " (late: after the lease ran out)"
        } else {
            ""
        };
        lines.push(format!("outcome:      {outcome}{late}"));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    if let Some(output) = t.output.as_deref().filter(|o| !o.is_empty()) {
        let cut = if t.output_truncated {
            " (cut to the cap)"
        } else {
            ""
        };
        text.push_str(&format!("output{cut}:\n{output}"));
        if !output.ends_with('\n') {
            text.push('\n');
        }
    }
    text
}
