//! identitymgr: who this node is. Runs the identity cascade ([`cascade`], docs/identity.md)
//! and publishes the result as `identitymgr/NodeIdentity` (key `global`).
//!
//! # States
//!
//! The agent is one [`State`] at a time:
//!
//! ```text
//!            start
//!              │
//!              ▼
//!   ┌────► Resolving ──── a source (or generation) yields a UUID ───► Resolved ──┐
//!   │          │                                                        ▲      │
//!   │          └── no UUID ──► Unresolvable{retry_at}                   └──────┘
//!   │                                │                                  (stays until
//!   └──────── retry_at reached ──────┘                                   shutdown)
//! ```
//!
//! Every state publishes before it waits; `ready()` is sent after the first publish. The retry
//! delay starts at [`RETRY_INITIAL`] and doubles up to [`RETRY_MAX`]. Once resolved the
//! identity does not change until the agent restarts. In every state the main loop beats
//! (`ctx.beat()`) and shutdown ends it at once.
//!
//! # Events
//!
//! Each outcome is compared with the `NodeIdentity` published before it (this run's, or the
//! checkpoint a restart reloads): `identity.resolved` when the node becomes resolved or its
//! uuid, name or source changes; `identity.unresolvable` when it becomes unresolvable or the
//! sources' reasons change — not again for a retry that fails the same way ([`events`]).

pub mod cascade;
pub mod cloud;
pub mod cmdline;
pub mod dmi;
pub mod events;
pub mod fwcfg;
pub mod identitycfg;
pub mod validate;

use std::time::Duration;

use agentbase::{Context, Root};
use anyhow::Context as _;
use powernode_types::{IdentityState, NodeIdentity};
use tokio::time::Instant;

use crate::cascade::{describe, Cascade, Facts, Outcome};

/// The first delay before retrying an unresolvable identity.
pub const RETRY_INITIAL: Duration = Duration::from_secs(1);
/// The longest delay between retries.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Where the kernel's boot id is read from, under the root.
pub const BOOT_ID_PATH: &str = "proc/sys/kernel/random/boot_id";
/// The configured hostname, under the root.
pub const HOSTNAME_PATH: &str = "etc/hostname";
/// The kernel's (uname) hostname, under the root: used when `etc/hostname` is absent.
pub const KERNEL_HOSTNAME_PATH: &str = "proc/sys/kernel/hostname";

/// The agent's state.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Running the cascade.
    Resolving {
        /// The delay to use if this attempt fails too.
        next_backoff: Duration,
    },
    /// A UUID was found (or generated) and published; final until restart.
    Resolved,
    /// No source yielded a UUID; published as `Unresolvable` with every source's reason.
    Unresolvable {
        /// When the cascade runs again.
        retry_at: Instant,
        /// The delay after the next failure.
        next_backoff: Duration,
    },
}

/// The agent's entry point: see the crate documentation.
pub async fn run(ctx: Context) -> anyhow::Result<()> {
    let publication = ctx
        .open_publication::<NodeIdentity>()
        .context("opening NodeIdentity")?;
    let cascade = Cascade::new(ctx.root.clone(), ctx.settings.identity.clone())
        .context("building the metadata HTTP client")?;
    let mut tick = tokio::time::interval(ctx.beat_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = State::Resolving {
        next_backoff: RETRY_INITIAL,
    };
    loop {
        state = match state {
            State::Resolving { next_backoff } => {
                let attempt = cascade.run();
                tokio::pin!(attempt);
                let outcome = loop {
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return Ok(()),
                        _ = tick.tick() => ctx.beat(),
                        outcome = &mut attempt => break outcome,
                    }
                };
                let reasons = events::reasons(&outcome);
                let identity = node_identity(&ctx.root, outcome).await;
                let previous = publication.get(powernode_types::GLOBAL_KEY);
                publication
                    .publish(&identity)
                    .context("publishing NodeIdentity")?;
                events::raise(&ctx.events, previous.as_ref(), &identity, &reasons);
                ctx.ready();
                match identity.state {
                    IdentityState::Resolved => {
                        // A longer backoff means an earlier attempt failed and reported it.
                        if next_backoff > RETRY_INITIAL {
                            ctx.health.clear_error();
                        }
                        ctx.status(&format!(
                            "resolved {} from {:?}",
                            identity.uuid.as_deref().unwrap_or_default(),
                            identity.source
                        ));
                        State::Resolved
                    }
                    IdentityState::Unresolvable => {
                        let error = identity.last_error.unwrap_or_default();
                        tracing::warn!(
                            retry_in_s = next_backoff.as_secs(),
                            %error,
                            "identity unresolvable"
                        );
                        ctx.health
                            .report_error(&format!("identity unresolvable: {error}"));
                        ctx.status("identity unresolvable; retrying");
                        State::Unresolvable {
                            retry_at: Instant::now() + next_backoff,
                            next_backoff: (next_backoff * 2).min(RETRY_MAX),
                        }
                    }
                }
            }
            State::Resolved => {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    _ = tick.tick() => ctx.beat(),
                }
                State::Resolved
            }
            State::Unresolvable {
                retry_at,
                next_backoff,
            } => {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    _ = tick.tick() => {
                        ctx.beat();
                        State::Unresolvable { retry_at, next_backoff }
                    }
                    _ = tokio::time::sleep_until(retry_at) => State::Resolving { next_backoff },
                }
            }
        };
    }
}

/// The topic value for a cascade outcome, with the facts about the machine beside it.
pub async fn node_identity(root: &Root, outcome: Outcome) -> NodeIdentity {
    let mut notes = Vec::new();
    let boot_id = match read_trimmed(root, BOOT_ID_PATH).await {
        Ok(id) => id,
        Err(e) => {
            notes.push(format!("boot id: {e}"));
            String::new()
        }
    };
    let hostname = hostname(root).await.unwrap_or_else(|e| {
        notes.push(format!("hostname: {e}"));
        String::new()
    });
    let dmi_uuid = dmi::read(root).await.ok();
    let (state, uuid, source, facts, error) = match outcome {
        Outcome::Resolved {
            uuid,
            source,
            facts,
            attempts,
        } => (
            IdentityState::Resolved,
            Some(uuid),
            Some(source),
            facts,
            describe(&attempts, |e| e.is_misbehaviour()),
        ),
        Outcome::Unresolvable { attempts } => (
            IdentityState::Unresolvable,
            None,
            None,
            Facts::default(),
            Some(describe(&attempts, |_| true).unwrap_or_else(|| "no sources enabled".to_owned())),
        ),
    };
    let last_error = error.into_iter().chain(notes).collect::<Vec<_>>();
    NodeIdentity {
        state,
        uuid,
        source,
        boot_id,
        hostname,
        arch: oci_arch(std::env::consts::ARCH, cfg!(target_endian = "little")).to_owned(),
        dmi_uuid,
        bootstrap_token: facts.bootstrap_token,
        controller_urls: facts.controller_urls,
        ca_pem: facts.ca_pem,
        last_error: (!last_error.is_empty()).then(|| last_error.join("; ")),
    }
}

/// `etc/hostname` (first line that is not a comment), else the kernel's hostname.
async fn hostname(root: &Root) -> Result<String, String> {
    match tokio::fs::read_to_string(root.path(HOSTNAME_PATH)).await {
        Ok(text) => {
            if let Some(name) = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
            {
                return Ok(name.to_owned());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", root.path(HOSTNAME_PATH).display())),
    }
    read_trimmed(root, KERNEL_HOSTNAME_PATH).await
}

async fn read_trimmed(root: &Root, rel: &str) -> Result<String, String> {
    let path = root.path(rel);
    let text = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("{}: empty", path.display()));
    }
    Ok(text.to_owned())
}

/// Rust's `std::env::consts::ARCH` in OCI (GOARCH) notation; unknown names pass through.
pub fn oci_arch(rust_arch: &str, little_endian: bool) -> &str {
    match (rust_arch, little_endian) {
        ("x86_64", _) => "amd64",
        ("x86", _) => "386",
        ("aarch64", _) => "arm64",
        ("arm", _) => "arm",
        ("riscv64", _) => "riscv64",
        ("powerpc64", true) => "ppc64le",
        ("powerpc64", false) => "ppc64",
        ("s390x", _) => "s390x",
        ("loongarch64", _) => "loong64",
        ("mips64", true) => "mips64le",
        ("mips64", false) => "mips64",
        ("mips", true) => "mipsle",
        ("mips", false) => "mips",
        (other, _) => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_table() {
        let cases = [
            ("x86_64", true, "amd64"),
            ("aarch64", true, "arm64"),
            ("x86", true, "386"),
            ("arm", true, "arm"),
            ("riscv64", true, "riscv64"),
            ("powerpc64", true, "ppc64le"),
            ("powerpc64", false, "ppc64"),
            ("s390x", false, "s390x"),
            ("loongarch64", true, "loong64"),
            ("mips64", true, "mips64le"),
            ("sparc64", false, "sparc64"),
        ];
        for (rust, le, want) in cases {
            assert_eq!(oci_arch(rust, le), want, "{rust}");
        }
    }
}
