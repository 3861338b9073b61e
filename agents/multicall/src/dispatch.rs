//! Which program a name selects: the one table of the multi-call binary.
//!
//! A link to the binary named after a program runs that program (`/usr/bin/ipcmonitor`);
//! `powernode-agent run <name>` does the same explicitly; any other name runs the operator CLI.

use std::ffi::OsStr;
use std::path::Path;

/// The programs linked into the binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// The pubsub monitor.
    Ipcmonitor,
    /// The identity agent.
    Identitymgr,
    /// The enrollment agent.
    Enrollmgr,
    /// The heartbeat agent.
    Heartbeatd,
    /// The module agent: pull, drive verification and mounting.
    Modulemgr,
    /// The verification agent.
    Verifier,
    /// The mount agent.
    Mountmgr,
    /// The event agent: journals every agent's events, delivers them.
    Eventd,
    /// The NodeScript agent: runs the node.exec tasks.
    Execd,
    /// The overlay network agent: WireGuard, addresses, routes, port forwards.
    Netmgr,
    /// netmgr's userspace WireGuard device: a process of its own that netmgr starts.
    Wgdevice,
    /// The operator CLI: not in the table, it is what every other name runs.
    Cli,
}

impl Program {
    /// Whether the program is an agent (a daemon with a unit of its own, started by
    /// device-steps.sh) rather than a tool. A match without a wildcard, so that a new program
    /// cannot be added without saying which it is.
    pub fn is_agent(self) -> bool {
        match self {
            Program::Identitymgr
            | Program::Enrollmgr
            | Program::Heartbeatd
            | Program::Modulemgr
            | Program::Verifier
            | Program::Mountmgr
            | Program::Eventd
            | Program::Execd
            | Program::Netmgr => true,
            // wgdevice is started and supervised by netmgr, not by a unit or device-steps.sh.
            Program::Ipcmonitor | Program::Wgdevice | Program::Cli => false,
        }
    }
}

/// Every program that has a name of its own. Agents are added here as they arrive.
const PROGRAMS: &[(&str, Program)] = &[
    ("ipcmonitor", Program::Ipcmonitor),
    ("identitymgr", Program::Identitymgr),
    ("enrollmgr", Program::Enrollmgr),
    ("heartbeatd", Program::Heartbeatd),
    ("modulemgr", Program::Modulemgr),
    ("verifier", Program::Verifier),
    ("mountmgr", Program::Mountmgr),
    ("eventd", Program::Eventd),
    ("execd", Program::Execd),
    ("netmgr", Program::Netmgr),
    ("wgdevice", Program::Wgdevice),
];

/// The program for `argv[0]`: its basename looked up in the table, else the CLI.
pub fn for_argv0(argv0: &OsStr) -> Program {
    Path::new(argv0)
        .file_name()
        .and_then(OsStr::to_str)
        .and_then(by_name)
        .unwrap_or(Program::Cli)
}

/// The program called `name`, for `run <name>`.
pub fn by_name(name: &str) -> Option<Program> {
    PROGRAMS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, program)| *program)
}

/// The names `run` accepts.
pub fn names() -> Vec<&'static str> {
    PROGRAMS.iter().map(|(name, _)| *name).collect()
}

/// The names of the agents among them, in table order, for `agents`.
pub fn agents() -> Vec<&'static str> {
    PROGRAMS
        .iter()
        .filter(|(_, program)| program.is_agent())
        .map(|(name, _)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv0_table() {
        let cases: &[(&str, Program)] = &[
            ("ipcmonitor", Program::Ipcmonitor),
            ("/usr/bin/ipcmonitor", Program::Ipcmonitor),
            ("./ipcmonitor", Program::Ipcmonitor),
            ("../libexec/powernode/ipcmonitor", Program::Ipcmonitor),
            ("identitymgr", Program::Identitymgr),
            ("/usr/libexec/powernode/identitymgr", Program::Identitymgr),
            ("enrollmgr", Program::Enrollmgr),
            ("/usr/bin/heartbeatd", Program::Heartbeatd),
            ("modulemgr", Program::Modulemgr),
            ("/usr/libexec/powernode/verifier", Program::Verifier),
            ("mountmgr", Program::Mountmgr),
            ("/usr/bin/netmgr", Program::Netmgr),
            ("wgdevice", Program::Wgdevice),
            ("identitymgr.service", Program::Cli),
            ("powernode-agent", Program::Cli),
            ("/usr/bin/powernode-agent", Program::Cli),
            ("/opt/ipcmonitor/powernode-agent", Program::Cli),
            ("ipcmonitor.old", Program::Cli),
            ("IPCMONITOR", Program::Cli),
            ("nosuch", Program::Cli),
            ("", Program::Cli),
            ("/", Program::Cli),
        ];
        for (argv0, want) in cases {
            assert_eq!(for_argv0(OsStr::new(argv0)), *want, "argv0 = {argv0:?}");
        }
    }

    #[test]
    fn run_names() {
        assert_eq!(by_name("ipcmonitor"), Some(Program::Ipcmonitor));
        assert_eq!(by_name("identitymgr"), Some(Program::Identitymgr));
        assert_eq!(by_name("enrollmgr"), Some(Program::Enrollmgr));
        assert_eq!(by_name("heartbeatd"), Some(Program::Heartbeatd));
        assert_eq!(by_name("modulemgr"), Some(Program::Modulemgr));
        assert_eq!(by_name("verifier"), Some(Program::Verifier));
        assert_eq!(by_name("mountmgr"), Some(Program::Mountmgr));
        assert_eq!(by_name("powernode-agent"), None, "the CLI has no run name");
        assert_eq!(
            by_name("/usr/bin/ipcmonitor"),
            None,
            "run takes names, not paths"
        );
        assert_eq!(by_name(""), None);
        assert_eq!(
            names(),
            [
                "ipcmonitor",
                "identitymgr",
                "enrollmgr",
                "heartbeatd",
                "modulemgr",
                "verifier",
                "mountmgr",
                "eventd",
                "execd",
                "netmgr",
                "wgdevice"
            ]
        );
        for name in names() {
            assert!(by_name(name).is_some());
            assert_ne!(by_name(name), Some(Program::Cli));
        }
    }

    #[test]
    fn agents_are_the_programs_that_are_not_tools() {
        assert_eq!(
            agents(),
            [
                "identitymgr",
                "enrollmgr",
                "heartbeatd",
                "modulemgr",
                "verifier",
                "mountmgr",
                "eventd",
                "execd",
                "netmgr"
            ]
        );
        assert!(!Program::Ipcmonitor.is_agent());
        assert!(!Program::Wgdevice.is_agent());
        assert!(!Program::Cli.is_agent());
        for name in agents() {
            assert!(names().contains(&name), "{name} is not a run name");
        }
    }
}
