//! Logging, OpenTelemetry traces and metrics: the one module that imports `opentelemetry`.
//!
//! - Logs: structured `tracing` events on stderr, as text or JSON, filtered by the `log` setting.
//! - Traces: when an OTLP endpoint is configured (`otlp_endpoint` or the standard `OTEL_*`
//!   variables), a `batchd.session` span per call whose parent is the caller's W3C `traceparent`, a
//!   `batchd.batch` span per batch and a `batchd.job` span per job, exported over OTLP/gRPC by a
//!   batch span processor. Off, they cost one relaxed load per call and nothing per job.
//! - batchctl ([`ClientTelemetry`]): with an OTLP endpoint in the environment, a `batchctl.run`
//!   client span per run, whose context is the `traceparent` the call sends. Both set-ups build
//!   their exporters through one path (`Otlp`: endpoint, timeout, resource, `OTEL_SDK_DISABLED`).
//! - Metrics ([`metrics`]) and the admin HTTP listener ([`admin`]).

pub mod admin;
pub mod metrics;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::client::Summary;
use crate::config::{Config, LogFormat};
use crate::engine::{Engine, JobResult, Outcome};
use metrics::{EndReason, ProcessFigures};

/// The target of the daemon's trace spans; the log output never shows them.
const TRACE_TARGET: &str = "batchd::trace";

/// Whether an OpenTelemetry layer is installed: spans are made only then.
static TRACING: AtomicBool = AtomicBool::new(false);

/// The service `batchctl run` calls, for `rpc.service`.
const RUN_SERVICE: &str = "batchd.v1.BatchService";

/// Bound on exporting batchctl's span at exit, unless `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT` sets one.
const CLIENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How much longer than the SDK's own bound a flush may take before it is abandoned.
const FLUSH_SLACK: Duration = Duration::from_secs(1);

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint, no runtime).
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// Pending spans could not be exported before the flush timeout.
    #[error("flushing spans: {0}")]
    Flush(String),
}

/// Owns the tracer provider: [`Telemetry::shutdown`] (or dropping it) flushes pending spans.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Pushes the metrics over OTLP, when `otlp_metrics` is on.
    meters: Option<SdkMeterProvider>,
    flush_timeout: Duration,
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

/// batchctl's traces: with an OTLP endpoint in the environment, one `batchctl.run` client span per
/// run, exported at exit ([`ClientTelemetry::shutdown`]); without one, nothing is set up.
#[derive(Debug)]
pub struct ClientTelemetry {
    provider: Option<SdkTracerProvider>,
    flush_timeout: Duration,
}

/// The `batchctl.run` span of one run (when traced) and the W3C context the run's call sends.
#[derive(Debug)]
pub struct RunTrace {
    span: Option<opentelemetry_sdk::trace::Span>,
    headers: TraceHeaders,
}

/// The W3C trace context sent with an outgoing call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    /// The `traceparent` value.
    pub traceparent: String,
    /// The `tracestate` value, when there is one.
    pub tracestate: Option<String>,
}

/// How a `batchctl` run ended, recorded as `batchctl.end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd<'a> {
    /// Every result arrived (whatever the outcomes) and was written.
    Completed,
    /// Cancelled by Ctrl-C.
    Cancelled,
    /// Stopped by an error; the message becomes the span's error status.
    Error(&'a str),
}

/// One OTLP/gRPC export set-up, shared by batchd and batchctl.
struct Otlp<'a, E> {
    /// Empty: the SDK reads `OTEL_EXPORTER_OTLP_ENDPOINT` and its per-signal variants.
    endpoint: &'a str,
    /// Bound on one export.
    timeout: Duration,
    /// `service.name`, unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names one.
    service: &'static str,
    env: &'a E,
}

/// A pushed gauge: name, description and how to read it from the engine.
type Gauge = (&'static str, &'static str, fn(&Engine) -> u64);

/// Reads W3C trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

/// Installs the global subscriber: logs on stderr and, if configured, the OTLP trace pipeline.
///
/// Call it on a multi-thread tokio runtime (the exporter's channel lives there). Logging-only set-up
/// never fails; an exporter that cannot be built is an error. Calling it again does nothing.
pub fn init(config: &Config) -> Result<Telemetry, TelemetryError> {
    init_from(config, |k| std::env::var(k).ok())
}

fn init_from(
    config: &Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Telemetry, TelemetryError> {
    let mut filter = EnvFilter::builder().parse_lossy(&config.log);
    if let Ok(d) = format!("{TRACE_TARGET}=off").parse() {
        filter = filter.add_directive(d);
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match config.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let otlp = Otlp {
        endpoint: &config.otlp_endpoint,
        timeout: config.trace_flush_timeout,
        service: "batchd",
        env: &env,
    };
    let provider = if otlp.enabled() {
        Some(otlp.tracer_provider()?)
    } else {
        None
    };
    let otel = provider.as_ref().map(|p| {
        let targets = tracing_subscriber::filter::Targets::new()
            .with_target(TRACE_TARGET, tracing::Level::INFO);
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("batchd"))
            .with_threads(false)
            .with_location(false)
            .with_tracked_inactivity(false)
            .with_filter(targets)
    });
    let meters = match (&provider, config.otlp_metrics) {
        (Some(_), true) => Some(otlp.meter_provider()?),
        _ => None,
    };
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        TRACING.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
        meters: meters.filter(|_| installed),
        flush_timeout: config.trace_flush_timeout,
    })
}

// === impl Otlp ===

impl<E: Fn(&str) -> Option<String>> Otlp<'_, E> {
    /// Traces are on unless `OTEL_SDK_DISABLED=true` (the 0.33 SDK ignores it), if an endpoint is
    /// configured or in the environment.
    fn enabled(&self) -> bool {
        let set = |k: &str| (self.env)(k).is_some_and(|v| !v.trim().is_empty());
        let disabled =
            (self.env)("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        !disabled
            && (!self.endpoint.is_empty()
                || set("OTEL_EXPORTER_OTLP_ENDPOINT")
                || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    }

    /// The endpoint (when configured) and the timeout, on a span or metric exporter builder.
    fn configure<B: WithExportConfig>(&self, builder: B) -> B {
        let builder = builder.with_timeout(self.timeout);
        if self.endpoint.is_empty() {
            builder
        } else {
            builder.with_endpoint(self.endpoint)
        }
    }

    /// `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` (read by the SDK), else the default name.
    fn resource(&self) -> Resource {
        let mut resource = Resource::builder();
        let named = (self.env)("OTEL_SERVICE_NAME").is_some()
            || (self.env)("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
        if !named {
            resource = resource.with_service_name(self.service);
        }
        resource.build()
    }

    /// The tracer provider: OTLP/gRPC exporter, batch processor (its own thread), sampler from
    /// `OTEL_TRACES_SAMPLER(_ARG)` (default `parentbased_always_on`). Needs a tokio runtime.
    fn tracer_provider(&self) -> Result<SdkTracerProvider, TelemetryError> {
        let exporter = self
            .configure(opentelemetry_otlp::SpanExporter::builder().with_tonic())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(self.resource())
            .build())
    }

    /// The meter provider: OTLP/gRPC exporter on a periodic reader (`OTEL_METRIC_EXPORT_INTERVAL`).
    fn meter_provider(&self) -> Result<SdkMeterProvider, TelemetryError> {
        let exporter = self
            .configure(opentelemetry_otlp::MetricExporter::builder().with_tonic())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        Ok(SdkMeterProvider::builder()
            .with_periodic_exporter(exporter)
            .with_resource(self.resource())
            .build())
    }
}

/// Flushes and stops `provider` within `timeout`, off the runtime's worker threads (the SDK's
/// shutdown blocks); gives up `FLUSH_SLACK` later whatever the SDK does.
async fn shut_down(provider: SdkTracerProvider, timeout: Duration) -> Result<(), TelemetryError> {
    let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
    match tokio::time::timeout(timeout + FLUSH_SLACK, flush).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(TelemetryError::Flush(e.to_string())),
        Ok(Err(e)) => Err(TelemetryError::Flush(e.to_string())),
        Err(_) => Err(TelemetryError::Flush(format!(
            "timed out after {timeout:?}"
        ))),
    }
}

// === impl Telemetry ===

impl Telemetry {
    /// No tracer provider: what tests and embedders get without an endpoint.
    pub fn disabled() -> Self {
        Self {
            provider: None,
            meters: None,
            flush_timeout: Duration::ZERO,
        }
    }

    /// Whether spans are exported.
    pub fn is_tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans ended so far and the metrics now, within the flush timeout (for tests
    /// and embedders).
    pub async fn flush(&self) {
        let (provider, meters) = (self.provider.clone(), self.meters.clone());
        let flush = tokio::task::spawn_blocking(move || {
            if let Some(p) = provider {
                let _ = p.force_flush();
            }
            if let Some(m) = meters {
                let _ = m.force_flush();
            }
        });
        let _ = tokio::time::timeout(self.flush_timeout + FLUSH_SLACK, flush).await;
    }

    /// Whether metrics are pushed over OTLP.
    pub fn is_pushing_metrics(&self) -> bool {
        self.meters.is_some()
    }

    /// Pushes `engine`'s counters and gauges over OTLP (when `otlp_metrics` is on), read at each
    /// export. Histograms stay on `/metrics`. Call it on the daemon's runtime (its task count).
    pub fn push_metrics(&self, engine: &Engine) {
        let Some(meters) = &self.meters else {
            return;
        };
        let meter = meters.meter("batchd");
        let runtime = tokio::runtime::Handle::try_current().ok();
        let gauges: [Gauge; 3] = [
            ("batchd.calls.open", "Calls whose session is alive.", |e| {
                e.stats().calls_open
            }),
            ("batchd.results.buffered", "Results not yet sent.", |e| {
                e.stats().results_buffered
            }),
            ("batchd.workers.free", "Worker slots nobody holds.", |e| {
                e.stats().free_workers
            }),
        ];
        for (name, help, read) in gauges {
            let engine = engine.clone();
            meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |o| o.observe(read(&engine), &[]))
                .build();
        }
        let by_handler: [(&'static str, &'static str, bool); 2] = [
            (
                "batchd.jobs.queued",
                "Admitted jobs waiting for a worker slot, by handler.",
                false,
            ),
            (
                "batchd.jobs.running",
                "Jobs holding a worker slot, by handler.",
                true,
            ),
        ];
        for (name, help, running) in by_handler {
            let e = engine.clone();
            meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |o| {
                    for (handler, queued, run) in metrics::handler_gauges(e.metrics()) {
                        let v = if running { run } else { queued };
                        o.observe(v, &[KeyValue::new("handler", handler.to_owned())]);
                    }
                })
                .build();
        }
        meter
            .u64_observable_gauge("batchd.process.figures")
            .with_description(
                "Live tokio tasks, exec process groups, resident bytes (by `figure`).",
            )
            .with_callback(move |o| {
                let _guard = runtime.as_ref().map(tokio::runtime::Handle::enter);
                let p = ProcessFigures::read();
                o.observe(
                    p.tasks_alive,
                    &[KeyValue::new("figure", "tokio_tasks_alive")],
                );
                o.observe(
                    p.exec_groups,
                    &[KeyValue::new("figure", "exec_groups_alive")],
                );
                if let Some(rss) = p.rss_bytes {
                    o.observe(rss, &[KeyValue::new("figure", "resident_memory_bytes")]);
                }
            })
            .build();
        let e = engine.clone();
        meter
            .u64_observable_counter("batchd.jobs.finished")
            .with_description("Jobs finished, by handler and outcome.")
            .with_callback(move |o| {
                let m = e.metrics();
                for (handler, row) in metrics::handler_rows(m) {
                    for (outcome, n) in row {
                        let attrs = [
                            KeyValue::new("handler", handler.to_owned()),
                            KeyValue::new("outcome", outcome),
                        ];
                        o.observe(n, &attrs);
                    }
                }
            })
            .build();
        let e = engine.clone();
        meter
            .u64_observable_counter("batchd.calls.ended")
            .with_description("Calls ended, by reason; refused calls have reason refused:<why>.")
            .with_callback(move |o| {
                for (reason, n) in metrics::call_counts(e.metrics()) {
                    o.observe(n, &[KeyValue::new("reason", reason)]);
                }
            })
            .build();
        let e = engine.clone();
        meter
            .u64_observable_counter("batchd.jobs.admitted")
            .with_description("Jobs admitted since start.")
            .with_callback(move |o| o.observe(e.stats().jobs_admitted, &[]))
            .build();
    }

    /// Flushes pending spans and stops the exporter, within the flush timeout (off the runtime's
    /// worker threads: the SDK's shutdown blocks).
    pub async fn shutdown(mut self) {
        if let Some(meters) = self.meters.take() {
            let timeout = self.flush_timeout;
            let flush = tokio::task::spawn_blocking(move || meters.shutdown_with_timeout(timeout));
            let _ = tokio::time::timeout(timeout + FLUSH_SLACK, flush).await;
        }
        let Some(provider) = self.provider.take() else {
            return;
        };
        if let Err(e) = shut_down(provider, self.flush_timeout).await {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(meters) = self.meters.take() {
            let _ = meters.shutdown_with_timeout(self.flush_timeout);
        }
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown_with_timeout(self.flush_timeout);
        }
    }
}

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

// === impl ClientTelemetry ===

impl ClientTelemetry {
    /// No tracing: what batchctl gets without an endpoint.
    pub fn disabled() -> Self {
        Self {
            provider: None,
            flush_timeout: Duration::ZERO,
        }
    }

    /// Sets up from the standard variables: on when `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and `OTEL_SDK_DISABLED` is not `true`;
    /// `service.name` defaults to `batchctl`. Call it on a tokio runtime; off, it builds nothing.
    pub fn from_env() -> Result<Self, TelemetryError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    fn from_env_with(env: impl Fn(&str) -> Option<String>) -> Result<Self, TelemetryError> {
        let millis = |k: &str| {
            env(k)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
        };
        let timeout = millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| millis("OTEL_EXPORTER_OTLP_TIMEOUT"))
            .unwrap_or(CLIENT_FLUSH_TIMEOUT);
        let otlp = Otlp {
            endpoint: "",
            timeout,
            service: "batchctl",
            env: &env,
        };
        if !otlp.enabled() {
            return Ok(Self::disabled());
        }
        Ok(Self {
            provider: Some(otlp.tracer_provider()?),
            flush_timeout: timeout,
        })
    }

    /// Whether spans are exported.
    pub fn is_tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Starts the `batchctl.run` span of a call of `method` to the daemon at `endpoint`, a child of
    /// the `TRACEPARENT` (and `TRACESTATE`) variable when valid. Without tracing: no span, and the
    /// headers of [`outgoing_traceparent`].
    pub fn start_run(&self, method: &'static str, endpoint: &str) -> RunTrace {
        self.start_run_with(method, endpoint, |k| std::env::var(k).ok())
    }

    fn start_run_with(
        &self,
        method: &'static str,
        endpoint: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> RunTrace {
        let inherited = env("TRACEPARENT");
        let generated = || TraceHeaders::generated(inherited.as_deref());
        let Some(provider) = &self.provider else {
            return RunTrace {
                span: None,
                headers: generated(),
            };
        };
        let carrier: HashMap<String, String> =
            [("traceparent", "TRACEPARENT"), ("tracestate", "TRACESTATE")]
                .into_iter()
                .filter_map(|(header, var)| Some((header.to_owned(), env(var)?)))
                .collect();
        let parent = TraceContextPropagator::new().extract(&carrier);
        let tracer = provider.tracer("batchctl");
        let mut attributes = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", RUN_SERVICE),
            KeyValue::new("rpc.method", method),
        ];
        attributes.extend(server_attributes(endpoint));
        let span = tracer
            .span_builder("batchctl.run")
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        // The span's own context is what the call sends: the daemon's spans become its children.
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        let mut headers = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut headers);
        let headers = match headers.remove("traceparent") {
            Some(traceparent) => TraceHeaders {
                traceparent,
                tracestate: headers.remove("tracestate").filter(|s| !s.is_empty()),
            },
            // An invalid context (a provider already shut down): behave as without tracing.
            None => generated(),
        };
        RunTrace {
            span: Some(span),
            headers,
        }
    }

    /// Exports the spans ended so far and stops the exporter, within the flush timeout
    /// (`OTEL_EXPORTER_OTLP_TIMEOUT`, else 2 s), so a collector that is down never holds the exit.
    pub async fn shutdown(mut self) -> Result<(), TelemetryError> {
        match self.provider.take() {
            Some(provider) => shut_down(provider, self.flush_timeout).await,
            None => Ok(()),
        }
    }
}

impl Drop for ClientTelemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown_with_timeout(self.flush_timeout);
        }
    }
}

/// `server.address` and `server.port` of a daemon URL; the whole text when it is not one.
fn server_attributes(endpoint: &str) -> Vec<KeyValue> {
    let uri = endpoint.parse::<tonic::transport::Uri>().ok();
    let Some(host) = uri.as_ref().and_then(|u| u.host()) else {
        return vec![KeyValue::new("server.address", endpoint.to_owned())];
    };
    let mut attrs = vec![KeyValue::new("server.address", host.to_owned())];
    if let Some(port) = uri.as_ref().and_then(|u| u.port_u16()) {
        attrs.push(KeyValue::new("server.port", i64::from(port)));
    }
    attrs
}

// === impl RunTrace ===

impl RunTrace {
    /// The W3C context to send with the call.
    pub fn headers(&self) -> &TraceHeaders {
        &self.headers
    }

    /// Whether the span is recorded (not when tracing is off or the sampler dropped it).
    pub fn is_recording(&self) -> bool {
        self.span.as_ref().is_some_and(|s| s.is_recording())
    }

    /// Records the run's counts: jobs sent and done, results by outcome, bad lines, retries, skips.
    pub fn record(&mut self, summary: &Summary) {
        let Some(span) = self.span.as_mut().filter(|s| s.is_recording()) else {
            return;
        };
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        span.set_attribute(KeyValue::new("batchctl.jobs.sent", int(summary.sent)));
        span.set_attribute(KeyValue::new("batchctl.jobs.done", int(summary.done)));
        let names = ["ok", "failed", "cancelled", "timed_out", "rejected"];
        for (name, n) in names.into_iter().zip(summary.outcomes) {
            span.set_attribute(KeyValue::new(format!("batchctl.results.{name}"), int(n)));
        }
        span.set_attribute(KeyValue::new("batchctl.bad_lines", int(summary.bad_lines)));
        span.set_attribute(KeyValue::new("batchctl.retried", int(summary.retried)));
        span.set_attribute(KeyValue::new("batchctl.skipped", int(summary.skipped)));
    }

    /// Ends the span: `batchctl.end` (`completed`, `cancelled`, `error` with an error status) and
    /// `process.exit.code`.
    pub fn end(self, end: RunEnd<'_>, exit_code: u8) {
        let Some(mut span) = self.span else {
            return;
        };
        if span.is_recording() {
            let label = match end {
                RunEnd::Completed => "completed",
                RunEnd::Cancelled => "cancelled",
                RunEnd::Error(_) => "error",
            };
            span.set_attribute(KeyValue::new("batchctl.end", label));
            span.set_attribute(KeyValue::new("process.exit.code", i64::from(exit_code)));
            if let RunEnd::Error(message) = end {
                span.set_status(Status::error(message.to_owned()));
            }
        }
        span.end();
    }
}

// === impl TraceHeaders ===

impl TraceHeaders {
    /// A `traceparent` of no exported span ([`outgoing_traceparent`]): a child of `parent` when
    /// valid, else a new sampled trace.
    pub fn generated(parent: Option<&str>) -> Self {
        Self {
            traceparent: outgoing_traceparent(parent),
            tracestate: None,
        }
    }

    /// Adds `traceparent` (and `tracestate`) to a call's metadata; a value that is not valid
    /// metadata is left out.
    pub fn insert_into(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if let Ok(v) = self.traceparent.parse() {
            metadata.insert("traceparent", v);
        }
        if let Some(Ok(v)) = self.tracestate.as_deref().map(str::parse) {
            metadata.insert("tracestate", v);
        }
    }
}

/// A W3C `traceparent` for an outgoing call: a child of `parent` (a `traceparent` value, e.g. the
/// `TRACEPARENT` variable) when it is valid, else a new sampled trace.
pub fn outgoing_traceparent(parent: Option<&str>) -> String {
    let span_id = random_u64().max(1);
    let inherited = parent.and_then(|p| {
        let mut parts = p.trim().split('-');
        let (version, trace, _span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        (version == "00" && hex(trace, 32) && hex(flags, 2) && trace != "0".repeat(32))
            .then(|| (trace.to_ascii_lowercase(), flags.to_ascii_lowercase()))
    });
    let (trace, flags) = inherited.unwrap_or_else(|| {
        let t = (u128::from(random_u64()) << 64) | u128::from(random_u64().max(1));
        (format!("{t:032x}"), "01".into())
    });
    format!("00-{trace}-{span_id:016x}-{flags}")
}

/// 64 random bits from the standard library's per-process seeded hasher (ids, not secrets).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_traceparent_keeps_the_parent_trace() {
        let p = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = outgoing_traceparent(Some(p));
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"));
        assert_ne!(out, p);
        let fresh = outgoing_traceparent(Some("garbage"));
        assert_eq!(fresh.len(), 55, "{fresh}");
        assert_ne!(fresh, outgoing_traceparent(None));
    }

    /// An environment of `vars` only.
    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    fn enabled(endpoint: &str, env: impl Fn(&str) -> Option<String>) -> bool {
        Otlp {
            endpoint,
            timeout: Duration::ZERO,
            service: "batchd",
            env: &env,
        }
        .enabled()
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_or_when_disabled() {
        const ON: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
        assert!(!enabled("", env(&[])));
        assert!(enabled("", env(&[ON])));
        assert!(enabled(
            "",
            env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")])
        ));
        assert!(!enabled("", env(&[ON, ("OTEL_SDK_DISABLED", "true")])));
        assert!(!enabled(
            "http://collector:4317",
            env(&[("OTEL_SDK_DISABLED", " TRUE ")])
        ));
        assert!(enabled("http://collector:4317", env(&[])));
        assert!(!enabled("", env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
    }

    const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn batchctl_without_an_endpoint_only_generates_a_traceparent() {
        let client = ClientTelemetry::from_env_with(env(&[])).unwrap();
        assert!(!client.is_tracing());
        let run =
            client.start_run_with("Process", "http://d:50051", env(&[("TRACEPARENT", PARENT)]));
        assert!(!run.is_recording());
        let h = run.headers().clone();
        assert!(
            h.traceparent.starts_with(&format!("00-{PARENT_TRACE}-")),
            "{h:?}"
        );
        assert_eq!(h.tracestate, None);
        run.end(RunEnd::Completed, 0);
        let off = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"),
            ("OTEL_SDK_DISABLED", "true"),
        ];
        assert!(!ClientTelemetry::from_env_with(env(&off))
            .unwrap()
            .is_tracing());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batchctl_sends_its_own_span_as_the_parent() {
        // Nobody listens on port 1: the flush fails fast, which is all this test needs.
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")];
        let client = ClientTelemetry::from_env_with(env(&on)).unwrap();
        assert!(client.is_tracing());
        let vars = [("TRACEPARENT", PARENT), ("TRACESTATE", "vendor=x")];
        let run = client.start_run_with("Process", "http://10.1.2.3:50051", env(&vars));
        assert!(run.is_recording());
        let span = run.span.as_ref().unwrap().span_context().clone();
        assert_eq!(span.trace_id().to_string(), PARENT_TRACE);
        let h = run.headers().clone();
        assert_eq!(
            h.traceparent,
            format!("00-{PARENT_TRACE}-{}-01", span.span_id()),
            "the call's parent is the batchctl.run span"
        );
        assert_eq!(h.tracestate.as_deref(), Some("vendor=x"));
        let mut md = tonic::metadata::MetadataMap::new();
        h.insert_into(&mut md);
        assert_eq!(md.get("traceparent").unwrap(), h.traceparent.as_str());
        assert_eq!(md.get("tracestate").unwrap(), "vendor=x");
        run.end(RunEnd::Completed, 0);

        // An unsampled parent: no span recorded, and the call says so (flags 00).
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let run = client.start_run_with("Process", "x", env(&[("TRACEPARENT", unsampled)]));
        assert!(!run.is_recording());
        assert!(
            run.headers().traceparent.ends_with("-00"),
            "{:?}",
            run.headers()
        );
        run.end(RunEnd::Error("x"), 1);

        // No parent: a new trace, its span still the call's parent.
        let run = client.start_run_with("Process", "x", env(&[("TRACEPARENT", "garbage")]));
        assert!(run.is_recording());
        assert!(!run.headers().traceparent.contains(PARENT_TRACE));
        run.end(RunEnd::Cancelled, 130);
        let started = std::time::Instant::now();
        let _ = client.shutdown().await;
        assert!(started.elapsed() < CLIENT_FLUSH_TIMEOUT + FLUSH_SLACK);
    }

    #[test]
    fn server_attributes_of_urls() {
        let attrs = server_attributes("http://127.0.0.1:50051");
        assert_eq!(attrs[0], KeyValue::new("server.address", "127.0.0.1"));
        assert_eq!(attrs[1], KeyValue::new("server.port", 50051_i64));
        assert_eq!(
            server_attributes("not a url"),
            vec![KeyValue::new("server.address", "not a url")]
        );
    }
}
