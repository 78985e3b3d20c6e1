//! Exec handlers: operator-configured commands, run once per job, each in a process group of its own.
//!
//! - [`spec`](ExecSpec): the `[[exec]]` config table and its validation (`spec.rs`).
//! - `child.rs`: the process group's life: spawn, SIGTERM/SIGKILL/reap when the job goes away, the
//!   daemon-wide [`Reaper`] that owns those kill tasks, the parent-death signal.
//! - `pipes.rs`: payload to stdin, stdout capped at `max_output`, the tail of stderr.
//!
//! There is no shell: the command is run with `execve`, and a param's value becomes one whole
//! argument where the command has its `{param}` placeholder, after matching the param's regex.

mod child;
mod pipes;
mod spec;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustix::process::Signal;
use tokio::process::Command;
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use child::{groups_alive, Reaper};
pub use spec::{validate, ExecSpec, SpecError, MAX_KILL_GRACE};

use super::{quote, Handler, HandlerError, JobContext, JobInput, Params, Registry};
use child::{Group, Pipes};
use spec::{Arg, Rule};

/// Runs one `[[exec]]` command per job: the payload on its stdin, its stdout as the output.
pub struct Exec {
    name: String,
    description: String,
    argv: Vec<Arg>,
    rules: BTreeMap<String, Rule>,
    timeout: Duration,
    max_output: usize,
    kill_grace: Duration,
    /// The whole environment of the command: the daemon's `PATH`, then the spec's variables.
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    /// The handler's own concurrency cap.
    permits: Option<Semaphore>,
    reaper: Reaper,
}

/// Adds a handler for every spec to `registry`; returns the reaper that shutdown must wait for.
///
/// Fails on an invalid spec or a name the registry already has.
pub fn register(registry: &mut Registry, specs: &[ExecSpec]) -> Result<Reaper, SpecError> {
    let reaper = Reaper::new();
    for spec in specs {
        if registry.get(&spec.name).is_some() {
            return Err(spec.error("name", "is already the name of another handler"));
        }
        let exec = Exec::new(spec, &reaper)?;
        registry.register(spec.name.clone(), exec);
    }
    Ok(reaper)
}

// === impl Exec ===

impl Exec {
    /// A handler running `spec`, whose stopped process groups `reaper` finishes off.
    pub fn new(spec: &ExecSpec, reaper: &Reaper) -> Result<Self, SpecError> {
        let compiled = spec.compile()?;
        let env = environment(std::env::var_os("PATH"), &spec.env);
        reaper.allow_grace(spec.kill_grace);
        Ok(Self {
            name: spec.name.clone(),
            description: spec.describe(),
            argv: compiled.argv,
            rules: compiled.rules,
            timeout: spec.timeout,
            max_output: spec.max_output.as_usize(),
            kill_grace: spec.kill_grace,
            env,
            cwd: spec.cwd.clone(),
            permits: spec.concurrency.map(Semaphore::new),
            reaper: reaper.clone(),
        })
    }

    /// Why `params` cannot run this command: an unknown or missing param, or a value its rule refuses.
    fn check_params(&self, params: &Params) -> Result<(), String> {
        if let Some(unknown) = params.keys().filter(|k| !self.rules.contains_key(*k)).min() {
            let takes = if self.rules.is_empty() {
                "none".to_owned()
            } else {
                let names: Vec<&str> = self.rules.keys().map(String::as_str).collect();
                names.join(", ")
            };
            return Err(format!(
                "unknown param {} (this handler takes {takes})",
                quote(unknown)
            ));
        }
        for (name, rule) in &self.rules {
            let Some(value) = params.get(name) else {
                return Err(format!("missing param {name:?}"));
            };
            if value.contains('\0') || !rule.regex.is_match(value) {
                return Err(format!(
                    "param {name:?}: {} does not match {:?}",
                    quote(value),
                    rule.source
                ));
            }
        }
        Ok(())
    }

    /// The program, as configured.
    fn program(&self) -> &str {
        match self.argv.first() {
            Some(Arg::Literal(p)) => p,
            _ => "",
        }
    }

    /// The command line with `params` (already checked) in place of the placeholders.
    fn command(&self, params: &Params) -> Command {
        let mut args = self.argv.iter().map(|arg| match arg {
            Arg::Literal(s) => s.as_str(),
            Arg::Param(p) => params.get(p).map_or("", String::as_str),
        });
        let mut cmd = Command::new(args.next().unwrap_or_default());
        cmd.args(args).env_clear().envs(self.env.iter().cloned());
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        cmd
    }
}

#[async_trait::async_trait]
impl Handler for Exec {
    fn description(&self) -> &str {
        &self.description
    }

    fn check(&self, params: &Params) -> Result<(), String> {
        self.check_params(params)
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }

    async fn run(self: Arc<Self>, input: JobInput, ctx: JobContext) -> Result<Bytes, HandlerError> {
        self.check_params(&input.params).map_err(HandlerError)?;
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
        let mut cmd = self.command(&input.params);
        let (group, pipes) = Group::spawn(&mut cmd, self.kill_grace, &self.reaper)
            .map_err(|e| HandlerError(format!("cannot start {:?}: {e}", self.program())))?;
        tracing::trace!(handler = %self.name, pgid = group.pgid().as_raw_pid(), "started");
        record_start(ctx.span(), self.program(), group.pgid().as_raw_pid());
        let exchange = exchange(
            group,
            pipes,
            input.payload,
            self.max_output,
            self.kill_grace,
            ctx.span(),
        );
        // The engine enforces the handler's timeout (see `Handler::timeout`): on expiry it drops this
        // future, and with it the group, which kills the process group; the job ends TIMED_OUT.
        exchange.await
    }
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
/// Owns the group: when this future is dropped, the group is dropped first (it is the last local
/// declared), so SIGTERM goes out before the pipes and the timer are torn down.
async fn exchange(
    group: Group,
    pipes: Pipes,
    payload: Bytes,
    max_output: usize,
    grace: Duration,
    span: &tracing::Span,
) -> Result<Bytes, HandlerError> {
    let Pipes {
        stdin,
        stdout,
        stderr,
    } = pipes;
    let io = async move {
        let ((), out, tail) = tokio::try_join!(
            pipes::feed(stdin, payload),
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
    let mut group = group;
    while output.is_none() || status.is_none() {
        tokio::select! {
            res = &mut io, if output.is_none() => output = Some(res?),
            res = group.wait(), if status.is_none() => {
                let exited = res
                    .map_err(|e| HandlerError(format!("waiting for the command: {e}")))?;
                record_exit(span, &exited);
                status = Some(exited);
                if output.is_none() {
                    // The command exited, but something it started still holds its stdout or
                    // stderr open: the rest of its group goes now, as after a cancel.
                    group.signal(Signal::TERM);
                    kill_at.as_mut().reset(Instant::now() + grace);
                    kill_armed = true;
                }
            }
            () = &mut kill_at, if kill_armed => {
                group.signal(Signal::KILL);
                kill_armed = false;
            }
        }
    }
    match (output, status) {
        (Some((out, _)), Some(status)) if status.success() => Ok(out),
        (Some((_, tail)), Some(status)) => Err(HandlerError(format!(
            "the command failed ({status}); {}",
            tail.describe()
        ))),
        _ => Err(HandlerError("the command's end was not seen".into())),
    }
}

#[cfg(test)]
mod tests;
