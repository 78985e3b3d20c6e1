//! Backpressure: a call holds at most `session_window` jobs and `session_bytes` of payloads; beyond
//! either the daemon stops reading it and HTTP/2 flow control holds the client back, so a client
//! that never reads cannot grow the daemon's memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::Duration;

use batchd::config::ByteSize;
use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::Outcome;
use support::jobs::*;
use support::recovery::*;
use support::*;
use tonic::transport::Channel;

// === session_bytes ===

/// A call holds at most `session_bytes` of payloads (plus one job): beyond it the daemon stops
/// reading the call's stream, whatever room `session_window` has left, and HTTP/2 flow control
/// holds the client back; as jobs finish, reading resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_holds_at_most_session_bytes_of_payloads() {
    let (server, gate) = gated_server(|c| {
        c.workers = 1;
        c.session_bytes = ByteSize::mib(1);
    });
    let mut call = server.open_call().await;
    call.send(batch("hold", vec![job("hold", "gate", b"", &[])]))
        .await;
    wait_until("the gated job holds the only worker", WAIT, || {
        server.stats().jobs_running == 1
    })
    .await;
    // 40 echo jobs of 256 KiB, one per message: 10 MiB, more than the client's channel (16 messages)
    // and the HTTP/2 windows take.
    let tx = call.tx.clone().unwrap();
    let sender = tokio::spawn(async move {
        for i in 0..40 {
            let job = echo_job(&format!("e{i}"), &[b'x'; 256 * 1024]);
            if tx.send(batch(&format!("b{i}"), vec![job])).await.is_err() {
                return;
            }
        }
    });
    // Four queued echoes make 1 MiB: the session stops there.
    wait_until("four echoes are admitted", WAIT, || {
        server.stats().jobs_admitted >= 5
    })
    .await;
    // Not a synchronisation: the bound must hold however long one watches.
    for _ in 0..20 {
        let s = server.stats();
        assert_eq!(s.jobs_admitted, 5, "no job past the byte budget: {s:?}");
        assert!(!sender.is_finished(), "the client is held back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Jobs finish, bytes free up, reading resumes until every job ran.
    gate.add_permits(1);
    let results = call.results(41, WAIT).await;
    sender.await.unwrap();
    call.half_close();
    call.finish_ok(WAIT).await;
    let ok = results.iter().filter(|r| outcome(r) == Outcome::Ok).count();
    assert_eq!(ok, 41, "every job ran once the budget had room");
}

// === session_window ===

const WINDOW: u64 = 64;

/// Floods a new call with echo jobs and never reads a result; asserts the server's bounds once the
/// client is blocked. Returns the client and its call, still open.
async fn flood_without_reading(
    url: String,
    engine: batchd::Engine,
) -> (BatchServiceClient<Channel>, OpenCall) {
    const PER_BATCH: usize = 32;
    let mut client = BatchServiceClient::connect(url).await.unwrap();
    let call = OpenCall::open(&mut client).await;
    let tx = call.tx.as_ref().unwrap();
    let payload = vec![7u8; 1024];
    // The gauges are read one by one while the session moves jobs between them, so only each one
    // alone is bounded while jobs flow; their sum is checked once everything stands still.
    let mut peak = batchd::engine::Stats::default();
    let mut sample = |s: batchd::engine::Stats| {
        peak.jobs_queued = peak.jobs_queued.max(s.jobs_queued);
        peak.jobs_running = peak.jobs_running.max(s.jobs_running);
        peak.results_buffered = peak.results_buffered.max(s.results_buffered);
    };

    // Send until the server stops reading. A send that makes no progress for a second may only mean
    // a slow machine: the server has stopped once two such sends in a row leave its state unchanged
    // (a send blocks only while the call's channel is full, so the client has sent more than the
    // server took). Waiting that out is bounded, and so is sending.
    let mut sent = 0usize;
    let mut n = 0;
    let mut blocked_sends = 0;
    let mut blocked_at: Option<batchd::engine::Stats> = None;
    let later = loop {
        let jobs = (0..PER_BATCH)
            .map(|k| job(&format!("{n}-{k}"), "echo", &payload, &[]))
            .collect();
        n += 1;
        match tokio::time::timeout(Duration::from_secs(1), tx.send(batch("b", jobs))).await {
            Ok(Ok(())) => {
                sent += PER_BATCH;
                blocked_at = None;
            }
            Ok(Err(_)) => panic!("the call ended while the client was sending"),
            Err(_) => {
                let now = engine.stats();
                sample(now);
                if blocked_at == Some(now) {
                    break now;
                }
                blocked_at = Some(now);
                blocked_sends += 1;
                assert!(
                    blocked_sends < 60,
                    "the server neither read on nor stood still ({blocked_sends} sends blocked)"
                );
            }
        }
        sample(engine.stats());
        assert!(
            sent < 1_000_000,
            "the server kept reading a client that never reads ({sent} jobs sent)"
        );
    };
    eprintln!(
        "client blocked after {sent} jobs sent; server admitted {}",
        later.jobs_admitted
    );
    assert!(
        (later.jobs_admitted as usize) < sent,
        "the server admitted {} of {sent} jobs sent: it must leave the rest to flow control",
        later.jobs_admitted
    );
    assert!(
        later.jobs_queued + later.jobs_running + later.results_buffered <= WINDOW,
        "the call holds more than its window of {WINDOW}: {later:?}"
    );
    assert!(
        peak.jobs_queued <= WINDOW
            && peak.jobs_running <= WINDOW
            && peak.results_buffered <= WINDOW,
        "a gauge went over the window of {WINDOW}: peaks {peak:?}"
    );
    assert_eq!(later.calls_open, 1);
    (client, call)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_held_to_the_session_window() {
    let server = TestServer::start(|c| c.session_window = WINDOW as usize);
    let baseline = idle_tasks(&server).await;

    // The client runs on its own runtime, and goes away by shutting it down: dropping a call whose
    // request body is stuck behind flow control does not reset the stream (hyper's body pipe keeps
    // it), so only the end of the client's connection tells the server it is gone.
    let (url, engine) = (server.url(), server.engine.clone());
    let client_thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let held = runtime.block_on(flood_without_reading(url, engine));
        drop(runtime);
        held
    });
    let held = tokio::task::spawn_blocking(move || client_thread.join())
        .await
        .unwrap()
        .unwrap_or_else(|_| panic!("the flooding client failed (see its panic above)"));

    assert_recovered(&server, baseline).await;
    drop(held);
}
