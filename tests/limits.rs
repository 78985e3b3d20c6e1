//! Limits on calls and messages: an over-size message ends its call RESOURCE_EXHAUSTED, `max_calls`
//! refuses calls beyond it, and `max_concurrent_streams` makes a connection's extra call wait.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::{Duration, Instant};

use batchd::config::ByteSize;
use batchd::proto::{self, Outcome};
use support::jobs::*;
use support::*;
use tonic::Code;

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

/// `max_concurrent_streams` caps the calls of one connection: the call beyond it waits, unstarted,
/// until one of the others ends. Other connections are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_beyond_max_concurrent_streams_waits_until_one_ends() {
    let server = TestServer::start(|c| c.max_concurrent_streams = 2);
    let mut client = server.client().await;
    let mut first = OpenCall::open(&mut client).await;
    let mut second = OpenCall::open(&mut client).await;
    second
        .send(batch("b", vec![sleep_job("held", 60_000)]))
        .await;
    wait_until("the held job runs", WAIT, || {
        server.stats().jobs_running == 1
    })
    .await;

    // A third call on the same connection, which has no stream left for it.
    let mut same_connection = client.clone();
    let third = tokio::spawn(async move {
        let mut call = OpenCall::open(&mut same_connection).await;
        call.send(batch("c", vec![echo_job("third", b"3")])).await;
        call.half_close();
        call.finish_ok(WAIT).await
    });
    // The limit is per connection: a call on another one is served.
    let results = run_batch(&server, vec![echo_job("other", b"o")], WAIT).await;
    assert_eq!(outcome(&results["other"]), Outcome::Ok);
    wait_until("the other connection's call is over", WAIT, || {
        server.stats().calls_open == 2
    })
    .await;
    // Not a synchronisation: the third call must wait however long one watches.
    for _ in 0..25 {
        let s = server.stats();
        assert_eq!(
            (s.calls_open, s.jobs_admitted),
            (2, 2),
            "a call beyond max_concurrent_streams started"
        );
        assert!(!third.is_finished(), "the third call ended: {:?}", third);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // One call ends: the third starts and runs.
    first.half_close();
    assert!(first.finish_ok(WAIT).await.is_empty());
    let results = within(WAIT, "the third call ends", third).await.unwrap();
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].job_id, "third");
    assert_eq!(outcome(&results[0]), Outcome::Ok);

    second.send(cancel("b", &[])).await;
    second.half_close();
    let results = second.finish_ok(WAIT).await;
    assert_eq!(outcome(&results[0]), Outcome::Cancelled);
}
