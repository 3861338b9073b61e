//! What a starting mountmgr does with what an earlier run left: after a clean stop, a
//! `kill -9` at any instant, or a reboot.
//!
//! Per target it looks at three things — the persisted [`Record`], where `current` points,
//! and the real mount table — and [`decide`]s:
//!
//! | record                          | `current` | that slot fully mounted as recorded | decision          |
//! |---------------------------------|-----------|-------------------------------------|-------------------|
//! | none (or corrupt)               | any       | any                                 | clean             |
//! | applied X                       | X's slot  | yes                                 | adopt X           |
//! | applied X                       | other/none| —                                   | rebuild X         |
//! | applied X                       | X's slot  | no                                  | rebuild X         |
//! | applied X, switching to Y       | Y's slot  | yes                                 | adopt Y (renamed) |
//! | applied X, switching to Y       | X's slot  | yes                                 | adopt X (not yet) |
//! | applied none, switching to Y    | none      | —                                   | clean             |
//!
//! *Adopt* keeps that slot's mounts as they are (it is never mounted a second time) and
//! unmounts everything else under the target, deepest first. *Rebuild* unmounts everything and
//! builds the stack again (the reboot case: nothing is mounted, `run/` is empty) if its images
//! still exist. *Clean* unmounts everything and forgets the target. Loop devices the record
//! lists and no kept mount uses are released.
//!
//! A confirmation window the record holds (a switch to X kept the previous stack W mounted,
//! [`Record::window`]) is then [`resume_window`]d or is over:
//!
//! | decision | W's slot                                      | window                          |
//! |----------|-----------------------------------------------|---------------------------------|
//! | adopt X  | not X's, fully mounted as recorded            | resumed: W's slot kept too      |
//! | adopt X  | not X's, not fully mounted (e.g. half retired)| over: W's slot cleaned          |
//! | adopt W  | (the switch to X never moved `current`)       | over: it was never opened       |
//! | rebuild  | — (a reboot: W is gone too), W's images there | W built first, then X switched to: the window runs to its recorded end |
//! | rebuild  | —, W's images gone                            | over                            |
//! | clean    | —                                             | over, with the record           |
//!
//! W's images should still be in the store (modulemgr keeps them until the window is over),
//! but W does not depend on it: its slot is compared with the mount table at the paths they
//! had ([`stack::plan_mounted`]), since its mounts hold them open. A resumed window runs until the
//! deadline recorded, whatever the restart took; one whose deadline passed meanwhile has its
//! checks run once at the start, as at the end of any window.

use std::path::Path;

use powernode_types::{MountConfig, Slot};

use crate::current;
use crate::layout::{self, Layout};
use crate::mountinfo::{self, MountEntry};
use crate::record::{AppliedStack, LoopRecord, Record, RecordError, RecordStore, WindowRecord};
use crate::stack::{self, StackError};
use crate::sys::loopdev;

/// What to do with one target at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This stack, in its slot, is the active stack: keep it, clean the rest.
    Adopt(AppliedStack),
    /// Nothing usable is mounted: clean everything, then build this stack again.
    Rebuild(AppliedStack),
    /// Nothing should be mounted: clean everything and forget the target.
    Clean,
}

/// Decides from the record, the slot `current` names and `mounted` (whether a stack is fully
/// mounted in its slot exactly as recorded). See the module table.
pub fn decide(
    record: Option<&Record>,
    current: Option<Slot>,
    mounted: impl Fn(&AppliedStack) -> bool,
) -> Decision {
    let Some(record) = record else {
        return Decision::Clean;
    };
    // With a switch recorded, `current` naming the new slot is the proof the rename happened.
    let intended = match (&record.switching_to, current) {
        (Some(to), Some(slot)) if to.slot == slot => Some(to),
        _ => record.applied.as_ref(),
    };
    match intended {
        None => Decision::Clean,
        Some(stack) if current == Some(stack.slot) && mounted(stack) => {
            Decision::Adopt(stack.clone())
        }
        Some(stack) => Decision::Rebuild(stack.clone()),
    }
}

/// The confirmation window to resume after `decision` (see the module's second table): the
/// record's, if the stack adopted is not its previous one and `mounted` (whether a stack is
/// fully mounted in its slot as recorded) says the previous one is.
pub fn resume_window(
    record: Option<&Record>,
    decision: &Decision,
    mounted: impl Fn(&AppliedStack) -> bool,
) -> Option<WindowRecord> {
    let Decision::Adopt(active) = decision else {
        return None;
    };
    let window = record?.window.as_ref()?;
    (window.previous.slot != active.slot && mounted(&window.previous)).then(|| window.clone())
}

/// What recovery found of one target, before it acted: for its report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// A record was there but could not be trusted (bad checksum, unknown version).
    pub corrupt_record: bool,
    /// Whether a record was there at all.
    pub record: bool,
    /// The record's applied stack: generation and slot.
    pub applied: Option<(u64, Slot)>,
    /// The switch the record says was under way: generation and slot.
    pub switching_to: Option<(u64, Slot)>,
    /// The slot `current` named.
    pub current: Option<Slot>,
    /// The record's confirmation window: the previous stack's generation and slot.
    pub window: Option<(u64, Slot)>,
}

/// The outcome of recovering one target.
#[derive(Debug)]
pub struct Recovered {
    /// What was there.
    pub found: Found,
    /// What was decided.
    pub decision: Decision,
    /// The record as it is now on disk (`None`: the target is forgotten).
    pub record: Option<Record>,
    /// The stack adopted as active.
    pub active: Option<AppliedStack>,
    /// The confirmation window resumed: its previous stack is kept mounted too.
    pub window: Option<WindowRecord>,
    /// A stack to build again (its images exist).
    pub rebuild: Option<MountConfig>,
    /// With `rebuild`, after a reboot in a confirmation window: the stack the window kept to
    /// switch back to (its images exist too), built first, and the window's end. The stack of
    /// `rebuild` is then switched to from it, and the window runs to its recorded end.
    pub rebuild_window: Option<WindowRecord>,
    /// Problems to report (corrupt record, failed unmounts); recovery went on regardless.
    pub problems: Vec<String>,
}

/// Recovers `target`: loads its record, decides, and carries the decision out.
pub fn recover_target(
    layout: &Layout,
    store: &RecordStore,
    target: &str,
) -> Result<Recovered, StackError> {
    let mut problems = Vec::new();
    let mut corrupt_record = false;
    let record = match store.load(target) {
        Ok(record) => record,
        Err(e @ RecordError::Corrupt { .. }) => {
            problems.push(e.to_string());
            corrupt_record = true;
            None
        }
        Err(e) => return Err(StackError::RecordUnreadable(e.to_string())),
    };
    let target_dir = layout.target_dir(target);
    let entries = mountinfo::read()?;
    let current_slot = current::read(&target_dir);
    let loops = record.as_ref().map(|r| r.loops.clone()).unwrap_or_default();
    let decision = decide(record.as_ref(), current_slot, |stack| {
        is_mounted(layout, stack, &entries, &loops, stack::plan)
    });
    let window = resume_window(record.as_ref(), &decision, |stack| {
        is_mounted(layout, stack, &entries, &loops, stack::plan_mounted)
    });
    tracing::info!(target, ?current_slot, decision = %summary(&decision), window = window.is_some(), "recovering");
    let placed = |s: &AppliedStack| (s.config.generation, s.slot);
    let found = Found {
        corrupt_record,
        record: record.is_some(),
        applied: record.as_ref().and_then(|r| r.applied.as_ref()).map(placed),
        switching_to: record
            .as_ref()
            .and_then(|r| r.switching_to.as_ref())
            .map(placed),
        current: current_slot,
        window: record
            .as_ref()
            .and_then(|r| r.window.as_ref())
            .map(|w| placed(&w.previous)),
    };
    match decision.clone() {
        Decision::Adopt(stack) => {
            let mut slots = vec![stack.slot];
            slots.extend(window.as_ref().map(|w| w.previous.slot));
            let keep: Vec<_> = slots.iter().map(|s| layout.slot_dir(target, *s)).collect();
            if let Err(e) = stack::unmount_under(&target_dir, &keep) {
                problems.push(format!("unmounting leftovers: {e}"));
            }
            let other = layout::other(stack.slot);
            if !slots.contains(&other) {
                if let Err(e) = stack::remove_tree(&layout.slot_dir(target, other)) {
                    problems.push(format!("removing the inactive slot: {e}"));
                }
            }
            if let Err(e) = current::remove_stale_tmp(&target_dir) {
                problems.push(format!("removing a stale current.tmp: {e}"));
            }
            let kept_loops = release_loops(&loops, &slots);
            let mut new = record.unwrap_or_else(|| Record::new(target));
            new.applied = Some(stack.clone());
            new.switching_to = None;
            new.loops = kept_loops;
            new.window = window.clone();
            let record = save(store, new, &mut problems);
            Ok(Recovered {
                found,
                decision,
                record: Some(record),
                active: Some(stack),
                window,
                rebuild: None,
                rebuild_window: None,
                problems,
            })
        }
        Decision::Rebuild(stack) => {
            let recorded_window = record.as_ref().and_then(|r| r.window.clone());
            clean_target(layout, target, &mut problems);
            release_loops(&loops, &[]);
            let mut new = record.unwrap_or_else(|| Record::new(target));
            // `applied` stays: until a new stack is switched to, it is what should be mounted,
            // and a crash before then must try again.
            new.applied = Some(stack.clone());
            new.switching_to = None;
            new.loops.clear();
            new.window = None;
            let record = save(store, new, &mut problems);
            let missing = |config: &MountConfig| -> Vec<String> {
                config
                    .layers
                    .iter()
                    .filter(|l| !image_exists(layout.root(), &l.image_path))
                    .map(|l| l.name.clone())
                    .collect()
            };
            let missing_now = missing(&stack.config);
            let rebuild = if missing_now.is_empty() {
                Some(stack.config.clone())
            } else {
                tracing::info!(target, missing = ?missing_now, "images of the applied stack are gone; waiting for MountConfig");
                None
            };
            // A reboot in a confirmation window: the stack to switch back to is built again
            // too, if modulemgr kept its images, so that the window can still roll back.
            // A window whose end passed while the node was down is over: its stack is
            // checked as any build is, and there is nothing to keep the previous one for.
            let now = agentbase::health::now_ms();
            let rebuild_window = recorded_window.filter(|w| {
                rebuild.is_some()
                    && w.until_ms > now
                    && w.previous.slot != stack.slot
                    && !w.previous.config.layers.is_empty()
                    && missing(&w.previous.config).is_empty()
            });
            Ok(Recovered {
                found,
                decision,
                record: Some(record),
                active: None,
                window: None,
                rebuild,
                rebuild_window,
                problems,
            })
        }
        Decision::Clean => {
            clean_target(layout, target, &mut problems);
            release_loops(&loops, &[]);
            if let Err(e) = stack::remove_tree(&target_dir) {
                problems.push(format!("removing {}: {e}", target_dir.display()));
            }
            if let Err(e) = store.remove(target) {
                problems.push(format!("removing the record: {e}"));
            }
            Ok(Recovered {
                found,
                decision,
                record: None,
                active: None,
                window: None,
                rebuild: None,
                rebuild_window: None,
                problems,
            })
        }
    }
}

/// For the log: the decision without its payload.
fn summary(decision: &Decision) -> String {
    match decision {
        Decision::Adopt(s) => format!(
            "adopt slot {} (generation {})",
            layout::slot_name(s.slot),
            s.config.generation
        ),
        Decision::Rebuild(s) => format!("rebuild generation {}", s.config.generation),
        Decision::Clean => "clean".to_owned(),
    }
}

/// Whether `stack` is fully mounted in its slot as recorded, planned by `planner`.
fn is_mounted(
    layout: &Layout,
    stack: &AppliedStack,
    entries: &[MountEntry],
    loops: &[LoopRecord],
    planner: fn(&Layout, &MountConfig, Slot) -> Result<stack::Plan, StackError>,
) -> bool {
    let plan = match planner(layout, &stack.config, stack.slot) {
        Ok(plan) => plan,
        Err(e) => {
            tracing::info!(target = %stack.config.target, error = %e, "recorded stack no longer plans");
            return false;
        }
    };
    match stack::verify_mounted(&plan, entries, loops) {
        Ok(()) => true,
        Err(why) => {
            tracing::info!(target = %stack.config.target, slot = ?stack.slot, %why, "recorded stack is not fully mounted");
            false
        }
    }
}

/// Unmounts everything of `target` and removes `current` and both slots; keeps the target
/// directory and the record.
fn clean_target(layout: &Layout, target: &str, problems: &mut Vec<String>) {
    let target_dir = layout.target_dir(target);
    // `current` goes first, so nothing new enters a stack that is being taken down.
    if let Err(e) = current::remove(&target_dir) {
        problems.push(format!("removing current: {e}"));
    }
    if let Err(e) = stack::unmount_under(&target_dir, &[]) {
        problems.push(format!("unmounting: {e}"));
    }
    for slot in [Slot::A, Slot::B] {
        if let Err(e) = stack::remove_tree(&layout.slot_dir(target, slot)) {
            problems.push(format!("removing slot {}: {e}", layout::slot_name(slot)));
        }
    }
}

/// Releases the recorded loop devices except those of the slots `keep`; returns the ones kept.
pub fn release_loops(loops: &[LoopRecord], keep: &[Slot]) -> Vec<LoopRecord> {
    let mut kept = Vec::new();
    for l in loops {
        if keep.contains(&l.slot) {
            kept.push(l.clone());
            continue;
        }
        match loopdev::release_if_bound_to(&l.device, &l.image) {
            Ok(true) => tracing::info!(device = %l.device.display(), "released a loop device"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(device = %l.device.display(), error = %e, "could not release a loop device")
            }
        }
    }
    kept
}

fn image_exists(root: &Path, image_path: &str) -> bool {
    let path = Path::new(image_path);
    if path.is_absolute() {
        path.is_file()
    } else {
        root.join(path).is_file()
    }
}

fn save(store: &RecordStore, record: Record, problems: &mut Vec<String>) -> Record {
    if let Err(e) = store.save(&record) {
        problems.push(format!("saving the record: {e}"));
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::UpperMode;

    fn stack(slot: Slot, generation: u64) -> AppliedStack {
        AppliedStack {
            slot,
            config: MountConfig {
                target: "app".into(),
                generation,
                layers: Vec::new(),
                upper: UpperMode::Tmpfs,
            },
        }
    }

    fn record(applied: Option<AppliedStack>, switching_to: Option<AppliedStack>) -> Option<Record> {
        Some(Record {
            applied,
            switching_to,
            ..Record::new("app")
        })
    }

    #[test]
    fn decision_table() {
        let a1 = stack(Slot::A, 1);
        let b2 = stack(Slot::B, 2);
        let all = |_: &AppliedStack| true;
        let none = |_: &AppliedStack| false;
        let only_a = |s: &AppliedStack| s.slot == Slot::A;
        type Row<'a> = (
            Option<Record>,
            Option<Slot>,
            &'a dyn Fn(&AppliedStack) -> bool,
            Decision,
        );
        let rows: Vec<Row> = vec![
            // No record: nothing is trusted.
            (None, Some(Slot::A), &all, Decision::Clean),
            (None, None, &none, Decision::Clean),
            // Steady state: adopt.
            (
                record(Some(a1.clone()), None),
                Some(Slot::A),
                &all,
                Decision::Adopt(a1.clone()),
            ),
            // Reboot: nothing mounted, no current.
            (
                record(Some(a1.clone()), None),
                None,
                &none,
                Decision::Rebuild(a1.clone()),
            ),
            // current there but the slot is incomplete.
            (
                record(Some(a1.clone()), None),
                Some(Slot::A),
                &none,
                Decision::Rebuild(a1.clone()),
            ),
            // Killed after recording the intent, before the rename.
            (
                record(Some(a1.clone()), Some(b2.clone())),
                Some(Slot::A),
                &all,
                Decision::Adopt(a1.clone()),
            ),
            // Killed after the rename, before recording the result.
            (
                record(Some(a1.clone()), Some(b2.clone())),
                Some(Slot::B),
                &all,
                Decision::Adopt(b2.clone()),
            ),
            // Renamed, but the new slot is not complete (reboot in the window): rebuild it.
            (
                record(Some(a1.clone()), Some(b2.clone())),
                Some(Slot::B),
                &only_a,
                Decision::Rebuild(b2.clone()),
            ),
            // First stack ever, killed before the rename.
            (record(None, Some(b2.clone())), None, &all, Decision::Clean),
            // First stack ever, killed after the rename.
            (
                record(None, Some(b2.clone())),
                Some(Slot::B),
                &all,
                Decision::Adopt(b2.clone()),
            ),
            // Torn down on request (applied none).
            (record(None, None), Some(Slot::A), &all, Decision::Clean),
        ];
        for (i, (rec, current, mounted, want)) in rows.into_iter().enumerate() {
            assert_eq!(decide(rec.as_ref(), current, mounted), want, "row {i}");
        }
    }

    /// The rows of the module's second table: which recorded window a start resumes.
    #[test]
    fn window_table() {
        let a1 = stack(Slot::A, 1);
        let b2 = stack(Slot::B, 2);
        let window = WindowRecord {
            previous: a1.clone(),
            until_ms: 1_700_000_000_000,
        };
        let with_window = |switching_to: Option<AppliedStack>| {
            let mut r = record(Some(b2.clone()), switching_to).unwrap();
            r.window = Some(window.clone());
            r
        };
        let all = |_: &AppliedStack| true;
        let only_b = |s: &AppliedStack| s.slot == Slot::B;
        type Row<'a> = (Record, Decision, &'a dyn Fn(&AppliedStack) -> bool, bool);
        let rows: Vec<Row> = vec![
            // Killed in the window: resumed.
            (with_window(None), Decision::Adopt(b2.clone()), &all, true),
            // The previous slot half retired (killed while confirming): over.
            (
                with_window(None),
                Decision::Adopt(b2.clone()),
                &only_b,
                false,
            ),
            // The switch that opened it never moved `current`: the previous stack is the
            // active one, and there is no window.
            (
                {
                    let mut r = record(Some(a1.clone()), Some(b2.clone())).unwrap();
                    r.window = Some(window.clone());
                    r
                },
                Decision::Adopt(a1.clone()),
                &all,
                false,
            ),
            // Killed while switching back after a failed check, before `current` moved:
            // the window goes on, and its next check rolls back again.
            (
                with_window(Some(a1.clone())),
                Decision::Adopt(b2.clone()),
                &all,
                true,
            ),
            // ... after `current` moved: rolled back, the window is over.
            (
                with_window(Some(a1.clone())),
                Decision::Adopt(a1.clone()),
                &all,
                false,
            ),
            // A reboot: rebuilt, and the previous stack is gone.
            (
                with_window(None),
                Decision::Rebuild(b2.clone()),
                &all,
                false,
            ),
            (with_window(None), Decision::Clean, &all, false),
        ];
        for (i, (rec, decision, mounted, resumed)) in rows.into_iter().enumerate() {
            let got = resume_window(Some(&rec), &decision, mounted);
            assert_eq!(got.is_some(), resumed, "row {i}");
            if let Some(got) = got {
                assert_eq!(got, window, "row {i}");
            }
        }
        assert_eq!(
            resume_window(
                record(Some(b2.clone()), None).as_ref(),
                &Decision::Adopt(b2),
                all
            ),
            None,
            "no window recorded"
        );
    }
}
