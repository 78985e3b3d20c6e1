//! The outer adapter between the engine and the world of logs, traces and metrics: the one module
//! (with its submodules) that imports `opentelemetry`.
//!
//! The engine owns its instruments (`engine::metrics`, `engine::trace`); this module only reads and
//! exports them:
//! - Set-up (this file): structured `tracing` logs on stderr, as text or JSON, filtered by the `log`
//!   setting; [`init`] and the [`Telemetry`] guard that flushes on drop. The daemon and batchctl
//!   build their exporters through one path (`Otlp`: endpoint, timeout, resource,
//!   `OTEL_SDK_DISABLED`). With an OTLP endpoint (`otlp_endpoint` or the standard `OTEL_*`
//!   variables), the engine's spans are turned on and exported by a batch span processor.
//! - [`session_trace`]: a call's W3C `traceparent` becomes the parent of its session span.
//! - [`prometheus`] (`/metrics`), the OTLP metrics push (`push`) and the [`admin`] HTTP listener,
//!   all written from the engine's one table of metric families.
//! - batchctl (`client`, [`ClientTelemetry`]): with an OTLP endpoint in the environment, a
//!   `batchctl.run` client span per run, whose context is the `traceparent` the call sends.

pub mod admin;
mod client;
mod parent;
pub mod prometheus;
mod push;
#[cfg(test)]
mod tests;

pub use client::{ClientTelemetry, RunEnd, RunTrace};
pub use parent::session_trace;

use std::io::IsTerminal;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};
use crate::engine::trace::{self, TARGET as TRACE_TARGET};

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
        trace::enable();
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
