//! Topic types for the pubsub's own integration tests and benchmark (`pubsub-peer`).
//!
//! They are real topics, published over real sockets; they exist so the library can be
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
