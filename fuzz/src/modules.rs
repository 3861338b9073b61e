//! Targets for what a registry serves: the OCI index and manifest of a module, its module
//! manifest, and its cosign signatures (key-based and keyless).

use powernode_modules::cosign::{self, CosignSignature, Verified, MAX_SIGNATURES};
use powernode_modules::digest::Digest;
use powernode_modules::format::{ImageIndex, ImageManifest, ModuleManifest};
use powernode_modules::registry::Resolved;

use crate::fixture;

/// The architecture the module seeds are built for (fixed, not the host's, so that a corpus
/// means the same on every machine).
pub const ARCHITECTURE: &str = "amd64";

/// The repository the module seeds name.
pub const REPOSITORY: &str = "registry.example/modules/tools";

/// An image index ([`ImageIndex::parse`]) and the choice of a platform from it.
///
/// Properties: a chosen entry is for that architecture on Linux; an index serialises to JSON
/// that parses back to the same index.
pub fn oci_index(data: &[u8]) {
    let Ok(index) = ImageIndex::parse(data) else {
        return;
    };
    for architecture in [ARCHITECTURE, "arm64", ""] {
        match index.for_architecture(architecture) {
            Ok(entry) => {
                let platform = entry
                    .platform
                    .as_ref()
                    .expect("a chosen entry has a platform");
                assert_eq!(platform.architecture, architecture);
                assert_eq!(platform.os, "linux");
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    let json = serde_json::to_vec(&index).expect("an index serialises");
    assert_eq!(ImageIndex::parse(&json), Ok(index), "index round trip");
}

/// A platform manifest ([`ImageManifest::parse_module`]); with a NUL and a config blob after
/// it, the resolution modulemgr keeps and reloads on a boot without the registry
/// ([`Resolved::from_parts`]).
///
/// Properties: an accepted manifest has its image layer and serialises to JSON it accepts
/// again as the same manifest; an accepted resolution's digests are those of its parts and its
/// module is for the architecture asked for.
pub fn oci_manifest(data: &[u8]) {
    let parts = crate::split(data, 2);
    if let Ok(manifest) = ImageManifest::parse_module(parts[0]) {
        let _ = (manifest.image(), manifest.fsverity_digest());
        let json = serde_json::to_vec(&manifest).expect("a manifest serialises");
        assert_eq!(
            ImageManifest::parse_module(&json),
            Ok(manifest),
            "manifest round trip"
        );
    }
    let [manifest, config] = parts[..] else {
        return;
    };
    let (Ok(manifest), Ok(config)) = (std::str::from_utf8(manifest), std::str::from_utf8(config))
    else {
        return;
    };
    match Resolved::from_parts(
        REPOSITORY.to_owned(),
        manifest.to_owned(),
        None,
        config.to_owned(),
        ARCHITECTURE,
    ) {
        Ok(resolved) => {
            assert_eq!(resolved.manifest_digest, Digest::of(manifest.as_bytes()));
            assert_eq!(resolved.module.architecture, ARCHITECTURE);
            let parsed = ImageManifest::parse_module(manifest.as_bytes()).expect("accepted");
            assert_eq!(
                Digest::of(config.as_bytes()).to_string(),
                parsed.config.digest
            );
            assert_eq!(resolved.image, *parsed.image());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The module manifest, the config blob ([`ModuleManifest::parse`]).
///
/// Property: an accepted manifest serialises to JSON that parses back to the same manifest.
pub fn module_manifest(data: &[u8]) {
    let Ok(manifest) = ModuleManifest::parse(data) else {
        return;
    };
    let _ = manifest.health_check();
    let json = serde_json::to_vec(&manifest).expect("a module manifest serialises");
    assert_eq!(
        ModuleManifest::parse(&json),
        Ok(manifest),
        "module manifest round trip"
    );
}

/// A signature manifest, then a NUL and the payload blob its layers name: read as
/// `Registry::signatures` reads it (the manifest, [`cosign::signature_layers`],
/// [`cosign::SignatureLayer::with_payload`]), then checked with [`cosign::verify`] against a
/// policy trusting the fixture's key and keyless root.
///
/// Properties: a joined payload is the blob the layer names; a policy that requires a
/// signature never answers "unsigned"; a signature is only ever accepted over a payload the
/// fixture's keys signed (anything else would be a forgery).
pub fn cosign_signature_layers(data: &[u8]) {
    let parts = crate::split(data, 2);
    let Ok(manifest) = serde_json::from_slice::<ImageManifest>(parts[0]) else {
        return;
    };
    let payload = parts.get(1).copied().unwrap_or_default();
    let mut signatures = Vec::new();
    for layer in cosign::signature_layers(&manifest)
        .into_iter()
        .take(MAX_SIGNATURES)
    {
        let (digest, size) = (layer.digest.clone(), layer.size);
        match layer.with_payload(payload) {
            Ok(signature) => {
                assert_eq!(Digest::of(payload).to_string(), digest);
                assert_eq!(payload.len() as u64, size);
                signatures.push(signature);
            }
            // The registry refuses the whole set when one layer is wrong.
            Err(e) => return assert!(!e.to_string().is_empty()),
        }
    }
    let cosign = fixture::cosign();
    let result = cosign::verify(
        &cosign.policy,
        &cosign.fixture.repository,
        &cosign.fixture.manifest_digest,
        &signatures,
        cosign.now,
    );
    check_verified(result, &signatures);
}

/// A keyless signature's parts, NUL-separated: `bundle`, or `chain NUL bundle`, or
/// `certificate NUL chain NUL bundle`; the fixture's payload and signature bytes (and its leaf
/// certificate when none is given) complete it, so that the certificate's signature check
/// passes and the bundle, chain and log entry are what the fuzzer explores.
///
/// Properties: as [`cosign_signature_layers`]; an accepted keyless signature names the
/// fixture's identity and issuer (no other certificate can carry the fixture leaf's key).
pub fn cosign_keyless_bundle(data: &[u8]) {
    let cosign = fixture::cosign();
    let valid = &cosign.fixture.keyless_signature;
    let Ok(parts) = crate::split(data, 3)
        .into_iter()
        .map(|p| std::str::from_utf8(p).map(str::to_owned))
        .collect::<Result<Vec<String>, _>>()
    else {
        return;
    };
    let (certificate, chain, bundle) = match <[String; 3]>::try_from(parts) {
        Ok([certificate, chain, bundle]) => (Some(certificate), Some(chain), bundle),
        Err(mut parts) => {
            let bundle = parts.pop().expect("split yields a part");
            (valid.certificate.clone(), parts.pop(), bundle)
        }
    };
    let signatures = [CosignSignature {
        payload: valid.payload.clone(),
        signature: valid.signature.clone(),
        certificate,
        chain,
        bundle: Some(bundle),
    }];
    let result = cosign::verify(
        &cosign.keyless_policy,
        &cosign.fixture.repository,
        &cosign.fixture.manifest_digest,
        &signatures,
        cosign.now,
    );
    if let Ok(Verified::Keyless { identity, issuer }) = &result {
        assert_eq!(identity, &cosign.fixture.identity);
        assert_eq!(issuer, &cosign.fixture.issuer);
    }
    check_verified(result, &signatures);
}

/// The properties every verification result must have under a fixture policy.
fn check_verified(result: Result<Verified, cosign::Error>, signatures: &[CosignSignature]) {
    let cosign = fixture::cosign();
    let signed = [
        &cosign.fixture.key_signature.payload,
        &cosign.fixture.keyless_signature.payload,
    ];
    match result {
        Ok(Verified::Unsigned { .. }) => panic!("a required signature was waived"),
        Ok(verified) => {
            assert!(
                signatures.iter().any(|s| signed.contains(&&s.payload)),
                "{verified} over a payload the fixture never signed"
            );
            if let Verified::Key { fingerprint } = &verified {
                assert_eq!(fingerprint, cosign.policy.keys[0].fingerprint());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
