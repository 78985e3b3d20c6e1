//! Benchmarks of exec handlers (issues 4 and 13), in both isolation modes: a cgroup v2 per job
//! (`isolation = "auto"` where batchd can write cgroups, as here as root) and a process group only
//! (`isolation = "process-group"`).
//!
//! - `abort`: `batchd::Server` on its own 2-thread runtime in this process (so this process is the
//!   parent of every command, and, after `exec::start_up` as in batchd, the subreaper of their
//!   orphans), a client beside it. 20 times per case, a call starts 8 jobs whose
//!   command is a tree of two processes; once all 16 run, the client drops the call. Measured from
//!   the drop until all 16 have exited (their pidfds turn readable: "whole tree gone"), and until
//!   batchd has also reaped the 8 commands and (cgroup mode) removed their cgroups. Cases: the tree
//!   `sleep 600 & exec sleep 600` in each mode, and in cgroup mode a tree whose grandchild calls
//!   `setsid` (process-group mode never gets that one: it escapes). Reference: SIGTERM to 8
//!   single-process groups straight from this process, no daemon.
//! - `spawn`: the same in-process daemon; 3,000 jobs running `true`, sent in batches by one call;
//!   jobs per second, wall clock, and CPU per job. Reference: std's `Command::status` on every core.
//! - `batchctl`: the comparison: 3,000 `/bin/true` jobs, 8 at a time, through the release
//!   `batchctl` and `batchd` binaries (a handler with `concurrency = 8`), against `xargs -P8` and
//!   GNU `parallel -j8` on the same machine in the same run (interleaved rounds; `parallel` is
//!   installed with apt if missing). Ratios above 1 mean batchd is faster.
//!
//! Run: `cargo bench --bench exec` (all), or `cargo bench --bench exec -- abort` (one scenario).
//! The shared harness (`benches/support`) gives the daemon, the in-process server, the client,
//! /proc, percentiles and the figure lines. Percentiles here are `percentile_rounded_index`, as
//! since issue 4, so that BENCHMARKS.md's figures stay comparable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use batchd::config::{Config, ExecSpec};
use batchd::handlers::exec::{self, IsolationSetting, Reaper};
use batchd::proto::batch_service_client::BatchServiceClient;
use bytes::Bytes;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::PidfdFlags;
use tonic::transport::Channel;

use support::client::{batch, connect, is_ok, job, open_call, Call};
use support::daemon::{Daemon, LOG_FILTER};
use support::inproc::InProc;
use support::procfs::{self, ProcId, Stat};
use support::report::{check_targets, figure, latency_ms, Target};
use support::scenarios::Scenarios;
use support::stats::{percentile_rounded_index, P50_P99_MAX};

const SCENARIOS: [&str; 3] = ["abort", "spawn", "batchctl"];
const ABORT_REPS: usize = 20;
const ABORT_JOBS: usize = 8;
const SPAWN_WARMUP: usize = 200;
const SPAWN_JOBS: usize = 3000;
const SPAWN_BATCH: usize = 100;
/// `batchctl` scenario: jobs per run, at once, and interleaved rounds.
const CTL_JOBS: usize = 3000;
const CTL_PARALLEL: usize = 8;
const CTL_ROUNDS: usize = 3;
/// The longest any wait of this bench may take before it fails.
const LIVENESS: Duration = Duration::from_secs(20);

/// The tree of the `abort` cases: two processes in one process group.
const TREE: &str = "sleep 600 & exec sleep 600";
/// A tree whose grandchild leaves the group.
const ESCAPE: &str = "setsid sleep 600 & exec sleep 600";

/// The figures that have a target in issue 13.
const TARGETS: [Target; 1] = [Target::at_least(
    "ratio_batchd_cgroup_to_xargs",
    1.0,
    "batchd (cgroup mode) through batchctl at least as fast as xargs -P8",
)
.part("best")];

fn main() {
    let scenarios = Scenarios::from_args(&SCENARIOS);
    // Reads CLK_TCK (a child process, `getconf`) once, before anything reaps orphans here.
    procfs::print_machine();
    // Everything that waits for children of its own by pid (std::process) comes first: the
    // in-process daemon then becomes this process's subreaper, as batchd does, and reaps orphans.
    if scenarios.run("abort") {
        reference_abort();
    }
    if scenarios.run("spawn") {
        reference_spawn();
    }
    if scenarios.run("batchctl") {
        batchctl_vs_xargs();
    }
    if scenarios.run("abort") || scenarios.run("spawn") {
        in_process(scenarios.run("abort"), scenarios.run("spawn"));
    }
    check_targets(&TARGETS);
}

/// A spec in `mode`: process-group mode forced, or cgroup mode (`auto` here; checked below).
fn spec(name: &str, command: &[&str], cgroup: bool) -> ExecSpec {
    let mut s = ExecSpec::new(name, command);
    if !cgroup {
        s.isolation = IsolationSetting::ProcessGroup;
    }
    s
}

// === the in-process scenarios: abort and spawn ===

fn in_process(abort_cases: bool, spawn_cases: bool) {
    let config = Config {
        exec: vec![
            spec("tree_cg", &["sh", "-c", TREE], true),
            spec("tree_pg", &["sh", "-c", TREE], false),
            spec("escape_cg", &["sh", "-c", ESCAPE], true),
            spec("true_cg", &["true"], true),
            spec("true_pg", &["true"], false),
        ],
        ..Config::default()
    };
    let (server, reaper) = InProc::start_exec(config);
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = client_rt.block_on(connect(&server.url()));
    // Decided when the handlers were registered (the first `auto` handler looks for cgroups).
    let mode = exec::isolation().map_or("none", |m| m.as_str());
    figure("exec_isolation_auto", mode);
    assert_eq!(
        mode, "cgroup",
        "this bench measures cgroup mode: run it as root where a cgroup v2 mount is writable"
    );
    if abort_cases {
        for (handler, label) in [
            ("tree_cg", "cgroup"),
            ("tree_pg", "process_group"),
            ("escape_cg", "cgroup_setsid"),
        ] {
            abort(&client_rt, &client, &reaper, handler, label);
        }
        figure(
            "exec_abort_process_group_setsid",
            "never (the grandchild escapes the group)",
        );
    }
    if spawn_cases {
        for (handler, label) in [("true_cg", "cgroup"), ("true_pg", "process_group")] {
            spawn(&client_rt, &client, handler, label);
        }
    }
    drop(client);
    drop(server);
}

// === processes and their exits ===

/// Running `sleep` processes whose parent is one of `parents`.
fn sleeps_of(parents: &[i32]) -> Vec<ProcId> {
    procfs::pids()
        .into_iter()
        .filter(|&pid| procfs::comm(pid).is_some_and(|c| c == "sleep"))
        .filter_map(|pid| {
            let s = Stat::of(pid)?;
            (parents.contains(&s.ppid) && s.state != 'Z').then_some(ProcId {
                pid,
                start: s.start,
            })
        })
        .collect()
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
        assert!(n > 0, "processes still run after {LIVENESS:?}");
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        let mut i = 0;
        pending.retain(|_| {
            i += 1;
            !ready[i - 1]
        });
    }
}

/// Polls `cond` every `every` until it holds; panics after [`LIVENESS`].
fn wait_until(what: &str, every: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < LIVENESS, "timed out waiting until {what}");
        std::thread::sleep(every);
    }
}

// === abort ===

/// p50 and p99, for the reference figures.
const P50_P99: [(&str, f64); 2] = [("p50", 50.0), ("p99", 99.0)];

/// Aborts 8 running trees of `handler` 20 times; prints the figures as `exec_abort_<label>_…`.
fn abort(
    rt: &tokio::runtime::Runtime,
    client: &BatchServiceClient<Channel>,
    reaper: &Reaper,
    handler: &str,
    label: &str,
) {
    let me = i32::try_from(std::process::id()).unwrap();
    let mut to_dead = Vec::new();
    let mut to_reaped = Vec::new();
    for rep in 0..ABORT_REPS {
        wait_until(
            "nothing is left from the last rep",
            Duration::from_micros(200),
            || sleeps_of(&[me]).is_empty() && reaper.live_groups() == 0,
        );
        let call = rt.block_on(async {
            let call = open_call(client, 4).await;
            let jobs = (0..ABORT_JOBS)
                .map(|i| job(format!("s{i}"), handler, Bytes::new(), &[]))
                .collect();
            call.tx.send(batch(format!("b{rep}"), jobs)).await.unwrap();
            call
        });
        let mut leaders = Vec::new();
        let mut grandchildren = Vec::new();
        wait_until(
            "8 trees of 2 processes run",
            Duration::from_micros(200),
            || {
                leaders = sleeps_of(&[me]);
                let pids: Vec<i32> = leaders.iter().map(|p| p.pid).collect();
                grandchildren = sleeps_of(&pids);
                leaders.len() == ABORT_JOBS && grandchildren.len() == ABORT_JOBS
            },
        );
        // A pidfd turns readable when its process exits: death is seen without polling /proc (which
        // would take CPU from the very processes that are exiting).
        let all: Vec<ProcId> = leaders.iter().chain(&grandchildren).copied().collect();
        let pidfds: Vec<OwnedFd> = all.iter().map(|p| pidfd(p.pid)).collect();
        assert!(all.iter().all(|p| !p.exited()), "a sleep exited early");

        let aborted = Instant::now();
        // Both halves: a client that keeps its sender does not reset the call.
        drop(call);
        wait_exited(&pidfds);
        let all_dead = aborted.elapsed();
        wait_until(
            "batchd reaped the commands and its kill tasks are done",
            Duration::from_micros(20),
            || leaders.iter().all(|p| p.reaped()) && reaper.live_groups() == 0,
        );
        to_dead.push(all_dead);
        to_reaped.push(aborted.elapsed());
    }
    to_dead.sort();
    to_reaped.sort();
    for (name, v) in [("tree_gone", &to_dead), ("reaped", &to_reaped)] {
        latency_ms(
            &format!("exec_abort_{label}_{name}"),
            v,
            &P50_P99_MAX,
            percentile_rounded_index,
        );
    }
}

/// The kernel's part alone: 8 `sleep 60` in their own groups, SIGTERM to each group straight from
/// this thread, until all 8 have exited. No gRPC, no engine.
fn reference_abort() {
    use std::os::unix::process::CommandExt;
    let mut took = Vec::new();
    for _ in 0..ABORT_REPS {
        let mut kids: Vec<std::process::Child> = (0..ABORT_JOBS)
            .map(|_| {
                Command::new("sleep")
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
        &P50_P99,
        percentile_rounded_index,
    );
}

// === spawn, in process ===

/// 3,000 `true` jobs of `handler` on one call (after a warm-up); prints `exec_spawn_<label>_…`.
fn spawn(
    rt: &tokio::runtime::Runtime,
    client: &BatchServiceClient<Channel>,
    handler: &str,
    label: &str,
) {
    let run = |n: usize, tag: &str| -> Duration {
        rt.block_on(async {
            let Call { tx, mut rx } = open_call(client, 4).await;
            let started = Instant::now();
            let tag = tag.to_owned();
            let handler = handler.to_owned();
            let sender = tokio::spawn(async move {
                for b in 0..n.div_ceil(SPAWN_BATCH) {
                    let jobs = (b * SPAWN_BATCH..((b + 1) * SPAWN_BATCH).min(n))
                        .map(|i| job(format!("t{i}"), &handler, Bytes::new(), &[]))
                        .collect();
                    tx.send(batch(format!("{tag}{b}"), jobs)).await.unwrap();
                }
            });
            let mut done = 0;
            while done < n {
                let msg = rx.message().await.unwrap().expect("results");
                for r in &msg.results {
                    assert!(is_ok(r), "{r:?}");
                }
                done += msg.results.len();
            }
            let took = started.elapsed();
            sender.await.unwrap();
            took
        })
    };
    run(SPAWN_WARMUP, "w");
    let before = Stat::of_self();
    let took = run(SPAWN_JOBS, "m");
    let after = Stat::of_self();
    let per_job_us = |ticks: u64| ticks as f64 * 1e6 / procfs::clk_tck() as f64 / SPAWN_JOBS as f64;
    figure(
        &format!("exec_spawn_{label}_true_jobs_per_s"),
        format!("{:.0}", SPAWN_JOBS as f64 / took.as_secs_f64()),
    );
    // This process's threads: the in-process daemon and the client.
    figure(
        &format!("exec_spawn_{label}_bench_process_cpu_us_per_job"),
        format!("{:.0}", per_job_us(after.ticks() - before.ticks())),
    );
    // The commands, reaped by the daemon.
    figure(
        &format!("exec_spawn_{label}_children_cpu_us_per_job"),
        format!(
            "{:.0}",
            per_job_us(after.children_ticks() - before.children_ticks())
        ),
    );
}

/// Reference: `true` spawned and waited for by plain std::process, one thread per core.
fn reference_spawn() {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let per_thread = SPAWN_JOBS / 4 / threads;
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..per_thread {
                    let status = Command::new("true").stdin(Stdio::null()).status().unwrap();
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

// === batchctl against xargs -P8 and parallel -j8 (issue 13) ===

/// 3,000 `/bin/true` jobs, 8 at a time: batchd through batchctl in both modes, `xargs -P8` and
/// `parallel -j8`, in interleaved rounds; prints each tool's best and median wall time and the
/// ratios of batchd's rate to the others'.
fn batchctl_vs_xargs() {
    ensure_parallel();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("batchd.toml");
    std::fs::write(
        &config,
        format!(
            "[[exec]]\nname = \"true_cg\"\ncommand = [\"/bin/true\"]\nconcurrency = {CTL_PARALLEL}\n\n\
             [[exec]]\nname = \"true_pg\"\ncommand = [\"/bin/true\"]\nconcurrency = {CTL_PARALLEL}\n\
             isolation = \"process-group\"\n"
        ),
    )
    .unwrap();
    let inputs = dir.path().join("inputs");
    let lines: String = (0..CTL_JOBS).map(|i| format!("{i}\n")).collect();
    std::fs::write(&inputs, &lines).unwrap();
    let job_file = |handler: &str| {
        let path = dir.path().join(format!("{handler}.jsonl"));
        let jobs: String = (0..CTL_JOBS)
            .map(|i| format!("{{\"id\":\"{i}\",\"handler\":\"{handler}\"}}\n"))
            .collect();
        std::fs::write(&path, jobs).unwrap();
        path
    };
    let cg_jobs = job_file("true_cg");
    let pg_jobs = job_file("true_pg");
    // The exec module's start-up lines say which isolation is in force.
    let log = format!("{LOG_FILTER},batchd::handlers::exec=info");
    let config = config.to_str().unwrap();
    let daemon = Daemon::spawn_with(&["--config", config, "--set", &log], |cmd| {
        cmd.env_remove("BATCHD_CONFIG");
    });
    let url = daemon.url();
    let log = daemon.log_text();
    assert!(
        log.contains("exec isolation: a cgroup per job"),
        "the daemon should run jobs in cgroups here:\n{log}"
    );
    // Warm-up: page cache, the daemon's allocator, the first connection.
    batchctl(&url, &cg_jobs, CTL_JOBS);

    let tools = ["xargs", "parallel", "batchd_cgroup", "batchd_process_group"];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); tools.len()];
    let mut daemon_cpu: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..CTL_ROUNDS {
        let jobs = CTL_PARALLEL.to_string();
        times[0].push(timed(
            Command::new("xargs")
                .args(["-P", &jobs, "-n", "1", "/bin/true"])
                .stdin(std::fs::File::open(&inputs).unwrap()),
        ));
        times[1].push(timed(
            Command::new("parallel")
                .args(["-j", &jobs, "/bin/true"])
                .stdin(std::fs::File::open(&inputs).unwrap()),
        ));
        for (i, file) in [&cg_jobs, &pg_jobs].into_iter().enumerate() {
            let before = daemon.cpu();
            times[2 + i].push(batchctl(&url, file, CTL_JOBS));
            // utime + stime of /proc/PID/stat: the daemon's own CPU, its commands' excluded.
            let (_, used) = daemon.cpu().since(before);
            daemon_cpu[i].push(used * 1e6 / CTL_JOBS as f64);
        }
        println!(
            "round {round}: {} (load {})",
            tools
                .iter()
                .zip(&times)
                .map(|(t, v)| format!("{t} {:.2} s", v[round].as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", "),
            procfs::load_average()
        );
    }
    drop(daemon);

    let best: Vec<Duration> = times.iter().map(|v| *v.iter().min().unwrap()).collect();
    let median: Vec<Duration> = times
        .iter()
        .map(|v| {
            let mut v = v.clone();
            v.sort();
            v[v.len() / 2]
        })
        .collect();
    for (i, tool) in tools.iter().enumerate() {
        figure(
            &format!("spawn_{tool}_{CTL_JOBS}_true_best_s"),
            format!(
                "{:.2} ({:.0} jobs/s), median {:.2} s",
                best[i].as_secs_f64(),
                CTL_JOBS as f64 / best[i].as_secs_f64(),
                median[i].as_secs_f64()
            ),
        );
    }
    for (i, mode) in ["cgroup", "process_group"].iter().enumerate() {
        let mut cpu = daemon_cpu[i].clone();
        cpu.sort_by(f64::total_cmp);
        figure(
            &format!("batchd_{mode}_daemon_cpu_us_per_job_median"),
            format!("{:.0}", cpu[cpu.len() / 2]),
        );
        for (other, j) in [("xargs", 0), ("parallel", 1)] {
            // Rate ratio: the other's time over batchd's (above 1: batchd is faster).
            figure(
                &format!("ratio_batchd_{mode}_to_{other}"),
                format!(
                    "best {:.2}, median {:.2}",
                    best[j].as_secs_f64() / best[2 + i].as_secs_f64(),
                    median[j].as_secs_f64() / median[2 + i].as_secs_f64()
                ),
            );
        }
    }
}

/// Installs GNU parallel with apt when it is missing; panics if that fails.
fn ensure_parallel() {
    let present = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if present("parallel") {
        return;
    }
    println!("GNU parallel is missing: installing it with apt-get");
    for args in [
        &["update", "-q"][..],
        &["install", "-y", "-q", "parallel"][..],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .expect("apt-get");
        assert!(status.success(), "apt-get {args:?} failed");
    }
    assert!(
        present("parallel"),
        "parallel is still missing after apt-get"
    );
}

/// Wall time of `cmd` (stdout and stderr discarded); panics unless it succeeds.
fn timed(cmd: &mut Command) -> Duration {
    let start = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{cmd:?} failed");
    start.elapsed()
}

/// Runs the release `batchctl` on `file` (`n` jobs); checks that every job ended ok.
fn batchctl(url: &str, file: &Path, n: usize) -> Duration {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_batchctl"))
        .args(["run", "--endpoint", url, "-q", "-o", "/dev/null"])
        .arg(file)
        .env_remove("BATCHD_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "batchctl failed: {stderr}");
    let want = format!("batchctl: {n} jobs in");
    let summary = stderr.lines().find(|l| l.starts_with(&want));
    assert!(
        summary.is_some_and(|l| l.ends_with(&format!(": {n} ok"))),
        "every job ends ok: {stderr}"
    );
    took
}
