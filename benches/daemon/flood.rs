//! `flood`: peak RSS while calls send batches of sleeps as fast as the transport takes them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::client::{batch, connect, open_call, sleep_jobs, Call};
use crate::support::daemon::Daemon;
use crate::support::report::figure;
use crate::support::scenarios::knob;

/// Calls (unless `FLOOD_CALLS` says otherwise), jobs per batch, sleep of each job, how long.
const CALLS: usize = 4;
const BATCH: usize = 500;
const SLEEP_MS: &str = "50";
const RUN: Duration = Duration::from_secs(5);

pub async fn run() {
    let calls = knob("FLOOD_CALLS", CALLS);
    println!(
        "\n== flood: {calls} calls sending batches of {BATCH} sleep ms={SLEEP_MS} jobs without limit for {}s ==",
        RUN.as_secs()
    );
    let d = Daemon::spawn(&[]);
    let url = d.url();
    let base = d.rss_kb();
    let base_hwm = d.hwm_kb();
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..calls {
        let client = connect(&url).await;
        let Call { tx, mut rx } = open_call(&client, 16).await;
        let (stop_tx, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop_tx.load(Ordering::Relaxed) {
                n += 1;
                let jobs = sleep_jobs(&format!("{n}-"), BATCH, SLEEP_MS);
                if tx.send(batch(format!("c{c}b{n}"), jobs)).await.is_err() {
                    break;
                }
                sent.fetch_add(BATCH as u64, Ordering::Relaxed);
            }
            drop(client);
        }));
        let (stop_rx, received) = (Arc::clone(&stop), Arc::clone(&received));
        tasks.push(tokio::spawn(async move {
            while !stop_rx.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(50), rx.message()).await {
                    Ok(Ok(Some(msg))) => {
                        received.fetch_add(msg.results.len() as u64, Ordering::Relaxed);
                    }
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
        }));
    }
    let t0 = Instant::now();
    let mut peak = 0;
    while t0.elapsed() < RUN {
        peak = peak.max(d.rss_kb());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hwm = d.hwm_kb();
    let wall = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let done = received.load(Ordering::Relaxed);
    figure("flood_baseline_rss_kib", base);
    figure("flood_hwm_before_kib", base_hwm);
    figure(
        "flood_jobs_sent_into_transport",
        sent.load(Ordering::Relaxed),
    );
    figure("flood_jobs_finished", done);
    figure(
        "flood_jobs_finished_per_s",
        format!("{:.0}", done as f64 / wall),
    );
    figure("flood_peak_rss_sampled_kib", peak);
    figure("flood_peak_rss_vmhwm_kib", hwm);
    figure(
        "flood_peak_rss_mib",
        format!("{:.1}", hwm.max(peak) as f64 / 1024.0),
    );
}
