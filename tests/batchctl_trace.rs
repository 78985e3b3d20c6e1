#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `batchctl.run` span, received by a real OTLP receiver: its attributes, its place in the
//! caller's trace and the daemon's, how the run ended, and an exit a dead collector cannot hold.
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};
use support::batchctl::*;
use support::otlp::{attr, hex, Collector};
use support::{gated_server, wait_until, TestServer};

/// Short enough that the daemon's spans reach the collector at once.
const BATCH_DELAY: Duration = Duration::from_millis(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_run_exports_its_span_and_the_daemons_spans_are_its_children() {
    let collector = Collector::start().await;
    let otlp = collector.url();
    let daemon = collector.traced_daemon(BATCH_DELAY, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(
        dir.path(),
        "jobs.jsonl",
        [
            echo_line("a", "1"),
            echo_line("b", "2"),
            r#"{"id":"c","handler":"no-such-handler"}"#.to_owned(),
        ],
    );
    // A CI job's trace: batchctl joins it.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let parent = "b7ad6b7169203331";
    let traceparent = format!("00-{trace}-{parent}-01");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("TRACEPARENT", traceparent.as_str()),
        ("TRACESTATE", "ci=7"),
    ];
    let args = [
        "--endpoint",
        &daemon.url,
        "run",
        "--quiet",
        path_str(&input),
    ];
    let done = Ctl::spawn_env(&args, None, &env).finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "one job rejected: {done:?}");
    assert_eq!(records(&done.stdout).len(), 3);
    assert_eq!(
        done.stderr.lines().count(),
        1,
        "only the summary: {}",
        done.stderr
    );

    let run = collector.take_one("batchctl.run", LIVENESS).await;
    let span = &run.span;
    assert_eq!(run.service, "batchctl", "the default service name");
    assert_eq!(span.kind, SpanKind::Client as i32);
    assert_eq!(
        hex(&span.trace_id),
        trace,
        "batchctl joins the caller's trace"
    );
    assert_eq!(
        hex(&span.parent_span_id),
        parent,
        "its parent is $TRACEPARENT"
    );
    assert_eq!(span.trace_state, "ci=7", "$TRACESTATE is carried on");
    let port = daemon.url.rsplit(':').next().unwrap();
    for (key, expected) in [
        ("rpc.system", "grpc"),
        ("rpc.service", "batchd.v1.BatchService"),
        ("rpc.method", "Process"),
        ("server.address", "127.0.0.1"),
        ("server.port", port),
        ("batchctl.jobs.sent", "3"),
        ("batchctl.jobs.done", "3"),
        ("batchctl.results.ok", "2"),
        ("batchctl.results.failed", "0"),
        ("batchctl.results.rejected", "1"),
        ("batchctl.bad_lines", "0"),
        ("batchctl.end", "completed"),
        ("process.exit.code", "1"),
    ] {
        assert_eq!(attr(span, key).as_deref(), Some(expected), "{key}");
    }
    let status = span.status.clone().unwrap_or_default();
    assert_eq!(status.code, StatusCode::Unset as i32, "{status:?}");

    // The daemon got the span's context as traceparent: its session span is the child.
    let spans = collector
        .wait_for("the daemon's session span arrives", LIVENESS, |s| {
            s.iter()
                .any(|e| e.span.name == "batchd.session" && hex(&e.span.trace_id) == trace)
        })
        .await;
    let session = spans
        .iter()
        .find(|e| e.span.name == "batchd.session")
        .unwrap();
    assert_eq!(
        session.span.parent_span_id, span.span_id,
        "batchd.session is a child of batchctl.run"
    );
    assert_eq!(attr(&session.span, "session.jobs").as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_span_says_how_the_run_ended() {
    let collector = Collector::start().await;
    let otlp = collector.url();
    let (server, gate) = gated_server(|_| {});
    let dir = tempfile::tempdir().unwrap();

    // Cancelled by Ctrl-C; only the traces endpoint set; no $TRACEPARENT: a trace of its own.
    let input = write_lines(
        dir.path(),
        "gated.jsonl",
        (0..5).map(|i| format!(r#"{{"id":"g{i}","handler":"gate"}}"#)),
    );
    let args = with_endpoint(&server, &["run", "--quiet", path_str(&input)]);
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp.as_str()),
        ("OTEL_SERVICE_NAME", "ci-batchctl"),
    ];
    let ctl = Ctl::spawn_env(&strs(&args), None, &env);
    wait_until("the 5 jobs run", LIVENESS, || {
        server.stats().jobs_running == 5
    })
    .await;
    ctl.signal("INT");
    let done = ctl.finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_INTERRUPTED), "{done:?}");
    let run = collector.take_one("batchctl.run", LIVENESS).await;
    assert_eq!(run.service, "ci-batchctl", "OTEL_SERVICE_NAME is honoured");
    assert!(run.span.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        attr(&run.span, "batchctl.end").as_deref(),
        Some("cancelled")
    );
    assert_eq!(attr(&run.span, "batchctl.jobs.sent").as_deref(), Some("5"));
    assert_eq!(attr(&run.span, "process.exit.code").as_deref(), Some("130"));
    drop(gate);

    // An error: the daemon cannot be reached.
    let (url, _refusing) = refused_endpoint();
    let args = ["--endpoint", url.as_str(), "run", path_str(&input)];
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str())];
    let done = Ctl::spawn_env(&args, None, &env).finish(LIVENESS).await;
    assert_eq!(done.code, Some(EXIT_UNREACHABLE), "{done:?}");
    assert_eq!(done.stderr.lines().count(), 1, "{}", done.stderr);
    let run = collector.take_one("batchctl.run", LIVENESS).await;
    assert_eq!(attr(&run.span, "batchctl.end").as_deref(), Some("error"));
    assert_eq!(attr(&run.span, "process.exit.code").as_deref(), Some("3"));
    let status = run.span.status.clone().unwrap_or_default();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(
        status.message.starts_with("cannot reach the daemon at"),
        "{status:?}"
    );

    // OTEL_SDK_DISABLED=true wins over the endpoint, and the sampler is the SDK's. A traced
    // batchctl delivers its span before it exits (the runs above), so nothing received once this
    // one has exited means nothing sent.
    let input = write_lines(dir.path(), "echo.jsonl", [echo_line("e", "x")]);
    let args = with_endpoint(&server, &["run", "--quiet", path_str(&input)]);
    for off in [
        ("OTEL_SDK_DISABLED", "true"),
        ("OTEL_TRACES_SAMPLER", "always_off"),
    ] {
        let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()), off];
        let done = Ctl::spawn_env(&strs(&args), None, &env)
            .finish(LIVENESS)
            .await;
        assert_eq!(done.code, Some(EXIT_OK), "{off:?}: {done:?}");
        assert!(
            collector.spans().is_empty(),
            "{off:?}: {:?}",
            collector.spans()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_does_not_answer_does_not_hold_the_exit() {
    // Accepts connections, holds them open for the whole test and never says a word: the export can
    // only time out, so an exit at all shows that the flush gave up instead of waiting for it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", silent.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    let server = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let input = write_lines(dir.path(), "jobs.jsonl", [echo_line("a", "x")]);
    let args = with_endpoint(&server, &["run", "--quiet", path_str(&input)]);
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "300"),
    ];
    let started = Instant::now();
    // Generous: a loaded machine may be slow to start and run the process; a hang never ends.
    let done = Ctl::spawn_env(&strs(&args), None, &env)
        .finish(Duration::from_secs(30))
        .await;
    let took = started.elapsed();
    assert_eq!(done.code, Some(EXIT_OK), "{done:?}");
    assert_eq!(
        records(&done.stdout).len(),
        1,
        "the results are written first"
    );
    assert!(!done.stderr.contains("panicked"), "{}", done.stderr);
    // It tried the export and waited for its timeout before giving up.
    wait_until("the collector got batchctl's connection", LIVENESS, || {
        accepted.load(Ordering::SeqCst) > 0
    })
    .await;
    assert!(
        took >= Duration::from_millis(300),
        "exited before the export timeout: {took:?}"
    );
    holder.abort();
}
