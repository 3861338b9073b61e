//! The mode `write_atomic` gives is the mode asked, whatever the umask. One test alone in its
//! own binary: the umask belongs to the whole process.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use nix::sys::stat::{umask, Mode};
use powernode_atomicfile::write_atomic;

#[test]
fn the_umask_neither_narrows_nor_widens_the_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("file");
    let before = umask(Mode::from_bits_truncate(0o077));
    let mut seen = Vec::new();
    for (mask, mode) in [
        (0o077, 0o644),
        (0o077, 0o600),
        (0o000, 0o600),
        (0o000, 0o640),
        (0o022, 0o664),
    ] {
        umask(Mode::from_bits_truncate(mask));
        write_atomic(&path, b"x", mode).unwrap();
        let got = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        seen.push((mask, mode, got));
    }
    umask(before);
    for (mask, mode, got) in seen {
        assert_eq!(
            got, mode,
            "umask {mask:04o}: asked {mode:04o}, got {got:04o}"
        );
    }
}
