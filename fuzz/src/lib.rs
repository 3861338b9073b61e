//! Coverage-guided fuzz targets for every decoder that reads bytes another process or the
//! network wrote (docs/reliability.md, "Fuzzing").
//!
//! Each target is a plain `fn(&[u8])` that feeds the bytes to the project's own decoder and
//! panics when a property that must hold does not: a panic, in the decoder or in a property,
//! is what the fuzzer reports as a crash. The same functions serve three callers:
//! - `src/bin/afl.rs` (feature `afl`), the afl.rs harness that `scripts/fuzz.sh` runs;
//! - `tests/replay.rs`, which replays the checked-in corpora in `make test`;
//! - `examples/seeds.rs`, which writes the seed corpora with the real encoders.
//!
//! Inputs that carry several documents (a manifest and its payload blob, a chain and a bundle,
//! several settings files) separate them with a NUL byte, which none of the formats can hold
//! unescaped: see [`split`].

pub mod events;
pub mod fixture;
pub mod modules;
pub mod mounts;
pub mod network;
pub mod node_api;
pub mod pubsub;
pub mod settings;

/// One fuzz target: its name (the corpus directory and the harness argument), what it reads,
/// and the function.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Name, `[a-z_]+`: `fuzz/corpus/<name>/`, `afl <name>`.
    pub name: &'static str,
    /// What the decoder under test reads, for reports.
    pub reads: &'static str,
    /// The target itself.
    pub run: fn(&[u8]),
}

/// Every target, in the order `scripts/fuzz.sh` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "pubsub_frame",
        reads: "pubsub frames from a peer's socket (Frame::decode, Frame::decode_all)",
        run: pubsub::frame,
    },
    Target {
        name: "pubsub_checkpoint",
        reads: "checkpoint files (pubsub checkpoint::decode) and their items",
        run: pubsub::checkpoint,
    },
    Target {
        name: "topic_item",
        reads: "topic items decoded by name (types registry decode_json)",
        run: pubsub::topic_item,
    },
    Target {
        name: "mountmgr_record",
        reads: "mountmgr's applied-stack record (record::parse)",
        run: mounts::record,
    },
    Target {
        name: "mountmgr_mountinfo",
        reads: "/proc/self/mountinfo (mountinfo::parse, under, unmount_order)",
        run: mounts::mountinfo,
    },
    Target {
        name: "agentbase_settings",
        reads: "agent.toml and its drop-ins (Settings::load_from)",
        run: settings::settings,
    },
    Target {
        name: "oci_index",
        reads: "an OCI image index from a registry (ImageIndex::parse, for_architecture)",
        run: modules::oci_index,
    },
    Target {
        name: "oci_manifest",
        reads: "a module's OCI manifest and config (ImageManifest::parse_module, Resolved::from_parts)",
        run: modules::oci_manifest,
    },
    Target {
        name: "module_manifest",
        reads: "the module manifest config blob (ModuleManifest::parse)",
        run: modules::module_manifest,
    },
    Target {
        name: "cosign_signature_layers",
        reads: "a cosign signature manifest and payload blob (signature_layers, with_payload, verify)",
        run: modules::cosign_signature_layers,
    },
    Target {
        name: "cosign_keyless_bundle",
        reads: "a keyless signature's certificate, chain and Rekor bundle (cosign::verify)",
        run: modules::cosign_keyless_bundle,
    },
    Target {
        name: "node_api_body",
        reads: "node API bodies: requests the controller extracts (JsonBody, CSR), replies nodes decode",
        run: node_api::body,
    },
    Target {
        name: "eventd_journal",
        reads: "eventd's journal segments read back after a crash (segment::scan) and their records",
        run: events::journal_segment,
    },
    Target {
        name: "netmgr_uapi",
        reads: "WireGuard UAPI text: the device's get replies (parse_get, rewrite_handshakes), clients' set bodies (split_set)",
        run: network::uapi_text,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Does once what the targets would otherwise do on their first input: the settings target's
/// directory, the cosign fixture's policies. The harness calls it before afl's fork server
/// starts, so that every forked child starts with it done.
pub fn prepare() {
    settings::prepare();
    fixture::cosign();
}

/// Splits `data` at NUL bytes into at most `n` parts; the last part keeps any further NULs
/// (so a part the format cannot contain still reaches its decoder, which must refuse it).
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_plain() {
        let mut names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TARGETS.len());
        assert!(target("pubsub_frame").is_some());
        assert!(target("nope").is_none());
    }

    #[test]
    fn split_keeps_later_nuls_in_the_last_part() {
        assert_eq!(split(b"a\0b\0c", 2), [&b"a"[..], b"b\0c"]);
        assert_eq!(split(b"abc", 3), [&b"abc"[..]]);
        assert_eq!(split(b"", 2), [&b""[..]]);
    }
}
