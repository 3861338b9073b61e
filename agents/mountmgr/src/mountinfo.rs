//! The kernel's table of mounts, `/proc/self/mountinfo`, read so that mountmgr knows what is
//! really mounted instead of trusting its memory (which a `kill -9` erases).
//!
//! One line per mount (proc(5)):
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)
//! ```
//!
//! The optional fields (7) end at a lone `-`. Paths are written with spaces, tabs, newlines and
//! backslashes as three-digit octal escapes (`\040`), which [`unescape`] decodes.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Where the kernel publishes the calling process's mount table. Always the real `/proc`, not
/// one under the agent's root: the mounts are real whatever the root is.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// A line of mountinfo that is not in the documented format.
#[derive(Debug, thiserror::Error)]
pub enum MountinfoError {
    /// The file could not be read.
    #[error("reading {MOUNTINFO}: {0}")]
    Read(#[from] std::io::Error),
    /// A line is malformed.
    #[error("{MOUNTINFO} line {line}: {reason}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// One mount, with the fields mountmgr uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's unique id.
    pub id: u32,
    /// The parent mount's id.
    pub parent: u32,
    /// The filesystem's device, `major:minor`: the same for every mount of one filesystem
    /// (a bind or a clone of an overlay shows the overlay's).
    pub dev: String,
    /// Where it is mounted (decoded).
    pub mount_point: PathBuf,
    /// Filesystem type, e.g. `erofs`, `overlay`, `tmpfs`.
    pub fs_type: String,
    /// What was mounted (decoded): an image path, a loop device, `tmpfs`, `overlay`.
    pub source: PathBuf,
    /// The filesystem's own options (`lowerdir=…` for an overlay), undecoded.
    pub super_options: String,
}

/// Reads and parses the calling process's mount table.
pub fn read() -> Result<Vec<MountEntry>, MountinfoError> {
    parse(&std::fs::read_to_string(MOUNTINFO)?)
}

/// Parses mountinfo text. Entries are in the kernel's order, which is mount order: a mount
/// always comes after the mount it sits on.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, MountinfoError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            parse_line(line).map_err(|reason| MountinfoError::Malformed {
                line: i + 1,
                reason,
            })
        })
        .collect()
}

fn parse_line(line: &str) -> Result<MountEntry, &'static str> {
    let mut fields = line.split(' ');
    let id = fields
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or("bad mount id")?;
    let parent = fields
        .next()
        .and_then(|f| f.parse().ok())
        .ok_or("bad parent id")?;
    let dev = fields.next().ok_or("missing major:minor")?;
    let _root = fields.next().ok_or("missing root")?;
    let mount_point = fields.next().ok_or("missing mount point")?;
    let _options = fields.next().ok_or("missing mount options")?;
    // Optional fields (shared:N, master:N, …) run up to a lone "-".
    loop {
        match fields.next() {
            Some("-") => break,
            Some(_) => continue,
            None => return Err("missing the \"-\" separator"),
        }
    }
    let fs_type = fields.next().ok_or("missing filesystem type")?;
    let source = fields.next().ok_or("missing mount source")?;
    let super_options = fields.next().unwrap_or_default();
    Ok(MountEntry {
        id,
        parent,
        dev: dev.to_owned(),
        mount_point: PathBuf::from(OsString::from_vec(unescape(mount_point))),
        fs_type: fs_type.to_owned(),
        source: PathBuf::from(OsString::from_vec(unescape(source))),
        super_options: super_options.to_owned(),
    })
}

/// Decodes the kernel's `\ooo` octal escapes. A backslash not followed by three octal digits
/// is kept as written (the kernel never writes one, but a decoder must not panic on it).
pub fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && is_octal_escape(&bytes[i + 1..i + 4]) {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            // Three octal digits reach 511; only byte values are ever written.
            out.push(u8::try_from(value).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

fn is_octal_escape(digits: &[u8]) -> bool {
    digits.len() == 3 && digits.iter().all(|d| (b'0'..=b'7').contains(d))
}

/// The entries mounted strictly below `dir` (not `dir` itself), in mount order.
pub fn under<'a>(entries: &'a [MountEntry], dir: &Path) -> Vec<&'a MountEntry> {
    entries
        .iter()
        .filter(|e| e.mount_point != dir && e.mount_point.starts_with(dir))
        .collect()
}

/// The mounts exactly at `path`, bottom first: the one on the filesystem below `path`, then
/// each one on top of the one before. Followed through the parent ids rather than taken in
/// the kernel's order, which a mount moved beneath another (`MOVE_MOUNT_BENEATH`) does not
/// keep; mounts the chain does not reach (a table read mid-change) come last.
pub fn stack_at<'a>(entries: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    let at: Vec<&MountEntry> = entries.iter().filter(|e| e.mount_point == path).collect();
    let mut ordered: Vec<&MountEntry> = Vec::with_capacity(at.len());
    let mut below = at
        .iter()
        .find(|e| !at.iter().any(|o| o.id == e.parent))
        .copied();
    while let Some(entry) = below {
        if ordered.iter().any(|o| o.id == entry.id) {
            break;
        }
        ordered.push(entry);
        below = at.iter().find(|e| e.parent == entry.id).copied();
    }
    for entry in at {
        if !ordered.iter().any(|o| o.id == entry.id) {
            ordered.push(entry);
        }
    }
    ordered
}

/// `entries` in the order they can be unmounted: deepest path first, and on one path the
/// mount made last first (so stacked mounts come off top down).
pub fn unmount_order<'a>(entries: &[&'a MountEntry]) -> Vec<&'a MountEntry> {
    let mut ordered: Vec<&MountEntry> = entries.iter().rev().copied().collect();
    // Stable sort: entries of equal depth keep the reversed (newest first) order.
    ordered.sort_by_key(|e| std::cmp::Reverse(e.mount_point.components().count()));
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
42 27 0:39 / /tmp/r/run/powernode-mounts/app/A/layers/0-tools ro,relatime - erofs /tmp/img\\040one.erofs ro,user_xattr
43 27 0:40 / /tmp/r/run/powernode-mounts/app/A/upper rw,relatime - tmpfs tmpfs rw,mode=755
44 27 0:41 / /tmp/r/run/powernode-mounts/app/A/merged rw,relatime master:3 shared:7 - overlay overlay rw,lowerdir=/a:/b,upperdir=/u,workdir=/w
";

    #[test]
    fn parses_entries() {
        let entries = parse(SAMPLE).unwrap();
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[0].mount_point, PathBuf::from("/proc"));
        assert_eq!(entries[1].fs_type, "ext4");
        assert_eq!(entries[2].id, 42);
        assert_eq!(entries[2].parent, 27);
        assert_eq!(entries[2].fs_type, "erofs");
        assert_eq!(entries[2].source, PathBuf::from("/tmp/img one.erofs"));
        assert_eq!(entries[4].fs_type, "overlay");
        assert_eq!(
            entries[4].super_options,
            "rw,lowerdir=/a:/b,upperdir=/u,workdir=/w"
        );
    }

    #[test]
    fn unescape_table() {
        let cases: &[(&str, &[u8])] = &[
            ("plain", b"plain"),
            ("a\\040b", b"a b"),
            ("tab\\011x", b"tab\tx"),
            ("nl\\012", b"nl\n"),
            ("back\\134slash", b"back\\slash"),
            ("\\303\\251t\\303\\251", "été".as_bytes()),
            ("short\\04", b"short\\04"),
            ("notoctal\\089", b"notoctal\\089"),
            ("trailing\\", b"trailing\\"),
            ("", b""),
        ];
        for (input, want) in cases {
            assert_eq!(unescape(input), *want, "input {input:?}");
        }
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        let cases = [
            "x 27 0:21 / /proc rw - proc proc rw",
            "22 27 0:21 / /proc rw proc proc rw",
            "22 27 0:21 / /proc rw -",
            "22",
            "22 27",
        ];
        for line in cases {
            let err = parse(line).unwrap_err();
            assert!(
                matches!(err, MountinfoError::Malformed { line: 1, .. }),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn under_and_unmount_order() {
        let text = "\
1 0 0:1 / / rw - ext4 /dev/vda rw
2 1 0:2 / /m/t rw - tmpfs tmpfs rw
3 2 0:3 / /m/t/A/layers/0-a ro - erofs /i/a ro
4 2 0:4 / /m/t/A/upper rw - tmpfs tmpfs rw
5 2 0:5 / /m/t/A/merged rw - overlay overlay rw
6 5 0:6 / /m/t/A/merged rw - tmpfs tmpfs rw
7 1 0:7 / /m/tx rw - tmpfs tmpfs rw
";
        let entries = parse(text).unwrap();
        let below = under(&entries, Path::new("/m/t"));
        let ids: Vec<u32> = below.iter().map(|e| e.id).collect();
        assert_eq!(
            ids,
            [3, 4, 5, 6],
            "the dir itself and /m/tx are not below /m/t"
        );
        let order: Vec<u32> = unmount_order(&below).iter().map(|e| e.id).collect();
        // The deepest path first, then newest first, so the stacked mount 6 comes off before 5.
        assert_eq!(order, [3, 6, 5, 4]);
    }

    #[test]
    fn stack_at_follows_the_parents() {
        // 9 was moved beneath 8: the kernel lists the top (8) first.
        let text = "\
1 0 0:1 / / rw - ext4 /dev/vda rw
8 9 0:41 / /opt/pn rw - overlay overlay rw
9 1 0:42 / /opt/pn rw - overlay overlay rw
10 8 0:43 / /opt/pn rw - overlay overlay rw
11 8 0:44 / /opt/pn/sub rw - tmpfs tmpfs rw
";
        let entries = parse(text).unwrap();
        assert_eq!(entries[1].dev, "0:41");
        let ids: Vec<u32> = stack_at(&entries, Path::new("/opt/pn"))
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [9, 8, 10], "bottom first");
        assert!(stack_at(&entries, Path::new("/opt")).is_empty());
    }
}
