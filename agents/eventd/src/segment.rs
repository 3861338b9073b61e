//! The journal's on-disk format, shared by its owner ([`crate::journal`]) and its read-only
//! readers ([`crate::view`]): segment names, which segments are live, and record framing.
//!
//! ```text
//! <first, 20 digits>.seg               appended segment: records first, first+1, …
//! <first, 20 digits>-<upto, 20>.seg    compacted segment: records first, first+1, … < upto;
//!                                      it replaces every segment whose first index is < upto
//! .compact.tmp                         a compaction being written (never read)
//! record = len u32 LE | crc32 u32 LE | payload
//! ```
//!
//! A compaction writes its survivors into one new file and renames it into place: that
//! rename is the switch. From then on every other segment that starts before `upto` is
//! superseded — ignored by every reader, removed by the owner — so a crash between the rename
//! and the removal of the old files leaves the new state, never both copies.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// The largest record payload accepted (an event is far smaller).
pub const RECORD_MAX: usize = 256 << 10;
/// Bytes of a record's header.
pub const HEADER: usize = 8;
/// The file a compaction writes before renaming it into place.
pub const COMPACT_TEMP: &str = ".compact.tmp";

/// One segment file, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentName {
    /// The index of its first record.
    pub first: u64,
    /// For a compacted segment: every other segment starting before this is superseded.
    pub upto: Option<u64>,
    /// Where it is.
    pub path: PathBuf,
}

impl SegmentName {
    /// The file name of an appended segment.
    pub fn appended(first: u64) -> String {
        format!("{first:020}.seg")
    }

    /// The file name of a compacted segment.
    pub fn compacted(first: u64, upto: u64) -> String {
        format!("{first:020}-{upto:020}.seg")
    }

    /// Parses a segment file name; `None` for any other file.
    fn parse(name: &str, path: PathBuf) -> Option<SegmentName> {
        let stem = name.strip_suffix(".seg")?;
        let (first, upto) = match stem.split_once('-') {
            Some((first, upto)) => (first, Some(upto.parse::<u64>().ok()?)),
            None => (stem, None),
        };
        let first = first.parse::<u64>().ok()?;
        if upto.is_some_and(|u| u < first) {
            return None;
        }
        Some(SegmentName { first, upto, path })
    }
}

/// The segment files of a journal directory, sorted out.
#[derive(Debug, Default)]
pub struct Listing {
    /// The segments that hold the journal, oldest first.
    pub live: Vec<SegmentName>,
    /// Segments a compaction replaced, whose removal a crash interrupted.
    pub superseded: Vec<SegmentName>,
    /// A compaction's unfinished output.
    pub temp: Option<PathBuf>,
}

/// Lists `dir`'s segments. A missing directory lists as empty.
pub fn list(dir: &Path) -> io::Result<Listing> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::default()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    let mut temp = None;
    for entry in entries {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name == COMPACT_TEMP {
            temp = Some(entry.path());
        } else if let Some(seg) = SegmentName::parse(&name, entry.path()) {
            names.push(seg);
        }
    }
    Ok(sort_out(names, temp))
}

/// Splits segment names into live and superseded: the newest compacted segment (the
/// greatest `upto`, then the greatest `first`, since a later compaction of the same records
/// keeps fewer) supersedes every other segment that starts before its `upto`.
fn sort_out(mut names: Vec<SegmentName>, temp: Option<PathBuf>) -> Listing {
    names.sort_by_key(|s| (s.first, s.upto));
    let winner = names
        .iter()
        .filter_map(|s| s.upto.map(|u| (u, s.first)))
        .max();
    let (live, superseded) = match winner {
        None => (names, Vec::new()),
        Some((upto, first)) => names
            .into_iter()
            .partition(|s| s.first >= upto || (s.upto == Some(upto) && s.first == first)),
    };
    Listing {
        live,
        superseded,
        temp,
    }
}

/// Frames `payload` as a record onto `buf`.
pub fn frame(buf: &mut Vec<u8>, payload: &[u8]) -> io::Result<()> {
    check(payload)?;
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

/// Whether `payload` may be a record: 1 to [`RECORD_MAX`] bytes.
pub fn check(payload: &[u8]) -> io::Result<()> {
    if payload.len() > RECORD_MAX || payload.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a {}-byte record: records hold 1 to {RECORD_MAX} bytes",
                payload.len()
            ),
        ));
    }
    Ok(())
}

/// What reading a segment found.
#[derive(Debug)]
pub struct Scan {
    /// Whole, good records.
    pub records: u64,
    /// Bytes up to the end of the last good record.
    pub good_len: u64,
    /// Bytes in the file.
    pub file_len: u64,
    /// Why reading stopped before the end, if it did.
    pub bad: Option<String>,
}

/// Reads the segment at `path` record by record, handing each good payload to `visit`
/// (which returns `false` to stop early), and says where and why it stopped. Streams, so a
/// large compacted segment is never held in memory whole.
pub fn read(path: &Path, visit: impl FnMut(u64, &[u8]) -> bool) -> io::Result<Scan> {
    let file = fs::File::open(path)?;
    let file_len = file.metadata()?.len();
    scan(BufReader::with_capacity(64 << 10, file), file_len, visit)
}

/// [`read`] over any reader of a segment's `file_len` bytes: what the fuzz target drives.
pub fn scan(
    mut reader: impl BufRead,
    file_len: u64,
    mut visit: impl FnMut(u64, &[u8]) -> bool,
) -> io::Result<Scan> {
    let mut pos = 0u64;
    let mut records = 0u64;
    let mut payload = Vec::new();
    let bad = loop {
        if reader.fill_buf()?.is_empty() {
            break None;
        }
        let mut header = [0u8; HEADER];
        if let Err(reason) = read_full(&mut reader, &mut header, "partial header")? {
            break Some(reason);
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > RECORD_MAX {
            break Some("length over the record limit");
        }
        if len == 0 {
            // Never written (an event is never empty): zeros a crash left past the end.
            break Some("empty record");
        }
        payload.resize(len, 0);
        if let Err(reason) = read_full(&mut reader, &mut payload, "partial payload")? {
            break Some(reason);
        }
        if crc32fast::hash(&payload) != crc {
            break Some("CRC mismatch");
        }
        pos += (HEADER + len) as u64;
        records += 1;
        if !visit(records - 1, &payload) {
            return Ok(Scan {
                records,
                good_len: pos,
                file_len,
                bad: None,
            });
        }
    };
    Ok(Scan {
        records,
        good_len: pos,
        file_len,
        bad: bad.map(|reason| format!("record {records} at byte {pos}: {reason}")),
    })
}

/// Fills `buf`; `Ok(Err(why))` when the file ends first.
fn read_full(
    reader: &mut impl Read,
    buf: &mut [u8],
    why: &'static str,
) -> io::Result<Result<(), &'static str>> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(Ok(())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Err(why)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(first: u64, upto: Option<u64>) -> SegmentName {
        let file = match upto {
            Some(u) => SegmentName::compacted(first, u),
            None => SegmentName::appended(first),
        };
        SegmentName::parse(&file, PathBuf::from(&file)).unwrap()
    }

    fn firsts(list: &[SegmentName]) -> Vec<(u64, Option<u64>)> {
        list.iter().map(|s| (s.first, s.upto)).collect()
    }

    #[test]
    fn names_round_trip_and_other_files_are_not_segments() {
        assert_eq!(name(7, None).first, 7);
        assert_eq!(name(7, Some(9)).upto, Some(9));
        for other in [
            "cursor",
            "x.seg",
            "1-x.seg",
            "9-3.seg",
            "1.seg.tmp",
            ".compact.tmp",
        ] {
            assert_eq!(
                SegmentName::parse(other, PathBuf::from(other)),
                None,
                "{other}"
            );
        }
    }

    /// Each row: the files a crash left, and which are live.
    #[test]
    fn the_newest_compaction_supersedes_what_starts_before_its_upto() {
        type Row = (&'static [(u64, Option<u64>)], &'static [(u64, Option<u64>)]);
        let rows: &[Row] = &[
            // No compaction: everything is live.
            (&[(0, None), (10, None)], &[(0, None), (10, None)]),
            // Renamed, old not yet removed: only the compacted one and what came after.
            (
                &[(0, None), (10, None), (16, Some(20)), (20, None)],
                &[(16, Some(20)), (20, None)],
            ),
            // A second compaction of the same records, the first not yet removed.
            (&[(16, Some(20)), (18, Some(20))], &[(18, Some(20))]),
            // A later compaction over an earlier one and the segments after it.
            (
                &[(16, Some(20)), (20, None), (25, Some(30)), (30, None)],
                &[(25, Some(30)), (30, None)],
            ),
            // Everything delivered: an empty compacted segment still supersedes.
            (&[(0, None), (20, Some(20))], &[(20, Some(20))]),
        ];
        for (files, want) in rows {
            let names = files.iter().map(|(f, u)| name(*f, *u)).collect();
            let listing = sort_out(names, None);
            assert_eq!(firsts(&listing.live), *want, "{files:?}");
            assert_eq!(
                listing.live.len() + listing.superseded.len(),
                files.len(),
                "{files:?}"
            );
        }
    }

    #[test]
    fn read_stops_at_a_partial_or_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.seg");
        let mut buf = Vec::new();
        for p in [&b"one"[..], b"two", b"three"] {
            frame(&mut buf, p).unwrap();
        }
        let whole = buf.len() as u64;
        buf.extend_from_slice(&[5, 0, 0, 0, 1]);
        fs::write(&path, &buf).unwrap();
        let mut seen = Vec::new();
        let scan = read(&path, |i, p| {
            seen.push((i, p.to_vec()));
            true
        })
        .unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!((scan.records, scan.good_len), (3, whole));
        assert!(scan.bad.unwrap().contains("partial header"));

        buf[HEADER + 1] ^= 0xff;
        fs::write(&path, &buf).unwrap();
        let scan = read(&path, |_, _| true).unwrap();
        assert_eq!(scan.records, 0);
        assert!(scan.bad.unwrap().contains("CRC mismatch"));

        fs::write(&path, [0u8; 64]).unwrap();
        let scan = read(&path, |_, _| true).unwrap();
        assert_eq!(scan.records, 0, "zeros are not records");
        assert!(scan.bad.unwrap().contains("empty record"));
    }
}
