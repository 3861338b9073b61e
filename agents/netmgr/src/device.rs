//! The userspace WireGuard device: `wgdevice`, a program of the multi-call binary that runs
//! the device of [`crate::userspace`] (the TUN interface, boringtun's protocol, the UAPI
//! socket) in a process of its own, and netmgr's side of it ([`Device`]): start, adopt,
//! watch, stop.
//!
//! The device is netmgr's data plane and outlives it: netmgr starts it in a session of its own
//! (so a signal to netmgr's process group or session does not reach it), and a netmgr that
//! starts finds a running device through its pid file (`run/powernode/netmgr/device/<iface>.pid`,
//! written by the device once its UAPI socket listens) and adopts it rather than starting
//! another, so a restart of netmgr, `kill -9` included, leaves every tunnel up. netmgr watches
//! the device through a pidfd and learns of its death at once.
//!
//! The UAPI socket is at the fixed path `/var/run/wireguard/<iface>.sock`, where `wg` looks;
//! `wgdevice` serves it ([`crate::userspace::control`]). Under a root other than `/` (tests,
//! the demo: several nodes on one host, each
//! with an interface `pn0` in its own network namespace) the device first makes a private
//! mount namespace for itself and bind-mounts `<root>/run/wireguard` on `/run/wireguard`, so
//! each node's socket is its own; netmgr connects to `<root>/run/wireguard/<iface>.sock`
//! directly ([`uapi_socket`]), and `wg` sees it from inside the device's namespaces
//! (`nsenter -t <pid> -m -n wg show`).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use agentbase::Root;
use clap::Parser;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;

use crate::uapi::Uapi;

/// The device's program name in the multi-call binary.
pub const PROGRAM: &str = "wgdevice";

/// How long a started device has to answer on its UAPI socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a device has to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The UAPI socket of the device of `interface` as netmgr reaches it: boringtun's
/// `/var/run/wireguard/<iface>.sock` under the root `/`, else
/// `<root>/run/wireguard/<iface>.sock` (the directory the device bind-mounts there).
pub fn uapi_socket(root: &Root, interface: &str) -> PathBuf {
    let dir = if root.base() == Path::new("/") {
        PathBuf::from("/var/run/wireguard")
    } else {
        root.path("run/wireguard")
    };
    dir.join(format!("{interface}.sock"))
}

/// The files of the device of one interface under `run/powernode/netmgr/device/`.
#[derive(Debug, Clone)]
pub struct DevicePaths {
    /// `<iface>.pid`: the device's pid, written once its socket listens.
    pub pid_file: PathBuf,
    /// `<iface>.log`: its stderr when there is no journald.
    pub log_file: PathBuf,
    /// Its UAPI socket ([`uapi_socket`]).
    pub socket: PathBuf,
}

impl DevicePaths {
    /// The paths for `interface` under `root`.
    pub fn new(root: &Root, interface: &str) -> DevicePaths {
        let dir = root.run_dir().join("netmgr").join("device");
        DevicePaths {
            pid_file: dir.join(format!("{interface}.pid")),
            log_file: dir.join(format!("{interface}.log")),
            socket: uapi_socket(root, interface),
        }
    }
}

/// The interfaces that have a device pid file under `root` (running or not).
pub fn recorded_interfaces(root: &Root) -> Vec<String> {
    names_in(&root.run_dir().join("netmgr").join("device"), ".pid")
}

/// The names of the entries of `dir` that end in `suffix`, without it, sorted; none when
/// `dir` cannot be read.
pub(crate) fn names_in(dir: &Path, suffix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(suffix).map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// Why a device could not be started or adopted.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The program could not be run.
    #[error("starting {PROGRAM}: {0}")]
    Spawn(std::io::Error),
    /// It exited before its socket answered.
    #[error("{PROGRAM} exited at start ({status}); see {log}")]
    Exited {
        /// How it exited.
        status: std::process::ExitStatus,
        /// Where it logged.
        log: String,
    },
    /// Its socket did not answer in time.
    #[error("{PROGRAM} did not answer on {0} within {START_TIMEOUT:?}")]
    NoAnswer(PathBuf),
    /// Watching it failed.
    #[error("watching {PROGRAM} (pid {pid}): {source}")]
    Watch {
        /// Its pid.
        pid: i32,
        /// What failed.
        source: std::io::Error,
    },
}

/// A running device, as netmgr holds it.
pub struct Device {
    /// Its pid.
    pub pid: i32,
    /// Its interface.
    pub interface: String,
    /// Whether it was found running rather than started by this netmgr.
    pub adopted: bool,
    /// Its UAPI socket.
    pub uapi: Uapi,
    paths: DevicePaths,
    pidfd: AsyncFd<OwnedFd>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("pid", &self.pid)
            .field("interface", &self.interface)
            .field("adopted", &self.adopted)
            .finish()
    }
}

/// A pidfd for `pid` (Linux 5.3): readable once the process has exited.
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1; it
    // touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Registers a pidfd with the runtime, to await its readiness.
fn watch(pidfd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `pidfd` is an owned, open descriptor; the AsyncFd owns it from here on and
    // nothing replaces or closes it while it is registered.
    unsafe { AsyncFd::register(pidfd) }.map_err(|e| e.into_parts().1)
}

/// The command line of `pid`, split.
fn cmdline(pid: i32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `pid` is a device of `interface` under `root` (its command line says so).
fn is_device(pid: i32, root: &Root, interface: &str) -> bool {
    let Some(args) = cmdline(pid) else {
        return false;
    };
    let name_ok = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == PROGRAM);
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    name_ok
        && arg("--interface").is_some_and(|i| i == interface)
        && arg("--root").is_some_and(|r| Path::new(r) == root.base())
}

/// Kills the process the pid file names if it is a device of `interface` under `root`, and
/// waits (2 s at most) for it to go.
async fn kill_stale(root: &Root, interface: &str, paths: &DevicePaths) {
    let Some(pid) = std::fs::read_to_string(&paths.pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    if !is_device(pid, root, interface) {
        return;
    }
    tracing::warn!(pid, %interface, "killing a device that does not answer");
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    if let Ok(pidfd) = pidfd_open(pid).and_then(watch) {
        let _ = tokio::time::timeout(Duration::from_secs(2), pidfd.readable()).await;
    }
    let _ = nix::sys::wait::waitpid(
        Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
}

/// Kills a device of `interface` under `root` that does not answer (if its pid file names
/// one) and removes its pid file and socket: what is left of a device nobody can adopt.
pub async fn forget(root: &Root, interface: &str) {
    let paths = DevicePaths::new(root, interface);
    kill_stale(root, interface, &paths).await;
    let _ = std::fs::remove_file(&paths.pid_file);
    let _ = std::fs::remove_file(&paths.socket);
}

impl Device {
    /// The device of `interface` under `root` that is running already: its pid file names a
    /// live `wgdevice` of that interface and root, and its socket answers. `None` otherwise.
    pub async fn adopt(root: &Root, interface: &str) -> Option<Device> {
        let paths = DevicePaths::new(root, interface);
        let pid: i32 = std::fs::read_to_string(&paths.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        if !is_device(pid, root, interface) {
            return None;
        }
        let pidfd = pidfd_open(pid).ok()?;
        // The pid may have been reused between the check and the open: check again.
        if !is_device(pid, root, interface) {
            return None;
        }
        let uapi = Uapi::new(&paths.socket);
        match uapi.get().await {
            Err(_) => {
                tracing::warn!(pid, socket = %paths.socket.display(), "device running but its socket does not answer");
                return None;
            }
            // Not adopted, so replaced (Device::spawn stops it): it would refuse netmgr's
            // changes to a peer in place.
            Ok(state) if state.legacy => {
                tracing::warn!(
                    pid,
                    "the running device is boringtun's, from an earlier netmgr; replacing it"
                );
                return None;
            }
            Ok(_) => {}
        }
        let pidfd = watch(pidfd).ok()?;
        Some(Device {
            pid,
            interface: interface.to_owned(),
            adopted: true,
            uapi,
            paths,
            pidfd,
        })
    }

    /// Starts a device for `interface` under `root` (the running binary as `wgdevice`, in a
    /// session of its own) and waits until its socket answers.
    pub async fn spawn(root: &Root, interface: &str) -> Result<Device, DeviceError> {
        let paths = DevicePaths::new(root, interface);
        let dir = paths.pid_file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(DeviceError::Spawn)?;
        // A device of this interface that is still there but was not adopted (its socket does
        // not answer) would share the TUN interface with the new one: it goes first.
        kill_stale(root, interface, &paths).await;
        // A pid file left by a dead device must not be mistaken for the new one's.
        let _ = std::fs::remove_file(&paths.pid_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log_file)
            .map_err(DeviceError::Spawn)?;
        let exe = std::env::current_exe().map_err(DeviceError::Spawn)?;
        let mut command = Command::new(exe);
        command
            .arg0(PROGRAM)
            .arg("--root")
            .arg(root.base())
            .arg("--interface")
            .arg(interface)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(DeviceError::Spawn)?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe and touches no memory: allowed between fork
        // and exec.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = command.spawn().map_err(DeviceError::Spawn)?;
        let pid = child.id() as i32;
        let pidfd = pidfd_open(pid).map_err(|source| DeviceError::Watch { pid, source })?;
        let uapi = Uapi::new(&paths.socket);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(DeviceError::Exited {
                    status,
                    log: paths.log_file.display().to_string(),
                });
            }
            if std::fs::read_to_string(&paths.pid_file).is_ok_and(|p| p.trim() == pid.to_string())
                && uapi.answers().await
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DeviceError::NoAnswer(paths.socket.clone()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Not waited for through `child` from here on: the pidfd says when it exits, and
        // `reap` collects it (when it is still this process's child).
        drop(child);
        let pidfd = watch(pidfd).map_err(|source| DeviceError::Watch { pid, source })?;
        Ok(Device {
            pid,
            interface: interface.to_owned(),
            adopted: false,
            uapi,
            paths,
            pidfd,
        })
    }

    /// Resolves when the device has exited (at once if it has). Cancel-safe.
    pub async fn exited(&self) {
        loop {
            match self.pidfd.readable().await {
                // A pidfd stays readable once its process has exited: never cleared.
                Ok(_guard) => return,
                Err(e) => {
                    tracing::warn!(error = %e, pid = self.pid, "polling the device's pidfd");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Whether the device has exited.
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & libc::POLLIN != 0
    }

    /// After it exited: collects it if it is this process's child, and removes its pid file
    /// and socket when they are its.
    pub fn reap(&self) {
        let _ = nix::sys::wait::waitpid(
            Pid::from_raw(self.pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        let ours = std::fs::read_to_string(&self.paths.pid_file)
            .is_ok_and(|p| p.trim() == self.pid.to_string());
        if ours {
            let _ = std::fs::remove_file(&self.paths.pid_file);
            let _ = std::fs::remove_file(&self.paths.socket);
        }
    }

    /// Stops the device: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]. The interface goes
    /// with it.
    pub async fn stop(self) {
        let pid = Pid::from_raw(self.pid);
        if !self.has_exited() {
            let _ = kill(pid, Signal::SIGTERM);
            if tokio::time::timeout(STOP_TIMEOUT, self.exited())
                .await
                .is_err()
            {
                tracing::warn!(
                    pid = self.pid,
                    "device still running {STOP_TIMEOUT:?} after SIGTERM; killing it"
                );
                let _ = kill(pid, Signal::SIGKILL);
                self.exited().await;
            }
        }
        self.reap();
    }
}

/// The device program's flags.
#[derive(Debug, Parser)]
#[command(name = PROGRAM, about = "powernode's userspace WireGuard device (started by netmgr)")]
struct Args {
    /// The root netmgr runs under (`/`: the UAPI socket is /var/run/wireguard/<iface>.sock).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// The interface to create.
    #[arg(long, value_name = "NAME")]
    interface: String,
}

/// `wgdevice --root DIR --interface NAME`: creates the TUN interface and serves it until
/// SIGTERM or SIGINT, then exits 0. Exit 2 on a usage error, 1 when the device cannot be
/// created or fails.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let root = Root::resolve(args.root);
    // Before anything can start a thread: unshare(CLONE_NEWNS) needs a single thread.
    let private = if root.base() == Path::new("/") {
        Ok(())
    } else {
        private_socket_dir(&root)
    };
    agentbase::logging::init(PROGRAM, "info");
    // One malloc arena, as every agent has: peers and tunnels made on one thread and freed on
    // another otherwise stay in several arenas (docs/performance.md, "net").
    agentbase::memory::limit_malloc_arenas();
    if let Err(e) = private {
        tracing::error!(error = %e, "could not give the device a socket directory of its own");
        return ExitCode::FAILURE;
    }
    // SIGTERM and SIGINT are taken by a thread of our own (below): blocked in every thread,
    // which inherit the mask from this one.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        tracing::error!(error = %e, "could not block SIGTERM and SIGINT");
        return ExitCode::FAILURE;
    }
    let interface = args.interface;
    match serve_device(&root, &interface, signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(%interface, error = %e, "device failed");
            ExitCode::FAILURE
        }
    }
}

/// Creates the device ([`crate::userspace`]) and serves it: exits the process 0 on SIGTERM
/// or SIGINT; returns an error when the device cannot be made or cannot go on.
fn serve_device(
    root: &Root,
    interface: &str,
    signals: nix::sys::signal::SigSet,
) -> Result<(), String> {
    use std::os::unix::net::UnixListener;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    // Where `wg` looks: under a root other than `/` this is `<root>/run/wireguard`, mounted
    // here by `private_socket_dir`.
    let socket = PathBuf::from("/var/run/wireguard").join(format!("{interface}.sock"));
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let paths = DevicePaths::new(root, interface);
    let pid = std::process::id();
    let cleanup = {
        let (socket, pid_file) = (socket.clone(), paths.pid_file.clone());
        move || {
            let _ = std::fs::remove_file(&socket);
            if std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == pid.to_string()) {
                let _ = std::fs::remove_file(&pid_file);
            }
        }
    };
    {
        let cleanup = cleanup.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let signal = signals.wait();
                tracing::info!(signal = ?signal, "device stopping");
                cleanup();
                std::process::exit(0);
            })
            .map_err(|e| format!("starting the signal thread: {e}"))?;
    }
    let pid_file = paths.pid_file.clone();
    let announce = move || {
        agentbase::fsutil::write_atomic(&pid_file, format!("{pid}\n").as_bytes(), 0o644)
            .map_err(|e| format!("{}: {e}", pid_file.display()))?;
        tracing::info!(%interface, pid, threads, socket = %socket.display(), "device up");
        Ok::<(), String>(())
    };
    let why = crate::userspace::run(interface, threads, listener, announce);
    cleanup();
    Err(why)
}

/// Gives this process a mount namespace of its own in which `<root>/run/wireguard` is
/// `/run/wireguard` (where the UAPI socket goes).
fn private_socket_dir(root: &Root) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let source = root.path("run/wireguard");
    std::fs::create_dir_all(&source).map_err(|e| format!("{}: {e}", source.display()))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    // Nothing mounted here may reach the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making / private: {e}"))?;
    // /var/run is usually a link to /run.
    let target = std::fs::canonicalize("/var/run")
        .unwrap_or_else(|_| PathBuf::from("/var/run"))
        .join("wireguard");
    std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
    mount(
        Some(&source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        format!(
            "bind-mounting {} on {}: {e}",
            source.display(),
            target.display()
        )
    })
}
