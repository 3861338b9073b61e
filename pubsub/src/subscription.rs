//! The subscriber side: converge to a publisher's map, across its restarts.
//!
//! [`RawSubscription`] speaks the protocol without knowing the item type (tools use it);
//! [`Subscription`] decodes items and turns updates into create / modify / delete events.
//! Both are pull-based: nothing is read from the socket until the caller asks for the next event,
//! so a slow consumer applies back-pressure to its own connection only.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use powernode_types::Topic;
use tokio_seqpacket::UnixSeqpacket;

use crate::checkpoint;
use crate::dirs::Dirs;
use crate::error::{Error, Result};
use crate::frame::{Frame, Hello, MAX_FRAME, PROTOCOL_VERSION};
use crate::key::validate_key;
use crate::publication::frame_name;

/// Tuning of a subscription's reconnects.
#[derive(Clone, Debug)]
pub struct SubscribeOptions {
    /// How long to wait for the publisher's `Hello` after connecting.
    pub handshake_timeout: Duration,
    /// First delay between reconnect attempts; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest delay between reconnect attempts.
    pub max_backoff: Duration,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            handshake_timeout: Duration::from_secs(2),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// What a [`RawSubscription`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawEvent {
    /// Connected and handshaken; a snapshot follows.
    Connected {
        /// The publisher instance.
        generation: u64,
        /// The publisher's schema version of the topic.
        schema_version: u32,
        /// Whether the topic is persistent.
        persistent: bool,
    },
    /// The current value of `key`, as the publisher encoded it.
    Update {
        /// The key.
        key: String,
        /// The postcard encoding of the item.
        value: Vec<u8>,
        /// Read from a checkpoint file while the publisher was not up (persistent topics).
        from_checkpoint: bool,
    },
    /// `key` is gone (deleted by the publisher, or missing from its snapshot after a reconnect).
    Delete {
        /// The key.
        key: String,
    },
    /// Every item the publisher held at connect time has arrived; stale keys have been deleted.
    Synchronized,
    /// The publisher's restart barrier.
    Restarted {
        /// The publisher's counter.
        counter: u64,
    },
    /// The connection ended; items are kept as last known until the reconnect's snapshot.
    Disconnected {
        /// Why, for the log.
        reason: String,
    },
}

struct Connection {
    sock: UnixSeqpacket,
    /// Keys seen since connecting, until `Synchronized`; then `None`.
    snapshot: Option<BTreeSet<String>>,
}

/// A subscription to `<agent>/<topic>` that does not decode items.
pub struct RawSubscription {
    dirs: Dirs,
    agent: String,
    topic: String,
    socket: PathBuf,
    /// Schema version the caller reads; a publisher with another one is refused.
    expect_schema: Option<u32>,
    /// Reads checkpoint files of an earlier schema version (typed subscriptions).
    upgrade: Option<checkpoint::Upgrade>,
    /// Read checkpoint files while the publisher is not up (persistent topics): before the
    /// first connection and whenever a reconnect fails.
    read_files: bool,
    /// The checkpoint directory as it was last read ([`checkpoint::dir_signature`]), so a
    /// publisher that stays down costs a `stat` per entry and attempt, not a read of every file.
    files_read: Option<u64>,
    options: SubscribeOptions,
    conn: Option<Connection>,
    held: BTreeSet<String>,
    queue: VecDeque<RawEvent>,
    backoff: Duration,
    /// When the next reconnect attempt is due. Kept across calls so that a caller whose
    /// `next` is cancelled (a `select!` with a timer that fires more often than the backoff)
    /// still reaches it, instead of starting a fresh delay on every call.
    retry_at: Option<tokio::time::Instant>,
    started: bool,
    failures: u32,
    buf: Vec<u8>,
}

impl RawSubscription {
    /// A subscription to `<agent>/<topic>`; no I/O happens until [`RawSubscription::next`].
    ///
    /// `expect_schema` refuses a publisher of another schema version; `persistent` makes the
    /// subscription read the topic's checkpoint files while the publisher is not up: before it
    /// first comes and while it is down (an agent that published and died before a reconnect
    /// attempt reached it is still heard).
    pub fn new(
        dirs: &Dirs,
        agent: &str,
        topic: &str,
        expect_schema: Option<u32>,
        persistent: bool,
    ) -> Self {
        let options = SubscribeOptions::default();
        RawSubscription {
            dirs: dirs.clone(),
            agent: agent.to_owned(),
            topic: topic.to_owned(),
            socket: dirs.socket(agent, topic),
            expect_schema,
            upgrade: None,
            read_files: persistent,
            files_read: None,
            backoff: options.min_backoff,
            retry_at: None,
            options,
            conn: None,
            held: BTreeSet::new(),
            queue: VecDeque::new(),
            started: false,
            failures: 0,
            buf: vec![0; MAX_FRAME + 1],
        }
    }

    /// Replaces the reconnect tuning.
    pub fn with_options(mut self, options: SubscribeOptions) -> Self {
        self.backoff = options.min_backoff;
        self.options = options;
        self
    }

    /// Reads checkpoint files of a schema version below the expected one through `upgrade`
    /// instead of skipping them: files written before an upgrade of the agents, which the
    /// publisher has not written again yet (it does when it opens).
    pub fn reading_earlier_versions(mut self, upgrade: checkpoint::Upgrade) -> Self {
        self.upgrade = Some(upgrade);
        self
    }

    /// Whether the subscription is connected to a live publisher now.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The publication's socket path.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.socket
    }

    /// Connects once, without retrying; used by tools that fall back to checkpoint files.
    pub async fn connect_once(&mut self) -> Result<()> {
        self.started = true;
        if self.conn.is_none() {
            let event = self.connect().await?;
            self.queue.push_back(event);
        }
        Ok(())
    }

    /// The next event. Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> RawEvent {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return event;
            }
            if self.conn.is_none() {
                if !self.started {
                    self.started = true;
                    match self.connect().await {
                        Ok(event) => return event,
                        Err(_) if self.read_files => {
                            self.read_checkpoints();
                            continue;
                        }
                        Err(e) => self.note_failure(&e),
                    }
                }
                let at = match self.retry_at {
                    Some(at) => at,
                    None => {
                        let at = tokio::time::Instant::now() + jittered(self.backoff);
                        self.backoff = (self.backoff * 2).min(self.options.max_backoff);
                        self.retry_at = Some(at);
                        at
                    }
                };
                tokio::time::sleep_until(at).await;
                self.retry_at = None;
                match self.connect().await {
                    Ok(event) => return event,
                    Err(e) => {
                        self.note_failure(&e);
                        if self.read_files {
                            self.read_checkpoints();
                        }
                        continue;
                    }
                }
            }
            if let Some(event) = self.receive().await {
                return event;
            }
        }
    }

    fn note_failure(&mut self, e: &Error) {
        self.failures += 1;
        // Log the first failure and then every 64th, so a publisher that is down does not flood.
        if self.failures == 1 || self.failures % 64 == 0 {
            tracing::debug!(topic = %self.topic, agent = %self.agent, attempts = self.failures, error = %e,
                "publisher not reachable; retrying");
        }
    }

    async fn connect(&mut self) -> Result<RawEvent> {
        let peer = self.socket.display().to_string();
        let protocol = |reason: String| Error::Protocol {
            peer: peer.clone(),
            reason,
        };
        let sock = UnixSeqpacket::connect(&self.socket)
            .await
            .map_err(|e| Error::io("connect", &self.socket, e))?;
        let hello = Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            topic: &self.topic,
            schema_version: self.expect_schema.unwrap_or(0),
            persistent: self.read_files,
            generation: 0,
        });
        sock.send(&hello.encode())
            .await
            .map_err(|e| Error::io("send Hello", &self.socket, e))?;
        let info = tokio::time::timeout(self.options.handshake_timeout, sock.recv(&mut self.buf))
            .await
            .map_err(|_| protocol("no Hello from publisher in time".into()))?
            .map_err(|e| Error::io("receive Hello", &self.socket, e))?;
        if info.truncated() || info.bytes_read() == 0 {
            return Err(protocol("connection closed during handshake".into()));
        }
        let h = match Frame::decode(&self.buf[..info.bytes_read()]) {
            Ok(Frame::Hello(h)) => h,
            Ok(other) => {
                return Err(protocol(format!(
                    "expected Hello, got {}",
                    frame_name(&other)
                )))
            }
            Err(e) => return Err(protocol(format!("undecodable Hello: {e}"))),
        };
        if h.protocol != PROTOCOL_VERSION || h.topic != self.topic {
            return Err(protocol(format!(
                "publisher serves topic {:?} protocol {}, wanted {:?} protocol {}",
                h.topic, h.protocol, self.topic, PROTOCOL_VERSION
            )));
        }
        if let Some(want) = self.expect_schema.filter(|&v| v != h.schema_version) {
            tracing::error!(topic = %self.topic, agent = %self.agent, publisher_schema = h.schema_version,
                our_schema = want, "schema version mismatch; not reading this publisher");
            return Err(protocol(format!(
                "publisher has schema version {}, we read {want}",
                h.schema_version
            )));
        }
        let event = RawEvent::Connected {
            generation: h.generation,
            schema_version: h.schema_version,
            persistent: h.persistent,
        };
        self.conn = Some(Connection {
            sock,
            snapshot: Some(BTreeSet::new()),
        });
        self.backoff = self.options.min_backoff;
        self.failures = 0;
        Ok(event)
    }

    /// Reads one message and queues the events of its frames; on a bad frame, the frames
    /// before it stand and the connection is dropped (the reconnect's snapshot repairs the rest).
    async fn receive(&mut self) -> Option<RawEvent> {
        let conn = self.conn.as_mut()?;
        let info = match conn.sock.recv(&mut self.buf).await {
            Ok(info) => info,
            Err(e) => return Some(self.disconnect(format!("receive failed: {e}"))),
        };
        if info.bytes_read() == 0 && !info.truncated() {
            return Some(self.disconnect("publisher closed the connection".into()));
        }
        if info.truncated() {
            return Some(self.violation("message larger than the protocol allows".into()));
        }
        let buf = std::mem::take(&mut self.buf);
        let result = self.apply_frames(&buf[..info.bytes_read()]);
        self.buf = buf;
        result.err().map(|reason| self.violation(reason))
    }

    fn apply_frames(&mut self, message: &[u8]) -> Result<(), String> {
        for frame in Frame::decode_all(message) {
            match frame.map_err(|e| format!("undecodable frame: {e}"))? {
                Frame::Update { key, value } => {
                    validate_key(key).map_err(|e| e.to_string())?;
                    if let Some(seen) = self.conn.as_mut().and_then(|c| c.snapshot.as_mut()) {
                        seen.insert(key.to_owned());
                    }
                    if !self.held.contains(key) {
                        self.held.insert(key.to_owned());
                    }
                    self.queue.push_back(RawEvent::Update {
                        key: key.to_owned(),
                        value: value.to_vec(),
                        from_checkpoint: false,
                    });
                }
                Frame::Delete { key } => {
                    if self.held.remove(key) {
                        self.queue.push_back(RawEvent::Delete {
                            key: key.to_owned(),
                        });
                    }
                }
                Frame::Synchronized => {
                    if let Some(seen) = self.conn.as_mut().and_then(|c| c.snapshot.take()) {
                        // Keys we held that the new snapshot lacks were deleted while we were away.
                        let stale: Vec<String> = self.held.difference(&seen).cloned().collect();
                        for key in stale {
                            self.held.remove(&key);
                            self.queue.push_back(RawEvent::Delete { key });
                        }
                    }
                    self.queue.push_back(RawEvent::Synchronized);
                }
                Frame::Restarted { counter } => {
                    self.queue.push_back(RawEvent::Restarted { counter })
                }
                Frame::Hello(_) => return Err("second Hello".into()),
            }
        }
        Ok(())
    }

    fn disconnect(&mut self, reason: String) -> RawEvent {
        self.conn = None;
        RawEvent::Disconnected { reason }
    }

    fn violation(&mut self, reason: String) -> RawEvent {
        tracing::error!(topic = %self.topic, agent = %self.agent, %reason, "protocol violation by publisher; reconnecting");
        self.disconnect(format!("protocol violation: {reason}"))
    }

    /// Queues what the checkpoint files hold, if they changed since they were last read: an
    /// update per readable file (a typed subscription drops the unchanged ones) and a delete
    /// per held key whose file is gone (the publisher deleted it before it went down).
    fn read_checkpoints(&mut self) {
        let dir = self.dirs.checkpoints(&self.agent, &self.topic, true);
        // Taken before reading, so a change made while reading shows at the next attempt.
        let signature = match checkpoint::dir_signature(&dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot list checkpoints");
                return;
            }
        };
        if self.files_read == Some(signature) {
            return;
        }
        let items = match checkpoint::read_dir(&dir, &self.topic) {
            Ok(items) => items,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read checkpoints");
                return;
            }
        };
        self.files_read = Some(signature);
        let listed: BTreeSet<&str> = items.iter().map(|i| i.key.as_str()).collect();
        let gone: Vec<String> = self
            .held
            .iter()
            .filter(|k| !listed.contains(k.as_str()))
            .cloned()
            .collect();
        for key in gone {
            self.held.remove(&key);
            self.queue.push_back(RawEvent::Delete { key });
        }
        for item in items {
            let value = match item.payload {
                Ok((schema, value)) if self.expect_schema.is_none_or(|v| v == schema) => Ok(value),
                // Written before an upgrade, not yet rewritten by the publisher.
                Ok((schema, value)) if self.expect_schema.is_some_and(|v| schema < v) => self
                    .upgrade
                    .and_then(|upgrade| upgrade(schema, &value))
                    .ok_or(schema),
                Ok((schema, _)) => Err(schema),
                Err(e) => {
                    tracing::warn!(key = %item.key, error = %e, "bad checkpoint skipped");
                    continue;
                }
            };
            match value {
                Ok(value) => {
                    self.held.insert(item.key.clone());
                    self.queue.push_back(RawEvent::Update {
                        key: item.key,
                        value,
                        from_checkpoint: true,
                    });
                }
                Err(schema) => {
                    tracing::warn!(key = %item.key, schema, "checkpoint of another schema version skipped")
                }
            }
        }
    }
}

fn jittered(d: Duration) -> Duration {
    // Up to +25%, from the clock's low bits: enough to keep restarted subscribers from
    // reconnecting in lock-step, without a random-number dependency.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

/// What a typed [`Subscription`] reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Event<T> {
    /// A key appeared.
    Create {
        /// Its key.
        key: String,
        /// Its value.
        value: T,
    },
    /// A key's value changed.
    Modify {
        /// Its key.
        key: String,
        /// The value before.
        old: T,
        /// The value now.
        new: T,
    },
    /// A key went away.
    Delete {
        /// Its key.
        key: String,
        /// Its last value.
        old: T,
    },
    /// The map equals the publisher's as of the moment of connecting.
    Synchronized,
    /// The publisher's restart barrier (see [`crate::Publication::signal_restarted`]).
    Restarted {
        /// The publisher's counter.
        counter: u64,
    },
    /// The publisher went away; the map is kept as last known until it is back.
    Disconnected,
}

/// A typed subscription to `<agent>/<T::NAME>`.
pub struct Subscription<T: Topic> {
    raw: RawSubscription,
    items: BTreeMap<String, T>,
    synchronized: bool,
    _topic: PhantomData<fn() -> T>,
}

impl<T: Topic> Subscription<T> {
    /// Subscribes to the topic `T` published by `agent`; connects on the first `next`.
    pub fn connect(dirs: &Dirs, agent: &str) -> Self {
        Subscription {
            raw: RawSubscription::new(dirs, agent, T::NAME, Some(T::SCHEMA_VERSION), T::PERSISTENT)
                .reading_earlier_versions(checkpoint::upgrade_of::<T>()),
            items: BTreeMap::new(),
            synchronized: false,
            _topic: PhantomData,
        }
    }

    /// Replaces the reconnect tuning.
    pub fn with_options(mut self, options: SubscribeOptions) -> Self {
        self.raw = self.raw.with_options(options);
        self
    }

    /// The next change. Cancel-safe.
    pub async fn next(&mut self) -> Event<T> {
        loop {
            let event = match self.raw.next().await {
                RawEvent::Connected { generation, .. } => {
                    tracing::debug!(topic = T::NAME, generation, "connected to publisher");
                    continue;
                }
                RawEvent::Update { key, value, .. } => self.apply_update(key, &value),
                RawEvent::Delete { key } => self
                    .items
                    .remove(&key)
                    .map(|old| Event::Delete { key, old }),
                RawEvent::Synchronized => {
                    self.synchronized = true;
                    Some(Event::Synchronized)
                }
                RawEvent::Restarted { counter } => Some(Event::Restarted { counter }),
                RawEvent::Disconnected { reason } => {
                    tracing::debug!(topic = T::NAME, %reason, "publisher connection ended");
                    self.synchronized = false;
                    Some(Event::Disconnected)
                }
            };
            if let Some(event) = event {
                return event;
            }
        }
    }

    fn apply_update(&mut self, key: String, value: &[u8]) -> Option<Event<T>> {
        // After a reconnect the snapshot re-sends unchanged values; postcard encodes a value
        // one way only, so comparing encodings is exact.
        if let Some(old) = self.items.get(&key) {
            if postcard::to_stdvec(old).is_ok_and(|encoded| encoded == value) {
                return None;
            }
        }
        let new: T = match postcard::from_bytes(value) {
            Ok(v) => v,
            Err(e) => {
                // Never keep acting on a value the publisher has replaced with one we cannot
                // read: the key goes away until a readable value comes.
                tracing::error!(topic = T::NAME, key = %key, error = %e, "item does not decode; dropping the key");
                return self
                    .items
                    .remove(&key)
                    .map(|old| Event::Delete { key, old });
            }
        };
        match self.items.insert(key.clone(), new.clone()) {
            Some(old) => Some(Event::Modify { key, old, new }),
            None => Some(Event::Create { key, value: new }),
        }
    }

    /// The item with `key`, as last received.
    pub fn get(&self, key: &str) -> Option<&T> {
        self.items.get(key)
    }

    /// Every item, in key order.
    pub fn items(&self) -> impl Iterator<Item = (&str, &T)> {
        self.items.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many items are held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no items are held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether the map is synchronized with a live publisher now.
    pub fn is_synchronized(&self) -> bool {
        self.synchronized && self.raw.is_connected()
    }
}
