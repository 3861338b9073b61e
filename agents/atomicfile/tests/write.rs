//! `write_atomic` on a real file system: the mode asked, a whole replacement, and nothing left
//! behind whether the write succeeds or fails.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use powernode_atomicfile::write_atomic;

/// The unprivileged user the read-only test writes as when it runs as root (root writes
/// through any mode).
const NOBODY: u32 = 65534;
/// Tells the child run of [`read_only_directory_child`] which file to try.
const CHILD_TARGET: &str = "ATOMICFILE_TEST_READ_ONLY_TARGET";

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn replaces_whole_with_the_exact_mode_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    write_atomic(&path, b"one", 0o644).unwrap();
    assert_eq!(mode_of(&path), 0o644);
    // A replacement takes the mode of this write, not the old file's.
    write_atomic(&path, b"two", 0o600).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"two");
    assert_eq!(mode_of(&path), 0o600);
    write_atomic(&path, b"", 0o640).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"");
    assert_eq!(mode_of(&path), 0o640);
    assert_eq!(names_in(dir.path()), ["state.json"]);
}

#[test]
fn concurrent_writers_of_one_path_each_leave_a_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let contents: Vec<Vec<u8>> = (0..8).map(|i| vec![b'a' + i; 64 << 10]).collect();
    std::thread::scope(|scope| {
        for data in &contents {
            let path = &path;
            scope.spawn(move || {
                for _ in 0..20 {
                    write_atomic(path, data, 0o600).unwrap();
                }
            });
        }
    });
    let last = fs::read(&path).unwrap();
    assert!(
        contents.contains(&last),
        "a torn file: {} bytes",
        last.len()
    );
    assert_eq!(names_in(dir.path()), ["state.json"]);
}

#[test]
fn a_failed_rename_keeps_the_old_file_and_removes_the_temp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    write_atomic(&path, b"old", 0o644).unwrap();
    // A non-empty directory stands where the file goes: the rename fails after the temp file
    // was written.
    let blocked = dir.path().join("blocked");
    fs::create_dir_all(blocked.join("inside")).unwrap();
    let err = write_atomic(&blocked, b"new", 0o644).unwrap_err();
    assert_eq!(err.path, blocked);
    assert!(
        err.to_string()
            .starts_with(&format!("cannot write {}: ", blocked.display())),
        "{err}"
    );
    assert_eq!(names_in(dir.path()), ["blocked", "state.json"]);
    assert_eq!(fs::read(&path).unwrap(), b"old");
}

#[test]
fn a_missing_directory_or_no_file_name_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing/state.json");
    let err = write_atomic(&path, b"x", 0o600).unwrap_err();
    assert_eq!(err.source.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(err.path, path);
    let err = write_atomic(Path::new("/"), b"x", 0o600).unwrap_err();
    assert_eq!(err.source.kind(), std::io::ErrorKind::InvalidInput);
}

/// A directory the writer may not write to: the write fails with "permission denied", the old
/// file stays and no temp file appears. Run in a child process, as `nobody` when the tests
/// run as root.
#[test]
fn a_read_only_directory_fails_cleanly() {
    let top = tempfile::tempdir().unwrap();
    fs::set_permissions(top.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let dir = top.path().join("ro");
    fs::create_dir(&dir).unwrap();
    let path = dir.join("state.json");
    write_atomic(&path, b"old", 0o644).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "read_only_directory_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_TARGET, &path);
    if nix::unistd::geteuid().is_root() {
        child.uid(NOBODY).gid(NOBODY);
    }
    let out = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the child write: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(names_in(&dir), ["state.json"]);
    assert_eq!(fs::read(&path).unwrap(), b"old");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The child half of [`a_read_only_directory_fails_cleanly`]; ignored unless that test runs
/// it (it needs the directory that test prepares).
#[test]
#[ignore = "run by a_read_only_directory_fails_cleanly in a child process"]
fn read_only_directory_child() {
    let path = std::env::var_os(CHILD_TARGET)
        .expect("run by a_read_only_directory_fails_cleanly, which names the target");
    let path = Path::new(&path);
    let err = write_atomic(path, b"new", 0o600).unwrap_err();
    assert_eq!(
        err.source.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{err}"
    );
    assert_eq!(err.path, path);
}
