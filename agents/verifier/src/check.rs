//! The checks one module passes before it may be mounted, in the order they are made:
//! the manifest is the one signed (its digest), it is a module's and names this image; the
//! image hashes to that digest; its fs-verity digest equals the manifest's annotation; and a
//! signature over the manifest digest satisfies the trust policy.
//!
//! The image is read twice at once, on two threads (SHA-256 of the file, and its fs-verity
//! Merkle tree): each pass costs one SHA-256 of the file, and in parallel the check takes about
//! as long as one.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use powernode_modules::cosign::{self, Policy};
use powernode_modules::digest::Digest;
use powernode_modules::format::ImageManifest;
use powernode_modules::fsverity;
use powernode_types::VerifyConfig;

/// What a passed check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Who signed it (`key <fingerprint>`, `keyless <identity>`), or `unsigned (policy allows)`.
    pub signer: String,
    /// The image's fs-verity digest.
    pub fsverity_digest: String,
}

/// Why a module must not be mounted. The text is what `VerifyStatus.reason` says.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The manifest does not hash to the digest that was signed.
    #[error("manifest digest mismatch: the manifest hashes to {actual}, expected {expected}")]
    ManifestDigest {
        /// The digest given.
        expected: String,
        /// What the manifest hashes to.
        actual: String,
    },
    /// The manifest is not a module's.
    #[error("bad manifest: {0}")]
    Manifest(String),
    /// The manifest names another image.
    #[error("the manifest's image is {manifest}, but {given} was handed over")]
    ImageMismatch {
        /// In the manifest.
        manifest: String,
        /// In the config.
        given: String,
    },
    /// The image file cannot be read.
    #[error("cannot read image {path}: {error}")]
    Unreadable {
        /// The file.
        path: String,
        /// The error.
        error: String,
    },
    /// The image does not hash to its digest.
    #[error("image digest mismatch: {path} hashes to {actual}, expected {expected}")]
    ImageDigest {
        /// The file.
        path: String,
        /// Expected digest.
        expected: String,
        /// What it hashes to.
        actual: String,
    },
    /// The module carries no fs-verity digest.
    #[error("the manifest has no fs-verity digest annotation")]
    NoFsverity,
    /// The fs-verity digest differs from the annotation.
    #[error("fs-verity digest mismatch: the image's is {actual}, the manifest says {expected}")]
    Fsverity {
        /// The annotation.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// No signature satisfies the trust policy.
    #[error("signature: {0}")]
    Signature(String),
}

/// Runs every check of `config` against `policy`.
pub fn check(
    config: &VerifyConfig,
    policy: &Policy,
    now: SystemTime,
) -> Result<Verdict, Rejection> {
    let manifest_digest = Digest::of(config.manifest.as_bytes()).to_string();
    if manifest_digest != config.manifest_digest {
        return Err(Rejection::ManifestDigest {
            expected: config.manifest_digest.clone(),
            actual: manifest_digest,
        });
    }
    let manifest = ImageManifest::parse_module(config.manifest.as_bytes())
        .map_err(|e| Rejection::Manifest(e.to_string()))?;
    if manifest.image().digest != config.digest {
        return Err(Rejection::ImageMismatch {
            manifest: manifest.image().digest.clone(),
            given: config.digest.clone(),
        });
    }
    let expected_verity = manifest.fsverity_digest().ok_or(Rejection::NoFsverity)?;
    let (sha256, verity) = hash_image(Path::new(&config.image_path))?;
    if sha256.to_string() != config.digest {
        return Err(Rejection::ImageDigest {
            path: config.image_path.clone(),
            expected: config.digest.clone(),
            actual: sha256.to_string(),
        });
    }
    if verity.to_oci() != expected_verity {
        return Err(Rejection::Fsverity {
            expected: expected_verity.to_owned(),
            actual: verity.to_oci(),
        });
    }
    let verified = cosign::verify(
        policy,
        &config.repository,
        &config.manifest_digest,
        &config.signatures,
        now,
    )
    .map_err(|e| Rejection::Signature(e.to_string()))?;
    Ok(Verdict {
        signer: verified.to_string(),
        fsverity_digest: verity.to_oci(),
    })
}

/// SHA-256 and fs-verity digest of the file at `path`, computed on two threads at once.
pub fn hash_image(path: &Path) -> Result<(Digest, fsverity::Digest), Rejection> {
    let unreadable = |e: std::io::Error| Rejection::Unreadable {
        path: path.display().to_string(),
        error: e.to_string(),
    };
    std::thread::scope(|scope| {
        let sha = scope.spawn(|| -> std::io::Result<Digest> {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            read_chunks(path, |chunk| ctx.update(chunk))?;
            Ok(Digest::from_sha256(ctx.finish().as_ref()))
        });
        let mut verity = fsverity::Hasher::new();
        let verity_result = read_chunks(path, |chunk| verity.update(chunk));
        let sha = sha
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("hashing thread panicked")));
        verity_result.map_err(unreadable)?;
        Ok((sha.map_err(unreadable)?, verity.finish()))
    })
}

fn read_chunks(path: &Path, mut each: impl FnMut(&[u8])) -> std::io::Result<()> {
    let mut file = File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        each(&buf[..n]);
    }
}
