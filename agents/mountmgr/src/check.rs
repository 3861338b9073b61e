//! Module health checks, run in a new stack before it is switched to.
//!
//! The command runs with the new stack's `merged/` as working directory and in
//! `POWERNODE_STACK`, stdin and stdout closed, stderr captured (its tail goes into the failure
//! reason). It runs in its own process group, killed whole when the timeout passes or the agent
//! shuts down, and it receives SIGKILL if the agent dies (`PR_SET_PDEATHSIG`), so a check never
//! outlives the agent and never keeps a half-built slot busy.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use powernode_types::HealthCheck;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// The environment variable naming the new stack's root.
pub const STACK_ENV: &str = "POWERNODE_STACK";
/// How much of the end of stderr a failure reason quotes.
pub const STDERR_TAIL: usize = 512;
/// Where a bare program name is looked up in the stack, before the agent's own `PATH`.
pub const STACK_PATH: &[&str] = &["bin", "usr/bin", "sbin", "usr/sbin", "usr/local/bin"];

/// Why a health check did not pass.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// The check has no command.
    #[error("health check of {layer} has an empty command")]
    Empty {
        /// The layer.
        layer: String,
    },
    /// The command could not be started.
    #[error("health check of {layer}: starting {}: {error}", .program.display())]
    Spawn {
        /// The layer.
        layer: String,
        /// The program.
        program: PathBuf,
        /// The error.
        error: String,
    },
    /// The command ended unsuccessfully.
    #[error("health check of {layer} {how}{}", tail_suffix(.stderr))]
    Failed {
        /// The layer.
        layer: String,
        /// `exited with status 3`, `was killed by signal 9`.
        how: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The command did not finish in time (it was killed).
    #[error("health check of {layer} did not finish within {timeout_s} s{}", tail_suffix(.stderr))]
    TimedOut {
        /// The layer.
        layer: String,
        /// The timeout.
        timeout_s: u32,
        /// The end of its stderr so far.
        stderr: String,
    },
    /// The agent is shutting down; the check was killed.
    #[error("health check of {layer} abandoned: shutting down")]
    Cancelled {
        /// The layer.
        layer: String,
    },
}

fn tail_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// The program to run for `program` in the stack at `stack`: an absolute path as is; a
/// relative path with a `/` inside the stack; a bare name from the stack's usual `bin`
/// directories if it is there, else as given (the agent's `PATH` resolves it).
pub fn resolve_program(program: &str, stack: &Path) -> PathBuf {
    let path = Path::new(program);
    if path.is_absolute() {
        return path.to_owned();
    }
    if program.contains('/') {
        return stack.join(path);
    }
    STACK_PATH
        .iter()
        .map(|dir| stack.join(dir).join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| path.to_owned())
}

/// Runs `check` of `layer` in the stack mounted at `stack`. A timeout of 0 is taken as 1 s.
pub async fn run(
    layer: &str,
    check: &HealthCheck,
    stack: &Path,
    shutdown: &CancellationToken,
) -> Result<(), CheckError> {
    let Some((program, args)) = check.command.split_first() else {
        return Err(CheckError::Empty {
            layer: layer.to_owned(),
        });
    };
    let program = resolve_program(program, stack);
    let timeout_s = check.timeout_s.max(1);
    let mut command = tokio::process::Command::new(&program);
    command
        .args(args)
        .current_dir(stack)
        .env(STACK_ENV, stack)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs in the child between fork and exec and only makes the prctl
    // system call, which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let mut child = command.spawn().map_err(|e| CheckError::Spawn {
        layer: layer.to_owned(),
        program: program.clone(),
        error: e.to_string(),
    })?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let stderr = child.stderr.take();
    let reader = tokio::spawn(async move {
        let mut tail = Vec::new();
        if let Some(mut stderr) = stderr {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                // Keep a bounded tail: a chatty check must not grow the agent's memory.
                if tail.len() > 4 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
        }
        tail
    });
    let kill_group = || {
        if let Some(pid) = group {
            // The whole group: a shell's children too. It may be gone already.
            let _ = killpg(pid, Signal::SIGKILL);
        }
    };
    enum End {
        Exited(std::io::Result<ExitStatus>),
        TimedOut,
        Cancelled,
    }
    let end = tokio::select! {
        status = child.wait() => End::Exited(status),
        _ = tokio::time::sleep(Duration::from_secs(timeout_s.into())) => End::TimedOut,
        _ = shutdown.cancelled() => End::Cancelled,
    };
    if !matches!(end, End::Exited(Ok(_))) {
        kill_group();
        let _ = child.wait().await;
    } else {
        // The command is done; a background process it left in its group is not, and would
        // keep the slot busy. A group id is not reused while any member lives, so this reaches
        // only the check's leftovers (or nobody).
        kill_group();
    }
    // The pipe closes once every holder in the group is dead; do not wait on a stray holder
    // that escaped the group.
    let tail = tokio::time::timeout(Duration::from_secs(1), reader)
        .await
        .ok()
        .and_then(Result::ok)
        .map(|bytes| stderr_tail(&bytes))
        .unwrap_or_default();
    let layer = layer.to_owned();
    match end {
        End::Exited(Ok(status)) if status.success() => Ok(()),
        End::Exited(Ok(status)) => Err(CheckError::Failed {
            layer,
            how: describe(status),
            stderr: tail,
        }),
        End::Exited(Err(e)) => Err(CheckError::Spawn {
            layer,
            program,
            error: format!("waiting: {e}"),
        }),
        End::TimedOut => Err(CheckError::TimedOut {
            layer,
            timeout_s,
            stderr: tail,
        }),
        End::Cancelled => Err(CheckError::Cancelled { layer }),
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// The last [`STDERR_TAIL`] bytes of `bytes` as trimmed, single-spaced text.
fn stderr_tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL);
    let text = String::from_utf8_lossy(&bytes[start..]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(command: &[&str], timeout_s: u32) -> HealthCheck {
        HealthCheck {
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            timeout_s,
        }
    }

    #[tokio::test]
    async fn outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let stack = dir.path();
        let token = CancellationToken::new();
        std::fs::write(stack.join("marker"), b"").unwrap();

        let ok = check(
            &[
                "/bin/sh",
                "-c",
                "test -e marker && test \"$POWERNODE_STACK\" = \"$PWD\"",
            ],
            5,
        );
        assert_eq!(run("tools", &ok, stack, &token).await, Ok(()));

        let fail = check(
            &[
                "/bin/sh",
                "-c",
                "echo first >&2; echo broken  pipe >&2; exit 3",
            ],
            5,
        );
        let err = run("tools", &fail, stack, &token).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "health check of tools exited with status 3: first broken pipe"
        );

        let slow = check(&["/bin/sh", "-c", "sleep 30"], 1);
        let started = std::time::Instant::now();
        let err = run("tools", &slow, stack, &token).await.unwrap_err();
        assert!(
            matches!(err, CheckError::TimedOut { timeout_s: 1, .. }),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));

        let missing = check(&["/nonexistent/check"], 5);
        let err = run("tools", &missing, stack, &token).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with("health check of tools: starting /nonexistent/check"),
            "{err}"
        );

        let empty = check(&[], 5);
        assert!(matches!(
            run("tools", &empty, stack, &token).await,
            Err(CheckError::Empty { .. })
        ));
    }

    #[tokio::test]
    async fn shutdown_kills_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let token = CancellationToken::new();
        let slow = check(&["/bin/sh", "-c", "sleep 30"], 60);
        let cancel = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        });
        let err = run("tools", &slow, dir.path(), &token).await.unwrap_err();
        assert_eq!(
            err,
            CheckError::Cancelled {
                layer: "tools".into()
            }
        );
    }

    #[test]
    fn program_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let stack = dir.path();
        std::fs::create_dir_all(stack.join("usr/bin")).unwrap();
        std::fs::write(stack.join("usr/bin/probe"), b"").unwrap();
        assert_eq!(resolve_program("/bin/sh", stack), PathBuf::from("/bin/sh"));
        assert_eq!(resolve_program("probe", stack), stack.join("usr/bin/probe"));
        assert_eq!(resolve_program("./x/y", stack), stack.join("./x/y"));
        assert_eq!(resolve_program("sh", stack), PathBuf::from("sh"));
    }

    #[test]
    fn tails_are_bounded() {
        let long = "x".repeat(2000);
        assert_eq!(stderr_tail(long.as_bytes()).len(), STDERR_TAIL);
        assert_eq!(stderr_tail(b"  a\n\nb  "), "a b");
    }
}
