//! Which backend the controller tests run on. `make test` runs the controller's suite twice:
//! on the embedded SQLite database, and with `POWERNODE_TEST_POSTGRES` set (by
//! `scripts/with-postgres.sh`, which starts a throwaway PostgreSQL cluster) to the URL of a
//! PostgreSQL server, on which every controller of a test gets a database of its own.

use sqlx::{Connection, Executor, PgConnection};

/// The environment variable naming the PostgreSQL server of the run.
pub const POSTGRES_ENV: &str = "POWERNODE_TEST_POSTGRES";

/// A fresh, empty database on the run's PostgreSQL server (`None`: this run is on SQLite).
pub async fn fresh() -> Option<String> {
    let server = std::env::var(POSTGRES_ENV)
        .ok()
        .filter(|url| !url.is_empty())?;
    Some(create_on(&server).await)
}

/// A fresh, empty database on the PostgreSQL server at `server` (a URL without database).
pub async fn create_on(server: &str) -> String {
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut conn = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap_or_else(|e| panic!("{server}: cannot connect: {e}"));
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    conn.close().await.unwrap();
    format!("{server}/{name}")
}

/// The `serve` arguments that put a controller on `database` (none for SQLite).
pub fn serve_args(database: Option<&str>) -> Vec<String> {
    database
        .map(|url| vec!["--database".to_owned(), url.to_owned()])
        .unwrap_or_default()
}
