//! The one prefix every path hangs from (DESIGN §4).
//!
//! On a real node the root is `/`. Tests and the demo run every agent under a sandbox directory
//! (`--root DIR` or `POWERNODE_ROOT`), so no agent ever names a host path without going through
//! [`Root::path`].

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// Environment variable naming the root when no `--root` flag is given.
pub const ROOT_ENV: &str = "POWERNODE_ROOT";

/// The prefix under which every agent reads and writes its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    base: PathBuf,
}

impl Root {
    /// A root at `path`. A relative path is made absolute against the current directory (without
    /// touching the filesystem), so a later change of directory cannot move the root.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let base = std::path::absolute(&path).unwrap_or(path);
        Root { base }
    }

    /// The root to use: the `--root` flag if given, else `POWERNODE_ROOT` if set and non-empty,
    /// else `/`.
    pub fn resolve(cli: Option<PathBuf>) -> Self {
        Self::resolve_from(cli, std::env::var_os(ROOT_ENV))
    }

    /// [`Root::resolve`] with the environment value passed in, so it can be tested without
    /// touching the process environment.
    pub fn resolve_from(cli: Option<PathBuf>, env: Option<OsString>) -> Self {
        match (cli, env) {
            (Some(flag), _) => Root::new(flag),
            (None, Some(env)) if !env.is_empty() => Root::new(env),
            _ => Root::new("/"),
        }
    }

    /// The root directory itself.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// A host path under the root: `proc/cmdline` and `/proc/cmdline` both become
    /// `<root>/proc/cmdline`. Leading `/` (and any Windows-style prefix) is dropped; `..` is kept
    /// as written, so callers must not pass untrusted input here.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        let mut out = self.base.clone();
        for component in rel.as_ref().components() {
            match component {
                Component::Prefix(_) | Component::RootDir => {}
                Component::CurDir => {}
                Component::ParentDir => out.push(".."),
                Component::Normal(part) => out.push(part),
            }
        }
        out
    }

    /// `<root>/run/powernode`: sockets, non-persistent checkpoints, touch files.
    pub fn run_dir(&self) -> PathBuf {
        self.path("run/powernode")
    }

    /// `<root>/persist/powernode`: PKI, persistent checkpoints, event journal, digest store.
    pub fn persist_dir(&self) -> PathBuf {
        self.path("persist/powernode")
    }

    /// `<root>/etc/powernode`: `agent.toml` and `agent.toml.d/`.
    pub fn etc_dir(&self) -> PathBuf {
        self.path("etc/powernode")
    }

    /// `<root>/run/powernode/<agent>.touch`: the file an agent's main loop keeps fresh.
    pub fn touch_file(&self, agent: &str) -> PathBuf {
        self.run_dir().join(format!("{agent}.touch"))
    }
}

impl Default for Root {
    /// The real host root, `/`.
    fn default() -> Self {
        Root::new("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_joins_under_root() {
        let root = Root::new("/r");
        let cases: &[(&str, &str)] = &[
            ("proc/cmdline", "/r/proc/cmdline"),
            ("/proc/cmdline", "/r/proc/cmdline"),
            ("//proc//cmdline", "/r/proc/cmdline"),
            ("./sys/./class", "/r/sys/class"),
            ("", "/r"),
            ("/", "/r"),
        ];
        for (rel, want) in cases {
            assert_eq!(root.path(rel), PathBuf::from(want), "rel = {rel:?}");
        }
    }

    #[test]
    fn slash_root_gives_host_paths() {
        let root = Root::new("/");
        assert_eq!(root.path("/proc/cmdline"), PathBuf::from("/proc/cmdline"));
        assert_eq!(root.run_dir(), PathBuf::from("/run/powernode"));
    }

    #[test]
    fn well_known_dirs() {
        let root = Root::new("/r");
        assert_eq!(root.base(), Path::new("/r"));
        assert_eq!(root.run_dir(), PathBuf::from("/r/run/powernode"));
        assert_eq!(root.persist_dir(), PathBuf::from("/r/persist/powernode"));
        assert_eq!(root.etc_dir(), PathBuf::from("/r/etc/powernode"));
        assert_eq!(
            root.touch_file("identitymgr"),
            PathBuf::from("/r/run/powernode/identitymgr.touch")
        );
    }

    #[test]
    fn resolve_order() {
        let cases: &[(Option<&str>, Option<&str>, &str)] = &[
            (Some("/flag"), Some("/env"), "/flag"),
            (None, Some("/env"), "/env"),
            (None, Some(""), "/"),
            (None, None, "/"),
            (Some("/flag"), None, "/flag"),
        ];
        for (cli, env, want) in cases {
            let root = Root::resolve_from(cli.map(PathBuf::from), env.map(OsString::from));
            assert_eq!(root.base(), Path::new(want), "cli={cli:?} env={env:?}");
        }
    }

    #[test]
    fn relative_root_becomes_absolute() {
        let root = Root::new("sandbox");
        assert!(root.base().is_absolute());
        assert!(root.base().ends_with("sandbox"));
        assert_eq!(Root::default().base(), Path::new("/"));
    }
}
