//! The life of one command's process group: spawn it, and when its job goes away, kill and reap it.
//!
//! Every command runs as the leader of its own process group, so that one `kill(-pgid, …)` reaches
//! everything it started (unless a descendant moves itself to another group or session). A job's
//! [`Group`] lives in the job's future; when that future is dropped for any reason (the job ended,
//! was cancelled, timed out, its call went away, the daemon shuts down) the group's `Drop` sends
//! SIGTERM to the whole group at once and hands the rest (waiting `kill_grace`, SIGKILL, reaping the
//! leader) to a [`Killer`] task owned by the daemon-wide [`Reaper`]. Shutdown waits for those tasks,
//! and a `Killer` dropped before it finished (the runtime went away) sends SIGKILL on its way out.

use std::collections::HashSet;
use std::io;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// Longest pause between two checks whether a group still has members.
const MAX_POLL: Duration = Duration::from_millis(50);
/// What shutdown waits for kill tasks beyond the longest `kill_grace`.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(1);

/// Finishes killing the process groups of jobs that went away; shared by every exec handler.
///
/// Cheap to clone. The daemon calls [`Reaper::shutdown`] after serving so that no group outlives it.
#[derive(Debug, Clone, Default)]
pub struct Reaper {
    inner: Arc<ReaperInner>,
}

#[derive(Debug, Default)]
struct ReaperInner {
    /// Every [`Killer`] task.
    tasks: TaskTracker,
    /// Process groups that may still have members: spawned and not yet seen empty.
    groups: Mutex<HashSet<Pid>>,
    /// The longest `kill_grace` of the handlers using this reaper.
    max_grace: Mutex<Duration>,
}

/// Process groups that may still have members, over every reaper of the process (a metric).
static GROUPS_ALIVE: AtomicU64 = AtomicU64::new(0);

/// Exec process groups that may still have members, in the whole process.
pub fn groups_alive() -> u64 {
    GROUPS_ALIVE.load(Ordering::Relaxed)
}

/// A running command: the leader of its own process group. Dropping it kills the group.
pub(super) struct Group {
    /// The leader until it is reaped.
    child: Option<Child>,
    pgid: Pid,
    grace: Duration,
    reaper: Reaper,
    /// The runtime the command was spawned on, for the kill task.
    runtime: Handle,
}

/// The command's standard streams.
pub(super) struct Pipes {
    pub(super) stdin: ChildStdin,
    pub(super) stdout: ChildStdout,
    pub(super) stderr: ChildStderr,
}

/// The task that finishes a group after its job went away: SIGKILL after the grace, reap the leader.
struct Killer {
    pgid: Pid,
    child: Option<Child>,
    grace: Duration,
    reaper: Reaper,
    done: bool,
}

// === impl Reaper ===

impl Reaper {
    /// A reaper with no group and no task.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that a handler with this `kill_grace` uses the reaper (shutdown waits for the longest).
    pub(super) fn allow_grace(&self, grace: Duration) {
        let mut max = self
            .inner
            .max_grace
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *max = (*max).max(grace);
    }

    fn groups(&self) -> std::sync::MutexGuard<'_, HashSet<Pid>> {
        self.inner
            .groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn track(&self, pgid: Pid) {
        if self.groups().insert(pgid) {
            GROUPS_ALIVE.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn forget(&self, pgid: Pid) {
        if self.groups().remove(&pgid) {
            GROUPS_ALIVE.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Process groups that may still have members.
    pub fn live_groups(&self) -> usize {
        self.groups().len()
    }

    /// Kill tasks not finished yet.
    pub fn pending_kills(&self) -> usize {
        self.inner.tasks.len()
    }

    /// Sends SIGKILL to every group that may still have members, at once; returns how many.
    ///
    /// For a daemon about to exit without waiting (a second signal): kill tasks and their graces are
    /// skipped, and nothing started by a job keeps running.
    pub fn kill_all(&self) -> usize {
        let groups: Vec<Pid> = self.groups().drain().collect();
        GROUPS_ALIVE.fetch_sub(groups.len() as u64, Ordering::Relaxed);
        for pgid in &groups {
            let _ = rustix::process::kill_process_group(*pgid, Signal::KILL);
        }
        groups.len()
    }

    /// Waits for every kill task, at most the longest `kill_grace` plus a second; then SIGKILLs the
    /// groups still there. Returns how many groups that last step killed.
    pub async fn shutdown(&self) -> usize {
        let grace = *self
            .inner
            .max_grace
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner.tasks.close();
        let finished = tokio::time::timeout(grace + SHUTDOWN_MARGIN, self.inner.tasks.wait()).await;
        self.inner.tasks.reopen();
        match finished {
            Ok(()) => 0,
            Err(_) => self.kill_all(),
        }
    }
}

// === impl Group ===

impl Group {
    /// Spawns `cmd` as the leader of a new process group with piped stdio.
    pub(super) fn spawn(
        cmd: &mut Command,
        grace: Duration,
        reaper: &Reaper,
    ) -> io::Result<(Self, Pipes)> {
        let runtime = Handle::try_current().map_err(io::Error::other)?;
        cmd.process_group(0)
            .kill_on_drop(false)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        parent_death_signal(cmd);
        let mut child = cmd.spawn()?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);
        let Some(pgid) = pid else {
            // Cannot happen for a child that was never waited for; kill it rather than lose it.
            let _ = child.start_kill();
            return Err(io::Error::other("the started command has no process id"));
        };
        reaper.track(pgid);
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        // From here on, dropping the group kills it.
        let group = Self {
            child: Some(child),
            pgid,
            grace,
            reaper: reaper.clone(),
            runtime,
        };
        match pipes {
            (Some(stdin), Some(stdout), Some(stderr)) => Ok((
                group,
                Pipes {
                    stdin,
                    stdout,
                    stderr,
                },
            )),
            _ => Err(io::Error::other("the started command has no pipes")),
        }
    }

    /// The process group id (the leader's pid).
    pub(super) fn pgid(&self) -> Pid {
        self.pgid
    }

    /// Waits for the leader to exit and reaps it. Cancel-safe.
    pub(super) async fn wait(&mut self) -> io::Result<ExitStatus> {
        let Some(child) = &mut self.child else {
            return Err(io::Error::other("the command was already reaped"));
        };
        let status = child.wait().await?;
        self.child = None;
        Ok(status)
    }

    /// Sends `signal` to every process of the group.
    pub(super) fn signal(&self, signal: Signal) {
        let _ = rustix::process::kill_process_group(self.pgid, signal);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // After a normal exit the leader is reaped and the group is usually empty: then this kill(2)
        // fails with ESRCH and nothing is left to do. Otherwise SIGTERM reaches the whole group now,
        // while the job's slot is being released, and the rest is the kill task's.
        let child = self.child.take();
        let signalled = rustix::process::kill_process_group(self.pgid, Signal::TERM).is_ok();
        if child.is_none() && !signalled {
            self.reaper.forget(self.pgid);
            return;
        }
        let killer = Killer {
            pgid: self.pgid,
            child,
            grace: self.grace,
            reaper: self.reaper.clone(),
            done: false,
        };
        // If the runtime is shutting down the task is dropped at once, and its Drop sends SIGKILL.
        self.reaper
            .inner
            .tasks
            .spawn_on(killer.run(), &self.runtime);
    }
}

// === impl Killer ===

impl Killer {
    async fn run(mut self) {
        let deadline = Instant::now() + self.grace;
        if let Some(child) = &mut self.child {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_ok()
            {
                self.child = None;
            }
        }
        // The leader is gone (or ignores SIGTERM); others of the group may still be exiting. They
        // are not our children, so there is nothing to wait on: poll, backing off.
        let mut pause = Duration::from_millis(1);
        while group_exists(self.pgid) {
            let now = Instant::now();
            if now >= deadline {
                tracing::debug!(pgid = self.pgid.as_raw_pid(), "SIGKILL after kill_grace");
                let _ = rustix::process::kill_process_group(self.pgid, Signal::KILL);
                break;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
        if let Some(child) = &mut self.child {
            let _ = child.wait().await;
            self.child = None;
        }
        self.done = true;
        self.reaper.forget(self.pgid);
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        if !self.done {
            // Cut short (the runtime is going away): no time for a grace period.
            let _ = rustix::process::kill_process_group(self.pgid, Signal::KILL);
            self.reaper.forget(self.pgid);
        }
    }
}

/// Whether any process (zombies included) is still in the group.
fn group_exists(pgid: Pid) -> bool {
    rustix::process::test_kill_process_group(pgid).is_ok()
}

/// Makes the kernel SIGKILL the command when the daemon dies, even by `kill -9` (Linux only).
///
/// PR_SET_PDEATHSIG has to be set in the child between fork and exec, hence `pre_exec`, the one
/// `unsafe` of batchd. Its scope: the signal fires when the *thread* that forked the child ends.
/// Commands are spawned from tokio's worker threads, which live as long as the runtime, so in
/// practice it fires when the daemon dies. It reaches the direct child only: the setting is not
/// inherited across fork, so grandchildren of a daemon killed with SIGKILL live on (a daemon that
/// exits normally kills whole groups first).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn parent_death_signal(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // operations are allowed. It makes two raw system calls through rustix (prctl and getppid) and
    // builds an io::Error from an errno: no allocation, no lock, no access to any state that another
    // thread of the parent could have left inconsistent at the fork.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // The daemon may have died between fork and prctl: then no signal would ever come.
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn parent_death_signal(_cmd: &mut Command) {}
