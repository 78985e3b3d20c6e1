//! What /proc says about a process: CPU time, RSS, threads, state, children, its identity (pid and
//! start time); which processes there are; and about the machine.

use std::sync::OnceLock;

/// The fields of `/proc/PID/stat` the benches read.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    /// R, S, D, Z…
    pub state: char,
    pub ppid: i32,
    /// CPU ticks of the process (all of its threads, dead ones included), user and system.
    pub utime: u64,
    pub stime: u64,
    /// CPU ticks of its children that it has reaped, user and system.
    pub cutime: u64,
    pub cstime: u64,
    /// Start time, in ticks since boot: with the pid, it names a process even if the pid is reused.
    pub start: u64,
}

impl Stat {
    /// `/proc/PID/stat`, or None once the process is gone.
    pub fn of(pid: i32) -> Option<Self> {
        Self::read(&format!("/proc/{pid}/stat"))
    }

    /// `/proc/self/stat`.
    pub fn of_self() -> Self {
        Self::read("/proc/self/stat").unwrap_or_else(|| panic!("/proc/self/stat is unreadable"))
    }

    fn read(path: &str) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        // After the command name (which may hold spaces and parentheses): state is field 3.
        let rest = &text[text.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i)?.parse::<u64>().ok();
        Some(Self {
            state: f.first()?.chars().next()?,
            ppid: f.get(1)?.parse().ok()?,
            utime: num(11)?,
            stime: num(12)?,
            cutime: num(13)?,
            cstime: num(14)?,
            start: num(19)?,
        })
    }

    /// utime + stime, in ticks.
    pub fn ticks(&self) -> u64 {
        self.utime + self.stime
    }

    /// cutime + cstime, in ticks.
    pub fn children_ticks(&self) -> u64 {
        self.cutime + self.cstime
    }
}

/// A process named by its pid and its start time, so that a reused pid is not taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    /// Ticks since boot (`Stat::start`).
    pub start: u64,
}

impl ProcId {
    /// The process that has `pid` now, if any.
    pub fn of(pid: i32) -> Option<Self> {
        Stat::of(pid).map(|s| Self {
            pid,
            start: s.start,
        })
    }

    /// Its `/proc/PID/stat`, or None once it is reaped (or its pid is another process's).
    pub fn stat(self) -> Option<Stat> {
        Stat::of(self.pid).filter(|s| s.start == self.start)
    }

    /// It has exited: a zombie, or reaped.
    pub fn exited(self) -> bool {
        self.stat().is_none_or(|s| s.state == 'Z')
    }

    /// It has been reaped: gone from /proc.
    pub fn reaped(self) -> bool {
        self.stat().is_none()
    }
}

/// CPU time of a process, counted two ways.
#[derive(Debug, Clone, Copy)]
pub struct CpuTime {
    /// ns on CPU summed over its live threads (`/proc/PID/task/*/schedstat`).
    pub sched_ns: u64,
    /// utime + stime from `/proc/PID/stat`, converted from ticks to ns.
    pub tick_ns: u64,
}

impl CpuTime {
    /// The CPU time of `pid` now.
    pub fn of(pid: i32) -> Self {
        Self {
            sched_ns: threads_sched_ns(pid),
            tick_ns: Stat::of(pid).map_or(0, |s| s.ticks()) * 1_000_000_000 / clk_tck(),
        }
    }

    /// Seconds from `before` to `self`: (from schedstat, from ticks).
    pub fn since(self, before: CpuTime) -> (f64, f64) {
        (
            self.sched_ns.saturating_sub(before.sched_ns) as f64 / 1e9,
            self.tick_ns.saturating_sub(before.tick_ns) as f64 / 1e9,
        )
    }
}

/// ns on CPU summed over the process's live threads (first field of each task's schedstat).
pub fn threads_sched_ns(pid: i32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(|e| {
        let text = std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok()?;
        text.split_whitespace().next()?.parse::<u64>().ok()
    })
    .sum()
}

/// CPU seconds this (bench) process has used, all threads.
pub fn self_cpu_s() -> f64 {
    Stat::of_self().ticks() as f64 / clk_tck() as f64
}

/// The text of `/proc/PID/status`, or None once the process is gone.
pub fn status(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// A numeric field of a `/proc/PID/status` text (kB for the Vm* fields): `VmHWM:  1234 kB` → 1234.
pub fn status_value(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// A numeric field of `/proc/PID/status`, 0 when the process is gone.
pub fn status_field(pid: i32, key: &str) -> u64 {
    status(pid).and_then(|s| status_value(&s, key)).unwrap_or(0)
}

/// The pids of every process in /proc now.
pub fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The command name of `pid` (`/proc/PID/comm`, at most 15 bytes), or None once it is gone.
pub fn comm(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(text.trim_end_matches('\n').to_owned())
}

/// The first child of `pid` (from `/proc/PID/task/PID/children`).
pub fn first_child(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
pub fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Prints the `machine:` line: cores, CPU model, CLK_TCK, load average.
pub fn print_machine() {
    println!(
        "machine: {} cores ({}), CLK_TCK {}, load average {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model(),
        clk_tck(),
        load_average()
    );
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map_or_else(|| "unknown CPU".into(), |s| s.trim().to_owned())
}

/// The 1, 5 and 15 minute load averages, e.g. `5.12 4.80 3.97`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
