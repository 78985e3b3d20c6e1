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
//!   `setsid` (process-group mode never gets that one: it escapes).
//! - `spawn`: the same in-process daemon; 3,000 jobs running `true`, sent in batches by one call;
//!   jobs per second, wall clock, and CPU per job.
//! - `batchctl`: the comparison: 3,000 `/bin/true` jobs, 8 at a time, through the release
//!   `batchctl` and `batchd` binaries (a handler with `concurrency = 8`), against `xargs -P8` and
//!   GNU `parallel -j8` on the same machine in the same run (interleaved rounds; `parallel` is
//!   installed with apt if missing). Ratios above 1 mean batchd is faster.
//!
//! Run: `cargo bench --bench exec` (all), or `cargo bench --bench exec -- abort` (one scenario).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use batchd::config::{Config, ExecSpec};
use batchd::handlers::exec::{self, IsolationSetting, Reaper};
use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, process_request::Kind};
use batchd::{Registry, Server};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::PidfdFlags;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

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
const LIVENESS: Duration = Duration::from_secs(20);

/// The tree of the `abort` cases: two processes in one process group.
const TREE: &str = "sleep 600 & exec sleep 600";
/// A tree whose grandchild leaves the group.
const ESCAPE: &str = "setsid sleep 600 & exec sleep 600";

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
        load_average()
    );
    // Everything that waits for children of its own by pid (std::process) comes first: the
    // in-process daemon then becomes this process's subreaper, as batchd does, and reaps orphans.
    clk_tck();
    if run("abort") {
        reference();
    }
    if run("spawn") {
        spawn_reference();
    }
    if run("batchctl") {
        batchctl_vs_xargs();
    }
    if run("abort") || run("spawn") {
        in_process(run("abort"), run("spawn"));
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
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
    let server = InProc::start(vec![
        spec("tree_cg", &["sh", "-c", TREE], true),
        spec("tree_pg", &["sh", "-c", TREE], false),
        spec("escape_cg", &["sh", "-c", ESCAPE], true),
        spec("true_cg", &["true"], true),
        spec("true_pg", &["true"], false),
    ]);
    let mode = exec::isolation().map_or("none", |m| m.as_str());
    println!("exec_isolation_auto: {mode}");
    assert_eq!(
        mode, "cgroup",
        "this bench measures cgroup mode: run it as root where a cgroup v2 mount is writable"
    );
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
    if abort_cases {
        for (handler, label) in [
            ("tree_cg", "cgroup"),
            ("tree_pg", "process_group"),
            ("escape_cg", "cgroup_setsid"),
        ] {
            abort(&client_rt, &client, &server.reaper, handler, label);
        }
        println!("exec_abort_process_group_setsid: never (the grandchild escapes the group)");
    }
    if spawn_cases {
        for (handler, label) in [("true_cg", "cgroup"), ("true_pg", "process_group")] {
            spawn(&client_rt, &client, handler, label);
        }
    }
    drop(client);
    server.stop();
}

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
                // As batchd does: the subreaper of the commands' orphans, which it reaps.
                exec::start_up(&server_reaper);
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

/// Running `sleep` processes whose parent is one of `parents`.
fn sleeps_of(parents: &[i32]) -> Vec<Pid> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
        .filter_map(|pid| {
            let (state, ppid, start) = stat(pid)?;
            (parents.contains(&ppid) && state != 'Z').then_some(Pid { pid, start })
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
        assert!(n > 0, "processes still run after {LIVENESS:?}");
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

// === abort ===

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
        wait_until("nothing is left from the last rep", || {
            sleeps_of(&[me]).is_empty() && reaper.live_groups() == 0
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
                .map(|i| job(format!("s{i}"), handler))
                .collect();
            tx.send(batch(format!("b{rep}"), jobs)).await.unwrap();
            (tx, call)
        });
        let mut leaders = Vec::new();
        let mut grandchildren = Vec::new();
        wait_until("8 trees of 2 processes run", || {
            leaders = sleeps_of(&[me]);
            let pids: Vec<i32> = leaders.iter().map(|p| p.pid).collect();
            grandchildren = sleeps_of(&pids);
            leaders.len() == ABORT_JOBS && grandchildren.len() == ABORT_JOBS
        });
        // A pidfd turns readable when its process exits: death is seen without polling /proc (which
        // would take CPU from the very processes that are exiting).
        let all: Vec<Pid> = leaders.iter().chain(&grandchildren).copied().collect();
        let pidfds: Vec<OwnedFd> = all.iter().map(|p| pidfd(p.pid)).collect();
        assert!(all.iter().all(|p| !dead(*p)), "a sleep exited early");

        let aborted = Instant::now();
        // Both halves: a client that keeps its sender does not reset the call.
        drop(call);
        drop(tx);
        wait_exited(&pidfds);
        let all_dead = aborted.elapsed();
        while !(leaders.iter().all(|p| reaped(*p)) && reaper.live_groups() == 0) {
            assert!(aborted.elapsed() < LIVENESS, "commands still there");
            std::thread::sleep(Duration::from_micros(20));
        }
        to_dead.push(all_dead);
        to_reaped.push(aborted.elapsed());
    }
    to_dead.sort();
    to_reaped.sort();
    for (name, v) in [("tree_gone", &to_dead), ("reaped", &to_reaped)] {
        let p = |q| ms(percentile(v, q));
        println!("exec_abort_{label}_{name}_p50_ms: {:.3}", p(0.5));
        println!("exec_abort_{label}_{name}_p99_ms: {:.3}", p(0.99));
        println!(
            "exec_abort_{label}_{name}_max_ms: {:.3}",
            ms(*v.last().unwrap())
        );
    }
}

/// The kernel's part alone: 8 `sleep 60` in their own groups, SIGTERM to each group straight from
/// this thread, until all 8 have exited. No gRPC, no engine.
fn reference() {
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
    println!(
        "reference_sigterm_to_dead_p50_ms: {:.3}",
        ms(percentile(&took, 0.5))
    );
    println!(
        "reference_sigterm_to_dead_p99_ms: {:.3}",
        ms(percentile(&took, 0.99))
    );
}

// === spawn, in process ===

fn spawn(
    rt: &tokio::runtime::Runtime,
    client: &BatchServiceClient<Channel>,
    handler: &str,
    label: &str,
) {
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
            let handler = handler.to_owned();
            let sender = tokio::spawn(async move {
                for b in 0..n.div_ceil(SPAWN_BATCH) {
                    let jobs = (b * SPAWN_BATCH..((b + 1) * SPAWN_BATCH).min(n))
                        .map(|i| job(format!("t{i}"), &handler))
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
    println!(
        "exec_spawn_{label}_true_jobs_per_s: {:.0}",
        SPAWN_JOBS as f64 / took.as_secs_f64()
    );
    println!(
        "exec_spawn_{label}_bench_process_cpu_us_per_job: {:.0}",
        per_job_us(after.0 - before.0)
    );
    println!(
        "exec_spawn_{label}_children_cpu_us_per_job: {:.0}",
        per_job_us(after.1 - before.1)
    );
}

/// Reference: `true` spawned and waited for by plain std::process, one thread per core.
fn spawn_reference() {
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

/// Clock ticks per second (asked once, before the daemon reaps orphans in this process).
fn clk_tck() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100)
    })
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
    let daemon = Daemon::start(dir.path(), &config);
    let log = std::fs::read_to_string(dir.path().join("batchd.log")).unwrap_or_default();
    assert!(
        log.contains("exec isolation: a cgroup per job"),
        "the daemon should run jobs in cgroups here:\n{log}"
    );
    // Warm-up: page cache, the daemon's allocator, the first connection.
    batchctl(&daemon.url, &cg_jobs, CTL_JOBS);

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
            let before = process_cpu_s(daemon.child.id());
            times[2 + i].push(batchctl(&daemon.url, file, CTL_JOBS));
            let used = process_cpu_s(daemon.child.id()) - before;
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
            load_average()
        );
    }
    daemon.stop();

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
        println!(
            "spawn_{tool}_3000_true_best_s: {:.2} ({:.0} jobs/s), median {:.2} s",
            best[i].as_secs_f64(),
            CTL_JOBS as f64 / best[i].as_secs_f64(),
            median[i].as_secs_f64()
        );
    }
    for (i, mode) in ["cgroup", "process_group"].iter().enumerate() {
        let mut cpu = daemon_cpu[i].clone();
        cpu.sort_by(f64::total_cmp);
        println!(
            "batchd_{mode}_daemon_cpu_us_per_job_median: {:.0}",
            cpu[cpu.len() / 2]
        );
        for (other, j) in [("xargs", 0), ("parallel", 1)] {
            // Rate ratio: the other's time over batchd's (above 1: batchd is faster).
            println!(
                "ratio_batchd_{mode}_to_{other}: best {:.2}, median {:.2}",
                best[j].as_secs_f64() / best[2 + i].as_secs_f64(),
                median[j].as_secs_f64() / median[2 + i].as_secs_f64()
            );
        }
    }
    let ratio = best[0].as_secs_f64() / best[2].as_secs_f64();
    println!(
        "target_check: batchd (cgroup mode) through batchctl at least as fast as xargs -P8: {} \
         (best {ratio:.2})",
        if ratio >= 1.0 { "met" } else { "NOT MET" }
    );
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

/// User + system CPU seconds of process `pid` so far.
fn process_cpu_s(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<u64> = text[text.rfind(')').unwrap() + 2..]
        .split(' ')
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    (f[0] + f[1]) as f64 / clk_tck() as f64
}

/// The release `batchd` with `config` on a free port; killed if the bench panics.
struct Daemon {
    child: Child,
    url: String,
}

impl Daemon {
    fn start(dir: &Path, config: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = dir.join("batchd.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_batchd"))
            .arg("--config")
            .arg(config)
            .args(["--listen", &addr.to_string()])
            .args(["--admin-listen", "127.0.0.1:0"])
            .env_remove("BATCHD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while start.elapsed() < LIVENESS {
            assert!(
                child.try_wait().unwrap().is_none(),
                "batchd exited: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            if std::net::TcpStream::connect(addr).is_ok() {
                return Self {
                    child,
                    url: format!("http://{addr}"),
                };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("batchd did not serve on {addr}");
    }

    /// SIGTERM, and wait for the exit.
    fn stop(mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
