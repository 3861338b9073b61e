//! The content-addressed blob store: `<dir>/sha256/<hex>`, written only through a `.partial`
//! file that is hashed as it is written and renamed into place only when its digest matches.
//!
//! A download that dies leaves its `.partial` behind; the next [`Store::begin`] re-hashes what
//! is there and the download resumes at its end. Garbage collection removes every blob and
//! partial that is not in the set a caller keeps.
//!
//! A completed blob is renamed into place before it is synced, and [`Store::make_durable`]
//! syncs it afterwards, while it is verified. Writeback is started while the blob is still
//! being written (`sync_file_range`, every [`WRITEBACK_EVERY`] bytes), so that the sync at the
//! end has only the last few MiB and the metadata left: the disk writes overlap the download
//! instead of following it. A caller makes a blob durable before anything that
//! outlives a power cut refers to it (modulemgr: before the image joins the mount stack). A cut
//! in between can leave a complete-looking blob with the wrong bytes; [`Store::intact`] finds
//! that, and [`Store::remove`] lets it be downloaded again.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::digest::Digest;

/// Why a blob could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The bytes do not hash to the digest they were fetched as; the partial file is removed.
    #[error("blob {expected} arrived with digest {actual} ({bytes} bytes); discarded")]
    DigestMismatch {
        /// The digest asked for.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
        /// How many bytes arrived.
        bytes: u64,
    },
    /// More bytes arrived than the descriptor announced.
    #[error("blob {digest} is longer than its declared {size} bytes")]
    TooLong {
        /// The blob.
        digest: Digest,
        /// Its declared size.
        size: u64,
    },
}

/// How many bytes a blob writer lets pile up before it starts their writeback.
pub const WRITEBACK_EVERY: u64 = 8 << 20;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The store at one directory.
#[derive(Clone, Debug)]
pub struct Store {
    blobs: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the store at `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let blobs = dir.join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err("creating", &blobs))?;
        Ok(Store { blobs })
    }

    /// Where the blob `digest` lives once complete.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Where blob `digest` is written while it arrives. A reader may follow it there while
    /// it grows (the verifier does), and keep following the same file once it is renamed to
    /// [`Store::path`]; it is complete only when [`BlobWriter::finish`] says so.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(format!("{}.partial", digest.hex()))
    }

    /// Syncs blob `digest` and the store directory, so the blob survives a power cut as it is.
    pub fn make_durable(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        File::open(&path)
            .and_then(|f| f.sync_data())
            .map_err(io_err("syncing", &path))?;
        File::open(&self.blobs)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", &self.blobs))
    }

    /// Whether blob `digest` still hashes to its digest (reads it whole).
    pub fn intact(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.path(digest);
        let mut file = File::open(&path).map_err(io_err("opening", &path))?;
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        hash_to_end(&mut file, &mut hasher).map_err(io_err("reading", &path))?;
        Ok(Digest::from_sha256(hasher.finish().as_ref()) == *digest)
    }

    /// Removes blob `digest` (nothing to do if it is not there).
    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Whether the complete blob is present.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Starts or resumes writing blob `digest` of `size` bytes: the bytes already in its
    /// partial file are hashed again, and [`BlobWriter::offset`] tells where to resume.
    pub fn begin(&self, digest: &Digest, size: u64) -> Result<BlobWriter, StoreError> {
        let partial = self.partial_path(digest);
        let mut file = open_partial(&partial)?;
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        let written = hash_to_end(&mut file, &mut hasher).map_err(io_err("reading", &partial))?;
        let mut writer = BlobWriter {
            file,
            hasher: HashThread::start(hasher),
            written,
            // What a resumed download has is synced already (`keep_partial`).
            writeback_from: written,
            size,
            digest: digest.clone(),
            partial,
            complete: self.path(digest),
        };
        if written > size {
            writer.restart()?;
        }
        Ok(writer)
    }

    /// Removes every blob and partial file whose digest is not in `keep`. Returns the removed
    /// files' digests and the bytes freed.
    pub fn gc(&self, keep: &HashSet<Digest>) -> Result<(Vec<Digest>, u64), StoreError> {
        let mut removed = Vec::new();
        let mut freed = 0;
        // Unlinking a file that is still open only takes its name: the kernel frees its
        // blocks at the last close. Freeing a 256 MiB image takes ext4 tens of milliseconds,
        // which would hold up the caller (modulemgr's loop, with a new assignment waiting), so
        // each blob is opened before it is unlinked and closed on a thread of its own.
        let mut closing = Vec::new();
        let entries = fs::read_dir(&self.blobs).map_err(io_err("listing", &self.blobs))?;
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &self.blobs))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let hex = name.strip_suffix(".partial").unwrap_or(name);
            let Ok(digest) = Digest::parse(&format!("sha256:{hex}")) else {
                continue;
            };
            if keep.contains(&digest) {
                continue;
            }
            let path = entry.path();
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            closing.extend(File::open(&path).ok());
            fs::remove_file(&path).map_err(io_err("removing", &path))?;
            freed += len;
            removed.push(digest);
        }
        if !closing.is_empty() {
            let spawned = std::thread::Builder::new()
                .name("store-gc".into())
                .spawn(move || drop(closing));
            // Without a thread the files close here when the error drops them: slower, not wrong.
            if let Err(e) = spawned {
                tracing::debug!(error = %e, "closing collected blobs inline");
            }
        }
        Ok((removed, freed))
    }
}

/// Feeds `file` from its position to its end into `hasher`; returns the bytes read.
fn hash_to_end(file: &mut File, hasher: &mut ring::digest::Context) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(read);
        }
        hasher.update(&buf[..n]);
        read += n as u64;
    }
}

/// A blob being written: every byte is hashed as it is appended to the partial file. The
/// hashing runs on a thread of its own, fed the same reference-counted chunks the caller
/// writes, so hashing and writing overlap (each costs about as much as the other).
pub struct BlobWriter {
    file: File,
    hasher: HashThread,
    written: u64,
    /// Where the bytes whose writeback has not been started begin.
    writeback_from: u64,
    size: u64,
    digest: Digest,
    partial: PathBuf,
    complete: PathBuf,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("digest", &self.digest)
            .field("written", &self.written)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// How many bytes are already written: where the download resumes.
    pub fn offset(&self) -> u64 {
        self.written
    }

    /// Throws away what was written (the registry answered with the whole blob, not the rest).
    pub fn restart(&mut self) -> Result<(), StoreError> {
        self.file
            .set_len(0)
            .map_err(io_err("truncating", &self.partial))?;
        let old = std::mem::replace(
            &mut self.hasher,
            HashThread::start(ring::digest::Context::new(&ring::digest::SHA256)),
        );
        drop(old.finish());
        self.written = 0;
        self.writeback_from = 0;
        Ok(())
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StoreError> {
        if self.written + bytes.len() as u64 > self.size {
            return Err(StoreError::TooLong {
                digest: self.digest.clone(),
                size: self.size,
            });
        }
        // Hashed beside the write, not after it: the hashing thread starts on the piece while
        // it is copied into the page cache.
        self.hasher.update(bytes.clone());
        self.file
            .write_all(&bytes)
            .map_err(io_err("writing", &self.partial))?;
        self.written += bytes.len() as u64;
        if self.written - self.writeback_from >= WRITEBACK_EVERY {
            self.start_writeback();
        }
        Ok(())
    }

    /// Starts (does not wait for) the writeback of the bytes written since the last call. Only
    /// a head start for [`Store::make_durable`], which is what makes the blob durable: a
    /// failure here changes nothing but the time that takes.
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        let (from, len) = (self.writeback_from, self.written - self.writeback_from);
        // SAFETY: `self.file` is an open descriptor for the duration of the call;
        // sync_file_range only reads its arguments and touches no memory of ours.
        let result = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                from as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if result != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "sync_file_range failed");
        }
        self.writeback_from = self.written;
    }

    /// Stops without completing: what was written stays in the partial file (synced), for a
    /// later [`Store::begin`] to resume from.
    pub fn keep_partial(self) -> Result<(), StoreError> {
        drop(self.hasher.finish());
        self.file
            .sync_data()
            .map_err(io_err("syncing", &self.partial))
    }

    /// Checks the digest; if it matches, moves the blob into place (not yet synced: see
    /// [`Store::make_durable`]), else removes the partial file.
    pub fn finish(self) -> Result<PathBuf, StoreError> {
        let (actual, busy) = self.hasher.finish_timed();
        tracing::info!(digest = %self.digest, bytes = self.written, hash_ms = busy.as_millis() as u64,
            "blob hashed while it was written");
        if actual != self.digest {
            let _ = fs::remove_file(&self.partial);
            return Err(StoreError::DigestMismatch {
                expected: self.digest,
                actual,
                bytes: self.written,
            });
        }
        fs::rename(&self.partial, &self.complete).map_err(io_err("renaming", &self.partial))?;
        // Installed but not synced: the window a power cut or a kill can leave a blob in.
        failpoint::hit("store.installed");
        Ok(self.complete)
    }
}

/// Opens (creating it) the partial file at `path` for one writer. A download dropped midway
/// (its fetch cancelled) leaves its writer thread draining the last pieces into the file
/// before it syncs and closes it; a writer that starts meanwhile would append beside it and
/// ruin both. So each writer holds an exclusive `flock` on the file, and a new one waits for
/// the old one to let go. The file it then holds may have been completed (renamed into
/// place) or removed meanwhile: it is the partial file only if the path still names it.
fn open_partial(path: &Path) -> Result<File, StoreError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_err("opening", path))?;
        loop {
            // SAFETY: `file` is an open descriptor for the duration of the call.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("locking", path)(e));
            }
        }
        let held = file.metadata().map_err(io_err("reading", path))?;
        match fs::metadata(path) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => return Ok(file),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("reading", path)(e)),
        }
    }
}

/// SHA-256 on a thread of its own, fed through a bounded channel.
struct HashThread {
    chunks: Option<std::sync::mpsc::SyncSender<bytes::Bytes>>,
    /// Gives the digest and the time spent hashing (not waiting for chunks).
    thread: Option<std::thread::JoinHandle<(Digest, std::time::Duration)>>,
}

impl HashThread {
    /// Continues `context` on a new thread.
    fn start(mut context: ring::digest::Context) -> HashThread {
        // A few chunks in flight: enough to keep both threads busy, little memory.
        let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(4);
        let thread = std::thread::Builder::new()
            .name("blob-sha256".into())
            .spawn(move || {
                let mut busy = std::time::Duration::ZERO;
                for chunk in rx {
                    let started = std::time::Instant::now();
                    context.update(&chunk);
                    busy += started.elapsed();
                }
                (Digest::from_sha256(context.finish().as_ref()), busy)
            });
        match thread {
            Ok(thread) => HashThread {
                chunks: Some(tx),
                thread: Some(thread),
            },
            // No thread to be had: a hasher whose digest matches nothing, so the blob is
            // refused rather than trusted.
            Err(e) => {
                tracing::error!(error = %e, "cannot start the hashing thread");
                HashThread {
                    chunks: None,
                    thread: None,
                }
            }
        }
    }

    fn update(&mut self, chunk: bytes::Bytes) {
        if let Some(tx) = &self.chunks {
            if tx.send(chunk).is_err() {
                self.chunks = None;
            }
        }
    }

    /// The digest of everything fed; the all-zero digest if the thread failed.
    fn finish(self) -> Digest {
        self.finish_timed().0
    }

    /// [`HashThread::finish`], and how long the thread spent hashing.
    fn finish_timed(mut self) -> (Digest, std::time::Duration) {
        self.chunks = None;
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_else(|| (Digest::from_sha256(&[0; 32]), std::time::Duration::ZERO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_verifies_and_collects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = vec![7u8; 100_000];
        let digest = Digest::of(&data);

        let mut w = store.begin(&digest, data.len() as u64).unwrap();
        w.write(bytes::Bytes::copy_from_slice(&data[..30_000]))
            .unwrap();
        drop(w); // a crash mid-download

        let mut w = store.begin(&digest, data.len() as u64).unwrap();
        assert_eq!(w.offset(), 30_000);
        w.write(bytes::Bytes::copy_from_slice(&data[30_000..]))
            .unwrap();
        assert!(
            w.write(bytes::Bytes::from_static(b"x")).is_err(),
            "longer than declared"
        );
        let path = w.finish().unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);
        assert!(store.contains(&digest));
        store.make_durable(&digest).unwrap();
        assert!(store.intact(&digest).unwrap());

        let other = Digest::of(b"other");
        let mut w = store.begin(&other, 5).unwrap();
        w.write(bytes::Bytes::from_static(b"OTHER")).unwrap();
        assert!(matches!(w.finish(), Err(StoreError::DigestMismatch { .. })));
        assert!(!store.contains(&other));

        let mut w = store.begin(&other, 5).unwrap();
        w.write(bytes::Bytes::from_static(b"ot")).unwrap();
        drop(w);
        let (removed, _) = store.gc(&HashSet::from([digest.clone()])).unwrap();
        assert_eq!(removed, vec![other]);
        assert!(store.contains(&digest));
        let (removed, freed) = store.gc(&HashSet::new()).unwrap();
        assert_eq!((removed, freed), (vec![digest], 100_000));
    }

    /// A blob long enough for its writeback to be started on the way, resumed past such a
    /// point: stored whole and intact.
    #[test]
    fn a_long_blob_is_written_back_on_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..2 * WRITEBACK_EVERY as usize + 5)
            .map(|i| (i % 251) as u8)
            .collect();
        let digest = Digest::of(&data);
        let cut = WRITEBACK_EVERY as usize + 4096;
        let mut w = store.begin(&digest, data.len() as u64).unwrap();
        for piece in data[..cut].chunks(1 << 20) {
            w.write(bytes::Bytes::copy_from_slice(piece)).unwrap();
        }
        w.keep_partial().unwrap();
        let mut w = store.begin(&digest, data.len() as u64).unwrap();
        assert_eq!(w.offset(), cut as u64);
        for piece in data[cut..].chunks(1 << 20) {
            w.write(bytes::Bytes::copy_from_slice(piece)).unwrap();
        }
        let path = w.finish().unwrap();
        store.make_durable(&digest).unwrap();
        assert!(store.intact(&digest).unwrap());
        assert_eq!(fs::read(path).unwrap(), data);
    }

    #[test]
    fn a_blob_changed_on_disk_is_found_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = Digest::of(b"module image");
        let mut w = store.begin(&digest, 12).unwrap();
        w.write(bytes::Bytes::from_static(b"module image")).unwrap();
        w.finish().unwrap();
        // What a power cut between the rename and the sync can leave behind.
        fs::write(store.path(&digest), b"\0\0\0\0\0\0").unwrap();
        assert!(!store.intact(&digest).unwrap());
        store.remove(&digest).unwrap();
        assert!(!store.contains(&digest));
        store.remove(&digest).unwrap();
        assert!(store.make_durable(&digest).is_err(), "nothing to sync");
    }

    /// A writer still draining a dropped download into the partial file keeps a new one
    /// waiting, so the resumed file is the old writer's bytes and then the new one's.
    #[test]
    fn a_second_writer_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&data);
        let mut first = store.begin(&digest, data.len() as u64).unwrap();
        first
            .write(bytes::Bytes::copy_from_slice(&data[..50_000]))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let second = {
            let (store, digest, size) = (store.clone(), digest.clone(), data.len() as u64);
            std::thread::spawn(move || {
                let w = store.begin(&digest, size).unwrap();
                tx.send(()).unwrap();
                w
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "the second writer waits");
        // The first one's last piece, then it lets go (as `keep_partial` does).
        first
            .write(bytes::Bytes::copy_from_slice(&data[50_000..80_000]))
            .unwrap();
        first.keep_partial().unwrap();
        let mut second = second.join().unwrap();
        assert_eq!(second.offset(), 80_000);
        second
            .write(bytes::Bytes::copy_from_slice(&data[80_000..]))
            .unwrap();
        let path = second.finish().unwrap();
        assert_eq!(fs::read(path).unwrap(), data);
    }
}
