//! Process-wide figures read at scrape time: the numbers that show whether anything leaks.

use crate::handlers::exec::{self, Isolation};

/// Process-wide figures read at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessFigures {
    /// Live tokio tasks of the daemon's runtime.
    pub tasks_alive: u64,
    /// Resident set size in bytes, if /proc tells.
    pub rss_bytes: Option<u64>,
    /// Exec process trees (group or cgroup) that may still have processes.
    pub exec_groups: u64,
    /// The isolation exec jobs get by default (`None` until exec looked for cgroups).
    pub exec_isolation: Option<Isolation>,
    /// Exec's process-wide counters: commands started by mode, clean-up at start-up, orphans.
    pub exec: exec::Figures,
}

impl ProcessFigures {
    /// Reads the figures now (on the daemon's runtime).
    pub fn read() -> Self {
        let tasks_alive = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_alive_tasks() as u64)
            .unwrap_or(0);
        let exec = exec::figures();
        Self {
            tasks_alive,
            rss_bytes: rss_bytes(),
            exec_groups: exec.trees_alive,
            exec_isolation: exec::isolation(),
            exec,
        }
    }

    /// Only the exec figures (no /proc read, no runtime).
    pub fn exec() -> Self {
        let exec = exec::figures();
        Self {
            exec_groups: exec.trees_alive,
            exec_isolation: exec::isolation(),
            exec,
            ..Self::default()
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
