//! Tasks: created by the operator, leased by their node, renewed, completed, expired and
//! cancelled. Every transition is one SQL statement, so two callers racing for the same task
//! can never both win it (SQLite runs one writer at a time; each statement is atomic).

use serde::Serialize;
use sqlx::FromRow;

use super::{query_err, Backend, Storage, StorageError};
use crate::secrets;

/// A task's state as stored: `queued` and `leased` are live, the rest final.
pub mod state {
    /// Waiting for its node to lease it.
    pub const QUEUED: &str = "queued";
    /// Leased to its node until `lease_expires_at_ms`.
    pub const LEASED: &str = "leased";
    /// The node reported success.
    pub const SUCCEEDED: &str = "succeeded";
    /// The node reported failure, or every lease expired.
    pub const FAILED: &str = "failed";
    /// The node reported it was cut short and will not run it again.
    pub const INTERRUPTED: &str = "interrupted";
    /// The operator cancelled it.
    pub const CANCELLED: &str = "cancelled";
    /// Every state, for validating a filter.
    pub const ALL: [&str; 6] = [QUEUED, LEASED, SUCCEEDED, FAILED, INTERRUPTED, CANCELLED];
}

/// A task as stored.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Task {
    /// `task-` and 16 hex digits.
    pub id: String,
    /// The node that runs it.
    pub node_id: String,
    /// What to do.
    pub kind: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// See [`state`].
    pub state: String,
    /// Leases given so far.
    pub attempts: u32,
    /// Leases it may get; an expiry past the last fails it.
    pub max_attempts: u32,
    /// How long one lease lasts from a lease or renew, seconds.
    pub timeout_s: u32,
    /// When the operator created it, ms.
    pub created_at_ms: i64,
    /// When it last changed, ms.
    pub updated_at_ms: i64,
    /// When the current lease runs out, ms; only while leased.
    pub lease_expires_at_ms: Option<i64>,
    /// When it reached a final state, ms.
    pub finished_at_ms: Option<i64>,
    /// The controller's reason for a final state it set (expiry, cancel).
    pub reason: Option<String>,
    /// The node's outcome, as it reported it.
    pub outcome: Option<String>,
    /// The node's output (left out of lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The output was longer than the cap and is stored cut.
    pub output_truncated: bool,
    /// The node's completion came after its lease had run out.
    pub late: bool,
}

#[derive(FromRow)]
struct TaskRow {
    id: String,
    node_id: String,
    kind: String,
    args: String,
    state: String,
    attempts: i64,
    max_attempts: i64,
    timeout_s: i64,
    created_at_ms: i64,
    updated_at_ms: i64,
    lease_expires_ms: Option<i64>,
    finished_at_ms: Option<i64>,
    reason: Option<String>,
    outcome: Option<String>,
    output: Option<String>,
    // Flags are integers on both backends (sqlx's Any driver reads no SQLite boolean).
    output_truncated: i64,
    late: i64,
}

impl TaskRow {
    fn into_task(self) -> Result<Task, StorageError> {
        let args = serde_json::from_str(&self.args).map_err(|source| StorageError::Decode {
            what: "task args",
            node_id: self.node_id.clone(),
            source,
        })?;
        Ok(Task {
            id: self.id,
            node_id: self.node_id,
            kind: self.kind,
            args,
            lease_expires_at_ms: (self.state == state::LEASED)
                .then_some(self.lease_expires_ms)
                .flatten(),
            state: self.state,
            attempts: count(self.attempts),
            max_attempts: count(self.max_attempts),
            timeout_s: count(self.timeout_s),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            finished_at_ms: self.finished_at_ms,
            reason: self.reason,
            outcome: self.outcome,
            output: self.output,
            output_truncated: self.output_truncated != 0,
            late: self.late != 0,
        })
    }
}

fn count(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Every column of a task row; `output` only where asked.
const COLUMNS: &str = "id, node_id, kind, args, state, attempts, max_attempts, timeout_s,
    created_at_ms, updated_at_ms, lease_expires_ms, finished_at_ms, reason, outcome,
    output_truncated, late";

/// A task to create.
#[derive(Clone, Debug)]
pub struct NewTask<'a> {
    /// The node that is to run it.
    pub node_id: &'a str,
    /// What to do (validated by the caller).
    pub kind: &'a str,
    /// Its arguments.
    pub args: &'a serde_json::Value,
    /// Lease length, seconds.
    pub timeout_s: u32,
    /// Leases it may get.
    pub max_attempts: u32,
}

/// A lease handed out: what the node is told.
#[derive(Clone, Debug)]
pub struct Lease {
    /// The task.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Its arguments.
    pub args: serde_json::Value,
    /// Which lease of the task this is, from 1.
    pub attempt: u32,
    /// Lease length, seconds.
    pub timeout_s: u32,
    /// When the lease runs out, ms.
    pub expires_at_ms: i64,
}

/// How a renew or completion by a node went, when it was not done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskRefusal {
    /// No such task, or not this node's.
    NotFound,
    /// The node holds no lease on it now (its state is given).
    LeaseLost(String),
    /// The node never leased it.
    NotLeased,
    /// It is final already (its state is given).
    Finished(String),
}

/// A completion as the node reports it, its output already cut to the cap.
#[derive(Clone, Debug)]
pub struct Completion<'a> {
    /// One of the final states `succeeded`, `failed`, `interrupted`.
    pub state: &'a str,
    /// The node's outcome word, as stored.
    pub outcome: &'a str,
    /// The output, cut.
    pub output: &'a str,
    /// Whether it was cut.
    pub truncated: bool,
}

/// What a completion came to: the task's state and whether it was late.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The task's state now.
    pub state: String,
    /// The completion arrived after the lease ran out.
    pub late: bool,
}

/// Which tasks to list.
#[derive(Clone, Debug, Default)]
pub struct TaskQuery {
    /// Only this node's.
    pub node: Option<String>,
    /// Only in this state.
    pub state: Option<String>,
    /// The newest this many.
    pub limit: u32,
}

/// Per node with anything to watch: its desired-state generation and queued tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchState {
    /// Desired-state generation.
    pub generation: u64,
    /// Tasks queued.
    pub tasks_queued: u64,
}

impl Storage {
    /// Creates a queued task; `None` when there is no such node (or it is revoked).
    pub async fn create_task(
        &self,
        task: &NewTask<'_>,
        now_ms: i64,
    ) -> Result<Option<Task>, StorageError> {
        let id = format!("task-{}", secrets::hex(&secrets::random_bytes::<8>()?));
        let args = task.args.to_string();
        let sql = format!(
            "INSERT INTO tasks (id, node_id, kind, args, timeout_s, max_attempts, state,
                 created_at_ms, updated_at_ms)
             SELECT $1, id, $2, $3, $4, $5, 'queued', $6, $7 FROM nodes
             WHERE id = $8 AND revoked_at_ms IS NULL
             RETURNING {COLUMNS}, NULL AS output"
        );
        let row: Option<TaskRow> = sqlx::query_as(&sql)
            .bind(&id)
            .bind(task.kind)
            .bind(&args)
            .bind(i64::from(task.timeout_s))
            .bind(i64::from(task.max_attempts))
            .bind(now_ms)
            .bind(now_ms)
            .bind(task.node_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("create task"))?;
        if row.is_some() {
            // A task the operator was told exists must survive a power cut.
            self.durable("sync new task").await?;
        }
        row.map(TaskRow::into_task).transpose()
    }

    /// Returns expired leases to the queue, or fails them after their last attempt. Returns
    /// the nodes whose queue grew (their watches have news).
    pub async fn expire_leases(&self, now_ms: i64) -> Result<Vec<String>, StorageError> {
        sqlx::query(
            "UPDATE tasks SET state = 'failed', finished_at_ms = $1, updated_at_ms = $1,
                 reason = 'the lease expired ' || attempts || ' time(s), the last attempt'
             WHERE state = 'leased' AND lease_expires_ms <= $1 AND attempts >= max_attempts",
        )
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(query_err("fail expired tasks"))?;
        let requeued: Vec<String> = sqlx::query_scalar(
            "UPDATE tasks SET state = 'queued', updated_at_ms = $1,
                 reason = 'the lease of attempt ' || attempts || ' expired'
             WHERE state = 'leased' AND lease_expires_ms <= $1 AND attempts < max_attempts
             RETURNING node_id",
        )
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("requeue expired tasks"))?;
        Ok(requeued)
    }

    /// Leases up to `max` of the node's queued tasks, oldest first, in one statement: two
    /// concurrent callers never get the same task.
    pub async fn lease_tasks(
        &self,
        node_id: &str,
        max: u32,
        now_ms: i64,
    ) -> Result<Vec<Lease>, StorageError> {
        self.expire_leases(now_ms).await?;
        #[derive(FromRow)]
        struct Row {
            id: String,
            kind: String,
            args: String,
            attempts: i64,
            timeout_s: i64,
            lease_expires_ms: i64,
            seq: i64,
        }
        // One statement: the oldest queued tasks of the node become leased. On PostgreSQL,
        // where replicas lease concurrently, rows another transaction is leasing are skipped
        // rather than waited for; the outer `state` check makes a row won twice impossible on
        // both backends.
        let sql = match self.backend {
            Backend::Sqlite(_) => {
                "UPDATE tasks SET state = 'leased', attempts = attempts + 1,
                     lease_expires_ms = $1 + timeout_s * 1000, updated_at_ms = $1
                 WHERE state = 'queued'
                   AND id IN (SELECT id FROM tasks WHERE node_id = $2 AND state = 'queued'
                              ORDER BY created_at_ms, rowid LIMIT $3)
                 RETURNING id, kind, args, attempts, timeout_s, lease_expires_ms, rowid AS seq"
            }
            // The locking CTE runs once (PostgreSQL may run an `IN (… LIMIT)` subquery
            // again for every row it joins, handing out more than the limit).
            Backend::Postgres(_) => {
                "WITH picked AS (
                     SELECT id FROM tasks WHERE node_id = $2 AND state = 'queued'
                     ORDER BY created_at_ms, rowid LIMIT $3
                     FOR UPDATE SKIP LOCKED)
                 UPDATE tasks t SET state = 'leased', attempts = t.attempts + 1,
                     lease_expires_ms = $1 + t.timeout_s * 1000, updated_at_ms = $1
                 FROM picked WHERE t.id = picked.id AND t.state = 'queued'
                 RETURNING t.id, t.kind, t.args, t.attempts, t.timeout_s, t.lease_expires_ms,
                           t.rowid AS seq"
            }
        };
        let mut rows: Vec<Row> = sqlx::query_as(sql)
            .bind(now_ms)
            .bind(node_id)
            .bind(i64::from(max))
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("lease tasks"))?;
        // RETURNING gives no order; the node is promised oldest first (rowid grows with
        // creation, and breaks ties within a millisecond).
        rows.sort_by_key(|row| row.seq);
        rows.into_iter()
            .map(|row| {
                let args =
                    serde_json::from_str(&row.args).map_err(|source| StorageError::Decode {
                        what: "task args",
                        node_id: node_id.to_owned(),
                        source,
                    })?;
                Ok(Lease {
                    id: row.id,
                    kind: row.kind,
                    args,
                    attempt: count(row.attempts),
                    timeout_s: count(row.timeout_s),
                    expires_at_ms: row.lease_expires_ms,
                })
            })
            .collect()
    }

    /// Moves the lease the node holds on `id` on by the task's timeout from now. A lease that
    /// has run out is not revived, even before the sweep has returned its task to the queue:
    /// the node hears `lease_lost`, as it would a moment later.
    pub async fn renew_task(
        &self,
        node_id: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<Result<i64, TaskRefusal>, StorageError> {
        let renewed: Option<i64> = sqlx::query_scalar(
            "UPDATE tasks SET lease_expires_ms = $1 + timeout_s * 1000, updated_at_ms = $1
             WHERE id = $2 AND node_id = $3 AND state = 'leased' AND lease_expires_ms > $1
             RETURNING lease_expires_ms",
        )
        .bind(now_ms)
        .bind(id)
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err("renew task"))?;
        if let Some(expires) = renewed {
            return Ok(Ok(expires));
        }
        Ok(Err(match self.task_state(node_id, id).await? {
            None => TaskRefusal::NotFound,
            Some((state, _)) => TaskRefusal::LeaseLost(state),
        }))
    }

    /// Records the node's completion of `id`. The first completion decides the task's final
    /// state; a repeated one changes nothing and is answered alike. A completion that comes
    /// after the lease ran out (the task back in the queue, or failed by its last expiry) is
    /// still taken, since the work was done, and marked late; a cancelled task stays
    /// cancelled, with the node's word recorded beside it, late.
    pub async fn complete_task(
        &self,
        node_id: &str,
        id: &str,
        done: &Completion<'_>,
        now_ms: i64,
    ) -> Result<Result<Completed, TaskRefusal>, StorageError> {
        #[derive(FromRow)]
        struct Row {
            state: String,
            late: i64,
        }
        // One statement decides it: the row as it is when SQLite runs the update.
        let row: Option<Row> = sqlx::query_as(
            "UPDATE tasks SET
                 late = CASE WHEN outcome IS NOT NULL THEN late
                             WHEN state = 'leased' AND lease_expires_ms > $1 THEN 0
                             ELSE 1 END,
                 state = CASE WHEN outcome IS NOT NULL THEN state
                              WHEN state IN ('leased', 'queued', 'failed') THEN $2
                              ELSE state END,
                 finished_at_ms = COALESCE(finished_at_ms, $1),
                 updated_at_ms = CASE WHEN outcome IS NOT NULL THEN updated_at_ms ELSE $1 END,
                 lease_expires_ms = NULL,
                 output = CASE WHEN outcome IS NOT NULL THEN output ELSE $3 END,
                 output_truncated = CASE WHEN outcome IS NOT NULL THEN output_truncated
                                         ELSE $4 END,
                 reason = CASE WHEN outcome IS NULL AND state IN ('leased', 'queued', 'failed')
                               THEN NULL ELSE reason END,
                 outcome = COALESCE(outcome, $5)
             WHERE id = $6 AND node_id = $7 AND attempts > 0
             RETURNING state, late",
        )
        .bind(now_ms)
        .bind(done.state)
        .bind(done.output)
        .bind(i64::from(done.truncated))
        .bind(done.outcome)
        .bind(id)
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err("complete task"))?;
        if let Some(row) = row {
            // The node forgets a task once its completion is answered: a power cut must not
            // take the completion back, or the task would be leased and run again.
            self.durable("sync task completion").await?;
            return Ok(Ok(Completed {
                state: row.state,
                late: row.late != 0,
            }));
        }
        Ok(Err(match self.task_state(node_id, id).await? {
            None => TaskRefusal::NotFound,
            Some(_) => TaskRefusal::NotLeased,
        }))
    }

    /// Cancels a live task: it is never leased again, and its node's renew is refused.
    pub async fn cancel_task(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Result<Task, TaskRefusal>, StorageError> {
        let updated = sqlx::query(
            "UPDATE tasks SET state = 'cancelled', finished_at_ms = $1, updated_at_ms = $1,
                 lease_expires_ms = NULL, reason = 'cancelled by the operator'
             WHERE id = $2 AND state IN ('queued', 'leased')",
        )
        .bind(now_ms)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_err("cancel task"))?;
        let Some(task) = self.task(id).await? else {
            return Ok(Err(TaskRefusal::NotFound));
        };
        if updated.rows_affected() == 0 {
            return Ok(Err(TaskRefusal::Finished(task.state)));
        }
        self.durable("sync cancelled task").await?;
        Ok(Ok(task))
    }

    /// One task with its output.
    pub async fn task(&self, id: &str) -> Result<Option<Task>, StorageError> {
        let sql = format!("SELECT {COLUMNS}, output FROM tasks WHERE id = $1");
        let row: Option<TaskRow> = sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("get task"))?;
        row.map(TaskRow::into_task).transpose()
    }

    /// The newest `query.limit` matching tasks, oldest first, without their output.
    pub async fn tasks(&self, query: &TaskQuery) -> Result<Vec<Task>, StorageError> {
        let sql = format!(
            "SELECT * FROM (SELECT rowid AS seq, {COLUMNS}, NULL AS output FROM tasks
                 WHERE ($1 IS NULL OR node_id = $1) AND ($2 IS NULL OR state = $2)
                 ORDER BY created_at_ms DESC, rowid DESC LIMIT $3) AS newest
             ORDER BY created_at_ms, seq"
        );
        let rows: Vec<TaskRow> = sqlx::query_as(&sql)
            .bind(query.node.as_deref())
            .bind(query.state.as_deref())
            .bind(i64::from(query.limit))
            .fetch_all(&self.pool)
            .await
            .map_err(query_err("list tasks"))?;
        rows.into_iter().map(TaskRow::into_task).collect()
    }

    /// The state of `id` if it is `node_id`'s, and how many leases it had.
    async fn task_state(
        &self,
        node_id: &str,
        id: &str,
    ) -> Result<Option<(String, i64)>, StorageError> {
        sqlx::query_as("SELECT state, attempts FROM tasks WHERE id = $1 AND node_id = $2")
            .bind(id)
            .bind(node_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("get task state"))
    }

    /// What a watch of `node_id` compares against.
    pub async fn watch_state(&self, node_id: &str) -> Result<WatchState, StorageError> {
        let (generation, queued): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE((SELECT generation FROM desired_state WHERE node_id = $1), 0),
                    (SELECT COUNT(*) FROM tasks WHERE node_id = $1 AND state = 'queued')",
        )
        .bind(node_id)
        .fetch_one(&self.pool)
        .await
        .map_err(query_err("watch state"))?;
        Ok(WatchState {
            generation: u64::try_from(generation).unwrap_or(0),
            tasks_queued: u64::try_from(queued).unwrap_or(0),
        })
    }

    /// [`Storage::watch_state`] of every node that has a desired state or queued tasks.
    pub async fn watch_states(
        &self,
    ) -> Result<std::collections::HashMap<String, WatchState>, StorageError> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT d.node_id, d.generation,
                    (SELECT COUNT(*) FROM tasks t WHERE t.node_id = d.node_id
                         AND t.state = 'queued')
             FROM desired_state d",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("watch states"))?;
        Ok(rows
            .into_iter()
            .map(|(node, generation, queued)| {
                (
                    node,
                    WatchState {
                        generation: u64::try_from(generation).unwrap_or(0),
                        tasks_queued: u64::try_from(queued).unwrap_or(0),
                    },
                )
            })
            .collect())
    }

    /// A connection of its own that tells whether anything a watch waits on may have been
    /// committed since it last looked, by this process or another replica.
    pub async fn change_probe(&self) -> Result<ChangeProbe, StorageError> {
        Ok(match &self.backend {
            Backend::Sqlite(sqlite) => ChangeProbe::Sqlite(sqlite.probe().await?),
            Backend::Postgres(postgres) => ChangeProbe::Postgres(postgres.probe().await?),
        })
    }
}

/// What may have changed in the watch states since a [`ChangeProbe`] last looked.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// Nothing.
    None,
    /// The watch states of these nodes (and no others).
    Nodes(std::collections::HashSet<String>),
    /// Anything: the first look, or notifications were lost.
    All,
}

/// See [`Storage::change_probe`]: SQLite's change log (migration 0009) on a connection of its
/// own, or PostgreSQL's `LISTEN`.
#[derive(Debug)]
pub enum ChangeProbe {
    /// On SQLite.
    Sqlite(super::sqlite::ChangeLog),
    /// On PostgreSQL.
    Postgres(super::postgres::Notifications),
}

impl ChangeProbe {
    /// What may have changed since the last call ([`Changes::All`] on the first).
    pub async fn changed(&mut self) -> Result<Changes, StorageError> {
        match self {
            Self::Sqlite(probe) => probe.changed().await,
            Self::Postgres(probe) => Ok(probe.changed()),
        }
    }
}
