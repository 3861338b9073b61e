//! Files that must survive a crash or a power cut whole: [`write_atomic`], the shared
//! [`powernode_atomicfile::write_atomic`] for agents that speak `io::Error` (and name the
//! path in their own errors) and may write into a directory that does not exist yet.

use std::fs;
use std::io;
use std::path::Path;

/// Writes `data` to `path` atomically and durably, the file with exactly the permissions
/// `mode` ([`powernode_atomicfile::write_atomic`]), creating the directory first if it is
/// missing. The error is the I/O error alone: the callers say which file.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    powernode_atomicfile::write_atomic(path, data, mode).map_err(|e| e.source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_the_directory_and_writes_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/deeper/state.json");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn an_error_is_the_io_error_of_the_step_that_failed() {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("blocked");
        fs::create_dir_all(blocked.join("inside")).unwrap();
        let err = write_atomic(&blocked, b"new", 0o644).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::IsADirectory, "{err:?}");
    }
}
