//! A reader in a tight loop: a thread that opens and reads one file over and over and counts
//! the opens or reads that fail or find anything but the expected contents. Shared by
//! `tests/heal.rs` and `examples/bench-switch.rs` (included there by path).

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The running reader.
pub struct Reader {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// Starts reading `path`, which must hold one of `expected`.
    pub fn start(path: PathBuf, expected: &'static [&'static str]) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, failures, reads) = (stop.clone(), failures.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut text = String::new();
                while !stop.load(Ordering::Relaxed) {
                    text.clear();
                    let ok = std::fs::File::open(&path)
                        .and_then(|mut f| f.read_to_string(&mut text))
                        .is_ok_and(|_| expected.contains(&text.as_str()));
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Reader {
            stop,
            failures,
            reads,
            thread: Some(thread),
        }
    }

    /// Stops it; (failures, reads).
    pub fn stop(mut self) -> (u64, u64) {
        self.end();
        (
            self.failures.load(Ordering::Relaxed),
            self.reads.load(Ordering::Relaxed),
        )
    }

    fn end(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.end();
    }
}

/// The value at quantile `q` (0..=1) of `times`, sorted in place.
pub fn quantile(times: &mut [f64], q: f64) -> f64 {
    times.sort_by(f64::total_cmp);
    if times.is_empty() {
        return 0.0;
    }
    times[((times.len() - 1) as f64 * q).round() as usize]
}
