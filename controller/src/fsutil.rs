//! Files in the data directory: written atomically, secrets with mode 0600. The write is the
//! one the node's agents use ([`powernode_atomicfile`]): a temp file of its own created with
//! `O_EXCL` and the exact mode, fsync, rename, fsync the directory.

pub use powernode_atomicfile::{write_atomic, WriteError};
