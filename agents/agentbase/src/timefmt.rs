//! Times and durations as event fields carry them: machine-readable milliseconds go beside
//! these human forms, which exist so an operator reading `events` needs no arithmetic.

/// `ms` since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC; milliseconds dropped).
pub fn rfc3339_ms(ms: u64) -> String {
    powernode_types::text::rfc3339(i64::try_from(ms / 1000).unwrap_or(i64::MAX))
}

/// A duration in ms as its two largest units: `1d 4h`, `3m 20s`, `12s`, `850ms`.
pub fn human_ms(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ];
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let mut parts = Vec::new();
    let mut rest = ms;
    for (size, name) in UNITS {
        if rest >= size || !parts.is_empty() {
            parts.push(format!("{}{name}", rest / size));
            rest %= size;
        }
        if parts.len() == 2 {
            break;
        }
    }
    parts.retain(|p| !p.starts_with('0'));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_ms(1_634_714_717_999), "2021-10-20T07:25:17Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn human_durations() {
        for (ms, text) in [
            (0, "0ms"),
            (850, "850ms"),
            (1000, "1s"),
            (12_400, "12s"),
            (200_000, "3m 20s"),
            (3_600_000, "1h"),
            (3_660_000, "1h 1m"),
            (86_400_000 + 4 * 3_600_000 + 59_000, "1d 4h"),
            (2 * 86_400_000 + 30_000, "2d"),
        ] {
            assert_eq!(human_ms(ms), text, "{ms}");
        }
    }
}
