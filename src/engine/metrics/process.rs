//! Process-wide figures read at scrape time: the numbers that show whether anything leaks.

/// Process-wide figures read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessFigures {
    /// Live tokio tasks of the daemon's runtime.
    pub tasks_alive: u64,
    /// Resident set size in bytes, if /proc tells.
    pub rss_bytes: Option<u64>,
    /// Exec process groups that may still have members.
    pub exec_groups: u64,
}

impl ProcessFigures {
    /// Reads the figures now (on the daemon's runtime).
    pub fn read() -> Self {
        let tasks_alive = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_alive_tasks() as u64)
            .unwrap_or(0);
        Self {
            tasks_alive,
            rss_bytes: rss_bytes(),
            exec_groups: crate::handlers::exec::groups_alive(),
        }
    }
}

/// `VmRSS` from /proc/self/status, in bytes.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
