//! `recovery`: every worker slot held by a call's sleeps, the call aborted; how soon a fresh call's
//! echo comes back.
//!
//! The daemon runs without the reserve (`reserved_workers = 0`): with it, the bulk call cannot hold
//! every slot and a fresh call's echo runs at once instead of queueing (README, "The reserve"), so
//! there would be no queued echo to time. `RECOVERY_RESERVE=default` keeps the daemon's default
//! (and suits a build from before the setting).

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::support::client::{batch, connect, is_ok, job, open_call, sleep_jobs};
use crate::support::daemon::Daemon;
use crate::support::report::{figure, latency_ms};
use crate::support::scenarios::knob;
use crate::support::stats::{ms, percentile, percentile_ci95};

/// Worker slots to fill (also the in-process teardown of `churn_inproc`).
pub const WORKERS: usize = 256;
/// Repetitions of each variant, unless `RECOVERY_ITERS` says otherwise: enough for a p99 whose
/// 95 % interval spans a few samples (see `recovery_*_p99_ci95_ms`).
pub const ITERS: usize = 300;

/// The percentiles reported.
const POINTS: [(&str, f64); 5] = [
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99_9", 99.9),
    ("max", 100.0),
];

pub async fn run() {
    let iters = knob("RECOVERY_ITERS", ITERS);
    println!(
        "\n== recovery: {WORKERS} workers filled with 60 s sleeps, call aborted, {iters}× per variant =="
    );
    let workers = WORKERS.to_string();
    let mut args = vec!["--workers", &workers];
    if knob("RECOVERY_RESERVE", String::from("0")) != "default" {
        args.extend(["--set", "reserved_workers=0"]);
    }
    let d = Daemon::spawn(&args);
    let url = d.url();
    let echo = |id: &str| {
        batch(
            "probe".into(),
            vec![job(id.into(), "echo", Bytes::from_static(b"x"), &[])],
        )
    };
    // Variants, interleaved: 0 = the fresh call's echo is queued before the abort; 1 = it is sent
    // right after the abort; 2 = reference: the same echo on an idle daemon, nothing filled or
    // aborted (what a round trip costs on this machine at all).
    let mut samples: [Vec<Duration>; 3] = Default::default();
    let mut not_full = 0;
    for i in 0..3 * iters {
        let variant = i % 3;
        let ca = connect(&url).await;
        let cb = connect(&url).await;
        let a = open_call(&ca, 4).await;
        let mut b = open_call(&cb, 4).await;
        if variant != 2 {
            let fill = sleep_jobs("s", WORKERS, "60000");
            a.tx.send(batch("fill".into(), fill)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        if variant == 0 {
            // The fresh call's echo is queued behind the sleeps; it must not come back while they run.
            b.tx.send(echo("e")).await.unwrap();
            if tokio::time::timeout(Duration::from_millis(20), b.rx.message())
                .await
                .is_ok()
            {
                not_full += 1;
                continue;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t0 = Instant::now();
        if variant != 2 {
            drop(a);
            drop(ca);
        }
        if variant != 0 {
            b.tx.send(echo("e")).await.unwrap();
        }
        let msg = b.rx.message().await.unwrap().unwrap();
        samples[variant].push(t0.elapsed());
        assert!(msg.results.iter().all(is_ok), "probe failed: {msg:?}");
    }
    figure("recovery_workers_not_full_iterations", not_full);
    for (name, mut v) in [
        "recovery_queued_echo",
        "recovery_echo_sent_after_abort",
        "recovery_reference_echo_no_abort",
    ]
    .into_iter()
    .zip(samples)
    {
        v.sort();
        figure(&format!("{name}_samples"), v.len());
        latency_ms(name, &v, &POINTS, percentile);
        let (lo, hi) = percentile_ci95(&v, 99.0);
        figure(
            &format!("{name}_p99_ci95_ms"),
            format!("{:.3} {:.3}", ms(lo), ms(hi)),
        );
    }
}
