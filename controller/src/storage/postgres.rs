//! The backend for several replicas: a PostgreSQL database (`serve --database postgres://…`)
//! that any number of controllers share. What only PostgreSQL has is here: its migrations
//! (migrations/postgres, with its own heartbeat-trim and change-notification triggers) and
//! `LISTEN powernode_changes`, how a replica learns which nodes another one changed in what a
//! held watch waits on. A commit is durable when it returns (`synchronous_commit` is on by default):
//! nothing more to do for credentials and desired state.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{AnyPool, ConnectOptions, Connection};
use tokio::task::JoinHandle;

use super::{query_err, Changes, StorageError};

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
    let pool = super::pool_options(POOL_SIZE)
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
        // Everything, on the first look: the caller has not read anything yet.
        let heard = Arc::new(Mutex::new(Heard {
            all: true,
            nodes: HashSet::new(),
        }));
        let task = tokio::spawn(listen(listener, Arc::clone(&heard)));
        Ok(Notifications { heard, task })
    }
}

/// Nodes named by notifications not yet taken.
#[derive(Debug)]
struct Heard {
    /// Anything may have changed (the first look; a lost connection; too many nodes).
    all: bool,
    nodes: HashSet<String>,
}

/// Nodes held before [`Heard`] gives up naming them and says "all": a bound on memory when
/// nobody takes them.
const MAX_HEARD: usize = 10_000;

/// Keeps `heard` up to date: each notification's node, and "all" whenever the connection was
/// lost (notifications sent meanwhile are gone).
async fn listen(mut listener: PgListener, heard: Arc<Mutex<Heard>>) {
    let lost = |heard: &Mutex<Heard>| {
        let mut heard = heard.lock().unwrap_or_else(|e| e.into_inner());
        heard.all = true;
        heard.nodes.clear();
    };
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                let mut heard = heard.lock().unwrap_or_else(|e| e.into_inner());
                if heard.nodes.len() >= MAX_HEARD {
                    heard.all = true;
                    heard.nodes.clear();
                } else if !heard.all {
                    heard.nodes.insert(notification.payload().to_owned());
                }
            }
            Ok(None) => {
                tracing::warn!("the change listener lost its connection; reconnecting");
                lost(&heard);
            }
            Err(err) => {
                tracing::warn!(error = %err, "the change listener failed; retrying in 1 s");
                lost(&heard);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// See [`Postgres::probe`]; the listening task ends with it.
#[derive(Debug)]
pub struct Notifications {
    heard: Arc<Mutex<Heard>>,
    task: JoinHandle<()>,
}

impl Notifications {
    /// The nodes announced since the last call; [`Changes::All`] on the first.
    pub fn changed(&self) -> Changes {
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut heard.all) {
            heard.nodes.clear();
            Changes::All
        } else if heard.nodes.is_empty() {
            Changes::None
        } else {
            Changes::Nodes(std::mem::take(&mut heard.nodes))
        }
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
