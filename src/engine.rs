//! The engine: calls, the fair global worker pool, and the cancellation tree daemon → call → job.
//!
//! The service opens a [`Call`] per gRPC call and feeds it [`Command`]s; the call's session task admits
//! jobs, runs them when the scheduler grants a worker slot, and streams results back through a
//! [`ResultStream`]. Dropping that stream (the client went away) cancels the call's token, which ends
//! the session task and with it every job future, timer and buffer of the call.

mod budget;
pub mod health;
mod job;
pub mod metrics;
mod outbox;
mod principal;
mod running;
mod scheduler;
mod session;
pub mod trace;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use tokio::sync::Semaphore;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::{Credentials, PrincipalError, PrincipalSpec};
use crate::config::Config;
use crate::error::Error;
use crate::handlers::{CpuPool, Handler, Registry};

use budget::Budget;
pub use job::{Command, GivenBack, JobRequest, JobResult, Outcome, Reply};
use metrics::{Metrics, Rejection};
pub use principal::Principal;
use principal::{CallSlot, Principals};
use scheduler::Scheduler;
use session::{Outgoing, Session};
use trace::SessionTrace;

/// Most bytes of results coalesced into one response: the default receive limit of gRPC clients.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// The engine's limits, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct Limits {
    /// Jobs running at once across all calls.
    pub workers: usize,
    /// Of `workers`, the slots kept for calls that run no job, so that they start at once.
    pub reserved_workers: usize,
    /// CPU-bound pieces of work running at once.
    pub cpu_workers: usize,
    /// Admitted jobs whose result is not yet sent, per call.
    pub session_window: usize,
    /// Bytes held in admitted jobs and unsent results, per call.
    pub session_bytes: usize,
    /// Calls open at once.
    pub max_calls: usize,
    /// Bytes held in jobs read and unsent results across all calls, before calls stop being read.
    pub memory_budget: usize,
    /// Jobs in one batch.
    pub max_jobs_per_batch: usize,
    /// Bytes of one job's payload.
    pub max_payload: usize,
    /// Bytes of one job's output.
    pub max_output: usize,
    /// Timeout of a job that sets none.
    pub default_job_timeout: Duration,
    /// Longest timeout a job may ask for.
    pub max_job_timeout: Duration,
    /// How long progress may be missing before the engine counts as wedged ([`Engine::health`]).
    pub stall_timeout: Duration,
}

/// Runs the jobs of every call; cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: Limits,
    registry: Registry,
    scheduler: Arc<Scheduler>,
    cpu: CpuPool,
    /// Parent of every call's token: cancelled when shutdown's grace period is over.
    root: CancellationToken,
    /// When `root` was cancelled: the start of those calls' cancellation latency.
    cancelled_at: std::sync::OnceLock<Instant>,
    /// Cancelled when shutdown starts: calls stop reading new jobs and finish what they hold.
    drain: CancellationToken,
    sessions: TaskTracker,
    calls: Arc<Semaphore>,
    /// Handlers by name with their row in the metrics.
    handlers: HandlerRows,
    metrics: Metrics,
    /// The health probe's last turn.
    heartbeat: health::Heartbeat,
    /// Who may call, and each principal's figures.
    principals: Principals,
    budget: Budget,
}

/// A handler and the name jobs use for it.
type NamedHandler = (Box<[u8]>, Arc<dyn Handler>);

/// Handlers by name and by their row in the metrics (the order of the registry's names).
struct HandlerRows {
    /// Row by name, searched with a job's handler name as bytes.
    rows: HashMap<Box<[u8]>, usize, foldhash::fast::RandomState>,
    /// Name and handler by row.
    handlers: Vec<NamedHandler>,
}

impl std::fmt::Debug for HandlerRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = self
            .handlers
            .iter()
            .map(|(n, _)| String::from_utf8_lossy(n));
        f.debug_set().entries(names).finish()
    }
}

/// A snapshot of the engine's main figures, for tests, logs and status lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Calls whose session is alive.
    pub calls_open: u64,
    /// Admitted jobs waiting for a worker slot.
    pub jobs_queued: u64,
    /// Jobs holding a worker slot.
    pub jobs_running: u64,
    /// Results held by sessions, not yet handed to the transport.
    pub results_buffered: u64,
    /// Jobs admitted since start.
    pub jobs_admitted: u64,
    /// Jobs finished since start, by outcome in [`Outcome::ALL`] order: rejected jobs included, and
    /// jobs stopped because their call went away counted as cancelled.
    pub finished: [u64; 5],
    /// Worker slots nobody holds.
    pub free_workers: u64,
}

/// Permission to run one call, taken before its stream is read.
#[derive(Debug)]
pub struct Call {
    engine: Arc<Inner>,
    permit: tokio::sync::OwnedSemaphorePermit,
    principal: Arc<Principal>,
    slot: CallSlot,
    deadline: Option<Instant>,
    trace: SessionTrace,
    /// At drain, hand back the jobs not started instead of running them.
    give_back: bool,
}

/// The results of one call; dropping it stops everything the call started.
#[derive(Debug)]
pub struct ResultStream {
    rx: outbox::Receiver<Outgoing>,
    /// When the stream was dropped: the start of the call's cancellation latency.
    dropped_at: Arc<std::sync::OnceLock<Instant>>,
    _cancel_on_drop: DropGuard,
}

// === impl HandlerRows ===

impl HandlerRows {
    /// The registry's handlers, in the order of its names (the metrics rows).
    fn new(registry: &Registry) -> Self {
        let handlers: Vec<NamedHandler> = registry
            .iter()
            .filter_map(|(n, _)| Some((Box::from(n.as_bytes()), Arc::clone(registry.get(n)?))))
            .collect();
        let rows = handlers
            .iter()
            .enumerate()
            .map(|(row, (n, _))| (n.clone(), row))
            .collect();
        Self { rows, handlers }
    }

    /// The row of the handler named `name`.
    fn row(&self, name: &[u8]) -> Option<usize> {
        self.rows.get(name).copied()
    }

    /// The name and the handler of row `row`.
    fn get(&self, row: usize) -> Option<&NamedHandler> {
        self.handlers.get(row)
    }
}

// === impl Limits ===

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Self {
            workers: c.workers,
            reserved_workers: c.effective_reserved_workers(),
            cpu_workers: c.effective_cpu_workers(),
            session_window: c.session_window,
            session_bytes: usize::try_from(c.session_bytes.0).unwrap_or(usize::MAX),
            max_calls: c.max_calls,
            memory_budget: c.memory_budget.as_usize(),
            max_jobs_per_batch: c.max_jobs_per_batch,
            max_payload: c.max_payload.as_usize(),
            max_output: c.max_output.as_usize(),
            default_job_timeout: c.default_job_timeout,
            max_job_timeout: c.max_job_timeout,
            stall_timeout: c.stall_timeout,
        }
    }
}

// === impl Engine ===

impl Engine {
    /// An engine with these limits and handlers, where every call is anonymous (no principal).
    pub fn new(limits: Limits, registry: Registry) -> Self {
        let engine = Self::refusing(limits, registry);
        // No spec cannot fail: the anonymous table.
        let _ = engine.set_principals(&[], false);
        engine
    }

    /// An engine with these limits and handlers that refuses every call (UNAUTHENTICATED) until
    /// [`Engine::set_principals`] puts principals in force.
    pub fn refusing(limits: Limits, registry: Registry) -> Self {
        let names: Vec<String> = registry.iter().map(|(n, _)| n.to_owned()).collect();
        let handlers = HandlerRows::new(&registry);
        Self {
            inner: Arc::new(Inner {
                scheduler: Scheduler::new(limits.workers, limits.reserved_workers),
                heartbeat: health::Heartbeat::new(limits.stall_timeout),
                cpu: CpuPool::new(limits.cpu_workers),
                calls: Arc::new(Semaphore::new(limits.max_calls)),
                budget: Budget::new(limits.memory_budget),
                limits,
                registry,
                root: CancellationToken::new(),
                cancelled_at: std::sync::OnceLock::new(),
                drain: CancellationToken::new(),
                sessions: TaskTracker::new(),
                handlers,
                metrics: Metrics::new(names),
                principals: Principals::default(),
            }),
        }
    }

    /// Puts the principals of `specs` in force (none: every call is anonymous), for calls opened
    /// from now on; open calls keep theirs. `reflection_open` serves reflection without credentials.
    /// Returns how many principals there are; specs that do not validate change nothing.
    ///
    /// A handler a principal lists that this engine does not run matches no job (check them first
    /// with [`crate::auth::check_handlers`] to refuse such a config).
    pub fn set_principals(
        &self,
        specs: &[PrincipalSpec],
        reflection_open: bool,
    ) -> Result<usize, PrincipalError> {
        let inner = &self.inner;
        inner
            .principals
            .install(specs, reflection_open, &inner.scheduler)
    }

    /// The principal `creds` prove the call is (the anonymous one when none is configured), or
    /// UNAUTHENTICATED.
    pub fn authenticate(&self, creds: &Credentials<'_>) -> Result<Arc<Principal>, Error> {
        self.inner.principals.authenticate(creds).inspect_err(|_| {
            self.inner.metrics.rejected(Rejection::Unauthenticated);
        })
    }

    /// Whether gRPC reflection needs the same credentials as BatchService (principals are
    /// configured and `reflection_open` is off).
    pub fn reflection_needs_credentials(&self) -> bool {
        self.inner.principals.reflection_needs_credentials()
    }

    /// Admits a new call of `principal` ending at `deadline`, or refuses it when the daemon or the
    /// principal has its most calls open, or the daemon is shutting down.
    ///
    /// `trace` is the call's session span (disabled when the call is not traced).
    pub fn open(
        &self,
        deadline: Option<Instant>,
        trace: SessionTrace,
        principal: Arc<Principal>,
    ) -> Result<Call, Error> {
        let refuse = |why: Rejection, e: Error| {
            self.inner.metrics.rejected(why);
            if why != Rejection::PrincipalMaxCalls {
                principal.rejected(why);
            }
            e
        };
        if self.inner.drain.is_cancelled() {
            return Err(refuse(Rejection::ShuttingDown, Error::ShuttingDown));
        }
        // The principal's quota first: a call it refuses takes none of the daemon's.
        let slot = principal
            .enter()
            .map_err(|e| refuse(Rejection::PrincipalMaxCalls, e))?;
        let permit = Arc::clone(&self.inner.calls)
            .try_acquire_owned()
            .map_err(|_| {
                let limit = self.inner.limits.max_calls;
                refuse(Rejection::TooManyCalls, Error::TooManyCalls { limit })
            })?;
        trace.record_principal(principal.name());
        Ok(Call {
            engine: Arc::clone(&self.inner),
            permit,
            principal,
            slot,
            deadline,
            trace,
            give_back: false,
        })
    }

    /// Checks one job of `principal` as a call's session does before admitting it (job id, handler
    /// allowed and known, payload size, timeout, the handler's params check), without a call:
    /// the timeout it would run with, or the message of its REJECTED result. Fuzzing and tests
    /// reach admission through it.
    pub fn check_job(&self, principal: &Principal, job: &JobRequest) -> Result<Duration, String> {
        let pick = self.inner.pick(principal, &job.handler);
        self.inner
            .check(principal, job, pick)
            .map(|(_, timeout)| timeout)
    }

    /// The engine's live counters, gauges and histograms; exporters read them through
    /// [`metrics::families`].
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Whether shutdown has started (the daemon is not ready for new calls).
    pub fn is_draining(&self) -> bool {
        self.inner.drain.is_cancelled()
    }

    /// The handlers this engine runs.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The engine's limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// A snapshot of the main figures, for tests, logs and status lines.
    pub fn stats(&self) -> Stats {
        let m = &self.inner.metrics;
        let [jobs_queued, jobs_running, jobs_admitted] = m.jobs_by_state();
        Stats {
            calls_open: m.calls_open(),
            jobs_queued,
            jobs_running,
            results_buffered: m.results_buffered(),
            jobs_admitted,
            finished: m.finished_by_outcome(),
            free_workers: self.inner.scheduler.free() as u64,
        }
    }

    /// Starts shutdown: refuse new calls; open calls stop reading and finish the jobs they hold.
    pub fn drain(&self) {
        self.inner.drain.cancel();
    }

    /// Ends shutdown's grace: every job of every call is cancelled now.
    pub fn cancel_all(&self) {
        self.inner.drain.cancel();
        let _ = self.inner.cancelled_at.set(Instant::now());
        self.inner.root.cancel();
    }

    /// Waits until no call's session is alive (after [`Engine::drain`], it stays that way).
    pub async fn wait_idle(&self) {
        self.inner.sessions.close();
        self.inner.sessions.wait().await;
        self.inner.sessions.reopen();
    }
}

impl Stats {
    /// Jobs finished with `outcome` since start.
    pub fn finished(&self, outcome: Outcome) -> u64 {
        self.finished[outcome.index()]
    }
}

// === impl Call ===

impl Call {
    /// `yes`: when the daemon drains, the call gets back the jobs it sent that were not started
    /// ([`GivenBack`]) instead of having them run, and at the end of the grace period the ones
    /// still running are listed as stopped instead of getting CANCELLED results. For clients that
    /// can send jobs elsewhere (proto: the metadata `batchd-drain: give-back`).
    pub fn giving_back(mut self, yes: bool) -> Self {
        self.give_back = yes;
        self
    }

    /// Starts the call's session over `inbound` and returns its results.
    pub fn start<S>(self, inbound: S) -> ResultStream
    where
        S: Stream<Item = Result<Command, Error>> + Send + Unpin + 'static,
    {
        let token = self.engine.root.child_token();
        // One message may wait for the transport while the next results coalesce in the session.
        let (tx, rx) = outbox::outbox();
        let dropped_at = Arc::new(std::sync::OnceLock::new());
        // Every log line of the call names its principal. The call's own events are at debug
        // level, and so is the span: with the default `info` filter it costs nothing, not even
        // the enter and exit on each poll of the session.
        let span = tracing::debug_span!("call", principal = self.principal.name());
        self.slot.admitted();
        let session = Session::new(
            Arc::clone(&self.engine),
            token.clone(),
            inbound,
            tx,
            session::CallParts {
                deadline: self.deadline,
                permit: self.permit,
                principal: self.principal,
                slot: self.slot,
                trace: self.trace,
                dropped_at: Arc::clone(&dropped_at),
                give_back: self.give_back,
            },
        );
        self.engine.sessions.spawn(session.run().instrument(span));
        ResultStream {
            rx,
            dropped_at,
            _cancel_on_drop: token.drop_guard(),
        }
    }
}

// === impl ResultStream ===

impl Stream for ResultStream {
    type Item = Result<Reply, Error>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.unwrap_or_else(|outbox::Abandoned| Err(Error::Abandoned))))
    }
}

impl Drop for ResultStream {
    fn drop(&mut self) {
        // Before the drop guard fires the token (fields drop after this).
        let _ = self.dropped_at.set(Instant::now());
    }
}
