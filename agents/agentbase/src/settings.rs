//! Agent settings: `<etc>/agent.toml` plus `<etc>/agent.toml.d/*.toml`, merged, then validated
//! once into [`Settings`] (DESIGN §4).
//!
//! Loading goes in three steps, so every error names the file or the field that is wrong:
//!
//! 1. Each file is parsed on its own into [`Settings`] (every field has a default, so a fragment
//!    that sets one key is a complete value). A TOML syntax error, an unknown key or a value of
//!    the wrong type is reported as `<file>:<line>:<column>: <message>`.
//! 2. The files' tables are deep-merged in order: `agent.toml` first, then the drop-ins sorted by
//!    file name. Tables merge key by key; any other value set by a later file replaces the
//!    earlier one. The file that last set each key is remembered.
//! 3. The merged table is deserialised once and validated. A bad value is reported with its
//!    field, its value and the file that set it.
//!
//! Both the base file and the drop-in directory are optional; with neither, the defaults apply.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use powernode_types::IdentitySource;
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

use crate::root::Root;

/// Name of the base settings file inside the etc directory.
pub const BASE_FILE: &str = "agent.toml";
/// Name of the drop-in directory inside the etc directory.
pub const DROPIN_DIR: &str = "agent.toml.d";

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A settings file or the drop-in directory exists but could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file or directory that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A settings file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("{}: {}{message}", Location(path, *position), FieldPrefix(field.as_deref(), message))]
    Parse {
        /// The file that failed.
        path: PathBuf,
        /// 1-based line and column of the offending text, when known.
        position: Option<(usize, usize)>,
        /// Dotted name of the key at that position (e.g. `pubsub.connect_timeout_ms`), when the
        /// file parsed far enough to tell.
        field: Option<String>,
        /// What is wrong, as the TOML deserialiser put it.
        message: String,
    },
    /// A value has the right type but is out of range or otherwise not acceptable.
    #[error(
        "{}: invalid value {value} for `{field}`: {reason}",
        origin.as_ref().map_or_else(|| "built-in default".to_owned(), |o| o.to_string())
    )]
    Invalid {
        /// Dotted name of the field, e.g. `pubsub.connect_timeout_ms`.
        field: &'static str,
        /// The rejected value, as TOML would write it.
        value: String,
        /// What an acceptable value looks like.
        reason: String,
        /// Where the value was last set, or `None` for a built-in default.
        origin: Option<Origin>,
    },
}

/// Where a settings value was set: the file, and the line and column of the value in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file that last set the value.
    pub path: PathBuf,
    /// 1-based line and column of the value in that file, when known.
    pub position: Option<(usize, usize)>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Location(&self.path, self.position).fmt(f)
    }
}

/// `path:line:column`, or `path` when the position is unknown.
struct Location<'a>(&'a Path, Option<(usize, usize)>);

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some((line, column)) => write!(f, "{}:{line}:{column}", self.0.display()),
            None => write!(f, "{}", self.0.display()),
        }
    }
}

/// `` `field`: `` before a message that does not already name the field's last key.
struct FieldPrefix<'a>(Option<&'a str>, &'a str);

impl fmt::Display for FieldPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(field) => {
                let leaf = field.rsplit('.').next().unwrap_or(field);
                if self.1.contains(&format!("`{leaf}`")) {
                    Ok(())
                } else {
                    write!(f, "`{field}`: ")
                }
            }
            None => Ok(()),
        }
    }
}

/// Settings shared by every agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Log filter: a level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or a tracing
    /// `EnvFilter` directive list such as `info,powernode_pubsub=debug`. `RUST_LOG` overrides it.
    pub log_level: String,
    /// How often, in seconds, an agent's main loop must refresh its touch file (1..=3600).
    pub touch_interval_s: u64,
    /// pubsub client settings.
    pub pubsub: PubsubSettings,
    /// identitymgr's discovery cascade.
    pub identity: IdentitySettings,
    /// How the agents that call the controller (enrollmgr, heartbeatd, eventd) reach it.
    pub controller: ControllerSettings,
    /// Modules: registries, trust policy, the mount target (modulemgr, verifier, mountmgr).
    pub modules: ModuleSettings,
    /// Mounts: how mountmgr switches and watches its stacks (docs/mountmgr.md).
    pub mounts: MountSettings,
    /// Events: eventd's journal (docs/events.md).
    pub events: EventSettings,
    /// NodeScripts: the interpreters execd may run them with (docs/tasks.md).
    pub exec: ExecSettings,
    /// The WireGuard overlay: which data plane netmgr uses (docs/network.md).
    pub network: NetworkSettings,
    /// What loading noticed that is not worth refusing the settings for (a directory named
    /// like a drop-in): logged at start and reported as the agent's error until fixed.
    #[serde(skip)]
    pub notes: Vec<String>,
}

/// The `[modules]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModuleSettings {
    /// Registries (`host[:port]`) spoken to over plain HTTP instead of HTTPS: tests and closed
    /// labs only.
    pub plain_http: Vec<String>,
    /// Registry logins.
    pub credentials: Vec<RegistryCredential>,
    /// The trust policy modules are verified against: `etc/powernode/trust/<name>.toml`.
    pub trust_policy: String,
    /// The name of the mount target the modules are stacked at.
    pub mount_target: String,
    /// Where the stack's writes go: `tmpfs` (lost on every switch), or a directory under the
    /// root that keeps them (e.g. `persist/powernode/upper/modules`).
    pub upper: String,
    /// Longest wait between retries of a failing pull, in seconds (1..=3600).
    pub max_backoff_s: u64,
    /// Limit on connecting to a registry, in milliseconds (100..=120000).
    pub connect_timeout_ms: u64,
}

/// One `[[modules.credentials]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredential {
    /// The registry, `host[:port]`.
    pub registry: String,
    /// User name.
    pub username: String,
    /// File holding the password or token (not the secret itself, so settings can be shown).
    pub password_file: String,
}

impl Default for ModuleSettings {
    fn default() -> Self {
        ModuleSettings {
            plain_http: Vec::new(),
            credentials: Vec::new(),
            trust_policy: "default".to_owned(),
            mount_target: "modules".to_owned(),
            upper: "tmpfs".to_owned(),
            max_backoff_s: 60,
            connect_timeout_ms: 10_000,
        }
    }
}

impl ModuleSettings {
    fn validate(
        &self,
        invalid: impl Fn(&'static str, String, &str) -> SettingsError,
    ) -> Result<(), SettingsError> {
        let plain_name = |v: &str| {
            !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                && !v.starts_with('.')
        };
        if !plain_name(&self.trust_policy) {
            return Err(invalid(
                "modules.trust_policy",
                quoted(&self.trust_policy),
                "must be a file name stem (letters, digits, '-', '_', '.')",
            ));
        }
        if !plain_name(&self.mount_target) {
            return Err(invalid(
                "modules.mount_target",
                quoted(&self.mount_target),
                "must be a name (letters, digits, '-', '_', '.')",
            ));
        }
        if self.upper != "tmpfs"
            && (self.upper.starts_with('/')
                || self.upper.split('/').any(|c| c == ".." || c.is_empty()))
        {
            return Err(invalid(
                "modules.upper",
                quoted(&self.upper),
                "must be \"tmpfs\" or a relative directory under the root without '..'",
            ));
        }
        check_ranges(
            &invalid,
            &[
                ("modules.max_backoff_s", self.max_backoff_s, 1..=3600),
                (
                    "modules.connect_timeout_ms",
                    self.connect_timeout_ms,
                    100..=120_000,
                ),
            ],
        )
    }
}

/// The `[mounts]` table: how mountmgr switches and watches its stacks (docs/mountmgr.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MountSettings {
    /// Where the union of the modules' target (`modules.mount_target`) is mounted for programs
    /// to use directly: an absolute, plain path of the node (under the root), such as
    /// `/opt/powernode`. Unset: the union is reached through
    /// `run/powernode-mounts/<target>/current` only.
    pub mount_path: Option<String>,
    /// Whether a switch at `mount_path` mounts the new stack beneath the old one
    /// (`MOVE_MOUNT_BENEATH`, Linux 6.5+) where the kernel can, so the path never shows less
    /// than a whole tree. false (or a kernel without it): `mount_path` is a symlink to
    /// `current`, which the switch renames.
    pub move_beneath: bool,
    /// Seconds the previous stack stays mounted after a switch to a stack with health checks,
    /// which run again meanwhile: a failure switches back to it (0..=86400; 0: no window).
    pub confirm_window_s: u64,
    /// Seconds between the runs of the health checks during that window (1..=3600).
    pub confirm_interval_s: u64,
}

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings {
            mount_path: None,
            move_beneath: true,
            confirm_window_s: 60,
            confirm_interval_s: 10,
        }
    }
}

impl MountSettings {
    /// [`MountSettings::confirm_window_s`] as a duration.
    pub fn confirm_window(&self) -> Duration {
        Duration::from_secs(self.confirm_window_s)
    }

    /// [`MountSettings::confirm_interval_s`] as a duration.
    pub fn confirm_interval(&self) -> Duration {
        Duration::from_secs(self.confirm_interval_s)
    }

    fn validate(
        &self,
        invalid: impl Fn(&'static str, String, &str) -> SettingsError,
    ) -> Result<(), SettingsError> {
        if let Some(path) = &self.mount_path {
            let plain = path.strip_prefix('/').is_some_and(|rest| {
                !rest.is_empty()
                    && !path.chars().any(char::is_control)
                    && rest
                        .split('/')
                        .all(|part| !part.is_empty() && part != "." && part != "..")
            });
            if !plain {
                return Err(invalid(
                    "mounts.mount_path",
                    quoted(path),
                    "must be an absolute path below / without `.`, `..`, empty or trailing \
                     components",
                ));
            }
        }
        check_ranges(
            &invalid,
            &[
                ("mounts.confirm_window_s", self.confirm_window_s, 0..=86_400),
                (
                    "mounts.confirm_interval_s",
                    self.confirm_interval_s,
                    1..=3600,
                ),
            ],
        )
    }
}

/// The `[network]` table: netmgr's WireGuard data plane (docs/network.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSettings {
    /// Which WireGuard implementation carries the overlay.
    pub wireguard: WireguardChoice,
}

/// `network.wireguard`: which WireGuard implementation netmgr uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireguardChoice {
    /// The kernel's where it has WireGuard, else the userspace device.
    #[default]
    Auto,
    /// The kernel's only: without it the network fails to come up, with the reason.
    Kernel,
    /// The userspace device only, even where the kernel has WireGuard.
    Userspace,
}

/// The `[events]` table: eventd's journal (docs/events.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// The most the journal may hold on disk, in MiB (a fraction is allowed: `0.25`; from
    /// 0.0625, i.e. 64 KiB, to 1048576). Over it, eventd compacts: delivered records go first,
    /// then the oldest Info and Warning events, then the oldest Error; never a Critical.
    pub journal_max_mib: Mib,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            journal_max_mib: Mib::from_bytes(64 * Mib::BYTES),
        }
    }
}

impl EventSettings {
    /// The smallest journal bound accepted: room for a few hundred events.
    pub const MIN_JOURNAL: u64 = 64 << 10;
    /// The largest journal bound accepted (1 TiB).
    pub const MAX_JOURNAL: u64 = 1 << 40;

    fn validate(
        &self,
        invalid: impl Fn(&'static str, String, &str) -> SettingsError,
    ) -> Result<(), SettingsError> {
        let bytes = self.journal_max_mib.bytes();
        if !(Self::MIN_JOURNAL..=Self::MAX_JOURNAL).contains(&bytes) {
            return Err(invalid(
                "events.journal_max_mib",
                self.journal_max_mib.to_string(),
                "must be between 0.0625 (64 KiB) and 1048576 MiB",
            ));
        }
        Ok(())
    }
}

/// The `[exec]` table: how execd runs `node.exec` tasks (docs/tasks.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecSettings {
    /// The interpreters a NodeScript may name, as absolute paths; the first is the one a
    /// script that names none runs under. A task naming any other is refused. Not empty, no
    /// repeats, each path in plain form (no `.`, `..` or doubled `/`), since a task's
    /// interpreter is matched against these strings as they are written.
    pub interpreters: Vec<String>,
}

impl Default for ExecSettings {
    fn default() -> Self {
        ExecSettings {
            interpreters: ["/bin/sh", "/bin/bash", "/usr/bin/python3"]
                .map(str::to_owned)
                .to_vec(),
        }
    }
}

impl ExecSettings {
    fn validate(
        &self,
        invalid: impl Fn(&'static str, String, &str) -> SettingsError,
    ) -> Result<(), SettingsError> {
        let list = || format!("{:?}", self.interpreters);
        if self.interpreters.is_empty() {
            return Err(invalid(
                "exec.interpreters",
                list(),
                "must name at least one interpreter (the first is the default)",
            ));
        }
        for (i, path) in self.interpreters.iter().enumerate() {
            if let Err(reason) = validate_interpreter(path) {
                return Err(invalid(
                    "exec.interpreters",
                    list(),
                    &format!("{path:?} {reason}"),
                ));
            }
            if self.interpreters[..i].contains(path) {
                return Err(invalid(
                    "exec.interpreters",
                    list(),
                    &format!("{path:?} is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

/// An interpreter path as `[exec] interpreters` takes it: absolute and plain, so that the
/// string a task names is the file that runs (`/bin/../bin/sh` would be the same file under
/// another name, and is refused rather than matched).
fn validate_interpreter(path: &str) -> Result<(), &'static str> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("is not an absolute path");
    };
    if path.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if rest
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("must be a plain path to a file (no `.`, `..`, empty or trailing components)");
    }
    Ok(())
}

/// A size that settings write in MiB — a whole number (`64`) or a fraction (`0.25`, so that
/// a test can bound a journal to a few hundred KiB) — held in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mib(u64);

impl Mib {
    /// Bytes in one MiB.
    pub const BYTES: u64 = 1 << 20;

    /// The size of `bytes` bytes.
    pub const fn from_bytes(bytes: u64) -> Mib {
        Mib(bytes)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Mib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0 as f64 / Self::BYTES as f64)
    }
}

impl<'de> Deserialize<'de> for Mib {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Mib, D::Error> {
        // An integer deserialises as a float too, so `64` and `0.25` both land here.
        let mib = f64::deserialize(d)?;
        if !mib.is_finite() || mib < 0.0 || mib > (u64::MAX / Self::BYTES) as f64 {
            return Err(serde::de::Error::custom(format!(
                "{mib} is not a size in MiB (a number >= 0, such as 64 or 0.25)"
            )));
        }
        Ok(Mib((mib * Self::BYTES as f64).round() as u64))
    }
}

/// Checks that each `(field, value, range)` has its value in range; the first that does not
/// is the error.
fn check_ranges(
    invalid: &impl Fn(&'static str, String, &str) -> SettingsError,
    checks: &[(&'static str, u64, std::ops::RangeInclusive<u64>)],
) -> Result<(), SettingsError> {
    for (field, value, range) in checks {
        if !range.contains(value) {
            let reason = format!("must be between {} and {}", range.start(), range.end());
            return Err(invalid(field, value.to_string(), &reason));
        }
    }
    Ok(())
}

/// The most controller URLs a node takes (settings or identity sources).
pub const MAX_CONTROLLER_URLS: usize = 16;

/// The entries of a comma-separated list of controller URLs (`https://a:8443,https://b:8443`),
/// trimmed, in order, a repeated one kept once; one URL is a list of one. An empty entry
/// (`a,,b`, a comma at either end) or more than [`MAX_CONTROLLER_URLS`] entries is an error.
/// The URLs themselves are not checked here: the settings and identitymgr each check them
/// their own way.
pub fn split_url_list(value: &str) -> Result<Vec<&str>, String> {
    if value.trim().is_empty() {
        return Err("empty".to_owned());
    }
    let mut urls: Vec<&str> = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(format!("empty entry in the URL list {value:?}"));
        }
        if !urls.contains(&entry) {
            urls.push(entry);
        }
    }
    if urls.len() > MAX_CONTROLLER_URLS {
        return Err(format!(
            "{} URLs; at most {MAX_CONTROLLER_URLS}",
            urls.len()
        ));
    }
    Ok(urls)
}

/// `[controller] url`: one URL, several comma-separated in one string, or an array of URLs;
/// split with [`split_url_list`], so that each form means the same list.
fn url_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct UrlList;
    impl<'de> serde::de::Visitor<'de> for UrlList {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a URL, a comma-separated list of URLs, or an array of URLs")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            let urls = split_url_list(v).map_err(E::custom)?;
            Ok(urls.into_iter().map(str::to_owned).collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = seq.next_element::<String>()? {
                entries.push(entry);
            }
            self.visit_str(&entries.join(","))
        }
    }
    d.deserialize_any(UrlList)
}

/// The `[controller]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerSettings {
    /// The controller's URLs (`https://host[:port]`), in the order to try them: the node
    /// talks to the first that answers and stays with it until it stops answering
    /// (docs/architecture.md, "Several controllers"). In the file, `url` is one URL, several
    /// comma-separated, or an array. Empty (unset): the URLs identitymgr discovered
    /// (`NodeIdentity.controller_urls`).
    #[serde(rename = "url", deserialize_with = "url_list")]
    pub urls: Vec<String>,
    /// Limit on one request to the controller, connection included, in milliseconds
    /// (100..=120000).
    pub request_timeout_ms: u64,
    /// Seconds between heartbeats until the controller's reply sets another interval (1..=3600).
    pub heartbeat_interval_s: u64,
    /// Longest wait between retries of a failing call, in seconds (1..=3600).
    pub max_backoff_s: u64,
    /// heartbeatd raises `controller.unreachable` once the controller has been unreachable
    /// for more than this many heartbeat intervals (1..=1000).
    pub unreachable_after_intervals: u64,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        ControllerSettings {
            urls: Vec::new(),
            request_timeout_ms: 10_000,
            heartbeat_interval_s: 30,
            max_backoff_s: 60,
            unreachable_after_intervals: 3,
        }
    }
}

impl ControllerSettings {
    /// [`ControllerSettings::request_timeout_ms`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// [`ControllerSettings::heartbeat_interval_s`] as a duration.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_s)
    }

    /// [`ControllerSettings::max_backoff_s`] as a duration.
    pub fn max_backoff(&self) -> Duration {
        Duration::from_secs(self.max_backoff_s)
    }

    fn validate(
        &self,
        invalid: impl Fn(&'static str, String, &str) -> SettingsError,
    ) -> Result<(), SettingsError> {
        for url in &self.urls {
            let host = url
                .strip_prefix("https://")
                .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
            if host.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
                return Err(invalid(
                    "controller.url",
                    quoted(url),
                    "each URL must be an https:// URL with a host",
                ));
            }
        }
        check_ranges(
            &invalid,
            &[
                (
                    "controller.request_timeout_ms",
                    self.request_timeout_ms,
                    100..=120_000,
                ),
                (
                    "controller.heartbeat_interval_s",
                    self.heartbeat_interval_s,
                    1..=3600,
                ),
                ("controller.max_backoff_s", self.max_backoff_s, 1..=3600),
                (
                    "controller.unreachable_after_intervals",
                    self.unreachable_after_intervals,
                    1..=1000,
                ),
            ],
        )
    }
}

/// The `[pubsub]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PubsubSettings {
    /// How long, in milliseconds, a subscriber waits for a publisher's socket to accept (> 0).
    pub connect_timeout_ms: u64,
}

/// The `[identity]` table: how identitymgr discovers who the node is (docs/identity.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentitySettings {
    /// How long, in milliseconds, one source may take before it counts as failed (1..=60000).
    pub source_timeout_ms: u64,
    /// Whether, when no source yields a UUID, identitymgr may generate one and store it in
    /// `identity.cfg` (which then supplies it on every later start).
    pub allow_generated_uuid: bool,
    /// The sources to try, in order, each at most once (`Generated` is not one of them: see
    /// `allow_generated_uuid`). Default: all of them, in the documented order.
    pub sources: Vec<IdentitySource>,
    /// Base URL of the AWS instance metadata service (IMDSv2).
    pub aws_url: String,
    /// Base URL of the Google Cloud metadata server.
    pub gcp_url: String,
    /// Base URL of the Azure instance metadata service.
    pub azure_url: String,
    /// Base URL of the DigitalOcean metadata service.
    pub digitalocean_url: String,
    /// Base URL of the Hetzner Cloud metadata service.
    pub hetzner_url: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            log_level: "info".to_owned(),
            touch_interval_s: 15,
            pubsub: PubsubSettings::default(),
            identity: IdentitySettings::default(),
            controller: ControllerSettings::default(),
            modules: ModuleSettings::default(),
            mounts: MountSettings::default(),
            events: EventSettings::default(),
            exec: ExecSettings::default(),
            network: NetworkSettings::default(),
            notes: Vec::new(),
        }
    }
}

impl Default for IdentitySettings {
    fn default() -> Self {
        IdentitySettings {
            source_timeout_ms: 500,
            allow_generated_uuid: true,
            sources: IdentitySettings::ALL_SOURCES.to_vec(),
            aws_url: "http://169.254.169.254".to_owned(),
            gcp_url: "http://metadata.google.internal".to_owned(),
            azure_url: "http://169.254.169.254".to_owned(),
            digitalocean_url: "http://169.254.169.254".to_owned(),
            hetzner_url: "http://169.254.169.254".to_owned(),
        }
    }
}

impl IdentitySettings {
    /// Every source that can be listed in `sources`, in the default cascade order.
    pub const ALL_SOURCES: [IdentitySource; 9] = [
        IdentitySource::KernelCmdline,
        IdentitySource::FwCfg,
        IdentitySource::Aws,
        IdentitySource::Gcp,
        IdentitySource::Azure,
        IdentitySource::DigitalOcean,
        IdentitySource::Hetzner,
        IdentitySource::Dmi,
        IdentitySource::IdentityCfg,
    ];

    /// [`IdentitySettings::source_timeout_ms`] as a duration.
    pub fn source_timeout(&self) -> Duration {
        Duration::from_millis(self.source_timeout_ms)
    }

    fn validate(
        &self,
        invalid: impl Fn(&'static str, String, &str) -> SettingsError,
    ) -> Result<(), SettingsError> {
        if !(1..=60_000).contains(&self.source_timeout_ms) {
            return Err(invalid(
                "identity.source_timeout_ms",
                self.source_timeout_ms.to_string(),
                "must be between 1 and 60000 milliseconds",
            ));
        }
        let sources = || format!("{:?}", self.sources);
        for (i, source) in self.sources.iter().enumerate() {
            if *source == IdentitySource::Generated {
                return Err(invalid(
                    "identity.sources",
                    sources(),
                    "`Generated` is not a source to list; set `identity.allow_generated_uuid`",
                ));
            }
            if self.sources[..i].contains(source) {
                return Err(invalid(
                    "identity.sources",
                    sources(),
                    &format!("`{source:?}` is listed twice"),
                ));
            }
        }
        if self.allow_generated_uuid && !self.sources.contains(&IdentitySource::IdentityCfg) {
            return Err(invalid(
                "identity.sources",
                sources(),
                "must include `IdentityCfg` while `identity.allow_generated_uuid` is true: \
                 a generated UUID is stored in identity.cfg and read back from it on later starts",
            ));
        }
        for (field, value) in [
            ("identity.aws_url", &self.aws_url),
            ("identity.gcp_url", &self.gcp_url),
            ("identity.azure_url", &self.azure_url),
            ("identity.digitalocean_url", &self.digitalocean_url),
            ("identity.hetzner_url", &self.hetzner_url),
        ] {
            if let Err(reason) = validate_metadata_url(value) {
                return Err(invalid(field, quoted(value), &reason));
            }
        }
        Ok(())
    }
}

/// A metadata service base URL: `http://host[:port][/path]`. Plain HTTP only: metadata services
/// are link-local and the agent carries no TLS stack for them.
fn validate_metadata_url(value: &str) -> Result<(), String> {
    let Some(rest) = value.strip_prefix("http://") else {
        return Err("must start with `http://` (metadata services are plain HTTP)".to_owned());
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    if host.is_empty() {
        return Err("has no host".to_owned());
    }
    if port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
        return Err("has a port that is not a number between 1 and 65535".to_owned());
    }
    let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#' | '@');
    if value.chars().any(bad) {
        return Err("must not contain spaces, `?`, `#` or `@`".to_owned());
    }
    Ok(())
}

impl Default for PubsubSettings {
    fn default() -> Self {
        PubsubSettings {
            connect_timeout_ms: 2000,
        }
    }
}

impl Settings {
    /// Loads and validates the settings under `root`'s etc directory.
    pub fn load(root: &Root) -> Result<Settings, SettingsError> {
        Self::load_from(&root.etc_dir())
    }

    /// Loads and validates `<etc_dir>/agent.toml` and `<etc_dir>/agent.toml.d/*.toml`.
    pub fn load_from(etc_dir: &Path) -> Result<Settings, SettingsError> {
        let mut merged = toml::Table::new();
        let mut origins = Origins::new();
        let (files, notes) = settings_files(etc_dir)?;
        for path in files {
            let (table, positions) = parse_file(&path)?;
            let file = FileOrigins {
                path: &path,
                positions: &positions,
            };
            merge(&mut merged, table, "", &file, &mut origins);
        }
        let mut settings: Settings = merged.try_into().map_err(|e: toml::de::Error| {
            // Every file deserialised on its own, so this only fails if merging broke a type;
            // report it against the directory rather than panic.
            SettingsError::Parse {
                path: etc_dir.to_owned(),
                position: None,
                field: None,
                message: format!("merged settings: {}", e.message()),
            }
        })?;
        settings.validate(&origins)?;
        settings.notes = notes;
        Ok(settings)
    }

    /// [`Settings::touch_interval_s`] as a duration.
    pub fn touch_interval(&self) -> Duration {
        Duration::from_secs(self.touch_interval_s)
    }

    fn validate(&self, origins: &Origins) -> Result<(), SettingsError> {
        let invalid = |field: &'static str, value: String, reason: &str| SettingsError::Invalid {
            field,
            value,
            reason: reason.to_owned(),
            origin: origins.get(field).cloned(),
        };
        if let Err(reason) = validate_log_level(&self.log_level) {
            return Err(invalid("log_level", quoted(&self.log_level), &reason));
        }
        if !(1..=3600).contains(&self.touch_interval_s) {
            return Err(invalid(
                "touch_interval_s",
                self.touch_interval_s.to_string(),
                "must be between 1 and 3600 seconds",
            ));
        }
        if self.pubsub.connect_timeout_ms == 0 {
            return Err(invalid(
                "pubsub.connect_timeout_ms",
                self.pubsub.connect_timeout_ms.to_string(),
                "must be greater than 0",
            ));
        }
        self.identity.validate(invalid)?;
        self.controller.validate(invalid)?;
        self.modules.validate(invalid)?;
        self.mounts.validate(invalid)?;
        self.events.validate(invalid)?;
        self.exec.validate(invalid)
    }
}

impl PubsubSettings {
    /// [`PubsubSettings::connect_timeout_ms`] as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// The level names accepted on their own as `log_level`.
const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Accepts a bare level, or a directive list in which every directive is a bare level or
/// `target=level` (`target` a module path: letters, digits, `_`, `-`, `::`).
///
/// A bare word that is not a level (`verbose`, `inf`) is valid `EnvFilter` syntax — it means
/// "everything from target `verbose`" — but in a settings file it is almost always a misspelt
/// level, so it is rejected. `EnvFilter`'s span and field filters (`target[span{field=…}]`)
/// are refused too: a field value is compiled as a regular expression, and the fuzzer found
/// values that take seconds to compile, so a settings file could stall every agent's start.
/// `RUST_LOG`, set by whoever runs the agent, still takes the full syntax.
pub fn validate_log_level(value: &str) -> Result<(), String> {
    let expected = "expected one of trace, debug, info, warn, error, off, \
                    or a filter such as `info,powernode_pubsub=debug`";
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(format!("empty; {expected}"));
    }
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word.trim()));
    let is_target = |word: &str| {
        let word = word.trim();
        !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':'))
    };
    for directive in trimmed.split(',').map(str::trim) {
        let ok = match directive.split_once('=') {
            Some((target, level)) => is_target(target) && is_level(level),
            None => is_level(directive),
        };
        if !ok {
            return Err(format!(
                "`{directive}` is neither a level nor `target=level`; {expected}"
            ));
        }
    }
    EnvFilter::builder()
        .parse(trimmed)
        .map(drop)
        .map_err(|e| format!("{e}; {expected}"))
}

/// `s` in double quotes, with quotes and control characters escaped.
fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// Dotted field name → where it was last set.
type Origins = BTreeMap<String, Origin>;

/// Dotted field name → 1-based line and column of its value in one file.
type Positions = BTreeMap<String, (usize, usize)>;

/// One file being merged: its path and where each of its values stands.
struct FileOrigins<'a> {
    path: &'a Path,
    positions: &'a Positions,
}

/// The files to read, in merge order: the base file if present, then the drop-ins sorted by
/// name; and notes on entries that look like drop-ins but are not files.
fn settings_files(etc_dir: &Path) -> Result<(Vec<PathBuf>, Vec<String>), SettingsError> {
    let mut files = Vec::new();
    let base = etc_dir.join(BASE_FILE);
    match std::fs::metadata(&base) {
        Ok(_) => files.push(base),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(SettingsError::Read { path: base, source }),
    }

    let dir = etc_dir.join(DROPIN_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((files, Vec::new())),
        Err(source) => return Err(SettingsError::Read { path: dir, source }),
    };
    let mut dropins = Vec::new();
    let mut notes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| SettingsError::Read {
            path: dir.clone(),
            source,
        })?;
        let name = entry.file_name();
        let is_toml = Path::new(&name)
            .extension()
            .is_some_and(|ext| ext == "toml");
        if !is_toml || name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        // Follow symlinks: a drop-in linked from elsewhere is still a drop-in.
        let meta = std::fs::metadata(&path).map_err(|source| SettingsError::Read {
            path: path.clone(),
            source,
        })?;
        if meta.is_file() {
            dropins.push((name, path));
        } else {
            notes.push(format!(
                "{} is not a file: it is not read as settings",
                path.display()
            ));
        }
    }
    dropins.sort();
    notes.sort();
    files.extend(dropins.into_iter().map(|(_, path)| path));
    Ok((files, notes))
}

/// Reads one file, checks it against [`Settings`] on its own, and returns its table with the
/// line and column of each value (by dotted name).
fn parse_file(path: &Path) -> Result<(toml::Table, Positions), SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse_error = |e: toml::de::Error, doc: Option<&toml::de::DeTable<'_>>| {
        let span = e.span();
        SettingsError::Parse {
            path: path.to_owned(),
            position: span.as_ref().map(|s| line_column(&text, s.start)),
            field: span
                .zip(doc)
                .and_then(|(s, doc)| field_at(doc, s.start, ""))
                .filter(|f| !f.is_empty()),
            message: e.message().trim_end().to_owned(),
        }
    };
    let doc = toml::de::DeTable::parse(&text).map_err(|e| parse_error(e, None))?;
    toml::from_str::<Settings>(&text).map_err(|e| parse_error(e, Some(doc.get_ref())))?;
    let table = toml::from_str::<toml::Table>(&text).map_err(|e| parse_error(e, None))?;
    let mut positions = BTreeMap::new();
    value_positions(doc.get_ref(), &text, "", &mut positions);
    Ok((table, positions))
}

/// Records the line and column of every value that is not a table, by dotted name.
fn value_positions(table: &toml::de::DeTable<'_>, text: &str, prefix: &str, out: &mut Positions) {
    for (key, value) in table {
        let dotted = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => value_positions(inner, text, &dotted, out),
            _ => {
                out.insert(dotted, line_column(text, value.span().start));
            }
        }
    }
}

/// Dotted name of the deepest key whose name or value covers byte `pos`.
fn field_at(table: &toml::de::DeTable<'_>, pos: usize, prefix: &str) -> Option<String> {
    for (key, value) in table {
        let dotted = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        // A `[table]`'s span need not cover its body, so always look inside.
        if let toml::de::DeValue::Table(inner) = value.get_ref() {
            if let Some(found) = field_at(inner, pos, &dotted) {
                return Some(found);
            }
        }
        if key.span().contains(&pos) || value.span().contains(&pos) {
            return Some(dotted);
        }
    }
    None
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Deep-merges `src` into `dst`, recording in `origins` where each leaf was set.
fn merge(
    dst: &mut toml::Table,
    src: toml::Table,
    prefix: &str,
    file: &FileOrigins<'_>,
    origins: &mut Origins,
) {
    for (key, value) in src {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (dst.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge(existing, incoming, &dotted, file, origins);
            }
            (_, toml::Value::Table(incoming)) => {
                let mut fresh = toml::Table::new();
                merge(&mut fresh, incoming, &dotted, file, origins);
                dst.insert(key, toml::Value::Table(fresh));
            }
            (_, value) => {
                let position = file.positions.get(&dotted).copied();
                origins.insert(
                    dotted,
                    Origin {
                        path: file.path.to_owned(),
                        position,
                    },
                );
                dst.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Writes `files` (relative path → contents) under a fresh etc dir and loads it.
    fn load(files: &[(&str, &str)]) -> (tempfile::TempDir, Result<Settings, SettingsError>) {
        let dir = tempfile::tempdir().unwrap();
        for (rel, text) in files {
            let path = dir.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
        let result = Settings::load_from(dir.path());
        (dir, result)
    }

    #[test]
    fn controller_table() {
        let (_dir, got) = load(&[(
            "agent.toml",
            "[controller]\nurl = \"https://ctl.example:8443\"\nheartbeat_interval_s = 5\n",
        )]);
        let c = got.unwrap().controller;
        assert_eq!(c.urls, ["https://ctl.example:8443"]);
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(5));
        assert_eq!(c.request_timeout(), Duration::from_secs(10));
        assert_eq!(c.unreachable_after_intervals, 3);
        let bad: &[(&str, &str)] = &[
            ("url = \"http://ctl:80\"", "controller.url"),
            ("url = \"https://\"", "controller.url"),
            ("url = \"https://a,http://b\"", "controller.url"),
            ("url = [\"https://a\", \"http://b\"]", "controller.url"),
            ("url = \"https://a,,https://b\"", "controller.url"),
            ("url = []", "controller.url"),
            ("url = 8443", "controller.url"),
            ("request_timeout_ms = 5", "controller.request_timeout_ms"),
            (
                "heartbeat_interval_s = 0",
                "controller.heartbeat_interval_s",
            ),
            ("max_backoff_s = 99999", "controller.max_backoff_s"),
            (
                "unreachable_after_intervals = 0",
                "controller.unreachable_after_intervals",
            ),
        ];
        for (line, field) in bad {
            let (_dir, got) = load(&[(
                "agent.toml.d/50-ctl.toml",
                &format!("[controller]\n{line}\n"),
            )]);
            let err = got.unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("50-ctl.toml"),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn controller_url_is_one_url_or_a_list() {
        let two = ["https://a.example:8443", "https://b.example:8443"];
        for value in [
            "\"https://a.example:8443,https://b.example:8443\"",
            "\" https://a.example:8443 , https://b.example:8443 \"",
            "[\"https://a.example:8443\", \"https://b.example:8443\"]",
            // A repeat is kept once, in its first place.
            "[\"https://a.example:8443\", \"https://b.example:8443\", \"https://a.example:8443\"]",
        ] {
            let (_dir, got) = load(&[("agent.toml", &format!("[controller]\nurl = {value}\n"))]);
            assert_eq!(got.unwrap().controller.urls, two, "{value}");
        }
        // A drop-in's list replaces the base file's, as any other value does.
        let (_dir, got) = load(&[
            (
                "agent.toml",
                "[controller]\nurl = [\"https://a\", \"https://b\"]\n",
            ),
            (
                "agent.toml.d/50-ctl.toml",
                "[controller]\nurl = \"https://c\"\n",
            ),
        ]);
        assert_eq!(got.unwrap().controller.urls, ["https://c"]);
        let (_dir, got) = load(&[]);
        assert!(got.unwrap().controller.urls.is_empty());
        let too_many = (0..=MAX_CONTROLLER_URLS)
            .map(|i| format!("https://c{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let (_dir, got) = load(&[(
            "agent.toml",
            &format!("[controller]\nurl = \"{too_many}\"\n"),
        )]);
        let err = got.unwrap_err().to_string();
        assert!(err.contains("at most 16"), "{err}");
    }

    #[test]
    fn url_list_table() {
        let ok: &[(&str, &[&str])] = &[
            ("https://a", &["https://a"]),
            ("https://a,https://b", &["https://a", "https://b"]),
            ("  https://a ,\thttps://b  ", &["https://a", "https://b"]),
            ("https://b,https://a,https://b", &["https://b", "https://a"]),
        ];
        for (value, want) in ok {
            assert_eq!(split_url_list(value).unwrap(), *want, "{value:?}");
        }
        for bad in [
            "",
            "  ",
            ",",
            "https://a,",
            ",https://a",
            "https://a,,https://b",
        ] {
            assert!(split_url_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn modules_table() {
        let (_dir, got) = load(&[(
            "agent.toml",
            "[modules]\nplain_http = [\"127.0.0.1:5000\"]\nupper = \"persist/powernode/upper\"\n\
             [[modules.credentials]]\nregistry = \"reg.example\"\nusername = \"node\"\n\
             password_file = \"etc/powernode/registry.pass\"\n",
        )]);
        let m = got.unwrap().modules;
        assert_eq!(m.plain_http, ["127.0.0.1:5000"]);
        assert_eq!(m.upper, "persist/powernode/upper");
        assert_eq!(m.trust_policy, "default");
        assert_eq!(m.credentials[0].username, "node");
        let bad: &[(&str, &str)] = &[
            ("upper = \"/abs\"", "modules.upper"),
            ("upper = \"a/../b\"", "modules.upper"),
            ("trust_policy = \"../x\"", "modules.trust_policy"),
            ("mount_target = \"a b\"", "modules.mount_target"),
            ("max_backoff_s = 0", "modules.max_backoff_s"),
            ("connect_timeout_ms = 1", "modules.connect_timeout_ms"),
        ];
        for (line, field) in bad {
            let (_dir, got) = load(&[("agent.toml", &format!("[modules]\n{line}\n"))]);
            let err = got.unwrap_err().to_string();
            assert!(err.contains(field), "{line}: {err}");
        }
    }

    #[test]
    fn mounts_table() {
        let (_dir, got) = load(&[]);
        let m = got.unwrap().mounts;
        assert_eq!(m, MountSettings::default());
        assert_eq!(m.mount_path, None);
        assert_eq!(m.confirm_window(), Duration::from_secs(60));
        let (_dir, got) = load(&[
            (
                "agent.toml",
                "[mounts]\nmount_path = \"/opt/powernode\"\nconfirm_window_s = 5\n",
            ),
            (
                "agent.toml.d/10-x.toml",
                "[mounts]\nconfirm_interval_s = 1\nmove_beneath = false\n",
            ),
        ]);
        let m = got.unwrap().mounts;
        assert_eq!(m.mount_path.as_deref(), Some("/opt/powernode"));
        assert_eq!((m.confirm_window_s, m.confirm_interval_s), (5, 1));
        assert!(!m.move_beneath);
        for (line, want) in [
            ("mount_path = \"opt/powernode\"", "mounts.mount_path"),
            ("mount_path = \"/\"", "mounts.mount_path"),
            ("mount_path = \"/opt/../etc\"", "mounts.mount_path"),
            ("mount_path = \"/opt//x\"", "mounts.mount_path"),
            ("mount_path = \"/opt/x/\"", "mounts.mount_path"),
            ("confirm_window_s = 86401", "mounts.confirm_window_s"),
            ("confirm_interval_s = 0", "mounts.confirm_interval_s"),
            ("window_s = 1", "unknown field `window_s`"),
        ] {
            let (_dir, got) = load(&[("agent.toml", &format!("[mounts]\n{line}\n"))]);
            let err = got.unwrap_err().to_string();
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn events_table() {
        let (_dir, got) = load(&[]);
        assert_eq!(got.unwrap().events.journal_max_mib.bytes(), 64 << 20);
        for (text, bytes) in [("8", 8 << 20), ("0.25", 256 << 10), ("0.0625", 64 << 10)] {
            let (_dir, got) = load(&[(
                "agent.toml",
                &format!("[events]\njournal_max_mib = {text}\n"),
            )]);
            assert_eq!(got.unwrap().events.journal_max_mib.bytes(), bytes, "{text}");
        }
        for (line, want) in [
            ("journal_max_mib = 0.01", "between 0.0625"),
            ("journal_max_mib = 0", "between 0.0625"),
            ("journal_max_mib = -1", "not a size in MiB"),
            ("journal_max_mib = \"big\"", "events.journal_max_mib"),
            ("journal_max = 3", "journal_max"),
        ] {
            let (_dir, got) = load(&[("agent.toml.d/50-ev.toml", &format!("[events]\n{line}\n"))]);
            let err = got.unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("50-ev.toml"),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn network_table() {
        let (_dir, got) = load(&[]);
        assert_eq!(got.unwrap().network.wireguard, WireguardChoice::Auto);
        for (text, want) in [
            ("auto", WireguardChoice::Auto),
            ("kernel", WireguardChoice::Kernel),
            ("userspace", WireguardChoice::Userspace),
        ] {
            let (_dir, got) = load(&[(
                "agent.toml",
                &format!("[network]\nwireguard = \"{text}\"\n"),
            )]);
            assert_eq!(got.unwrap().network.wireguard, want, "{text}");
        }
        for (line, want) in [
            ("wireguard = \"boringtun\"", "unknown variant `boringtun`"),
            ("wireguard = true", "network.wireguard"),
            ("wg = \"kernel\"", "wg"),
        ] {
            let (_dir, got) =
                load(&[("agent.toml.d/50-net.toml", &format!("[network]\n{line}\n"))]);
            let err = got.unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("50-net.toml"),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn exec_table() {
        let (_dir, got) = load(&[]);
        assert_eq!(
            got.unwrap().exec.interpreters,
            ["/bin/sh", "/bin/bash", "/usr/bin/python3"]
        );
        let (_dir, got) = load(&[
            ("agent.toml", "[exec]\ninterpreters = [\"/bin/sh\"]\n"),
            (
                "agent.toml.d/30-py.toml",
                "[exec]\ninterpreters = [\"/usr/bin/python3\", \"/bin/dash\"]\n",
            ),
        ]);
        assert_eq!(
            got.unwrap().exec.interpreters,
            ["/usr/bin/python3", "/bin/dash"],
            "a later file's list replaces the earlier one"
        );
        for (line, want) in [
            ("interpreters = []", "at least one interpreter"),
            ("interpreters = [\"sh\"]", "\"sh\" is not an absolute path"),
            ("interpreters = [\"\"]", "not an absolute path"),
            ("interpreters = [\"/\"]", "plain path"),
            ("interpreters = [\"/bin/../bin/sh\"]", "plain path"),
            ("interpreters = [\"/bin//sh\"]", "plain path"),
            ("interpreters = [\"/bin/sh/\"]", "plain path"),
            ("interpreters = [\"/bin/./sh\"]", "plain path"),
            ("interpreters = [\"/bin/s\\th\"]", "control character"),
            (
                "interpreters = [\"/bin/sh\", \"/bin/bash\", \"/bin/sh\"]",
                "\"/bin/sh\" is listed twice",
            ),
            ("interpreters = \"/bin/sh\"", "exec.interpreters"),
            ("interpreter = [\"/bin/sh\"]", "unknown field `interpreter`"),
        ] {
            let (_dir, got) = load(&[("agent.toml.d/40-ex.toml", &format!("[exec]\n{line}\n"))]);
            let err = got.unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("40-ex.toml"),
                "{line}: {err}"
            );
        }
        // A bad list names the field and where it was set.
        let (dir, got) = load(&[("agent.toml", "[exec]\ninterpreters = [\"bash\"]\n")]);
        let err = got.unwrap_err().to_string();
        let want = format!(
            "{}:2:16: invalid value [\"bash\"] for `exec.interpreters`",
            dir.path().join("agent.toml").display()
        );
        assert!(err.contains(&want), "{err}");
    }

    #[test]
    fn no_files_gives_defaults() {
        let (_dir, got) = load(&[]);
        assert_eq!(got.unwrap(), Settings::default());
        let missing = Settings::load_from(Path::new("/nonexistent/powernode/etc")).unwrap();
        assert_eq!(missing, Settings::default());
    }

    #[test]
    fn defaults() {
        let s = Settings::default();
        assert_eq!(s.log_level, "info");
        assert_eq!(s.touch_interval(), Duration::from_secs(15));
        assert_eq!(s.pubsub.connect_timeout(), Duration::from_millis(2000));
        assert_eq!(s.identity.source_timeout(), Duration::from_millis(500));
        assert!(s.identity.allow_generated_uuid);
        assert_eq!(s.identity.sources, IdentitySettings::ALL_SOURCES);
        assert_eq!(s.identity.aws_url, "http://169.254.169.254");
        assert_eq!(s.identity.gcp_url, "http://metadata.google.internal");
        assert_eq!(s.identity.azure_url, "http://169.254.169.254");
        assert_eq!(s.identity.digitalocean_url, "http://169.254.169.254");
        assert_eq!(s.identity.hetzner_url, "http://169.254.169.254");
    }

    #[test]
    fn identity_table() {
        let (_dir, got) = load(&[
            (
                "agent.toml",
                "[identity]\nsource_timeout_ms = 50\nsources = [\"Dmi\", \"IdentityCfg\"]\n",
            ),
            (
                "agent.toml.d/10-lab.toml",
                "[identity]\nallow_generated_uuid = false\nsources = [\"KernelCmdline\"]\n\
                 aws_url = \"http://127.0.0.1:8080/\"\n",
            ),
        ]);
        let got = got.unwrap().identity;
        assert_eq!(got.source_timeout_ms, 50);
        assert!(!got.allow_generated_uuid);
        assert_eq!(
            got.sources,
            [IdentitySource::KernelCmdline],
            "lists replace, not merge"
        );
        assert_eq!(got.aws_url, "http://127.0.0.1:8080/");
        assert_eq!(got.gcp_url, IdentitySettings::default().gcp_url);
    }

    #[test]
    fn merge_order_table() {
        struct Case {
            name: &'static str,
            files: &'static [(&'static str, &'static str)],
            want: (&'static str, u64, u64),
        }
        let cases = [
            Case {
                name: "base only",
                files: &[(
                    "agent.toml",
                    "log_level = \"debug\"\ntouch_interval_s = 5\n",
                )],
                want: ("debug", 5, 2000),
            },
            Case {
                name: "drop-in only",
                files: &[(
                    "agent.toml.d/50-a.toml",
                    "[pubsub]\nconnect_timeout_ms = 7\n",
                )],
                want: ("info", 15, 7),
            },
            Case {
                name: "drop-in overrides base, untouched keys kept",
                files: &[
                    (
                        "agent.toml",
                        "log_level = \"debug\"\ntouch_interval_s = 5\n",
                    ),
                    ("agent.toml.d/10-a.toml", "touch_interval_s = 30\n"),
                ],
                want: ("debug", 30, 2000),
            },
            Case {
                name: "drop-ins sorted by file name, not creation order",
                files: &[
                    ("agent.toml.d/20-b.toml", "touch_interval_s = 20\n"),
                    ("agent.toml.d/10-a.toml", "touch_interval_s = 10\n"),
                ],
                want: ("info", 20, 2000),
            },
            Case {
                name: "tables merge key by key",
                files: &[
                    ("agent.toml", "[pubsub]\nconnect_timeout_ms = 100\n"),
                    ("agent.toml.d/10-a.toml", "[pubsub]\n"),
                    ("agent.toml.d/20-b.toml", "log_level = \"warn\"\n"),
                ],
                want: ("warn", 15, 100),
            },
            Case {
                name: "non-toml and hidden files ignored",
                files: &[
                    ("agent.toml.d/10-a.toml", "touch_interval_s = 10\n"),
                    ("agent.toml.d/90-z.toml.bak", "touch_interval_s = 99\n"),
                    ("agent.toml.d/.91-swap.toml", "bogus = 1\n"),
                    ("agent.toml.d/README", "not toml at all ["),
                ],
                want: ("info", 10, 2000),
            },
        ];
        for case in cases {
            let (_dir, got) = load(case.files);
            let got = got.unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let have = (
                got.log_level.as_str(),
                got.touch_interval_s,
                got.pubsub.connect_timeout_ms,
            );
            assert_eq!(have, case.want, "{}", case.name);
        }
    }

    #[test]
    fn error_table() {
        struct Case {
            name: &'static str,
            files: &'static [(&'static str, &'static str)],
            /// Substrings the rendered error must contain; `{dir}` is the etc dir.
            want: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "unknown field names the drop-in",
                files: &[
                    ("agent.toml", "log_level = \"info\"\n"),
                    ("agent.toml.d/10-x.toml", "lgo_level = \"debug\"\n"),
                ],
                want: &[
                    "{dir}/agent.toml.d/10-x.toml:1:1: ",
                    "unknown field `lgo_level`, expected one of",
                ],
            },
            Case {
                name: "unknown field in a nested table",
                files: &[("agent.toml", "[pubsub]\nconect_timeout_ms = 5\n")],
                want: &[
                    "{dir}/agent.toml:2:1: ",
                    "unknown field `conect_timeout_ms`",
                ],
            },
            Case {
                name: "wrong type",
                files: &[("agent.toml", "touch_interval_s = \"15\"\n")],
                want: &[
                    "{dir}/agent.toml:1:20: `touch_interval_s`: ",
                    "invalid type: string \"15\", expected u64",
                ],
            },
            Case {
                name: "negative where unsigned",
                files: &[("agent.toml.d/a.toml", "[pubsub]\nconnect_timeout_ms = -1\n")],
                want: &[
                    "{dir}/agent.toml.d/a.toml:2:22: `pubsub.connect_timeout_ms`: ",
                    "invalid value: integer `-1`, expected u64",
                ],
            },
            Case {
                name: "syntax error",
                files: &[(
                    "agent.toml",
                    "log_level = \"info\"\ntouch_interval_s = = 3\n",
                )],
                want: &["{dir}/agent.toml:2:"],
            },
            Case {
                name: "bad value names field, value and file",
                files: &[
                    ("agent.toml", "touch_interval_s = 10\n"),
                    ("agent.toml.d/20-zero.toml", "touch_interval_s = 0\n"),
                ],
                want: &[
                    "{dir}/agent.toml.d/20-zero.toml:1:20: invalid value 0 for `touch_interval_s`",
                    "between 1 and 3600",
                ],
            },
            Case {
                name: "too large",
                files: &[("agent.toml", "touch_interval_s = 3601\n")],
                want: &["{dir}/agent.toml:1:20: invalid value 3601 for `touch_interval_s`"],
            },
            Case {
                name: "zero timeout",
                files: &[("agent.toml", "[pubsub]\nconnect_timeout_ms = 0\n")],
                want: &["{dir}/agent.toml:2:22: invalid value 0 for `pubsub.connect_timeout_ms`"],
            },
            Case {
                name: "identity timeout out of range",
                files: &[("agent.toml", "[identity]\nsource_timeout_ms = 0\n")],
                want: &["{dir}/agent.toml:2:21: invalid value 0 for `identity.source_timeout_ms`"],
            },
            Case {
                name: "unknown identity source",
                files: &[("agent.toml", "[identity]\nsources = [\"Aws\", \"Oracle\"]\n")],
                want: &["{dir}/agent.toml:2:", "unknown variant `Oracle`"],
            },
            Case {
                name: "identity source listed twice",
                files: &[(
                    "agent.toml.d/5.toml",
                    "[identity]\nsources = [\"Aws\", \"IdentityCfg\", \"Aws\"]\n",
                )],
                want: &[
                    "{dir}/agent.toml.d/5.toml:2:11: invalid value [Aws, IdentityCfg, Aws] for `identity.sources`",
                    "`Aws` is listed twice",
                ],
            },
            Case {
                name: "generated is not a source",
                files: &[("agent.toml", "[identity]\nsources = [\"Generated\"]\n")],
                want: &["for `identity.sources`", "allow_generated_uuid"],
            },
            Case {
                name: "generation needs identity.cfg",
                files: &[("agent.toml", "[identity]\nsources = [\"Dmi\"]\n")],
                want: &["for `identity.sources`", "must include `IdentityCfg`"],
            },
            Case {
                name: "https metadata url",
                files: &[("agent.toml", "[identity]\ngcp_url = \"https://metadata\"\n")],
                want: &[
                    "invalid value \"https://metadata\" for `identity.gcp_url`",
                    "plain HTTP",
                ],
            },
            Case {
                name: "metadata url without host",
                files: &[("agent.toml", "[identity]\nhetzner_url = \"http://:80\"\n")],
                want: &["for `identity.hetzner_url`: has no host"],
            },
            Case {
                name: "metadata url with a bad port",
                files: &[("agent.toml", "[identity]\nazure_url = \"http://h:99999\"\n")],
                want: &["for `identity.azure_url`", "port"],
            },
            Case {
                name: "misspelt level",
                files: &[("agent.toml.d/1.toml", "log_level = \"verbose\"\n")],
                want: &[
                    "{dir}/agent.toml.d/1.toml:1:13: invalid value \"verbose\" for `log_level`",
                    "`verbose` is neither a level nor `target=level`",
                ],
            },
            Case {
                name: "bad directive",
                files: &[("agent.toml", "log_level = \"info,pubsub=loud\"\n")],
                want: &["invalid value \"info,pubsub=loud\" for `log_level`"],
            },
            Case {
                name: "empty level",
                files: &[("agent.toml", "log_level = \"\"\n")],
                want: &["invalid value \"\" for `log_level`: empty"],
            },
        ];
        for case in cases {
            let (dir, got) = load(case.files);
            let err = match got {
                Ok(s) => panic!("{}: expected an error, got {s:?}", case.name),
                Err(e) => e.to_string(),
            };
            for want in case.want {
                let want = want.replace("{dir}", &dir.path().display().to_string());
                assert!(
                    err.contains(&want),
                    "{}: error {err:?} lacks {want:?}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn valid_levels() {
        for ok in [
            "trace",
            "DEBUG",
            "info",
            "warn",
            "error",
            "off",
            " info ",
            "info,powernode_pubsub=debug",
            "warn,agentbase::settings=trace",
            "powernode_pubsub=debug",
        ] {
            validate_log_level(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "",
            "verbose",
            "inf",
            "info,",
            "info,x=loud",
            "x[span]=debug",
            "x[{f=a.*b}]=debug",
            "=debug",
            // What the fuzzer found: a field filter whose regular expression took seconds.
            "[ ={l!= ''''F'....]",
        ] {
            assert!(validate_log_level(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unreadable_dropin_dir_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DROPIN_DIR), "not a directory").unwrap();
        let err = Settings::load_from(dir.path()).unwrap_err();
        assert!(matches!(&err, SettingsError::Read { path, .. } if path.ends_with(DROPIN_DIR)));
    }

    #[test]
    fn a_directory_named_like_a_dropin_is_noted_not_skipped_silently() {
        let (dir, got) = load(&[(
            "agent.toml.d/10-real.toml",
            "touch_interval_s = 7
",
        )]);
        assert!(got.unwrap().notes.is_empty());
        fs::create_dir(dir.path().join(DROPIN_DIR).join("20-dir.toml")).unwrap();
        let settings = Settings::load_from(dir.path()).unwrap();
        assert_eq!(settings.touch_interval_s, 7);
        assert_eq!(settings.notes.len(), 1, "{:?}", settings.notes);
        assert!(
            settings.notes[0].contains("20-dir.toml is not a file"),
            "{:?}",
            settings.notes
        );
    }

    #[test]
    fn line_column_counts_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, text.find('=').unwrap()), (1, 3));
        let second_eq = text.rfind('=').unwrap();
        assert_eq!(line_column(text, second_eq), (2, 4));
        assert_eq!(line_column(text, 10_000), (3, 1));
    }
}
