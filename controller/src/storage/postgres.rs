//! The backend for several replicas: a PostgreSQL database (`serve --database postgres://…`)
//! that any number of controllers share. What only PostgreSQL has is here: its migrations
//! (migrations/postgres, with its own heartbeat-trim and change-notification triggers) and
//! `LISTEN powernode_changes`, how a replica learns that another one changed what a held
//! watch waits on. A commit is durable when it returns (`synchronous_commit` is on by default):
//! nothing more to do for credentials and desired state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{AnyPool, ConnectOptions, Connection};
use tokio::task::JoinHandle;

use super::{query_err, StorageError};

/// The channel the migrations' triggers notify on.
pub const CHANGES_CHANNEL: &str = "powernode_changes";

/// Connections of the pool. PostgreSQL runs writers concurrently (row locks), so the pool is
/// wider than SQLite's; a replica needs few more than its busiest moment's statements.
const POOL_SIZE: u32 = 16;

/// What the backend keeps besides the pool.
#[derive(Clone, Debug)]
pub(super) struct Postgres {
    url: String,
}

/// Connects to the database at `url` and applies the migrations (at most one replica at a
/// time: sqlx takes an advisory lock for them).
pub(super) async fn open(url: &str) -> Result<(AnyPool, Postgres), StorageError> {
    let shown = redacted(url);
    let open_err = |source| StorageError::Open {
        database: shown.clone(),
        source,
    };
    let options: PgConnectOptions = url.parse().map_err(open_err)?;
    let mut conn = options.connect().await.map_err(open_err)?;
    sqlx::migrate!("./migrations/postgres")
        .run(&mut conn)
        .await
        .map_err(|source| StorageError::Migrate {
            database: shown.clone(),
            source,
        })?;
    conn.close().await.map_err(open_err)?;
    super::install_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(open_err)?;
    Ok((
        pool,
        Postgres {
            url: url.to_owned(),
        },
    ))
}

/// `url` with its password hidden, for messages and logs.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl Postgres {
    /// A listener on [`CHANGES_CHANNEL`].
    pub(super) async fn probe(&self) -> Result<Notifications, StorageError> {
        let mut listener = PgListener::connect(&self.url)
            .await
            .map_err(query_err("open the change probe"))?;
        listener
            .listen(CHANGES_CHANNEL)
            .await
            .map_err(query_err("listen for changes"))?;
        // Set before the first call: the caller has not looked yet.
        let flag = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(listen(listener, Arc::clone(&flag)));
        Ok(Notifications { flag, task })
    }
}

/// Raises `flag` on every notification, and whenever the connection was lost (notifications
/// sent meanwhile are gone, so something may have changed).
async fn listen(mut listener: PgListener, flag: Arc<AtomicBool>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(_)) => flag.store(true, Ordering::Release),
            Ok(None) => {
                tracing::warn!("the change listener lost its connection; reconnecting");
                flag.store(true, Ordering::Release);
            }
            Err(err) => {
                tracing::warn!(error = %err, "the change listener failed; retrying in 1 s");
                flag.store(true, Ordering::Release);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// See [`Postgres::probe`]; the listening task ends with it.
#[derive(Debug)]
pub struct Notifications {
    flag: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Notifications {
    /// Whether a change was announced since the last call (true on the first).
    pub fn changed(&self) -> bool {
        self.flag.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_hidden_and_nothing_else_changes() {
        assert_eq!(
            redacted("postgres://pn:secret@db:5432/fleet"),
            "postgres://pn:***@db:5432/fleet"
        );
        assert_eq!(redacted("postgres://pn@db/fleet"), "postgres://pn@db/fleet");
        assert_eq!(
            redacted("postgres:///fleet?host=/run"),
            "postgres:///fleet?host=/run"
        );
    }
}
