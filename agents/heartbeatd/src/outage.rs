//! A controller outage as heartbeatd sees it, and its two events: `controller.unreachable`
//! once it has lasted more than N heartbeat intervals, `controller.reachable` when it ends
//! after that (docs/heartbeat.md, "Events"). A short outage raises neither: one lost
//! heartbeat is not news.

use std::time::Duration;

use agentbase::timefmt::{human_ms, rfc3339_ms};
use agentbase::Events;
use powernode_types::Severity;
use tokio::time::Instant;

/// The controller could not be reached for longer than the setting allows.
pub const UNREACHABLE: &str = "controller.unreachable";
/// It answers again after an outage that raised [`UNREACHABLE`].
pub const REACHABLE: &str = "controller.reachable";

/// An outage: from the first failed heartbeat until one succeeds.
#[derive(Debug, Clone)]
pub struct Outage {
    /// The first failure, wall clock (for the event), ms since the epoch.
    since_ms: u64,
    /// The first failure, monotonic (for the length).
    since: Instant,
    /// The controller URLs called (comma-separated when several).
    url: String,
    /// Whether [`UNREACHABLE`] has been raised for it.
    raised: bool,
}

impl Outage {
    /// An outage starting now, of the controller at `url` (its URLs, comma-separated).
    pub fn begin(url: String) -> Outage {
        Outage {
            since_ms: crate::now_ms(),
            since: Instant::now(),
            url,
            raised: false,
        }
    }

    /// Whether [`UNREACHABLE`] has been raised.
    pub fn raised(&self) -> bool {
        self.raised
    }

    /// Raises [`UNREACHABLE`] (Error) the first time the outage has lasted more than
    /// `threshold` (`intervals` heartbeat intervals).
    pub fn check(
        &mut self,
        events: &Events,
        threshold: Duration,
        intervals: u64,
        failures: u32,
        last_error: &str,
    ) {
        let lasted = self.since.elapsed();
        if self.raised || lasted <= threshold {
            return;
        }
        self.raised = true;
        let for_ms = millis(lasted);
        let since = rfc3339_ms(self.since_ms);
        tracing::error!(
            for_ms,
            failures,
            error = %last_error,
            "controller unreachable for more than {intervals} heartbeat intervals"
        );
        events.report(
            Severity::Error,
            UNREACHABLE,
            &format!(
                "controller unreachable since {since} ({}, {failures} failed heartbeats): {last_error}",
                human_ms(for_ms)
            ),
            &[
                ("since_ms", &self.since_ms.to_string()),
                ("since", &since),
                ("for_ms", &for_ms.to_string()),
                ("for", &human_ms(for_ms)),
                ("failures", &failures.to_string()),
                ("intervals", &intervals.to_string()),
                ("threshold_ms", &millis(threshold).to_string()),
                ("last_error", last_error),
                ("url", &self.url),
            ],
        );
    }

    /// The outage is over: raises [`REACHABLE`] (Info) if it had raised [`UNREACHABLE`]; `url`
    /// is the one that answered.
    pub fn ended(self, events: &Events, failures: u32, url: &str) {
        if !self.raised {
            return;
        }
        let outage_ms = millis(self.since.elapsed());
        let outage = human_ms(outage_ms);
        tracing::info!(outage_ms, failures, "controller reachable after an outage");
        events.report(
            Severity::Info,
            REACHABLE,
            &format!("controller reachable again after {outage} ({failures} failed heartbeats)"),
            &[
                ("outage_ms", &outage_ms.to_string()),
                ("outage", &outage),
                ("failures", &failures.to_string()),
                ("since_ms", &self.since_ms.to_string()),
                ("url", url),
            ],
        );
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
