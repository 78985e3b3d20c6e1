//! "Nothing outlives the call that asked for it", checked through the engine's live counters and
//! the server runtime's count of live tasks; and jobs parked in a call for the lifecycle tests.

use std::time::Duration;

use batchd::engine::Outcome as EngineOutcome;
use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, Outcome};
use tonic::transport::Channel;

use super::jobs::sleeps;
use super::{batch, by_id, job, outcome, wait_until, OpenCall, TestServer};

/// Generous deadline for anything that should happen "at once", even on a busy machine.
pub const LIVENESS: Duration = Duration::from_secs(30);

/// Waits until `cond` holds; on timeout, panics with the server's counters and live tasks.
pub async fn settle(what: &str, server: &TestServer, cond: impl FnMut() -> bool) {
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
pub async fn idle_tasks(server: &TestServer) -> usize {
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
pub async fn assert_recovered(server: &TestServer, baseline: usize) {
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
pub async fn assert_serves(server: &TestServer) {
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
pub async fn park_jobs(
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
