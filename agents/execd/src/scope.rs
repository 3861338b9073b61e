//! Where systemd is PID 1, a script runs in a transient scope unit of its own
//! (`systemd-run --scope`), `powernode-task-<id>.scope`: its processes are then the task's
//! even when they leave its process group (`setsid`, a daemon that double-forks), since a
//! scope is a cgroup, and killing the scope kills them all. The script still runs as execd's
//! child (systemd-run execs it in place once the scope exists), so its output, exit status
//! and process group are what they are without systemd.
//!
//! Elsewhere (no systemd, a container, tests) the process group alone bounds the task.

use std::path::Path;

/// Where systemd says it is the init system (sd_booted(3)).
const SYSTEMD_RUNTIME: &str = "/run/systemd/system";
/// The program that creates transient units.
const SYSTEMD_RUN: &str = "systemd-run";

/// How a script is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// Directly, in a process group of its own.
    Direct,
    /// Under `systemd-run --scope`, in the transient unit named here.
    Scope(String),
}

impl Launch {
    /// How to start the script of task `id` on this machine.
    pub fn for_task(id: &str) -> Launch {
        if Path::new(SYSTEMD_RUNTIME).is_dir() && systemd_run_installed() {
            Launch::Scope(unit_name(id))
        } else {
            Launch::Direct
        }
    }

    /// The command that runs `interpreter script` this way.
    pub fn command(&self, interpreter: &str, script: &Path) -> tokio::process::Command {
        let mut command = match self {
            Launch::Direct => tokio::process::Command::new(interpreter),
            Launch::Scope(unit) => {
                let mut c = tokio::process::Command::new(SYSTEMD_RUN);
                c.args(["--scope", "--quiet", "--collect", "--unit", unit, "--"])
                    .arg(interpreter);
                c
            }
        };
        command.arg(script);
        command
    }

    /// Kills what is left in the scope (processes that left the group); nothing to do for a
    /// direct launch. A scope already gone is no error.
    pub async fn kill_rest(&self) {
        let Launch::Scope(unit) = self else {
            return;
        };
        let result = tokio::process::Command::new("systemctl")
            .args(["kill", "--signal=SIGKILL", "--", unit])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
        if let Err(e) = result {
            tracing::warn!(%unit, error = %e, "could not kill what is left of the task's scope");
        }
    }
}

/// `powernode-task-<id>.scope`, with what a unit name may not hold escaped as systemd does
/// (`\xNN`), so every task id gives a valid, distinct name.
pub fn unit_name(id: &str) -> String {
    let mut name = String::from("powernode-task-");
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':') {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("\\x{b:02x}"));
        }
    }
    name.push_str(".scope");
    name
}

fn systemd_run_installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(SYSTEMD_RUN).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_are_valid_and_distinct() {
        assert_eq!(unit_name("task-2ba7f"), "powernode-task-task-2ba7f.scope");
        assert_eq!(
            unit_name("local-17/9 x"),
            "powernode-task-local-17\\x2f9\\x20x.scope"
        );
        assert_ne!(unit_name("a/b"), unit_name("a_b"));
    }

    #[test]
    fn a_scope_launch_runs_the_interpreter_under_systemd_run() {
        let script = Path::new("/run/powernode/execd/scripts/t.script");
        let scoped = Launch::Scope(unit_name("t")).command("/bin/sh", script);
        let std = scoped.as_std();
        assert_eq!(std.get_program(), "systemd-run");
        let args: Vec<_> = std.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--scope",
                "--quiet",
                "--collect",
                "--unit",
                "powernode-task-t.scope",
                "--",
                "/bin/sh",
                "/run/powernode/execd/scripts/t.script"
            ]
        );
        let direct = Launch::Direct.command("/bin/sh", script);
        assert_eq!(direct.as_std().get_program(), "/bin/sh");
        assert_eq!(direct.as_std().get_args().count(), 1);
    }

    #[test]
    fn without_systemd_as_init_scripts_run_directly() {
        // This machine (and CI) run without systemd as PID 1: the test documents that the
        // direct launch is what they exercise.
        if !Path::new(SYSTEMD_RUNTIME).is_dir() {
            assert_eq!(Launch::for_task("t"), Launch::Direct);
        }
    }
}
