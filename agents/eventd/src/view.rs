//! The journal read by someone who does not own it (`powernode-agent events`): never
//! repairs, moves or deletes anything — eventd does — and copes with segments being appended,
//! compacted or deleted while it reads.
//!
//! A partial record at the end of the last segment is an append in progress, not damage. A
//! segment that disappears between the listing and the reading was delivered or compacted
//! meanwhile: the read starts again from a fresh listing, so what it returns is one state of
//! the journal, old or new, never a mix.

use std::io;
use std::path::Path;

use crate::journal::read_cursor;
use crate::segment;

/// Fresh listings tried before a journal that keeps changing is reported as an error.
const ATTEMPTS: usize = 8;

/// What a read found.
#[derive(Debug, Default)]
pub struct View {
    /// The first record not yet delivered to the controller.
    pub cursor: u64,
    /// The records read, oldest first: index and payload.
    pub records: Vec<(u64, Vec<u8>)>,
    /// Segments with a bad record before their end (eventd quarantines them when it next
    /// opens the journal): what was unreadable, and why.
    pub damaged: Vec<String>,
}

/// Reads the journal in `dir`: every record with an index past `after` (all of them when
/// `None`). A missing journal reads as empty.
pub fn read(dir: &Path, after: Option<u64>) -> io::Result<View> {
    let mut last_error = None;
    for _ in 0..ATTEMPTS {
        match read_once(dir, after) {
            Ok(view) => return Ok(view),
            Err(e) if e.kind() == io::ErrorKind::NotFound => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("the journal kept changing")))
}

fn read_once(dir: &Path, after: Option<u64>) -> io::Result<View> {
    let listing = segment::list(dir)?;
    let live = &listing.live;
    let mut view = View {
        cursor: read_cursor(dir).unwrap_or_else(|| live.first().map_or(0, |s| s.first)),
        ..View::default()
    };
    for (i, seg) in live.iter().enumerate() {
        let next = live.get(i + 1).map(|n| n.first);
        // Every record of this segment is below the next one's first index.
        if let (Some(after), Some(next)) = (after, next) {
            if next <= after + 1 {
                continue;
            }
        }
        let scan = segment::read(&seg.path, |n, payload| {
            let index = seg.first + n;
            if after.is_none_or(|a| index > a) {
                view.records.push((index, payload.to_vec()));
            }
            true
        })?;
        if let Some(reason) = scan.bad {
            if next.is_some() {
                view.damaged
                    .push(format!("{}: {reason}", seg.path.display()));
            }
        }
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Journal, Keep};
    use std::io::Write;

    fn indexes(view: &View) -> Vec<u64> {
        view.records.iter().map(|(i, _)| *i).collect()
    }

    #[test]
    fn reads_without_touching_and_follows_from_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let missing = read(&dir.path().join("none"), None).unwrap();
        assert!(missing.records.is_empty());
        assert!(
            !dir.path().join("none").exists(),
            "a reader creates nothing"
        );

        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_max(4096);
        for i in 0..10u8 {
            j.append(&[vec![i; 1000]]).unwrap();
        }
        j.delivered_through(3).unwrap();
        let view = read(dir.path(), None).unwrap();
        assert_eq!(view.cursor, 3);
        assert_eq!(indexes(&view).last(), Some(&9));
        assert_eq!(indexes(&read(dir.path(), Some(7)).unwrap()), [8, 9]);
        assert!(read(dir.path(), Some(9)).unwrap().records.is_empty());

        // An append in progress: half a record at the end is not damage, and not shown.
        let last = segment::list(dir.path()).unwrap().live.pop().unwrap().path;
        let before = std::fs::read(&last).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap()
            .write_all(&[7, 0, 0, 0, 1])
            .unwrap();
        let view = read(dir.path(), Some(7)).unwrap();
        assert_eq!(indexes(&view), [8, 9]);
        assert!(view.damaged.is_empty());
        std::fs::write(&last, &before).unwrap();

        // After a compaction the reader sees the new numbering and nothing twice.
        j.rewrite(|i, _| if i % 2 == 0 { Keep::Drop } else { Keep::Same })
            .unwrap();
        let view = read(dir.path(), None).unwrap();
        assert_eq!(
            indexes(&view),
            [6, 7, 8, 9],
            "3, 5, 7, 9 kept, ending at 10"
        );
        assert_eq!(view.records[0].1, vec![3u8; 1000]);
        j.append(&[vec![10; 10]]).unwrap();
        assert_eq!(indexes(&read(dir.path(), Some(9)).unwrap()), [10]);
    }
}
