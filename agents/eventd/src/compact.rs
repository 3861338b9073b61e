//! The journal's bound (`events.journal_max_mib`) and what compaction drops to keep it:
//! the policy of agentbase's per-agent pending cap, applied to the whole journal.
//!
//! When the segments take more than the bound, the journal is rewritten
//! ([`Journal::rewrite`]) down to [`TARGET_PERCENT`] of it, so a full journal is compacted once
//! per quarter of the bound appended rather than at every batch:
//!
//! 1. delivered records go (they are already on the controller);
//! 2. then the oldest Info and Warning events (and records that no longer decode: they could
//!    never be delivered), oldest first;
//! 3. then the oldest Error events;
//! 4. never a Critical: a journal of Criticals alone may exceed the bound.
//!
//! A dropped event of an agent is counted in the `dropped_before` of that agent's next event
//! still in the journal (as agentbase counts its own drops), in the same rewrite, so the
//! count is durable exactly when the drop is. When no later event of the agent is in the
//! journal, the count is handed back ([`Outcome::carried`]) for the agent's next event.

use std::collections::BTreeMap;
use std::io;

use powernode_types::node_api::EventRecord;
use powernode_types::Severity;

use crate::journal::{Journal, Keep, Rewritten};

/// A compaction leaves the journal at most this share of its bound, in percent.
pub const TARGET_PERCENT: u64 = 75;

/// What one compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Info events dropped.
    pub info: u64,
    /// Warning events dropped.
    pub warning: u64,
    /// Error events dropped.
    pub error: u64,
    /// Records dropped that did not decode as events.
    pub undecodable: u64,
    /// Per agent: dropped events that no later event of the agent in the journal counts yet.
    pub carried: BTreeMap<String, u64>,
    /// Bytes before and after.
    pub bytes_before: u64,
    /// Bytes after.
    pub bytes_after: u64,
    /// Whether Critical events alone keep the journal over its target.
    pub over_target: bool,
}

impl Outcome {
    /// Events dropped, of every severity.
    pub fn dropped(&self) -> u64 {
        self.info + self.warning + self.error + self.undecodable
    }
}

/// Decides when to compact.
#[derive(Debug, Clone)]
pub struct Compactor {
    max: u64,
    /// The size the last compaction left: if Criticals alone keep the journal over its
    /// bound, compacting again is pointless until a good share of the bound has been added.
    floor: u64,
}

impl Compactor {
    /// A compactor for a journal bounded to `max` bytes.
    pub fn new(max: u64) -> Compactor {
        Compactor { max, floor: 0 }
    }

    /// The bound, in bytes.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Whether a journal of `bytes` needs compacting.
    pub fn due(&self, bytes: u64) -> bool {
        bytes > self.max && bytes > self.floor.saturating_add(self.max / 8)
    }

    /// Compacts `journal` if it is over its bound; what was dropped, if it ran.
    pub fn run(&mut self, journal: &mut Journal) -> io::Result<Option<Outcome>> {
        if !self.due(journal.bytes()) {
            return Ok(None);
        }
        let outcome = compact(journal, self.max * TARGET_PERCENT / 100)?;
        self.floor = outcome.bytes_after;
        Ok(Some(outcome))
    }
}

/// How droppable a record is: lower goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// Info, Warning, or a record that no longer decodes.
    Minor,
    /// Error.
    Error,
    /// Critical: never dropped.
    Critical,
}

fn rank(record: Option<&EventRecord>) -> Rank {
    match record.map(|r| r.severity) {
        None | Some(Severity::Info | Severity::Warning) => Rank::Minor,
        Some(Severity::Error) => Rank::Error,
        Some(Severity::Critical) => Rank::Critical,
    }
}

/// One undelivered record, as the plan sees it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    index: u64,
    /// Bytes on disk, header included.
    size: u64,
    rank: Rank,
}

/// The indexes to drop (sorted) so that `entries` fit in `target` bytes.
fn plan(entries: &[Entry], target: u64) -> Vec<u64> {
    let total: u64 = entries.iter().map(|e| e.size).sum();
    let mut excess = total.saturating_sub(target);
    let mut dropped = Vec::new();
    for rank in [Rank::Minor, Rank::Error] {
        for e in entries.iter().filter(|e| e.rank == rank) {
            if excess == 0 {
                break;
            }
            dropped.push(e.index);
            excess = excess.saturating_sub(e.size);
        }
    }
    dropped.sort_unstable();
    dropped
}

/// Rewrites `journal` without its delivered records and, if it is still over `target`
/// bytes, without the events the policy drops first (module doc).
pub fn compact(journal: &mut Journal, target: u64) -> io::Result<Outcome> {
    let mut entries = Vec::new();
    journal.visit(journal.cursor(), |index, payload| {
        let record = postcard::from_bytes::<EventRecord>(payload).ok();
        entries.push(Entry {
            index,
            size: (payload.len() + crate::segment::HEADER) as u64,
            rank: rank(record.as_ref()),
        });
        true
    })?;
    let drop = plan(&entries, target);
    let kept_bytes: u64 = entries
        .iter()
        .filter(|e| drop.binary_search(&e.index).is_err())
        .map(|e| e.size)
        .sum();
    drop_entries(journal, &drop, kept_bytes > target)
}

/// Rewrites `journal` leaving out the records at the indexes `drop` (sorted), and moves their
/// counts onto the next event of the same agent.
fn drop_entries(journal: &mut Journal, drop: &[u64], over_target: bool) -> io::Result<Outcome> {
    let mut outcome = Outcome {
        over_target,
        ..Outcome::default()
    };
    let mut carry: BTreeMap<String, u64> = BTreeMap::new();
    let Rewritten {
        bytes_before,
        bytes_after,
        ..
    } = journal.rewrite(|index, payload| {
        let record = postcard::from_bytes::<EventRecord>(payload).ok();
        if drop.binary_search(&index).is_ok() {
            match &record {
                Some(r) => {
                    match r.severity {
                        Severity::Info => outcome.info += 1,
                        Severity::Warning => outcome.warning += 1,
                        _ => outcome.error += 1,
                    }
                    *carry.entry(r.agent.clone()).or_default() += 1 + r.dropped_before;
                }
                None => outcome.undecodable += 1,
            }
            return Keep::Drop;
        }
        let Some(mut record) = record else {
            return Keep::Same;
        };
        match carry.remove(&record.agent) {
            Some(n) if n > 0 => {
                record.dropped_before += n;
                match postcard::to_stdvec(&record) {
                    Ok(bytes) => Keep::Changed(bytes),
                    Err(_) => Keep::Same,
                }
            }
            _ => Keep::Same,
        }
    })?;
    outcome.bytes_before = bytes_before;
    outcome.bytes_after = bytes_after;
    outcome.carried = carry.into_iter().filter(|(_, n)| *n > 0).collect();
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(agent: &str, seq: u64, severity: Severity, dropped_before: u64) -> Vec<u8> {
        postcard::to_stdvec(&EventRecord {
            id: format!("{agent}-{seq:04}"),
            agent: agent.to_owned(),
            seq,
            severity,
            kind: "test.fill".to_owned(),
            message: "x".repeat(100),
            at_ms: 1,
            fields: Vec::new(),
            dropped_before,
        })
        .unwrap()
    }

    fn records(j: &Journal) -> Vec<EventRecord> {
        j.undelivered(usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(_, b)| postcard::from_bytes(&b).unwrap())
            .collect()
    }

    #[test]
    fn the_plan_drops_minor_first_then_error_never_critical() {
        use Rank::*;
        let e = |index, rank| Entry {
            index,
            size: 10,
            rank,
        };
        let entries = [
            e(0, Critical),
            e(1, Error),
            e(2, Minor),
            e(3, Error),
            e(4, Minor),
            e(5, Critical),
        ];
        assert_eq!(plan(&entries, 60), Vec::<u64>::new(), "fits");
        assert_eq!(plan(&entries, 50), [2]);
        assert_eq!(plan(&entries, 40), [2, 4]);
        assert_eq!(plan(&entries, 30), [1, 2, 4]);
        assert_eq!(plan(&entries, 0), [1, 2, 3, 4], "Critical never");
    }

    /// Delivered records go first; past the target the oldest Info go; the drops are
    /// counted in the next event of the same agent, or carried when there is none.
    #[test]
    fn compaction_drops_by_policy_and_counts_in_dropped_before() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&[
            record("a", 1, Severity::Info, 0),
            record("a", 2, Severity::Info, 0),
        ])
        .unwrap();
        j.delivered_through(2).unwrap();
        j.append(&[
            record("a", 3, Severity::Critical, 0),
            record("a", 4, Severity::Info, 2),
            record("b", 1, Severity::Error, 0),
            record("a", 5, Severity::Warning, 0),
            record("b", 2, Severity::Info, 0),
            record("a", 6, Severity::Error, 0),
        ])
        .unwrap();
        let size = (record("a", 1, Severity::Info, 0).len() + 8) as u64;

        // Only the delivered records need go.
        let out = compact(&mut j, 6 * size).unwrap();
        assert_eq!(out.dropped(), 0);
        assert_eq!(out.bytes_after, 6 * size);
        assert_eq!(records(&j).len(), 6);

        // Three must go: a/4 and a/5 (Info, Warning), then b/2 (Info) — b/1 (Error) stays.
        let out = compact(&mut j, 3 * size).unwrap();
        assert_eq!((out.info, out.warning, out.error), (2, 1, 0), "{out:?}");
        let left: Vec<(String, u64, u64)> = records(&j)
            .into_iter()
            .map(|r| (r.agent, r.seq, r.dropped_before))
            .collect();
        // a/4 carried 2 of its own: 1 + 2 + a/5's 1 land on a/6.
        assert_eq!(
            left,
            [("a".into(), 3, 0), ("b".into(), 1, 0), ("a".into(), 6, 4)]
        );
        assert_eq!(out.carried, BTreeMap::from([("b".to_owned(), 1)]));
        assert!(!out.over_target);

        // Nothing but a Critical and Errors can go; then only the Critical is left.
        let out = compact(&mut j, 0).unwrap();
        assert_eq!(out.error, 2);
        assert!(out.over_target);
        let left = records(&j);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].severity, Severity::Critical);

        // The journal goes on where it ended, and reopens the same.
        let end = j.end();
        j.append(&[record("a", 7, Severity::Info, 0)]).unwrap();
        drop(j);
        let (j, repairs) = Journal::open(dir.path()).unwrap();
        assert!(repairs.is_empty(), "{repairs:?}");
        let all = j.undelivered(10).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].0, end);
    }

    #[test]
    fn the_compactor_runs_over_the_bound_and_not_again_for_criticals_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        let size = (record("a", 1, Severity::Info, 0).len() + 8) as u64;
        let mut c = Compactor::new(16 * size);
        for seq in 0..16 {
            j.append(&[record("a", seq, Severity::Critical, 0)])
                .unwrap();
        }
        assert_eq!(c.run(&mut j).unwrap(), None, "at the bound, not over");
        j.append(&[record("a", 16, Severity::Critical, 0)]).unwrap();
        let out = c.run(&mut j).unwrap().unwrap();
        assert!(out.over_target && out.dropped() == 0);
        j.append(&[record("a", 17, Severity::Info, 0)]).unwrap();
        assert_eq!(c.run(&mut j).unwrap(), None, "no point again so soon");
        for seq in 18..20 {
            j.append(&[record("a", seq, Severity::Info, 0)]).unwrap();
        }
        let out = c.run(&mut j).unwrap().unwrap();
        assert_eq!(out.info, 3);
    }
}
