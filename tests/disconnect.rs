//! A client that goes away (drops its call, drops a RunBatch, dies with its runtime, or has its
//! connection reset) stops every running and queued job of its calls, and nothing of them is left:
//! gauges at zero, every worker free, the server's live tasks back to the idle baseline.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use batchd::engine::Outcome as EngineOutcome;
use batchd::proto::{self, batch_service_client::BatchServiceClient};
use support::jobs::sleeps;
use support::proxy::Proxy;
use support::recovery::*;
use support::*;

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
