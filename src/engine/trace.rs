//! The engine's trace spans (session, batch, job), as plain `tracing` spans on their own target.
//!
//! The engine only makes and fills spans; `telemetry` decides whether any are exported (it turns
//! them on with [`enable`] once an OpenTelemetry layer is installed) and gives each call's span its
//! remote parent. Off, a call pays one relaxed load and its jobs nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tracing::field::Empty;

use super::job::{JobResult, Outcome};
use super::metrics::EndReason;

/// The target of the engine's trace spans; the log output never shows them.
pub const TARGET: &str = "batchd::trace";

/// Whether spans are exported: the engine makes them only then.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the engine's spans on (the telemetry set-up does, once spans have somewhere to go).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether the engine's spans are on.
pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The span of one call and whether it is sampled (job spans are made only then).
#[derive(Debug)]
pub struct SessionTrace {
    span: tracing::Span,
    sampled: bool,
}

/// The span of one job, or nothing when its call is not sampled (one null pointer).
#[derive(Debug, Default)]
pub struct JobSpan(Option<Box<tracing::Span>>);

// === impl SessionTrace ===

impl SessionTrace {
    /// A call that is not traced.
    pub fn none() -> Self {
        Self {
            span: tracing::Span::none(),
            sampled: false,
        }
    }

    /// The `batchd.session` span of a new call of `rpc` from `peer`, with no parent yet (disabled
    /// while spans are off); [`SessionTrace::new`] takes it back once its parent is set.
    pub fn span_for(rpc: &'static str, peer: Option<std::net::SocketAddr>) -> tracing::Span {
        if !is_enabled() {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            target: TARGET,
            parent: None,
            "batchd.session",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = rpc,
            net.peer = Empty,
            principal = Empty,
            session.jobs = Empty,
            session.ok = Empty,
            session.failed = Empty,
            session.cancelled = Empty,
            session.timed_out = Empty,
            session.rejected = Empty,
            session.handlers = Empty,
            session.end = Empty,
            otel.status_code = Empty,
        );
        if let Some(peer) = peer {
            span.record("net.peer", tracing::field::display(peer));
        }
        span
    }

    /// A call traced by `span`, whose job spans are made when `sampled`.
    pub fn new(span: tracing::Span, sampled: bool) -> Self {
        Self { span, sampled }
    }

    /// Whether the call's spans are recorded.
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// The session span.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Records the call's principal.
    pub(crate) fn record_principal(&self, name: &str) {
        if self.sampled {
            self.span.record("principal", name);
        }
    }

    /// Records how the call ended, its jobs by outcome and its handlers.
    pub(crate) fn end(&self, reason: EndReason, outcomes: [u32; 5], handlers: &str) {
        let span = &self.span;
        span.record(
            "session.jobs",
            outcomes.iter().map(|&n| u64::from(n)).sum::<u64>(),
        );
        for (o, n) in Outcome::ALL.iter().zip(outcomes) {
            span.record(format!("session.{}", o.as_str()).as_str(), n);
        }
        span.record("session.handlers", handlers);
        span.record("session.end", reason.as_str());
        if matches!(reason, EndReason::Error | EndReason::Deadline) {
            span.record("otel.status_code", "error");
        }
    }
}

/// The span of a batch of `jobs` jobs of `principal`, child of the session span.
pub(crate) fn batch_span(
    session: &tracing::Span,
    principal: &str,
    batch_id: &str,
    jobs: usize,
) -> tracing::Span {
    tracing::info_span!(
        target: TARGET,
        parent: session,
        "batchd.batch",
        principal,
        batch.id = batch_id,
        batch.jobs = jobs,
    )
}

/// The span of one job of `principal`, child of its batch's span (made only for sampled calls). Handlers may fill
/// `exec.command`, `exec.pid` and `exec.exit_status` through their job context's span.
pub(crate) fn job_span(batch: &tracing::Span, principal: &str, id: &str, handler: &str) -> JobSpan {
    JobSpan(Some(Box::new(tracing::info_span!(
        target: TARGET,
        parent: batch,
        "batchd.job",
        principal,
        job.id = id,
        job.handler = handler,
        job.queued_seconds = Empty,
        job.run_seconds = Empty,
        job.outcome = Empty,
        job.error = Empty,
        job.cancelled_by = Empty,
        exec.command = Empty,
        exec.pid = Empty,
        exec.exit_status = Empty,
        otel.status_code = Empty,
    ))))
}

// === impl JobSpan ===

impl JobSpan {
    /// No span.
    pub fn none() -> Self {
        Self(None)
    }

    /// A handle on the span for the job's context (disabled when there is none).
    pub(crate) fn handle(&self) -> tracing::Span {
        self.0
            .as_deref()
            .cloned()
            .unwrap_or_else(tracing::Span::none)
    }

    /// Records the job's result and ends the span.
    pub(crate) fn end(self, result: &JobResult, cancelled_by: Option<&str>) {
        let Some(span) = self.0 else {
            return;
        };
        span.record("job.outcome", result.outcome.as_str());
        if let Some(q) = result.queued {
            span.record("job.queued_seconds", q.as_secs_f64());
        }
        if let Some(r) = result.ran {
            span.record("job.run_seconds", r.as_secs_f64());
        }
        if !result.error.is_empty() {
            span.record("job.error", result.error.as_str());
        }
        if let Some(by) = cancelled_by {
            span.record("job.cancelled_by", by);
        }
        if matches!(result.outcome, Outcome::Failed | Outcome::TimedOut) {
            span.record("otel.status_code", "error");
        }
    }

    /// Ends the span of a job stopped with its call (`why`: the call's end reason), admitted at
    /// `admitted` and started at `started` if it ran.
    pub(crate) fn cancelled(self, why: &str, admitted: Instant, started: Option<Instant>) {
        let Some(span) = self.0 else {
            return;
        };
        let now = Instant::now();
        let start = started.unwrap_or(now);
        span.record("job.outcome", Outcome::Cancelled.as_str());
        span.record("job.cancelled_by", why);
        span.record("job.error", format!("stopped with its call ({why})"));
        let queued = start.saturating_duration_since(admitted);
        span.record("job.queued_seconds", queued.as_secs_f64());
        let ran = now.saturating_duration_since(start);
        span.record("job.run_seconds", ran.as_secs_f64());
    }
}
