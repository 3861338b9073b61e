//! Every publication under a root, with its item count and whether its publisher is up.

use powernode_pubsub::inspect::{self, PublicationInfo};
use powernode_pubsub::Dirs;

/// One publication found under the root.
#[derive(Clone, Debug)]
pub struct Row {
    /// Where it lives.
    pub info: PublicationInfo,
    /// Items in it, counted from its checkpoint files (one per item, written on every publish).
    pub items: usize,
    /// Whether a publisher accepts connections on its socket now.
    pub up: bool,
}

/// Every publication under `dirs` (live sockets and checkpoint directories), sorted by name.
pub async fn rows(dirs: &Dirs) -> Vec<Row> {
    let mut rows = Vec::new();
    for info in inspect::list(dirs) {
        let up = info.is_up().await;
        rows.push(Row {
            items: info.checkpoint_count(),
            up,
            info,
        });
    }
    rows
}
