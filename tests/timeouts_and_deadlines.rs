//! Time limits: a job's own timeout, `default_job_timeout` and `max_job_timeout`, and the call's
//! deadline (`grpc-timeout`), which stops every job and reaches even a client that was not reading.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::Duration;

use batchd::proto::Outcome;
use support::jobs::*;
use support::scrape::{sample, scrape};
use support::*;
use tonic::Code;

// === job timeouts ===

#[tokio::test]
async fn per_job_timeout_ends_timed_out() {
    let server = TestServer::start(|_| {});
    let results = run_batch(
        &server,
        vec![
            with_timeout(sleep_job("slow", 10_000), 0, 50_000_000),
            with_timeout(sleep_job("fast", 1), 10, 0),
        ],
        WAIT,
    )
    .await;
    let slow = &results["slow"];
    assert_eq!(outcome(slow), Outcome::TimedOut, "{slow:?}");
    assert!(slow.error.contains("timed out"), "{slow:?}");
    assert!(slow.output.is_empty());
    assert_admitted_times(slow);
    assert_eq!(outcome(&results["fast"]), Outcome::Ok);
    all_idle(&server).await;
}

#[tokio::test]
async fn job_timeout_is_capped_and_defaulted() {
    let server = TestServer::start(|c| {
        c.default_job_timeout = Duration::from_millis(50);
        c.max_job_timeout = Duration::from_millis(100);
    });
    let results = run_batch(
        &server,
        vec![
            with_timeout(sleep_job("capped", 60_000), 3600, 0),
            sleep_job("default", 60_000),
            with_timeout(sleep_job("under-cap", 1), 0, 90_000_000),
        ],
        WAIT,
    )
    .await;
    let capped = &results["capped"];
    assert_eq!(outcome(capped), Outcome::TimedOut, "{capped:?}");
    assert!(
        capped.error.contains("after 100ms"),
        "the 1h timeout should be capped at max_job_timeout (100ms): {capped:?}"
    );
    let default = &results["default"];
    assert_eq!(outcome(default), Outcome::TimedOut, "{default:?}");
    assert!(
        default.error.contains("after 50ms"),
        "a job without timeout should get default_job_timeout (50ms): {default:?}"
    );
    assert_eq!(outcome(&results["under-cap"]), Outcome::Ok);
    all_idle(&server).await;
}

// === call deadlines ===

/// The status that ends a call reaches a client that was not reading when the call ended: it comes
/// after the results the daemon had handed over, never instead of them, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_reaches_a_client_that_was_not_reading() {
    let server = TestServer::start(|_| {});
    let mut client = server.client_with_limit(64 << 20).await;
    // Long enough for the first echo results to be handed over before it passes, even on a busy
    // machine (checked below, so that a slow run fails with a clear message).
    let mut call = OpenCall::open_request(&mut client, |r| {
        r.set_timeout(Duration::from_secs(3));
    })
    .await;
    // 36 MiB of echo results in response messages of at most 4 MiB: far more than the HTTP/2
    // windows and the transport's buffers take, so one waits in the call's outbox, and more in the
    // session, while the client does not read.
    for b in 0..3 {
        let echoes = (0..384)
            .map(|i| job(&format!("e{b}-{i}"), "echo", &[b'x'; 32 * 1024], &[]))
            .collect();
        call.send(batch(&format!("echo{b}"), echoes)).await;
    }
    call.send(batch("hold", vec![sleep_job("s", 60_000)])).await;
    wait_until("the deadline ends the call's session", WAIT, || {
        server.stats().calls_open == 0
    })
    .await;
    // What the session handed to the transport (this server's only call), all before its status.
    let metrics = scrape(server.admin);
    let messages = sample(&metrics, "batchd_results_per_message_count", "");
    let handed_over = sample(&metrics, "batchd_results_per_message_sum", "");
    assert!(
        messages > 0.0,
        "the deadline passed before the session handed over a single result: the test needs a \
         longer deadline on this machine"
    );
    // `finish_err` reads every message up to the status: what it returns arrived before the status.
    let (results, status) = call.finish_err(Code::DeadlineExceeded, WAIT).await;
    assert!(
        results.iter().all(|r| r.job_id.starts_with('e')),
        "only echo results: {}",
        results.len()
    );
    assert_eq!(
        results.len() as f64,
        handed_over,
        "every result handed over ({messages} messages) reaches the client, ahead of {status:?}"
    );
    let results = by_id(results); // panics on a duplicate
    assert!(
        results.values().all(|r| outcome(r) == Outcome::Ok),
        "every echo result that arrived is whole and OK"
    );
    eprintln!(
        "{} echo results in {messages} messages, then {status:?}",
        results.len()
    );
}

#[tokio::test]
async fn call_deadline_stops_every_job() {
    let server = TestServer::start(|c| c.workers = 2);
    let mut client = server.client().await;
    let mut call = OpenCall::open_request(&mut client, |r| {
        r.set_timeout(Duration::from_millis(1500));
    })
    .await;
    call.send(batch(
        "b",
        (0..4)
            .map(|i| sleep_job(&format!("s{i}"), 60_000))
            .collect(),
    ))
    .await;
    // The call should end at its deadline.
    let (results, _) = call.finish_err(Code::DeadlineExceeded, WAIT).await;
    assert!(
        results.is_empty(),
        "no job finished before the deadline: {results:?}"
    );
    assert_eq!(server.stats().jobs_admitted, 4, "the jobs were admitted");
    all_idle(&server).await;
    wait_until("both workers are free", WAIT, || {
        server.stats().free_workers == 2
    })
    .await;

    // The daemon goes on serving.
    let results = run_batch(&server, vec![echo_job("after", b"a")], WAIT).await;
    assert_eq!(outcome(&results["after"]), Outcome::Ok);
}
