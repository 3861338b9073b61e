//! ipcmonitor: a live view of any pubsub publication (DESIGN §2–3).
//!
//! ```text
//! ipcmonitor [--root DIR] --list [--json]
//! ipcmonitor [--root DIR] <agent>/<Topic> [--key K] [--follow] [--json]
//! ```
//!
//! Items are decoded to JSON through the types registry when this build knows the topic. When
//! the publisher is down, the items come from its checkpoint files, and `--follow` waits for it.
//!
//! The multi-call binary calls [`run`] when invoked as `ipcmonitor`. The operator CLI reuses
//! [`tool`], [`name`], [`item`], [`list`] and [`output`].

pub mod follow;
pub mod item;
pub mod list;
pub mod name;
pub mod output;
pub mod tool;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentbase::Root;
use anyhow::{bail, Context as _};
use powernode_pubsub::inspect::{self, PublicationInfo};
use powernode_pubsub::{Dirs, RawSubscription};
use powernode_types::registry;

use crate::follow::Tracker;
use crate::name::PublicationName;
use crate::output::Format;
use crate::tool::Exit;

/// The program's name, as argv\[0\] selects it.
pub const NAME: &str = "ipcmonitor";

/// How long a live publisher has to deliver its snapshot before the checkpoint files are shown.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3);

/// Shows pubsub publications: every one with `--list`, or the items of one.
///
/// Output is text, or with --json: for --list one JSON array; otherwise JSON lines, first
/// {"event":"snapshot",..}, then {"event":"item","key":..,"value":..} per item (or "bytes"
/// in place of "value" for a topic this build does not know), then with --follow
/// create/modify/delete/synchronized/restarted/publisher_up/publisher_down events.
#[derive(Debug, clap::Parser)]
#[command(after_help = "Exit status: 0 ok, 1 failure (no such publication or key), 2 usage error.")]
struct Args {
    /// Prefix for every path (default: $POWERNODE_ROOT, else /).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// List every publication with its item count and whether its publisher is up.
    #[arg(long, conflicts_with_all = ["publication", "key", "follow"])]
    list: bool,
    /// The publication to show, as <agent>/<Topic>.
    #[arg(value_name = "AGENT/TOPIC", required_unless_present = "list")]
    publication: Option<PublicationName>,
    /// Show only the item with this key.
    #[arg(long, value_name = "K")]
    key: Option<String>,
    /// After the current items, print changes as they happen, until interrupted.
    #[arg(long)]
    follow: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs ipcmonitor with `args` (`args[0]` is the program name) and returns its exit status.
pub fn run(args: Vec<OsString>) -> ExitCode {
    let args: Args = match tool::parse(NAME, None, args) {
        Ok(args) => args,
        Err(exit) => return exit.into(),
    };
    tool::finish(NAME, tool::block_on(monitor(args)))
}

async fn monitor(args: Args) -> anyhow::Result<Exit> {
    let root = Root::resolve(args.root.clone());
    let dirs = Dirs::under_root(root.base());
    let format = Format::json_if(args.json);
    let mut out = std::io::stdout().lock();
    let outcome = match &args.publication {
        None => {
            let rows = list::rows(&dirs).await;
            output::list(&mut out, root.base(), &rows, format)
                .context("writing to stdout")
                .map(|()| Exit::Success)
        }
        Some(name) => show(&mut out, &root, &dirs, name, &args, format).await,
    };
    match outcome {
        Err(e) if tool::is_broken_pipe(&e) => Ok(Exit::Success),
        other => other,
    }
}

/// Prints the items of `name`, then with `--follow` its changes, forever.
async fn show(
    out: &mut dyn Write,
    root: &Root,
    dirs: &Dirs,
    name: &PublicationName,
    args: &Args,
    format: Format,
) -> anyhow::Result<Exit> {
    let info = find(root, dirs, name, args.follow)?;
    let snapshot = inspect::snapshot(dirs, &info, SNAPSHOT_TIMEOUT).await;
    let key = args.key.as_deref();
    output::snapshot(
        out,
        &name.to_string(),
        &info.checkpoint_dir,
        &snapshot,
        key,
        format,
    )
    .context("writing to stdout")?;
    if !args.follow {
        if let Some(key) = key.filter(|k| !snapshot.items.contains_key(*k)) {
            bail!("{name} has no item with key {key:?}");
        }
        return Ok(Exit::Success);
    }

    let mut tracker = Tracker::new(&name.topic, &snapshot);
    // The checkpoint files, if any, were shown above: follow the live publisher only.
    let mut sub = RawSubscription::new(dirs, &name.agent, &name.topic, None, false);
    loop {
        for change in tracker.apply(sub.next().await) {
            if key.is_some_and(|k| change.key().is_some_and(|c| c != k)) {
                continue;
            }
            output::change(out, &change, format).context("writing to stdout")?;
        }
    }
}

/// The publication `name` under `root`. One that does not exist (yet) is only accepted with
/// `--follow` and a topic this build knows, to wait for its publisher.
fn find(
    root: &Root,
    dirs: &Dirs,
    name: &PublicationName,
    follow: bool,
) -> anyhow::Result<PublicationInfo> {
    let found = inspect::list(dirs)
        .into_iter()
        .find(|info| info.agent == name.agent && info.topic == name.topic);
    if let Some(info) = found {
        return Ok(info);
    }
    let known = registry::lookup(&name.topic);
    match known {
        Some(topic) if follow => Ok(PublicationInfo {
            agent: name.agent.clone(),
            topic: name.topic.clone(),
            persistent: topic.persistent,
            checkpoint_dir: dirs.checkpoints(&name.agent, &name.topic, topic.persistent),
            socket: dirs.socket(&name.agent, &name.topic),
        }),
        Some(_) => bail!(
            "no publication {name} under {}: its publisher has not run there \
             (--follow waits for it)",
            root.base().display()
        ),
        None => bail!(
            "no publication {name} under {}, and {:?} is not a topic this build knows \
             (known: {})",
            root.base().display(),
            name.topic,
            known_topics()
        ),
    }
}

/// The names of every topic this build knows, comma-separated.
pub fn known_topics() -> String {
    registry::all()
        .iter()
        .map(|t| t.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(list: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(list)
    }

    #[test]
    fn argument_combinations() {
        let a = parse(&["ipcmonitor", "--list", "--json"]).unwrap();
        assert!(a.list && a.json && a.publication.is_none());

        let a = parse(&[
            "ipcmonitor",
            "--root",
            "/r",
            "enrollmgr/EnrollmentStatus",
            "--key",
            "global",
            "--follow",
        ])
        .unwrap();
        assert_eq!(a.root, Some(PathBuf::from("/r")));
        assert_eq!(
            a.publication.unwrap().to_string(),
            "enrollmgr/EnrollmentStatus"
        );
        assert_eq!(a.key.as_deref(), Some("global"));
        assert!(a.follow && !a.list);

        for bad in [
            &["ipcmonitor"][..],
            &["ipcmonitor", "--list", "a/T"],
            &["ipcmonitor", "--list", "--follow"],
            &["ipcmonitor", "NoSlash"],
            &["ipcmonitor", "a/T", "extra"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_missing_publication_is_an_error_unless_followed_and_known() {
        let dir = std::env::temp_dir().join("ipcmonitor-find-test-does-not-exist");
        let root = Root::new(&dir);
        let dirs = Dirs::under_root(root.base());
        let known: PublicationName = "enrollmgr/EnrollmentStatus".parse().unwrap();
        let unknown: PublicationName = "enrollmgr/NoSuchTopic".parse().unwrap();

        let info = find(&root, &dirs, &known, true).unwrap();
        assert!(info.persistent);
        assert!(info
            .checkpoint_dir
            .ends_with("status/enrollmgr/EnrollmentStatus"));

        let err = find(&root, &dirs, &known, false).unwrap_err().to_string();
        assert!(err.contains("--follow waits"), "{err}");
        for follow in [false, true] {
            let err = find(&root, &dirs, &unknown, follow)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("not a topic this build knows") && err.contains("AgentStatus"),
                "{err}"
            );
        }
    }
}
