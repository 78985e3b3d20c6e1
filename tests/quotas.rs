//! Fair and bounded by principal: `max_calls` refuses a principal's calls beyond it
//! (RESOURCE_EXHAUSTED naming the quota), `max_running` makes its jobs wait, and the worker pool is
//! shared by weight however many calls a principal opens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use batchd::auth::PrincipalSpec;
use batchd::proto::Outcome;
use support::principals::*;
use support::{batch, gated_server, job, outcome, wait_until, OpenCall, TestServer};
use tonic::Code;

/// Upper limit of every polled wait; only reached when something is wrong.
const WAIT: Duration = Duration::from_secs(20);

/// `n` gate jobs named `prefix0…`.
fn gate_jobs(prefix: &str, n: usize) -> Vec<batchd::proto::Job> {
    (0..n)
        .map(|i| job(&format!("{prefix}{i}"), "gate", b"", &[]))
        .collect()
}

/// Slots held by principal `p`'s calls, as `/metrics` shows them.
fn held(server: &TestServer, p: &str) -> f64 {
    let labels = format!("principal=\"{p}\"");
    metric(server.admin, "batchd_principal_workers_held", &labels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_calls_refuses_a_principal_s_calls_beyond_it_and_no_one_else_s() {
    let server = TestServer::start(|c| {
        c.principal = vec![
            PrincipalSpec {
                max_calls: Some(2),
                ..principal("a", "token-a")
            },
            principal("b", "token-b"),
        ];
    });
    let url = server.url();
    let first = open_as(&url, "token-a").await;
    let _second = open_as(&url, "token-a").await;
    let status = try_open_as(&url, Some("token-a")).await.err().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "principal \"a\" already has 2 calls open (its max_calls quota); retry later"
    );
    let mut other = open_as(&url, "token-b").await;
    other
        .send(batch("b", vec![job("x", "echo", b"", &[])]))
        .await;
    other.half_close();
    assert_eq!(other.finish_ok(WAIT).await.len(), 1);

    let admin = server.admin;
    let rejected = "principal=\"a\",reason=\"principal_max_calls\"";
    assert_eq!(
        metric(admin, "batchd_principal_calls_rejected_total", rejected),
        1.0
    );
    assert_eq!(
        metric(
            admin,
            "batchd_calls_rejected_total",
            "reason=\"principal_max_calls\""
        ),
        1.0
    );
    // A call that ends gives its slot back.
    drop(first);
    wait_until("a has one call open", WAIT, || {
        metric(admin, "batchd_principal_calls_open", "principal=\"a\"") == 1.0
    })
    .await;
    let mut third = open_as(&url, "token-a").await;
    third.half_close();
    third.finish_ok(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_running_makes_a_principal_s_jobs_wait_while_others_run() {
    let (server, gate) = gated_server(|c| {
        c.workers = 4;
        c.principal = vec![
            PrincipalSpec {
                max_running: Some(1),
                ..principal("a", "token-a")
            },
            principal("b", "token-b"),
        ];
    });
    let url = server.url();
    let mut a = open_as(&url, "token-a").await;
    a.send(batch("a", gate_jobs("a", 3))).await;
    let mut b = open_as(&url, "token-b").await;
    b.send(batch("b", gate_jobs("b", 2))).await;
    wait_until("a runs one job and b two", WAIT, || {
        let s = server.stats();
        s.jobs_running == 3 && s.jobs_queued == 2
    })
    .await;
    // Not a synchronisation: the cap must hold however long one looks.
    for _ in 0..10 {
        let s = server.stats();
        assert_eq!((s.jobs_running, s.free_workers), (3, 1), "{s:?}");
        assert_eq!((held(&server, "a"), held(&server, "b")), (1.0, 2.0));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.add_permits(5);
    a.half_close();
    b.half_close();
    let results = a.finish_ok(WAIT).await;
    assert!(results.iter().all(|r| outcome(r) == Outcome::Ok));
    assert_eq!(results.len(), 3);
    assert_eq!(b.finish_ok(WAIT).await.len(), 2);
}

/// Principal `a` opens eight calls and takes the whole pool before `b` asks; as `a`'s jobs end, the
/// freed slots go to `b` until the pool is shared by weight (1:3), not by calls (8:1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_is_shared_by_weight_however_many_calls_a_principal_opens() {
    let (server, gate) = gated_server(|c| {
        c.workers = 4;
        c.principal = vec![
            principal("a", "token-a"),
            PrincipalSpec {
                weight: 3,
                ..principal("b", "token-b")
            },
        ];
    });
    let url = server.url();
    let mut calls: Vec<OpenCall> = Vec::new();
    for c in 0..8 {
        let call = open_as(&url, "token-a").await;
        call.send(batch(&format!("a{c}"), gate_jobs(&format!("a{c}-"), 4)))
            .await;
        calls.push(call);
    }
    wait_until("a holds the whole pool", WAIT, || {
        server.stats().jobs_admitted == 32 && held(&server, "a") == 4.0
    })
    .await;
    let b = open_as(&url, "token-b").await;
    b.send(batch("b", gate_jobs("b", 8))).await;
    wait_until("b's jobs wait", WAIT, || server.stats().jobs_admitted == 40).await;
    assert_eq!(held(&server, "b"), 0.0, "running jobs are not preempted");
    // Three of a's jobs end: each freed slot goes to b, furthest below its share.
    gate.add_permits(3);
    wait_until("the pool is shared 1:3", WAIT, || {
        held(&server, "a") == 1.0 && held(&server, "b") == 3.0
    })
    .await;
    let s = server.stats();
    assert_eq!((s.jobs_running, s.free_workers), (4, 0), "{s:?}");
    // Everything still finishes.
    gate.add_permits(100);
    calls.push(b);
    for mut call in calls {
        call.half_close();
        call.finish_ok(WAIT).await;
    }
}
