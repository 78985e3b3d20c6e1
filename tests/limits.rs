//! Limits on calls and messages: an over-size message ends its call RESOURCE_EXHAUSTED, and
//! `max_calls` refuses calls beyond it.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::Instant;

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
