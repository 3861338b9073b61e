//! Table tests of the state machine ([`Modules`]), without a registry, a verifier or mountmgr:
//! each row feeds one event in (an assignment, a fetch's reports, a verdict, mountmgr's
//! answer) and says what must come out — the stack last published as `MountConfig` and every
//! module's published `ModuleStatus`. The other effects (fetches, re-reads of a stored copy,
//! events, garbage collection) are looked at where a test is about them.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use powernode_modules::digest::Digest;
use powernode_modules::format::{
    host_architecture, Descriptor, HealthCheckSpec, ImageManifest, ModuleManifest, ARTIFACT_TYPE,
    CONFIG_MEDIA_TYPE, LAYER_MEDIA_TYPE, OCI_MANIFEST,
};
use powernode_modules::registry::Resolved;
use powernode_pubsub::Event;
use powernode_types::{
    ModuleState, ModuleStatus, MountConfig, MountState, MountStatus, UpperMode, VerifyConfig,
    VerifyState, VerifyStatus,
};

use crate::events::{self, Raised};
use crate::fetch::{Fetched, Report};
use crate::gc::Garbage;
use crate::modules::{Effect, Modules, Restored, Settings};
use crate::pipeline::Assignment;

const TARGET: &str = "modules";
const REPOSITORY: &str = "registry.test/modules";

/// One event fed in. Modules are named by name and version (`app`, `1`): each version is an
/// image of its own, with the dependencies and health check it was declared with.
#[derive(Debug, Clone)]
enum Step {
    /// The module is assigned (locally) at that version.
    Assign(&'static str, &'static str),
    /// Its assignment is removed.
    Unassign(&'static str),
    /// Its fetch resolves, downloads and syncs the version assigned.
    Fetch(&'static str),
    /// Its fetch reports the image in the store, not yet synced.
    Stored(&'static str),
    /// Its fetch finds the image in the store already (nothing to download) and syncs it.
    InStore(&'static str),
    /// Its fetch reports the image synced.
    Synced(&'static str),
    /// The verifier accepts the version assigned.
    Verified(&'static str),
    /// The verifier rejects it for this reason.
    Rejected(&'static str, &'static str),
    /// The verifier is checking it again (the trust policy changed).
    Rechecking(&'static str),
    /// Reading the stored copy again found it intact (true) or damaged (false).
    Reread(&'static str, bool),
    /// mountmgr's answer to the stack last published.
    Mount(Answer),
}

/// What mountmgr says.
#[derive(Debug, Clone)]
enum Answer {
    /// The stack last published is mounted and confirmed at once (no health checks).
    Mounted,
    /// It is mounted, in its confirmation window.
    InWindow,
    /// The window of the stack mounted last is over: confirmed.
    Confirmed,
    /// A check failed in that window: the stack before is mounted again.
    RolledBack(&'static str),
    /// The stack last published could not be built; the one before stays.
    Failed(&'static str),
}

/// A row: the event, then the stack (`name@version`, bottom first, `-` for none published)
/// and every module's status (`name State` and `: error` when there is one, `; ` between).
struct Row(Step, &'static str, &'static str);

/// The images a test knows: name, version, dependencies, whether it has a health check.
type Catalog = &'static [(&'static str, &'static str, &'static [&'static str], bool)];

/// The state machine and what came out of it.
struct Harness {
    modules: Modules,
    images: BTreeMap<(String, String), Fetched>,
    /// The version assigned to each module.
    assigned: BTreeMap<String, String>,
    local: BTreeMap<String, Assignment>,
    statuses: BTreeMap<String, ModuleStatus>,
    stack: Option<MountConfig>,
    handed: BTreeMap<String, VerifyConfig>,
    /// The run of each module's latest fetch.
    epochs: BTreeMap<String, u64>,
    /// Every fetch started: module and the damaged copy it discards first.
    fetches: Vec<(String, Option<String>)>,
    /// Every re-read of a stored copy asked for: module and image.
    rereads: Vec<(String, String)>,
    raised: Vec<Raised>,
    garbage: Vec<Garbage>,
    /// mountmgr's side: the stack mounted (digests), its generation, and the one before.
    mounted: (u64, Vec<String>),
    mounted_before: (u64, Vec<String>),
    /// The stack before, as kept on disk.
    kept_before: Option<MountConfig>,
}

/// A descriptor of `bytes` (for the other tests of the crate too).
pub(crate) fn descriptor(media_type: &str, bytes: &[u8]) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest: Digest::of(bytes).to_string(),
        size: bytes.len() as u64,
        artifact_type: None,
        platform: None,
        annotations: BTreeMap::new(),
    }
}

/// The image of `name` at `version`.
fn image(name: &str, version: &str, dependencies: &[&str], checked: bool) -> Fetched {
    let module = ModuleManifest {
        name: name.to_owned(),
        version: version.to_owned(),
        priority: 10,
        architecture: host_architecture().to_owned(),
        dependencies: dependencies.iter().map(|d| (*d).to_owned()).collect(),
        services: Vec::new(),
        files: Vec::new(),
        health_check: checked.then(|| HealthCheckSpec {
            command: vec!["bin/check".into()],
            timeout_s: 5,
        }),
    };
    let config = serde_json::to_string(&module).unwrap();
    let layer = descriptor(LAYER_MEDIA_TYPE, format!("{name} {version}").as_bytes());
    let manifest = serde_json::to_string(&ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config: descriptor(CONFIG_MEDIA_TYPE, config.as_bytes()),
        layers: vec![layer.clone()],
        annotations: BTreeMap::new(),
    })
    .unwrap();
    let hex = layer.digest.trim_start_matches("sha256:").to_owned();
    Fetched {
        resolved: Resolved {
            repository: format!("{REPOSITORY}/{name}"),
            manifest_digest: Digest::of(manifest.as_bytes()),
            manifest,
            index_digest: None,
            signed_index: None,
            image: layer,
            config,
            module,
        },
        image_path: PathBuf::from(format!("/store/sha256/{hex}")),
        signatures: Vec::new(),
        offline: false,
    }
}

fn reference(name: &str, version: &str) -> String {
    format!("{REPOSITORY}/{name}:{version}")
}

fn settings() -> Settings {
    Settings {
        target: TARGET.into(),
        upper: UpperMode::Tmpfs,
        trust_policy: "default".into(),
    }
}

impl Harness {
    /// A node whose assignment is known (no controller), nothing published before.
    fn new(catalog: Catalog) -> Harness {
        Harness::restarted(
            catalog,
            Restored {
                desired_known: true,
                ..Restored::default()
            },
        )
    }

    /// modulemgr starting over what an earlier run left.
    fn restarted(catalog: Catalog, restored: Restored) -> Harness {
        let images = catalog
            .iter()
            .map(|(name, version, deps, checked)| {
                let key = ((*name).to_owned(), (*version).to_owned());
                (key, image(name, version, deps, *checked))
            })
            .collect();
        let stack = restored.stack.clone();
        let mounted = stack.as_ref().map_or((0, Vec::new()), |s| {
            (
                s.generation,
                s.layers.iter().map(|l| l.digest.clone()).collect(),
            )
        });
        Harness {
            modules: Modules::new(settings(), restored),
            images,
            assigned: BTreeMap::new(),
            local: BTreeMap::new(),
            statuses: BTreeMap::new(),
            stack,
            handed: BTreeMap::new(),
            epochs: BTreeMap::new(),
            fetches: Vec::new(),
            rereads: Vec::new(),
            raised: Vec::new(),
            garbage: Vec::new(),
            mounted,
            mounted_before: (0, Vec::new()),
            kept_before: None,
        }
    }

    /// The image of `name`'s assigned version.
    fn fetched(&self, name: &str) -> Fetched {
        let version = &self.assigned[name];
        self.images[&(name.to_owned(), version.clone())].clone()
    }

    /// `name@version` of an image digest.
    fn label(&self, digest: &str) -> String {
        self.images
            .iter()
            .find(|(_, f)| f.resolved.image.digest == digest)
            .map_or_else(|| digest.to_owned(), |((n, v), _)| format!("{n}@{v}"))
    }

    fn digest(&self, name: &str, version: &str) -> Digest {
        let f = &self.images[&(name.to_owned(), version.to_owned())];
        Digest::parse(&f.resolved.image.digest).unwrap()
    }

    /// Takes in what the state machine answered.
    fn take(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Fetch {
                    name,
                    epoch,
                    discard,
                    ..
                } => {
                    self.epochs.insert(name.clone(), epoch);
                    self.fetches.push((name, discard));
                }
                Effect::StopFetch(name) => {
                    self.epochs.remove(&name);
                }
                Effect::Recheck { name, digest, .. } => self.rereads.push((name, digest)),
                Effect::Status(status) => {
                    self.statuses.insert(status.name.clone(), status);
                }
                Effect::Unstatus(name) => {
                    self.statuses.remove(&name);
                }
                Effect::Verify(config) => {
                    self.handed.insert(config.name.clone(), config);
                }
                Effect::Unverify(name) => {
                    self.handed.remove(&name);
                }
                Effect::Stack(config) => self.stack = Some(config),
                Effect::Raise(raised) => self.raised.push(raised),
                Effect::ReportError(_) => {}
                Effect::CollectGarbage(garbage) => self.garbage.push(garbage),
                Effect::KeepStackBefore(before) => self.kept_before = before,
            }
        }
    }

    fn report(&mut self, name: &str, report: Report) {
        let epoch = self.epochs[name];
        let effects = self.modules.on_report(name, epoch, report);
        self.take(effects);
    }

    fn verdict(&mut self, name: &str, state: VerifyState, reason: Option<&str>) {
        let f = self.fetched(name);
        let status = VerifyStatus {
            name: name.to_owned(),
            digest: f.resolved.image.digest.clone(),
            manifest_digest: f.resolved.manifest_digest.to_string(),
            state,
            reason: reason.map(str::to_owned),
        };
        let effects = self.modules.on_verdict(Event::Create {
            key: name.to_owned(),
            value: status,
        });
        self.take(effects);
    }

    fn mount_status(&mut self, generation: u64, state: MountState, error: Option<&str>) {
        self.mount_status_with(generation, state, error, None);
    }

    fn mount_status_with(
        &mut self,
        generation: u64,
        state: MountState,
        error: Option<&str>,
        confirm_until_ms: Option<u64>,
    ) {
        let status = MountStatus {
            target: TARGET.into(),
            generation,
            state,
            slot: None,
            layers: self.mounted.1.clone(),
            error: error.map(str::to_owned),
            upper_dir: None,
            drift: None,
            confirm_until_ms,
        };
        let effects = self.modules.on_mount(&status);
        self.take(effects);
    }

    fn mount(&mut self, answer: &Answer) {
        let stack = self.stack.clone().expect("a stack to answer");
        let digests = stack.layers.iter().map(|l| l.digest.clone()).collect();
        match answer {
            Answer::Mounted | Answer::InWindow => {
                self.mounted_before =
                    std::mem::replace(&mut self.mounted, (stack.generation, digests));
                let window = matches!(answer, Answer::InWindow).then_some(60_000);
                self.mount_status_with(stack.generation, MountState::Mounted, None, window);
            }
            Answer::Confirmed => self.mount_status(self.mounted.0, MountState::Mounted, None),
            Answer::RolledBack(reason) => {
                let generation = self.mounted.0;
                self.mounted = std::mem::take(&mut self.mounted_before);
                self.mount_status(generation, MountState::RolledBack, Some(reason));
            }
            Answer::Failed(reason) => {
                self.mount_status(stack.generation, MountState::Failed, Some(reason));
            }
        }
    }

    /// Assigns `name` at `version` locally, at the module manifest's priority.
    fn assign(&mut self, name: &str, version: &str) {
        self.assign_at(name, version, None);
    }

    /// Assigns `name` at `version` locally, at `priority` (`None`: the manifest's).
    fn assign_at(&mut self, name: &str, version: &str, priority: Option<u32>) {
        self.assigned.insert(name.to_owned(), version.to_owned());
        self.local.insert(
            name.to_owned(),
            Assignment {
                name: name.to_owned(),
                reference: reference(name, version),
                priority,
            },
        );
        self.modules.set_local(self.local.clone());
        let effects = self.modules.reconcile();
        self.take(effects);
    }

    fn step(&mut self, step: &Step) {
        match step {
            Step::Assign(name, version) => self.assign(name, version),
            Step::Unassign(name) => {
                self.assigned.remove(*name);
                self.local.remove(*name);
                self.modules.set_local(self.local.clone());
                let effects = self.modules.reconcile();
                self.take(effects);
            }
            Step::Fetch(name) => {
                self.step(&Step::Stored(name));
                self.step(&Step::Synced(name));
            }
            Step::Stored(name) => {
                let f = self.fetched(name);
                let (digest, total) = (f.resolved.image.digest.clone(), f.resolved.image.size);
                self.report(name, Report::Resolved { digest, total });
                self.report(name, Report::Arriving(Box::new(f.clone())));
                self.report(name, Report::Progress { done: total });
                self.report(name, Report::Done(Box::new(f)));
            }
            Step::InStore(name) => {
                let f = self.fetched(name);
                let (digest, total) = (f.resolved.image.digest.clone(), f.resolved.image.size);
                self.report(name, Report::Resolved { digest, total });
                self.report(name, Report::Done(Box::new(f)));
                self.report(name, Report::Durable);
            }
            Step::Synced(name) => self.report(name, Report::Durable),
            Step::Verified(name) => self.verdict(name, VerifyState::Verified, Some("signed")),
            Step::Rejected(name, reason) => self.verdict(name, VerifyState::Failed, Some(reason)),
            Step::Rechecking(name) => self.verdict(name, VerifyState::Verifying, None),
            Step::Reread(name, intact) => {
                let damage = (!intact).then(|| "it no longer hashes to its digest".to_owned());
                self.report(name, Report::Rechecked { damage });
            }
            Step::Mount(answer) => self.mount(answer),
        }
    }

    /// The stack last published, as `name@version` bottom first.
    fn stack_text(&self) -> String {
        match &self.stack {
            None => "-".into(),
            Some(s) => s
                .layers
                .iter()
                .map(|l| self.label(&l.digest))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// Every module's published status.
    fn statuses_text(&self) -> String {
        self.statuses
            .values()
            .map(|s| match &s.error {
                Some(e) => format!("{} {:?}: {e}", s.name, s.state),
                None => format!("{} {:?}", s.name, s.state),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Runs `rows`, checking each.
    fn run(&mut self, rows: &[Row]) {
        for (i, Row(step, stack, statuses)) in rows.iter().enumerate() {
            self.step(step);
            let what = format!("row {i} ({step:?})");
            assert_eq!(self.stack_text(), *stack, "stack after {what}");
            assert_eq!(self.statuses_text(), *statuses, "statuses after {what}");
            // What is published is what the state derives to.
            for (name, published) in &self.statuses {
                assert_eq!(
                    self.modules.status(name).as_ref(),
                    Some(published),
                    "{name} after {what}"
                );
            }
        }
    }

    /// The kinds of the events raised, in order.
    fn raised_kinds(&self) -> Vec<&str> {
        self.raised.iter().map(|r| r.kind).collect()
    }

    /// The blobs the last garbage collection kept.
    fn kept(&self) -> Option<&HashSet<Digest>> {
        self.garbage.last().and_then(|g| g.blobs.as_ref())
    }
}

use Answer::*;
use Step::*;

/// app@1 assigned, stored, verified and mounted, alone.
const APP_1: [Row; 4] = [
    Row(Assign("app", "1"), "-", "app Resolving"),
    Row(Fetch("app"), "-", "app Verifying"),
    Row(Verified("app"), "app@1", "app Mounting"),
    Row(Mount(Mounted), "app@1", "app Active"),
];

/// A node with app@1 assigned and in the store, waiting for its verdict.
fn app_1_stored(catalog: Catalog) -> Harness {
    let mut h = Harness::new(catalog);
    h.run(&APP_1[..2]);
    h
}

/// A node whose one module, app@1, is Active.
fn app_1_active(catalog: Catalog) -> Harness {
    let mut h = Harness::new(catalog);
    h.run(&APP_1);
    h
}

const PLAIN: Catalog = &[
    ("app", "1", &[], false),
    ("app", "2", &[], false),
    ("base", "1", &[], false),
];

#[test]
fn a_module_goes_through_every_phase_to_active() {
    let mut h = Harness::new(PLAIN);
    h.run(&[
        Row(Assign("app", "1"), "-", "app Resolving"),
        Row(Stored("app"), "-", "app Verifying"),
        // Verified but not yet synced: not stacked, since the stack outlives a power cut.
        Row(Verified("app"), "-", "app Verifying"),
        Row(Synced("app"), "app@1", "app Mounting"),
        Row(Mount(Mounted), "app@1", "app Active"),
        Row(Unassign("app"), "", ""),
    ]);
    assert_eq!(h.raised_kinds(), [events::ACTIVE]);
    assert!(
        h.handed.is_empty(),
        "the removed module's config is withdrawn"
    );
    assert!(h.epochs.is_empty(), "the removed module's fetch is stopped");
}

#[test]
fn download_progress_and_retries_show_in_the_status() {
    let mut h = Harness::new(PLAIN);
    h.assign("app", "1");
    let retry = |h: &mut Harness, attempt| {
        h.report(
            "app",
            Report::Retrying {
                error: "registry unreachable".into(),
                attempt,
                retry_in: Duration::from_millis(500),
            },
        );
    };
    retry(&mut h, 1);
    let status = &h.statuses["app"];
    assert_eq!(status.state, ModuleState::Resolving);
    assert_eq!(
        status.error.as_deref(),
        Some("registry unreachable; retrying in 0.5s")
    );
    for attempt in 2..=4 {
        retry(&mut h, attempt);
    }
    let f = h.fetched("app");
    let (digest, total) = (f.resolved.image.digest.clone(), f.resolved.image.size);
    h.report("app", Report::Resolved { digest, total });
    h.report("app", Report::Progress { done: 3 });
    let status = &h.statuses["app"];
    assert_eq!(
        (
            status.state,
            status.bytes_done,
            status.bytes_total,
            &status.error
        ),
        (ModuleState::Downloading, 3, Some(total), &None),
        "the error is over once the reference resolves again"
    );
    h.report("app", Report::Done(Box::new(f)));
    // Raised at the first failed attempt and the fourth, then once when it goes through.
    assert_eq!(
        h.raised_kinds(),
        [
            events::DOWNLOAD_FAILING,
            events::DOWNLOAD_FAILING,
            events::DOWNLOAD_RECOVERED
        ]
    );
    assert_eq!(h.raised[2].field("failed_attempts"), Some("4"));
    assert_eq!(h.statuses["app"].bytes_done, total);
}

#[test]
fn a_download_that_fails_for_good_fails_the_module_and_withdraws_its_config() {
    let mut h = Harness::new(PLAIN);
    h.assign("app", "1");
    let f = h.fetched("app");
    let (digest, total) = (f.resolved.image.digest.clone(), f.resolved.image.size);
    h.report("app", Report::Resolved { digest, total });
    h.report("app", Report::Arriving(Box::new(f)));
    h.report("app", Report::Progress { done: 2 });
    assert!(h.handed.get("app").is_some_and(|c| !c.complete));
    h.report("app", Report::Failed("wrong digest".into()));
    let status = &h.statuses["app"];
    assert_eq!(
        (status.state, status.bytes_done, status.error.as_deref()),
        (ModuleState::Failed, 2, Some("wrong digest"))
    );
    assert!(h.handed.is_empty(), "the verifier stops following it");
    assert_eq!(h.raised_kinds(), [events::DOWNLOAD_FAILED]);
}

#[test]
fn a_local_assignment_without_a_priority_is_stacked_at_its_manifests() {
    let mut h = Harness::new(PLAIN);
    // base's manifest asks for 60, above app's 10 (both manifests are otherwise alike).
    let base = h.images.get_mut(&("base".into(), "1".into())).unwrap();
    base.resolved.module.priority = 60;
    h.run(&[
        Row(Assign("base", "1"), "-", "base Resolving"),
        Row(Fetch("base"), "-", "base Verifying"),
        Row(Verified("base"), "base@1", "base Mounting"),
        Row(Mount(Mounted), "base@1", "base Active"),
        Row(Assign("app", "1"), "base@1", "app Resolving; base Active"),
        Row(Fetch("app"), "base@1", "app Verifying; base Active"),
        Row(Verified("app"), "app@1 base@1", "app Mounting; base Active"),
    ]);
    let priorities = |h: &Harness| -> Vec<u32> {
        h.stack
            .as_ref()
            .unwrap()
            .layers
            .iter()
            .map(|l| l.priority)
            .collect()
    };
    assert_eq!(priorities(&h), [10, 60]);
    // An assignment that names a priority has it, whatever the manifest says.
    h.assign_at("app", "1", Some(99));
    assert_eq!(h.stack_text(), "base@1 app@1");
    assert_eq!(priorities(&h), [60, 99]);
}

const DEPENDENT: Catalog = &[
    ("base", "1", &[], false),
    ("lib", "1", &[], false),
    ("app", "1", &["lib"], false),
    ("app", "2", &["lib"], false),
    ("tool", "1", &[], false),
    ("tool", "2", &["lib"], false),
];

#[test]
fn a_module_whose_dependency_is_not_stacked_waits() {
    let mut h = Harness::new(DEPENDENT);
    h.run(&[
        Row(Assign("base", "1"), "-", "base Resolving"),
        Row(Fetch("base"), "-", "base Verifying"),
        Row(Verified("base"), "base@1", "base Mounting"),
        Row(Mount(Mounted), "base@1", "base Active"),
        // Its dependency is not assigned: it says so, and the stack stays as it is.
        Row(Assign("app", "1"), "base@1", "app Resolving; base Active"),
        Row(Fetch("app"), "base@1", "app Verifying; base Active"),
        Row(
            Verified("app"),
            "base@1",
            "app Mounting: depends on module lib, which is not assigned to this node; base Active",
        ),
        // Assigned, still on its way: the module waits for it.
        Row(
            Assign("lib", "1"),
            "base@1",
            "app Mounting: waiting for module lib, which it depends on; base Active; lib Resolving",
        ),
        Row(
            Fetch("lib"),
            "base@1",
            "app Mounting: waiting for module lib, which it depends on; base Active; lib Verifying",
        ),
        // Both join in one stack.
        Row(
            Verified("lib"),
            "app@1 base@1 lib@1",
            "app Mounting: waiting for module lib, which it depends on; base Active; lib Mounting",
        ),
        Row(
            Mount(Mounted),
            "app@1 base@1 lib@1",
            "app Active; base Active; lib Active",
        ),
        // The dependency leaves the stack, and the module with it.
        Row(
            Unassign("lib"),
            "base@1",
            "app Mounting: depends on module lib, which is not assigned to this node; base Active",
        ),
    ]);
}

#[test]
fn an_upgrade_keeps_the_old_version_stacked_until_the_new_one_is_ready() {
    let mut h = Harness::new(DEPENDENT);
    h.run(&[
        Row(Assign("tool", "1"), "-", "tool Resolving"),
        Row(Fetch("tool"), "-", "tool Verifying"),
        Row(Verified("tool"), "tool@1", "tool Mounting"),
        Row(Mount(Mounted), "tool@1", "tool Active"),
        // The new version on its way: the old one stays stacked.
        Row(Assign("tool", "2"), "tool@1", "tool Resolving"),
        Row(Fetch("tool"), "tool@1", "tool Verifying"),
        // Ready, but it depends on a module not assigned: the old version stays.
        Row(
            Verified("tool"),
            "tool@1",
            "tool Mounting: depends on module lib, which is not assigned to this node",
        ),
        Row(
            Assign("lib", "1"),
            "tool@1",
            "lib Resolving; tool Mounting: waiting for module lib, which it depends on",
        ),
        Row(
            Fetch("lib"),
            "tool@1",
            "lib Verifying; tool Mounting: waiting for module lib, which it depends on",
        ),
        Row(
            Verified("lib"),
            "lib@1 tool@2",
            "lib Mounting; tool Mounting: waiting for module lib, which it depends on",
        ),
        Row(Mount(Mounted), "lib@1 tool@2", "lib Active; tool Active"),
    ]);
    // The old version's image is not needed any more.
    assert!(!h.kept().unwrap().contains(&h.digest("tool", "1")));
    assert!(h.kept().unwrap().contains(&h.digest("tool", "2")));
}

#[test]
fn an_upgrade_that_fails_keeps_the_old_version() {
    let mut h = app_1_active(PLAIN);
    h.run(&[
        Row(Assign("app", "2"), "app@1", "app Resolving"),
        Row(Fetch("app"), "app@1", "app Verifying"),
        Row(Verified("app"), "app@2", "app Mounting"),
        Row(
            Mount(Failed("erofs: bad superblock")),
            "app@1",
            "app Failed: mount failed: erofs: bad superblock",
        ),
        Row(
            Mount(Mounted),
            "app@1",
            "app Failed: mount failed: erofs: bad superblock",
        ),
    ]);
}

#[test]
fn a_rejected_damaged_copy_is_downloaded_again_once() {
    let mut h = app_1_stored(PLAIN);
    h.run(&[
        // The stored copy may be what is wrong: it is read again before the module fails.
        Row(
            Rejected("app", "fs-verity digest mismatch"),
            "-",
            "app Verifying",
        ),
        Row(Reread("app", false), "-", "app Resolving"),
        Row(Fetch("app"), "-", "app Verifying"),
        // Rejected again: final, without another reading.
        Row(
            Rejected("app", "fs-verity digest mismatch"),
            "",
            "app Failed: verification failed: fs-verity digest mismatch",
        ),
    ]);
    let digest = h.fetched("app").resolved.image.digest;
    assert_eq!(h.rereads, [("app".to_owned(), digest.clone())]);
    assert_eq!(
        h.fetches,
        [("app".to_owned(), None), ("app".to_owned(), Some(digest))],
        "the second fetch discards the damaged copy first"
    );
    // The new download is news to the verifier, which checks it afresh.
    assert_eq!(h.handed["app"].attempt, 1);
}

#[test]
fn a_rejected_intact_copy_fails_the_module_with_the_verdict() {
    let mut h = app_1_stored(PLAIN);
    h.run(&[
        Row(
            Rejected("app", "no trusted signature"),
            "-",
            "app Verifying",
        ),
        Row(
            Reread("app", true),
            "",
            "app Failed: verification failed: no trusted signature",
        ),
    ]);
    assert_eq!(h.fetches.len(), 1, "not downloaded again");
}

#[test]
fn a_verdict_that_moves_on_makes_a_reading_under_way_stale() {
    let mut h = app_1_stored(PLAIN);
    h.run(&[
        Row(
            Rejected("app", "no trusted signature"),
            "-",
            "app Verifying",
        ),
        // The policy was edited: the verifier checks again and accepts it.
        Row(Rechecking("app"), "-", "app Verifying"),
        Row(Verified("app"), "app@1", "app Mounting"),
        Row(Reread("app", true), "app@1", "app Mounting"),
        Row(Mount(Mounted), "app@1", "app Active"),
    ]);
}

#[test]
fn a_policy_flip_takes_an_active_module_out_and_brings_it_back() {
    let mut h = Harness::new(PLAIN);
    h.run(&[
        Row(Assign("app", "1"), "-", "app Resolving"),
        Row(Assign("base", "1"), "-", "app Resolving; base Resolving"),
        Row(Fetch("app"), "-", "app Verifying; base Resolving"),
        Row(Fetch("base"), "-", "app Verifying; base Verifying"),
        Row(Verified("app"), "-", "app Mounting; base Verifying"),
        Row(Verified("base"), "app@1 base@1", "app Mounting; base Mounting"),
        Row(Mount(Mounted), "app@1 base@1", "app Active; base Active"),
        // A key revoked: the verdict withdraws the module, which leaves the stack.
        Row(
            Rejected("app", "signed by a key the policy does not trust"),
            "base@1",
            "app Failed: verification failed: signed by a key the policy does not trust; base Active",
        ),
        Row(
            Mount(Mounted),
            "base@1",
            "app Failed: verification failed: signed by a key the policy does not trust; base Active",
        ),
        // The key trusted again: the same image comes back, without a download.
        Row(Verified("app"), "app@1 base@1", "app Mounting; base Active"),
        Row(Mount(Mounted), "app@1 base@1", "app Active; base Active"),
    ]);
    assert_eq!(h.fetches.len(), 2, "one fetch per module");
    assert_eq!(
        h.raised_kinds(),
        [events::ACTIVE, events::ACTIVE, events::ACTIVE],
        "coming back is news"
    );
    // The rejected image stayed in the store meanwhile.
    assert!(h.garbage[1]
        .blobs
        .as_ref()
        .unwrap()
        .contains(&h.digest("app", "1")));
}

#[test]
fn a_rejected_digest_is_not_kept_stacked_as_the_old_layer() {
    let mut h = app_1_active(PLAIN);
    h.run(&[Row(Assign("app", "2"), "app@1", "app Resolving")]);
    // The old image, rejected under an edited policy while the new one is on its way.
    let old = h.images[&("app".to_owned(), "1".to_owned())].clone();
    let effects = h.modules.on_verdict(Event::Create {
        key: "app".into(),
        value: VerifyStatus {
            name: "app".into(),
            digest: old.resolved.image.digest.clone(),
            manifest_digest: old.resolved.manifest_digest.to_string(),
            state: VerifyState::Failed,
            reason: Some("revoked".into()),
        },
    });
    h.take(effects);
    // Taken out at the next change of the stack.
    h.run(&[
        Row(Fetch("app"), "app@1", "app Verifying"),
        Row(Rejected("app", "revoked"), "app@1", "app Verifying"),
        Row(
            Reread("app", true),
            "",
            "app Failed: verification failed: revoked",
        ),
    ]);
}

#[test]
fn a_restart_takes_the_standing_verdict_and_mount_without_a_new_stack() {
    // An earlier run left app Active in generation 4.
    let first = app_1_active(PLAIN);
    let mut stack = first.stack.clone().unwrap();
    stack.generation = 4;
    let verdict = VerifyStatus {
        name: "app".into(),
        digest: first.fetched("app").resolved.image.digest,
        manifest_digest: first.fetched("app").resolved.manifest_digest.to_string(),
        state: VerifyState::Verified,
        reason: Some("signed".into()),
    };
    let mut h = Harness::restarted(
        PLAIN,
        Restored {
            statuses: first.statuses.values().cloned().collect(),
            handed: first.handed.values().cloned().collect(),
            stack: Some(stack),
            stack_before: None,
            desired_known: true,
        },
    );
    let effects = h.modules.on_verdict(Event::Create {
        key: "app".into(),
        value: verdict,
    });
    h.take(effects);
    h.mount_status(4, MountState::Mounted, None);
    h.run(&[
        // Nothing leaves the stack while the module is on its way back.
        Row(Assign("app", "1"), "app@1", "app Resolving"),
        // The same config as handed before: the standing verdict is taken, the stack is
        // unchanged, and mountmgr's standing answer makes the module Active.
        Row(InStore("app"), "app@1", "app Active"),
    ]);
    assert_eq!(h.stack.as_ref().unwrap().generation, 4, "no new stack");
    assert!(
        h.raised.is_empty(),
        "the same image Active again is not news"
    );
}

#[test]
fn the_first_stack_after_a_start_waits_for_every_module() {
    let mut h = Harness::new(PLAIN);
    h.run(&[
        Row(Assign("app", "1"), "-", "app Resolving"),
        Row(Assign("base", "1"), "-", "app Resolving; base Resolving"),
        Row(Fetch("app"), "-", "app Verifying; base Resolving"),
        Row(Verified("app"), "-", "app Mounting; base Resolving"),
        Row(Fetch("base"), "-", "app Mounting; base Verifying"),
        Row(
            Rejected("base", "unsigned"),
            "-",
            "app Mounting; base Verifying",
        ),
        Row(
            Reread("base", true),
            "app@1",
            "app Mounting; base Failed: verification failed: unsigned",
        ),
    ]);
}

#[test]
fn a_module_rejected_again_for_another_reason_shows_the_new_reason() {
    let mut h = app_1_stored(PLAIN);
    h.run(&[
        Row(
            Rejected("app", "no trusted signature"),
            "-",
            "app Verifying",
        ),
        Row(
            Reread("app", true),
            "",
            "app Failed: verification failed: no trusted signature",
        ),
        // The policy edited: checked again, and rejected for another reason.
        Row(
            Rechecking("app"),
            "",
            "app Failed: verification failed: no trusted signature",
        ),
        Row(
            Rejected("app", "the signature names registry.other/app"),
            "",
            "app Failed: verification failed: the signature names registry.other/app",
        ),
    ]);
}

#[test]
fn a_rejection_while_the_copy_is_read_again_shows_the_latest_reason() {
    let mut h = app_1_stored(PLAIN);
    h.run(&[
        Row(
            Rejected("app", "no trusted signature"),
            "-",
            "app Verifying",
        ),
        Row(Rejected("app", "no signatures"), "-", "app Verifying"),
        Row(
            Reread("app", true),
            "",
            "app Failed: verification failed: no signatures",
        ),
    ]);
    assert_eq!(h.rereads.len(), 1, "one reading of the copy answers both");
}

/// Images with a health check: mountmgr keeps the stack before for a confirmation window.
const CHECKED: Catalog = &[
    ("app", "1", &[], true),
    ("app", "2", &[], true),
    ("base", "1", &[], false),
];

/// app@1 mounted and confirmed, app@2 on its way.
fn app_1_confirmed_and_app_2_ready() -> Harness {
    // The first stack has none before it: confirmed at the switch.
    let mut h = app_1_active(CHECKED);
    h.run(&[
        Row(Assign("app", "2"), "app@1", "app Resolving"),
        Row(Fetch("app"), "app@1", "app Verifying"),
        Row(Verified("app"), "app@2", "app Mounting"),
    ]);
    h
}

#[test]
fn the_stack_before_keeps_its_images_until_the_new_one_is_confirmed() {
    let mut h = app_1_confirmed_and_app_2_ready();
    h.run(&[Row(Mount(InWindow), "app@2", "app Active")]);
    // mountmgr may switch back to app@1 until the window is over, and after a reboot it
    // builds that stack again from the store.
    let kept = h.kept().expect("a collection");
    assert!(kept.contains(&h.digest("app", "1")), "the stack before");
    assert!(kept.contains(&h.digest("app", "2")));
    h.run(&[Row(Mount(Confirmed), "app@2", "app Active")]);
    let kept = h.kept().expect("a collection");
    assert!(
        !kept.contains(&h.digest("app", "1")),
        "confirmed: no way back"
    );
    assert!(kept.contains(&h.digest("app", "2")));
}

#[test]
fn a_rollback_in_the_window_goes_back_to_the_stack_before() {
    let mut h = app_1_confirmed_and_app_2_ready();
    h.run(&[
        Row(Mount(InWindow), "app@2", "app Active"),
        // The module falls back to the layer of the stack mounted again.
        Row(
            Mount(RolledBack("bin/check exited with 1")),
            "app@1",
            "app Failed: mount failed: bin/check exited with 1",
        ),
        Row(
            Mount(Mounted),
            "app@1",
            "app Failed: mount failed: bin/check exited with 1",
        ),
    ]);
    let kept = h.kept().expect("a collection");
    assert!(kept.contains(&h.digest("app", "1")), "mounted");
    assert!(
        kept.contains(&h.digest("app", "2")),
        "the failed module's image"
    );
}

#[test]
fn a_window_rolled_back_while_a_newer_stack_is_on_its_way_keeps_the_stack_before() {
    let mut h = app_1_confirmed_and_app_2_ready();
    h.run(&[
        Row(Mount(InWindow), "app@2", "app Active"),
        Row(Assign("base", "1"), "app@2", "app Active; base Resolving"),
        Row(Fetch("base"), "app@2", "app Active; base Verifying"),
        Row(
            Verified("base"),
            "app@2 base@1",
            "app Active; base Mounting",
        ),
        // mountmgr ends the window of app@2 before it builds the new stack: its checks fail,
        // app@1 is mounted again, and the new stack is switched to from there.
        Row(
            Mount(RolledBack("bin/check exited with 1")),
            "app@2 base@1",
            "app Active; base Mounting",
        ),
        Row(Mount(InWindow), "app@2 base@1", "app Active; base Active"),
    ]);
    let kept = h.kept().expect("a collection");
    assert!(
        kept.contains(&h.digest("app", "1")),
        "the stack mountmgr may switch back to now"
    );
}

#[test]
fn a_rollback_after_a_restart_in_the_window_goes_back_to_the_stack_kept_before() {
    let mut first = app_1_confirmed_and_app_2_ready();
    first.run(&[Row(Mount(InWindow), "app@2", "app Active")]);
    let before = first.kept_before.clone().expect("the stack before is kept");
    assert_eq!(first.label(&before.layers[0].digest), "app@1");
    let stack = first.stack.clone().unwrap();
    // Restarted (a reboot: mountmgr built app@1 again and switched to app@2 from it).
    let mut h = Harness::restarted(
        CHECKED,
        Restored {
            statuses: first.statuses.values().cloned().collect(),
            handed: first.handed.values().cloned().collect(),
            stack: Some(stack.clone()),
            stack_before: Some(before),
            desired_known: true,
        },
    );
    h.mounted_before = (
        before_generation(&first),
        vec![first.digest("app", "1").to_string()],
    );
    h.mount_status_with(stack.generation, MountState::Mounted, None, Some(60_000));
    h.run(&[
        Row(Assign("app", "2"), "app@2", "app Resolving"),
        Row(InStore("app"), "app@2", "app Verifying"),
        Row(Verified("app"), "app@2", "app Active"),
        // The check fails in the window: the module falls back to its layer in the stack
        // kept before, not out of the stack.
        Row(
            Mount(RolledBack("bin/check exited with 1")),
            "app@1",
            "app Failed: mount failed: bin/check exited with 1",
        ),
    ]);
    assert_eq!(h.kept_before, None, "the window is over");
}

/// The generation of the stack before the last one `h` published.
fn before_generation(h: &Harness) -> u64 {
    h.kept_before.as_ref().map_or(0, |b| b.generation)
}

#[test]
fn after_a_restart_in_a_window_nothing_is_collected_until_it_is_confirmed() {
    let first = app_1_confirmed_and_app_2_ready();
    let stack = first.stack.clone().unwrap();
    let mut h = Harness::restarted(
        CHECKED,
        Restored {
            statuses: Vec::new(),
            handed: Vec::new(),
            stack: Some(stack.clone()),
            stack_before: None,
            desired_known: true,
        },
    );
    h.mount_status_with(stack.generation, MountState::Mounted, None, Some(60_000));
    h.run(&[
        Row(Assign("app", "2"), "app@2", "app Resolving"),
        Row(InStore("app"), "app@2", "app Verifying"),
        // Which stack was mounted before this one, modulemgr cannot know.
        Row(Verified("app"), "app@2", "app Active"),
    ]);
    assert!(h.garbage.iter().all(|g| g.blobs.is_none()));
    h.run(&[Row(Mount(Confirmed), "app@2", "app Active")]);
    let kept = h.kept().expect("a collection once confirmed");
    assert!(kept.contains(&h.digest("app", "2")));
}
