//! Metric values scraped from the admin `/metrics` endpoint follow what the daemon does: backpressure
//! counted once per stall, refused calls counted by reason, free workers as workers minus running
//! jobs. (tests/telemetry.rs checks the job counters and the OTLP push.)
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::Duration;

use batchd::proto::{self, Outcome};
use support::jobs::*;
use support::scrape::{sample, scrape, sum};
use support::*;
use tonic::Code;

/// Polls the scrape of `server` until `cond` holds on it; returns that scrape.
async fn scrape_until(server: &TestServer, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    wait_until(what, WAIT, || {
        last = scrape(server.admin);
        cond(&last)
    })
    .await;
    last
}

fn backpressure(metrics: &str) -> f64 {
    sample(metrics, "batchd_backpressure_total", "")
}

fn rejected(metrics: &str, reason: &str) -> f64 {
    let labels = format!("reason=\"{reason}\"");
    sample(metrics, "batchd_calls_rejected_total", &labels)
}

/// `batchd_backpressure_total` counts the times a call's stream stopped being read because its
/// window was full: never for a call that stays under it, once for a call that fills it and stays
/// full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_counts_each_time_a_calls_window_fills() {
    let (server, gate) = gated_server(|c| c.session_window = 4);
    assert_eq!(backpressure(&scrape(server.admin)), 0.0);

    // Under the window: the call is read all along.
    let results = run_batch(
        &server,
        (0..3).map(|i| echo_job(&format!("e{i}"), b"e")).collect(),
        WAIT,
    )
    .await;
    assert_eq!(results.len(), 3);
    assert_eq!(
        backpressure(&scrape(server.admin)),
        0.0,
        "a call under its window never stalled"
    );

    // Eight gated jobs in one batch: four are admitted and hold the window, the rest wait unread.
    let mut call = server.open_call().await;
    let gated = (0..8)
        .map(|i| job(&format!("g{i}"), "gate", b"g", &[]))
        .collect();
    call.send(batch("b", gated)).await;
    scrape_until(&server, "the call stalls", |m| backpressure(m) > 0.0).await;
    // Not a synchronisation: while no job can finish, the call stays stalled: one stall.
    for _ in 0..20 {
        assert_eq!(backpressure(&scrape(server.admin)), 1.0, "one stall so far");
        assert_eq!(
            server.stats().jobs_admitted,
            3 + 4,
            "the window holds 4 jobs"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    gate.add_permits(8);
    call.half_close();
    let results = call.finish_ok(WAIT).await;
    assert_eq!(results.len(), 8);
    assert!(results.iter().all(|r| outcome(r) == Outcome::Ok));
    assert!(backpressure(&scrape(server.admin)) >= 1.0);
}

/// `batchd_calls_rejected_total{reason}` counts refused calls: beyond `max_calls`
/// (`too_many_calls`, Process and RunBatch alike) and once shutdown has begun (`shutting_down`).
/// Calls that are served are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_counted_by_reason() {
    let server = TestServer::start(|c| {
        c.max_calls = 1;
        c.shutdown_grace = Duration::from_secs(60);
    });
    let m = scrape(server.admin);
    assert_eq!(
        (
            rejected(&m, "too_many_calls"),
            rejected(&m, "shutting_down")
        ),
        (0.0, 0.0)
    );

    let mut client = server.client().await;
    let results = run_batch_on(&mut client, vec![echo_job("ok", b"")], WAIT).await;
    assert_eq!(outcome(&results["ok"]), Outcome::Ok);
    wait_until("the served call is over", WAIT, || server.is_idle()).await;
    let held = OpenCall::open(&mut client).await;
    held.send(batch("b", vec![sleep_job("held", 60_000)])).await;
    wait_until("the held job runs", WAIT, || {
        server.stats().jobs_running == 1
    })
    .await;
    let m = scrape(server.admin);
    assert_eq!(rejected(&m, "too_many_calls"), 0.0, "served calls count");

    for _ in 0..2 {
        let status = OpenCall::try_open(&mut client)
            .await
            .err()
            .expect("a call beyond max_calls is refused");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    let status = client
        .run_batch(proto::JobBatch {
            batch_id: "rb".into(),
            jobs: vec![echo_job("x", b"")],
        })
        .await
        .expect_err("RunBatch beyond max_calls is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let m = scrape(server.admin);
    assert_eq!(rejected(&m, "too_many_calls"), 3.0);
    assert_eq!(rejected(&m, "shutting_down"), 0.0);

    // The engine's part of shutdown alone (the transport still takes calls), so that the call
    // reaches the engine and is refused there: a draining transport refuses new streams itself,
    // before any count.
    server.engine.drain();
    let status = OpenCall::try_open(&mut client)
        .await
        .err()
        .expect("a call once shutdown has begun is refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let m = scrape(server.admin);
    assert_eq!(rejected(&m, "shutting_down"), 1.0);
    assert_eq!(rejected(&m, "too_many_calls"), 3.0);
    drop(held);
}

/// `batchd_workers_free` is the configured workers minus the jobs holding a slot
/// (`sum(batchd_jobs_running)`), never below zero, back to all once the jobs end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_workers_are_workers_minus_running_jobs() {
    const WORKERS: f64 = 4.0;
    let (server, gate) = gated_server(|c| c.workers = 4);
    let m = scrape(server.admin);
    assert_eq!(sample(&m, "batchd_workers_free", ""), WORKERS);
    assert_eq!(sum(&m, "batchd_jobs_running"), 0.0);

    let mut call = server.open_call().await;
    let gated = |range: std::ops::Range<usize>| {
        range
            .map(|i| job(&format!("g{i}"), "gate", b"g", &[]))
            .collect()
    };
    // (running, queued) after each step: 3 of 3 run; then 4 run and 2 wait; then the gate opens.
    call.send(batch("a", gated(0..3))).await;
    let m = scrape_until(&server, "3 jobs run", |m| {
        sum(m, "batchd_jobs_running") == 3.0
    })
    .await;
    assert_eq!(sample(&m, "batchd_workers_free", ""), WORKERS - 3.0, "{m}");
    assert_eq!(sum(&m, "batchd_jobs_queued"), 0.0);

    call.send(batch("b", gated(3..6))).await;
    let m = scrape_until(&server, "4 jobs run and 2 wait", |m| {
        sum(m, "batchd_jobs_running") == 4.0 && sum(m, "batchd_jobs_queued") == 2.0
    })
    .await;
    assert_eq!(sample(&m, "batchd_workers_free", ""), 0.0, "{m}");

    // One job ends: a waiting one takes its slot, none is free.
    gate.add_permits(1);
    let m = scrape_until(&server, "4 jobs run and 1 waits", |m| {
        sum(m, "batchd_jobs_running") == 4.0 && sum(m, "batchd_jobs_queued") == 1.0
    })
    .await;
    assert_eq!(sample(&m, "batchd_workers_free", ""), 0.0, "{m}");

    gate.add_permits(5);
    call.half_close();
    assert_eq!(call.finish_ok(WAIT).await.len(), 6);
    let m = scrape_until(&server, "no job runs", |m| {
        sum(m, "batchd_jobs_running") == 0.0
    })
    .await;
    assert_eq!(sample(&m, "batchd_workers_free", ""), WORKERS, "{m}");
}
