//! `etc/powernode/identity.cfg`: the operator's identity file, in shell `KEY=VALUE` form, and
//! the same format read from cloud user data.
//!
//! Accepted: blank lines; `#` comments (whole lines, or after whitespace at the end of a line);
//! an optional `export ` before the key; values unquoted (no spaces), in single quotes (taken
//! literally) or in double quotes (where `\"`, `\\`, `\$` and `` \` `` are escapes), or
//! concatenations of these (`A="x"'y'z`). Not accepted, because they would mean something else
//! to a shell: variable expansion (`$X`), command substitution, unquoted spaces, unterminated
//! quotes, values spanning lines. Unknown keys are ignored (the file may be shared with other
//! tools). `CONTROLLER_URL` may list several URLs, comma-separated
//! (`CONTROLLER_URL=https://a:8443,https://b:8443`).

use std::path::{Path, PathBuf};

use crate::cascade::{Raw, SourceError};
use crate::validate::ValueError;

/// Where the file lives under the root.
pub const PATH: &str = "etc/powernode/identity.cfg";

/// The key for the node's UUID.
pub const INSTANCE_UUID: &str = "INSTANCE_UUID";

/// A line that is not a valid assignment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct SyntaxError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// One `KEY=VALUE` assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// 1-based line number.
    pub line: usize,
    /// The key.
    pub key: String,
    /// The value with quoting removed.
    pub value: String,
}

/// Parses the whole text; any malformed line is an error.
pub fn parse(text: &str) -> Result<Vec<Assignment>, SyntaxError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(assignment) = parse_line(line, i + 1)? {
            out.push(assignment);
        }
    }
    Ok(out)
}

/// Parses what can be parsed, skipping lines that are not assignments: user data is shared
/// with cloud-init and scripts, so only lines that look like our assignments count.
pub fn parse_lenient(text: &str) -> Vec<Assignment> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| parse_line(line, i + 1).ok().flatten())
        .collect()
}

fn parse_line(line: &str, number: usize) -> Result<Option<Assignment>, SyntaxError> {
    let err = |reason: &str| SyntaxError {
        line: number,
        reason: reason.to_owned(),
    };
    let trimmed = line.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let rest = trimmed
        .strip_prefix("export")
        .filter(|r| r.starts_with([' ', '\t']))
        .map_or(trimmed, str::trim_start);
    let Some((key, raw)) = rest.split_once('=') else {
        return Err(err("expected KEY=VALUE"));
    };
    let key_ok = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !key_ok {
        return Err(err(&format!(
            "{} is not a variable name",
            crate::validate::excerpt(key)
        )));
    }
    let value = unquote(raw).map_err(|reason| err(&format!("{key}: {reason}")))?;
    Ok(Some(Assignment {
        line: number,
        key: key.to_owned(),
        value,
    }))
}

/// Removes shell quoting from a value; stops at whitespace followed by a comment.
fn unquote(raw: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err("unterminated single quote".to_owned()),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\' | '$' | '`')) => out.push(c),
                        Some(c) => {
                            out.push('\\');
                            out.push(c);
                        }
                        None => return Err("unterminated double quote".to_owned()),
                    },
                    Some('$' | '`') => {
                        return Err(
                            "variable expansion and command substitution are not supported"
                                .to_owned(),
                        )
                    }
                    Some(c) => out.push(c),
                    None => return Err("unterminated double quote".to_owned()),
                }
            },
            '\\' => match chars.next() {
                Some(c) => out.push(c),
                None => {
                    return Err(
                        "a trailing backslash (line continuation) is not supported".to_owned()
                    )
                }
            },
            '$' | '`' => {
                return Err(
                    "variable expansion and command substitution are not supported".to_owned(),
                )
            }
            c if c.is_whitespace() => {
                let rest: String = chars.collect();
                let rest = rest.trim_start();
                if rest.is_empty() || rest.starts_with('#') {
                    return Ok(out);
                }
                return Err("unquoted space in value (quote it)".to_owned());
            }
            ';' | '&' | '|' | '<' | '>' | '(' | ')' => {
                return Err(format!("unquoted `{c}` in value (quote it)"));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The identity keys found in `assignments`. `uuid_key` is false for user data, whose
/// `INSTANCE_UUID` is ignored: a cloud's own instance id is authoritative there.
pub fn to_raw(assignments: &[Assignment], uuid_key: bool) -> Raw {
    let mut raw = Raw::default();
    for a in assignments {
        let slot = match a.key.as_str() {
            INSTANCE_UUID if uuid_key => &mut raw.instance_uuid,
            "BOOTSTRAP_TOKEN" => &mut raw.bootstrap_token,
            "CONTROLLER_URL" => &mut raw.controller_url,
            "CA_PEM" => &mut raw.ca_pem,
            "CA_FILE" => &mut raw.ca_file,
            _ => continue,
        };
        *slot = Some(a.value.clone());
    }
    raw
}

/// Reads and parses `<root>/etc/powernode/identity.cfg`.
pub async fn read(root: &agentbase::Root) -> Result<Raw, SourceError> {
    let path = root.path(PATH);
    let text = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::Absent(format!("no {}", path.display())))
        }
        Err(source) => return Err(SourceError::Io { path, source }),
    };
    let text = String::from_utf8(text).map_err(|_| SourceError::Syntax {
        path: path.clone(),
        error: SyntaxError {
            line: 0,
            reason: "not UTF-8 text".to_owned(),
        },
    })?;
    let assignments = parse(&text).map_err(|error| SourceError::Syntax {
        path: path.clone(),
        error,
    })?;
    Ok(to_raw(&assignments, true))
}

/// Stores `uuid` as `INSTANCE_UUID` in `<root>/etc/powernode/identity.cfg`, keeping whatever
/// else the file holds: written beside it (mode 0600), synced, renamed over it, directory
/// synced. Refuses to touch a file that already names an `INSTANCE_UUID` or does not parse.
pub fn store_uuid(root: &agentbase::Root, uuid: &str) -> Result<PathBuf, StoreError> {
    let path = root.path(PATH);
    let existing = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    let assignments = parse(&existing).map_err(|error| StoreError::Unparsable {
        path: path.clone(),
        error,
    })?;
    if assignments.iter().any(|a| a.key == INSTANCE_UUID) {
        return Err(StoreError::HasUuid { path });
    }
    let mut text = existing;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if text.is_empty() {
        text.push_str("# Written by identitymgr: this node's generated identity.\n");
    }
    text.push_str(&format!("{INSTANCE_UUID}={uuid}\n"));
    agentbase::fsutil::write_atomic(&path, text.as_bytes(), 0o600).map_err(|source| {
        StoreError::Io {
            path: path.clone(),
            source,
        }
    })?;
    Ok(path)
}

/// Why the generated UUID could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists but does not parse; it is left alone for the operator.
    #[error("{}: {error}; not overwriting it", path.display())]
    Unparsable {
        /// The file.
        path: PathBuf,
        /// The parse error.
        error: SyntaxError,
    },
    /// The file already names a UUID (one the cascade rejected); it is left alone.
    #[error("{}: already sets {INSTANCE_UUID}; not replacing it", path.display())]
    HasUuid {
        /// The file.
        path: PathBuf,
    },
}

/// Makes a [`ValueError`] name the file and key it came from.
pub fn value_error(path: &Path, error: ValueError) -> SourceError {
    SourceError::Invalid {
        place: path.display().to_string(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("", &[]),
            ("\n\n   \n", &[]),
            ("# comment\n  # indented comment\n", &[]),
            ("A=b", &[("A", "b")]),
            ("A=", &[("A", "")]),
            ("export A=b\n", &[("A", "b")]),
            ("export\tA=b\n", &[("A", "b")]),
            ("exportA=b\n", &[("exportA", "b")]),
            ("  A=b   # trailing comment\n", &[("A", "b")]),
            ("A=b#notacomment", &[("A", "b#notacomment")]),
            ("A='x y # z'", &[("A", "x y # z")]),
            ("A='$HOME \"q\"'", &[("A", "$HOME \"q\"")]),
            ("A=\"x y\"", &[("A", "x y")]),
            ("A=\"a\\\"b\\\\c\\$d\\n\"", &[("A", "a\"b\\c$d\\n")]),
            ("A=\"x\"'y'z", &[("A", "xyz")]),
            ("A=a\\ b", &[("A", "a b")]),
            ("A=1\r", &[("A", "1")]),
            ("A=1\nB=2\nA=3\n", &[("A", "1"), ("B", "2"), ("A", "3")]),
            ("_x9=v", &[("_x9", "v")]),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let got: Vec<(&str, &str)> = got
                .iter()
                .map(|a| (a.key.as_str(), a.value.as_str()))
                .collect();
            assert_eq!(got, *want, "{text:?}");
        }
    }

    #[test]
    fn parse_errors() {
        let cases: &[(&str, &str)] = &[
            ("garbage", "line 1: expected KEY=VALUE"),
            ("A=1\nnot an assignment\n", "line 2: expected KEY=VALUE"),
            ("1A=b", "is not a variable name"),
            ("A-B=c", "is not a variable name"),
            ("=c", "is not a variable name"),
            ("A='open", "A: unterminated single quote"),
            ("A=\"open", "unterminated double quote"),
            ("A=x y", "unquoted space"),
            ("A=$HOME", "variable expansion"),
            ("A=\"$HOME\"", "variable expansion"),
            ("A=`id`", "command substitution"),
            ("A=x;rm", "unquoted `;`"),
            ("A=x\\", "trailing backslash"),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn lenient_skips_other_lines() {
        let text = "#!/bin/bash\necho hello world\nBOOTSTRAP_TOKEN=abc12345\n#cloud-config\nCONTROLLER_URL='https://c'\n";
        let raw = to_raw(&parse_lenient(text), false);
        assert_eq!(raw.bootstrap_token.as_deref(), Some("abc12345"));
        assert_eq!(raw.controller_url.as_deref(), Some("https://c"));
        let raw = to_raw(&parse_lenient("INSTANCE_UUID=x\n"), false);
        assert_eq!(raw.instance_uuid, None, "user data cannot set the UUID");
    }

    #[test]
    fn store_keeps_other_keys() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let root = agentbase::Root::new(dir.path());
        let uuid = "6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b";

        // No file yet: created with the UUID alone, mode 0600.
        let path = store_uuid(&root, uuid).unwrap();
        assert_eq!(path, dir.path().join(PATH));
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = parse(&text).unwrap();
        assert_eq!(to_raw(&parsed, true).instance_uuid.as_deref(), Some(uuid));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A UUID already there: refused, file untouched.
        let err = store_uuid(&root, uuid).unwrap_err();
        assert!(matches!(err, StoreError::HasUuid { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);

        // Other keys kept, no trailing newline handled.
        std::fs::write(&path, "BOOTSTRAP_TOKEN=tok12345").unwrap();
        store_uuid(&root, uuid).unwrap();
        let raw = to_raw(
            &parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            true,
        );
        assert_eq!(raw.bootstrap_token.as_deref(), Some("tok12345"));
        assert_eq!(raw.instance_uuid.as_deref(), Some(uuid));

        // An unparsable file is left for the operator.
        std::fs::write(&path, "this is not shell\n").unwrap();
        let err = store_uuid(&root, uuid).unwrap_err();
        assert!(err.to_string().contains("not overwriting"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "this is not shell\n"
        );
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }
}
