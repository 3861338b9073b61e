//! Human durations on the command line: `90d`, `12h`, `30m`, `20s`, or a bare number of seconds.

use std::time::Duration;

/// Parses `N[s|m|h|d]` (a bare `N` is seconds). Zero is refused: no lifetime or TTL may be empty.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (examples: 20s, 15m, 12h, 90d)"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use s, m, h or d)"
            ))
        }
    };
    let seconds = value
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too long"))?;
    if seconds == 0 {
        return Err(format!("`{text}`: a duration must be at least one second"));
    }
    Ok(Duration::from_secs(seconds))
}

/// The inverse of [`parse_duration`] for display: the largest unit that fits, rounded down
/// (`89d`, `3h`, `20s`; `0s` under a second).
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        86_400.. => format!("{}d", secs / 86_400),
        3600.. => format!("{}h", secs / 3600),
        60.. => format!("{}m", secs / 60),
        _ => format!("{secs}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_takes_the_largest_unit() {
        for (secs, text) in [
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (7300, "2h"),
            (7_776_000, "90d"),
        ] {
            assert_eq!(human(Duration::from_secs(secs)), text);
            if secs > 0 {
                assert!(parse_duration(text).is_ok());
            }
        }
    }

    #[test]
    fn parses_units_and_refuses_garbage() {
        let table: &[(&str, Option<u64>)] = &[
            ("20s", Some(20)),
            ("20", Some(20)),
            ("15m", Some(900)),
            ("12h", Some(43_200)),
            ("90d", Some(7_776_000)),
            ("0s", None),
            ("", None),
            ("s", None),
            ("10w", None),
            ("-5s", None),
            ("99999999999999999999d", None),
        ];
        for (text, want) in table {
            assert_eq!(
                parse_duration(text).ok().map(|d| d.as_secs()),
                *want,
                "{text}"
            );
        }
    }
}
