//! A real OTLP/gRPC collector for tests: receives spans (with their resource's `service.name`) and
//! metric exports on 127.0.0.1, and the helpers to find what it got.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchd::proto::{self, batch_service_client::BatchServiceClient};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::daemon::Daemon;
use super::{wait_until, OpenCall};

/// A span and the `service.name` of the resource it came with.
#[derive(Debug, Clone)]
pub struct Exported {
    pub service: String,
    pub span: Span,
}

/// What the collector received, in arrival order.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<Exported>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

/// An OTLP/gRPC receiver (traces and metrics) serving on the runtime that started it.
#[derive(Clone)]
pub struct Collector {
    addr: SocketAddr,
    received: Received,
}

impl Collector {
    /// Serves on a free port of 127.0.0.1, on the current runtime, for as long as it runs.
    pub async fn start() -> Self {
        let received = Received::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(received.clone()))
                .add_service(MetricsServiceServer::new(received.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Self { addr, received }
    }

    /// Its endpoint, for `otlp_endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Exported> {
        self.received.spans.lock().unwrap().clone()
    }

    /// Every metric export received so far.
    pub fn metrics(&self) -> Vec<ExportMetricsServiceRequest> {
        self.received.metrics.lock().unwrap().clone()
    }

    /// Polls until `cond` holds on the spans received, or panics with `what` after `limit`;
    /// returns the spans.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&[Exported]) -> bool,
    ) -> Vec<Exported> {
        wait_until(what, limit, || cond(&self.received.spans.lock().unwrap())).await;
        self.spans()
    }

    /// Waits (up to `limit`) for a span named `name`, takes every such span out of the ones received
    /// and returns it, asserting it was the only one since the last take.
    pub async fn take_one(&self, name: &str, limit: Duration) -> Exported {
        let what = format!("a {name} span arrives");
        self.wait_for(&what, limit, |s| s.iter().any(|e| e.span.name == name))
            .await;
        let mut got = self.received.spans.lock().unwrap();
        let (taken, rest): (Vec<_>, Vec<_>) = got.drain(..).partition(|e| e.span.name == name);
        *got = rest;
        assert_eq!(taken.len(), 1, "one {name} span at a time: {taken:?}");
        taken.into_iter().next().unwrap()
    }

    /// Starts the real `batchd args…` on a port of its choosing, exporting its spans here with its
    /// batch span processor's timer set to `schedule_delay` (`OTEL_BSP_SCHEDULE_DELAY`), sampling
    /// every call whose caller's trace is sampled; waits until it serves.
    pub async fn traced_daemon(&self, schedule_delay: Duration, args: &[&str]) -> Daemon {
        let otlp = self.url();
        let delay = schedule_delay.as_millis().to_string();
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", delay.as_str()),
            ("OTEL_SDK_DISABLED", "false"),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
        ];
        Daemon::serving_with(args, &env).await
    }
}

/// The span id [`open_traced`] gives as the caller's.
pub const CALLER_SPAN: &str = "b7ad6b7169203331";

/// Opens a Process call that is a child of span [`CALLER_SPAN`] of trace `trace` (sampled), with
/// `edit` changing the request further.
pub async fn open_traced(
    client: &mut BatchServiceClient<Channel>,
    trace: &str,
    edit: impl FnOnce(&mut tonic::Request<ReceiverStream<proto::ProcessRequest>>),
) -> OpenCall {
    let traceparent = format!("00-{trace}-{CALLER_SPAN}-01");
    OpenCall::open_request(client, |r| {
        r.metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        edit(r);
    })
    .await
}

/// Like [`open_traced`], but the caller's span is not sampled (trace flags `00`): a parent-based
/// sampler does not sample the call either.
pub async fn open_unsampled(
    client: &mut BatchServiceClient<Channel>,
    trace: &str,
    edit: impl FnOnce(&mut tonic::Request<ReceiverStream<proto::ProcessRequest>>),
) -> OpenCall {
    let traceparent = format!("00-{trace}-{CALLER_SPAN}-00");
    OpenCall::open_request(client, |r| {
        r.metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        edit(r);
    })
    .await
}

/// A trace id no other test of this process uses (32 hex digits, never all zeros).
pub fn fresh_trace() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let high = h.finish();
    format!("{high:016x}{:016x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let service = value(&attrs, "service.name").unwrap_or_default();
            for ss in rs.scope_spans {
                got.extend(ss.spans.into_iter().map(|span| Exported {
                    service: service.clone(),
                    span,
                }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// The value of attribute `key` as text.
pub fn value(attrs: &[KeyValue], key: &str) -> Option<String> {
    let kv = attrs.iter().find(|kv| kv.key == key)?;
    Some(match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

/// The value of `span`'s attribute `key` as text.
pub fn attr(span: &Span, key: &str) -> Option<String> {
    value(&span.attributes, key)
}

/// Lower-case hex, as trace and span ids are written in a `traceparent`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of trace `trace` (hex) named `name`, in arrival order.
pub fn named<'a>(spans: &'a [Exported], trace: &str, name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .map(|e| &e.span)
        .filter(|s| hex(&s.trace_id) == trace && s.name == name)
        .collect()
}
