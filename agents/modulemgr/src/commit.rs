//! Capturing what was written into the mounted stack as a new module: the `module.commit`
//! task and `powernode-agent commit` (docs/modules.md, "Committing the writes").
//!
//! The active stack's upper directory — new and changed files, and overlayfs whiteouts for
//! deleted ones — is made into an erofs image with its manifests, and, when asked, pushed
//! to a registry as `repository:tag`. mountmgr says where that directory is
//! (`MountStatus.upper_dir`); nothing here knows its layout.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use powernode_modules::format::host_architecture;
use powernode_modules::package::{self, BuildOptions, Built, Pushed};
use powernode_modules::registry::{self, Registry};
use serde::Serialize;

/// The priority a committed module's manifest gives when none is asked for: above the
/// modules of a usual stack, since its files are changes to theirs.
pub const DEFAULT_PRIORITY: u32 = 60;

/// What to make of the writes.
#[derive(Debug, Clone)]
pub struct CommitRequest {
    /// The new module's name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its stacking priority.
    pub priority: u32,
    /// Push it to this `registry/repository:tag`.
    pub push: Option<String>,
}

/// What a commit made.
#[derive(Debug, Serialize)]
pub struct Committed {
    /// The image and manifests on disk.
    pub built: Built,
    /// Where it was pushed, if it was.
    pub pushed: Option<Pushed>,
}

/// Builds `request` from `upper_dir` into `out`, then pushes it when asked.
pub async fn commit(
    upper_dir: PathBuf,
    out: &Path,
    request: &CommitRequest,
    registry: &Registry,
) -> anyhow::Result<Committed> {
    // Checked before the (slow) build, so a bad reference fails at once.
    let destination = match &request.push {
        None => None,
        Some(to) => {
            let reference = registry::parse_reference(to)?;
            let tag = reference
                .tag()
                .with_context(|| format!("{to}: give a tag to push to (…:TAG)"))?
                .to_owned();
            Some((registry::repository_of(&reference), tag))
        }
    };
    let options = BuildOptions {
        name: request.name.clone(),
        version: request.version.clone(),
        priority: request.priority,
        architecture: host_architecture().to_owned(),
        dependencies: Vec::new(),
        services: Vec::new(),
        health_check: None,
    };
    let out_dir = out.to_owned();
    let built = tokio::task::spawn_blocking(move || package::build(&upper_dir, &options, &out_dir))
        .await??;
    let pushed = match destination {
        None => None,
        Some((repository, tag)) => {
            Some(package::push(registry, &repository, &tag, std::slice::from_ref(&built)).await?)
        }
    };
    Ok(Committed { built, pushed })
}
