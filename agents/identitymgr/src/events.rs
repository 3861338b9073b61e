//! The events identitymgr raises (docs/events.md, "Events raised"): `identity.resolved` and
//! `identity.unresolvable`, each only when the outcome differs from the one published before
//! it, so a retry that fails the same way, or a restart that finds the same identity, says
//! nothing new.

use agentbase::Events;
use powernode_types::{IdentityState, NodeIdentity, Severity};

use crate::cascade::Outcome;

/// The node has an identity, or a different one.
pub const RESOLVED: &str = "identity.resolved";
/// No source yields an identity (or the reasons why changed).
pub const UNRESOLVABLE: &str = "identity.unresolvable";

/// Every source tried without a UUID, and why: `(source, reason)`.
pub fn reasons(outcome: &Outcome) -> Vec<(String, String)> {
    let attempts = match outcome {
        Outcome::Resolved { attempts, .. } | Outcome::Unresolvable { attempts } => attempts,
    };
    attempts
        .iter()
        .map(|a| (format!("{:?}", a.source), a.error.to_string()))
        .collect()
}

/// An event to raise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raised {
    /// [`RESOLVED`] or [`UNRESOLVABLE`].
    pub kind: &'static str,
    /// How bad it is.
    pub severity: Severity,
    /// For people.
    pub message: String,
    /// For machines.
    pub fields: Vec<(String, String)>,
}

/// What to raise for `current` after `previous`, if anything. `reasons` are the sources'
/// reasons of the outcome behind `current`.
pub fn event_for(
    previous: Option<&NodeIdentity>,
    current: &NodeIdentity,
    reasons: &[(String, String)],
) -> Option<Raised> {
    match current.state {
        IdentityState::Resolved => {
            let same = previous.is_some_and(|p| {
                p.state == IdentityState::Resolved
                    && p.uuid == current.uuid
                    && p.source == current.source
                    && p.hostname == current.hostname
            });
            if same {
                return None;
            }
            let uuid = current.uuid.clone().unwrap_or_default();
            let source = current.source.map(|s| format!("{s:?}")).unwrap_or_default();
            let mut fields = vec![
                ("source".to_owned(), source.clone()),
                ("uuid".to_owned(), uuid.clone()),
                ("hostname".to_owned(), current.hostname.clone()),
            ];
            let changed_from = previous
                .filter(|p| p.state == IdentityState::Resolved)
                .and_then(|p| p.uuid.clone());
            if let Some(old) = &changed_from {
                fields.push(("previous_uuid".to_owned(), old.clone()));
            }
            if let Some(dmi) = &current.dmi_uuid {
                fields.push(("dmi_uuid".to_owned(), dmi.clone()));
            }
            // Sources before the winner that misbehaved (not merely absent) are worth a look.
            if let Some(noted) = &current.last_error {
                fields.push(("notes".to_owned(), noted.clone()));
            }
            let message = match changed_from {
                Some(old) if old != uuid => {
                    format!(
                        "identity changed from {old} to {uuid} ({} from {source})",
                        current.hostname
                    )
                }
                _ => format!(
                    "identity resolved: {uuid} ({}) from {source}",
                    current.hostname
                ),
            };
            Some(Raised {
                kind: RESOLVED,
                severity: Severity::Info,
                message,
                fields,
            })
        }
        IdentityState::Unresolvable => {
            let same = previous.is_some_and(|p| {
                p.state == IdentityState::Unresolvable && p.last_error == current.last_error
            });
            if same {
                return None;
            }
            let mut fields = reasons.to_vec();
            if fields.is_empty() {
                fields.push(("sources".to_owned(), "no sources enabled".to_owned()));
            }
            let message = format!(
                "no identity source yields a node identity: {}",
                current.last_error.as_deref().unwrap_or("no reason given")
            );
            Some(Raised {
                kind: UNRESOLVABLE,
                severity: Severity::Error,
                message,
                fields,
            })
        }
    }
}

/// Raises what [`event_for`] says, if anything.
pub fn raise(
    events: &Events,
    previous: Option<&NodeIdentity>,
    current: &NodeIdentity,
    reasons: &[(String, String)],
) {
    if let Some(raised) = event_for(previous, current, reasons) {
        let fields: Vec<(&str, &str)> = raised
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        events.report(raised.severity, raised.kind, &raised.message, &fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powernode_types::IdentitySource;

    fn resolved(uuid: &str) -> NodeIdentity {
        NodeIdentity {
            state: IdentityState::Resolved,
            uuid: Some(uuid.to_owned()),
            source: Some(IdentitySource::IdentityCfg),
            boot_id: "b".into(),
            hostname: "edge-1".into(),
            arch: "amd64".into(),
            dmi_uuid: None,
            bootstrap_token: None,
            controller_urls: Vec::new(),
            ca_pem: None,
            last_error: None,
        }
    }

    fn unresolvable(error: &str) -> NodeIdentity {
        NodeIdentity {
            state: IdentityState::Unresolvable,
            uuid: None,
            source: None,
            last_error: Some(error.to_owned()),
            ..resolved("x")
        }
    }

    fn kind(previous: Option<&NodeIdentity>, current: &NodeIdentity) -> Option<&'static str> {
        let reasons = [("Dmi".to_owned(), "no file".to_owned())];
        event_for(previous, current, &reasons).map(|r| r.kind)
    }

    #[test]
    fn raised_once_per_change_of_outcome() {
        let a = resolved("a");
        let b = resolved("b");
        let down = unresolvable("Dmi: no file");
        let other = unresolvable("Dmi: unreadable");
        let rows: [(Option<&NodeIdentity>, &NodeIdentity, Option<&str>); 8] = [
            (None, &a, Some(RESOLVED)),
            (Some(&a), &a, None),
            (Some(&a), &b, Some(RESOLVED)),
            (Some(&down), &a, Some(RESOLVED)),
            (None, &down, Some(UNRESOLVABLE)),
            (Some(&down), &down, None),
            (Some(&down), &other, Some(UNRESOLVABLE)),
            (Some(&a), &down, Some(UNRESOLVABLE)),
        ];
        for (i, (previous, current, want)) in rows.into_iter().enumerate() {
            assert_eq!(kind(previous, current), want, "row {i}");
        }
    }

    #[test]
    fn fields_name_the_source_and_every_reason() {
        let fields = event_for(Some(&resolved("a")), &resolved("b"), &[])
            .unwrap()
            .fields;
        assert!(fields.contains(&("source".into(), "IdentityCfg".into())));
        assert!(fields.contains(&("previous_uuid".into(), "a".into())));
        let reasons = vec![
            ("KernelCmdline".to_owned(), "none".to_owned()),
            ("Dmi".to_owned(), "no file".to_owned()),
        ];
        let raised = event_for(None, &unresolvable("x"), &reasons).unwrap();
        assert_eq!(raised.severity, Severity::Error);
        assert_eq!(raised.fields, reasons);
        for k in [RESOLVED, UNRESOLVABLE] {
            agentbase::events::check_kind(k).unwrap();
        }
    }
}
