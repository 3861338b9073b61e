//! The DMI/SMBIOS system UUID, `<root>/sys/class/dmi/id/product_uuid`. Firmware that has
//! none fills it with zeros or `FF`s; those, and anything that is not a UUID, are rejected.

use agentbase::Root;

use crate::cascade::{Found, SourceError};
use crate::validate;

/// Where the UUID is read from, under the root.
pub const PATH: &str = "sys/class/dmi/id/product_uuid";

/// The product UUID, validated.
pub async fn fetch(root: &Root) -> Result<Found, SourceError> {
    let uuid = read(root).await?;
    Ok(Found {
        uuid: Some(uuid),
        facts: Default::default(),
    })
}

/// The product UUID alone (published as `dmi_uuid` whichever source won).
pub async fn read(root: &Root) -> Result<String, SourceError> {
    let path = root.path(PATH);
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::Absent(format!("no {}", path.display())))
        }
        Err(source) => return Err(SourceError::Io { path, source }),
    };
    let text = String::from_utf8_lossy(&bytes);
    validate::uuid("product_uuid", text.trim()).map_err(|error| SourceError::Invalid {
        place: path.display().to_string(),
        error,
    })
}
