//! `echo`: throughput and server CPU per job, 4 calls keeping the daemon busy with echo batches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::support::client::{batch, connect, is_ok, job, open_call, Call};
use crate::support::daemon::Daemon;
use crate::support::procfs::self_cpu_s;
use crate::support::report::figure;

/// Concurrent calls, jobs per batch, payload bytes, warm-up and measured time.
pub const CALLS: usize = 4;
const BATCH: usize = 100;
const PAYLOAD: usize = 64;
const WARMUP: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(5);
/// Jobs a call may have sent and not seen the result of: twice the default session window, so the
/// server always has the next batch waiting while its window is full.
const IN_FLIGHT: usize = 2 * 1024;

/// What one echo run measured.
pub struct EchoRun {
    /// Results received in the measured time.
    pub jobs: u64,
    pub wall: Duration,
    /// The daemon's CPU time in the measured time: from schedstat and from ticks.
    pub server_cpu_s: f64,
    pub server_tick_s: f64,
    pub client_cpu_s: f64,
    /// Results that were not OK, over the whole run.
    pub not_ok: u64,
    pub threads: u64,
}

impl EchoRun {
    /// The figure of issues 2 and 15.
    pub fn jobs_per_server_cpu_s(&self) -> f64 {
        self.jobs as f64 / self.server_cpu_s
    }
}

pub async fn run() {
    println!("\n== echo: {CALLS} calls, batches of {BATCH}, {PAYLOAD}-byte payloads ==");
    let d = Daemon::spawn(&[]);
    let r = measure(&d).await;
    let wall = r.wall.as_secs_f64();
    figure("echo_jobs", r.jobs);
    figure("echo_wall_s", format!("{wall:.2}"));
    figure("echo_not_ok_results", r.not_ok);
    figure(
        "echo_throughput_jobs_per_s",
        format!("{:.0}", r.jobs as f64 / wall),
    );
    figure("echo_server_cpu_s", format!("{:.3}", r.server_cpu_s));
    figure(
        "echo_server_cpu_s_from_ticks",
        format!("{:.2}", r.server_tick_s),
    );
    figure(
        "echo_server_cpu_utilisation_cores",
        format!("{:.2}", r.server_cpu_s / wall),
    );
    figure(
        "echo_jobs_per_server_cpu_s",
        format!("{:.0}", r.jobs_per_server_cpu_s()),
    );
    figure("echo_client_cpu_s", format!("{:.2}", r.client_cpu_s));
    figure("echo_server_threads", r.threads);
}

/// Runs the echo load against `d`: 1 s of warm-up, then 5 s measured.
pub async fn measure(d: &Daemon) -> EchoRun {
    let url = d.url();
    let received = Arc::new(AtomicU64::new(0));
    let not_ok = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for c in 0..CALLS {
        let client = connect(&url).await;
        let Call { tx, mut rx } = open_call(&client, 16).await;
        let credit = Arc::new(Semaphore::new(IN_FLIGHT));
        let payload = Bytes::from(vec![b'x'; PAYLOAD]);
        let (stop_tx, credit_tx) = (stop.clone(), Arc::clone(&credit));
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut n = 0u64;
            loop {
                let permit = tokio::select! {
                    p = credit_tx.acquire_many(BATCH as u32) => p.unwrap(),
                    () = stop_tx.cancelled() => break,
                };
                permit.forget();
                let jobs = (0..BATCH)
                    .map(|_| {
                        seq += 1;
                        job(seq.to_string(), "echo", payload.clone(), &[])
                    })
                    .collect();
                n += 1;
                if tx.send(batch(format!("c{c}b{n}"), jobs)).await.is_err() {
                    break;
                }
            }
            drop(client);
        }));
        let (stop_rx, received, not_ok) =
            (stop.clone(), Arc::clone(&received), Arc::clone(&not_ok));
        tasks.push(tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = rx.message() => m,
                    () = stop_rx.cancelled() => break,
                };
                let Ok(Some(msg)) = msg else { break };
                let n = msg.results.len();
                let bad = msg.results.iter().filter(|r| !is_ok(r)).count();
                received.fetch_add(n as u64, Ordering::Relaxed);
                not_ok.fetch_add(bad as u64, Ordering::Relaxed);
                credit.add_permits(n);
            }
        }));
    }
    tokio::time::sleep(WARMUP).await;
    let (cpu0, client0, jobs0, t0) = (
        d.cpu(),
        self_cpu_s(),
        received.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(RUN).await;
    let (cpu1, client1, jobs1, wall) = (
        d.cpu(),
        self_cpu_s(),
        received.load(Ordering::Relaxed),
        t0.elapsed(),
    );
    let threads = d.threads();
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let (server_cpu_s, server_tick_s) = cpu1.since(cpu0);
    EchoRun {
        jobs: jobs1 - jobs0,
        wall,
        server_cpu_s,
        server_tick_s,
        client_cpu_s: client1 - client0,
        not_ok: not_ok.load(Ordering::Relaxed),
        threads,
    }
}
