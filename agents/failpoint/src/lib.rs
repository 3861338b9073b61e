//! Named crash points for the crash-window tests (DESIGN §7: "every agent restarts cleanly
//! after `kill -9` at any instant").
//!
//! Random kills rarely land in the narrow windows that matter (between a temp file's write and
//! its rename, between two steps of a mount switch). Code marks each window with
//! [`hit`]`("name")`; a test starts the real process with
//! `POWERNODE_FAILPOINTS=name` (or `name:N`, to die at the N-th hit, or several separated by
//! commas), and the process sends itself SIGKILL exactly there: no destructor, no flush, no
//! atexit, as the kernel's OOM killer or `kill -9` would end it. Before dying it writes
//! `failpoint NAME hit` to stderr, so the test can tell the point was reached.
//!
//! Compiled in only with the `enabled` feature, which only test builds turn on (the
//! `powernode-agent` test suite enables it through a dev-dependency); in every other build
//! [`hit`] is an empty function the optimiser removes.

/// The environment variable that arms points: `name[:N][,name[:N]…]`.
pub const ENV: &str = "POWERNODE_FAILPOINTS";

/// Marks a crash window. When the point `name` is armed in [`ENV`], the process kills itself
/// with SIGKILL at the armed hit; otherwise (and always without the `enabled` feature) it
/// does nothing.
#[inline]
pub fn hit(name: &'static str) {
    #[cfg(feature = "enabled")]
    armed::hit(name);
    #[cfg(not(feature = "enabled"))]
    let _ = name;
}

#[cfg(feature = "enabled")]
mod armed {
    use std::io::Write;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;

    /// An armed point and how many more hits it lets pass.
    struct Point {
        name: String,
        remaining: AtomicU32,
    }

    fn points() -> &'static [Point] {
        static POINTS: OnceLock<Vec<Point>> = OnceLock::new();
        POINTS.get_or_init(|| {
            std::env::var(super::ENV)
                .map(|spec| parse(&spec))
                .unwrap_or_default()
        })
    }

    fn parse(spec: &str) -> Vec<Point> {
        spec.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                let (name, nth) = match entry.split_once(':') {
                    Some((name, n)) => (name, n.parse::<u32>().unwrap_or(1).max(1)),
                    None => (entry, 1),
                };
                Point {
                    name: name.to_owned(),
                    remaining: AtomicU32::new(nth),
                }
            })
            .collect()
    }

    pub(super) fn hit(name: &'static str) {
        for point in points().iter().filter(|p| p.name == name) {
            if point.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
                let _ = writeln!(std::io::stderr(), "failpoint {name} hit");
                // SAFETY: kill(2) with our own pid and a valid signal number has no
                // memory-safety preconditions.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_names_and_counts() {
            let points = parse("a, b:3 ,c:0,,d:x");
            let got: Vec<_> = points
                .iter()
                .map(|p| (p.name.as_str(), p.remaining.load(Ordering::SeqCst)))
                .collect();
            assert_eq!(got, [("a", 1), ("b", 3), ("c", 1), ("d", 1)]);
        }
    }
}
