//! NodeScripts: stored by the operator under the SHA-256 of their text, listed and read back by
//! the operator, and fetched by a node while a task leased to it names them (table `scripts`,
//! migration 0006). The caller computes the digest; this module stores what it is given.

use serde::Serialize;
use sqlx::FromRow;

use super::{query_err, task_state, Storage, StorageError};

/// A stored script.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Script {
    /// `sha256:` and the lowercase hex SHA-256 of the text.
    pub digest: String,
    /// Bytes of the text.
    pub size: u64,
    /// When it was first stored, ms.
    pub created_at_ms: i64,
    /// The text (left out of lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
}

#[derive(FromRow)]
struct ScriptRow {
    digest: String,
    size: i64,
    created_at_ms: i64,
    content: Option<String>,
}

impl From<ScriptRow> for Script {
    fn from(row: ScriptRow) -> Self {
        Script {
            digest: row.digest,
            size: u64::try_from(row.size).unwrap_or(0),
            created_at_ms: row.created_at_ms,
            script: row.content,
        }
    }
}

impl Storage {
    /// Stores `content` under `digest` (its SHA-256, checked by the caller) unless a script
    /// is stored under it already, and answers the stored script without its text: adding the
    /// same text twice changes nothing and answers the same.
    pub async fn add_script(
        &self,
        digest: &str,
        content: &str,
        now_ms: i64,
    ) -> Result<Script, StorageError> {
        let size = i64::try_from(content.len()).unwrap_or(i64::MAX);
        let inserted = sqlx::query(
            "INSERT INTO scripts (digest, content, size, created_at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (digest) DO NOTHING",
        )
        .bind(digest)
        .bind(content)
        .bind(size)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(query_err("add script"))?
        .rows_affected();
        if inserted > 0 {
            // The operator is told the digest to put in tasks: it must survive a power cut.
            self.durable("sync new script").await?;
        }
        let row: ScriptRow = sqlx::query_as(
            "SELECT digest, size, created_at_ms, NULL AS content FROM scripts WHERE digest = $1",
        )
        .bind(digest)
        .fetch_one(&self.pool)
        .await
        .map_err(query_err("read added script"))?;
        Ok(row.into())
    }

    /// Every stored script without its text, oldest first.
    pub async fn scripts(&self) -> Result<Vec<Script>, StorageError> {
        let rows: Vec<ScriptRow> = sqlx::query_as(
            "SELECT digest, size, created_at_ms, NULL AS content FROM scripts
             ORDER BY created_at_ms, digest",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_err("list scripts"))?;
        Ok(rows.into_iter().map(Script::from).collect())
    }

    /// The script stored under `digest`, with its text.
    pub async fn script(&self, digest: &str) -> Result<Option<Script>, StorageError> {
        let row: Option<ScriptRow> = sqlx::query_as(
            "SELECT digest, size, created_at_ms, content FROM scripts WHERE digest = $1",
        )
        .bind(digest)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_err("read script"))?;
        Ok(row.map(Script::from))
    }

    /// The text stored under `digest`, if a task leased to `node_id` now names it as its
    /// `script_digest`: a node reads only the scripts it has been given to run.
    pub async fn script_for_node(
        &self,
        node_id: &str,
        digest: &str,
    ) -> Result<Option<String>, StorageError> {
        // `tasks_by_node_state` narrows the tasks to the node's leased ones (a handful);
        // their arguments are looked into here rather than in SQL, whose JSON functions
        // differ between the backends. Arguments that are not an object name no script.
        let leased: Vec<String> =
            sqlx::query_scalar("SELECT args FROM tasks WHERE node_id = $1 AND state = $2")
                .bind(node_id)
                .bind(task_state::LEASED)
                .fetch_all(&self.pool)
                .await
                .map_err(query_err("read leased tasks"))?;
        let named = leased.iter().any(|args| {
            serde_json::from_str::<serde_json::Value>(args)
                .ok()
                .and_then(|args| args.get("script_digest").cloned())
                .is_some_and(|named| named == digest)
        });
        if !named {
            return Ok(None);
        }
        sqlx::query_scalar("SELECT content FROM scripts WHERE digest = $1")
            .bind(digest)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_err("read script for node"))
    }
}
