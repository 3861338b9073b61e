//! eventd's journal: append-only segment files of length- and CRC-framed records, under
//! `persist/powernode/eventd/journal/` (docs/events.md).
//!
//! ```text
//! <first index, 20 digits>.seg : record*      record = len u32 LE | crc32 u32 LE | payload
//! cursor                       : the index of the first record not yet delivered (text)
//! ```
//!
//! Every record has an index, counted from 0 over the journal's whole life; a segment's name is
//! the index of its first record. [`Journal::append`] writes a batch and syncs once (group
//! commit), so throughput does not die on fsync. At open, a torn tail of the last segment (a
//! power cut mid-append) is cut at the last whole record; a bad record anywhere else makes its
//! segment unreadable from there, so the segment is moved to `.quarantine/`. Both are returned
//! as [`Repair`]s, never a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A segment is closed and a new one begun past this size.
pub const SEGMENT_MAX: u64 = 1 << 20;
/// The largest record payload accepted (an event is far smaller).
pub const RECORD_MAX: usize = 256 << 10;
/// The name of the delivery cursor file.
pub const CURSOR_FILE: &str = "cursor";

/// What opening the journal had to mend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// The last segment ended in a partial record, cut off at `at` bytes (`lost` bytes gone).
    TornTail {
        /// The segment.
        segment: PathBuf,
        /// Its length after the cut.
        at: u64,
        /// Bytes cut.
        lost: u64,
    },
    /// A segment with a bad record before its end, moved aside with the records it held.
    Quarantined {
        /// Where it lies now.
        moved_to: PathBuf,
        /// Why.
        reason: String,
    },
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Repair::TornTail { segment, at, lost } => write!(
                f,
                "{}: torn tail of {lost} bytes cut at {at}",
                segment.display()
            ),
            Repair::Quarantined { moved_to, reason } => {
                write!(f, "segment moved to {}: {reason}", moved_to.display())
            }
        }
    }
}

/// One segment file: where its records start and how many it holds.
#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    count: u64,
    path: PathBuf,
}

/// The journal, open for appending.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// The last segment, open for appending, and its length.
    tail: Option<(File, u64)>,
    /// The first record not yet delivered.
    cursor: u64,
}

impl Journal {
    /// Opens (creating) the journal in `dir`, repairing what a crash or a bad disk left.
    pub fn open(dir: &Path) -> io::Result<(Journal, Vec<Repair>)> {
        fs::create_dir_all(dir)?;
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_owned();
                let first = name.strip_suffix(".seg")?.parse::<u64>().ok()?;
                Some((first, e.path()))
            })
            .collect();
        names.sort();
        let mut repairs = Vec::new();
        let mut segments = Vec::new();
        let last = names.len().saturating_sub(1);
        for (i, (first, path)) in names.into_iter().enumerate() {
            let bytes = fs::read(&path)?;
            let scan = scan(&bytes);
            match scan.bad {
                None => {}
                Some(reason) if i == last => {
                    // A power cut mid-append: only the tail can be partial.
                    let file = OpenOptions::new().write(true).open(&path)?;
                    file.set_len(scan.good_len)?;
                    file.sync_all()?;
                    repairs.push(Repair::TornTail {
                        segment: path.clone(),
                        at: scan.good_len,
                        lost: bytes.len() as u64 - scan.good_len,
                    });
                    tracing::warn!(segment = %path.display(), %reason, "journal tail repaired");
                }
                Some(reason) => {
                    let moved_to = quarantine(dir, &path)?;
                    tracing::error!(segment = %path.display(), %reason, "journal segment quarantined");
                    repairs.push(Repair::Quarantined { moved_to, reason });
                    continue;
                }
            }
            segments.push(Segment {
                first,
                count: scan.records,
                path,
            });
        }
        let end = segments.last().map_or(0, |s| s.first + s.count);
        let cursor = fs::read_to_string(dir.join(CURSOR_FILE))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or_else(|| segments.first().map_or(0, |s| s.first))
            .min(end);
        let mut journal = Journal {
            dir: dir.to_owned(),
            segments,
            tail: None,
            cursor,
        };
        journal.drop_delivered_segments()?;
        Ok((journal, repairs))
    }

    /// The index the next appended record gets.
    pub fn end(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.first + s.count)
    }

    /// Records on disk, delivered or not.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.count).sum()
    }

    /// Whether no record is on disk.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first record not yet delivered.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Records not yet delivered.
    pub fn pending(&self) -> u64 {
        self.end().saturating_sub(self.cursor)
    }

    /// Bytes on disk in segment files.
    pub fn bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter_map(|s| fs::metadata(&s.path).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Appends `payloads` as records and syncs once: durable when this returns `Ok`.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> io::Result<()> {
        if payloads.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for p in payloads {
            if p.len() > RECORD_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a {}-byte record is over {RECORD_MAX}", p.len()),
                ));
            }
            buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(p).to_le_bytes());
            buf.extend_from_slice(p);
        }
        let (file, len) = self.tail_for(buf.len() as u64)?;
        let written = file.write_all(&buf).and_then(|()| {
            failpoint::hit("eventd.journal_written");
            file.sync_data()
        });
        if let Err(e) = written {
            // Cut what may have gone half in, so the next append starts on a record boundary.
            let _ = file.set_len(*len);
            return Err(e);
        }
        *len += buf.len() as u64;
        if let Some(last) = self.segments.last_mut() {
            last.count += payloads.len() as u64;
        }
        Ok(())
    }

    /// The open last segment, after starting a new one when this batch would overfill it.
    fn tail_for(&mut self, adding: u64) -> io::Result<&mut (File, u64)> {
        let full = self
            .tail
            .as_ref()
            .is_some_and(|(_, len)| *len > 0 && len + adding > SEGMENT_MAX);
        if full || self.segments.is_empty() {
            self.start_segment()?;
        } else if self.tail.is_none() {
            let path = self
                .segments
                .last()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            let file = OpenOptions::new().append(true).open(&path)?;
            let len = file.metadata()?.len();
            self.tail = Some((file, len));
        }
        match self.tail.as_mut() {
            Some(t) => Ok(t),
            None => Err(io::Error::other("no journal segment open")),
        }
    }

    fn start_segment(&mut self) -> io::Result<()> {
        let first = self.end();
        let path = self.dir.join(format!("{first:020}.seg"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        File::open(&self.dir)?.sync_all()?;
        self.segments.push(Segment {
            first,
            count: 0,
            path,
        });
        self.tail = Some((file, 0));
        Ok(())
    }

    /// Up to `max` undelivered records, from the cursor on: their indexes and payloads.
    pub fn undelivered(&self, max: usize) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for seg in &self.segments {
            if seg.first + seg.count <= self.cursor {
                continue;
            }
            let mut bytes = Vec::new();
            File::open(&seg.path)?.read_to_end(&mut bytes)?;
            for (i, payload) in records(&bytes).enumerate() {
                let index = seg.first + i as u64;
                if index >= self.cursor && index < seg.first + seg.count {
                    out.push((index, payload.to_vec()));
                    if out.len() == max {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every record still on disk, delivered or not: for `powernode-agent events`.
    pub fn all(&self) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        for seg in &self.segments {
            let bytes = fs::read(&seg.path)?;
            out.extend(
                records(&bytes)
                    .take(seg.count as usize)
                    .enumerate()
                    .map(|(i, p)| (seg.first + i as u64, p.to_vec())),
            );
        }
        Ok(out)
    }

    /// Records everything before `index` as delivered (durably), and deletes segments that
    /// hold nothing else.
    pub fn delivered_through(&mut self, index: u64) -> io::Result<()> {
        if index <= self.cursor {
            return Ok(());
        }
        self.cursor = index.min(self.end());
        agentbase::fsutil::write_atomic(
            &self.dir.join(CURSOR_FILE),
            self.cursor.to_string().as_bytes(),
            0o600,
        )?;
        self.drop_delivered_segments()
    }

    /// Deletes every segment wholly before the cursor, except the open last one.
    fn drop_delivered_segments(&mut self) -> io::Result<()> {
        while self.segments.len() > 1 {
            let seg = &self.segments[0];
            if seg.first + seg.count > self.cursor {
                break;
            }
            fs::remove_file(&seg.path)?;
            self.segments.remove(0);
        }
        Ok(())
    }
}

/// What reading a segment found.
struct Scan {
    records: u64,
    good_len: u64,
    bad: Option<String>,
}

fn scan(bytes: &[u8]) -> Scan {
    let mut pos = 0usize;
    let mut records = 0;
    while pos < bytes.len() {
        match record_at(bytes, pos) {
            Ok(next) => {
                pos = next;
                records += 1;
            }
            Err(reason) => {
                return Scan {
                    records,
                    good_len: pos as u64,
                    bad: Some(format!("record {records} at byte {pos}: {reason}")),
                }
            }
        }
    }
    Scan {
        records,
        good_len: pos as u64,
        bad: None,
    }
}

/// Checks the record at `pos`; the position after it.
fn record_at(bytes: &[u8], pos: usize) -> Result<usize, &'static str> {
    let header = bytes.get(pos..pos + 8).ok_or("partial header")?;
    let len = u32::from_le_bytes(header[..4].try_into().unwrap_or_default()) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().unwrap_or_default());
    if len > RECORD_MAX {
        return Err("length over the record limit");
    }
    let payload = bytes.get(pos + 8..pos + 8 + len).ok_or("partial payload")?;
    if crc32fast::hash(payload) != crc {
        return Err("CRC mismatch");
    }
    Ok(pos + 8 + len)
}

/// The payloads of a segment's whole records, in order.
fn records(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let next = record_at(bytes, pos).ok()?;
        let payload = &bytes[pos + 8..next];
        pos = next;
        Some(payload)
    })
}

fn quarantine(dir: &Path, path: &Path) -> io::Result<PathBuf> {
    let qdir = dir.join(".quarantine");
    fs::create_dir_all(&qdir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let moved_to = qdir.join(format!("{name}.{}", agentbase::health::now_ms()));
    fs::rename(path, &moved_to)?;
    File::open(dir)?.sync_all()?;
    Ok(moved_to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
        range.map(|i| format!("event {i}").into_bytes()).collect()
    }

    #[test]
    fn appends_reads_and_delivers_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, repairs) = Journal::open(dir.path()).unwrap();
        assert!(repairs.is_empty());
        let big: Vec<Vec<u8>> = (0..5).map(|i| vec![i as u8; 250 << 10]).collect();
        for p in &big {
            j.append(std::slice::from_ref(p)).unwrap();
        }
        j.append(&payloads(0..3)).unwrap();
        assert_eq!(j.end(), 8);
        assert!(j.segments.len() >= 2, "{:?}", j.segments);
        let first = j.undelivered(3).unwrap();
        assert_eq!(first.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2]);
        j.delivered_through(5).unwrap();
        let rest = j.undelivered(100).unwrap();
        assert_eq!(rest.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(rest[0].1, b"event 0");
        drop(j);
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!((j.cursor(), j.end(), j.pending()), (5, 8, 3));
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_corrupt_segment_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&payloads(0..4)).unwrap();
        let seg = j.segments[0].path.clone();
        drop(j);
        // A power cut mid-append: half a record at the end.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (mut j, repairs) = Journal::open(dir.path()).unwrap();
        assert!(
            matches!(repairs[..], [Repair::TornTail { lost: 6, .. }]),
            "{repairs:?}"
        );
        assert_eq!(j.end(), 4);
        j.append(&payloads(4..5)).unwrap();
        assert_eq!(j.undelivered(10).unwrap().len(), 5);

        // A flipped byte in the middle of a segment that is not the last.
        j.start_segment().unwrap();
        j.append(&payloads(5..6)).unwrap();
        drop(j);
        let mut bytes = fs::read(&seg).unwrap();
        bytes[10] ^= 0xff;
        fs::write(&seg, bytes).unwrap();
        let (j, repairs) = Journal::open(dir.path()).unwrap();
        assert!(
            matches!(repairs[..], [Repair::Quarantined { .. }]),
            "{repairs:?}"
        );
        assert_eq!(
            fs::read_dir(dir.path().join(".quarantine"))
                .unwrap()
                .count(),
            1
        );
        let left = j.undelivered(10).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1, b"event 5");
    }
}
