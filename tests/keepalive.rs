//! HTTP/2 keepalive: pings catch a peer that vanished without a FIN or RST, and a short interval does
//! not disturb healthy calls.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::Duration;

use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::Outcome;
use support::jobs::sleeps;
use support::proxy::Proxy;
use support::recovery::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_vanishes_silently_is_caught_by_keepalive() {
    // The timeout also applies to the healthy connections of the test (before the freeze, and in
    // `assert_serves`): it must exceed any stall of this process on a busy machine, or a pong that is
    // merely late closes a connection the test still uses.
    let server = TestServer::start(|c| {
        c.workers = 8;
        c.keepalive_interval = Duration::from_millis(100);
        c.keepalive_timeout = Duration::from_secs(5);
    });
    let baseline = idle_tasks(&server).await;
    let proxy = Proxy::start(server.addr).await;

    let mut client = BatchServiceClient::connect(proxy.url()).await.unwrap();
    let call = park_jobs(&server, &mut client, 20, 8).await;
    // No FIN, no RST: the connection stays open and goes silent, pings are never answered.
    proxy.freeze.cancel();

    assert_recovered(&server, baseline).await;
    drop((call, client, proxy));
    assert_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_keepalive_interval_does_not_disturb_healthy_calls() {
    let server = TestServer::start(|c| {
        c.keepalive_interval = Duration::from_millis(20);
        // Only the interval is under test: a late pong on a busy machine must not end the call.
        c.keepalive_timeout = Duration::from_secs(60);
    });
    let mut client = server.client().await;
    let mut call = OpenCall::open(&mut client).await;
    // Jobs that span many ping intervals, then an echo on the same, still healthy connection.
    call.send(batch("b", sleeps("s", 4, 300))).await;
    call.send(batch("c", vec![job("e", "echo", b"still here", &[])]))
        .await;
    call.half_close();
    let (results, status) = tokio::time::timeout(LIVENESS, call.finish()).await.unwrap();
    status.unwrap();
    let results = by_id(results);
    assert_eq!(results.len(), 5);
    assert!(results.values().all(|r| outcome(r) == Outcome::Ok));
    assert_eq!(&results["e"].output[..], b"still here");
}
