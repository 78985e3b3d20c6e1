//! The daemon's trace spans (session, batch, job, exec), kept apart from the exporter set-up.

use std::sync::atomic::Ordering;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::metrics::{self, EndReason};
use super::{TRACE_TARGET, TRACING};
use crate::engine::{JobResult, Outcome};

/// The span of one call and whether it is sampled (job spans are made only then).
#[derive(Debug)]
pub struct SessionTrace {
    span: tracing::Span,
    sampled: bool,
}

/// The span of one job, or nothing when its call is not sampled (one null pointer).
#[derive(Debug, Default)]
pub struct JobSpan(Option<Box<tracing::Span>>);

/// Reads W3C trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

// === impl SessionTrace ===

impl SessionTrace {
    /// A call that is not traced.
    pub fn none() -> Self {
        Self {
            span: tracing::Span::none(),
            sampled: false,
        }
    }

    /// The span of a new call of `rpc` from `peer`, child of the W3C trace context in `metadata`.
    pub fn start(
        rpc: &'static str,
        metadata: &tonic::metadata::MetadataMap,
        peer: Option<std::net::SocketAddr>,
    ) -> Self {
        if !TRACING.load(Ordering::Relaxed) {
            return Self::none();
        }
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            parent: None,
            "batchd.session",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = rpc,
            net.peer = Empty,
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
        let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
        let _ = span.set_parent(parent);
        let sampled = span.context().span().span_context().is_sampled();
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

    /// Records how the call ended, its jobs by outcome and its handlers.
    pub(crate) fn end(&self, reason: EndReason, outcomes: [u32; 5], handlers: &str) {
        let span = &self.span;
        span.record(
            "session.jobs",
            outcomes.iter().map(|&n| u64::from(n)).sum::<u64>(),
        );
        for (o, n) in Outcome::ALL.iter().zip(outcomes) {
            let field = match o {
                Outcome::Ok => "session.ok",
                Outcome::Failed => "session.failed",
                Outcome::Cancelled => "session.cancelled",
                Outcome::TimedOut => "session.timed_out",
                Outcome::Rejected => "session.rejected",
            };
            span.record(field, n);
        }
        span.record("session.handlers", handlers);
        span.record("session.end", reason.label());
        if matches!(reason, EndReason::Error | EndReason::Deadline) {
            span.record("otel.status_code", "error");
        }
    }
}

/// The span of a batch of `jobs` jobs, child of the session span.
pub(crate) fn batch_span(session: &tracing::Span, batch_id: &str, jobs: usize) -> tracing::Span {
    tracing::info_span!(
        target: TRACE_TARGET,
        parent: session,
        "batchd.batch",
        batch.id = batch_id,
        batch.jobs = jobs,
    )
}

/// The span of one job, child of its batch's span (made only for sampled calls).
pub(crate) fn job_span(batch: &tracing::Span, id: &str, handler: &str) -> JobSpan {
    JobSpan(Some(Box::new(tracing::info_span!(
        target: TRACE_TARGET,
        parent: batch,
        "batchd.job",
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
        span.record("job.outcome", metrics::outcome_label(result.outcome));
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
    pub(crate) fn cancelled(
        self,
        why: &str,
        admitted: std::time::Instant,
        started: Option<std::time::Instant>,
    ) {
        let Some(span) = self.0 else {
            return;
        };
        let now = std::time::Instant::now();
        let start = started.unwrap_or(now);
        span.record("job.outcome", "cancelled");
        span.record("job.cancelled_by", why);
        span.record("job.error", format!("stopped with its call ({why})"));
        let queued = start.saturating_duration_since(admitted);
        span.record("job.queued_seconds", queued.as_secs_f64());
        let ran = now.saturating_duration_since(start);
        span.record("job.run_seconds", ran.as_secs_f64());
    }
}

/// Records an exec job's command name and pid on its span (a no-op for untraced jobs).
pub fn record_exec_start(span: &tracing::Span, command: &str, pid: i32) {
    if !span.is_disabled() {
        span.record("exec.command", command);
        span.record("exec.pid", pid);
    }
}

/// Records an exec job's exit status on its span.
pub fn record_exec_exit(span: &tracing::Span, status: &std::process::ExitStatus) {
    if !span.is_disabled() {
        span.record("exec.exit_status", tracing::field::display(status));
    }
}

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}
