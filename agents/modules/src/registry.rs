//! Registry access through `oci-client`: resolving a module reference for an architecture,
//! streaming its image into the [`Store`], reading its cosign signatures, and pushing.
//!
//! Manifests are pulled and pushed raw: what is verified (and signed) is the exact bytes, and
//! `oci-client`'s own manifest serialization is not used for writing (it writes invalid JSON for
//! values containing newlines).

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use powernode_types::CosignSignature;

use crate::digest::{Digest, DigestError};
use crate::format::{
    Descriptor, FormatError, ImageIndex, ImageManifest, ModuleManifest, MAX_METADATA_BYTES,
    OCI_INDEX, OCI_MANIFEST,
};
use crate::store::{Store, StoreError};

/// The largest signature payload read.
const MAX_PAYLOAD_BYTES: u64 = 64 * 1024;

/// How to reach registries.
#[derive(Clone, Debug, Default)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP: for tests and closed labs only.
    pub plain_http: Vec<String>,
    /// Credentials per registry.
    pub credentials: Vec<Credential>,
    /// Timeout to connect; reads time out after four times as long without data.
    pub connect_timeout: Option<Duration>,
}

/// A registry login.
#[derive(Clone, Debug)]
pub struct Credential {
    /// The registry, `host[:port]`.
    pub registry: String,
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("bad reference {reference:?}: {reason}")]
    BadReference {
        /// The text given.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The registry could not be reached or failed (5xx, timeouts): worth retrying.
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    /// The registry answered that the thing is not there.
    #[error("not found: {0}")]
    NotFound(String),
    /// The registry refused (auth, denied, bad request): retrying will not help.
    #[error("registry refused: {0}")]
    Refused(String),
    /// What came back is not a well-formed module.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A digest in the manifest is malformed.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// Content did not match its digest, or something else was inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// Writing to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RegistryError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable(_) => true,
            RegistryError::Store(StoreError::Io { .. }) => true,
            RegistryError::Store(StoreError::DigestMismatch { .. }) => false,
            _ => false,
        }
    }

    fn from_oci(what: &str, e: OciDistributionError) -> RegistryError {
        let text = format!("{what}: {}", chain(&e));
        match &e {
            OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => {
                RegistryError::Unreachable(text)
            }
            OciDistributionError::ServerError { code, .. } if *code >= 500 || *code == 429 => {
                RegistryError::Unreachable(text)
            }
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => RegistryError::NotFound(text),
            OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::BlobUnknown
                            | oci_client::errors::OciErrorCode::NameUnknown
                            | oci_client::errors::OciErrorCode::NotFound
                    )
                }) =>
            {
                RegistryError::NotFound(text)
            }
            OciDistributionError::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(e.code, oci_client::errors::OciErrorCode::Toomanyrequests)
                }) =>
            {
                RegistryError::Unreachable(text)
            }
            _ => RegistryError::Refused(text),
        }
    }
}

/// An error and its sources, `: `-joined (reqwest's own text names no cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Size of the pieces a download is written and hashed in.
const PIECE_BYTES: usize = 256 * 1024;
/// Pieces queued for the writer (the hashing thread has a queue of its own).
const PIECES_IN_FLIGHT: usize = 4;

/// The download's piece buffers, recycled: a piece handed on as `Bytes` comes back here when
/// both the writer and the hashing thread are done with it. Allocating a fresh 256 KiB buffer
/// per piece instead made the allocator's arenas grow by tens of MiB during a large download.
#[derive(Clone)]
struct PiecePool {
    free: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    keep: usize,
}

/// A piece on its way through the writer and the hasher; back to the pool when dropped.
struct Piece {
    data: Vec<u8>,
    pool: PiecePool,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        let mut data = std::mem::take(&mut self.data);
        data.clear();
        if let Ok(mut free) = self.pool.free.lock() {
            if free.len() < self.pool.keep {
                free.push(data);
            }
        }
    }
}

impl PiecePool {
    fn new(keep: usize) -> PiecePool {
        PiecePool {
            free: Default::default(),
            keep,
        }
    }

    /// An empty buffer of [`PIECE_BYTES`] capacity, recycled when one is free.
    fn take(&self) -> Vec<u8> {
        self.free
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_else(|| Vec::with_capacity(PIECE_BYTES))
    }

    /// `data` as shareable bytes that return to the pool when the last reference goes.
    fn share(&self, data: Vec<u8>) -> bytes::Bytes {
        bytes::Bytes::from_owner(Piece {
            data,
            pool: self.clone(),
        })
    }
}

/// A module reference followed to its platform manifest for one architecture ([`Registry::locate`]),
/// its module manifest not read yet.
#[derive(Clone, Debug)]
pub struct Located {
    /// What was asked for.
    reference: Reference,
    /// `registry/repository`.
    repository: String,
    /// The platform manifest, exactly as pulled.
    manifest_text: String,
    /// Its digest.
    manifest_digest: Digest,
    /// The index it was chosen from, if the reference named one.
    index_digest: Option<Digest>,
    /// The platform manifest, parsed: a module's.
    manifest: ImageManifest,
}

impl Located {
    /// `registry/repository`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The erofs image layer the platform manifest names.
    pub fn image(&self) -> &Descriptor {
        self.manifest.image()
    }
}

/// A module reference resolved for one architecture: everything needed to pull and verify it.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// `registry/repository`: what a signature's `docker-reference` names.
    pub repository: String,
    /// The platform manifest, exactly as pulled.
    pub manifest: String,
    /// Its digest.
    pub manifest_digest: Digest,
    /// The index it was chosen from, if the reference named one.
    pub index_digest: Option<Digest>,
    /// Set by [`Registry::resolve_signed`] (or [`Registry::signatures_of`]) when the platform
    /// manifest has no signatures but the index does: someone signed the index only (`cosign
    /// sign` without `--recursive`).
    /// Only feeds the verifier's error message; [`Resolved::from_parts`] leaves it unset
    /// (modulemgr keeps it beside a resolution it keeps for a start without the registry).
    pub signed_index: Option<Digest>,
    /// The erofs image layer.
    pub image: Descriptor,
    /// The module manifest (config blob), exactly as pulled.
    pub config: String,
    /// The module manifest, parsed.
    pub module: ModuleManifest,
}

impl Resolved {
    /// Puts a resolution together from what was pulled (or kept from an earlier pull), checking
    /// what binds the parts: the manifest must be a module's, the config must hash to the digest
    /// the manifest names and be for `architecture`. Whatever the source, the verifier later
    /// checks the manifest against its signatures.
    pub fn from_parts(
        repository: String,
        manifest: String,
        index_digest: Option<Digest>,
        config: String,
        architecture: &str,
    ) -> Result<Resolved, RegistryError> {
        let parsed = ImageManifest::parse_module(manifest.as_bytes())?;
        let config_digest = Digest::of(config.as_bytes());
        if config_digest.to_string() != parsed.config.digest {
            return Err(RegistryError::Invalid(format!(
                "module manifest {config_digest} is not the {} the image manifest names",
                parsed.config.digest
            )));
        }
        let module = ModuleManifest::parse(config.as_bytes())?;
        if module.architecture != architecture {
            return Err(FormatError::WrongArchitecture {
                wanted: architecture.to_owned(),
                found: module.architecture,
            }
            .into());
        }
        Ok(Resolved {
            repository,
            image: parsed.image().clone(),
            manifest_digest: Digest::of(manifest.as_bytes()),
            manifest,
            index_digest,
            signed_index: None,
            config,
            module,
        })
    }
}

/// A registry client.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    config: RegistryConfig,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("plain_http", &self.config.plain_http)
            .finish_non_exhaustive()
    }
}

/// Parses a reference such as `host:5000/modules/tools:1.0` or `…@sha256:…` (see
/// [`crate::reference`] for why not with `oci-spec`'s parser).
pub fn parse_reference(text: &str) -> Result<Reference, RegistryError> {
    crate::reference::parse(text).map_err(|e| RegistryError::BadReference {
        reference: text.chars().take(200).collect(),
        reason: e.to_string(),
    })
}

/// `registry/repository` of a reference.
pub fn repository_of(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

impl Registry {
    /// A client with `config`. Uses the process's default rustls crypto provider, installing
    /// ring's if none is installed yet.
    pub fn new(config: RegistryConfig) -> Registry {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(config.plain_http.clone()),
            connect_timeout: config.connect_timeout,
            read_timeout: config.connect_timeout.map(|t| t * 4),
            ..ClientConfig::default()
        });
        Registry { client, config }
    }

    fn auth(&self, reference: &Reference) -> RegistryAuth {
        let registry = reference.resolve_registry();
        self.config
            .credentials
            .iter()
            .find(|c| c.registry == registry || c.registry == reference.registry())
            .map_or(RegistryAuth::Anonymous, |c| {
                RegistryAuth::Basic(c.username.clone(), c.password.clone())
            })
    }

    async fn manifest_raw(
        &self,
        reference: &Reference,
        accept: &[&str],
    ) -> Result<(Vec<u8>, Digest), RegistryError> {
        let (bytes, _digest_header) = self
            .client
            .pull_manifest_raw(reference, &self.auth(reference), accept)
            .await
            .map_err(|e| RegistryError::from_oci(&format!("manifest {reference}"), e))?;
        if bytes.len() > MAX_METADATA_BYTES {
            return Err(RegistryError::Invalid(format!(
                "manifest {reference} is {} bytes, more than the {MAX_METADATA_BYTES} allowed",
                bytes.len()
            )));
        }
        // The digest is computed here, never taken from the registry's header.
        let digest = Digest::of(&bytes);
        if let Some(pinned) = reference.digest() {
            if pinned != digest.to_string() {
                return Err(RegistryError::Invalid(format!(
                    "manifest {reference} has digest {digest}, not the {pinned} asked for"
                )));
            }
        }
        Ok((bytes.to_vec(), digest))
    }

    /// Fetches a small blob whole, checking its digest.
    async fn small_blob(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        limit: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        if descriptor.size > limit {
            return Err(RegistryError::Invalid(format!(
                "blob {} is {} bytes, more than the {limit} allowed",
                descriptor.digest, descriptor.size
            )));
        }
        let expected = Digest::parse(&descriptor.digest)?;
        // Read no more than the limit whatever the server sends: the size in the descriptor is
        // only a claim.
        let mut stream = self
            .client
            .pull_blob_stream(reference, descriptor.digest.as_str())
            .await
            .map_err(|e| RegistryError::from_oci(&format!("blob {}", descriptor.digest), e))?;
        let too_big = || {
            RegistryError::Invalid(format!(
                "blob {} is larger than the {limit} bytes allowed",
                descriptor.digest
            ))
        };
        if stream.content_length.is_some_and(|len| len > limit) {
            return Err(too_big());
        }
        let mut out = Vec::with_capacity(descriptor.size as usize);
        while let Some(chunk) = stream.stream.next().await {
            let chunk = chunk.map_err(|e| {
                let text = format!("reading blob {}: {}", descriptor.digest, chain(&e));
                // Content that does not match its digest is bad input, not an outage: no retry.
                let wrong_digest = e
                    .get_ref()
                    .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>());
                if wrong_digest {
                    RegistryError::Invalid(text)
                } else {
                    RegistryError::Unreachable(text)
                }
            })?;
            if (out.len() + chunk.len()) as u64 > limit {
                return Err(too_big());
            }
            out.extend_from_slice(&chunk);
        }
        let actual = Digest::of(&out);
        if actual != expected {
            return Err(RegistryError::Invalid(format!(
                "blob {expected} arrived with digest {actual}"
            )));
        }
        Ok(out)
    }

    /// Resolves `reference` for `architecture`: follows an index to the platform manifest,
    /// checks the manifest is a module's and reads its module manifest.
    pub async fn resolve(
        &self,
        reference: &str,
        architecture: &str,
    ) -> Result<Resolved, RegistryError> {
        Ok(self.resolve_with(reference, architecture, false).await?.0)
    }

    /// [`Registry::resolve`], and the platform manifest's cosign signatures
    /// ([`Registry::signatures`]), read at the same time as the module manifest: one round
    /// trip to a distant registry less. When the platform manifest has none, the index's
    /// signature tag is looked at too ([`Resolved::signed_index`]).
    pub async fn resolve_signed(
        &self,
        reference: &str,
        architecture: &str,
    ) -> Result<(Resolved, Vec<CosignSignature>), RegistryError> {
        self.resolve_with(reference, architecture, true).await
    }

    async fn resolve_with(
        &self,
        reference: &str,
        architecture: &str,
        with_signatures: bool,
    ) -> Result<(Resolved, Vec<CosignSignature>), RegistryError> {
        let located = self.locate(reference, architecture).await?;
        if !with_signatures {
            return Ok((self.describe(located, architecture).await?, Vec::new()));
        }
        let (repository, manifest_digest, index_digest) = (
            located.repository.clone(),
            located.manifest_digest.clone(),
            located.index_digest.clone(),
        );
        let (resolved, signatures) = tokio::try_join!(
            self.describe(located, architecture),
            self.signatures(&repository, &manifest_digest),
        )?;
        let signed_index = self
            .signed_index(&repository, index_digest.as_ref(), &signatures)
            .await?;
        Ok((
            Resolved {
                signed_index,
                ..resolved
            },
            signatures,
        ))
    }

    /// The first half of [`Registry::resolve`]: follows an index to the platform manifest for
    /// `architecture` and checks it is a module's. That names the image, so its download can
    /// start while [`Registry::describe`] reads the module manifest.
    pub async fn locate(
        &self,
        reference: &str,
        architecture: &str,
    ) -> Result<Located, RegistryError> {
        let reference = parse_reference(reference)?;
        let (bytes, digest) = self
            .manifest_raw(&reference, &[OCI_INDEX, OCI_MANIFEST])
            .await?;
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_owned));
        let (manifest_bytes, manifest_digest, index_digest) =
            if media_type.as_deref() == Some(OCI_INDEX) {
                let index = ImageIndex::parse(&bytes)?;
                let entry = index.for_architecture(architecture)?;
                let pinned = reference.clone_with_digest(entry.digest.clone());
                let (m, d) = self.manifest_raw(&pinned, &[OCI_MANIFEST]).await?;
                (m, d, Some(digest))
            } else {
                (bytes, digest, None)
            };
        let manifest = ImageManifest::parse_module(&manifest_bytes)?;
        let manifest_text = String::from_utf8(manifest_bytes)
            .map_err(|_| RegistryError::Invalid("manifest is not UTF-8".into()))?;
        Ok(Located {
            repository: repository_of(&reference),
            reference,
            manifest_text,
            manifest_digest,
            index_digest,
            manifest,
        })
    }

    /// The second half of [`Registry::resolve`]: reads the module manifest `located` names and
    /// checks it against the platform manifest and `architecture`.
    pub async fn describe(
        &self,
        located: Located,
        architecture: &str,
    ) -> Result<Resolved, RegistryError> {
        let config = self
            .small_blob(
                &located.reference,
                &located.manifest.config,
                MAX_METADATA_BYTES as u64,
            )
            .await?;
        let config_text = String::from_utf8(config)
            .map_err(|_| RegistryError::Invalid("module manifest is not UTF-8".into()))?;
        let resolved = Resolved::from_parts(
            located.repository,
            located.manifest_text,
            located.index_digest,
            config_text,
            architecture,
        )?;
        debug_assert_eq!(resolved.manifest_digest, located.manifest_digest);
        Ok(resolved)
    }

    /// The cosign signatures of `resolved`'s platform manifest, and
    /// [`Resolved::signed_index`] as [`Registry::resolve_signed`] finds it: for a caller that
    /// resolved without them, to fetch them beside the image, which is what takes long.
    pub async fn signatures_of(
        &self,
        resolved: &Resolved,
    ) -> Result<(Vec<CosignSignature>, Option<Digest>), RegistryError> {
        let signatures = self
            .signatures(&resolved.repository, &resolved.manifest_digest)
            .await?;
        let signed_index = self
            .signed_index(
                &resolved.repository,
                resolved.index_digest.as_ref(),
                &signatures,
            )
            .await?;
        Ok((signatures, signed_index))
    }

    /// `index`, when the platform manifest has no `signatures` and the index has some.
    async fn signed_index(
        &self,
        repository: &str,
        index: Option<&Digest>,
        signatures: &[CosignSignature],
    ) -> Result<Option<Digest>, RegistryError> {
        match index {
            Some(index) if signatures.is_empty() => Ok(self
                .has_signatures(repository, index)
                .await?
                .then(|| index.clone())),
            _ => Ok(None),
        }
    }

    /// Whether a signature manifest is stored for `manifest_digest` in `repository`.
    async fn has_signatures(
        &self,
        repository: &str,
        manifest_digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let tag = format!("sha256-{}.sig", manifest_digest.hex());
        let reference = parse_reference(&format!("{repository}:{tag}"))?;
        match self.manifest_raw(&reference, &[OCI_MANIFEST]).await {
            Ok(_) => Ok(true),
            Err(RegistryError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Streams blob `descriptor` of `repository` into `store`, hashing as it writes, resuming a
    /// partial download. `progress(done, total)` is called as bytes arrive. Returns the path of
    /// the complete, digest-checked blob, not yet synced ([`Store::make_durable`]).
    pub async fn pull_blob(
        &self,
        repository: &str,
        descriptor: &Descriptor,
        store: &Store,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<PathBuf, RegistryError> {
        let digest = Digest::parse(&descriptor.digest)?;
        if store.contains(&digest) {
            progress(descriptor.size, descriptor.size);
            return Ok(store.path(&digest));
        }
        let reference = parse_reference(&format!("{repository}@{digest}"))?;
        let size = descriptor.size;
        let store = store.clone();
        let begin_digest = digest.clone();
        let mut writer = tokio::task::spawn_blocking(move || store.begin(&begin_digest, size))
            .await
            .map_err(|e| RegistryError::Invalid(format!("store task failed: {e}")))??;
        let offset = writer.offset();
        if offset > 0 {
            tracing::info!(%digest, offset, size, "resuming download at the end of the partial file");
        }
        progress(offset, size);
        let stream = if offset == size {
            None
        } else {
            let response = self
                .client
                .pull_blob_stream_partial(&reference, descriptor.digest.as_str(), offset, None)
                .await
                .map_err(|e| RegistryError::from_oci(&format!("blob {digest}"), e))?;
            Some(match response {
                oci_client::client::BlobResponse::Partial(s) => s,
                oci_client::client::BlobResponse::Full(s) => {
                    writer.restart()?;
                    s
                }
            })
        };
        // Writing (and, inside the writer, hashing) runs on blocking threads fed through a
        // small bounded channel, so the network read overlaps them. The network's chunks are
        // copied into fixed-size pieces first: the HTTP client's own read buffers are then
        // released at once instead of living on in the queues, which keeps memory flat (a few
        // pieces in flight) whatever the blob's size, at the cost of one memcpy.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(PIECES_IN_FLIGHT);
        // The writer completes the blob only when told the stream ended whole; a stream that
        // broke off leaves the partial file, synced, for the next attempt to resume.
        let complete = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let whole = complete.clone();
        let sink = tokio::task::spawn_blocking(move || -> Result<Option<PathBuf>, StoreError> {
            while let Some(piece) = rx.blocking_recv() {
                writer.write(piece)?;
            }
            if whole.load(std::sync::atomic::Ordering::Acquire) {
                writer.finish().map(Some)
            } else {
                writer.keep_partial().map(|()| None)
            }
        });
        let mut done = offset;
        let pool = PiecePool::new(PIECES_IN_FLIGHT + 8);
        let mut piece = pool.take();
        let mut broken = None;
        if let Some(mut sized) = stream {
            'stream: while let Some(chunk) = sized.stream.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        broken = Some(format!("reading blob {digest}: {}", chain(&e)));
                        break;
                    }
                };
                done += chunk.len() as u64;
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    let take = rest.len().min(PIECE_BYTES - piece.len());
                    piece.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if piece.len() == PIECE_BYTES {
                        let full = std::mem::replace(&mut piece, pool.take());
                        if tx.send(pool.share(full)).await.is_err() {
                            break 'stream; // the writer stopped; its error is reported below
                        }
                    }
                }
                progress(done.min(size), size);
            }
        }
        if !piece.is_empty() {
            let _ = tx.send(pool.share(piece)).await;
        }
        if broken.is_none() && done < size {
            broken = Some(format!(
                "blob {digest}: connection ended after {done} of {size} bytes"
            ));
        }
        complete.store(broken.is_none(), std::sync::atomic::Ordering::Release);
        drop(tx);
        // Always wait for the writer: a retry must not open the partial file while it is
        // still being written.
        let written = sink
            .await
            .map_err(|e| RegistryError::Invalid(format!("store task failed: {e}")))??;
        match (broken, written) {
            (Some(reason), _) => Err(RegistryError::Unreachable(reason)),
            (None, Some(path)) => Ok(path),
            (None, None) => Err(RegistryError::Invalid(format!(
                "blob {digest}: the store kept it partial"
            ))),
        }
    }

    /// The cosign signatures stored for `manifest_digest` in `repository` (tag
    /// `sha256-<hex>.sig`); none if there is no such tag.
    pub async fn signatures(
        &self,
        repository: &str,
        manifest_digest: &Digest,
    ) -> Result<Vec<CosignSignature>, RegistryError> {
        let tag = format!("sha256-{}.sig", manifest_digest.hex());
        let reference = parse_reference(&format!("{repository}:{tag}"))?;
        let bytes = match self.manifest_raw(&reference, &[OCI_MANIFEST]).await {
            Ok((bytes, _)) => bytes,
            Err(RegistryError::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| FormatError::Malformed {
                what: "signature manifest",
                reason: e.to_string(),
            })?;
        let mut signatures = Vec::new();
        for layer in crate::cosign::signature_layers(&manifest)
            .into_iter()
            .take(crate::cosign::MAX_SIGNATURES)
        {
            let descriptor = Descriptor {
                media_type: crate::cosign::SIMPLESIGNING_MEDIA_TYPE.to_owned(),
                digest: layer.digest.clone(),
                size: layer.size,
                artifact_type: None,
                platform: None,
                annotations: Default::default(),
            };
            let payload = self
                .small_blob(&reference, &descriptor, MAX_PAYLOAD_BYTES)
                .await?;
            signatures.push(layer.with_payload(&payload).map_err(|e| {
                RegistryError::Invalid(format!("signature of {manifest_digest}: {e}"))
            })?);
        }
        Ok(signatures)
    }

    /// Uploads `data` as a blob of `repository` unless it is there already; returns its digest.
    pub async fn push_blob(
        &self,
        repository: &str,
        data: Vec<u8>,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&data);
        let reference = parse_reference(&format!("{repository}@{digest}"))?;
        self.client
            .store_auth_if_needed(reference.resolve_registry(), &self.auth(&reference))
            .await;
        let exists = self
            .client
            .blob_exists(&reference, &digest.to_string())
            .await
            .map_err(|e| RegistryError::from_oci(&format!("blob {digest}"), e))?;
        if !exists {
            self.authorize_push(&reference).await?;
            self.client
                .push_blob(&reference, data, &digest.to_string())
                .await
                .map_err(|e| RegistryError::from_oci(&format!("pushing blob {digest}"), e))?;
        }
        Ok(digest)
    }

    /// Gets (or reuses) the registry's permission to push to `reference`'s repository.
    async fn authorize_push(&self, reference: &Reference) -> Result<(), RegistryError> {
        self.client
            .auth(
                reference,
                &self.auth(reference),
                oci_client::RegistryOperation::Push,
            )
            .await
            .map_err(|e| RegistryError::from_oci("authenticating", e))?;
        Ok(())
    }

    /// Uploads manifest `bytes` (of `media_type`) under `tag` of `repository` (or by digest
    /// when `tag` is `None`); returns its digest.
    pub async fn push_manifest(
        &self,
        repository: &str,
        tag: Option<&str>,
        bytes: Vec<u8>,
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        let reference = match tag {
            Some(tag) => parse_reference(&format!("{repository}:{tag}"))?,
            None => parse_reference(&format!("{repository}@{digest}"))?,
        };
        self.authorize_push(&reference).await?;
        let content_type = media_type
            .parse()
            .map_err(|_| RegistryError::Invalid(format!("bad media type {media_type:?}")))?;
        self.client
            .push_manifest_raw(&reference, bytes, content_type)
            .await
            .map_err(|e| RegistryError::from_oci(&format!("pushing manifest {reference}"), e))?;
        Ok(digest)
    }

    /// The raw manifest `reference` names and its digest (computed, not taken from headers).
    pub async fn fetch_manifest(
        &self,
        reference: &str,
    ) -> Result<(Vec<u8>, Digest), RegistryError> {
        let reference = parse_reference(reference)?;
        self.manifest_raw(&reference, &[OCI_INDEX, OCI_MANIFEST])
            .await
    }
}
