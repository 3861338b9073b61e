//! `module.rejected` (docs/events.md, "Events raised"): raised once per rejection of an
//! image, not once per check. A module checked again and rejected again for the same reason
//! (the trust policy was edited, the verifier restarted, modulemgr handed the same image over
//! again) raises nothing new; a rejection for another image or another reason does, and so
//! does one after the module had passed.

use std::collections::BTreeMap;

use agentbase::events::Events;
use powernode_types::{Severity, VerifyConfig, VerifyState, VerifyStatus};

/// The event's kind.
pub const KIND: &str = "module.rejected";

/// What makes a rejection the same one: the image, its manifest, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rejection {
    digest: String,
    manifest_digest: String,
    reason: String,
}

impl Rejection {
    fn of(status: &VerifyStatus) -> Option<Rejection> {
        (status.state == VerifyState::Failed).then(|| Rejection {
            digest: status.digest.clone(),
            manifest_digest: status.manifest_digest.clone(),
            reason: status.reason.clone().unwrap_or_default(),
        })
    }
}

/// The rejections already raised, by module name.
#[derive(Debug, Default)]
pub struct Rejections {
    raised: BTreeMap<String, Rejection>,
}

impl Rejections {
    /// Starts from the verdicts an earlier run left published: their rejections were raised
    /// then.
    pub fn standing(verdicts: impl IntoIterator<Item = VerifyStatus>) -> Rejections {
        let raised = verdicts
            .into_iter()
            .filter_map(|s| Some((s.name.clone(), Rejection::of(&s)?)))
            .collect();
        Rejections { raised }
    }

    /// Notes the verdict `status` just published for `config`; raises `module.rejected` if
    /// it is a rejection not raised yet.
    pub fn published(&mut self, events: &Events, config: &VerifyConfig, status: &VerifyStatus) {
        if self.note(status) {
            raise(events, config, status.reason.as_deref().unwrap_or_default());
        }
    }

    /// The module is gone (its config withdrawn): a rejection of it later is news.
    pub fn forget(&mut self, name: &str) {
        self.raised.remove(name);
    }

    /// Records `status`; true if it is a rejection not raised yet.
    fn note(&mut self, status: &VerifyStatus) -> bool {
        match Rejection::of(status) {
            Some(rejection) if self.raised.get(&status.name) != Some(&rejection) => {
                self.raised.insert(status.name.clone(), rejection);
                true
            }
            Some(_) => false,
            None => {
                if status.state == VerifyState::Verified {
                    self.forget(&status.name);
                }
                false
            }
        }
    }
}

fn raise(events: &Events, config: &VerifyConfig, reason: &str) {
    events.report(
        Severity::Error,
        KIND,
        &format!("module {} rejected: {reason}", config.name),
        &[
            ("module", &config.name),
            ("digest", &config.digest),
            ("reason", reason),
            ("repository", &config.repository),
            ("trust_policy", &config.trust_policy),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(name: &str, digest: &str, state: VerifyState, reason: &str) -> VerifyStatus {
        VerifyStatus {
            name: name.into(),
            digest: digest.into(),
            manifest_digest: format!("m-{digest}"),
            state,
            reason: Some(reason.into()),
        }
    }

    #[test]
    fn a_rejection_is_news_once() {
        use VerifyState::*;
        let no_sig = "signature: no signatures";
        let mut r = Rejections::standing([
            verdict("old", "d1", Failed, no_sig),
            verdict("good", "d2", Verified, "key abc"),
        ]);
        // Left by an earlier run: raised then.
        assert!(!r.note(&verdict("old", "d1", Failed, no_sig)));
        // Checked again (a policy edit), same verdict: nothing new.
        assert!(!r.note(&verdict("old", "d1", Verifying, "")));
        assert!(!r.note(&verdict("old", "d1", Failed, no_sig)));
        // Same module, another reason, then another image: news each time.
        assert!(r.note(&verdict("old", "d1", Failed, "fs-verity digest mismatch")));
        assert!(r.note(&verdict("old", "d9", Failed, no_sig)));
        // A module that passed, then fails: news; again: not.
        assert!(!r.note(&verdict("good", "d2", Verified, "key abc")));
        assert!(r.note(&verdict("good", "d2", Failed, "signature: key revoked")));
        assert!(!r.note(&verdict("good", "d2", Failed, "signature: key revoked")));
        // Passed in between (the key came back), rejected again: news.
        assert!(!r.note(&verdict("good", "d2", Verified, "key abc")));
        assert!(r.note(&verdict("good", "d2", Failed, "signature: key revoked")));
        // Withdrawn and handed over again: news.
        r.forget("good");
        assert!(r.note(&verdict("good", "d2", Failed, "signature: key revoked")));
    }
}
