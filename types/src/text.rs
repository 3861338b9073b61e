//! Text for people, one way for every tool that prints it (the node's CLI, the controller's,
//! the agents' event fields, the verifier's reasons): times as RFC 3339 in UTC, and strings
//! from elsewhere on one line.

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let second_of_day = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// `ms` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn rfc3339_millis(ms: i64) -> String {
    let seconds = rfc3339(ms.div_euclid(1000));
    let seconds = seconds.strip_suffix('Z').unwrap_or(&seconds);
    format!("{seconds}.{:03}Z", ms.rem_euclid(1000))
}

/// `text` on one line: control characters (a newline, an escape a terminal would act on) are
/// shown escaped, so a message from a node cannot forge or garble the lines around it.
pub fn one_line(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// `cells` on one line, each padded to its width in `widths` (a cell past the widths, or one
/// wider than its width, is not padded), two spaces apart, with no trailing space: rows
/// printed apart (a `--follow`) still line up.
pub fn columns<S: AsRef<str>>(cells: &[S], widths: &[usize]) -> String {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        let width = widths.get(i).copied().unwrap_or(0);
        line.push_str(&format!("{:<width$}  ", cell.as_ref()));
    }
    line.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_634_714_717), "2021-10-20T07:25:17Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339_millis(1_700_000_000_007),
            "2023-11-14T22:13:20.007Z"
        );
        assert_eq!(rfc3339_millis(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn columns_line_up_without_trailing_space() {
        assert_eq!(columns(&["a", "bb", "c"], &[3, 3]), "a    bb   c");
        assert_eq!(columns(&["toolong", "x"], &[3]), "toolong  x");
        assert_eq!(columns(&["a", ""], &[3, 3]), "a");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(one_line("a\nb\u{1b}[2Jc"), "a\\nb\\u{1b}[2Jc");
        assert_eq!(one_line("plain é"), "plain é");
    }
}
