//! Test support (feature `testing`): the real OCI registry server from Debian's
//! `docker-registry` package, started on a free loopback port in a temporary directory and
//! stopped (by its PID) when dropped; optionally requiring a user and password (HTTP basic
//! auth, the password hashed by `htpasswd` from Debian's `apache2-utils`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The registry server binary (tests check for it with `powernode_pubsub::testing::require`).
pub const REGISTRY_BIN: &str = "docker-registry";

/// A running registry.
#[derive(Debug)]
pub struct TestRegistry {
    child: Option<Child>,
    /// `127.0.0.1:<port>`.
    pub host: String,
    dir: PathBuf,
    port: u16,
    htpasswd: Option<PathBuf>,
}

impl TestRegistry {
    /// Starts a registry storing under `dir` on a free loopback port; waits until it answers.
    pub fn start(dir: &Path) -> std::io::Result<TestRegistry> {
        Self::start_with(dir, None)
    }

    /// Like [`TestRegistry::start`], but every request must carry `username` and `password`.
    pub fn start_with_password(
        dir: &Path,
        username: &str,
        password: &str,
    ) -> std::io::Result<TestRegistry> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("htpasswd")
            .args(["-nbB", username, password])
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| std::io::Error::other(format!("htpasswd (apache2-utils): {e}")))?;
        if !out.status.success() {
            return Err(std::io::Error::other("htpasswd failed"));
        }
        let htpasswd = dir.join("htpasswd");
        std::fs::write(&htpasswd, out.stdout)?;
        Self::start_with(dir, Some(htpasswd))
    }

    fn start_with(dir: &Path, htpasswd: Option<PathBuf>) -> std::io::Result<TestRegistry> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut registry = TestRegistry {
            child: None,
            host: format!("127.0.0.1:{port}"),
            dir: dir.to_owned(),
            port,
            htpasswd,
        };
        registry.resume()?;
        Ok(registry)
    }

    /// Starts the server again on the same port and storage (after [`TestRegistry::stop`]).
    pub fn resume(&mut self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.dir.join("data"))?;
        let config = self.dir.join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n",
            self.dir.join("data").display(),
            self.port
        );
        if let Some(htpasswd) = &self.htpasswd {
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: powernode-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, text)?;
        let log = std::fs::File::create(self.dir.join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.host).is_err() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "registry did not come up on {}; log: {}",
                    self.host,
                    std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the server (SIGKILL to its PID), keeping its storage.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Where blobs are stored, to tamper with in tests:
    /// `<dir>/data/docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data`.
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.dir
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
