//! `churn`: 10,000 calls aborted at random moments, in rounds; the daemon's RSS and threads after
//! each round, and whether it still serves. The churn itself is shared with `churn_inproc`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchd::proto::{self, batch_service_client::BatchServiceClient};
use bytes::Bytes;
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use crate::support::client::{batch, connect, is_ok, job, open_call, try_open_call, Call};
use crate::support::daemon::Daemon;
use crate::support::report::figure;
use crate::support::scenarios::knob;
use crate::support::stats::ms;

/// Calls aborted at random moments, over how many connections, how many at once.
pub const CALLS: usize = 10_000;
const CONNS: usize = 16;
pub const CONCURRENCY: usize = 256;
/// From the last call's end (and the connections' close) to the RSS reading.
const IDLE_WAIT: Duration = Duration::from_millis(1500);
/// Rounds of `CALLS`, unless `CHURN_ROUNDS` says otherwise.
const ROUNDS: u64 = 2;

/// What one churned call does before it is aborted.
#[derive(Debug, Clone)]
struct Plan {
    /// 0: abort right after opening; 1: send, wait `delay`, abort; 2: send, wait for the first
    /// result, abort; 3: send two batches and half-close, wait `delay`, abort.
    mode: u8,
    jobs: Vec<proto::Job>,
    delay: Duration,
}

fn plans(n: usize, seed: u64) -> Vec<Plan> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let k = rng.random_range(1..=16);
            let jobs = (0..k)
                .map(|j| {
                    let id = format!("j{j}");
                    match rng.random_range(0..10) {
                        0..5 => job(id, "echo", Bytes::from_static(b"payload"), &[]),
                        5..8 => {
                            let ms = rng.random_range(1..20u32).to_string();
                            job(id, "sleep", Bytes::new(), &[("ms", &ms)])
                        }
                        _ => job(id, "sleep", Bytes::new(), &[("ms", "60000")]),
                    }
                })
                .collect();
            Plan {
                mode: rng.random_range(0..4),
                jobs,
                delay: Duration::from_micros(rng.random_range(0..5_000)),
            }
        })
        .collect()
}

/// Opens `CALLS` calls over `CONNS` connections and aborts each at a random moment.
/// Returns the clients (connections stay open) and the calls refused (should be 0).
pub async fn churn(url: &str, seed: u64) -> (Vec<BatchServiceClient<Channel>>, u64) {
    let mut clients = Vec::new();
    for _ in 0..CONNS {
        clients.push(connect(url).await);
    }
    let refused = Arc::new(AtomicU64::new(0));
    let plans = plans(CALLS, seed);
    futures_util::stream::iter(plans.into_iter().enumerate())
        .for_each_concurrent(CONCURRENCY, |(i, plan)| {
            let client = clients[i % CONNS].clone();
            let refused = Arc::clone(&refused);
            async move {
                let Ok(mut call) = try_open_call(&client, 4).await else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let send = |call: &Call, jobs: Vec<proto::Job>| {
                    let tx = call.tx.clone();
                    async move {
                        let _ = tx.send(batch("b".into(), jobs)).await;
                    }
                };
                match plan.mode {
                    0 => {}
                    1 => {
                        send(&call, plan.jobs).await;
                        tokio::time::sleep(plan.delay).await;
                    }
                    2 => {
                        send(&call, plan.jobs).await;
                        let _ = tokio::time::timeout(Duration::from_millis(50), call.rx.message())
                            .await;
                    }
                    _ => {
                        let second: Vec<proto::Job> = plan
                            .jobs
                            .iter()
                            .map(|j| proto::Job {
                                id: format!("{}x", j.id),
                                ..j.clone()
                            })
                            .collect();
                        send(&call, plan.jobs).await;
                        send(&call, second).await;
                        let Call { tx, rx } = call;
                        drop(tx); // half-close; the call stays open until its jobs finish
                        tokio::time::sleep(plan.delay).await;
                        drop(rx);
                        return;
                    }
                }
                drop(call);
            }
        })
        .await;
    (clients, refused.load(Ordering::Relaxed))
}

/// One echo round trip on a fresh call; returns its latency.
pub async fn fresh_echo(client: &BatchServiceClient<Channel>) -> Duration {
    let t0 = Instant::now();
    let mut call = open_call(client, 1).await;
    call.tx
        .send(batch(
            "f".into(),
            vec![job("f".into(), "echo", Bytes::from_static(b"hi"), &[])],
        ))
        .await
        .unwrap();
    let msg = call.rx.message().await.unwrap().unwrap();
    assert!(msg.results.iter().all(is_ok));
    t0.elapsed()
}

/// A short churn so one-time allocations (thread stacks, connection buffers, allocator arenas)
/// are in the baseline rather than counted as growth.
pub async fn warm_up(url: &str) {
    let client = connect(url).await;
    for _ in 0..50 {
        fresh_echo(&client).await;
    }
}

/// The daemon in its own process.
pub async fn run() {
    let rounds = knob("CHURN_ROUNDS", ROUNDS);
    println!(
        "\n== churn (separate process): {CALLS} calls aborted at random moments, {CONCURRENCY} at once, {rounds} rounds =="
    );
    let d = Daemon::spawn(&["--set", "max_calls=20000"]);
    let url = d.url();
    let (fresh, fresh_anon) = (d.rss_kb(), d.rss_anon_kb());
    warm_up(&url).await;
    let (base, base_threads) = (d.rss_kb(), d.threads());
    let mut after = Vec::new();
    for round in 1..=rounds {
        let t0 = Instant::now();
        let (clients, refused) = churn(&url, round).await;
        let took = t0.elapsed().as_secs_f64();
        // Give the daemon a moment to finish tearing calls down, then check it still serves.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let echo = fresh_echo(&clients[0]).await;
        drop(clients);
        // The daemon hands memory back 0.25-0.5 s after it goes idle (src/bin/batchd/hand_back.rs).
        tokio::time::sleep(IDLE_WAIT).await;
        let rss = d.rss_kb();
        after.push(rss);
        figure(&format!("churn_round{round}_calls_refused"), refused);
        figure(&format!("churn_round{round}_time_s"), format!("{took:.2}"));
        figure(&format!("churn_round{round}_rss_after_kib"), rss);
        figure(
            &format!("churn_round{round}_fresh_echo_after_ms"),
            format!("{:.3}", ms(echo)),
        );
    }
    let pct = |a: u64, b: u64| (a as f64 - b as f64) * 100.0 / b as f64;
    figure("churn_rss_fresh_kib", fresh);
    figure("churn_rss_before_kib", base);
    figure("churn_peak_rss_kib", d.hwm_kb());
    figure(
        "churn_rss_delta_pct",
        format!("{:+.1}", pct(after[0], base)),
    );
    figure(
        "churn_rss_after_vs_fresh_kib",
        format!("{:+}", after[0] as i64 - fresh as i64),
    );
    figure(
        "churn_rss_anon_after_vs_fresh_kib",
        format!("{:+}", d.rss_anon_kb() as i64 - fresh_anon as i64),
    );
    figure(
        "churn_rss_delta_last_round_vs_round1_pct",
        format!("{:+.1}", pct(after[after.len() - 1], after[0])),
    );
    figure(
        "churn_threads_before_after",
        format!("{base_threads} {}", d.threads()),
    );
}
