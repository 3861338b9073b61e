//! Replays every checked-in input through its target: the corpora (`fuzz/corpus/<target>/`)
//! and the regressions of crashes found and fixed (`fuzz/crashes/<target>/`). Runs in
//! `make test`, without afl. A target whose corpus is missing or empty fails: a target nobody
//! seeded is a target nobody fuzzed.

use std::fs;
use std::path::{Path, PathBuf};

use powernode_fuzz::{fixture, TARGETS};
use powernode_modules::cosign::{self, Verified};

fn dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(kind)
}

/// The files of `dir`, sorted; none if it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("list a corpus").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_and_regression_replays() {
    let mut replayed = 0;
    for target in TARGETS {
        let corpus = files(&dir("corpus").join(target.name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{} is missing or empty: run `cargo run -p powernode-fuzz --example seeds`",
            target.name
        );
        for file in corpus
            .iter()
            .chain(&files(&dir("crashes").join(target.name)))
        {
            let bytes = fs::read(file).expect("read an input");
            // A panic here names the input: the target's own assertion message follows.
            eprintln!("{}", file.display());
            (target.run)(&bytes);
            replayed += 1;
        }
    }
    assert!(replayed >= TARGETS.len());
}

#[test]
fn every_corpus_directory_has_a_target() {
    for kind in ["corpus", "crashes"] {
        let Ok(entries) = fs::read_dir(dir(kind)) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                powernode_fuzz::target(&name).is_some(),
                "fuzz/{kind}/{name} belongs to no target"
            );
        }
    }
}

/// The cosign targets explore what lies behind the signature checks only if the fixture's
/// own signatures pass them.
#[test]
fn the_cosign_fixture_signatures_verify() {
    let cosign = fixture::cosign();
    let fixture = &cosign.fixture;
    let verify = |policy, signature| {
        cosign::verify(
            policy,
            &fixture.repository,
            &fixture.manifest_digest,
            std::slice::from_ref(signature),
            cosign.now,
        )
    };
    assert!(matches!(
        verify(&cosign.policy, &fixture.key_signature),
        Ok(Verified::Key { .. })
    ));
    assert_eq!(
        verify(&cosign.keyless_policy, &fixture.keyless_signature).unwrap(),
        Verified::Keyless {
            identity: fixture.identity.clone(),
            issuer: fixture.issuer.clone(),
        }
    );
}
