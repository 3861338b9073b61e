//! The reference powernode controller: a CA that enrolls nodes and rotates their
//! certificates, a heartbeat endpoint that hands out desired state, and an operator API,
//! all over one TLS listener backed by an embedded SQLite database.
//!
//! The rules live in [`service`]; [`api`] serves them over HTTP; the operator commands of
//! [`cli`] are clients of that API ([`client`]). The binary (`src/main.rs`) only parses the
//! command line and dispatches to [`cli`].

pub mod api;
pub mod ca;
pub mod cli;
pub mod client;
pub mod duration;
pub mod errors;
pub mod events;
pub mod events_cli;
pub mod fsutil;
pub mod module_cli;
pub mod network_cli;
pub mod networks;
pub mod script_cli;
pub mod secrets;
pub mod server;
pub mod service;
pub mod storage;
pub mod task_cli;
pub mod tls;
pub mod tokens;
pub mod watch;
pub mod wire;

/// Milliseconds since the Unix epoch, the unit of every timestamp the controller stores.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
