//! The applied stack of each target, persisted so that a restart (after `kill -9`, after a
//! reboot) can tell which mounts are the active stack and what to rebuild.
//!
//! `<root>/persist/powernode/mountmgr/<target>.json`, with its SHA-256 in
//! `<target>.json.sha256`. A save writes both as temporaries (each fdatasync'ed), renames the
//! checksum into place, syncs the directory, renames the record, syncs again. A crash between
//! the two renames leaves a checksum that matches `<target>.json.tmp`, not the record: the load
//! finishes the save (rolls forward). A record matching neither is corrupt: it is moved aside
//! and treated as absent.
//!
//! The confirmation window ([`Record::window`]) was added without a new [`RECORD_VERSION`]:
//! a record without it reads as "no window", and a mountmgr from before it ignores the field,
//! which is exactly what that mountmgr did with a window (end it at its restart). Bumping the
//! version would instead make either side take the other's record for corrupt and clean the
//! target, unmounting the running stack.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use powernode_types::{MountConfig, Slot};
use serde::{Deserialize, Serialize};

use crate::sys::fsync_dir;

/// Version of the record format; a record of another version is not trusted.
pub const RECORD_VERSION: u32 = 1;

/// The persisted state of one target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The target's name (the file name says it too; they must agree).
    pub target: String,
    /// The stack last switched to and not since torn down: what should be mounted.
    pub applied: Option<AppliedStack>,
    /// Written before a switch, cleared after it: the stack `current` is about to point to.
    /// With it set, `current` naming its slot means the rename happened.
    pub switching_to: Option<AppliedStack>,
    /// Loop devices this agent bound for the target and has not released yet.
    pub loops: Vec<LoopRecord>,
    /// The confirmation window of the last switch while it is open, so that a restarted agent
    /// resumes it instead of keeping the new stack unconfirmed. Written with the intent of the
    /// switch that opens it (a crash once `current` has moved finds it), cleared in the same
    /// save as the result of the switch back that a failed check makes, and when the window
    /// ends otherwise. It only counts while the stack recovery adopts is not the window's
    /// previous one (a switch cut short before `current` moved leaves it behind).
    #[serde(default)]
    pub window: Option<WindowRecord>,
}

/// An open confirmation window: the stack switched away from, kept mounted in its slot until
/// the health checks of the stack switched to have passed until `until_ms`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WindowRecord {
    /// The stack switched away from, in the slot it is still mounted in.
    pub previous: AppliedStack,
    /// When the window ends, in milliseconds since the Unix epoch: wall-clock time, so that
    /// it means the same instant to the next process.
    pub until_ms: u64,
}

/// A stack and the slot it is (to be) mounted in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AppliedStack {
    /// The slot.
    pub slot: Slot,
    /// The configuration it was built from (layers, upper, generation).
    pub config: MountConfig,
}

/// A loop device bound to an image for a slot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LoopRecord {
    /// The slot whose layer uses it.
    pub slot: Slot,
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The image it is bound to.
    pub image: PathBuf,
}

impl Record {
    /// An empty record for `target`.
    pub fn new(target: &str) -> Record {
        Record {
            version: RECORD_VERSION,
            target: target.to_owned(),
            applied: None,
            switching_to: None,
            loops: Vec::new(),
            window: None,
        }
    }
}

/// Why a record could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Reading or writing failed.
    #[error("{}: {error}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The record is not to be trusted; it was moved to `moved_to`.
    #[error("record {} is corrupt ({reason}); moved to {}", .path.display(), .moved_to.display())]
    Corrupt {
        /// The record.
        path: PathBuf,
        /// What is wrong.
        reason: String,
        /// Where it was moved.
        moved_to: PathBuf,
    },
}

/// The directory of records.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    /// Records in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> RecordStore {
        RecordStore { dir: dir.into() }
    }

    /// `<dir>/<target>.json`.
    pub fn path(&self, target: &str) -> PathBuf {
        self.dir.join(format!("{target}.json"))
    }

    fn sum_path(&self, target: &str) -> PathBuf {
        self.dir.join(format!("{target}.json.sha256"))
    }

    fn tmp(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".tmp");
        PathBuf::from(name)
    }

    /// The targets that have a record (or a checksum: a half-written first save).
    pub fn targets(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut targets: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| {
                name.strip_suffix(".json")
                    .or_else(|| name.strip_suffix(".json.sha256"))
                    .map(str::to_owned)
            })
            .collect();
        targets.sort();
        targets.dedup();
        targets
    }

    /// Loads the record of `target`. `Ok(None)` if there is none; [`RecordError::Corrupt`]
    /// (after moving it aside) if it cannot be trusted.
    pub fn load(&self, target: &str) -> Result<Option<Record>, RecordError> {
        let path = self.path(target);
        let sum_path = self.sum_path(target);
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |error| RecordError::Io { path, error }
        };
        let bytes = read_optional(&path).map_err(io_error(&path))?;
        let want = read_optional(&sum_path)
            .map_err(io_error(&sum_path))?
            .map(|s| String::from_utf8_lossy(&s).trim().to_owned());
        let bytes = match (bytes, want) {
            (None, None) => return Ok(None),
            (Some(_), None) => return Err(self.quarantine(target, "no checksum file")),
            (Some(bytes), Some(want)) if sha256_hex(&bytes) == want => bytes,
            (bytes, Some(want)) => {
                // A save interrupted between its two renames: the checksum already describes
                // the temporary. Finish the save.
                let tmp = Self::tmp(&path);
                match read_optional(&tmp).map_err(io_error(&tmp))? {
                    Some(newer) if sha256_hex(&newer) == want => {
                        std::fs::rename(&tmp, &path).map_err(io_error(&path))?;
                        fsync_dir(&self.dir).map_err(io_error(&self.dir))?;
                        tracing::info!(target, "finished a record save interrupted by a crash");
                        newer
                    }
                    _ => {
                        let reason = match bytes {
                            None => "checksum without a record",
                            Some(_) => "checksum mismatch",
                        };
                        return Err(self.quarantine(target, reason));
                    }
                }
            }
        };
        match parse(&bytes, target) {
            Ok(record) => Ok(Some(record)),
            Err(reason) => Err(self.quarantine(target, &reason)),
        }
    }

    /// Moves the record and its checksum aside as `<name>.corrupt-<ms>`.
    fn quarantine(&self, target: &str, reason: &str) -> RecordError {
        let path = self.path(target);
        let stamp = agentbase::health::now_ms();
        let moved_to = self.dir.join(format!("{target}.json.corrupt-{stamp}"));
        if let Err(e) = std::fs::rename(&path, &moved_to) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not move a corrupt record aside");
            }
        }
        let sum_moved = self
            .dir
            .join(format!("{target}.json.sha256.corrupt-{stamp}"));
        let _ = std::fs::rename(self.sum_path(target), sum_moved);
        let _ = std::fs::remove_file(Self::tmp(&path));
        let _ = fsync_dir(&self.dir);
        RecordError::Corrupt {
            path,
            reason: reason.to_owned(),
            moved_to,
        }
    }

    /// Saves `record` for `target`, logging a failure: for the saves whose loss recovery
    /// tolerates (it finds the mounts and reconciles), so the agent goes on.
    pub fn save_or_warn(&self, record: &Record, target: &str) {
        if let Err(e) = self.save(record) {
            tracing::warn!(target, error = %e, "could not save the record");
        }
    }

    /// Saves `record` durably (see the module documentation for the order).
    pub fn save(&self, record: &Record) -> Result<(), RecordError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |error| RecordError::Io { path, error }
        };
        std::fs::create_dir_all(&self.dir).map_err(io_error(&self.dir))?;
        let path = self.path(&record.target);
        let sum_path = self.sum_path(&record.target);
        let bytes =
            serde_json::to_vec_pretty(record).map_err(|e| io_error(&path)(io::Error::other(e)))?;
        let tmp = Self::tmp(&path);
        let sum_tmp = Self::tmp(&sum_path);
        write_synced(&tmp, &bytes).map_err(io_error(&tmp))?;
        write_synced(&sum_tmp, format!("{}\n", sha256_hex(&bytes)).as_bytes())
            .map_err(io_error(&sum_tmp))?;
        std::fs::rename(&sum_tmp, &sum_path).map_err(io_error(&sum_path))?;
        // The checksum's rename must be on disk before the record's: the load rolls forward
        // from "checksum new, record old", not from "record new, checksum old".
        fsync_dir(&self.dir).map_err(io_error(&self.dir))?;
        std::fs::rename(&tmp, &path).map_err(io_error(&path))?;
        fsync_dir(&self.dir).map_err(io_error(&self.dir))
    }

    /// Removes the record of `target` (checksum last, so a crash leaves a loadable state:
    /// a checksum without a record is quarantined, which means "no record" too).
    pub fn remove(&self, target: &str) -> Result<(), RecordError> {
        let path = self.path(target);
        for p in [path.clone(), Self::tmp(&path), self.sum_path(target)] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(RecordError::Io { path: p, error }),
            }
        }
        match fsync_dir(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(RecordError::Io {
                path: self.dir.clone(),
                error: e,
            }),
            _ => Ok(()),
        }
    }
}

/// Decodes the bytes of `target`'s record, once its checksum matched: JSON of this
/// [`RECORD_VERSION`], naming `target`. The error is the reason [`RecordStore::load`] gives when
/// it quarantines the record. Public so that the fuzz targets (`fuzz/`) run this very decoder.
pub fn parse(bytes: &[u8], target: &str) -> Result<Record, String> {
    let record: Record = serde_json::from_slice(bytes).map_err(|e| format!("not a record: {e}"))?;
    if record.version != RECORD_VERSION {
        return Err(format!(
            "version {} (want {RECORD_VERSION})",
            record.version
        ));
    }
    if record.target != target {
        return Err(format!("names target {:?}", record.target));
    }
    Ok(record)
}

fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_data()
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::{MountLayer, UpperMode};

    fn record(target: &str, generation: u64) -> Record {
        Record {
            applied: Some(AppliedStack {
                slot: Slot::A,
                config: MountConfig {
                    target: target.to_owned(),
                    generation,
                    layers: vec![MountLayer {
                        name: "tools".into(),
                        image_path: "/store/sha256/ab".into(),
                        digest: "sha256:ab".into(),
                        priority: 10,
                        health_check: None,
                    }],
                    upper: UpperMode::Tmpfs,
                },
            }),
            ..Record::new(target)
        }
    }

    #[test]
    fn save_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path().join("records"));
        assert_eq!(store.load("app").unwrap(), None);
        let r = record("app", 3);
        store.save(&r).unwrap();
        assert_eq!(store.load("app").unwrap(), Some(r.clone()));
        let mut r2 = r.clone();
        r2.switching_to = r2.applied.clone();
        store.save(&r2).unwrap();
        assert_eq!(store.load("app").unwrap(), Some(r2));
        assert_eq!(store.targets(), ["app"]);
        store.remove("app").unwrap();
        assert_eq!(store.load("app").unwrap(), None);
        assert!(store.targets().is_empty());
    }

    #[test]
    fn a_flipped_byte_is_corrupt_and_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        store.save(&record("app", 1)).unwrap();
        let path = store.path("app");
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let err = store.load("app").unwrap_err();
        let RecordError::Corrupt { moved_to, .. } = &err else {
            panic!("{err}");
        };
        assert!(moved_to.exists());
        assert!(!path.exists());
        // Treated as absent from now on.
        assert_eq!(store.load("app").unwrap(), None);
    }

    #[test]
    fn bad_contents_with_a_good_checksum_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not a record"),
            (
                br#"{"version":99,"target":"app","applied":null,"switching_to":null,"loops":[]}"#,
                "version 99",
            ),
            (
                br#"{"version":1,"target":"other","applied":null,"switching_to":null,"loops":[]}"#,
                "names target",
            ),
        ];
        for (bytes, want) in cases {
            std::fs::write(store.path("app"), bytes).unwrap();
            std::fs::write(store.sum_path("app"), sha256_hex(bytes)).unwrap();
            let err = store.load("app").unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    /// A record written before the window was recorded reads as one without a window; one
    /// with a window keeps it through a save and a load.
    #[test]
    fn the_window_is_optional_and_kept() {
        let old = br#"{"version":1,"target":"app","applied":null,"switching_to":null,"loops":[]}"#;
        assert_eq!(parse(old, "app").unwrap(), Record::new("app"));
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        let mut r = record("app", 2);
        r.window = Some(WindowRecord {
            previous: record("app", 1).applied.unwrap(),
            until_ms: 1_700_000_000_000,
        });
        store.save(&r).unwrap();
        assert_eq!(store.load("app").unwrap(), Some(r));
    }

    #[test]
    fn missing_checksum_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        store.save(&record("app", 1)).unwrap();
        std::fs::remove_file(store.sum_path("app")).unwrap();
        assert!(matches!(
            store.load("app"),
            Err(RecordError::Corrupt { .. })
        ));
    }

    #[test]
    fn crash_between_the_renames_rolls_forward() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        let old = record("app", 1);
        store.save(&old).unwrap();
        // Replay a save of `new` that stopped after renaming the checksum.
        let new = record("app", 2);
        let bytes = serde_json::to_vec_pretty(&new).unwrap();
        std::fs::write(RecordStore::tmp(&store.path("app")), &bytes).unwrap();
        std::fs::write(store.sum_path("app"), sha256_hex(&bytes)).unwrap();
        assert_eq!(store.load("app").unwrap(), Some(new.clone()));
        assert_eq!(store.load("app").unwrap(), Some(new));
    }

    #[test]
    fn crash_before_the_renames_keeps_the_old_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::new(dir.path());
        let old = record("app", 1);
        store.save(&old).unwrap();
        std::fs::write(RecordStore::tmp(&store.path("app")), b"half a reco").unwrap();
        std::fs::write(RecordStore::tmp(&store.sum_path("app")), b"0000").unwrap();
        assert_eq!(store.load("app").unwrap(), Some(old));
    }

    #[test]
    fn sha256_known_answer() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
