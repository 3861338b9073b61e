//! Replacing a file whole: [`write_atomic`] writes a temp file beside the target, syncs it,
//! renames it over the target and syncs the directory (DESIGN §3), so that a crash or a power
//! cut leaves the old contents or the new, never a mix.
//!
//! The agents and the controller share this one helper because the details are easy to get
//! wrong and each copy got one wrong: the temp file is created with `O_EXCL` under a name no
//! other write uses, so a leftover of a crash is never reused (reusing one kept the leftover's
//! mode: a 0644 leftover made a secret 0644), and its mode is set with `fchmod` after
//! creation, so the umask can neither widen nor narrow it. Until that `fchmod` the file has
//! the asked mode less the umask: never more than asked.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The longest part of the target's file name kept in a temp file's name (in bytes), so that
/// the temp name, with its dot, process id and counter, stays within `NAME_MAX` (255).
const NAME_KEPT: usize = 200;
/// How many temp names one write tries when each is taken: only leftovers of crashed
/// processes that had this process id take them, so a handful at most.
const TEMP_ATTEMPTS: u64 = 64;

/// A file that could not be written, naming it. On this error the target is as it was (or,
/// when only the final directory sync failed, already replaced but maybe not durably), and no
/// temp file of this write is left.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct WriteError {
    /// The file that was to be written.
    pub path: PathBuf,
    /// What failed.
    #[source]
    pub source: io::Error,
}

/// Replaces `path` with `data`, the file with exactly the permissions `mode` (e.g. `0o600`),
/// atomically and durably:
///
/// 1. a temp file `.<name>.<pid>.<n>.tmp` in `path`'s directory, created with `O_EXCL` and
///    `mode` (a taken name is skipped, never reused), then `fchmod` to `mode`;
/// 2. `data` written, the file fsynced;
/// 3. renamed over `path`;
/// 4. the directory fsynced, so the rename survives a power cut.
///
/// The temp file is removed when a step before the rename fails. Two writers of one path
/// each rename a whole file of their own: the last rename wins. The directory must exist.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    write_atomic_counting(path, data, mode, &WRITES)
}

/// [`write_atomic`] with the temp names numbered by `writes` (tests start their own at 0).
fn write_atomic_counting(
    path: &Path,
    data: &[u8],
    mode: u32,
    writes: &AtomicU64,
) -> Result<(), WriteError> {
    let at = |source| WriteError {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| at(io::Error::new(io::ErrorKind::InvalidInput, "names no file")))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let (tmp, file) = create_temp(dir, name, mode, writes).map_err(at)?;
    let placed = fill(file, data, mode).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(at(e));
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(at)
}

/// The temp file's name for write number `n` of this process.
fn temp_name(name: &OsStr, n: u64) -> OsString {
    let bytes = name.as_bytes();
    let kept = OsStr::from_bytes(&bytes[..bytes.len().min(NAME_KEPT)]);
    let mut tmp = OsString::from(".");
    tmp.push(kept);
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    tmp
}

/// Creates a temp file in `dir` that did not exist before (`O_EXCL`), with at most `mode`.
fn create_temp(
    dir: &Path,
    name: &OsStr,
    mode: u32,
    writes: &AtomicU64,
) -> io::Result<(PathBuf, File)> {
    for _ in 0..TEMP_ATTEMPTS {
        let tmp = dir.join(temp_name(name, writes.fetch_add(1, Ordering::Relaxed)));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            // A leftover of a crashed process that had this id: not ours to touch.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{TEMP_ATTEMPTS} temp file names in a row are taken by leftovers"),
    ))
}

/// Sets the exact mode (the umask applied at creation), writes `data` and syncs it.
fn fill(mut file: File, data: &[u8], mode: u32) -> io::Result<()> {
    file.set_permissions(Permissions::from_mode(mode))?;
    file.write_all(data)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_leftover_temp_of_another_mode_is_skipped_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let name = OsStr::new("secret");
        // Leftovers of a crashed process with this id, under the names this count picks first.
        for n in 0..2 {
            let leftover = dir.path().join(temp_name(name, n));
            fs::write(&leftover, b"stale").unwrap();
            fs::set_permissions(&leftover, Permissions::from_mode(0o644)).unwrap();
        }
        let writes = AtomicU64::new(0);
        write_atomic_counting(&path, b"key", 0o600, &writes).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"key");
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(writes.load(Ordering::Relaxed), 3, "two names skipped");
        for n in 0..2 {
            let leftover = dir.path().join(temp_name(name, n));
            assert_eq!(
                fs::read(&leftover).unwrap(),
                b"stale",
                "a leftover was touched"
            );
            assert_eq!(mode_of(&leftover), 0o644);
        }
    }

    #[test]
    fn gives_up_when_every_name_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for n in 0..TEMP_ATTEMPTS {
            fs::write(dir.path().join(temp_name(OsStr::new("f"), n)), b"").unwrap();
        }
        let err = write_atomic_counting(&path, b"x", 0o600, &AtomicU64::new(0)).unwrap_err();
        assert_eq!(err.source.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(err.path, path);
        assert!(!path.exists());
    }

    #[test]
    fn a_long_name_makes_a_temp_name_within_name_max() {
        let name = "n".repeat(255);
        let tmp = temp_name(OsStr::new(&name), u64::MAX);
        assert!(tmp.len() <= 255, "{} bytes", tmp.len());
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join(&name), b"x", 0o644).unwrap();
        assert_eq!(fs::read(dir.path().join(&name)).unwrap(), b"x");
    }
}
