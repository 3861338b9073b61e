//! Targets for the WireGuard UAPI text netmgr and its device process exchange: the device's
//! `get` replies (netmgr parses them; the device's proxy rewrites their handshake times for
//! every client) and clients' `set` bodies (the proxy splits them by peer).

use std::time::{Duration, UNIX_EPOCH};

use netmgr::{proxy, uapi};

/// The clock the targets run at: a fixed Unix time, so an input replays the same way.
const NOW_S: u64 = 1_700_000_000;

/// A `get` reply ([`uapi::parse_get`], [`proxy::rewrite_handshakes`]), and the same text as a
/// `set` body ([`proxy::split_set`]).
///
/// Properties: a parsed reply holds no more peers than it has `public_key=` lines; rewriting
/// the handshakes leaves every other line as it was, in order; splitting a body loses and adds
/// nothing (the head and the sections put together are the body, line by line) and each
/// section starts at its `public_key=` line.
pub fn uapi_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(state) = uapi::parse_get(text, NOW_S * 1000) {
        let keys = text
            .lines()
            .filter(|l| l.starts_with("public_key="))
            .count();
        assert!(
            state.peers.len() <= keys,
            "more peers than public_key lines"
        );
    }

    // Both rewrites write each line back with a `\n`: a bare `\r` ending the text becomes
    // part of a `\r\n` then, so the properties compare against the text written back the
    // same way.
    let written_back: String = text.lines().map(|l| format!("{l}\n")).collect();
    let now = UNIX_EPOCH + Duration::from_secs(NOW_S);
    let rewritten = proxy::rewrite_handshakes(text, now);
    let others = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with("last_handshake_time_"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        others(&rewritten),
        others(&written_back),
        "rewriting handshakes changed another line"
    );

    let (head, sections) = proxy::split_set(text);
    let mut joined = head;
    for section in &sections {
        assert!(
            section
                .text
                .starts_with(&format!("public_key={}", section.key)),
            "a section starts elsewhere than its public_key line"
        );
        joined.push_str(&section.text);
    }
    assert_eq!(joined, written_back, "splitting lost or added text");
}
