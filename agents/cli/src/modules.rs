//! `attach`, `detach`, `verify` and `commit`: modules from the command line.
//!
//! `attach` writes a local assignment (`etc/powernode/modules.d/<name>.toml`, read by
//! modulemgr) and follows the module's `ModuleStatus` until it is Active or Failed; `detach`
//! removes one. `verify` runs the verifier's own checks on a module in a registry (pulled into
//! a temporary store) or on a module built by `powernode-controller module build`. `commit`
//! captures what was written into a mounted stack (the overlay's upper directory, whiteouts
//! included) as a new module image, and pushes it when asked. Where that directory is comes
//! from mountmgr's `MountStatus.upper_dir` (live, or the checkpoint it left while it is down);
//! the CLI does not know mountmgr's layout.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use agentbase::{Root, Settings};
use anyhow::{bail, Context as _};
use ipcmonitor::tool::Exit;
use powernode_modules::format::host_architecture;
use powernode_modules::local::{self, LocalModule};
use powernode_modules::registry::{Registry, RegistryError};
use powernode_modules::store::{Store, StoreError};
use powernode_modules::{check, policy};
use powernode_pubsub::inspect::{self, Source};
use powernode_pubsub::{Dirs, Event, Subscription};
use powernode_types::{ModuleConfig, ModuleState, ModuleStatus, MountStatus, Topic, VerifyConfig};

/// `attach REF`: writes the local assignment, then (unless `wait` is `None`) follows the
/// module until it is Active (exit 0) or Failed (exit 1).
pub async fn attach(
    root: &Root,
    reference: &str,
    name: Option<String>,
    priority: Option<u32>,
    wait: Option<Duration>,
    json: bool,
) -> anyhow::Result<Exit> {
    let name = name.unwrap_or_else(|| local::default_name(reference));
    if !local::valid_name(&name) {
        bail!("{name:?} is not a valid module name; give one with --name");
    }
    powernode_modules::registry::parse_reference(reference)?;
    let dir = root.path(local::DIR);
    let path = local::write(
        &dir,
        &LocalModule {
            name: name.clone(),
            reference: reference.to_owned(),
            priority,
        },
    )?;
    let priority = priority.map_or_else(
        || "the module's priority".to_owned(),
        |p| format!("priority {p}"),
    );
    eprintln!(
        "attached {name} ({reference}, {priority}): {}",
        path.display()
    );
    let Some(timeout) = wait else {
        return Ok(Exit::Success);
    };
    let dirs = Dirs::under_root(root.base());
    let status = follow(&dirs, &name, reference, timeout).await?;
    if json {
        println!("{}", serde_json::to_string(&status)?);
    }
    match status.state {
        ModuleState::Active => {
            eprintln!(
                "{name} is active ({})",
                status.digest.as_deref().unwrap_or("-")
            );
            Ok(Exit::Success)
        }
        _ => {
            eprintln!(
                "{name} failed: {}",
                status.error.as_deref().unwrap_or("no reason given")
            );
            Ok(Exit::Failure)
        }
    }
}

/// Prints the module's state changes (and download progress) until it is Active or Failed.
async fn follow(
    dirs: &Dirs,
    name: &str,
    reference: &str,
    timeout: Duration,
) -> anyhow::Result<ModuleStatus> {
    let mut sub = Subscription::<ModuleStatus>::connect(dirs, modulemgr_agent());
    let mut last_line = String::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let event = tokio::time::timeout_at(deadline, sub.next())
            .await
            .with_context(|| {
                format!(
                    "{name}: not active after {}s (is modulemgr running? `powernode-agent status` shows)",
                    timeout.as_secs()
                )
            })?;
        let status = match event {
            Event::Create { value, .. } | Event::Modify { new: value, .. } => value,
            _ => continue,
        };
        if status.name != name || status.reference != reference {
            continue;
        }
        let line = match (status.state, status.bytes_total) {
            (ModuleState::Downloading, Some(total)) if total > 0 => {
                format!("{name}: downloading {}%", status.bytes_done * 100 / total)
            }
            (state, _) => match &status.error {
                Some(e) => format!("{name}: {state:?} ({e})"),
                None => format!("{name}: {state:?}"),
            },
        };
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if matches!(status.state, ModuleState::Active | ModuleState::Failed) {
            return Ok(status);
        }
    }
}

fn modulemgr_agent() -> &'static str {
    "modulemgr"
}

/// `detach NAME`: removes a local assignment.
pub async fn detach(root: &Root, name: &str) -> anyhow::Result<Exit> {
    if local::remove(&root.path(local::DIR), name)? {
        eprintln!("detached {name}; modulemgr takes it out of the stack");
        return Ok(Exit::Success);
    }
    let dirs = Dirs::under_root(root.base());
    let mut sub = Subscription::<ModuleConfig>::connect(&dirs, modulemgr::HEARTBEAT_AGENT);
    let assigned = tokio::time::timeout(Duration::from_secs(2), async {
        while !matches!(sub.next().await, Event::Synchronized) {}
        sub.get(name).is_some()
    })
    .await
    .unwrap_or(false);
    if assigned {
        bail!("{name} is assigned by the controller; change the assignment there");
    }
    bail!("no module {name} is attached locally");
}

/// `verify TARGET`: the verifier's checks on a registry reference or a built module. Exit 0
/// if it passes, 1 if it is rejected (the reason on stdout, or in `detail` with `--json`) or
/// cannot be checked (the error on stderr).
pub async fn verify(
    root: &Root,
    settings: &Settings,
    target: &str,
    policy_name: Option<&str>,
    json: bool,
) -> anyhow::Result<Exit> {
    let policy_name = policy_name.unwrap_or(&settings.modules.trust_policy);
    let tmp = tempfile::tempdir().context("creating a temporary store")?;
    let pulled = if Path::new(target).exists() || target.ends_with(".json") {
        Pulled::Config(built_config(target, policy_name)?)
    } else {
        pulled_config(root, settings, target, tmp.path(), policy_name).await?
    };
    let verdict = match pulled {
        Pulled::Config(config) => {
            let policy = policy::load(&root.path(policy::DIR), policy_name)?;
            let (config, result) = tokio::task::spawn_blocking(move || {
                let r = check::check(&config, &policy, SystemTime::now());
                (config, r)
            })
            .await?;
            Verdict {
                digest: config.digest,
                manifest_digest: config.manifest_digest,
                outcome: result
                    .map(|v| format!("{}; fs-verity {}", v.signer, v.fsverity_digest))
                    .map_err(|e| e.to_string()),
            }
        }
        Pulled::Rejected(verdict) => verdict,
    };
    let ok = verdict.outcome.is_ok();
    let detail = match &verdict.outcome {
        Ok(d) | Err(d) => d,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "target": target,
                "digest": verdict.digest,
                "manifest_digest": verdict.manifest_digest,
                "verified": ok,
                "detail": detail,
            })
        );
    } else if ok {
        println!("verified {target}: {detail}");
    } else {
        println!("REJECTED {target}: {detail}");
    }
    Ok(if ok { Exit::Success } else { Exit::Failure })
}

/// What `verify` concluded: the image and manifest digests, and who signed it or why not.
struct Verdict {
    digest: String,
    manifest_digest: String,
    outcome: Result<String, String>,
}

/// A module made ready for the verifier's checks, or already rejected on the way.
enum Pulled {
    /// Ready: the image is in a store (or built) and the config describes it.
    Config(VerifyConfig),
    /// The registry served an image that is not the one its manifest names: no check can
    /// pass, and saying so is the verdict, not a failure to reach one.
    Rejected(Verdict),
}

/// A module built by `powernode-controller module build` (path of any of its files): no
/// registry, so no signatures.
fn built_config(path: &str, policy: &str) -> anyhow::Result<VerifyConfig> {
    let built = powernode_modules::package::load_built(Path::new(path))?;
    let manifest = std::fs::read_to_string(&built.manifest)
        .with_context(|| format!("reading {}", built.manifest.display()))?;
    let size = std::fs::metadata(&built.image)
        .with_context(|| format!("reading {}", built.image.display()))?
        .len();
    Ok(VerifyConfig {
        name: built.module.name.clone(),
        image_path: built.image.to_string_lossy().into_owned(),
        digest: built.image_digest,
        size,
        complete: true,
        manifest,
        manifest_digest: built.manifest_digest,
        repository: String::new(),
        signatures: Vec::new(),
        signed_index: None,
        trust_policy: policy.to_owned(),
        attempt: 0,
    })
}

/// A module in a registry, pulled into `dir` for the check.
async fn pulled_config(
    root: &Root,
    settings: &Settings,
    reference: &str,
    dir: &Path,
    policy: &str,
) -> anyhow::Result<Pulled> {
    let registry = Registry::new(modulemgr::registry_config(&settings.modules, root)?);
    let (resolved, signatures) = registry
        .resolve_signed(reference, host_architecture())
        .await?;
    let store = Store::open(dir)?;
    let mut progress = |_: u64, _: u64| {};
    let pulled = registry
        .pull_blob(&resolved.repository, &resolved.image, &store, &mut progress)
        .await;
    let path = match pulled {
        Ok(path) => path,
        Err(RegistryError::Store(e @ StoreError::DigestMismatch { .. })) => {
            return Ok(Pulled::Rejected(Verdict {
                digest: resolved.image.digest.clone(),
                manifest_digest: resolved.manifest_digest.to_string(),
                outcome: Err(format!("image: {e}")),
            }))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Pulled::Config(VerifyConfig {
        name: resolved.module.name.clone(),
        image_path: path.to_string_lossy().into_owned(),
        digest: resolved.image.digest.clone(),
        size: resolved.image.size,
        complete: true,
        manifest: resolved.manifest.clone(),
        manifest_digest: resolved.manifest_digest.to_string(),
        repository: resolved.repository.clone(),
        signatures,
        signed_index: resolved.signed_index.as_ref().map(ToString::to_string),
        trust_policy: policy.to_owned(),
        attempt: 0,
    }))
}

/// `target`'s `MountStatus`, from mountmgr if it answers, else from the checkpoint it left;
/// and whether it was live.
async fn mount_status(dirs: &Dirs, target: &str) -> anyhow::Result<(MountStatus, bool)> {
    let info = inspect::list(dirs)
        .into_iter()
        .find(|info| info.agent == MOUNTMGR && info.topic == MountStatus::NAME)
        .with_context(|| {
            format!("mountmgr has published no mount target (is it running?); wanted {target:?}")
        })?;
    let snapshot = inspect::snapshot(dirs, &info, crate::status::SNAPSHOT_TIMEOUT).await;
    let live = matches!(snapshot.source, Source::Live { .. });
    let item = snapshot.items.get(target).with_context(|| {
        let known: Vec<&str> = snapshot.items.keys().map(String::as_str).collect();
        format!(
            "no mount target {target:?} (mountmgr has: {})",
            known.join(", ")
        )
    })?;
    let status = crate::status::decode::<MountStatus>(item)
        .map_err(|e| anyhow::anyhow!("the MountStatus of {target:?}: {e}"))?;
    Ok((status, live))
}

/// The agent that publishes `MountStatus`.
const MOUNTMGR: &str = "mountmgr";

/// What `commit` makes.
#[derive(Debug)]
pub struct CommitArgs {
    /// The mount target whose writes are captured.
    pub target: String,
    /// The new module's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its priority.
    pub priority: u32,
    /// Where the image and manifests go.
    pub out: std::path::PathBuf,
    /// Push to this `registry/repository:tag`.
    pub push: Option<String>,
    /// Print JSON.
    pub json: bool,
}

/// `commit`: the active stack's upper directory as a new module.
pub async fn commit(root: &Root, settings: &Settings, args: CommitArgs) -> anyhow::Result<Exit> {
    let dirs = Dirs::under_root(root.base());
    let (status, live) = mount_status(&dirs, &args.target).await?;
    if !live {
        // The stack outlives its agent (mountmgr leaves it mounted when it stops or dies),
        // so the directory its last status names is still the one written to.
        eprintln!(
            "mountmgr is not running: taking the upper directory of {:?} from its last status",
            args.target
        );
    }
    let slot = status
        .slot
        .with_context(|| format!("target {:?} has no active stack", args.target))?;
    let upper_dir = status.upper_dir.with_context(|| {
        format!(
            "mountmgr does not say where the writes of {:?} are",
            args.target
        )
    })?;
    if !Path::new(&upper_dir).is_dir() {
        bail!(
            "the upper directory of {:?}, {upper_dir}, is not there (is its stack still mounted? \
             `powernode-agent status` shows)",
            args.target
        );
    }
    let request = modulemgr::commit::CommitRequest {
        name: args.name.clone(),
        version: args.version.clone(),
        priority: args.priority,
        push: args.push.clone(),
    };
    let registry = Registry::new(modulemgr::registry_config(&settings.modules, root)?);
    let modulemgr::commit::Committed { built, pushed } =
        modulemgr::commit::commit(PathBuf::from(&upper_dir), &args.out, &request, &registry)
            .await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "built": built,
                "pushed": pushed,
                "slot": format!("{slot:?}"),
                "upper_dir": upper_dir,
                "mountmgr_running": live,
            })
        );
    } else {
        println!(
            "committed the writes of {} (slot {slot:?}) as {} {}: {} ({} files)",
            args.target,
            args.name,
            args.version,
            built.image.display(),
            built.module.files.len()
        );
        if let Some(p) = &pushed {
            println!("pushed {} ({})", p.reference, p.index_digest);
        }
    }
    Ok(Exit::Success)
}
