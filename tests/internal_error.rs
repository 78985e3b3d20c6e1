//! A call whose session ends without a status (a bug in batchd, here a handler that panics inside
//! the session) ends with gRPC INTERNAL, never OK and never a hang, and the daemon goes on serving
//! with nothing of the broken call left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::sync::Arc;

use batchd::handlers::{Handler, HandlerError, JobContext, JobInput};
use batchd::proto::Outcome;
use batchd::Registry;
use bytes::Bytes;
use support::jobs::*;
use support::*;
use tonic::Code;

/// A handler with a bug: it panics when it runs, inside the session that polls it.
struct Panics;

#[async_trait::async_trait]
impl Handler for Panics {
    fn description(&self) -> &str {
        "test: panics when it runs"
    }

    async fn run(
        self: Arc<Self>,
        _input: JobInput,
        _ctx: JobContext,
    ) -> Result<Bytes, HandlerError> {
        panic!("test: a handler with a bug (this panic is expected)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_ends_without_a_status_ends_its_call_internal() {
    let mut registry = Registry::builtin();
    registry.register("panics", Panics);
    // One worker: the calls after the broken one run only if its slot came back.
    let server = TestServer::start_with(|c| c.workers = 1, registry);
    let mut client = server.client().await;

    // A bystander on the same connection, open all along.
    let mut bystander = OpenCall::open(&mut client).await;
    bystander
        .send(batch("before", vec![echo_job("before", b"1")]))
        .await;
    assert_eq!(outcome(&bystander.results(1, WAIT).await[0]), Outcome::Ok);

    let mut call = OpenCall::open(&mut client).await;
    call.send(batch(
        "b",
        vec![
            echo_job("ok", b"fine"),
            job("boom", "panics", b"", &[]),
            sleep_job("after", 60_000),
        ],
    ))
    .await;
    let (results, status) = call.finish_err(Code::Internal, WAIT).await;
    assert!(
        results
            .iter()
            .all(|r| r.job_id != "boom" && r.job_id != "after"),
        "no result for the jobs the broken session held: {results:?}"
    );
    eprintln!("{} result(s) before {status:?}", results.len());

    // Nothing of the broken call is left: no job or result, the bystander is the only call open,
    // and the only worker is free.
    wait_until("only the bystander is left, holding nothing", WAIT, || {
        let s = server.stats();
        (
            s.calls_open,
            s.jobs_running,
            s.jobs_queued,
            s.results_buffered,
        ) == (1, 0, 0, 0)
    })
    .await;
    wait_until("the worker is free", WAIT, || {
        server.stats().free_workers == 1
    })
    .await;

    // The daemon goes on: the bystander and new calls (on this connection and a new one) are served.
    bystander
        .send(batch(
            "after",
            vec![sleep_job("nap", 1), echo_job("e", b"2")],
        ))
        .await;
    bystander.half_close();
    let results = by_id(bystander.finish_ok(WAIT).await);
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results.values().all(|r| outcome(r) == Outcome::Ok));
    let results = run_batch_on(&mut client, vec![echo_job("same", b"s")], WAIT).await;
    assert_eq!(outcome(&results["same"]), Outcome::Ok);
    let results = run_batch(&server, vec![sleep_job("new", 1)], WAIT).await;
    assert_eq!(outcome(&results["new"]), Outcome::Ok);
    all_idle(&server).await;
}
