//! Benchmark: switches of a stack at the mount path under a reader (docs/performance.md).
//!
//!   cargo run --release -p mountmgr --example bench-switch -- DIR [SWITCHES]
//!
//! Runs mountmgr in-process on a node root made in `DIR` (its `run/` on a tmpfs, as on a node),
//! with `[mounts] mount_path = "/opt/powernode"`, and switches its target between two one-layer
//! stacks (erofs images made with `mkfs.erofs`) `SWITCHES` times (default 1000), each answered
//! before the next, while a thread opens and reads a file at the mount path in a tight loop.
//! Prints one JSON object: `switches`, `switch_gap_failures` (opens or reads that failed or
//! found neither stack's file), `reads`, `switch_ms` (median, from publishing the
//! `MountConfig` to its `Mounted` answer) and `switch_ms_p95`, and `move_beneath` (whether the
//! kernel switched beneath, or the path was a symlink). Needs root. Everything it mounted is
//! unmounted before it returns, also on failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agentbase::{Context, Root, Settings};
use mountmgr::mountinfo;
use powernode_pubsub::{Dirs, Publication, Subscription};
use powernode_types::{MountConfig, MountLayer, MountState, MountStatus, UpperMode};

#[path = "../tests/common/reader.rs"]
mod reader;

const TARGET: &str = "bench";
const WAIT: Duration = Duration::from_secs(60);

/// Unmounts everything below the root when dropped (lazily, deepest first).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let Ok(entries) = mountinfo::read() else {
            return;
        };
        let below = mountinfo::under(&entries, &self.0);
        for entry in mountinfo::unmount_order(&below) {
            let _ = nix::mount::umount2(&entry.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn image(root: &Path, name: &str) -> Result<PathBuf, String> {
    let src = root.join("src").join(name);
    std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
    std::fs::write(src.join("probe.txt"), name).map_err(|e| e.to_string())?;
    let image = root.join("store").join(format!("{name}.erofs"));
    std::fs::create_dir_all(root.join("store")).map_err(|e| e.to_string())?;
    let out = Command::new("mkfs.erofs")
        .arg(&image)
        .arg(&src)
        .output()
        .map_err(|e| format!("mkfs.erofs: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mkfs.erofs: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(image)
}

fn config(generation: u64, name: &str, image: &Path) -> MountConfig {
    MountConfig {
        target: TARGET.to_owned(),
        generation,
        layers: vec![MountLayer {
            name: name.to_owned(),
            image_path: image.display().to_string(),
            digest: format!("sha256:{name}"),
            priority: 1,
            health_check: None,
        }],
        upper: UpperMode::Tmpfs,
    }
}

async fn answered(status: &mut Subscription<MountStatus>, generation: u64) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(s) = status.get(TARGET) {
            if s.generation == generation && s.state != MountState::Mounting {
                return match s.state {
                    MountState::Mounted => Ok(()),
                    _ => Err(format!("generation {generation}: {s:?}")),
                };
            }
        }
        tokio::time::timeout_at(deadline, status.next())
            .await
            .map_err(|_| format!("generation {generation} not answered"))?;
    }
}

async fn bench(root: &Path, switches: u64) -> Result<String, String> {
    let etc = root.join("etc/powernode");
    std::fs::create_dir_all(&etc).map_err(|e| e.to_string())?;
    std::fs::write(
        etc.join("agent.toml"),
        format!(
            "[modules]\nmount_target = \"{TARGET}\"\n[mounts]\nmount_path = \"/opt/powernode\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let run = root.join("run");
    std::fs::create_dir_all(&run).map_err(|e| e.to_string())?;
    nix::mount::mount(
        Some("tmpfs"),
        &run,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| format!("mounting a tmpfs at {}: {e}", run.display()))?;
    let x = image(root, "x")?;
    let y = image(root, "y")?;

    let dirs = Dirs::under_root(root);
    let configs =
        Publication::<MountConfig>::open(&dirs, "modulemgr").map_err(|e| e.to_string())?;
    let settings = Settings::load(&Root::new(root)).map_err(|e| e.to_string())?;
    let ctx = Context::new("mountmgr", Root::new(root), settings).map_err(|e| e.to_string())?;
    let agent = tokio::spawn(mountmgr::run(ctx.clone()));
    let mut status = Subscription::<MountStatus>::connect(&dirs, "mountmgr");
    configs
        .publish(&config(1, "x", &x))
        .map_err(|e| e.to_string())?;
    answered(&mut status, 1).await?;
    let probe = root.join("opt/powernode/probe.txt");
    let move_beneath =
        std::fs::symlink_metadata(root.join("opt/powernode")).is_ok_and(|m| m.is_dir());

    let reader = reader::Reader::start(probe, &["x", "y"]);
    let mut times = Vec::new();
    let mut result = Ok(());
    for i in 0..switches {
        let (name, image) = if i % 2 == 0 { ("y", &y) } else { ("x", &x) };
        let started = Instant::now();
        let published = configs
            .publish(&config(i + 2, name, image))
            .map_err(|e| e.to_string());
        result = match published {
            Ok(()) => answered(&mut status, i + 2).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            break;
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (failures, reads) = reader.stop();
    ctx.shutdown.cancel();
    let _ = agent.await;
    result?;
    let mut ms = |q: f64| (reader::quantile(&mut times, q) * 100.0).round() / 100.0;
    Ok(serde_json::json!({
        "switches": switches,
        "switch_gap_failures": failures,
        "reads": reads,
        "switch_ms": ms(0.5),
        "switch_ms_p95": ms(0.95),
        "move_beneath": move_beneath,
    })
    .to_string())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        eprintln!("usage: bench-switch DIR [SWITCHES]");
        std::process::exit(2);
    };
    let switches = match args.next().map(|n| n.parse::<u64>()) {
        None => 1000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("bench-switch: SWITCHES must be a positive number");
            std::process::exit(2);
        }
    };
    let root = PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&root) {
        eprintln!("bench-switch: {}: {e}", root.display());
        std::process::exit(1);
    }
    let root = match std::fs::canonicalize(&root) {
        Ok(root) => root,
        Err(e) => {
            eprintln!("bench-switch: {e}");
            std::process::exit(1);
        }
    };
    let _unmount = Unmount(root.clone());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-switch: {e}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(bench(&root, switches)) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("bench-switch: {e}");
            drop(runtime);
            drop(_unmount);
            std::process::exit(1);
        }
    }
}
