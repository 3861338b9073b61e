//! Helpers shared by the integration tests: `pubsub-peer` children that are always killed, their
//! output read as a log, and deadlines that fail a test instead of hanging it.
//!
//! Nothing here asserts on time: every timeout is a deadline after which the test fails with
//! what it saw, set far above what the step needs.

// Each test file uses its own subset of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use powernode_pubsub::testing::TestItem;
use powernode_pubsub::{Dirs, Event, Subscription};
use powernode_types::Topic;

/// How long any single step may take before the test fails rather than hangs.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The `pubsub-peer` binary Cargo built for these tests.
pub fn peer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pubsub-peer"))
}

/// A fresh root directory for one test, removed when dropped.
pub struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    pub fn new() -> Self {
        Root {
            dir: tempfile::Builder::new()
                .prefix("pn-pubsub-")
                .tempdir()
                .expect("create temp root"),
        }
    }

    /// A root on tmpfs, as `/run` is on a node, when `/dev/shm` is tmpfs with room to spare;
    /// otherwise in the default temp directory. For tests whose speed must not depend on the
    /// disk's fsync (their deadlines stay far away either way).
    pub fn on_tmpfs() -> Self {
        use nix::sys::statfs::{statfs, TMPFS_MAGIC};
        let shm = Path::new("/dev/shm");
        // statfs field types differ between libcs and architectures.
        #[allow(clippy::unnecessary_cast)]
        let roomy = statfs(shm).is_ok_and(|s| {
            s.filesystem_type() == TMPFS_MAGIC
                && (s.blocks_available() as u64).saturating_mul(s.block_size() as u64) > 512 << 20
        });
        if !roomy {
            return Root::new();
        }
        Root {
            dir: tempfile::Builder::new()
                .prefix("pn-pubsub-")
                .tempdir_in(shm)
                .expect("create temp root in /dev/shm"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn dirs(&self) -> Dirs {
        Dirs::under_root(self.path())
    }

    /// The root as a `--root` argument.
    pub fn arg(&self) -> &str {
        self.path().to_str().expect("temp path is UTF-8")
    }
}

/// What a child printed so far, filled by reader threads.
#[derive(Default)]
struct Output {
    state: Mutex<OutputState>,
    changed: Condvar,
}

#[derive(Default)]
struct OutputState {
    lines: Vec<String>,
    stderr: String,
    stdout_closed: bool,
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test leaves
/// nothing behind. Its stdout is collected line by line.
pub struct Peer {
    name: String,
    child: Child,
    out: Arc<Output>,
}

impl Peer {
    /// Runs `pubsub-peer ARGS...`.
    pub fn spawn(args: &[&str]) -> Peer {
        let mut cmd = Command::new(peer_bin());
        cmd.args(args);
        Peer::spawn_command(args.join(" "), cmd)
    }

    /// Runs `pubsub-peer publish --root ROOT --agent AGENT --keys KEYS EXTRA...`.
    pub fn publisher(root: &Root, agent: &str, keys: u64, extra: &[&str]) -> Peer {
        Peer::with_agent("publish", root, agent, keys, extra)
    }

    /// Runs `pubsub-peer burst --root ROOT --agent AGENT --keys KEYS`.
    pub fn burst(root: &Root, agent: &str, keys: u64) -> Peer {
        Peer::with_agent("burst", root, agent, keys, &[])
    }

    /// Runs `pubsub-peer subscribe --root ROOT --agent AGENT EXTRA...`.
    pub fn subscriber(root: &Root, agent: &str, extra: &[&str]) -> Peer {
        let mut args = vec!["subscribe", "--root", root.arg(), "--agent", agent];
        args.extend_from_slice(extra);
        Peer::spawn(&args)
    }

    /// Runs `pubsub-peer COMMAND --root ROOT --agent AGENT --keys KEYS EXTRA...`.
    fn with_agent(command: &str, root: &Root, agent: &str, keys: u64, extra: &[&str]) -> Peer {
        let keys = keys.to_string();
        let mut args = vec![
            command,
            "--root",
            root.arg(),
            "--agent",
            agent,
            "--keys",
            &keys,
        ];
        args.extend_from_slice(extra);
        Peer::spawn(&args)
    }

    /// Runs a prepared command (for another binary path or another uid).
    pub fn spawn_command(name: String, mut cmd: Command) -> Peer {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn pubsub-peer {name}: {e}"));
        let out = Arc::new(Output::default());
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                o.state.lock().unwrap().lines.push(line);
                o.changed.notify_all();
            }
            o.state.lock().unwrap().stdout_closed = true;
            o.changed.notify_all();
        });
        let o = out.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            o.state.lock().unwrap().stderr = text;
        });
        Peer { name, child, out }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stdout line so far.
    pub fn lines(&self) -> Vec<String> {
        self.out.state.lock().unwrap().lines.clone()
    }

    /// Blocks until a line satisfying `pred` has been printed, and returns it.
    /// Not for async tests that run an in-process publication: use [`Peer::wait_line_async`].
    pub fn wait_line(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        let mut st = self.out.state.lock().unwrap();
        loop {
            if let Some(l) = st.lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            if st.stdout_closed || now >= deadline {
                let why = if st.stdout_closed {
                    "exited"
                } else {
                    "deadline passed"
                };
                drop(st);
                self.fail(why);
            }
            st = self.out.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// [`Peer::wait_line`] that lets the runtime run meanwhile.
    pub async fn wait_line_async(&self, pred: impl Fn(&str) -> bool) -> String {
        self.wait_line_async_within(DEADLINE, pred).await
    }

    /// [`Peer::wait_line_async`] with another deadline.
    pub async fn wait_line_async_within(
        &self,
        deadline: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + deadline;
        loop {
            {
                let st = self.out.state.lock().unwrap();
                if let Some(l) = st.lines.iter().find(|l| pred(l)) {
                    return l.clone();
                }
                if st.stdout_closed || Instant::now() >= deadline {
                    let why = if st.stdout_closed {
                        "exited"
                    } else {
                        "deadline passed"
                    };
                    drop(st);
                    self.fail(why);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the "published N generation G" line of a `publish` child.
    pub fn wait_published(&self) -> String {
        self.wait_line(|l| l.starts_with("published "))
    }

    pub async fn wait_published_async(&self) -> String {
        self.wait_line_async(|l| l.starts_with("published ")).await
    }

    /// Runs `pubsub-peer ARGS...` with the named crash points `failpoints` armed
    /// (`POWERNODE_FAILPOINTS`).
    pub fn spawn_armed(args: &[&str], failpoints: &str) -> Peer {
        let mut cmd = Command::new(peer_bin());
        cmd.args(args).env("POWERNODE_FAILPOINTS", failpoints);
        Peer::spawn_command(format!("{} [{failpoints}]", args.join(" ")), cmd)
    }

    /// What the process wrote to stderr, once it has closed it.
    pub fn stderr(&self) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let text = self.out.state.lock().unwrap().stderr.clone();
            if !text.is_empty() || Instant::now() >= deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit by itself, then for its output to be read to the end.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.wait_stdout_closed(deadline);
                return status;
            }
            if Instant::now() >= deadline {
                self.fail("did not exit");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// [`Peer::wait_exit`] that lets the runtime run meanwhile.
    pub async fn wait_exit_async(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.wait_stdout_closed(deadline);
                return status;
            }
            if Instant::now() >= deadline {
                self.fail("did not exit");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn wait_stdout_closed(&self, deadline: Instant) {
        let mut st = self.out.state.lock().unwrap();
        while !st.stdout_closed {
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                self.fail("stdout not closed after exit");
            }
            st = self.out.changed.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn fail(&self, why: &str) -> ! {
        let st = self.out.state.lock().unwrap();
        panic!(
            "pubsub-peer {} (pid {}): {why}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.child.id(),
            st.lines.join("\n"),
            st.stderr
        );
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The next event of `sub`, or a failure after [`DEADLINE`].
pub async fn next_event<T: Topic>(sub: &mut Subscription<T>) -> Event<T> {
    match tokio::time::timeout(DEADLINE, sub.next()).await {
        Ok(e) => e,
        Err(_) => panic!(
            "no event from {} within {DEADLINE:?}; holding {} items",
            T::NAME,
            sub.len()
        ),
    }
}

/// Reads events until `Synchronized`, within one [`DEADLINE`]; returns the events before it.
pub async fn until_synchronized<T: Topic>(sub: &mut Subscription<T>) -> Vec<Event<T>> {
    let mut seen = Vec::new();
    let collect = async {
        loop {
            match sub.next().await {
                Event::Synchronized => return,
                e => seen.push(e),
            }
        }
    };
    if tokio::time::timeout(DEADLINE, collect).await.is_err() {
        let disconnects = seen
            .iter()
            .filter(|e| matches!(e, Event::Disconnected))
            .count();
        panic!(
            "{} not synchronized within {DEADLINE:?}: {} events, {disconnects} of them \
             Disconnected; holding {} items",
            T::NAME,
            seen.len(),
            sub.len()
        );
    }
    seen
}

/// The item `pubsub-peer publish --size SIZE` publishes under `k{i}`, except for `sent_ns`.
pub fn peer_item_matches(item: &TestItem, i: u64, size: usize) -> bool {
    item.key == format!("k{i}") && item.seq == i && item.payload == vec![(i % 251) as u8; size]
}

/// A test item of our own.
pub fn test_item(key: &str, seq: u64, size: usize) -> TestItem {
    TestItem {
        key: key.to_owned(),
        seq,
        sent_ns: seq,
        payload: vec![(seq % 251) as u8; size],
    }
}

/// The checkpoint files (valid key names, no temp files, no quarantine) in `dir`, sorted.
pub fn checkpoint_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// `k0`, `k1`, ... `k{n-1}`.
pub fn keys(n: u64) -> Vec<String> {
    (0..n).map(|i| format!("k{i}")).collect()
}
