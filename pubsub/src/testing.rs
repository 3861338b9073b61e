//! Topic types for the pubsub's own integration tests and benchmark (`pubsub-peer`).
//!
//! They are real topics, published over real sockets; they exist so the library can be
//! exercised by separate processes without depending on any agent's types.

use powernode_types::Topic;
use serde::{Deserialize, Serialize};

/// A test item: a key, a sequence number, a send timestamp and a payload of chosen size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestItem {
    /// The item's key.
    pub key: String,
    /// Grows with every publish of the sender.
    pub seq: u64,
    /// `CLOCK_MONOTONIC` nanoseconds at publish time (comparable across processes).
    pub sent_ns: u64,
    /// Filler bytes.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl Topic for TestItem {
    const NAME: &'static str = "TestItem";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.key.clone()
    }
}

/// The same item on a persistent topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentTestItem(pub TestItem);

impl Topic for PersistentTestItem {
    const NAME: &'static str = "PersistentTestItem";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = true;
    fn key(&self) -> String {
        self.0.key.clone()
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the same clock in every process of the machine.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}
