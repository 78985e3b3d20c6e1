//! HTTP/2 keepalive: pings catch a peer that vanished without a FIN or RST, a short interval does not
//! disturb healthy calls, and `keepalive_interval = 0s` turns pings off.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::{Duration, Instant};

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

/// `keepalive_interval = 0s` turns pings off: a peer that goes silent keeps its call, while a server
/// that pings does drop its own silent peer in the same test. The control shows that the frozen
/// connections really are silent, so the call that stays is kept because nothing pings it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_keepalive_interval_turns_pings_off() {
    // Were it pinging at all, the server under test would give up on a silent peer one second after
    // an unanswered ping: well before the control gives up on its own, five seconds after one (that
    // long because it also applies to the control's healthy phase; see the test above).
    let off = TestServer::start(|c| {
        c.workers = 8;
        c.keepalive_interval = Duration::ZERO;
        c.keepalive_timeout = Duration::from_secs(1);
    });
    let on = TestServer::start(|c| {
        c.workers = 8;
        c.keepalive_interval = Duration::from_millis(100);
        c.keepalive_timeout = Duration::from_secs(5);
    });
    let off_baseline = idle_tasks(&off).await;
    let on_baseline = idle_tasks(&on).await;
    let off_proxy = Proxy::start(off.addr).await;
    let on_proxy = Proxy::start(on.addr).await;
    let mut off_client = BatchServiceClient::connect(off_proxy.url()).await.unwrap();
    let mut on_client = BatchServiceClient::connect(on_proxy.url()).await.unwrap();
    let off_call = park_jobs(&off, &mut off_client, 8, 8).await;
    let on_call = park_jobs(&on, &mut on_client, 8, 8).await;

    // No FIN, no RST: both connections stay open and go silent.
    off_proxy.freeze.cancel();
    on_proxy.freeze.cancel();
    let frozen_at = Instant::now();
    // Not a synchronisation: the server without pings must hold its call however long one
    // watches. Watch until the control has dropped its peer, and one more second.
    let workers = on.engine.limits().workers as u64;
    let mut caught: Option<Duration> = None;
    while caught.is_none_or(|at| frozen_at.elapsed() < at + Duration::from_secs(1)) {
        let s = off.stats();
        assert_eq!(
            (s.calls_open, s.jobs_running),
            (1, 8),
            "keepalive_interval = 0s, yet the silent peer's call ended within {:?} of the freeze",
            frozen_at.elapsed()
        );
        if caught.is_none() && on.is_idle() && on.stats().free_workers == workers {
            caught = Some(frozen_at.elapsed());
        }
        assert!(
            frozen_at.elapsed() < LIVENESS,
            "the pinging control never dropped its silent peer: {:?}",
            on.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("the pinging control dropped its silent peer {caught:?} after the freeze");
    assert_recovered(&on, on_baseline).await;

    // The call ends with its connection, as any other.
    drop((off_call, off_client, off_proxy));
    assert_recovered(&off, off_baseline).await;
    drop((on_call, on_client, on_proxy));
    assert_serves(&off).await;
}
