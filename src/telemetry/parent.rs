//! The caller's W3C trace context: a call's `traceparent`/`tracestate` metadata becomes the parent
//! of the engine's session span, and the sampler's verdict on it decides whether job spans are made.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::engine::trace::SessionTrace;

/// Reads W3C trace context from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

/// The trace of a new call of `rpc` from `peer`: the engine's session span, a child of the W3C
/// trace context in `metadata`, sampled as the configured sampler decides. Untraced (one relaxed
/// load) while spans are off.
pub fn session_trace(
    rpc: &'static str,
    metadata: &tonic::metadata::MetadataMap,
    peer: Option<std::net::SocketAddr>,
) -> SessionTrace {
    let span = SessionTrace::span_for(rpc, peer);
    if span.is_disabled() {
        return SessionTrace::none();
    }
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    // Before `context()`, which starts the span and samples it.
    let _ = span.set_parent(parent);
    let sampled = span.context().span().span_context().is_sampled();
    SessionTrace::new(span, sampled)
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
