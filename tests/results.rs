//! What a call gets back: exactly one result per job under concurrency, results coalesced into
//! messages (and kept under 4 MiB), half-close, `queued`/`ran` times, and RunBatch.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::HashMap;

use batchd::config::ByteSize;
use batchd::proto::{self, Outcome};
use prost::Message;
use support::jobs::*;
use support::otlp::hex;
use support::*;

// === exactly once ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_results_under_concurrency() {
    const CALLS: usize = 8;
    const JOBS: usize = 2_000;
    const BATCH: usize = 250;
    let server = TestServer::start(|c| c.workers = 64);
    let payload = |c: usize, i: usize| {
        let mut p = format!("call {c} job {i}:").into_bytes();
        p.extend((0..(i % 37) as u8).map(|b| b ^ (c as u8)));
        p
    };

    let shared = server.client().await;
    let mut calls = Vec::new();
    for c in 0..CALLS {
        // Half the calls share one connection, the others have their own.
        let mut client = if c % 2 == 0 {
            shared.clone()
        } else {
            server.client().await
        };
        calls.push(tokio::spawn(async move {
            let mut call = OpenCall::open(&mut client).await;
            let tx = call.tx.take().unwrap();
            let sender = tokio::spawn(async move {
                for b in 0..JOBS / BATCH {
                    let jobs = (b * BATCH..(b + 1) * BATCH)
                        .map(|i| {
                            let id = format!("c{c}-j{i}");
                            if i % 5 == 0 {
                                job(&id, "sleep", &payload(c, i), &[("ms", "1")])
                            } else {
                                job(&id, "echo", &payload(c, i), &[])
                            }
                        })
                        .collect();
                    tx.send(batch(&format!("c{c}-b{b}"), jobs)).await.unwrap();
                }
                // Dropping `tx` half-closes the call.
            });
            let (results, status) = within(WAIT, "the call ends", call.finish()).await;
            sender.await.unwrap();
            (c, results, status)
        }));
    }

    for call in calls {
        let (c, results, status) = call.await.unwrap();
        status.unwrap_or_else(|s| panic!("call {c} ended with {s:?}"));
        assert_eq!(results.len(), JOBS, "call {c}: one result per job");
        let results = by_id(results); // panics on a duplicate
        for i in 0..JOBS {
            let r = results
                .get(&format!("c{c}-j{i}"))
                .unwrap_or_else(|| panic!("call {c}: no result for job {i}"));
            assert_eq!(outcome(r), Outcome::Ok, "{r:?}");
            assert_eq!(r.output[..], payload(c, i)[..], "call {c} job {i} payload");
            assert_eq!(r.batch_id, format!("c{c}-b{}", i / BATCH));
            assert!(r.error.is_empty(), "{r:?}");
        }
    }
    all_idle(&server).await;
    let stats = server.stats();
    assert_eq!(stats.jobs_admitted, (CALLS * JOBS) as u64);
    assert_eq!(
        stats.finished(batchd::engine::Outcome::Ok),
        (CALLS * JOBS) as u64
    );
}

// === coalescing ===

/// Results that are ready together travel together. Instant jobs sent in one batch finish within the
/// session's turns (echo runs at once on a granted slot), so this does not depend on timing: the
/// daemon sends a message only when the transport has room, and by then many results are ready.
#[tokio::test]
async fn instant_results_are_coalesced() {
    const JOBS: usize = 2_000;
    /// At least this many results per message on average; `JOBS / MIN_MEAN` messages at most.
    const MIN_MEAN: usize = 50;
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    let jobs = (0..JOBS)
        .map(|i| echo_job(&format!("j{i}"), format!("{i}").as_bytes()))
        .collect();
    call.send(batch("b", jobs)).await;
    call.half_close();

    let mut sizes = Vec::new();
    let mut results = Vec::new();
    while let Some(msg) = call.next_message(WAIT).await {
        assert!(!msg.results.is_empty(), "a response carries no result");
        sizes.push(msg.results.len());
        results.extend(msg.results);
    }
    let results = by_id(results);
    assert_eq!(results.len(), JOBS);
    assert!(results.values().all(|r| outcome(r) == Outcome::Ok));
    eprintln!("{JOBS} results in {} messages: {sizes:?}", sizes.len());
    assert!(
        sizes.len() <= JOBS / MIN_MEAN,
        "{JOBS} instantly finishing jobs came in {} messages (fewer than {MIN_MEAN} results each \
         on average): results are not coalesced; sizes {sizes:?}",
        sizes.len()
    );
    // Not two or three lucky pairs: most results travelled in messages of many results.
    let in_large: usize = sizes.iter().filter(|&&n| n >= MIN_MEAN).sum();
    assert!(
        in_large * 10 >= JOBS * 9,
        "only {in_large} of {JOBS} results came in messages of {MIN_MEAN} or more: {sizes:?}"
    );
}

#[tokio::test]
async fn coalesced_messages_stay_under_4_mib() {
    const LIMIT: usize = 4 * 1024 * 1024;
    const MIB: usize = 1024 * 1024;
    let server = TestServer::start(|c| {
        c.max_message_size = ByteSize::mib(32);
        c.max_payload = ByteSize::mib(8);
        c.max_output = ByteSize::mib(8);
    });
    let mut client = server.client_with_limit(64 * MIB).await;
    let mut call = OpenCall::open(&mut client).await;
    // Eight 1.5 MiB results (two fit in a message, three do not) and one 5 MiB result.
    let mut jobs: Vec<_> = (0..8u8)
        .map(|i| echo_job(&format!("m{i}"), &vec![i; 3 * MIB / 2]))
        .collect();
    jobs.push(echo_job("big", &vec![0xee; 5 * MIB]));
    let expected: HashMap<String, Vec<u8>> = jobs
        .iter()
        .map(|j| (j.id.clone(), j.payload.to_vec()))
        .collect();
    call.send(batch("b", jobs)).await;
    call.half_close();
    // Let every job finish before reading, so that their results are ready together.
    wait_until("all nine jobs finished", WAIT, || {
        server.stats().finished(batchd::engine::Outcome::Ok) == 9
    })
    .await;

    let mut results = Vec::new();
    let mut coalesced = 0;
    while let Some(msg) = call.next_message(WAIT).await {
        let size = msg.encoded_len();
        assert!(
            size <= LIMIT || msg.results.len() == 1,
            "a message of {size} bytes carries {} results",
            msg.results.len()
        );
        if msg.results.len() > 1 {
            coalesced += 1;
        }
        results.extend(msg.results);
    }
    assert!(
        coalesced > 0,
        "results that were ready together were never coalesced"
    );
    let results = by_id(results);
    assert_eq!(results.len(), expected.len());
    for (id, payload) in &expected {
        let r = &results[id];
        assert_eq!(outcome(r), Outcome::Ok, "{}", r.error);
        assert!(r.output[..] == payload[..], "output of {id} differs");
    }
}

// === half-close ===

#[tokio::test]
async fn half_close_finishes_every_accepted_job_then_ok() {
    // A small window, so part of the batch is still unread when the client half-closes.
    let server = TestServer::start(|c| c.session_window = 4);
    let mut call = server.open_call().await;
    let mut jobs: Vec<_> = (0..20).map(|i| sleep_job(&format!("s{i}"), 20)).collect();
    jobs.extend((0..5).map(|i| echo_job(&format!("e{i}"), b"x")));
    jobs.push(job("bad", "nope", b"", &[]));
    call.send(batch("b", jobs)).await;
    call.send(batch("b2", vec![sleep_job("late", 50)])).await;
    call.half_close();

    // A half-closed call ends with OK once every result is sent.
    let results = by_id(call.finish_ok(WAIT).await);
    assert_eq!(results.len(), 27);
    for (id, r) in &results {
        if id == "bad" {
            assert_rejected(r, "unknown handler");
        } else {
            assert_eq!(outcome(r), Outcome::Ok, "{r:?}");
            assert_admitted_times(r);
        }
    }
    assert_eq!(results["late"].batch_id, "b2");
    all_idle(&server).await;
}

#[tokio::test]
async fn half_close_with_nothing_sent_ends_ok() {
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    call.half_close();
    let results = call.finish_ok(WAIT).await;
    assert!(results.is_empty());
    all_idle(&server).await;
}

// === queued / ran ===

#[tokio::test]
async fn queued_and_ran_are_set_for_every_admitted_job() {
    let server = TestServer::start(|c| {
        c.workers = 1;
        c.max_output = ByteSize(1024);
    });
    let mut call = server.open_call().await;
    call.send(batch(
        "b",
        vec![
            echo_job("ok", b"fine"),
            echo_job("failed", &[1; 2048]), // output over max_output
            with_timeout(sleep_job("timed-out", 60_000), 0, 20_000_000),
            sleep_job("running", 60_000),
            sleep_job("queued", 60_000),
            job("rejected", "nope", b"", &[]),
        ],
    ))
    .await;
    let mut results = read_until_ids(&mut call, &["ok", "failed", "timed-out", "rejected"]).await;
    wait_until("one job runs and one waits", WAIT, || {
        let s = server.stats();
        s.jobs_running == 1 && s.jobs_queued == 1
    })
    .await;
    call.send(cancel("b", &["running", "queued"])).await;
    call.half_close();
    let rest = call.finish_ok(WAIT).await;
    results.extend(rest);
    let results = by_id(results);
    assert_eq!(results.len(), 6);

    assert_eq!(outcome(&results["ok"]), Outcome::Ok);
    assert_eq!(outcome(&results["failed"]), Outcome::Failed);
    assert!(
        results["failed"].error.contains("max_output"),
        "{:?}",
        results["failed"]
    );
    assert_eq!(outcome(&results["timed-out"]), Outcome::TimedOut);
    assert_eq!(outcome(&results["running"]), Outcome::Cancelled);
    assert_eq!(outcome(&results["queued"]), Outcome::Cancelled);
    for id in ["ok", "failed", "timed-out", "running", "queued"] {
        assert_admitted_times(&results[id]);
    }
    assert!(is_zero(&results["queued"].ran));
    assert_rejected(&results["rejected"], "unknown handler");
}

// === RunBatch ===

#[tokio::test]
async fn run_batch_streams_the_batch_results_then_ok() {
    let server = TestServer::start(|_| {});
    let mut client = server.client().await;
    let mut jobs: Vec<_> = (0..50)
        .map(|i| echo_job(&format!("e{i}"), format!("p{i}").as_bytes()))
        .collect();
    jobs.push(sleep_job("nap", 20));
    jobs.push(job("abc", "sha256", b"abc", &[]));
    jobs.push(job("bad", "sleep", b"", &[("ms", "x")]));
    let mut stream = client
        .run_batch(proto::JobBatch {
            batch_id: "rb".into(),
            jobs,
        })
        .await
        .unwrap()
        .into_inner();
    let mut results = Vec::new();
    while let Some(msg) = within(WAIT, "a message or the end", stream.message())
        .await
        .unwrap()
    {
        results.extend(msg.results);
    }
    let results = by_id(results);
    assert_eq!(results.len(), 53);
    for i in 0..50 {
        let r = &results[&format!("e{i}")];
        assert_eq!(outcome(r), Outcome::Ok);
        assert_eq!(&r.output[..], format!("p{i}").as_bytes());
        assert_eq!(r.batch_id, "rb");
    }
    assert_eq!(outcome(&results["nap"]), Outcome::Ok);
    assert_eq!(hex(&results["abc"].output), SHA256_ABC);
    assert_rejected(&results["bad"], "ms");
    all_idle(&server).await;
}
