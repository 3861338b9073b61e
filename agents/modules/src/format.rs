//! The module format: media types, annotations, the module manifest (config blob), and the OCI
//! manifests and index that carry a module (docs/modules.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// `artifactType` of a module's platform manifests and index.
pub const ARTIFACT_TYPE: &str = "application/vnd.powernode.module.v1";
/// Media type of the one layer: the erofs image.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.powernode.module.erofs.v1";
/// Media type of the config blob: the module manifest.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.powernode.module.config.v1+json";
/// Annotation (on the platform manifest and on its layer) holding the image's fs-verity digest.
pub const FSVERITY_ANNOTATION: &str = "dev.powernode.module.fsverity-digest";
/// Media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The largest manifest or config blob read from a registry; larger ones are refused unread.
pub const MAX_METADATA_BYTES: usize = 1 << 20;

/// The module manifest, stored as the config blob: what the module is and what it needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModuleManifest {
    /// The module's name, e.g. `tools`.
    pub name: String,
    /// Its version, e.g. `1.4.2`.
    pub version: String,
    /// Default stacking priority (higher is stacked above); an assignment may override it.
    pub priority: u32,
    /// OCI architecture of the image's contents (`amd64`, `arm64`, …).
    pub architecture: String,
    /// Names of modules that must be in the same stack.
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// systemd units the module provides.
    #[serde(default)]
    pub services: Vec<String>,
    /// Every regular file and symlink in the image, with its mode and size.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// A command run in a new stack before it is switched to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
}

/// One entry of the image, as recorded when the module was built.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Path inside the image, relative, `/`-separated.
    pub path: String,
    /// Unix permission bits.
    pub mode: u32,
    /// Size in bytes (0 for a symlink).
    pub size: u64,
}

/// The module's health check (see `powernode_types::HealthCheck`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Seconds it may take.
    pub timeout_s: u32,
}

/// An OCI content descriptor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Artifact type (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Platform (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI platform.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// OCI architecture.
    pub architecture: String,
    /// Operating system; always `linux` here.
    pub os: String,
}

/// An OCI image manifest (only the fields a module uses).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// Always 2.
    pub schema_version: u32,
    /// [`OCI_MANIFEST`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// [`ARTIFACT_TYPE`] for a module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image index.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u32,
    /// [`OCI_INDEX`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// [`ARTIFACT_TYPE`] for a module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// One entry per platform.
    pub manifests: Vec<Descriptor>,
}

/// Why a manifest is not a well-formed module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Not JSON of the expected shape.
    #[error("{what} is not valid: {reason}")]
    Malformed {
        /// What was being read.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// The manifest is not a module's.
    #[error("not a powernode module: {0}")]
    NotAModule(String),
    /// The index has no entry for the node's architecture.
    #[error("no manifest for architecture {wanted} (the module has: {available})")]
    NoPlatform {
        /// The node's architecture.
        wanted: String,
        /// What the index offers.
        available: String,
    },
    /// A platform manifest for another architecture.
    #[error("module is built for architecture {found}, this node is {wanted}")]
    WrongArchitecture {
        /// The node's architecture.
        wanted: String,
        /// The module's.
        found: String,
    },
}

impl ImageManifest {
    /// Parses `bytes` as a module's platform manifest and checks its shape: the module artifact
    /// type, one erofs layer with a valid digest, a module config.
    pub fn parse_module(bytes: &[u8]) -> Result<ImageManifest, FormatError> {
        let manifest: ImageManifest =
            serde_json::from_slice(bytes).map_err(|e| FormatError::Malformed {
                what: "module manifest",
                reason: e.to_string(),
            })?;
        if manifest.schema_version != 2 {
            return Err(FormatError::NotAModule(format!(
                "schemaVersion {}",
                manifest.schema_version
            )));
        }
        if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(FormatError::NotAModule(format!(
                "artifactType {:?}, expected {ARTIFACT_TYPE}",
                manifest.artifact_type.as_deref().unwrap_or("(none)")
            )));
        }
        if manifest.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(FormatError::NotAModule(format!(
                "config media type {}",
                manifest.config.media_type
            )));
        }
        match manifest.layers.as_slice() {
            [layer] if layer.media_type == LAYER_MEDIA_TYPE => {}
            [layer] => {
                return Err(FormatError::NotAModule(format!(
                    "layer media type {}, expected {LAYER_MEDIA_TYPE}",
                    layer.media_type
                )))
            }
            layers => {
                return Err(FormatError::NotAModule(format!(
                    "{} layers, expected exactly one erofs image",
                    layers.len()
                )))
            }
        }
        for descriptor in [&manifest.config, &manifest.layers[0]] {
            Digest::parse(&descriptor.digest).map_err(|e| FormatError::Malformed {
                what: "module manifest",
                reason: e.to_string(),
            })?;
        }
        Ok(manifest)
    }

    /// The erofs image layer (present once [`ImageManifest::parse_module`] accepted it).
    pub fn image(&self) -> &Descriptor {
        &self.layers[0]
    }

    /// The fs-verity digest annotation, from the manifest or else its layer.
    pub fn fsverity_digest(&self) -> Option<&str> {
        self.annotations
            .get(FSVERITY_ANNOTATION)
            .or_else(|| self.layers.first()?.annotations.get(FSVERITY_ANNOTATION))
            .map(String::as_str)
    }
}

impl ImageIndex {
    /// Parses `bytes` as an image index.
    pub fn parse(bytes: &[u8]) -> Result<ImageIndex, FormatError> {
        serde_json::from_slice(bytes).map_err(|e| FormatError::Malformed {
            what: "image index",
            reason: e.to_string(),
        })
    }

    /// The entry for `architecture` on Linux.
    pub fn for_architecture(&self, architecture: &str) -> Result<&Descriptor, FormatError> {
        self.manifests
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.architecture == architecture && p.os == "linux")
            })
            .ok_or_else(|| FormatError::NoPlatform {
                wanted: architecture.to_owned(),
                available: self
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.architecture.as_str()))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

impl ModuleManifest {
    /// Parses the config blob.
    pub fn parse(bytes: &[u8]) -> Result<ModuleManifest, FormatError> {
        serde_json::from_slice(bytes).map_err(|e| FormatError::Malformed {
            what: "module config",
            reason: e.to_string(),
        })
    }

    /// The health check in the form mountmgr runs it.
    pub fn health_check(&self) -> Option<powernode_types::HealthCheck> {
        self.health_check
            .as_ref()
            .map(|h| powernode_types::HealthCheck {
                command: h.command.clone(),
                timeout_s: h.timeout_s,
            })
    }
}

/// Longest module name, bytes.
pub const MAX_MODULE_NAME: usize = 128;

/// Whether `name` may be a module's name: 1 to [`MAX_MODULE_NAME`] of letters, digits, `-`,
/// `_` and `.`, not starting with `.`. The name becomes a file name on the node and a pubsub
/// key, so the builder, the controller and modulemgr all keep this one rule.
pub fn is_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MODULE_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The OCI architecture name of the machine this runs on (`uname -m` mapped to OCI's names).
pub fn host_architecture() -> &'static str {
    oci_architecture(std::env::consts::ARCH)
}

/// OCI's name for a kernel/Rust architecture name: `x86_64` → `amd64`, `aarch64` → `arm64`.
pub fn oci_architecture(arch: &str) -> &str {
    match arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" | "i686" | "i386" => "386",
        "arm" | "armv7l" => "arm",
        "riscv64" => "riscv64",
        "powerpc64" | "ppc64le" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(layers: &str, artifact: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"{artifact}",
            "config":{{"mediaType":"{CONFIG_MEDIA_TYPE}","digest":"sha256:{h}","size":10}},
            "layers":[{layers}],"annotations":{{"{FSVERITY_ANNOTATION}":"sha256:{h}"}}}}"#,
            h = "a".repeat(64)
        )
    }

    fn layer(media: &str) -> String {
        format!(
            r#"{{"mediaType":"{media}","digest":"sha256:{}","size":4096}}"#,
            "b".repeat(64)
        )
    }

    #[test]
    fn accepts_a_module_and_rejects_other_shapes() {
        let good = manifest(&layer(LAYER_MEDIA_TYPE), ARTIFACT_TYPE);
        let m = ImageManifest::parse_module(good.as_bytes()).unwrap();
        assert_eq!(m.image().size, 4096);
        assert_eq!(
            m.fsverity_digest(),
            Some(&*format!("sha256:{}", "a".repeat(64)))
        );

        let cases = [
            manifest(&layer(LAYER_MEDIA_TYPE), "application/other"),
            manifest(
                &layer("application/vnd.oci.image.layer.v1.tar"),
                ARTIFACT_TYPE,
            ),
            manifest("", ARTIFACT_TYPE),
            manifest(
                &format!("{},{}", layer(LAYER_MEDIA_TYPE), layer(LAYER_MEDIA_TYPE)),
                ARTIFACT_TYPE,
            ),
            good.replace(&"b".repeat(64), "../../etc"),
            "{".to_owned(),
        ];
        for case in cases {
            assert!(
                ImageManifest::parse_module(case.as_bytes()).is_err(),
                "{case}"
            );
        }
    }

    #[test]
    fn index_picks_the_architecture_or_names_what_it_has() {
        let index = ImageIndex {
            schema_version: 2,
            media_type: Some(OCI_INDEX.into()),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            manifests: vec![Descriptor {
                media_type: OCI_MANIFEST.into(),
                digest: format!("sha256:{}", "c".repeat(64)),
                size: 1,
                artifact_type: None,
                platform: Some(Platform {
                    architecture: "arm64".into(),
                    os: "linux".into(),
                }),
                annotations: BTreeMap::new(),
            }],
        };
        assert!(index.for_architecture("arm64").is_ok());
        assert_eq!(
            index.for_architecture("amd64").unwrap_err().to_string(),
            "no manifest for architecture amd64 (the module has: arm64)"
        );
    }
}
