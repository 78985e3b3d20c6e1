//! The daemon side of failover: a draining daemon hands a call that asks for it
//! (`batchd-drain: give-back`) the ids of the jobs it will not start, at once, and lists as
//! stopped the running ones the end of the grace cuts; a call that does not ask drains as before.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::HashSet;
use std::time::Duration;

use batchd::proto::{self, Outcome, GIVE_BACK_METADATA};
use support::recovery::LIVENESS;
use support::*;
use tonic::Code;

/// Everything a call got until its end: results, ids given back as not started and as stopped,
/// and the final status.
#[derive(Debug, Default)]
struct Ended {
    results: Vec<proto::JobResult>,
    not_started: Vec<String>,
    stopped: Vec<String>,
    /// How many responses carried jobs given back.
    notices: usize,
}

/// Reads the call to its end.
async fn read_to_end(call: &mut OpenCall) -> (Ended, Result<(), tonic::Status>) {
    let mut ended = Ended::default();
    let read = async {
        loop {
            match call.rx.message().await {
                Ok(Some(msg)) => ended.take(msg),
                Ok(None) => return Ok(()),
                Err(s) => return Err(s),
            }
        }
    };
    let status = within(LIVENESS, "the call ends", read).await;
    (ended, status)
}

impl Ended {
    fn take(&mut self, msg: proto::ProcessResponse) {
        self.results.extend(msg.results);
        if let Some(back) = msg.given_back {
            self.notices += 1;
            self.not_started.extend(back.not_started);
            self.stopped.extend(back.stopped);
        }
    }
}

/// Opens a call that asks for its unstarted jobs back at drain.
async fn give_back_call(server: &TestServer) -> OpenCall {
    let mut client = server.client().await;
    OpenCall::open_request(&mut client, |r| {
        let (key, value) = GIVE_BACK_METADATA;
        r.metadata_mut().insert(key, value.parse().unwrap());
    })
    .await
}

fn gates(prefix: &str, n: usize) -> Vec<proto::Job> {
    (0..n)
        .map(|i| job(&format!("{prefix}{i}"), "gate", b"g", &[]))
        .collect()
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> HashSet<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

fn set(v: &[String]) -> HashSet<String> {
    let s: HashSet<String> = v.iter().cloned().collect();
    assert_eq!(s.len(), v.len(), "an id listed twice: {v:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_asks_gets_its_unstarted_jobs_back_at_once_and_its_running_ones_finish() {
    // 2 workers and a window of 6: of a batch of 10, 2 run, 4 are queued and 4 not admitted yet.
    let (server, gate) = gated_server(|c| {
        c.workers = 2;
        c.session_window = 6;
        c.shutdown_grace = Duration::from_secs(60);
    });
    let mut call = give_back_call(&server).await;
    call.send(batch("b", gates("j", 10))).await;
    support::recovery::settle("2 jobs run and 4 wait", &server, || {
        let s = server.stats();
        s.jobs_running == 2 && s.jobs_queued == 4
    })
    .await;

    server.begin_shutdown();
    // At once, while the running jobs still wait at the gate: the 8 not started come back.
    let msg = call
        .next_message(LIVENESS)
        .await
        .expect("a message before the end");
    assert!(msg.results.is_empty(), "{msg:?}");
    let back = msg.given_back.expect("the jobs not started, given back");
    assert!(back.stopped.is_empty(), "{back:?}");
    assert_eq!(set(&back.not_started), ids("j", 2..10));
    assert_eq!(server.stats().jobs_queued, 0, "nothing left queued");
    assert_eq!(server.stats().jobs_running, 2, "the running jobs go on");

    // Sent once the drain began: never run; given back if the daemon read it before the end.
    call.send(batch("late", gates("late", 3))).await;
    call.half_close();
    gate.add_permits(2);
    let (rest, status) = read_to_end(&mut call).await;
    let ok: HashSet<String> = rest.results.iter().map(|r| r.job_id.clone()).collect();
    assert_eq!(ok, ids("j", 0..2), "the running jobs' results: {rest:?}");
    assert!(rest.results.iter().all(|r| outcome(r) == Outcome::Ok));
    match status {
        // It saw the half-close, so it saw the late batch first: handed back before the OK.
        Ok(()) => assert_eq!(set(&rest.not_started), ids("late", 0..3), "{rest:?}"),
        // It ended before they arrived: UNAVAILABLE says the jobs without a result did not run.
        Err(s) => {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            assert!(rest.not_started.is_empty(), "{rest:?}");
        }
    }
    assert_eq!(
        server.stats().jobs_admitted,
        6,
        "the late jobs were never admitted"
    );
    drop(call);
    within(LIVENESS, "serve returns", server.join())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_does_not_ask_drains_as_before() {
    let (server, gate) = gated_server(|c| {
        c.workers = 2;
        c.session_window = 6;
        c.shutdown_grace = Duration::from_secs(60);
    });
    let mut call = server.open_call().await;
    call.send(batch("b", gates("j", 10))).await;
    support::recovery::settle("2 jobs run and 4 wait", &server, || {
        let s = server.stats();
        s.jobs_running == 2 && s.jobs_queued == 4
    })
    .await;
    server.begin_shutdown();
    gate.add_permits(10);
    let (ended, status) = read_to_end(&mut call).await;
    assert_eq!(ended.notices, 0, "nothing given back: {ended:?}");
    // The jobs it holds (and the rest of its batch, read before the drain) all run.
    let ok: HashSet<String> = ended.results.iter().map(|r| r.job_id.clone()).collect();
    assert_eq!(ok, ids("j", 0..10));
    assert!(ended.results.iter().all(|r| outcome(r) == Outcome::Ok));
    let status = status.expect_err("an open call ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(call);
    within(LIVENESS, "serve returns", server.join())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_end_of_the_grace_running_jobs_are_given_back_as_stopped() {
    let (server, _gate) = gated_server(|c| {
        c.workers = 2;
        c.shutdown_grace = Duration::from_millis(300);
    });
    let mut call = give_back_call(&server).await;
    call.send(batch("b", gates("j", 4))).await;
    support::recovery::settle("2 jobs run and 2 wait", &server, || {
        let s = server.stats();
        s.jobs_running == 2 && s.jobs_queued == 2
    })
    .await;
    server.begin_shutdown();
    let (ended, status) = read_to_end(&mut call).await;
    assert!(
        ended.results.is_empty(),
        "no CANCELLED result: they are given back ({ended:?})"
    );
    assert_eq!(set(&ended.not_started), ids("j", 2..4), "{ended:?}");
    assert_eq!(set(&ended.stopped), ids("j", 0..2), "{ended:?}");
    let status = status.expect_err("the call ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(call);
    let engine = server.engine.clone();
    within(LIVENESS, "serve returns", server.join())
        .await
        .unwrap();
    let s = engine.stats();
    assert_eq!((s.calls_open, s.jobs_running, s.jobs_queued), (0, 0, 0));
}
