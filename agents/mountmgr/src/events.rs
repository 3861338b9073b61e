//! What mountmgr raises (docs/events.md, "Events raised"): a target's stack switched, a health
//! check that refused a switch, a stack rolled back when its checks failed in the confirmation
//! window, mounts found different from the applied stack at run time (and repaired), and what
//! start-up recovery found and did. Each event is built apart from raising it, so its wording
//! and fields are tested without an agent.

use powernode_types::{MountConfig, Severity, Slot};

use crate::check::CheckError;
use crate::layout::slot_name;
use crate::recover::{Decision, Found, Recovered};
use crate::stack::{self, PlannedLayer};

/// A target's stack was switched to a new generation, or torn down (Info).
pub const SWITCHED: &str = "stack.switched";
/// A layer's health check failed in a new stack, which was not switched to (Error).
pub const HEALTH_CHECK_FAILED: &str = "stack.health_check_failed";
/// What a start found of a target and what it did with it (Info, Warning if something was
/// cut short or wrong).
pub const RECOVERED: &str = "stack.recovered";
/// A health check failed during a stack's confirmation window: the previous stack is active
/// again (Error).
pub const ROLLED_BACK: &str = "stack.rolled_back";
/// A target's mounts differed from its applied stack at run time, and what was done (Warning;
/// Error when the repair failed).
pub const DRIFT: &str = "stack.drift";

pub use agentbase::events::Raised;

/// `A`, `B`, or `none`.
fn slot_text(slot: Option<Slot>) -> &'static str {
    slot.map_or("none", slot_name)
}

/// `stack.switched`: `config` is now the target's stack, in `slot` (`None`: torn down, no
/// layers); `previous` is the generation switched away from.
pub fn switched(config: &MountConfig, slot: Option<Slot>, previous: Option<u64>) -> Raised {
    let layers = stack::ordered_layers(&config.layers);
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    let digests: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
    let message = match slot {
        Some(slot) => format!(
            "target {} switched to generation {} in slot {}: {}",
            config.target,
            config.generation,
            slot_name(slot),
            names.join(", ")
        ),
        None => format!(
            "target {} torn down: generation {} has no layers",
            config.target, config.generation
        ),
    };
    let mut fields = vec![
        ("target", config.target.clone()),
        ("generation", config.generation.to_string()),
        ("slot", slot_text(slot).to_owned()),
        ("layers", names.join(",")),
        ("digests", digests.join(",")),
    ];
    if let Some(previous) = previous {
        fields.push(("previous_generation", previous.to_string()));
    }
    Raised {
        severity: Severity::Info,
        kind: SWITCHED,
        message,
        fields,
    }
}

/// `stack.health_check_failed`: `layer`'s check failed with `error` in the new stack of
/// `target` for `generation`; `active` is the generation that stays.
pub fn health_check_failed(
    target: &str,
    generation: u64,
    layer: &PlannedLayer,
    error: &CheckError,
    active: Option<u64>,
) -> Raised {
    let stays = match active {
        Some(g) => format!("generation {g} stays active"),
        None => "nothing is active".to_owned(),
    };
    let mut fields = check_fields(target, generation, layer, error);
    if let Some(g) = active {
        fields.push(("active_generation", g.to_string()));
    }
    Raised {
        severity: Severity::Error,
        kind: HEALTH_CHECK_FAILED,
        message: format!(
            "switch of target {target} to generation {generation} refused ({stays}): {error}"
        ),
        fields,
    }
}

/// The fields of a failed health check: the target and generation, the module, its check, the
/// reason and the end of its stderr.
fn check_fields(
    target: &str,
    generation: u64,
    layer: &PlannedLayer,
    error: &CheckError,
) -> Vec<(&'static str, String)> {
    let command = layer
        .health_check
        .as_ref()
        .map(|c| c.command.join(" "))
        .unwrap_or_default();
    let output = match error {
        CheckError::Failed { stderr, .. } | CheckError::TimedOut { stderr, .. } => stderr.clone(),
        _ => String::new(),
    };
    vec![
        ("target", target.to_owned()),
        ("generation", generation.to_string()),
        ("module", layer.name.clone()),
        ("digest", layer.digest.clone()),
        ("check", command),
        ("reason", error.to_string()),
        ("output", output),
    ]
}

/// `stack.rolled_back`: `layer`'s check failed with `error` during the confirmation window of
/// `generation`; `back_to` is the generation and slot active again, or why switching back
/// failed.
pub fn rolled_back(
    target: &str,
    generation: u64,
    layer: &PlannedLayer,
    error: &CheckError,
    back_to: Result<(u64, Slot), &str>,
) -> Raised {
    let mut fields = check_fields(target, generation, layer, error);
    let outcome = match back_to {
        Ok((g, slot)) => {
            fields.push(("active_generation", g.to_string()));
            fields.push(("slot", slot_name(slot).to_owned()));
            format!(
                "switched back to generation {g} in slot {}",
                slot_name(slot)
            )
        }
        Err(why) => {
            fields.push(("switch_back_error", why.to_owned()));
            format!("switching back failed ({why}); generation {generation} stays")
        }
    };
    Raised {
        severity: Severity::Error,
        kind: ROLLED_BACK,
        message: format!(
            "target {target}: generation {generation} failed its health check in the \
             confirmation window, {outcome}: {error}"
        ),
        fields,
    }
}

/// `stack.drift`: what differed between `target`'s mounts and its applied stack
/// (`generation` in `slot`, if one is applied), and what was done; `repaired` says whether
/// the mounts are as recorded again.
pub fn drift(
    target: &str,
    applied: Option<(u64, Slot)>,
    found: &[String],
    done: &str,
    repaired: bool,
) -> Raised {
    let mut fields = vec![
        ("target", target.to_owned()),
        ("found", found.join("; ")),
        ("done", done.to_owned()),
        ("repaired", repaired.to_string()),
    ];
    if let Some((g, slot)) = applied {
        fields.push(("generation", g.to_string()));
        fields.push(("slot", slot_name(slot).to_owned()));
    }
    Raised {
        severity: if repaired {
            Severity::Warning
        } else {
            Severity::Error
        },
        kind: DRIFT,
        message: format!(
            "target {target}: the mounts differ from the applied stack ({}): {done}",
            found.join("; ")
        ),
        fields,
    }
}

/// `stack.recovered`: what the start found of `target` and what it did.
pub fn recovered(target: &str, r: &Recovered) -> Raised {
    let found = found_text(&r.found);
    let interrupted = r.found.switching_to;
    let (decision, generation, slot, done) = match &r.decision {
        Decision::Adopt(s) => {
            let (g, slot) = (s.config.generation, slot_name(s.slot));
            let kept_slot = r.window.as_ref().map(|w| w.previous.slot);
            let done = match interrupted {
                Some((to, _)) if to == g && kept_slot.is_some() => format!(
                    "a switch to generation {g} had moved current when it was cut short: \
                     adopted generation {g} in slot {slot}"
                ),
                Some((to, _)) if to == g => format!(
                    "a switch to generation {g} had moved current when it was cut short: \
                     adopted generation {g} in slot {slot}, cleaned the other slot"
                ),
                Some((to, to_slot)) if kept_slot == Some(to_slot) => format!(
                    "the switch back to generation {to} after a failed check was cut short \
                     before current moved: kept generation {g} in slot {slot}, whose next \
                     check decides again"
                ),
                Some((to, to_slot)) => format!(
                    "a switch to generation {to} was cut short before current moved: kept \
                     generation {g} in slot {slot}, removed the half-built slot {}",
                    slot_name(to_slot)
                ),
                None => format!("kept generation {g} in slot {slot}, mounted as recorded"),
            };
            ("adopt", Some(g), Some(s.slot), done)
        }
        Decision::Rebuild(s) => {
            let g = s.config.generation;
            let done = if r.rebuild.is_some() {
                format!("generation {g} is not mounted (a reboot, or left half-mounted): building it again")
            } else {
                format!(
                    "generation {g} is not mounted and its images are gone: waiting for the \
                     next stack from modulemgr"
                )
            };
            ("rebuild", Some(g), None, done)
        }
        Decision::Clean => (
            "clean",
            None,
            None,
            "nothing usable: unmounted what was left and forgot the target".to_owned(),
        ),
    };
    // A recorded window that was never opened (its switch did not move `current`) or was
    // closed by the switch back leaves the stack adopted in its own slot: no loss. Any other
    // window not resumed ended without its checks.
    let window_lost = r.window.is_none()
        && r.rebuild_window.is_none()
        && r.found
            .window
            .is_some_and(|(_, slot)| Some(slot) != r.active.as_ref().map(|a| a.slot));
    let mut done = done;
    if let Some(w) = &r.window {
        done.push_str(&format!(
            "; kept generation {} in slot {} for the rest of the confirmation window",
            w.previous.config.generation,
            slot_name(w.previous.slot)
        ));
    } else if let Some(w) = &r.rebuild_window {
        done.push_str(&format!(
            "; building generation {} in slot {} first, to switch back to for the rest of the \
             confirmation window",
            w.previous.config.generation,
            slot_name(w.previous.slot)
        ));
    } else if let (true, Some((g, slot))) = (window_lost, r.found.window) {
        done.push_str(&format!(
            "; the confirmation window is over without its checks: generation {g} is no \
             longer mounted in slot {} to switch back to",
            slot_name(slot)
        ));
    }
    let settled = matches!(r.decision, Decision::Adopt(_))
        || (matches!(r.decision, Decision::Rebuild(_)) && r.rebuild.is_some());
    let severity = if settled && interrupted.is_none() && !window_lost && r.problems.is_empty() {
        Severity::Info
    } else {
        Severity::Warning
    };
    let mut fields = vec![
        ("target", target.to_owned()),
        ("decision", decision.to_owned()),
        ("found", found),
        ("done", done.clone()),
        ("interrupted_switch", interrupted.is_some().to_string()),
    ];
    if let Some(g) = generation {
        fields.push(("generation", g.to_string()));
    }
    if let Some(slot) = slot {
        fields.push(("slot", slot_name(slot).to_owned()));
    }
    if !r.problems.is_empty() {
        fields.push(("problems", r.problems.join("; ")));
    }
    Raised {
        severity,
        kind: RECOVERED,
        message: format!("target {target} recovered at start-up: {done}"),
        fields,
    }
}

/// `record: generation 1 in slot A, switching to generation 2 in slot B; current: B`.
fn found_text(f: &Found) -> String {
    let record = if f.corrupt_record {
        "record: unreadable".to_owned()
    } else if !f.record {
        "record: none".to_owned()
    } else {
        let mut text = match f.applied {
            Some((g, slot)) => format!("record: generation {g} in slot {}", slot_name(slot)),
            None => "record: nothing applied".to_owned(),
        };
        if let Some((g, slot)) = f.switching_to {
            text.push_str(&format!(
                ", switching to generation {g} in slot {}",
                slot_name(slot)
            ));
        }
        if let Some((g, slot)) = f.window {
            text.push_str(&format!(
                ", generation {g} kept in slot {} for a confirmation window",
                slot_name(slot)
            ));
        }
        text
    };
    format!("{record}; current: {}", slot_text(f.current))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::AppliedStack;
    use powernode_types::{MountLayer, UpperMode};

    fn config(generation: u64, layers: &[(&str, u32)]) -> MountConfig {
        MountConfig {
            target: "modules".into(),
            generation,
            layers: layers
                .iter()
                .map(|(name, priority)| MountLayer {
                    name: (*name).into(),
                    image_path: format!("/store/{name}"),
                    digest: format!("sha256:{name}"),
                    priority: *priority,
                    health_check: None,
                })
                .collect(),
            upper: UpperMode::Tmpfs,
        }
    }

    fn recovered(found: Found, decision: Decision, rebuild: bool, problems: &[&str]) -> Raised {
        let rebuild = match (&decision, rebuild) {
            (Decision::Rebuild(s), true) => Some(s.config.clone()),
            _ => None,
        };
        let active = match &decision {
            Decision::Adopt(s) => Some(s.clone()),
            _ => None,
        };
        let r = Recovered {
            found,
            decision,
            record: None,
            active,
            window: None,
            rebuild,
            rebuild_window: None,
            problems: problems.iter().map(|p| (*p).to_owned()).collect(),
        };
        super::recovered("modules", &r)
    }

    #[test]
    fn switched_lists_the_layers_bottom_first() {
        let e = switched(
            &config(3, &[("top", 20), ("base", 10)]),
            Some(Slot::B),
            Some(2),
        );
        assert_eq!(e.kind, SWITCHED);
        assert_eq!(e.field("layers"), Some("base,top"));
        assert_eq!(e.field("digests"), Some("sha256:base,sha256:top"));
        assert_eq!(e.field("slot"), Some("B"));
        assert_eq!(e.field("previous_generation"), Some("2"));
        let e = switched(&config(4, &[]), None, Some(3));
        assert_eq!(e.field("slot"), Some("none"));
        assert!(e.message.contains("torn down"), "{}", e.message);
    }

    #[test]
    fn rolled_back_and_drift() {
        let layer = PlannedLayer {
            name: "tools".into(),
            digest: "sha256:t".into(),
            image: "/store/t".into(),
            mount_point: "/m/app/B/layers/1-tools".into(),
            health_check: Some(powernode_types::HealthCheck {
                command: vec!["probe".into(), "-q".into()],
                timeout_s: 5,
            }),
        };
        let error = CheckError::Failed {
            layer: "tools".into(),
            how: "exited with status 1".into(),
            stderr: "gone bad".into(),
        };
        let e = rolled_back("app", 7, &layer, &error, Ok((6, Slot::A)));
        assert_eq!((e.kind, e.severity), (ROLLED_BACK, Severity::Error));
        assert_eq!(e.field("check"), Some("probe -q"));
        assert_eq!(e.field("output"), Some("gone bad"));
        assert_eq!(e.field("active_generation"), Some("6"));
        assert_eq!(e.field("slot"), Some("A"));
        assert!(
            e.message
                .contains("switched back to generation 6 in slot A"),
            "{}",
            e.message
        );
        let e = rolled_back("app", 7, &layer, &error, Err("rename failed"));
        assert_eq!(e.field("switch_back_error"), Some("rename failed"));
        assert!(e.message.contains("generation 7 stays"), "{}", e.message);

        let found = vec!["A/merged is not mounted".to_owned()];
        let e = drift("app", Some((3, Slot::B)), &found, "rebuilt in slot B", true);
        assert_eq!((e.kind, e.severity), (DRIFT, Severity::Warning));
        assert_eq!(e.field("found"), Some("A/merged is not mounted"));
        assert_eq!(e.field("slot"), Some("B"));
        assert_eq!(e.field("repaired"), Some("true"));
        let e = drift("app", None, &found, "repair failed", false);
        assert_eq!(e.severity, Severity::Error);
        assert_eq!(e.field("generation"), None);
    }

    /// One row per recovery the module table of `recover` names: severity, decision, and the
    /// words that say what was done.
    #[test]
    fn recovery_reports() {
        let stack = |g: u64, slot: Slot| AppliedStack {
            slot,
            config: config(g, &[("base", 10)]),
        };
        let found = |applied, switching_to, current| Found {
            corrupt_record: false,
            record: true,
            applied,
            switching_to,
            current,
            window: None,
        };
        use Severity::*;
        let rows = [
            // Steady state.
            (
                recovered(
                    found(Some((1, Slot::A)), None, Some(Slot::A)),
                    Decision::Adopt(stack(1, Slot::A)),
                    false,
                    &[],
                ),
                Info,
                "adopt",
                "kept generation 1 in slot A",
            ),
            // Killed after the rename, before the result was recorded.
            (
                recovered(
                    found(Some((1, Slot::A)), Some((2, Slot::B)), Some(Slot::B)),
                    Decision::Adopt(stack(2, Slot::B)),
                    false,
                    &[],
                ),
                Warning,
                "adopt",
                "had moved current",
            ),
            // Killed before the rename.
            (
                recovered(
                    found(Some((1, Slot::A)), Some((2, Slot::B)), Some(Slot::A)),
                    Decision::Adopt(stack(1, Slot::A)),
                    false,
                    &[],
                ),
                Warning,
                "adopt",
                "removed the half-built slot B",
            ),
            // A reboot.
            (
                recovered(
                    found(Some((1, Slot::A)), None, None),
                    Decision::Rebuild(stack(1, Slot::A)),
                    true,
                    &[],
                ),
                Info,
                "rebuild",
                "building it again",
            ),
            // A reboot, and the images are gone.
            (
                recovered(
                    found(Some((1, Slot::A)), None, None),
                    Decision::Rebuild(stack(1, Slot::A)),
                    false,
                    &[],
                ),
                Warning,
                "rebuild",
                "images are gone",
            ),
            // A corrupt record: nothing is trusted.
            (
                recovered(
                    Found {
                        corrupt_record: true,
                        record: false,
                        applied: None,
                        switching_to: None,
                        current: Some(Slot::A),
                        window: None,
                    },
                    Decision::Clean,
                    false,
                    &["record corrupt"],
                ),
                Warning,
                "clean",
                "forgot the target",
            ),
        ];
        for (i, (e, severity, decision, done)) in rows.iter().enumerate() {
            assert_eq!(e.kind, RECOVERED, "row {i}");
            assert_eq!(e.severity, *severity, "row {i}: {e:?}");
            assert_eq!(e.field("decision"), Some(*decision), "row {i}");
            assert!(e.field("done").unwrap().contains(done), "row {i}: {e:?}");
        }
        assert_eq!(
            rows[1].0.field("found"),
            Some("record: generation 1 in slot A, switching to generation 2 in slot B; current: B")
        );
        assert_eq!(rows[1].0.field("interrupted_switch"), Some("true"));
        assert_eq!(rows[5].0.field("problems"), Some("record corrupt"));
        assert_eq!(
            rows[5].0.field("found"),
            Some("record: unreadable; current: A")
        );
    }

    /// One row per line of `recover`'s window table that a start can meet: a window resumed
    /// is as settled as an adoption; one that ended without its checks is a Warning.
    #[test]
    fn window_recovery_reports() {
        use crate::record::WindowRecord;
        let stack = |g: u64, slot: Slot| AppliedStack {
            slot,
            config: config(g, &[("base", 10)]),
        };
        let window = WindowRecord {
            previous: stack(1, Slot::A),
            until_ms: 1_700_000_000_000,
        };
        let report = |switching_to, current, decision: Decision, resumed: bool| {
            let active = match &decision {
                Decision::Adopt(s) => Some(s.clone()),
                _ => None,
            };
            let rebuild = match &decision {
                Decision::Rebuild(s) => Some(s.config.clone()),
                _ => None,
            };
            // `resumed`: the window goes on, with its previous stack kept (an adoption) or
            // built again first (a rebuild).
            let rebuilt = resumed && rebuild.is_some();
            let resumed = resumed && rebuild.is_none();
            super::recovered(
                "modules",
                &Recovered {
                    found: Found {
                        corrupt_record: false,
                        record: true,
                        applied: Some((2, Slot::B)),
                        switching_to,
                        current,
                        window: Some((1, Slot::A)),
                    },
                    decision,
                    record: None,
                    active,
                    window: resumed.then(|| window.clone()),
                    rebuild,
                    rebuild_window: rebuilt.then(|| window.clone()),
                    problems: Vec::new(),
                },
            )
        };
        use Severity::*;
        let rows = [
            // Killed in the window: resumed.
            (
                report(
                    None,
                    Some(Slot::B),
                    Decision::Adopt(stack(2, Slot::B)),
                    true,
                ),
                Info,
                "kept generation 1 in slot A for the rest of the confirmation window",
            ),
            // The previous slot was not whole any more.
            (
                report(
                    None,
                    Some(Slot::B),
                    Decision::Adopt(stack(2, Slot::B)),
                    false,
                ),
                Warning,
                "over without its checks: generation 1 is no longer mounted in slot A",
            ),
            // Killed switching back, before `current` moved: the window goes on.
            (
                report(
                    Some((1, Slot::A)),
                    Some(Slot::B),
                    Decision::Adopt(stack(2, Slot::B)),
                    true,
                ),
                Warning,
                "whose next check decides again",
            ),
            // Killed switching back, after `current` moved: rolled back, nothing lost.
            (
                report(
                    Some((1, Slot::A)),
                    Some(Slot::A),
                    Decision::Adopt(stack(1, Slot::A)),
                    false,
                ),
                Warning,
                "had moved current when it was cut short: adopted generation 1 in slot A, cleaned",
            ),
            // A reboot in the window, the previous stack's images gone.
            (
                report(None, None, Decision::Rebuild(stack(2, Slot::B)), false),
                Warning,
                "over without its checks",
            ),
            // A reboot in the window, the previous stack's images there: it is built first.
            (
                report(None, None, Decision::Rebuild(stack(2, Slot::B)), true),
                Info,
                "building generation 1 in slot A first, to switch back to for the rest of the \
                 confirmation window",
            ),
        ];
        for (i, (e, severity, done)) in rows.iter().enumerate() {
            assert_eq!(e.severity, *severity, "row {i}: {e:?}");
            assert!(e.field("done").unwrap().contains(done), "row {i}: {e:?}");
        }
        assert_eq!(
            rows[0].0.field("found"),
            Some("record: generation 2 in slot B, generation 1 kept in slot A for a confirmation window; current: B")
        );
        assert!(!rows[3].0.field("done").unwrap().contains("window"));
    }
}
