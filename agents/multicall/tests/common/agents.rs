//! A node's running agent processes, by name, for the tests that start, kill and restart
//! them one by one.

use std::process::{Child, ExitStatus};

/// Agent processes by name; [`Agents::stop_all`] (and dropping the set) kills what is left.
#[derive(Default)]
pub struct Agents(Vec<(String, Child)>);

impl Agents {
    /// Records `child` as `agent`.
    pub fn add(&mut self, agent: &str, child: Child) {
        self.0.push((agent.to_owned(), child));
    }

    /// Takes `agent`'s process out of the set.
    pub fn take(&mut self, agent: &str) -> Child {
        let i = self
            .0
            .iter()
            .position(|(a, _)| a == agent)
            .unwrap_or_else(|| panic!("{agent} is not running"));
        self.0.remove(i).1
    }

    /// SIGKILL to `agent`, and waits for it.
    pub fn kill9(&mut self, agent: &str) {
        let mut child = self.take(agent);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// `agent`'s exit status if it has ended (it then leaves the set).
    pub fn try_exited(&mut self, agent: &str) -> Option<ExitStatus> {
        let i = self.0.iter().position(|(a, _)| a == agent)?;
        let status = self.0[i].1.try_wait().unwrap()?;
        self.0.remove(i);
        Some(status)
    }

    /// Kills and reaps every agent (before the node's mounts are taken down).
    pub fn stop_all(&mut self) {
        for (_, mut child) in self.0.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop_all();
    }
}
