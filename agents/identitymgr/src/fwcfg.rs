//! QEMU fw-cfg: `-fw_cfg name=opt/com.powernode/<name>,string=…` (or `file=…`) appears as
//! `<root>/sys/firmware/qemu_fw_cfg/by_name/opt/com.powernode/<name>/raw`. Names:
//! `instance_uuid`, `bootstrap_token`, `controller_url` (one URL, or several comma-separated),
//! `ca_pem` (PEM, or base64 of PEM).
//! Surrounding whitespace and NUL bytes are trimmed; an entry that exists but is empty is an
//! error.

use agentbase::Root;

use crate::cascade::{validate_raw, Found, KeyStyle, Raw, SourceError};

/// The directory of our fw-cfg entries, under the root.
pub const DIR: &str = "sys/firmware/qemu_fw_cfg/by_name/opt/com.powernode";

/// Largest entry read, in bytes.
const MAX_ENTRY: u64 = 256 * 1024;

/// Reads and validates the entries.
pub async fn fetch(root: &Root) -> Result<Found, SourceError> {
    let dir = root.path(DIR);
    if tokio::fs::metadata(&dir).await.is_err() {
        return Err(SourceError::Absent(format!("no {}", dir.display())));
    }
    let mut raw = Raw::default();
    for (name, slot) in [
        ("instance_uuid", &mut raw.instance_uuid),
        ("bootstrap_token", &mut raw.bootstrap_token),
        ("controller_url", &mut raw.controller_url),
        ("ca_pem", &mut raw.ca_pem),
    ] {
        let path = dir.join(name).join("raw");
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(SourceError::Io { path, source }),
        };
        let invalid = |reason: &str| SourceError::Invalid {
            place: path.display().to_string(),
            error: crate::validate::ValueError::new(name, reason),
        };
        if bytes.len() as u64 > MAX_ENTRY {
            return Err(invalid(&format!("larger than {MAX_ENTRY} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|_| invalid("not UTF-8 text"))?;
        let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if text.is_empty() {
            return Err(invalid("empty"));
        }
        *slot = Some(text.to_owned());
    }
    if raw == Raw::default() {
        return Err(SourceError::Absent(format!(
            "no identity entries in {}",
            dir.display()
        )));
    }
    validate_raw(raw, KeyStyle::FwCfg, root, &dir.display().to_string()).await
}
