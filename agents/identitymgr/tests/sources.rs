//! Each source of the cascade against real files in a temp root and loopback metadata servers,
//! including malformed input; then the cascade as a whole.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use agentbase::settings::IdentitySettings;
use agentbase::Root;
use common::*;
use identitymgr::cascade::{Cascade, Found, Outcome, SourceError};
use powernode_types::IdentitySource;

const PEM_B64: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJzekNDQVZtZ0F3SUJBZ0lVUQotLS0tLUVORCBDRVJUSUZJQ0FURS0tLS0tCg==";

async fn fetch(
    root: &Path,
    settings: IdentitySettings,
    source: IdentitySource,
) -> Result<Found, SourceError> {
    Cascade::new(Root::new(root), settings)
        .unwrap()
        .try_source(source)
        .await
}

/// What a table case expects.
#[derive(Debug)]
enum Want {
    /// This UUID.
    Uuid(&'static str),
    /// No UUID but these facts (token).
    FactsOnly(&'static str),
    /// Absent, with this text.
    Absent(&'static str),
    /// A misbehaviour, with this text.
    Error(&'static str),
    /// Read fine, held nothing.
    Nothing,
}

#[track_caller]
fn check(name: &str, got: Result<Found, SourceError>, want: &Want) {
    match (got, want) {
        (Ok(found), Want::Nothing) => assert_eq!(found, Found::default(), "{name}"),
        (Ok(found), Want::Uuid(uuid)) => assert_eq!(found.uuid.as_deref(), Some(*uuid), "{name}"),
        (Ok(found), Want::FactsOnly(token)) => {
            assert_eq!(found.uuid, None, "{name}");
            assert_eq!(
                found.facts.bootstrap_token.as_deref(),
                Some(*token),
                "{name}"
            );
        }
        (Err(e @ SourceError::Absent(_)), Want::Absent(text)) => {
            assert!(e.to_string().contains(text), "{name}: {e}")
        }
        (Err(e), Want::Error(text)) if e.is_misbehaviour() => {
            assert!(e.to_string().contains(text), "{name}: {e}")
        }
        (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
    }
}

#[tokio::test]
async fn kernel_cmdline_table() {
    let cases: &[(&str, Option<&str>, Want)] = &[
        ("no file", None, Want::Absent("no ")),
        (
            "empty file",
            Some(""),
            Want::Absent("no powernode.* identity parameters"),
        ),
        (
            "unrelated",
            Some("root=/dev/vda ro quiet\n"),
            Want::Absent("no powernode.*"),
        ),
        (
            "uuid",
            Some("ro powernode.instance_uuid=6F1E8C3A-92B4-4D7E-A1C2-0B3D4E5F6A7B quiet\n"),
            Want::Uuid(UUID),
        ),
        (
            "facts only",
            Some("powernode.bootstrap_token=tok-12345678\n"),
            Want::FactsOnly("tok-12345678"),
        ),
        (
            "bad uuid",
            Some("powernode.instance_uuid=1234\n"),
            Want::Error("kernel command line: invalid powernode.instance_uuid: \"1234\""),
        ),
        (
            "nil uuid",
            Some("powernode.instance_uuid=00000000-0000-0000-0000-000000000000"),
            Want::Error("nil UUID"),
        ),
        (
            "bad url",
            Some(&*Box::leak(
                format!("powernode.instance_uuid={UUID} powernode.controller_url=ftp://x")
                    .into_boxed_str(),
            )),
            Want::Error("invalid powernode.controller_url"),
        ),
        (
            "bad token",
            Some(&*Box::leak(
                format!("powernode.instance_uuid={UUID} powernode.bootstrap_token=a,b,c,d,e")
                    .into_boxed_str(),
            )),
            Want::Error("invalid powernode.bootstrap_token"),
        ),
        (
            "bad base64 ca",
            Some(&*Box::leak(
                format!("powernode.instance_uuid={UUID} powernode.ca_pem=%%%").into_boxed_str(),
            )),
            Want::Error("neither PEM nor base64"),
        ),
        (
            "ca file missing",
            Some(&*Box::leak(
                format!("powernode.instance_uuid={UUID} powernode.ca_file=/etc/nope.pem")
                    .into_boxed_str(),
            )),
            Want::Error("nope.pem"),
        ),
        (
            "ca file climbing out",
            Some(&*Box::leak(
                format!("powernode.instance_uuid={UUID} powernode.ca_file=../../etc/ssl/ca.pem")
                    .into_boxed_str(),
            )),
            Want::Error("must not contain `..`"),
        ),
        (
            "garbage glued to a parameter is not that parameter",
            Some("\u{0}\u{1}\u{ff}powernode.instance_uuid=\u{7f}"),
            Want::Absent("no powernode.*"),
        ),
        (
            "garbage value",
            Some("\u{0}\u{1} powernode.instance_uuid=\u{7f}\u{0}\u{ff}"),
            Want::Error("invalid powernode.instance_uuid"),
        ),
    ];
    for (name, text, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = text {
            write(dir.path(), "proc/cmdline", text.as_bytes());
        }
        let settings = settings_with_clouds(&closed_url().await);
        check(
            name,
            fetch(dir.path(), settings, IdentitySource::KernelCmdline).await,
            want,
        );
    }
}

#[tokio::test]
async fn kernel_cmdline_ca_forms() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "etc/pki/ca.pem", PEM.as_bytes());
    write(
        dir.path(),
        "proc/cmdline",
        format!("powernode.instance_uuid={UUID} powernode.ca_file=/etc/pki/ca.pem\n").as_bytes(),
    );
    let found = fetch(
        dir.path(),
        IdentitySettings::default(),
        IdentitySource::KernelCmdline,
    )
    .await
    .unwrap();
    assert_eq!(found.facts.ca_pem.as_deref(), Some(PEM));

    write(
        dir.path(),
        "proc/cmdline",
        format!(
            "powernode.instance_uuid={UUID} powernode.ca_pem={PEM_B64} \
             powernode.controller_url=https://ctl.example:8443,https://ctl-2.example:8443 \
             powernode.bootstrap_token=tok-12345678\n"
        )
        .as_bytes(),
    );
    let found = fetch(
        dir.path(),
        IdentitySettings::default(),
        IdentitySource::KernelCmdline,
    )
    .await
    .unwrap();
    assert_eq!(found.uuid.as_deref(), Some(UUID));
    assert_eq!(found.facts.ca_pem.as_deref(), Some(PEM));
    assert_eq!(
        found.facts.controller_urls,
        ["https://ctl.example:8443", "https://ctl-2.example:8443"]
    );
    assert_eq!(found.facts.bootstrap_token.as_deref(), Some("tok-12345678"));
}

#[tokio::test]
async fn fwcfg_table() {
    const DIR: &str = "sys/firmware/qemu_fw_cfg/by_name/opt/com.powernode";
    /// fw-cfg entry name (below our directory) → contents.
    type Files = &'static [(&'static str, &'static [u8])];
    const PEM_BYTES: &[u8] = PEM.as_bytes();
    let cases: &[(&str, Files, Want)] = &[
        ("no directory", &[], Want::Absent("no ")),
        (
            "empty directory",
            &[("other/raw", b"x")],
            Want::Absent("no identity entries"),
        ),
        (
            "uuid with NUL and newline",
            &[(
                "instance_uuid/raw",
                b"6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b\n\0",
            )],
            Want::Uuid(UUID),
        ),
        (
            "empty entry",
            &[("instance_uuid/raw", b"")],
            Want::Error("invalid instance_uuid: empty"),
        ),
        (
            "garbage",
            &[("instance_uuid/raw", b"\xff\xfe\x00garbage")],
            Want::Error("not UTF-8"),
        ),
        (
            "bad uuid",
            &[("instance_uuid/raw", b"not-a-uuid")],
            Want::Error("invalid instance_uuid"),
        ),
        (
            "raw PEM and token",
            &[
                ("instance_uuid/raw", b"6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b"),
                ("ca_pem/raw", PEM_BYTES),
                ("bootstrap_token/raw", b"fwcfg-token-1"),
            ],
            Want::Uuid(UUID),
        ),
        (
            "bad PEM",
            &[
                ("instance_uuid/raw", b"6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b"),
                ("ca_pem/raw", b"-----BEGIN CERTIFICATE-----\n"),
            ],
            Want::Error("invalid ca_pem"),
        ),
    ];
    for (name, files, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        if !files.is_empty() {
            for (rel, contents) in *files {
                write(dir.path(), &format!("{DIR}/{rel}"), contents);
            }
        }
        check(
            name,
            fetch(
                dir.path(),
                IdentitySettings::default(),
                IdentitySource::FwCfg,
            )
            .await,
            want,
        );
    }
}

#[tokio::test]
async fn dmi_table() {
    let cases: &[(&str, Option<&[u8]>, Want)] = &[
        ("no file", None, Want::Absent("no ")),
        (
            "uuid",
            Some(b"6F1E8C3A-92B4-4D7E-A1C2-0B3D4E5F6A7B\n"),
            Want::Uuid(UUID),
        ),
        (
            "empty",
            Some(b""),
            Want::Error("invalid product_uuid: empty"),
        ),
        (
            "all zero",
            Some(b"00000000-0000-0000-0000-000000000000\n"),
            Want::Error("nil UUID"),
        ),
        (
            "all FF",
            Some(b"FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF\n"),
            Want::Error("all-ones"),
        ),
        (
            "not a uuid",
            Some(b"Not Settable\n"),
            Want::Error("invalid product_uuid"),
        ),
        (
            "binary",
            Some(b"\x00\x01\x02"),
            Want::Error("invalid product_uuid"),
        ),
    ];
    for (name, contents, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        if let Some(contents) = contents {
            write(dir.path(), "sys/class/dmi/id/product_uuid", contents);
        }
        check(
            name,
            fetch(dir.path(), IdentitySettings::default(), IdentitySource::Dmi).await,
            want,
        );
    }
}

#[tokio::test]
async fn identity_cfg_table() {
    let cases: &[(&str, Option<&str>, Want)] = &[
        ("no file", None, Want::Absent("no ")),
        ("empty", Some(""), Want::Nothing),
        ("plain", Some("INSTANCE_UUID=6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b\n"), Want::Uuid(UUID)),
        (
            "quotes comments export",
            Some("# node identity\n\nexport INSTANCE_UUID=\"6F1E8C3A-92B4-4D7E-A1C2-0B3D4E5F6A7B\"  # from the installer\nBOOTSTRAP_TOKEN='tok-12345678'\nOTHER_TOOL_KEY=ignored\n"),
            Want::Uuid(UUID),
        ),
        ("facts only", Some("export BOOTSTRAP_TOKEN=tok-12345678\n"), Want::FactsOnly("tok-12345678")),
        ("syntax error", Some("INSTANCE_UUID=6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b\nthis is garbage\n"), Want::Error("line 2: expected KEY=VALUE")),
        ("unterminated", Some("INSTANCE_UUID='6f1e8c3a\n"), Want::Error("unterminated single quote")),
        ("bad uuid", Some("INSTANCE_UUID=abc\n"), Want::Error("invalid INSTANCE_UUID")),
        ("both CA forms", Some(&*Box::leak(format!("CA_PEM={PEM_B64}\nCA_FILE=/x.pem\n").into_boxed_str())), Want::Error("both CA_PEM and CA_FILE")),
        ("not utf-8", Some("INSTANCE_UUID=\u{fffd}"), Want::Error("invalid INSTANCE_UUID")),
    ];
    for (name, text, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        if let Some(text) = text {
            write(dir.path(), "etc/powernode/identity.cfg", text.as_bytes());
        }
        let got = fetch(
            dir.path(),
            IdentitySettings::default(),
            IdentitySource::IdentityCfg,
        )
        .await;
        check(name, got, want);
    }
}

#[tokio::test]
async fn aws_imdsv2() {
    let server = Server::start(aws(
        "i-0123456789abcdef0",
        Some("#!/bin/sh\necho hi\nBOOTSTRAP_TOKEN=aws-token-123\nCONTROLLER_URL=https://ctl.aws\nINSTANCE_UUID=ignored\n"),
        AWS_TOKEN,
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let found = fetch(
        dir.path(),
        settings_with_clouds(&server.url),
        IdentitySource::Aws,
    )
    .await
    .unwrap();
    let uuid = found.uuid.unwrap();
    assert_eq!(&uuid[14..15], "5", "a derived (v5) UUID: {uuid}");
    assert_eq!(
        found.facts.bootstrap_token.as_deref(),
        Some("aws-token-123")
    );
    assert_eq!(found.facts.controller_urls, ["https://ctl.aws"]);
    let seen = server.seen();
    assert_eq!(seen[0].method, "PUT");
    assert!(seen[0]
        .header("X-aws-ec2-metadata-token-ttl-seconds")
        .is_some());
    assert!(seen[1..]
        .iter()
        .all(|r| r.header("X-aws-ec2-metadata-token") == Some(AWS_TOKEN)));

    // The same instance always gets the same UUID.
    let again = fetch(
        dir.path(),
        settings_with_clouds(&server.url),
        IdentitySource::Aws,
    )
    .await
    .unwrap();
    assert_eq!(again.uuid.as_deref(), Some(uuid.as_str()));

    // A GET without the session token the service expects is refused with 401.
    let strict = Server::start(aws("i-1", None, "a-token-we-never-got")).await;
    let err = fetch(
        dir.path(),
        settings_with_clouds(&strict.url),
        IdentitySource::Aws,
    )
    .await
    .unwrap_err();
    assert!(err.is_misbehaviour(), "{err}");
    assert!(err.to_string().contains("HTTP 401 Unauthorized"), "{err}");

    // No user data: resolved without facts.
    let bare = Server::start(aws("i-2", None, AWS_TOKEN)).await;
    let found = fetch(
        dir.path(),
        settings_with_clouds(&bare.url),
        IdentitySource::Aws,
    )
    .await
    .unwrap();
    assert!(found.uuid.is_some());
    assert_eq!(found.facts, Default::default());

    // Bad user data values fail the source.
    let bad = Server::start(aws("i-3", Some("CONTROLLER_URL=gopher://x\n"), AWS_TOKEN)).await;
    let err = fetch(
        dir.path(),
        settings_with_clouds(&bad.url),
        IdentitySource::Aws,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("invalid CONTROLLER_URL"), "{err}");
}

#[tokio::test]
async fn gcp_metadata_flavor() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(gcp(
        "4512345678901234567",
        Some("BOOTSTRAP_TOKEN=gcp-token-1\n"),
        "Google",
    ))
    .await;
    let found = fetch(
        dir.path(),
        settings_with_clouds(&server.url),
        IdentitySource::Gcp,
    )
    .await
    .unwrap();
    assert!(found.uuid.is_some());
    assert_eq!(found.facts.bootstrap_token.as_deref(), Some("gcp-token-1"));
    assert!(server
        .seen()
        .iter()
        .all(|r| r.header("Metadata-Flavor") == Some("Google")));

    // A service that wants another flavour answers 403.
    let other = Server::start(gcp("1", None, "Other")).await;
    let err = fetch(
        dir.path(),
        settings_with_clouds(&other.url),
        IdentitySource::Gcp,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("HTTP 403 Forbidden"), "{err}");

    // An empty id.
    let empty = Server::start(gcp("  ", None, "Google")).await;
    let err = fetch(
        dir.path(),
        settings_with_clouds(&empty.url),
        IdentitySource::Gcp,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("invalid instance id: empty"),
        "{err}"
    );
}

#[tokio::test]
async fn azure_imds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(azure(
        r#"{"compute":{"vmId":"6F1E8C3A-92B4-4D7E-A1C2-0B3D4E5F6A7B","name":"vm1"}}"#,
        Some("Qk9PVFNUUkFQX1RPS0VOPWF6dXJlLXRva2VuLTEyMwpDT05UUk9MTEVSX1VSTD1odHRwczovL2F6dXJlLmN0bAo="),
    ))
    .await;
    let found = fetch(
        dir.path(),
        settings_with_clouds(&server.url),
        IdentitySource::Azure,
    )
    .await
    .unwrap();
    assert_eq!(
        found.uuid.as_deref(),
        Some(UUID),
        "vmId is a UUID and is used as is"
    );
    assert_eq!(
        found.facts.bootstrap_token.as_deref(),
        Some("azure-token-123")
    );
    assert_eq!(found.facts.controller_urls, ["https://azure.ctl"]);

    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        (
            "invalid base64 user data",
            r#"{"compute":{"vmId":"6f1e8c3a-92b4-4d7e-a1c2-0b3d4e5f6a7b"}}"#,
            Some("@@not base64@@"),
            "invalid userData: not base64",
        ),
        (
            "no vmId",
            r#"{"compute":{}}"#,
            None,
            "no string compute.vmId",
        ),
        ("not JSON", "<html>", None, "not JSON"),
    ];
    for (name, doc, user_data, want) in cases {
        let server = Server::start(azure(doc, *user_data)).await;
        let err = fetch(
            dir.path(),
            settings_with_clouds(&server.url),
            IdentitySource::Azure,
        )
        .await
        .unwrap_err();
        assert!(
            err.is_misbehaviour() && err.to_string().contains(want),
            "{name}: {err}"
        );
    }
}

#[tokio::test]
async fn digitalocean_and_hetzner() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(plain(&[
        ("/metadata/v1/id", "123456789"),
        (
            "/metadata/v1/user-data",
            "CONTROLLER_URL='https://do.ctl, https://do-2.ctl'\n",
        ),
        ("/hetzner/v1/metadata/instance-id", "42"),
    ]))
    .await;
    let settings = settings_with_clouds(&server.url);
    let d = fetch(dir.path(), settings.clone(), IdentitySource::DigitalOcean)
        .await
        .unwrap();
    assert_eq!(
        d.facts.controller_urls,
        ["https://do.ctl", "https://do-2.ctl"]
    );
    let h = fetch(dir.path(), settings, IdentitySource::Hetzner)
        .await
        .unwrap();
    assert!(h.uuid.is_some());
    assert_ne!(d.uuid, h.uuid);
    assert_eq!(h.facts, Default::default(), "no user data: 404 is fine");

    // Nothing there: absent, not a misbehaviour.
    let none = Server::start(plain(&[])).await;
    let err = fetch(
        dir.path(),
        settings_with_clouds(&none.url),
        IdentitySource::Hetzner,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::Absent(_)), "{err}");
    let err = fetch(
        dir.path(),
        settings_with_clouds(&closed_url().await),
        IdentitySource::DigitalOcean,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::Absent(_)), "{err}");
    assert!(err.to_string().contains("no metadata service"), "{err}");
}

#[tokio::test]
async fn a_server_that_never_answers_is_bounded_by_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(|_| None).await;
    for source in [
        IdentitySource::Aws,
        IdentitySource::Gcp,
        IdentitySource::Azure,
        IdentitySource::DigitalOcean,
        IdentitySource::Hetzner,
    ] {
        let mut settings = settings_with_clouds(&server.url);
        settings.source_timeout_ms = 200;
        let started = Instant::now();
        let err = fetch(dir.path(), settings, source).await.unwrap_err();
        let took = started.elapsed();
        assert!(err.is_misbehaviour(), "{source:?}: {err}");
        assert!(
            took < Duration::from_millis(1500),
            "{source:?} took {took:?}"
        );
        assert!(
            took >= Duration::from_millis(150),
            "{source:?} took {took:?}"
        );
    }
}

#[tokio::test]
async fn cascade_order_and_facts() {
    let dir = tempfile::tempdir().unwrap();
    let closed = closed_url().await;
    // A bad UUID on the command line, but a controller URL there too; DMI has a UUID;
    // identity.cfg supplies the token.
    write(dir.path(), "proc/cmdline", b"powernode.instance_uuid=zzz\n");
    write(
        dir.path(),
        "sys/class/dmi/id/product_uuid",
        b"6F1E8C3A-92B4-4D7E-A1C2-0B3D4E5F6A7B\n",
    );
    write(
        dir.path(),
        "etc/powernode/identity.cfg",
        b"BOOTSTRAP_TOKEN=cfg-token-1\nINSTANCE_UUID=11111111-2222-4333-8444-555555555555\n",
    );
    let cascade = Cascade::new(Root::new(dir.path()), settings_with_clouds(&closed)).unwrap();
    let Outcome::Resolved {
        uuid,
        source,
        facts,
        attempts,
    } = cascade.run().await
    else {
        panic!("not resolved");
    };
    assert_eq!(source, IdentitySource::Dmi);
    assert_eq!(uuid, UUID);
    assert_eq!(
        facts.bootstrap_token.as_deref(),
        Some("cfg-token-1"),
        "missing facts come from identity.cfg"
    );
    let tried: Vec<_> = attempts.iter().map(|a| a.source).collect();
    assert_eq!(&tried[..], &IdentitySettings::ALL_SOURCES[..7]);
    let misbehaving = identitymgr::cascade::describe(&attempts, |e| e.is_misbehaviour()).unwrap();
    assert!(
        misbehaving
            .starts_with("KernelCmdline: kernel command line: invalid powernode.instance_uuid"),
        "{misbehaving}"
    );
    assert!(
        !misbehaving.contains("Aws"),
        "absent clouds are not misbehaviour: {misbehaving}"
    );

    // An operator who disables DMI gets identity.cfg's UUID.
    let mut settings = settings_with_clouds(&closed);
    settings.sources.retain(|s| *s != IdentitySource::Dmi);
    let cascade = Cascade::new(Root::new(dir.path()), settings).unwrap();
    let Outcome::Resolved { uuid, source, .. } = cascade.run().await else {
        panic!("not resolved");
    };
    assert_eq!(
        (uuid.as_str(), source),
        (
            "11111111-2222-4333-8444-555555555555",
            IdentitySource::IdentityCfg
        )
    );
}

#[tokio::test]
async fn generated_once_then_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings_with_clouds(&closed_url().await);
    let cascade = Cascade::new(Root::new(dir.path()), settings).unwrap();
    let Outcome::Resolved { uuid, source, .. } = cascade.run().await else {
        panic!("not resolved");
    };
    assert_eq!(source, IdentitySource::Generated);
    let cfg = std::fs::read_to_string(dir.path().join("etc/powernode/identity.cfg")).unwrap();
    assert!(cfg.contains(&format!("INSTANCE_UUID={uuid}\n")), "{cfg}");

    let Outcome::Resolved {
        uuid: again,
        source,
        ..
    } = cascade.run().await
    else {
        panic!("not resolved");
    };
    assert_eq!((again, source), (uuid, IdentitySource::IdentityCfg));
}

#[tokio::test]
async fn unresolvable_names_every_source() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "sys/class/dmi/id/product_uuid",
        b"00000000-0000-0000-0000-000000000000\n",
    );
    let mut settings = settings_with_clouds(&closed_url().await);
    settings.allow_generated_uuid = false;
    let cascade = Cascade::new(Root::new(dir.path()), settings).unwrap();
    let Outcome::Unresolvable { attempts } = cascade.run().await else {
        panic!("resolved from nothing");
    };
    let tried: Vec<_> = attempts.iter().map(|a| a.source).collect();
    assert_eq!(tried, IdentitySettings::ALL_SOURCES);
    let text = identitymgr::cascade::describe(&attempts, |_| true).unwrap();
    for source in IdentitySettings::ALL_SOURCES {
        assert!(
            text.contains(&format!("{source:?}: ")),
            "{source:?} missing from {text}"
        );
    }
    assert!(
        text.contains("Dmi: ") && text.contains("nil UUID"),
        "{text}"
    );
    assert!(
        !dir.path().join("etc/powernode/identity.cfg").exists(),
        "nothing generated"
    );
}
