//! Processes as /proc shows them, and cgroup v2 directories for tests: what the exec tests look
//! at to tell whether a job's processes are gone.
//!
//! Each test's commands carry a unique [`MARK`] variable (inherited by everything they start), so
//! a test finds its own processes among those of the other tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The environment variable that marks a test's processes.
pub const MARK: &str = "BATCHD_TEST_MARK";

/// One process as /proc/PID/stat shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub state: char,
    /// Start time in ticks since boot: tells a process from a later one with the same pid.
    pub start: u64,
    /// The arguments, joined by spaces.
    pub cmdline: String,
}

impl Proc {
    pub fn read(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may contain anything: split after it.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline)
            .trim_end_matches('\0')
            .replace('\0', " ");
        Some(Self {
            pid,
            state: f[0].chars().next()?,
            ppid: f[1].parse().ok()?,
            pgid: f[2].parse().ok()?,
            sid: f[3].parse().ok()?,
            start: f[19].parse().ok()?,
            cmdline,
        })
    }

    /// Still running (a zombie is not).
    pub fn is_live(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }

    /// This very process still runs.
    pub fn still_live(&self) -> bool {
        self.now().is_some_and(|p| p.is_live())
    }

    /// This very process is exited and reaped.
    pub fn reaped(&self) -> bool {
        self.now().is_none()
    }

    /// Whether this very process is left over after its job was stopped: it runs, or it is a
    /// zombie that `batchd` (its subreaper or parent) did not reap. A zombie of another parent
    /// counts as gone: this sandbox's PID 1 reaps no orphan.
    pub fn left_behind(&self, batchd: i32) -> bool {
        self.now().is_some_and(|p| p.is_live() || p.ppid == batchd)
    }

    /// The process as it is now, if it is this very one.
    fn now(&self) -> Option<Self> {
        Self::read(self.pid).filter(|p| p.start == self.start)
    }

    /// SIGKILL, for a test that cleans up what it showed surviving.
    pub fn kill(&self) {
        if self.now().is_some() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(self.pid).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
    }
}

/// The pids in /proc.
pub fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Running processes whose environment carries `mark`.
///
/// The environment is read before the state: a command shows the mark only once it has exec'd, so
/// the state read after that is from after its setup (read the other way round it can be from
/// before, a race that a busy machine makes likely).
pub fn marked(mark: &str) -> Vec<Proc> {
    let needle = format!("{MARK}={mark}\0");
    pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .filter_map(Proc::read)
        .filter(Proc::is_live)
        .collect()
}

/// A mark no other test uses.
pub fn unique_mark(name: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cgroup v2 mount of this machine, if this process may make cgroups there (probed once).
pub fn cgroup2_root() -> Option<PathBuf> {
    static ROOT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let point = mounts.lines().find_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            (fs.split(' ').next() == Some("cgroup2")).then(|| mount.split(' ').nth(4))?
        })?;
        let probe = Path::new(point).join(format!("test-probe-{}", unique_mark("cgroup")));
        std::fs::create_dir(&probe).ok()?;
        let kill = probe.join("cgroup.kill").exists();
        std::fs::remove_dir(&probe).ok()?;
        kill.then(|| PathBuf::from(point))
    })
    .clone()
}

/// A cgroup v2 directory of a test's own, made under `root`; killed and removed when dropped.
pub struct TestCgroup {
    pub dir: PathBuf,
}

impl TestCgroup {
    pub fn new(root: &Path, name: &str) -> Self {
        let dir = root.join(format!("test-{}", unique_mark(name)));
        std::fs::create_dir(&dir).unwrap();
        Self { dir }
    }

    /// The cgroups below it (recursively), deepest first.
    pub fn descendants(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                    out.push(e.path());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir, &mut out);
        out
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        for _ in 0..500 {
            let events =
                std::fs::read_to_string(self.dir.join("cgroup.events")).unwrap_or_default();
            if !events.contains("populated 1") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for dir in self.descendants() {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
