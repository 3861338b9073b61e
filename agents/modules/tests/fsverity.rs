//! The userspace fs-verity digest against the real `fsverity digest` tool (fsverity-utils), for
//! sizes around every block and tree-level boundary, fed whole, in odd-sized chunks, and read
//! from a file while it is being written.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use powernode_modules::fsverity::{self, Digest, GrowingFile, Hasher, BLOCK_SIZE};
use powernode_pubsub::testing::require;

/// What `fsverity digest` prints for `path`.
fn tool_digest(path: &Path) -> Digest {
    let output = Command::new("fsverity")
        .arg("digest")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("running fsverity: {e}"));
    assert!(
        output.status.success(),
        "fsverity digest failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("fsverity prints UTF-8");
    let first = stdout
        .split_whitespace()
        .next()
        .expect("fsverity printed a digest");
    Digest::parse(first).expect("fsverity printed sha256:<hex>")
}

/// Deterministic, non-repeating content so that a block mix-up changes the digest.
fn content(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ len as u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn chunked(data: &[u8], chunk: usize) -> Digest {
    let mut hasher = Hasher::new();
    for piece in data.chunks(chunk) {
        hasher.update(piece);
    }
    hasher.finish()
}

fn check_size(len: usize) {
    let data = content(len);
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&data).unwrap();
    file.flush().unwrap();
    let expected = tool_digest(file.path());
    let whole = {
        let mut hasher = Hasher::default();
        hasher.update(&data);
        hasher.finish()
    };
    assert_eq!(whole, expected, "size {len}, fed at once");
    for chunk in [1, 7, BLOCK_SIZE, 65537] {
        // Byte-at-a-time over tens of MiB proves nothing more than 7-byte chunks and is slow.
        if chunk == 1 && len > 1 << 20 {
            continue;
        }
        assert_eq!(
            chunked(&data, chunk),
            expected,
            "size {len}, chunks of {chunk}"
        );
    }
    assert_eq!(
        fsverity::digest_file(file.path()).unwrap(),
        expected,
        "size {len}, digest_file"
    );
    assert_eq!(
        growing(&data),
        expected,
        "size {len}, followed while written"
    );
}

/// The digest of `data` written to a file by another thread in odd-sized pieces while a
/// [`GrowingFile`] follows it, as the verifier follows a download.
fn growing(data: &[u8]) -> Digest {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.partial");
    let mut out = std::fs::File::create(&path).unwrap();
    let mut follower = GrowingFile::new(std::fs::File::open(&path).unwrap(), data.len() as u64);
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || {
            for piece in data.chunks(3 * BLOCK_SIZE + 1000) {
                out.write_all(piece).unwrap();
            }
        });
        while !follower.is_whole() {
            if follower.catch_up().unwrap() == 0 {
                std::thread::yield_now();
            }
        }
        writer.join().unwrap();
    });
    follower.finish()
}

#[test]
fn matches_fsverity_tool_at_block_boundaries() {
    if !require(&["fsverity"]) {
        return;
    }
    for len in [
        0,
        1,
        BLOCK_SIZE - 1,
        BLOCK_SIZE,
        BLOCK_SIZE + 1,
        2 * BLOCK_SIZE,
        128 * BLOCK_SIZE,
        128 * BLOCK_SIZE + 1,
        129 * BLOCK_SIZE,
    ] {
        check_size(len);
    }
}

#[test]
fn matches_fsverity_tool_for_a_two_level_tree() {
    if !require(&["fsverity"]) {
        return;
    }
    // About 5 MiB: two tree levels, the upper one partial.
    check_size(5 * 1024 * 1024 + 12345);
}

#[test]
fn matches_fsverity_tool_for_a_three_level_tree() {
    if !require(&["fsverity"]) {
        return;
    }
    // 128 * 128 data blocks fill one level-1 block exactly; 5 more bytes need a third level.
    check_size(128 * 128 * BLOCK_SIZE + 5);
}

#[test]
fn matches_fsverity_tool_when_a_full_level_is_the_top() {
    if !require(&["fsverity"]) {
        return;
    }
    // Exactly 128 * 128 blocks: the level-1 block is full and is itself the top of the tree.
    check_size(128 * 128 * BLOCK_SIZE);
}

#[test]
fn display_is_what_the_tool_prints() {
    let digest = Hasher::new().finish();
    let text = digest.to_oci();
    assert!(text.starts_with("sha256:") && text.len() == 71, "{text}");
    assert_eq!(text.parse::<Digest>().unwrap(), digest);
}
