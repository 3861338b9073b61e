//! The identity cascade: every enabled source in order, each bounded by
//! `identity.source_timeout_ms`; the first that yields a valid UUID wins.
//!
//! Bootstrap facts (token, controller URL, CA) are taken per fact from the first source
//! consulted that supplies it — sources before the winner, then the winner — and, for facts
//! still missing after a win, from `identity.cfg` (the operator's local file) when it is
//! enabled and was not already consulted. A source whose values fail validation counts as
//! failed as a whole: none of its values are used.

use std::path::PathBuf;

use agentbase::settings::IdentitySettings;
use agentbase::Root;
use powernode_types::IdentitySource;

use crate::validate::{self, ValueError};
use crate::{cloud, cmdline, dmi, fwcfg, identitycfg};

/// What a source found, before validation. Each source names its keys its own way;
/// [`KeyStyle`] says how, for error messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Raw {
    /// The node's UUID.
    pub instance_uuid: Option<String>,
    /// The enrollment token.
    pub bootstrap_token: Option<String>,
    /// The controller URL, or several comma-separated.
    pub controller_url: Option<String>,
    /// A CA bundle as PEM or base64 of PEM.
    pub ca_pem: Option<String>,
    /// A path, under the root, of a PEM CA bundle.
    pub ca_file: Option<String>,
}

/// How a source spells the keys of [`Raw`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStyle {
    /// `powernode.instance_uuid`, …
    Cmdline,
    /// fw-cfg file names: `instance_uuid`, …
    FwCfg,
    /// `INSTANCE_UUID`, … (identity.cfg and user data)
    Env,
}

impl KeyStyle {
    fn name(self, key: &'static str) -> String {
        match self {
            KeyStyle::Cmdline => format!("powernode.{key}"),
            KeyStyle::FwCfg => key.to_owned(),
            KeyStyle::Env => key.to_ascii_uppercase(),
        }
    }
}

/// The facts found beside a UUID, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// One-time enrollment token.
    pub bootstrap_token: Option<String>,
    /// Controller URLs, in the order to try them; empty when the source had none.
    pub controller_urls: Vec<String>,
    /// PEM CA bundle.
    pub ca_pem: Option<String>,
}

impl Facts {
    /// Fills each fact still missing here from `other`.
    pub fn fill_from(&mut self, other: &Facts) {
        if self.bootstrap_token.is_none() {
            self.bootstrap_token.clone_from(&other.bootstrap_token);
        }
        if self.controller_urls.is_empty() {
            self.controller_urls.clone_from(&other.controller_urls);
        }
        if self.ca_pem.is_none() {
            self.ca_pem.clone_from(&other.ca_pem);
        }
    }

    /// Whether every fact is known.
    pub fn is_complete(&self) -> bool {
        self.bootstrap_token.is_some() && !self.controller_urls.is_empty() && self.ca_pem.is_some()
    }
}

/// What a source found, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// The node's UUID, canonical lower case, if the source had one.
    pub uuid: Option<String>,
    /// Bootstrap facts the source had.
    pub facts: Facts,
}

/// Why a source yielded no identity.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source is not there (no file, no such metadata service): not a misbehaviour.
    #[error("{0}")]
    Absent(String),
    /// A file exists but could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file does not parse.
    #[error("{}: {error}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Where and why.
        error: identitycfg::SyntaxError,
    },
    /// A value failed validation.
    #[error("{place}: {error}")]
    Invalid {
        /// The file, URL or "kernel command line" it came from.
        place: String,
        /// What is wrong.
        error: ValueError,
    },
    /// A metadata service answered badly or not at all.
    #[error("{0}")]
    Http(String),
    /// The source did not finish within the timeout.
    #[error("no answer within {0} ms")]
    Timeout(u128),
    /// A UUID could not be generated or stored.
    #[error("{0}")]
    Generate(String),
}

impl SourceError {
    /// Whether this is worth reporting when another source won (anything but "not there").
    pub fn is_misbehaviour(&self) -> bool {
        !matches!(self, SourceError::Absent(_))
    }
}

/// Validates `raw`. A `ca_file` is read under `root`. `place` names where the values came
/// from, for errors.
pub async fn validate_raw(
    raw: Raw,
    style: KeyStyle,
    root: &Root,
    place: &str,
) -> Result<Found, SourceError> {
    let invalid = |error: ValueError| SourceError::Invalid {
        place: place.to_owned(),
        error,
    };
    let uuid = raw
        .instance_uuid
        .map(|v| validate::uuid(&style.name("instance_uuid"), v.trim()))
        .transpose()
        .map_err(invalid)?;
    let bootstrap_token = raw
        .bootstrap_token
        .map(|v| validate::bootstrap_token(&style.name("bootstrap_token"), v.trim()))
        .transpose()
        .map_err(invalid)?;
    let controller_urls = raw
        .controller_url
        .map(|v| validate::controller_urls(&style.name("controller_url"), &v))
        .transpose()
        .map_err(invalid)?
        .unwrap_or_default();
    let ca_pem = match (raw.ca_pem, raw.ca_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(ValueError::new(
                &style.name("ca_pem"),
                format!(
                    "both {} and {} are set; set one",
                    style.name("ca_pem"),
                    style.name("ca_file")
                ),
            )))
        }
        (Some(pem), None) => {
            Some(validate::ca_pem_or_base64(&style.name("ca_pem"), &pem).map_err(invalid)?)
        }
        (None, Some(file)) => Some(read_ca_file(root, &style.name("ca_file"), file.trim()).await?),
        (None, None) => None,
    };
    Ok(Found {
        uuid,
        facts: Facts {
            bootstrap_token,
            controller_urls,
            ca_pem,
        },
    })
}

/// Reads a PEM file named by a source; the path is taken under the root and may not climb out
/// of it.
async fn read_ca_file(root: &Root, field: &str, file: &str) -> Result<String, SourceError> {
    let bad = |reason: &str| SourceError::Invalid {
        place: "CA file".to_owned(),
        error: ValueError::new(field, format!("{}: {reason}", validate::excerpt(file))),
    };
    if file.is_empty() {
        return Err(bad("empty"));
    }
    let rel = std::path::Path::new(file);
    if rel
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad("must not contain `..`"));
    }
    let path = root.path(rel);
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|source| SourceError::Io {
            path: path.clone(),
            source,
        })?;
    validate::ca_pem(field, &bytes).map_err(|error| SourceError::Invalid {
        place: path.display().to_string(),
        error,
    })
}

/// One source tried and why it gave no identity.
#[derive(Debug)]
pub struct Attempt {
    /// The source.
    pub source: IdentitySource,
    /// Why it yielded no UUID.
    pub error: SourceError,
}

/// The cascade's result.
#[derive(Debug)]
pub enum Outcome {
    /// A source yielded a UUID (or one was generated).
    Resolved {
        /// The UUID, canonical lower case.
        uuid: String,
        /// Which source supplied it.
        source: IdentitySource,
        /// Bootstrap facts found.
        facts: Facts,
        /// The sources tried before the winner, and why each failed.
        attempts: Vec<Attempt>,
    },
    /// No source yielded a UUID and none could be generated.
    Unresolvable {
        /// Every source tried, and why each failed.
        attempts: Vec<Attempt>,
    },
}

/// `source: reason; source: reason` for the attempts `keep` accepts.
pub fn describe(attempts: &[Attempt], keep: impl Fn(&SourceError) -> bool) -> Option<String> {
    let parts: Vec<String> = attempts
        .iter()
        .filter(|a| keep(&a.error))
        .map(|a| format!("{:?}: {}", a.source, a.error))
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// The cascade over the sources in the settings, reading under `root`.
#[derive(Debug, Clone)]
pub struct Cascade {
    root: Root,
    settings: IdentitySettings,
    http: cloud::Http,
}

impl Cascade {
    /// A cascade for `settings`, reading under `root`.
    pub fn new(root: Root, settings: IdentitySettings) -> anyhow::Result<Cascade> {
        let http = cloud::Http::new(settings.source_timeout())?;
        Ok(Cascade {
            root,
            settings,
            http,
        })
    }

    /// One source, bounded by the source timeout.
    pub async fn try_source(&self, source: IdentitySource) -> Result<Found, SourceError> {
        let timeout = self.settings.source_timeout();
        match tokio::time::timeout(timeout, self.fetch(source)).await {
            Ok(result) => result,
            Err(_) => Err(SourceError::Timeout(timeout.as_millis())),
        }
    }

    async fn fetch(&self, source: IdentitySource) -> Result<Found, SourceError> {
        let s = &self.settings;
        match source {
            IdentitySource::KernelCmdline => cmdline::fetch(&self.root).await,
            IdentitySource::FwCfg => fwcfg::fetch(&self.root).await,
            IdentitySource::Aws => cloud::aws(&self.http, &s.aws_url, &self.root).await,
            IdentitySource::Gcp => cloud::gcp(&self.http, &s.gcp_url, &self.root).await,
            IdentitySource::Azure => cloud::azure(&self.http, &s.azure_url, &self.root).await,
            IdentitySource::DigitalOcean => {
                cloud::digitalocean(&self.http, &s.digitalocean_url, &self.root).await
            }
            IdentitySource::Hetzner => cloud::hetzner(&self.http, &s.hetzner_url, &self.root).await,
            IdentitySource::Dmi => dmi::fetch(&self.root).await,
            IdentitySource::IdentityCfg => {
                let raw = identitycfg::read(&self.root).await?;
                let place = self.root.path(identitycfg::PATH).display().to_string();
                validate_raw(raw, KeyStyle::Env, &self.root, &place).await
            }
            IdentitySource::Generated => Err(SourceError::Absent(
                "not a source to fetch (see allow_generated_uuid)".to_owned(),
            )),
        }
    }

    /// Runs the whole cascade once.
    pub async fn run(&self) -> Outcome {
        let mut attempts = Vec::new();
        let mut facts = Facts::default();
        for &source in &self.settings.sources {
            match self.try_source(source).await {
                Ok(Found {
                    uuid: Some(uuid),
                    facts: found,
                }) => {
                    facts.fill_from(&found);
                    self.fill_from_identity_cfg(source, &attempts, &mut facts)
                        .await;
                    tracing::info!(?source, %uuid, "identity resolved");
                    return Outcome::Resolved {
                        uuid,
                        source,
                        facts,
                        attempts,
                    };
                }
                Ok(Found {
                    uuid: None,
                    facts: found,
                }) => {
                    facts.fill_from(&found);
                    attempts.push(Attempt {
                        source,
                        error: SourceError::Absent("no instance UUID".to_owned()),
                    });
                }
                Err(error) => {
                    tracing::debug!(?source, %error, "identity source failed");
                    attempts.push(Attempt { source, error });
                }
            }
        }
        if !self.settings.allow_generated_uuid {
            return Outcome::Unresolvable { attempts };
        }
        match self.generate() {
            Ok(uuid) => Outcome::Resolved {
                uuid,
                source: IdentitySource::Generated,
                facts,
                attempts,
            },
            Err(error) => {
                attempts.push(Attempt {
                    source: IdentitySource::Generated,
                    error,
                });
                Outcome::Unresolvable { attempts }
            }
        }
    }

    /// After `winner`, fills missing facts from identity.cfg if it was not consulted.
    async fn fill_from_identity_cfg(
        &self,
        winner: IdentitySource,
        attempts: &[Attempt],
        facts: &mut Facts,
    ) {
        let consulted = winner == IdentitySource::IdentityCfg
            || attempts
                .iter()
                .any(|a| a.source == IdentitySource::IdentityCfg);
        if facts.is_complete()
            || consulted
            || !self.settings.sources.contains(&IdentitySource::IdentityCfg)
        {
            return;
        }
        match self.try_source(IdentitySource::IdentityCfg).await {
            Ok(found) => facts.fill_from(&found.facts),
            Err(SourceError::Absent(_)) => {}
            Err(error) => {
                tracing::warn!(%error, "identity.cfg not used for bootstrap facts");
            }
        }
    }

    /// Generates a UUID and stores it in identity.cfg, so the next start finds it there.
    fn generate(&self) -> Result<String, SourceError> {
        let uuid = validate::random_uuid()
            .map_err(|e| SourceError::Generate(format!("no random source: {e}")))?;
        let path = identitycfg::store_uuid(&self.root, &uuid)
            .map_err(|e| SourceError::Generate(format!("storing the generated UUID: {e}")))?;
        tracing::info!(%uuid, path = %path.display(), "generated and stored a node UUID");
        Ok(uuid)
    }
}
