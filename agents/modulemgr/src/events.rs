//! What modulemgr raises (docs/events.md, "Events raised"): a module that became active, a
//! download that keeps failing and the one that then succeeds, a download that failed for
//! good. A failing download is raised at its first failed attempt and again at attempts 4,
//! 16, 64, … — growing intervals, so a registry down for a day makes a handful of events, not
//! one per retry. Each event is built apart from raising it ([`Raised`]): the state machine
//! decides on it, the agent loop raises it.

use std::time::Duration;

pub use agentbase::events::Raised;
use powernode_types::Severity;

/// A module joined the mounted stack (Info).
pub const ACTIVE: &str = "module.active";
/// A module's download failed and is being retried (Warning).
pub const DOWNLOAD_FAILING: &str = "module.download_failing";
/// A module's download succeeded after failing (Info).
pub const DOWNLOAD_RECOVERED: &str = "module.download_recovered";
/// A module's download failed for good: not found, refused, a wrong digest (Error).
pub const DOWNLOAD_FAILED: &str = "module.download_failed";

/// Whether the `attempt`-th failed attempt in a row is raised: the first, then every power
/// of 4.
pub fn failing_worth_raising(attempt: u32) -> bool {
    attempt.is_power_of_two() && attempt.trailing_zeros() % 2 == 0
}

/// `module.active`: `module` (digest `digest`, version `version`) is in the stack of
/// generation `generation`, which mountmgr reports mounted.
pub fn active(
    module: &str,
    reference: &str,
    digest: &str,
    version: &str,
    generation: u64,
) -> Raised {
    Raised {
        severity: Severity::Info,
        kind: ACTIVE,
        message: format!("module {module} {version} is active (stack generation {generation})"),
        fields: vec![
            ("module", module.to_owned()),
            ("reference", reference.to_owned()),
            ("digest", digest.to_owned()),
            ("version", version.to_owned()),
            ("generation", generation.to_string()),
        ],
    }
}

/// `module.download_failing`: the `attempt`-th attempt in a row failed with `error`; the next
/// comes after `retry_in`.
pub fn download_failing(
    module: &str,
    reference: &str,
    error: &str,
    attempt: u32,
    retry_in: Duration,
) -> Raised {
    Raised {
        severity: Severity::Warning,
        kind: DOWNLOAD_FAILING,
        message: format!(
            "downloading module {module} failed (attempt {attempt}), retrying in {:.1}s: {error}",
            retry_in.as_secs_f64()
        ),
        fields: vec![
            ("module", module.to_owned()),
            ("reference", reference.to_owned()),
            ("error", error.to_owned()),
            ("attempt", attempt.to_string()),
            ("retry_in_ms", retry_in.as_millis().to_string()),
        ],
    }
}

/// `module.download_recovered`: the download went through after `failed_attempts` failed
/// attempts over `failing_for`.
pub fn download_recovered(
    module: &str,
    reference: &str,
    failed_attempts: u32,
    failing_for: Duration,
) -> Raised {
    Raised {
        severity: Severity::Info,
        kind: DOWNLOAD_RECOVERED,
        message: format!(
            "module {module} downloaded after {failed_attempts} failed attempts over {:.1}s",
            failing_for.as_secs_f64()
        ),
        fields: vec![
            ("module", module.to_owned()),
            ("reference", reference.to_owned()),
            ("failed_attempts", failed_attempts.to_string()),
            ("failing_for_ms", failing_for.as_millis().to_string()),
        ],
    }
}

/// `module.download_failed`: the fetch ended with `error` and is not retried (the module is
/// Failed until its assignment changes or modulemgr restarts).
pub fn download_failed(module: &str, reference: &str, error: &str) -> Raised {
    Raised {
        severity: Severity::Error,
        kind: DOWNLOAD_FAILED,
        message: format!("module {module} cannot be downloaded: {error}"),
        fields: vec![
            ("module", module.to_owned()),
            ("reference", reference.to_owned()),
            ("error", error.to_owned()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_is_raised_at_growing_intervals() {
        let raised: Vec<u32> = (1..=300).filter(|a| failing_worth_raising(*a)).collect();
        assert_eq!(raised, [1, 4, 16, 64, 256]);
    }
}
