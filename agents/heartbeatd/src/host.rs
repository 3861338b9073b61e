//! What the node reports about the machine: uptime, load and memory, read from `proc` under the
//! root. A file that is missing or does not parse leaves its field out of the heartbeat (with
//! the reason logged); nothing is ever made up.

use agentbase::Root;
use powernode_types::node_api::Memory;

/// Seconds since boot, under the root.
pub const UPTIME_PATH: &str = "proc/uptime";
/// Load averages, under the root.
pub const LOADAVG_PATH: &str = "proc/loadavg";
/// Memory figures, under the root.
pub const MEMINFO_PATH: &str = "proc/meminfo";

/// The machine facts of one heartbeat; `None` where the source could not be read.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    /// Whole seconds since boot.
    pub uptime_s: Option<u64>,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: Option<[f64; 3]>,
    /// `MemTotal` and `MemAvailable`, in bytes.
    pub memory: Option<Memory>,
    /// One line per source that could not be used.
    pub problems: Vec<String>,
}

/// Reads every fact; problems are collected, never fatal.
pub async fn read(root: &Root) -> HostFacts {
    let mut facts = HostFacts::default();
    match read_file(root, UPTIME_PATH)
        .await
        .and_then(|t| parse_uptime(&t))
    {
        Ok(v) => facts.uptime_s = Some(v),
        Err(e) => facts.problems.push(format!("{UPTIME_PATH}: {e}")),
    }
    match read_file(root, LOADAVG_PATH)
        .await
        .and_then(|t| parse_loadavg(&t))
    {
        Ok(v) => facts.load = Some(v),
        Err(e) => facts.problems.push(format!("{LOADAVG_PATH}: {e}")),
    }
    match read_file(root, MEMINFO_PATH)
        .await
        .and_then(|t| parse_meminfo(&t))
    {
        Ok(v) => facts.memory = Some(v),
        Err(e) => facts.problems.push(format!("{MEMINFO_PATH}: {e}")),
    }
    facts
}

async fn read_file(root: &Root, rel: &str) -> Result<String, String> {
    tokio::fs::read_to_string(root.path(rel))
        .await
        .map_err(|e| e.to_string())
}

/// `proc/uptime`: "<seconds since boot> <idle seconds>"; the first number, whole seconds.
pub fn parse_uptime(text: &str) -> Result<u64, String> {
    let first = text.split_whitespace().next().ok_or("empty")?;
    let secs: f64 = first
        .parse()
        .map_err(|_| format!("{first:?} is not a number"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{first:?} is not a non-negative number"));
    }
    Ok(secs as u64)
}

/// `proc/loadavg`: "<1 min> <5 min> <15 min> <running>/<total> <last pid>"; the first three.
pub fn parse_loadavg(text: &str) -> Result<[f64; 3], String> {
    let mut fields = text.split_whitespace();
    let mut load = [0.0; 3];
    for slot in &mut load {
        let field = fields.next().ok_or("fewer than three load averages")?;
        let value: f64 = field
            .parse()
            .map_err(|_| format!("{field:?} is not a number"))?;
        if !value.is_finite() || value < 0.0 {
            return Err(format!("{field:?} is not a non-negative number"));
        }
        *slot = value;
    }
    Ok(load)
}

/// `proc/meminfo`: `MemTotal` and `MemAvailable` (in kB in the file), in bytes.
pub fn parse_meminfo(text: &str) -> Result<Memory, String> {
    let mut total = None;
    let mut available = None;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let slot = match name.trim() {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            _ => continue,
        };
        *slot = Some(kb_to_bytes(name.trim(), rest)?);
    }
    Ok(Memory {
        total_bytes: total.ok_or("no MemTotal")?,
        available_bytes: available.ok_or("no MemAvailable")?,
    })
}

fn kb_to_bytes(name: &str, rest: &str) -> Result<u64, String> {
    let mut parts = rest.split_whitespace();
    let number = parts.next().ok_or_else(|| format!("{name}: no value"))?;
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{name}: {number:?} is not a number"))?;
    let factor = match parts.next() {
        Some("kB") => 1024,
        None => 1,
        Some(unit) => return Err(format!("{name}: unknown unit {unit:?}")),
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("{name}: {value} {factor} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_table() {
        let cases: [(&str, Result<u64, ()>); 6] = [
            ("12345.67 54321.00\n", Ok(12345)),
            ("0.50 0.10", Ok(0)),
            ("42", Ok(42)),
            ("", Err(())),
            ("abc 1", Err(())),
            ("-3 1", Err(())),
        ];
        for (text, want) in cases {
            assert_eq!(parse_uptime(text).map_err(|_| ()), want, "{text:?}");
        }
    }

    #[test]
    fn loadavg_table() {
        assert_eq!(
            parse_loadavg("0.52 0.58 0.59 2/1234 56789\n").unwrap(),
            [0.52, 0.58, 0.59]
        );
        assert!(parse_loadavg("0.5 0.6").is_err());
        assert!(parse_loadavg("0.5 x 0.7 1/2 3").is_err());
        assert!(parse_loadavg("0.5 NaN 0.7 1/2 3").is_err());
        assert!(parse_loadavg("").is_err());
    }

    #[test]
    fn meminfo_table() {
        let text = "MemTotal:       16316412 kB\nMemFree:         1000000 kB\n\
                    MemAvailable:   12000000 kB\nBuffers:  1 kB\n";
        let m = parse_meminfo(text).unwrap();
        assert_eq!(m.total_bytes, 16_316_412 * 1024);
        assert_eq!(m.available_bytes, 12_000_000 * 1024);
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_err());
        assert!(parse_meminfo("MemAvailable: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n").is_err());
        assert!(parse_meminfo("MemTotal: 1 MB\nMemAvailable: 1 kB\n").is_err());
        assert!(parse_meminfo("").is_err());
    }
}
