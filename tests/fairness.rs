//! Fairness: worker slots go round-robin across calls, so a small call is not starved by a greedy
//! one that queued a thousand jobs first.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use batchd::proto::{self, Outcome};
use support::jobs::recording_gated_server;
use support::recovery::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_call_is_not_starved_by_a_greedy_one() {
    let (server, permits, started) = recording_gated_server(|c| {
        c.workers = 2;
        c.session_window = 2048;
    });
    let gated = |prefix: &str, n: usize| -> Vec<proto::Job> {
        (0..n)
            .map(|i| job(&format!("{prefix}{i}"), "gate", prefix.as_bytes(), &[]))
            .collect()
    };

    // A fills both workers and queues 998 more.
    let mut client_a = server.client().await;
    let mut a = OpenCall::open(&mut client_a).await;
    a.send(batch("a", gated("a", 1000))).await;
    settle("A holds both workers", &server, || {
        server.stats().jobs_running == 2 && started.lock().unwrap().len() == 2
    })
    .await;

    // B arrives with 20 jobs while A's 998 wait.
    let mut client_b = server.client().await;
    let mut b = OpenCall::open(&mut client_b).await;
    b.send(batch("b", gated("b", 20))).await;
    settle("B's jobs are admitted", &server, || {
        server.stats().jobs_admitted == 1020
    })
    .await;
    assert_eq!(started.lock().unwrap().len(), 2, "nothing ran ahead");

    // Let jobs finish as fast as they can, A's results read concurrently.
    let a_results = Arc::new(AtomicUsize::new(0));
    let a_count = Arc::clone(&a_results);
    let reader = tokio::spawn(async move {
        a.half_close();
        while let Ok(Some(msg)) = a.rx.message().await {
            a_count.fetch_add(msg.results.len(), Ordering::Relaxed);
        }
    });
    // One job finishes at a time, so each freed slot goes to exactly one next job: the order of
    // starts is the scheduler's order of grants, whatever the threads' timing.
    let b_started = || {
        started
            .lock()
            .unwrap()
            .iter()
            .filter(|p| &p[..] == b"b")
            .count()
    };
    let step = || async {
        let before = started.lock().unwrap().len();
        permits.add_permits(1);
        settle("the freed slot starts the next job", &server, || {
            started.lock().unwrap().len() > before
        })
        .await;
    };
    while b_started() < 20 {
        step().await;
    }
    // The two jobs holding the workers (B's last among them) finish; A's next ones start.
    step().await;
    step().await;
    let b_results = tokio::time::timeout(LIVENESS, b.collect(20))
        .await
        .expect("B's results arrive")
        .unwrap();
    let a_when_b_done = a_results.load(Ordering::Relaxed);
    permits.add_permits(1020);
    let b_results = by_id(b_results);
    assert_eq!(b_results.len(), 20);
    assert!(b_results.values().all(|r| outcome(r) == Outcome::Ok));

    // The order in which the scheduler started jobs: B took every other freed slot.
    let order = started.lock().unwrap().clone();
    let last_b = order.iter().rposition(|p| &p[..] == b"b").unwrap();
    let a_before_last_b = order[..last_b].iter().filter(|p| &p[..] == b"a").count();
    assert!(
        a_before_last_b <= 2 + 20 + 2,
        "round-robin starts B's 20 jobs within about 22 of A's; {a_before_last_b} of A's 1000 started first"
    );
    assert!(
        a_when_b_done < 1000,
        "B finished before A (A had {a_when_b_done} results)"
    );

    tokio::time::timeout(LIVENESS, reader)
        .await
        .expect("A finishes")
        .unwrap();
    assert_eq!(a_results.load(Ordering::Relaxed), 1000);
}

/// A call of `n` jobs of the `gate` handler (they end only when the test adds permits).
async fn bulk_of_gates(server: &TestServer, n: usize) -> OpenCall {
    let mut client = server.client().await;
    let bulk = OpenCall::open(&mut client).await;
    let gated: Vec<proto::Job> = (0..n)
        .map(|i| job(&format!("g{i}"), "gate", b"", &[]))
        .collect();
    bulk.send(batch("bulk", gated)).await;
    bulk
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_running_nothing_starts_at_once_on_the_reserve_while_another_holds_every_other_slot()
{
    let (server, permits, _) = recording_gated_server(|c| {
        c.workers = 8;
        c.reserved_workers = Some(2);
    });
    // The bulk call's gated jobs never end: it holds the 6 slots it may, the other 94 wait.
    let _bulk = bulk_of_gates(&server, 100).await;
    settle("the bulk call holds all but the reserve", &server, || {
        let s = server.stats();
        s.jobs_running == 6 && s.jobs_queued == 94
    })
    .await;
    assert_eq!(server.stats().free_workers, 2, "the reserve stays free");

    // Two other calls, each running nothing: their echoes start at once, one after another.
    for name in ["small-1", "small-2"] {
        let mut client = server.client().await;
        let mut small = OpenCall::open(&mut client).await;
        for i in 0..3 {
            small
                .send(batch(name, vec![job(&format!("e{i}"), "echo", b"hi", &[])]))
                .await;
            let got = tokio::time::timeout(LIVENESS, small.collect(1))
                .await
                .expect("the echo runs on the reserve")
                .unwrap();
            assert_eq!(outcome(&got[0]), Outcome::Ok);
        }
    }
    let s = server.stats();
    assert_eq!(
        (s.jobs_running, s.jobs_queued),
        (6, 94),
        "the bulk call got no more"
    );
    permits.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reserve_a_call_waits_for_a_slot_another_holds() {
    let (server, permits, _) = recording_gated_server(|c| {
        c.workers = 8;
        c.reserved_workers = Some(0);
    });
    let _bulk = bulk_of_gates(&server, 100).await;
    settle("the bulk call holds every slot", &server, || {
        server.stats().jobs_running == 8
    })
    .await;
    let mut client = server.client().await;
    let mut small = OpenCall::open(&mut client).await;
    small
        .send(batch("small", vec![job("e", "echo", b"hi", &[])]))
        .await;
    settle("the echo is queued", &server, || {
        server.stats().jobs_queued == 93
    })
    .await;
    // The gates never open, so no slot frees: the echo stays queued, however long the wait.
    let waited =
        tokio::time::timeout(std::time::Duration::from_millis(300), small.collect(1)).await;
    assert!(waited.is_err(), "the echo ran without a slot: {waited:?}");
    // Two gated jobs end: of the freed slots, the small call gets one in turn.
    permits.add_permits(2);
    let got = tokio::time::timeout(LIVENESS, small.collect(1))
        .await
        .expect("the echo runs on the freed slot")
        .unwrap();
    assert_eq!(outcome(&got[0]), Outcome::Ok);
    permits.close();
}
