//! What batchd refuses: a bad job gets a REJECTED result of its own while the rest of its call goes
//! on; a bad request (no kind, a batch over `max_jobs_per_batch`) ends the call INVALID_ARGUMENT.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use batchd::config::ByteSize;
use batchd::proto::{self, Outcome};
use support::jobs::*;
use support::*;
use tonic::Code;

// === REJECTED jobs ===

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

// === bad requests ===

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
