//! Who may connect to a publication: root, or a process of the agents' own user or group.
//!
//! The socket directory's 0700 mode is the first fence; `SO_PEERCRED` is checked as well, so a
//! directory left open by mistake still lets no other user read the agents' state.

use nix::unistd::{getegid, geteuid};

/// The credentials a peer must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPolicy {
    uid: u32,
    gid: u32,
}

impl PeerPolicy {
    /// The policy for this process: root, our effective uid, or our effective gid (unless that
    /// is root's group, which would admit every member of it).
    pub fn current() -> Self {
        PeerPolicy {
            uid: geteuid().as_raw(),
            gid: getegid().as_raw(),
        }
    }

    /// Whether a peer with these credentials may connect.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || uid == self.uid || (self.gid != 0 && gid == self.gid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let agents = PeerPolicy { uid: 990, gid: 990 };
        assert!(agents.allows(0, 0));
        assert!(agents.allows(990, 100));
        assert!(agents.allows(1000, 990));
        assert!(!agents.allows(1000, 1000));
        let root = PeerPolicy { uid: 0, gid: 0 };
        assert!(root.allows(0, 5));
        assert!(!root.allows(65534, 0), "root's group alone is not enough");
        assert!(!root.allows(65534, 65534));
    }
}
