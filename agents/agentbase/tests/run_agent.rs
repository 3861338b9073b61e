//! `run_agent` end to end, in-process, against a temporary root.

use std::ffi::OsString;
use std::path::Path;

use agentbase::{exit_code, run_agent, AgentError};

fn args(root: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["testagent".into(), "--root".into(), root.into()];
    v.extend(extra.iter().map(OsString::from));
    v
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn runs_main_with_settings_and_root() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "etc/powernode/agent.toml",
        "log_level = \"debug\"\ntouch_interval_s = 7\n",
    );
    write(
        dir.path(),
        "etc/powernode/agent.toml.d/50-pubsub.toml",
        "[pubsub]\nconnect_timeout_ms = 500\n",
    );
    let root_path = dir.path().to_owned();
    let result = run_agent("testagent", args(dir.path(), &[]), move |ctx| async move {
        assert_eq!(ctx.agent, "testagent");
        assert_eq!(ctx.root.base(), root_path);
        assert_eq!(ctx.settings.log_level, "debug");
        assert_eq!(ctx.settings.touch_interval_s, 7);
        assert_eq!(ctx.settings.pubsub.connect_timeout_ms, 500);
        assert!(!ctx.shutdown.is_cancelled());
        // The future runs inside a multi-thread runtime.
        let flavor = tokio::runtime::Handle::current().runtime_flavor();
        assert_eq!(flavor, tokio::runtime::RuntimeFlavor::MultiThread);
        ctx.ready();
        assert!(ctx.is_ready());
        ctx.liveness.beat();
        assert_eq!(
            ctx.liveness.path(),
            root_path.join("run/powernode/testagent.touch")
        );
        Ok(())
    });
    result.unwrap();
    assert!(dir.path().join("run/powernode/testagent.touch").is_file());
}

#[test]
fn tracked_tasks_drain_after_main_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    run_agent("testagent", args(dir.path(), &[]), move |ctx| async move {
        let token = ctx.shutdown.clone();
        ctx.tasks.spawn(async move {
            token.cancelled().await;
            // Work that takes a while after the signal, e.g. flushing a buffer.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            tx.send("flushed").unwrap();
        });
        Ok(())
    })
    .unwrap();
    // run_agent has returned: the task must already have finished.
    assert_eq!(rx.try_recv(), Ok("flushed"));
}

#[test]
fn bad_settings_exit_2_without_running_main() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "etc/powernode/agent.toml.d/10-x.toml",
        "lgo_level = \"debug\"\n",
    );
    let err = run_agent("testagent", args(dir.path(), &[]), |_ctx| async {
        panic!("main ran with invalid settings")
    })
    .unwrap_err();
    assert!(matches!(err, AgentError::Settings(_)), "{err:?}");
    assert_eq!(err.exit_code(), 2);
    let text = err.to_string();
    assert!(
        text.contains("agent.toml.d/10-x.toml:1:1: unknown field `lgo_level`"),
        "{text}"
    );
    assert_eq!(
        exit_code("testagent", Err(err)),
        std::process::ExitCode::from(2)
    );
}

#[test]
fn usage_error_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_agent(
        "testagent",
        args(dir.path(), &["--frobnicate"]),
        |_ctx| async { panic!("main ran after a usage error") },
    )
    .unwrap_err();
    assert!(matches!(err, AgentError::Usage(_)), "{err:?}");
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn help_is_success_without_running_main() {
    let result = run_agent(
        "testagent",
        vec!["testagent".into(), "--help".into()],
        |_ctx| async { panic!("main ran after --help") },
    );
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn main_failure_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_agent("testagent", args(dir.path(), &[]), |_ctx| async {
        Err(anyhow::anyhow!("disk on fire").context("writing checkpoint"))
    })
    .unwrap_err();
    assert!(matches!(err, AgentError::Failed(_)), "{err:?}");
    assert_eq!(err.exit_code(), 1);
    assert!(err.was_logged());
    assert_eq!(format!("{err:#}"), "writing checkpoint: disk on fire");
}
