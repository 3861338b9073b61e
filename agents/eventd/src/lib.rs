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

pub mod journal;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentbase::health::now_ms;
use agentbase::Context;
use anyhow::Context as _;
use powernode_pubsub::{Event as PubEvent, Publication, Subscription};
use powernode_transport::pki::PkiPaths;
use powernode_transport::{Backoff, ControllerClient};
use powernode_types::node_api::{EventRecord, EventsRequest, EventsResponse};
use powernode_types::{
    EnrollmentState, EnrollmentStatus, Event, EventAck, EventdStatus, Severity, GLOBAL_KEY,
};
use tokio::sync::{mpsc, Mutex, Notify};

use crate::journal::Journal;

/// Events posted to the controller in one call at most.
pub const BATCH: usize = 500;
/// The node API call.
pub const EVENTS_CALL: &str = "events";
/// The agent whose `EnrollmentStatus` says where the controller is.
pub const ENROLLMENT_AGENT: &str = "enrollmgr";

/// What the subscriptions hand the journal writer.
enum Incoming {
    /// An event of an agent.
    Event(Event),
    /// An agent's snapshot is complete: everything it holds has been handed over.
    Synchronized(&'static str),
}

/// The agent's entry point: `agents` are the agents whose events it journals.
pub async fn run(ctx: Context, agents: Vec<&'static str>) -> anyhow::Result<()> {
    let dir = ctx.root.persist_dir().join("eventd/journal");
    let opening = dir.clone();
    let (journal, repairs) = tokio::task::spawn_blocking(move || Journal::open(&opening))
        .await
        .context("opening the journal")?
        .with_context(|| format!("opening the journal in {}", dir.display()))?;
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

    let (tx, mut rx) = mpsc::channel::<Incoming>(4096);
    for agent in agents {
        ctx.tasks.spawn(forward(ctx.clone(), agent, tx.clone()));
    }
    drop(tx);
    ctx.tasks.spawn(deliver(
        ctx.clone(),
        journal.clone(),
        appended.clone(),
        status_pub,
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
    };
    ctx.ready();
    let mut tick = tokio::time::interval(ctx.beat_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                ctx.beat();
                if !writer.unwritten.is_empty() {
                    writer.take(Vec::new()).await;
                }
                continue;
            }
            incoming = rx.recv() => match incoming {
                Some(i) => i,
                None => return Ok(()),
            },
        };
        // Group commit: everything already waiting goes into the same sync.
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
            }
        }
        writer.take(batch).await;
        ctx.beat();
    }
}

/// Hands every event of `agent` to the writer, and its snapshot's end.
async fn forward(ctx: Context, agent: &'static str, tx: mpsc::Sender<Incoming>) {
    let mut sub = Subscription::<Event>::connect(&ctx.dirs, agent);
    loop {
        let next = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            next = sub.next() => next,
        };
        let incoming = match next {
            PubEvent::Create { value, .. } | PubEvent::Modify { new: value, .. } => {
                Incoming::Event(value)
            }
            PubEvent::Synchronized => Incoming::Synchronized(agent),
            _ => continue,
        };
        if tx.send(incoming).await.is_err() {
            return;
        }
    }
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
    /// Records a failed append left: (agent, seq, bytes), written first next time.
    unwritten: Vec<(String, u64, Vec<u8>)>,
    appended: Arc<Notify>,
}

impl Writer {
    /// Journals a batch (one sync), then acknowledges what it may.
    async fn take(&mut self, batch: Vec<Incoming>) {
        let mut records = std::mem::take(&mut self.unwritten);
        for incoming in batch {
            match incoming {
                Incoming::Event(event) => {
                    if event.seq <= self.acked_through(&event.agent) {
                        continue; // journalled before, the agent has not forgotten it yet
                    }
                    match postcard::to_stdvec(&record_of(&event)) {
                        Ok(bytes) => records.push((event.agent.clone(), event.seq, bytes)),
                        Err(e) => {
                            tracing::error!(id = %event.id, error = %e, "event not encodable")
                        }
                    }
                }
                Incoming::Synchronized(agent) => {
                    self.synchronized.insert(agent.to_owned(), true);
                }
            }
        }
        if !records.is_empty() {
            let journal = self.journal.clone();
            let payloads: Vec<Vec<u8>> = records.iter().map(|(_, _, b)| b.clone()).collect();
            let written =
                tokio::task::spawn_blocking(move || journal.blocking_lock().append(&payloads))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r);
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
            for (agent, seq, _) in &records {
                let held = self.held.entry(agent.clone()).or_default();
                *held = (*held).max(*seq);
            }
            self.appended.notify_one();
        }
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
                self.acked.insert(agent, through_seq);
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

/// The wire form of a journalled event.
fn record_of(e: &Event) -> EventRecord {
    EventRecord {
        id: e.id.clone(),
        agent: e.agent.clone(),
        seq: e.seq,
        severity: e.severity,
        kind: e.kind.clone(),
        message: e.message.clone(),
        at_ms: e.at_ms,
        fields: e.fields.clone(),
        dropped_before: e.dropped_before,
    }
}

/// Posts undelivered records to the controller, oldest first, for as long as the agent runs.
async fn deliver(
    ctx: Context,
    journal: Arc<Mutex<Journal>>,
    appended: Arc<Notify>,
    status_pub: Publication<EventdStatus>,
) {
    let mut enrollment = Subscription::<EnrollmentStatus>::connect(&ctx.dirs, ENROLLMENT_AGENT);
    let mut backoff = Backoff::new(
        Duration::from_secs(1),
        ctx.settings.controller.max_backoff(),
    );
    let mut status = EventdStatus {
        journal_len: 0,
        pending: 0,
        delivered_total: 0,
        last_delivery_ms: None,
        last_error: None,
    };
    let mut client: Option<(String, String, ControllerClient)> = None;
    loop {
        {
            let j = journal.lock().await;
            status.pending = j.pending();
            status.journal_len = j.len();
        }
        if let Err(e) = status_pub.publish(&status) {
            tracing::warn!(error = %e, "EventdStatus not published");
        }
        let wait = if status.pending == 0 {
            None
        } else {
            match send_batch(&ctx, &journal, &enrollment, &mut client).await {
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
            _ = ctx.shutdown.cancelled() => return,
            _ = appended.notified(), if wait.is_none() => {}
            _ = sleep => {}
            _ = enrollment.next() => {}
        }
    }
}

/// One batch: read, post, move the cursor past what the controller accepted. The number of
/// new events the controller stored, or why nothing was delivered.
async fn send_batch(
    ctx: &Context,
    journal: &Arc<Mutex<Journal>>,
    enrollment: &Subscription<EnrollmentStatus>,
    client: &mut Option<(String, String, ControllerClient)>,
) -> Result<u64, String> {
    let records = {
        let j = journal.lock().await;
        j.undelivered(BATCH)
            .map_err(|e| format!("reading the journal: {e}"))?
    };
    let Some((last, _)) = records.last() else {
        return Ok(0);
    };
    let through = last + 1;
    let events: Vec<EventRecord> = records
        .iter()
        .filter_map(|(_, bytes)| postcard::from_bytes(bytes).ok())
        .collect();
    let client = controller(ctx, enrollment, client)?;
    let reply: EventsResponse = client
        .post(EVENTS_CALL, &EventsRequest { events })
        .await
        .map_err(|e| e.to_string())?;
    journal
        .lock()
        .await
        .delivered_through(through)
        .map_err(|e| format!("recording the delivery: {e}"))?;
    Ok(reply.accepted)
}

/// The client for the controller the enrollment names, built (again) when the URL or the
/// certificate changes.
fn controller<'a>(
    ctx: &Context,
    enrollment: &Subscription<EnrollmentStatus>,
    client: &'a mut Option<(String, String, ControllerClient)>,
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
    let url = ctx
        .settings
        .controller
        .url
        .clone()
        .or_else(|| status.controller_url.clone())
        .ok_or("no controller URL")?;
    let fingerprint = status.cert_fingerprint.clone().unwrap_or_default();
    let stale = client
        .as_ref()
        .is_none_or(|(u, f, _)| *u != url || *f != fingerprint);
    if stale {
        let identity = PkiPaths::under(ctx.root.persist_dir())
            .load()
            .map_err(|e| e.to_string())?;
        let c = ControllerClient::new(&url, &identity, ctx.settings.controller.request_timeout())
            .map_err(|e| e.to_string())?;
        *client = Some((url, fingerprint, c));
    }
    client
        .as_ref()
        .map(|(_, _, c)| c)
        .ok_or_else(|| "no controller client".to_owned())
}
