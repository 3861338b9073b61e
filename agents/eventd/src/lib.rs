//! eventd: every agent's events journalled on the node, then delivered to the controller
//! (DESIGN §2, eventd row; §5 `POST /events`; §7; docs/events.md).
//!
//! # States of one event
//!
//! ```text
//!  raised (agent's Event topic, persist) ─► journalled (segment, fdatasync) ─► acknowledged
//!  (eventd/EventAck: the agent forgets it) ─► delivered (controller accepted the batch;
//!  the cursor moves past it) ─► deleted (with its segment)
//! ```
//!
//! The agent subscribes to `<agent>/Event` of every agent it is given (the multi-call
//! binary's dispatch table, so an agent that lands later is covered without touching eventd),
//! journals what arrives in batches with one sync per batch ([`journal`]), and only then
//! publishes `eventd/EventAck` for the agents whose events it holds. A delivery task posts the
//! journal's undelivered records, oldest first, in batches of [`BATCH`] over the node's mTLS
//! transport, with backoff while the controller is unreachable, and moves the cursor only
//! past what the controller accepted. The controller accepts a repeated id once, so a batch
//! sent again after a crash is harmless.
//!
//! The journal is bounded (`events.journal_max_mib`): past it, [`compact`] drops what the
//! policy says, counts it in `EventdStatus` and raises `events.dropped`. Crash points, besides
//! the journal's own ([`journal`]): `eventd.delivered` (the controller accepted a batch, the
//! cursor has not moved).
//!
//! # SIGTERM
//!
//! The subscriptions stop; the writer journals (and acknowledges) what they had already handed
//! over; then the delivery task makes one last delivery of everything journalled and not yet
//! delivered, batch after batch, ending at the first failure or after [`FLUSH_TIMEOUT`],
//! whichever comes first, and publishes `EventdStatus` a last time. What it could not deliver
//! stays journalled for the next start: nothing is lost, only later. A node stopped in order
//! stops eventd last, so the events the other agents raised while stopping are in that flush.

pub mod compact;
pub mod incoming;
pub mod journal;
pub mod record;
pub mod segment;
pub mod view;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentbase::health::now_ms;
use agentbase::Context;
use anyhow::Context as _;
use powernode_pubsub::{Publication, Subscription};
use powernode_transport::pki::PkiPaths;
use powernode_transport::{Backoff, ControllerClient, TransportError};
use powernode_types::node_api::{EventRecord, EventsRequest, EventsResponse};
use powernode_types::{
    EnrollmentState, EnrollmentStatus, EventAck, EventdStatus, Severity, GLOBAL_KEY,
};
use tokio::sync::{mpsc, Mutex, Notify};

use crate::compact::{Compactor, Outcome};
use crate::incoming::{forward, Incoming, Received};
use crate::journal::Journal;
use crate::record::{EventsRequestRef, RecordRef};

/// Events posted to the controller in one call at most.
pub const BATCH: usize = 500;
/// Events journalled with one sync at most, and events waiting for the writer at most: a
/// burst larger than this is several group commits, so memory stays bounded (about 1 KiB an
/// event, held three times: queued, batched, encoded) while a sync is still shared by
/// hundreds.
pub const GROUP_MAX: usize = 256;
/// Events journalled before their agents are acknowledged at once; fewer wait up to
/// [`ACK_DELAY`] for more to share the acknowledgement. Each acknowledgement costs eventd a
/// checkpoint and the agent a directory sync: in a burst on one CPU, a group commit holds a
/// few dozen events, and acknowledging each one was a fifth of the pipeline's work.
pub const ACK_EVERY: usize = 128;
/// The longest a journalled event waits for its acknowledgement (it is delivered meanwhile
/// all the same: the agent only keeps its copy a little longer).
pub const ACK_DELAY: Duration = Duration::from_millis(2);
/// The node API call.
pub const EVENTS_CALL: &str = "events";
/// Per agent, the most journalled-but-unacknowledged ids remembered at start (twice the
/// agents' pending cap).
pub const UNACKED_MAX: usize = 2 * agentbase::events::PENDING_CAP;
/// The agent whose `EnrollmentStatus` says where the controller is.
pub const ENROLLMENT_AGENT: &str = "enrollmgr";
/// The longest the last delivery at SIGTERM takes: a few seconds, well inside agentbase's
/// drain (`agentbase::DRAIN_TIMEOUT`) and the units' stop timeout.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// What compaction has dropped since start, for `EventdStatus`.
#[derive(Debug, Default, Clone, Copy)]
struct Dropped {
    info: u64,
    warning: u64,
    error: u64,
}

/// The agent's entry point: `agents` are the agents whose events it journals.
pub async fn run(ctx: Context, agents: Vec<&'static str>) -> anyhow::Result<()> {
    let dir = ctx.root.persist_dir().join("eventd/journal");
    let opening = dir.clone();
    let max = ctx.settings.events.journal_max_mib.bytes();
    let (mut journal, repairs) = tokio::task::spawn_blocking(move || Journal::open(&opening))
        .await
        .context("opening the journal")?
        .with_context(|| format!("opening the journal in {}", dir.display()))?;
    // A small bound wants small segments, so delivered ones can be deleted on their own.
    journal.set_segment_max(max / 8);
    for repair in &repairs {
        ctx.events.report(
            Severity::Warning,
            "events.journal_repaired",
            &repair.to_string(),
            &[],
        );
    }
    let acks = ctx
        .open_publication::<EventAck>()
        .context("opening EventAck")?;
    let status_pub = ctx
        .open_publication::<EventdStatus>()
        .context("opening EventdStatus")?;
    let journal = Arc::new(Mutex::new(journal));
    let appended = Arc::new(Notify::new());
    let dropped = Arc::new(std::sync::Mutex::new(Dropped::default()));

    let (tx, rx) = mpsc::channel::<Incoming>(GROUP_MAX);
    for agent in agents {
        ctx.tasks.spawn(forward(ctx.clone(), agent, tx.clone()));
    }
    drop(tx);
    // Set (or dropped) once the writer has journalled everything it was handed: the last
    // delivery at shutdown waits for it.
    let (journalled_tx, journalled_rx) = tokio::sync::watch::channel(false);
    ctx.tasks.spawn(deliver(
        ctx.clone(),
        journal.clone(),
        appended.clone(),
        status_pub,
        Stats {
            max,
            dropped: dropped.clone(),
        },
        journalled_rx,
    ));

    let mut writer = Writer {
        ctx: ctx.clone(),
        journal,
        acks,
        acked: BTreeMap::new(),
        held: BTreeMap::new(),
        synchronized: BTreeMap::new(),
        unwritten: Vec::new(),
        appended,
        compactor: Compactor::new(max),
        carried: BTreeMap::new(),
        unacked: BTreeMap::new(),
        dropped,
        since_ack: 0,
    };
    writer.find_unacknowledged().await;
    // The bound may have been lowered since the journal was written.
    writer.compact().await;
    ctx.ready();
    // On a worker thread, beside the subscriptions that feed it: handing an event over is
    // then a wake-up on the same thread, not one across threads (the agent's main future
    // runs on a thread of its own).
    tokio::spawn(writer.run(rx, journalled_tx))
        .await
        .context("the journal writer")
}

/// The journal writer's state.
struct Writer {
    ctx: Context,
    journal: Arc<Mutex<Journal>>,
    acks: Publication<EventAck>,
    /// Per agent: the highest sequence number acknowledged (from the EventAck checkpoint).
    acked: BTreeMap<String, u64>,
    /// Per agent: the highest sequence number journalled.
    held: BTreeMap<String, u64>,
    /// Agents whose snapshot has been handed over since their subscription (re)connected.
    synchronized: BTreeMap<String, bool>,
    /// Records a failed append left, written first next time.
    unwritten: Vec<Received>,
    appended: Arc<Notify>,
    compactor: Compactor,
    /// Per agent: events compaction dropped that no event in the journal counts yet; the
    /// agent's next journalled event carries them in `dropped_before`.
    carried: BTreeMap<String, u64>,
    /// Per agent: the events journalled (or on their way into the journal) and not yet
    /// acknowledged, number → id. The agent offers them again — after a crash of eventd
    /// between the sync and the acknowledgement, or in the snapshot of a reconnect — and they
    /// are acknowledged then, not journalled twice.
    unacked: BTreeMap<String, BTreeMap<u64, String>>,
    dropped: Arc<std::sync::Mutex<Dropped>>,
    /// Events journalled since the last acknowledgement.
    since_ack: usize,
}

impl Writer {
    /// Journals what the subscriptions hand over, a group commit at a time, until shutdown;
    /// then what they had handed over already, and says so on `journalled`.
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Incoming>,
        journalled: tokio::sync::watch::Sender<bool>,
    ) {
        let ctx = self.ctx.clone();
        let mut tick = tokio::time::interval(ctx.beat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ack_at: Option<tokio::time::Instant> = None;
        loop {
            let first = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = tick.tick() => {
                    ctx.beat();
                    if !self.unwritten.is_empty() {
                        self.take(Vec::new()).await;
                    }
                    self.acknowledge();
                    ack_at = None;
                    continue;
                }
                _ = tokio::time::sleep_until(ack_at.unwrap_or_else(tokio::time::Instant::now)),
                    if ack_at.is_some() => {
                    self.acknowledge();
                    ack_at = None;
                    continue;
                }
                incoming = rx.recv() => match incoming {
                    Some(i) => i,
                    None => break,
                },
            };
            // Group commit: everything already waiting goes into the same sync.
            let mut batch = vec![first];
            while batch.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(i) => batch.push(i),
                    Err(_) => break,
                }
            }
            self.take(batch).await;
            if self.since_ack >= ACK_EVERY {
                self.acknowledge();
                ack_at = None;
            } else if ack_at.is_none() {
                ack_at = Some(tokio::time::Instant::now() + ACK_DELAY);
            }
            ctx.beat();
        }
        self.journal_the_rest(&mut rx).await;
        self.acknowledge();
        let _ = journalled.send(true);
    }

    /// Shutdown: journals (and acknowledges) what the subscriptions had already handed over,
    /// so that the last delivery carries it. The subscriptions stop at shutdown, so this ends.
    async fn journal_the_rest(&mut self, rx: &mut mpsc::Receiver<Incoming>) {
        loop {
            let mut batch = Vec::new();
            while batch.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(i) => batch.push(i),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            self.take(batch).await;
        }
    }

    /// Journals a batch (one sync); [`Writer::acknowledge`] tells the agents.
    async fn take(&mut self, batch: Vec<Incoming>) {
        let mut records = std::mem::take(&mut self.unwritten);
        for incoming in batch {
            match incoming {
                Incoming::Event(event) => {
                    if let Some(record) = self.admit(event) {
                        records.push(record);
                    }
                }
                Incoming::Synchronized(agent) => {
                    self.synchronized.insert(agent.to_owned(), true);
                }
                Incoming::Unsynchronized(agent) => {
                    self.synchronized.insert(agent.to_owned(), false);
                }
            }
        }
        if !records.is_empty() {
            let journal = self.journal.clone();
            // The records travel to the blocking writer and back: no copy of a batch's bytes.
            let appended = tokio::task::spawn_blocking(move || {
                let payloads: Vec<&[u8]> = records.iter().map(|r| r.bytes.as_slice()).collect();
                let written = journal.blocking_lock().append(&payloads);
                (records, written)
            })
            .await;
            let (records, written) = match appended {
                Ok(done) => done,
                Err(e) => {
                    // A bug in the writer; the agents still hold the events, unacknowledged.
                    tracing::error!(error = %e, "the journal writer failed");
                    self.ctx
                        .health
                        .report("journal", &format!("journal writer failed: {e}"));
                    return;
                }
            };
            if let Err(e) = written {
                // Not journalled, so not acknowledged: the agents keep them, and they are
                // written first at the next batch or beat.
                tracing::error!(error = %e, events = records.len(), "journal append failed");
                self.ctx
                    .health
                    .report("journal", &format!("journal append failed: {e}"));
                self.unwritten = records;
                return;
            }
            self.ctx.health.clear("journal");
            for r in &records {
                self.hold(r.agent, r.seq);
            }
            self.since_ack += records.len();
            self.appended.notify_one();
        }
        self.compact().await;
    }

    /// Acknowledges, for every agent whose snapshot is complete, what is journalled of it.
    fn acknowledge(&mut self) {
        if !self.unwritten.is_empty() {
            // A failed append left records to write: an event offered again meanwhile is
            // counted as held (`admit`) though its first copy is among them.
            return;
        }
        self.since_ack = 0;
        let ready: Vec<(String, u64)> = self
            .held
            .iter()
            .filter(|(agent, _)| self.synchronized.get(*agent).copied().unwrap_or(false))
            .map(|(a, s)| (a.clone(), *s))
            .collect();
        for (agent, through_seq) in ready {
            if through_seq > self.acked_through(&agent) {
                if let Err(e) = self.acks.publish(&EventAck {
                    agent: agent.clone(),
                    through_seq,
                }) {
                    tracing::error!(%agent, error = %e, "acknowledgement not published");
                    continue;
                }
                if let Some(unacked) = self.unacked.get_mut(&agent) {
                    *unacked = unacked.split_off(&(through_seq + 1));
                }
                self.acked.insert(agent, through_seq);
            }
        }
    }

    /// Compacts the journal if it is over its bound, and reports what that dropped.
    async fn compact(&mut self) {
        // Most batches leave the journal under its bound: that is seen here, without a trip
        // to a blocking thread (the delivery task holding the journal means: look anyway).
        if let Ok(journal) = self.journal.try_lock() {
            if !self.compactor.due(journal.bytes()) {
                return;
            }
        }
        let journal = self.journal.clone();
        let mut compactor = self.compactor.clone();
        let ran = tokio::task::spawn_blocking(move || {
            let outcome = compactor.run(&mut journal.blocking_lock());
            (compactor, outcome)
        })
        .await;
        let outcome = match ran {
            Ok((compactor, outcome)) => {
                self.compactor = compactor;
                outcome
            }
            Err(e) => Err(std::io::Error::other(e)),
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(outcome)) => {
                self.ctx.health.clear("compaction");
                self.dropped_by(outcome);
                self.appended.notify_one();
            }
            Err(e) => {
                // The journal is as it was; the next batch tries again.
                tracing::error!(error = %e, "journal compaction failed");
                self.ctx
                    .health
                    .report("compaction", &format!("journal compaction failed: {e}"));
            }
        }
    }

    /// Counts and reports what a compaction dropped.
    fn dropped_by(&mut self, outcome: Outcome) {
        tracing::info!(
            info = outcome.info,
            warning = outcome.warning,
            error = outcome.error,
            bytes_before = outcome.bytes_before,
            bytes_after = outcome.bytes_after,
            "journal compacted"
        );
        if outcome.over_target {
            tracing::warn!(
                bytes = outcome.bytes_after,
                max = self.compactor.max(),
                "the journal stays near its bound: what is left is Critical (never dropped)"
            );
        }
        for (agent, n) in &outcome.carried {
            *self.carried.entry(agent.clone()).or_default() += n;
        }
        {
            let mut d = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
            d.info += outcome.info;
            d.warning += outcome.warning;
            d.error += outcome.error + outcome.undecodable;
        }
        if outcome.dropped() == 0 {
            return;
        }
        let (info, warning, error) = (
            outcome.info.to_string(),
            outcome.warning.to_string(),
            (outcome.error + outcome.undecodable).to_string(),
        );
        let (before, after, max) = (
            outcome.bytes_before.to_string(),
            outcome.bytes_after.to_string(),
            self.compactor.max().to_string(),
        );
        self.ctx.events.report(
            Severity::Warning,
            "events.dropped",
            &format!(
                "journal over its bound of {max} bytes: {} events dropped \
                 (oldest Info/Warning first, then Error; Critical never)",
                outcome.dropped()
            ),
            &[
                ("info", &info),
                ("warning", &warning),
                ("error", &error),
                ("bytes_before", &before),
                ("bytes_after", &after),
                ("max_bytes", &max),
            ],
        );
    }

    /// Finds the events journalled but not acknowledged (a crash between the sync and the
    /// acknowledgement, or before an agent's snapshot was complete): per agent, those with a
    /// number past its acknowledgement, at most the newest [`UNACKED_MAX`] — an agent holds no
    /// more than its pending cap, and only what it holds can be offered again.
    async fn find_unacknowledged(&mut self) {
        let journal = self.journal.clone();
        let found = tokio::task::spawn_blocking(move || {
            let j = journal.blocking_lock();
            let mut found: BTreeMap<String, BTreeMap<u64, String>> = BTreeMap::new();
            j.visit(0, |_, payload| {
                if let Ok(r) = postcard::from_bytes::<EventRecord>(payload) {
                    let newest = found.entry(r.agent).or_default();
                    newest.insert(r.seq, r.id);
                    if newest.len() > UNACKED_MAX {
                        newest.pop_first();
                    }
                }
                true
            })
            .map(|()| found)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match found {
            Ok(found) => {
                for (agent, newest) in found {
                    let acked = self.acked_through(&agent);
                    let unacked = newest.into_iter().filter(|(seq, _)| *seq > acked).collect();
                    self.unacked.insert(agent, unacked);
                }
            }
            Err(e) => tracing::warn!(error = %e, "journal not read for unacknowledged events"),
        }
    }

    /// What of an event goes into the journal: nothing when it is journalled already (the
    /// agent has not forgotten it yet, or offers it again), else its record — its own bytes,
    /// with the count of what compaction dropped before it added when there is one.
    fn admit(&mut self, event: Received) -> Option<Received> {
        if event.seq <= self.acked_through(event.agent) {
            return None;
        }
        let known = self
            .unacked
            .get(event.agent)
            .and_then(|u| u.get(&event.seq));
        if known == Some(&event.id) {
            // It may not be in the journal yet (still in this batch, or unwritten), but it
            // will be before any acknowledgement covers it.
            self.hold(event.agent, event.seq);
            return None;
        }
        let mut event = event;
        if let Some(n) = self.carried.remove(event.agent) {
            match with_dropped_before(&event.bytes, n) {
                Ok(bytes) => event.bytes = bytes,
                Err(e) => tracing::error!(id = %event.id, error = %e, "drop count not added"),
            }
        }
        match self.unacked.get_mut(event.agent) {
            Some(unacked) => {
                unacked.insert(event.seq, event.id.clone());
            }
            None => {
                let unacked = BTreeMap::from([(event.seq, event.id.clone())]);
                self.unacked.insert(event.agent.to_owned(), unacked);
            }
        }
        Some(event)
    }

    /// Records that `agent`'s events through `seq` are journalled.
    fn hold(&mut self, agent: &str, seq: u64) {
        match self.held.get_mut(agent) {
            Some(held) => *held = (*held).max(seq),
            None => {
                self.held.insert(agent.to_owned(), seq);
            }
        }
    }

    fn acked_through(&mut self, agent: &str) -> u64 {
        if let Some(seq) = self.acked.get(agent) {
            return *seq;
        }
        let seq = self.acks.get(agent).map_or(0, |a| a.through_seq);
        self.acked.insert(agent.to_owned(), seq);
        seq
    }
}

/// The record `bytes` (an event, encoded as its record) with `n` more events counted as
/// dropped before it.
fn with_dropped_before(bytes: &[u8], n: u64) -> postcard::Result<Vec<u8>> {
    let mut record: EventRecord = postcard::from_bytes(bytes)?;
    record.dropped_before += n;
    postcard::to_stdvec(&record)
}

/// What `EventdStatus` says besides the journal's own numbers.
struct Stats {
    max: u64,
    dropped: Arc<std::sync::Mutex<Dropped>>,
}

/// Posts undelivered records to the controller, oldest first, for as long as the agent runs;
/// at shutdown, once the writer has journalled what it was handed (`journalled`), the last
/// delivery ([`flush`]).
async fn deliver(
    ctx: Context,
    journal: Arc<Mutex<Journal>>,
    appended: Arc<Notify>,
    status_pub: Publication<EventdStatus>,
    stats: Stats,
    journalled: tokio::sync::watch::Receiver<bool>,
) {
    let mut enrollment = Subscription::<EnrollmentStatus>::connect(&ctx.dirs, ENROLLMENT_AGENT);
    let mut backoff = Backoff::new(
        Duration::from_secs(1),
        ctx.settings.controller.max_backoff(),
    );
    let mut status = EventdStatus {
        journal_len: 0,
        journal_bytes: 0,
        journal_max_bytes: stats.max,
        pending: 0,
        delivered_total: 0,
        last_delivery_ms: None,
        last_error: None,
        dropped_info: 0,
        dropped_warning: 0,
        dropped_error: 0,
    };
    let mut client: Option<(Vec<String>, String, ControllerClient)> = None;
    loop {
        publish_status(&journal, &stats, &status_pub, &mut status).await;
        let wait = if status.pending == 0 {
            None
        } else {
            // A call in flight is given up at shutdown: the flush sends the batch again (the
            // controller accepts a repeated id once).
            let sent = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                sent = send_batch(&ctx, &journal, &enrollment, &mut client) => sent,
            };
            match sent {
                Ok(accepted) => {
                    backoff.reset();
                    status.delivered_total += accepted;
                    status.last_delivery_ms = Some(now_ms());
                    if status.last_error.take().is_some() {
                        ctx.health.clear("delivery");
                    }
                    continue;
                }
                Err(error) => {
                    if status.last_error.as_deref() != Some(error.as_str()) {
                        tracing::warn!(%error, "event delivery failed; retrying");
                    }
                    ctx.health
                        .report("delivery", &format!("event delivery: {error}"));
                    status.last_error = Some(error);
                    Some(backoff.next_delay())
                }
            }
        };
        let sleep = async {
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = appended.notified(), if wait.is_none() => {}
            _ = sleep => {}
            _ = enrollment.next() => {}
        }
    }
    let mut last = Delivery {
        ctx: &ctx,
        journal: &journal,
        enrollment: &enrollment,
        client: &mut client,
        status: &mut status,
    };
    flush(&mut last, journalled).await;
    publish_status(&journal, &stats, &status_pub, &mut status).await;
}

/// Publishes `EventdStatus` with the journal's and compaction's numbers as they are now.
async fn publish_status(
    journal: &Arc<Mutex<Journal>>,
    stats: &Stats,
    status_pub: &Publication<EventdStatus>,
    status: &mut EventdStatus,
) {
    {
        let j = journal.lock().await;
        status.pending = j.pending();
        status.journal_len = j.len();
        status.journal_bytes = j.bytes();
    }
    {
        let d = *stats.dropped.lock().unwrap_or_else(|e| e.into_inner());
        status.dropped_info = d.info;
        status.dropped_warning = d.warning;
        status.dropped_error = d.error;
    }
    if let Err(e) = status_pub.publish(status) {
        tracing::warn!(error = %e, "EventdStatus not published");
    }
}

/// What the last delivery works with.
struct Delivery<'a> {
    ctx: &'a Context,
    journal: &'a Arc<Mutex<Journal>>,
    enrollment: &'a Subscription<EnrollmentStatus>,
    client: &'a mut Option<(Vec<String>, String, ControllerClient)>,
    status: &'a mut EventdStatus,
}

/// Shutdown: once the writer has journalled what it was handed, one last delivery of what is
/// undelivered — batch after batch until nothing is pending, a batch fails, or
/// [`FLUSH_TIMEOUT`] has passed. What is left stays journalled for the next start.
async fn flush(last: &mut Delivery<'_>, mut journalled: tokio::sync::watch::Receiver<bool>) {
    let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
    let delivering = async {
        // An error means the writer is gone without saying so (it failed): go on with what
        // is journalled.
        let _ = journalled.wait_for(|done| *done).await;
        let mut delivered = 0u64;
        loop {
            let before = last.journal.lock().await.pending();
            if before == 0 {
                return Ok(delivered);
            }
            let accepted = send_batch(last.ctx, last.journal, last.enrollment, last.client).await?;
            last.status.delivered_total += accepted;
            last.status.last_delivery_ms = Some(now_ms());
            last.status.last_error = None;
            delivered += accepted;
            // The cursor did not move (a compaction renumbered the records meanwhile): the
            // next start sends them.
            if last.journal.lock().await.pending() >= before {
                return Ok(delivered);
            }
        }
    };
    match tokio::time::timeout_at(deadline, delivering).await {
        Ok(Ok(delivered)) => {
            tracing::info!(delivered, "stopping; delivered what was journalled")
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "stopping; the last delivery failed, the rest stays journalled");
            last.status.last_error = Some(error);
        }
        Err(_) => tracing::warn!(
            timeout_s = FLUSH_TIMEOUT.as_secs(),
            "stopping; the last delivery ran out of time, the rest stays journalled"
        ),
    }
}

/// One batch: read, post, move the cursor past what the controller accepted. The number of
/// new events the controller stored, or why nothing was delivered.
///
/// A batch the controller refuses for its content (400, 413, 422: a bug or a version skew,
/// never cured by sending the same bytes again) would stop delivery for good, so its events
/// are then sent one by one: each the controller refuses alone is passed over, counted and
/// raised as `events.refused`, and the others are delivered.
async fn send_batch(
    ctx: &Context,
    journal: &Arc<Mutex<Journal>>,
    enrollment: &Subscription<EnrollmentStatus>,
    client: &mut Option<(Vec<String>, String, ControllerClient)>,
) -> Result<u64, String> {
    let (generation, records) = {
        let j = journal.lock().await;
        let records = j
            .undelivered(BATCH)
            .map_err(|e| format!("reading the journal: {e}"))?;
        (j.generation(), records)
    };
    let Some((last, _)) = records.last() else {
        return Ok(0);
    };
    let through = last + 1;
    // An event journalled twice (eventd killed between the sync and the acknowledgement) may
    // sit twice in one batch, which the controller refuses whole: send it once. The request
    // borrows the records' strings, so a batch is held once as records and once as JSON,
    // never more (eventd's memory bound, docs/performance.md).
    let mut seen = std::collections::HashSet::new();
    let batch = EventsRequestRef {
        events: records
            .iter()
            .filter_map(|(_, bytes)| postcard::from_bytes::<RecordRef<'_>>(bytes).ok())
            .filter(|e| seen.insert(e.id))
            .collect(),
    };
    drop(seen);
    let client = controller(ctx, enrollment, client)?;
    let accepted = match client.post::<_, EventsResponse>(EVENTS_CALL, &batch).await {
        Ok(reply) => reply.accepted,
        Err(e) if is_refusal(&e) => {
            let events: Vec<EventRecord> = batch.events.iter().map(RecordRef::to_record).collect();
            if events.len() > 1 {
                tracing::warn!(error = %e, events = events.len(), "batch refused; sending its events one by one");
                one_by_one(ctx, client, &events).await?
            } else {
                if let Some(event) = events.first() {
                    report_refused(ctx, event, &e);
                }
                0
            }
        }
        Err(e) => return Err(e.to_string()),
    };
    failpoint::hit("eventd.delivered");
    let mut j = journal.lock().await;
    // A compaction meanwhile renumbered the records: the cursor stays, and the batch is
    // sent again (the controller accepts a repeated id once).
    if j.generation() == generation {
        j.delivered_through(through)
            .map_err(|e| format!("recording the delivery: {e}"))?;
    }
    Ok(accepted)
}

/// The controller refused the content of the call: sending the same again cannot succeed.
fn is_refusal(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Status {
            status: 400 | 413 | 422,
            ..
        }
    )
}

/// Sends `events` singly after their batch was refused: the number the controller stored.
/// Any failure other than a refusal of one event ends it, and the batch is tried again later.
async fn one_by_one(
    ctx: &Context,
    client: &ControllerClient,
    events: &[EventRecord],
) -> Result<u64, String> {
    let mut accepted = 0;
    for event in events {
        let one = EventsRequest {
            events: vec![event.clone()],
        };
        match client.post::<_, EventsResponse>(EVENTS_CALL, &one).await {
            Ok(reply) => accepted += reply.accepted,
            Err(e) if is_refusal(&e) => report_refused(ctx, event, &e),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(accepted)
}

/// An event the controller will not take: passed over, logged and raised.
fn report_refused(ctx: &Context, event: &EventRecord, e: &TransportError) {
    tracing::error!(id = %event.id, agent = %event.agent, kind = %event.kind, error = %e, "the controller refused an event; passing over it");
    ctx.events.report(
        Severity::Error,
        "events.refused",
        &format!(
            "the controller refused event {} of {}: {e}",
            event.id, event.agent
        ),
        &[
            ("id", &event.id),
            ("agent", &event.agent),
            ("kind", &event.kind),
            ("error", &e.to_string()),
        ],
    );
}

/// The client for the controller the enrollment names (or `[controller] url`), built (again)
/// when the URLs or the certificate change; across calls it stays with the URL that answers.
fn controller<'a>(
    ctx: &Context,
    enrollment: &Subscription<EnrollmentStatus>,
    client: &'a mut Option<(Vec<String>, String, ControllerClient)>,
) -> Result<&'a ControllerClient, String> {
    let status = enrollment
        .get(GLOBAL_KEY)
        .ok_or("not enrolled yet (no EnrollmentStatus)")?;
    // Revoked too: the controller still takes a revoked node's events (enroll.revoked among
    // them) while its certificate is valid.
    if !matches!(
        status.state,
        EnrollmentState::Enrolled
            | EnrollmentState::Rotating
            | EnrollmentState::RotationFailing
            | EnrollmentState::Revoked
    ) {
        return Err(format!(
            "not enrolled (enrollment state {:?})",
            status.state
        ));
    }
    let urls = [
        ctx.settings.controller.urls.as_slice(),
        status.controller_urls.as_slice(),
    ]
    .into_iter()
    .find(|urls| !urls.is_empty())
    .ok_or("no controller URL")?;
    let fingerprint = status.cert_fingerprint.clone().unwrap_or_default();
    let stale = client
        .as_ref()
        .is_none_or(|(u, f, _)| u != urls || *f != fingerprint);
    if stale {
        let identity = PkiPaths::under(ctx.root.persist_dir())
            .load()
            .map_err(|e| e.to_string())?;
        let c = ControllerClient::new(urls, &identity, ctx.settings.controller.request_timeout())
            .map_err(|e| e.to_string())?;
        *client = Some((urls.to_vec(), fingerprint, c));
    }
    client
        .as_ref()
        .map(|(_, _, c)| c)
        .ok_or_else(|| "no controller client".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbase::{Root, Settings};
    use powernode_types::Event;

    fn writer(dir: &std::path::Path) -> Writer {
        let ctx = Context::new("eventd", Root::new(dir), Settings::default()).unwrap();
        let (journal, _) = Journal::open(&dir.join("journal")).unwrap();
        Writer {
            acks: ctx.open_publication::<EventAck>().unwrap(),
            ctx,
            journal: Arc::new(Mutex::new(journal)),
            acked: BTreeMap::new(),
            held: BTreeMap::new(),
            synchronized: BTreeMap::new(),
            unwritten: Vec::new(),
            appended: Arc::new(Notify::new()),
            compactor: Compactor::new(64 << 20),
            carried: BTreeMap::new(),
            unacked: BTreeMap::new(),
            dropped: Arc::default(),
            since_ack: 0,
        }
    }

    fn event(seq: u64, id: &str) -> Incoming {
        let event = Event {
            id: id.into(),
            agent: "verifier".into(),
            seq,
            severity: Severity::Info,
            kind: "test.offered".into(),
            message: format!("{seq}"),
            at_ms: 1,
            fields: vec![],
            dropped_before: 0,
        };
        let bytes = postcard::to_stdvec(&event).unwrap();
        Incoming::Event(Received::read("verifier", bytes).unwrap())
    }

    async fn journalled(w: &Writer) -> Vec<String> {
        let j = w.journal.lock().await;
        let mut ids = Vec::new();
        j.visit(0, |_, payload| {
            ids.push(postcard::from_bytes::<EventRecord>(payload).unwrap().id);
            true
        })
        .unwrap();
        ids
    }

    /// An event offered again — in the same batch, in a later one before its acknowledgement
    /// (a reconnect's snapshot), or after it — is journalled once; one with a reused number
    /// and a new id is another event.
    #[tokio::test]
    async fn an_event_offered_again_is_journalled_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        w.take(vec![event(1, "a"), event(2, "b"), event(1, "a")])
            .await;
        w.take(vec![event(2, "b"), event(3, "c")]).await;
        assert_eq!(journalled(&w).await, ["a", "b", "c"]);

        // Not acknowledged before the agent's snapshot is complete.
        w.acknowledge();
        assert!(w.acks.get("verifier").is_none());
        w.take(vec![Incoming::Synchronized("verifier")]).await;
        w.acknowledge();
        assert_eq!(w.acks.get("verifier").map(|a| a.through_seq), Some(3));

        w.take(vec![event(3, "c"), event(3, "c2"), event(4, "d")])
            .await;
        assert_eq!(
            journalled(&w).await,
            ["a", "b", "c", "d"],
            "c2 is at or below the acknowledged 3"
        );
        w.take(vec![event(5, "e"), event(5, "e2")]).await;
        assert_eq!(journalled(&w).await, ["a", "b", "c", "d", "e", "e2"]);
    }
}
