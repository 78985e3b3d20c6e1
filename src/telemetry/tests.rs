//! Unit tests of the telemetry module: the OTLP switch, batchctl's run span and traceparent.

use opentelemetry::trace::Span as _;
use opentelemetry::KeyValue;

use super::client::{server_attributes, CLIENT_FLUSH_TIMEOUT};
use super::*;

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
    let run = client.start_run_with("Process", "http://d:50051", env(&[("TRACEPARENT", PARENT)]));
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
