//! Graceful shutdown: health turns NOT_SERVING, new calls are refused while open calls drain, running
//! jobs finish (jobs sent after shutdown began are never read), and after `shutdown_grace` what is
//! left is cancelled and the call ends UNAVAILABLE.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::{Duration, Instant};

use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, Outcome};
use support::jobs::{recording_gated_server, sleeps};
use support::recovery::*;
use support::*;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

// === helpers ===

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

// === health ===

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

// === draining ===

async fn graceful_shutdown_lets_running_jobs_finish(half_close: bool) {
    // The jobs wait at a gate that the test opens once shutdown has begun: they run for as long as
    // the test takes to look, however slowly it gets there. The grace period only bounds the test.
    let (server, permits, started) =
        recording_gated_server(|c| c.shutdown_grace = Duration::from_secs(60));
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
    // README: a call draining at shutdown is not read any more, so what it sends then gets no
    // result at all (not even a REJECTED or CANCELLED one), and the call ends UNAVAILABLE below.
    let late: Vec<_> = results
        .values()
        .filter(|r| r.batch_id == "late" || r.job_id.starts_with("late"))
        .collect();
    assert!(
        late.is_empty(),
        "jobs sent after shutdown began were read: {late:?}"
    );
    assert_eq!(results.len(), 4, "only the 4 running jobs: {results:?}");
    assert_eq!(
        server.stats().jobs_admitted,
        4,
        "the jobs sent after shutdown began were never admitted"
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

// === the grace period ===

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
