//! `powernode-agent introspect`: the whole node on one page — who it is, its enrollment and
//! certificate, whether the controller answers, its modules and mounts, its network, its tasks,
//! its events and its agents.
//!
//! Everything comes from the agents' publications, read as `status` reads them: from the live
//! publisher when it answers within [`SNAPSHOT_TIMEOUT`], else from the checkpoint files it
//! left, and then the section says so. A publication that does not exist under the root (its
//! agent never ran there) is shown as not published. Nothing here waits longer than that per
//! publication, so the view prints with every agent down.
//!
//! `--json` prints one JSON document; its keys are documented in docs/cli.md and kept
//! stable: a one-item section is
//! `{"publication", "publisher": "up"|"down"|"absent", "from_checkpoint", "unreadable", "value"}`,
//! a many-item section `{"publications": [{"publication", "publisher", "from_checkpoint"}],
//! "items": [...]}`.
//!
//! [`SNAPSHOT_TIMEOUT`]: crate::status::SNAPSHOT_TIMEOUT

use std::io::{self, Write};
use std::path::PathBuf;

use agentbase::Root;
use anyhow::Context as _;
use ipcmonitor::list::Row;
use ipcmonitor::output::table;
use ipcmonitor::tool::Exit;
use powernode_pubsub::inspect::{self, Source};
use powernode_pubsub::Dirs;
use powernode_types::text::rfc3339_millis;
use powernode_types::{
    ControllerStatus, EnrollmentStatus, EventdStatus, ModuleStatus, MountStatus, NetworkConfig,
    NetworkStatus, NodeIdentity, TaskConfig, TaskStatus, Topic, GLOBAL_KEY,
};
use serde_json::{json, Map, Value};

use crate::output::{
    agent_cells, agent_json, bytes, duration, elapsed_s, module_cells, mount_cells, AGENT_HEADER,
    MODULE_HEADER, MOUNT_HEADER,
};
use crate::status::{self, decode, AgentHealth, SNAPSHOT_TIMEOUT};
use crate::tasks;

/// The agent that would publish `NetworkStatus`.
pub const NETMGR: &str = "netmgr";

/// Whether a publication's publisher answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publisher {
    /// It answered: what is shown is live.
    Up,
    /// It did not: what is shown comes from the checkpoint files it left.
    Down,
    /// There is no such publication under the root: its agent never ran there.
    Absent,
}

impl Publisher {
    fn name(self) -> &'static str {
        match self {
            Publisher::Up => "up",
            Publisher::Down => "down",
            Publisher::Absent => "absent",
        }
    }
}

/// A publication and whether its publisher is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// `<agent>/<Topic>`.
    pub publication: String,
    /// Up, down or absent.
    pub publisher: Publisher,
}

impl Origin {
    /// The publishing agent.
    fn agent(&self) -> &str {
        self.publication.split('/').next().unwrap_or_default()
    }

    fn to_json(&self) -> Map<String, Value> {
        let mut object = Map::new();
        object.insert("publication".into(), json!(self.publication));
        object.insert("publisher".into(), json!(self.publisher.name()));
        object.insert(
            "from_checkpoint".into(),
            json!(self.publisher == Publisher::Down),
        );
        object
    }
}

/// The single item (key `global`) of a per-node topic.
#[derive(Clone, Debug)]
pub struct One<T> {
    /// Where it was read from.
    pub origin: Origin,
    /// The item; `Ok(None)` if there is none, `Err` why it could not be read.
    pub item: Result<Option<T>, String>,
}

impl<T> One<T> {
    fn value(&self) -> Option<&T> {
        self.item.as_ref().ok().and_then(Option::as_ref)
    }
}

/// Every item of a topic, from every publication of it.
#[derive(Clone, Debug)]
pub struct Many<T> {
    /// The publications they were read from (one, absent, when there is none).
    pub origins: Vec<Origin>,
    /// The items (unreadable ones are left out, as in `status`).
    pub items: Vec<T>,
}

/// An agent's health, and how many times it was restarted.
#[derive(Debug)]
pub struct Agent {
    /// What its `AgentStatus` says (as `status` shows it).
    pub health: AgentHealth,
    /// Starts recorded under the root, less one; `None` when there is no record.
    pub restarts: Option<u64>,
}

/// Everything `introspect` shows.
#[derive(Debug)]
pub struct View {
    /// The root the node was read under.
    pub root: PathBuf,
    /// When, unix milliseconds (node clock).
    pub now_ms: u64,
    /// `identitymgr/NodeIdentity`.
    pub identity: One<NodeIdentity>,
    /// `enrollmgr/EnrollmentStatus`.
    pub enrollment: One<EnrollmentStatus>,
    /// `heartbeatd/ControllerStatus`.
    pub controller: One<ControllerStatus>,
    /// `modulemgr/ModuleStatus`.
    pub modules: Many<ModuleStatus>,
    /// `mountmgr/MountStatus`.
    pub mounts: Many<MountStatus>,
    /// `heartbeatd/NetworkConfig`.
    pub network_config: One<NetworkConfig>,
    /// `netmgr/NetworkStatus`.
    pub network_status: One<NetworkStatus>,
    /// Whether this binary has netmgr.
    pub netmgr_built: bool,
    /// The tasks, as `tasks` shows them.
    pub tasks: Many<tasks::Shown>,
    /// `eventd/EventdStatus`.
    pub events: One<EventdStatus>,
    /// Every agent that published an `AgentStatus`.
    pub agents: Vec<Agent>,
    /// Agents of this binary that never published an `AgentStatus` under the root.
    pub not_started: Vec<String>,
}

impl View {
    /// Every publication shown whose publisher is down.
    fn down(&self) -> Vec<&str> {
        let ones = [
            &self.identity.origin,
            &self.enrollment.origin,
            &self.controller.origin,
            &self.network_config.origin,
            &self.network_status.origin,
            &self.events.origin,
        ];
        let manys = [
            &self.modules.origins,
            &self.mounts.origins,
            &self.tasks.origins,
        ];
        ones.into_iter()
            .chain(manys.into_iter().flatten())
            .filter(|o| o.publisher == Publisher::Down)
            .map(|o| o.publication.as_str())
            .collect()
    }
}

/// `powernode-agent introspect [--json]`: gathers the view under `root` and prints it.
/// `built` are the agents of this binary.
pub async fn run(root: &Root, built: &[&str], json: bool) -> anyhow::Result<Exit> {
    let view = gather(root, built).await;
    let mut out = io::stdout().lock();
    let written = if json {
        writeln!(out, "{}", to_json(&view))
    } else {
        text(&mut out, &view)
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Exit::Success),
        other => other.context("writing to stdout").map(|()| Exit::Success),
    }
}

/// Reads every section under `root`; `built` are the agents of this binary.
pub async fn gather(root: &Root, built: &[&str]) -> View {
    let dirs = Dirs::under_root(root.base());
    let (report, shown) = tokio::join!(
        status::gather(&dirs, root.base().to_owned()),
        tasks::gather(&dirs)
    );
    let rows = &report.publications;
    let (identity, enrollment, controller, network_config, network_status, events) = tokio::join!(
        one::<NodeIdentity>(&dirs, rows, "identitymgr"),
        one::<EnrollmentStatus>(&dirs, rows, "enrollmgr"),
        one::<ControllerStatus>(&dirs, rows, "heartbeatd"),
        one::<NetworkConfig>(&dirs, rows, "heartbeatd"),
        one::<NetworkStatus>(&dirs, rows, NETMGR),
        one::<EventdStatus>(&dirs, rows, "eventd"),
    );
    let not_started = built
        .iter()
        .filter(|name| !report.agents.iter().any(|a| a.agent == **name))
        .map(|name| (*name).to_owned())
        .collect();
    let agents = report
        .agents
        .into_iter()
        .map(|health| Agent {
            restarts: agentbase::events::recorded_starts(root, &health.agent)
                .map(|starts| starts.saturating_sub(1)),
            health,
        })
        .collect();
    View {
        now_ms: report.now_ms,
        root: report.root,
        identity,
        enrollment,
        controller,
        modules: Many {
            origins: origins(rows, &[ModuleStatus::NAME], "modulemgr"),
            items: report.modules,
        },
        mounts: Many {
            origins: origins(rows, &[MountStatus::NAME], "mountmgr"),
            items: report.mounts,
        },
        network_config,
        network_status,
        netmgr_built: built.contains(&NETMGR),
        tasks: Many {
            origins: origins(rows, &[TaskConfig::NAME, TaskStatus::NAME], "heartbeatd"),
            items: shown,
        },
        events,
        agents,
        not_started,
    }
}

/// The `global` item of `<agent>/<T>`.
async fn one<T: Topic>(dirs: &Dirs, rows: &[Row], agent: &str) -> One<T> {
    let publication = format!("{agent}/{}", T::NAME);
    let Some(row) = rows
        .iter()
        .find(|r| r.info.agent == agent && r.info.topic == T::NAME)
    else {
        return One {
            origin: Origin {
                publication,
                publisher: Publisher::Absent,
            },
            item: Ok(None),
        };
    };
    let snapshot = inspect::snapshot(dirs, &row.info, SNAPSHOT_TIMEOUT).await;
    let publisher = match snapshot.source {
        Source::Live { .. } => Publisher::Up,
        Source::Checkpoint { .. } => Publisher::Down,
    };
    One {
        origin: Origin {
            publication,
            publisher,
        },
        item: snapshot.items.get(GLOBAL_KEY).map(decode::<T>).transpose(),
    }
}

/// The publications of `topics` among `rows`; if there is none, `<agent>/<topics[0]>` absent.
fn origins(rows: &[Row], topics: &[&str], agent: &str) -> Vec<Origin> {
    let found: Vec<Origin> = rows
        .iter()
        .filter(|r| topics.contains(&r.info.topic.as_str()))
        .map(|r| Origin {
            publication: r.info.name(),
            publisher: if r.up { Publisher::Up } else { Publisher::Down },
        })
        .collect();
    if found.is_empty() {
        vec![Origin {
            publication: format!("{agent}/{}", topics[0]),
            publisher: Publisher::Absent,
        }]
    } else {
        found
    }
}

// ---- JSON ----

/// The view as one JSON document (keys in docs/cli.md).
pub fn to_json(view: &View) -> Value {
    let now = view.now_ms;
    json!({
        "root": view.root.display().to_string(),
        "now_ms": now,
        "identity": one_json(&view.identity, identity_json),
        "enrollment": one_json(&view.enrollment, plain_json),
        "controller": one_json(&view.controller, plain_json),
        "modules": many_json(&view.modules, plain_json),
        "mounts": many_json(&view.mounts, plain_json),
        "network": {
            "config": one_json(&view.network_config, plain_json),
            "status": one_json(&view.network_status, plain_json),
            "netmgr": netmgr_state(view),
        },
        "tasks": many_json(&view.tasks, tasks::Shown::to_json),
        "events": one_json(&view.events, plain_json),
        "agents": view.agents.iter().map(|a| {
            let mut object = match agent_json(&a.health, now) {
                Value::Object(object) => object,
                _ => Map::new(),
            };
            object.insert("restarts".into(), json!(a.restarts));
            Value::Object(object)
        }).collect::<Vec<_>>(),
        "agents_not_started": view.not_started,
        "publishers_down": view.down(),
    })
}

fn plain_json<T: Topic>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// The identity without its secrets: whether there is a bootstrap token and a CA bundle, not
/// what they are.
fn identity_json(identity: &NodeIdentity) -> Value {
    let mut value = plain_json(identity);
    if let Value::Object(object) = &mut value {
        object.remove("bootstrap_token");
        object.remove("ca_pem");
        object.insert(
            "has_bootstrap_token".into(),
            json!(identity.bootstrap_token.is_some()),
        );
        object.insert("has_ca_pem".into(), json!(identity.ca_pem.is_some()));
    }
    value
}

fn one_json<T>(one: &One<T>, value: impl Fn(&T) -> Value) -> Value {
    let mut object = one.origin.to_json();
    object.insert("unreadable".into(), json!(one.item.as_ref().err()));
    object.insert("value".into(), one.value().map_or(Value::Null, value));
    Value::Object(object)
}

fn many_json<T>(many: &Many<T>, item: impl Fn(&T) -> Value) -> Value {
    json!({
        "publications": many.origins.iter().map(|o| Value::Object(o.to_json())).collect::<Vec<_>>(),
        "items": many.items.iter().map(item).collect::<Vec<_>>(),
    })
}

/// `running`, `stopped` (its publication is there, its publisher down), `not started` (built,
/// never ran under the root) or `not built`.
fn netmgr_state(view: &View) -> &'static str {
    match view.network_status.origin.publisher {
        Publisher::Up => "running",
        Publisher::Down => "stopped",
        Publisher::Absent if view.netmgr_built => "not started",
        Publisher::Absent => "not built",
    }
}

// ---- text ----

/// Label width of the `label value` lines.
const LABEL: usize = 16;

/// The view as one page of text.
pub fn text(out: &mut dyn Write, view: &View) -> io::Result<()> {
    let now = view.now_ms;
    writeln!(
        out,
        "node under {} at {} (node clock)",
        view.root.display(),
        time(now)
    )?;

    heading(out, "identity", &view.identity.origin)?;
    if let Some(id) = one_body(out, &view.identity)? {
        let source = id
            .source
            .map_or(String::new(), |s| format!(" (from {s:?})"));
        kv(out, "uuid", &format!("{}{source}", opt(&id.uuid)))?;
        kv(out, "state", &format!("{:?}", id.state))?;
        kv(out, "hostname", &id.hostname)?;
        kv(out, "arch", &id.arch)?;
        kv(out, "boot id", &id.boot_id)?;
        kv(out, "dmi uuid", opt(&id.dmi_uuid))?;
        kv(out, "controller", &list(&id.controller_urls))?;
        let token = if id.bootstrap_token.is_some() {
            "present (not shown)"
        } else {
            "none"
        };
        kv(out, "bootstrap", token)?;
        kv(out, "last error", &one_line(&id.last_error))?;
    }

    heading(out, "enrollment", &view.enrollment.origin)?;
    if let Some(e) = one_body(out, &view.enrollment)? {
        kv(out, "state", &format!("{:?}", e.state))?;
        kv(out, "node id", opt(&e.node_id))?;
        kv(out, "controller", &list(&e.controller_urls))?;
        kv(out, "certificate", opt(&e.cert_fingerprint))?;
        if let Some(from) = e.not_before_ms {
            kv(out, "valid from", &time(from))?;
        }
        if let Some(until) = e.not_after_ms {
            kv(out, "expires", &relative(until, now))?;
        }
        let rotation = match (e.rotation_failing_since_ms, e.rotate_at_ms) {
            (Some(since), _) => format!(
                "FAILING since {}, {} failed attempt(s)",
                relative(since, now),
                e.rotation_attempts
            ),
            (None, Some(at)) => format!("due {}", relative(at, now)),
            (None, None) => "-".to_owned(),
        };
        kv(out, "rotation", &rotation)?;
        kv(out, "last error", &one_line(&e.last_error))?;
    }

    heading(out, "controller", &view.controller.origin)?;
    if let Some(c) = one_body(out, &view.controller)? {
        kv(out, "reachable", if c.reachable { "yes" } else { "NO" })?;
        kv(out, "in use", opt(&c.controller_url))?;
        kv(
            out,
            "last heartbeat",
            &c.last_success_ms
                .map_or("never succeeded".to_owned(), |ms| relative(ms, now)),
        )?;
        if !c.reachable {
            let since = c.last_success_ms.map_or("since start".to_owned(), |ms| {
                format!("for {}", duration(elapsed_s(now, ms)))
            });
            kv(
                out,
                "outage",
                &format!(
                    "unreachable {since}, {} heartbeat(s) failed in a row",
                    c.consecutive_failures
                ),
            )?;
        }
        kv(
            out,
            "generation",
            &format!("{} (desired state applied)", c.applied_generation),
        )?;
        kv(out, "interval", &format!("{}s", c.heartbeat_interval_s))?;
        let skew = c.clock_skew_ms.map_or("-".to_owned(), |ms| {
            format!("{ms:+}ms (controller clock minus node clock)")
        });
        kv(out, "clock skew", &skew)?;
        kv(out, "last error", &one_line(&c.last_error))?;
    }

    if many_section(out, "modules", &view.modules)? {
        let rows: Vec<Vec<String>> = view.modules.items.iter().map(module_cells).collect();
        table(out, &MODULE_HEADER, &rows)?;
    }

    if many_section(out, "mounts", &view.mounts)? {
        let rows: Vec<Vec<String>> = view.mounts.items.iter().map(mount_cells).collect();
        table(out, &MOUNT_HEADER, &rows)?;
    }

    heading(out, "network config", &view.network_config.origin)?;
    if let Some(n) = one_body(out, &view.network_config)? {
        kv(out, "interface", &n.interface)?;
        kv(out, "address", &n.address)?;
        kv(out, "listen port", &n.listen_port.to_string())?;
        kv(out, "peers", &n.peers.len().to_string())?;
        kv(out, "generation", &n.generation.to_string())?;
    }
    heading(out, "network status", &view.network_status.origin)?;
    match netmgr_state(view) {
        "not built" => writeln!(
            out,
            "  netmgr: not built into this binary; no overlay network is configured on this node"
        )?,
        "not started" => writeln!(out, "  netmgr: not running (never started under this root)")?,
        _ => {
            if let Some(n) = one_body(out, &view.network_status)? {
                kv(out, "state", &format!("{:?}", n.state))?;
                kv(out, "interface", &n.interface)?;
                kv(out, "public key", opt(&n.public_key))?;
                kv(out, "peers up", &n.peers_up.to_string())?;
                let mode = if n.userspace { "userspace" } else { "kernel" };
                kv(out, "wireguard", mode)?;
                kv(out, "error", &one_line(&n.error))?;
            }
        }
    }

    if many_section(out, "tasks", &view.tasks)? {
        tasks::print(&mut &mut *out, &view.tasks.items, false)?;
    }

    heading(out, "events", &view.events.origin)?;
    if let Some(e) = one_body(out, &view.events)? {
        kv(
            out,
            "pending",
            &format!("{} (not yet accepted by the controller)", e.pending),
        )?;
        let last = e
            .last_delivery_ms
            .map_or("never".to_owned(), |ms| relative(ms, now));
        kv(
            out,
            "delivered",
            &format!("{} since eventd started; last {last}", e.delivered_total),
        )?;
        kv(
            out,
            "journal",
            &format!(
                "{} events, {} of {}",
                e.journal_len,
                bytes(e.journal_bytes),
                bytes(e.journal_max_bytes)
            ),
        )?;
        kv(
            out,
            "dropped",
            &format!(
                "{} info, {} warning, {} error",
                e.dropped_info, e.dropped_warning, e.dropped_error
            ),
        )?;
        kv(out, "last error", &one_line(&e.last_error))?;
    }

    writeln!(out, "\nagents:")?;
    if view.agents.is_empty() {
        writeln!(out, "  none has published an AgentStatus under this root")?;
    } else {
        let mut header = AGENT_HEADER.to_vec();
        header.insert(2, "RESTARTS");
        let rows: Vec<Vec<String>> = view
            .agents
            .iter()
            .map(|a| {
                let mut cells = agent_cells(&a.health, now);
                let restarts = a.restarts.map_or("-".to_owned(), |n| n.to_string());
                cells.insert(2.min(cells.len()), restarts);
                cells
            })
            .collect();
        table(out, &header, &rows)?;
    }
    if !view.not_started.is_empty() {
        writeln!(
            out,
            "not started under this root: {}",
            view.not_started.join(", ")
        )?;
    }

    let down = view.down();
    if !down.is_empty() {
        writeln!(
            out,
            "\npublisher down: {}. What is shown for them comes from the checkpoint files \
             they left, not from a running agent.",
            down.join(", ")
        )?;
    }
    Ok(())
}

/// `\n<title> (<publication>):`, saying when its publisher is down.
fn heading(out: &mut dyn Write, title: &str, origin: &Origin) -> io::Result<()> {
    let note = match origin.publisher {
        Publisher::Down => ", publisher down: from its checkpoint",
        Publisher::Up | Publisher::Absent => "",
    };
    writeln!(out, "\n{title} ({}{note}):", origin.publication)
}

/// A many-item section's heading (with the publications whose publisher is down), then, when
/// there are no items, a line saying so; whether there are items to show.
fn many_section<T>(out: &mut dyn Write, title: &str, many: &Many<T>) -> io::Result<bool> {
    if let [origin] = many.origins.as_slice() {
        heading(out, title, origin)?;
    } else {
        let names: Vec<&str> = many
            .origins
            .iter()
            .map(|o| o.publication.as_str())
            .collect();
        writeln!(out, "\n{title} ({}):", names.join(", "))?;
        let down: Vec<&str> = many
            .origins
            .iter()
            .filter(|o| o.publisher == Publisher::Down)
            .map(|o| o.publication.as_str())
            .collect();
        if !down.is_empty() {
            writeln!(
                out,
                "  publisher down, shown from its checkpoint: {}",
                down.join(", ")
            )?;
        }
    }
    if !many.items.is_empty() {
        return Ok(true);
    }
    match many.origins.as_slice() {
        [origin] if origin.publisher == Publisher::Absent => writeln!(
            out,
            "  not published: {} has not run under this root",
            origin.agent()
        )?,
        _ => writeln!(out, "  none")?,
    }
    Ok(false)
}

/// The item, or a line saying why there is none.
fn one_body<'a, T>(out: &mut dyn Write, one: &'a One<T>) -> io::Result<Option<&'a T>> {
    let agent = one.origin.agent();
    match (&one.item, one.origin.publisher) {
        (Ok(Some(item)), _) => return Ok(Some(item)),
        (Err(reason), _) => writeln!(out, "  unreadable: {reason}")?,
        (Ok(None), Publisher::Absent) => {
            writeln!(out, "  not published: {agent} has not run under this root")?
        }
        (Ok(None), Publisher::Up) => writeln!(out, "  nothing published yet")?,
        (Ok(None), Publisher::Down) => writeln!(out, "  nothing published ({agent} is down)")?,
    }
    Ok(None)
}

fn kv(out: &mut dyn Write, label: &str, value: &str) -> io::Result<()> {
    writeln!(out, "  {label:<LABEL$}{value}")
}

fn opt(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("-")
}

/// A list of controller URLs, in the order they are tried; `-` when empty.
fn list(urls: &[String]) -> String {
    if urls.is_empty() {
        "-".to_owned()
    } else {
        urls.join(", ")
    }
}

fn one_line(value: &Option<String>) -> String {
    value
        .as_deref()
        .map_or("-".to_owned(), powernode_types::text::one_line)
}

/// RFC 3339 in UTC, milliseconds.
fn time(ms: u64) -> String {
    i64::try_from(ms).map_or_else(|_| ms.to_string(), rfc3339_millis)
}

/// `<time> (3m12s ago)` or `<time> (in 3m12s)`.
fn relative(ms: u64, now: u64) -> String {
    if ms <= now {
        format!("{} ({} ago)", time(ms), duration(elapsed_s(now, ms)))
    } else {
        format!("{} (in {})", time(ms), duration(elapsed_s(ms, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Reported;
    use powernode_types::{
        AgentState, AgentStatus, EnrollmentState, IdentitySource, IdentityState, ModuleState,
        MountState, Slot, TaskState,
    };

    const NOW: u64 = 1_700_000_000_000;

    fn origin(publication: &str, publisher: Publisher) -> Origin {
        Origin {
            publication: publication.into(),
            publisher,
        }
    }

    fn one<T>(publication: &str, publisher: Publisher, item: Option<T>) -> One<T> {
        One {
            origin: origin(publication, publisher),
            item: Ok(item),
        }
    }

    fn many<T>(publication: &str, publisher: Publisher, items: Vec<T>) -> Many<T> {
        Many {
            origins: vec![origin(publication, publisher)],
            items,
        }
    }

    fn identity() -> NodeIdentity {
        NodeIdentity {
            state: IdentityState::Resolved,
            uuid: Some("uuid-1".into()),
            source: Some(IdentitySource::IdentityCfg),
            boot_id: "boot-1".into(),
            hostname: "edge-1".into(),
            arch: "amd64".into(),
            dmi_uuid: None,
            bootstrap_token: Some("secret-token".into()),
            controller_urls: vec!["https://ctl:8443".into(), "https://ctl-2:8443".into()],
            ca_pem: Some("-----BEGIN CERTIFICATE-----".into()),
            last_error: None,
        }
    }

    fn enrollment(failing: bool) -> EnrollmentStatus {
        EnrollmentStatus {
            state: if failing {
                EnrollmentState::RotationFailing
            } else {
                EnrollmentState::Enrolled
            },
            node_id: Some("node-7".into()),
            cert_fingerprint: Some("ab12".into()),
            not_before_ms: Some(NOW - 3_600_000),
            not_after_ms: Some(NOW + 86_400_000),
            rotate_at_ms: Some(NOW + 3_600_000),
            controller_urls: vec!["https://ctl:8443".into(), "https://ctl-2:8443".into()],
            rotation_failing_since_ms: failing.then_some(NOW - 120_000),
            rotation_attempts: if failing { 4 } else { 0 },
            last_error: failing.then(|| "controller said 503\nretrying".into()),
        }
    }

    fn controller(reachable: bool) -> ControllerStatus {
        ControllerStatus {
            reachable,
            last_success_ms: Some(NOW - 300_000),
            consecutive_failures: if reachable { 0 } else { 20 },
            clock_skew_ms: Some(-12),
            heartbeat_interval_s: 15,
            applied_generation: 4,
            last_error: (!reachable).then(|| "connection refused".into()),
            controller_url: Some("https://ctl-2:8443".into()),
        }
    }

    fn agent(name: &str, up: bool) -> Agent {
        Agent {
            health: AgentHealth {
                agent: name.into(),
                up,
                reported: Reported::Status(AgentStatus {
                    agent: name.into(),
                    pid: 42,
                    version: "0.1.0".into(),
                    started_at_ms: NOW - 60_000,
                    last_loop_ms: NOW - 1_000,
                    state: AgentState::Running,
                    last_error: None,
                    quarantined_checkpoints: 0,
                }),
            },
            restarts: Some(2),
        }
    }

    fn view(up: bool) -> View {
        let p = if up { Publisher::Up } else { Publisher::Down };
        View {
            root: PathBuf::from("/r"),
            now_ms: NOW,
            identity: one("identitymgr/NodeIdentity", p, Some(identity())),
            enrollment: one("enrollmgr/EnrollmentStatus", p, Some(enrollment(!up))),
            controller: one("heartbeatd/ControllerStatus", p, Some(controller(up))),
            modules: many(
                "modulemgr/ModuleStatus",
                p,
                vec![ModuleStatus {
                    name: "tools".into(),
                    reference: "reg/m/tools:1".into(),
                    state: ModuleState::Active,
                    digest: Some(format!("sha256:{}", "cd".repeat(32))),
                    bytes_done: 10,
                    bytes_total: Some(10),
                    error: None,
                }],
            ),
            mounts: many(
                "mountmgr/MountStatus",
                p,
                vec![MountStatus {
                    target: "modules".into(),
                    generation: 2,
                    state: MountState::Mounted,
                    slot: Some(Slot::A),
                    layers: vec![format!("sha256:{}", "cd".repeat(32))],
                    error: None,
                    upper_dir: None,
                    drift: None,
                    confirm_until_ms: None,
                }],
            ),
            network_config: one("heartbeatd/NetworkConfig", p, None),
            network_status: one("netmgr/NetworkStatus", Publisher::Absent, None),
            netmgr_built: false,
            tasks: many(
                "heartbeatd/TaskConfig",
                p,
                vec![tasks::Shown {
                    id: "task-1".into(),
                    kind: "node.exec".into(),
                    held: true,
                    lease_expires_at_ms: Some(NOW + 60_000),
                    status: Some(TaskStatus {
                        id: "task-1".into(),
                        kind: "node.exec".into(),
                        state: TaskState::Running,
                        output: String::new(),
                        started_at_ms: NOW - 1_000,
                        finished_at_ms: None,
                    }),
                }],
            ),
            events: one("eventd/EventdStatus", Publisher::Absent, None),
            agents: vec![agent("enrollmgr", up)],
            not_started: vec!["verifier".into()],
        }
    }

    fn render(view: &View) -> String {
        let mut buf = Vec::new();
        text(&mut buf, view).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn every_section_is_on_the_page() {
        let page = render(&view(true));
        for heading in [
            "identity (identitymgr/NodeIdentity):",
            "enrollment (enrollmgr/EnrollmentStatus):",
            "controller (heartbeatd/ControllerStatus):",
            "modules (modulemgr/ModuleStatus):",
            "mounts (mountmgr/MountStatus):",
            "network config (heartbeatd/NetworkConfig):",
            "network status (netmgr/NetworkStatus):",
            "tasks (heartbeatd/TaskConfig):",
            "events (eventd/EventdStatus):",
            "agents:",
        ] {
            assert!(
                page.contains(&format!("\n{heading}\n")),
                "{heading}:\n{page}"
            );
        }
        for line in [
            "  uuid            uuid-1 (from IdentityCfg)",
            "  bootstrap       present (not shown)",
            "  node id         node-7",
            "  expires         2023-11-15T22:13:20.000Z (in 1d00h)",
            "  rotation        due 2023-11-14T23:13:20.000Z (in 1h00m)",
            "  reachable       yes",
            "  in use          https://ctl-2:8443",
            "  controller      https://ctl:8443, https://ctl-2:8443",
            "  last heartbeat  2023-11-14T22:08:20.000Z (5m00s ago)",
            "  clock skew      -12ms (controller clock minus node clock)",
            "  netmgr: not built into this binary; no overlay network is configured on this node",
            "  nothing published yet",
            "  not published: eventd has not run under this root",
            "not started under this root: verifier",
        ] {
            assert!(
                page.contains(&format!("{line}\n")),
                "{line:?} missing:\n{page}"
            );
        }
        assert!(!page.contains("secret-token"), "{page}");
        assert!(!page.contains("outage"), "{page}");
        assert!(!page.contains("publisher down"), "{page}");
        // The tables are those of `status` and `tasks`.
        let lines: Vec<&str> = page.lines().collect();
        let agents = lines.iter().position(|l| *l == "agents:").unwrap();
        assert_eq!(
            lines[agents + 1],
            "AGENT      STATE    RESTARTS  PID  UPTIME  LAST LOOP  LAST ERROR"
        );
        assert_eq!(
            lines[agents + 2],
            "enrollmgr  Running  2         42   1m00s   1s ago     -"
        );
        assert!(page.contains("\ntools   Active"), "{page}");
        assert!(page.contains("\nmodules  2    Mounted  A"), "{page}");
        assert!(page.contains("\ntask-1 "), "{page}");
    }

    #[test]
    fn stopped_publishers_and_failures_are_said() {
        let page = render(&view(false));
        assert!(
            page.contains(
                "\nidentity (identitymgr/NodeIdentity, publisher down: from its checkpoint):\n"
            ),
            "{page}"
        );
        assert!(
            page.contains(
                "\nmodules (modulemgr/ModuleStatus, publisher down: from its checkpoint):\n"
            ),
            "{page}"
        );
        for line in [
            "  reachable       NO",
            "  outage          unreachable for 5m00s, 20 heartbeat(s) failed in a row",
            "  rotation        FAILING since 2023-11-14T22:11:20.000Z (2m00s ago), 4 failed attempt(s)",
            "  last error      controller said 503\\nretrying",
            "  nothing published (heartbeatd is down)",
            "enrollmgr  down (last said Running)  2         42   -       1s ago     -",
        ] {
            assert!(page.contains(&format!("{line}\n")), "{line:?} missing:\n{page}");
        }
        assert!(
            page.ends_with(
                "\npublisher down: identitymgr/NodeIdentity, enrollmgr/EnrollmentStatus, \
                 heartbeatd/ControllerStatus, heartbeatd/NetworkConfig, modulemgr/ModuleStatus, \
                 mountmgr/MountStatus, heartbeatd/TaskConfig. What is shown for them comes from \
                 the checkpoint files they left, not from a running agent.\n"
            ),
            "{page}"
        );
    }

    #[test]
    fn a_section_of_several_publications_names_those_down() {
        let mut v = view(true);
        v.tasks.origins = vec![
            origin("execd/TaskStatus", Publisher::Down),
            origin("heartbeatd/TaskConfig", Publisher::Up),
        ];
        v.modules.items.clear();
        v.mounts = many("mountmgr/MountStatus", Publisher::Absent, vec![]);
        let page = render(&v);
        assert!(
            page.contains(
                "\ntasks (execd/TaskStatus, heartbeatd/TaskConfig):\n  \
                 publisher down, shown from its checkpoint: execd/TaskStatus\nID "
            ),
            "{page}"
        );
        assert!(
            page.contains("\nmodules (modulemgr/ModuleStatus):\n  none\n"),
            "{page}"
        );
        assert!(
            page.contains(
                "\nmounts (mountmgr/MountStatus):\n  not published: mountmgr has not run under \
                 this root\n"
            ),
            "{page}"
        );
        assert!(page.ends_with("checkpoint files they left, not from a running agent.\n"));
    }

    #[test]
    fn unreadable_and_netmgr_states() {
        let mut v = view(true);
        v.identity.item = Err("schema version 9; this build reads version 1".into());
        v.netmgr_built = true;
        let page = render(&v);
        assert!(
            page.contains("  unreadable: schema version 9; this build reads version 1\n"),
            "{page}"
        );
        assert!(
            page.contains("  netmgr: not running (never started under this root)\n"),
            "{page}"
        );
        v.network_status = one("netmgr/NetworkStatus", Publisher::Down, None);
        assert_eq!(netmgr_state(&v), "stopped");
        assert!(render(&v).contains("  nothing published (netmgr is down)\n"));
    }

    #[test]
    fn json_sections_have_stable_keys() {
        let doc = to_json(&view(true));
        let keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "agents",
                "agents_not_started",
                "controller",
                "enrollment",
                "events",
                "identity",
                "modules",
                "mounts",
                "network",
                "now_ms",
                "publishers_down",
                "root",
                "tasks",
            ]
        );
        let identity = &doc["identity"];
        assert_eq!(identity["publication"], "identitymgr/NodeIdentity");
        assert_eq!(identity["publisher"], "up");
        assert_eq!(identity["from_checkpoint"], false);
        assert_eq!(identity["unreadable"], Value::Null);
        assert_eq!(identity["value"]["uuid"], "uuid-1");
        assert_eq!(identity["value"]["has_bootstrap_token"], true);
        assert_eq!(identity["value"]["has_ca_pem"], true);
        assert!(!doc.to_string().contains("secret-token"));
        assert!(!doc.to_string().contains("BEGIN CERTIFICATE"));
        assert_eq!(doc["enrollment"]["value"]["node_id"], "node-7");
        assert_eq!(doc["controller"]["value"]["reachable"], true);
        assert_eq!(doc["modules"]["publications"][0]["publisher"], "up");
        assert_eq!(doc["modules"]["items"][0]["state"], "Active");
        assert_eq!(doc["mounts"]["items"][0]["slot"], "A");
        assert_eq!(doc["network"]["netmgr"], "not built");
        assert_eq!(doc["network"]["status"]["publisher"], "absent");
        assert_eq!(doc["network"]["config"]["value"], Value::Null);
        assert_eq!(doc["tasks"]["items"][0]["status"]["state"], "Running");
        assert_eq!(doc["events"]["publisher"], "absent");
        assert_eq!(doc["agents"][0]["agent"], "enrollmgr");
        assert_eq!(doc["agents"][0]["restarts"], 2);
        assert_eq!(doc["agents_not_started"][0], "verifier");
        assert_eq!(doc["publishers_down"], json!([]));

        let down = to_json(&view(false));
        assert_eq!(down["identity"]["publisher"], "down");
        assert_eq!(down["identity"]["from_checkpoint"], true);
        assert_eq!(down["identity"]["value"]["uuid"], "uuid-1");
        assert_eq!(down["agents"][0]["up"], false);
        assert_eq!(down["publishers_down"].as_array().unwrap().len(), 7);
    }
}
