//! The command line: `serve`, `token create`, `nodes list`, `node show`, `node revoke`,
//! `events` (in [`crate::events_cli`]), `module …` (in [`crate::module_cli`]), `task …`,
//! `tasks` (in [`crate::task_cli`]), `script …`, `scripts` (in [`crate::script_cli`]) and
//! `network …`, `networks` (in [`crate::network_cli`]).
//! Every command but `serve`, `openapi` and the registry side of `module` is a client of the
//! operator API (over HTTPS, with the operator token): it works against any controller, on any
//! backend, and the API's rules are the only ones. `serve` opens the database, and makes the
//! first operator credential (DATA/operator.token) and DATA/operator.toml, which `--data DIR`
//! on any other command reads to find it ([`crate::client::config`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::api::Policy;
use crate::client::{encode, ClientArgs, ClientError};
use crate::duration::parse_duration;
use crate::events::{EventRetention, DEFAULT_RETENTION_COUNT, DEFAULT_RETENTION_DAYS};
use crate::events_cli::{self, EventsArgs};
use crate::module_cli::{self, ModuleCommand};
use crate::network_cli::{self, NetworkCommand, NetworksArgs};
use crate::script_cli::{self, ScriptCommand, ScriptsArgs};
use crate::server::{Controller, ServeOptions};
use crate::service::tasks::DEFAULT_OUTPUT_MAX;
use crate::task_cli::{self, TaskCommand, TasksArgs};
use crate::wire::{
    task_limits::MAX_COMPLETE_BODY, CreateTokenRequest, CreateTokenResponse, ModuleReport,
    NodeDetail, NodeSummary, RevokeResponse,
};

/// Exit code of a usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of an operator command that could not reach the controller at all (nothing
/// listens at its URL, or it did not answer in time): a script can wait and try again.
pub const EXIT_UNREACHABLE: u8 = 3;

/// Reference controller for powernode nodes.
///
/// Runs a certificate authority, enrolls nodes with bootstrap tokens, rotates their
/// certificates, receives their heartbeats and hands them their desired state, all over
/// one TLS listener (node API under /node_api/v1 with client certificates, operator API
/// under /api/v1 with the bearer token in DATA/operator.token). The other commands call the
/// operator API: `--data DIR` finds the controller serving DIR (DIR/operator.toml), or give
/// --controller, --ca-file and --token-file (or set POWERNODE_CONTROLLER, POWERNODE_CA_FILE,
/// POWERNODE_TOKEN_FILE, or write them to $XDG_CONFIG_HOME/powernode/controller.toml).
#[derive(Debug, Parser)]
#[command(name = "powernode-controller", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (creates the CA, server certificate, operator token and database
    /// in the data directory at first start).
    Serve(ServeArgs),
    /// Bootstrap tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// All enrolled nodes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// One enrolled node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Fleet events, oldest first: the last --limit matching ones, then new ones with
    /// --follow.
    Events(EventsArgs),
    /// Modules: build, push, sign, and assign them to nodes.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// One task: create, show, cancel.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Tasks, oldest first among the newest --limit.
    Tasks(TasksArgs),
    /// One NodeScript: add (prints its digest), show.
    #[command(subcommand)]
    Script(ScriptCommand),
    /// Stored NodeScripts, oldest first: digest, size, when first stored.
    Scripts(ScriptsArgs),
    /// One overlay network: create, join, leave, show, delete; port forwards.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Overlay networks, by name: CIDR, port, members.
    Networks(NetworksArgs),
    /// Print the OpenAPI document of the node and operator APIs (what
    /// GET /api/v1/openapi.json answers).
    Openapi,
}

/// `serve --data DIR`.
#[derive(Debug, Args)]
struct DataArg {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    data: DataArg,
    /// Address to listen on, e.g. 0.0.0.0:8443 (port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Keep the fleet in this PostgreSQL database (`postgres://USER@HOST:PORT/DB`, or with
    /// `?host=/run/postgresql` for a unix socket) instead of the embedded SQLite file in the
    /// data directory; several controllers may serve one database (their data directories
    /// hold copies of the same CA). Default: `POWERNODE_DATABASE` from the environment, which
    /// keeps a password out of the process list.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// Lifetime of node certificates: 90d, 12h, 20s ...
    #[arg(long, value_name = "DURATION", default_value = "90d", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// Heartbeat interval handed to nodes.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Name or IP the server certificate is issued for (repeat for several); default
    /// localhost, 127.0.0.1, ::1 and the listen address.
    #[arg(long = "hostname", value_name = "NAME")]
    hostnames: Vec<String>,
    /// Delete events received more than this many days ago.
    #[arg(long, value_name = "DAYS", default_value_t = DEFAULT_RETENTION_DAYS,
          value_parser = clap::value_parser!(u32).range(1..))]
    event_retention_days: u32,
    /// Keep at most this many events per node (the newest).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RETENTION_COUNT,
          value_parser = clap::value_parser!(u32).range(1..))]
    event_retention_count: u32,
    /// Bytes of a task's output stored; longer output is cut, with a marker line.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_OUTPUT_MAX,
          value_parser = clap::value_parser!(u64).range(1..=(MAX_COMPLETE_BODY as u64)))]
    task_output_max: u64,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a bootstrap token and print it (it is stored only as a hash).
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// How long the token may be used.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Only the node with this identity uuid may use the token.
        #[arg(long, value_name = "UUID")]
        node_uuid: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// List nodes: id, uuid, hostname, last heartbeat, certificate expiry.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Show one node: identity, certificates, latest heartbeat, desired state, last events.
    Show {
        /// The node id (as `nodes list` prints it).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a node: its certificates stop working at once and it cannot enroll again.
    Revoke {
        /// The node id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Parses `args`, runs the command, and maps the outcome to an exit code (0 ok, 1 failure,
/// 2 usage).
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(matches!(cli.command, Command::Serve(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let unreachable = err
                .downcast_ref::<ClientError>()
                .is_some_and(ClientError::is_unreachable);
            ExitCode::from(if unreachable {
                EXIT_UNREACHABLE
            } else {
                EXIT_FAILURE
            })
        }
    }
}

fn init_logging(serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Token(TokenCommand::Create {
            client,
            ttl,
            node_uuid,
        }) => {
            let request = CreateTokenRequest {
                ttl_s: Some(ttl.as_secs()),
                node_uuid,
            };
            let created: CreateTokenResponse =
                client.client()?.post("/api/v1/tokens", &request).await?;
            println!("{}", created.token);
            Ok(())
        }
        Command::Nodes(NodesCommand::List { client, json }) => {
            let nodes: Vec<NodeSummary> = client.client()?.get("/api/v1/nodes").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                print!("{}", nodes_table(&nodes, crate::now_ms()));
            }
            Ok(())
        }
        Command::Node(NodeCommand::Show { id, client, json }) => {
            let detail: NodeDetail = client
                .client()?
                .get(&format!("/api/v1/nodes/{}", encode(&id)))
                .await?;
            if json {
                let shown = NodeShow {
                    modules_reported: reported_modules(&detail),
                    detail: &detail,
                };
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                print!("{}", node_text(&detail, crate::now_ms()));
            }
            Ok(())
        }
        Command::Node(NodeCommand::Revoke { id, client }) => {
            let revoked: RevokeResponse = client
                .client()?
                .post(&format!("/api/v1/nodes/{}/revoke", encode(&id)), &())
                .await?;
            println!("revoked {}", revoked.revoked);
            Ok(())
        }
        Command::Events(args) => events_cli::run(args).await,
        Command::Module(command) => module_cli::run(command).await,
        Command::Task(command) => task_cli::run(command).await,
        Command::Tasks(args) => task_cli::list(args).await,
        Command::Script(command) => script_cli::run(command).await,
        Command::Scripts(args) => script_cli::list(args).await,
        Command::Network(command) => network_cli::run(command).await,
        Command::Networks(args) => network_cli::list(args).await,
        Command::Openapi => {
            println!("{}", serde_json::to_string_pretty(&crate::api::openapi())?);
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let opts = ServeOptions {
        data: args.data.data,
        listen: args.listen,
        cert_lifetime: args.cert_lifetime,
        hostnames: args.hostnames,
        heartbeat_interval_s: u32::try_from(args.heartbeat_interval.as_secs()).unwrap_or(u32::MAX),
        database: args.database.or_else(|| {
            std::env::var("POWERNODE_DATABASE")
                .ok()
                .filter(|url| !url.is_empty())
        }),
    };
    let retention = EventRetention {
        max_age: Duration::from_secs(u64::from(args.event_retention_days) * 86_400),
        max_per_node: args.event_retention_count,
    };
    let policy = Policy {
        event_retention: retention,
        task_output_max: usize::try_from(args.task_output_max).unwrap_or(usize::MAX),
    };
    let controller = Controller::start_with(&opts, policy).await?;
    // Scripts and tests read these two lines.
    println!("listening on {}", controller.local_addr());
    println!("ca certificate {}", controller.ca_cert_path().display());
    tracing::info!(
        listen = %controller.local_addr(),
        ca = %controller.ca_cert_path().display(),
        cert_lifetime_s = opts.cert_lifetime.as_secs(),
        event_retention_days = args.event_retention_days,
        event_retention_count = args.event_retention_count,
        "controller started"
    );
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(err) => {
                    tracing::error!(error = %err, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        signals.cancel();
    });
    controller.run(shutdown).await
}

fn ago(now_ms: i64, then_ms: Option<i64>) -> String {
    match then_ms {
        None => "never".to_owned(),
        Some(t) => format!("{}s ago", (now_ms - t).max(0) / 1000),
    }
}

fn timestamp(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "-".to_owned();
    };
    powernode_types::text::rfc3339(ms.div_euclid(1000))
}

fn nodes_table(nodes: &[NodeSummary], now_ms: i64) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "UUID".to_owned(),
        "HOSTNAME".to_owned(),
        "LAST HEARTBEAT".to_owned(),
        "CERT NOT AFTER".to_owned(),
        "STATE".to_owned(),
    ]];
    for n in nodes {
        rows.push([
            n.id.clone(),
            n.uuid.clone(),
            n.hostname.clone(),
            ago(now_ms, n.last_heartbeat_ms),
            timestamp(n.cert_not_after_ms),
            if n.revoked_at_ms.is_some() {
                "revoked"
            } else {
                "active"
            }
            .to_owned(),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn node_text(d: &NodeDetail, now_ms: i64) -> String {
    let mut out = format!(
        "id:              {}\nuuid:            {}\nhostname:        {}\narch:            {}\nenrolled:        {}\nrevoked:         {}\nlast heartbeat:  {}\n",
        d.node.id,
        d.node.uuid,
        d.node.hostname,
        d.node.arch,
        timestamp(Some(d.node.enrolled_at_ms)),
        timestamp(d.node.revoked_at_ms),
        ago(now_ms, d.last_heartbeat.as_ref().map(|h| h.received_at_ms)),
    );
    out.push_str(&format!(
        "certificate:     {}\n",
        certificate_text(d, now_ms)
    ));
    if let Some(hb) = &d.last_heartbeat {
        out.push_str(&format!(
            "agent version:   {}\nboot id:         {}\napplied gen:     {}\n",
            hb.agent_version,
            hb.boot_id,
            hb.applied_generation
                .map_or_else(|| "-".to_owned(), |g| g.to_string()),
        ));
    }
    out.push_str(&format!(
        "desired gen:     {}\nmodules:         {}\nnetwork:         {}\n",
        d.desired.generation,
        d.desired
            .modules
            .iter()
            .map(|m| format!("{}={}", m.name, m.reference))
            .collect::<Vec<_>>()
            .join(", "),
        d.desired.network.as_ref().map_or_else(
            || "-".to_owned(),
            |n| format!("{} {}", n.interface, n.address)
        ),
    ));
    out.push_str(&modules_text(&reported_modules(d)));
    out.push_str("certificates:\n");
    for c in &d.certificates {
        out.push_str(&format!(
            "  serial {}  not after {}{}\n",
            c.serial,
            timestamp(Some(c.not_after_ms)),
            if c.not_after_ms <= now_ms {
                " (expired)"
            } else {
                ""
            },
        ));
    }
    if d.last_events.is_empty() {
        out.push_str("last events: -\n");
    } else {
        out.push_str("last events:\n");
        for event in &d.last_events {
            out.push_str(&format!("  {}\n", events_cli::event_line(event)));
        }
    }
    out
}

/// The `certificate:` line of `node show`: what the node last reported of its certificate and
/// its rotation — "expires …, rotation failing since … (N attempts): error" while failing.
fn certificate_text(d: &NodeDetail, now_ms: i64) -> String {
    let Some(e) = &d.enrollment else {
        return "- (no heartbeat has reported it)".to_owned();
    };
    let r = &e.report;
    let ms = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
    let mut text = match ms(r.not_after_ms) {
        Some(at) if at <= now_ms => format!("expired {}", timestamp(Some(at))),
        Some(at) => format!(
            "expires {} (in {})",
            timestamp(Some(at)),
            crate::duration::human(Duration::from_millis(
                u64::try_from(at - now_ms).unwrap_or(0)
            ))
        ),
        None => "no certificate".to_owned(),
    };
    match ms(r.rotation_failing_since_ms) {
        Some(since) => {
            text.push_str(&format!(
                ", rotation failing since {} ({} attempt{})",
                timestamp(Some(since)),
                r.rotation_attempts,
                if r.rotation_attempts == 1 { "" } else { "s" },
            ));
            if let Some(error) = &r.last_error {
                text.push_str(&format!(": {error}"));
            }
        }
        None => {
            text.push_str(&format!(", {}", r.state));
            if let Some(rotate_at) = ms(r.rotate_at_ms).filter(|_| r.state == "Enrolled") {
                text.push_str(&format!(", rotation at {}", timestamp(Some(rotate_at))));
            }
            if let Some(error) = r.last_error.as_ref().filter(|_| r.state != "Enrolled") {
                text.push_str(&format!(": {error}"));
            }
        }
    }
    text
}

/// What `node show --json` prints: the node's detail and the module states of its latest
/// heartbeat, decoded.
#[derive(serde::Serialize)]
struct NodeShow<'a> {
    #[serde(flatten)]
    detail: &'a NodeDetail,
    modules_reported: Vec<ModuleReport>,
}

/// The `modules` of the node's latest heartbeat; entries that do not decode are skipped.
fn reported_modules(d: &NodeDetail) -> Vec<ModuleReport> {
    d.last_heartbeat
        .as_ref()
        .and_then(|hb| hb.body.get("modules")?.as_array())
        .map(|modules| {
            modules
                .iter()
                .filter_map(|m| serde_json::from_value(m.clone()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `sha256:0123abcd…` for a digest (whole if it is short).
fn short_digest(digest: &str) -> String {
    let keep = digest.find(':').map_or(12, |colon| colon + 1 + 8);
    match digest.char_indices().nth(keep) {
        Some((cut, _)) => format!("{}…", &digest[..cut]),
        None => digest.to_owned(),
    }
}

/// The `modules (reported):` lines of `node show`: one per module with its state, digest,
/// reference, download progress and error.
fn modules_text(modules: &[ModuleReport]) -> String {
    if modules.is_empty() {
        return "modules (reported): -\n".to_owned();
    }
    let mut out = "modules (reported):\n".to_owned();
    for m in modules {
        let mut line = format!(
            "  {}  {}",
            m.name,
            m.state.as_deref().unwrap_or("(no state)")
        );
        if let Some(error) = &m.error {
            line.push_str(&format!(": {error}"));
        }
        if let (Some(done), Some(total)) = (m.bytes_done, m.bytes_total) {
            line.push_str(&format!("  {done}/{total} bytes"));
        }
        if let Some(digest) = &m.digest {
            line.push_str(&format!("  {}", short_digest(digest)));
        }
        if let Some(reference) = &m.reference {
            line.push_str(&format!("  {reference}"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn usage_errors_exit_2_and_help_exits_0() {
        let run = |args: &[&str]| main_with_args(args.iter().map(Into::into));
        assert_eq!(run(&["powernode-controller", "--help"]), ExitCode::SUCCESS);
        assert_eq!(
            run(&["powernode-controller", "serve"]),
            ExitCode::from(EXIT_USAGE)
        );
        assert_eq!(
            run(&[
                "powernode-controller",
                "token",
                "create",
                "--data",
                "/x",
                "--ttl",
                "0s"
            ]),
            ExitCode::from(EXIT_USAGE)
        );
    }

    #[test]
    fn reported_modules_show_state_progress_and_error() {
        let report =
            |json: serde_json::Value| -> ModuleReport { serde_json::from_value(json).unwrap() };
        let text = modules_text(&[
            report(serde_json::json!({"name": "tools", "state": "Active",
                "digest": format!("sha256:ab12cd34{}", "0".repeat(56)),
                "reference": "reg/modules/tools@sha256:ab"})),
            report(serde_json::json!({"name": "big", "state": "Downloading",
                "bytes_done": 10, "bytes_total": 40})),
            report(serde_json::json!({"name": "bad", "state": "Failed",
                "error": "signature 1: no trusted key verifies it"})),
        ]);
        assert_eq!(
            text,
            "modules (reported):\n  tools  Active  sha256:ab12cd34…  reg/modules/tools@sha256:ab\n  \
             big  Downloading  10/40 bytes\n  bad  Failed: signature 1: no trusted key verifies it\n"
        );
        assert_eq!(modules_text(&[]), "modules (reported): -\n");
        assert_eq!(short_digest("sha256:00"), "sha256:00");
    }

    fn detail(enrollment: Option<crate::wire::EnrollmentReport>) -> NodeDetail {
        NodeDetail {
            node: crate::wire::Node {
                id: "node-1".into(),
                uuid: "u".into(),
                hostname: "edge".into(),
                arch: "amd64".into(),
                enrolled_at_ms: 0,
                revoked_at_ms: None,
            },
            enrollment: enrollment.map(|report| crate::wire::NodeEnrollment {
                report,
                changed_at_ms: 0,
            }),
            last_heartbeat: None,
            certificates: Vec::new(),
            desired: crate::wire::DesiredState {
                generation: 0,
                modules: Vec::new(),
                network: None,
            },
            last_events: Vec::new(),
        }
    }

    #[test]
    fn certificate_line_says_when_rotation_has_been_failing() {
        let day = 86_400_000;
        let now = 1_700_000_000_000;
        let failing = crate::wire::EnrollmentReport {
            state: "RotationFailing".into(),
            cert_fingerprint: Some("ab".into()),
            not_after_ms: Some(now as u64 + 3 * day),
            rotate_at_ms: Some(now as u64 - day),
            rotation_failing_since_ms: Some(1_699_913_600_000),
            rotation_attempts: 7,
            last_error: Some("controller answered 503".into()),
        };
        assert_eq!(
            certificate_text(&detail(Some(failing.clone())), now),
            "expires 2023-11-17T22:13:20Z (in 3d), rotation failing since \
             2023-11-13T22:13:20Z (7 attempts): controller answered 503"
        );
        let fine = crate::wire::EnrollmentReport {
            state: "Enrolled".into(),
            rotation_failing_since_ms: None,
            rotation_attempts: 0,
            last_error: None,
            rotate_at_ms: Some(now as u64 + day),
            ..failing.clone()
        };
        assert_eq!(
            certificate_text(&detail(Some(fine)), now),
            "expires 2023-11-17T22:13:20Z (in 3d), Enrolled, rotation at 2023-11-15T22:13:20Z"
        );
        let expired = crate::wire::EnrollmentReport {
            state: "CertExpired".into(),
            not_after_ms: Some(now as u64 - 1000),
            rotation_failing_since_ms: None,
            last_error: Some("expired".into()),
            ..failing
        };
        assert_eq!(
            certificate_text(&detail(Some(expired)), now),
            "expired 2023-11-14T22:13:19Z, CertExpired: expired"
        );
        assert_eq!(
            certificate_text(&detail(None), now),
            "- (no heartbeat has reported it)"
        );
    }

    #[test]
    fn ago_and_table() {
        assert_eq!(ago(10_000, Some(3_000)), "7s ago");
        assert_eq!(ago(10_000, None), "never");
        let table = nodes_table(&[], 0);
        assert!(table.starts_with("ID"));
    }
}
