//! `--field F=V`: a condition on one field of an item's JSON.
//!
//! `F` is a dotted path (`state`, `a.b`, `layers.0.name`: a number indexes an array) and `V` is
//! compared with the field's string form: a JSON string as is, anything else as compact JSON
//! (`true`, `3`, `null`). So `state=Enrolled`, `reachable=true` and `a.b=3` all read naturally.

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// One `F=V` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldMatch {
    path: Vec<String>,
    expected: String,
}

/// Why a `--field` argument is not `F=V`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FieldError {
    /// No `=`.
    #[error("{0:?} is not FIELD=VALUE (e.g. state=Enrolled)")]
    NoEquals(String),
    /// An empty path or path segment (`=x`, `a..b`, `.a`).
    #[error("{0:?} has an empty field name; use a dotted path like a.b")]
    EmptySegment(String),
}

impl FromStr for FieldMatch {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, FieldError> {
        let (path, expected) = s
            .split_once('=')
            .ok_or_else(|| FieldError::NoEquals(s.to_owned()))?;
        let path: Vec<String> = path.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err(FieldError::EmptySegment(s.to_owned()));
        }
        Ok(FieldMatch {
            path,
            expected: expected.to_owned(),
        })
    }
}

impl fmt::Display for FieldMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.path.join("."), self.expected)
    }
}

impl FieldMatch {
    /// Whether `item` has the field and its string form is the expected value.
    pub fn matches(&self, item: &Value) -> bool {
        self.lookup(item)
            .is_some_and(|v| string_form(v) == self.expected)
    }

    fn lookup<'a>(&self, item: &'a Value) -> Option<&'a Value> {
        self.path
            .iter()
            .try_fold(item, |value, segment| match value {
                Value::Object(map) => map.get(segment),
                Value::Array(list) => segment.parse::<usize>().ok().and_then(|i| list.get(i)),
                _ => None,
            })
    }
}

/// A JSON string as is; any other value as compact JSON.
fn string_form(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_displays() {
        let f: FieldMatch = "a.b=3".parse().unwrap();
        assert_eq!(f.path, ["a", "b"]);
        assert_eq!(f.expected, "3");
        assert_eq!(f.to_string(), "a.b=3");
        // Only the first '=' separates: values may contain '='.
        let f: FieldMatch = "last_error=x=y".parse().unwrap();
        assert_eq!(f.expected, "x=y");
        let f: FieldMatch = "last_error=".parse().unwrap();
        assert_eq!(f.expected, "");

        for (bad, want) in [
            ("state", FieldError::NoEquals("state".into())),
            ("=x", FieldError::EmptySegment("=x".into())),
            ("a..b=1", FieldError::EmptySegment("a..b=1".into())),
            (".a=1", FieldError::EmptySegment(".a=1".into())),
        ] {
            assert_eq!(bad.parse::<FieldMatch>().unwrap_err(), want, "{bad}");
        }
    }

    #[test]
    fn matching_table() {
        let item = json!({
            "state": "Enrolled",
            "reachable": true,
            "count": 3,
            "node_id": null,
            "a": {"b": 3, "c": {"d": "deep"}},
            "layers": [{"name": "base"}, {"name": "app"}],
            "state_with_data": {"Failed": "disk full"},
        });
        let cases: &[(&str, bool)] = &[
            ("state=Enrolled", true),
            ("state=enrolled", false),
            ("reachable=true", true),
            ("reachable=false", false),
            ("count=3", true),
            ("count=3.0", false),
            ("node_id=null", true),
            ("a.b=3", true),
            ("a.c.d=deep", true),
            ("a.c.e=deep", false),
            ("a.b.c=3", false),
            ("layers.1.name=app", true),
            ("layers.2.name=app", false),
            ("layers.x.name=app", false),
            ("state_with_data.Failed=disk full", true),
            ("a={\"b\":3,\"c\":{\"d\":\"deep\"}}", true),
            ("missing=", false),
        ];
        for (field, want) in cases {
            let f: FieldMatch = field.parse().unwrap();
            assert_eq!(f.matches(&item), *want, "{field}");
        }
    }
}
