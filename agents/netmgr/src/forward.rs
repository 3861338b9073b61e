//! The node's port forwards, in an nftables table of their own: `ip powernode`.
//!
//! Each [`PortForward`] sends connections to a port of the node — on any of its addresses,
//! from outside and from the node itself — to `to`, an address on the overlay (or beyond it,
//! through a peer). The table holds four chains:
//!
//! | chain         | hook                  | what it does                                          |
//! |---------------|-----------------------|-------------------------------------------------------|
//! | `prerouting`  | nat, prerouting, -100 | DNAT of arriving connections to a local address       |
//! | `output`      | nat, output, -100     | the same for connections the node itself opens        |
//! | `postrouting` | nat, postrouting, 100 | SNAT of the forwarded connection to the overlay address, so the reply comes back through this node |
//! | `forward`     | filter, forward, 0    | accepts the forwarded connections' packets, both ways |
//!
//! Only addresses of the node count (`fib daddr type local`), so traffic the node routes for
//! others on the same port is left alone; loopback addresses are not forwarded (the kernel
//! drops a packet from 127.0.0.0/8 that leaves the machine unless `route_localnet` is set,
//! which this module does not do). The source of a forwarded connection becomes the overlay
//! address whatever interface it leaves by, so a destination must be reached through the
//! overlay (one on the node's own LAN would answer to an address it cannot route back).
//! Nothing here drops a packet: if another table's `forward`
//! chain has a `drop` policy, that table decides, and its owner has to let the forwards
//! through.
//!
//! **The table is replaced as a whole.** [`apply`] hands `nft` one transaction that creates
//! the table if it is absent, deletes it and creates it again with every rule ([`render`]
//! shows it): the kernel commits all of it or none of it, so there is never a moment with half
//! the rules, and a rejected ruleset leaves the previous one in place. No other table is
//! named, so none is touched.
//!
//! **`nft`, not netlink.** The rules are fed to `nft -f -` (Debian package `nftables`) on its
//! standard input. Speaking nf_tables netlink directly means encoding every expression
//! (`fib`, `ct`, payload matches, NAT) as registers and attributes by hand — what `nft`
//! already does — and of the crates for it `nftnl` binds the C `libnftnl` (GPL-2.0) and
//! `rustables` is GPL-3.0, neither fit to link into this Apache-2.0 binary. The ruleset text
//! is the readable, testable artefact ([`render`] is pure), `nft` makes a file one
//! transaction, and its error messages point at the line that failed. Forwards change
//! rarely, so the cost of a process per change does not matter.
//!
//! **IPv4 forwarding.** [`apply`] with at least one forward sets
//! `/proc/sys/net/ipv4/ip_forward` to 1 in the caller's network namespace: without it the
//! kernel does not route the forwarded packets. It never sets it back to 0 (other things on
//! the node may route too).

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use powernode_types::{ForwardProto, PortForward};
use tokio::io::AsyncWriteExt;

/// The table's family and name, as `nft` commands spell them.
const TABLE: &str = "ip powernode";

/// Where the kernel's IPv4 forwarding switch is (per network namespace).
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// How long `nft` may take before it is killed and the change reported as failed.
const NFT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `nft` is looked for when it is not on `PATH` (a service's `PATH` may lack `sbin`).
const NFT_FALLBACK_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

/// Why the port forwards could not be rendered, applied or removed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A forward is malformed: its `to` is not `IPv4:port`, or a port is 0, or `to` is an
    /// address a connection cannot be forwarded to.
    #[error("invalid port forward {proto} {port} -> {to:?}: {reason}")]
    Invalid {
        /// `tcp` or `udp`.
        proto: &'static str,
        /// The node's port.
        port: u16,
        /// The destination as given.
        to: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two forwards claim the same protocol and port of the node.
    #[error("port forward {proto} {port} is given twice (to {first:?} and to {second:?})")]
    Duplicate {
        /// `tcp` or `udp`.
        proto: &'static str,
        /// The node's port.
        port: u16,
        /// The first destination given for it.
        first: String,
        /// The second one.
        second: String,
    },
    /// The `nft` program is not installed.
    #[error(
        "the nftables tool `nft` was not found (not on PATH, nor in /usr/sbin or /sbin): \
         install the Debian package `nftables`"
    )]
    NftMissing,
    /// `nft` could not be started or talked to.
    #[error("running {program}: {source}")]
    NftIo {
        /// The program run.
        program: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused the ruleset; nothing was changed.
    #[error("nft refused the `{TABLE}` table ({status}), nothing was changed: {stderr}")]
    NftFailed {
        /// How `nft` exited.
        status: ExitStatus,
        /// What it printed on its standard error, trimmed.
        stderr: String,
    },
    /// `nft` did not finish in time and was killed.
    #[error("nft did not finish within {0:?} and was killed")]
    NftTimeout(Duration),
    /// IPv4 forwarding could not be switched on.
    #[error("enabling IPv4 forwarding ({IP_FORWARD}): {0}")]
    IpForward(#[source] std::io::Error),
}

/// Replaces the table `ip powernode` with `forwards`, atomically as a whole, and switches
/// IPv4 forwarding on in the caller's network namespace when there is at least one forward.
///
/// `overlay_address` is the node's own address on the overlay: forwarded connections leave
/// with it as their source, so that the destination answers through this node. An empty
/// list removes the table (see [`remove`]). The forwards are validated first ([`render`]);
/// an invalid list, or a ruleset `nft` refuses, leaves the previous table as it was.
pub async fn apply(
    forwards: &[PortForward],
    overlay_address: Ipv4Addr,
) -> Result<(), ForwardError> {
    if forwards.is_empty() {
        return remove().await;
    }
    let ruleset = render(forwards, overlay_address)?;
    run_nft(&nft_program()?, &ruleset).await?;
    enable_ip_forward()?;
    tracing::info!(
        forwards = forwards.len(),
        %overlay_address,
        "port forwards applied"
    );
    Ok(())
}

/// Deletes the table `ip powernode` if it is there; removing an absent table is not an
/// error. IPv4 forwarding is left as it is.
pub async fn remove() -> Result<(), ForwardError> {
    // Declaring the table first makes the delete succeed whether or not it existed, in the
    // same transaction (`nft destroy` needs nftables 1.0.8; Debian 12 has 1.0.6).
    let script = format!("table {TABLE}\ndelete table {TABLE}\n");
    run_nft(&nft_program()?, &script).await?;
    tracing::info!("port forwards removed");
    Ok(())
}

/// The `nft -f` script [`apply`] runs for `forwards`: declare the table, delete it, and
/// create it again with its four chains and every forward's rules, in the order given.
///
/// Pure. Refuses a forward whose `to` is not `IPv4:port` (or whose ports are 0, or whose
/// address is unspecified, loopback, multicast or broadcast) and two forwards with the same
/// protocol and port. An empty list gives the table with empty chains.
pub fn render(forwards: &[PortForward], overlay_address: Ipv4Addr) -> Result<String, ForwardError> {
    let mut seen: Vec<(ForwardProto, u16, &str)> = Vec::with_capacity(forwards.len());
    let mut targets = Vec::with_capacity(forwards.len());
    for forward in forwards {
        let to = validate(forward)?;
        if let Some((_, _, first)) = seen
            .iter()
            .find(|(proto, port, _)| *proto == forward.proto && *port == forward.port)
        {
            return Err(ForwardError::Duplicate {
                proto: proto_name(forward.proto),
                port: forward.port,
                first: (*first).to_owned(),
                second: forward.to.clone(),
            });
        }
        seen.push((forward.proto, forward.port, &forward.to));
        targets.push((proto_name(forward.proto), forward.port, to));
    }

    let mut dnat = String::new();
    let mut snat = String::new();
    let mut accept = String::new();
    for (proto, port, to) in &targets {
        let (addr, to_port) = (to.ip(), to.port());
        // `write!` to a String cannot fail.
        let _ = writeln!(
            dnat,
            "\t\tfib daddr type local ip daddr != 127.0.0.0/8 {proto} dport {port} dnat to {to}"
        );
        let _ = writeln!(
            snat,
            "\t\tct status dnat ip daddr {addr} {proto} dport {to_port} snat to {overlay_address}"
        );
        let _ = writeln!(
            accept,
            "\t\tct status dnat ip daddr {addr} {proto} dport {to_port} accept\n\
             \t\tct status dnat ip saddr {addr} {proto} sport {to_port} accept"
        );
    }

    // Numeric priorities: nft 1.0.6 knows `dstnat` for prerouting but not for output.
    Ok(format!(
        "# The node's port forwards, written whole by netmgr: one transaction.\n\
         table {TABLE}\n\
         delete table {TABLE}\n\
         table {TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority -100; policy accept;\n\
         {dnat}\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         {dnat}\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority 100; policy accept;\n\
         {snat}\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority 0; policy accept;\n\
         {accept}\
         \t}}\n\
         }}\n"
    ))
}

/// `nft`'s name for a protocol.
fn proto_name(proto: ForwardProto) -> &'static str {
    match proto {
        ForwardProto::Tcp => "tcp",
        ForwardProto::Udp => "udp",
    }
}

/// The forward's destination, if the forward is well formed.
fn validate(forward: &PortForward) -> Result<SocketAddrV4, ForwardError> {
    let invalid = |reason: &str| ForwardError::Invalid {
        proto: proto_name(forward.proto),
        port: forward.port,
        to: forward.to.clone(),
        reason: reason.to_owned(),
    };
    if forward.port == 0 {
        return Err(invalid("port 0 cannot be forwarded"));
    }
    let to: SocketAddrV4 = forward
        .to
        .parse()
        .map_err(|_| invalid("the destination must be an IPv4 address and a port, a.b.c.d:port"))?;
    let ip = to.ip();
    if to.port() == 0 {
        Err(invalid("the destination port is 0"))
    } else if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        Err(invalid(
            "the destination address is not a single host's (unspecified, broadcast or multicast)",
        ))
    } else if ip.is_loopback() {
        Err(invalid(
            "the destination address is a loopback address, which a forwarded connection cannot reach",
        ))
    } else {
        Ok(to)
    }
}

/// The `nft` program: on `PATH`, else in the usual `sbin` directories.
fn nft_program() -> Result<PathBuf, ForwardError> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(NFT_FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join("nft"))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or(ForwardError::NftMissing)
}

/// Runs `program -f -` with `script` on its standard input: one nftables transaction.
async fn run_nft(program: &Path, script: &str) -> Result<(), ForwardError> {
    let io = |source| ForwardError::NftIo {
        program: program.to_owned(),
        source,
    };
    let mut child = tokio::process::Command::new(program)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => ForwardError::NftMissing,
            _ => io(e),
        })?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| io(std::io::Error::other("nft's standard input is not a pipe")))?;
    let write = async move {
        let written = stdin.write_all(script.as_bytes()).await;
        // Dropping stdin closes it: nft reads to the end before it commits.
        drop(stdin);
        written
    };
    let finished = tokio::time::timeout(NFT_TIMEOUT, async {
        tokio::join!(write, child.wait_with_output())
    })
    .await
    .map_err(|_| ForwardError::NftTimeout(NFT_TIMEOUT))?;
    let (written, output) = finished;
    let output = output.map_err(io)?;
    if !output.status.success() {
        return Err(ForwardError::NftFailed {
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    // nft exited 0 without reading everything: it did not see the whole ruleset.
    written.map_err(io)
}

/// Switches IPv4 forwarding on, unless it already is.
///
/// With `std::fs`, not `tokio::fs`: a few bytes to procfs do not block, and the write then
/// happens on the calling thread, in its network namespace (a blocking-pool thread could be
/// in another — the tests enter a namespace on one thread).
fn enable_ip_forward() -> Result<(), ForwardError> {
    let current = std::fs::read_to_string(IP_FORWARD).map_err(ForwardError::IpForward)?;
    if current.trim() != "1" {
        std::fs::write(IP_FORWARD, "1\n").map_err(ForwardError::IpForward)?;
        tracing::info!("IPv4 forwarding enabled for the port forwards");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fw(proto: ForwardProto, port: u16, to: &str) -> PortForward {
        PortForward {
            proto,
            port,
            to: to.to_owned(),
        }
    }

    const OVERLAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);

    #[test]
    fn render_has_dnat_snat_and_accept_for_tcp_and_udp() {
        let text = render(
            &[
                fw(ForwardProto::Tcp, 8080, "10.88.0.2:80"),
                fw(ForwardProto::Udp, 5353, "10.88.0.3:53"),
            ],
            OVERLAY,
        )
        .unwrap();
        let expected = "\
# The node's port forwards, written whole by netmgr: one transaction.
table ip powernode
delete table ip powernode
table ip powernode {
\tchain prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tfib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080 dnat to 10.88.0.2:80
\t\tfib daddr type local ip daddr != 127.0.0.0/8 udp dport 5353 dnat to 10.88.0.3:53
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tfib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080 dnat to 10.88.0.2:80
\t\tfib daddr type local ip daddr != 127.0.0.0/8 udp dport 5353 dnat to 10.88.0.3:53
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tct status dnat ip daddr 10.88.0.2 tcp dport 80 snat to 10.88.0.1
\t\tct status dnat ip daddr 10.88.0.3 udp dport 53 snat to 10.88.0.1
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\tct status dnat ip daddr 10.88.0.2 tcp dport 80 accept
\t\tct status dnat ip saddr 10.88.0.2 tcp sport 80 accept
\t\tct status dnat ip daddr 10.88.0.3 udp dport 53 accept
\t\tct status dnat ip saddr 10.88.0.3 udp sport 53 accept
\t}
}
";
        assert_eq!(text, expected);
    }

    #[test]
    fn render_names_only_its_own_table_and_drops_nothing() {
        let text = render(&[fw(ForwardProto::Tcp, 1, "192.0.2.1:2")], OVERLAY).unwrap();
        for line in text.lines().filter(|l| l.contains("table")) {
            assert!(line.contains("table ip powernode"), "{line}");
        }
        assert!(!text.contains("drop") && !text.contains("reject"), "{text}");
        assert!(!text.contains("flush ruleset"), "{text}");
    }

    #[test]
    fn render_of_nothing_is_the_empty_table() {
        let text = render(&[], OVERLAY).unwrap();
        assert!(text.contains("chain forward {"), "{text}");
        assert!(!text.contains("dnat to"), "{text}");
    }

    #[test]
    fn the_same_port_may_be_forwarded_for_each_protocol() {
        let text = render(
            &[
                fw(ForwardProto::Tcp, 53, "10.88.0.3:53"),
                fw(ForwardProto::Udp, 53, "10.88.0.3:53"),
            ],
            OVERLAY,
        )
        .unwrap();
        assert!(text.contains("tcp dport 53 dnat to 10.88.0.3:53"), "{text}");
        assert!(text.contains("udp dport 53 dnat to 10.88.0.3:53"), "{text}");
    }

    #[test]
    fn duplicates_are_refused() {
        let err = render(
            &[
                fw(ForwardProto::Tcp, 8080, "10.88.0.2:80"),
                fw(ForwardProto::Udp, 8080, "10.88.0.2:80"),
                fw(ForwardProto::Tcp, 8080, "10.88.0.4:80"),
            ],
            OVERLAY,
        )
        .unwrap_err();
        assert!(
            matches!(
                &err,
                ForwardError::Duplicate { proto: "tcp", port: 8080, first, second }
                    if first == "10.88.0.2:80" && second == "10.88.0.4:80"
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "port forward tcp 8080 is given twice (to \"10.88.0.2:80\" and to \"10.88.0.4:80\")"
        );
    }

    #[test]
    fn bad_destinations_are_refused() {
        // (node port, to, what the message says)
        let table = [
            (80, "10.88.0.2", "a.b.c.d:port"),
            (80, "10.88.0.2:", "a.b.c.d:port"),
            (80, "host.example:80", "a.b.c.d:port"),
            (80, "[fd00::1]:80", "a.b.c.d:port"),
            (80, "10.88.0.256:80", "a.b.c.d:port"),
            (80, "10.88.0.2:65536", "a.b.c.d:port"),
            (80, " 10.88.0.2:80", "a.b.c.d:port"),
            (80, "10.88.0.2:80; drop", "a.b.c.d:port"),
            (80, "", "a.b.c.d:port"),
            (80, "10.88.0.2:0", "destination port is 0"),
            (0, "10.88.0.2:80", "port 0"),
            (80, "0.0.0.0:80", "not a single host's"),
            (80, "255.255.255.255:80", "not a single host's"),
            (80, "224.0.0.1:80", "not a single host's"),
            (80, "127.0.0.1:80", "loopback"),
        ];
        for (port, to, says) in table {
            for proto in [ForwardProto::Tcp, ForwardProto::Udp] {
                let err = render(&[fw(proto, port, to)], OVERLAY).unwrap_err();
                assert!(matches!(err, ForwardError::Invalid { .. }), "{to}: {err:?}");
                let message = err.to_string();
                assert!(message.contains(says), "{to}: {message}");
                assert!(message.contains(&format!("{to:?}")), "{to}: {message}");
            }
        }
        // One bad forward refuses the whole list.
        let err = render(
            &[
                fw(ForwardProto::Tcp, 8080, "10.88.0.2:80"),
                fw(ForwardProto::Tcp, 8081, "nowhere"),
            ],
            OVERLAY,
        )
        .unwrap_err();
        assert!(err.to_string().contains("tcp 8081"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_nft_says_which_package_to_install() {
        let err = run_nft(Path::new("/nonexistent/nft"), "")
            .await
            .unwrap_err();
        assert!(matches!(err, ForwardError::NftMissing), "{err:?}");
        assert!(
            err.to_string().contains("Debian package `nftables`"),
            "{err}"
        );
    }
}

/// Tests against the real kernel and the real `nft`, each in network namespaces of its own
/// that it creates and deletes: they need root, `nft` and `ip` (iproute2).
#[cfg(test)]
mod kernel_tests {
    use super::*;
    use std::fs::File;
    use std::future::Future;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn can_run() -> bool {
        powernode_pubsub::testing::require(&["root", "nft", "ip"])
    }

    /// A network namespace made for one test, deleted when dropped.
    struct Netns {
        name: String,
        file: File,
    }

    impl Netns {
        fn new(tag: &str) -> Netns {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("pnfw-{}-{n}-{tag}", std::process::id());
            run("ip", &["netns", "add", &name]);
            let file = File::open(format!("/run/netns/{name}"))
                .unwrap_or_else(|e| panic!("opening /run/netns/{name}: {e}"));
            let ns = Netns { name, file };
            ns.ip("link set lo up");
            ns
        }

        /// `ip -n <ns> <args>`, which must succeed.
        fn ip(&self, args: &str) {
            let mut all = vec!["-n", &self.name];
            all.extend(args.split_whitespace());
            run("ip", &all);
        }

        /// `nft <args>` inside the namespace: its exit status and standard output.
        fn nft(&self, args: &str) -> (bool, String) {
            let mut all = vec!["netns", "exec", &self.name, "nft"];
            all.extend(args.split_whitespace());
            let out = Command::new("ip")
                .args(&all)
                .output()
                .expect("running ip netns exec");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        }

        /// `nft list table <table>`, which must succeed.
        fn list(&self, table: &str) -> String {
            let (ok, text) = self.nft(&format!("list table {table}"));
            assert!(ok, "nft list table {table} failed in {}", self.name);
            text
        }

        /// `nft -f -` inside the namespace with `script`, which must succeed.
        fn load(&self, script: &str) {
            let mut child = Command::new("ip")
                .args(["netns", "exec", &self.name, "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .expect("running ip netns exec nft");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success(), "nft -f failed:\n{script}");
        }

        fn ip_forward(&self) -> String {
            self.run(|| {
                std::fs::read_to_string(IP_FORWARD)
                    .unwrap()
                    .trim()
                    .to_owned()
            })
        }

        /// Runs `f` on a thread that has entered the namespace: sockets it opens and
        /// processes it starts belong to the namespace.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            std::thread::scope(|scope| {
                let thread = scope.spawn(|| {
                    nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("entering {}: {e}", self.name));
                    f()
                });
                thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        }

        /// Runs the future `f` makes on a single-threaded runtime inside the namespace (so
        /// the `nft` it starts runs there too).
        fn block_on<T: Send, F: Future<Output = T>>(&self, f: impl FnOnce() -> F + Send) -> T {
            self.run(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(f())
            })
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn run(program: &str, args: &[&str]) {
        let status = Command::new(program)
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(status.success(), "{program} {args:?}: {status}");
    }

    fn fw(proto: ForwardProto, port: u16, to: &str) -> PortForward {
        PortForward {
            proto,
            port,
            to: to.to_owned(),
        }
    }

    const OTHERS: &str = "\
table inet other {
\tchain c {
\t\ttype filter hook input priority 0; policy accept;
\t\ttcp dport 22 counter accept
\t}
}
table ip filter {
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\tip daddr 192.0.2.1 counter
\t}
}
";

    #[test]
    fn apply_replaces_its_table_whole_and_touches_no_other() {
        if !can_run() {
            return;
        }
        let ns = Netns::new("table");
        ns.load(OTHERS);
        let others = || format!("{}{}", ns.list("inet other"), ns.list("ip filter"));
        let others_before = others();
        let overlay = Ipv4Addr::new(10, 9, 0, 1);
        assert_eq!(
            ns.ip_forward(),
            "0",
            "a new namespace starts without forwarding"
        );

        let first = [
            fw(ForwardProto::Tcp, 8080, "10.9.0.2:80"),
            fw(ForwardProto::Udp, 5353, "10.9.0.3:53"),
        ];
        ns.block_on(|| apply(&first, overlay)).unwrap();
        let listed = ns.list("ip powernode");
        for rule in [
            "tcp dport 8080 dnat to 10.9.0.2:80",
            "udp dport 5353 dnat to 10.9.0.3:53",
            "ip daddr 10.9.0.2 tcp dport 80 snat to 10.9.0.1",
            "ip daddr 10.9.0.3 udp dport 53 snat to 10.9.0.1",
            "ip saddr 10.9.0.2 tcp sport 80 accept",
        ] {
            assert!(listed.contains(rule), "{rule} missing from\n{listed}");
        }
        for chain in ["prerouting", "output", "postrouting", "forward"] {
            assert!(listed.contains(&format!("chain {chain} {{")), "{listed}");
        }
        assert_eq!(ns.ip_forward(), "1");
        assert_eq!(others(), others_before);

        // Applied again with a changed list: the old rules are gone, not added to.
        let second = [fw(ForwardProto::Tcp, 9090, "10.9.0.4:443")];
        ns.block_on(|| apply(&second, overlay)).unwrap();
        let listed = ns.list("ip powernode");
        assert!(
            listed.contains("tcp dport 9090 dnat to 10.9.0.4:443"),
            "{listed}"
        );
        assert!(
            !listed.contains("8080") && !listed.contains("5353"),
            "{listed}"
        );
        assert_eq!(listed.matches("dnat to").count(), 2, "{listed}");
        assert_eq!(others(), others_before);

        // Applying the same list again changes nothing.
        ns.block_on(|| apply(&second, overlay)).unwrap();
        assert_eq!(ns.list("ip powernode"), listed);

        // A ruleset the kernel refuses is refused whole: the previous table stays.
        let broken = format!(
            "{}add rule ip powernode forward jump no_such_chain\n",
            render(&first, overlay).unwrap()
        );
        let nft = nft_program().unwrap();
        let err = ns.block_on(|| run_nft(&nft, &broken)).unwrap_err();
        assert!(
            matches!(&err, ForwardError::NftFailed { stderr, .. } if stderr.contains("no_such_chain")),
            "{err:?}"
        );
        assert_eq!(ns.list("ip powernode"), listed);

        // An invalid list never reaches nft.
        let invalid = [fw(ForwardProto::Tcp, 1, "nowhere")];
        let err = ns.block_on(|| apply(&invalid, overlay)).unwrap_err();
        assert!(matches!(err, ForwardError::Invalid { .. }), "{err:?}");
        assert_eq!(ns.list("ip powernode"), listed);

        ns.block_on(remove).unwrap();
        let (exists, _) = ns.nft("list table ip powernode");
        assert!(!exists, "the table is still there after remove");
        assert_eq!(others(), others_before);
        ns.block_on(remove).unwrap();
        assert_eq!(others(), others_before);

        // An empty list is a remove, whether or not there is a table.
        ns.block_on(|| apply(&second, overlay)).unwrap();
        ns.block_on(|| apply(&[], overlay)).unwrap();
        assert!(!ns.nft("list table ip powernode").0);
        ns.block_on(|| apply(&[], overlay)).unwrap();
        assert_eq!(others(), others_before);
        let (_, tables) = ns.nft("list tables");
        assert_eq!(tables, "table inet other\ntable ip filter\n");
    }

    /// Three namespaces: a client, the node and a server on the node's "overlay" (a plain
    /// veth here). The server has no route to the client's network, so only a forward that
    /// also rewrites the source reaches it and gets an answer back.
    #[test]
    fn a_forward_carries_tcp_and_udp_from_a_client_to_a_server_on_the_overlay() {
        if !can_run() {
            return;
        }
        let client = Netns::new("client");
        let node = Netns::new("node");
        let server = Netns::new("server");
        client.ip(&format!(
            "link add c0 type veth peer name n0 netns {}",
            node.name
        ));
        node.ip(&format!(
            "link add n1 type veth peer name s0 netns {}",
            server.name
        ));
        client.ip("addr add 10.201.1.2/24 dev c0");
        client.ip("link set c0 up");
        client.ip("route add default via 10.201.1.1");
        node.ip("addr add 10.201.1.1/24 dev n0");
        node.ip("link set n0 up");
        node.ip("addr add 10.201.2.1/24 dev n1");
        node.ip("link set n1 up");
        server.ip("addr add 10.201.2.2/24 dev s0");
        server.ip("link set s0 up");

        let overlay = Ipv4Addr::new(10, 201, 2, 1);
        let node_addr = Ipv4Addr::new(10, 201, 1, 1);
        let (tcp_server, udp_server) = server.run(|| {
            (
                TcpListener::bind("10.201.2.2:9000").unwrap(),
                UdpSocket::bind("10.201.2.2:9001").unwrap(),
            )
        });
        tcp_server.set_nonblocking(true).unwrap();
        udp_server.set_read_timeout(Some(TIMEOUT)).unwrap();

        // Nothing forwarded yet: the node has nothing on the port.
        let refused = client.run(|| connect(node_addr, 8080));
        assert!(refused.is_err(), "connected before any forward");

        let forwards = [
            fw(ForwardProto::Tcp, 8080, "10.201.2.2:9000"),
            fw(ForwardProto::Udp, 8081, "10.201.2.2:9001"),
        ];
        node.block_on(|| apply(&forwards, overlay)).unwrap();

        // TCP from the client, and from the node itself (the output chain).
        for (from, name) in [(&client, "client"), (&node, "node")] {
            let mut stream = from
                .run(|| connect(node_addr, 8080))
                .unwrap_or_else(|e| panic!("TCP from the {name} through the forward: {e}"));
            let (mut conn, peer) = accept(&tcp_server);
            assert_eq!(
                peer.ip(),
                overlay,
                "the server sees the node's overlay address"
            );
            conn.write_all(b"pong").unwrap();
            let mut answer = [0u8; 4];
            stream.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"pong", "the answer from the {name}'s connection");
        }

        // UDP from the client: the answer comes back from the address it was sent to.
        let udp_client = client.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
        udp_client.set_read_timeout(Some(TIMEOUT)).unwrap();
        udp_client.send_to(b"ping", (node_addr, 8081)).unwrap();
        let mut buf = [0u8; 16];
        let (n, peer) = udp_server
            .recv_from(&mut buf)
            .expect("the datagram arrives");
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(peer.ip(), overlay);
        udp_server.send_to(b"pong", peer).unwrap();
        let (n, from) = udp_client.recv_from(&mut buf).expect("the answer arrives");
        assert_eq!(&buf[..n], b"pong");
        assert_eq!(from, SocketAddr::from((node_addr, 8081)));

        // Removed: new connections are refused, new datagrams go nowhere.
        node.block_on(remove).unwrap();
        let after = client.run(|| connect(node_addr, 8080));
        assert!(after.is_err(), "connected after the forward was removed");
        let err = tcp_server.accept().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock, "{err}");
        let udp_client = client.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
        udp_client.send_to(b"late", (node_addr, 8081)).unwrap();
        udp_server
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert!(
            udp_server.recv_from(&mut buf).is_err(),
            "a datagram arrived after the forward was removed"
        );
    }

    fn connect(addr: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&SocketAddr::from((addr, port)), TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        Ok(stream)
    }

    /// The connection waiting on a non-blocking listener (the handshake is already done).
    fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            match listener.accept() {
                Ok((conn, peer)) => {
                    conn.set_nonblocking(false).unwrap();
                    return (conn, peer);
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("no connection reached the server: {e}"),
            }
        }
    }
}
