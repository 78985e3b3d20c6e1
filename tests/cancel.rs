//! CancelJobs: by id or by whole batch, running or queued, and harmless for unknown or finished jobs.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use batchd::proto::Outcome;
use support::jobs::*;
use support::*;

#[tokio::test]
async fn cancel_running_jobs_by_id() {
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    call.send(batch(
        "a",
        vec![
            sleep_job("a1", 60_000),
            sleep_job("a2", 60_000),
            sleep_job("a3", 60_000),
        ],
    ))
    .await;
    call.send(batch("b", vec![sleep_job("b1", 60_000)])).await;
    wait_until("four jobs run", WAIT, || server.stats().jobs_running == 4).await;

    call.send(cancel("a", &["a1", "a2"])).await;
    let results = by_id(call.results(2, WAIT).await);
    assert_eq!(results.len(), 2, "{results:?}");
    for id in ["a1", "a2"] {
        let r = &results[id];
        assert_eq!(outcome(r), Outcome::Cancelled, "{r:?}");
        assert!(!r.error.is_empty(), "{r:?}");
        assert!(r.output.is_empty(), "{r:?}");
        assert_eq!(r.batch_id, "a");
        assert_admitted_times(r);
    }
    assert_eq!(server.stats().jobs_running, 2, "a3 and b1 still run");

    // A job id named with the wrong batch is not cancelled.
    call.send(cancel("a", &["b1"])).await;
    call.send(cancel("a", &["a3"])).await;
    let results = call.results(1, WAIT).await;
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0].job_id, "a3");
    assert_eq!(outcome(&results[0]), Outcome::Cancelled);
    assert_eq!(server.stats().jobs_running, 1, "b1 still runs");

    call.send(cancel("b", &["b1"])).await;
    call.half_close();
    let rest = call.finish_ok(WAIT).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].job_id, "b1");
    assert_eq!(outcome(&rest[0]), Outcome::Cancelled);
    all_idle(&server).await;
}

#[tokio::test]
async fn cancel_whole_batch_leaves_other_batches_alone() {
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    call.send(batch(
        "a",
        vec![
            sleep_job("x1", 60_000),
            sleep_job("x2", 60_000),
            sleep_job("x3", 60_000),
        ],
    ))
    .await;
    call.send(batch(
        "b",
        vec![sleep_job("y1", 1_000), sleep_job("y2", 1_000)],
    ))
    .await;
    wait_until("five jobs run", WAIT, || server.stats().jobs_running == 5).await;

    call.send(cancel("a", &[])).await;
    let results = read_until_ids(&mut call, &["x1", "x2", "x3"]).await;
    for r in &results {
        match r.batch_id.as_str() {
            "a" => assert_eq!(outcome(r), Outcome::Cancelled, "{r:?}"),
            _ => assert_eq!(outcome(r), Outcome::Ok, "batch b was touched: {r:?}"),
        }
    }

    call.half_close();
    let rest = call.finish_ok(WAIT).await;
    let all = by_id(results.into_iter().chain(rest).collect());
    assert_eq!(all.len(), 5);
    for id in ["y1", "y2"] {
        assert_eq!(
            outcome(&all[id]),
            Outcome::Ok,
            "a job of another batch was affected: {:?}",
            all[id]
        );
        assert_eq!(&all[id].output[..], id.as_bytes());
    }
    all_idle(&server).await;
}

#[tokio::test]
async fn cancel_queued_jobs_never_runs_them() {
    let server = TestServer::start(|c| c.workers = 1);
    let mut call = server.open_call().await;
    call.send(batch(
        "q",
        vec![
            sleep_job("blocker", 60_000),
            echo_job("q1", b"1"),
            echo_job("q2", b"2"),
            echo_job("q3", b"3"),
        ],
    ))
    .await;
    wait_until("one job runs and three wait", WAIT, || {
        let s = server.stats();
        s.jobs_running == 1 && s.jobs_queued == 3
    })
    .await;

    call.send(cancel("q", &["q1", "q2", "q3"])).await;
    let results = by_id(call.results(3, WAIT).await);
    assert_eq!(results.len(), 3, "{results:?}");
    for id in ["q1", "q2", "q3"] {
        let r = &results[id];
        assert_eq!(outcome(r), Outcome::Cancelled, "{r:?}");
        assert!(
            r.output.is_empty(),
            "a cancelled queued job produced output"
        );
        assert!(r.queued.is_some(), "{r:?}");
        assert!(is_zero(&r.ran), "a queued job never ran: {r:?}");
    }
    let s = server.stats();
    assert_eq!((s.jobs_running, s.jobs_queued), (1, 0));

    // A cancelled job is finished: its id may be used again, and the new job runs once a worker is
    // free (not the cancelled one it replaces).
    call.send(batch("again", vec![echo_job("q2", b"2 again")]))
        .await;
    wait_until("the new q2 waits", WAIT, || server.stats().jobs_queued == 1).await;

    // Cancel the blocker: the only worker must be free again for new work.
    call.send(cancel("q", &["blocker"])).await;
    let r = by_id(read_until_ids(&mut call, &["blocker", "q2"]).await);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(outcome(&r["blocker"]), Outcome::Cancelled);
    assert_eq!(outcome(&r["q2"]), Outcome::Ok, "{:?}", r["q2"]);
    assert_eq!(&r["q2"].output[..], b"2 again");
    assert_eq!(r["q2"].batch_id, "again");
    call.send(batch("after", vec![echo_job("next", b"n")]))
        .await;
    let r = call.results(1, WAIT).await;
    assert_eq!(r[0].job_id, "next");
    assert_eq!(outcome(&r[0]), Outcome::Ok);
    call.half_close();
    let rest = call.finish_ok(WAIT).await;
    assert!(rest.is_empty(), "{rest:?}");
    all_idle(&server).await;
    assert_eq!(server.stats().free_workers, 1);
}

#[tokio::test]
async fn cancelling_unknown_or_finished_jobs_is_harmless() {
    let server = TestServer::start(|_| {});
    let mut call = server.open_call().await;
    call.send(batch("b", vec![echo_job("done", b"d")])).await;
    let r = call.results(1, WAIT).await;
    assert_eq!(outcome(&r[0]), Outcome::Ok);

    call.send(cancel("b", &["done", "ghost"])).await;
    call.send(cancel("no-such-batch", &[])).await;
    call.send(cancel("", &[])).await;
    call.send(cancel("b", &[])).await;
    call.send(batch("b", vec![echo_job("after", b"a")])).await;
    call.half_close();
    let rest = by_id(call.finish_ok(WAIT).await);
    assert_eq!(rest.len(), 1, "only the new job has a result: {rest:?}");
    assert_eq!(outcome(&rest["after"]), Outcome::Ok);
    assert_eq!(
        server.stats().finished(batchd::engine::Outcome::Cancelled),
        0
    );
}
