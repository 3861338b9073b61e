//! Build, push, sign, resolve and pull a module against the real `docker-registry` server on
//! loopback. Skips (saying so; failing under `CI=true`) without `docker-registry` or `mkfs.erofs`.

#![cfg(feature = "testing")]

use std::fs;

use powernode_modules::cosign::{self, Policy, SigningKey};
use powernode_modules::digest::Digest;
use powernode_modules::format::{host_architecture, FormatError};
use powernode_modules::package::{self, BuildOptions};
use powernode_modules::registry::{Registry, RegistryConfig, RegistryError};
use powernode_modules::store::Store;
use powernode_modules::testing::{TestRegistry, REGISTRY_BIN};
use powernode_pubsub::testing::require;

/// What these tests need of the machine ([`require`]: a skip, or a failure under `CI=true`).
fn can_run() -> bool {
    require(&[REGISTRY_BIN, "mkfs.erofs"])
}

fn options(arch: &str) -> BuildOptions {
    BuildOptions {
        name: "tools".into(),
        version: "1.0".into(),
        priority: 20,
        architecture: arch.into(),
        dependencies: vec![],
        services: vec!["tools.service".into()],
        health_check: None,
    }
}

/// The config blob's digest, from the built platform manifest.
fn resolved_config_digest(built: &package::Built) -> String {
    let manifest = fs::read(&built.manifest).unwrap();
    powernode_modules::format::ImageManifest::parse_module(&manifest)
        .unwrap()
        .config
        .digest
}

#[tokio::test]
async fn build_push_sign_resolve_pull() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestRegistry::start(&dir.path().join("registry")).unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::write(tree.join("bin/tool"), vec![b'x'; 100_000]).unwrap();
    fs::write(tree.join("README"), "hello").unwrap();

    let host = host_architecture();
    let other = if host == "arm64" { "amd64" } else { "arm64" };
    let built = package::build(&tree, &options(host), &dir.path().join("out")).unwrap();
    let again = package::build(&tree, &options(host), &dir.path().join("out2")).unwrap();
    assert_eq!(
        built.image_digest, again.image_digest,
        "builds are reproducible"
    );
    assert_eq!(built.module.files.len(), 2);
    let built_other = package::build(&tree, &options(other), &dir.path().join("out")).unwrap();

    let registry = Registry::new(RegistryConfig {
        plain_http: vec![server.host.clone()],
        ..RegistryConfig::default()
    });
    let repository = format!("{}/modules/tools", server.host);
    let pushed = package::push(&registry, &repository, "1.0", &[built.clone(), built_other])
        .await
        .unwrap();
    assert_eq!(pushed.manifests.len(), 2);

    let key = SigningKey::generate().unwrap();
    let signed = package::sign(&registry, &format!("{repository}:1.0"), &key)
        .await
        .unwrap();
    assert_eq!(signed.len(), 3, "the index and both platform manifests");
    // Signing again replaces the signature instead of piling up another.
    let signed = package::sign(&registry, &format!("{repository}:1.0"), &key)
        .await
        .unwrap();
    assert!(signed.iter().all(|s| s.signatures == 1), "{signed:?}");

    let resolved = registry
        .resolve(&format!("{repository}:1.0"), host)
        .await
        .unwrap();
    assert_eq!(resolved.image.digest, built.image_digest);
    assert_eq!(resolved.manifest_digest.to_string(), built.manifest_digest);
    assert_eq!(resolved.module.name, "tools");
    assert_eq!(
        resolved.index_digest.unwrap().to_string(),
        pushed.index_digest
    );
    let by_digest = registry
        .resolve(&format!("{repository}@{}", pushed.index_digest), host)
        .await
        .unwrap();
    assert_eq!(by_digest.manifest_digest, resolved.manifest_digest);

    let signatures = registry
        .signatures(&resolved.repository, &resolved.manifest_digest)
        .await
        .unwrap();
    assert_eq!(signatures.len(), 1);
    let (together, their_signatures) = registry
        .resolve_signed(&format!("{repository}:1.0"), host)
        .await
        .unwrap();
    assert_eq!(together.manifest_digest, resolved.manifest_digest);
    assert_eq!(their_signatures, signatures);
    let policy = Policy {
        keys: vec![key.public_key().clone()],
        keyless: None,
        require_signature: true,
        signed_references: Vec::new(),
    };
    cosign::verify(
        &policy,
        &resolved.repository,
        &resolved.manifest_digest.to_string(),
        &signatures,
        std::time::SystemTime::now(),
    )
    .unwrap();

    let store = Store::open(&dir.path().join("store")).unwrap();
    let mut seen = Vec::new();
    let path = registry
        .pull_blob(
            &resolved.repository,
            &resolved.image,
            &store,
            &mut |d, t| seen.push((d, t)),
        )
        .await
        .unwrap();
    assert_eq!(fs::read(&path).unwrap(), fs::read(&built.image).unwrap());
    assert_eq!(
        seen.last(),
        Some(&(resolved.image.size, resolved.image.size))
    );

    // Another architecture only: refused with what the module has.
    let err = registry
        .resolve(&format!("{repository}:1.0"), "riscv64")
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::Format(FormatError::NoPlatform { .. })),
        "{err}"
    );
    // Unknown tag: not found, not retried.
    let err = registry
        .resolve(&format!("{repository}:nope"), host)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err}");
    assert!(!err.is_transient());

    // A tampered blob in the registry's storage: the pull fails on the digest, nothing stored.
    let digest = Digest::parse(&built.image_digest).unwrap();
    let blob = server.blob_file(digest.hex());
    let mut data = fs::read(&blob).unwrap();
    data[0] ^= 1;
    fs::write(&blob, data).unwrap();
    let store2 = Store::open(&dir.path().join("store2")).unwrap();
    let err = registry
        .pull_blob(
            &resolved.repository,
            &resolved.image,
            &store2,
            &mut |_, _| {},
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("arrived with digest"), "{err}");
    assert!(!store2.contains(&digest));

    // A config blob tampered with: refused for good, not retried as an outage.
    let config = Digest::parse(&resolved_config_digest(&built)).unwrap();
    let blob = server.blob_file(config.hex());
    let mut data = fs::read(&blob).unwrap();
    data[0] ^= 1;
    fs::write(&blob, data).unwrap();
    let err = registry
        .resolve(&format!("{repository}:1.0"), host)
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");

    // Registry down: a transient error.
    server.stop();
    let err = registry
        .resolve(&format!("{repository}:1.0"), host)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[tokio::test]
async fn a_registry_that_wants_a_password_gets_it_and_refuses_without() {
    if !can_run() {
        return;
    }
    if !require(&["htpasswd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestRegistry::start_with_password(&dir.path().join("registry"), "node", "s3cret").unwrap();
    let login = |password: &str| {
        Registry::new(RegistryConfig {
            plain_http: vec![server.host.clone()],
            credentials: vec![powernode_modules::registry::Credential {
                registry: server.host.clone(),
                username: "node".into(),
                password: password.into(),
            }],
            ..RegistryConfig::default()
        })
    };
    let tree = dir.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("README"), "behind a password").unwrap();
    let built = package::build(
        &tree,
        &options(host_architecture()),
        &dir.path().join("out"),
    )
    .unwrap();
    let repository = format!("{}/modules/tools", server.host);
    let reference = format!("{repository}:1.0");

    let registry = login("s3cret");
    package::push(&registry, &repository, "1.0", std::slice::from_ref(&built))
        .await
        .unwrap();
    let resolved = registry
        .resolve(&reference, host_architecture())
        .await
        .unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let path = registry
        .pull_blob(
            &resolved.repository,
            &resolved.image,
            &store,
            &mut |_, _| {},
        )
        .await
        .unwrap();
    assert_eq!(fs::read(path).unwrap(), fs::read(&built.image).unwrap());

    // No password, or a wrong one: refused, and not taken for an outage worth retrying.
    let anonymous = Registry::new(RegistryConfig {
        plain_http: vec![server.host.clone()],
        ..RegistryConfig::default()
    });
    for registry in [anonymous, login("wrong")] {
        let e = registry
            .resolve(&reference, host_architecture())
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::Refused(_)), "{e:?}");
        assert!(!e.is_transient());
    }
}

#[tokio::test]
async fn an_index_signed_alone_and_a_signature_under_another_identity() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestRegistry::start(&dir.path().join("registry")).unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("README"), "staging").unwrap();
    let host = host_architecture();
    let built = package::build(&tree, &options(host), &dir.path().join("out")).unwrap();
    let registry = Registry::new(RegistryConfig {
        plain_http: vec![server.host.clone()],
        ..RegistryConfig::default()
    });
    let repository = format!("{}/staging/tools", server.host);
    let reference = format!("{repository}:1.0");
    let pushed = package::push(&registry, &repository, "1.0", &[built])
        .await
        .unwrap();
    let key = SigningKey::generate().unwrap();
    let signer = cosign::Signer {
        key: &key,
        certificate: None,
        log: None,
    };

    // Unsigned: nothing to say about the index either.
    let (resolved, signatures) = registry.resolve_signed(&reference, host).await.unwrap();
    assert!(signatures.is_empty());
    assert_eq!(resolved.signed_index, None);

    // `cosign sign` without --recursive: the index is signed, its platform manifest is not.
    let index_signature = cosign::sign(
        &signer,
        &repository,
        &pushed.index_digest,
        std::time::SystemTime::now(),
    )
    .unwrap();
    package::store_signatures(
        &registry,
        &repository,
        &pushed.index_digest,
        &[index_signature],
    )
    .await
    .unwrap();
    let (resolved, signatures) = registry.resolve_signed(&reference, host).await.unwrap();
    assert!(signatures.is_empty());
    assert_eq!(
        resolved.signed_index.map(|d| d.to_string()),
        Some(pushed.index_digest.clone())
    );
    // Only resolve_signed looks.
    let plain = registry.resolve(&reference, host).await.unwrap();
    assert_eq!(plain.signed_index, None);

    // `--sign-container-identity`: every signature names the production repository.
    let identity = "registry.example/prod/tools";
    let signed = package::sign_with(
        &registry,
        &reference,
        &signer,
        Some(&format!("{identity}:1.0")),
    )
    .await
    .unwrap();
    assert_eq!(signed.len(), 2, "{signed:?}");
    assert!(signed.iter().all(|s| !s.already_signed), "{signed:?}");
    let (resolved, signatures) = registry.resolve_signed(&reference, host).await.unwrap();
    assert_eq!(resolved.signed_index, None);
    assert_eq!(signatures.len(), 1);
    assert_eq!(
        signatures[0].payload.as_bytes(),
        cosign::payload(identity, &resolved.manifest_digest.to_string())
    );
    // Signing again with the same identity adds nothing; with the pulled repository's own
    // name, a second signature joins the platform manifest's (the index has had one since
    // it was signed alone).
    let again = package::sign_with(&registry, &reference, &signer, Some(identity))
        .await
        .unwrap();
    assert!(again.iter().all(|s| s.already_signed), "{again:?}");
    let own = package::sign(&registry, &reference, &key).await.unwrap();
    assert!(own[0].already_signed && own[0].signatures == 2, "{own:?}");
    assert!(!own[1].already_signed && own[1].signatures == 2, "{own:?}");

    let check = |signed_references: &[&str], signatures: &[cosign::CosignSignature]| {
        let policy = Policy {
            keys: vec![key.public_key().clone()],
            keyless: None,
            require_signature: true,
            signed_references: signed_references
                .iter()
                .map(|r| cosign::SignedReference::parse(r).unwrap())
                .collect(),
        };
        cosign::verify(
            &policy,
            &resolved.repository,
            &resolved.manifest_digest.to_string(),
            signatures,
            std::time::SystemTime::now(),
        )
    };
    let identity_only = &signatures[..1];
    let error = check(&[], identity_only).unwrap_err().to_string();
    assert!(
        error.contains(&format!(
            "payload names repository {identity} not {repository}, the one it was pulled from"
        )),
        "{error}"
    );
    check(&[identity], identity_only).unwrap();
    check(&["registry.example/prod/*"], identity_only).unwrap();
    assert!(check(&["registry.example/staging/*"], identity_only).is_err());
    let is_error = package::sign_with(
        &registry,
        &reference,
        &signer,
        Some(&format!("{identity}@{}", pushed.index_digest)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(is_error.contains("names a digest"), "{is_error}");
}
