//! `powernode-agent`, the multi-call executable: argv\[0\] selects the program (see
//! [`dispatch`]); every program lives in its own library crate.

mod dispatch;

use std::ffi::OsString;
use std::process::ExitCode;

use dispatch::Program;

/// What this binary was built from; the environment variables come from `build.rs`.
const BUILD: powernode_cli::BuildInfo = powernode_cli::BuildInfo {
    version: env!("CARGO_PKG_VERSION"),
    git_sha: env!("POWERNODE_GIT_SHA"),
    rustc: env!("POWERNODE_RUSTC_VERSION"),
};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let program = dispatch::for_argv0(args.first().map(OsString::as_os_str).unwrap_or_default());
    start(program, args)
}

/// Runs `program` with `args` (`args[0]` is the name it was invoked by).
fn start(program: Program, args: Vec<OsString>) -> ExitCode {
    match program {
        Program::Ipcmonitor => {
            agentbase::logging::init_tool("ipcmonitor", "warn");
            ipcmonitor::run(args)
        }
        Program::Identitymgr => agentbase::exit_code(
            "identitymgr",
            agentbase::run_agent("identitymgr", args, identitymgr::run),
        ),
        Program::Enrollmgr => agentbase::exit_code(
            "enrollmgr",
            agentbase::run_agent("enrollmgr", args, enrollmgr::run),
        ),
        Program::Heartbeatd => agentbase::exit_code(
            "heartbeatd",
            agentbase::run_agent("heartbeatd", args, heartbeatd::run),
        ),
        Program::Modulemgr => agentbase::exit_code(
            "modulemgr",
            agentbase::run_agent("modulemgr", args, modulemgr::run),
        ),
        Program::Verifier => agentbase::exit_code(
            "verifier",
            agentbase::run_agent("verifier", args, verifier::run),
        ),
        Program::Mountmgr => agentbase::exit_code(
            "mountmgr",
            agentbase::run_agent("mountmgr", args, mountmgr::run),
        ),
        Program::Eventd => agentbase::exit_code(
            "eventd",
            agentbase::run_agent("eventd", args, |ctx| eventd::run(ctx, dispatch::agents())),
        ),
        Program::Execd => {
            agentbase::exit_code("execd", agentbase::run_agent("execd", args, execd::run))
        }
        Program::Netmgr => {
            agentbase::exit_code("netmgr", agentbase::run_agent("netmgr", args, netmgr::run))
        }
        Program::Wgdevice => netmgr::device::main(args),
        Program::Cli => powernode_cli::run(
            args,
            &powernode_cli::Host {
                build: BUILD,
                programs: dispatch::names(),
                agents: dispatch::agents(),
                start: start_by_name,
            },
        ),
    }
}

/// `powernode-agent run <name>`: the program called `name`, if there is one.
fn start_by_name(name: &str, args: Vec<OsString>) -> Option<ExitCode> {
    dispatch::by_name(name).map(|program| start(program, args))
}
