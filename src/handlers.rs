//! The `Handler` trait that runs one job, and the registry that names handlers for clients.
//!
//! Built-in handlers live in `builtin.rs`; [`exec`] runs operator-configured commands.

mod builtin;
mod cpu;
pub mod exec;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use builtin::{Echo, Sha256, Sleep, Spin};
pub use cpu::CpuPool;

/// A job's parameters, as sent by the client.
pub type Params = HashMap<String, String>;

/// What a handler receives: the job's payload and params.
#[derive(Debug, Clone)]
pub struct JobInput {
    /// The job's input bytes.
    pub payload: Bytes,
    /// The job's parameters, already accepted by [`Handler::check`].
    pub params: Params,
}

/// What a running job may use besides its input: a cancellation token for work that outlives the
/// job's future, and the CPU pool.
#[derive(Debug)]
pub struct JobContext {
    /// Made on first use: most jobs never need one.
    cancel: OnceLock<CancellationToken>,
    cpu: CpuPool,
    /// Boxed, and only for traced jobs: the context lives in every job's future.
    span: Option<Box<tracing::Span>>,
}

/// The span of every untraced job.
static NO_SPAN: tracing::Span = tracing::Span::none();

/// Why a handler failed; the message becomes the job's `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

/// Runs jobs of one kind. Implement it to embed batchd with your own work.
///
/// A handler must stop promptly once the job is cancelled: its future is dropped when the job is
/// cancelled, times out, or its call goes away. Work that outlives the future (blocking work,
/// processes) watches [`JobContext::cancel_token`], which fires when the job's context is dropped.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// One line for `ListHandlers`: what it does, its params and its output.
    fn description(&self) -> &str;

    /// Checks the params before the job is admitted; an `Err` makes the job REJECTED with that message.
    fn check(&self, _params: &Params) -> Result<(), String> {
        Ok(())
    }

    /// The longest this handler's jobs may run: the timeout of a job that sets none, and the cap on
    /// one that does (within the daemon's `max_job_timeout`). `None`: the daemon's settings apply.
    fn timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// Runs the job at once when it needs neither waiting nor a [`JobContext`] (echo, small
    /// hashes), saving the job's future and context; `Err` gives the input back for [`Handler::run`].
    fn run_now(&self, input: JobInput) -> Result<Result<Bytes, HandlerError>, JobInput> {
        Err(input)
    }

    /// Runs the job to completion. (`Arc<Self>` lets the future own its handler: one allocation
    /// per job instead of two.)
    async fn run(self: Arc<Self>, input: JobInput, ctx: JobContext) -> Result<Bytes, HandlerError>;
}

/// Handlers by the name jobs use, so the daemon can look them up and list them.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

/// Longest part of a client's string that error messages quote.
const QUOTE_CHARS: usize = 64;

/// A client's string for an error message: quoted, escaped and cut short, so that a huge or hostile
/// value cannot blow up the result that carries the message.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

// === impl JobContext ===

impl JobContext {
    /// A context for one job, running CPU-bound work on `cpu`; `span` is the job's trace span
    /// (disabled when the job is not traced).
    pub fn new(cpu: CpuPool, span: tracing::Span) -> Self {
        Self {
            cancel: OnceLock::new(),
            cpu,
            span: (!span.is_disabled()).then(|| Box::new(span)),
        }
    }

    /// The job's trace span, for handlers that record details (disabled when not traced).
    pub fn span(&self) -> &tracing::Span {
        self.span.as_deref().unwrap_or(&NO_SPAN)
    }

    /// A token that fires when the job ends: finished, cancelled, timed out or abandoned by its call.
    pub fn cancel_token(&self) -> &CancellationToken {
        self.cancel.get_or_init(CancellationToken::new)
    }

    /// Runs CPU-bound `work` on the bounded CPU pool, so it never stalls the async runtime.
    ///
    /// `work` receives a token and must return soon after it is cancelled: when the job ends, or
    /// when the future of this call is dropped.
    pub async fn run_cpu<F, R>(&self, work: F) -> Result<R, HandlerError>
    where
        F: FnOnce(&CancellationToken) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.cpu.run(self.cancel_token().child_token(), work).await
    }
}

impl Drop for JobContext {
    fn drop(&mut self) {
        if let Some(token) = self.cancel.get() {
            token.cancel();
        }
    }
}

// === impl Registry ===

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in handlers: `echo`, `sleep`, `sha256`, `spin`.
    pub fn builtin() -> Self {
        let mut r = Self::new();
        r.register("echo", Echo);
        r.register("sleep", Sleep);
        r.register("sha256", Sha256);
        r.register("spin", Spin);
        r
    }

    /// Adds (or replaces) the handler jobs reach by `name`.
    pub fn register(&mut self, name: impl Into<String>, handler: impl Handler) -> &mut Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    /// The handler named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(name)
    }

    /// Every handler with its name, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &dyn Handler)> {
        self.handlers.iter().map(|(n, h)| (n.as_str(), h.as_ref()))
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quote_cuts_long_strings() {
        assert_eq!(quote("ms"), "\"ms\"");
        let long = "\u{1}".repeat(10_000);
        let q = quote(&long);
        assert!(q.len() < 64 * 6 + 32, "{}", q.len());
        assert!(q.ends_with("(10000 bytes)"), "{q}");
        assert_eq!(
            quote(&"é".repeat(100))
                .chars()
                .filter(|c| *c == 'é')
                .count(),
            64
        );
    }
}
