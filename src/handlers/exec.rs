//! Exec handlers: operator-configured commands, run once per job, each in a cgroup of its own where
//! batchd can make one, else in a process group of its own.
//!
//! - [`spec`](ExecSpec): the `[[exec]]` config table and its validation (`spec.rs`).
//! - `child.rs`: a job's process tree: start it, SIGTERM/SIGKILL/reap it when the job goes away.
//! - `reaper.rs`: the daemon-wide [`Reaper`] that owns those kill tasks and reaps orphans, and the
//!   process-wide [`figures`].
//! - `cgroup.rs`: a cgroup v2 per job, `cgroup.kill`, limits, the clean-up after a crash.
//! - `spawn.rs`: starting a command (clone, vfork-style) with the parent-death signal, its process
//!   group and its cgroup set before it runs: the one module with `unsafe`.
//! - `pipes.rs`: payload to stdin, stdout capped at `max_output`, the tail of stderr.
//!
//! There is no shell: the command is run with `execve`, and a param's value becomes one whole
//! argument where the command has its `{param}` placeholder, after matching the param's regex.

mod cgroup;
mod child;
mod pipes;
mod reaper;
mod spawn;
mod spec;

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitStatus;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rustix::process::Signal;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use reaper::{figures, groups_alive, Figures, Reaper};
pub use spec::{validate, ExecSpec, IsolationSetting, SpecError, Template, MAX_KILL_GRACE};

use super::{Handler, HandlerError, JobContext, JobInput, Params, Registry};
use cgroup::{Cgroups, Controllers, Limits};
use child::{Start, Tree};
use pipes::Pipes;

/// How a job's processes are held together, so that stopping the job stops them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// A cgroup v2 per job: `cgroup.kill` reaches every descendant, however it detached.
    Cgroup = 0,
    /// A process group per job: a descendant that calls `setsid`/`setpgid` leaves it.
    ProcessGroup = 1,
}

/// Runs one `[[exec]]` command per job: the payload on its stdin, its stdout as the output.
pub struct Exec {
    name: String,
    description: String,
    /// The command line and the param rules.
    template: Template,
    timeout: Duration,
    max_output: usize,
    kill_grace: Duration,
    /// The whole environment of the command (`KEY=value`): the daemon's `PATH`, then the spec's.
    env: Vec<CString>,
    /// `PATH` of that environment.
    search_path: Option<Vec<u8>>,
    cwd: Option<CString>,
    /// The handler's own concurrency cap.
    permits: Option<Semaphore>,
    reaper: Reaper,
    isolation: Isolation,
    limits: Limits,
}

/// The cgroups of this process: found (and the instance directory made) on first use.
static CGROUPS: OnceLock<Result<Cgroups, String>> = OnceLock::new();

/// This process's cgroups, or why there are none.
fn cgroups() -> Result<&'static Cgroups, &'static str> {
    CGROUPS
        .get_or_init(Cgroups::detect)
        .as_ref()
        .map_err(String::as_str)
}

/// This process's cgroups, if they were looked for and found (looks for nothing itself).
fn cgroups_found() -> Option<&'static Cgroups> {
    CGROUPS.get().and_then(|c| c.as_ref().ok())
}

/// The isolation that handlers with `isolation = "auto"` get in this process; `None` until exec
/// handlers or [`start_up`] first looked for a cgroup v2 subtree.
pub fn isolation() -> Option<Isolation> {
    CGROUPS.get().map(|c| match c {
        Ok(_) => Isolation::Cgroup,
        Err(_) => Isolation::ProcessGroup,
    })
}

/// Adds a handler for every spec to `registry`; returns the reaper that shutdown must wait for.
///
/// Fails on an invalid spec, a name the registry already has, or isolation or limits this system
/// cannot give (`isolation = "cgroup"` without a writable cgroup v2 subtree, `memory_max` without
/// the memory controller).
pub fn register(registry: &mut Registry, specs: &[ExecSpec]) -> Result<Reaper, SpecError> {
    let reaper = Reaper::new();
    for spec in specs {
        if registry.get(&spec.name).is_some() {
            return Err(spec.error("name", "is already the name of another handler"));
        }
        let exec = match Exec::new(spec, &reaper) {
            Ok(exec) => exec,
            Err(e) => {
                // The daemon will not start: leave no empty instance directory behind.
                if let Some(cgroups) = cgroups_found() {
                    cgroups.remove_instance_if_unused();
                }
                return Err(e);
            }
        };
        registry.register(spec.name.clone(), exec);
    }
    Ok(reaper)
}

/// Sets the daemon up for exec handlers, once, on its runtime, before it serves.
///
/// - Makes the daemon the subreaper of everything its commands start: an orphaned descendant is
///   re-parented to batchd rather than to PID 1, and batchd reaps it (no zombies, also when batchd
///   is PID 1 of a container).
/// - Kills what the jobs of a crashed instance left in their cgroups, and removes those (logged,
///   and counted in [`figures`]).
/// - Logs the isolation in force and each handler's.
///
/// Orphans are re-parented to the process's main thread, and reaping them takes every exited child
/// of that thread: call it only in a process whose main thread starts no children of its own (the
/// batchd binary, not a test harness), and start exec jobs from runtime worker threads.
pub fn start_up(reaper: &Reaper) {
    // Reaping first: a subreaper that does not reap would collect zombies.
    if let Err(e) = reaper.reap_orphans().and_then(|()| {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .map_err(std::io::Error::from)
    }) {
        tracing::warn!("cannot become the subreaper of exec commands: {e}");
    }
    match cgroups() {
        Ok(cgroups) => {
            let stale = cgroups.kill_stale();
            reaper::STALE_CGROUPS.fetch_add(stale.cgroups, std::sync::atomic::Ordering::Relaxed);
            reaper::STALE_PROCESSES
                .fetch_add(stale.processes, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                mode = Isolation::Cgroup.as_str(),
                cgroup = %cgroups.instance().display(),
                stale_instances = stale.instances,
                stale_cgroups_killed = stale.cgroups,
                stale_processes_killed = stale.processes,
                "exec isolation: a cgroup per job"
            );
        }
        Err(why) => tracing::info!(
            mode = Isolation::ProcessGroup.as_str(),
            reason = why,
            "exec isolation: a process group per job (no cgroup v2 subtree batchd can write)"
        ),
    }
    for (handler, isolation) in reaper.handlers() {
        tracing::info!(handler, isolation = isolation.as_str(), "exec handler");
    }
}

// === impl Isolation ===

impl Isolation {
    /// Every mode, in the order of their numbers.
    pub const ALL: [Isolation; 2] = [Isolation::Cgroup, Isolation::ProcessGroup];

    /// The mode's name in logs and metrics: `cgroup` or `process-group`.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Cgroup => "cgroup",
            Isolation::ProcessGroup => "process-group",
        }
    }
}

// === impl Exec ===

impl Exec {
    /// A handler running `spec`, whose stopped process trees `reaper` finishes off.
    ///
    /// Fails on an invalid spec, and on isolation or limits this system cannot give.
    pub fn new(spec: &ExecSpec, reaper: &Reaper) -> Result<Self, SpecError> {
        let template = spec.compile()?;
        let isolation = choose_isolation(spec)?;
        let vars = environment(std::env::var_os("PATH"), &spec.env);
        let search_path = vars
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_bytes().to_vec());
        let env = vars
            .iter()
            .map(|(k, v)| {
                let mut var = k.as_bytes().to_vec();
                var.push(b'=');
                var.extend_from_slice(v.as_bytes());
                CString::new(var).map_err(|_| spec.error("env", "contains a NUL byte"))
            })
            .collect::<Result<_, _>>()?;
        let cwd = match &spec.cwd {
            Some(dir) => Some(
                CString::new(dir.as_os_str().as_bytes())
                    .map_err(|_| spec.error("cwd", "contains a NUL byte"))?,
            ),
            None => None,
        };
        reaper.add_handler(&spec.name, spec.kill_grace, isolation);
        Ok(Self {
            name: spec.name.clone(),
            description: spec.describe(),
            template,
            timeout: spec.timeout,
            max_output: spec.max_output.as_usize(),
            kill_grace: spec.kill_grace,
            env,
            search_path,
            cwd,
            permits: spec.concurrency.map(Semaphore::new),
            reaper: reaper.clone(),
            isolation,
            limits: Limits {
                memory_max: spec.memory_max.map(|m| m.0),
                pids_max: spec.pids_max,
            },
        })
    }

    /// Where the job's command starts: its cgroups and limits, or `None` for a process group only.
    fn cgroup(&self) -> Option<(&'static Cgroups, Limits)> {
        match self.isolation {
            Isolation::Cgroup => cgroups().ok().map(|c| (c, self.limits)),
            Isolation::ProcessGroup => None,
        }
    }
}

#[async_trait::async_trait]
impl Handler for Exec {
    fn description(&self) -> &str {
        &self.description
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        self.template.check(params)
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }

    async fn run(self: Arc<Self>, input: JobInput, ctx: JobContext) -> Result<Bytes, HandlerError> {
        self.template.check(&input.params).map_err(HandlerError)?;
        // Waiting for the handler's own cap stays cancellable: the job's future is simply dropped.
        let _permit = match &self.permits {
            Some(permits) => Some(
                permits
                    .acquire()
                    .await
                    .map_err(|_| HandlerError("the handler is closed".into()))?,
            ),
            None => None,
        };
        let argv = self.template.argv(&input.params)?;
        let start = Start {
            argv: &argv,
            env: &self.env,
            search_path: self.search_path.as_deref(),
            cwd: self.cwd.as_deref(),
            stdin: !input.payload.is_empty(),
            cgroup: self.cgroup(),
        };
        let (tree, pipes) = Tree::spawn(&start, self.kill_grace, &self.reaper).map_err(|e| {
            HandlerError(format!("cannot start {:?}: {e}", self.template.program()))
        })?;
        drop(argv);
        let pid = tree.pgid().as_raw_pid();
        tracing::trace!(handler = %self.name, pid, "started");
        record_start(ctx.span(), self.template.program(), pid);
        let exchange = exchange(
            tree,
            pipes,
            input.payload,
            self.max_output,
            self.kill_grace,
            self.limits,
            ctx.span(),
        );
        // The engine enforces the handler's timeout (see `Handler::timeout`): on expiry it drops this
        // future, and with it the group, which kills the process group; the job ends TIMED_OUT.
        exchange.await
    }
}

/// The isolation `spec` asks for and this system can give, with its limits' controllers enabled.
fn choose_isolation(spec: &ExecSpec) -> Result<Isolation, SpecError> {
    let cgroups = match spec.isolation {
        IsolationSetting::ProcessGroup => return Ok(Isolation::ProcessGroup),
        IsolationSetting::Auto if !spec.has_limits() => match cgroups() {
            Ok(cgroups) => cgroups,
            Err(_) => return Ok(Isolation::ProcessGroup),
        },
        IsolationSetting::Auto | IsolationSetting::Cgroup => {
            let field = match (spec.isolation, spec.memory_max) {
                (IsolationSetting::Cgroup, _) => "isolation",
                (_, Some(_)) => "memory_max",
                _ => "pids_max",
            };
            cgroups()
                .map_err(|why| spec.error(field, format!("needs a cgroup per job, but {why}")))?
        }
    };
    let need = Controllers {
        memory: spec.memory_max.is_some(),
        pids: spec.pids_max.is_some(),
    };
    cgroups.enable(need).map_err(|why| {
        let field = if need.memory {
            "memory_max"
        } else {
            "pids_max"
        };
        spec.error(field, why)
    })?;
    Ok(Isolation::Cgroup)
}

/// A command's whole environment: the daemon's `PATH` (when it has one), then the spec's variables,
/// which may replace it.
fn environment(
    path: Option<OsString>,
    spec: &BTreeMap<String, String>,
) -> Vec<(OsString, OsString)> {
    let mut env: BTreeMap<OsString, OsString> = BTreeMap::new();
    if let Some(path) = path {
        env.insert("PATH".into(), path);
    }
    for (key, value) in spec {
        env.insert(key.into(), value.into());
    }
    env.into_iter().collect()
}

/// Records the command's name and pid on the job's span (fields the engine's job span declares; a
/// no-op for untraced jobs).
fn record_start(span: &tracing::Span, command: &str, pid: i32) {
    if !span.is_disabled() {
        span.record("exec.command", command);
        span.record("exec.pid", pid);
    }
}

/// Records the command's exit status on the job's span.
fn record_exit(span: &tracing::Span, status: &ExitStatus) {
    if !span.is_disabled() {
        span.record("exec.exit_status", tracing::field::display(status));
    }
}

/// Feeds the payload, collects stdout and the tail of stderr, and waits for the command's exit, all
/// at once: a command may not read all of its input before it writes its output.
///
/// Owns the tree: when this future is dropped, the tree is dropped first (it is the last local
/// declared), so SIGTERM goes out before the pipes and the timer are torn down.
async fn exchange(
    tree: Tree,
    pipes: Pipes,
    payload: Bytes,
    max_output: usize,
    grace: Duration,
    limits: Limits,
    span: &tracing::Span,
) -> Result<Bytes, HandlerError> {
    let Pipes {
        stdin,
        stdout,
        stderr,
    } = pipes;
    let io = async move {
        let feed = async move {
            match stdin {
                Some(stdin) => pipes::feed(stdin, payload).await,
                None => Ok(()),
            }
        };
        let ((), out, tail) = tokio::try_join!(
            feed,
            pipes::read_capped(stdout, max_output),
            pipes::read_tail(stderr),
        )?;
        Ok::<_, HandlerError>((out, tail))
    };
    tokio::pin!(io);
    let kill_at = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(kill_at);
    let mut kill_armed = false;
    let mut output = None;
    let mut status: Option<ExitStatus> = None;
    let mut tree = tree;
    while output.is_none() || status.is_none() {
        tokio::select! {
            res = &mut io, if output.is_none() => output = Some(res?),
            res = tree.wait(), if status.is_none() => {
                let exited = res
                    .map_err(|e| HandlerError(format!("waiting for the command: {e}")))?;
                record_exit(span, &exited);
                status = Some(exited);
                if output.is_none() {
                    // The command exited, but something it started still holds its stdout or
                    // stderr open: the rest of its tree goes now, as after a cancel.
                    tree.signal(Signal::TERM);
                    kill_at.as_mut().reset(Instant::now() + grace);
                    kill_armed = true;
                }
            }
            () = &mut kill_at, if kill_armed => {
                tree.kill();
                kill_armed = false;
            }
        }
    }
    match (output, status) {
        (Some((out, _)), Some(status)) if status.success() => Ok(out),
        (Some((_, tail)), Some(status)) => {
            Err(HandlerError(failure(tree.cgroup(), status, &tail, limits)))
        }
        _ => Err(HandlerError("the command's end was not seen".into())),
    }
}

/// Why a command failed: out of memory (its cgroup's OOM killer acted), or its exit status, with
/// the end of stderr.
fn failure(
    cgroup: Option<&cgroup::JobCgroup>,
    status: ExitStatus,
    tail: &pipes::Tail,
    limits: Limits,
) -> String {
    if let (Some(max), Some(cgroup)) = (limits.memory_max, cgroup) {
        if cgroup.oom_kills() > 0 {
            return format!(
                "out of memory: the job reached memory_max ({}) and the kernel killed it ({status}); {}",
                crate::units::ByteSize(max),
                tail.describe()
            );
        }
    }
    let pids = match (limits.pids_max, cgroup) {
        (Some(max), Some(cgroup)) => match cgroup.pids_max_hits() {
            0 => String::new(),
            hits => format!("; pids_max ({max}) stopped {hits} fork(s)"),
        },
        _ => String::new(),
    };
    format!("the command failed ({status}){pids}; {}", tail.describe())
}

#[cfg(test)]
mod tests;
