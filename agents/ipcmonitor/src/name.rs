//! `<agent>/<Topic>`: how a publication is named on the command line.

use std::fmt;
use std::str::FromStr;

use powernode_pubsub::validate_name;

/// A publication named on the command line as `<agent>/<Topic>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicationName {
    /// The publishing agent, e.g. `enrollmgr`.
    pub agent: String,
    /// The topic, e.g. `EnrollmentStatus`.
    pub topic: String,
}

/// Why a string is not a publication name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// No `/` between agent and topic.
    #[error("{0:?} is not <agent>/<Topic> (e.g. enrollmgr/EnrollmentStatus)")]
    Format(String),
    /// The agent or topic part has characters a publication cannot have.
    #[error("{what} {name:?} in {given:?} is invalid: use 1-64 ASCII letters, digits, '-' or '_'")]
    Invalid {
        /// `agent` or `topic`.
        what: &'static str,
        /// The offending part.
        name: String,
        /// The whole string as given.
        given: String,
    },
}

impl FromStr for PublicationName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let (agent, topic) = s
            .split_once('/')
            .ok_or_else(|| NameError::Format(s.to_owned()))?;
        for (what, name) in [("agent", agent), ("topic", topic)] {
            validate_name(what, name).map_err(|_| NameError::Invalid {
                what,
                name: name.to_owned(),
                given: s.to_owned(),
            })?;
        }
        Ok(PublicationName {
            agent: agent.to_owned(),
            topic: topic.to_owned(),
        })
    }
}

impl fmt::Display for PublicationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.agent, self.topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_slash_topic() {
        let ok: &[(&str, &str, &str)] = &[
            (
                "enrollmgr/EnrollmentStatus",
                "enrollmgr",
                "EnrollmentStatus",
            ),
            ("a-b_c/T1", "a-b_c", "T1"),
        ];
        for (given, agent, topic) in ok {
            let name: PublicationName = given.parse().unwrap();
            assert_eq!((name.agent.as_str(), name.topic.as_str()), (*agent, *topic));
            assert_eq!(name.to_string(), *given);
        }
        let bad: &[(&str, &str)] = &[
            ("EnrollmentStatus", "not <agent>/<Topic>"),
            ("/EnrollmentStatus", "agent \"\""),
            ("enrollmgr/", "topic \"\""),
            ("a/b/c", "topic \"b/c\""),
            ("../x/T", "agent \"..\""),
            ("a b/T", "agent \"a b\""),
        ];
        for (given, want) in bad {
            let err = given.parse::<PublicationName>().unwrap_err().to_string();
            assert!(err.contains(want), "{given}: {err}");
        }
    }
}
