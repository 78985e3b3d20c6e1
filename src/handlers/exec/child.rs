//! The life of one command's process tree: start it, and when its job goes away, kill and reap it.
//!
//! Every command leads its own process group, and in cgroup mode it also starts inside a cgroup of
//! its own ([`cgroup`](super::cgroup)): one `kill(-pgid, …)` reaches everything that stays in the
//! group, `cgroup.kill` everything it ever started. A job's [`Tree`] lives in the job's future;
//! when that future is dropped for any reason (the job ended, was cancelled, timed out, its call
//! went away, the daemon shuts down) the tree's `Drop` sends SIGTERM to the whole tree at once
//! and hands the rest (waiting `kill_grace`, SIGKILL, reaping the leader, removing the cgroup) to a
//! [`Killer`] task owned by the daemon-wide [`Reaper`]. Shutdown waits for those tasks, and a
//! `Killer` dropped before it finished (the runtime went away) kills at once on its way out.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsFd;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::runtime::Handle;
use tokio::time::Instant;

use super::cgroup::{Cgroups, JobCgroup, Limits};
use super::pipes::{self, Pipes};
use super::reaper::{self, Reaper, STARTED};
use super::spawn::{self, Exit, Request};
use super::Isolation;

/// Longest pause between two checks whether a tree still has processes.
const MAX_POLL: Duration = Duration::from_millis(50);

/// What to start: prepared by the handler, borrowed for the spawn.
pub(super) struct Start<'a> {
    /// Every argument, the program first.
    pub(super) argv: &'a [CString],
    /// The whole environment, `KEY=value`.
    pub(super) env: &'a [CString],
    /// `PATH` of that environment, searched for a program without `/`.
    pub(super) search_path: Option<&'a [u8]>,
    pub(super) cwd: Option<&'a CStr>,
    /// A pipe for the payload; without one, stdin is `/dev/null`.
    pub(super) stdin: bool,
    /// The cgroups to start in, and the job's limits; `None`: process-group mode.
    pub(super) cgroup: Option<(&'a Cgroups, Limits)>,
}

/// A running command and everything it starts. Dropping it kills them all.
pub(super) struct Tree {
    /// The command's own process until it is reaped.
    leader: Option<Leader>,
    pgid: Pid,
    cgroup: Option<Arc<JobCgroup>>,
    grace: Duration,
    reaper: Reaper,
    /// The runtime the command was started on, for the kill task.
    runtime: Handle,
}

/// The command's own process, until it is reaped: listed as a leader meanwhile, so that orphan
/// reaping never takes its exit status.
struct Leader {
    exit: Exit,
    pid: Pid,
}

/// The task that finishes a tree after its job went away: SIGKILL after the grace, reap the leader,
/// remove the cgroup.
struct Killer {
    pgid: Pid,
    leader: Option<Leader>,
    cgroup: Option<Arc<JobCgroup>>,
    grace: Duration,
    reaper: Reaper,
    done: bool,
}

// === impl Tree ===

impl Tree {
    /// Starts the command as the leader of a new process group (in a new cgroup if `start` has
    /// one), with its stdout and stderr piped.
    pub(super) fn spawn(
        start: &Start<'_>,
        grace: Duration,
        reaper: &Reaper,
    ) -> io::Result<(Self, Pipes)> {
        let runtime = Handle::try_current().map_err(io::Error::other)?;
        let cgroup = match &start.cgroup {
            Some((cgroups, limits)) => Some(Arc::new(
                cgroups
                    .create_job(limits)
                    .map_err(|e| context(e, "creating its cgroup"))?,
            )),
            None => None,
        };
        let (pipes, ends) = pipes::open(start.stdin)?;
        let program = start
            .argv
            .first()
            .ok_or_else(|| io::Error::other("no program"))?;
        let spawned = spawn::spawn(&Request {
            program,
            argv: start.argv,
            env: start.env,
            search_path: start.search_path,
            cwd: start.cwd,
            stdio: ends.fds(),
            cgroup_procs: cgroup.as_ref().map(|c| c.procs().as_fd()),
        })
        .map_err(|e| io::Error::new(e.error.kind(), e.to_string()))?;
        drop(ends);
        let mode = if cgroup.is_some() {
            Isolation::Cgroup
        } else {
            Isolation::ProcessGroup
        };
        STARTED[mode as usize].fetch_add(1, Ordering::Relaxed);
        let pgid = spawned.pid;
        reaper::leader_started(pgid);
        let leader = match Exit::register(spawned.pidfd) {
            Ok(exit) => Leader { exit, pid: pgid },
            Err(e) => {
                kill(pgid, cgroup.as_deref());
                spawn::reap_blocking(pgid);
                reaper::leader_done(pgid);
                return Err(context(e, "watching its exit"));
            }
        };
        reaper.track(pgid, cgroup.clone());
        // From here on, dropping the tree kills it.
        let tree = Self {
            leader: Some(leader),
            pgid,
            cgroup,
            grace,
            reaper: reaper.clone(),
            runtime,
        };
        Ok((tree, pipes))
    }

    /// The process group id (the leader's pid).
    pub(super) fn pgid(&self) -> Pid {
        self.pgid
    }

    /// Waits for the leader to exit and reaps it. Cancel-safe.
    pub(super) async fn wait(&mut self) -> io::Result<ExitStatus> {
        let Some(leader) = &self.leader else {
            return Err(io::Error::other("the command was already reaped"));
        };
        let status = leader.wait().await?;
        self.leader = None;
        Ok(status)
    }

    /// Sends `signal` once to every process of the tree: the group, and in cgroup mode the rest of
    /// the cgroup. (Twice would be wrong: many programs take a second SIGTERM as "stop at once".)
    pub(super) fn signal(&self, signal: Signal) {
        let _ = rustix::process::kill_process_group(self.pgid, signal);
        if let Some(cgroup) = &self.cgroup {
            cgroup.signal_outside(signal, self.pgid);
        }
    }

    /// SIGKILLs everything of the tree at once.
    pub(super) fn kill(&self) {
        kill(self.pgid, self.cgroup.as_deref());
    }

    /// Its cgroup, in cgroup mode.
    pub(super) fn cgroup(&self) -> Option<&JobCgroup> {
        self.cgroup.as_deref()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        // After a normal exit the leader is reaped and usually nothing is left: the cgroup is
        // removed at once (rmdir fails while a process is in it), or the group's kill(2) fails
        // with ESRCH. Otherwise SIGTERM reaches the whole tree now, while the job's slot is being
        // released, and the rest is the kill task's.
        let leader = self.leader.take();
        let anything_left = match &self.cgroup {
            Some(cgroup) => {
                let left = leader.is_some() || cgroup.remove().is_err();
                if left {
                    self.signal(Signal::TERM);
                }
                left
            }
            None => {
                rustix::process::kill_process_group(self.pgid, Signal::TERM).is_ok()
                    || leader.is_some()
            }
        };
        if !anything_left {
            self.reaper.forget(self.pgid);
            return;
        }
        let killer = Killer {
            pgid: self.pgid,
            leader,
            cgroup: self.cgroup.take(),
            grace: self.grace,
            reaper: self.reaper.clone(),
            done: false,
        };
        // If the runtime is shutting down the task is dropped at once, and its Drop kills.
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
        if let Some(leader) = &self.leader {
            if tokio::time::timeout_at(deadline, leader.wait())
                .await
                .is_ok()
            {
                self.leader = None;
            }
        }
        // The leader is gone (or ignores SIGTERM); the rest may still be exiting. They are not our
        // children, so there is nothing to wait on: poll, backing off.
        let mut pause = Duration::from_millis(1);
        let mut killed = false;
        while self.anything_left() {
            let now = Instant::now();
            if !killed && now >= deadline {
                tracing::debug!(
                    pgid = self.pgid.as_raw_nonzero().get(),
                    "SIGKILL after kill_grace"
                );
                kill(self.pgid, self.cgroup.as_deref());
                killed = true;
                pause = Duration::from_millis(1);
                // In process-group mode a zombie that nobody reaps keeps the group: SIGKILL was the
                // last word. A cgroup empties once its processes have died.
                if self.cgroup.is_none() {
                    break;
                }
            }
            let wait = if killed {
                pause
            } else {
                pause.min(deadline - now)
            };
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(MAX_POLL);
        }
        if let Some(leader) = &self.leader {
            let _ = leader.wait().await;
            self.leader = None;
        }
        if let Some(cgroup) = &self.cgroup {
            let _ = cgroup.remove();
        }
        self.done = true;
        self.reaper.forget(self.pgid);
    }

    /// Whether a process of the tree is still there: in its cgroup (zombies are not), or in its
    /// process group (zombies are).
    fn anything_left(&self) -> bool {
        match &self.cgroup {
            Some(cgroup) => cgroup.populated(),
            None => rustix::process::test_kill_process_group(self.pgid).is_ok(),
        }
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        if !self.done {
            // Cut short (the runtime is going away): no time for a grace period.
            kill(self.pgid, self.cgroup.as_deref());
            self.reaper.forget(self.pgid);
        }
    }
}

// === impl Leader ===

impl Leader {
    /// Waits until the command has exited, and reaps it. Cancel-safe.
    async fn wait(&self) -> io::Result<ExitStatus> {
        self.exit.wait().await
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Reaped, or given up on (a kill task cut short): either way no job waits for it now.
        reaper::leader_done(self.pid);
    }
}

/// SIGKILL to the process group, and `cgroup.kill` to the cgroup if there is one.
fn kill(pgid: Pid, cgroup: Option<&JobCgroup>) {
    let _ = rustix::process::kill_process_group(pgid, Signal::KILL);
    if let Some(cgroup) = cgroup {
        cgroup.kill();
    }
}

/// `e` with what was being done.
fn context(e: io::Error, doing: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{doing}: {e}"))
}
