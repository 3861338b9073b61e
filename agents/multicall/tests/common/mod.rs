//! A sandbox for running the built `powernode-agent` against real publishers: a temp root, a
//! tokio runtime in the test process that hosts `Publication`s, and children whose output is
//! read line by line with deadlines (and who are killed if a test gives up on them).

#![allow(dead_code)] // each test file uses its own part of this

pub mod agents;
pub mod enrolled;
pub mod netns;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use powernode_pubsub::{Dirs, Publication};
use powernode_types::{AgentState, AgentStatus, EnrollmentState, EnrollmentStatus, Topic};

/// How long any child gets to do what a test expects of it before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A temp root with publishers hosted by this process.
pub struct Sandbox {
    dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        // Short paths: a socket path must fit in 107 bytes.
        let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::os::unix::fs::symlink(bin(), dir.path().join("bin/ipcmonitor")).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Sandbox { dir, runtime }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Opens `<agent>/<T>` and publishes `items`.
    pub fn publish<T: Topic>(&self, agent: &str, items: &[T]) -> Publication<T> {
        let _in_runtime = self.runtime.enter();
        let publication = Publication::<T>::open(&Dirs::under_root(self.root()), agent).unwrap();
        for item in items {
            publication.publish(item).unwrap();
        }
        publication
    }

    /// `powernode-agent --root <root> args...`.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin());
        command.arg("--root").arg(self.root()).args(args);
        command.env_remove("POWERNODE_ROOT");
        command
    }

    /// `ipcmonitor --root <root> args...`, through a symlink named `ipcmonitor`.
    pub fn ipcmonitor(&self, args: &[&str]) -> Command {
        let mut command = Command::new(self.dir.path().join("bin/ipcmonitor"));
        command.arg("--root").arg(self.root()).args(args);
        command.env_remove("POWERNODE_ROOT");
        command
    }
}

/// The binary under test.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_powernode-agent"))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An `AgentStatus` of `agent` in `state`, started 90 s ago, looping now.
pub fn agent_status(agent: &str, state: AgentState) -> AgentStatus {
    AgentStatus {
        agent: agent.into(),
        pid: std::process::id(),
        version: "0.1.0".into(),
        started_at_ms: now_ms() - 90_000,
        last_loop_ms: now_ms(),
        state,
        last_error: None,
        quarantined_checkpoints: 0,
    }
}

/// An `EnrollmentStatus` of node `node-1` in `state`.
pub fn enrollment(state: EnrollmentState) -> EnrollmentStatus {
    EnrollmentStatus {
        state,
        node_id: Some("node-1".into()),
        cert_fingerprint: None,
        not_before_ms: None,
        not_after_ms: None,
        rotate_at_ms: None,
        controller_urls: Vec::new(),
        rotation_failing_since_ms: None,
        rotation_attempts: 0,
        last_error: None,
    }
}

/// What a finished child printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Fails the test, showing all the child printed, unless it exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) {
        assert_eq!(self.code(), Some(code), "{self:?}");
    }

    /// Fails the test, showing all the child printed, unless its stdout contains `part`.
    #[track_caller]
    pub fn assert_stdout_contains(&self, part: &str) {
        assert!(self.stdout.contains(part), "{self:?}");
    }

    /// Fails the test, showing all the child printed, unless its stderr contains `part`.
    #[track_caller]
    pub fn assert_stderr_contains(&self, part: &str) {
        assert!(self.stderr.contains(part), "{self:?}");
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `command` to completion; fails the test if it is still running after [`DEADLINE`].
pub fn run(command: &mut Command) -> Finished {
    Running::spawn(command).finish()
}

/// A child whose stdout and stderr are read line by line on threads. Killed when dropped.
pub struct Running {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
}

impl Running {
    pub fn spawn(command: &mut Command) -> Running {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
        }
    }

    /// The child's process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first stdout line, from now on, that `wanted` accepts; fails the test at the deadline.
    pub fn stdout_line(&self, wanted: impl Fn(&str) -> bool) -> String {
        wait_for_line(&self.stdout, "stdout", wanted)
    }

    /// The first stderr line, from now on, that `wanted` accepts; fails the test at the deadline.
    pub fn stderr_line(&self, wanted: impl Fn(&str) -> bool) -> String {
        wait_for_line(&self.stderr, "stderr", wanted)
    }

    /// Waits for the child to exit by itself and collects the rest of its output.
    pub fn finish(mut self) -> Finished {
        let until = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < until,
                "child still running after {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipes close with the child, so the reader threads finish.
        let collect = |rx: &Receiver<String>| -> String { rx.iter().map(|l| l + "\n").collect() };
        Finished {
            status,
            stdout: collect(&self.stdout),
            stderr: collect(&self.stderr),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lines(stream: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for_line(rx: &Receiver<String>, name: &str, wanted: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if wanted(&line) => return line,
            Ok(line) => seen.push(line),
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "no wanted {name} line within {DEADLINE:?}; saw:\n{}",
                    seen.join("\n")
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!(
                    "{name} closed without the wanted line; saw:\n{}",
                    seen.join("\n")
                )
            }
        }
    }
}

/// A controller in this process on loopback, issuing certificates of `lifetime`, and a fresh
/// bootstrap token for one node.
pub async fn controller(
    dir: &Path,
    lifetime: Duration,
) -> (powernode_controller::server::RunningController, String) {
    controller_on(dir, lifetime, "127.0.0.1:0".parse().unwrap()).await
}

/// [`controller`] listening on `listen` (its server certificate names that address).
pub async fn controller_on(
    dir: &Path,
    lifetime: Duration,
    listen: std::net::SocketAddr,
) -> (powernode_controller::server::RunningController, String) {
    use powernode_controller::server::{RunningController, ServeOptions};
    let opts = ServeOptions {
        data: dir.join("data"),
        listen,
        cert_lifetime: lifetime,
        hostnames: Vec::new(),
        heartbeat_interval_s: 15,
        database: None,
    };
    let running = RunningController::start(&opts).await.unwrap();
    let storage = powernode_controller::storage::Storage::open(&opts.data)
        .await
        .unwrap();
    let token = powernode_controller::tokens::create(&storage, Duration::from_secs(600), None)
        .await
        .unwrap()
        .token;
    storage.close().await;
    (running, token)
}

/// Item `key` of `<agent>/<T>` under `root` once `done` accepts it; after `within`, the last
/// one seen (if any) as the error.
pub async fn wait_item<T: powernode_types::Topic + Clone>(
    root: &Path,
    agent: &str,
    key: &str,
    within: Duration,
    done: impl Fn(&T) -> bool,
) -> Result<T, Option<T>> {
    let mut sub = powernode_pubsub::Subscription::<T>::connect(&Dirs::under_root(root), agent);
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(item) = sub.get(key).filter(|item| done(item)) {
            return Ok(item.clone());
        }
        if tokio::time::timeout_at(deadline, sub.next()).await.is_err() {
            return Err(sub.get(key).cloned());
        }
    }
}

/// `powernode-agent run <agent>` under `root` with the crash points `failpoints` armed,
/// logging to `root/<agent>.log`.
pub fn spawn_agent(root: &Path, agent: &str, failpoints: &str) -> Child {
    let mut command = Command::new(bin());
    command
        .args(["run", agent, "--root"])
        .arg(root)
        .env("POWERNODE_FAILPOINTS", failpoints);
    spawn_logged(&mut command, root, agent)
}

/// Starts `command`, an agent's, with stdin closed and stdout and stderr appended to
/// `root/<agent>.log`.
pub fn spawn_logged(command: &mut Command, root: &Path, agent: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(format!("{agent}.log")))
        .unwrap();
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// What identitymgr publishes for a node that enrolls with `token` at `url`, pinning `ca_pem`.
pub fn resolved_identity(
    uuid: &str,
    token: String,
    url: &str,
    ca_pem: &str,
) -> powernode_types::NodeIdentity {
    powernode_types::NodeIdentity {
        state: powernode_types::IdentityState::Resolved,
        uuid: Some(uuid.to_owned()),
        source: Some(powernode_types::IdentitySource::IdentityCfg),
        boot_id: "boot-1".into(),
        hostname: "edge-1".into(),
        arch: "amd64".into(),
        dmi_uuid: None,
        bootstrap_token: Some(token),
        controller_urls: vec![url.to_owned()],
        ca_pem: Some(ca_pem.to_owned()),
        last_error: None,
    }
}

/// A temp directory with a node root in `root/` whose agents retry the controller every second
/// at most: the directory (removed when dropped) and the root.
pub fn node_root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("pn").tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc/powernode")).unwrap();
    std::fs::write(
        root.join("etc/powernode/agent.toml"),
        "[controller]\nmax_backoff_s = 1\nrequest_timeout_ms = 3000\n",
    )
    .unwrap();
    (dir, root)
}

/// Mount points at or below `root`, from /proc/self/mountinfo.
pub fn mounts_under(root: &Path) -> Vec<String> {
    let root = root.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|p| p.starts_with(&root))
        .collect()
}

/// Detaches every mount at or below `root`, deepest first: what a test's agents mounted must
/// not outlive its temp directory, also when the test fails.
pub fn unmount_under(root: &Path) {
    let mut mounts = mounts_under(root);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Every event in eventd's journal under `root` (eventd must not be running: opening repairs).
pub fn journalled(root: &Path) -> Vec<powernode_types::node_api::EventRecord> {
    let dir = root.join("persist/powernode/eventd/journal");
    let (journal, _) = eventd::journal::Journal::open(&dir).unwrap();
    journal
        .all()
        .unwrap()
        .into_iter()
        .map(|(_, bytes)| postcard::from_bytes(&bytes).unwrap())
        .collect()
}

/// Fails the test with `what` and the log of each of `agents` (`root/<agent>.log`, as
/// [`spawn_agent`] writes it).
#[track_caller]
pub fn fail_with_logs<'a>(root: &Path, agents: impl IntoIterator<Item = &'a str>, what: &str) -> ! {
    let logs: String = agents
        .into_iter()
        .map(|agent| {
            let log = std::fs::read_to_string(root.join(format!("{agent}.log")));
            format!("--- {agent}.log\n{}\n", log.unwrap_or_default())
        })
        .collect();
    panic!("{what}\n{logs}");
}

/// Settings under the node root `root` for modules from `registry` (plain HTTP, retries at
/// most a second apart), and a trust policy that requires a signature by a new key: that key.
pub fn trust_registry(
    root: &Path,
    registry: &powernode_modules::testing::TestRegistry,
) -> powernode_modules::cosign::SigningKey {
    let etc = root.join("etc/powernode");
    std::fs::create_dir_all(etc.join("agent.toml.d")).unwrap();
    std::fs::write(
        etc.join("agent.toml.d/modules.toml"),
        format!(
            "[modules]\nplain_http = [\"{}\"]\nmax_backoff_s = 1\n",
            registry.host
        ),
    )
    .unwrap();
    let key = powernode_modules::cosign::SigningKey::generate().unwrap();
    std::fs::create_dir_all(etc.join("trust")).unwrap();
    std::fs::write(etc.join("trust/cosign.pub"), key.public_key_pem()).unwrap();
    std::fs::write(
        etc.join("trust/default.toml"),
        "require_signature = true\nkeys = [\"cosign.pub\"]\n",
    )
    .unwrap();
    key
}

/// Builds module `name` under `work` (one file, `<name>.txt`, priority 50, this machine's
/// architecture), pushes it to `registry` as `modules/<name>:1` and signs it with `signer`:
/// its reference.
pub async fn push_module(
    registry: &powernode_modules::testing::TestRegistry,
    work: &Path,
    name: &str,
    signer: &powernode_modules::cosign::SigningKey,
) -> String {
    use powernode_modules::package::{self, BuildOptions};
    use powernode_modules::registry::{Registry, RegistryConfig};
    let src = work.join("src").join(name);
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join(format!("{name}.txt")), name).unwrap();
    let options = BuildOptions {
        name: name.to_owned(),
        version: "1".to_owned(),
        priority: 50,
        architecture: powernode_modules::format::host_architecture().to_owned(),
        dependencies: Vec::new(),
        services: Vec::new(),
        health_check: None,
    };
    let built = package::build(&src, &options, &work.join("out")).unwrap();
    let client = Registry::new(RegistryConfig {
        plain_http: vec![registry.host.clone()],
        ..RegistryConfig::default()
    });
    let repository = format!("{}/modules/{name}", registry.host);
    let reference = format!("{repository}:1");
    let pushed = package::load_built(&built.manifest).unwrap();
    package::push(&client, &repository, "1", &[pushed])
        .await
        .unwrap();
    package::sign(&client, &reference, signer).await.unwrap();
    reference
}

/// Processes whose command line (arguments joined by spaces) holds `marker` (a script's
/// marker argument, a root's path, `sleep 300`).
pub fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(marker)
            })
        })
        .collect()
}
