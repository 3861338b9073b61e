//! The last resolution of each module reference, kept on disk so that a node that boots
//! without its registry still brings up the modules it already has.
//!
//! One file per reference and architecture under `persist/powernode/modulemgr/resolved/`,
//! holding what resolving pulled: the platform manifest and the module manifest exactly as
//! pulled, the index digest and the cosign signatures. Nothing in it is trusted: loading puts
//! the parts together through [`Resolved::from_parts`] (the module manifest must hash to the
//! digest the manifest names), and the verifier checks the manifest against its signatures and
//! the image against the manifest as for any download. A file that does not load is ignored.

use std::path::{Path, PathBuf};

use powernode_modules::digest::Digest;
use powernode_modules::registry::{parse_reference, repository_of, Resolved};
use powernode_types::CosignSignature;
use serde::{Deserialize, Serialize};

/// Where the files live, under the root.
pub const DIR: &str = "persist/powernode/modulemgr/resolved";

/// The largest file that is read (a manifest, a module manifest and a few signatures).
const MAX_BYTES: u64 = 4 << 20;

/// What one file holds.
#[derive(Serialize, Deserialize)]
struct Entry {
    reference: String,
    architecture: String,
    repository: String,
    manifest: String,
    index_digest: Option<String>,
    /// [`Resolved::signed_index`]: only the index was signed. A hint for the verifier's
    /// error message, so a node started without its registry still says to sign
    /// recursively. Absent from files written before it was kept.
    #[serde(default)]
    signed_index: Option<String>,
    config: String,
    signatures: Vec<CosignSignature>,
}

/// The files under one directory.
#[derive(Clone, Debug)]
pub struct LastKnown {
    dir: PathBuf,
}

impl LastKnown {
    /// The files under `dir`.
    pub fn new(dir: PathBuf) -> LastKnown {
        LastKnown { dir }
    }

    fn path(&self, reference: &str, architecture: &str) -> PathBuf {
        let name = Digest::of(format!("{reference}\n{architecture}").as_bytes());
        self.dir.join(format!("{}.json", name.hex()))
    }

    /// Keeps `resolved` and `signatures` as the last resolution of `reference`.
    pub fn save(
        &self,
        reference: &str,
        architecture: &str,
        resolved: &Resolved,
        signatures: &[CosignSignature],
    ) -> std::io::Result<()> {
        let entry = Entry {
            reference: reference.to_owned(),
            architecture: architecture.to_owned(),
            repository: resolved.repository.clone(),
            manifest: resolved.manifest.clone(),
            index_digest: resolved.index_digest.as_ref().map(ToString::to_string),
            signed_index: resolved.signed_index.as_ref().map(ToString::to_string),
            config: resolved.config.clone(),
            signatures: signatures.to_vec(),
        };
        let json = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        agentbase::fsutil::write_atomic(&self.path(reference, architecture), &json, 0o600)
    }

    /// Removes the kept resolutions of every reference not in `references` (with
    /// `architecture`): a module unassigned, or assigned another tag, no longer needs its own.
    pub fn retain(&self, references: &[&str], architecture: &str) {
        let keep: std::collections::HashSet<PathBuf> = references
            .iter()
            .map(|r| self.path(r, architecture))
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") && !keep.contains(&path) {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a kept resolution");
                }
            }
        }
    }

    /// The last resolution of `reference` for `architecture`, if one was kept and still holds
    /// together.
    pub fn load(
        &self,
        reference: &str,
        architecture: &str,
    ) -> Option<(Resolved, Vec<CosignSignature>)> {
        let path = self.path(reference, architecture);
        match read(&path, reference, architecture) {
            Ok(found) => found,
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "ignoring the kept resolution");
                None
            }
        }
    }
}

fn read(
    path: &Path,
    reference: &str,
    architecture: &str,
) -> Result<Option<(Resolved, Vec<CosignSignature>)>, String> {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(format!("larger than {MAX_BYTES} bytes"));
    }
    let entry: Entry = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if entry.reference != reference || entry.architecture != architecture {
        return Err(format!(
            "it is for {} ({}), not this reference",
            entry.reference, entry.architecture
        ));
    }
    // The repository is what signatures must name: it must be the reference's own.
    let parsed = parse_reference(reference).map_err(|e| e.to_string())?;
    if entry.repository != repository_of(&parsed) {
        return Err(format!(
            "it names repository {}, not the reference's",
            entry.repository
        ));
    }
    let index_digest = entry
        .index_digest
        .as_deref()
        .map(Digest::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    let mut resolved = Resolved::from_parts(
        entry.repository,
        entry.manifest,
        index_digest,
        entry.config,
        architecture,
    )
    .map_err(|e| e.to_string())?;
    // Trusted for nothing but the wording of a rejection (the verifier checks the manifest
    // against its signatures whatever this says).
    resolved.signed_index = entry
        .signed_index
        .as_deref()
        .map(Digest::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    // A reference pinned to a digest must still name what was kept.
    if let Some(pinned) = parsed.digest() {
        let kept = resolved
            .index_digest
            .as_ref()
            .unwrap_or(&resolved.manifest_digest);
        if pinned != kept.to_string() {
            return Err(format!(
                "the reference is pinned to {pinned}, the kept one is {kept}"
            ));
        }
    }
    Ok(Some((resolved, entry.signatures)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::descriptor;
    use powernode_modules::format::{
        ImageManifest, ModuleManifest, ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, LAYER_MEDIA_TYPE,
        OCI_MANIFEST,
    };

    const REFERENCE: &str = "registry.test/modules/app:1";

    fn resolved(architecture: &str) -> Resolved {
        let config = serde_json::to_string(&ModuleManifest {
            name: "app".into(),
            version: "1".into(),
            priority: 10,
            architecture: architecture.into(),
            dependencies: Vec::new(),
            services: Vec::new(),
            files: Vec::new(),
            health_check: None,
        })
        .unwrap();
        let manifest = serde_json::to_string(&ImageManifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.into()),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: descriptor(CONFIG_MEDIA_TYPE, config.as_bytes()),
            layers: vec![descriptor(LAYER_MEDIA_TYPE, b"image")],
            annotations: Default::default(),
        })
        .unwrap();
        Resolved::from_parts(
            "registry.test/modules/app".into(),
            manifest,
            None,
            config,
            architecture,
        )
        .unwrap()
    }

    #[test]
    fn keeps_and_loads_a_resolution_per_reference_and_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let kept = LastKnown::new(dir.path().join("resolved"));
        assert!(kept.load(REFERENCE, "amd64").is_none());
        let resolved = resolved("amd64");
        kept.save(REFERENCE, "amd64", &resolved, &[]).unwrap();
        let (loaded, signatures) = kept.load(REFERENCE, "amd64").unwrap();
        assert_eq!(loaded.manifest_digest, resolved.manifest_digest);
        assert_eq!(loaded.image, resolved.image);
        assert_eq!(loaded.module, resolved.module);
        assert_eq!(loaded.signed_index, None);
        assert!(signatures.is_empty());
        assert!(kept.load(REFERENCE, "arm64").is_none());
        assert!(kept.load("registry.test/modules/app:2", "amd64").is_none());

        // Kept only while some module is assigned the reference.
        kept.retain(&[REFERENCE], "amd64");
        assert!(kept.load(REFERENCE, "amd64").is_some());
        kept.retain(&["registry.test/modules/app:2"], "amd64");
        assert!(kept.load(REFERENCE, "amd64").is_none());
    }

    /// An index-only signature found at the last pull is still named after a start without
    /// the registry, so the rejection says to sign recursively; a file from before the hint
    /// was kept loads without it.
    #[test]
    fn the_index_only_signature_hint_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let kept = LastKnown::new(dir.path().join("resolved"));
        let mut resolved = resolved("amd64");
        let index = Digest::of(b"the signed index");
        resolved.signed_index = Some(index.clone());
        kept.save(REFERENCE, "amd64", &resolved, &[]).unwrap();
        let (loaded, _) = kept.load(REFERENCE, "amd64").unwrap();
        assert_eq!(loaded.signed_index, Some(index));

        let path = kept.path(REFERENCE, "amd64");
        let mut old: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        old.as_object_mut().unwrap().remove("signed_index");
        std::fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();
        let (loaded, _) = kept.load(REFERENCE, "amd64").unwrap();
        assert_eq!(loaded.signed_index, None);
    }

    #[test]
    fn an_edited_file_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let kept = LastKnown::new(dir.path().to_owned());
        kept.save(REFERENCE, "amd64", &resolved("amd64"), &[])
            .unwrap();
        let path = kept.path(REFERENCE, "amd64");
        let text = std::fs::read_to_string(&path).unwrap();

        // The module manifest changed (a health check slipped in): no longer the one named.
        let mut entry: serde_json::Value = serde_json::from_str(&text).unwrap();
        let config = entry["config"]
            .as_str()
            .unwrap()
            .replace("\"priority\":10", "\"priority\":99");
        entry["config"] = config.into();
        std::fs::write(&path, entry.to_string()).unwrap();
        assert!(kept.load(REFERENCE, "amd64").is_none());

        // Another repository's signed manifest paired with this reference.
        let mut entry: serde_json::Value = serde_json::from_str(&text).unwrap();
        entry["repository"] = "registry.test/modules/other".into();
        std::fs::write(&path, entry.to_string()).unwrap();
        assert!(kept.load(REFERENCE, "amd64").is_none());

        // Another reference's file copied over this one.
        let mut entry: serde_json::Value = serde_json::from_str(&text).unwrap();
        entry["reference"] = "registry.test/other:1".into();
        std::fs::write(&path, entry.to_string()).unwrap();
        assert!(kept.load(REFERENCE, "amd64").is_none());

        std::fs::write(&path, b"{ torn").unwrap();
        assert!(kept.load(REFERENCE, "amd64").is_none());
    }

    #[test]
    fn a_pinned_reference_must_name_what_was_kept() {
        let dir = tempfile::tempdir().unwrap();
        let kept = LastKnown::new(dir.path().to_owned());
        let resolved = resolved("amd64");
        let pinned = format!("registry.test/modules/app@{}", resolved.manifest_digest);
        kept.save(&pinned, "amd64", &resolved, &[]).unwrap();
        assert!(kept.load(&pinned, "amd64").is_some());
        let other = format!("registry.test/modules/app@{}", Digest::of(b"other"));
        kept.save(&other, "amd64", &resolved, &[]).unwrap();
        assert!(kept.load(&other, "amd64").is_none());
    }
}
