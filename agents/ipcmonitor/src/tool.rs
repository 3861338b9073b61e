//! What every command-line tool of the multi-call binary does the same way: parse arguments,
//! run on a small async runtime, and turn the outcome into a typed exit status.

use std::ffi::OsString;
use std::future::Future;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches};

/// How a tool run ended: the process exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: done (for `wait`: the condition holds).
    Success,
    /// 1: the command failed (for `wait`: it timed out).
    Failure,
    /// 2: the command line was wrong.
    Usage,
}

impl Exit {
    /// The numeric exit status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// A command line that parsed but makes no sense (e.g. `--field` on a topic this build does not
/// know). Anywhere in an error's chain, it makes the tool exit with [`Exit::Usage`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses `args` (`args[0]` is ignored: usage names `bin`) into `T`, with `version` shown by
/// `--version` when given. Help and version are printed here and give `Err(Exit::Success)`;
/// a usage error is printed with the usage and gives `Err(Exit::Usage)`.
pub fn parse<T: CommandFactory + FromArgMatches>(
    bin: &'static str,
    version: Option<&'static str>,
    args: Vec<OsString>,
) -> Result<T, Exit> {
    try_parse(bin, version, args).map_err(|e| {
        // clap prints help and version to stdout, errors (with the usage) to stderr.
        let _ = e.print();
        clap_exit(&e)
    })
}

fn try_parse<T: CommandFactory + FromArgMatches>(
    bin: &'static str,
    version: Option<&'static str>,
    args: Vec<OsString>,
) -> Result<T, clap::Error> {
    let mut command = T::command().name(bin).bin_name(bin);
    if let Some(version) = version {
        command = command.version(version);
    }
    command
        .try_get_matches_from(args)
        .and_then(|matches| T::from_arg_matches(&matches))
}

/// Help and version requests end in success; everything else clap refuses is a usage error.
fn clap_exit(e: &clap::Error) -> Exit {
    if e.use_stderr() {
        Exit::Usage
    } else {
        Exit::Success
    }
}

/// Runs `future` to completion on a single-threaded runtime with timers and sockets.
pub fn block_on<T>(future: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(future)
}

/// The process exit status for a tool's outcome. An error is printed to stderr as
/// `<tool>: error: <cause chain>`, and gives [`Exit::Usage`] if a [`UsageError`] is in its
/// chain, [`Exit::Failure`] otherwise; never success.
pub fn finish(tool: &str, outcome: anyhow::Result<Exit>) -> ExitCode {
    let exit = match outcome {
        Ok(exit) => exit,
        Err(err) => {
            eprintln!("{tool}: error: {err:#}");
            exit_for(&err)
        }
    };
    exit.into()
}

/// The exit status an error maps to.
fn exit_for(err: &anyhow::Error) -> Exit {
    if err.chain().any(|cause| cause.is::<UsageError>()) {
        Exit::Usage
    } else {
        Exit::Failure
    }
}

/// Whether `err` is a write to a closed pipe (`ipcmonitor --follow | head`): the reader is gone,
/// which ends the tool quietly rather than as a failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::anyhow;

    #[derive(Debug, clap::Parser)]
    struct Args {
        #[arg(long)]
        flag: bool,
    }

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Exit::Success.code(), 0);
        assert_eq!(Exit::Failure.code(), 1);
        assert_eq!(Exit::Usage.code(), 2);
    }

    #[test]
    fn usage_errors_anywhere_in_the_chain_exit_2() {
        let usage = anyhow::Error::new(UsageError("bad".into())).context("while parsing");
        assert_eq!(exit_for(&usage), Exit::Usage);
        assert_eq!(exit_for(&anyhow!("boom")), Exit::Failure);
    }

    #[test]
    fn parse_maps_help_and_errors() {
        let ok: Args = try_parse("t", None, args(&["x", "--flag"])).unwrap();
        assert!(ok.flag);
        let exit = |list: &[&str], version| {
            clap_exit(&try_parse::<Args>("t", version, args(list)).unwrap_err())
        };
        assert_eq!(exit(&["x", "--bogus"], None), Exit::Usage);
        assert_eq!(exit(&["x", "--help"], None), Exit::Success);
        assert_eq!(exit(&["x", "--version"], Some("1.0")), Exit::Success);
        assert_eq!(exit(&["x", "--version"], None), Exit::Usage);
    }

    #[test]
    fn broken_pipe_is_recognised_through_context() {
        let err = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing to stdout");
        assert!(is_broken_pipe(&err));
        assert!(!is_broken_pipe(&anyhow!("other")));
    }
}
