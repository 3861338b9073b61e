//! Local assignments: modules a node runs without a controller, one file per module in
//! `etc/powernode/modules.d/<name>.toml`, written by `powernode-agent attach` (or by hand)
//! and read by modulemgr. They are configuration, like `agent.toml`, and survive reboots.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The directory under the root.
pub const DIR: &str = "etc/powernode/modules.d";

/// One local assignment.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalModule {
    /// The module's name (also the file's stem).
    pub name: String,
    /// Its reference, `registry/repository:tag` or `…@sha256:…`.
    pub reference: String,
    /// Its stacking priority; without one, the module manifest's default is used (a file
    /// written before priorities were optional always names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

/// Why a local assignment could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a valid assignment.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Whether `name` may be a module name (it becomes a file name and a pubsub key): the one
/// rule of [`crate::format::is_module_name`].
pub fn valid_name(name: &str) -> bool {
    crate::format::is_module_name(name)
}

/// The name a reference gets when none is given: the last part of its repository.
pub fn default_name(reference: &str) -> String {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last).to_owned()
}

/// Reads every `*.toml` in `dir`. Good files are returned; each bad file is an error beside
/// them, so one bad file does not hide the others.
pub fn read_all(dir: &Path) -> (BTreeMap<String, LocalModule>, Vec<LocalError>) {
    let mut modules = BTreeMap::new();
    let mut errors = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (modules, errors),
        Err(source) => {
            errors.push(LocalError::Io {
                path: dir.to_owned(),
                source,
            });
            return (modules, errors);
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        match read_one(&path) {
            Ok(m) => {
                modules.insert(m.name.clone(), m);
            }
            Err(e) => errors.push(e),
        }
    }
    (modules, errors)
}

fn read_one(path: &Path) -> Result<LocalModule, LocalError> {
    let text = fs::read_to_string(path).map_err(|source| LocalError::Io {
        path: path.to_owned(),
        source,
    })?;
    let module: LocalModule = toml::from_str(&text).map_err(|e| LocalError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if !valid_name(&module.name) || stem != module.name {
        return Err(LocalError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "name {:?} must be a plain name equal to the file's stem",
                module.name
            ),
        });
    }
    Ok(module)
}

/// Writes `module` to `dir/<name>.toml` atomically and durably, mode 0644
/// ([`powernode_atomicfile::write_atomic`]); the directory is created if missing.
pub fn write(dir: &Path, module: &LocalModule) -> Result<PathBuf, LocalError> {
    let path = dir.join(format!("{}.toml", module.name));
    if !valid_name(&module.name) {
        return Err(LocalError::Invalid {
            path,
            reason: format!("{:?} is not a valid module name", module.name),
        });
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| LocalError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let text = toml::to_string(module).map_err(|e| LocalError::Invalid {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    powernode_atomicfile::write_atomic(&path, text.as_bytes(), 0o644).map_err(|e| {
        LocalError::Io {
            path: e.path,
            source: e.source,
        }
    })?;
    Ok(path)
}

/// Removes `dir/<name>.toml`; `Ok(false)` if there was none.
pub fn remove(dir: &Path, name: &str) -> Result<bool, LocalError> {
    if !valid_name(name) {
        return Ok(false);
    }
    let path = dir.join(format!("{name}.toml"));
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(LocalError::Io { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names() {
        assert_eq!(default_name("127.0.0.1:5000/modules/tools:1.0"), "tools");
        assert_eq!(default_name("reg/x/base@sha256:00"), "base");
        assert_eq!(default_name("reg:5000/a"), "a");
    }

    #[test]
    fn round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let m = LocalModule {
            name: "tools".into(),
            reference: "127.0.0.1:5000/m/tools:1".into(),
            priority: Some(7),
        };
        let path = write(dir.path(), &m).unwrap();
        // Written whole, readable by all (it is configuration), nothing else left beside it.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tools.toml"]);
        fs::write(dir.path().join("bad.toml"), "name = 3").unwrap();
        fs::write(
            dir.path().join("other.toml"),
            "name = \"x\"\nreference = \"r\"\npriority = 1\n",
        )
        .unwrap();
        // Without a priority: none is written, none is read (the manifest's is used).
        let plain = LocalModule {
            name: "plain".into(),
            reference: "127.0.0.1:5000/m/plain:1".into(),
            priority: None,
        };
        let plain_path = write(dir.path(), &plain).unwrap();
        assert!(!fs::read_to_string(&plain_path)
            .unwrap()
            .contains("priority"));
        let (good, bad) = read_all(dir.path());
        assert_eq!(good.into_values().collect::<Vec<_>>(), vec![plain, m]);
        assert_eq!(bad.len(), 2);
        assert!(remove(dir.path(), "tools").unwrap());
        assert!(!remove(dir.path(), "tools").unwrap());
        assert!(!remove(dir.path(), "../etc").unwrap());
    }
}
