//! A log rate limiter for what a misbehaving peer can make repeat (STYLE: "rate-limit what
//! repeats"): a local process connecting in a loop with garbage must not flood the journal.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets `burst` events through per `window`; counts the rest.
#[derive(Debug)]
pub(crate) struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

impl RateLimit {
    pub(crate) const fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            burst,
            window,
            state: Mutex::new(State {
                window_start: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were suppressed before it;
    /// `None` when it must not be.
    pub(crate) fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.window_start
            .is_none_or(|start| now.duration_since(start) >= self.window)
        {
            s.window_start = Some(now);
            s.passed = 0;
        }
        if s.passed < self.burst {
            s.passed += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_silence_then_count() {
        let limit = RateLimit::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(limit.check_at(t0), Some(0));
        assert_eq!(limit.check_at(t0), Some(0));
        assert_eq!(limit.check_at(t0), None);
        assert_eq!(limit.check_at(t0 + Duration::from_secs(59)), None);
        assert_eq!(
            limit.check_at(t0 + Duration::from_secs(60)),
            Some(2),
            "reports what it held back"
        );
        assert_eq!(limit.check_at(t0 + Duration::from_secs(60)), Some(0));
    }
}
