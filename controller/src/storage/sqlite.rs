//! The embedded backend: an SQLite file in the data directory (the default; nothing to
//! install). What only SQLite has is here: its migrations (migrations/sqlite, with the
//! heartbeat-trim trigger and AUTOINCREMENT), its PRAGMAs, the WAL checkpoint that makes a
//! commit durable, and the watch change log its triggers write.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AnyPool, ConnectOptions, Connection, Executor, SqliteConnection};

use super::{query_err, Changes, StorageError};

/// File name of the database in the data directory.
pub const DB_FILE: &str = "controller.db";

/// Connections of the pool: SQLite runs one writer at a time, so more would only queue.
const POOL_SIZE: u32 = 4;

/// What the backend keeps besides the pool.
#[derive(Clone, Debug)]
pub(super) struct Sqlite {
    /// How a connection of its own is opened (the change probe); boxed, being large.
    options: Box<SqliteConnectOptions>,
}

/// Opens (creating if needed) `DIR/controller.db` and applies the migrations.
pub(super) async fn open(dir: &Path) -> Result<(AnyPool, Sqlite), StorageError> {
    let path = dir.join(DB_FILE);
    let open_err = |source| StorageError::Open {
        database: path.display().to_string(),
        source,
    };
    let options = SqliteConnectOptions::from_str("sqlite:")
        .map_err(open_err)?
        .filename(&path)
        .create_if_missing(true)
        // WAL is a property of the file: set here once, every later connection has it.
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    let mut conn = options.connect().await.map_err(open_err)?;
    sqlx::migrate!("./migrations/sqlite")
        .run(&mut conn)
        .await
        .map_err(|source| StorageError::Migrate {
            database: path.display().to_string(),
            source,
        })?;
    conn.close().await.map_err(open_err)?;
    let pool = super::pool_options(POOL_SIZE)
        // The shared pool speaks through sqlx's Any driver, which takes a URL only: what the
        // URL cannot say is said to each new connection.
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
                     PRAGMA busy_timeout = 10000;",
                )
                .await
                .map(drop)
            })
        })
        .connect(&url_of(&path)?)
        .await
        .map_err(open_err)?;
    Ok((
        pool,
        Sqlite {
            options: Box::new(options),
        },
    ))
}

/// `sqlite://PATH` with PATH percent-encoded (sqlx decodes it), so a file name with `?`, `#`
/// or `%` stays itself.
fn url_of(path: &Path) -> Result<String, StorageError> {
    let text = path.to_str().ok_or_else(|| StorageError::Open {
        database: path.display().to_string(),
        source: sqlx::Error::Configuration("the database path is not UTF-8".into()),
    })?;
    let mut url = String::from("sqlite://");
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"/._-~".contains(&byte) {
            url.push(char::from(byte));
        } else {
            url.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(url)
}

impl Sqlite {
    /// Makes everything committed so far survive a power loss. The database runs WAL with
    /// `synchronous=NORMAL` (a commit does not wait for a disk sync: heartbeats, the bulk of
    /// writes, may lose their last second in a power cut), but credentials and desired state
    /// must not: after such a change, a checkpoint syncs the WAL (SQLite syncs it before every
    /// checkpoint in this mode) and with it the change.
    pub(super) async fn durable(
        &self,
        pool: &AnyPool,
        what: &'static str,
    ) -> Result<(), StorageError> {
        sqlx::query("PRAGMA wal_checkpoint(FULL)")
            .execute(pool)
            .await
            .map_err(query_err(what))?;
        Ok(())
    }

    /// A connection of its own that reads the watch change log (migration 0009).
    pub(super) async fn probe(&self) -> Result<ChangeLog, StorageError> {
        let conn = self
            .options
            .connect()
            .await
            .map_err(query_err("open the change probe"))?;
        Ok(ChangeLog { conn, last: None })
    }
}

/// See [`Sqlite::probe`]: the rows of `watch_changes` past the last one read, each naming a
/// node whose watch state may have changed. SQLite has one writer at a time, so rows commit in
/// `seq` order and none can appear below one already read.
#[derive(Debug)]
pub struct ChangeLog {
    conn: SqliteConnection,
    /// The newest row read (and deleted); `None` before the first look.
    last: Option<i64>,
}

impl ChangeLog {
    /// The nodes named since the last call; [`Changes::All`] on the first.
    pub async fn changed(&mut self) -> Result<Changes, StorageError> {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT seq, node_id FROM watch_changes WHERE seq > $1 ORDER BY seq")
                .bind(self.last.unwrap_or(0))
                .fetch_all(&mut self.conn)
                .await
                .map_err(query_err("read watch changes"))?;
        let first = self.last.is_none();
        let Some(&(newest, _)) = rows.last() else {
            self.last = Some(self.last.unwrap_or(0));
            return Ok(if first { Changes::All } else { Changes::None });
        };
        sqlx::query("DELETE FROM watch_changes WHERE seq <= $1")
            .bind(newest)
            .execute(&mut self.conn)
            .await
            .map_err(query_err("delete read watch changes"))?;
        self.last = Some(newest);
        Ok(if first {
            Changes::All
        } else {
            Changes::Nodes(rows.into_iter().map(|(_, node)| node).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_percent_encoded_into_the_url() {
        let url = url_of(Path::new("/tmp/a b/c?d#e%f/controller.db")).unwrap();
        assert_eq!(url, "sqlite:///tmp/a%20b/c%3Fd%23e%25f/controller.db");
    }
}
