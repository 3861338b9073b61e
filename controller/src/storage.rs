//! The controller's database, on one of two backends: an SQLite file in the data directory
//! (embedded, the default) or a PostgreSQL database that several replicas share. Every SQL
//! statement of the controller is in this module and its submodules (tasks, scripts,
//! networks), written once in the SQL both speak and run through sqlx's `Any` driver; what
//! only one backend has (migrations, PRAGMAs, triggers, the lease statement, how a replica
//! learns of another's commit) is in [`sqlite`] and [`postgres`].

use std::path::Path;
use std::sync::Once;

use serde::Serialize;
use sqlx::{AnyPool, FromRow};

use crate::ca::{CaError, CertInfo, IssuedCert};
use crate::events::{self, EventRetention};
use crate::secrets::{self, RandomError};
use crate::wire::{
    DesiredModule, DesiredNetwork, DesiredState, EnrollmentReport, EventRecord, Identity,
};
use powernode_types::Severity;

pub use sqlite::DB_FILE;
/// Heartbeats kept per node, the latest included. Enforced by each backend's `heartbeats_trim`
/// trigger (SQLite's migration 0002, PostgreSQL's 0001), whose `OFFSET 100` must stay equal
/// to this.
pub const HEARTBEAT_HISTORY: i64 = 100;
/// Events `node show` lists.
pub const NODE_SHOW_EVENTS: u32 = 10;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database could not be opened.
    #[error("cannot open database {database}: {source}")]
    Open {
        /// The database file, or URL without its password.
        database: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// Migrations failed.
    #[error("cannot migrate database {database}: {source}")]
    Migrate {
        /// The database file, or URL without its password.
        database: String,
        /// The cause.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed.
    #[error("database query failed ({what}): {source}")]
    Query {
        /// Which operation.
        what: &'static str,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// A stored JSON column does not decode.
    #[error("stored {what} of node {node_id} does not decode: {source}")]
    Decode {
        /// Which column.
        what: &'static str,
        /// The node.
        node_id: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// No randomness for an id.
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl StorageError {
    /// Whether the database cannot be reached or cannot serve now (the server is down or
    /// restarting, the pool has no connection to give, SQLite stayed locked past its busy
    /// timeout), rather than refusing this statement: worth answering 503 and trying again.
    pub fn is_unavailable(&self) -> bool {
        let Self::Query { source, .. } = self else {
            return false;
        };
        match source {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // PostgreSQL: class 08 connection exception, 57P01-57P03 shutdown and
                // "cannot connect now", 53300 too many connections. SQLite: 5 SQLITE_BUSY,
                // 6 SQLITE_LOCKED.
                code.starts_with("08")
                    || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300" | "5" | "6")
            }),
            _ => false,
        }
    }
}

fn query_err(what: &'static str) -> impl FnOnce(sqlx::Error) -> StorageError {
    move |source| StorageError::Query { what, source }
}

/// Why enrollment was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// No such token.
    #[error("unknown bootstrap token")]
    UnknownToken,
    /// The token was used already.
    #[error("bootstrap token already used")]
    TokenUsed,
    /// The token expired.
    #[error("bootstrap token expired")]
    TokenExpired,
    /// The token is bound to another node uuid.
    #[error("bootstrap token is bound to another node")]
    TokenNodeMismatch,
    /// The node with this uuid was revoked.
    #[error("node {0} is revoked")]
    Revoked(String),
    /// Signing failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A node as stored.
#[derive(Clone, Debug, FromRow, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Node {
    /// Node id (certificate CN).
    pub id: String,
    /// Identity uuid.
    pub uuid: String,
    /// Host name at enrollment.
    pub hostname: String,
    /// Architecture at enrollment.
    pub arch: String,
    /// Enrollment time (first), ms.
    pub enrolled_at_ms: i64,
    /// Revocation time, ms, if revoked.
    pub revoked_at_ms: Option<i64>,
}

/// A row of `nodes list`.
#[derive(Clone, Debug, FromRow, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct NodeSummary {
    /// Node id.
    pub id: String,
    /// Identity uuid.
    pub uuid: String,
    /// Host name.
    pub hostname: String,
    /// Architecture.
    pub arch: String,
    /// Enrollment time, ms.
    pub enrolled_at_ms: i64,
    /// Revocation time, ms.
    pub revoked_at_ms: Option<i64>,
    /// Time of the latest heartbeat, ms.
    pub last_heartbeat_ms: Option<i64>,
    /// Latest expiry among the node's certificates, ms.
    pub cert_not_after_ms: Option<i64>,
    /// Desired-state generation.
    pub generation: Option<i64>,
}

/// A certificate issued to a node.
#[derive(Clone, Debug, FromRow, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct CertRecord {
    /// Serial, hex.
    pub serial: String,
    /// Owner.
    pub node_id: String,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    /// Validity start, ms.
    pub not_before_ms: i64,
    /// Validity end, ms.
    pub not_after_ms: i64,
    /// Issue time, ms.
    pub issued_at_ms: i64,
}

/// A stored heartbeat.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct HeartbeatRecord {
    /// Receipt time, ms.
    pub received_at_ms: i64,
    /// Boot id.
    pub boot_id: String,
    /// Agent version.
    pub agent_version: String,
    /// Applied generation reported.
    pub applied_generation: Option<i64>,
    /// The whole body as the node sent it.
    pub body: serde_json::Value,
}

/// The node's enrollment and rotation as its heartbeats last reported them.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct NodeEnrollment {
    /// What the node said.
    #[serde(flatten)]
    pub report: EnrollmentReport,
    /// When the stored report last changed, ms.
    pub changed_at_ms: i64,
}

/// Everything `node show` prints.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct NodeDetail {
    /// The node.
    #[serde(flatten)]
    pub node: Node,
    /// Its enrollment and rotation as last reported (`None` before a heartbeat carried it).
    pub enrollment: Option<NodeEnrollment>,
    /// Its latest heartbeat.
    pub last_heartbeat: Option<HeartbeatRecord>,
    /// Its certificates, newest first.
    pub certificates: Vec<CertRecord>,
    /// Its desired state.
    pub desired: DesiredState,
    /// Its last [`NODE_SHOW_EVENTS`] events, oldest first.
    pub last_events: Vec<StoredEvent>,
}

/// An event as stored: what the node sent, who sent it, when it arrived.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct StoredEvent {
    /// Position in arrival order; what [`EventQuery::after`] pages by.
    pub cursor: i64,
    /// The node that sent it (from its client certificate).
    pub node_id: String,
    /// The event's id (unique per node).
    pub id: String,
    /// The agent that raised it.
    pub agent: String,
    /// The agent's sequence number of it.
    pub seq: i64,
    /// How bad it is.
    pub severity: Severity,
    /// Machine-readable kind.
    pub kind: String,
    /// Human-readable message.
    pub message: String,
    /// When it was raised, by the node's clock, ms.
    pub at_ms: i64,
    /// When the controller received it, by its clock, ms.
    pub received_ms: i64,
    /// Structured context, in order.
    pub fields: Vec<(String, String)>,
    /// Events the agent dropped just before this one.
    pub dropped_before: i64,
}

/// Which events to list, in arrival order.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Only this node's.
    pub node: Option<String>,
    /// Only at least this severe.
    pub min_severity: Option<Severity>,
    /// Only of exactly this kind.
    pub kind: Option<String>,
    /// Only raised at or after this (node clock), ms.
    pub since_ms: Option<i64>,
    /// Only after this cursor.
    pub after: Option<i64>,
    /// At most this many.
    pub limit: u32,
    /// Take the newest `limit` matching events instead of the oldest (still returned oldest
    /// first).
    pub newest: bool,
}

/// What storing a batch of events did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredBatch {
    /// New rows.
    pub accepted: u64,
    /// Events whose id the node had sent before.
    pub duplicates: u64,
}

/// What a heartbeat stores besides its body.
#[derive(Clone, Debug)]
pub struct HeartbeatFacts<'a> {
    /// Boot id.
    pub boot_id: &'a str,
    /// Agent version.
    pub agent_version: &'a str,
    /// Applied generation.
    pub applied_generation: Option<u64>,
    /// The enrollment and rotation state, when the heartbeat carried it.
    pub enrollment: Option<&'a EnrollmentReport>,
    /// The enrollment state as stored ([`HeartbeatView::enrollment`]): an unchanged report
    /// is not written again.
    pub stored_enrollment: Option<&'a str>,
    /// The whole body, JSON text.
    pub body: &'a str,
}

#[derive(FromRow)]
struct TokenRow {
    expires_at_ms: i64,
    used_at_ms: Option<i64>,
    node_uuid: Option<String>,
}

#[derive(FromRow)]
struct EventRow {
    cursor: i64,
    node_id: String,
    id: String,
    agent: String,
    seq: i64,
    severity: i64,
    kind: String,
    message: String,
    at_ms: i64,
    received_ms: i64,
    fields: String,
    dropped_before: i64,
}

impl EventRow {
    fn decode(self) -> Result<StoredEvent, StorageError> {
        let decode = |source| StorageError::Decode {
            what: "event fields",
            node_id: self.node_id.clone(),
            source,
        };
        let fields = serde_json::from_str(&self.fields).map_err(decode)?;
        let severity = events::severity_of_rank(self.severity).ok_or_else(|| {
            decode(serde::de::Error::custom(format!(
                "severity rank {}",
                self.severity
            )))
        })?;
        Ok(StoredEvent {
            cursor: self.cursor,
            node_id: self.node_id,
            id: self.id,
            agent: self.agent,
            seq: self.seq,
            severity,
            kind: self.kind,
            message: self.message,
            at_ms: self.at_ms,
            received_ms: self.received_ms,
            fields,
            dropped_before: self.dropped_before,
        })
    }
}

#[derive(FromRow)]
struct DesiredRow {
    generation: i64,
    modules: String,
    network: Option<String>,
}

impl DesiredRow {
    /// The desired state a row holds; no row is generation 0, nothing desired.
    fn decode(row: Option<DesiredRow>, node_id: &str) -> Result<DesiredState, StorageError> {
        let Some(row) = row else {
            return Ok(DesiredState {
                generation: 0,
                modules: Vec::new(),
                network: None,
            });
        };
        let decode = |what| {
            move |source| StorageError::Decode {
                what,
                node_id: node_id.to_owned(),
                source,
            }
        };
        Ok(DesiredState {
            generation: u64::try_from(row.generation).unwrap_or(0),
            modules: serde_json::from_str(&row.modules).map_err(decode("modules"))?,
            network: row
                .network
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(decode("network"))?,
        })
    }
}

/// What a heartbeat reads before it writes: [`Storage::heartbeat_view`].
#[derive(Debug)]
pub struct HeartbeatView {
    /// The enrollment report as stored (JSON), if the node ever sent one.
    pub enrollment: Option<String>,
    /// The network report as stored, if the node ever sent one.
    pub network_report: Option<crate::networks::NodeReport>,
    /// The desired state.
    pub desired: DesiredState,
    /// Tasks queued for the node.
    pub tasks_queued: u64,
}

#[derive(FromRow)]
struct HeartbeatRow {
    received_at_ms: i64,
    boot_id: String,
    agent_version: String,
    applied_generation: Option<i64>,
    body: String,
}

mod networks;
pub mod postgres;
mod scripts;
pub mod sqlite;
mod tasks;

pub use networks::{Bumped, Left, Member, MemberDetail, Network, NetworkDetail, Outcome};
pub use scripts::Script;
pub use tasks::{
    state as task_state, ChangeProbe, Changes, Completed, Completion, Lease, NewTask, Task,
    TaskQuery, TaskRefusal, WatchState,
};

/// Handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Storage {
    pool: AnyPool,
    backend: Backend,
}

/// The backend behind the pool, and what it needs besides.
#[derive(Clone, Debug)]
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

/// How either backend's shared pool of at most `connections` is built. sqlx's `Any` driver
/// finds a backend by the URL's scheme among those installed (once per process). No ping
/// before every statement (sqlx's default): it doubled the round trips to the database (on
/// SQLite, to the connection's thread) for nothing — a connection that died fails its
/// statement, which answers 503 and is closed by the pool.
fn pool_options(connections: u32) -> sqlx::any::AnyPoolOptions {
    static ONCE: Once = Once::new();
    ONCE.call_once(sqlx::any::install_default_drivers);
    sqlx::any::AnyPoolOptions::new()
        .max_connections(connections)
        .test_before_acquire(false)
}

impl Storage {
    /// Opens (creating if needed) the embedded database `DIR/controller.db` and applies the
    /// migrations.
    pub async fn open(dir: &Path) -> Result<Self, StorageError> {
        let (pool, backend) = sqlite::open(dir).await?;
        Ok(Self {
            pool,
            backend: Backend::Sqlite(backend),
        })
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://…`) and applies the
    /// migrations. Several controllers may share it.
    pub async fn open_postgres(url: &str) -> Result<Self, StorageError> {
        let (pool, backend) = postgres::open(url).await?;
        Ok(Self {
            pool,
            backend: Backend::Postgres(backend),
        })
    }

    /// Which backend this is: `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Whether several controllers may share this database.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Makes everything committed so far survive a power loss (see [`sqlite::Sqlite`]; a
    /// PostgreSQL commit is durable already).
    async fn durable(&self, what: &'static str) -> Result<(), StorageError> {
        match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.durable(&self.pool, what).await,
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Pins the fleet's CA: the first caller's CA (`fingerprint`, the SHA-256 of its DER, hex)
    /// is stored; every later one must present the same. Answers the fingerprint pinned
    /// already when it differs (the caller must refuse to serve).
    pub async fn pin_ca(
        &self,
        fingerprint: &str,
        cert_pem: &str,
        now_ms: i64,
    ) -> Result<Option<String>, StorageError> {
        sqlx::query(
            "INSERT INTO fleet_ca (id, fingerprint, cert_pem, pinned_at_ms) VALUES (1, $1, $2, $3)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(fingerprint)
        .bind(cert_pem)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(query_err("pin the CA"))?;
        let pinned: String = sqlx::query_scalar("SELECT fingerprint FROM fleet_ca WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(query_err("read the pinned CA"))?;
        self.durable("sync the pinned CA").await?;
        Ok((pinned != fingerprint).then_some(pinned))
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Stores a bootstrap token by its hash.
    pub async fn create_token(
        &self,
        token_hash: &str,
        now_ms: i64,
        expires_at_ms: i64,
        node_uuid: Option<&str>,
    ) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO bootstrap_tokens (token_hash, created_at_ms, expires_at_ms, node_uuid)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(token_hash)
        .bind(now_ms)
        .bind(expires_at_ms)
        .bind(node_uuid)
        .execute(&self.pool)
        .await
        .map_err(query_err("create token"))?;
        self.durable("sync token").await
    }

    /// Enrolls a node in one transaction: consumes the token, finds the node by uuid or
    /// creates it (with an empty desired state), lets `sign` issue its certificate, records
    /// the certificate. Nothing is kept if any step fails.
    pub async fn enroll(
        &self,
        token_hash: &str,
        identity: &Identity,
        now_ms: i64,
        sign: impl FnOnce(&str) -> Result<IssuedCert, CaError>,
    ) -> Result<(Node, IssuedCert), EnrollError> {
        let mut tx = self.pool.begin().await.map_err(query_err("begin enroll"))?;
        // A write first, so this transaction takes the write lock at once.
        let consumed = sqlx::query(
            "UPDATE bootstrap_tokens SET used_at_ms = $1
             WHERE token_hash = $2 AND used_at_ms IS NULL AND expires_at_ms > $3
               AND (node_uuid IS NULL OR node_uuid = $4)",
        )
        .bind(now_ms)
        .bind(token_hash)
        .bind(now_ms)
        .bind(&identity.uuid)
        .execute(&mut *tx)
        .await
        .map_err(query_err("consume token"))?
        .rows_affected();
        if consumed != 1 {
            let row: Option<TokenRow> = sqlx::query_as(
                "SELECT expires_at_ms, used_at_ms, node_uuid FROM bootstrap_tokens
                 WHERE token_hash = $1",
            )
            .bind(token_hash)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_err("look up token"))?;
            return Err(match row {
                None => EnrollError::UnknownToken,
                Some(t) if t.used_at_ms.is_some() => EnrollError::TokenUsed,
                Some(t) if t.expires_at_ms <= now_ms => EnrollError::TokenExpired,
                Some(t) if t.node_uuid.as_deref() != Some(identity.uuid.as_str()) => {
                    EnrollError::TokenNodeMismatch
                }
                Some(_) => EnrollError::UnknownToken,
            });
        }
        let existing: Option<Node> = sqlx::query_as("SELECT * FROM nodes WHERE uuid = $1")
            .bind(&identity.uuid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_err("find node by uuid"))?;
        let node = match existing {
            Some(node) if node.revoked_at_ms.is_some() => {
                return Err(EnrollError::Revoked(node.id));
            }
            Some(node) => {
                sqlx::query("UPDATE nodes SET hostname = $1, arch = $2 WHERE id = $3")
                    .bind(&identity.hostname)
                    .bind(&identity.arch)
                    .bind(&node.id)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_err("update node"))?;
                Node {
                    hostname: identity.hostname.clone(),
                    arch: identity.arch.clone(),
                    ..node
                }
            }
            None => {
                let node = Node {
                    id: format!(
                        "node-{}",
                        secrets::hex(&secrets::random_bytes::<8>().map_err(StorageError::from)?,)
                    ),
                    uuid: identity.uuid.clone(),
                    hostname: identity.hostname.clone(),
                    arch: identity.arch.clone(),
                    enrolled_at_ms: now_ms,
                    revoked_at_ms: None,
                };
                sqlx::query(
                    "INSERT INTO nodes (id, uuid, hostname, arch, enrolled_at_ms)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&node.id)
                .bind(&node.uuid)
                .bind(&node.hostname)
                .bind(&node.arch)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(query_err("insert node"))?;
                sqlx::query(
                    "INSERT INTO desired_state (node_id, generation, modules, network, updated_at_ms)
                     VALUES ($1, 0, '[]', NULL, $2)",
                )
                .bind(&node.id)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(query_err("insert desired state"))?;
                node
            }
        };
        sqlx::query("UPDATE bootstrap_tokens SET used_by_node = $1 WHERE token_hash = $2")
            .bind(&node.id)
            .bind(token_hash)
            .execute(&mut *tx)
            .await
            .map_err(query_err("record token user"))?;
        let issued = sign(&node.id)?;
        insert_cert(&mut tx, &node.id, &issued.info, now_ms).await?;
        tx.commit().await.map_err(query_err("commit enroll"))?;
        self.durable("sync enrollment").await?;
        Ok((node, issued))
    }

    /// Records a certificate issued to `node_id` outside enrollment (rotation).
    pub async fn record_cert(
        &self,
        node_id: &str,
        info: &CertInfo,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        let mut conn = self.pool.acquire().await.map_err(query_err("acquire"))?;
        insert_cert(&mut conn, node_id, info, now_ms).await?;
        drop(conn);
        self.durable("sync certificate").await
    }

    /// The node with this id.
    pub async fn node(&self, id: &str) -> Result<Option<Node>, StorageError> {
        sqlx::query_as("SELECT * FROM nodes WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("get node"))
    }

    /// The node a certificate with this fingerprint was issued to, if the controller issued
    /// it: [`cert_by_fingerprint`](Self::cert_by_fingerprint) and [`node`](Self::node) in
    /// one query (once per node API request).
    pub async fn node_by_cert_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<Node>, StorageError> {
        sqlx::query_as(
            "SELECT n.* FROM certificates c JOIN nodes n ON n.id = c.node_id
             WHERE c.fingerprint = $1",
        )
        .bind(fingerprint)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err("get node by certificate"))
    }

    /// The certificate with this fingerprint, if the controller issued it.
    pub async fn cert_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<CertRecord>, StorageError> {
        sqlx::query_as("SELECT * FROM certificates WHERE fingerprint = $1")
            .bind(fingerprint)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("get certificate"))
    }

    /// Marks a node revoked. Returns false when there is no such node; revoking twice keeps
    /// the first time. A revoked member of a network stops being its peers' peer at once
    /// (its network is re-derived).
    pub async fn revoke(&self, id: &str, now_ms: i64) -> Result<bool, StorageError> {
        let done = sqlx::query(
            "UPDATE nodes SET revoked_at_ms = COALESCE(revoked_at_ms, $1) WHERE id = $2",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_err("revoke node"))?;
        self.durable("sync revocation").await?;
        self.resync_network_of(id, now_ms).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores a heartbeat. The history is trimmed to [`HEARTBEAT_HISTORY`] rows per node by
    /// the `heartbeats_trim` trigger within this one statement.
    pub async fn record_heartbeat(
        &self,
        node_id: &str,
        now_ms: i64,
        facts: &HeartbeatFacts<'_>,
    ) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO heartbeats
               (node_id, received_at_ms, boot_id, agent_version, applied_generation, body)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(node_id)
        .bind(now_ms)
        .bind(facts.boot_id)
        .bind(facts.agent_version)
        .bind(
            facts
                .applied_generation
                .map(|g| i64::try_from(g).unwrap_or(i64::MAX)),
        )
        .bind(facts.body)
        .execute(&self.pool)
        .await
        .map_err(query_err("insert heartbeat"))?;
        if let Some(report) = facts.enrollment {
            self.record_enrollment(node_id, now_ms, report, facts.stored_enrollment)
                .await?;
        }
        Ok(())
    }

    /// Stores a node's reported enrollment state if it differs from the stored one (`stored`,
    /// as read before): a heartbeat that reports the same thing writes nothing, and one whose
    /// report changed meanwhile matches no row.
    async fn record_enrollment(
        &self,
        node_id: &str,
        now_ms: i64,
        report: &EnrollmentReport,
        stored: Option<&str>,
    ) -> Result<(), StorageError> {
        let json = serde_json::to_string(&report.clone().bounded()).map_err(|source| {
            StorageError::Decode {
                what: "enrollment",
                node_id: node_id.to_owned(),
                source,
            }
        })?;
        if stored == Some(json.as_str()) {
            return Ok(());
        }
        sqlx::query(
            "UPDATE nodes SET enrollment = $1, enrollment_at_ms = $2
             WHERE id = $3 AND enrollment IS DISTINCT FROM $1",
        )
        .bind(json)
        .bind(now_ms)
        .bind(node_id)
        .execute(&self.pool)
        .await
        .map_err(query_err("record enrollment"))?;
        Ok(())
    }

    /// A node's enrollment state as last reported.
    pub async fn node_enrollment(
        &self,
        node_id: &str,
    ) -> Result<Option<NodeEnrollment>, StorageError> {
        let row: Option<(Option<String>, Option<i64>)> =
            sqlx::query_as("SELECT enrollment, enrollment_at_ms FROM nodes WHERE id = $1")
                .bind(node_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(query_err("get enrollment"))?;
        let Some((Some(json), at)) = row else {
            return Ok(None);
        };
        let report = serde_json::from_str(&json).map_err(|source| StorageError::Decode {
            what: "enrollment",
            node_id: node_id.to_owned(),
            source,
        })?;
        Ok(Some(NodeEnrollment {
            report,
            changed_at_ms: at.unwrap_or_default(),
        }))
    }

    /// How many heartbeats are kept for a node.
    pub async fn heartbeat_count(&self, node_id: &str) -> Result<i64, StorageError> {
        sqlx::query_scalar("SELECT COUNT(*) FROM heartbeats WHERE node_id = $1")
            .bind(node_id)
            .fetch_one(&self.pool)
            .await
            .map_err(query_err("count heartbeats"))
    }

    /// The desired state of a node (generation 0, nothing, for a node without a row).
    pub async fn desired(&self, node_id: &str) -> Result<DesiredState, StorageError> {
        let row: Option<DesiredRow> = sqlx::query_as(
            "SELECT generation, modules, network FROM desired_state WHERE node_id = $1",
        )
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err("get desired state"))?;
        DesiredRow::decode(row, node_id)
    }

    /// What a heartbeat of `node_id` compares against and answers with, in one statement
    /// (each statement is a hand-off to a database thread and back): the stored enrollment
    /// report, the stored network report, the desired state and the queued tasks. `None` when
    /// there is no such node.
    pub async fn heartbeat_view(
        &self,
        node_id: &str,
    ) -> Result<Option<HeartbeatView>, StorageError> {
        #[derive(FromRow)]
        struct Row {
            enrollment: Option<String>,
            public_key: Option<String>,
            endpoints: Option<String>,
            seen_ip: Option<String>,
            generation: Option<i64>,
            modules: Option<String>,
            network: Option<String>,
            tasks_queued: i64,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT n.enrollment, r.public_key, r.endpoints, r.seen_ip,
                    d.generation, d.modules, d.network,
                    (SELECT COUNT(*) FROM tasks t
                      WHERE t.node_id = n.id AND t.state = 'queued') AS tasks_queued
             FROM nodes n
             LEFT JOIN node_network_reports r ON r.node_id = n.id
             LEFT JOIN desired_state d ON d.node_id = n.id
             WHERE n.id = $1",
        )
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err("get heartbeat view"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let desired = match (row.generation, row.modules) {
            (Some(generation), Some(modules)) => Some(DesiredRow {
                generation,
                modules,
                network: row.network,
            }),
            _ => None,
        };
        let network_report = match row.endpoints {
            Some(endpoints) => Some(networks::stored_report(
                node_id,
                row.public_key,
                &endpoints,
                row.seen_ip,
            )?),
            None => None,
        };
        Ok(Some(HeartbeatView {
            enrollment: row.enrollment,
            network_report,
            desired: DesiredRow::decode(desired, node_id)?,
            tasks_queued: u64::try_from(row.tasks_queued).unwrap_or(0),
        }))
    }

    /// Replaces the desired modules of a node and bumps its generation. `None` when there is
    /// no such node.
    pub async fn set_desired_modules(
        &self,
        node_id: &str,
        modules: &[DesiredModule],
        now_ms: i64,
    ) -> Result<Option<u64>, StorageError> {
        let json = serde_json::to_string(modules).map_err(|source| StorageError::Decode {
            what: "modules",
            node_id: node_id.to_owned(),
            source,
        })?;
        self.bump(node_id, "modules", Some(json), now_ms).await
    }

    /// Replaces the desired network of a node (`None` removes it) and bumps its generation.
    pub async fn set_desired_network(
        &self,
        node_id: &str,
        network: Option<&DesiredNetwork>,
        now_ms: i64,
    ) -> Result<Option<u64>, StorageError> {
        let json = network
            .map(serde_json::to_string)
            .transpose()
            .map_err(|source| StorageError::Decode {
                what: "network",
                node_id: node_id.to_owned(),
                source,
            })?;
        self.bump(node_id, "network", json, now_ms).await
    }

    async fn bump(
        &self,
        node_id: &str,
        column: &'static str,
        value: Option<String>,
        now_ms: i64,
    ) -> Result<Option<u64>, StorageError> {
        // `column` is one of two literals above, never input.
        let sql = match column {
            "modules" => {
                "UPDATE desired_state SET modules = $1, generation = generation + 1, updated_at_ms = $2
                 WHERE node_id = $3 RETURNING generation"
            }
            _ => {
                "UPDATE desired_state SET network = $1, generation = generation + 1, updated_at_ms = $2
                 WHERE node_id = $3 RETURNING generation"
            }
        };
        let generation: Option<i64> = sqlx::query_scalar(sql)
            .bind(value)
            .bind(now_ms)
            .bind(node_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("bump generation"))?;
        self.durable("sync desired state").await?;
        Ok(generation.map(|g| u64::try_from(g).unwrap_or(0)))
    }

    /// Every node with its latest heartbeat time and certificate expiry, by enrollment time.
    pub async fn list_nodes(&self) -> Result<Vec<NodeSummary>, StorageError> {
        sqlx::query_as(
            "SELECT n.id, n.uuid, n.hostname, n.arch, n.enrolled_at_ms, n.revoked_at_ms,
                    (SELECT MAX(h.received_at_ms) FROM heartbeats h WHERE h.node_id = n.id)
                        AS last_heartbeat_ms,
                    (SELECT MAX(c.not_after_ms) FROM certificates c WHERE c.node_id = n.id)
                        AS cert_not_after_ms,
                    d.generation
             FROM nodes n LEFT JOIN desired_state d ON d.node_id = n.id
             ORDER BY n.enrolled_at_ms, n.id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("list nodes"))
    }

    /// A node with its latest heartbeat, certificates and desired state.
    pub async fn node_detail(&self, id: &str) -> Result<Option<NodeDetail>, StorageError> {
        let Some(node) = self.node(id).await? else {
            return Ok(None);
        };
        let certificates: Vec<CertRecord> = sqlx::query_as(
            "SELECT * FROM certificates WHERE node_id = $1 ORDER BY issued_at_ms DESC, serial",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("list certificates"))?;
        let latest: Option<HeartbeatRow> = sqlx::query_as(
            "SELECT received_at_ms, boot_id, agent_version, applied_generation, body
             FROM heartbeats WHERE node_id = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err("latest heartbeat"))?;
        let last_heartbeat = latest
            .map(|row| {
                serde_json::from_str(&row.body)
                    .map(|body| HeartbeatRecord {
                        received_at_ms: row.received_at_ms,
                        boot_id: row.boot_id,
                        agent_version: row.agent_version,
                        applied_generation: row.applied_generation,
                        body,
                    })
                    .map_err(|source| StorageError::Decode {
                        what: "heartbeat",
                        node_id: id.to_owned(),
                        source,
                    })
            })
            .transpose()?;
        let desired = self.desired(id).await?;
        let enrollment = self.node_enrollment(id).await?;
        let last_events = self
            .events(&EventQuery {
                node: Some(id.to_owned()),
                limit: NODE_SHOW_EVENTS,
                newest: true,
                ..EventQuery::default()
            })
            .await?;
        Ok(Some(NodeDetail {
            node,
            enrollment,
            last_heartbeat,
            certificates,
            desired,
            last_events,
        }))
    }

    /// Stores a validated batch of `node_id`'s events received at `received_ms`, in one
    /// transaction: an id the node sent before counts as a duplicate and is not stored again.
    /// The node's events are then trimmed to `retention.max_per_node` in the same transaction,
    /// and the whole is synced before returning: the node forgets what this acknowledges.
    pub async fn insert_events(
        &self,
        node_id: &str,
        batch: &[EventRecord],
        received_ms: i64,
        retention: &EventRetention,
    ) -> Result<StoredBatch, StorageError> {
        let mut tx = self.pool.begin().await.map_err(query_err("begin events"))?;
        let mut accepted = 0;
        for event in batch {
            let fields =
                serde_json::to_string(&event.fields).map_err(|source| StorageError::Decode {
                    what: "event fields",
                    node_id: node_id.to_owned(),
                    source,
                })?;
            let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            accepted += sqlx::query(
                "INSERT INTO events (node_id, id, agent, seq, severity, kind, message, at_ms,
                                     received_ms, fields, dropped_before)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (node_id, id) DO NOTHING",
            )
            .bind(node_id)
            .bind(&event.id)
            .bind(&event.agent)
            .bind(as_i64(event.seq))
            .bind(events::severity_rank(event.severity))
            .bind(&event.kind)
            .bind(&event.message)
            .bind(as_i64(event.at_ms))
            .bind(received_ms)
            .bind(fields)
            .bind(as_i64(event.dropped_before))
            .execute(&mut *tx)
            .await
            .map_err(query_err("insert event"))?
            .rows_affected();
        }
        if accepted > 0 {
            trim_node_events(&mut tx, node_id, retention.max_per_node).await?;
        }
        tx.commit().await.map_err(query_err("commit events"))?;
        if accepted > 0 {
            self.durable("sync events").await?;
        }
        let total = u64::try_from(batch.len()).unwrap_or(u64::MAX);
        Ok(StoredBatch {
            accepted,
            duplicates: total - accepted,
        })
    }

    /// Applies `retention` to every node: deletes events received before its cutoff at
    /// `now_ms`, then trims each node to its count. Returns how many rows went.
    pub async fn trim_events(
        &self,
        now_ms: i64,
        retention: &EventRetention,
    ) -> Result<u64, StorageError> {
        let mut tx = self.pool.begin().await.map_err(query_err("begin trim"))?;
        let mut deleted = sqlx::query("DELETE FROM events WHERE received_ms < $1")
            .bind(retention.cutoff_ms(now_ms))
            .execute(&mut *tx)
            .await
            .map_err(query_err("delete old events"))?
            .rows_affected();
        let nodes: Vec<String> = sqlx::query_scalar("SELECT id FROM nodes")
            .fetch_all(&mut *tx)
            .await
            .map_err(query_err("list nodes for trim"))?;
        for node_id in &nodes {
            deleted += trim_node_events(&mut tx, node_id, retention.max_per_node).await?;
        }
        tx.commit().await.map_err(query_err("commit trim"))?;
        Ok(deleted)
    }

    /// Events matching `query`, in arrival order (oldest first).
    pub async fn events(&self, query: &EventQuery) -> Result<Vec<StoredEvent>, StorageError> {
        const MATCHING: &str = "SELECT * FROM events
             WHERE cursor > $1
               AND ($2 IS NULL OR node_id = $2)
               AND severity >= $3
               AND ($4 IS NULL OR kind = $4)
               AND at_ms >= $5";
        let sql = if query.newest {
            format!(
                "SELECT * FROM ({MATCHING} ORDER BY cursor DESC LIMIT $6) AS newest
                 ORDER BY cursor"
            )
        } else {
            format!("{MATCHING} ORDER BY cursor LIMIT $6")
        };
        let rows: Vec<EventRow> = sqlx::query_as(&sql)
            .bind(query.after.unwrap_or(0))
            .bind(&query.node)
            .bind(query.min_severity.map_or(0, events::severity_rank))
            .bind(&query.kind)
            .bind(query.since_ms.unwrap_or(i64::MIN))
            .bind(i64::from(query.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list events"))?;
        rows.into_iter().map(EventRow::decode).collect()
    }
}

/// Deletes all but the newest `keep` events of a node: an index range on `events_by_node`
/// that finds nothing while the node has `keep` events or fewer.
async fn trim_node_events(
    conn: &mut sqlx::AnyConnection,
    node_id: &str,
    keep: u32,
) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "DELETE FROM events WHERE node_id = $1 AND cursor <=
            (SELECT cursor FROM events WHERE node_id = $2 ORDER BY cursor DESC LIMIT 1 OFFSET $3)",
    )
    .bind(node_id)
    .bind(node_id)
    .bind(i64::from(keep))
    .execute(conn)
    .await
    .map_err(query_err("trim events"))?
    .rows_affected())
}

async fn insert_cert(
    conn: &mut sqlx::AnyConnection,
    node_id: &str,
    info: &CertInfo,
    now_ms: i64,
) -> Result<(), StorageError> {
    sqlx::query(
        "INSERT INTO certificates
           (serial, node_id, fingerprint, not_before_ms, not_after_ms, issued_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&info.serial)
    .bind(node_id)
    .bind(&info.fingerprint)
    .bind(info.not_before_ms)
    .bind(info.not_after_ms)
    .bind(now_ms)
    .execute(conn)
    .await
    .map_err(query_err("insert certificate"))?;
    Ok(())
}
