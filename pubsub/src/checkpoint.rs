//! Checkpoint files: one per key, written atomically, self-describing and checksummed.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! magic "PNCK" | format u16 | topic_len u16 | topic | schema_version u32 | payload_len u32 | crc32 u32 | payload
//! ```
//!
//! The CRC32 covers every byte before it and the payload, so a torn, truncated or bit-flipped
//! file is always detected. Files are replaced by write-temp, fsync, rename, fsync-directory, so
//! a crash at any instant leaves either the old or the new file.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::key::validate_key;

/// The first four bytes of every checkpoint file.
pub const MAGIC: [u8; 4] = *b"PNCK";
/// Version of the file layout above.
pub const FORMAT_VERSION: u16 = 1;
/// Directory (inside a checkpoint directory) where bad files are moved.
pub const QUARANTINE_DIR: &str = ".quarantine";

/// Why a checkpoint file was not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Shorter than its header or its declared payload.
    #[error("truncated: {len} bytes")]
    Truncated {
        /// The file's length.
        len: usize,
    },
    /// Does not start with [`MAGIC`].
    #[error("not a checkpoint file (bad magic)")]
    BadMagic,
    /// A layout version this build does not read.
    #[error("unsupported checkpoint format {0}")]
    UnsupportedFormat(u16),
    /// Longer than its declared payload.
    #[error("{extra} trailing bytes after the payload")]
    TrailingBytes {
        /// How many bytes too many.
        extra: usize,
    },
    /// Checksum mismatch: torn or corrupted.
    #[error("CRC mismatch (stored {stored:08x}, computed {computed:08x})")]
    Crc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the content.
        computed: u32,
    },
    /// Written for another topic.
    #[error("belongs to topic {found:?}, expected {expected:?}")]
    WrongTopic {
        /// Topic in the header.
        found: String,
        /// Topic being loaded.
        expected: String,
    },
    /// Written with another schema version of the topic type.
    #[error("schema version {found}, expected {expected}")]
    WrongSchema {
        /// Version in the header.
        found: u32,
        /// Version of this build.
        expected: u32,
    },
}

/// A decoded, checksum-verified checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub struct Checkpoint<'a> {
    /// The topic that wrote it.
    pub topic: &'a str,
    /// The schema version it was written with.
    pub schema_version: u32,
    /// The postcard-encoded item.
    pub payload: &'a [u8],
}

/// Builds the complete contents of a checkpoint file.
pub fn encode(topic: &str, schema_version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + topic.len() + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&schema_version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    crc.update(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Parses and checksums a checkpoint file's contents.
pub fn decode(bytes: &[u8]) -> Result<Checkpoint<'_>, CheckpointError> {
    let truncated = CheckpointError::Truncated { len: bytes.len() };
    let mut r = Reader { bytes, pos: 0 };
    if r.take(4).ok_or(truncated.clone())? != MAGIC {
        return Err(CheckpointError::BadMagic);
    }
    let format = r.u16().ok_or(truncated.clone())?;
    if format != FORMAT_VERSION {
        return Err(CheckpointError::UnsupportedFormat(format));
    }
    let topic_len = r.u16().ok_or(truncated.clone())? as usize;
    let topic = r.take(topic_len).ok_or(truncated.clone())?;
    let schema_version = r.u32().ok_or(truncated.clone())?;
    let payload_len = r.u32().ok_or(truncated.clone())? as usize;
    let covered = r.pos;
    let stored = r.u32().ok_or(truncated.clone())?;
    let payload = r.take(payload_len).ok_or(truncated)?;
    if r.pos != bytes.len() {
        return Err(CheckpointError::TrailingBytes {
            extra: bytes.len() - r.pos,
        });
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[..covered]);
    crc.update(payload);
    let computed = crc.finalize();
    if computed != stored {
        return Err(CheckpointError::Crc { stored, computed });
    }
    // The CRC passed, so a non-UTF-8 topic means a writer bug, not corruption: refuse it all the same.
    let topic = std::str::from_utf8(topic).map_err(|_| CheckpointError::BadMagic)?;
    Ok(Checkpoint {
        topic,
        schema_version,
        payload,
    })
}

/// Decodes a checkpoint and checks it belongs to `topic` at `schema_version`.
pub fn decode_for<'a>(
    bytes: &'a [u8],
    topic: &str,
    schema_version: u32,
) -> Result<&'a [u8], CheckpointError> {
    let cp = decode(bytes)?;
    if cp.topic != topic {
        return Err(CheckpointError::WrongTopic {
            found: cp.topic.to_owned(),
            expected: topic.to_owned(),
        });
    }
    if cp.schema_version != schema_version {
        return Err(CheckpointError::WrongSchema {
            found: cp.schema_version,
            expected: schema_version,
        });
    }
    Ok(cp.payload)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// A file that failed its checks, or stood in a checkpoint's way, and was moved aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The key (file name) it was stored under, or the name of the directory it blocked.
    pub key: String,
    /// Why it was not trusted.
    pub reason: String,
    /// Where it now lies.
    pub moved_to: PathBuf,
}

/// What [`CheckpointDir::reopen_if_replaced`] found when it had to make the directory again.
#[derive(Debug, Default)]
pub struct Reopened {
    /// What stood in the directory's way and was moved aside.
    pub moved: Vec<Quarantined>,
    /// Keys whose files the new directory already holds.
    pub strays: Vec<String>,
}

/// What loading a checkpoint directory found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Valid items: key and payload (of the current schema version).
    pub items: Vec<(String, Vec<u8>)>,
    /// Files that were moved aside.
    pub quarantined: Vec<Quarantined>,
    /// Keys among `items` whose files hold an earlier schema version, upgraded on the way in:
    /// their files are still the old ones until written again.
    pub upgraded: Vec<(String, u32)>,
}

/// Brings a payload of an earlier schema version (the first argument) to the current one, or
/// says it cannot (`None`): a topic's [`powernode_types::Topic::upgrade`], re-encoded.
pub type Upgrade = fn(u32, &[u8]) -> Option<Vec<u8>>;

/// The [`Upgrade`] of topic `T`.
pub fn upgrade_of<T: powernode_types::Topic>() -> Upgrade {
    |version, payload| T::upgrade(version, payload).and_then(|item| postcard::to_stdvec(&item).ok())
}

/// The payload of `bytes` as `topic` at `schema_version`: read as it is when written at that
/// version, through `upgrade` when written at an earlier one (`Ok((payload, Some(found)))`).
fn decode_upgrading(
    bytes: &[u8],
    topic: &str,
    schema_version: u32,
    upgrade: Upgrade,
) -> Result<(Vec<u8>, Option<u32>), CheckpointError> {
    match decode_for(bytes, topic, schema_version) {
        Ok(payload) => Ok((payload.to_vec(), None)),
        Err(CheckpointError::WrongSchema { found, expected }) if found < expected => {
            let payload = decode(bytes)?.payload;
            upgrade(found, payload)
                .map(|current| (current, Some(found)))
                .ok_or(CheckpointError::WrongSchema { found, expected })
        }
        Err(e) => Err(e),
    }
}

/// A topic's checkpoint directory, held open so each write costs one directory fsync by fd.
///
/// Nothing found in the way stops it: a non-directory where the directory (or its parent)
/// belongs, a directory where a key's file belongs, a file whose name is no key, are each
/// moved to a `.quarantine` directory beside them, returned to the caller to report, and the
/// operation goes on.
#[derive(Debug)]
pub struct CheckpointDir {
    path: PathBuf,
    dir: File,
}

impl CheckpointDir {
    /// Creates (mode 0700) and opens the directory, first moving aside any non-directory that
    /// stands where it or its parent belongs (returned, to report).
    pub fn open(path: impl Into<PathBuf>) -> io::Result<(Self, Vec<Quarantined>)> {
        let path = path.into();
        let moved = make_dir(&path, 2)?;
        let dir = File::open(&path).map_err(|e| at(&path, e))?;
        Ok((CheckpointDir { path, dir }, moved))
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Atomically replaces the file for `key` with `contents`. A directory standing in the
    /// file's place is moved aside first (and returned). A failed write leaves no temp file.
    ///
    /// Names are resolved against the open directory (`openat`, `renameat`), which spares a
    /// path walk per step on the hot path.
    pub fn write(&self, key: &str, contents: &[u8]) -> io::Result<Option<Quarantined>> {
        let tmp = format!(".{key}.tmp");
        let placed = self.write_temp(&tmp, contents).and_then(|()| {
            failpoint::hit("checkpoint.after_temp");
            self.rename_into_place(&tmp, key)
        });
        if placed.is_err() {
            // ENOSPC and friends must not leave a zero-length temp behind until the next load.
            let _ = unlinkat(&self.dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        let moved = placed?;
        failpoint::hit("checkpoint.after_rename");
        self.dir.sync_all()?;
        Ok(moved)
    }

    fn write_temp(&self, tmp: &str, contents: &[u8]) -> io::Result<()> {
        let open = || {
            openat(
                &self.dir,
                tmp,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_TRUNC
                    | OFlag::O_CLOEXEC
                    | OFlag::O_NOFOLLOW,
                Mode::from_bits_truncate(0o600),
            )
        };
        let fd = match open() {
            // Something not ours holds the temp name (a directory, a symlink): out of the way.
            Err(Errno::EISDIR | Errno::ELOOP) => {
                self.set_aside(OsStr::new(tmp), tmp, "stood where a temp file is written")?;
                open()?
            }
            other => other?,
        };
        let mut f = File::from(fd);
        f.write_all(contents)?;
        f.sync_data()
    }

    fn rename_into_place(&self, tmp: &str, key: &str) -> io::Result<Option<Quarantined>> {
        match renameat(&self.dir, tmp, &self.dir, key) {
            Ok(()) => Ok(None),
            // rename(2) will not replace a directory with a file.
            Err(Errno::EISDIR | Errno::ENOTEMPTY | Errno::EEXIST) => {
                let moved =
                    self.quarantine(key, "a directory stood where the checkpoint file belongs")?;
                renameat(&self.dir, tmp, &self.dir, key)?;
                Ok(Some(moved))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the file for `key`, durably; a missing file is not an error. A directory in
    /// its place is moved aside (and returned).
    pub fn remove(&self, key: &str) -> io::Result<Option<Quarantined>> {
        let moved = self.unlink(key)?;
        self.dir.sync_all()?;
        Ok(moved)
    }

    /// Removes the files of `keys` with one directory sync for all of them: what each key's
    /// removal came to, in order. A failed sync fails every removal that had succeeded,
    /// since none of them is durable then.
    pub fn remove_many<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Vec<io::Result<Option<Quarantined>>> {
        let mut outcomes: Vec<_> = keys.into_iter().map(|key| self.unlink(key)).collect();
        if let Err(e) = self.dir.sync_all() {
            for outcome in outcomes.iter_mut().filter(|o| o.is_ok()) {
                *outcome = Err(io::Error::new(e.kind(), e.to_string()));
            }
        }
        outcomes
    }

    /// Unlinks the file for `key` without syncing the directory.
    fn unlink(&self, key: &str) -> io::Result<Option<Quarantined>> {
        let moved = match unlinkat(&self.dir, key, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => None,
            // Gone already — unless the directory itself is (deleted under us, which only the
            // retry's reopen can mend). Synced all the same: an earlier unlink may have
            // succeeded and its directory sync failed.
            Err(Errno::ENOENT) if self.dir.metadata()?.nlink() == 0 => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the checkpoint directory was deleted",
                ))
            }
            Err(Errno::ENOENT) => None,
            Err(Errno::EISDIR) => {
                Some(self.quarantine(key, "a directory stood where the checkpoint file belongs")?)
            }
            Err(e) => return Err(e.into()),
        };
        Ok(moved)
    }

    /// Whether the open directory is still the one at its path. When it is not (deleted,
    /// renamed, a file put in its place), the path is made a directory again and reopened:
    /// `Some` with what was moved aside and the keys whose files the new directory holds. The
    /// caller must then write every item again and remove the files of keys it does not
    /// hold (a restored copy of an old directory would bring them back to life).
    pub fn reopen_if_replaced(&mut self) -> io::Result<Option<Reopened>> {
        let ours = self.dir.metadata()?;
        if let Ok(now) = fs::metadata(&self.path) {
            if now.is_dir() && now.dev() == ours.dev() && now.ino() == ours.ino() {
                return Ok(None);
            }
        }
        let (fresh, moved) = CheckpointDir::open(self.path.clone())?;
        let strays = fs::read_dir(&fresh.path)
            .map_err(|e| at(&fresh.path, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|name| validate_key(name).is_ok())
            .collect();
        *self = fresh;
        Ok(Some(Reopened { moved, strays }))
    }

    /// Loads every valid item, moves every bad file to [`QUARANTINE_DIR`] and deletes temp
    /// files a crash left behind. A file of an earlier schema version is read through
    /// `upgrade` (and listed in [`Loaded::upgraded`]); one it cannot read is bad. `check` vets
    /// each payload that passed the file's own checks (the publisher decodes it as its type):
    /// a payload it refuses is quarantined too, and so is any entry that is not a regular file
    /// named by a valid key.
    pub fn load(
        &self,
        topic: &str,
        schema_version: u32,
        upgrade: Upgrade,
        check: impl Fn(&[u8]) -> Result<(), String>,
    ) -> io::Result<Loaded> {
        let mut loaded = Loaded::default();
        for entry in fs::read_dir(&self.path).map_err(|e| at(&self.path, e))? {
            let entry = entry.map_err(|e| at(&self.path, e))?;
            let name = entry.file_name();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            let Some(name) = name.to_str() else {
                let lossy = name.to_string_lossy().into_owned();
                loaded
                    .quarantined
                    .push(self.set_aside(&name, &lossy, "the name is not UTF-8")?);
                continue;
            };
            if name == QUARANTINE_DIR {
                continue;
            }
            if name.starts_with('.') && name.ends_with(".tmp") && is_file {
                fs::remove_file(entry.path()).map_err(|e| at(&entry.path(), e))?;
                continue;
            }
            let refusal = match validate_key(name) {
                Err(e) => Some(format!("the name is not a key: {e}")),
                Ok(()) if !is_file => Some("not a regular file".to_owned()),
                Ok(()) => None,
            };
            if let Some(reason) = refusal {
                loaded.quarantined.push(self.quarantine(name, &reason)?);
                continue;
            }
            let bytes = match fs::read(entry.path()) {
                Ok(bytes) => Ok(bytes),
                // The medium failed this file: moving it aside keeps the rest loadable.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => Err(format!("unreadable: {e}")),
                // Out of fds or memory says nothing about the file: fail the load, keep it.
                Err(e) => return Err(at(&entry.path(), e)),
            };
            let verdict = bytes.and_then(|bytes| {
                decode_upgrading(&bytes, topic, schema_version, upgrade)
                    .map_err(|e| e.to_string())
                    .and_then(|(payload, from)| check(&payload).map(|()| (payload, from)))
            });
            match verdict {
                Ok((payload, from)) => {
                    if let Some(from) = from {
                        loaded.upgraded.push((name.to_owned(), from));
                    }
                    loaded.items.push((name.to_owned(), payload));
                }
                Err(reason) => loaded.quarantined.push(self.quarantine(name, &reason)?),
            }
        }
        self.dir.sync_all().map_err(|e| at(&self.path, e))?;
        loaded.items.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(loaded)
    }

    /// Moves a file the caller found wanting out of the way, durably, keeping it for inspection.
    pub fn quarantine(&self, key: &str, reason: &str) -> io::Result<Quarantined> {
        self.set_aside(OsStr::new(key), key, reason)
    }

    fn set_aside(&self, name: &OsStr, key: &str, reason: &str) -> io::Result<Quarantined> {
        move_aside(
            &self.path.join(name),
            &self.path.join(QUARANTINE_DIR),
            key,
            reason,
        )
    }
}

/// Makes `path` a directory (mode 0700), moving aside whatever non-directory stands where it
/// belongs or, with `levels` 2, where its parent belongs (into a `.quarantine` beside the
/// obstacle). Only a path that exists as something else is cleared: a full disk, a read-only
/// file system or a symlink to a directory is never moved.
pub(crate) fn make_dir(path: &Path, levels: usize) -> io::Result<Vec<Quarantined>> {
    let mut moved = Vec::new();
    loop {
        let err = match fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
        {
            Ok(()) => return Ok(moved),
            Err(e) => e,
        };
        let in_the_way =
            err.kind() == io::ErrorKind::AlreadyExists || err.raw_os_error() == Some(libc::ENOTDIR);
        // Only the directory itself and its parent (the agent's directory) are ours to clear:
        // anything higher up is the node's, not a publisher's, to repair.
        let obstacle = path
            .ancestors()
            .take(levels)
            .filter(|_| in_the_way)
            .find(|p| {
                fs::symlink_metadata(p).is_ok() && !fs::metadata(p).is_ok_and(|m| m.is_dir())
            });
        let (Some(obstacle), true) = (obstacle, moved.len() < 2) else {
            return Err(at(path, err));
        };
        let (Some(parent), Some(name)) = (obstacle.parent(), obstacle.file_name()) else {
            return Err(at(path, err));
        };
        moved.push(move_aside(
            obstacle,
            &parent.join(QUARANTINE_DIR),
            &name.to_string_lossy(),
            "a file stood where a checkpoint directory belongs",
        )?);
    }
}

/// Renames `from` into `qdir` under a name no earlier quarantined copy has, durably.
fn move_aside(from: &Path, qdir: &Path, key: &str, reason: &str) -> io::Result<Quarantined> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    if fs::symlink_metadata(qdir).is_ok_and(|m| !m.is_dir()) {
        // A stray file named like the quarantine must not stop every quarantine.
        let renamed = qdir.with_file_name(format!("{QUARANTINE_DIR}.{stamp}.not-a-directory"));
        fs::rename(qdir, &renamed).map_err(|e| at(qdir, e))?;
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(qdir)
        .map_err(|e| at(qdir, e))?;
    let moved_to = (0..)
        .map(|n| match n {
            0 => qdir.join(format!("{key}.{stamp}")),
            n => qdir.join(format!("{key}.{stamp}.{n}")),
        })
        .find(|p| fs::symlink_metadata(p).is_err())
        .expect("an unused name exists");
    fs::rename(from, &moved_to).map_err(|e| at(&moved_to, e))?;
    for dir in [qdir, from.parent().unwrap_or(qdir)] {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| at(dir, e))?;
    }
    Ok(Quarantined {
        key: key.to_owned(),
        reason: reason.to_owned(),
        moved_to,
    })
}

/// Puts the path that failed into an I/O error's message.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// A fingerprint of a checkpoint directory's entries (name, inode, size, modification time):
/// it changes whenever a file is written (a write is a rename of a new inode over the old), made
/// or removed. A missing directory has a fingerprint too, so its appearance is a change.
pub fn dir_signature(path: &Path) -> io::Result<u64> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::MetadataExt;

    let entries = match fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut seen = Vec::new();
    for entry in entries {
        let entry = entry?;
        match entry.metadata() {
            Ok(m) => seen.push((
                entry.file_name(),
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec(),
            )),
            // Removed between listing and stat: the next listing shows it gone.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    seen.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    seen.hash(&mut hasher);
    // Never 0 for a directory that exists, even an empty one.
    Ok(hasher.finish() | 1)
}

/// One file read by [`read_dir`].
#[derive(Debug)]
pub struct ReadItem {
    /// The key (file name).
    pub key: String,
    /// The decoded checkpoint's payload, or why it is not trusted.
    pub payload: Result<(u32, Vec<u8>), CheckpointError>,
}

/// Reads a checkpoint directory without changing it (subscribers and tools do this; only the
/// publisher quarantines). A missing directory reads as empty.
pub fn read_dir(path: &Path, topic: &str) -> io::Result<Vec<ReadItem>> {
    let entries = match fs::read_dir(path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if validate_key(&name).is_err() || !entry.file_type()?.is_file() {
            continue;
        }
        let bytes = match fs::read(entry.path()) {
            Ok(b) => b,
            // Replaced or removed between listing and reading: the publisher is live, skip it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let payload = decode(&bytes).and_then(|cp| {
            if cp.topic == topic {
                Ok((cp.schema_version, cp.payload.to_vec()))
            } else {
                Err(CheckpointError::WrongTopic {
                    found: cp.topic.to_owned(),
                    expected: topic.to_owned(),
                })
            }
        });
        out.push(ReadItem { key: name, payload });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = encode("T", 3, b"payload");
        let cp = decode(&bytes).unwrap();
        assert_eq!(
            cp,
            Checkpoint {
                topic: "T",
                schema_version: 3,
                payload: b"payload"
            }
        );
        assert_eq!(decode_for(&bytes, "T", 3).unwrap(), b"payload");
        assert!(matches!(
            decode_for(&bytes, "U", 3),
            Err(CheckpointError::WrongTopic { .. })
        ));
        assert!(matches!(
            decode_for(&bytes, "T", 4),
            Err(CheckpointError::WrongSchema {
                found: 3,
                expected: 4
            })
        ));
    }

    #[test]
    fn every_truncation_and_bit_flip_is_detected() {
        let bytes = encode("NodeIdentity", 1, b"some payload bytes");
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(decode(&b).is_err(), "flip byte {i} bit {bit}");
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode(&longer),
            Err(CheckpointError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn load_quarantines_bad_files_and_sweeps_temps() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, moved) = CheckpointDir::open(tmp.path().join("T")).unwrap();
        assert!(moved.is_empty());
        dir.write("good", &encode("T", 1, b"g")).unwrap();
        dir.write("flipped", &encode("T", 1, b"f")).unwrap();
        dir.write("old", &encode("T", 0, b"o")).unwrap();
        let mut flipped = fs::read(dir.path().join("flipped")).unwrap();
        *flipped.last_mut().unwrap() ^= 0xff;
        fs::write(dir.path().join("flipped"), flipped).unwrap();
        fs::write(dir.path().join("short"), b"PNC").unwrap();
        fs::write(dir.path().join(".good.tmp"), b"half").unwrap();

        dir.write("undecodable", &encode("T", 1, b"u")).unwrap();
        let loaded = dir
            .load(
                "T",
                1,
                |_, _| None,
                |p| {
                    if p == b"u" {
                        Err("does not decode".into())
                    } else {
                        Ok(())
                    }
                },
            )
            .unwrap();
        assert_eq!(loaded.items, vec![("good".to_owned(), b"g".to_vec())]);
        let mut keys: Vec<_> = loaded.quarantined.iter().map(|q| q.key.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["flipped", "old", "short", "undecodable"]);
        for q in &loaded.quarantined {
            assert!(q.moved_to.exists());
            assert!(!dir.path().join(&q.key).exists());
        }
        assert!(!dir.path().join(".good.tmp").exists());
        // Loading again finds only the good file: the quarantine directory is not an item.
        let again = dir.load("T", 1, |_, _| None, |_| Ok(())).unwrap();
        assert_eq!(again.items.len(), 1);
        assert!(again.quarantined.is_empty());
        // A second bad copy of the same key in the same millisecond keeps the first.
        dir.write("twice", b"bad").unwrap();
        let first = dir.quarantine("twice", "r").unwrap();
        dir.write("twice", b"bad again").unwrap();
        let second = dir.quarantine("twice", "r").unwrap();
        assert_ne!(first.moved_to, second.moved_to);
        assert!(first.moved_to.exists() && second.moved_to.exists());
    }

    #[test]
    fn load_upgrades_earlier_versions_it_can_read_and_quarantines_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _) = CheckpointDir::open(tmp.path().join("T")).unwrap();
        dir.write("current", &encode("T", 3, b"c")).unwrap();
        dir.write("v2", &encode("T", 2, b"two")).unwrap();
        dir.write("v1", &encode("T", 1, b"one")).unwrap();
        dir.write("v2-bad", &encode("T", 2, b"unreadable")).unwrap();
        dir.write("newer", &encode("T", 4, b"four")).unwrap();
        // Reads version 2 only, and only "two".
        let upgrade: Upgrade = |version, payload| {
            (version == 2 && payload == b"two").then(|| b"two, upgraded".to_vec())
        };
        let mut loaded = dir.load("T", 3, upgrade, |_| Ok(())).unwrap();
        loaded.items.sort();
        assert_eq!(
            loaded.items,
            vec![
                ("current".to_owned(), b"c".to_vec()),
                ("v2".to_owned(), b"two, upgraded".to_vec()),
            ]
        );
        assert_eq!(loaded.upgraded, vec![("v2".to_owned(), 2)]);
        let mut moved: Vec<_> = loaded.quarantined.iter().map(|q| q.key.as_str()).collect();
        moved.sort();
        assert_eq!(moved, ["newer", "v1", "v2-bad"]);
        // An upgraded payload is vetted like any other.
        dir.write("v2", &encode("T", 2, b"two")).unwrap();
        let refused = dir
            .load("T", 3, upgrade, |p| {
                if p == b"two, upgraded" {
                    Err("refused".into())
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert!(refused.upgraded.is_empty());
        assert_eq!(refused.quarantined.len(), 1);
    }
}
