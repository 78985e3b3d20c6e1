//! batchctl's side of tracing: the `batchctl.run` client span and the W3C context its call sends.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

use super::{shut_down, Otlp, TelemetryError};
use crate::client::{Summary, TraceHeaders};
use crate::outcome::Outcome;

/// The service `batchctl run` calls, for `rpc.service`.
const RUN_SERVICE: &str = "batchd.v1.BatchService";

/// Bound on exporting batchctl's span at exit, unless `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT` sets one.
pub(super) const CLIENT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

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
    pub(super) span: Option<opentelemetry_sdk::trace::Span>,
    headers: TraceHeaders,
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

    pub(super) fn from_env_with(
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TelemetryError> {
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
    /// headers of [`crate::client::outgoing_traceparent`].
    pub fn start_run(&self, method: &'static str, endpoint: &str) -> RunTrace {
        self.start_run_with(method, endpoint, |k| std::env::var(k).ok())
    }

    pub(super) fn start_run_with(
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
pub(super) fn server_attributes(endpoint: &str) -> Vec<KeyValue> {
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

    /// Records the run's counts: jobs sent and done, results by outcome, bad lines, retries, skips,
    /// resubmissions and replicas.
    pub fn record(&mut self, summary: &Summary) {
        let Some(span) = self.span.as_mut().filter(|s| s.is_recording()) else {
            return;
        };
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        span.set_attribute(KeyValue::new("batchctl.jobs.sent", int(summary.sent)));
        span.set_attribute(KeyValue::new("batchctl.jobs.done", int(summary.done)));
        for (o, n) in Outcome::ALL.into_iter().zip(summary.outcomes) {
            let name = format!("batchctl.results.{}", o.as_str());
            span.set_attribute(KeyValue::new(name, int(n)));
        }
        span.set_attribute(KeyValue::new("batchctl.bad_lines", int(summary.bad_lines)));
        span.set_attribute(KeyValue::new("batchctl.retried", int(summary.retried)));
        span.set_attribute(KeyValue::new("batchctl.skipped", int(summary.skipped)));
        // Failover: jobs sent again after their replica was lost, second results dropped, and
        // the replicas (live when last counted, known, losses).
        let failover = [
            ("batchctl.resubmitted", summary.resubmitted),
            ("batchctl.duplicates_dropped", summary.duplicates_dropped),
            ("batchctl.replicas.live", summary.replicas_live),
            ("batchctl.replicas.known", summary.replicas_known),
            ("batchctl.replicas.lost", summary.replicas_lost),
        ];
        for (key, n) in failover {
            span.set_attribute(KeyValue::new(key, int(n)));
        }
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
