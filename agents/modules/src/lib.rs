//! The module format and the operations on it (DESIGN §6; docs/modules.md).
//!
//! A module is an OCI artifact: one erofs image layer, the module manifest as config blob, the
//! image's fs-verity digest as an annotation, one platform manifest per architecture under an
//! image index, and cosign signatures beside it. This crate is shared by the operator tooling
//! (`powernode-controller module …`), modulemgr (pull, the local assignments), the verifier
//! (trust policies and the check) and the node's CLI (`attach`, `detach`, `verify`), which runs
//! the same check and writes the same files as the agents.

pub mod check;
pub mod cosign;
pub mod digest;
pub mod follow;
pub mod format;
pub mod fsverity;
pub mod local;
pub mod package;
pub mod policy;
pub mod reference;
pub mod registry;
pub mod sha256x2;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
