//! Benchmarks of exec handlers against the targets of issue 4.
//!
//! Runs `batchd::Server` on its own 2-thread tokio runtime inside this process (so the bench process
//! is the parent of every command, and their pids are found as its children in /proc), with a client
//! on a 1-thread runtime beside it.
//!
//! - `abort`: 20 times, a call starts 8 jobs running `sleep 60`; once the 8 processes run, the client
//!   drops the call. Measured from the drop until all 8 have exited (their pidfds turn readable), and
//!   until all 8 are reaped by batchd (gone from /proc). Target: p99 ≤ 2 ms.
//! - `spawn`: jobs running `true`, sent in batches by one call; jobs per second, wall clock.
//!
//! Run: `cargo bench --bench exec` (both), or `cargo bench --bench exec -- abort`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use batchd::config::{Config, ExecSpec};
use batchd::handlers::exec::{self, Reaper};
use batchd::proto::{self, batch_service_client::BatchServiceClient};
use batchd::Registry;
use bytes::Bytes;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::PidfdFlags;
use tonic::transport::Channel;

use support::client::{batch, connect, job, open_call, Call};
use support::inproc::InProc;
use support::procfs::{self, clk_tck, Stat};
use support::report::{check_targets, figure, latency_ms, Target};
use support::scenarios::Scenarios;
use support::stats::{percentile_rounded_index, P50_P99_MAX};

const SCENARIOS: [&str; 2] = ["abort", "spawn"];
const ABORT_REPS: usize = 20;
const ABORT_JOBS: usize = 8;
const SPAWN_WARMUP: usize = 200;
const SPAWN_JOBS: usize = 3000;
const SPAWN_BATCH: usize = 100;
const LIVENESS: Duration = Duration::from_secs(20);

/// The target of issue 4.
const TARGETS: [Target; 1] = [Target::at_most(
    "exec_abort_to_reaped_p99_ms",
    2.0,
    "abort -> all 8 children reaped, p99",
)];

fn main() {
    let scenarios = Scenarios::from_args(&SCENARIOS);
    procfs::print_machine();
    let config = Config {
        exec: vec![
            ExecSpec::new("sleeper", &["sleep", "60"]),
            ExecSpec::new("true", &["true"]),
        ],
        ..Config::default()
    };
    config.validate().unwrap();
    let mut registry = Registry::builtin();
    let reaper = exec::register(&mut registry, &config.exec).unwrap();
    let server_reaper = reaper.clone();
    // The reaper waits for the process groups of stopped jobs once the server has stopped.
    let server = InProc::start_then(config, registry, async move {
        server_reaper.shutdown().await;
    });
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = client_rt.block_on(connect(&server.url()));
    if scenarios.run("abort") {
        abort(&client_rt, &client, &reaper);
    }
    if scenarios.run("spawn") {
        spawn(&client_rt, &client);
    }
    drop(client);
    drop(server);
    check_targets(&TARGETS);
}

// === /proc ===

/// A process's identity: pid and start time (ticks since boot), so a reused pid is not mistaken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pid {
    pid: i32,
    start: u64,
}

/// Running children of this process whose command is `comm`.
fn children(comm: &str) -> Vec<Pid> {
    let me = i32::try_from(std::process::id()).unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter_map(|pid| {
            let stat = Stat::of(pid)?;
            (stat.ppid == me && stat.state != 'Z').then_some(Pid {
                pid,
                start: stat.start,
            })
        })
        .collect()
}

/// `p` is dead: a zombie, or gone.
fn dead(p: Pid) -> bool {
    Stat::of(p.pid).is_none_or(|s| s.start != p.start || s.state == 'Z')
}

/// `p` is reaped: gone from /proc.
fn reaped(p: Pid) -> bool {
    Stat::of(p.pid).is_none_or(|s| s.start != p.start)
}

/// A pidfd of `pid`: it turns readable when the process exits.
fn pidfd(pid: i32) -> OwnedFd {
    let pid = rustix::process::Pid::from_raw(pid).unwrap();
    rustix::process::pidfd_open(pid, PidfdFlags::empty()).unwrap()
}

/// Blocks until every process of `pidfds` has exited.
fn wait_exited(pidfds: &[OwnedFd]) {
    let mut pending: Vec<&OwnedFd> = pidfds.iter().collect();
    let timeout = Timespec {
        tv_sec: LIVENESS.as_secs() as i64,
        tv_nsec: 0,
    };
    while !pending.is_empty() {
        let mut fds: Vec<PollFd<'_>> = pending
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::IN))
            .collect();
        let n = rustix::event::poll(&mut fds, Some(&timeout)).unwrap();
        assert!(n > 0, "children still run after {LIVENESS:?}");
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        let mut i = 0;
        pending.retain(|_| {
            i += 1;
            !ready[i - 1]
        });
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIVENESS, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

// === scenarios ===

fn abort(rt: &tokio::runtime::Runtime, client: &BatchServiceClient<Channel>, reaper: &Reaper) {
    let mut to_dead = Vec::new();
    let mut to_reaped = Vec::new();
    for rep in 0..ABORT_REPS {
        wait_until("no sleep child is left from the last rep", || {
            children("sleep").is_empty() && reaper.live_groups() == 0
        });
        let call = rt.block_on(async {
            let call = open_call(client, 4).await;
            let jobs = (0..ABORT_JOBS)
                .map(|i| job(format!("s{i}"), "sleeper", Bytes::new(), &[]))
                .collect();
            call.tx.send(batch(format!("b{rep}"), jobs)).await.unwrap();
            call
        });
        let mut pids = Vec::new();
        wait_until("8 sleep children run", || {
            pids = children("sleep");
            pids.len() == ABORT_JOBS
        });

        // A pidfd turns readable when its process exits: death is seen without polling /proc (which
        // would take CPU from the very processes that are exiting).
        let pidfds: Vec<OwnedFd> = pids.iter().map(|p| pidfd(p.pid)).collect();
        assert!(pids.iter().all(|p| !dead(*p)), "a sleep exited early");

        let aborted = Instant::now();
        // Both halves: a client that keeps its sender does not reset the call. The response
        // stream first: its drop resets the call, the sender's alone would half-close it.
        let Call { tx, rx } = call;
        drop(rx);
        drop(tx);
        wait_exited(&pidfds);
        let all_dead = aborted.elapsed();
        while !pids.iter().all(|p| reaped(*p)) {
            assert!(aborted.elapsed() < LIVENESS, "children still there");
            std::thread::sleep(Duration::from_micros(20));
        }
        let gone = aborted.elapsed();
        to_dead.push(all_dead);
        to_reaped.push(gone);
    }
    to_dead.sort();
    to_reaped.sort();
    for (name, v) in [("dead", &to_dead), ("reaped", &to_reaped)] {
        latency_ms(
            &format!("exec_abort_to_{name}"),
            v,
            &P50_P99_MAX,
            percentile_rounded_index,
        );
    }
    reference();
}

/// The kernel's part alone: 8 `sleep 60` in their own groups, SIGTERM to each group straight from
/// this thread, until all 8 have exited. No gRPC, no engine.
fn reference() {
    use std::os::unix::process::CommandExt;
    let mut took = Vec::new();
    for _ in 0..ABORT_REPS {
        let mut kids: Vec<std::process::Child> = (0..ABORT_JOBS)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("60")
                    .process_group(0)
                    .spawn()
                    .unwrap()
            })
            .collect();
        let pidfds: Vec<OwnedFd> = kids.iter().map(|k| pidfd(k.id() as i32)).collect();
        let start = Instant::now();
        for k in &kids {
            let pid = rustix::process::Pid::from_child(k);
            rustix::process::kill_process_group(pid, rustix::process::Signal::TERM).unwrap();
        }
        wait_exited(&pidfds);
        took.push(start.elapsed());
        for k in &mut kids {
            k.wait().unwrap();
        }
    }
    took.sort();
    latency_ms(
        "reference_sigterm_to_dead",
        &took,
        &P50_P99_MAX[..2],
        percentile_rounded_index,
    );
}

fn spawn(rt: &tokio::runtime::Runtime, client: &BatchServiceClient<Channel>) {
    let run = |n: usize, tag: &str| -> Duration {
        rt.block_on(async {
            let Call { tx, mut rx } = open_call(client, 4).await;
            let started = Instant::now();
            let tag = tag.to_owned();
            let sender = tokio::spawn(async move {
                for b in 0..n.div_ceil(SPAWN_BATCH) {
                    let jobs = (b * SPAWN_BATCH..((b + 1) * SPAWN_BATCH).min(n))
                        .map(|i| job(format!("t{i}"), "true", Bytes::new(), &[]))
                        .collect();
                    tx.send(batch(format!("{tag}{b}"), jobs)).await.unwrap();
                }
            });
            let mut done = 0;
            while done < n {
                let msg = rx.message().await.unwrap().expect("results");
                for r in &msg.results {
                    assert_eq!(r.outcome, proto::Outcome::Ok as i32, "{r:?}");
                }
                done += msg.results.len();
            }
            let took = started.elapsed();
            sender.await.unwrap();
            took
        })
    };
    run(SPAWN_WARMUP, "w");
    // This process's threads are the in-process daemon and the client; its reaped children are
    // the commands.
    let before = Stat::of_self();
    let took = run(SPAWN_JOBS, "m");
    let after = Stat::of_self();
    let per_job_us = |ticks: u64| ticks as f64 * 1e6 / clk_tck() as f64 / SPAWN_JOBS as f64;
    figure("exec_spawn_true_jobs", SPAWN_JOBS);
    figure(
        "exec_spawn_true_jobs_per_s",
        format!("{:.0}", SPAWN_JOBS as f64 / took.as_secs_f64()),
    );
    figure(
        "exec_spawn_bench_process_cpu_us_per_job",
        format!("{:.0}", per_job_us(after.ticks() - before.ticks())),
    );
    figure(
        "exec_spawn_children_cpu_us_per_job",
        format!(
            "{:.0}",
            per_job_us(after.children_ticks() - before.children_ticks())
        ),
    );

    // Reference: `true` spawned and waited for by plain std::process, one thread per core.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let per_thread = SPAWN_JOBS / 4 / threads;
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..per_thread {
                    let status = std::process::Command::new("true")
                        .stdin(std::process::Stdio::null())
                        .status()
                        .unwrap();
                    assert!(status.success());
                }
            });
        }
    });
    figure(
        "reference_std_spawn_true_per_s",
        format!(
            "{:.0}",
            (per_thread * threads) as f64 / started.elapsed().as_secs_f64()
        ),
    );
}
