//! Targets for what mountmgr reads back: its own record (which a crash may have left torn) and
//! the kernel's mount table.

use std::path::Path;

use mountmgr::{mountinfo, record};

/// The target name the record seeds are written for: a record must name the target it is
/// loaded for, so the fuzzer's records name this one.
pub const RECORD_TARGET: &str = "app";

/// A record's bytes after its checksum matched ([`record::parse`] for [`RECORD_TARGET`]).
///
/// Property: an accepted record saves (as `RecordStore::save` writes it) to bytes that parse
/// back to the same record.
pub fn record(data: &[u8]) {
    if let Ok(parsed) = record::parse(data, RECORD_TARGET) {
        let saved = serde_json::to_vec_pretty(&parsed).expect("a parsed record serialises");
        assert_eq!(
            record::parse(&saved, RECORD_TARGET).as_ref(),
            Ok(&parsed),
            "a saved record reads back differently"
        );
    }
}

/// Mount table text ([`mountinfo::parse`]), then what mountmgr does with the entries: the
/// mounts under a directory and the order to unmount them.
///
/// Properties: one entry per non-blank line, or an error naming a line that exists; unescaping
/// never lengthens a field; the unmount order is a reordering with the deepest paths first.
pub fn mountinfo(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for field in text.split([' ', '\n']) {
        assert!(mountinfo::unescape(field).len() <= field.len());
    }
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    match mountinfo::parse(text) {
        Ok(entries) => {
            assert_eq!(entries.len(), lines, "one entry per line");
            for dir in ["/", "/run/powernode-mounts"] {
                let below = mountinfo::under(&entries, Path::new(dir));
                let order = mountinfo::unmount_order(&below);
                assert_eq!(order.len(), below.len());
                let depths: Vec<usize> = order
                    .iter()
                    .map(|e| e.mount_point.components().count())
                    .collect();
                assert!(depths.windows(2).all(|w| w[0] >= w[1]), "deepest first");
            }
        }
        Err(mountinfo::MountinfoError::Malformed { line, .. }) => {
            assert!((1..=text.lines().count()).contains(&line), "line {line}");
        }
        Err(e) => panic!("parsing text cannot fail with {e}"),
    }
}
