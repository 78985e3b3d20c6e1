//! A cgroup v2 per job, under a directory of this daemon instance, and the clean-up after a crash.
//!
//! Where: batchd's own cgroup v2 (from `/proc/self/cgroup`, found on disk through
//! `/proc/self/mountinfo`) is the *base*. At the first use the daemon makes its *instance*
//! directory there, `batchd-<pid>-<start time>-<pid namespace>`, and each job gets `job-<n>` inside
//! it. The name says whose it is: a restarted daemon finds the instance directories of its pid
//! namespace whose process is gone (no process with that pid and start time) and kills everything
//! in them with one `cgroup.kill` (it reaches nested cgroups too), then removes them
//! ([`Cgroups::kill_stale`]). An instance of another pid namespace is never touched: its pid means
//! nothing here.
//!
//! A job's command enters its cgroup before it runs anything (the spawn writes `0` to the
//! `cgroup.procs` of [`JobCgroup`]), so every process it starts is in it, however it detaches
//! (`setsid`, double fork): `cgroup.kill` (Linux ≥ 5.14) takes them all, and the directory can be
//! removed once it is empty (zombies do not count).
//!
//! Limits (`memory_max`, `pids_max`) need the `memory` / `pids` controllers enabled in the base's
//! and the instance's `cgroup.subtree_control`. A non-root cgroup with processes cannot enable
//! controllers for its children ("no internal processes"), so when the base refuses with `EBUSY`,
//! the daemon moves itself into `<instance>/daemon` first (what systemd's `DelegateSubgroup=`
//! does for a service).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::Pid;

/// Prefix of every instance directory.
const INSTANCE_PREFIX: &str = "batchd-";
/// How long start-up waits for the processes of a crashed instance to die after `cgroup.kill`.
const STALE_WAIT: Duration = Duration::from_secs(5);

/// This process's place in cgroup v2: the base, and the instance directory its jobs go in.
#[derive(Debug)]
pub(super) struct Cgroups {
    base: PathBuf,
    instance: PathBuf,
    /// Controllers enabled for job cgroups so far.
    enabled: Mutex<Controllers>,
    next: AtomicU64,
}

/// Controllers a job's limits need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Controllers {
    pub(super) memory: bool,
    pub(super) pids: bool,
}

/// A job's limits, written into its cgroup before the command starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Limits {
    /// `memory.max` in bytes.
    pub(super) memory_max: Option<u64>,
    /// `pids.max`.
    pub(super) pids_max: Option<u64>,
}

/// One job's cgroup: its directory and its `cgroup.procs`, open for the spawn. Dropping it kills
/// what is left in it and removes it (unless [`JobCgroup::remove`] already did).
#[derive(Debug)]
pub(super) struct JobCgroup {
    dir: PathBuf,
    procs: OwnedFd,
    removed: AtomicBool,
}

/// What start-up found of crashed instances and killed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Stale {
    /// Instance directories of processes that are gone.
    pub(super) instances: u64,
    /// Job cgroups in them that still had processes.
    pub(super) cgroups: u64,
    /// Processes killed in them.
    pub(super) processes: u64,
}

// === impl Cgroups ===

impl Cgroups {
    /// Finds this process's cgroup v2 and makes the instance directory there; `Err` says why
    /// jobs cannot have cgroups here.
    pub(super) fn detect() -> Result<Self, String> {
        let cgroup = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let base = own_dir(&cgroup, &mountinfo)?;
        let start =
            start_time(rustix::process::getpid()).ok_or("cannot read this process's start time")?;
        let name = Instance {
            pid: std::process::id(),
            start,
            pid_ns: pid_namespace().ok_or("cannot read this process's pid namespace")?,
        }
        .to_string();
        let cgroups = Self {
            instance: base.join(name),
            base,
            enabled: Mutex::new(Controllers::default()),
            next: AtomicU64::new(1),
        };
        cgroups
            .make_instance()
            .map_err(|e| format!("cannot create {}: {e}", cgroups.instance.display()))?;
        if !cgroups.instance.join("cgroup.kill").exists() {
            let _ = fs::remove_dir(&cgroups.instance);
            return Err("the kernel has no cgroup.kill (Linux 5.14 or later is needed)".into());
        }
        Ok(cgroups)
    }

    /// The cgroup jobs' cgroups live in, e.g. `/sys/fs/cgroup/…/batchd-123-456`.
    pub(super) fn instance(&self) -> &Path {
        &self.instance
    }

    fn make_instance(&self) -> io::Result<()> {
        match fs::create_dir(&self.instance) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes the `memory` / `pids` controllers available to job cgroups; `Err` says why not.
    pub(super) fn enable(&self, need: Controllers) -> Result<(), String> {
        let mut enabled = self
            .enabled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let missing = Controllers {
            memory: need.memory && !enabled.memory,
            pids: need.pids && !enabled.pids,
        };
        if missing == Controllers::default() {
            return Ok(());
        }
        let wanted = missing.names();
        let available = read_words(&self.base.join("cgroup.controllers")).unwrap_or_default();
        if let Some(absent) = wanted.iter().find(|c| !available.iter().any(|a| a == *c)) {
            return Err(format!(
                "the {absent} controller is not delegated to {} (it has: {}); run batchd with \
                 its controllers delegated (systemd: Delegate=yes) or leave the limit out",
                self.base.display(),
                if available.is_empty() {
                    "none".to_owned()
                } else {
                    available.join(" ")
                }
            ));
        }
        let enable = wanted
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let base_control = self.base.join("cgroup.subtree_control");
        if let Err(e) = write_file(&base_control, &enable) {
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(format!(
                    "enabling {enable} in {}: {e}",
                    base_control.display()
                ));
            }
            // Processes in the base: move this one to a leaf of its own, then try again.
            let leaf = self.instance.join("daemon");
            let moved = fs::create_dir_all(&leaf)
                .and_then(|()| write_file(&leaf.join("cgroup.procs"), "0"))
                .and_then(|()| write_file(&base_control, &enable));
            moved.map_err(|e| {
                format!(
                    "enabling {enable} in {} (after moving batchd to {}): {e}; other processes \
                     share batchd's cgroup",
                    base_control.display(),
                    leaf.display()
                )
            })?;
        }
        let control = self.instance.join("cgroup.subtree_control");
        write_file(&control, &enable)
            .map_err(|e| format!("enabling {enable} in {}: {e}", control.display()))?;
        enabled.memory |= missing.memory;
        enabled.pids |= missing.pids;
        Ok(())
    }

    /// Makes the cgroup of a new job, with `limits` in force.
    pub(super) fn create_job(&self, limits: &Limits) -> io::Result<JobCgroup> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.instance.join(format!("job-{n}"));
        if let Err(e) = fs::create_dir(&dir) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e);
            }
            // The instance directory was removed when a server shut down: make it again.
            self.make_instance()?;
            fs::create_dir(&dir)?;
        }
        // From here on, dropping the job cgroup removes the directory.
        let set_up = (|| {
            if let Some(max) = limits.memory_max {
                write_file(&dir.join("memory.max"), &max.to_string())?;
                // An OOM kill takes the whole job, not one process of it.
                write_file(&dir.join("memory.oom.group"), "1")?;
            }
            if let Some(max) = limits.pids_max {
                write_file(&dir.join("pids.max"), &max.to_string())?;
            }
            let procs = fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))?;
            Ok(OwnedFd::from(procs))
        })();
        match set_up {
            Ok(procs) => Ok(JobCgroup {
                dir,
                procs,
                removed: AtomicBool::new(false),
            }),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Removes the instance directory if no job cgroup is left in it (a daemon that exits).
    pub(super) fn remove_instance_if_unused(&self) {
        let _ = fs::remove_dir(self.instance.join("daemon"));
        let _ = fs::remove_dir(&self.instance);
    }

    /// Kills what crashed instances left in the base and removes their directories.
    pub(super) fn kill_stale(&self) -> Stale {
        let mut stale = Stale::default();
        let Ok(entries) = fs::read_dir(&self.base) else {
            return stale;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if dir == self.instance || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(owner) = entry.file_name().to_str().and_then(Instance::parse) else {
                continue;
            };
            if pid_namespace() != Some(owner.pid_ns) || owner.runs() {
                continue; // not ours to judge, or its daemon still runs
            }
            let pid = owner.pid;
            stale.instances += 1;
            let (cgroups, processes) = count_processes(&dir);
            if processes > 0 {
                let _ = write_file(&dir.join("cgroup.kill"), "1");
                let deadline = Instant::now() + STALE_WAIT;
                while populated(&dir).unwrap_or(false) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            remove_tree(&dir);
            tracing::warn!(
                cgroup = %dir.display(),
                pid,
                cgroups,
                processes,
                "killed what a previous batchd instance left running"
            );
            stale.cgroups += cgroups;
            stale.processes += processes;
        }
        stale
    }
}

// === impl JobCgroup ===

impl JobCgroup {
    /// The open `cgroup.procs`, for the spawn.
    pub(super) fn procs(&self) -> &OwnedFd {
        &self.procs
    }

    /// Whether any process is in the cgroup (zombies are not).
    pub(super) fn populated(&self) -> bool {
        populated(&self.dir).unwrap_or(false)
    }

    /// Sends `signal` to every process in the cgroup that is not in the process group `group`
    /// (which the caller signals as a whole): each process gets it once, as from one `kill`. (One
    /// that forks meanwhile may miss it: `kill` is what leaves nothing behind.)
    pub(super) fn signal_outside(&self, signal: rustix::process::Signal, group: Pid) {
        for pid in procs(&self.dir) {
            if rustix::process::getpgid(Some(pid)).is_ok_and(|g| g != group) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }

    /// SIGKILLs every process in the cgroup, however it detached.
    pub(super) fn kill(&self) {
        kill_dir(&self.dir);
    }

    /// Removes the directory; fails (`EBUSY`) while a process is in it.
    pub(super) fn remove(&self) -> io::Result<()> {
        fs::remove_dir(&self.dir)?;
        self.removed.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// How many times the kernel's OOM killer acted in the cgroup (`memory.events`).
    pub(super) fn oom_kills(&self) -> u64 {
        let text = fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default();
        event_count(&text, "oom_kill")
    }

    /// How many times a fork failed at `pids.max` (`pids.events`).
    pub(super) fn pids_max_hits(&self) -> u64 {
        let text = fs::read_to_string(self.dir.join("pids.events")).unwrap_or_default();
        event_count(&text, "max")
    }
}

#[cfg(test)]
impl JobCgroup {
    /// A job cgroup over an ordinary directory, for tests of what is read from its files.
    pub(super) fn fake(dir: &Path) -> Self {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        Self {
            dir: dir.to_owned(),
            procs: procs.into(),
            removed: AtomicBool::new(true),
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        if !self.removed.load(Ordering::Relaxed) && fs::remove_dir(&self.dir).is_err() {
            // Processes are left (a kill task cut short): kill them; the directory goes when a
            // later daemon cleans up this instance.
            self.kill();
        }
    }
}

/// Writes `1` to the `cgroup.kill` of `dir`.
pub(super) fn kill_dir(dir: &Path) {
    let _ = write_file(&dir.join("cgroup.kill"), "1");
}

// === impl Controllers ===

impl Controllers {
    /// The names of the controllers set.
    fn names(self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.memory {
            names.push("memory");
        }
        if self.pids {
            names.push("pids");
        }
        names
    }
}

impl fmt::Display for Controllers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(" "))
    }
}

// === files of cgroupfs ===

/// Writes `text` to an existing file of cgroupfs in one `write`.
fn write_file(path: &Path, text: &str) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// The words of a file (`cgroup.controllers`).
fn read_words(path: &Path) -> io::Result<Vec<String>> {
    Ok(fs::read_to_string(path)?
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// `populated` of the cgroup's `cgroup.events`: any process in it or below it.
fn populated(dir: &Path) -> io::Result<bool> {
    let events = fs::read_to_string(dir.join("cgroup.events"))?;
    Ok(event_count(&events, "populated") > 0)
}

/// The processes of one cgroup (not of its children).
fn procs(dir: &Path) -> Vec<Pid> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok().and_then(Pid::from_raw))
        .collect()
}

/// The value of `key` in a flat-keyed file (`key value` lines), 0 if absent.
fn event_count(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Cgroups below `dir` (itself included) that have processes, and how many processes in all.
fn count_processes(dir: &Path) -> (u64, u64) {
    let mut cgroups = 0;
    let mut processes = procs(dir).len() as u64;
    if processes > 0 {
        cgroups += 1;
    }
    for child in subdirs(dir) {
        let (c, p) = count_processes(&child);
        cgroups += c;
        processes += p;
    }
    (cgroups, processes)
}

/// The child cgroups of `dir`.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes `dir` and every cgroup below it, deepest first (each must be empty of processes).
fn remove_tree(dir: &Path) {
    for child in subdirs(dir) {
        remove_tree(&child);
    }
    let _ = fs::remove_dir(dir);
}

// === where the cgroup is ===

/// The directory of this process's cgroup v2, from `/proc/self/cgroup` and `/proc/self/mountinfo`.
fn own_dir(cgroup: &str, mountinfo: &str) -> Result<PathBuf, String> {
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2 hierarchy")?;
    if path.ends_with(" (deleted)") {
        return Err(format!("this process's cgroup {path} was removed"));
    }
    for line in mountinfo.lines() {
        let Some((mount, fs)) = line.split_once(" - ") else {
            continue;
        };
        if fs.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = mount.split(' ').collect();
        let (Some(root), Some(point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let root = unescape(root);
        let rel = if root == "/" {
            Some(path)
        } else {
            path.strip_prefix(root.as_str())
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        if let Some(rel) = rel {
            let dir = PathBuf::from(unescape(point)).join(rel.trim_start_matches('/'));
            if dir.is_dir() {
                return Ok(dir);
            }
        }
    }
    Err(format!(
        "no cgroup2 mount shows this process's cgroup {path} (see /proc/self/mountinfo)"
    ))
}

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whose an instance directory is: `batchd-<pid>-<start time>-<pid namespace inode>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Instance {
    pid: u32,
    start: u64,
    pid_ns: u64,
}

impl Instance {
    fn parse(name: &str) -> Option<Self> {
        let mut parts = name.strip_prefix(INSTANCE_PREFIX)?.split('-');
        let instance = Self {
            pid: parts.next()?.parse().ok()?,
            start: parts.next()?.parse().ok()?,
            pid_ns: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(instance)
    }

    /// Whether its process still runs (the same pid, started at the same time).
    fn runs(&self) -> bool {
        i32::try_from(self.pid)
            .ok()
            .and_then(Pid::from_raw)
            .and_then(start_time)
            == Some(self.start)
    }
}

impl fmt::Display for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{INSTANCE_PREFIX}{}-{}-{}",
            self.pid, self.start, self.pid_ns
        )
    }
}

/// The inode of this process's pid namespace (`/proc/self/ns/pid` → `pid:[4026531836]`).
fn pid_namespace() -> Option<u64> {
    let link = fs::read_link("/proc/self/ns/pid").ok()?;
    link.to_str()?
        .strip_prefix("pid:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Start time of a process (clock ticks since boot, field 22 of `/proc/PID/stat`), if it exists.
fn start_time(pid: Pid) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: split after it.
    stat.get(stat.rfind(')')? + 2..)?
        .split(' ')
        .nth(19)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests;
