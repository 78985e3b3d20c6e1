//! Failover (issue 12): what losing a replica costs a run spread over three.
//!
//! - `kill`: three release daemons (`batchd` processes on `127.0.0.1:0`), a run of short jobs
//!   (even ids echo, odd ones sleep 1–5 ms) through `batchd::client` in this process, and
//!   `kill -9` of one daemon once a third of the results are in. Failover time: from the kill to
//!   the first result of a resubmitted job (p50/p99 over the runs); jobs resubmitted per failover.
//! - `twice`: the same with three in-process servers (so that every execution can be counted: a
//!   killed process tells nothing) whose handler records each job it starts; the "kill" drops the
//!   server's runtime at once, which closes its sockets as a killed process's are closed. Jobs
//!   executed twice per failover (started on the lost replica, and again elsewhere), and the
//!   failover time measured the same way.
//! - `throughput`: the release `batchctl` running 100,000 echo jobs against one daemon and
//!   against three on the same machine (interleaved runs): the cost of spreading.
//!
//! Run: `cargo bench --bench failover` (all), or `-- kill twice throughput`. Knobs:
//! `FAILOVER_RUNS` (20), `FAILOVER_JOBS` (30,000), `FAILOVER_MAX_IN_FLIGHT` (8192, batchctl's
//! default), `THROUGHPUT_RUNS` (5).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchd::client::call::{self, CallOptions, Fed, Finished, Origin, Pull, Room, Sink, Source};
use batchd::client::{ClientError, Endpoints, Progress};
use batchd::config::Config;
use batchd::handlers::{Handler, HandlerError, JobContext, JobInput, Params};
use batchd::proto;
use batchd::{Registry, Server};
use bytes::Bytes;
use support::daemon::Daemon;
use support::report::{figure, latency_ms};
use support::scenarios::{knob, Scenarios};
use support::stats::{percentile, P50_P99_MAX};
use tokio_util::sync::CancellationToken;

fn main() {
    let scenarios = Scenarios::from_args(&["kill", "twice", "throughput"]);
    support::procfs::print_machine();
    let runs: usize = knob("FAILOVER_RUNS", 20);
    let jobs: usize = knob("FAILOVER_JOBS", 30_000);
    let max_in_flight: usize = knob("FAILOVER_MAX_IN_FLIGHT", 8192);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if scenarios.run("kill") {
        let samples: Vec<Sample> = (0..runs)
            .map(|_| rt.block_on(kill_run(jobs, max_in_flight)))
            .collect();
        report("kill", &samples, jobs, max_in_flight);
    }
    if scenarios.run("twice") {
        let samples: Vec<Sample> = (0..runs)
            .map(|_| rt.block_on(twice_run(jobs, max_in_flight)))
            .collect();
        report("twice", &samples, jobs, max_in_flight);
    }
    if scenarios.run("throughput") {
        throughput(knob("THROUGHPUT_RUNS", 5));
    }
}

// === one failover run ===

/// What one run measured.
struct Sample {
    /// From the kill to the first result of a resubmitted job.
    failover: Duration,
    /// Results whose job was resubmitted.
    resubmitted: usize,
    /// Jobs started on two replicas (`twice` only).
    twice: Option<usize>,
    /// The run's wall time.
    wall: Duration,
}

/// Job `i` of a run, as `tests/support/failover.rs` makes them: even ids echo, odd ones sleep
/// 1–5 ms. `handler` names the handler of both kinds (`count` in process).
fn job(i: usize, handler: Option<&str>) -> proto::Job {
    let mut job = proto::Job {
        id: i.to_string(),
        payload: Bytes::from(i.to_string()),
        ..Default::default()
    };
    let ms = if i.is_multiple_of(2) {
        0
    } else {
        1 + (i / 2 * 7) % 5
    };
    job.handler = match (handler, ms) {
        (Some(h), _) => h.into(),
        (None, 0) => "echo".into(),
        (None, _) => "sleep".into(),
    };
    if ms > 0 {
        job.params.insert("ms".into(), ms.to_string());
    }
    job
}

/// Jobs `0..n`.
struct Jobs {
    next: usize,
    n: usize,
    handler: Option<&'static str>,
}

impl Source for Jobs {
    type Tag = ();

    async fn next(&mut self, _room: Room) -> Option<Result<Pull<()>, ClientError>> {
        if self.next == self.n {
            return None;
        }
        self.next += 1;
        Some(Ok(Pull::Job(Fed {
            batch: String::new(),
            job: job(self.next - 1, self.handler),
            origin: Origin::Line(self.next as u64),
            tag: (),
        })))
    }
}

/// Counts results; calls `kill` once a third are in; notes when the first resubmitted job's
/// result comes.
struct Watch<F: FnMut()> {
    n: usize,
    done: usize,
    seen: Vec<bool>,
    kill: Option<F>,
    killed_at: Option<Instant>,
    first_resubmitted: Option<Instant>,
    resubmitted: usize,
}

impl<F: FnMut()> Sink<()> for Watch<F> {
    async fn deliver(&mut self, done: &[Finished<()>]) -> Result<(), ClientError> {
        let now = Instant::now();
        for f in done {
            let i: usize = f.result.job_id.parse().unwrap();
            assert!(!self.seen[i], "two results for {i}");
            assert_eq!(
                f.result.outcome,
                proto::Outcome::Ok as i32,
                "{:?}",
                f.result
            );
            self.seen[i] = true;
            if f.resubmissions > 0 {
                self.resubmitted += 1;
                self.first_resubmitted.get_or_insert(now);
            }
        }
        self.done += done.len();
        if self.done >= self.n / 3 {
            if let Some(mut kill) = self.kill.take() {
                kill();
                self.killed_at = Some(Instant::now());
            }
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), ClientError> {
        Ok(())
    }
}

/// Runs `n` jobs over `endpoints`, calling `kill` at a third.
async fn watched_run<F: FnMut()>(
    endpoints: Endpoints,
    n: usize,
    max_in_flight: usize,
    handler: Option<&'static str>,
    kill: F,
) -> (Sample, Watch<F>) {
    let mut source = Jobs {
        next: 0,
        n,
        handler,
    };
    let mut sink = Watch {
        n,
        done: 0,
        seen: vec![false; n],
        kill: Some(kill),
        killed_at: None,
        first_resubmitted: None,
        resubmitted: 0,
    };
    let opts = CallOptions {
        max_in_flight,
        ..CallOptions::default()
    };
    let start = Instant::now();
    let (summary, res) = call::drive(
        endpoints,
        &mut source,
        &mut sink,
        None::<tokio::io::Sink>,
        &opts,
        &Progress::new(false),
        std::future::pending(),
    )
    .await;
    res.unwrap_or_else(|e| panic!("the run failed: {e}; {}", summary.line()));
    assert_eq!(summary.ok() as usize, n, "{}", summary.line());
    assert!(sink.seen.iter().all(|s| *s));
    let killed_at = sink.killed_at.expect("killed");
    let sample = Sample {
        failover: sink
            .first_resubmitted
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(killed_at)),
        resubmitted: sink.resubmitted,
        twice: None,
        wall: start.elapsed(),
    };
    (sample, sink)
}

/// `kill`: three daemon processes, one killed with SIGKILL.
async fn kill_run(n: usize, max_in_flight: usize) -> Sample {
    let daemons: Vec<Daemon> = (0..3).map(|_| Daemon::spawn(&[])).collect();
    let list: Vec<String> = daemons.iter().map(Daemon::url).collect();
    let endpoints = Endpoints::parse(&list, false).unwrap();
    let victim = rustix::process::Pid::from_raw(daemons[1].pid()).unwrap();
    let kill = move || {
        rustix::process::kill_process(victim, rustix::process::Signal::KILL).unwrap();
    };
    let (sample, _) = watched_run(endpoints, n, max_in_flight, None, kill).await;
    sample
}

// === in process: every execution counted ===

/// Starts of each job id, over every server.
type Starts = Arc<Mutex<HashMap<String, u32>>>;

/// Records the job (its payload is its id), then sleeps `ms` (0: returns at once, like echo).
struct Count(Starts);

#[async_trait::async_trait]
impl Handler for Count {
    fn description(&self) -> &str {
        "bench: records each start, sleeps ms, returns the payload"
    }

    fn check(&self, _params: &Params) -> Result<(), String> {
        Ok(())
    }

    async fn run(
        self: Arc<Self>,
        input: JobInput,
        _ctx: JobContext,
    ) -> Result<Bytes, HandlerError> {
        let id = String::from_utf8_lossy(&input.payload).into_owned();
        *self.0.lock().unwrap().entry(id).or_default() += 1;
        let ms: u64 = input
            .params
            .get("ms")
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(input.payload)
    }
}

/// A server on its own runtime that `kill` stops like `kill -9` would: the runtime is dropped
/// with every task, and the sockets close.
struct Killable {
    url: String,
    kill: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Killable {
    fn start(starts: &Starts) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config {
            listen: addr,
            ..Config::default()
        };
        config.validate().unwrap();
        let mut registry = Registry::builtin();
        registry.register("count", Count(Arc::clone(starts)));
        let server = Server::new(config, registry);
        let kill = CancellationToken::new();
        let killed = kill.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    res = server.serve(listener, std::future::pending()) => res.unwrap(),
                    () = killed.cancelled() => {}
                }
            });
            // Every task of the server (connections, calls, jobs) is dropped here.
            runtime.shutdown_background();
        });
        Self {
            url: format!("http://{addr}"),
            kill,
            thread: Some(thread),
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `twice`: three in-process servers, one killed.
async fn twice_run(n: usize, max_in_flight: usize) -> Sample {
    let starts: Starts = Arc::default();
    let servers: Vec<Killable> = (0..3).map(|_| Killable::start(&starts)).collect();
    let list: Vec<String> = servers.iter().map(|s| s.url.clone()).collect();
    let endpoints = Endpoints::parse(&list, false).unwrap();
    let victim = servers[1].kill.clone();
    let kill = move || victim.cancel();
    let (mut sample, _) = watched_run(endpoints, n, max_in_flight, Some("count"), kill).await;
    drop(servers);
    let starts = starts.lock().unwrap();
    sample.twice = Some(starts.values().filter(|c| **c > 1).count());
    assert_eq!(starts.len(), n);
    sample
}

fn report(name: &str, samples: &[Sample], jobs: usize, max_in_flight: usize) {
    figure(
        &format!("{name}_runs"),
        format!(
            "{} runs of {jobs} jobs over 3 replicas, max_in_flight {max_in_flight}",
            samples.len()
        ),
    );
    // A run whose killed replica had no job without a result (all answered when it died) has no
    // failover to time: it is counted, not taken as 0 ms.
    let mut times: Vec<Duration> = samples
        .iter()
        .filter(|s| s.resubmitted > 0)
        .map(|s| s.failover)
        .collect();
    times.sort();
    figure(
        &format!("{name}_runs_without_resubmission"),
        samples.len() - times.len(),
    );
    if times.is_empty() {
        return;
    }
    latency_ms(
        &format!("{name}_failover"),
        &times,
        &P50_P99_MAX,
        percentile,
    );
    let mut resubmitted: Vec<usize> = samples.iter().map(|s| s.resubmitted).collect();
    resubmitted.sort_unstable();
    figure(
        &format!("{name}_resubmitted_per_failover"),
        format!(
            "median {}, min {}, max {}",
            resubmitted[resubmitted.len() / 2],
            resubmitted[0],
            resubmitted[resubmitted.len() - 1]
        ),
    );
    let mut twice: Vec<usize> = samples.iter().filter_map(|s| s.twice).collect();
    if !twice.is_empty() {
        twice.sort_unstable();
        figure(
            &format!("{name}_executed_twice_per_failover"),
            format!(
                "median {}, min {}, max {} (mean {:.0})",
                twice[twice.len() / 2],
                twice[0],
                twice[twice.len() - 1],
                twice.iter().sum::<usize>() as f64 / twice.len() as f64
            ),
        );
    }
    let mut walls: Vec<Duration> = samples.iter().map(|s| s.wall).collect();
    walls.sort();
    figure(
        &format!("{name}_wall_s"),
        format!("median {:.2}", walls[walls.len() / 2].as_secs_f64()),
    );
}

// === throughput: three replicas against one ===

/// `batchctl run` of 100,000 echo jobs against one daemon and against three, interleaved.
fn throughput(runs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("echo.jsonl");
    let n = 100_000;
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        for i in 0..n {
            writeln!(
                f,
                r#"{{"id":"{i}","handler":"echo","payload":"payload number {i}"}}"#
            )
            .unwrap();
        }
    }
    let daemons: Vec<Daemon> = (0..3).map(|_| Daemon::spawn(&[])).collect();
    let one = daemons[0].url();
    let three: Vec<String> = daemons.iter().map(Daemon::url).collect();
    let three = three.join(",");
    let (mut t1, mut t3) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        t1.push(batchctl_run(&one, &input));
        t3.push(batchctl_run(&three, &input));
    }
    t1.sort();
    t3.sort();
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let (m1, m3) = (t1[t1.len() / 2], t3[t3.len() / 2]);
    figure(
        "throughput_one_replica_jobs_per_s",
        format!("median {:.0}, best {:.0}", rate(m1), rate(t1[0])),
    );
    figure(
        "throughput_three_replicas_jobs_per_s",
        format!("median {:.0}, best {:.0}", rate(m3), rate(t3[0])),
    );
    figure(
        "throughput_three_over_one",
        format!("median {:.2}", rate(m3) / rate(m1)),
    );
}

/// Wall time of `batchctl --endpoint E run -q -o /dev/null INPUT` (exit 0 checked).
fn batchctl_run(endpoints: &str, input: &Path) -> Duration {
    let start = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_batchctl"))
        .args(["--endpoint", endpoints, "run", "-q", "-o", "/dev/null"])
        .arg(input)
        .env_remove("BATCHD_ENDPOINT")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "batchctl failed: {status}");
    start.elapsed()
}
