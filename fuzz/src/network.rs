//! Targets for the WireGuard UAPI text netmgr and its device process exchange: the device's
//! `get` replies (netmgr parses them) and clients' `set` bodies (the device reads them).

use netmgr::uapi;
use netmgr::userspace::control;

/// The clock the targets run at: a fixed Unix time, so an input replays the same way.
const NOW_S: u64 = 1_700_000_000;

/// A `get` reply ([`uapi::parse_get`]), and the same text as a `set` body
/// ([`control::parse_set`]).
///
/// Properties: a parsed reply holds no more peers than it has `public_key=` lines; a body the
/// device takes has one peer section for each `public_key=` line and, over its sections, one
/// allowed IP for each `allowed_ip=` line.
pub fn uapi_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let count = |prefix: &str| text.lines().filter(|l| l.starts_with(prefix)).count();
    if let Ok(state) = uapi::parse_get(text, NOW_S * 1000) {
        assert!(
            state.peers.len() <= count("public_key="),
            "more peers than public_key lines"
        );
    }
    if let Ok(request) = control::parse_set(text.lines()) {
        assert_eq!(
            request.peers.len(),
            count("public_key="),
            "a public_key line is not a section of its own"
        );
        let allowed: usize = request.peers.iter().map(|p| p.allowed_ips.len()).sum();
        assert_eq!(allowed, count("allowed_ip="), "allowed IPs lost or added");
    }
}
