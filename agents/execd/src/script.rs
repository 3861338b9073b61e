//! One NodeScript run: the arguments it takes, the process group it runs in, its output.
//!
//! The script is written to `<work>/<task id>.script` and run as `INTERPRETER FILE` in a
//! process group of its own, stdout and stderr into one pipe. A reader copies the pipe into
//! `<work>/<task id>.out` up to [`OUTPUT_MAX`] bytes and counts the rest, so the output so far
//! is on disk if the agent dies. When the script's own process ends (or its time is up, or the
//! task is cancelled) the whole group is killed: nothing it started outlives the task. The
//! group's id and start time are kept in `<work>/<task id>.pgid` while it runs, so a restarted
//! agent can kill what a killed one left behind.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The task kind this agent runs.
pub const KIND: &str = "node.exec";
/// Interpreters a script may name; the first is used when it names none.
pub const INTERPRETERS: &[&str] = &["/bin/sh", "/bin/bash", "/usr/bin/python3"];
/// How long a script may run when its arguments say nothing (the controller's default lease).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest a script may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Output kept per task, bytes (the controller's default cap); the rest is counted.
pub const OUTPUT_MAX: usize = 64 * 1024;

/// `node.exec` arguments.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// The script's text.
    pub script: String,
    /// An absolute path from [`INTERPRETERS`]; the first when left out.
    #[serde(default)]
    pub interpreter: Option<String>,
    /// Seconds it may run (1 to a day); [`DEFAULT_TIMEOUT`] when left out.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// What a script is run with, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The script's text.
    pub script: String,
    /// The interpreter, one of [`INTERPRETERS`].
    pub interpreter: &'static str,
    /// How long it may run.
    pub timeout: Duration,
}

impl Plan {
    /// Checks a task's arguments (JSON text): a clear reason when they do not do.
    pub fn from_args(args_json: &str) -> Result<Plan, String> {
        let args: ExecArgs = serde_json::from_str(args_json)
            .map_err(|e| format!("node.exec arguments: {e} (expected {{\"script\": \"...\", \"interpreter\"?, \"timeout_s\"?}})"))?;
        let interpreter = match args.interpreter.as_deref() {
            None => INTERPRETERS[0],
            Some(asked) => INTERPRETERS
                .iter()
                .copied()
                .find(|i| *i == asked)
                .ok_or_else(|| {
                    format!(
                        "interpreter {asked:?} is not allowed (allowed: {})",
                        INTERPRETERS.join(", ")
                    )
                })?,
        };
        let timeout = match args.timeout_s {
            None => DEFAULT_TIMEOUT,
            Some(s) if (1..=MAX_TIMEOUT.as_secs()).contains(&s) => Duration::from_secs(s),
            Some(_) => return Err(format!("timeout_s must be 1 to {}", MAX_TIMEOUT.as_secs())),
        };
        Ok(Plan {
            script: args.script,
            interpreter,
            timeout,
        })
    }
}

/// The files of one task under the agent's work directory.
#[derive(Debug, Clone)]
pub struct Files {
    /// The script as run.
    pub script: PathBuf,
    /// The output so far (capped).
    pub output: PathBuf,
    /// `PGID STARTTIME` while the group runs.
    pub pgid: PathBuf,
}

impl Files {
    /// The files of task `id` in `work`.
    pub fn of(work: &Path, id: &str) -> Files {
        Files {
            script: work.join(format!("{id}.script")),
            output: work.join(format!("{id}.out")),
            pgid: work.join(format!("{id}.pgid")),
        }
    }

    /// Removes them (what is already gone is no error).
    pub fn remove(&self) {
        for path in [&self.script, &self.output, &self.pgid] {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The output written so far as text, at most [`OUTPUT_MAX`] bytes of it: bytes that are
    /// not UTF-8 become U+FFFD (three bytes each), so the text is cut again after converting,
    /// or a script printing binary would make a status too large to publish.
    pub fn output_so_far(&self) -> String {
        let bytes = std::fs::read(&self.output).unwrap_or_default();
        let kept = &bytes[..bytes.len().min(OUTPUT_MAX)];
        let mut text = String::from_utf8_lossy(kept).into_owned();
        if text.len() > OUTPUT_MAX {
            let mut end = OUTPUT_MAX;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The script exited with this code.
    Exited(i32),
    /// The script died of this signal.
    Signalled(i32),
    /// Its time was up; the group was killed.
    TimedOut(Duration),
    /// The task was cancelled; the group was killed.
    Cancelled,
}

/// A finished run: how it ended and what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// How it ended.
    pub ending: Ending,
    /// The output kept ([`OUTPUT_MAX`] bytes at most) and, when there was more, a line
    /// saying how much was left out.
    pub output: String,
}

impl Finished {
    /// Whether the task succeeded (exit code 0).
    pub fn succeeded(&self) -> bool {
        self.ending == Ending::Exited(0)
    }

    /// The output with a last line saying how it ended (unless it exited 0).
    pub fn report(&self) -> String {
        let last = match &self.ending {
            Ending::Exited(0) => return self.output.clone(),
            Ending::Exited(code) => format!("[exit status {code}]"),
            Ending::Signalled(sig) => format!("[killed by signal {sig}]"),
            Ending::TimedOut(after) => format!(
                "[timed out after {} s; the script and everything it started were killed]",
                after.as_secs()
            ),
            Ending::Cancelled => {
                "[cancelled; the script and everything it started were killed]".to_owned()
            }
        };
        let mut text = self.output.clone();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&last);
        text
    }
}

/// Runs `plan` for task `id` until it ends, its time is up or `cancel` fires.
pub async fn run(
    plan: &Plan,
    files: &Files,
    cancel: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<Finished> {
    std::fs::write(&files.script, &plan.script)?;
    // Close-on-exec, so a script started at the same moment does not inherit this one's
    // pipe and hold it open (the child gets its own copies as stdout and stderr).
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let write2 = write.try_clone()?;
    let mut child = tokio::process::Command::new(plan.interpreter)
        .arg(&files.script)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2))
        .process_group(0)
        .kill_on_drop(false)
        .spawn()?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    // Without this file a restarted agent cannot kill what a killed one left running; the
    // script runs all the same (and is killed as usual when it ends here).
    if let Some(start) = start_time(pid) {
        if let Err(e) = std::fs::write(&files.pgid, format!("{pid} {start}\n")) {
            tracing::warn!(pgid = pid, error = %e, "could not record the script's process group");
        }
    }
    let reader = tokio::spawn(copy_capped(read, files.output.clone()));
    let ending = tokio::select! {
        status = child.wait() => {
            let status = status?;
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => Ending::Exited(code),
                (None, Some(sig)) => Ending::Signalled(sig),
                (None, None) => Ending::Exited(-1),
            }
        }
        () = tokio::time::sleep(plan.timeout) => Ending::TimedOut(plan.timeout),
        _ = cancel => Ending::Cancelled,
    };
    // Whatever the script started goes with it, whichever way it ended.
    kill_group(pid);
    let _ = child.wait().await;
    // The pipe closes once every process holding it is gone; don't wait on a stuck one.
    let dropped = match tokio::time::timeout(Duration::from_secs(2), reader).await {
        Ok(Ok(Ok(dropped))) => dropped,
        _ => 0,
    };
    let _ = std::fs::remove_file(&files.pgid);
    let mut output = files.output_so_far();
    if dropped > 0 {
        if !output.ends_with('\n') {
            output.push('\n');
        }
        output.push_str(&format!("[output truncated: {dropped} bytes more]"));
    }
    Ok(Finished { ending, output })
}

/// Copies the pipe into `path` up to [`OUTPUT_MAX`] bytes; the number of bytes left out.
async fn copy_capped(read: OwnedFd, path: PathBuf) -> std::io::Result<u64> {
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    let mut file = tokio::fs::File::create(&path).await?;
    let mut kept = 0usize;
    let mut dropped = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = pipe.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let room = OUTPUT_MAX - kept;
        let take = n.min(room);
        if take > 0 {
            file.write_all(&buf[..take]).await?;
            kept += take;
        }
        dropped += (n - take) as u64;
    }
    file.flush().await?;
    Ok(dropped)
}

/// Kills process group `pgid` (SIGKILL); a group already gone is no error.
pub fn kill_group(pgid: i32) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, clock ticks since boot):
/// with the pid, it names one process even after the pid is reused.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // After the command: state is field 3; starttime is field 22, index 19 here.
    rest.split(' ').nth(19)?.parse().ok()
}

/// Kills the group a killed agent left behind, if the pgid file names one that still runs.
pub fn kill_leftover(files: &Files) {
    let Ok(text) = std::fs::read_to_string(&files.pgid) else {
        return;
    };
    let mut parts = text.split_whitespace();
    let (Some(pid), Some(start)) = (
        parts.next().and_then(|p| p.parse::<i32>().ok()),
        parts.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return;
    };
    // The leader may be gone while its children run on: the group is still killed, unless
    // the pid now names another process.
    match start_time(pid) {
        Some(now) if now != start => {}
        _ => kill_group(pid),
    }
    let _ = std::fs::remove_file(&files.pgid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked() {
        let plan = Plan::from_args(r#"{"script": "echo hi"}"#).unwrap();
        assert_eq!(plan.interpreter, "/bin/sh");
        assert_eq!(plan.timeout, DEFAULT_TIMEOUT);
        let plan = Plan::from_args(
            r#"{"script": "print(1)", "interpreter": "/usr/bin/python3", "timeout_s": 5}"#,
        )
        .unwrap();
        assert_eq!(plan.interpreter, "/usr/bin/python3");
        assert_eq!(plan.timeout, Duration::from_secs(5));
        for bad in [
            r#"{}"#,
            r#"{"script": "x", "interpreter": "/usr/bin/perl"}"#,
            r#"{"script": "x", "interpreter": "sh"}"#,
            r#"{"script": "x", "timeout_s": 0}"#,
            r#"{"script": "x", "other": 1}"#,
            r#"not json"#,
        ] {
            assert!(Plan::from_args(bad).is_err(), "{bad}");
        }
        let refused = Plan::from_args(r#"{"script": "x", "interpreter": "/usr/bin/perl"}"#);
        assert!(refused.unwrap_err().contains("not allowed"));
    }

    fn plan(script: &str, timeout_ms: u64) -> Plan {
        Plan {
            script: script.to_owned(),
            interpreter: "/bin/sh",
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[tokio::test]
    async fn exit_status_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::of(dir.path(), "t1");
        let (_keep, cancel) = tokio::sync::oneshot::channel();
        let done = run(
            &plan("echo out; echo err >&2; exit 3", 10_000),
            &files,
            cancel,
        )
        .await
        .unwrap();
        assert_eq!(done.ending, Ending::Exited(3));
        assert!(
            done.output.contains("out\n") && done.output.contains("err\n"),
            "{done:?}"
        );
        assert!(done.report().ends_with("[exit status 3]"));
        assert!(!files.pgid.exists());
    }

    #[tokio::test]
    async fn a_timeout_kills_the_script_and_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::of(dir.path(), "t2");
        let marker = dir.path().join("child.pid");
        let script = format!("sleep 60 & echo $! > {}; sleep 60", marker.display());
        let (_keep, cancel) = tokio::sync::oneshot::channel();
        let done = run(&plan(&script, 2_000), &files, cancel).await.unwrap();
        assert!(matches!(done.ending, Ending::TimedOut(_)), "{done:?}");
        let child: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background child was in the group: gone (or a zombie about to be reaped by init).
        let alive = std::fs::read_to_string(format!("/proc/{child}/stat"))
            .is_ok_and(|s| !s.contains(") Z "));
        assert!(!alive, "the script's child {child} outlived the timeout");
    }

    #[tokio::test]
    async fn binary_output_stays_within_the_cap_as_text() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::of(dir.path(), "t5");
        let (_keep, cancel) = tokio::sync::oneshot::channel();
        let script = format!("head -c {} /dev/zero | tr '\\0' '\\377'", OUTPUT_MAX + 10);
        let done = run(&plan(&script, 10_000), &files, cancel).await.unwrap();
        assert!(done.succeeded(), "{done:?}");
        assert!(
            done.output.len() <= OUTPUT_MAX + 100,
            "{}",
            done.output.len()
        );
        assert!(done.output.contains('\u{fffd}'));
    }

    #[tokio::test]
    async fn output_is_capped_and_the_rest_counted() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::of(dir.path(), "t3");
        let (_keep, cancel) = tokio::sync::oneshot::channel();
        let script = format!("head -c {} /dev/zero | tr '\\0' x", OUTPUT_MAX + 1000);
        let done = run(&plan(&script, 10_000), &files, cancel).await.unwrap();
        assert!(done.succeeded(), "{done:?}");
        assert!(done.output.ends_with("[output truncated: 1000 bytes more]"));
        assert!(done.output.len() < OUTPUT_MAX + 100);
    }

    #[tokio::test]
    async fn a_cancel_kills_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::of(dir.path(), "t4");
        let (cancel_tx, cancel) = tokio::sync::oneshot::channel();
        let run = tokio::spawn({
            let files = files.clone();
            async move { super::run(&plan("echo started; sleep 60", 60_000), &files, cancel).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel_tx.send(()).unwrap();
        let done = run.await.unwrap().unwrap();
        assert_eq!(done.ending, Ending::Cancelled);
        assert!(done.output.starts_with("started"), "{done:?}");
    }
}
