//! Churn: a thousand calls of random jobs, each aborted at a random moment (while opening, after a
//! delay, after some results), leave nothing behind and the daemon goes on serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::sync::Arc;
use std::time::Duration;

use batchd::engine::Outcome as EngineOutcome;
use batchd::proto::{self, batch_service_client::BatchServiceClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::recovery::*;
use support::*;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy)]
enum Abort {
    /// Drop the call while `OpenCall::open` is still waiting, after this long.
    WhileOpening(Duration),
    /// Drop everything this long after the last batch was sent.
    AfterDelay(Duration),
    /// Drop everything after this many results were read.
    AfterResults(usize),
}

struct Plan {
    batches: Vec<proto::ProcessRequest>,
    abort: Abort,
    own_connection: bool,
}

fn plan(i: usize, rng: &mut StdRng) -> Plan {
    let n_batches = rng.random_range(1..=3);
    let mut jobs_total = 0;
    let batches = (0..n_batches)
        .map(|b| {
            let n = rng.random_range(1..=15);
            jobs_total += n;
            let jobs = (0..n)
                .map(|j| {
                    let id = format!("c{i}b{b}j{j}");
                    match rng.random_range(0..3) {
                        0 => job(&id, "echo", &vec![b'x'; rng.random_range(0..256)], &[]),
                        1 => {
                            let ms = rng.random_range(0..=40u32).to_string();
                            job(&id, "sleep", b"", &[("ms", &ms)])
                        }
                        _ => {
                            let ms = rng.random_range(0..=3u32).to_string();
                            job(&id, "spin", b"", &[("ms", &ms)])
                        }
                    }
                })
                .collect();
            batch(&format!("b{b}"), jobs)
        })
        .collect();
    let abort = match rng.random_range(0..10) {
        0 => Abort::WhileOpening(Duration::from_micros(rng.random_range(0..2_000))),
        1..=6 => Abort::AfterDelay(Duration::from_millis(rng.random_range(0..=20))),
        _ => Abort::AfterResults(rng.random_range(1..=jobs_total)),
    };
    Plan {
        batches,
        abort,
        own_connection: rng.random_bool(0.25),
    }
}

/// Runs one call as planned, then drops it (and its connection when it has its own).
async fn aborted_call(plan: Plan, shared: BatchServiceClient<Channel>, url: String) {
    let mut client = if plan.own_connection {
        BatchServiceClient::connect(url).await.unwrap()
    } else {
        shared
    };
    let mut call = match plan.abort {
        Abort::WhileOpening(after) => {
            // The abort moment is the thing under test here, not a synchronisation.
            let _ = tokio::time::timeout(after, OpenCall::open(&mut client)).await;
            return;
        }
        _ => OpenCall::open(&mut client).await,
    };
    for b in plan.batches {
        call.send(b).await;
    }
    match plan.abort {
        Abort::WhileOpening(_) => unreachable!(),
        Abort::AfterDelay(after) => tokio::time::sleep(after).await,
        Abort::AfterResults(n) => {
            let results = tokio::time::timeout(LIVENESS, call.collect(n))
                .await
                .expect("results of a live call arrive")
                .expect("a live call does not fail");
            assert!(results.len() >= n, "the call ended early");
            by_id(results); // no job has two results
        }
    }
    drop(call);
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_aborted_at_random_moments_leave_nothing_behind() {
    const CALLS: usize = 1000;
    const AT_ONCE: usize = 50;
    let server = TestServer::start(|c| {
        c.workers = 16;
        c.cpu_workers = 2;
    });
    let baseline = idle_tasks(&server).await;

    let seed = std::env::var("BATCHD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("seed {seed} (set BATCHD_TEST_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut shared = Vec::new();
    for _ in 0..4 {
        shared.push(server.client().await);
    }
    let slots = Arc::new(Semaphore::new(AT_ONCE));
    let mut calls = tokio::task::JoinSet::new();
    let mut peak_open = 0;
    for i in 0..CALLS {
        let slot = Arc::clone(&slots).acquire_owned().await.unwrap();
        peak_open = peak_open.max(server.stats().calls_open);
        let plan = plan(i, &mut rng);
        let client = shared[i % shared.len()].clone();
        let url = server.url();
        calls.spawn(async move {
            aborted_call(plan, client, url).await;
            drop(slot);
        });
        while let Some(done) = calls.try_join_next() {
            done.unwrap();
        }
    }
    let all_done = async {
        while let Some(done) = calls.join_next().await {
            done.unwrap();
        }
    };
    tokio::time::timeout(LIVENESS * 3, all_done)
        .await
        .expect("every planned call ends");
    drop(shared);

    assert!(peak_open > 1, "calls overlapped (peak {peak_open})");
    // No call sends CancelJobs: every cancelled job was cut off by its call's abort.
    let s = server.stats();
    let cut_off = s.finished(EngineOutcome::Cancelled);
    eprintln!("{} jobs admitted, {cut_off} cut off", s.jobs_admitted);
    assert!(
        cut_off > 0,
        "no call was aborted with jobs in flight: {s:?}"
    );
    assert_recovered(&server, baseline).await;
    assert_serves(&server).await;
}
