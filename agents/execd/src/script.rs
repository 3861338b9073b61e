//! One NodeScript run: the arguments it takes, the process group it runs in, its output.
//!
//! The script is given in the arguments (`script`) or named by the SHA-256 of its text
//! (`script_digest`), in which case [`crate::fetch`] gets it from the controller first. The
//! interpreter must be one of `[exec] interpreters` (agentbase settings). The script is written to `<work>/<task id>.script` and run as `INTERPRETER FILE` in a
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
use powernode_modules::digest::Digest;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The task kind this agent runs.
pub const KIND: &str = "node.exec";
/// How long a script may run when its arguments say nothing (the controller's default lease).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest a script may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Output kept per task, bytes (the controller's default cap); the rest is counted.
pub const OUTPUT_MAX: usize = 64 * 1024;

/// `node.exec` arguments: exactly one of `script` and `script_digest`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// The script's text.
    #[serde(default)]
    pub script: Option<String>,
    /// `sha256:<64 hex>` of a script stored on the controller (`POST /api/v1/scripts`).
    #[serde(default)]
    pub script_digest: Option<String>,
    /// An absolute path from `[exec] interpreters`; the first of them when left out.
    #[serde(default)]
    pub interpreter: Option<String>,
    /// Seconds it may run (1 to a day); [`DEFAULT_TIMEOUT`] when left out.
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// Where a task's script comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Given in the arguments.
    Inline(String),
    /// Stored on the controller under this digest: fetched, and checked against it.
    Stored(Digest),
}

/// What a script is run with, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The script, or where to get it.
    pub source: Source,
    /// The interpreter, one of those allowed.
    pub interpreter: String,
    /// How long the task may take, fetching the script included.
    pub timeout: Duration,
}

impl Plan {
    /// Checks a task's arguments (JSON text) against the `allowed` interpreters (the first
    /// is the default): a clear reason when they do not do.
    pub fn from_args(args_json: &str, allowed: &[String]) -> Result<Plan, String> {
        let args: ExecArgs = serde_json::from_str(args_json).map_err(|e| {
            format!(
                "node.exec arguments: {e} (expected {{\"script\": \"...\" or \"script_digest\": \
                 \"sha256:<64 hex>\", \"interpreter\"?, \"timeout_s\"?}})"
            )
        })?;
        let source = match (args.script, args.script_digest) {
            (Some(text), None) => Source::Inline(text),
            (None, Some(digest)) => Source::Stored(
                Digest::parse(&digest).map_err(|e| format!("node.exec script_digest: {e}"))?,
            ),
            (Some(_), Some(_)) => {
                return Err(
                    "node.exec arguments name both `script` and `script_digest`: \
                            give the text or the digest of a stored script, not both"
                        .to_owned(),
                )
            }
            (None, None) => {
                return Err("node.exec arguments need `script` (the text) or \
                            `script_digest` (sha256:<64 hex> of a script stored on the \
                            controller)"
                    .to_owned())
            }
        };
        let listed = || {
            if allowed.is_empty() {
                "none".to_owned()
            } else {
                allowed.join(", ")
            }
        };
        let interpreter = match args.interpreter {
            None => allowed.first().cloned().ok_or_else(|| {
                "no interpreter is allowed on this node ([exec] interpreters)".to_owned()
            })?,
            Some(asked) if allowed.contains(&asked) => asked,
            Some(asked) => {
                return Err(format!(
                    "interpreter {asked:?} is not allowed (allowed: {}; [exec] interpreters)",
                    listed()
                ))
            }
        };
        let timeout = match args.timeout_s {
            None => DEFAULT_TIMEOUT,
            Some(s) if (1..=MAX_TIMEOUT.as_secs()).contains(&s) => Duration::from_secs(s),
            Some(_) => return Err(format!("timeout_s must be 1 to {}", MAX_TIMEOUT.as_secs())),
        };
        Ok(Plan {
            source,
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

    /// The task's id (the files' stem).
    pub fn task_id(&self) -> String {
        self.script
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
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

/// Runs `script` under `plan`'s interpreter until it ends, `deadline` (the task's timeout
/// from when it started) passes or `cancel` fires.
pub async fn run(
    plan: &Plan,
    script: &str,
    files: &Files,
    cancel: &mut oneshot::Receiver<()>,
    deadline: Instant,
) -> std::io::Result<Finished> {
    std::fs::write(&files.script, script)?;
    // Close-on-exec, so a script started at the same moment does not inherit this one's
    // pipe and hold it open (the child gets its own copies as stdout and stderr).
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let write2 = write.try_clone()?;
    let launch = crate::scope::Launch::for_task(&files.task_id());
    let mut child = launch
        .command(&plan.interpreter, &files.script)
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
        () = tokio::time::sleep_until(deadline) => Ending::TimedOut(plan.timeout),
        _ = cancel => Ending::Cancelled,
    };
    // Whatever the script started goes with it, whichever way it ended: its group, and
    // under systemd its scope (processes that left the group).
    kill_group(pid);
    launch.kill_rest().await;
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

    /// The default `[exec] interpreters`.
    fn allowed() -> Vec<String> {
        agentbase::settings::ExecSettings::default().interpreters
    }

    #[test]
    fn arguments_are_checked() {
        let plan = Plan::from_args(r#"{"script": "echo hi"}"#, &allowed()).unwrap();
        assert_eq!(plan.source, Source::Inline("echo hi".to_owned()));
        assert_eq!(plan.interpreter, "/bin/sh");
        assert_eq!(plan.timeout, DEFAULT_TIMEOUT);
        let plan = Plan::from_args(
            r#"{"script": "print(1)", "interpreter": "/usr/bin/python3", "timeout_s": 5}"#,
            &allowed(),
        )
        .unwrap();
        assert_eq!(plan.interpreter, "/usr/bin/python3");
        assert_eq!(plan.timeout, Duration::from_secs(5));
        let digest = format!("sha256:{}", "ab".repeat(32));
        let plan =
            Plan::from_args(&format!(r#"{{"script_digest": "{digest}"}}"#), &allowed()).unwrap();
        assert_eq!(plan.source, Source::Stored(Digest::parse(&digest).unwrap()));
        for (bad, why) in [
            (r#"{}"#.to_owned(), "need `script`"),
            (r#"{"interpreter": "/bin/sh"}"#.to_owned(), "need `script`"),
            (
                format!(r#"{{"script": "x", "script_digest": "{digest}"}}"#),
                "both",
            ),
            (
                r#"{"script_digest": "sha256:abc"}"#.to_owned(),
                "not a sha256 digest",
            ),
            (
                format!(r#"{{"script_digest": "{}"}}"#, digest.to_uppercase()),
                "not a sha256 digest",
            ),
            (r#"{"script_digest": 7}"#.to_owned(), "invalid type"),
            (
                r#"{"script": "x", "interpreter": "/usr/bin/perl"}"#.to_owned(),
                "not allowed",
            ),
            (
                r#"{"script": "x", "interpreter": "sh"}"#.to_owned(),
                "not allowed",
            ),
            (r#"{"script": "x", "timeout_s": 0}"#.to_owned(), "timeout_s"),
            (r#"{"script": "x", "other": 1}"#.to_owned(), "unknown field"),
            (r#"not json"#.to_owned(), "expected"),
        ] {
            let reason = Plan::from_args(&bad, &allowed()).unwrap_err();
            assert!(reason.contains(why), "{bad}: {reason}");
        }
    }

    #[test]
    fn the_interpreters_come_from_the_setting() {
        let allowed = vec!["/usr/bin/python3".to_owned(), "/bin/dash".to_owned()];
        let plan = Plan::from_args(r#"{"script": "x"}"#, &allowed).unwrap();
        assert_eq!(
            plan.interpreter, "/usr/bin/python3",
            "the first is the default"
        );
        let plan =
            Plan::from_args(r#"{"script": "x", "interpreter": "/bin/dash"}"#, &allowed).unwrap();
        assert_eq!(plan.interpreter, "/bin/dash");
        let refused =
            Plan::from_args(r#"{"script": "x", "interpreter": "/bin/sh"}"#, &allowed).unwrap_err();
        assert!(
            refused.contains(r#""/bin/sh" is not allowed (allowed: /usr/bin/python3, /bin/dash"#),
            "{refused}"
        );
        let none = Plan::from_args(r#"{"script": "x"}"#, &[]).unwrap_err();
        assert!(none.contains("no interpreter is allowed"), "{none}");
    }

    fn plan(timeout_ms: u64) -> Plan {
        Plan {
            source: Source::Inline(String::new()),
            interpreter: "/bin/sh".to_owned(),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    /// Runs `script` under `/bin/sh` with `timeout_ms` from now, until `cancel` fires.
    async fn run_sh(
        script: &str,
        timeout_ms: u64,
        files: &Files,
        mut cancel: oneshot::Receiver<()>,
    ) -> std::io::Result<Finished> {
        let plan = plan(timeout_ms);
        let deadline = Instant::now() + plan.timeout;
        run(&plan, script, files, &mut cancel, deadline).await
    }

    #[tokio::test]
    async fn exit_status_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::of(dir.path(), "t1");
        let (_keep, cancel) = tokio::sync::oneshot::channel();
        let done = run_sh("echo out; echo err >&2; exit 3", 10_000, &files, cancel)
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
        let done = run_sh(&script, 2_000, &files, cancel).await.unwrap();
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
        let done = run_sh(&script, 10_000, &files, cancel).await.unwrap();
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
        let done = run_sh(&script, 10_000, &files, cancel).await.unwrap();
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
            async move { run_sh("echo started; sleep 60", 60_000, &files, cancel).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel_tx.send(()).unwrap();
        let done = run.await.unwrap().unwrap();
        assert_eq!(done.ending, Ending::Cancelled);
        assert!(done.output.starts_with("started"), "{done:?}");
    }
}
