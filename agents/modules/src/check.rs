//! The checks one module passes before it may be mounted, in the order they are made:
//! the manifest is the one signed (its digest), it is a module's and names this image (digest
//! and size); the image's fs-verity digest equals the manifest's annotation; and a signature
//! over the manifest digest satisfies the trust policy.
//!
//! The image is read once, for its fs-verity Merkle tree; its OCI (SHA-256) digest is not
//! computed again here. The store took the image in only after it hashed to the layer digest,
//! and the fs-verity digest over the same bytes, checked against the annotation of the signed
//! manifest (which also names the layer digest), authenticates them: a changed byte changes
//! the Merkle root (docs/modules.md, "Why the verifier hashes the image once").
//!
//! The image may still be arriving when the check starts ([`crate::follow`]): its blocks are
//! hashed as they land, and the verdict waits until the store has the complete file.

use std::time::{Instant, SystemTime};

use crate::cosign::{self, Policy};
use crate::digest::Digest;
use crate::format::ImageManifest;
use powernode_types::VerifyConfig;

use crate::follow::{self, Follow};

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
    /// The manifest gives the image another size.
    #[error("the manifest's image is {manifest} bytes, but {given} bytes were handed over")]
    SizeMismatch {
        /// In the manifest.
        manifest: u64,
        /// In the config.
        given: u64,
    },
    /// The image file cannot be read.
    #[error("cannot read image {path}: {error}")]
    Unreadable {
        /// The file.
        path: String,
        /// The error.
        error: String,
    },
    /// The image is not in the store yet (a config for a download in progress, where only a
    /// complete image can be checked).
    #[error("image {path} is still being downloaded")]
    Incomplete {
        /// The file.
        path: String,
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

/// A check's answer.
#[derive(Debug)]
pub struct Answer {
    /// The complete config the answer is for.
    pub config: VerifyConfig,
    /// The verdict.
    pub outcome: Result<Verdict, Rejection>,
    /// Bytes of the image hashed before the store had it complete.
    pub hashed_early: u64,
    /// When the check learnt that the image is complete.
    pub completed: Instant,
}

/// Runs every check of the complete image `config` against `policy`.
pub fn check(
    config: &VerifyConfig,
    policy: &Policy,
    now: SystemTime,
) -> Result<Verdict, Rejection> {
    if !config.complete {
        return Err(Rejection::Incomplete {
            path: config.image_path.clone(),
        });
    }
    match check_following(config, policy, now, &Follow::new(config)) {
        Some(answer) => answer.outcome,
        // Nothing cancels this one.
        None => Err(Rejection::Incomplete {
            path: config.image_path.clone(),
        }),
    }
}

/// Runs every check of `started` against `policy`, hashing its image while it arrives if it is
/// not complete yet; answers once `follow` says the store has it complete (the answer is for
/// that complete config). `None` if `follow` is cancelled first.
pub fn check_following(
    started: &VerifyConfig,
    policy: &Policy,
    now: SystemTime,
    follow: &Follow,
) -> Option<Answer> {
    let expected_verity = match manifest_checks(started) {
        Ok(expected) => expected,
        // Known before a byte of the image is read, but answered only for the complete image,
        // as every verdict is.
        Err(rejection) => {
            return follow.until_settled().map(|config| Answer {
                config,
                outcome: Err(rejection),
                hashed_early: 0,
                completed: Instant::now(),
            });
        }
    };
    let unreadable = |e: follow::ReadError| Rejection::Unreadable {
        path: e.path,
        error: e.source.to_string(),
    };
    let mut image = match follow::image_digest(started, follow) {
        Ok(Some(image)) => image,
        Ok(None) => return None,
        Err(_) => {
            // Answered for the complete image too: a read that failed while the download was
            // still running may succeed on the complete file, and if it fails, that failure
            // is the reason.
            let config = follow.until_settled()?;
            match follow::whole(config.clone(), follow) {
                Ok(Some(image)) => image,
                Ok(None) => return None,
                Err(e) => {
                    return Some(Answer {
                        config,
                        outcome: Err(unreadable(e)),
                        hashed_early: 0,
                        completed: Instant::now(),
                    })
                }
            }
        }
    };
    if image.followed && image.digest.to_oci() != expected_verity {
        // The bytes read while the image arrived may be from a download that started over
        // meanwhile: the complete file is what the verdict is about, so it is read again.
        tracing::info!(module = %started.name, digest = %started.digest,
            "the image as followed does not give the annotated fs-verity digest; reading the complete image again");
        let (completed, hashed_early) = (image.completed, image.hashed_early);
        image = match follow::whole(image.config.clone(), follow) {
            Ok(Some(whole)) => whole,
            Ok(None) => return None,
            Err(e) => {
                return Some(Answer {
                    config: image.config,
                    outcome: Err(unreadable(e)),
                    hashed_early,
                    completed,
                });
            }
        };
        image.completed = completed;
        image.hashed_early = hashed_early;
    }
    let outcome = if image.digest.to_oci() != expected_verity {
        Err(Rejection::Fsverity {
            expected: expected_verity,
            actual: image.digest.to_oci(),
        })
    } else {
        cosign::verify(
            policy,
            &image.config.repository,
            &image.config.manifest_digest,
            &image.config.signatures,
            now,
        )
        .map(|verified| Verdict {
            signer: verified.to_string(),
            fsverity_digest: image.digest.to_oci(),
        })
        .map_err(|e| Rejection::Signature(crate::policy::explain(&image.config, e)))
    };
    Some(Answer {
        config: image.config,
        outcome,
        hashed_early: image.hashed_early,
        completed: image.completed,
    })
}

/// The checks of the manifest against the config: the manifest is the one whose digest was
/// signed, a module's, and names this image. The fs-verity digest it annotates.
fn manifest_checks(config: &VerifyConfig) -> Result<String, Rejection> {
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
    if manifest.image().size != config.size {
        return Err(Rejection::SizeMismatch {
            manifest: manifest.image().size,
            given: config.size,
        });
    }
    manifest
        .fsverity_digest()
        .map(str::to_owned)
        .ok_or(Rejection::NoFsverity)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    use crate::format::{
        ARTIFACT_TYPE, CONFIG_MEDIA_TYPE, FSVERITY_ANNOTATION, LAYER_MEDIA_TYPE, OCI_MANIFEST,
    };
    use crate::fsverity::{self, BLOCK_SIZE};

    use super::*;

    /// A module whose image is `len` bytes that differ block to block: its complete config (the
    /// blob at `<dir>/image`) and the config of its download (`<dir>/image.partial`).
    struct Module {
        _dir: tempfile::TempDir,
        image: Vec<u8>,
        blob: PathBuf,
        partial: PathBuf,
        complete: VerifyConfig,
        arriving: VerifyConfig,
    }

    fn module(len: usize) -> Module {
        let image: Vec<u8> = (0..len)
            .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes()[7])
            .collect();
        let mut verity = fsverity::Hasher::new();
        verity.update(&image);
        let verity = verity.finish().to_oci();
        let digest = Digest::of(&image).to_string();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": {
                "mediaType": CONFIG_MEDIA_TYPE,
                "digest": Digest::of(b"{}").to_string(),
                "size": 2,
            },
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": digest, "size": len}],
            "annotations": {FSVERITY_ANNOTATION: verity},
        })
        .to_string();
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("image");
        let partial = dir.path().join("image.partial");
        let complete = VerifyConfig {
            name: "mod".into(),
            image_path: blob.to_string_lossy().into_owned(),
            digest,
            size: len as u64,
            complete: true,
            manifest_digest: Digest::of(manifest.as_bytes()).to_string(),
            manifest,
            repository: "registry.example/mod".into(),
            signatures: Vec::new(),
            signed_index: None,
            trust_policy: "default".into(),
            attempt: 0,
        };
        let arriving = VerifyConfig {
            image_path: partial.to_string_lossy().into_owned(),
            complete: false,
            ..complete.clone()
        };
        Module {
            _dir: dir,
            image,
            blob,
            partial,
            complete,
            arriving,
        }
    }

    /// The checks here are about the image; the policy lets unsigned modules through.
    fn unsigned_ok() -> Policy {
        Policy {
            require_signature: false,
            ..Policy::default()
        }
    }

    /// Runs a check of `started` on its own thread, as the verifier does.
    fn spawn(
        started: &VerifyConfig,
        follow: &Arc<Follow>,
    ) -> std::thread::JoinHandle<Option<Answer>> {
        let (started, follow) = (started.clone(), follow.clone());
        std::thread::spawn(move || {
            check_following(&started, &unsigned_ok(), SystemTime::now(), &follow)
        })
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn append(path: &Path, bytes: &[u8]) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(bytes).unwrap();
    }

    #[test]
    fn a_complete_image_passes() {
        let m = module(3 * BLOCK_SIZE + 5);
        std::fs::write(&m.blob, &m.image).unwrap();
        let verdict = check(&m.complete, &unsigned_ok(), SystemTime::now()).unwrap();
        assert_eq!(
            verdict.fsverity_digest,
            fsverity::digest_file(&m.blob).unwrap().to_oci()
        );
    }

    /// The stored image changed after the store took it in (a flipped byte, anywhere): the
    /// fs-verity digest no longer matches the signed manifest's annotation.
    #[test]
    fn a_tampered_stored_image_is_rejected() {
        let m = module(5 * BLOCK_SIZE + 100);
        for at in [0, BLOCK_SIZE, m.image.len() - 1] {
            let mut tampered = m.image.clone();
            tampered[at] ^= 0x01;
            std::fs::write(&m.blob, &tampered).unwrap();
            let rejection = check(&m.complete, &unsigned_ok(), SystemTime::now()).unwrap_err();
            assert!(
                matches!(rejection, Rejection::Fsverity { .. }),
                "byte {at}: {rejection}"
            );
            assert!(
                rejection.to_string().contains("fs-verity digest mismatch"),
                "{rejection}"
            );
        }
        // Longer or shorter than announced: the digest covers the length too.
        let mut longer = m.image.clone();
        longer.push(0);
        for bytes in [longer, m.image[..m.image.len() - 1].to_vec()] {
            std::fs::write(&m.blob, &bytes).unwrap();
            let rejection = check(&m.complete, &unsigned_ok(), SystemTime::now()).unwrap_err();
            assert!(
                matches!(rejection, Rejection::Fsverity { .. }),
                "{rejection}"
            );
        }
    }

    #[test]
    fn an_incomplete_config_is_not_checked_alone() {
        let m = module(10);
        let rejection = check(&m.arriving, &unsigned_ok(), SystemTime::now()).unwrap_err();
        assert!(
            matches!(rejection, Rejection::Incomplete { .. }),
            "{rejection}"
        );
    }

    /// The image is hashed while it arrives in pieces; the verdict comes only with the
    /// completion, for the complete config.
    #[test]
    fn an_arriving_image_is_followed_and_answered_when_complete() {
        for len in [0, 1, BLOCK_SIZE, 128 * BLOCK_SIZE + 1, 300 * BLOCK_SIZE + 7] {
            let m = module(len);
            let follow = Arc::new(Follow::new(&m.arriving));
            let check = spawn(&m.arriving, &follow);
            // Created a little after the check started, as the store does.
            std::thread::sleep(Duration::from_millis(5));
            std::fs::File::create(&m.partial).unwrap();
            for piece in m.image.chunks(BLOCK_SIZE * 7 + 3) {
                append(&m.partial, piece);
            }
            wait_until("the whole image hashed", || follow.hashed() == len as u64);
            std::thread::sleep(Duration::from_millis(20));
            assert!(
                !check.is_finished(),
                "no verdict before the image is complete"
            );
            std::fs::rename(&m.partial, &m.blob).unwrap();
            follow.complete(m.complete.clone());
            let answer = check.join().unwrap().expect("answered");
            assert_eq!(answer.config, m.complete);
            assert_eq!(answer.hashed_early, len as u64);
            let verdict = answer.outcome.unwrap();
            assert_eq!(
                verdict.fsverity_digest,
                fsverity::digest_file(&m.blob).unwrap().to_oci(),
                "size {len}"
            );
        }
    }

    /// The download started over after the follower had read other bytes (the file was
    /// truncated and written again): the followed digest is wrong, the complete file is read
    /// again, and the verdict is about it.
    #[test]
    fn a_download_that_starts_over_gets_the_verdict_of_the_complete_file() {
        let m = module(40 * BLOCK_SIZE + 9);
        let follow = Arc::new(Follow::new(&m.arriving));
        let check = spawn(&m.arriving, &follow);
        append(&m.partial, &vec![0xee; m.image.len()]);
        wait_until("the wrong bytes hashed", || {
            follow.hashed() == m.image.len() as u64
        });
        // The registry answered with the whole blob on a resume: the store starts over in
        // the same file.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&m.partial)
            .unwrap();
        file.set_len(0).unwrap();
        drop(file);
        append(&m.partial, &m.image);
        std::fs::rename(&m.partial, &m.blob).unwrap();
        follow.complete(m.complete.clone());
        let answer = check.join().unwrap().expect("answered");
        assert!(answer.outcome.is_ok(), "{:?}", answer.outcome);
        assert_eq!(answer.config, m.complete);
    }

    /// The download was thrown away and made anew in another file: the complete blob is not
    /// the file followed, and is read whole.
    #[test]
    fn a_download_made_anew_in_another_file_is_read_whole() {
        let m = module(9 * BLOCK_SIZE);
        let follow = Arc::new(Follow::new(&m.arriving));
        let check = spawn(&m.arriving, &follow);
        append(&m.partial, &m.image[..4 * BLOCK_SIZE]);
        wait_until("the first part hashed", || {
            follow.hashed() == 4 * BLOCK_SIZE as u64
        });
        std::fs::remove_file(&m.partial).unwrap();
        std::fs::write(&m.blob, &m.image).unwrap();
        follow.complete(m.complete.clone());
        let answer = check.join().unwrap().expect("answered");
        assert!(answer.outcome.is_ok(), "{:?}", answer.outcome);

        // The same, with other bytes in the new file: rejected.
        let follow = Arc::new(Follow::new(&m.arriving));
        let check = spawn(&m.arriving, &follow);
        append(&m.partial, &m.image[..BLOCK_SIZE]);
        wait_until("the first block hashed", || {
            follow.hashed() == BLOCK_SIZE as u64
        });
        std::fs::remove_file(&m.partial).unwrap();
        let mut other = m.image.clone();
        other[5] ^= 0x80;
        std::fs::write(&m.blob, &other).unwrap();
        follow.complete(m.complete.clone());
        let answer = check.join().unwrap().expect("answered");
        assert!(
            matches!(answer.outcome, Err(Rejection::Fsverity { .. })),
            "{:?}",
            answer.outcome
        );
    }

    /// A download withdrawn before it completes (failed for good, module removed): the check
    /// stops and answers nothing, whether the file was there or not.
    #[test]
    fn a_withdrawn_download_stops_the_check() {
        let m = module(8 * BLOCK_SIZE);
        let follow = Arc::new(Follow::new(&m.arriving));
        let check = spawn(&m.arriving, &follow);
        std::thread::sleep(Duration::from_millis(10));
        follow.cancel();
        assert!(check.join().unwrap().is_none(), "no partial file yet");

        let follow = Arc::new(Follow::new(&m.arriving));
        let check = spawn(&m.arriving, &follow);
        append(&m.partial, &m.image[..3 * BLOCK_SIZE]);
        wait_until("part hashed", || follow.hashed() == 3 * BLOCK_SIZE as u64);
        follow.cancel();
        assert!(check.join().unwrap().is_none(), "mid-download");
    }

    /// A manifest that is wrong is known before the image is read, but the verdict still
    /// waits for the complete image, and is for the complete config.
    #[test]
    fn a_bad_manifest_is_answered_for_the_complete_image() {
        let m = module(BLOCK_SIZE);
        let mut arriving = m.arriving.clone();
        arriving.manifest_digest = Digest::of(b"another manifest").to_string();
        let complete = VerifyConfig {
            image_path: m.complete.image_path.clone(),
            complete: true,
            ..arriving.clone()
        };
        assert!(Follow::continues(&arriving, &complete));
        let follow = Arc::new(Follow::new(&arriving));
        let check = spawn(&arriving, &follow);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !check.is_finished(),
            "no verdict before the image is complete"
        );
        follow.complete(complete.clone());
        let answer = check.join().unwrap().expect("answered");
        assert_eq!(answer.config, complete);
        assert!(
            matches!(answer.outcome, Err(Rejection::ManifestDigest { .. })),
            "{:?}",
            answer.outcome
        );
    }

    /// Which configs complete the download a check follows: the same one, complete, at the
    /// blob's path; anything else is another check.
    #[test]
    fn what_continues_a_followed_download() {
        let m = module(10);
        assert!(Follow::continues(&m.arriving, &m.complete));
        assert!(!Follow::continues(&m.arriving, &m.arriving), "not complete");
        assert!(!Follow::continues(&m.complete, &m.complete), "not followed");
        let mut other = m.complete.clone();
        other.attempt = 1;
        assert!(!Follow::continues(&m.arriving, &other), "downloaded again");
        let mut other = m.complete.clone();
        other.digest = Digest::of(b"x").to_string();
        assert!(!Follow::continues(&m.arriving, &other), "another image");
        let mut other = m.complete.clone();
        other.size += 1;
        assert!(!Follow::continues(&m.arriving, &other), "another size");
        // The signatures are fetched beside the image: they come with the complete config.
        let mut signed = m.complete.clone();
        signed.signatures = vec![powernode_types::CosignSignature {
            payload: "{}".into(),
            signature: "MEUCIQ==".into(),
            certificate: None,
            chain: None,
            bundle: None,
        }];
        signed.signed_index = Some(Digest::of(b"index").to_string());
        assert!(Follow::continues(&m.arriving, &signed), "signatures added");
        assert!(
            !Follow::continues(&signed, &m.complete),
            "a complete one is not followed"
        );
    }
}
