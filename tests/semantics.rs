#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Call semantics of batchd.v1, each against a real server on 127.0.0.1:0 with a real tonic client:
//! exactly-once results, coalescing under the 4 MiB limit, half-close, every REJECTED case, per-job
//! timeouts, CancelJobs, call-level statuses (deadline, over-size, no kind, too many jobs, max_calls),
//! RunBatch, ListHandlers and the built-in handlers, health and reflection.
mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use batchd::config::ByteSize;
use batchd::proto::{self, Outcome};
use prost::Message;
use support::*;
use tonic::Code;

/// Upper limit of every polled wait; only reached when something is wrong.
const WAIT: Duration = Duration::from_secs(20);

/// SHA-256("abc"), FIPS 180-2 appendix B.1.
const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
/// SHA-256 of the empty string.
const SHA256_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

// === helpers ===

fn with_timeout(mut job: proto::Job, seconds: i64, nanos: i32) -> proto::Job {
    job.timeout = Some(prost_types::Duration { seconds, nanos });
    job
}

fn sleep_job(id: &str, ms: u64) -> proto::Job {
    job(id, "sleep", id.as_bytes(), &[("ms", &ms.to_string())])
}

fn echo_job(id: &str, payload: &[u8]) -> proto::Job {
    job(id, "echo", payload, &[])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads messages until every id in `ids` has a result; returns every result read, in order.
async fn read_until_ids(call: &mut OpenCall, ids: &[&str]) -> Vec<proto::JobResult> {
    let mut missing: HashSet<&str> = ids.iter().copied().collect();
    let mut out = Vec::new();
    while !missing.is_empty() {
        let msg = call
            .next_message(WAIT)
            .await
            .unwrap_or_else(|| panic!("stream ended while waiting for {missing:?}"));
        for r in msg.results {
            missing.remove(r.job_id.as_str());
            out.push(r);
        }
    }
    out
}

fn assert_rejected(r: &proto::JobResult, keyword: &str) {
    assert_eq!(outcome(r), Outcome::Rejected, "{r:?}");
    assert!(
        r.error.contains(keyword),
        "job {:?}: error {:?} should mention {keyword:?}",
        r.job_id,
        r.error
    );
    assert!(r.output.is_empty(), "{r:?}");
    assert!(
        r.queued.is_none() && r.ran.is_none(),
        "a REJECTED job has no queued/ran: {r:?}"
    );
}

fn assert_admitted_times(r: &proto::JobResult) {
    assert!(r.queued.is_some(), "queued unset for admitted job {r:?}");
    assert!(r.ran.is_some(), "ran unset for admitted job {r:?}");
}

fn is_zero(d: &Option<prost_types::Duration>) -> bool {
    matches!(d, Some(d) if d.seconds == 0 && d.nanos == 0)
}

async fn all_idle(server: &TestServer) {
    wait_until(
        "no call, running, queued or buffered job is left",
        WAIT,
        || server.is_idle(),
    )
    .await;
}

// === exactly-once and coalescing ===

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

#[tokio::test]
async fn instant_results_are_coalesced() {
    const JOBS: usize = 2_000;
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    let jobs = (0..JOBS)
        .map(|i| echo_job(&format!("j{i}"), format!("{i}").as_bytes()))
        .collect();
    call.send(batch("b", jobs)).await;
    call.half_close();

    let mut messages = 0;
    let mut results = Vec::new();
    while let Some(msg) = call.next_message(WAIT).await {
        messages += 1;
        assert!(!msg.results.is_empty(), "a response carries no result");
        results.extend(msg.results);
    }
    let results = by_id(results);
    assert_eq!(results.len(), JOBS);
    assert!(results.values().all(|r| outcome(r) == Outcome::Ok));
    assert!(
        messages < JOBS,
        "{JOBS} instantly finishing jobs came in {messages} messages: results are not coalesced"
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

// === REJECTED ===

#[tokio::test]
async fn every_rejected_case_leaves_valid_jobs_ok() {
    let server = TestServer::start(|c| c.max_payload = ByteSize(1024));
    let mut call = server.open_call().await;
    let jobs = vec![
        echo_job("ok1", b"one"),
        echo_job("", b"no id"),
        echo_job("dup", b"first"),
        echo_job("dup", b"second"),
        job("unknown", "no-such-handler", b"", &[]),
        job("sleep-abc", "sleep", b"", &[("ms", "abc")]),
        job("sleep-param", "sleep", b"", &[("seconds", "1")]),
        job("echo-param", "echo", b"", &[("colour", "red")]),
        echo_job("too-big", &[7; 1025]),
        echo_job("at-limit", &[7; 1024]),
        with_timeout(echo_job("zero-timeout", b""), 0, 0),
        with_timeout(echo_job("negative-timeout", b""), -1, 0),
        with_timeout(echo_job("negative-nanos", b""), 0, -5),
        sleep_job("ok2", 1),
        sleep_job("long", 60_000),
    ];
    call.send(batch("b1", jobs)).await;

    let first = read_until_ids(
        &mut call,
        &[
            "ok1",
            "",
            "dup",
            "unknown",
            "sleep-abc",
            "sleep-param",
            "echo-param",
            "too-big",
            "at-limit",
            "zero-timeout",
            "negative-timeout",
            "negative-nanos",
            "ok2",
        ],
    )
    .await;
    // "dup" has two results: the first job's OK and the second one's REJECTED.
    let dups: Vec<_> = first.iter().filter(|r| r.job_id == "dup").collect();
    assert_eq!(dups.len(), 2, "{dups:?}");
    let dup_ok = dups
        .iter()
        .find(|r| outcome(r) == Outcome::Ok)
        .expect("the first job with id dup runs");
    assert_eq!(&dup_ok.output[..], b"first");
    let dup_rejected = dups
        .iter()
        .find(|r| outcome(r) == Outcome::Rejected)
        .expect("the second job with id dup is rejected");
    assert_rejected(dup_rejected, "already used");

    let first = by_id(first.into_iter().filter(|r| r.job_id != "dup").collect());
    assert_eq!(first.len(), 12, "{:?}", first.keys().collect::<Vec<_>>());
    assert!(!first.contains_key("long"));
    for r in first.values() {
        assert_eq!(r.batch_id, "b1");
    }
    assert_rejected(&first[""], "empty");
    assert_rejected(&first["unknown"], "unknown handler");
    assert_rejected(&first["unknown"], "no-such-handler");
    assert_rejected(&first["sleep-abc"], "ms");
    assert_rejected(&first["sleep-abc"], "abc");
    assert_rejected(&first["sleep-param"], "seconds");
    assert_rejected(&first["echo-param"], "colour");
    assert_rejected(&first["too-big"], "max_payload");
    assert_rejected(&first["zero-timeout"], "timeout");
    assert_rejected(&first["negative-timeout"], "timeout");
    assert_rejected(&first["negative-nanos"], "timeout");
    for id in ["ok1", "ok2", "at-limit"] {
        assert_eq!(outcome(&first[id]), Outcome::Ok, "{:?}", first[id]);
        assert_admitted_times(&first[id]);
    }
    assert_eq!(&first["ok1"].output[..], b"one");
    assert_eq!(&first["ok2"].output[..], b"ok2");

    // A finished id may be used again; an unfinished one may not, even from another batch.
    call.send(batch(
        "b2",
        vec![echo_job("dup", b"again"), echo_job("long", b"")],
    ))
    .await;
    let second = by_id(call.results(2, WAIT).await);
    assert_eq!(outcome(&second["dup"]), Outcome::Ok, "{:?}", second["dup"]);
    assert_eq!(&second["dup"].output[..], b"again");
    assert_eq!(second["dup"].batch_id, "b2");
    assert_rejected(&second["long"], "already used");
    assert_eq!(second["long"].batch_id, "b2");

    call.send(cancel("b1", &["long"])).await;
    call.half_close();
    let rest = by_id(call.finish_ok(WAIT).await);
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(outcome(&rest["long"]), Outcome::Cancelled);
    assert_eq!(rest["long"].batch_id, "b1");
}

/// A hostile handler name must not blow up the REJECTED result that quotes it.
#[tokio::test]
async fn a_huge_bad_field_does_not_kill_the_call() {
    let server = TestServer::start(|_| {});
    let mut client = server
        .client()
        .await
        .max_decoding_message_size(64 * 1024 * 1024);
    // 3.5 MB on the wire, well under max_message_size (16 MiB); `{:?}` writes each char as `\u{1}`.
    let name = "\u{1}".repeat(3_500_000);
    // A bad job must not kill the call.
    let jobs = vec![echo_job("ok", b"fine"), job("bad", &name, b"", &[])];
    let results = run_batch_on(&mut client, jobs, WAIT).await;
    assert_eq!(outcome(&results["ok"]), Outcome::Ok);
    assert_rejected(&results["bad"], "unknown handler");
}

// === timeouts ===

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

// === CancelJobs ===

#[tokio::test]
async fn cancel_running_jobs_by_id() {
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    call.send(batch(
        "a",
        vec![
            sleep_job("a1", 60_000),
            sleep_job("a2", 60_000),
            sleep_job("a3", 60_000),
        ],
    ))
    .await;
    call.send(batch("b", vec![sleep_job("b1", 60_000)])).await;
    wait_until("four jobs run", WAIT, || server.stats().jobs_running == 4).await;

    call.send(cancel("a", &["a1", "a2"])).await;
    let results = by_id(call.results(2, WAIT).await);
    assert_eq!(results.len(), 2, "{results:?}");
    for id in ["a1", "a2"] {
        let r = &results[id];
        assert_eq!(outcome(r), Outcome::Cancelled, "{r:?}");
        assert!(!r.error.is_empty(), "{r:?}");
        assert!(r.output.is_empty(), "{r:?}");
        assert_eq!(r.batch_id, "a");
        assert_admitted_times(r);
    }
    assert_eq!(server.stats().jobs_running, 2, "a3 and b1 still run");

    // A job id named with the wrong batch is not cancelled.
    call.send(cancel("a", &["b1"])).await;
    call.send(cancel("a", &["a3"])).await;
    let results = call.results(1, WAIT).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].job_id, "a3");
    assert_eq!(outcome(&results[0]), Outcome::Cancelled);
    assert_eq!(server.stats().jobs_running, 1, "b1 still runs");

    call.send(cancel("b", &["b1"])).await;
    call.half_close();
    let rest = call.finish_ok(WAIT).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].job_id, "b1");
    assert_eq!(outcome(&rest[0]), Outcome::Cancelled);
    all_idle(&server).await;
}

#[tokio::test]
async fn cancel_whole_batch_leaves_other_batches_alone() {
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    call.send(batch(
        "a",
        vec![
            sleep_job("x1", 60_000),
            sleep_job("x2", 60_000),
            sleep_job("x3", 60_000),
        ],
    ))
    .await;
    call.send(batch(
        "b",
        vec![sleep_job("y1", 1_000), sleep_job("y2", 1_000)],
    ))
    .await;
    wait_until("five jobs run", WAIT, || server.stats().jobs_running == 5).await;

    call.send(cancel("a", &[])).await;
    let results = read_until_ids(&mut call, &["x1", "x2", "x3"]).await;
    for r in &results {
        match r.batch_id.as_str() {
            "a" => assert_eq!(outcome(r), Outcome::Cancelled, "{r:?}"),
            _ => assert_eq!(outcome(r), Outcome::Ok, "batch b was touched: {r:?}"),
        }
    }

    call.half_close();
    let rest = call.finish_ok(WAIT).await;
    let all = by_id(results.into_iter().chain(rest).collect());
    assert_eq!(all.len(), 5);
    for id in ["y1", "y2"] {
        assert_eq!(
            outcome(&all[id]),
            Outcome::Ok,
            "a job of another batch was affected: {:?}",
            all[id]
        );
        assert_eq!(&all[id].output[..], id.as_bytes());
    }
    all_idle(&server).await;
}

#[tokio::test]
async fn cancel_queued_jobs_never_runs_them() {
    let server = TestServer::start(|c| c.workers = 1);
    let mut call = server.open_call().await;
    call.send(batch(
        "q",
        vec![
            sleep_job("blocker", 60_000),
            echo_job("q1", b"1"),
            echo_job("q2", b"2"),
            echo_job("q3", b"3"),
        ],
    ))
    .await;
    wait_until("one job runs and three wait", WAIT, || {
        let s = server.stats();
        s.jobs_running == 1 && s.jobs_queued == 3
    })
    .await;

    call.send(cancel("q", &["q1", "q2", "q3"])).await;
    let results = by_id(call.results(3, WAIT).await);
    assert_eq!(results.len(), 3, "{results:?}");
    for id in ["q1", "q2", "q3"] {
        let r = &results[id];
        assert_eq!(outcome(r), Outcome::Cancelled, "{r:?}");
        assert!(
            r.output.is_empty(),
            "a cancelled queued job produced output"
        );
        assert!(r.queued.is_some(), "{r:?}");
        assert!(is_zero(&r.ran), "a queued job never ran: {r:?}");
    }
    let s = server.stats();
    assert_eq!((s.jobs_running, s.jobs_queued), (1, 0));

    // A cancelled job is finished: its id may be used again, and the new job runs once a worker is
    // free (not the cancelled one it replaces).
    call.send(batch("again", vec![echo_job("q2", b"2 again")]))
        .await;
    wait_until("the new q2 waits", WAIT, || server.stats().jobs_queued == 1).await;

    // Cancel the blocker: the only worker must be free again for new work.
    call.send(cancel("q", &["blocker"])).await;
    let r = by_id(read_until_ids(&mut call, &["blocker", "q2"]).await);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(outcome(&r["blocker"]), Outcome::Cancelled);
    assert_eq!(outcome(&r["q2"]), Outcome::Ok, "{:?}", r["q2"]);
    assert_eq!(&r["q2"].output[..], b"2 again");
    assert_eq!(r["q2"].batch_id, "again");
    call.send(batch("after", vec![echo_job("next", b"n")]))
        .await;
    let r = call.results(1, WAIT).await;
    assert_eq!(r[0].job_id, "next");
    assert_eq!(outcome(&r[0]), Outcome::Ok);
    call.half_close();
    let rest = call.finish_ok(WAIT).await;
    assert!(rest.is_empty(), "{rest:?}");
    all_idle(&server).await;
    assert_eq!(server.stats().free_workers, 1);
}

#[tokio::test]
async fn cancelling_unknown_or_finished_jobs_is_harmless() {
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    call.send(batch("b", vec![echo_job("done", b"d")])).await;
    let r = call.results(1, WAIT).await;
    assert_eq!(outcome(&r[0]), Outcome::Ok);

    call.send(cancel("b", &["done", "ghost"])).await;
    call.send(cancel("no-such-batch", &[])).await;
    call.send(cancel("", &[])).await;
    call.send(cancel("b", &[])).await;
    call.send(batch("b", vec![echo_job("after", b"a")])).await;
    call.half_close();
    let rest = by_id(call.finish_ok(WAIT).await);
    assert_eq!(rest.len(), 1, "only the new job has a result: {rest:?}");
    assert_eq!(outcome(&rest["after"]), Outcome::Ok);
    assert_eq!(
        server.stats().finished(batchd::engine::Outcome::Cancelled),
        0
    );
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

// === call-level statuses ===

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

/// The status that ends a call reaches a client that was not reading when the call ended: it comes
/// after the results the daemon had handed over, never instead of them, never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_reaches_a_client_that_was_not_reading() {
    let server = TestServer::start(|_| {});
    let mut client = server.client_with_limit(64 << 20).await;
    let mut call = OpenCall::open_request(&mut client, |r| {
        r.set_timeout(Duration::from_secs(1));
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
    let (results, _) = call.finish_err(Code::DeadlineExceeded, WAIT).await;
    assert!(
        results.iter().all(|r| r.job_id.starts_with('e')),
        "only echo results: {}",
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

#[tokio::test]
async fn over_size_message_is_resource_exhausted_and_others_go_on() {
    let server = TestServer::start(|c| {
        c.max_message_size = ByteSize(64 * 1024);
        c.max_payload = ByteSize(32 * 1024);
    });
    let mut client = server.client().await;
    let mut bystander = OpenCall::open(&mut client).await;
    bystander
        .send(batch("b", vec![sleep_job("steady", 200)]))
        .await;

    let mut call = OpenCall::open(&mut client).await;
    call.send(batch("big", vec![echo_job("huge", &[0; 100 * 1024])]))
        .await;
    // An over-size message ends the call.
    let (results, _) = call.finish_err(Code::ResourceExhausted, WAIT).await;
    assert!(results.is_empty());

    // The other call on the same connection carries on, and new calls are served.
    bystander.half_close();
    let results = bystander.finish_ok(WAIT).await;
    assert_eq!(results.len(), 1);
    assert_eq!(outcome(&results[0]), Outcome::Ok);
    let results = run_batch_on(&mut client, vec![echo_job("small", &[1; 1024])], WAIT).await;
    assert_eq!(outcome(&results["small"]), Outcome::Ok);
    all_idle(&server).await;
}

#[tokio::test]
async fn request_without_kind_is_invalid_argument() {
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    call.send(proto::ProcessRequest { kind: None }).await;
    // A request without kind ends the call.
    call.finish_err(Code::InvalidArgument, WAIT).await;
    all_idle(&server).await;
}

#[tokio::test]
async fn batch_over_max_jobs_per_batch_is_invalid_argument() {
    let server = TestServer::start(|c| c.max_jobs_per_batch = 10);
    let mut call = server.open_call().await;
    let jobs = |n: usize| (0..n).map(|i| echo_job(&format!("j{i}"), b"")).collect();
    call.send(batch("full", jobs(10))).await;
    let results = by_id(call.results(10, WAIT).await);
    assert_eq!(results.len(), 10, "a batch at the limit is accepted");
    assert!(results.values().all(|r| outcome(r) == Outcome::Ok));

    call.send(batch("over", jobs(11))).await;
    // A batch over the limit ends the call.
    let (results, status) = call.finish_err(Code::InvalidArgument, WAIT).await;
    assert!(
        status.message().contains("max_jobs_per_batch"),
        "{status:?}"
    );
    assert!(results.is_empty(), "{results:?}");
    all_idle(&server).await;
}

#[tokio::test]
async fn max_calls_refuses_extra_calls_until_one_closes() {
    let server = TestServer::start(|c| c.max_calls = 2);
    let mut client = server.client().await;
    let mut first = OpenCall::open(&mut client).await;
    let mut second = OpenCall::open(&mut client).await;
    second
        .send(batch("b", vec![sleep_job("held", 60_000)]))
        .await;

    let status = OpenCall::try_open(&mut client)
        .await
        .err()
        .expect("a third concurrent call is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_calls"), "{status:?}");
    let status = client
        .run_batch(proto::JobBatch {
            batch_id: "rb".into(),
            jobs: vec![echo_job("x", b"")],
        })
        .await
        .expect_err("RunBatch counts as a call too");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    first.half_close();
    first.finish_ok(WAIT).await;
    wait_until("one call is left", WAIT, || server.stats().calls_open == 1).await;
    // The slot comes back as the first call's state is dropped: poll until a call is accepted.
    let start = Instant::now();
    let mut third = loop {
        match OpenCall::try_open(&mut client).await {
            Ok(call) => break call,
            Err(s) if s.code() == Code::ResourceExhausted && start.elapsed() < WAIT => {}
            Err(s) => panic!("no call accepted after one closed: {s:?}"),
        }
    };
    third.send(batch("c", vec![echo_job("new", b"n")])).await;
    third.half_close();
    let results = third.finish_ok(WAIT).await;
    assert_eq!(outcome(&results[0]), Outcome::Ok);

    second.send(cancel("b", &[])).await;
    second.half_close();
    let results = second.finish_ok(WAIT).await;
    assert_eq!(outcome(&results[0]), Outcome::Cancelled);
}

// === RunBatch, ListHandlers, built-in handlers ===

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

#[tokio::test]
async fn list_handlers_and_sha256_digest() {
    let server = TestServer::start(|_| {});
    let mut client = server.client().await;
    let handlers = client
        .list_handlers(proto::ListHandlersRequest {})
        .await
        .unwrap()
        .into_inner()
        .handlers;
    let names: Vec<_> = handlers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["echo", "sha256", "sleep", "spin"]);
    for h in &handlers {
        assert!(
            h.description.len() > 10,
            "{} has no real description",
            h.name
        );
    }
    let describes = |name: &str, word: &str| {
        let h = handlers.iter().find(|h| h.name == name).unwrap();
        assert!(
            h.description.contains(word),
            "{name}: {:?} should mention {word}",
            h.description
        );
    };
    describes("sleep", "ms");
    describes("spin", "ms");
    describes("sha256", "SHA-256");

    // Small payloads are hashed inline, large ones on the CPU pool: both give the raw digest.
    let large: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let results = run_batch(
        &server,
        vec![
            job("abc", "sha256", b"abc", &[]),
            job("empty", "sha256", b"", &[]),
            job("large", "sha256", &large, &[]),
        ],
        WAIT,
    )
    .await;
    for r in results.values() {
        assert_eq!(outcome(r), Outcome::Ok, "{r:?}");
        assert_eq!(r.output.len(), 32, "the raw digest, not hex");
    }
    assert_eq!(hex(&results["abc"].output), SHA256_ABC);
    assert_eq!(hex(&results["empty"].output), SHA256_EMPTY);
    use sha2::Digest;
    assert_eq!(
        results["large"].output[..],
        sha2::Sha256::digest(&large)[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_runs_off_the_async_runtime_and_is_cancellable() {
    // More spins than CPU workers (and than the server runtime's two threads).
    let server = TestServer::start(|c| c.cpu_workers = 2);
    let mut call = server.open_call().await;
    call.send(batch(
        "s",
        (0..3)
            .map(|i| job(&format!("spin{i}"), "spin", b"", &[("ms", "60000")]))
            .collect(),
    ))
    .await;
    wait_until("three spins run", WAIT, || server.stats().jobs_running == 3).await;

    // The async runtime still serves other calls while the spins burn CPU.
    let results = run_batch(&server, vec![echo_job("meanwhile", b"m")], WAIT).await;
    assert_eq!(outcome(&results["meanwhile"]), Outcome::Ok);

    call.send(cancel("s", &[])).await;
    call.half_close();
    let results = by_id(call.finish_ok(WAIT).await);
    assert_eq!(results.len(), 3);
    for r in results.values() {
        assert_eq!(outcome(r), Outcome::Cancelled, "{r:?}");
        assert_admitted_times(r);
    }
    all_idle(&server).await;
}

// === health and reflection ===

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let server = TestServer::start(|_| {});
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel);
    for service in ["", "batchd.v1.BatchService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service is not reported as serving");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_and_describes_the_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let server = TestServer::start(|_| {});
    let channel = server.channel().await;
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("batchd.v1.BatchService".into()),
    ]
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let listed = responses.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::ListServicesResponse(list)) = listed else {
        panic!("expected a service list, got {listed:?}");
    };
    let services: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(services.contains(&"batchd.v1.BatchService"), "{services:?}");

    let file = responses.message().await.unwrap().unwrap().message_response;
    let Some(MessageResponse::FileDescriptorResponse(files)) = file else {
        panic!("expected file descriptors, got {file:?}");
    };
    let files: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost_types::FileDescriptorProto::decode(&b[..]).unwrap())
        .collect();
    let batchd = files
        .iter()
        .find(|f| f.package() == "batchd.v1")
        .expect("the batchd.v1 file");
    let service = batchd
        .service
        .iter()
        .find(|s| s.name() == "BatchService")
        .unwrap();
    let methods: Vec<_> = service.method.iter().map(|m| m.name()).collect();
    assert_eq!(methods, ["Process", "RunBatch", "ListHandlers"]);
    // The proto's documentation reaches users through reflection.
    let documented = batchd.source_code_info.as_ref().map_or(0, |info| {
        info.location
            .iter()
            .filter(|l| !l.leading_comments().trim().is_empty())
            .count()
    });
    assert!(
        documented > 20,
        "only {documented} documented elements in the reflected descriptor"
    );
    drop(responses);
}
