//! What the benchmark programs share: the error type, their children's lifetime, the runtime
//! they run on, and how they start an agent.

// Each benchmark uses its own part of this.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use powernode_pubsub::{Dirs, Publication};
use powernode_types::{IdentitySource, IdentityState, NodeIdentity};

/// Any error, printed as the benchmark's failure.
pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Children killed when the benchmark ends, however it ends.
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Parses the arguments and runs `bench` on a two-worker runtime; on failure prints
/// `name: error` and exits 1.
pub fn main_with<A, F, Fut>(name: &str, parse: fn() -> Res<A>, bench: F)
where
    F: FnOnce(A) -> Fut,
    Fut: Future<Output = Res<()>>,
{
    let result = parse().and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(bench(args))
    });
    if let Err(e) = result {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

/// `AGENT_BIN run <name> --root <root>`, logging to `<log_dir>/<name>.log`.
pub fn agent(agent_bin: &Path, log_dir: &Path, root: &Path, name: &str) -> Res<Child> {
    let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
    Ok(Command::new(agent_bin)
        .args(["run", name, "--root"])
        .arg(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// Publishes, as identitymgr would, a resolved identity `uuid` that enrolls with a fresh
/// bootstrap token (`CONTROLLER_BIN token create --data DATA`) at `https://LISTEN`, pinning the
/// controller's CA. The publication must live as long as the node.
pub fn publish_identity(
    dirs: &Dirs,
    uuid: &str,
    controller_bin: &Path,
    data: &Path,
    listen: &str,
) -> Res<Publication<NodeIdentity>> {
    let out = Command::new(controller_bin)
        .args(["token", "create", "--data"])
        .arg(data)
        .args(["--ttl", "10m"])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("token create failed: {}", out.status).into());
    }
    let identity = Publication::<NodeIdentity>::open(dirs, "identitymgr")?;
    identity.publish(&NodeIdentity {
        state: IdentityState::Resolved,
        uuid: Some(uuid.to_owned()),
        source: Some(IdentitySource::IdentityCfg),
        boot_id: "boot-1".into(),
        hostname: "bench".into(),
        arch: "amd64".into(),
        dmi_uuid: None,
        bootstrap_token: Some(String::from_utf8(out.stdout)?.trim().to_owned()),
        controller_urls: vec![format!("https://{listen}")],
        ca_pem: Some(std::fs::read_to_string(data.join("ca.crt.pem"))?),
        last_error: None,
    })?;
    Ok(identity)
}

/// The `--name value` pairs of the command line; `usage` is the error for anything else.
pub fn flags(usage: &str) -> Res<std::collections::BTreeMap<String, String>> {
    let mut flags = std::collections::BTreeMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let name = flag.strip_prefix("--").ok_or(usage)?.to_owned();
        flags.insert(name, it.next().ok_or(usage)?);
    }
    Ok(flags)
}

/// Waits until `done` holds for the subscription, `within` at most.
pub async fn until<T: powernode_types::Topic>(
    sub: &mut powernode_pubsub::Subscription<T>,
    what: &str,
    within: std::time::Duration,
    done: impl Fn(&powernode_pubsub::Subscription<T>) -> bool,
) -> Res<()> {
    let deadline = tokio::time::Instant::now() + within;
    while !done(sub) {
        if tokio::time::timeout_at(deadline, sub.next()).await.is_err() {
            return Err(format!("{what}: not within {within:?}").into());
        }
    }
    Ok(())
}
