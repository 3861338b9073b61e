//! Nodes apart in network namespaces (docs/network.md, "Tests"): an underlay bridge in a
//! namespace of the test's own (192.0.2.0/24, the bridge itself at 192.0.2.254), namespaces
//! joined to it by veth pairs, agents started inside one (`ip netns exec`), code run inside
//! one, TCP transfers between them and `wg` inside a WireGuard device's namespaces. The
//! namespaces go when the [`Underlay`] is dropped, also when a test fails; whoever starts
//! processes in them stops those first.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The host number of the bridge's own address on the underlay.
pub const BRIDGE_HOST: u8 = 254;

/// Runs `args` (a program and its arguments); fails the test with its output unless it
/// succeeded.
#[track_caller]
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The underlay address of host `n`.
pub fn underlay_address(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, n)
}

/// A bridge in a namespace of its own and the namespaces on it; all deleted when dropped.
pub struct Underlay {
    prefix: String,
    /// The namespaces made, the bridge's first: deleted in the reverse order.
    made: Vec<String>,
}

impl Underlay {
    /// The bridge's namespace with `br0` up at 192.0.2.254/24, named after a prefix no other
    /// test (of this run or a concurrent one) uses.
    pub fn new() -> Underlay {
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "pnt{}{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut underlay = Underlay {
            prefix,
            made: Vec::new(),
        };
        let bridge = underlay.namespace("br");
        let address = format!("{}/24", underlay_address(BRIDGE_HOST));
        // An address of its own: a bridge without one takes the lowest of its ports', and
        // so changes as ports are added, behind the back of neighbours that cached it.
        sh(&[
            "ip",
            "-n",
            &bridge,
            "link",
            "add",
            "br0",
            "address",
            "02:00:00:00:00:fe",
            "type",
            "bridge",
        ]);
        sh(&["ip", "-n", &bridge, "addr", "add", &address, "dev", "br0"]);
        sh(&["ip", "-n", &bridge, "link", "set", "br0", "up"]);
        sh(&["ip", "-n", &bridge, "link", "set", "lo", "up"]);
        underlay
    }

    /// Creates namespace `<prefix>-<suffix>`, to be deleted with the underlay.
    fn namespace(&mut self, suffix: &str) -> String {
        let ns = format!("{}-{suffix}", self.prefix);
        // Noted first: a namespace half made is deleted too.
        self.made.push(ns.clone());
        sh(&["ip", "netns", "add", &ns]);
        ns
    }

    /// The bridge's namespace.
    pub fn bridge(&self) -> &str {
        &self.made[0]
    }

    /// A namespace for host `n`: `eth0` at 192.0.2.`n`/24 on the bridge, `lo` up. Its name.
    pub fn add(&mut self, n: u8) -> String {
        let ns = self.namespace(&format!("n{n}"));
        let bridge = self.bridge().to_owned();
        let port = format!("v{n}");
        let address = format!("{}/24", underlay_address(n));
        sh(&[
            "ip", "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
            &bridge,
        ]);
        sh(&["ip", "-n", &ns, "addr", "add", &address, "dev", "eth0"]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", &bridge, "link", "set", &port, "master", "br0", "up",
        ]);
        ns
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links: the veth pairs go with the nodes' ends.
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`: sockets it makes belong to `ns`, and
/// so do the threads it starts.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_netns(&path);
        f()
    })
    .join()
    .unwrap()
}

/// Moves the calling thread into the network namespace at `path` (`/run/netns/<name>`).
pub fn enter_netns(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// `powernode-agent run <agent> --root <root>` inside namespace `ns`, logging to
/// `root/<agent>.log`. `ip netns exec` execs the agent: the child is the agent itself.
pub fn spawn_in(ns: &str, root: &Path, agent: &str) -> Child {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", ns])
        .arg(super::bin())
        .args(["run", agent, "--root"])
        .arg(root)
        .env_remove("POWERNODE_ROOT")
        .env("RUST_LOG", "info");
    super::spawn_logged(&mut command, root, agent)
}

/// A TCP server in a namespace that reads each connection to its end, then answers the number
/// of bytes it read (8 bytes, big-endian) and closes; it notes who connected.
pub struct Sink {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Sink {
    /// Listens on `addr` in namespace `ns` (for as long as the test process lives).
    pub fn start(ns: &str, addr: SocketAddr) -> Sink {
        let listener = in_netns(ns, move || TcpListener::bind(addr).unwrap());
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                if let Ok(peer) = stream.peer_addr() {
                    seen.lock().unwrap().push(peer);
                }
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut count = 0u64;
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            let _ = stream.write_all(&count.to_be_bytes());
                            return;
                        }
                        count += n as u64;
                    }
                });
            }
        });
        Sink { peers }
    }

    /// The addresses connections came from, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

/// Sends `bytes` from namespace `ns` to the [`Sink`] at `to` and checks it counted them all;
/// connecting, and each read and write, may take `timeout`.
pub fn transfer(ns: &str, to: SocketAddr, bytes: usize, timeout: Duration) -> std::io::Result<()> {
    in_netns(ns, move || {
        let mut stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let chunk = [0x5a_u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            stream.write_all(&chunk[..n])?;
            left -= n;
        }
        stream.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        stream.read_exact(&mut count)?;
        let counted = u64::from_be_bytes(count);
        if counted == bytes as u64 {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "the server counted {counted} of {bytes} bytes"
            )))
        }
    })
}

/// `wg <args>` against the WireGuard device of process `device`, from inside its mount and
/// network namespaces (where its UAPI socket is, under a root other than `/`).
pub fn wg_output(device: i32, args: &[&str]) -> Output {
    Command::new("nsenter")
        .args(["-t", &device.to_string(), "-m", "-n", "wg"])
        .args(args)
        .output()
        .unwrap()
}

/// [`wg_output`]'s standard output; fails the test unless `wg` succeeded.
#[track_caller]
pub fn wg(device: i32, args: &[&str]) -> String {
    let out = wg_output(device, args);
    assert!(
        out.status.success(),
        "wg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The pid of the WireGuard device of `pn0` under `root`, once it runs.
pub fn device_pid(root: &Path) -> Option<i32> {
    std::fs::read_to_string(root.join("run/powernode/netmgr/device/pn0.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `ip -n <ns> link show <name>` finds the link.
pub fn has_link(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", name])
        .output()
        .unwrap()
        .status
        .success()
}

/// Whether process `pid` has exited (or is a zombie).
pub fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Waits up to `within` for `cond`; fails the test with `what` after that.
#[track_caller]
pub fn wait_until(within: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
