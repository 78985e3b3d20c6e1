//! `small_call`: a call sending one echo every 10 ms while a bulk call keeps 1,000,000 `sleep ms=1`
//! jobs queued in the daemon; the round trip of the small call's echo, against the same echo on the
//! idle daemon.
//!
//! Both calls are anonymous (one principal): the pool is shared among them in turn, so the small
//! call's job gets one of the next freed slots whatever the bulk call has queued. The daemon runs
//! with a session window of 2^20 (and byte limits to match), so that the bulk call's million jobs
//! are admitted and queued in the daemon rather than held back by flow control. The bulk client
//! runs on a runtime of its own in this process, so that building its batches and decoding its
//! results does not delay the small call's client (the two still share the machine's cores with
//! the daemon).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::client::{batch, connect, is_ok, job, open_call, sleep_jobs, Call};
use crate::support::daemon::Daemon;
use crate::support::flow::Flow;
use crate::support::report::{figure, latency_ms};
use crate::support::scenarios::knob;
use crate::support::stats::{percentile, P50_P99_MAX};

/// Jobs the bulk call keeps outstanding (sent, no result yet), in batches of `BULK_BATCH` (about
/// what `batchctl` sends, 256, times four).
const BULK_QUEUED: usize = 1_000_000;
const BULK_BATCH: usize = 1_000;
/// The small call's pace, and its samples (`SMALL_SAMPLES`) under the bulk call and idle.
const EVERY: Duration = Duration::from_millis(10);
const SAMPLES: usize = 1_000;
const REFERENCE_SAMPLES: usize = 300;

pub async fn run() {
    let samples = knob("SMALL_SAMPLES", SAMPLES);
    println!(
        "\n== small_call: one echo every {} ms while a bulk call keeps {BULK_QUEUED} sleep ms=1 jobs queued, {samples} samples ==",
        EVERY.as_millis()
    );
    let d = Daemon::spawn(&[
        "--set",
        "session_window=1048576",
        "--set",
        "session_bytes=512MiB",
        "--set",
        "memory_budget=2GiB",
    ]);
    let url = d.url();
    let small_client = connect(&url).await;
    let mut small = open_call(&small_client, 4).await;

    let (mut idle, _) = echoes(&mut small, REFERENCE_SAMPLES, || 0).await;
    idle.sort();
    figure("small_call_reference_samples", idle.len());
    latency_ms("small_call_reference_idle", &idle, &P50_P99_MAX, percentile);

    let bulk = Bulk::start(&url).await;
    let filled = Instant::now();
    while bulk.flow.outstanding() < (BULK_QUEUED - BULK_BATCH) as u64 {
        assert!(
            filled.elapsed() < Duration::from_secs(60),
            "the bulk call did not get {BULK_QUEUED} jobs out within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    figure(
        "small_call_bulk_fill_s",
        format!("{:.2}", filled.elapsed().as_secs_f64()),
    );
    let done0 = bulk.flow.done();
    let t0 = Instant::now();
    let outstanding = || bulk.flow.outstanding();
    let mut min_queued = u64::MAX;
    let (mut busy, mut queued) = echoes(&mut small, samples, || {
        let q = outstanding();
        min_queued = min_queued.min(q);
        q
    })
    .await;
    let wall = t0.elapsed().as_secs_f64();
    let bulk_done = bulk.flow.done() - done0;
    let not_ok = bulk.flow.not_ok();
    bulk.stop().await;
    busy.sort();
    figure("small_call_samples", busy.len());
    latency_ms("small_call_under_bulk", &busy, &P50_P99_MAX, percentile);
    queued.sort();
    // Of the round trip, the time the echo waited in the daemon for a worker slot (its result's
    // `queued`): the rest is transport and the daemon's tasks.
    latency_ms(
        "small_call_under_bulk_queued",
        &queued,
        &P50_P99_MAX,
        percentile,
    );
    figure("small_call_bulk_outstanding_min", min_queued);
    figure(
        "small_call_bulk_jobs_per_s",
        format!("{:.0}", bulk_done as f64 / wall),
    );
    figure("small_call_bulk_not_ok_results", not_ok);
    figure("small_call_daemon_peak_rss_kib", d.hwm_kb());
}

/// `n` echo round trips on `call`, one every [`EVERY`]; `probe` runs before each. Returns the
/// round trips and the times the echoes waited for a slot in the daemon (their results' `queued`).
async fn echoes(
    call: &mut Call,
    n: usize,
    mut probe: impl FnMut() -> u64,
) -> (Vec<Duration>, Vec<Duration>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let payload = Bytes::from_static(b"small");
    let mut out = Vec::with_capacity(n);
    let mut queued = Vec::with_capacity(n);
    for i in 0..n {
        tick.tick().await;
        probe();
        let t = Instant::now();
        let echo = job(format!("e{i}"), "echo", payload.clone(), &[]);
        call.tx
            .send(batch("small".into(), vec![echo]))
            .await
            .unwrap();
        let msg = call.rx.message().await.unwrap().unwrap();
        out.push(t.elapsed());
        assert!(msg.results.len() == 1 && is_ok(&msg.results[0]), "{msg:?}");
        let waited = msg.results[0]
            .queued
            .and_then(|d| Duration::try_from(d).ok());
        queued.push(waited.unwrap_or_default());
    }
    (out, queued)
}

/// The bulk call: keeps `BULK_QUEUED` sleeps outstanding, refilling as results come back.
struct Bulk {
    flow: Flow,
    /// The bulk client's own runtime.
    rt: tokio::runtime::Runtime,
}

impl Bulk {
    async fn start(url: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let url = url.to_owned();
        let (client, call) = rt
            .spawn(async move {
                let client = connect(&url).await;
                let call = open_call(&client, 4).await;
                (client, call)
            })
            .await
            .unwrap();
        // Ids cycle over twice the outstanding jobs: one is sent again only long after its
        // previous job finished (a clash would come back REJECTED and be counted).
        let cycle = (2 * BULK_QUEUED / BULK_BATCH) as u64;
        let make = move |n: u64| {
            let jobs = sleep_jobs(&format!("{}-", n % cycle), BULK_BATCH, "1");
            (format!("bulk{n}"), jobs)
        };
        let flow = Flow::start(rt.handle(), call, client, BULK_QUEUED, BULK_BATCH, make);
        Self { flow, rt }
    }

    async fn stop(self) {
        self.flow.stop().await;
        self.rt.shutdown_background();
    }
}
