//! Cloud metadata services: AWS (IMDSv2), Google Cloud, Azure, DigitalOcean, Hetzner.
//!
//! Each is asked for its instance id and its user data. An instance id that is a UUID (Azure's
//! `vmId`) is the node's UUID; any other (AWS `i-…`, numeric ids) becomes the name-based UUID
//! `v5(`[`NAMESPACE`]`, "<cloud>:<id>")`, stable for the life of the instance. User data may
//! carry `BOOTSTRAP_TOKEN`, `CONTROLLER_URL` (one URL, or several comma-separated), `CA_PEM`
//! (base64 of PEM) or `CA_FILE` lines in identity.cfg's `KEY=VALUE` format; other lines are
//! ignored, since user data is shared with cloud-init.
//!
//! "Not this cloud" — the connection refused, or 404 for the instance id — is reported as
//! absent; any other failure (401, 403, 5xx, a bad body) as a misbehaving source. Requests go
//! straight to the configured base URL: no proxy from the environment, no redirects.

use std::time::Duration;

use agentbase::Root;
use reqwest::{Method, StatusCode};

use crate::cascade::{validate_raw, Found, KeyStyle, SourceError};
use crate::identitycfg;
use crate::validate;

/// The namespace of the name-based UUIDs derived from cloud instance ids.
pub const NAMESPACE: [u8; 16] = [
    0x2d, 0x8b, 0xad, 0x71, 0x95, 0x19, 0x4c, 0x4a, 0x87, 0xde, 0x42, 0x43, 0xce, 0x9a, 0x42, 0xcd,
];

/// Largest response body read, in bytes.
const MAX_BODY: usize = 256 * 1024;
/// Longest instance id accepted.
const MAX_ID_LEN: usize = 128;

/// The HTTP client every cloud source shares.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
}

/// A successful answer, or "there is no such thing" (404).
enum Reply {
    Body(String),
    NotFound,
}

impl Http {
    /// A client whose every request (connect included) is bounded by `timeout`.
    pub fn new(timeout: Duration) -> anyhow::Result<Http> {
        // Metadata services are plain HTTP, but the binary's reqwest also carries rustls (the
        // registry client needs it) and refuses to build without a process crypto provider:
        // ring, as everywhere (an error only means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Http { client })
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, SourceError> {
        let mut request = self.client.request(method.clone(), url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.map_err(|e| {
            let e = e.without_url();
            let why = chain(&e);
            if e.is_connect() {
                SourceError::Absent(format!("{method} {url}: no metadata service ({why})"))
            } else {
                SourceError::Http(format!("{method} {url}: {why}"))
            }
        })?;
        let status = response.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(Reply::NotFound);
        }
        if !status.is_success() {
            return Err(SourceError::Http(format!("{method} {url}: HTTP {status}")));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY as u64)
        {
            return Err(SourceError::Http(format!(
                "{method} {url}: body larger than {MAX_BODY} bytes"
            )));
        }
        let body = response.bytes().await.map_err(|e| {
            let e = e.without_url();
            SourceError::Http(format!("{method} {url}: reading body: {}", chain(&e)))
        })?;
        if body.len() > MAX_BODY {
            return Err(SourceError::Http(format!(
                "{method} {url}: body larger than {MAX_BODY} bytes"
            )));
        }
        let text = String::from_utf8(body.to_vec())
            .map_err(|_| SourceError::Http(format!("{method} {url}: body is not UTF-8")))?;
        Ok(Reply::Body(text))
    }

    /// GET of something that must exist: 404 means "not this cloud".
    async fn get_required(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<String, SourceError> {
        match self.call(Method::GET, url, headers).await? {
            Reply::Body(body) => Ok(body),
            Reply::NotFound => Err(SourceError::Absent(format!("GET {url}: HTTP 404"))),
        }
    }

    /// GET of something optional: 404 is `None`.
    async fn get_optional(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Option<String>, SourceError> {
        match self.call(Method::GET, url, headers).await? {
            Reply::Body(body) => Ok(Some(body)),
            Reply::NotFound => Ok(None),
        }
    }
}

/// An error and its causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// `base` without a trailing `/`, joined to `path` (which starts with `/`).
fn join(base: &str, path: &str) -> String {
    format!("{}{path}", base.trim_end_matches('/'))
}

/// The node UUID for `cloud`'s instance id `id`.
fn uuid_for(cloud: &str, id: &str, url: &str) -> Result<String, SourceError> {
    let id = id.trim();
    let invalid = |reason: &str| SourceError::Invalid {
        place: url.to_owned(),
        error: validate::ValueError::new("instance id", reason),
    };
    if id.is_empty() {
        return Err(invalid("empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(&format!("longer than {MAX_ID_LEN} characters")));
    }
    if !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(&format!(
            "{} has characters outside printable ASCII",
            validate::excerpt(id)
        )));
    }
    if let Ok(uuid) = validate::uuid("instance id", id) {
        return Ok(uuid);
    }
    Ok(validate::name_uuid(&NAMESPACE, &format!("{cloud}:{id}")))
}

/// Validates the user data's identity lines and puts them beside `uuid`.
async fn with_user_data(
    uuid: String,
    user_data: Option<String>,
    root: &Root,
    url: &str,
) -> Result<Found, SourceError> {
    let raw = user_data
        .map(|text| identitycfg::to_raw(&identitycfg::parse_lenient(&text), false))
        .unwrap_or_default();
    let found = validate_raw(raw, KeyStyle::Env, root, url).await?;
    Ok(Found {
        uuid: Some(uuid),
        facts: found.facts,
    })
}

/// AWS IMDSv2: a session token from `PUT /latest/api/token`, then the instance id and user
/// data with it.
pub async fn aws(http: &Http, base: &str, root: &Root) -> Result<Found, SourceError> {
    let token_url = join(base, "/latest/api/token");
    let token = match http
        .call(
            Method::PUT,
            &token_url,
            &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
        )
        .await?
    {
        Reply::Body(token) => token.trim().to_owned(),
        Reply::NotFound => return Err(SourceError::Absent(format!("PUT {token_url}: HTTP 404"))),
    };
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(SourceError::Http(format!(
            "PUT {token_url}: the session token is empty or not printable"
        )));
    }
    let auth = [("X-aws-ec2-metadata-token", token.as_str())];
    let id_url = join(base, "/latest/meta-data/instance-id");
    let id = http.get_required(&id_url, &auth).await?;
    let uuid = uuid_for("aws", &id, &id_url)?;
    let data_url = join(base, "/latest/user-data");
    let user_data = http.get_optional(&data_url, &auth).await?;
    with_user_data(uuid, user_data, root, &data_url).await
}

/// Google Cloud: `Metadata-Flavor: Google` on every request.
pub async fn gcp(http: &Http, base: &str, root: &Root) -> Result<Found, SourceError> {
    let flavor = [("Metadata-Flavor", "Google")];
    let id_url = join(base, "/computeMetadata/v1/instance/id");
    let id = http.get_required(&id_url, &flavor).await?;
    let uuid = uuid_for("gcp", &id, &id_url)?;
    let data_url = join(base, "/computeMetadata/v1/instance/attributes/user-data");
    let user_data = http.get_optional(&data_url, &flavor).await?;
    with_user_data(uuid, user_data, root, &data_url).await
}

/// Azure IMDS: `Metadata: true`; the instance document's `compute.vmId`; user data base64.
pub async fn azure(http: &Http, base: &str, root: &Root) -> Result<Found, SourceError> {
    let header = [("Metadata", "true")];
    let doc_url = join(base, "/metadata/instance?api-version=2021-02-01");
    let doc = http.get_required(&doc_url, &header).await?;
    let doc: serde_json::Value = serde_json::from_str(&doc)
        .map_err(|e| SourceError::Http(format!("GET {doc_url}: not JSON: {e}")))?;
    let Some(vm_id) = doc.pointer("/compute/vmId").and_then(|v| v.as_str()) else {
        return Err(SourceError::Http(format!(
            "GET {doc_url}: no string compute.vmId in the instance document"
        )));
    };
    let uuid = uuid_for("azure", vm_id, &doc_url)?;
    let data_url = join(
        base,
        "/metadata/instance/compute/userData?api-version=2021-01-01&format=text",
    );
    let user_data = match http.get_optional(&data_url, &header).await? {
        Some(encoded) if !encoded.trim().is_empty() => {
            let bytes =
                validate::decode_base64(&encoded).map_err(|reason| SourceError::Invalid {
                    place: data_url.clone(),
                    error: validate::ValueError::new("userData", format!("not base64: {reason}")),
                })?;
            Some(String::from_utf8(bytes).map_err(|_| SourceError::Invalid {
                place: data_url.clone(),
                error: validate::ValueError::new("userData", "decodes to non-UTF-8 bytes"),
            })?)
        }
        _ => None,
    };
    with_user_data(uuid, user_data, root, &data_url).await
}

/// DigitalOcean: `/metadata/v1/id` and `/metadata/v1/user-data`.
pub async fn digitalocean(http: &Http, base: &str, root: &Root) -> Result<Found, SourceError> {
    let id_url = join(base, "/metadata/v1/id");
    let id = http.get_required(&id_url, &[]).await?;
    let uuid = uuid_for("digitalocean", &id, &id_url)?;
    let data_url = join(base, "/metadata/v1/user-data");
    let user_data = http.get_optional(&data_url, &[]).await?;
    with_user_data(uuid, user_data, root, &data_url).await
}

/// Hetzner Cloud: `/hetzner/v1/metadata/instance-id` and `/hetzner/v1/userdata`.
pub async fn hetzner(http: &Http, base: &str, root: &Root) -> Result<Found, SourceError> {
    let id_url = join(base, "/hetzner/v1/metadata/instance-id");
    let id = http.get_required(&id_url, &[]).await?;
    let uuid = uuid_for("hetzner", &id, &id_url)?;
    let data_url = join(base, "/hetzner/v1/userdata");
    let user_data = http.get_optional(&data_url, &[]).await?;
    with_user_data(uuid, user_data, root, &data_url).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids() {
        let url = "http://x/id";
        let azure = uuid_for("azure", "6F1E8C3A-92B4-4D7E-A1C2-0B3D4E5F6A7B\n", url).unwrap();
        assert_eq!(
            azure, "6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b",
            "a UUID id is used as is"
        );
        let aws = uuid_for("aws", "i-0123456789abcdef0", url).unwrap();
        assert_eq!(
            aws,
            uuid_for("aws", "i-0123456789abcdef0", url).unwrap(),
            "stable"
        );
        assert_ne!(
            aws,
            uuid_for("gcp", "i-0123456789abcdef0", url).unwrap(),
            "per cloud"
        );
        assert_eq!(&aws[14..15], "5");
        for bad in [
            "",
            "  ",
            "has space",
            "tab\tid",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let err = uuid_for("aws", bad, url).unwrap_err();
            assert!(matches!(err, SourceError::Invalid { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn join_trims_slashes() {
        assert_eq!(join("http://h/", "/a"), "http://h/a");
        assert_eq!(join("http://h:80", "/a"), "http://h:80/a");
    }
}
