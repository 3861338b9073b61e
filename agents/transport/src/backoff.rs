//! Exponential backoff with jitter, for retrying calls to the controller.

use std::time::Duration;

/// Delays that double from `min` to `max`, each with up to ±20% jitter so that a fleet that
/// lost its controller at the same moment does not come back in lock-step.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `min`, never exceeds `max` (before jitter).
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        jitter(base)
    }

    /// The delay before the next attempt, but never longer than `cap`: for failures that
    /// cost the other side nothing (a refused connection), so that recovery after an outage
    /// never waits out a long backoff. A capped delay is spread over [cap/2, cap], so a fleet
    /// that lost its controller at one moment does not come back in lock-step.
    pub fn next_delay_within(&mut self, cap: Duration) -> Duration {
        let delay = self.next_delay();
        if delay <= cap {
            return delay;
        }
        let r = getrandom::u64().unwrap_or(0) % 5001; // 0..=5000
        cap.mul_f64(0.5 + r as f64 / 10_000.0)
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// `d` scaled by a random factor in [0.8, 1.2].
fn jitter(d: Duration) -> Duration {
    let r = getrandom::u64().unwrap_or(0) % 4001; // 0..=4000
    d.mul_f64(0.8 + r as f64 / 10_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_jitters_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let bases = [100u64, 200, 400, 800, 1000, 1000];
        for base in bases {
            let d = b.next_delay().as_secs_f64() * 1000.0;
            let base = base as f64;
            assert!(
                d >= base * 0.8 - 0.001 && d <= base * 1.2 + 0.001,
                "{d} ms for base {base}"
            );
        }
        let capped = b.next_delay_within(Duration::from_millis(300));
        assert!(
            capped >= Duration::from_millis(150) && capped <= Duration::from_millis(300),
            "{capped:?}"
        );
        b.reset();
        let d = b.next_delay().as_millis();
        assert!((80..=120).contains(&d), "{d}");
    }

    #[test]
    fn jitter_varies() {
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|_| jitter(Duration::from_secs(10)).as_millis())
            .collect();
        assert!(delays.len() > 1, "no jitter at all: {delays:?}");
    }
}
