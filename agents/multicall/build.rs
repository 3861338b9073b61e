//! Records what the binary is built from, for `powernode-agent version`:
//! `POWERNODE_GIT_SHA` (`git rev-parse --short HEAD`, or `unknown` outside a git checkout) and
//! `POWERNODE_RUSTC_VERSION` (`$RUSTC --version`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());

    let sha = git(&manifest_dir, &["rev-parse", "--short", "HEAD"]);
    println!(
        "cargo:rustc-env=POWERNODE_GIT_SHA={}",
        sha.as_deref().unwrap_or("unknown")
    );
    // Rebuild when HEAD moves: HEAD itself (checkout), and the branch it points to (commit),
    // whether that ref is a loose file (watched with its directory, so a new one is noticed)
    // or packed.
    println!("cargo:rerun-if-changed=build.rs");
    let mut watched = vec![
        git_path(&manifest_dir, "HEAD"),
        git_path(&manifest_dir, "packed-refs"),
    ];
    if let Some(branch) = git(&manifest_dir, &["symbolic-ref", "-q", "HEAD"]) {
        let loose = git_path(&manifest_dir, &branch);
        watched.push(loose.as_deref().and_then(Path::parent).map(Path::to_owned));
    }
    // A path that does not exist would make cargo rerun this script on every build.
    for path in watched.into_iter().flatten().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=POWERNODE_RUSTC_VERSION={version}");
}

/// The trimmed stdout of `git -C dir args`, if git ran and succeeded.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()
        .filter(|out| out.status.success())?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Where git keeps `name` (e.g. `HEAD`, `refs/heads/main`), worktrees included.
fn git_path(dir: &Path, name: &str) -> Option<PathBuf> {
    git(dir, &["rev-parse", "--git-path", name]).map(|p| dir.join(p))
}
