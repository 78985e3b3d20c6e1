//! Observability end to end: spans received by a real OTLP/gRPC receiver, metrics scraped over HTTP.
//!
//! Telemetry is process-global (one subscriber, one tracer provider), so this binary sets it up once,
//! on a runtime of its own that also runs the collector, and each test tells its spans apart by the
//! trace id it sends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use batchd::config::Config;
use batchd::telemetry::Telemetry;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::otlp::{
    attr, fresh_trace, hex, named, open_traced, open_unsampled, Collector, Exported, CALLER_SPAN,
};
use support::recovery::LIVENESS;
use support::scrape::sample;
use support::{batch, http_get, job, wait_until, within, OpenCall, TestServer};
use tokio_util::task::AbortOnDropHandle;

/// How long spans and metrics may take to reach the collector while the exporters are flushed.
const DELIVERY: Duration = Duration::from_secs(10);

struct Shared {
    runtime: tokio::runtime::Runtime,
    collector: Collector,
    telemetry: Telemetry,
}

/// The collector and the global telemetry, set up by the first test that needs them.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    // Built on a thread of its own: the tests call this from inside their runtimes.
    SHARED.get_or_init(|| std::thread::spawn(set_up).join().unwrap())
}

fn set_up() -> Shared {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Serves on this runtime, which lives as long as the process: every test's runtime is gone
    // when its test ends.
    let collector = runtime.block_on(Collector::start());
    let config = Config {
        otlp_endpoint: collector.url(),
        otlp_metrics: true,
        log: "warn".into(),
        ..Config::default()
    };
    let telemetry = runtime
        .block_on(async { batchd::telemetry::init(&config) })
        .unwrap();
    assert!(telemetry.is_tracing() && telemetry.is_pushing_metrics());
    Shared {
        runtime,
        collector,
        telemetry,
    }
}

/// Flushes the exporters every 50 ms, on the shared runtime, until dropped: without it spans wait
/// for the batch processor's timer (5 s) and metrics for the periodic reader's (60 s).
fn keep_flushing() -> AbortOnDropHandle<()> {
    let shared = shared();
    AbortOnDropHandle::new(shared.runtime.spawn(async move {
        loop {
            shared.telemetry.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }))
}

/// Flushes the exporter until `cond` holds on the spans received so far; returns them.
async fn spans_until(what: &str, cond: impl Fn(&[Exported]) -> bool) -> Vec<Exported> {
    let _flushing = keep_flushing();
    let what = format!("the spans of {what} arrive");
    shared().collector.wait_for(&what, DELIVERY, cond).await
}

/// The sum of the data points of metric `name` in the latest export that has it.
fn last_sum(exports: &[ExportMetricsServiceRequest], name: &str) -> i64 {
    use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point::Value as N};
    for export in exports.iter().rev() {
        let metric = export
            .resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .find(|m| m.name == name);
        let Some(metric) = metric else { continue };
        let points = match &metric.data {
            Some(Data::Sum(s)) => &s.data_points,
            Some(Data::Gauge(g)) => &g.data_points,
            _ => return -1,
        };
        return points
            .iter()
            .map(|p| match p.value {
                Some(N::AsInt(i)) => i,
                Some(N::AsDouble(d)) => d as i64,
                None => 0,
            })
            .sum();
    }
    -1
}

/// Shuts `server` down and waits for `serve` to return, failing instead of hanging on a regression.
async fn stop(server: TestServer) {
    server.begin_shutdown();
    within(LIVENESS, "serve returns", server.join())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_join_the_callers_trace_and_show_outcomes() {
    shared();
    let server = TestServer::start(|_| {});
    let mut client = server.client().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut call = open_traced(&mut client, trace, |_| {}).await;
    call.send(batch(
        "b1",
        vec![
            job("a", "echo", b"1", &[]),
            job("b", "echo", b"2", &[]),
            job("c", "no-such-handler", b"", &[]),
        ],
    ))
    .await;
    call.half_close();
    let (results, status) = within(LIVENESS, "the call ends", call.finish()).await;
    status.unwrap();
    assert_eq!(results.len(), 3);

    let spans = spans_until("the half-closed call", |s| {
        !named(s, trace, "batchd.session").is_empty() && named(s, trace, "batchd.job").len() == 3
    })
    .await;
    let session = named(&spans, trace, "batchd.session")[0];
    assert_eq!(
        hex(&session.parent_span_id),
        CALLER_SPAN,
        "parent is the client's span"
    );
    assert_eq!(attr(session, "session.end").as_deref(), Some("half_close"));
    assert_eq!(attr(session, "session.ok").as_deref(), Some("2"));
    assert_eq!(attr(session, "session.rejected").as_deref(), Some("1"));
    assert_eq!(attr(session, "session.jobs").as_deref(), Some("3"));
    let batches = named(&spans, trace, "batchd.batch");
    assert_eq!(batches.len(), 1);
    assert_eq!(attr(batches[0], "batch.id").as_deref(), Some("b1"));
    assert_eq!(batches[0].parent_span_id, session.span_id);
    let jobs: HashMap<String, &Span> = named(&spans, trace, "batchd.job")
        .into_iter()
        .map(|s| (attr(s, "job.id").unwrap(), s))
        .collect();
    for (id, handler, outcome) in [
        ("a", "echo", "ok"),
        ("b", "echo", "ok"),
        ("c", "no-such-handler", "rejected"),
    ] {
        let span = jobs[id];
        assert_eq!(attr(span, "job.handler").as_deref(), Some(handler), "{id}");
        assert_eq!(attr(span, "job.outcome").as_deref(), Some(outcome), "{id}");
        assert_eq!(span.parent_span_id, batches[0].span_id, "{id}");
    }
    assert!(attr(jobs["c"], "job.error")
        .unwrap()
        .contains("unknown handler"));
    assert!(attr(jobs["a"], "job.queued_seconds").is_some());

    // A client that goes away: its jobs' spans say cancelled, and by whom.
    let trace2 = "0af7651916cd43dd8448eb211c80319c";
    let call = open_traced(&mut client, trace2, |_| {}).await;
    call.send(batch(
        "slow",
        vec![
            job("s1", "sleep", b"", &[("ms", "60000")]),
            job("s2", "sleep", b"", &[("ms", "60000")]),
        ],
    ))
    .await;
    wait_until("both sleeps run", Duration::from_secs(5), || {
        server.stats().jobs_running == 2
    })
    .await;
    drop(call);
    drop(client);
    wait_until("the call is gone", Duration::from_secs(5), || {
        server.is_idle()
    })
    .await;
    let spans = spans_until("the dropped call", |s| {
        !named(s, trace2, "batchd.session").is_empty() && named(s, trace2, "batchd.job").len() == 2
    })
    .await;
    let session = named(&spans, trace2, "batchd.session")[0];
    assert_eq!(attr(session, "session.end").as_deref(), Some("disconnect"));
    assert_eq!(attr(session, "session.cancelled").as_deref(), Some("2"));
    for span in named(&spans, trace2, "batchd.job") {
        assert_eq!(attr(span, "job.outcome").as_deref(), Some("cancelled"));
        assert_eq!(
            attr(span, "job.cancelled_by").as_deref(),
            Some("disconnect")
        );
    }
    stop(server).await;
}

/// Calls whose jobs were stopped for `reason`, from the cancellation-latency histogram.
fn cancels(metrics: &str, reason: &str) -> f64 {
    let labels = format!("reason=\"{reason}\"");
    sample(metrics, "batchd_cancel_latency_seconds_count", &labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_add_up_and_gauges_return_to_zero() {
    // `batchd_exec_groups_alive` counts every exec group of the process: none may run meanwhile.
    let _exec = EXEC_GROUPS.lock().await;
    shared();
    let server = TestServer::start(|c| {
        c.max_output = batchd::config::ByteSize(1024);
        c.workers = 1;
    });
    // Also pushed over OTLP (the only engine of this binary that is).
    shared().telemetry.push_metrics(&server.engine);
    let (code, body) = http_get(server.admin, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(http_get(server.admin, "/readyz").0, 200);
    assert_eq!(http_get(server.admin, "/nope").0, 404);

    let mut client = server.client().await;
    let mut call = OpenCall::open(&mut client).await;
    let mut jobs = Vec::new();
    for i in 0..20 {
        jobs.push(job(&format!("ok{i}"), "echo", b"x", &[]));
    }
    for i in 0..3 {
        jobs.push(job(&format!("big{i}"), "echo", &[b'x'; 2048], &[]));
    }
    for i in 0..2 {
        jobs.push(job(&format!("unknown{i}"), "nope", b"", &[]));
    }
    let mut slow = job("slow", "sleep", b"", &[("ms", "60000")]);
    slow.timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 20_000_000,
    });
    jobs.push(slow);
    call.send(batch("b", jobs)).await;
    call.half_close();
    let (results, status) = within(LIVENESS, "the call ends", call.finish()).await;
    status.unwrap();
    assert_eq!(results.len(), 26);

    // A call dropped with a job running and one queued behind it (one worker): both cancelled,
    // and a cancellation latency observed.
    let call = OpenCall::open(&mut client).await;
    let held = vec![
        job("s", "sleep", b"", &[("ms", "60000")]),
        job("e", "echo", b"x", &[]),
    ];
    call.send(batch("c", held)).await;
    wait_until(
        "the sleep runs, the echo waits",
        Duration::from_secs(5),
        || {
            let s = server.stats();
            s.jobs_running == 1 && s.jobs_queued == 1
        },
    )
    .await;
    let scrape = http_get(server.admin, "/metrics").1;
    let by_handler =
        |name: &str, handler: &str| sample(&scrape, name, &format!("handler=\"{handler}\""));
    assert_eq!(by_handler("batchd_jobs_running", "sleep"), 1.0);
    assert_eq!(by_handler("batchd_jobs_running", "echo"), 0.0);
    assert_eq!(by_handler("batchd_jobs_queued", "echo"), 1.0);
    assert_eq!(by_handler("batchd_jobs_queued", "sleep"), 0.0);
    assert_eq!(sample(&scrape, "batchd_calls_open", ""), 1.0);
    drop(call);
    drop(client);
    wait_until("the call is gone", Duration::from_secs(5), || {
        server.is_idle()
    })
    .await;

    let m = http_get(server.admin, "/metrics").1;
    let finished = |handler: &str, outcome: &str| {
        sample(
            &m,
            "batchd_jobs_finished_total",
            &format!("handler=\"{handler}\",outcome=\"{outcome}\""),
        )
    };
    assert_eq!(finished("echo", "ok"), 20.0);
    assert_eq!(finished("echo", "failed"), 3.0);
    assert_eq!(finished("_unknown", "rejected"), 2.0);
    assert_eq!(finished("sleep", "timed_out"), 1.0);
    assert_eq!(finished("sleep", "cancelled"), 1.0);
    assert_eq!(finished("echo", "cancelled"), 1.0);
    let total: f64 = m
        .lines()
        .filter(|l| l.starts_with("batchd_jobs_finished_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 28.0, "every job sent is counted once");
    let admitted = |handler: &str| {
        sample(
            &m,
            "batchd_jobs_admitted_total",
            &format!("handler=\"{handler}\""),
        )
    };
    assert_eq!((admitted("echo"), admitted("sleep")), (24.0, 2.0));
    assert_eq!(server.stats().jobs_admitted, 26);
    for gauge in ["batchd_calls_open", "batchd_results_buffered"] {
        assert_eq!(sample(&m, gauge, ""), 0.0, "{gauge}");
    }
    for gauge in ["batchd_jobs_queued{", "batchd_jobs_running{"] {
        let rows: Vec<&str> = m.lines().filter(|l| l.starts_with(gauge)).collect();
        assert!(rows.len() >= 3, "a row per handler: {rows:?}");
        assert!(rows.iter().all(|l| l.ends_with(" 0")), "{rows:?}");
    }
    assert_eq!(sample(&m, "batchd_job_queue_seconds_count", ""), 25.0);
    assert_eq!(sample(&m, "batchd_job_run_seconds_count", ""), 24.0);
    assert_eq!(cancels(&m, "disconnect"), 1.0);
    assert_eq!(cancels(&m, "deadline"), 0.0);
    assert_eq!(
        sample(&m, "batchd_calls_ended_total", "reason=\"disconnect\""),
        1.0
    );
    assert_eq!(
        sample(&m, "batchd_calls_ended_total", "reason=\"half_close\""),
        1.0
    );
    assert!(sample(&m, "batchd_results_per_message_count", "") >= 1.0);
    assert!(sample(&m, "batchd_tokio_tasks_alive", "") >= 1.0);
    assert!(sample(&m, "batchd_process_resident_memory_bytes", "") > 0.0);
    assert_eq!(sample(&m, "batchd_exec_groups_alive", ""), 0.0);

    // The same counts pushed over OTLP.
    let collector = &shared().collector;
    let flushing = keep_flushing();
    wait_until("the 28 jobs finished are pushed", DELIVERY, || {
        last_sum(&collector.metrics(), "batchd.jobs.finished") == 28
    })
    .await;
    drop(flushing);
    let pushed = collector.metrics();
    assert_eq!(
        last_sum(&pushed, "batchd.jobs.finished"),
        28,
        "jobs finished, pushed over OTLP"
    );
    assert_eq!(last_sum(&pushed, "batchd.calls.open"), 0);

    // The example dashboard only uses metrics the daemon exposes.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana-dashboard.json"
    ))
    .unwrap();
    for part in dashboard.split("batchd_").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        let name = format!("batchd_{name}");
        assert!(
            m.lines().any(|l| l.starts_with(&name)),
            "the dashboard uses {name}, which /metrics does not expose"
        );
    }

    // Draining: /readyz turns 503 while /healthz stays 200.
    let mut client = server.client().await;
    let mut call = OpenCall::open(&mut client).await;
    call.send(batch("d", vec![job("s", "sleep", b"", &[("ms", "300")])]))
        .await;
    call.half_close();
    wait_until("the sleep runs", Duration::from_secs(5), || {
        server.stats().jobs_running == 1
    })
    .await;
    server.begin_shutdown();
    let admin = server.admin;
    wait_until("readyz says draining", Duration::from_secs(5), || {
        http_get(admin, "/readyz").0 == 503
    })
    .await;
    assert_eq!(http_get(admin, "/healthz").0, 200);
    let (_, status) = within(LIVENESS, "the call ends", call.finish()).await;
    status.unwrap();
    within(LIVENESS, "serve returns", server.join())
        .await
        .unwrap();
    assert!(
        std::net::TcpStream::connect(admin).is_err(),
        "the admin listener stops with the daemon"
    );
}

/// Held by a test while it runs exec commands, and by one that expects none to run: the count of
/// live exec process groups is process-wide.
static EXEC_GROUPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The OTLP status code of a span (0 unset, 1 ok, 2 error).
fn status_code(span: &Span) -> i32 {
    span.status.as_ref().map_or(0, |s| s.code)
}

const STATUS_ERROR: i32 = opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_job_spans_carry_the_command_pid_and_exit_status() {
    use batchd::config::ExecSpec;
    use batchd::handlers::exec;
    use batchd::proto::Outcome;
    use batchd::Registry;

    let _exec = EXEC_GROUPS.lock().await;
    shared();
    // `echo $$` prints the shell's own pid: the span's pid can be checked against the real one.
    let specs = vec![
        ExecSpec::new("own-pid", &["/bin/sh", "-c", "echo $$"]),
        ExecSpec::new("exit-3", &["/bin/sh", "-c", "exit 3"]),
    ];
    let mut registry = Registry::builtin();
    let _reaper = exec::register(&mut registry, &specs).unwrap();
    let server = TestServer::start_with(|c| c.exec = specs, registry);
    let mut client = server.client().await;
    let trace = fresh_trace();
    let mut call = open_traced(&mut client, &trace, |_| {}).await;
    call.send(batch(
        "exec",
        vec![
            job("pid", "own-pid", b"", &[]),
            job("three", "exit-3", b"", &[]),
        ],
    ))
    .await;
    call.half_close();
    let (results, status) = within(LIVENESS, "the call ends", call.finish()).await;
    status.unwrap();
    let results = support::by_id(results);
    assert_eq!(support::outcome(&results["pid"]), Outcome::Ok);
    assert_eq!(support::outcome(&results["three"]), Outcome::Failed);
    let printed: i64 = std::str::from_utf8(&results["pid"].output)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let spans = spans_until("the exec call", |s| {
        !named(s, &trace, "batchd.session").is_empty() && named(s, &trace, "batchd.job").len() == 2
    })
    .await;
    let jobs: HashMap<String, &Span> = named(&spans, &trace, "batchd.job")
        .into_iter()
        .map(|s| (attr(s, "job.id").unwrap(), s))
        .collect();

    let ok = jobs["pid"];
    assert_eq!(attr(ok, "job.handler").as_deref(), Some("own-pid"));
    assert_eq!(attr(ok, "exec.command").as_deref(), Some("/bin/sh"));
    let pid: i64 = attr(ok, "exec.pid").unwrap().parse().unwrap();
    assert!(pid > 0, "exec.pid {pid}");
    assert_eq!(pid, printed, "exec.pid is the pid of the command that ran");
    assert_eq!(
        attr(ok, "exec.exit_status").as_deref(),
        Some("exit status: 0")
    );
    assert_eq!(attr(ok, "job.outcome").as_deref(), Some("ok"));
    assert_ne!(status_code(ok), STATUS_ERROR, "an ok job is no error");

    let failed = jobs["three"];
    assert_eq!(attr(failed, "job.handler").as_deref(), Some("exit-3"));
    assert_eq!(attr(failed, "exec.command").as_deref(), Some("/bin/sh"));
    let pid: i64 = attr(failed, "exec.pid").unwrap().parse().unwrap();
    assert!(pid > 0, "exec.pid {pid}");
    assert_eq!(
        attr(failed, "exec.exit_status").as_deref(),
        Some("exit status: 3")
    );
    assert_eq!(attr(failed, "job.outcome").as_deref(), Some("failed"));
    let error = attr(failed, "job.error").unwrap();
    assert!(error.contains("exit status: 3"), "job.error {error:?}");
    assert_eq!(
        status_code(failed),
        STATUS_ERROR,
        "a failed job is an error"
    );

    let session = named(&spans, &trace, "batchd.session")[0];
    assert_eq!(attr(session, "session.ok").as_deref(), Some("1"));
    assert_eq!(attr(session, "session.failed").as_deref(), Some("1"));
    drop(call);
    drop(client);
    stop(server).await;
    wait_until("no exec group is left", Duration::from_secs(5), || {
        exec::groups_alive() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_ends_its_session_span_deadline() {
    shared();
    let server = TestServer::start(|_| {});
    let mut client = server.client().await;
    let trace = fresh_trace();
    let mut call = open_traced(&mut client, &trace, |r| {
        r.set_timeout(Duration::from_secs(1));
    })
    .await;
    call.send(batch(
        "late",
        vec![job("s", "sleep", b"", &[("ms", "60000")])],
    ))
    .await;
    wait_until("the sleep runs", Duration::from_secs(5), || {
        server.stats().jobs_running == 1
    })
    .await;
    let (results, status) = within(LIVENESS, "the call ends", call.finish()).await;
    let status = status.expect_err("the call ends at its deadline");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(results.is_empty(), "{results:?}");

    let spans = spans_until("the call past its deadline", |s| {
        !named(s, &trace, "batchd.session").is_empty() && named(s, &trace, "batchd.job").len() == 1
    })
    .await;
    let session = named(&spans, &trace, "batchd.session")[0];
    assert_eq!(attr(session, "session.end").as_deref(), Some("deadline"));
    assert_eq!(attr(session, "session.cancelled").as_deref(), Some("1"));
    assert_eq!(status_code(session), STATUS_ERROR, "a deadline is an error");
    let span = named(&spans, &trace, "batchd.job")[0];
    assert_eq!(attr(span, "job.id").as_deref(), Some("s"));
    assert_eq!(attr(span, "job.outcome").as_deref(), Some("cancelled"));
    assert_eq!(attr(span, "job.cancelled_by").as_deref(), Some("deadline"));
    assert!(attr(span, "job.error").unwrap().contains("deadline"));
    let ran: f64 = attr(span, "job.run_seconds").unwrap().parse().unwrap();
    assert!(ran > 0.0, "it ran until the deadline: {ran}");
    wait_until("the call is over", Duration::from_secs(5), || {
        server.is_idle()
    })
    .await;
    let m = http_get(server.admin, "/metrics").1;
    assert_eq!(cancels(&m, "deadline"), 1.0, "its cancellation latency");
    assert_eq!(cancels(&m, "disconnect"), 0.0);
    drop(call);
    drop(client);
    stop(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_the_grace_period_ends_the_session_span_shutdown() {
    shared();
    let server = TestServer::start(|c| c.shutdown_grace = Duration::from_millis(200));
    let mut client = server.client().await;
    let trace = fresh_trace();
    let mut call = open_traced(&mut client, &trace, |_| {}).await;
    call.send(batch(
        "parked",
        vec![job("s", "sleep", b"", &[("ms", "60000")])],
    ))
    .await;
    wait_until("the sleep runs", Duration::from_secs(5), || {
        server.stats().jobs_running == 1
    })
    .await;
    server.begin_shutdown();
    let (results, status) = within(LIVENESS, "the call ends", call.finish()).await;
    let status = status.expect_err("a call open at shutdown ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(
        support::outcome(&results[0]),
        batchd::proto::Outcome::Cancelled
    );
    drop(call);
    drop(client);
    let engine = server.engine.clone();
    within(LIVENESS, "serve returns", server.join())
        .await
        .unwrap();
    let m = batchd::telemetry::prometheus::render(&engine);
    assert_eq!(cancels(&m, "shutdown"), 1.0, "its cancellation latency");

    let spans = spans_until("the call cut by shutdown", |s| {
        !named(s, &trace, "batchd.session").is_empty() && named(s, &trace, "batchd.job").len() == 1
    })
    .await;
    let session = named(&spans, &trace, "batchd.session")[0];
    assert_eq!(attr(session, "session.end").as_deref(), Some("shutdown"));
    assert_eq!(attr(session, "session.cancelled").as_deref(), Some("1"));
    let span = named(&spans, &trace, "batchd.job")[0];
    assert_eq!(attr(span, "job.id").as_deref(), Some("s"));
    assert_eq!(attr(span, "job.outcome").as_deref(), Some("cancelled"));
    assert_eq!(attr(span, "job.cancelled_by").as_deref(), Some("shutdown"));
    assert!(attr(span, "job.error").unwrap().contains("shut down"));
}

/// Sampling is decided once per call: a call whose caller's span is not sampled (flags `00`) gets no
/// span at all, none of its jobs in particular, while a sampled call's spans arrive as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_call_creates_no_job_spans() {
    shared();
    let server = TestServer::start(|_| {});
    let mut client = server.client().await;
    let jobs = || {
        vec![
            job("a", "echo", b"1", &[]),
            job("s", "sleep", b"", &[("ms", "1")]),
            job("r", "no-such-handler", b"", &[]),
        ]
    };

    let unsampled = fresh_trace();
    let mut call = open_unsampled(&mut client, &unsampled, |_| {}).await;
    call.send(batch("b", jobs())).await;
    call.half_close();
    let (results, status) = within(LIVENESS, "the call ends", call.finish()).await;
    status.unwrap();
    assert_eq!(results.len(), 3, "the call itself is served as usual");
    // Its session is over, so any span it made has ended, ahead of the sampled call's.
    wait_until("the unsampled call is over", DELIVERY, || server.is_idle()).await;

    let sampled = fresh_trace();
    let mut call = open_traced(&mut client, &sampled, |_| {}).await;
    call.send(batch("b", jobs())).await;
    call.half_close();
    let (results, status) = within(LIVENESS, "the call ends", call.finish()).await;
    status.unwrap();
    assert_eq!(results.len(), 3);

    // Spans are exported in the order they end: once the sampled call's are in, any span of the
    // earlier, unsampled call would be too.
    let spans = spans_until("the sampled call", |s| {
        !named(s, &sampled, "batchd.session").is_empty()
            && named(s, &sampled, "batchd.job").len() == 3
    })
    .await;
    assert_eq!(named(&spans, &sampled, "batchd.batch").len(), 1);
    assert!(
        named(&spans, &unsampled, "batchd.job").is_empty(),
        "job spans of an unsampled call"
    );
    let any: Vec<&str> = spans
        .iter()
        .filter(|e| hex(&e.span.trace_id) == unsampled)
        .map(|e| e.span.name.as_str())
        .collect();
    assert!(any.is_empty(), "spans of an unsampled call: {any:?}");
    drop(call);
    drop(client);
    stop(server).await;
}
