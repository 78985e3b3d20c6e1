//! Benchmarks of the batchd daemon against the targets of issues 2, 11 and 15 (see BENCHMARKS.md).
//!
//! Every scenario but `churn_inproc` spawns the release build of the real daemon
//! (`CARGO_BIN_EXE_batchd`) in its own process and measures it from the outside through /proc:
//! CPU time from `/proc/PID/task/*/schedstat` (ns) and `/proc/PID/stat` (ticks), RSS and threads
//! from `/proc/PID/status`. `churn_inproc` runs `batchd::Server` on its own tokio runtime inside
//! this process, to read the engine's counters and the runtime's live task count.
//!
//! Run all: `cargo bench --bench daemon`; one or more: `cargo bench --bench daemon -- recovery flood`.
//! Scenarios: echo, recovery, idle, flood, churn, churn_inproc, conns, small_call, hostile (one
//! module each), principals and principals_cost (`principals.rs`). Each prints `name: value` lines
//! and the run ends with a check of every figure that has a target in an issue.
//!
//! Knobs (environment): `IDLE_CALLS` (default 10000), `FLOOD_CALLS` (default 4), `CHURN_ROUNDS`
//! (default 2), `RECOVERY_ITERS` (default 300), `CONNS` (default 8000), `SMALL_SAMPLES` (default
//! 1000), `WEIGHT_WORKERS` (default both 7 and 70), `BATCHD_BENCH_BASE_BIN` and `PAIRS` (the
//! `principals_cost` pairs: another build against this one), and
//! `BATCHD_BENCH_BIN`, a program run instead of the daemon: another build, or a wrapper script
//! that `exec`s it under a profiler (e.g. heaptrack's preload library).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod churn;
mod churn_inproc;
mod conns;
mod echo;
mod flood;
mod hostile;
mod idle;
mod principals;
mod recovery;
mod small_call;

use std::time::Instant;

use support::procfs;
use support::report::{check_targets, Target};
use support::scenarios::Scenarios;

const SCENARIOS: [&str; 11] = [
    "echo",
    "recovery",
    "idle",
    "flood",
    "churn",
    "churn_inproc",
    "conns",
    "small_call",
    "hostile",
    "principals",
    "principals_cost",
];

/// The figures that have a target in issues 2, 11 (and what issue 11 measured before) and 15.
const TARGETS: [Target; 13] = [
    Target::at_least(
        "echo_jobs_per_server_cpu_s",
        2_000_000.0,
        "echo jobs per server CPU-second (issue 15; issue 2 asked 1,300,000)",
    ),
    Target::at_most(
        "recovery_queued_echo_p99_ms",
        1.0,
        "recovery p99 (echo queued before the abort)",
    ),
    Target::at_most(
        "recovery_echo_sent_after_abort_p99_ms",
        1.0,
        "recovery p99 (echo sent after the abort)",
    ),
    Target::at_most("idle_rss_per_call_bytes", 8192.0, "RSS per idle call"),
    Target::at_most("flood_peak_rss_mib", 16.0, "peak RSS under a flood"),
    Target::at_most(
        "churn_rss_delta_pct",
        10.0,
        "RSS growth after 10,000 aborted calls",
    ),
    Target::at_most(
        "churn_rss_after_vs_fresh_kib",
        2048.0,
        "RSS after 10,000 aborted calls within 2 MB of the fresh process (issue 15)",
    ),
    Target::at_most(
        "small_call_under_bulk_p99_ms",
        2.0,
        "small call's echo p99 while a bulk call keeps 1,000,000 sleeps queued (issue 15)",
    ),
    Target::at_most(
        "weights_7_max_share_deviation_pct",
        10.0,
        "principals' shares within 10 % of their weights, 7 workers (issue 11)",
    ),
    Target::at_most(
        "weights_70_max_share_deviation_pct",
        10.0,
        "principals' shares within 10 % of their weights, 70 workers (issue 11)",
    ),
    Target::at_most(
        "churn_inproc_leaked_tasks",
        0.0,
        "leaked tasks after 10,000 aborted calls",
    ),
    Target::at_most(
        "hostile_silent_held_after_30s_pct",
        0.0,
        "silent connections still held 30 s after they opened (84 % before)",
    ),
    Target::at_most(
        "hostile_silent_rss_per_conn_bytes",
        15_600.0,
        "RSS per connection that never completes HTTP/2 (15.6 KB before)",
    ),
];

fn main() {
    let scenarios = Scenarios::from_args(&SCENARIOS);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    procfs::print_machine();
    let started = Instant::now();
    if scenarios.run("echo") {
        rt.block_on(echo::run());
    }
    if scenarios.run("recovery") {
        rt.block_on(recovery::run());
    }
    if scenarios.run("idle") {
        rt.block_on(idle::run());
    }
    if scenarios.run("flood") {
        rt.block_on(flood::run());
    }
    if scenarios.run("churn") {
        rt.block_on(churn::run());
    }
    if scenarios.run("churn_inproc") {
        rt.block_on(churn_inproc::run());
    }
    if scenarios.run("conns") {
        rt.block_on(conns::run());
    }
    if scenarios.run("small_call") {
        rt.block_on(small_call::run());
    }
    if scenarios.run("hostile") {
        rt.block_on(hostile::run());
    }
    if scenarios.run("principals") {
        rt.block_on(principals::weights());
    }
    if scenarios.run("principals_cost") {
        rt.block_on(principals::cost());
    }
    println!("total_bench_time_s: {:.1}", started.elapsed().as_secs_f64());
    check_targets(&TARGETS);
}
