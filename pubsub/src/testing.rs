//! Test support: topic types for the pubsub's own integration tests and benchmark
//! (`pubsub-peer`), and the one place every test in the workspace decides that it cannot run
//! on this machine ([`require`], [`skip`]).
//!
//! The topics are real topics, published over real sockets; they exist so the library can be
//! exercised by separate processes without depending on any agent's types.

use powernode_types::Topic;
use serde::{Deserialize, Serialize};

/// A test item: a key, a sequence number, a send timestamp and a payload of chosen size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestItem {
    /// The item's key.
    pub key: String,
    /// Grows with every publish of the sender.
    pub seq: u64,
    /// `CLOCK_MONOTONIC` nanoseconds at publish time (comparable across processes).
    pub sent_ns: u64,
    /// Filler bytes.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl Topic for TestItem {
    const NAME: &'static str = "TestItem";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = false;
    fn key(&self) -> String {
        self.key.clone()
    }
}

/// The same item on a persistent topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentTestItem(pub TestItem);

impl Topic for PersistentTestItem {
    const NAME: &'static str = "PersistentTestItem";
    const SCHEMA_VERSION: u32 = 1;
    const PERSISTENT: bool = true;
    fn key(&self) -> String {
        self.0.key.clone()
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the same clock in every process of the machine.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// A tmpfs of a chosen size mounted on a fresh temporary directory, unmounted (lazily) and
/// removed when dropped: how the tests give `persist` a disk that fills up. Mounting needs
/// root.
pub struct SmallTmpfs {
    dir: std::path::PathBuf,
}

impl SmallTmpfs {
    /// Mounts a tmpfs of `size` (mount(8) syntax: `2m`, `512k`) on a new directory.
    pub fn mount(size: &str) -> std::io::Result<SmallTmpfs> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pn-tmpfs-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()?;
        if !status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(std::io::Error::other(format!(
                "mount -t tmpfs on {} failed: {status}",
                dir.display()
            )));
        }
        Ok(SmallTmpfs { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }

    /// Fills the file system up with a file named `name` (everything but less than one
    /// block is then taken); removing that file gives the space back.
    pub fn fill(&self, name: &str) -> std::io::Result<std::path::PathBuf> {
        use std::io::Write;
        let path = self.dir.join(name);
        let mut f = std::fs::File::create(&path)?;
        let block = vec![0xa5u8; 4096];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e),
            }
        }
        // Small writes take the last partial block.
        while f.write_all(&[0]).is_ok() {}
        Ok(path)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        // Lazily, so a file still open in a child that outlived its test cannot keep it.
        let unmounted = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if unmounted {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// The environment variable that, set to `true`, turns every skip into a failure.
pub const CI_ENV: &str = "CI";

/// Whether this machine has everything a test needs; each of `needs` is `"root"` (effective
/// uid 0) or a program looked up on `PATH`. When one is missing the test should return at
/// once: this reports it through [`skip`], which panics under `CI=true`.
///
/// ```no_run
/// # fn test() {
/// if !powernode_pubsub::testing::require(&["root", "mkfs.erofs"]) {
///     return;
/// }
/// # }
/// ```
#[track_caller]
pub fn require(needs: &[&str]) -> bool {
    match needs.iter().find(|need| !present(need)) {
        None => true,
        Some(&"root") => {
            skip("needs root");
            false
        }
        Some(missing) => {
            skip(&format!("needs {missing}, which is not on PATH"));
            false
        }
    }
}

/// Reports that the running test cannot run here, and `why`. Prints `skipped <test>: <why>`;
/// when the environment variable [`CI_ENV`] is `true` it panics instead, so that CI can never
/// pass by testing nothing (`.ci/run` runs as root and installs every tool the tests use).
#[track_caller]
pub fn skip(why: &str) {
    let ci = std::env::var(CI_ENV).is_ok_and(|v| v == "true");
    report_skip(ci, why);
}

#[track_caller]
fn report_skip(ci: bool, why: &str) {
    let thread = std::thread::current();
    // libtest runs each test on a thread named after it.
    let test = thread.name().unwrap_or("a test");
    if ci {
        panic!("{test} cannot run: {why}; under {CI_ENV}=true a test may not skip");
    }
    eprintln!("skipped {test}: {why}");
}

/// Whether `need` is met: `"root"` is the effective uid, anything else an executable file in
/// one of `PATH`'s directories.
fn present(need: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    if need == "root" {
        return nix::unistd::geteuid().is_root();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(need))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_are_root_or_programs_on_path() {
        assert_eq!(present("root"), nix::unistd::geteuid().is_root());
        assert!(present("sh"));
        assert!(!present("powernode-no-such-tool"));
    }

    #[test]
    fn a_skip_is_a_line_outside_ci() {
        report_skip(false, "needs nothing");
    }

    #[test]
    #[should_panic(expected = "under CI=true a test may not skip")]
    fn a_skip_fails_under_ci() {
        report_skip(true, "needs powernode-no-such-tool");
    }
}
