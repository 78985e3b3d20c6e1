//! Benchmarks of the batchd daemon against the targets of issue 2 (see BENCHMARKS.md).
//!
//! Every scenario but `churn_inproc` spawns the release build of the real daemon
//! (`CARGO_BIN_EXE_batchd`) in its own process and measures it from the outside through /proc:
//! CPU time from `/proc/PID/task/*/schedstat` (ns) and `/proc/PID/stat` (ticks), RSS and threads
//! from `/proc/PID/status`. `churn_inproc` runs `batchd::Server` on its own tokio runtime inside
//! this process, to read the engine's counters and the runtime's live task count.
//!
//! Run all: `cargo bench --bench daemon`; one or more: `cargo bench --bench daemon -- recovery flood`.
//! Scenarios: echo, recovery, idle, flood, churn, churn_inproc. Each prints `name: value` lines and
//! the run ends with a check of every figure that has a target in the issue.
//!
//! Knobs (environment): `IDLE_CALLS` (default 10000), `FLOOD_CALLS` (default 4), `CHURN_ROUNDS`
//! (default 2), and
//! `BATCHD_BENCH_BIN`, a program run instead of the daemon: another build, or a wrapper script
//! that `exec`s it under a profiler (e.g. heaptrack's preload library).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchd::config::Config;
use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, process_request::Kind};
use batchd::{Registry, Server};
use bytes::Bytes;
use futures_util::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

const SCENARIOS: [&str; 6] = ["echo", "recovery", "idle", "flood", "churn", "churn_inproc"];

/// Echo: concurrent calls, jobs per batch, payload bytes, warm-up and measured time.
const ECHO_CALLS: usize = 4;
const ECHO_BATCH: usize = 100;
const ECHO_PAYLOAD: usize = 64;
const ECHO_WARMUP: Duration = Duration::from_secs(1);
const ECHO_RUN: Duration = Duration::from_secs(5);
/// Jobs a call may have sent and not seen the result of: twice the default session window, so the
/// server always has the next batch waiting while its window is full.
const ECHO_IN_FLIGHT: usize = 2 * 1024;

/// Recovery: worker slots to fill and repetitions of each variant.
const RECOVERY_WORKERS: usize = 256;
const RECOVERY_ITERS: usize = 120;

/// Idle calls: how many, over how many connections.
const IDLE_CALLS: usize = 10_000;
const IDLE_CONNS: usize = 20;

/// Flood: calls, jobs per batch, sleep of each job, how long.
const FLOOD_CALLS: usize = 4;
const FLOOD_BATCH: usize = 500;
const FLOOD_SLEEP_MS: &str = "50";
const FLOOD_RUN: Duration = Duration::from_secs(5);

/// Churn: calls aborted at random moments, over how many connections, how many at once.
const CHURN_CALLS: usize = 10_000;
const CHURN_CONNS: usize = 16;
const CHURN_CONCURRENCY: usize = 256;

fn main() {
    // `cargo bench` passes `--bench`; every other word names a scenario.
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

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {} cores ({}), CLK_TCK {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model(),
        clk_tck()
    );
    let started = Instant::now();
    if run("echo") {
        rt.block_on(echo());
    }
    if run("recovery") {
        rt.block_on(recovery());
    }
    if run("idle") {
        rt.block_on(idle());
    }
    if run("flood") {
        rt.block_on(flood());
    }
    if run("churn") {
        rt.block_on(churn_external());
    }
    if run("churn_inproc") {
        rt.block_on(churn_inproc());
    }
    println!("total_bench_time_s: {:.1}", started.elapsed().as_secs_f64());
    check_targets();
}

/// Every figure printed so far, for the final check against the targets.
static FIGURES: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Prints `target_check:` lines for the figures that were measured in this run.
fn check_targets() {
    // (figure, comparison, target, what the issue asks)
    let targets: [(&str, &str, f64, &str); 7] = [
        (
            "echo_jobs_per_server_cpu_s",
            ">=",
            1_300_000.0,
            "echo jobs per server CPU-second",
        ),
        (
            "recovery_queued_echo_p99_ms",
            "<=",
            1.0,
            "recovery p99 (echo queued before the abort)",
        ),
        (
            "recovery_echo_sent_after_abort_p99_ms",
            "<=",
            1.0,
            "recovery p99 (echo sent after the abort)",
        ),
        ("idle_rss_per_call_bytes", "<=", 8192.0, "RSS per idle call"),
        ("flood_peak_rss_mib", "<=", 16.0, "peak RSS under a flood"),
        (
            "churn_rss_delta_pct",
            "<=",
            10.0,
            "RSS growth after 10,000 aborted calls",
        ),
        (
            "churn_inproc_leaked_tasks",
            "<=",
            0.0,
            "leaked tasks after 10,000 aborted calls",
        ),
    ];
    let figures = FIGURES.lock().unwrap();
    println!();
    for (name, cmp, target, what) in targets {
        let Some(value) = figures
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.trim_start_matches('+').parse::<f64>().ok())
        else {
            continue;
        };
        let met = match cmp {
            ">=" => value >= target,
            _ => value <= target,
        };
        println!(
            "target_check: {name} = {value} (target {cmp} {target}; {what}): {}",
            if met { "met" } else { "NOT MET" }
        );
    }
}

// === the daemon in its own process ===

/// The release daemon running in a child process; SIGTERM on drop.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Daemon {
    /// Starts `batchd --listen 127.0.0.1:PORT ARGS` and waits until it accepts connections.
    fn spawn(args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = std::env::temp_dir().join(format!("batchd-bench-{port}.log"));
        // BATCHD_BENCH_BIN runs another build of the daemon, or a wrapper that execs it (profilers).
        let bin = std::env::var_os("BATCHD_BENCH_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_batchd").into());
        let child = Command::new(bin)
            .arg("--listen")
            .arg(addr.to_string())
            .args(["--set", "log=warn", "--set", "shutdown_grace=1s"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning batchd");
        let mut d = Self { child, addr, log };
        let start = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = d.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&d.log).unwrap_or_default();
                panic!("batchd exited with {status} before accepting: {log}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "batchd did not accept within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Let the start-up allocations settle before anyone reads a baseline.
        std::thread::sleep(Duration::from_millis(100));
        d
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// VmRSS in KiB.
    fn rss_kb(&self) -> u64 {
        status_field(self.pid(), "VmRSS")
    }

    /// VmHWM (peak RSS) in KiB.
    fn hwm_kb(&self) -> u64 {
        status_field(self.pid(), "VmHWM")
    }

    fn threads(&self) -> u64 {
        status_field(self.pid(), "Threads")
    }

    /// CPU time of the daemon: (ns summed over its live threads' schedstat, ns from /proc/PID/stat ticks).
    fn cpu(&self) -> CpuTime {
        CpuTime {
            sched_ns: threads_sched_ns(self.pid()),
            tick_ns: stat_ticks(&format!("/proc/{}/stat", self.pid())) * 1_000_000_000 / clk_tck(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.pid().to_string();
        let term = || {
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
        };
        term();
        let start = Instant::now();
        let mut second = false;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if start.elapsed() > Duration::from_secs(3) && !second {
                term(); // a second signal stops the daemon at once
                second = true;
            }
            if start.elapsed() > Duration::from_secs(6) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

#[derive(Debug, Clone, Copy)]
struct CpuTime {
    sched_ns: u64,
    tick_ns: u64,
}

impl CpuTime {
    fn since(self, before: CpuTime) -> (f64, f64) {
        (
            self.sched_ns.saturating_sub(before.sched_ns) as f64 / 1e9,
            self.tick_ns.saturating_sub(before.tick_ns) as f64 / 1e9,
        )
    }
}

/// A numeric field of /proc/PID/status (kB for the Vm* fields).
fn status_field(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// utime + stime (ticks) of every thread of the process, dead ones included.
fn stat_ticks(path: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let Some(after) = text.rfind(')').map(|i| &text[i + 1..]) else {
        return 0;
    };
    // After the command name: state is field 3, utime 14, stime 15.
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// ns on CPU summed over the process's live threads (first field of each task's schedstat).
fn threads_sched_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(|e| {
        let text = std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok()?;
        text.split_whitespace().next()?.parse::<u64>().ok()
    })
    .sum()
}

/// CPU seconds this (client) process has used, all threads.
fn self_cpu_s() -> f64 {
    stat_ticks("/proc/self/stat") as f64 / clk_tck() as f64
}

fn clk_tck() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map_or_else(|| "unknown CPU".into(), |s| s.trim().to_owned())
}

// === client helpers ===

/// A client on its own HTTP/2 connection.
async fn connect(url: &str) -> BatchServiceClient<Channel> {
    let channel = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    BatchServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

/// An open Process call: the request sender and the response stream. Dropping both resets the call.
struct Call {
    tx: mpsc::Sender<proto::ProcessRequest>,
    rx: tonic::Streaming<proto::ProcessResponse>,
}

async fn open_call(client: &BatchServiceClient<Channel>, buffer: usize) -> Call {
    try_open_call(client, buffer).await.unwrap()
}

async fn try_open_call(
    client: &BatchServiceClient<Channel>,
    buffer: usize,
) -> Result<Call, tonic::Status> {
    let (tx, rx) = mpsc::channel(buffer);
    let rx = client
        .clone()
        .process(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(Call { tx, rx })
}

fn job(id: String, handler: &str, payload: Bytes, params: &[(&str, &str)]) -> proto::Job {
    proto::Job {
        id,
        handler: handler.into(),
        payload,
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        timeout: None,
    }
}

fn batch(batch_id: String, jobs: Vec<proto::Job>) -> proto::ProcessRequest {
    proto::ProcessRequest {
        kind: Some(Kind::Batch(proto::JobBatch { batch_id, jobs })),
    }
}

fn sleep_jobs(prefix: &str, n: usize, ms: &str) -> Vec<proto::Job> {
    (0..n)
        .map(|i| job(format!("{prefix}{i}"), "sleep", Bytes::new(), &[("ms", ms)]))
        .collect()
}

fn is_ok(r: &proto::JobResult) -> bool {
    r.outcome == proto::Outcome::Ok as i32
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints a figure line `name: value`.
fn figure(name: &str, value: impl std::fmt::Display) {
    let value = value.to_string();
    println!("{name}: {value}");
    FIGURES.lock().unwrap().push((name.to_owned(), value));
}

// === 1. echo throughput ===

async fn echo() {
    println!(
        "\n== echo: {ECHO_CALLS} calls, batches of {ECHO_BATCH}, {ECHO_PAYLOAD}-byte payloads =="
    );
    let d = Daemon::spawn(&[]);
    let url = d.url();
    let received = Arc::new(AtomicU64::new(0));
    let not_ok = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for c in 0..ECHO_CALLS {
        let client = connect(&url).await;
        let Call { tx, mut rx } = open_call(&client, 16).await;
        let credit = Arc::new(Semaphore::new(ECHO_IN_FLIGHT));
        let payload = Bytes::from(vec![b'x'; ECHO_PAYLOAD]);
        let (stop_tx, credit_tx) = (stop.clone(), Arc::clone(&credit));
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut n = 0u64;
            loop {
                let permit = tokio::select! {
                    p = credit_tx.acquire_many(ECHO_BATCH as u32) => p.unwrap(),
                    () = stop_tx.cancelled() => break,
                };
                permit.forget();
                let jobs = (0..ECHO_BATCH)
                    .map(|_| {
                        seq += 1;
                        job(seq.to_string(), "echo", payload.clone(), &[])
                    })
                    .collect();
                n += 1;
                if tx.send(batch(format!("c{c}b{n}"), jobs)).await.is_err() {
                    break;
                }
            }
            drop(client);
        }));
        let (stop_rx, received, not_ok) =
            (stop.clone(), Arc::clone(&received), Arc::clone(&not_ok));
        tasks.push(tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = rx.message() => m,
                    () = stop_rx.cancelled() => break,
                };
                let Ok(Some(msg)) = msg else { break };
                let n = msg.results.len();
                let bad = msg.results.iter().filter(|r| !is_ok(r)).count();
                received.fetch_add(n as u64, Ordering::Relaxed);
                not_ok.fetch_add(bad as u64, Ordering::Relaxed);
                credit.add_permits(n);
            }
        }));
    }
    tokio::time::sleep(ECHO_WARMUP).await;
    let (cpu0, client0, jobs0, t0) = (
        d.cpu(),
        self_cpu_s(),
        received.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(ECHO_RUN).await;
    let (cpu1, client1, jobs1, wall) = (
        d.cpu(),
        self_cpu_s(),
        received.load(Ordering::Relaxed),
        t0.elapsed(),
    );
    let threads = d.threads();
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let jobs = (jobs1 - jobs0) as f64;
    let (server_s, server_tick_s) = cpu1.since(cpu0);
    figure("echo_jobs", jobs1 - jobs0);
    figure("echo_wall_s", format!("{:.2}", wall.as_secs_f64()));
    figure("echo_not_ok_results", not_ok.load(Ordering::Relaxed));
    figure(
        "echo_throughput_jobs_per_s",
        format!("{:.0}", jobs / wall.as_secs_f64()),
    );
    figure("echo_server_cpu_s", format!("{server_s:.3}"));
    figure(
        "echo_server_cpu_s_from_ticks",
        format!("{server_tick_s:.2}"),
    );
    figure(
        "echo_server_cpu_utilisation_cores",
        format!("{:.2}", server_s / wall.as_secs_f64()),
    );
    figure(
        "echo_jobs_per_server_cpu_s",
        format!("{:.0}", jobs / server_s),
    );
    figure("echo_client_cpu_s", format!("{:.2}", client1 - client0));
    figure("echo_server_threads", threads);
}

// === 2. recovery time ===

async fn recovery() {
    println!(
        "\n== recovery: {RECOVERY_WORKERS} workers filled with 60 s sleeps, call aborted, {RECOVERY_ITERS}× per variant =="
    );
    let workers = RECOVERY_WORKERS.to_string();
    let d = Daemon::spawn(&["--workers", &workers]);
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
    for i in 0..3 * RECOVERY_ITERS {
        let variant = i % 3;
        let ca = connect(&url).await;
        let cb = connect(&url).await;
        let a = open_call(&ca, 4).await;
        let mut b = open_call(&cb, 4).await;
        if variant != 2 {
            let fill = sleep_jobs("s", RECOVERY_WORKERS, "60000");
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
        for (label, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
            figure(
                &format!("{name}_{label}_ms"),
                format!("{:.3}", ms(percentile(&v, p))),
            );
        }
    }
}

// === 3. RSS per idle call ===

async fn idle() {
    for workers in [IDLE_CALLS, 256] {
        idle_with(workers).await;
    }
}

async fn idle_with(workers: usize) {
    let what = if workers >= IDLE_CALLS {
        "every sleep running"
    } else {
        "sleeps beyond the workers queued"
    };
    println!(
        "\n== idle: {IDLE_CALLS} calls each holding one 600 s sleep, {IDLE_CONNS} connections, --workers {workers} ({what}) =="
    );
    let tag = if workers >= IDLE_CALLS {
        "idle"
    } else {
        "idle_queued"
    };
    let workers = workers.to_string();
    let d = Daemon::spawn(&[
        "--workers",
        &workers,
        "--set",
        "max_calls=20000",
        "--set",
        "default_job_timeout=20m",
    ]);
    let url = d.url();
    let mut clients = Vec::new();
    for _ in 0..IDLE_CONNS {
        clients.push(connect(&url).await);
    }
    // One finished call per connection, so per-connection state is in the baseline.
    for c in &clients {
        let mut call = open_call(c, 1).await;
        call.tx
            .send(batch(
                "w".into(),
                vec![job("w".into(), "echo", Bytes::new(), &[])],
            ))
            .await
            .unwrap();
        call.rx.message().await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = d.rss_kb();
    let base_threads = d.threads();
    let t0 = Instant::now();
    // Each call sends a sleep and a second job reusing the sleep's id. That one is REJECTED at
    // once without a worker slot; its result proves the call is open and its sleep admitted
    // (running when there are enough workers, queued otherwise).
    let opened: Vec<(Call, Duration)> = futures_util::stream::iter(0..idle_calls())
        .map(|i| {
            let client = clients[i % IDLE_CONNS].clone();
            async move {
                let t = Instant::now();
                let mut call = open_call(&client, 1).await;
                let jobs = vec![
                    job("s".into(), "sleep", Bytes::new(), &[("ms", "600000")]),
                    job("s".into(), "echo", Bytes::new(), &[]),
                ];
                call.tx.send(batch("b".into(), jobs)).await.unwrap();
                loop {
                    let msg = call.rx.message().await.unwrap().unwrap();
                    if msg
                        .results
                        .iter()
                        .any(|r| r.outcome == proto::Outcome::Rejected as i32)
                    {
                        break;
                    }
                }
                (call, t.elapsed())
            }
        })
        .buffer_unordered(500)
        .collect()
        .await;
    let open_s = t0.elapsed().as_secs_f64();
    let (calls, mut lat): (Vec<Call>, Vec<Duration>) = opened.into_iter().unzip();
    lat.sort();
    figure(
        &format!("{tag}_call_ready_p50_p99_max_ms"),
        format!(
            "{:.1} {:.1} {:.1}",
            ms(percentile(&lat, 50.0)),
            ms(percentile(&lat, 99.0)),
            ms(percentile(&lat, 100.0))
        ),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = d.rss_kb();
    let threads = d.threads();
    let per_call = (rss.saturating_sub(base) * 1024) as f64 / calls.len() as f64;
    figure(&format!("{tag}_calls_open"), calls.len());
    figure(&format!("{tag}_open_time_s"), format!("{open_s:.2}"));
    figure(&format!("{tag}_baseline_rss_kib"), base);
    figure(&format!("{tag}_rss_kib"), rss);
    figure(
        &format!("{tag}_threads_before_after"),
        format!("{base_threads} {threads}"),
    );
    figure(
        &format!("{tag}_rss_per_call_bytes"),
        format!("{per_call:.0}"),
    );
    // Abort them all and see where RSS settles.
    drop(calls);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    figure(&format!("{tag}_rss_after_abort_kib"), d.rss_kb());
    figure(&format!("{tag}_peak_rss_kib"), d.hwm_kb());
}

fn idle_calls() -> usize {
    std::env::var("IDLE_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(IDLE_CALLS)
}

// === 4. peak RSS under a flood ===

async fn flood() {
    println!(
        "\n== flood: {} calls sending batches of {FLOOD_BATCH} sleep ms={FLOOD_SLEEP_MS} jobs without limit for {}s ==",
        flood_calls(),
        FLOOD_RUN.as_secs()
    );
    let d = Daemon::spawn(&[]);
    let url = d.url();
    let base = d.rss_kb();
    let base_hwm = d.hwm_kb();
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..flood_calls() {
        let client = connect(&url).await;
        let Call { tx, mut rx } = open_call(&client, 16).await;
        let (stop_tx, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop_tx.load(Ordering::Relaxed) {
                n += 1;
                let jobs = sleep_jobs(&format!("{n}-"), FLOOD_BATCH, FLOOD_SLEEP_MS);
                if tx.send(batch(format!("c{c}b{n}"), jobs)).await.is_err() {
                    break;
                }
                sent.fetch_add(FLOOD_BATCH as u64, Ordering::Relaxed);
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
    while t0.elapsed() < FLOOD_RUN {
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

// === 5. churn: calls aborted at random moments ===

/// What one churned call does before it is aborted.
#[derive(Debug, Clone)]
struct Plan {
    /// 0: abort right after opening; 1: send, wait `delay`, abort; 2: send, wait for the first
    /// result, abort; 3: send two batches and half-close, wait `delay`, abort.
    mode: u8,
    jobs: Vec<proto::Job>,
    delay: Duration,
}

fn plans(n: usize, seed: u64) -> Vec<Plan> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let k = rng.random_range(1..=16);
            let jobs = (0..k)
                .map(|j| {
                    let id = format!("j{j}");
                    match rng.random_range(0..10) {
                        0..5 => job(id, "echo", Bytes::from_static(b"payload"), &[]),
                        5..8 => {
                            let ms = rng.random_range(1..20u32).to_string();
                            job(id, "sleep", Bytes::new(), &[("ms", &ms)])
                        }
                        _ => job(id, "sleep", Bytes::new(), &[("ms", "60000")]),
                    }
                })
                .collect();
            Plan {
                mode: rng.random_range(0..4),
                jobs,
                delay: Duration::from_micros(rng.random_range(0..5_000)),
            }
        })
        .collect()
}

/// Opens `CHURN_CALLS` calls over `CHURN_CONNS` connections and aborts each at a random moment.
/// Returns the clients (connections stay open) and the calls refused (should be 0).
async fn churn(url: &str, seed: u64) -> (Vec<BatchServiceClient<Channel>>, u64) {
    let mut clients = Vec::new();
    for _ in 0..CHURN_CONNS {
        clients.push(connect(url).await);
    }
    let refused = Arc::new(AtomicU64::new(0));
    let plans = plans(CHURN_CALLS, seed);
    futures_util::stream::iter(plans.into_iter().enumerate())
        .for_each_concurrent(CHURN_CONCURRENCY, |(i, plan)| {
            let client = clients[i % CHURN_CONNS].clone();
            let refused = Arc::clone(&refused);
            async move {
                let Ok(mut call) = try_open_call(&client, 4).await else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let send = |call: &Call, jobs: Vec<proto::Job>| {
                    let tx = call.tx.clone();
                    async move {
                        let _ = tx.send(batch("b".into(), jobs)).await;
                    }
                };
                match plan.mode {
                    0 => {}
                    1 => {
                        send(&call, plan.jobs).await;
                        tokio::time::sleep(plan.delay).await;
                    }
                    2 => {
                        send(&call, plan.jobs).await;
                        let _ = tokio::time::timeout(Duration::from_millis(50), call.rx.message())
                            .await;
                    }
                    _ => {
                        let second: Vec<proto::Job> = plan
                            .jobs
                            .iter()
                            .map(|j| proto::Job {
                                id: format!("{}x", j.id),
                                ..j.clone()
                            })
                            .collect();
                        send(&call, plan.jobs).await;
                        send(&call, second).await;
                        let Call { tx, rx } = call;
                        drop(tx); // half-close; the call stays open until its jobs finish
                        tokio::time::sleep(plan.delay).await;
                        drop(rx);
                        return;
                    }
                }
                drop(call);
            }
        })
        .await;
    (clients, refused.load(Ordering::Relaxed))
}

/// One echo round trip on a fresh call; returns its latency.
async fn fresh_echo(client: &BatchServiceClient<Channel>) -> Duration {
    let t0 = Instant::now();
    let mut call = open_call(client, 1).await;
    call.tx
        .send(batch(
            "f".into(),
            vec![job("f".into(), "echo", Bytes::from_static(b"hi"), &[])],
        ))
        .await
        .unwrap();
    let msg = call.rx.message().await.unwrap().unwrap();
    assert!(msg.results.iter().all(is_ok));
    t0.elapsed()
}

/// A short churn so one-time allocations (thread stacks, connection buffers, allocator arenas)
/// are in the baseline rather than counted as growth.
async fn warm_up(url: &str) {
    let client = connect(url).await;
    for _ in 0..50 {
        fresh_echo(&client).await;
    }
}

async fn churn_external() {
    println!(
        "\n== churn (separate process): {CHURN_CALLS} calls aborted at random moments, {CHURN_CONCURRENCY} at once, two rounds =="
    );
    let d = Daemon::spawn(&["--set", "max_calls=20000"]);
    let url = d.url();
    let fresh = d.rss_kb();
    warm_up(&url).await;
    let (base, base_threads) = (d.rss_kb(), d.threads());
    let mut after = Vec::new();
    for round in 1..=churn_rounds() {
        let t0 = Instant::now();
        let (clients, refused) = churn(&url, round).await;
        let took = t0.elapsed().as_secs_f64();
        // Give the daemon a moment to finish tearing calls down, then check it still serves.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let echo = fresh_echo(&clients[0]).await;
        drop(clients);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = d.rss_kb();
        after.push(rss);
        figure(&format!("churn_round{round}_calls_refused"), refused);
        figure(&format!("churn_round{round}_time_s"), format!("{took:.2}"));
        figure(&format!("churn_round{round}_rss_after_kib"), rss);
        figure(
            &format!("churn_round{round}_fresh_echo_after_ms"),
            format!("{:.3}", ms(echo)),
        );
    }
    let pct = |a: u64, b: u64| (a as f64 - b as f64) * 100.0 / b as f64;
    figure("churn_rss_fresh_kib", fresh);
    figure("churn_rss_before_kib", base);
    figure("churn_peak_rss_kib", d.hwm_kb());
    figure(
        "churn_rss_delta_pct",
        format!("{:+.1}", pct(after[0], base)),
    );
    figure(
        "churn_rss_delta_last_round_vs_round1_pct",
        format!("{:+.1}", pct(after[after.len() - 1], after[0])),
    );
    figure(
        "churn_threads_before_after",
        format!("{base_threads} {}", d.threads()),
    );
}

fn flood_calls() -> usize {
    std::env::var("FLOOD_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FLOOD_CALLS)
}

fn churn_rounds() -> u64 {
    std::env::var("CHURN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

// === 5b. churn, in process: live tasks and engine counters ===

/// batchd::Server on its own 2-thread runtime in this process.
struct InProc {
    addr: SocketAddr,
    engine: batchd::Engine,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProc {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config {
            listen: addr,
            max_calls: 20_000,
            shutdown_grace: Duration::from_secs(1),
            ..Config::default()
        };
        config.validate().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        let server = Server::new(config, Registry::builtin());
        let engine = server.engine().clone();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::spawn(move || {
            runtime
                .block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    server.serve(listener, token.cancelled_owned()).await
                })
                .unwrap();
            runtime.shutdown_timeout(Duration::from_secs(2));
        });
        Self {
            addr,
            engine,
            runtime: handle,
            stop,
            thread: Some(thread),
        }
    }

    fn alive_tasks(&self) -> usize {
        self.runtime.metrics().num_alive_tasks()
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.stop.cancel();
        self.engine.cancel_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn churn_inproc() {
    println!(
        "\n== churn (in process): {CHURN_CALLS} calls aborted at random moments; engine counters and live tasks =="
    );
    let server = InProc::start();
    let url = format!("http://{}", server.addr);
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
    figure("churn_inproc_calls", CHURN_CALLS);
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
    for _ in 0..RECOVERY_ITERS {
        let client = connect(&url).await;
        let call = open_call(&client, 4).await;
        let fill = sleep_jobs("s", RECOVERY_WORKERS, "60000");
        call.tx.send(batch("fill".into(), fill)).await.unwrap();
        let start = Instant::now();
        while server.engine.stats().jobs_running < RECOVERY_WORKERS as u64 {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "workers never filled"
            );
            tokio::task::yield_now().await;
        }
        let t0 = Instant::now();
        drop(call);
        while server.engine.stats().free_workers < RECOVERY_WORKERS as u64 {
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
    for (label, p) in [("p50", 50.0), ("p99", 99.0), ("max", 100.0)] {
        figure(
            &format!("churn_inproc_abort_to_slots_free_{label}_ms"),
            format!("{:.3}", ms(percentile(&teardown, p))),
        );
    }
}
