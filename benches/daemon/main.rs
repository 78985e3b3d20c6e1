//! Benchmarks of the batchd daemon against the targets of issue 2 (see BENCHMARKS.md).
//!
//! Every scenario but `churn_inproc` spawns the release build of the real daemon
//! (`CARGO_BIN_EXE_batchd`) in its own process and measures it from the outside through /proc:
//! CPU time from `/proc/PID/task/*/schedstat` (ns) and `/proc/PID/stat` (ticks), RSS and threads
//! from `/proc/PID/status`. `churn_inproc` runs `batchd::Server` on its own tokio runtime inside
//! this process, to read the engine's counters and the runtime's live task count.
//!
//! Run all: `cargo bench --bench daemon`; one or more: `cargo bench --bench daemon -- recovery flood`.
//! Scenarios: echo, recovery, idle, flood, churn, churn_inproc, hostile (issue 11), one module each. Each prints
//! `name: value` lines and the run ends with a check of every figure that has a target in the issue.
//!
//! Knobs (environment): `IDLE_CALLS` (default 10000), `FLOOD_CALLS` (default 4), `CHURN_ROUNDS`
//! (default 2), and
//! `BATCHD_BENCH_BIN`, a program run instead of the daemon: another build, or a wrapper script
//! that `exec`s it under a profiler (e.g. heaptrack's preload library).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod churn;
mod churn_inproc;
mod echo;
mod flood;
mod hostile;
mod idle;
mod recovery;

use std::time::Instant;

use support::procfs;
use support::report::{check_targets, Target};
use support::scenarios::Scenarios;

const SCENARIOS: [&str; 7] = [
    "echo",
    "recovery",
    "idle",
    "flood",
    "churn",
    "churn_inproc",
    "hostile",
];

/// The figures that have a target in issue 2 (and issue 11: what it measured before).
const TARGETS: [Target; 9] = [
    Target::at_least(
        "echo_jobs_per_server_cpu_s",
        1_300_000.0,
        "echo jobs per server CPU-second",
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
    if scenarios.run("hostile") {
        rt.block_on(hostile::run());
    }
    println!("total_bench_time_s: {:.1}", started.elapsed().as_secs_f64());
    check_targets(&TARGETS);
}
