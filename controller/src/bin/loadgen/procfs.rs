//! What `/proc` says about the controller under test (and about this process's limits).

/// utime + stime of a process, seconds (from /proc/PID/stat, in clock ticks of 100 Hz).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // After the command: state is field 3 (index 0 here); utime 14 and stime 15 → 11, 12.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A `kB` line of /proc/PID/status (`VmRSS:`, `VmHWM:`), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A `kB` line of /proc/PID/status, in MiB.
pub fn status_mib(pid: u32, key: &str) -> Option<f64> {
    status_kib(pid, key).map(|kib| kib as f64 / 1024.0)
}

/// This process's soft limit on open descriptors (`Max open files` of /proc/self/limits);
/// `None` when unlimited or unreadable.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some());
        assert!(fd_count(pid).unwrap() >= 3);
        assert!(status_kib(pid, "VmRSS:").unwrap() > 0);
        assert!(status_kib(pid, "VmHWM:").unwrap() > 0);
        assert!(open_files_limit().unwrap() > 0);
    }
}
