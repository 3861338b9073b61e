//! The fs-verity digest of a file, computed in userspace: what `fsverity digest FILE` prints and
//! what the kernel reports once verity is enabled on the file (Linux
//! `Documentation/filesystems/fsverity.rst`), for SHA-256, 4096-byte blocks and no salt.
//!
//! The publisher records the digest of a module's erofs image as an annotation; the node compares
//! it with the digest the kernel measures, so the two computations must agree bit for bit. The
//! tests check this against the real `fsverity` tool.
//!
//! The Merkle tree is built bottom-up while the data streams in: level 0 holds the hashes of the
//! data blocks, each level above the hashes of the full blocks of the level below. Only one
//! partial block per level is kept, so memory is O(tree depth) whatever the file size.
//!
//! Because the tree is built in file order, a file can be hashed while it is still being
//! written ([`GrowingFile`]): each look hashes the blocks that have landed since the last, and
//! the digest is taken once the writer is known to be done.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::str::FromStr;

use ring::digest::{digest, SHA256, SHA256_OUTPUT_LEN};

use crate::digest::hex;
use crate::sha256x2;

/// The data and Merkle tree block size (`fsverity digest --block-size` default).
pub const BLOCK_SIZE: usize = 4096;

const HASH_LEN: usize = SHA256_OUTPUT_LEN;
/// `FS_VERITY_HASH_ALG_SHA256` in the kernel's uapi.
const HASH_ALG_SHA256: u8 = 1;
/// log2(BLOCK_SIZE).
const LOG_BLOCK_SIZE: u8 = 12;
/// `sizeof(struct fsverity_descriptor)`.
const DESCRIPTOR_LEN: usize = 256;

/// One level of the Merkle tree: the block being filled and how many blocks it completed.
struct Level {
    block: Box<[u8; BLOCK_SIZE]>,
    filled: usize,
    completed: u64,
}

impl Level {
    fn new() -> Level {
        Level {
            block: Box::new([0; BLOCK_SIZE]),
            filled: 0,
            completed: 0,
        }
    }
}

/// Computes the fs-verity digest of a byte stream fed in pieces of any size.
pub struct Hasher {
    /// Data not yet making up a whole block.
    pending: Box<[u8; BLOCK_SIZE]>,
    pending_len: usize,
    data_size: u64,
    /// `levels[0]` collects the hashes of data blocks, `levels[i + 1]` those of `levels[i]`'s.
    levels: Vec<Level>,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher::new()
    }
}

impl Hasher {
    /// A hasher that has seen no data.
    pub fn new() -> Hasher {
        Hasher {
            pending: Box::new([0; BLOCK_SIZE]),
            pending_len: 0,
            data_size: 0,
            levels: Vec::new(),
        }
    }

    /// Feeds the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        self.data_size += data.len() as u64;
        if self.pending_len > 0 {
            let take = data.len().min(BLOCK_SIZE - self.pending_len);
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < BLOCK_SIZE {
                return;
            }
            let hash = digest(&SHA256, &self.pending[..]);
            self.pending_len = 0;
            self.push(0, hash.as_ref());
        }
        // Whole blocks are hashed where they lie: no copy on the hot path. Two at a time where
        // the CPU can (`sha256x2`): they are independent, and two interleaved hashes keep the
        // SHA unit busy where one waits on itself.
        let mut pairs = data.chunks_exact(2 * BLOCK_SIZE);
        for pair in &mut pairs {
            let (a, b) = pair.split_at(BLOCK_SIZE);
            match sha256x2::digest_pair(a, b) {
                Some((a, b)) => {
                    self.push(0, &a);
                    self.push(0, &b);
                }
                None => {
                    self.push(0, digest(&SHA256, a).as_ref());
                    self.push(0, digest(&SHA256, b).as_ref());
                }
            }
        }
        let mut blocks = pairs.remainder().chunks_exact(BLOCK_SIZE);
        for block in &mut blocks {
            self.push(0, digest(&SHA256, block).as_ref());
        }
        let rest = blocks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// Appends `hash` to `level`, hashing the level's block upwards whenever it fills.
    fn push(&mut self, mut level: usize, hash: &[u8]) {
        let mut carried = [0u8; HASH_LEN];
        carried.copy_from_slice(hash);
        loop {
            if self.levels.len() == level {
                self.levels.push(Level::new());
            }
            let current = &mut self.levels[level];
            current.block[current.filled..current.filled + HASH_LEN].copy_from_slice(&carried);
            current.filled += HASH_LEN;
            if current.filled < BLOCK_SIZE {
                return;
            }
            carried.copy_from_slice(digest(&SHA256, &current.block[..]).as_ref());
            current.filled = 0;
            current.completed += 1;
            level += 1;
        }
    }

    /// Ends the stream and returns the digest.
    pub fn finish(mut self) -> Digest {
        let root = self.root_hash();
        let mut descriptor = [0u8; DESCRIPTOR_LEN];
        descriptor[0] = 1; // version
        descriptor[1] = HASH_ALG_SHA256;
        descriptor[2] = LOG_BLOCK_SIZE;
        // descriptor[3]: salt_size 0; [4..8]: reserved.
        descriptor[8..16].copy_from_slice(&self.data_size.to_le_bytes());
        descriptor[16..16 + HASH_LEN].copy_from_slice(&root);
        // The rest (root hash padding to 64 bytes, salt[32], reserved[144]) stays zero.
        let mut out = [0u8; HASH_LEN];
        out.copy_from_slice(digest(&SHA256, &descriptor).as_ref());
        Digest(out)
    }

    fn root_hash(&mut self) -> [u8; HASH_LEN] {
        let mut root = [0u8; HASH_LEN];
        if self.data_size == 0 {
            // An empty file has no blocks and, by definition, an all-zero root hash.
            return root;
        }
        if self.pending_len > 0 {
            self.pending[self.pending_len..].fill(0);
            let hash = digest(&SHA256, &self.pending[..]);
            self.pending_len = 0;
            self.push(0, hash.as_ref());
        }
        if self.data_size <= BLOCK_SIZE as u64 {
            // One data block: no tree, the root hash is that block's hash.
            root.copy_from_slice(&self.levels[0].block[..HASH_LEN]);
            return root;
        }
        // Close every level's partial block bottom-up; the first level that ends up with exactly
        // one block is the top, and its block's hash (the first entry of the level above) is
        // the root.
        let mut level = 0;
        loop {
            let current = &mut self.levels[level];
            if current.filled > 0 {
                current.block[current.filled..].fill(0);
                let hash = digest(&SHA256, &current.block[..]);
                current.filled = 0;
                current.completed += 1;
                self.push(level + 1, hash.as_ref());
            }
            if self.levels[level].completed == 1 {
                root.copy_from_slice(&self.levels[level + 1].block[..HASH_LEN]);
                return root;
            }
            level += 1;
        }
    }
}

/// An fs-verity file digest (SHA-256).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

/// Why a string is not an fs-verity digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{text:?} is not an fs-verity digest (want sha256:<64 lowercase hex digits>)")]
pub struct ParseError {
    text: String,
}

impl Digest {
    /// `sha256:<64 hex>`, the text `fsverity digest` prints before the file name.
    pub fn to_oci(&self) -> String {
        self.to_string()
    }

    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(text: &str) -> Result<Digest, ParseError> {
        let error = || ParseError {
            text: text.chars().take(80).collect(),
        };
        let hex = text.strip_prefix("sha256:").ok_or_else(error)?.as_bytes();
        if hex.len() != 64 {
            return Err(error());
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte =
                (nibble(pair[0]).ok_or_else(error)? << 4) | nibble(pair[1]).ok_or_else(error)?;
        }
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex(&self.0))
    }
}

impl FromStr for Digest {
    type Err = ParseError;
    fn from_str(text: &str) -> Result<Digest, ParseError> {
        Digest::parse(text)
    }
}

/// The fs-verity digest of the file at `path`, read in large chunks.
pub fn digest_file(path: &Path) -> io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => return Ok(hasher.finish()),
            Ok(n) => hasher.update(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The fs-verity digest of a file that may still be growing (a download being written to it):
/// [`GrowingFile::catch_up`] hashes the bytes written since the last call, up to the size the
/// file is to have; [`GrowingFile::finish`] gives the digest of every byte hashed. The caller
/// decides when the file is complete: a file read from the start to its final size gives the
/// digest [`digest_file`] gives.
///
/// Reads are positional (`pread` at the count hashed so far), so the file may be renamed while
/// it is followed (the descriptor follows the inode). Bytes are taken as they are when read: if
/// the writer truncates the file and writes it again, what was hashed before may differ from
/// what ends up there, and the digest is then of neither; a caller that cannot rule that out
/// reads the complete file again when the digest does not match what it expects.
pub struct GrowingFile {
    file: File,
    hasher: Hasher,
    hashed: u64,
    size: u64,
    buffer: Vec<u8>,
}

impl std::fmt::Debug for GrowingFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrowingFile")
            .field("hashed", &self.hashed)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl GrowingFile {
    /// Follows `file` from its start; it is to end at `size` bytes (nothing past that is read).
    pub fn new(file: File, size: u64) -> GrowingFile {
        // Large reads while catching up a backlog; a download in progress usually has less
        // than this waiting.
        let buffer = vec![0u8; (1 << 20).min(size.max(1) as usize)];
        GrowingFile {
            file,
            hasher: Hasher::new(),
            hashed: 0,
            size,
            buffer,
        }
    }

    /// Hashes every byte written past what is hashed, up to the final size; returns how many
    /// new bytes it hashed (0: nothing new has landed, or the file is hashed to its size).
    pub fn catch_up(&mut self) -> io::Result<u64> {
        self.catch_up_at_most(u64::MAX)
    }

    /// [`GrowingFile::catch_up`], stopping after about `most` bytes (a whole read more at
    /// most), so a caller can look at other things between slices of a long backlog.
    pub fn catch_up_at_most(&mut self, most: u64) -> io::Result<u64> {
        let mut new = 0;
        while self.hashed < self.size && new < most {
            let want = (self.size - self.hashed).min(self.buffer.len() as u64) as usize;
            let n = match self.file.read_at(&mut self.buffer[..want], self.hashed) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.hasher.update(&self.buffer[..n]);
            self.hashed += n as u64;
            new += n as u64;
        }
        Ok(new)
    }

    /// How many bytes are hashed.
    pub fn hashed(&self) -> u64 {
        self.hashed
    }

    /// Whether every byte up to the final size is hashed.
    pub fn is_whole(&self) -> bool {
        self.hashed == self.size
    }

    /// The file followed.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The digest of the bytes hashed (of the whole file, once [`GrowingFile::is_whole`]).
    pub fn finish(self) -> Digest {
        self.hasher.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Deterministic bytes that differ block to block.
    fn content(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes()[7])
            .collect()
    }

    fn one_shot(data: &[u8]) -> Digest {
        let mut hasher = Hasher::new();
        hasher.update(data);
        hasher.finish()
    }

    /// The file written in `piece`-byte writes, each followed by a look: the same digest as
    /// hashing it whole, for sizes around the data-block and tree-block boundaries.
    #[test]
    fn a_growing_file_gives_the_one_shot_digest() {
        let tree_block = 128 * BLOCK_SIZE; // one full level-1 block of hashes
        for len in [
            0,
            1,
            BLOCK_SIZE - 1,
            BLOCK_SIZE,
            BLOCK_SIZE + 1,
            2 * BLOCK_SIZE - 1,
            tree_block - 1,
            tree_block,
            tree_block + 1,
            tree_block + BLOCK_SIZE,
            3 * tree_block + 17,
        ] {
            let data = content(len);
            let expected = one_shot(&data);
            for piece in [1000, BLOCK_SIZE, BLOCK_SIZE + 1, 65536 + 3] {
                if piece == 1000 && len > 4 * tree_block {
                    continue;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("image.partial");
                let mut writer = File::create(&path).unwrap();
                let mut growing = GrowingFile::new(File::open(&path).unwrap(), len as u64);
                assert_eq!(growing.catch_up().unwrap(), 0, "nothing written yet");
                for chunk in data.chunks(piece) {
                    writer.write_all(chunk).unwrap();
                    growing.catch_up().unwrap();
                    assert!(!growing.is_whole() || growing.hashed() == len as u64);
                }
                // Renamed into place while followed, as the store does.
                std::fs::rename(&path, dir.path().join("image")).unwrap();
                assert_eq!(growing.catch_up().unwrap(), 0);
                assert!(growing.is_whole(), "size {len}, pieces of {piece}");
                assert_eq!(growing.finish(), expected, "size {len}, pieces of {piece}");
            }
        }
    }

    /// Nothing past the announced size is hashed, and looking before anything landed, or
    /// after everything did, changes nothing.
    #[test]
    fn a_growing_file_stops_at_its_size() {
        let data = content(3 * BLOCK_SIZE + 5);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &data).unwrap();
        let mut growing = GrowingFile::new(File::open(&path).unwrap(), 2 * BLOCK_SIZE as u64 + 1);
        assert_eq!(growing.catch_up().unwrap(), 2 * BLOCK_SIZE as u64 + 1);
        assert_eq!(growing.catch_up().unwrap(), 0);
        assert!(growing.is_whole());
        assert_eq!(growing.finish(), one_shot(&data[..2 * BLOCK_SIZE + 1]));
    }

    #[test]
    fn empty_file_digest_is_the_descriptor_hash_with_a_zero_root() {
        let mut descriptor = [0u8; DESCRIPTOR_LEN];
        descriptor[..3].copy_from_slice(&[1, 1, 12]);
        let expected = digest(&SHA256, &descriptor);
        assert_eq!(Hasher::new().finish().0, expected.as_ref());
    }

    #[test]
    fn parse_round_trips_and_is_strict() {
        let d = Digest([0xab; 32]);
        assert_eq!(Digest::parse(&d.to_oci()), Ok(d));
        assert_eq!(d.to_string().parse::<Digest>(), Ok(d));
        for bad in [
            String::new(),
            "sha256:".into(),
            format!("sha512:{}", "ab".repeat(32)),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("sha256:{}zz", "ab".repeat(31)),
            format!("sha256:{}é", "ab".repeat(31)),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }
}
