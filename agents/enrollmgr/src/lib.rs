//! enrollmgr: the node's mTLS identity (DESIGN §2, §5; docs/enrollment.md). Enrolls with the
//! controller using the bootstrap token from `identitymgr/NodeIdentity`, keeps the key,
//! certificate and pinned CA under `persist/powernode/pki/` ([`store`]), rotates the
//! certificate at 75% of its lifetime, and publishes `enrollmgr/EnrollmentStatus` (persistent,
//! key `global`).
//!
//! # States
//!
//! The agent is one [`State`] at a time; each publishes before it waits. The published
//! [`EnrollmentState`] of each is given in brackets.
//!
//! ```text
//!              start: repair + load pki/
//!      ┌───────────────┬──────┴────────────┬───────────────────┐
//!  none on disk     valid set         expired cert        unusable set
//!      ▼               ▼                   ▼                   ▼
//!  NotEnrolled ──► Enrolling ──ok──► Enrolled ──75%──► Rotating ──ok──► Enrolled
//!  [NotEnrolled]   [Enrolling]       [Enrolled]   ▲    [Rotating]
//!      ▲  missing      │ retryable: backoff,      │        │ failure: backoff
//!      │  token/URL/CA │ stays, keeps last_error  │        ▼
//!      │               │                          └── RotationFailing [RotationFailing,
//!      │               │ refused                          or CaMismatch]
//!      │               ▼                                   │ revoked / expired
//!      │            Refused [BadToken | Revoked |          ▼
//!      │             CaMismatch | Failed]        Refused [Revoked | CertExpired]
//!      └── NodeIdentity changes (new token, URL or CA) ────┘  → Enrolling
//! ```
//!
//! * A node with a valid certificate, key and CA on disk never enrolls again.
//! * Enrollment needs a resolved identity, a bootstrap token, controller URLs (`[controller]
//!   url`, else `NodeIdentity.controller_urls`) and a CA to pin (`NodeIdentity.ca_pem`):
//!   without a CA the agent refuses (NotEnrolled, with the reason) rather than trust on first
//!   use. Enroll and rotate go to the first of the URLs that can be reached (the transport's
//!   failover); the list is kept with the credentials and published as
//!   `EnrollmentStatus.controller_urls`.
//! * A refusal is final until `NodeIdentity` brings different enrollment inputs; an expired
//!   node does not retry the token it already used.
//! * Every loop beats (`ctx.beat()`) and shutdown ends it at once; a request in flight is
//!   dropped, which the crash-safe [`store`] makes harmless.
//!
//! # Events
//!
//! Raised once per transition, never per retry ([`events`]): `enroll.enrolled` and
//! `cert.rotated` when a call succeeds; a refusal (`enroll.bad_token`, `enroll.revoked`,
//! `enroll.ca_mismatch`, `cert.expired`, `enroll.failed`) when the agent enters Refused with
//! a state or reason other than the one it last published, so a restart into the same refusal
//! says nothing new. The exception is the seed agent's rule: `cert.rotation_failing`
//! (Critical) is raised at the first failed rotation and then once every heartbeat interval
//! while rotation keeps failing — the interval heartbeatd is using
//! (`heartbeatd/ControllerStatus`, which the controller sets), else `[controller]
//! heartbeat_interval_s`.

pub mod events;
pub mod store;
pub mod tasks;

use std::time::Duration;

use agentbase::health::now_ms;
use agentbase::Context;
use anyhow::Context as _;
use powernode_pubsub::{Event, Publication, Subscription};
use powernode_transport::pki::PkiPaths;
use powernode_transport::{Backoff, ControllerClient, TlsIdentity, TransportError};
use powernode_types::node_api::{
    EnrollRequest, EnrollResponse, Identity, RotateRequest, RotateResponse,
};
use powernode_types::{
    ControllerStatus, EnrollmentState, EnrollmentStatus, IdentityState, NodeIdentity, TaskStatus,
    GLOBAL_KEY,
};
use tokio::time::Instant;

use crate::store::{
    check_credentials, sha256_hex, CredentialError, Installed, Meta, NewCredentials, Store,
    StoreError, META_VERSION,
};

/// The first retry delay; doubles up to `[controller] max_backoff_s`.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest single sleep while waiting for a wall-clock deadline (rotation, expiry), so a
/// clock step or a suspend is noticed.
pub const MAX_SLEEP: Duration = Duration::from_secs(30);
/// The agent whose `NodeIdentity` is read.
pub const IDENTITY_AGENT: &str = "identitymgr";
/// The agent whose `ControllerStatus` says the heartbeat interval in use.
pub const HEARTBEAT_AGENT: &str = "heartbeatd";

/// What an enrollment needs, taken from `NodeIdentity` and the settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollInputs {
    /// The one-time token.
    pub token: String,
    /// The controller's URLs, in the order to try them (never empty).
    pub urls: Vec<String>,
    /// The CA to pin.
    pub ca_pem: String,
    /// Who the node says it is.
    pub uuid: String,
    /// Host name.
    pub hostname: String,
    /// Architecture.
    pub arch: String,
    /// Kernel boot id.
    pub boot_id: String,
}

/// The agent's state (see the crate documentation for the diagram).
#[derive(Clone, Debug)]
pub enum State {
    /// Reading (and repairing) `pki/`.
    Loading,
    /// Not enrolled and cannot try yet: the reason (no identity, token, URL or CA).
    NotEnrolled {
        /// Why enrollment cannot start.
        why: String,
    },
    /// Calling enroll; after a retryable failure, waiting `retry_at` with the error published.
    Enrolling {
        /// What to enroll with.
        inputs: EnrollInputs,
        /// Delays between attempts.
        backoff: Backoff,
        /// The last attempt's error, if it failed.
        last_error: Option<String>,
    },
    /// Holding a valid certificate; waits for its rotation time.
    Enrolled(Installed),
    /// Rotation is due (or failing): calls rotate, with backoff between attempts.
    Rotating {
        /// The current credentials (still valid).
        current: Installed,
        /// Delays between attempts.
        backoff: Backoff,
        /// Since when rotation has been failing, and the last error.
        failing: Option<Failing>,
    },
    /// The controller (or the files) refused us; waiting for different enrollment inputs.
    Refused {
        /// One of BadToken, Revoked, CaMismatch, CertExpired, Failed.
        state: EnrollmentState,
        /// The reason, as published in `last_error`.
        error: String,
        /// The inputs that were refused (a retry needs different ones).
        refused: Option<EnrollInputs>,
        /// The certificate facts still on disk, published as they are.
        cert: Option<Installed>,
    },
}

/// A rotation that keeps failing.
#[derive(Clone, Debug)]
pub struct Failing {
    /// When the first failure happened, ms since the epoch.
    pub since_ms: u64,
    /// The last failure.
    pub error: String,
    /// The state published for it: RotationFailing, or CaMismatch.
    pub state: EnrollmentState,
    /// Failed attempts since `since_ms`.
    pub attempts: u32,
    /// When `cert.rotation_failing` was last raised for this failure.
    pub raised_at: Option<Instant>,
}

impl Failing {
    /// Whether `cert.rotation_failing` is due again, raising every `interval`.
    fn raise_due(&self, interval: Duration) -> bool {
        self.raised_at.is_none_or(|at| at.elapsed() >= interval)
    }
}

/// What woke a wait.
enum Wake {
    Shutdown,
    Deadline,
    IdentityChanged,
    /// A `cert.rotate` task asks for a rotation now (only while one is possible).
    RotateNow,
}

/// The agent's entry point: see the crate documentation.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let publication = ctx
        .open_publication::<EnrollmentStatus>()
        .context("opening EnrollmentStatus")?;
    let statuses = ctx
        .open_publication::<TaskStatus>()
        .context("opening TaskStatus")?;
    let mut agent = Agent {
        requests: tasks::Requests::new(agentbase::tasks::TaskConfigs::connect(&ctx.dirs), statuses),
        rotating_for: Vec::new(),
        can_rotate: false,
        identity: Subscription::connect(&ctx.dirs, IDENTITY_AGENT),
        heartbeat: Subscription::connect(&ctx.dirs, HEARTBEAT_AGENT),
        store: Store::new(PkiPaths::under(ctx.root.persist_dir())),
        tick: {
            let mut t = tokio::time::interval(ctx.beat_interval());
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        },
        ctx,
        publication,
    };
    let mut state = State::Loading;
    loop {
        state = match agent.step(state).await? {
            Some(next) => next,
            None => return Ok(()),
        };
    }
}

struct Agent {
    ctx: Context,
    publication: Publication<EnrollmentStatus>,
    identity: Subscription<NodeIdentity>,
    /// Only for the heartbeat interval in use: the cadence of `cert.rotation_failing`.
    heartbeat: Subscription<ControllerStatus>,
    store: Store,
    tick: tokio::time::Interval,
    /// `cert.rotate` tasks.
    requests: tasks::Requests,
    /// The `cert.rotate` tasks the next rotation attempt answers.
    rotating_for: Vec<powernode_types::TaskConfig>,
    /// Whether the current state holds a certificate to rotate (else a request is refused).
    can_rotate: bool,
}

impl Agent {
    /// Runs one state: publishes it, acts, waits; returns the next state (`None`: shutdown).
    async fn step(&mut self, state: State) -> anyhow::Result<Option<State>> {
        self.can_rotate = matches!(state, State::Enrolled(_) | State::Rotating { .. });
        match state {
            State::Loading => Ok(Some(self.load().await)),
            State::NotEnrolled { why } => self.not_enrolled(why).await,
            State::Enrolling {
                inputs,
                backoff,
                last_error,
            } => self.enroll(inputs, backoff, last_error).await,
            State::Enrolled(installed) => self.enrolled(installed).await,
            State::Rotating {
                current,
                backoff,
                failing,
            } => self.rotate(current, backoff, failing).await,
            State::Refused {
                state,
                error,
                refused,
                cert,
            } => {
                self.refused_until_new_inputs(state, error, refused, cert)
                    .await
            }
        }
    }

    /// NotEnrolled: says why, then waits for a NodeIdentity that makes enrollment possible.
    async fn not_enrolled(&mut self, why: String) -> anyhow::Result<Option<State>> {
        self.publish(EnrollmentState::NotEnrolled, None, None, Some(why.clone()))?;
        tracing::warn!(reason = %why, "not enrolled: cannot enroll yet");
        self.ctx
            .health
            .report_error(&format!("not enrolled: {why}"));
        self.ctx.status(&format!("not enrolled: {why}"));
        loop {
            match self.wait(None).await {
                Wake::Shutdown => return Ok(None),
                Wake::Deadline | Wake::RotateNow => {}
                Wake::IdentityChanged => match self.inputs() {
                    Ok(inputs) => return Ok(Some(self.enrolling(inputs))),
                    Err(w) if w != why => return Ok(Some(State::NotEnrolled { why: w })),
                    Err(_) => {}
                },
            }
        }
    }

    /// Enrolling: one enroll attempt; a retryable failure waits out the backoff (or a new
    /// NodeIdentity) and tries again, a refusal is final.
    async fn enroll(
        &mut self,
        inputs: EnrollInputs,
        mut backoff: Backoff,
        last_error: Option<String>,
    ) -> anyhow::Result<Option<State>> {
        self.publish(EnrollmentState::Enrolling, None, None, last_error)?;
        self.ctx.status("enrolling");
        let Some(outcome) = self.attempt(enroll(&self.ctx, &self.store, &inputs)).await else {
            return Ok(None);
        };
        let error = match outcome {
            Ok(installed) => {
                tracing::info!(
                    node_id = %installed.meta.node_id,
                    fingerprint = %installed.cert.fingerprint,
                    not_after_ms = installed.cert.not_after_ms,
                    "enrolled"
                );
                events::enrolled(&self.ctx.events, &installed, &inputs.uuid);
                return Ok(Some(State::Enrolled(installed)));
            }
            Err(Failure::Refused(state, error)) => {
                return Ok(Some(State::Refused {
                    state,
                    error,
                    refused: Some(inputs),
                    cert: None,
                }))
            }
            Err(Failure::Retry(error)) => error,
        };
        let delay = backoff.next_delay();
        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "enrollment failed; retrying");
        self.ctx
            .health
            .report_error(&format!("enrollment: {error}"));
        self.publish(EnrollmentState::Enrolling, None, None, Some(error.clone()))?;
        Ok(match self.wait(Some(Instant::now() + delay)).await {
            Wake::Shutdown => None,
            Wake::Deadline | Wake::IdentityChanged | Wake::RotateNow => Some(match self.inputs() {
                Ok(inputs) => State::Enrolling {
                    inputs,
                    backoff,
                    last_error: Some(error),
                },
                Err(why) => State::NotEnrolled { why },
            }),
        })
    }

    /// Enrolled: waits for the rotation time (75% of the lifetime).
    async fn enrolled(&mut self, installed: Installed) -> anyhow::Result<Option<State>> {
        self.publish(EnrollmentState::Enrolled, Some(&installed), None, None)?;
        self.ctx.health.clear_error();
        self.ctx.status(&format!(
            "enrolled as {}; rotation at {} ms",
            installed.meta.node_id,
            installed.rotate_at_ms()
        ));
        while now_ms() < installed.rotate_at_ms() {
            match self.wait(Some(deadline(installed.rotate_at_ms()))).await {
                Wake::Shutdown => return Ok(None),
                Wake::RotateNow => {
                    tracing::info!("rotation asked for by a cert.rotate task");
                    break;
                }
                Wake::Deadline | Wake::IdentityChanged => {}
            }
        }
        Ok(Some(State::Rotating {
            current: installed,
            backoff: self.backoff(),
            failing: None,
        }))
    }

    /// Rotating (or RotationFailing): one rotate attempt with the current, still valid
    /// credentials; a failure is published with when failing began and retried after the
    /// backoff, until the certificate expires.
    async fn rotate(
        &mut self,
        current: Installed,
        mut backoff: Backoff,
        failing: Option<Failing>,
    ) -> anyhow::Result<Option<State>> {
        if now_ms() >= current.cert.not_after_ms {
            return Ok(Some(self.expired(current)));
        }
        match &failing {
            None => {
                tracing::info!(fingerprint = %current.cert.fingerprint, "rotating the certificate");
                self.publish(EnrollmentState::Rotating, Some(&current), None, None)?;
            }
            Some(f) => self.publish(f.state, Some(&current), Some(f), Some(f.error.clone()))?,
        }
        let asked = self.requests.pending();
        self.requests.start(&asked);
        self.rotating_for.extend(asked);
        let Some(outcome) = self.attempt(rotate(&self.ctx, &self.store, &current)).await else {
            return Ok(None);
        };
        let answered = std::mem::take(&mut self.rotating_for);
        self.requests.finish(
            &answered,
            match &outcome {
                Ok(installed) => Ok(format!(
                    "rotated: certificate {} (was {}), valid until {} ms",
                    installed.cert.fingerprint,
                    current.cert.fingerprint,
                    installed.cert.not_after_ms
                )),
                Err(Failure::Retry(e) | Failure::Refused(_, e)) => {
                    Err(format!("the rotation attempt failed: {e}"))
                }
            },
        );
        let (state, error) = match outcome {
            Ok(installed) => {
                tracing::info!(
                    old = %current.cert.fingerprint,
                    new = %installed.cert.fingerprint,
                    not_after_ms = installed.cert.not_after_ms,
                    "certificate rotated"
                );
                events::rotated(&self.ctx.events, &current, &installed, failing.as_ref());
                return Ok(Some(State::Enrolled(installed)));
            }
            Err(Failure::Refused(EnrollmentState::CertExpired, error)) => {
                tracing::error!(%error, "certificate expired before it could be rotated");
                let refused = self.refused(EnrollmentState::CertExpired, error, Some(current));
                return Ok(Some(refused));
            }
            Err(Failure::Refused(EnrollmentState::Revoked, error)) => {
                let refused = self.refused(EnrollmentState::Revoked, error, Some(current));
                return Ok(Some(refused));
            }
            Err(Failure::Refused(EnrollmentState::CaMismatch, e)) => {
                (EnrollmentState::CaMismatch, e)
            }
            Err(Failure::Retry(e) | Failure::Refused(_, e)) => {
                (EnrollmentState::RotationFailing, e)
            }
        };
        let mut failing = match failing {
            Some(f) => Failing {
                error,
                state,
                attempts: f.attempts.saturating_add(1),
                ..f
            },
            None => Failing {
                since_ms: now_ms(),
                error,
                state,
                attempts: 1,
                raised_at: None,
            },
        };
        let delay = backoff.next_delay();
        tracing::warn!(
            error = %failing.error,
            failing_since_ms = failing.since_ms,
            attempts = failing.attempts,
            retry_in_ms = delay.as_millis() as u64,
            "certificate rotation failed"
        );
        self.ctx
            .health
            .report_error(&format!("certificate rotation failing: {}", failing.error));
        self.publish(
            state,
            Some(&current),
            Some(&failing),
            Some(failing.error.clone()),
        )?;
        let retry_at = Instant::now() + delay;
        let expiry = deadline(current.cert.not_after_ms);
        while Instant::now() < retry_at {
            if now_ms() >= current.cert.not_after_ms {
                return Ok(Some(self.expired(current)));
            }
            // Every interval, also while a long backoff keeps the next attempt away.
            let interval = self.heartbeat_interval();
            if failing.raise_due(interval) {
                events::rotation_failing(&self.ctx.events, &current, &failing);
                failing.raised_at = Some(Instant::now());
            }
            let next_raise = failing.raised_at.map_or(retry_at, |at| at + interval);
            let until = retry_at.min(expiry).min(next_raise);
            match self.wait(Some(until)).await {
                Wake::Shutdown => return Ok(None),
                // Asked to rotate now: the next attempt goes at once.
                Wake::RotateNow => break,
                Wake::Deadline | Wake::IdentityChanged => {}
            }
        }
        Ok(Some(State::Rotating {
            current,
            backoff,
            failing: Some(failing),
        }))
    }

    /// The heartbeat interval in use: heartbeatd's (which the controller sets), else the
    /// settings'.
    fn heartbeat_interval(&self) -> Duration {
        self.heartbeat
            .get(GLOBAL_KEY)
            .map(|s| Duration::from_secs(s.heartbeat_interval_s.into()))
            .filter(|d| !d.is_zero())
            .unwrap_or_else(|| self.ctx.settings.controller.heartbeat_interval())
    }

    /// Refused: says why, then waits for enrollment inputs that differ from the refused ones
    /// (and whose token is not the one already used).
    async fn refused_until_new_inputs(
        &mut self,
        state: EnrollmentState,
        error: String,
        refused: Option<EnrollInputs>,
        cert: Option<Installed>,
    ) -> anyhow::Result<Option<State>> {
        self.log_refusal(state, &error);
        self.ctx.health.report_error(&format!("{state:?}: {error}"));
        self.ctx.status(&format!("{state:?}: {error}"));
        let previous = self.publication.get(GLOBAL_KEY);
        let repeated = previous
            .is_some_and(|p| p.state == state && p.last_error.as_deref() == Some(error.as_str()));
        if !repeated {
            let asked = refused.as_ref().map(|i| i.urls.join(","));
            let url = asked
                .as_deref()
                .or(cert.as_ref().map(|c| c.meta.controller_url.as_str()));
            events::refused(&self.ctx.events, state, &error, url, cert.as_ref());
        }
        self.publish(state, cert.as_ref(), None, Some(error.clone()))?;
        let used_token = cert.as_ref().and_then(|c| c.meta.token_sha256.clone());
        loop {
            match self.wait(None).await {
                Wake::Shutdown => return Ok(None),
                Wake::Deadline | Wake::RotateNow => {}
                Wake::IdentityChanged => {
                    let Ok(inputs) = self.inputs() else { continue };
                    let same = refused.as_ref() == Some(&inputs);
                    let used =
                        used_token.as_deref() == Some(sha256_hex(inputs.token.as_bytes()).as_str());
                    if !same && !used {
                        return Ok(Some(self.enrolling(inputs)));
                    }
                }
            }
        }
    }

    /// Runs one call to the controller unless shutdown comes first (`None`); a call dropped
    /// mid-way is harmless, the store being crash-safe.
    async fn attempt(
        &self,
        call: impl std::future::Future<Output = Result<Installed, Failure>>,
    ) -> Option<Result<Installed, Failure>> {
        tokio::select! {
            _ = self.ctx.shutdown.cancelled() => None,
            outcome = call => Some(outcome),
        }
    }

    /// Repairs and reads `pki/`: the state to start in.
    async fn load(&mut self) -> State {
        let store = self.store.clone();
        let now = now_ms();
        let loaded = tokio::task::spawn_blocking(move || {
            let repaired = store.repair()?;
            Ok::<_, StoreError>((repaired, store.load(now)))
        })
        .await;
        let (repaired, loaded) = match loaded {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return self.refused(EnrollmentState::Failed, e.to_string(), None),
            Err(e) => {
                return self.refused(EnrollmentState::Failed, format!("reading pki: {e}"), None)
            }
        };
        if let Some(what) = repaired {
            tracing::warn!(dir = %self.store.paths().dir().display(), "pki repaired at start: {what}");
        }
        match loaded {
            Ok(Some(installed)) => {
                tracing::info!(
                    node_id = %installed.meta.node_id,
                    fingerprint = %installed.cert.fingerprint,
                    "already enrolled (credentials on disk)"
                );
                State::Enrolled(installed)
            }
            Ok(None) => match self.first_inputs().await {
                Some(Ok(inputs)) => self.enrolling(inputs),
                Some(Err(why)) => State::NotEnrolled { why },
                None => State::NotEnrolled {
                    why: "no NodeIdentity from identitymgr yet".into(),
                },
            },
            Err(StoreError::Invalid(CredentialError::Expired { not_after_ms })) => {
                let cert = self.expired_facts();
                self.refused(
                    EnrollmentState::CertExpired,
                    format!("the node certificate expired at {not_after_ms} ms; a new bootstrap token is needed"),
                    cert,
                )
            }
            Err(e) => self.refused(
                EnrollmentState::Failed,
                format!("the PKI on disk is unusable: {e}"),
                None,
            ),
        }
    }

    /// Waits briefly for identitymgr's first value (so a fresh node does not publish a
    /// transient NotEnrolled); `None` if it has none yet.
    async fn first_inputs(&mut self) -> Option<Result<EnrollInputs, String>> {
        let limit = Instant::now() + self.ctx.settings.pubsub.connect_timeout();
        loop {
            if self.identity.get(powernode_types::GLOBAL_KEY).is_some() {
                return Some(self.inputs());
            }
            if self.identity.is_synchronized() {
                return None;
            }
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return None,
                _ = tokio::time::sleep_until(limit) => return None,
                _ = self.identity.next() => {}
            }
        }
    }

    /// Waits until `until`, a NodeIdentity change, or shutdown; beats meanwhile.
    async fn wait(&mut self, until: Option<Instant>) -> Wake {
        let cap = Instant::now() + MAX_SLEEP;
        let until = until.map_or(cap, |u| u.min(cap));
        loop {
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return Wake::Shutdown,
                _ = self.tick.tick() => self.ctx.beat(),
                _ = tokio::time::sleep_until(until) => return Wake::Deadline,
                _ = self.heartbeat.next() => {}
                _ = self.requests.configs.next() => {
                    self.requests.tidy();
                    if !self.requests.pending().is_empty() {
                        if self.can_rotate {
                            return Wake::RotateNow;
                        }
                        self.requests.refuse_pending(
                            "the node holds no certificate to rotate (it is not enrolled)",
                        );
                    }
                }
                event = self.identity.next() => match event {
                    Event::Create { .. } | Event::Modify { .. } | Event::Delete { .. } => {
                        return Wake::IdentityChanged
                    }
                    Event::Synchronized | Event::Restarted { .. } | Event::Disconnected => {}
                },
            }
        }
    }

    /// The enrollment inputs from the current NodeIdentity, or why there are none.
    fn inputs(&self) -> Result<EnrollInputs, String> {
        let identity = self
            .identity
            .get(powernode_types::GLOBAL_KEY)
            .ok_or("no NodeIdentity from identitymgr yet")?;
        enroll_inputs(identity, &self.ctx.settings.controller.urls)
    }

    fn enrolling(&self, inputs: EnrollInputs) -> State {
        State::Enrolling {
            inputs,
            backoff: self.backoff(),
            last_error: None,
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(RETRY_MIN, self.ctx.settings.controller.max_backoff())
    }

    fn refused(&self, state: EnrollmentState, error: String, cert: Option<Installed>) -> State {
        State::Refused {
            state,
            error,
            refused: None,
            cert,
        }
    }

    fn expired(&self, current: Installed) -> State {
        let error = format!(
            "the node certificate expired at {} ms before it could be rotated; a new bootstrap token is needed",
            current.cert.not_after_ms
        );
        self.refused(EnrollmentState::CertExpired, error, Some(current))
    }

    /// The facts of an expired certificate still on disk, for publishing.
    fn expired_facts(&self) -> Option<Installed> {
        let cert = std::fs::read_to_string(self.store.paths().cert()).ok()?;
        Some(Installed {
            cert: store::cert_info(&cert).ok()?,
            meta: self.store.meta()?,
        })
    }

    fn log_refusal(&self, state: EnrollmentState, error: &str) {
        match state {
            EnrollmentState::BadToken => {
                tracing::error!(%error, "enrollment refused: bad bootstrap token")
            }
            EnrollmentState::Revoked => tracing::error!(%error, "this node is revoked"),
            EnrollmentState::CaMismatch => {
                tracing::error!(%error, "the controller is not signed by the pinned CA")
            }
            EnrollmentState::CertExpired => {
                tracing::error!(%error, "the node certificate has expired")
            }
            _ => tracing::error!(%error, "enrollment failed"),
        }
    }

    fn publish(
        &self,
        state: EnrollmentState,
        installed: Option<&Installed>,
        failing: Option<&Failing>,
        last_error: Option<String>,
    ) -> anyhow::Result<()> {
        let status = EnrollmentStatus {
            state,
            node_id: installed.map(|i| i.meta.node_id.clone()),
            cert_fingerprint: installed.map(|i| i.cert.fingerprint.clone()),
            not_before_ms: installed.map(|i| i.cert.not_before_ms),
            not_after_ms: installed.map(|i| i.cert.not_after_ms),
            rotate_at_ms: installed.map(|i| i.rotate_at_ms()),
            controller_urls: installed.map_or_else(Vec::new, |i| i.meta.controller_urls.clone()),
            rotation_failing_since_ms: failing.map(|f| f.since_ms),
            rotation_attempts: failing.map_or(0, |f| f.attempts),
            last_error,
        };
        self.publication
            .publish(&status)
            .context("publishing EnrollmentStatus")?;
        self.ctx.ready();
        Ok(())
    }
}

/// The enrollment inputs in `identity` (the URLs from `settings_urls` when there are any), or
/// why there are none.
pub fn enroll_inputs(
    identity: &NodeIdentity,
    settings_urls: &[String],
) -> Result<EnrollInputs, String> {
    if identity.state != IdentityState::Resolved {
        return Err(format!(
            "node identity unresolvable: {}",
            identity.last_error.as_deref().unwrap_or("no reason given")
        ));
    }
    let uuid = identity.uuid.clone().ok_or("node identity has no uuid")?;
    let token = identity
        .bootstrap_token
        .clone()
        .filter(|t| !t.is_empty())
        .ok_or("no bootstrap token")?;
    let urls = [settings_urls, identity.controller_urls.as_slice()]
        .into_iter()
        .find(|urls| !urls.is_empty())
        .ok_or("no controller URL (neither [controller] url nor NodeIdentity)")?
        .to_vec();
    let ca_pem = identity
        .ca_pem
        .clone()
        .filter(|c| !c.trim().is_empty())
        .ok_or("no controller CA to pin: refusing to enroll without one (no trust on first use)")?;
    Ok(EnrollInputs {
        token,
        urls,
        ca_pem,
        uuid,
        hostname: identity.hostname.clone(),
        arch: identity.arch.clone(),
        boot_id: identity.boot_id.clone(),
    })
}

/// How an enroll or rotate attempt failed.
#[derive(Debug)]
enum Failure {
    /// Retrying may help.
    Retry(String),
    /// It will not: the state to publish and why.
    Refused(EnrollmentState, String),
}

/// Sorts a controller error into a state (DESIGN §5 error codes).
fn classify(e: &TransportError) -> Failure {
    let text = e.to_string();
    match e {
        TransportError::CaMismatch { .. } => Failure::Refused(EnrollmentState::CaMismatch, text),
        TransportError::Status { status, code, .. } => match (*status, code.as_str()) {
            (401, "invalid_token" | "token_used" | "token_expired" | "token_node_mismatch") => {
                Failure::Refused(EnrollmentState::BadToken, text)
            }
            (403, "revoked") => Failure::Refused(EnrollmentState::Revoked, text),
            (401, "certificate_expired") => Failure::Refused(EnrollmentState::CertExpired, text),
            _ if e.is_retryable() => Failure::Retry(text),
            _ => Failure::Refused(EnrollmentState::Failed, text),
        },
        _ if e.is_retryable() => Failure::Retry(text),
        _ => Failure::Refused(EnrollmentState::Failed, text),
    }
}

/// A new Ed25519 key (PKCS#8 PEM) and a CSR for it.
fn new_key_and_csr() -> Result<(String, String), String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| format!("generating the node key: {e}"))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| format!("making the CSR: {e}"))?;
    Ok((key.serialize_pem(), csr))
}

/// One enroll attempt; on success the credentials are on disk.
async fn enroll(ctx: &Context, store: &Store, inputs: &EnrollInputs) -> Result<Installed, Failure> {
    let (key_pem, csr_pem) = new_key_and_csr().map_err(Failure::Retry)?;
    let tls = TlsIdentity {
        ca_pem: inputs.ca_pem.clone(),
        client: None,
    };
    let client = ControllerClient::new(
        &inputs.urls,
        &tls,
        ctx.settings.controller.request_timeout(),
    )
    .map_err(|e| classify(&e))?;
    let request = EnrollRequest {
        bootstrap_token: inputs.token.clone(),
        csr_pem,
        identity: Identity {
            uuid: inputs.uuid.clone(),
            hostname: inputs.hostname.clone(),
            arch: inputs.arch.clone(),
            boot_id: inputs.boot_id.clone(),
        },
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let reply: EnrollResponse = client
        .post("enroll", &request)
        .await
        .map_err(|e| classify(&e))?;
    let meta = Meta {
        version: META_VERSION,
        node_id: reply.node_id.clone(),
        controller_urls: inputs.urls.clone(),
        controller_url: client.current_url().to_owned(),
        token_sha256: Some(sha256_hex(inputs.token.as_bytes())),
        enrolled_at_ms: now_ms(),
        cert_received_ms: now_ms(),
    };
    // The pinned CA, not the reply's chain: the certificate must verify against what we trust.
    install(store, key_pem, reply.cert_pem, inputs.ca_pem.clone(), meta).await
}

/// One rotate attempt over mTLS with the current credentials; on success the new ones are on
/// disk and the old certificate is archived.
async fn rotate(ctx: &Context, store: &Store, current: &Installed) -> Result<Installed, Failure> {
    let urls = match &ctx.settings.controller.urls {
        urls if !urls.is_empty() => urls.clone(),
        _ => current.meta.controller_urls.clone(),
    };
    let tls = store
        .paths()
        .load()
        .map_err(|e| Failure::Refused(EnrollmentState::Failed, e.to_string()))?;
    let ca_pem = tls.ca_pem.clone();
    let client = ControllerClient::new(&urls, &tls, ctx.settings.controller.request_timeout())
        .map_err(|e| classify(&e))?;
    let (key_pem, csr_pem) = new_key_and_csr().map_err(Failure::Retry)?;
    let reply: RotateResponse = client
        .post("certificates/rotate", &RotateRequest { csr_pem })
        .await
        .map_err(|e| classify(&e))?;
    let meta = Meta {
        controller_url: client.current_url().to_owned(),
        controller_urls: urls,
        cert_received_ms: now_ms(),
        ..current.meta.clone()
    };
    install(store, key_pem, reply.cert_pem, ca_pem, meta).await
}

/// Checks what the controller sent and writes it (crash-safe); a reply that does not check is
/// never written.
async fn install(
    store: &Store,
    key_pem: String,
    cert_pem: String,
    ca_pem: String,
    meta: Meta,
) -> Result<Installed, Failure> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let now = now_ms();
        let cert = check_credentials(&cert_pem, &key_pem, &ca_pem, now).map_err(|e| {
            Failure::Retry(format!("the controller's certificate is not usable: {e}"))
        })?;
        store
            .install(
                &NewCredentials {
                    key_pem: &key_pem,
                    cert_pem: &cert_pem,
                    ca_pem: &ca_pem,
                    meta: &meta,
                },
                now,
            )
            .map_err(|e| Failure::Retry(format!("writing the PKI: {e}")))?;
        Ok(Installed { cert, meta })
    })
    .await
    .map_err(|e| Failure::Retry(format!("writing the PKI: {e}")))?
}

/// A tokio deadline for a wall-clock time in ms (capped later by [`MAX_SLEEP`]).
fn deadline(at_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(at_ms.saturating_sub(now_ms()))
}
