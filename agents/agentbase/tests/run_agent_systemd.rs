//! `run_agent` under a fake systemd: a notify socket in a temporary directory, and a real
//! SIGTERM that drains the agent. One test in its own binary, because it sets process
//! environment variables and raises a signal.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use agentbase::run_agent;
use nix::sys::signal::{raise, Signal};

fn recv(server: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = server
        .recv(&mut buf)
        .expect("no notification within the timeout");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

#[test]
fn ready_watchdog_sigterm_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("notify.sock");
    let server = UnixDatagram::bind(&sock).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The only test in this binary, so nothing reads the environment concurrently.
    std::env::set_var("NOTIFY_SOCKET", &sock);
    std::env::set_var("WATCHDOG_USEC", "4000000");
    std::env::set_var("WATCHDOG_PID", std::process::id().to_string());

    let args = vec!["testagent".into(), "--root".into(), dir.path().into()];
    let result = run_agent("testagent", args, |ctx| async move {
        assert_eq!(
            ctx.liveness.watchdog_interval(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(ctx.beat_interval(), Duration::from_secs(2));
        ctx.ready();
        ctx.ready();
        ctx.liveness.beat();
        ctx.status("serving");
        raise(Signal::SIGTERM).unwrap();
        tokio::time::timeout(Duration::from_secs(10), ctx.shutdown.cancelled())
            .await
            .expect("SIGTERM did not reach the agent");
        Ok(())
    });
    result.unwrap();

    assert_eq!(recv(&server), "READY=1");
    assert_eq!(recv(&server), "WATCHDOG=1");
    assert_eq!(recv(&server), "STATUS=serving");
    assert_eq!(recv(&server), "STOPPING=1");
    server.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(server.recv(&mut buf).is_err(), "more than one STOPPING=1");
}
