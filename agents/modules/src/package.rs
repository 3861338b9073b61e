//! Making modules: an erofs image built by the real `mkfs.erofs` from a directory, its module
//! manifest and OCI platform manifest, and the upload of one or more platforms under an index.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::format::{
    Descriptor, FileSpec, HealthCheckSpec, ImageIndex, ImageManifest, ModuleManifest, Platform,
    ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, FSVERITY_ANNOTATION, LAYER_MEDIA_TYPE, OCI_INDEX,
    OCI_MANIFEST,
};
use crate::fsverity;
use crate::registry::{Registry, RegistryError};

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Module name.
    pub name: String,
    /// Module version.
    pub version: String,
    /// Default priority.
    pub priority: u32,
    /// OCI architecture of the contents.
    pub architecture: String,
    /// Modules it needs.
    pub dependencies: Vec<String>,
    /// systemd units it provides.
    pub services: Vec<String>,
    /// Its health check.
    pub health_check: Option<HealthCheckSpec>,
}

/// Why a module could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `mkfs.erofs` could not run or failed.
    #[error("mkfs.erofs: {0}")]
    Mkfs(String),
    /// The options are not usable.
    #[error("{0}")]
    Invalid(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BuildError + 'a {
    move |source| BuildError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A built module, as written next to each other in the output directory:
/// `<stem>.erofs`, `<stem>.config.json`, `<stem>.manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Built {
    /// The erofs image.
    pub image: PathBuf,
    /// The module manifest file (config blob).
    pub config: PathBuf,
    /// The OCI platform manifest file.
    pub manifest: PathBuf,
    /// The image's digest.
    pub image_digest: String,
    /// The image's fs-verity digest.
    pub fsverity_digest: String,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// The module manifest.
    pub module: ModuleManifest,
}

/// Checks a module or version name: it becomes part of file names and tags (the rule of
/// [`crate::format::is_module_name`]).
fn check_name(what: &str, value: &str) -> Result<(), BuildError> {
    if crate::format::is_module_name(value) {
        Ok(())
    } else {
        Err(BuildError::Invalid(format!(
            "{what} {value:?} must be 1-128 characters of letters, digits, '-', '_', '.', not starting with '.'"
        )))
    }
}

/// Lists the regular files and symlinks under `dir`, sorted, for the module manifest.
fn file_specs(dir: &Path) -> Result<Vec<FileSpec>, BuildError> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<FileSpec>) -> Result<(), BuildError> {
        for entry in fs::read_dir(dir).map_err(io("listing", dir))? {
            let entry = entry.map_err(io("listing", dir))?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(io("reading", &path))?;
            if meta.is_dir() {
                walk(base, &path, out)?;
                continue;
            }
            let rel = path
                .strip_prefix(base)
                .map_err(|_| BuildError::Invalid(format!("{} escapes the tree", path.display())))?;
            out.push(FileSpec {
                path: rel.to_string_lossy().into_owned(),
                mode: meta.permissions().mode() & 0o7777,
                size: if meta.file_type().is_symlink() {
                    0
                } else {
                    meta.size()
                },
            });
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Makes an erofs image of `dir` at `image` with `mkfs.erofs`. Timestamps are fixed and the
/// UUID is zero so the same tree gives the same image (and digest) every time.
pub fn make_erofs(dir: &Path, image: &Path) -> Result<(), BuildError> {
    let output = Command::new("mkfs.erofs")
        .arg("-T0")
        .arg("-U00000000-0000-0000-0000-000000000000")
        .arg("--all-root")
        .arg(image)
        .arg(dir)
        .output()
        .map_err(|e| {
            BuildError::Mkfs(format!(
                "cannot run it ({e}); install erofs-utils (Debian: apt-get install erofs-utils)"
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(BuildError::Mkfs(format!(
            "{} on {}: {}",
            output.status,
            dir.display(),
            stderr.trim()
        )));
    }
    Ok(())
}

/// Builds module `options` from `dir` into `out_dir`.
pub fn build(dir: &Path, options: &BuildOptions, out_dir: &Path) -> Result<Built, BuildError> {
    check_name("name", &options.name)?;
    check_name("version", &options.version)?;
    check_name("architecture", &options.architecture)?;
    if !dir.is_dir() {
        return Err(BuildError::Invalid(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    fs::create_dir_all(out_dir).map_err(io("creating", out_dir))?;
    let stem = format!(
        "{}-{}-{}",
        options.name, options.version, options.architecture
    );
    let image = out_dir.join(format!("{stem}.erofs"));
    make_erofs(dir, &image)?;

    let image_bytes = fs::read(&image).map_err(io("reading", &image))?;
    let image_digest = Digest::of(&image_bytes);
    let mut hasher = fsverity::Hasher::new();
    hasher.update(&image_bytes);
    let fsverity_digest = hasher.finish().to_string();

    let module = ModuleManifest {
        name: options.name.clone(),
        version: options.version.clone(),
        priority: options.priority,
        architecture: options.architecture.clone(),
        dependencies: options.dependencies.clone(),
        services: options.services.clone(),
        files: file_specs(dir)?,
        health_check: options.health_check.clone(),
    };
    let config_bytes = serde_json::to_vec_pretty(&module)
        .map_err(|e| BuildError::Invalid(format!("encoding the module manifest: {e}")))?;
    let annotations = BTreeMap::from([
        (FSVERITY_ANNOTATION.to_owned(), fsverity_digest.clone()),
        (
            "org.opencontainers.image.title".to_owned(),
            options.name.clone(),
        ),
        (
            "org.opencontainers.image.version".to_owned(),
            options.version.clone(),
        ),
    ]);
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config: Descriptor {
            media_type: CONFIG_MEDIA_TYPE.into(),
            digest: Digest::of(&config_bytes).to_string(),
            size: config_bytes.len() as u64,
            artifact_type: None,
            platform: None,
            annotations: BTreeMap::new(),
        },
        layers: vec![Descriptor {
            media_type: LAYER_MEDIA_TYPE.into(),
            digest: image_digest.to_string(),
            size: image_bytes.len() as u64,
            artifact_type: None,
            platform: None,
            annotations: BTreeMap::from([(
                FSVERITY_ANNOTATION.to_owned(),
                fsverity_digest.clone(),
            )]),
        }],
        annotations,
    };
    let manifest_bytes = serde_json::to_vec(&manifest)
        .map_err(|e| BuildError::Invalid(format!("encoding the OCI manifest: {e}")))?;
    let config = out_dir.join(format!("{stem}.config.json"));
    let manifest_path = out_dir.join(format!("{stem}.manifest.json"));
    fs::write(&config, &config_bytes).map_err(io("writing", &config))?;
    fs::write(&manifest_path, &manifest_bytes).map_err(io("writing", &manifest_path))?;
    Ok(Built {
        image,
        config,
        manifest: manifest_path,
        image_digest: image_digest.to_string(),
        fsverity_digest,
        manifest_digest: Digest::of(&manifest_bytes).to_string(),
        module,
    })
}

/// Reads back a module built by [`build`] from its `<stem>.manifest.json` (or `<stem>` path).
pub fn load_built(path: &Path) -> Result<Built, BuildError> {
    let text = path.to_string_lossy();
    let stem = text
        .strip_suffix(".manifest.json")
        .or_else(|| text.strip_suffix(".erofs"))
        .or_else(|| text.strip_suffix(".config.json"))
        .unwrap_or(&text)
        .to_owned();
    let image = PathBuf::from(format!("{stem}.erofs"));
    let config = PathBuf::from(format!("{stem}.config.json"));
    let manifest = PathBuf::from(format!("{stem}.manifest.json"));
    let manifest_bytes = fs::read(&manifest).map_err(io("reading", &manifest))?;
    let parsed = ImageManifest::parse_module(&manifest_bytes)
        .map_err(|e| BuildError::Invalid(format!("{}: {e}", manifest.display())))?;
    let config_bytes = fs::read(&config).map_err(io("reading", &config))?;
    if Digest::of(&config_bytes).to_string() != parsed.config.digest {
        return Err(BuildError::Invalid(format!(
            "{} does not match its manifest",
            config.display()
        )));
    }
    let module = ModuleManifest::parse(&config_bytes)
        .map_err(|e| BuildError::Invalid(format!("{}: {e}", config.display())))?;
    Ok(Built {
        image_digest: parsed.image().digest.clone(),
        fsverity_digest: parsed.fsverity_digest().unwrap_or_default().to_owned(),
        manifest_digest: Digest::of(&manifest_bytes).to_string(),
        image,
        config,
        manifest,
        module,
    })
}

/// What [`push`] uploaded.
#[derive(Clone, Debug, Serialize)]
pub struct Pushed {
    /// `registry/repository:tag`.
    pub reference: String,
    /// The index's digest: pin assignments to `repository@<this>`.
    pub index_digest: String,
    /// Each platform's manifest digest, by architecture.
    pub manifests: BTreeMap<String, String>,
}

/// Uploads built modules (one per architecture, same name and version) to `repository`
/// under `tag`: each image and config blob, each platform manifest, then the index.
pub async fn push(
    registry: &Registry,
    repository: &str,
    tag: &str,
    built: &[Built],
) -> Result<Pushed, PushError> {
    let first = built
        .first()
        .ok_or_else(|| PushError::Invalid("nothing to push".into()))?;
    let mut entries = Vec::new();
    let mut manifests = BTreeMap::new();
    for b in built {
        if b.module.name != first.module.name || b.module.version != first.module.version {
            return Err(PushError::Invalid(format!(
                "{} {} and {} {} cannot share one index",
                first.module.name, first.module.version, b.module.name, b.module.version
            )));
        }
        if manifests.contains_key(&b.module.architecture) {
            return Err(PushError::Invalid(format!(
                "two images for architecture {}",
                b.module.architecture
            )));
        }
        let image = fs::read(&b.image)
            .map_err(|e| PushError::Invalid(format!("reading {}: {e}", b.image.display())))?;
        let config = fs::read(&b.config)
            .map_err(|e| PushError::Invalid(format!("reading {}: {e}", b.config.display())))?;
        let manifest = fs::read(&b.manifest)
            .map_err(|e| PushError::Invalid(format!("reading {}: {e}", b.manifest.display())))?;
        let image_digest = registry.push_blob(repository, image).await?;
        if image_digest.to_string() != b.image_digest {
            return Err(PushError::Invalid(format!(
                "{} changed since it was built",
                b.image.display()
            )));
        }
        registry.push_blob(repository, config).await?;
        let size = manifest.len() as u64;
        let digest = registry
            .push_manifest(repository, None, manifest, OCI_MANIFEST)
            .await?;
        manifests.insert(b.module.architecture.clone(), digest.to_string());
        entries.push(Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: digest.to_string(),
            size,
            artifact_type: Some(ARTIFACT_TYPE.into()),
            platform: Some(Platform {
                architecture: b.module.architecture.clone(),
                os: "linux".into(),
            }),
            annotations: BTreeMap::new(),
        });
    }
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(OCI_INDEX.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        manifests: entries,
    };
    let index_bytes = serde_json::to_vec(&index)
        .map_err(|e| PushError::Invalid(format!("encoding the index: {e}")))?;
    let index_digest = registry
        .push_manifest(repository, Some(tag), index_bytes, OCI_INDEX)
        .await?;
    Ok(Pushed {
        reference: format!("{repository}:{tag}"),
        index_digest: index_digest.to_string(),
        manifests,
    })
}

/// Why an upload failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The input is not usable.
    #[error("{0}")]
    Invalid(String),
}

/// One digest [`sign`] signed.
#[derive(Clone, Debug, Serialize)]
pub struct Signed {
    /// What it is: `index`, `manifest`, or a platform's architecture.
    pub what: String,
    /// The manifest or index digest signed.
    pub digest: String,
    /// The tag the signature manifest is stored under.
    pub signature_tag: String,
    /// How many signatures that tag holds now.
    pub signatures: usize,
    /// Whether a valid signature by this key was there already (nothing was pushed).
    pub already_signed: bool,
}

/// Signs what `reference` names with `key`, the way `cosign sign --recursive` does: the
/// index (or manifest) digest and, for an index, every platform manifest's digest. Each
/// signature joins the `sha256-<hex>.sig` manifest beside it; the signatures there are kept,
/// and a digest that already has a valid signature by this key is left alone (ECDSA signatures
/// differ every time, so "the same signature" means "one this key made").
pub async fn sign(
    registry: &Registry,
    reference: &str,
    key: &crate::cosign::SigningKey,
) -> Result<Vec<Signed>, PushError> {
    let signer = crate::cosign::Signer {
        key,
        certificate: None,
        log: None,
    };
    sign_with(registry, reference, &signer, None).await
}

/// [`sign`] with any [`Signer`](crate::cosign::Signer): a key, or a key with its certificate
/// and chain and a log bundle (`cosign sign --certificate … --certificate-chain …`). The
/// payloads name `identity` if given (cosign's `--sign-container-identity`: a repository the
/// module is known by elsewhere), else the repository of `reference`. A digest that already
/// has a valid signature by this key, naming the same repository and carrying the same
/// certificate, is left alone.
pub async fn sign_with(
    registry: &Registry,
    reference: &str,
    signer: &crate::cosign::Signer<'_>,
    identity: Option<&str>,
) -> Result<Vec<Signed>, PushError> {
    use crate::registry::{parse_reference, repository_of};

    let (bytes, digest) = registry.fetch_manifest(reference).await?;
    let repository = repository_of(&parse_reference(reference)?);
    let identity = match identity {
        None => repository.clone(),
        Some(identity) => {
            let parsed = parse_reference(identity)?;
            if parsed.digest().is_some() {
                return Err(PushError::Invalid(format!(
                    "the container identity {identity} names a digest; name a repository"
                )));
            }
            repository_of(&parsed)
        }
    };
    let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("mediaType")?.as_str().map(str::to_owned));
    let mut targets = Vec::new();
    if media_type.as_deref() == Some(OCI_INDEX) {
        targets.push(("index".to_owned(), digest));
        let index = ImageIndex::parse(&bytes).map_err(RegistryError::from)?;
        for entry in &index.manifests {
            let what = entry
                .platform
                .as_ref()
                .map_or_else(|| "manifest".to_owned(), |p| p.architecture.clone());
            targets.push((
                what,
                Digest::parse(&entry.digest).map_err(RegistryError::from)?,
            ));
        }
    } else {
        ImageManifest::parse_module(&bytes).map_err(RegistryError::from)?;
        targets.push(("manifest".to_owned(), digest));
    }
    let mut signed = Vec::new();
    for (what, digest) in targets {
        let mut one = sign_one(registry, signer, &repository, &identity, &digest).await?;
        one.what = what;
        signed.push(one);
    }
    Ok(signed)
}

/// Stores `signatures` as the signature manifest of `manifest_digest` in `repository`
/// (tag `sha256-<hex>.sig`), replacing what that tag held: how [`sign`] stores them, and how
/// `cosign copy` carries signatures to another repository unchanged.
pub async fn store_signatures(
    registry: &Registry,
    repository: &str,
    manifest_digest: &str,
    signatures: &[powernode_types::CosignSignature],
) -> Result<(), PushError> {
    use crate::cosign;

    let tag = cosign::signature_tag(manifest_digest)
        .map_err(|e| PushError::Invalid(format!("{manifest_digest}: {e}")))?;
    let upload = cosign::signature_manifest(signatures);
    registry.push_blob(repository, upload.config.data).await?;
    for layer in upload.layers {
        registry.push_blob(repository, layer.data).await?;
    }
    registry
        .push_manifest(repository, Some(&tag), upload.manifest, OCI_MANIFEST)
        .await?;
    Ok(())
}

async fn sign_one(
    registry: &Registry,
    signer: &crate::cosign::Signer<'_>,
    repository: &str,
    identity: &str,
    digest: &Digest,
) -> Result<Signed, PushError> {
    use crate::cosign;

    let digest_text = digest.to_string();
    let invalid = |e: cosign::Error| PushError::Invalid(format!("{digest_text}: {e}"));
    let tag = cosign::signature_tag(&digest_text).map_err(invalid)?;
    let mut signatures = registry.signatures(repository, digest).await?;
    if !signatures.is_empty() {
        // Rewriting the manifest must not drop signatures that could not be read.
        let (bytes, _) = registry
            .fetch_manifest(&format!("{repository}:{tag}"))
            .await?;
        let manifest: ImageManifest = serde_json::from_slice(&bytes).map_err(|e| {
            PushError::Invalid(format!("{repository}:{tag} is not an image manifest: {e}"))
        })?;
        let present = cosign::signature_layers(&manifest).len();
        if present != signatures.len() {
            return Err(PushError::Invalid(format!(
                "{repository}:{tag} holds {present} signatures but only {} could be read; not rewriting it",
                signatures.len()
            )));
        }
    }
    let own = cosign::Policy {
        keys: vec![signer.key.public_key().clone()],
        keyless: None,
        require_signature: true,
        signed_references: Vec::new(),
    };
    let certificate = signer
        .certificate
        .map(cosign::SigningCertificate::certificate);
    let already_signed = signatures.iter().any(|existing| {
        existing.certificate.as_deref().map(str::trim) == certificate.map(str::trim)
            && cosign::verify(
                &own,
                identity,
                &digest_text,
                std::slice::from_ref(existing),
                std::time::SystemTime::now(),
            )
            .is_ok()
    });
    if !already_signed {
        if signatures.len() >= cosign::MAX_SIGNATURES {
            return Err(PushError::Invalid(format!(
                "{repository}:{tag} already holds {} signatures, the most a node checks",
                signatures.len()
            )));
        }
        let signature = cosign::sign(signer, identity, &digest_text, std::time::SystemTime::now())
            .map_err(invalid)?;
        signatures.push(signature);
        store_signatures(registry, repository, &digest_text, &signatures).await?;
        tracing::info!(repository, digest = %digest, tag, "signed");
    }
    Ok(Signed {
        what: String::new(),
        digest: digest_text,
        signature_tag: tag,
        signatures: signatures.len(),
        already_signed,
    })
}
