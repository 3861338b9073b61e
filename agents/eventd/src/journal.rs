//! eventd's journal: append-only segment files of length- and CRC-framed records, under
//! `persist/powernode/eventd/journal/` (docs/events.md; the format is in [`crate::segment`]).
//!
//! ```text
//! <first index, 20 digits>.seg          : record*   record = len u32 LE | crc32 u32 LE | payload
//! <first>-<upto>.seg                    : record*   a compaction's output
//! cursor                                : the index of the first record not yet delivered (text)
//! ```
//!
//! Every record has an index, counted from 0 over the journal's whole life; a segment's name is
//! the index of its first record. [`Journal::append`] writes a batch and syncs once (group
//! commit), so throughput does not die on fsync. At open, a torn tail of the last segment (a
//! power cut mid-append) is cut at the last whole record; a bad record anywhere else makes its
//! segment unreadable from there, so the segment is moved to `.quarantine/`. Both are returned
//! as [`Repair`]s, never a crash.
//!
//! [`Journal::rewrite`] is the compaction's mechanism (its policy is [`crate::compact`]): the
//! undelivered records a caller keeps are written to one new file, synced, renamed into place
//! as `<first>-<upto>.seg` — the switch — and only then are the old segments removed. The
//! survivors are numbered so they end where the journal ended (`upto`), which keeps the cursor
//! and every later index valid. A crash before the rename leaves the old journal (and a temp
//! file that open discards); after it, the new one (open removes the superseded files). Crash
//! points: `eventd.journal_written` (a batch written, not synced), `eventd.compact_written`
//! (the new segment synced, not renamed), `eventd.compact_renamed` (renamed, nothing removed),
//! `eventd.compact_removing` (before each old segment's removal), `eventd.cursor_written` (the
//! cursor moved, delivered segments not yet deleted).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::segment::{self, SegmentName, COMPACT_TEMP};

pub use crate::segment::RECORD_MAX;

/// A segment is closed and a new one begun past this size (unless set lower).
pub const SEGMENT_MAX: u64 = 1 << 20;
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

/// One segment file: where its records start, how many it holds, how big it is.
#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    count: u64,
    bytes: u64,
    path: PathBuf,
    /// A compaction's output: never appended to.
    compacted: bool,
}

/// What a rewrite does with one undelivered record.
#[derive(Debug, PartialEq, Eq)]
pub enum Keep {
    /// Leave it out.
    Drop,
    /// Keep it as it is.
    Same,
    /// Keep it with this payload instead.
    Changed(Vec<u8>),
}

/// What a rewrite did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// Records kept.
    pub kept: u64,
    /// Bytes on disk before.
    pub bytes_before: u64,
    /// Bytes on disk after.
    pub bytes_after: u64,
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
    segment_max: u64,
    /// Rewrites since open: a reader that saw another number saw other indexes.
    generation: u64,
}

impl Journal {
    /// Opens (creating) the journal in `dir`, repairing what a crash or a bad disk left.
    /// Finishing or discarding a compaction a crash interrupted is not a repair: the journal
    /// is whole either way.
    pub fn open(dir: &Path) -> io::Result<(Journal, Vec<Repair>)> {
        fs::create_dir_all(dir)?;
        let listing = segment::list(dir)?;
        if let Some(temp) = &listing.temp {
            fs::remove_file(temp)?;
            tracing::info!(path = %temp.display(), "unfinished compaction discarded");
        }
        for old in &listing.superseded {
            match fs::remove_file(&old.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            tracing::info!(segment = %old.path.display(), "compacted segment removed");
        }
        if listing.temp.is_some() || !listing.superseded.is_empty() {
            sync_dir(dir)?;
        }
        let mut repairs = Vec::new();
        let mut segments = Vec::new();
        let last = listing.live.len().saturating_sub(1);
        for (i, name) in listing.live.into_iter().enumerate() {
            let path = name.path;
            let scan = segment::read(&path, |_, _| true)?;
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
                        lost: scan.file_len - scan.good_len,
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
                first: name.first,
                count: scan.records,
                bytes: scan.good_len,
                path,
                compacted: name.upto.is_some(),
            });
        }
        let end = segments.last().map_or(0, |s| s.first + s.count);
        let cursor = read_cursor(dir)
            .unwrap_or_else(|| segments.first().map_or(0, |s| s.first))
            .min(end);
        let mut journal = Journal {
            dir: dir.to_owned(),
            segments,
            tail: None,
            cursor,
            segment_max: SEGMENT_MAX,
            generation: 0,
        };
        journal.drop_delivered_segments()?;
        Ok((journal, repairs))
    }

    /// Closes segments past `bytes` instead of [`SEGMENT_MAX`] (a small journal bound wants
    /// small segments, so delivered ones can be deleted).
    pub fn set_segment_max(&mut self, bytes: u64) {
        self.segment_max = bytes.clamp(4096, SEGMENT_MAX);
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
        self.segments
            .iter()
            .map(|s| (s.first + s.count).saturating_sub(s.first.max(self.cursor)))
            .sum()
    }

    /// Bytes on disk in segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// How many rewrites there have been since open: indexes read under another number may
    /// name other records now.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Appends `payloads` as records, synced: durable when this returns `Ok`. A batch is one
    /// write and one sync per segment it touches; it starts a new segment where the next
    /// record would overfill the open one, so a large group commit still leaves segments of
    /// about `segment_max` (each deletable on its own once delivered). On an error, whole
    /// segments' worth of the batch may already be durable (appending them again duplicates
    /// records, which delivery sends once).
    pub fn append<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> io::Result<()> {
        // Every record checked before anything is written: a bad one refuses the whole batch.
        for p in payloads {
            segment::check(p.as_ref())?;
        }
        let framed = |p: &P| (segment::HEADER + p.as_ref().len()) as u64;
        let segment_max = self.segment_max;
        let mut rest = payloads;
        while let Some(first) = rest.first() {
            let (file, len) = self.tail_for(framed(first))?;
            let room = segment_max.saturating_sub(*len);
            // What fits in this segment (at least one record), framed into one write.
            let mut size = 0;
            let mut taken = 0;
            for p in rest {
                if taken > 0 && size + framed(p) > room {
                    break;
                }
                size += framed(p);
                taken += 1;
            }
            let mut buf = Vec::with_capacity(size as usize);
            for p in &rest[..taken] {
                segment::frame(&mut buf, p.as_ref())?;
            }
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
                last.count += taken as u64;
                last.bytes += buf.len() as u64;
            }
            rest = &rest[taken..];
        }
        Ok(())
    }

    /// The open last segment, after starting a new one when the next record would overfill
    /// it (or the last one is a compaction's output).
    fn tail_for(&mut self, adding: u64) -> io::Result<&mut (File, u64)> {
        let sealed = self.segments.last().is_none_or(|s| s.compacted);
        if !sealed && self.tail.is_none() {
            let path = self
                .segments
                .last()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            let file = OpenOptions::new().append(true).open(&path)?;
            let len = file.metadata()?.len();
            self.tail = Some((file, len));
        }
        let full = self
            .tail
            .as_ref()
            .is_some_and(|(_, len)| *len > 0 && len + adding > self.segment_max);
        if full || sealed {
            self.start_segment()?;
        }
        match self.tail.as_mut() {
            Some(t) => Ok(t),
            None => Err(io::Error::other("no journal segment open")),
        }
    }

    fn start_segment(&mut self) -> io::Result<()> {
        let first = self.end();
        let path = self.dir.join(SegmentName::appended(first));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            first,
            count: 0,
            bytes: 0,
            path,
            compacted: false,
        });
        self.tail = Some((file, 0));
        Ok(())
    }

    /// Hands every record from index `from` on to `visit`, oldest first, until it returns
    /// `false`.
    pub fn visit(&self, from: u64, mut visit: impl FnMut(u64, &[u8]) -> bool) -> io::Result<()> {
        for seg in &self.segments {
            if seg.first + seg.count <= from {
                continue;
            }
            let mut more = true;
            segment::read(&seg.path, |i, payload| {
                if i >= seg.count {
                    return false; // past what this process counted: not ours to read
                }
                let index = seg.first + i;
                if index >= from {
                    more = visit(index, payload);
                }
                more
            })?;
            if !more {
                break;
            }
        }
        Ok(())
    }

    /// Up to `max` undelivered records, from the cursor on: their indexes and payloads.
    pub fn undelivered(&self, max: usize) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        self.visit(self.cursor, |index, payload| {
            out.push((index, payload.to_vec()));
            out.len() < max
        })?;
        Ok(out)
    }

    /// Every record still on disk, delivered or not: for `powernode-agent events`.
    pub fn all(&self) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        self.visit(0, |index, payload| {
            out.push((index, payload.to_vec()));
            true
        })?;
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
        failpoint::hit("eventd.cursor_written");
        self.drop_delivered_segments()
    }

    /// Deletes every segment wholly before the cursor, except the open last one.
    fn drop_delivered_segments(&mut self) -> io::Result<()> {
        while self.segments.len() > 1 {
            let seg = &self.segments[0];
            if seg.first + seg.count > self.cursor {
                break;
            }
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.segments.remove(0);
        }
        Ok(())
    }

    /// Replaces the whole journal by the undelivered records `decide` keeps, in order, in one
    /// new segment — crash-safely (module doc). Delivered records are left out. On an error
    /// before the switch the journal is as it was.
    pub fn rewrite(&mut self, mut decide: impl FnMut(u64, &[u8]) -> Keep) -> io::Result<Rewritten> {
        // The tail's file is about to be replaced; the next append starts a new segment.
        self.tail = None;
        let bytes_before = self.bytes();
        let upto = self.end();
        let temp = self.dir.join(COMPACT_TEMP);
        let (kept, bytes_after) = match self.write_survivors(&temp, &mut decide) {
            Ok(written) => written,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        };
        failpoint::hit("eventd.compact_written");
        let first = upto - kept;
        let path = self.dir.join(SegmentName::compacted(first, upto));
        if let Err(e) = fs::rename(&temp, &path) {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        // From here the new state is in effect, whatever fails next.
        if let Err(e) = sync_dir(&self.dir) {
            tracing::warn!(error = %e, "journal directory not synced after a compaction");
        }
        failpoint::hit("eventd.compact_renamed");
        let old = std::mem::replace(
            &mut self.segments,
            vec![Segment {
                first,
                count: kept,
                bytes: bytes_after,
                path: path.clone(),
                compacted: true,
            }],
        );
        self.generation += 1;
        for seg in old.iter().filter(|s| s.path != path) {
            failpoint::hit("eventd.compact_removing");
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Superseded all the same: ignored by readers, removed at the next open.
                Err(e) => {
                    tracing::warn!(segment = %seg.path.display(), error = %e, "compacted segment not removed")
                }
            }
        }
        if let Err(e) = sync_dir(&self.dir) {
            tracing::warn!(error = %e, "journal directory not synced after a compaction");
        }
        Ok(Rewritten {
            kept,
            bytes_before,
            bytes_after,
        })
    }

    /// Writes the kept undelivered records to `temp` and syncs it: how many, how many bytes.
    fn write_survivors(
        &self,
        temp: &Path,
        decide: &mut impl FnMut(u64, &[u8]) -> Keep,
    ) -> io::Result<(u64, u64)> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(temp)?;
        let mut out = BufWriter::with_capacity(64 << 10, file);
        let mut kept = 0u64;
        let mut bytes = 0u64;
        let mut failed = None;
        let mut frame = Vec::new();
        self.visit(self.cursor, |index, payload| {
            frame.clear();
            let framed = match decide(index, payload) {
                Keep::Drop => return true,
                Keep::Same => segment::frame(&mut frame, payload),
                Keep::Changed(new) => segment::frame(&mut frame, &new),
            };
            match framed.and_then(|()| out.write_all(&frame)) {
                Ok(()) => {
                    kept += 1;
                    bytes += frame.len() as u64;
                    true
                }
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((kept, bytes))
    }
}

/// The cursor on disk, if there is a readable one.
pub(crate) fn read_cursor(dir: &Path) -> Option<u64> {
    fs::read_to_string(dir.join(CURSOR_FILE))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn quarantine(dir: &Path, path: &Path) -> io::Result<PathBuf> {
    let qdir = dir.join(".quarantine");
    fs::create_dir_all(&qdir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let moved_to = qdir.join(format!("{name}.{}", agentbase::health::now_ms()));
    fs::rename(path, &moved_to)?;
    sync_dir(dir)?;
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

    /// One group commit larger than a segment spreads over segments of at most the segment
    /// size, and a reopened journal whose last segment is full starts a new one.
    #[test]
    fn a_large_batch_and_a_reopened_full_segment_keep_segments_small() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_max(4096);
        let batch: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 1000]).collect();
        j.append(&batch).unwrap();
        assert!(j.segments.len() >= 10, "{:?}", j.segments);
        for seg in &j.segments {
            assert!(seg.bytes <= 4096, "{seg:?}");
            assert_eq!(fs::metadata(&seg.path).unwrap().len(), seg.bytes);
        }
        assert_eq!(j.end(), 40);
        let read = j.undelivered(100).unwrap();
        assert_eq!(read.len(), 40);
        for (i, (index, payload)) in read.iter().enumerate() {
            assert_eq!((*index, payload[0]), (i as u64, i as u8));
        }
        let segments = j.segments.len();
        drop(j);

        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_max(4096);
        assert!(j.segments.last().unwrap().bytes + 1008 > 4096, "not full");
        j.append(&[vec![9u8; 1000]]).unwrap();
        assert!(j.segments.len() > segments, "{:?}", j.segments);
        for seg in &j.segments {
            assert!(seg.bytes <= 4096, "{seg:?}");
        }
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

    /// The survivors keep their order, end where the journal ended, and the journal goes on
    /// from there; a crash on either side of the switch leaves one whole state.
    #[test]
    fn a_rewrite_switches_crash_safely() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.set_segment_max(4096);
        for i in 0..12u8 {
            j.append(&[vec![i; 1000]]).unwrap();
        }
        j.delivered_through(2).unwrap();
        let old: Vec<(PathBuf, Vec<u8>)> = j
            .segments
            .iter()
            .map(|s| (s.path.clone(), fs::read(&s.path).unwrap()))
            .collect();
        assert!(old.len() >= 3, "{:?}", j.segments);
        let done = j
            .rewrite(|i, p| match i % 3 {
                0 => Keep::Drop,
                1 => Keep::Same,
                _ => Keep::Changed(vec![p[0]; 10]),
            })
            .unwrap();
        // Undelivered 2..12; 3, 6, 9 dropped: 7 kept, numbered 5..12.
        assert_eq!(done.kept, 7);
        assert_eq!(j.segments.len(), 1);
        let after = j.undelivered(100).unwrap();
        assert_eq!(after.first().map(|r| r.0), Some(5));
        assert_eq!(after.last().map(|r| r.0), Some(11));
        assert_eq!(after[0].1, vec![2u8; 10]);
        assert_eq!(after[1].1, vec![4u8; 1000]);
        assert_eq!(j.pending(), 7);
        assert_eq!(j.bytes(), done.bytes_after);
        j.append(&payloads(0..1)).unwrap();
        assert_eq!(
            j.end(),
            13,
            "the next record follows where the journal ended"
        );
        let new_state = j.all().unwrap();
        drop(j);

        // Killed after the rename, before the old segments went: the new state.
        for (path, bytes) in &old {
            fs::write(path, bytes).unwrap();
        }
        let (j, repairs) = Journal::open(dir.path()).unwrap();
        assert!(repairs.is_empty(), "{repairs:?}");
        assert_eq!(j.all().unwrap(), new_state);
        for (path, _) in &old {
            assert!(!path.exists(), "{} left", path.display());
        }
        drop(j);

        // Killed before the rename: the old state, the unfinished file discarded.
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&payloads(0..5)).unwrap();
        let before = j.all().unwrap();
        drop(j);
        fs::write(dir.path().join(COMPACT_TEMP), b"half a compaction").unwrap();
        let (j, repairs) = Journal::open(dir.path()).unwrap();
        assert!(repairs.is_empty(), "{repairs:?}");
        assert_eq!(j.all().unwrap(), before);
        assert!(!dir.path().join(COMPACT_TEMP).exists());
    }
}
