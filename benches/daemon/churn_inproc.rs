//! `churn_inproc`: the churn of `churn` against `batchd::Server` in this process, to count live
//! tasks and read the engine's counters; then the server side of `recovery` (abort → every worker
//! slot free again).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use batchd::config::Config;
use batchd::Registry;

use crate::churn::{churn, fresh_echo, warm_up, CALLS};
use crate::recovery::{ITERS, WORKERS};
use crate::support::client::{batch, connect, open_call, sleep_jobs};
use crate::support::inproc::InProc;
use crate::support::report::{figure, latency_ms};
use crate::support::stats::{ms, percentile, P50_P99_MAX};

pub async fn run() {
    println!(
        "\n== churn (in process): {CALLS} calls aborted at random moments; engine counters and live tasks =="
    );
    let config = Config {
        max_calls: 20_000,
        shutdown_grace: Duration::from_secs(1),
        ..Config::default()
    };
    let server = InProc::start(config, Registry::builtin());
    let url = server.url();
    warm_up(&url).await;
    // The probe connection stays open throughout; the churn connections come and go.
    let probe = connect(&url).await;
    fresh_echo(&probe).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_stats = server.engine.stats();
    let baseline_alive = server.alive_tasks();
    let t0 = Instant::now();
    let (clients, refused) = churn(&url, 1).await;
    let took = t0.elapsed().as_secs_f64();
    let alive_end_of_churn = server.alive_tasks();
    drop(clients);
    let wait = Instant::now();
    let mut settled = None;
    while wait.elapsed() < Duration::from_secs(5) {
        let s = server.engine.stats();
        if s.calls_open == 0 && server.alive_tasks() <= baseline_alive {
            settled = Some(wait.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let after = server.engine.stats();
    let alive = server.alive_tasks();
    let echo = fresh_echo(&probe).await;
    figure("churn_inproc_calls", CALLS);
    figure("churn_inproc_calls_refused", refused);
    figure("churn_inproc_time_s", format!("{took:.2}"));
    figure(
        "churn_inproc_alive_tasks_at_end_of_churn",
        alive_end_of_churn,
    );
    figure("churn_inproc_alive_tasks_baseline", baseline_alive);
    figure("churn_inproc_alive_tasks_after", alive);
    figure(
        "churn_inproc_leaked_tasks",
        alive as i64 - baseline_alive as i64,
    );
    figure(
        "churn_inproc_settle_ms",
        settled.map_or("not within 5 s".into(), |d| format!("{:.1}", ms(d))),
    );
    figure(
        "churn_inproc_stats_after",
        format!(
            "calls_open={} jobs_running={} jobs_queued={} results_buffered={} free_workers={}",
            after.calls_open,
            after.jobs_running,
            after.jobs_queued,
            after.results_buffered,
            after.free_workers
        ),
    );
    figure(
        "churn_inproc_jobs_admitted",
        after.jobs_admitted - before_stats.jobs_admitted,
    );
    let outcomes: HashMap<&str, u64> = batchd::engine::Outcome::ALL
        .iter()
        .map(|o| (o.as_str(), after.finished(*o) - before_stats.finished(*o)))
        .collect();
    let mut outcomes: Vec<_> = outcomes.into_iter().collect();
    outcomes.sort();
    figure("churn_inproc_finished_by_outcome", format!("{outcomes:?}"));
    figure(
        "churn_inproc_fresh_echo_after_ms",
        format!("{:.3}", ms(echo)),
    );

    // Server-side part of recovery: abort a call whose 256 sleeps hold every worker, and time
    // until the engine reports every slot free again (RST on the wire + call teardown).
    let mut teardown = Vec::new();
    for _ in 0..ITERS {
        let client = connect(&url).await;
        let call = open_call(&client, 4).await;
        let fill = sleep_jobs("s", WORKERS, "60000");
        call.tx.send(batch("fill".into(), fill)).await.unwrap();
        let start = Instant::now();
        while server.engine.stats().jobs_running < WORKERS as u64 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "workers never filled"
            );
            tokio::task::yield_now().await;
        }
        let t0 = Instant::now();
        drop(call);
        while server.engine.stats().free_workers < WORKERS as u64 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "slots never came back"
            );
            tokio::task::yield_now().await;
        }
        teardown.push(t0.elapsed());
        drop(client);
    }
    teardown.sort();
    latency_ms(
        "churn_inproc_abort_to_slots_free",
        &teardown,
        &P50_P99_MAX,
        percentile,
    );
}
