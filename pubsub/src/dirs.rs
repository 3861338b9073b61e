//! Where a publication's socket, lock and checkpoints live (DESIGN §3–4).

use std::path::{Path, PathBuf};

/// The two roots the pubsub uses: `<root>/run/powernode` and `<root>/persist/powernode`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dirs {
    /// Sockets, lock files and non-persistent checkpoints (tmpfs on a real node).
    pub run: PathBuf,
    /// Persistent checkpoints, under `status/`.
    pub persist: PathBuf,
}

impl Dirs {
    /// The standard layout under a root prefix (`/` on a real node).
    pub fn under_root(root: impl AsRef<Path>) -> Self {
        let root = root.as_ref();
        Dirs {
            run: root.join("run/powernode"),
            persist: root.join("persist/powernode"),
        }
    }

    /// `<run>/<agent>`: the agent's socket directory, mode 0700.
    pub fn agent_run_dir(&self, agent: &str) -> PathBuf {
        self.run.join(agent)
    }

    /// `<run>/<agent>/<topic>.sock`.
    pub fn socket(&self, agent: &str, topic: &str) -> PathBuf {
        self.agent_run_dir(agent).join(format!("{topic}.sock"))
    }

    /// `<run>/<agent>/.<topic>.lock`: held by the live publisher.
    pub fn lock(&self, agent: &str, topic: &str) -> PathBuf {
        self.agent_run_dir(agent).join(format!(".{topic}.lock"))
    }

    /// `<persist>/status`: the parent of every persistent topic's checkpoints.
    pub fn persist_status(&self) -> PathBuf {
        self.persist.join("status")
    }

    /// The directory holding a topic's checkpoint files.
    pub fn checkpoints(&self, agent: &str, topic: &str, persistent: bool) -> PathBuf {
        if persistent {
            self.persist_status().join(agent).join(topic)
        } else {
            self.agent_run_dir(agent).join(topic)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let d = Dirs::under_root("/r");
        assert_eq!(
            d.socket("enrollmgr", "EnrollmentStatus"),
            Path::new("/r/run/powernode/enrollmgr/EnrollmentStatus.sock")
        );
        assert_eq!(
            d.checkpoints("enrollmgr", "EnrollmentStatus", true),
            Path::new("/r/persist/powernode/status/enrollmgr/EnrollmentStatus")
        );
        assert_eq!(
            d.checkpoints("heartbeatd", "ControllerStatus", false),
            Path::new("/r/run/powernode/heartbeatd/ControllerStatus")
        );
    }
}
