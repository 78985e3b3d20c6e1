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

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use batchd::config::{Config, ExecSpec};
use batchd::handlers::exec::{self, Reaper};
use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, process_request::Kind};
use batchd::{Registry, Server};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::PidfdFlags;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const SCENARIOS: [&str; 2] = ["abort", "spawn"];
const ABORT_REPS: usize = 20;
const ABORT_JOBS: usize = 8;
const SPAWN_WARMUP: usize = 200;
const SPAWN_JOBS: usize = 3000;
const SPAWN_BATCH: usize = 100;
const LIVENESS: Duration = Duration::from_secs(20);

fn main() {
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for c in &chosen {
        assert!(
            SCENARIOS.contains(&c.as_str()),
            "unknown scenario {c:?}; known: {SCENARIOS:?}"
        );
    }
    let run = |name: &str| chosen.is_empty() || chosen.iter().any(|c| c == name);
    println!(
        "machine: {} cores, load average {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let server = InProc::start(vec![
        ExecSpec::new("sleeper", &["sleep", "60"]),
        ExecSpec::new("true", &["true"]),
    ]);
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = client_rt.block_on(async {
        BatchServiceClient::connect(format!("http://{}", server.addr))
            .await
            .unwrap()
    });
    if run("abort") {
        abort(&client_rt, &client, &server.reaper);
    }
    if run("spawn") {
        spawn(&client_rt, &client);
    }
    drop(client);
    server.stop();
}

// === the daemon, in process ===

struct InProc {
    addr: SocketAddr,
    reaper: Reaper,
    shutdown: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl InProc {
    fn start(specs: Vec<ExecSpec>) -> Self {
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            exec: specs,
            ..Config::default()
        };
        config.validate().unwrap();
        let mut registry = Registry::builtin();
        let reaper = exec::register(&mut registry, &config.exec).unwrap();
        let listener = std::net::TcpListener::bind(config.listen).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let server_reaper = reaper.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                Server::new(config, registry)
                    .serve(listener, stop.cancelled_owned())
                    .await
                    .unwrap();
                server_reaper.shutdown().await;
            });
        });
        Self {
            addr,
            reaper,
            shutdown,
            thread,
        }
    }

    fn stop(self) {
        self.shutdown.cancel();
        self.thread.join().unwrap();
    }
}

// === /proc ===

/// A process's identity: pid and start time (ticks since boot), so a reused pid is not mistaken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pid {
    pid: i32,
    start: u64,
}

/// State, parent and start time of `pid`, from /proc/PID/stat.
fn stat(pid: i32) -> Option<(char, i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some((
        f[0].chars().next()?,
        f[1].parse().ok()?,
        f[19].parse().ok()?,
    ))
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
            let (state, ppid, start) = stat(pid)?;
            (ppid == me && state != 'Z').then_some(Pid { pid, start })
        })
        .collect()
}

/// `p` is dead: a zombie, or gone.
fn dead(p: Pid) -> bool {
    stat(p.pid).is_none_or(|(state, _, start)| start != p.start || state == 'Z')
}

/// `p` is reaped: gone from /proc.
fn reaped(p: Pid) -> bool {
    stat(p.pid).is_none_or(|(_, _, start)| start != p.start)
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

fn job(id: String, handler: &str) -> proto::Job {
    proto::Job {
        id,
        handler: handler.into(),
        payload: Default::default(),
        params: Default::default(),
        timeout: None,
    }
}

fn batch(batch_id: String, jobs: Vec<proto::Job>) -> proto::ProcessRequest {
    proto::ProcessRequest {
        kind: Some(Kind::Batch(proto::JobBatch { batch_id, jobs })),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn abort(rt: &tokio::runtime::Runtime, client: &BatchServiceClient<Channel>, reaper: &Reaper) {
    let mut to_dead = Vec::new();
    let mut to_reaped = Vec::new();
    for rep in 0..ABORT_REPS {
        wait_until("no sleep child is left from the last rep", || {
            children("sleep").is_empty() && reaper.live_groups() == 0
        });
        let (tx, call) = rt.block_on(async {
            let (tx, rx) = mpsc::channel(4);
            let call = client
                .clone()
                .process(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let jobs = (0..ABORT_JOBS)
                .map(|i| job(format!("s{i}"), "sleeper"))
                .collect();
            tx.send(batch(format!("b{rep}"), jobs)).await.unwrap();
            (tx, call)
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
        // Both halves: a client that keeps its sender does not reset the call.
        drop(call);
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
        println!("exec_abort_to_{name}_p50_ms: {:.3}", ms(percentile(v, 0.5)));
        println!(
            "exec_abort_to_{name}_p99_ms: {:.3}",
            ms(percentile(v, 0.99))
        );
        println!("exec_abort_to_{name}_max_ms: {:.3}", ms(*v.last().unwrap()));
    }
    reference();
    let p99 = ms(percentile(&to_reaped, 0.99));
    println!(
        "target_check: exec_abort_to_reaped_p99_ms {p99:.3} <= 2.0: {}",
        if p99 <= 2.0 { "met" } else { "NOT MET" }
    );
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
    println!(
        "reference_sigterm_to_dead_p50_ms: {:.3}",
        ms(percentile(&took, 0.5))
    );
    println!(
        "reference_sigterm_to_dead_p99_ms: {:.3}",
        ms(percentile(&took, 0.99))
    );
}

fn spawn(rt: &tokio::runtime::Runtime, client: &BatchServiceClient<Channel>) {
    let run = |n: usize, tag: &str| -> Duration {
        rt.block_on(async {
            let (tx, rx) = mpsc::channel(4);
            let mut call = client
                .clone()
                .process(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let started = Instant::now();
            let tag = tag.to_owned();
            let sender = tokio::spawn(async move {
                for b in 0..n.div_ceil(SPAWN_BATCH) {
                    let jobs = (b * SPAWN_BATCH..((b + 1) * SPAWN_BATCH).min(n))
                        .map(|i| job(format!("t{i}"), "true"))
                        .collect();
                    tx.send(batch(format!("{tag}{b}"), jobs)).await.unwrap();
                }
            });
            let mut done = 0;
            while done < n {
                let msg = call.message().await.unwrap().expect("results");
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
    let before = cpu_ticks();
    let took = run(SPAWN_JOBS, "m");
    let after = cpu_ticks();
    let per_job_us = |ticks: u64| ticks as f64 * 1e6 / clk_tck() as f64 / SPAWN_JOBS as f64;
    println!("exec_spawn_true_jobs: {SPAWN_JOBS}");
    println!(
        "exec_spawn_true_jobs_per_s: {:.0}",
        SPAWN_JOBS as f64 / took.as_secs_f64()
    );
    println!(
        "exec_spawn_bench_process_cpu_us_per_job: {:.0}",
        per_job_us(after.0 - before.0)
    );
    println!(
        "exec_spawn_children_cpu_us_per_job: {:.0}",
        per_job_us(after.1 - before.1)
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
    println!(
        "reference_std_spawn_true_per_s: {:.0}",
        (per_thread * threads) as f64 / started.elapsed().as_secs_f64()
    );
}

/// CPU ticks used by this process (its threads: the in-process daemon and the client) and by its
/// reaped children, from /proc/self/stat.
fn cpu_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<u64> = text[text.rfind(')').unwrap() + 2..]
        .split(' ')
        .skip(11)
        .take(4)
        .map(|v| v.parse().unwrap())
        .collect();
    (f[0] + f[1], f[2] + f[3])
}

fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}
