//! Benchmarks of fairness by principal (issue 11), against the release build of the real daemon.
//!
//! - `weights`: echo throughput of 3 principals of weights 1, 2 and 4, each with the same number of
//!   calls and far more jobs than its share: each one's share of the jobs done, against its weight's,
//!   with 7 workers (the pool limits echo) and with 70 (the clients do); `WEIGHT_WORKERS` picks one.
//! - `cost`: what the hierarchy costs when no principal is configured: echo jobs per server
//!   CPU-second (the `echo` scenario of `benches/daemon.rs`). With `BATCHD_BENCH_BASE_BIN` set to
//!   another build (e.g. the commit before principals), runs interleaved pairs base/new, `PAIRS` of
//!   them (default 5), and prints each pair, the ratios and their spread.
//!
//! Run: `cargo bench --bench principals` (both) or `cargo bench --bench principals -- weights`.
//! `BATCHD_BENCH_BIN` runs another build instead of this one.
//!
//! (A scenario module of its own: on the branch this was written, `benches/daemon.rs` was still one
//! file; it moves into `benches/daemon/` as `principals.rs` with a line in its list.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, process_request::Kind};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

const BATCH: usize = 100;
const PAYLOAD: usize = 64;
/// Jobs a call may have sent and not had answered: far beyond what the pool takes at once.
const IN_FLIGHT: usize = 2048;
/// The same for the weights scenario, with a session window to match: each principal keeps a backlog
/// of about 0.1 s of its share, so a client that the busy machine stalls for a moment does not
/// leave its principal without jobs (its share would go to the others, as it should).
const WEIGHTS_IN_FLIGHT: usize = 16_384;
const WEIGHTS_WINDOW: &str = "session_window=8192";
const WARMUP: Duration = Duration::from_secs(1);
const RUN: Duration = Duration::from_secs(5);
const WEIGHTS: [u32; 3] = [1, 2, 4];
const CALLS_PER_PRINCIPAL: usize = 2;
const COST_CALLS: usize = 4;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let run = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if run("weights") {
        // The pool is what the weights share: with 7 slots it is what limits echo here. With 70,
        // echo jobs leave their slots at once and the limit is how fast the clients (on the same
        // two cores) send: each principal gets what its client sends.
        let workers = std::env::var("WEIGHT_WORKERS");
        for w in workers.as_deref().map_or(vec!["7", "70"], |w| vec![w]) {
            rt.block_on(weights(w));
        }
    }
    if run("cost") {
        rt.block_on(cost());
    }
}

// === the daemon ===

/// The release daemon in a child process; SIGTERM (then SIGKILL) on drop.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `bin --listen 127.0.0.1:PORT --config FILE ARGS` with `config` as the file.
    fn spawn(bin: &std::ffi::OsStr, config: &str, args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("batchd.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(bin)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--config")
            .arg(&path)
            .args(["--set", "log=warn", "--set", "shutdown_grace=1s"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning batchd");
        let start = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "batchd did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(100));
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// ns on CPU summed over the daemon's live threads.
    fn cpu_ns(&self) -> u64 {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return 0;
        };
        dir.filter_map(|e| {
            let text = std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok()?;
            text.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if start.elapsed() > Duration::from_secs(5) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn this_build() -> std::ffi::OsString {
    std::env::var_os("BATCHD_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_batchd").into())
}

// === echo load ===

/// Echo calls that keep `IN_FLIGHT` jobs each outstanding; counts the results they get.
struct Load {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    done: Arc<AtomicU64>,
}

impl Load {
    /// Opens `calls` calls on `url`, each on its own connection, sending `token` if given.
    async fn start(url: &str, calls: usize, token: Option<&str>, in_flight: usize) -> Self {
        let stop = CancellationToken::new();
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..calls {
            let channel: Channel = Endpoint::from_shared(url.to_owned())
                .unwrap()
                .tcp_nodelay(true)
                .connect()
                .await
                .unwrap();
            let mut client = BatchServiceClient::new(channel).max_decoding_message_size(64 << 20);
            let (tx, rx) = mpsc::channel(16);
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            if let Some(t) = token {
                let value = format!("Bearer {t}").parse().unwrap();
                request.metadata_mut().insert("authorization", value);
            }
            let mut responses = client.process(request).await.unwrap().into_inner();
            let credit = Arc::new(Semaphore::new(in_flight));
            let (stop_tx, credit_tx) = (stop.clone(), Arc::clone(&credit));
            tasks.push(tokio::spawn(async move {
                let payload = Bytes::from(vec![b'x'; PAYLOAD]);
                let mut seq = 0u64;
                loop {
                    let permit = tokio::select! {
                        p = credit_tx.acquire_many(BATCH as u32) => p.unwrap(),
                        () = stop_tx.cancelled() => break,
                    };
                    permit.forget();
                    let jobs = (0..BATCH)
                        .map(|_| {
                            seq += 1;
                            proto::Job {
                                id: seq.to_string(),
                                handler: "echo".into(),
                                payload: payload.clone(),
                                params: Default::default(),
                                timeout: None,
                            }
                        })
                        .collect();
                    let batch = proto::JobBatch {
                        batch_id: format!("c{c}s{seq}"),
                        jobs,
                    };
                    let req = proto::ProcessRequest {
                        kind: Some(Kind::Batch(batch)),
                    };
                    if tx.send(req).await.is_err() {
                        break;
                    }
                }
                drop(client);
            }));
            let (stop_rx, done) = (stop.clone(), Arc::clone(&done));
            tasks.push(tokio::spawn(async move {
                loop {
                    let msg = tokio::select! {
                        m = responses.message() => m,
                        () = stop_rx.cancelled() => break,
                    };
                    let Ok(Some(msg)) = msg else { break };
                    let n = msg.results.len();
                    done.fetch_add(n as u64, Ordering::Relaxed);
                    credit.add_permits(n);
                }
            }));
        }
        Self { stop, tasks, done }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// === weights ===

async fn weights(workers: &str) {
    println!(
        "\n== weights: 3 principals of weights {WEIGHTS:?}, {CALLS_PER_PRINCIPAL} calls each, \
         echo batches of {BATCH}, workers {workers} =="
    );
    let mut config = String::new();
    for w in WEIGHTS {
        let digest = hex(&Sha256::digest(format!("token-w{w}").as_bytes()));
        config.push_str(&format!(
            "[[principal]]\nname = \"w{w}\"\ntoken_sha256 = \"{digest}\"\nweight = {w}\n\n"
        ));
    }
    let args = ["--workers", workers, "--set", WEIGHTS_WINDOW];
    let d = Daemon::spawn(&this_build(), &config, &args);
    let mut loads = Vec::new();
    for w in WEIGHTS {
        let token = format!("token-w{w}");
        let calls = CALLS_PER_PRINCIPAL;
        loads.push(Load::start(&d.url(), calls, Some(&token), WEIGHTS_IN_FLIGHT).await);
    }
    tokio::time::sleep(WARMUP).await;
    let before: Vec<u64> = loads.iter().map(Load::done).collect();
    let t0 = Instant::now();
    tokio::time::sleep(RUN).await;
    let after: Vec<u64> = loads.iter().map(Load::done).collect();
    let wall = t0.elapsed().as_secs_f64();
    for l in loads {
        l.stop().await;
    }
    let jobs: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total: u64 = jobs.iter().sum();
    let weight_sum: u32 = WEIGHTS.iter().sum();
    let mut worst: f64 = 0.0;
    for (w, n) in WEIGHTS.iter().zip(&jobs) {
        let share = *n as f64 / total as f64;
        let want = f64::from(*w) / f64::from(weight_sum);
        let off = (share / want - 1.0) * 100.0;
        worst = worst.max(off.abs());
        println!(
            "weights_{workers}_w{w}_jobs_per_s: {:.0}  share {:.3} (weight share {want:.3}, \
             {off:+.1}%)",
            *n as f64 / wall,
            share
        );
    }
    println!(
        "weights_{workers}_total_jobs_per_s: {:.0}",
        total as f64 / wall
    );
    println!("weights_{workers}_max_share_deviation_pct: {worst:.1} (target: within 10)");
}

// === cost of the hierarchy without principals ===

/// Echo jobs per server CPU-second of `bin` with no principal configured.
async fn echo_per_cpu_s(bin: &std::ffi::OsStr) -> (f64, f64) {
    let d = Daemon::spawn(bin, "", &[]);
    let load = Load::start(&d.url(), COST_CALLS, None, IN_FLIGHT).await;
    tokio::time::sleep(WARMUP).await;
    let (cpu0, jobs0, t0) = (d.cpu_ns(), load.done(), Instant::now());
    tokio::time::sleep(RUN).await;
    let (cpu1, jobs1, wall) = (d.cpu_ns(), load.done(), t0.elapsed());
    load.stop().await;
    let jobs = (jobs1 - jobs0) as f64;
    let cpu_s = (cpu1 - cpu0) as f64 / 1e9;
    (jobs / cpu_s, jobs / wall.as_secs_f64())
}

async fn cost() {
    println!("\n== cost: echo, {COST_CALLS} calls, no principal (one implicit group) ==");
    let new = this_build();
    let Some(base) = std::env::var_os("BATCHD_BENCH_BASE_BIN") else {
        let (per_cpu, per_s) = echo_per_cpu_s(&new).await;
        println!("cost_echo_jobs_per_server_cpu_s: {per_cpu:.0}");
        println!("cost_echo_jobs_per_s: {per_s:.0}");
        println!("(set BATCHD_BENCH_BASE_BIN to another build for interleaved pairs)");
        return;
    };
    let pairs: usize = std::env::var("PAIRS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5);
    let mut ratios = Vec::new();
    let (mut bases, mut news) = (Vec::new(), Vec::new());
    for i in 0..pairs {
        // Alternate which runs first, so that drift on a shared machine hits both alike.
        let (b, n) = if i % 2 == 0 {
            let b = echo_per_cpu_s(&base).await.0;
            (b, echo_per_cpu_s(&new).await.0)
        } else {
            let n = echo_per_cpu_s(&new).await.0;
            (echo_per_cpu_s(&base).await.0, n)
        };
        println!(
            "cost_pair_{i}: base {b:.0}  new {n:.0}  new/base {:.3}",
            n / b
        );
        ratios.push(n / b);
        bases.push(b);
        news.push(n);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |v: &[f64]| v.last().unwrap() / v.first().unwrap();
    let (mb, mn, mr) = (median(&mut bases), median(&mut news), median(&mut ratios));
    println!(
        "cost_base_median_jobs_per_server_cpu_s: {mb:.0} (max/min {:.2})",
        spread(&bases)
    );
    println!(
        "cost_new_median_jobs_per_server_cpu_s: {mn:.0} (max/min {:.2})",
        spread(&news)
    );
    println!(
        "cost_new_over_base_median: {mr:.3} (pairs from {:.3} to {:.3})",
        ratios.first().unwrap(),
        ratios.last().unwrap()
    );
}
