//! The kernel command line, `<root>/proc/cmdline`: `powernode.instance_uuid=`,
//! `powernode.bootstrap_token=`, `powernode.controller_url=` (one URL, or several
//! comma-separated, tried in that order), `powernode.ca_pem=` (base64 of PEM, since the
//! command line holds no newlines) or `powernode.ca_file=` (a path under the root). Values may be double-quoted, as the kernel allows; the last of a repeated parameter
//! wins, as in the kernel. Other `powernode.*` parameters are ignored (other agents may use them).

use agentbase::Root;

use crate::cascade::{validate_raw, Found, KeyStyle, Raw, SourceError};

/// Where the command line is read from, under the root.
pub const PATH: &str = "proc/cmdline";

/// Reads and validates the identity parameters.
pub async fn fetch(root: &Root) -> Result<Found, SourceError> {
    let path = root.path(PATH);
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::Absent(format!("no {}", path.display())))
        }
        Err(source) => return Err(SourceError::Io { path, source }),
    };
    let text = String::from_utf8_lossy(&bytes);
    let raw = parse(&text);
    if raw == Raw::default() {
        return Err(SourceError::Absent(
            "no powernode.* identity parameters on the kernel command line".to_owned(),
        ));
    }
    validate_raw(raw, KeyStyle::Cmdline, root, "kernel command line").await
}

/// The identity parameters on a command line.
pub fn parse(cmdline: &str) -> Raw {
    let mut raw = Raw::default();
    for word in split(cmdline) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let slot = match key {
            "powernode.instance_uuid" => &mut raw.instance_uuid,
            "powernode.bootstrap_token" => &mut raw.bootstrap_token,
            "powernode.controller_url" => &mut raw.controller_url,
            "powernode.ca_pem" => &mut raw.ca_pem,
            "powernode.ca_file" => &mut raw.ca_file,
            _ => continue,
        };
        *slot = Some(value.to_owned());
    }
    raw
}

/// Splits a command line into parameters the way the kernel does: on whitespace, except
/// inside double quotes, which are removed.
fn split(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_table() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("  \n", &[]),
            ("a b\tc\n", &["a", "b", "c"]),
            (
                "root=/dev/vda1 ro quiet",
                &["root=/dev/vda1", "ro", "quiet"],
            ),
            ("a=\"x y\" b", &["a=x y", "b"]),
            ("\"a b\"", &["a b"]),
            ("a=\"unterminated z", &["a=unterminated z"]),
        ];
        for (line, want) in cases {
            assert_eq!(split(line), *want, "{line:?}");
        }
    }

    #[test]
    fn parse_table() {
        let raw = parse(
            "BOOT_IMAGE=/vmlinuz root=/dev/vda1 powernode.instance_uuid=6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b \
             powernode.bootstrap_token=tok12345 powernode.controller_url=\"https://c.example\" \
             powernode.other=1 powernode.ca_file=/etc/ca.pem\n",
        );
        assert_eq!(
            raw,
            Raw {
                instance_uuid: Some("6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b".into()),
                bootstrap_token: Some("tok12345".into()),
                controller_url: Some("https://c.example".into()),
                ca_pem: None,
                ca_file: Some("/etc/ca.pem".into()),
            }
        );
        assert_eq!(
            parse("powernode.instance_uuid=a powernode.instance_uuid=b")
                .instance_uuid
                .as_deref(),
            Some("b")
        );
        assert_eq!(
            parse("powernode.instance_uuid powernode.uuid=x quiet"),
            Raw::default()
        );
        // Several controllers: one parameter, comma-separated, the list kept whole.
        assert_eq!(
            parse("powernode.controller_url=https://a:8443,https://b:8443 quiet")
                .controller_url
                .as_deref(),
            Some("https://a:8443,https://b:8443")
        );
    }
}
