#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Lifecycle of calls and of the daemon, against a real server on 127.0.0.1:0:
//! disconnects, resets, killed clients, silent peers, aborted calls, slow readers, fairness, health
//! and graceful shutdown. "Nothing outlives the stream that asked for it" is checked through the
//! engine's live counters and the server runtime's count of live tasks.
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchd::engine::Outcome as EngineOutcome;
use batchd::handlers::{HandlerError, JobContext, JobInput};
use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, Outcome};
use batchd::{Handler, Registry};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Generous deadline for anything that should happen "at once", even on a busy machine.
const LIVENESS: Duration = Duration::from_secs(30);

// === helpers ===

/// `n` sleep jobs of `ms` milliseconds, ids `{prefix}{i}`.
fn sleeps(prefix: &str, n: usize, ms: u64) -> Vec<proto::Job> {
    let ms = ms.to_string();
    (0..n)
        .map(|i| job(&format!("{prefix}{i}"), "sleep", b"", &[("ms", &ms)]))
        .collect()
}

/// Waits until `cond` holds; on timeout, panics with the server's counters and live tasks.
async fn settle(what: &str, server: &TestServer, cond: impl FnMut() -> bool) {
    if tokio::time::timeout(LIVENESS, wait_until(what, LIVENESS * 2, cond))
        .await
        .is_err()
    {
        panic!(
            "timed out after {LIVENESS:?} waiting until {what}; stats {:?}, live tasks {}",
            server.stats(),
            server.alive_tasks()
        );
    }
}

/// The server's live tasks once it has served a request and has no connection left.
async fn idle_tasks(server: &TestServer) -> usize {
    let mut client = server.client().await;
    client
        .list_handlers(proto::ListHandlersRequest {})
        .await
        .unwrap();
    let connected = server.alive_tasks();
    drop(client);
    settle("the warm-up connection's task ends", server, || {
        server.alive_tasks() < connected
    })
    .await;
    server.alive_tasks()
}

/// Asserts that nothing of any call is left: gauges at zero, every worker free, live tasks at the
/// idle baseline.
async fn assert_recovered(server: &TestServer, baseline: usize) {
    let workers = server.engine.limits().workers as u64;
    settle(
        "no call, job or buffered result is left and every worker is free",
        server,
        || server.is_idle() && server.stats().free_workers == workers,
    )
    .await;
    settle(
        "the server's live tasks are back to the idle baseline",
        server,
        || server.alive_tasks() == baseline,
    )
    .await;
    // Every admitted job is accounted for: finished with a result, or cancelled with its call.
    let s = server.stats();
    let finished: u64 = s.finished.iter().sum::<u64>() - s.finished(EngineOutcome::Rejected);
    assert_eq!(
        s.jobs_admitted, finished,
        "admitted jobs that never finished: {s:?}"
    );
}

/// Runs a short echo call to completion: the server still serves.
async fn assert_serves(server: &TestServer) {
    let mut client = server.client().await;
    let mut call = OpenCall::open(&mut client).await;
    let jobs = (0..10)
        .map(|i| job(&format!("e{i}"), "echo", b"hi", &[]))
        .collect();
    call.send(batch("check", jobs)).await;
    call.half_close();
    let (results, status) = tokio::time::timeout(LIVENESS, call.finish())
        .await
        .expect("a fresh call completes");
    status.unwrap();
    let results = by_id(results);
    assert_eq!(results.len(), 10);
    assert!(results.values().all(|r| outcome(r) == Outcome::Ok));
}

/// Starts `n` sleep jobs of 60 s on a new call and waits until `running` of them run.
async fn park_jobs(
    server: &TestServer,
    client: &mut BatchServiceClient<Channel>,
    n: usize,
    running: u64,
) -> OpenCall {
    let call = OpenCall::open(client).await;
    call.send(batch("b", sleeps("j", n, 60_000))).await;
    let queued = n as u64 - running;
    settle(
        &format!("{running} jobs run and {queued} wait"),
        server,
        || {
            let s = server.stats();
            s.jobs_running == running && s.jobs_queued == queued
        },
    )
    .await;
    call
}

async fn health_client(server: &TestServer) -> HealthClient<Channel> {
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
}

async fn health_status(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let res = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(res.status).unwrap()
}

/// Reads a health Watch stream until it reports `want`.
async fn watch_until(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    want: ServingStatus,
) {
    let wait = async {
        loop {
            let msg = watch
                .message()
                .await
                .expect("the health watch fails")
                .expect("the health watch ends");
            if ServingStatus::try_from(msg.status).unwrap() == want {
                return;
            }
        }
    };
    tokio::time::timeout(LIVENESS, wait)
        .await
        .unwrap_or_else(|_| panic!("health never reported {want:?}"));
}

/// Whether `status` comes from the connection being refused or reset, rather than from the server.
fn connection_refused(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
            );
        }
        source = e.source();
    }
    false
}

/// Asserts that a new call on a new connection is refused: either the connection (refused or
/// reset) or the call (UNAVAILABLE).
async fn assert_new_call_refused(url: String) {
    let attempt = async {
        let mut client = match BatchServiceClient::connect(url).await {
            Ok(c) => c,
            Err(_) => return Ok(()), // connection refused: the listener is closed
        };
        let (_tx, rx) = tokio::sync::mpsc::channel::<proto::ProcessRequest>(1);
        let request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let status = match client.process(request).await {
            Err(status) => status,
            // The call may be refused with its first message rather than its headers.
            Ok(response) => match response.into_inner().message().await {
                Err(status) => status,
                Ok(msg) => return Err(format!("the call was accepted: {msg:?}")),
            },
        };
        if status.code() == Code::Unavailable || connection_refused(&status) {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    };
    let res = tokio::time::timeout(LIVENESS, attempt)
        .await
        .expect("a new call during shutdown is answered");
    if let Err(e) = res {
        panic!("a new call during shutdown must be refused (UNAVAILABLE or no connection): {e}");
    }
}

/// A TCP proxy in front of the server, which can reset its connections or freeze them silently.
struct Proxy {
    addr: SocketAddr,
    reset: CancellationToken,
    freeze: CancellationToken,
    /// Frozen connections, kept open (and silent) until the proxy is dropped.
    frozen: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Self {
            addr,
            reset: CancellationToken::new(),
            freeze: CancellationToken::new(),
            frozen: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (reset, freeze, frozen, stop) = (
            proxy.reset.clone(),
            proxy.freeze.clone(),
            Arc::clone(&proxy.frozen),
            proxy.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    () = stop.cancelled() => return,
                    conn = listener.accept() => conn.unwrap(),
                };
                let mut server = TcpStream::connect(target).await.unwrap();
                let (reset, freeze, frozen, stop) = (
                    reset.clone(),
                    freeze.clone(),
                    Arc::clone(&frozen),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = stop.cancelled() => {}
                        () = reset.cancelled() => {
                            // SO_LINGER 0: closing sends RST instead of FIN, both ways.
                            server.set_zero_linger().unwrap();
                            client.set_zero_linger().unwrap();
                        }
                        () = freeze.cancelled() => frozen.lock().unwrap().push((client, server)),
                    }
                });
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.frozen.lock().unwrap().clear();
    }
}

// === disconnects ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_flight_stops_every_running_and_queued_job() {
    let server = TestServer::start(|c| c.workers = 8);
    let baseline = idle_tasks(&server).await;

    let mut client = server.client().await;
    let call = park_jobs(&server, &mut client, 108, 8).await;
    assert_eq!(server.stats().free_workers, 0);
    assert!(
        server.alive_tasks() > baseline,
        "the open call and its connection have live tasks"
    );

    // The whole client goes: request sender, response stream and channel.
    drop(call);
    drop(client);
    assert_recovered(&server, baseline).await;
    assert_eq!(
        server.stats().finished(EngineOutcome::Ok),
        0,
        "no 60 s job ran to its end"
    );
    assert_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_batch_dropped_mid_flight_stops_its_jobs() {
    let server = TestServer::start(|c| c.workers = 8);
    let baseline = idle_tasks(&server).await;

    let mut client = server.client().await;
    let results = client
        .run_batch(proto::JobBatch {
            batch_id: "b".into(),
            jobs: sleeps("j", 20, 60_000),
        })
        .await
        .unwrap()
        .into_inner();
    settle("8 jobs run and 12 wait", &server, || {
        let s = server.stats();
        s.jobs_running == 8 && s.jobs_queued == 12
    })
    .await;

    drop(results);
    drop(client);
    assert_recovered(&server, baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_with_its_runtime_stops_every_job() {
    let server = TestServer::start(|c| c.workers = 8);
    let baseline = idle_tasks(&server).await;

    // The client lives in its own runtime on its own thread, like another process. Shutting that
    // runtime down kills its connection without the client dropping its call first.
    let url = server.url();
    let engine = server.engine.clone();
    let client_thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let held = runtime.block_on(async move {
            let mut client = BatchServiceClient::connect(url).await.unwrap();
            let call = OpenCall::open(&mut client).await;
            call.send(batch("b", sleeps("j", 108, 60_000))).await;
            wait_until("8 jobs run and 100 wait", LIVENESS, || {
                let s = engine.stats();
                s.jobs_running == 8 && s.jobs_queued == 100
            })
            .await;
            (client, call)
        });
        drop(runtime);
        held
    });
    let held = tokio::task::spawn_blocking(move || client_thread.join().unwrap())
        .await
        .unwrap();

    assert_recovered(&server, baseline).await;
    drop(held);
    assert_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_stops_every_job() {
    let server = TestServer::start(|c| c.workers = 8);
    let baseline = idle_tasks(&server).await;
    let proxy = Proxy::start(server.addr).await;

    let mut client = BatchServiceClient::connect(proxy.url()).await.unwrap();
    let call = park_jobs(&server, &mut client, 108, 8).await;
    proxy.reset.cancel(); // RST on the server's side of the connection

    assert_recovered(&server, baseline).await;
    drop((call, client, proxy));
    assert_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_that_vanishes_silently_is_caught_by_keepalive() {
    // The timeout also applies to the healthy connections of the test (before the freeze, and in
    // `assert_serves`): it must exceed any stall of this process on a busy machine, or a pong that is
    // merely late closes a connection the test still uses.
    let server = TestServer::start(|c| {
        c.workers = 8;
        c.keepalive_interval = Duration::from_millis(100);
        c.keepalive_timeout = Duration::from_secs(5);
    });
    let baseline = idle_tasks(&server).await;
    let proxy = Proxy::start(server.addr).await;

    let mut client = BatchServiceClient::connect(proxy.url()).await.unwrap();
    let call = park_jobs(&server, &mut client, 20, 8).await;
    // No FIN, no RST: the connection stays open and goes silent, pings are never answered.
    proxy.freeze.cancel();

    assert_recovered(&server, baseline).await;
    drop((call, client, proxy));
    assert_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_keepalive_interval_does_not_disturb_healthy_calls() {
    let server = TestServer::start(|c| {
        c.keepalive_interval = Duration::from_millis(20);
        // Only the interval is under test: a late pong on a busy machine must not end the call.
        c.keepalive_timeout = Duration::from_secs(60);
    });
    let mut client = server.client().await;
    let mut call = OpenCall::open(&mut client).await;
    // Jobs that span many ping intervals, then an echo on the same, still healthy connection.
    call.send(batch("b", sleeps("s", 4, 300))).await;
    call.send(batch("c", vec![job("e", "echo", b"still here", &[])]))
        .await;
    call.half_close();
    let (results, status) = tokio::time::timeout(LIVENESS, call.finish()).await.unwrap();
    status.unwrap();
    let results = by_id(results);
    assert_eq!(results.len(), 5);
    assert!(results.values().all(|r| outcome(r) == Outcome::Ok));
    assert_eq!(&results["e"].output[..], b"still here");
}

// === many aborted calls ===

#[derive(Debug, Clone, Copy)]
enum Abort {
    /// Drop the call while `OpenCall::open` is still waiting, after this long.
    WhileOpening(Duration),
    /// Drop everything this long after the last batch was sent.
    AfterDelay(Duration),
    /// Drop everything after this many results were read.
    AfterResults(usize),
}

struct Plan {
    batches: Vec<proto::ProcessRequest>,
    abort: Abort,
    own_connection: bool,
}

fn plan(i: usize, rng: &mut StdRng) -> Plan {
    let n_batches = rng.random_range(1..=3);
    let mut jobs_total = 0;
    let batches = (0..n_batches)
        .map(|b| {
            let n = rng.random_range(1..=15);
            jobs_total += n;
            let jobs = (0..n)
                .map(|j| {
                    let id = format!("c{i}b{b}j{j}");
                    match rng.random_range(0..3) {
                        0 => job(&id, "echo", &vec![b'x'; rng.random_range(0..256)], &[]),
                        1 => {
                            let ms = rng.random_range(0..=40u32).to_string();
                            job(&id, "sleep", b"", &[("ms", &ms)])
                        }
                        _ => {
                            let ms = rng.random_range(0..=3u32).to_string();
                            job(&id, "spin", b"", &[("ms", &ms)])
                        }
                    }
                })
                .collect();
            batch(&format!("b{b}"), jobs)
        })
        .collect();
    let abort = match rng.random_range(0..10) {
        0 => Abort::WhileOpening(Duration::from_micros(rng.random_range(0..2_000))),
        1..=6 => Abort::AfterDelay(Duration::from_millis(rng.random_range(0..=20))),
        _ => Abort::AfterResults(rng.random_range(1..=jobs_total)),
    };
    Plan {
        batches,
        abort,
        own_connection: rng.random_bool(0.25),
    }
}

/// Runs one call as planned, then drops it (and its connection when it has its own).
async fn aborted_call(plan: Plan, shared: BatchServiceClient<Channel>, url: String) {
    let mut client = if plan.own_connection {
        BatchServiceClient::connect(url).await.unwrap()
    } else {
        shared
    };
    let mut call = match plan.abort {
        Abort::WhileOpening(after) => {
            // The abort moment is the thing under test here, not a synchronisation.
            let _ = tokio::time::timeout(after, OpenCall::open(&mut client)).await;
            return;
        }
        _ => OpenCall::open(&mut client).await,
    };
    for b in plan.batches {
        call.send(b).await;
    }
    match plan.abort {
        Abort::WhileOpening(_) => unreachable!(),
        Abort::AfterDelay(after) => tokio::time::sleep(after).await,
        Abort::AfterResults(n) => {
            let results = tokio::time::timeout(LIVENESS, call.collect(n))
                .await
                .expect("results of a live call arrive")
                .expect("a live call does not fail");
            assert!(results.len() >= n, "the call ended early");
            by_id(results); // no job has two results
        }
    }
    drop(call);
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_calls_aborted_at_random_moments_leave_nothing_behind() {
    const CALLS: usize = 1000;
    const AT_ONCE: usize = 50;
    let server = TestServer::start(|c| {
        c.workers = 16;
        c.cpu_workers = 2;
    });
    let baseline = idle_tasks(&server).await;

    let seed = std::env::var("BATCHD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("seed {seed} (set BATCHD_TEST_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut shared = Vec::new();
    for _ in 0..4 {
        shared.push(server.client().await);
    }
    let slots = Arc::new(Semaphore::new(AT_ONCE));
    let mut calls = tokio::task::JoinSet::new();
    let mut peak_open = 0;
    for i in 0..CALLS {
        let slot = Arc::clone(&slots).acquire_owned().await.unwrap();
        peak_open = peak_open.max(server.stats().calls_open);
        let plan = plan(i, &mut rng);
        let client = shared[i % shared.len()].clone();
        let url = server.url();
        calls.spawn(async move {
            aborted_call(plan, client, url).await;
            drop(slot);
        });
        while let Some(done) = calls.try_join_next() {
            done.unwrap();
        }
    }
    let all_done = async {
        while let Some(done) = calls.join_next().await {
            done.unwrap();
        }
    };
    tokio::time::timeout(LIVENESS * 3, all_done)
        .await
        .expect("every planned call ends");
    drop(shared);

    assert!(peak_open > 1, "calls overlapped (peak {peak_open})");
    // No call sends CancelJobs: every cancelled job was cut off by its call's abort.
    let s = server.stats();
    let cut_off = s.finished(EngineOutcome::Cancelled);
    eprintln!("{} jobs admitted, {cut_off} cut off", s.jobs_admitted);
    assert!(
        cut_off > 0,
        "no call was aborted with jobs in flight: {s:?}"
    );
    assert_recovered(&server, baseline).await;
    assert_serves(&server).await;
}

// === backpressure ===

const WINDOW: u64 = 64;

/// Floods a new call with echo jobs and never reads a result; asserts the server's bounds once the
/// client is blocked. Returns the client and its call, still open.
async fn flood_without_reading(
    url: String,
    engine: batchd::Engine,
) -> (BatchServiceClient<Channel>, OpenCall) {
    const PER_BATCH: usize = 32;
    let mut client = BatchServiceClient::connect(url).await.unwrap();
    let call = OpenCall::open(&mut client).await;
    let tx = call.tx.as_ref().unwrap();
    let payload = vec![7u8; 1024];
    // The gauges are read one by one while the session moves jobs between them, so only each one
    // alone is bounded while jobs flow; their sum is checked once everything stands still.
    let mut peak = batchd::engine::Stats::default();
    let mut sample = |s: batchd::engine::Stats| {
        peak.jobs_queued = peak.jobs_queued.max(s.jobs_queued);
        peak.jobs_running = peak.jobs_running.max(s.jobs_running);
        peak.results_buffered = peak.results_buffered.max(s.results_buffered);
    };

    // Send until the server stops reading. A send that makes no progress for a second may only mean
    // a slow machine: the server has stopped once two such sends in a row leave its state unchanged
    // (a send blocks only while the call's channel is full, so the client has sent more than the
    // server took). Waiting that out is bounded, and so is sending.
    let mut sent = 0usize;
    let mut n = 0;
    let mut blocked_sends = 0;
    let mut blocked_at: Option<batchd::engine::Stats> = None;
    let later = loop {
        let jobs = (0..PER_BATCH)
            .map(|k| job(&format!("{n}-{k}"), "echo", &payload, &[]))
            .collect();
        n += 1;
        match tokio::time::timeout(Duration::from_secs(1), tx.send(batch("b", jobs))).await {
            Ok(Ok(())) => {
                sent += PER_BATCH;
                blocked_at = None;
            }
            Ok(Err(_)) => panic!("the call ended while the client was sending"),
            Err(_) => {
                let now = engine.stats();
                sample(now);
                if blocked_at == Some(now) {
                    break now;
                }
                blocked_at = Some(now);
                blocked_sends += 1;
                assert!(
                    blocked_sends < 60,
                    "the server neither read on nor stood still ({blocked_sends} sends blocked)"
                );
            }
        }
        sample(engine.stats());
        assert!(
            sent < 1_000_000,
            "the server kept reading a client that never reads ({sent} jobs sent)"
        );
    };
    eprintln!(
        "client blocked after {sent} jobs sent; server admitted {}",
        later.jobs_admitted
    );
    assert!(
        (later.jobs_admitted as usize) < sent,
        "the server admitted {} of {sent} jobs sent: it must leave the rest to flow control",
        later.jobs_admitted
    );
    assert!(
        later.jobs_queued + later.jobs_running + later.results_buffered <= WINDOW,
        "the call holds more than its window of {WINDOW}: {later:?}"
    );
    assert!(
        peak.jobs_queued <= WINDOW
            && peak.jobs_running <= WINDOW
            && peak.results_buffered <= WINDOW,
        "a gauge went over the window of {WINDOW}: peaks {peak:?}"
    );
    assert_eq!(later.calls_open, 1);
    (client, call)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_held_to_the_session_window() {
    let server = TestServer::start(|c| c.session_window = WINDOW as usize);
    let baseline = idle_tasks(&server).await;

    // The client runs on its own runtime, and goes away by shutting it down: dropping a call whose
    // request body is stuck behind flow control does not reset the stream (hyper's body pipe keeps
    // it), so only the end of the client's connection tells the server it is gone.
    let (url, engine) = (server.url(), server.engine.clone());
    let client_thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let held = runtime.block_on(flood_without_reading(url, engine));
        drop(runtime);
        held
    });
    let held = tokio::task::spawn_blocking(move || client_thread.join())
        .await
        .unwrap()
        .unwrap_or_else(|_| panic!("the flooding client failed (see its panic above)"));

    assert_recovered(&server, baseline).await;
    drop(held);
}

// === fairness ===

/// A handler that logs each job's payload when it starts, then waits for a permit.
struct Gate {
    permits: Arc<Semaphore>,
    started: Arc<Mutex<Vec<Bytes>>>,
}

#[async_trait::async_trait]
impl Handler for Gate {
    fn description(&self) -> &str {
        "test: records its start, then waits for the test to let it finish"
    }

    async fn run(
        self: Arc<Self>,
        input: JobInput,
        _ctx: JobContext,
    ) -> Result<Bytes, HandlerError> {
        self.started.lock().unwrap().push(input.payload.clone());
        self.permits
            .acquire()
            .await
            .map_err(|e| HandlerError(e.to_string()))?
            .forget();
        Ok(input.payload)
    }
}

/// Payloads of the gated jobs, in the order they started.
type Started = Arc<Mutex<Vec<Bytes>>>;

/// A server configured by `edit` with a `gate` handler closed until the test adds permits.
fn gated_server(
    edit: impl FnOnce(&mut batchd::config::Config),
) -> (TestServer, Arc<Semaphore>, Started) {
    let permits = Arc::new(Semaphore::new(0));
    let started = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::builtin();
    registry.register(
        "gate",
        Gate {
            permits: Arc::clone(&permits),
            started: Arc::clone(&started),
        },
    );
    (TestServer::start_with(edit, registry), permits, started)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_call_is_not_starved_by_a_greedy_one() {
    let (server, permits, started) = gated_server(|c| {
        c.workers = 2;
        c.session_window = 2048;
    });
    let gated = |prefix: &str, n: usize| -> Vec<proto::Job> {
        (0..n)
            .map(|i| job(&format!("{prefix}{i}"), "gate", prefix.as_bytes(), &[]))
            .collect()
    };

    // A fills both workers and queues 998 more.
    let mut client_a = server.client().await;
    let mut a = OpenCall::open(&mut client_a).await;
    a.send(batch("a", gated("a", 1000))).await;
    settle("A holds both workers", &server, || {
        server.stats().jobs_running == 2 && started.lock().unwrap().len() == 2
    })
    .await;

    // B arrives with 20 jobs while A's 998 wait.
    let mut client_b = server.client().await;
    let mut b = OpenCall::open(&mut client_b).await;
    b.send(batch("b", gated("b", 20))).await;
    settle("B's jobs are admitted", &server, || {
        server.stats().jobs_admitted == 1020
    })
    .await;
    assert_eq!(started.lock().unwrap().len(), 2, "nothing ran ahead");

    // Let jobs finish as fast as they can, A's results read concurrently.
    let a_results = Arc::new(AtomicUsize::new(0));
    let a_count = Arc::clone(&a_results);
    let reader = tokio::spawn(async move {
        a.half_close();
        while let Ok(Some(msg)) = a.rx.message().await {
            a_count.fetch_add(msg.results.len(), Ordering::Relaxed);
        }
    });
    // One job finishes at a time, so each freed slot goes to exactly one next job: the order of
    // starts is the scheduler's order of grants, whatever the threads' timing.
    let b_started = || {
        started
            .lock()
            .unwrap()
            .iter()
            .filter(|p| &p[..] == b"b")
            .count()
    };
    let step = || async {
        let before = started.lock().unwrap().len();
        permits.add_permits(1);
        settle("the freed slot starts the next job", &server, || {
            started.lock().unwrap().len() > before
        })
        .await;
    };
    while b_started() < 20 {
        step().await;
    }
    // The two jobs holding the workers (B's last among them) finish; A's next ones start.
    step().await;
    step().await;
    let b_results = tokio::time::timeout(LIVENESS, b.collect(20))
        .await
        .expect("B's results arrive")
        .unwrap();
    let a_when_b_done = a_results.load(Ordering::Relaxed);
    permits.add_permits(1020);
    let b_results = by_id(b_results);
    assert_eq!(b_results.len(), 20);
    assert!(b_results.values().all(|r| outcome(r) == Outcome::Ok));

    // The order in which the scheduler started jobs: B took every other freed slot.
    let order = started.lock().unwrap().clone();
    let last_b = order.iter().rposition(|p| &p[..] == b"b").unwrap();
    let a_before_last_b = order[..last_b].iter().filter(|p| &p[..] == b"a").count();
    assert!(
        a_before_last_b <= 2 + 20 + 2,
        "round-robin starts B's 20 jobs within about 22 of A's; {a_before_last_b} of A's 1000 started first"
    );
    assert!(
        a_when_b_done < 1000,
        "B finished before A (A had {a_when_b_done} results)"
    );

    tokio::time::timeout(LIVENESS, reader)
        .await
        .expect("A finishes")
        .unwrap();
    assert_eq!(a_results.load(Ordering::Relaxed), 1000);
}

// === health and shutdown ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_from_serving_to_not_serving_on_shutdown() {
    let server = TestServer::start(|_| {});
    let mut health = health_client(&server).await;
    for service in ["", "batchd.v1.BatchService"] {
        assert_eq!(
            health_status(&mut health, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let mut watches = Vec::new();
    for service in ["", "batchd.v1.BatchService"] {
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        watch_until(&mut watch, ServingStatus::Serving).await;
        watches.push(watch);
    }

    server.begin_shutdown();
    for watch in &mut watches {
        watch_until(watch, ServingStatus::NotServing).await;
    }
    drop(watches);
    drop(health);
    tokio::time::timeout(LIVENESS, server.join())
        .await
        .expect("serve returns")
        .unwrap();
}

async fn graceful_shutdown_lets_running_jobs_finish(half_close: bool) {
    // The jobs wait at a gate that the test opens once shutdown has begun: they run for as long as
    // the test takes to look, however slowly it gets there. The grace period only bounds the test.
    let (server, permits, started) = gated_server(|c| c.shutdown_grace = Duration::from_secs(60));
    let mut health = health_client(&server).await;
    let mut watch = health
        .watch(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut watch, ServingStatus::Serving).await;

    let mut client = server.client().await;
    let mut call = OpenCall::open(&mut client).await;
    let gated = (0..4)
        .map(|i| job(&format!("j{i}"), "gate", b"j", &[]))
        .collect();
    call.send(batch("b", gated)).await;
    // Kept only for the call that stays open: a clone would keep the send side open.
    let late_sender = if half_close {
        call.half_close();
        None
    } else {
        call.tx.clone()
    };
    settle("the 4 jobs run", &server, || {
        server.stats().jobs_running == 4 && started.lock().unwrap().len() == 4
    })
    .await;

    server.begin_shutdown();
    watch_until(&mut watch, ServingStatus::NotServing).await;
    drop((watch, health));
    assert_new_call_refused(server.url()).await;
    if let Some(tx) = late_sender {
        // The call is draining: what it sends now is not run.
        let _ = tx.send(batch("late", sleeps("late", 2, 1))).await;
    }
    assert_eq!(
        server.stats().jobs_running,
        4,
        "shutdown lets the running jobs run"
    );
    permits.add_permits(4);

    let (results, status) = tokio::time::timeout(LIVENESS, call.finish())
        .await
        .expect("the call ends");
    let results = by_id(results);
    for i in 0..4 {
        let r = &results[&format!("j{i}")];
        assert_eq!(outcome(r), Outcome::Ok, "running jobs finish: {r:?}");
    }
    assert!(
        results
            .values()
            .all(|r| r.batch_id != "late" || outcome(r) != Outcome::Ok),
        "jobs sent after shutdown began were run: {results:?}"
    );
    if half_close {
        status.expect("a half-closed call whose jobs all finished ends OK");
    } else {
        let status = status.expect_err("a call still open at shutdown ends with a status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    drop((call, client));
    tokio::time::timeout(LIVENESS, server.join())
        .await
        .expect("serve returns once the call has ended")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_mid_job_finishes_the_jobs_then_ends_an_open_call_unavailable() {
    graceful_shutdown_lets_running_jobs_finish(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_mid_job_finishes_the_jobs_then_ends_a_half_closed_call_ok() {
    graceful_shutdown_lets_running_jobs_finish(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_call_during_shutdown_is_refused_while_open_calls_drain() {
    let server = TestServer::start(|c| c.shutdown_grace = Duration::from_secs(30));
    let mut health = health_client(&server).await;
    let mut watch = health
        .watch(HealthCheckRequest { service: "".into() })
        .await
        .unwrap()
        .into_inner();
    watch_until(&mut watch, ServingStatus::Serving).await;
    let mut client = server.client().await;
    let call = park_jobs(&server, &mut client, 4, 4).await;

    server.begin_shutdown();
    watch_until(&mut watch, ServingStatus::NotServing).await;
    assert_new_call_refused(server.url()).await;
    // Refused while the open call still drains, not once it is over.
    assert_eq!(
        server.stats().jobs_running,
        4,
        "the new call was answered only after the open call had ended"
    );
    drop((watch, health, call, client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_grace_period_expires_unfinished_jobs_are_cancelled() {
    let server = TestServer::start(|c| {
        c.workers = 2;
        c.shutdown_grace = Duration::from_millis(200);
    });
    let mut client = server.client().await;
    let mut call = park_jobs(&server, &mut client, 4, 2).await;

    let began = Instant::now();
    server.begin_shutdown();
    let (results, status) = tokio::time::timeout(LIVENESS, call.finish())
        .await
        .expect("the call ends after the grace period");
    let results = by_id(results);
    assert_eq!(results.len(), 4, "one result per job, running or queued");
    for r in results.values() {
        assert_eq!(outcome(r), Outcome::Cancelled, "{r:?}");
        assert!(!r.error.is_empty());
    }
    let status = status.expect_err("the call ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    drop((call, client));
    let engine = server.engine.clone();
    tokio::time::timeout(LIVENESS, server.join())
        .await
        .expect("serve returns well before the 60 s jobs would have")
        .unwrap();
    eprintln!("serve returned {:?} after shutdown began", began.elapsed());
    let s = engine.stats();
    assert_eq!(
        (
            s.calls_open,
            s.jobs_running,
            s.jobs_queued,
            s.results_buffered
        ),
        (0, 0, 0, 0)
    );
}
