//! `idle`: RSS per open call, each holding one 600 s sleep; once with a worker for every sleep, once
//! with the sleeps beyond 256 workers queued.

use std::time::{Duration, Instant};

use batchd::proto;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::support::client::{batch, connect, job, open_call, Call};
use crate::support::daemon::Daemon;
use crate::support::report::figure;
use crate::support::scenarios::knob;
use crate::support::stats::{ms, percentile};

/// Calls (unless `IDLE_CALLS` says otherwise), over how many connections.
const CALLS: usize = 10_000;
const CONNS: usize = 20;

pub async fn run() {
    for workers in [CALLS, 256] {
        run_with(workers).await;
    }
}

async fn run_with(workers: usize) {
    let what = if workers >= CALLS {
        "every sleep running"
    } else {
        "sleeps beyond the workers queued"
    };
    let count = knob("IDLE_CALLS", CALLS);
    println!(
        "\n== idle: {count} calls each holding one 600 s sleep, {CONNS} connections, --workers {workers} ({what}) =="
    );
    let tag = if workers >= CALLS {
        "idle"
    } else {
        "idle_queued"
    };
    let workers = workers.to_string();
    let d = Daemon::spawn(&[
        "--workers",
        &workers,
        "--set",
        "max_calls=20000",
        "--set",
        "default_job_timeout=20m",
    ]);
    let url = d.url();
    let mut clients = Vec::new();
    for _ in 0..CONNS {
        clients.push(connect(&url).await);
    }
    // One finished call per connection, so per-connection state is in the baseline.
    for c in &clients {
        let mut call = open_call(c, 1).await;
        call.tx
            .send(batch(
                "w".into(),
                vec![job("w".into(), "echo", Bytes::new(), &[])],
            ))
            .await
            .unwrap();
        call.rx.message().await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = d.rss_kb();
    let base_threads = d.threads();
    let t0 = Instant::now();
    // Each call sends a sleep and a second job reusing the sleep's id. That one is REJECTED at
    // once without a worker slot; its result proves the call is open and its sleep admitted
    // (running when there are enough workers, queued otherwise).
    let opened: Vec<(Call, Duration)> = futures_util::stream::iter(0..count)
        .map(|i| {
            let client = clients[i % CONNS].clone();
            async move {
                let t = Instant::now();
                let mut call = open_call(&client, 1).await;
                let jobs = vec![
                    job("s".into(), "sleep", Bytes::new(), &[("ms", "600000")]),
                    job("s".into(), "echo", Bytes::new(), &[]),
                ];
                call.tx.send(batch("b".into(), jobs)).await.unwrap();
                loop {
                    let msg = call.rx.message().await.unwrap().unwrap();
                    if msg
                        .results
                        .iter()
                        .any(|r| r.outcome == proto::Outcome::Rejected as i32)
                    {
                        break;
                    }
                }
                (call, t.elapsed())
            }
        })
        .buffer_unordered(500)
        .collect()
        .await;
    let open_s = t0.elapsed().as_secs_f64();
    let (calls, mut lat): (Vec<Call>, Vec<Duration>) = opened.into_iter().unzip();
    lat.sort();
    figure(
        &format!("{tag}_call_ready_p50_p99_max_ms"),
        format!(
            "{:.1} {:.1} {:.1}",
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0)),
            ms(percentile(&lat, 100.0))
        ),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = d.rss_kb();
    let threads = d.threads();
    let per_call = (rss.saturating_sub(base) * 1024) as f64 / calls.len() as f64;
    figure(&format!("{tag}_calls_open"), calls.len());
    figure(&format!("{tag}_open_time_s"), format!("{open_s:.2}"));
    figure(&format!("{tag}_baseline_rss_kib"), base);
    figure(&format!("{tag}_rss_kib"), rss);
    figure(
        &format!("{tag}_threads_before_after"),
        format!("{base_threads} {threads}"),
    );
    figure(
        &format!("{tag}_rss_per_call_bytes"),
        format!("{per_call:.0}"),
    );
    // Abort them all and see where RSS settles.
    drop(calls);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    figure(&format!("{tag}_rss_after_abort_kib"), d.rss_kb());
    figure(&format!("{tag}_peak_rss_kib"), d.hwm_kb());
}
