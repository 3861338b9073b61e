//! The settings target: what an operator (or a tool, or a half-finished write) left in
//! `etc/powernode/agent.toml` and `agent.toml.d/`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use agentbase::settings::{self, Settings, SettingsError, BASE_FILE, DROPIN_DIR};

/// The files one input is cut into, in merge order: the base file, then two drop-ins.
const FILES: [&str; 3] = [
    BASE_FILE,
    "agent.toml.d/10-first.toml",
    "agent.toml.d/20-second.toml",
];

/// The etc directory inputs are written to. Settings are loaded from files only, so the target
/// writes them; one directory per process, made before afl's fork server starts (see
/// [`prepare`]), so every forked child reuses it.
static ETC: OnceLock<PathBuf> = OnceLock::new();

/// Creates this process's etc directory (and removes those that processes no longer running
/// left behind, since afl ends its children with a signal). Called by the harness before the
/// fuzz loop; the target calls it itself otherwise.
pub fn prepare() -> &'static Path {
    ETC.get_or_init(|| {
        let tmp = std::env::temp_dir();
        let prefix = "powernode-fuzz-settings-";
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
                    continue;
                };
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = tmp.join(format!("{prefix}{}", std::process::id()));
        std::fs::create_dir_all(dir.join(DROPIN_DIR)).expect("create the settings directory");
        dir
    })
}

/// Up to three settings files separated by NUL bytes: `agent.toml`, then two drop-ins, loaded
/// with [`Settings::load_from`] (parse each, merge, validate, report the file and field).
///
/// Properties: accepted settings are within their documented ranges; every error displays, and
/// a parse error's position is a real line and column.
pub fn settings(data: &[u8]) {
    let etc = prepare();
    let parts = crate::split(data, FILES.len());
    for (i, file) in FILES.iter().enumerate() {
        let path = etc.join(file);
        match parts.get(i) {
            Some(content) => std::fs::write(&path, content).expect("write a settings file"),
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("remove {}: {e}", path.display()),
            },
        }
    }
    match Settings::load_from(etc) {
        Ok(s) => {
            assert!((1..=3600).contains(&s.touch_interval_s));
            assert!(s.pubsub.connect_timeout_ms > 0);
            assert!(settings::validate_log_level(&s.log_level).is_ok());
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if let SettingsError::Parse {
                position: Some((line, column)),
                ..
            } = e
            {
                assert!(line >= 1 && column >= 1);
            }
        }
    }
}
