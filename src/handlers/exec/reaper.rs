//! The daemon-wide side of exec: the [`Reaper`] that owns the kill tasks of stopped jobs and the
//! reaping of orphans, and the process-wide figures the engine exports.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};
use tokio_util::task::{AbortOnDropHandle, TaskTracker};

use super::cgroup::JobCgroup;
use super::Isolation;

/// What shutdown waits for kill tasks beyond the longest `kill_grace`.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(1);
/// Least time between two scans for orphans (every command's exit sends SIGCHLD too).
const ORPHAN_SCAN_PAUSE: Duration = Duration::from_millis(5);

/// Finishes killing the process trees of jobs that went away; shared by every exec handler.
///
/// Cheap to clone. The daemon calls [`Reaper::shutdown`] after serving so that no tree outlives it.
#[derive(Debug, Clone, Default)]
pub struct Reaper {
    pub(super) inner: Arc<ReaperInner>,
}

#[derive(Debug, Default)]
pub(super) struct ReaperInner {
    /// Every kill task.
    pub(super) tasks: TaskTracker,
    /// Trees that may still have processes, by process group, with their cgroup if they have one.
    live: Mutex<HashMap<Pid, Option<Arc<JobCgroup>>>>,
    /// The longest `kill_grace` of the handlers using this reaper.
    max_grace: Mutex<Duration>,
    /// Each handler's name and isolation, for the start-up log.
    handlers: Mutex<Vec<(String, Isolation)>>,
    /// The task reaping orphans, once [`super::start_up`] made the daemon their subreaper.
    orphans: OnceLock<AbortOnDropHandle<()>>,
}

/// Process-wide figures of exec handlers, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Jobs' process trees that may still have processes.
    pub trees_alive: u64,
    /// Commands started in a cgroup of their own.
    pub started_in_cgroup: u64,
    /// Commands started in a process group only.
    pub started_in_process_group: u64,
    /// Job cgroups of crashed instances killed at start-up.
    pub stale_cgroups_killed: u64,
    /// Processes in them.
    pub stale_processes_killed: u64,
    /// Orphaned descendants reaped as their subreaper.
    pub orphans_reaped: u64,
}

/// Process-wide counters behind [`Figures`].
pub(super) static TREES_ALIVE: AtomicU64 = AtomicU64::new(0);
pub(super) static STARTED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
pub(super) static STALE_CGROUPS: AtomicU64 = AtomicU64::new(0);
pub(super) static STALE_PROCESSES: AtomicU64 = AtomicU64::new(0);
static ORPHANS_REAPED: AtomicU64 = AtomicU64::new(0);

/// Commands batchd started and has not reaped: their exit status is their job's, never an
/// orphan's to take.
static LEADERS: LazyLock<Mutex<HashSet<i32>>> = LazyLock::new(Mutex::default);

/// Notes that the command `pid` was started (and is waited for on its pidfd).
pub(super) fn leader_started(pid: Pid) {
    lock(&LEADERS).insert(pid.as_raw_nonzero().get());
}

/// Notes that the command `pid` was reaped (or will never be by its job).
pub(super) fn leader_done(pid: Pid) {
    lock(&LEADERS).remove(&pid.as_raw_nonzero().get());
}

/// Exec process trees that may still have processes, in the whole process.
pub fn groups_alive() -> u64 {
    TREES_ALIVE.load(Ordering::Relaxed)
}

/// The process-wide figures of exec handlers now.
pub fn figures() -> Figures {
    Figures {
        trees_alive: TREES_ALIVE.load(Ordering::Relaxed),
        started_in_cgroup: STARTED[Isolation::Cgroup as usize].load(Ordering::Relaxed),
        started_in_process_group: STARTED[Isolation::ProcessGroup as usize].load(Ordering::Relaxed),
        stale_cgroups_killed: STALE_CGROUPS.load(Ordering::Relaxed),
        stale_processes_killed: STALE_PROCESSES.load(Ordering::Relaxed),
        orphans_reaped: ORPHANS_REAPED.load(Ordering::Relaxed),
    }
}

// === impl Reaper ===

impl Reaper {
    /// A reaper with no tree and no task.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that a handler named `name` with this `kill_grace` and isolation uses the reaper.
    pub(super) fn add_handler(&self, name: &str, grace: Duration, isolation: Isolation) {
        let mut max = lock(&self.inner.max_grace);
        *max = (*max).max(grace);
        lock(&self.inner.handlers).push((name.to_owned(), isolation));
    }

    /// Each handler's name and isolation, in registration order.
    pub fn handlers(&self) -> Vec<(String, Isolation)> {
        lock(&self.inner.handlers).clone()
    }

    pub(super) fn track(&self, pgid: Pid, cgroup: Option<Arc<JobCgroup>>) {
        if lock(&self.inner.live).insert(pgid, cgroup).is_none() {
            TREES_ALIVE.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn forget(&self, pgid: Pid) {
        if lock(&self.inner.live).remove(&pgid).is_some() {
            TREES_ALIVE.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Process trees that may still have processes.
    pub fn live_groups(&self) -> usize {
        lock(&self.inner.live).len()
    }

    /// Kill tasks not finished yet.
    pub fn pending_kills(&self) -> usize {
        self.inner.tasks.len()
    }

    /// Kills every tree that may still have processes, at once (SIGKILL to each process group,
    /// `cgroup.kill` to each cgroup); returns how many.
    ///
    /// For a daemon about to exit without waiting (a second signal): kill tasks and their graces are
    /// skipped, and nothing started by a job keeps running.
    pub fn kill_all(&self) -> usize {
        let trees: Vec<(Pid, Option<Arc<JobCgroup>>)> = lock(&self.inner.live).drain().collect();
        TREES_ALIVE.fetch_sub(trees.len() as u64, Ordering::Relaxed);
        for (pgid, cgroup) in &trees {
            let _ = rustix::process::kill_process_group(*pgid, Signal::KILL);
            if let Some(cgroup) = cgroup {
                cgroup.kill();
            }
        }
        trees.len()
    }

    /// Waits for every kill task, at most the longest `kill_grace` plus a second; then kills the
    /// trees still there. Returns how many trees that last step killed.
    pub async fn shutdown(&self) -> usize {
        let grace = *lock(&self.inner.max_grace);
        self.inner.tasks.close();
        let finished = tokio::time::timeout(grace + SHUTDOWN_MARGIN, self.inner.tasks.wait()).await;
        self.inner.tasks.reopen();
        let killed = match finished {
            Ok(()) => 0,
            Err(_) => self.kill_all(),
        };
        if let Some(cgroups) = super::cgroups_found() {
            cgroups.remove_instance_if_unused();
        }
        killed
    }

    /// Starts reaping orphans on the current runtime (once): the daemon is their subreaper.
    ///
    /// An orphan is re-parented to the subreaper's main thread, so the orphans are the children
    /// listed in `/proc/self/task/<pid>/children`; commands are started from the runtime's worker
    /// threads (and listed in [`LEADERS`] in any case), so their exit statuses stay with their jobs.
    pub(super) fn reap_orphans(&self) -> std::io::Result<()> {
        let children = orphans_file();
        std::fs::metadata(&children)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", children.display())))?;
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let task = tokio::spawn(async move {
            reap_orphans_now(&children);
            while sigchld.recv().await.is_some() {
                reap_orphans_now(&children);
                tokio::time::sleep(ORPHAN_SCAN_PAUSE).await;
            }
        });
        // A second call keeps the first task; this one is aborted on drop.
        let _ = self.inner.orphans.set(AbortOnDropHandle::new(task));
        Ok(())
    }
}

/// The list of the main thread's children, where orphans are re-parented.
pub(super) fn orphans_file() -> std::path::PathBuf {
    let main = rustix::process::getpid().as_raw_nonzero().get();
    format!("/proc/self/task/{main}/children").into()
}

/// Reaps the exited orphans among the children listed in `children`.
fn reap_orphans_now(children: &std::path::Path) {
    let Ok(list) = std::fs::read_to_string(children) else {
        return;
    };
    for pid in list
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        if lock(&LEADERS).contains(&pid) {
            continue;
        }
        let Some(pid) = Pid::from_raw(pid) else {
            continue;
        };
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG;
        if let Ok(Some(_)) = rustix::process::waitid(WaitId::Pid(pid), options) {
            ORPHANS_REAPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Locks `m`, whatever a panicking holder left (every value here stays consistent).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
