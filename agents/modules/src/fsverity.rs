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

use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::str::FromStr;

use ring::digest::{digest, SHA256, SHA256_OUTPUT_LEN};

use crate::digest::hex;

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
        // Whole blocks are hashed where they lie: no copy on the hot path.
        let mut blocks = data.chunks_exact(BLOCK_SIZE);
        for block in &mut blocks {
            let hash = digest(&SHA256, block);
            self.push(0, hash.as_ref());
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

#[cfg(test)]
mod tests {
    use super::*;

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
