//! Typed unix-socket pubsub with file-backed checkpoints (DESIGN §3; docs/pubsub.md).
//!
//! An agent publishes a topic — a map from short keys to typed items — with [`Publication`];
//! other agents follow it with [`Subscription`] and always converge to the publisher's map.
//! Every publish is checkpointed atomically to a file first, so a restarted publisher reloads its
//! map, and subscribers of persistent topics can start from the files before it is up.

pub mod checkpoint;
mod dirs;
mod error;
pub mod frame;
pub mod inspect;
mod key;
mod peer;
mod publication;
mod ratelimit;
mod subscription;
pub mod testing;

pub use dirs::Dirs;
pub use error::{Error, Result};
pub use key::{validate_key, validate_name, MAX_KEY_LEN};
pub use peer::PeerPolicy;
pub use publication::{Publication, PublicationHealth, PublicationStatus};
pub use subscription::{Event, RawEvent, RawSubscription, SubscribeOptions, Subscription};
