//! SIGTERM/SIGINT handling, with real signals. In its own test binary so the signals cannot
//! reach other tests.

use std::process::Command;
use std::time::Duration;

use agentbase::shutdown::{self, FORCED_EXIT_CODE};
use nix::sys::signal::{raise, Signal};
use tokio_util::sync::CancellationToken;

/// Set in the child process started by `second_signal_exits_at_once`.
const CHILD_ENV: &str = "AGENTBASE_SHUTDOWN_TEST_CHILD";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cancels_the_token() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let token = CancellationToken::new();
    shutdown::install(token.clone()).unwrap();
    assert!(!token.is_cancelled());
    // Raised right after install: the handler must already be in place.
    raise(Signal::SIGTERM).unwrap();
    tokio::time::timeout(Duration::from_secs(10), token.cancelled())
        .await
        .expect("SIGTERM did not cancel the token");
}

/// Runs only in the child: installs, takes one SIGTERM, then a SIGINT while "draining".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_second_signal() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let token = CancellationToken::new();
    shutdown::install(token.clone()).unwrap();
    raise(Signal::SIGTERM).unwrap();
    tokio::time::timeout(Duration::from_secs(10), token.cancelled())
        .await
        .expect("SIGTERM did not cancel the token");
    raise(Signal::SIGINT).unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Reaching here means the second signal did not end the process; the parent sees exit 0
    // or a panic, not FORCED_EXIT_CODE.
    panic!("second signal ignored");
}

#[test]
fn second_signal_exits_at_once() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .args([
            "--exact",
            "child_second_signal",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(FORCED_EXIT_CODE),
        "child: {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
