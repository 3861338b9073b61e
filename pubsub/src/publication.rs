//! The publisher side: one topic's map of items, its checkpoints and its socket.
//!
//! Each subscriber connection gets a task that sends it what it has not seen: first the table in
//! key order (a cursor walks the map, so nothing is copied per subscriber), then the keys marked
//! dirty since its last send, each with the value current at send time. A slow subscriber
//! therefore only grows its own set of dirty keys — bounded by the number of keys — and never
//! blocks `publish`, which writes the checkpoint, updates the map and marks keys, then returns.
//!
//! A checkpoint write that fails (a full disk, a directory in the file's place, the directory
//! deleted) never undoes or refuses the change: the map and the subscribers have it, the key is
//! remembered as not durable, and a retry task writes the key's current value again, with
//! backoff, until it is on disk. Meanwhile [`Publication::watch_health`] says so, and the agent
//! reports itself Degraded; the error clears when the write finally succeeds.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::IoSlice;
use std::marker::PhantomData;
use std::ops::Bound;
use std::os::fd::RawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indexmap::IndexSet;
use nix::fcntl::{Flock, FlockArg};
use powernode_types::Topic;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

use crate::checkpoint::{self, CheckpointDir, Quarantined};
use crate::dirs::Dirs;
use crate::error::{Error, Result};
use crate::frame::{self, Frame, Hello, MAX_FRAME, MAX_ITEM, PROTOCOL_VERSION};
use crate::key::{validate_key, validate_name};
use crate::peer::PeerPolicy;
use crate::ratelimit::RateLimit;

/// How long a new connection has to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Most items sent per lock acquisition while walking the snapshot.
const SNAPSHOT_BATCH: usize = 128;
/// Most connections (handshaking or subscribed) one publication holds at once; more are refused
/// so no peer can exhaust its fds.
const MAX_CONNECTIONS: usize = 256;
/// A subscriber only ever sends its `Hello`; anything longer than this is not one.
const CLIENT_FRAME_MAX: usize = 1024;
/// The first delay before a failed checkpoint write is tried again; doubles up to
/// [`RETRY_MAX`], so a full disk costs a few cheap failed writes a minute.
const RETRY_MIN: Duration = Duration::from_millis(200);
/// The longest delay between two retries of a failed checkpoint write.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// What a publication has to report about itself (folded into the agent's `AgentStatus`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublicationStatus {
    /// Items in the map.
    pub items: usize,
    /// Subscribers connected now.
    pub subscribers: usize,
    /// Checkpoint files found bad at start-up and moved aside.
    pub quarantined: Vec<Quarantined>,
    /// Connections refused: by the `SO_PEERCRED` check, or over the connection limit.
    pub refused_peers: u64,
    /// Connections dropped for sending something that is not the protocol.
    pub dropped_peers: u64,
    /// Keys whose checkpoint write failed and is being retried, with the last error.
    pub not_durable: BTreeMap<String, String>,
}

/// Whether a publication's checkpoints hold what it publishes: what its agent reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublicationHealth {
    /// Keys whose latest change is not on disk yet, with the last write error; retried until
    /// they are.
    pub not_durable: BTreeMap<String, String>,
    /// Files moved aside since the publication opened: bad checkpoints found at load, and
    /// whatever stood where a checkpoint file or directory belongs.
    pub quarantined: Vec<Quarantined>,
}

/// A topic published by this process.
///
/// Must be opened inside a tokio runtime. Dropping it closes every subscriber connection and
/// removes the socket; the checkpoints stay, for the next start.
pub struct Publication<T: Topic> {
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
    retry: JoinHandle<()>,
    _lock: Flock<File>,
    _topic: PhantomData<fn(T)>,
}

struct Inner {
    topic: &'static str,
    schema_version: u32,
    persistent: bool,
    generation: u64,
    socket: PathBuf,
    /// Also serialises checkpoint writes with map updates, so files and map change in the
    /// same order. Taken before `state`, never while holding it.
    checkpoints: Mutex<CheckpointDir>,
    checkpoint_path: PathBuf,
    policy: PeerPolicy,
    state: Mutex<State>,
    health: watch::Sender<PublicationHealth>,
    /// Wakes the retry task when a write fails.
    retry_wake: Notify,
    closed: AtomicBool,
    /// Limits the warnings a misbehaving peer can cause.
    peer_log: RateLimit,
    /// Connections held now, handshaking or subscribed.
    connections: AtomicUsize,
    refused: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    table: BTreeMap<String, Arc<[u8]>>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    restarted: u64,
}

struct Conn {
    /// The connection's socket, shared with its task: the fd stays open as long as this entry
    /// exists, even if the task is dropped (runtime shutdown) without unregistering, so a fast
    /// path send or the shutdown in `Drop` can never reach a reused fd.
    sock: Arc<UnixSeqpacket>,
    /// The connection's task holds a batch it has not finished sending.
    busy: bool,
    /// May `publish` send the next change itself? Spent by a direct send; restored when the
    /// connection's task next finds nothing to do, or when the subscriber has read everything
    /// sent to it. So a subscriber that is waiting gets a change at once, and one that is
    /// behind gets the rest of a burst packed into few messages by the task.
    direct: bool,
    cursor: Cursor,
    dirty: IndexSet<String>,
    restarted_sent: u64,
    wake: Arc<Notify>,
}

/// How far a connection's snapshot walk has gone.
enum Cursor {
    Start,
    After(String),
    Done,
}

impl Cursor {
    /// Whether the walk has already passed `key`, so a change to it must be sent as dirty.
    fn passed(&self, key: &str) -> bool {
        match self {
            Cursor::Start => false,
            Cursor::After(last) => key <= last.as_str(),
            Cursor::Done => true,
        }
    }
}

/// What a connection's sender does next.
enum Work {
    Closed,
    Idle,
    Send {
        items: Vec<(String, Option<Arc<[u8]>>)>,
        synchronized: bool,
        restarted: Option<u64>,
    },
}

impl<T: Topic> Publication<T> {
    /// Opens `<agent>/<T::NAME>`: takes the publisher lock, reloads the map from the checkpoints
    /// (moving bad files aside), then listens.
    pub fn open(dirs: &Dirs, agent: &str) -> Result<Self> {
        validate_name("agent", agent)?;
        validate_name("topic", T::NAME)?;
        let run_dir = dirs.agent_run_dir(agent);
        let mut moved = create_private_dir(&run_dir)?;

        let lock_path = dirs.lock(agent, T::NAME);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Error::io("open lock", &lock_path, e))?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                if errno == nix::errno::Errno::EWOULDBLOCK {
                    Error::AlreadyPublished {
                        socket: dirs.socket(agent, T::NAME),
                        lock: lock_path.clone(),
                    }
                } else {
                    Error::io("lock", &lock_path, errno.into())
                }
            })?;

        let cp_path = dirs.checkpoints(agent, T::NAME, T::PERSISTENT);
        let (checkpoints, moved_for_dir) = CheckpointDir::open(&cp_path)
            .map_err(|e| Error::io("open checkpoint dir", &cp_path, e))?;
        moved.extend(moved_for_dir);
        let mut loaded = checkpoints
            .load(
                T::NAME,
                T::SCHEMA_VERSION,
                checkpoint::upgrade_of::<T>(),
                |payload| {
                    // A file can pass its CRC and still not be a `T` (a writer bug, a type changed
                    // without a schema bump): never serve what we could not read ourselves.
                    if payload.len() > MAX_ITEM {
                        return Err(format!(
                            "{} bytes, over the {MAX_ITEM}-byte item limit",
                            payload.len()
                        ));
                    }
                    postcard::from_bytes::<T>(payload)
                        .map(drop)
                        .map_err(|e| format!("does not decode as {}: {e}", T::NAME))
                },
            )
            .map_err(|e| Error::io("load checkpoints", &cp_path, e))?;
        moved.append(&mut loaded.quarantined);
        for q in &moved {
            tracing::error!(topic = T::NAME, key = %q.key, reason = %q.reason, moved_to = %q.moved_to.display(),
                "bad checkpoint moved aside, not trusted");
        }
        // Written again at this version at once, so that subscribers reading the files find
        // the current encoding. A failed write is no loss: the item is held and served, and
        // its next publish writes it.
        for (key, from) in &loaded.upgraded {
            let payload = loaded.items.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            let written = payload.map(|v| {
                checkpoints.write(key, &checkpoint::encode(T::NAME, T::SCHEMA_VERSION, v))
            });
            match written {
                Some(Ok(_)) => tracing::info!(topic = T::NAME, %key, from_version = from,
                    to_version = T::SCHEMA_VERSION, "checkpoint of an earlier schema version upgraded"),
                Some(Err(e)) => tracing::warn!(topic = T::NAME, %key, error = %e,
                    "upgraded checkpoint not written again; its next publish will"),
                None => {}
            }
        }
        let state = State {
            table: loaded
                .items
                .into_iter()
                .map(|(k, v)| (k, Arc::from(v)))
                .collect(),
            ..State::default()
        };

        let socket = dirs.socket(agent, T::NAME);
        let listener = bind(&socket)?;
        let inner = Arc::new(Inner {
            topic: T::NAME,
            schema_version: T::SCHEMA_VERSION,
            persistent: T::PERSISTENT,
            generation: new_generation(),
            socket,
            checkpoints: Mutex::new(checkpoints),
            checkpoint_path: cp_path,
            policy: PeerPolicy::current(),
            state: Mutex::new(state),
            health: watch::Sender::new(PublicationHealth {
                not_durable: BTreeMap::new(),
                quarantined: moved,
            }),
            retry_wake: Notify::new(),
            closed: AtomicBool::new(false),
            peer_log: RateLimit::new(10, Duration::from_secs(60)),
            connections: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(inner.clone(), listener));
        let retry = tokio::spawn(retry_loop(inner.clone()));
        Ok(Publication {
            inner,
            accept,
            retry,
            _lock: lock,
            _topic: PhantomData,
        })
    }

    /// Publishes `item` under its key: lets every subscriber know and checkpoints it durably.
    ///
    /// Blocks the calling thread for the checkpoint write (a few microseconds on tmpfs) and for
    /// nothing else. Publishing a value equal to the current one sends nothing, and writes
    /// nothing unless its earlier write failed.
    ///
    /// An error means nothing was published (an invalid key, an item too large or that does
    /// not encode). A failed checkpoint write is no error here: the item is published, the
    /// write is retried until it succeeds, and [`Publication::watch_health`] reports it
    /// meanwhile (see the module documentation). [`Publication::is_durable`] tells a caller
    /// that needs the disk to hold the item whether it does.
    pub fn publish(&self, item: &T) -> Result<()> {
        let key = item.key();
        validate_key(&key)?;
        let value = postcard::to_stdvec(item).map_err(|source| Error::Codec {
            topic: T::NAME.to_owned(),
            what: "encode item",
            source,
        })?;
        if value.len() > MAX_ITEM {
            return Err(Error::ItemTooLarge {
                topic: T::NAME,
                key,
                size: value.len(),
                limit: MAX_ITEM,
            });
        }
        self.inner.put(key, value)
    }

    /// Removes the item with `key`; removing a key that does not exist does nothing. A
    /// failed file removal is retried like a failed write.
    pub fn unpublish(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.inner.remove(key)
    }

    /// Removes the items with `keys` as [`Publication::unpublish`] does each, with one
    /// directory sync for all their checkpoint files: what a publisher that forgets a range of
    /// items at once (an agent whose events eventd acknowledged) does instead of one sync per
    /// item. An invalid key refuses the whole call before anything is removed.
    pub fn unpublish_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<()> {
        for key in keys {
            validate_key(key.as_ref())?;
        }
        self.inner.remove_many(keys);
        Ok(())
    }

    /// Tells subscribers that everything this publisher had to publish at start-up is out.
    pub fn signal_restarted(&self) {
        let mut st = self.inner.lock();
        st.restarted += 1;
        for conn in st.conns.values() {
            conn.wake.notify_one();
        }
    }

    /// The current item with `key`, as published (a restarted agent reads its own state here).
    pub fn get(&self, key: &str) -> Option<T> {
        let bytes = self.inner.lock().table.get(key).cloned()?;
        match postcard::from_bytes(&bytes) {
            Ok(item) => Some(item),
            Err(e) => {
                tracing::error!(topic = T::NAME, key, error = %e, "own item does not decode");
                None
            }
        }
    }

    /// Every key in the map, in order.
    pub fn keys(&self) -> Vec<String> {
        self.inner.lock().table.keys().cloned().collect()
    }

    /// Counters and findings to report.
    pub fn status(&self) -> PublicationStatus {
        let st = self.inner.lock();
        PublicationStatus {
            items: st.table.len(),
            subscribers: st.conns.len(),
            quarantined: self.inner.health.borrow().quarantined.clone(),
            refused_peers: self.inner.refused.load(Ordering::Relaxed),
            dropped_peers: self.inner.dropped.load(Ordering::Relaxed),
            not_durable: self.inner.health.borrow().not_durable.clone(),
        }
    }

    /// Whether the checkpoint file of `key` holds its current value (for a removed key: is
    /// gone).
    pub fn is_durable(&self, key: &str) -> bool {
        !self.inner.is_pending(key)
    }

    /// Follows the publication's [`PublicationHealth`]: it changes when a checkpoint write
    /// fails or is retried successfully, and when a file is moved aside.
    pub fn watch_health(&self) -> watch::Receiver<PublicationHealth> {
        self.inner.health.subscribe()
    }

    /// This publisher instance's generation, as sent in its `Hello`.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// The publication's socket path.
    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }
}

impl<T: Topic> Drop for Publication<T> {
    fn drop(&mut self) {
        self.accept.abort();
        self.retry.abort();
        self.inner.closed.store(true, Ordering::SeqCst);
        // Hang up on every subscriber now, not when (or if) the runtime next polls their tasks.
        for conn in self.inner.lock().conns.values() {
            let _ = conn.sock.shutdown(std::net::Shutdown::Both);
            conn.wake.notify_one();
        }
        // We still hold the lock, so the socket is ours to remove.
        let _ = fs::remove_file(&self.inner.socket);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated (every update is a
        // single insert or remove), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkpoint_dir(&self) -> MutexGuard<'_, CheckpointDir> {
        // Every use of the directory is one system call sequence that leaves it consistent.
        self.checkpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates the map, delivers, then checkpoints. Delivery overlaps the checkpoint write
    /// rather than waiting for it: see docs/pubsub.md ("Ordering and durability").
    fn put(&self, key: String, value: Vec<u8>) -> Result<()> {
        let dir = self.checkpoint_dir();
        let value: Arc<[u8]> = Arc::from(value);
        {
            let mut st = self.lock();
            if st.table.get(&key).is_some_and(|old| **old == *value) {
                if !self.is_pending(&key) {
                    return Ok(());
                }
                // Unchanged but never written: writing it now is what makes it durable.
            } else {
                st.table.insert(key.clone(), value.clone());
                let mut header = Vec::with_capacity(key.len() + 8);
                frame::update_header(&key, value.len(), &mut header);
                deliver(
                    &mut st.conns,
                    &key,
                    &[IoSlice::new(&header), IoSlice::new(&value)],
                );
            }
        }
        let file = checkpoint::encode(self.topic, self.schema_version, &value);
        self.settle(&key, "write", dir.write(&key, &file));
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        let dir = self.checkpoint_dir();
        {
            let mut st = self.lock();
            if st.table.remove(key).is_none() && !self.is_pending(key) {
                return Ok(());
            }
            let frame = Frame::Delete { key }.encode();
            deliver(&mut st.conns, key, &[IoSlice::new(&frame)]);
        }
        self.settle(key, "remove", dir.remove(key));
        Ok(())
    }

    fn remove_many<K: AsRef<str>>(&self, keys: &[K]) {
        let dir = self.checkpoint_dir();
        let mut gone = Vec::with_capacity(keys.len());
        {
            let mut st = self.lock();
            for key in keys.iter().map(AsRef::as_ref) {
                if st.table.remove(key).is_none() && !self.is_pending(key) {
                    continue;
                }
                let frame = Frame::Delete { key }.encode();
                deliver(&mut st.conns, key, &[IoSlice::new(&frame)]);
                gone.push(key);
            }
        }
        if gone.is_empty() {
            return;
        }
        let outcomes = dir.remove_many(gone.iter().copied());
        for (key, outcome) in gone.into_iter().zip(outcomes) {
            self.settle(key, "remove", outcome);
        }
    }

    /// Whether `key`'s checkpoint is waiting for a retry. The publication's health is the one
    /// record of that, so what the agent reports and what the retry does cannot disagree.
    fn is_pending(&self, key: &str) -> bool {
        self.health.borrow().not_durable.contains_key(key)
    }

    /// Records how a checkpoint write or removal of `key` went: a failure marks the key not
    /// durable and wakes the retry task; a success clears it. Either way the health follows.
    fn settle(&self, key: &str, op: &str, outcome: std::io::Result<Option<Quarantined>>) {
        let outcome = outcome.map_err(|e| {
            format!(
                "{op} checkpoint {}: {e}",
                self.checkpoint_path.join(key).display()
            )
        });
        self.health.send_if_modified(|h| match outcome {
            Ok(moved) => {
                let mut changed = false;
                if let Some(q) = moved {
                    tracing::error!(topic = self.topic, key, reason = %q.reason, moved_to = %q.moved_to.display(),
                        "moved aside what stood in a checkpoint's way");
                    h.quarantined.push(q);
                    changed = true;
                }
                if h.not_durable.remove(key).is_some() {
                    tracing::info!(
                        topic = self.topic,
                        key,
                        "checkpoint written after earlier failures"
                    );
                    changed = true;
                }
                changed
            }
            Err(error) => {
                self.retry_wake.notify_one();
                match h.not_durable.get(key) {
                    Some(known) if *known == error => false,
                    known => {
                        if known.is_none() {
                            tracing::warn!(topic = self.topic, key, %error,
                                "checkpoint not written; published anyway, retrying");
                        }
                        h.not_durable.insert(key.to_owned(), error);
                        true
                    }
                }
            }
        });
    }

    /// Writes (or removes) every key that is not durable, once, each under the directory's
    /// lock of its own so publishing goes on meanwhile. When the directory itself was
    /// replaced, every item is written again and every file the table lacks removed. Returns
    /// whether all are durable now.
    fn retry_not_durable(&self) -> bool {
        let replaced = self.checkpoint_dir().reopen_if_replaced();
        match replaced {
            Ok(None) => {}
            Ok(Some(reopened)) => {
                tracing::warn!(topic = self.topic, dir = %self.checkpoint_path.display(),
                    "checkpoint directory was replaced; writing every item again");
                let mut keys: Vec<String> = self.lock().table.keys().cloned().collect();
                keys.extend(reopened.strays);
                self.health.send_modify(|h| {
                    h.quarantined.extend(reopened.moved);
                    for key in keys {
                        h.not_durable
                            .entry(key)
                            .or_insert_with(|| "checkpoint directory replaced".into());
                    }
                });
            }
            Err(e) => {
                let first = self.health.borrow().not_durable.keys().next().cloned();
                if let Some(key) = first {
                    self.settle(&key, "reopen the directory of", Err(e));
                }
                return false;
            }
        }
        let keys: Vec<String> = self.health.borrow().not_durable.keys().cloned().collect();
        for key in keys {
            let dir = self.checkpoint_dir();
            // Read under the directory's lock: a publish meanwhile either wrote first (and
            // this writes the same value again) or waits and writes after.
            let value = self.lock().table.get(&key).cloned();
            let (op, outcome) = match value {
                Some(v) => (
                    "write",
                    dir.write(
                        &key,
                        &checkpoint::encode(self.topic, self.schema_version, &v),
                    ),
                ),
                None => ("remove", dir.remove(&key)),
            };
            self.settle(&key, op, outcome);
        }
        self.health.borrow().not_durable.is_empty()
    }

    fn hello(&self) -> Vec<u8> {
        Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            topic: self.topic,
            schema_version: self.schema_version,
            persistent: self.persistent,
            generation: self.generation,
        })
        .encode()
    }

    fn register(&self, sock: Arc<UnixSeqpacket>) -> (u64, Arc<Notify>) {
        let mut st = self.lock();
        let id = st.next_conn;
        st.next_conn += 1;
        let wake = Arc::new(Notify::new());
        st.conns.insert(
            id,
            Conn {
                sock,
                busy: false,
                direct: true,
                cursor: Cursor::Start,
                dirty: IndexSet::new(),
                restarted_sent: 0,
                wake: wake.clone(),
            },
        );
        (id, wake)
    }

    fn unregister(&self, id: u64) {
        self.lock().conns.remove(&id);
    }

    /// Takes the next batch for connection `id`: a slice of the snapshot walk, or the dirty keys.
    /// The restart barrier is taken under the same lock as the items, so it never overtakes them.
    fn next_work(&self, id: u64) -> Work {
        if self.closed.load(Ordering::SeqCst) {
            return Work::Closed;
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(conn) = st.conns.get_mut(&id) else {
            return Work::Closed;
        };
        // Asking for work means the previous batch is out.
        conn.busy = false;
        let mut items = Vec::new();
        let mut synchronized = false;
        let walking = match &conn.cursor {
            Cursor::Start => Some(
                st.table
                    .range::<str, _>((Bound::Unbounded, Bound::Unbounded)),
            ),
            Cursor::After(last) => Some(
                st.table
                    .range::<str, _>((Bound::Excluded(last.as_str()), Bound::Unbounded)),
            ),
            Cursor::Done => None,
        };
        if let Some(range) = walking {
            items.extend(
                range
                    .take(SNAPSHOT_BATCH)
                    .map(|(k, v)| (k.clone(), Some(v.clone()))),
            );
            if items.len() == SNAPSHOT_BATCH {
                conn.cursor = Cursor::After(items[items.len() - 1].0.clone());
                conn.busy = true;
                return Work::Send {
                    items,
                    synchronized: false,
                    restarted: None,
                };
            }
            conn.cursor = Cursor::Done;
            synchronized = true;
        }
        items.extend(std::mem::take(&mut conn.dirty).into_iter().map(|k| {
            let v = st.table.get(&k).cloned();
            (k, v)
        }));
        let restarted = (st.restarted > conn.restarted_sent).then(|| {
            conn.restarted_sent = st.restarted;
            st.restarted
        });
        if items.is_empty() && !synchronized && restarted.is_none() {
            conn.direct = true;
            Work::Idle
        } else {
            conn.busy = true;
            Work::Send {
                items,
                synchronized,
                restarted,
            }
        }
    }
}

/// Sends a change of `key` to every subscriber that has already been sent `key`.
///
/// A subscriber that is caught up (snapshot done, nothing dirty, its task not mid-batch) gets
/// the frame right here with a non-blocking send: no task wake-up on the latency path. Any
/// other — or one whose socket buffer is full — gets the key marked dirty for its task, which
/// sends the value current at that time. Called under the state lock, so a fast-path send can
/// never interleave with the connection task's sends.
fn deliver(conns: &mut HashMap<u64, Conn>, key: &str, frame: &[IoSlice<'_>]) {
    for conn in conns.values_mut() {
        if !conn.cursor.passed(key) {
            continue; // the snapshot walk will send it
        }
        let idle = matches!(conn.cursor, Cursor::Done) && !conn.busy && conn.dirty.is_empty();
        let fd = conn.sock.as_raw_fd();
        if idle && (conn.direct || unread_bytes(fd) == Some(0)) && try_send(fd, frame) {
            conn.direct = false;
            conn.wake.notify_one();
            continue;
        }
        if !conn.dirty.contains(key) {
            conn.dirty.insert(key.to_owned());
        }
        conn.wake.notify_one();
    }
}

/// Bytes sent on `fd` that the peer has not read yet (`SIOCOUTQ`).
fn unread_bytes(fd: RawFd) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which points at a live local;
    // `fd` belongs to a socket the caller's `Conn` keeps open.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0).then_some(n)
}

/// One whole frame without blocking; false when it did not go (buffer full, peer gone).
fn try_send(fd: RawFd, frame: &[IoSlice<'_>]) -> bool {
    use nix::sys::socket::{sendmsg, MsgFlags, UnixAddr};
    let len: usize = frame.iter().map(|s| s.len()).sum();
    // SOCK_SEQPACKET sends a message whole or not at all.
    sendmsg::<UnixAddr>(
        fd,
        frame,
        &[],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    ) == Ok(len)
}

fn new_generation() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 40)
}

/// Retries the writes that failed, with backoff, for as long as the publication lives.
async fn retry_loop(inner: Arc<Inner>) {
    let mut delay = RETRY_MIN;
    loop {
        if inner.health.borrow().not_durable.is_empty() {
            delay = RETRY_MIN;
            inner.retry_wake.notified().await;
            continue;
        }
        tokio::time::sleep(delay).await;
        let round = inner.clone();
        let all_durable = tokio::task::spawn_blocking(move || round.retry_not_durable())
            .await
            .unwrap_or(false);
        delay = if all_durable {
            RETRY_MIN
        } else {
            (delay * 2).min(RETRY_MAX)
        };
    }
}

/// Creates `dir` mode 0700 (moving aside a file in its way, returned), or tightens it to 0700
/// if it exists with looser permissions.
pub(crate) fn create_private_dir(dir: &Path) -> Result<Vec<Quarantined>> {
    let moved = checkpoint::make_dir(dir, 1).map_err(|e| Error::io("create directory", dir, e))?;
    let meta = fs::metadata(dir).map_err(|e| Error::io("stat", dir, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io("chmod 0700", dir, e))?;
    }
    Ok(moved)
}

fn bind(socket: &Path) -> Result<UnixSeqpacketListener> {
    let len = socket.as_os_str().len();
    if len > 107 {
        return Err(Error::SocketPathTooLong {
            path: socket.to_owned(),
            len,
        });
    }
    // We hold the publisher lock, so a socket file left here belongs to a dead publisher.
    match fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale socket", socket, e)),
    }
    let listener = UnixSeqpacketListener::bind(socket).map_err(|e| Error::io("bind", socket, e))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("chmod", socket, e))?;
    Ok(listener)
}

async fn accept_loop(inner: Arc<Inner>, mut listener: UnixSeqpacketListener) {
    loop {
        match listener.accept().await {
            Ok(sock) => {
                // Counted from accept, so peers stuck before their Hello count too.
                let Some(slot) = ConnectionSlot::take(&inner) else {
                    inner.refused.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = inner.peer_log.check() {
                        tracing::warn!(
                            topic = inner.topic,
                            limit = MAX_CONNECTIONS,
                            suppressed,
                            "too many connections; refusing one"
                        );
                    }
                    continue;
                };
                tokio::spawn(async move {
                    serve(slot.0.clone(), sock).await;
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of fds or memory: back off rather than spin; existing subscribers carry on.
                if let Some(suppressed) = inner.peer_log.check() {
                    tracing::warn!(topic = inner.topic, error = %e, suppressed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One of a publication's [`MAX_CONNECTIONS`] places, given back on drop.
struct ConnectionSlot(Arc<Inner>);

impl ConnectionSlot {
    fn take(inner: &Arc<Inner>) -> Option<Self> {
        let taken = inner.connections.fetch_add(1, Ordering::AcqRel);
        if taken >= MAX_CONNECTIONS {
            inner.connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionSlot(inner.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection ended.
enum Ended {
    Closed,
    Violation(String),
}

async fn serve(inner: Arc<Inner>, sock: UnixSeqpacket) {
    let sock = Arc::new(sock);
    let cred = match sock.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            inner.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = inner.peer_log.check() {
                tracing::warn!(topic = inner.topic, error = %e, suppressed, "SO_PEERCRED failed; refusing peer");
            }
            return;
        }
    };
    if !inner.policy.allows(cred.uid(), cred.gid()) {
        inner.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = inner.peer_log.check() {
            tracing::warn!(topic = inner.topic, peer_uid = cred.uid(), peer_gid = cred.gid(), peer_pid = ?cred.pid(),
                suppressed, "peer refused: not root and not the agents' user or group");
        }
        return;
    }
    let peer_pid = cred.pid().unwrap_or(0);
    match handshake(&inner, &sock).await {
        Ok(()) => {}
        Err(Ended::Closed) => return,
        Err(Ended::Violation(reason)) => {
            inner.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = inner.peer_log.check() {
                tracing::warn!(topic = inner.topic, peer_pid, %reason, suppressed, "subscriber dropped at handshake");
            }
            return;
        }
    }
    let (id, wake) = inner.register(sock.clone());
    let ended = tokio::select! {
        e = watch_peer(&sock) => e,
        e = send_loop(&inner, id, &wake, &sock) => e,
    };
    inner.unregister(id);
    if let Ended::Violation(reason) = ended {
        inner.dropped.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = inner.peer_log.check() {
            tracing::warn!(topic = inner.topic, peer_pid, %reason, suppressed, "subscriber dropped");
        }
    }
}

async fn handshake(inner: &Inner, sock: &UnixSeqpacket) -> Result<(), Ended> {
    let mut buf = [0u8; CLIENT_FRAME_MAX];
    let info = match tokio::time::timeout(HELLO_TIMEOUT, sock.recv(&mut buf)).await {
        Err(_) => return Err(Ended::Violation("no Hello within 5 s".into())),
        Ok(Err(_)) => return Err(Ended::Closed),
        Ok(Ok(info)) => info,
    };
    if info.bytes_read() == 0 && !info.truncated() {
        return Err(Ended::Closed);
    }
    if info.truncated() {
        return Err(Ended::Violation("oversized frame instead of Hello".into()));
    }
    let reason = match Frame::decode(&buf[..info.bytes_read()]) {
        Ok(Frame::Hello(h)) if h.protocol == PROTOCOL_VERSION && h.topic == inner.topic => None,
        Ok(Frame::Hello(h)) => Some(format!(
            "Hello for topic {:?} protocol {}, this is {:?} protocol {}",
            h.topic, h.protocol, inner.topic, PROTOCOL_VERSION
        )),
        Ok(other) => Some(format!("expected Hello, got {}", frame_name(&other))),
        Err(e) => Some(format!("undecodable frame: {e}")),
    };
    // Answer with our Hello even on a mismatch, so the peer can say what it found.
    if sock.send(&inner.hello()).await.is_err() {
        return Err(Ended::Closed);
    }
    match reason {
        None => Ok(()),
        Some(r) => Err(Ended::Violation(r)),
    }
}

/// Subscribers send nothing after their Hello: EOF ends the connection, anything else is a
/// protocol violation.
async fn watch_peer(sock: &UnixSeqpacket) -> Ended {
    let mut buf = [0u8; CLIENT_FRAME_MAX];
    match sock.recv(&mut buf).await {
        Ok(info) if info.bytes_read() == 0 && !info.truncated() => Ended::Closed,
        Ok(info) if info.truncated() => Ended::Violation("oversized frame".into()),
        Ok(info) => Ended::Violation(format!(
            "unexpected {}-byte frame after Hello",
            info.bytes_read()
        )),
        Err(_) => Ended::Closed,
    }
}

async fn send_loop(inner: &Inner, id: u64, wake: &Notify, sock: &UnixSeqpacket) -> Ended {
    let mut out = Outbox {
        sock,
        msg: Vec::with_capacity(MAX_FRAME),
    };
    loop {
        let sent = match inner.next_work(id) {
            Work::Closed => return Ended::Closed,
            Work::Idle => {
                wake.notified().await;
                continue;
            }
            Work::Send {
                items,
                synchronized,
                restarted,
            } => out.send_batch(&items, synchronized, restarted).await,
        };
        if sent.is_err() {
            return Ended::Closed;
        }
    }
}

/// Packs frames into as few messages as fit in [`MAX_FRAME`].
struct Outbox<'a> {
    sock: &'a UnixSeqpacket,
    msg: Vec<u8>,
}

impl Outbox<'_> {
    async fn send_batch(
        &mut self,
        items: &[(String, Option<Arc<[u8]>>)],
        synchronized: bool,
        restarted: Option<u64>,
    ) -> std::io::Result<()> {
        self.msg.clear();
        for (key, value) in items {
            match value {
                Some(v) => {
                    let need = key.len() + v.len() + 11;
                    if self.msg.len() + need > MAX_FRAME {
                        self.flush().await?;
                    }
                    frame::update_header(key, v.len(), &mut self.msg);
                    self.msg.extend_from_slice(v);
                }
                None => {
                    if self.msg.len() + key.len() + 6 > MAX_FRAME {
                        self.flush().await?;
                    }
                    Frame::Delete { key }.encode_into(&mut self.msg);
                }
            }
        }
        // Synchronized (1 byte) and Restarted (tag + a u64 varint, at most 11 bytes) must not
        // push a message that an item filled up past MAX_FRAME: the subscriber would refuse it
        // as oversized, reconnect, get the same snapshot and never synchronize.
        if (synchronized || restarted.is_some()) && self.msg.len() + 12 > MAX_FRAME {
            self.flush().await?;
        }
        if synchronized {
            Frame::Synchronized.encode_into(&mut self.msg);
        }
        if let Some(counter) = restarted {
            Frame::Restarted { counter }.encode_into(&mut self.msg);
        }
        self.flush().await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.msg.is_empty() {
            self.sock.send(&self.msg).await?;
            self.msg.clear();
        }
        Ok(())
    }
}

pub(crate) fn frame_name(f: &Frame<'_>) -> &'static str {
    match f {
        Frame::Hello(_) => "Hello",
        Frame::Update { .. } => "Update",
        Frame::Delete { .. } => "Delete",
        Frame::Synchronized => "Synchronized",
        Frame::Restarted { .. } => "Restarted",
    }
}
