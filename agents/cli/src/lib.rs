//! The operator CLI, `powernode-agent` (DESIGN §2): what the multi-call binary runs when argv\[0\]
//! names no agent or tool.
//!
//! ```text
//! powernode-agent [--root DIR] status [--json]
//! powernode-agent [--root DIR] introspect [--json]
//! powernode-agent [--root DIR] wait <agent>/<Topic> [--key K] [--field F=V]... [--timeout S]
//! powernode-agent [--root DIR] events [--pending] [--follow] [--json]
//! powernode-agent [--root DIR] attach REF [--name N] [--priority P] [--no-wait] [--json]
//! powernode-agent [--root DIR] detach NAME
//! powernode-agent [--root DIR] verify REF|BUILT [--policy NAME] [--json]
//! powernode-agent [--root DIR] commit --name N --version V [--push REF] [--json]
//! powernode-agent version [--json]
//! powernode-agent agents
//! powernode-agent [--root DIR] run <program> [ARGS]...
//! ```
//!
//! Exit status: 0 ok, 1 failure (for `wait`: timed out), 2 usage error.

pub mod events;
pub mod field;
pub mod introspect;
pub mod local_task;
pub mod modules;
pub mod node_tasks;
pub mod output;
pub mod status;
pub mod tasks;
pub mod wait;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentbase::Root;
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ipcmonitor::name::PublicationName;
use ipcmonitor::output::Format;
use ipcmonitor::tool::{self, Exit, UsageError};
use powernode_pubsub::Dirs;
use serde_json::Value;

use crate::field::FieldMatch;
use crate::wait::Condition;

/// The CLI's name, as usage shows it.
pub const NAME: &str = "powernode-agent";

/// What the binary was built from, for `version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuildInfo {
    /// The package version, e.g. `0.1.0`.
    pub version: &'static str,
    /// Short git commit, or `unknown` when not built from a git checkout.
    pub git_sha: &'static str,
    /// `rustc --version` of the compiler that built it.
    pub rustc: &'static str,
}

/// What the multi-call binary provides to the CLI.
#[derive(Clone, Debug)]
pub struct Host {
    /// Version facts.
    pub build: BuildInfo,
    /// The names `run` accepts.
    pub programs: Vec<&'static str>,
    /// The agents among them (the rest are tools), for `agents`.
    pub agents: Vec<&'static str>,
    /// Starts the program `name` with `args` (`args[0]` is `name`) and returns its exit status;
    /// `None` if the binary has no such program.
    pub start: fn(&str, Vec<OsString>) -> Option<ExitCode>,
}

/// Operator CLI of the powernode node agent.
#[derive(Debug, Parser)]
#[command(
    arg_required_else_help = true,
    after_help = "Exit status: 0 ok, 1 failure (for wait: timed out), 2 usage error."
)]
struct Cli {
    /// Prefix for every path (default: $POWERNODE_ROOT, else /).
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show every agent's health and every publication's state.
    ///
    /// Health comes from each agent's <agent>/AgentStatus publication: state, pid, uptime,
    /// time since its main loop last turned, last error. For a publication whose publisher is
    /// down, what is shown comes from the checkpoint files it left, and says so.
    Status {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a publication has an item that satisfies a condition (for boot scripts).
    ///
    /// Exits 0 as soon as an item exists (with key K, if given) whose JSON has every field F
    /// equal to V, and prints it on stdout as {"key":..,"value":..}. Persistent topics can be
    /// satisfied from their checkpoint files before their publisher is up. On timeout, exits 1
    /// saying what it last saw.
    Wait(WaitArgs),
    /// Show the node's events, oldest first, from eventd's journal.
    ///
    /// One line per event: time (node clock, UTC), agent, severity, kind, message (with
    /// "(N dropped before)" when events of that agent were dropped ahead of it), fields as
    /// key=value. The journal is only read: eventd owns it, and this is safe while eventd
    /// runs. The journal keeps what the controller has not accepted and, until eventd deletes
    /// them, some that it has; see docs/events.md.
    Events {
        /// Only events the controller has not accepted yet: the journal's records past the
        /// delivery cursor, then events agents have raised that eventd has not journalled yet
        /// (read from their <agent>/Event checkpoints, marked "[not yet journalled]").
        #[arg(long)]
        pending: bool,
        /// After what is there, keep printing events as eventd journals them, until
        /// interrupted (SIGINT or SIGTERM end it with status 0).
        #[arg(long)]
        follow: bool,
        /// One JSON object per line: the event's fields, "stage" (delivered, journalled or
        /// raised) and "index" (its place in the journal; null for a raised event).
        #[arg(long)]
        json: bool,
    },
    /// Show the whole node on one page: identity, enrollment, controller, modules, mounts,
    /// network, tasks, events, agents.
    ///
    /// Each section is read from the publication named in its heading, live, or, when its
    /// publisher is down, from the checkpoint files it left (the heading says "publisher down:
    /// from its checkpoint"); a publication whose agent never ran under the root is shown as
    /// not published. No publication is waited on for more than a few seconds, so the page
    /// prints with every agent down. Secrets (bootstrap token, CA bundle) are never shown.
    ///
    /// identity (identitymgr/NodeIdentity): the node's UUID and which identity source gave it,
    /// hostname, architecture, boot id, the controller URL the source named.
    ///
    /// enrollment (enrollmgr/EnrollmentStatus): enrollment state, the node id the controller
    /// gave, the certificate's fingerprint, validity and expiry, when rotation is due, or since
    /// when and how many times it has been failing; the last error.
    ///
    /// controller (heartbeatd/ControllerStatus): whether the last heartbeat succeeded, when one
    /// last did, how long the controller has been unreachable, the desired-state generation
    /// applied, the heartbeat interval, the clock skew, the last error.
    ///
    /// modules (modulemgr/ModuleStatus): each module's state, download progress, digest, and
    /// error or reference. mounts (mountmgr/MountStatus): each mount target's generation,
    /// state, A/B slot and layers.
    ///
    /// network config (heartbeatd/NetworkConfig): the overlay interface the controller asked
    /// for. network status (netmgr/NetworkStatus): what netmgr made of it, or that netmgr is
    /// not built into this binary or not running.
    ///
    /// tasks: as `tasks` shows them. events (eventd/EventdStatus): events not yet accepted by
    /// the controller, deliveries, the journal's size and what it dropped.
    ///
    /// agents: every agent's AgentStatus (as `status` shows it) with its restarts (starts
    /// recorded under the root, across reboots, less one); agents of this binary that never
    /// ran under the root are listed after.
    ///
    /// Exits 0 once the page is printed.
    Introspect {
        /// Print one JSON document with the same sections (keys in docs/cli.md).
        #[arg(long)]
        json: bool,
    },
    /// Show the tasks on this node: those heartbeatd holds (leased from the controller) with
    /// what the agent running each says, and finished ones until they are reported.
    Tasks {
        /// Print JSON (an array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a NodeScript on this node through execd, as a `node.exec` task from the controller
    /// would run (same interpreters, process group, timeout, output cap).
    ///
    /// The script's output (stdout and stderr together) is printed when it ends, with a
    /// closing line saying how it ended unless it exited 0. Exits 0 if the script exited 0,
    /// 1 otherwise. Ctrl-C cancels it (execd kills its whole process group).
    Exec {
        /// The script file; - reads it from stdin.
        script: std::path::PathBuf,
        /// The interpreter, an absolute path from the exec.interpreters setting (default:
        /// its first entry).
        #[arg(long, value_name = "PATH")]
        interpreter: Option<String>,
        /// Seconds the script may run before it is killed.
        #[arg(long, value_name = "S", default_value = "300", value_parser = parse_seconds)]
        timeout: Duration,
        /// Print the final TaskStatus as JSON instead of the output.
        #[arg(long)]
        json: bool,
    },
    /// Reconcile now and wait for it: heartbeat at once (the controller's latest desired
    /// state), resolve every module's reference again (a moved tag brings its new image),
    /// fetch what is missing, verify and re-stack.
    ///
    /// Runs as a node.sync task in modulemgr. Prints whether the heartbeat went through and
    /// one line per module (state, image, what changed). Exits 0 once every module has
    /// settled, 1 if the sync failed or timed out.
    Sync {
        /// Give up after S seconds.
        #[arg(long, value_name = "S", default_value = "120", value_parser = parse_seconds)]
        timeout: Duration,
        /// Print JSON: {"heartbeat", "task", "modules"}.
        #[arg(long)]
        json: bool,
    },
    /// Attach a module locally (without a controller) and follow it until it is active.
    ///
    /// Writes etc/powernode/modules.d/<name>.toml, which modulemgr reads: the module is
    /// pulled, verified against the trust policy and stacked. Progress goes to stderr. Exits 0
    /// once it is Active, 1 if it Failed (the reason is printed) or the wait timed out.
    Attach {
        /// The module, as registry/repository:tag or registry/repository@sha256:….
        reference: String,
        /// Its name (default: the last part of the repository).
        #[arg(long)]
        name: Option<String>,
        /// Its stacking priority: higher is stacked above lower (default: the priority its
        /// module manifest gives).
        #[arg(long)]
        priority: Option<u32>,
        /// Return once the assignment is written.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after S seconds.
        #[arg(long, value_name = "S", default_value = "300", value_parser = parse_seconds)]
        timeout: Duration,
        /// Print the final ModuleStatus as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Detach a locally attached module: modulemgr takes it out of the stack.
    Detach {
        /// The module's name.
        name: String,
    },
    /// Run the verifier's checks on a module, without mounting it.
    ///
    /// TARGET is a registry reference (pulled into a temporary directory; digest, fs-verity
    /// and signature are checked) or a module built by `powernode-controller module build`
    /// (any of its files; digest and fs-verity are checked, and the policy decides whether
    /// the missing signature is acceptable). Exits 0 if it passes, 1 if it is rejected (the
    /// reason on stdout) or cannot be checked (the error on stderr).
    Verify {
        /// The module.
        target: String,
        /// The trust policy (default: modules.trust_policy from the settings).
        #[arg(long)]
        policy: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Capture what was written into the mounted stack as a new module image.
    ///
    /// The active stack's upper directory (new and changed files, and whiteouts for deleted
    /// ones), as mountmgr publishes it (its last status, while it is down), is made into an
    /// erofs image with mkfs.erofs, with its manifests, in --out; with
    /// --push it is uploaded as REGISTRY/REPOSITORY:TAG (sign it with `powernode-controller
    /// module sign` before assigning it to nodes whose policy requires signatures).
    Commit {
        /// The new module's name.
        #[arg(long)]
        name: String,
        /// Its version.
        #[arg(long, value_name = "V")]
        version: String,
        /// Its stacking priority (the manifest's default; `attach` uses it when given none).
        #[arg(long, default_value_t = modulemgr::commit::DEFAULT_PRIORITY)]
        priority: u32,
        /// The mount target (default: modules.mount_target from the settings).
        #[arg(long)]
        target: Option<String>,
        /// Where to write the image and manifests.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Push to REGISTRY/REPOSITORY:TAG.
        #[arg(long, value_name = "REF")]
        push: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the version, git commit and compiler of this binary.
    Version {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the agents of this binary, one name a line (the programs `run` accepts that are
    /// daemons rather than tools), for scripts that must cover every agent.
    Agents,
    /// Run a program of this binary by name, as if invoked under that name.
    ///
    /// E.g. `run ipcmonitor --list`. A --root given before `run` is passed on to the program.
    Run {
        /// The program (e.g. ipcmonitor) and its arguments: everything after the name is the
        /// program's, `--help` included.
        #[arg(
            value_name = "PROGRAM",
            required = true,
            num_args = 1..,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        command: Vec<OsString>,
    },
}

#[derive(Debug, clap::Args)]
struct WaitArgs {
    /// The publication, as <agent>/<Topic>.
    #[arg(value_name = "AGENT/TOPIC")]
    publication: PublicationName,
    /// Only the item with this key will do.
    #[arg(long, value_name = "K")]
    key: Option<String>,
    /// Field F (a dotted path into the item's JSON; numbers index arrays) must equal V, compared
    /// as the field's string form: state=Enrolled, reachable=true, a.b=3. Repeatable; needs a
    /// topic this build knows.
    #[arg(long = "field", value_name = "F=V")]
    fields: Vec<FieldMatch>,
    /// Give up after S seconds (fractions allowed).
    #[arg(long, value_name = "S", default_value = "60", value_parser = parse_seconds)]
    timeout: Duration,
}

/// Parses a non-negative number of seconds, e.g. `60` or `0.5`.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a duration >= 0"))
}

/// Runs the CLI with `args` (`args[0]` is ignored) and returns its exit status.
pub fn run(args: Vec<OsString>, host: &Host) -> ExitCode {
    let cli: Cli = match tool::parse(NAME, Some(host.build.version), args) {
        Ok(cli) => cli,
        Err(exit) => return exit.into(),
    };
    let root = Root::resolve(cli.root.clone());
    // The CLI's own commands log library warnings to stderr; `run` leaves logging to the
    // program it starts (an agent logs to journald).
    if !matches!(cli.command, Command::Run { .. }) {
        agentbase::logging::init_tool(NAME, "warn");
    }
    let outcome = match cli.command {
        Command::Status { json } => tool::block_on(status(root, Format::json_if(json))),
        Command::Tasks { json } => tool::block_on(async {
            let dirs = Dirs::under_root(root.base());
            let shown = tasks::gather(&dirs).await;
            tasks::print(&mut std::io::stdout().lock(), &shown, json)
                .context("writing to stdout")?;
            Ok(Exit::Success)
        }),
        Command::Introspect { json } => tool::block_on(introspect::run(&root, &host.agents, json)),
        Command::Wait(args) => tool::block_on(wait(root, args)),
        Command::Exec {
            script,
            interpreter,
            timeout,
            json,
        } => tool::block_on(node_tasks::exec(&root, &script, interpreter, timeout, json)),
        Command::Sync { timeout, json } => tool::block_on(node_tasks::sync(&root, timeout, json)),
        Command::Events {
            pending,
            follow,
            json,
        } => tool::block_on(events::run(
            &root,
            events::Options {
                pending,
                follow,
                json,
            },
        )),
        Command::Version { json } => output::version(
            &mut std::io::stdout().lock(),
            &host.build,
            Format::json_if(json),
        )
        .context("writing to stdout")
        .map(|()| Exit::Success),
        Command::Agents => agents(&mut std::io::stdout().lock(), &host.agents)
            .context("writing to stdout")
            .map(|()| Exit::Success),
        Command::Run { command } => return start(host, cli.root, command),
        Command::Attach {
            reference,
            name,
            priority,
            no_wait,
            timeout,
            json,
        } => tool::block_on(modules::attach(
            &root,
            &reference,
            name,
            priority,
            (!no_wait).then_some(timeout),
            json,
        )),
        Command::Detach { name } => tool::block_on(modules::detach(&root, &name)),
        Command::Commit {
            name,
            version,
            priority,
            target,
            out,
            push,
            json,
        } => tool::block_on(async {
            let settings = agentbase::Settings::load(&root)?;
            let args = modules::CommitArgs {
                target: target.unwrap_or_else(|| settings.modules.mount_target.clone()),
                name,
                version,
                priority,
                out,
                push,
                json,
            };
            modules::commit(&root, &settings, args).await
        }),
        Command::Verify {
            target,
            policy,
            json,
        } => tool::block_on(async {
            let settings = agentbase::Settings::load(&root)?;
            modules::verify(&root, &settings, &target, policy.as_deref(), json).await
        }),
    };
    tool::finish(NAME, outcome)
}

async fn status(root: Root, format: Format) -> anyhow::Result<Exit> {
    let dirs = Dirs::under_root(root.base());
    let report = status::gather(&dirs, root.base().to_owned()).await;
    output::status(&mut std::io::stdout().lock(), &report, format).context("writing to stdout")?;
    Ok(Exit::Success)
}

async fn wait(root: Root, args: WaitArgs) -> anyhow::Result<Exit> {
    let condition = Condition::new(args.publication, args.key, args.fields)?;
    let dirs = Dirs::under_root(root.base());
    let (key, item) = wait::wait(&dirs, &condition, args.timeout).await?;
    println!("{}", Value::Object(item.to_json(&key)));
    Ok(Exit::Success)
}

/// `agents`: one name a line.
fn agents(out: &mut impl std::io::Write, names: &[&str]) -> std::io::Result<()> {
    for name in names {
        writeln!(out, "{name}")?;
    }
    out.flush()
}

/// `run <program> [args]`: hands over to another program of the binary.
fn start(host: &Host, root: Option<PathBuf>, command: Vec<OsString>) -> ExitCode {
    let mut command = command.into_iter();
    let program = command.next().unwrap_or_default();
    let name = program.to_string_lossy().into_owned();
    let mut argv = vec![program];
    if let Some(root) = root {
        argv.extend([OsString::from("--root"), root.into_os_string()]);
    }
    argv.extend(command);
    match (host.start)(&name, argv) {
        Some(code) => code,
        None => tool::finish(
            NAME,
            Err(UsageError(format!(
                "no program {name:?} in this binary; valid names: {}",
                host.programs.join(", ")
            ))
            .into()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(list: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(list)
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn root_is_global() {
        for args in [
            &["pa", "--root", "/r", "status"][..],
            &["pa", "status", "--root", "/r"],
        ] {
            let cli = parse(args).unwrap();
            assert_eq!(cli.root, Some(PathBuf::from("/r")), "{args:?}");
            assert!(matches!(cli.command, Command::Status { json: false }));
        }
    }

    #[test]
    fn wait_arguments() {
        let cli = parse(&[
            "pa",
            "wait",
            "enrollmgr/EnrollmentStatus",
            "--field",
            "state=Enrolled",
            "--field",
            "a.b=3",
            "--key",
            "global",
            "--timeout",
            "1.5",
        ])
        .unwrap();
        let Command::Wait(w) = cli.command else {
            panic!("not wait");
        };
        assert_eq!(w.publication.to_string(), "enrollmgr/EnrollmentStatus");
        assert_eq!(w.fields.len(), 2);
        assert_eq!(w.key.as_deref(), Some("global"));
        assert_eq!(w.timeout, Duration::from_millis(1500));

        let Command::Wait(w) = parse(&["pa", "wait", "a/T"]).unwrap().command else {
            panic!("not wait");
        };
        assert_eq!(w.timeout, Duration::from_secs(60), "default timeout");

        for bad in [
            &["pa", "wait"][..],
            &["pa", "wait", "NoSlash"],
            &["pa", "wait", "a/T", "--field", "novalue"],
            &["pa", "wait", "a/T", "--timeout", "-1"],
            &["pa", "wait", "a/T", "--timeout", "soon"],
            &["pa"],
            &["pa", "bogus"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn run_passes_everything_after_the_program_on() {
        for (args, want) in [
            (
                &["pa", "run", "ipcmonitor", "--help"][..],
                &["ipcmonitor", "--help"][..],
            ),
            (
                &["pa", "run", "ipcmonitor", "--list", "--root", "/x"],
                &["ipcmonitor", "--list", "--root", "/x"],
            ),
            (&["pa", "run", "nosuch"], &["nosuch"]),
        ] {
            let cli = parse(args).unwrap();
            let Command::Run { command } = cli.command else {
                panic!("not run");
            };
            assert_eq!(command, want, "{args:?}");
            assert_eq!(cli.root, None);
        }
        let cli = parse(&["pa", "--root", "/r", "run", "ipcmonitor"]).unwrap();
        assert_eq!(cli.root, Some(PathBuf::from("/r")));
        assert!(parse(&["pa", "run"]).is_err(), "run without a program");
        let help = parse(&["pa", "run", "--help"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
    }

    #[test]
    fn agents_lists_one_name_a_line() {
        assert!(matches!(
            parse(&["pa", "agents"]).unwrap().command,
            Command::Agents
        ));
        assert!(parse(&["pa", "agents", "extra"]).is_err());
        let mut out = Vec::new();
        agents(&mut out, &["identitymgr", "enrollmgr"]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "identitymgr\nenrollmgr\n");
    }

    #[test]
    fn events_flags() {
        let Command::Events {
            pending,
            follow,
            json,
        } = parse(&["pa", "events", "--pending", "--json"])
            .unwrap()
            .command
        else {
            panic!("not events");
        };
        assert!(pending && json && !follow);
        assert!(parse(&["pa", "events", "--since", "1"]).is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("0"), Ok(Duration::ZERO));
        assert_eq!(parse_seconds("2.25"), Ok(Duration::from_millis(2250)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("inf").is_err());
        assert!(parse_seconds("NaN").is_err());
    }
}
