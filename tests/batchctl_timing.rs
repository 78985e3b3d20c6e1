#![allow(clippy::unwrap_used, clippy::expect_used)]
//! How long jobs and runs may take: `--retry` and its backoff, `--deadline`, `--timeout-ms`.
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchd::handlers::{Handler, HandlerError, JobContext, JobInput};
use batchd::Registry;
use bytes::Bytes;
use support::batchctl::*;
use support::{wait_until, TestServer};

/// When each attempt of a job started, by the job's payload.
type Attempts = Arc<Mutex<HashMap<Bytes, Vec<Instant>>>>;

/// Fails the first `fails` attempts of each payload, then returns it; records when each started.
struct Flaky {
    fails: usize,
    attempts: Attempts,
}

#[async_trait::async_trait]
impl Handler for Flaky {
    fn description(&self) -> &str {
        "test: fails the first attempts of each payload, then returns it"
    }

    async fn run(
        self: Arc<Self>,
        input: JobInput,
        _ctx: JobContext,
    ) -> Result<Bytes, HandlerError> {
        let mut attempts = self.attempts.lock().unwrap();
        let started = attempts.entry(input.payload.clone()).or_default();
        started.push(Instant::now());
        if started.len() <= self.fails {
            return Err(HandlerError(format!("attempt {} fails", started.len())));
        }
        Ok(input.payload)
    }
}

#[tokio::test]
async fn retry_resends_a_job_that_times_out() {
    let server = TestServer::start(|_| {});
    let input = [
        r#"{"id":"slow","handler":"sleep","params":{"ms":60000},"timeout_ms":1}"#,
        r#"{"id":"fine","handler":"echo","payload":"x"}"#,
    ]
    .join("\n");
    let url = server.url();
    let done = Ctl::spawn(
        &["--endpoint", &url, "run", "--retry", "2", "-"],
        Some(input.into_bytes()),
    )
    .finish(LIVENESS)
    .await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "{done:?}");
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(out["slow"]["outcome"], "timed_out", "{:?}", out["slow"]);
    assert_eq!(out["slow"]["attempts"], 3, "{:?}", out["slow"]);
    assert_eq!(out["fine"]["outcome"], "ok");
    assert!(out["fine"].get("attempts").is_none(), "{:?}", out["fine"]);
    assert_eq!(server.stats().jobs_admitted, 4, "slow sent 3 times");
    assert!(done.stderr.contains("2 retries"), "{}", done.stderr);
}

#[tokio::test]
async fn retry_resends_failed_jobs_after_a_backoff_that_doubles() {
    // batchctl has no flag for the backoff: it is the library's default, 200 ms, then 400 ms.
    let backoff = batchd::client::RunOptions::default().retry_backoff;
    let attempts = Attempts::default();
    let mut registry = Registry::builtin();
    for (name, fails) in [("flaky", 2), ("broken", usize::MAX)] {
        let attempts = Arc::clone(&attempts);
        registry.register(name, Flaky { fails, attempts });
    }
    let server = TestServer::start_with(|_| {}, registry);
    let input = [
        r#"{"id":"flaky","handler":"flaky","payload":"f"}"#,
        r#"{"id":"broken","handler":"broken","payload":"b"}"#,
        r#"{"id":"fine","handler":"echo","payload":"x"}"#,
    ]
    .join("\n");
    let url = server.url();
    let done = Ctl::spawn(
        &["--endpoint", &url, "run", "--retry", "2", "-"],
        Some(input.into_bytes()),
    )
    .finish(LIVENESS)
    .await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "broken fails: {done:?}");
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(out.len(), 3, "one result per job: {out:?}");
    let flaky = out["flaky"];
    assert_eq!(
        flaky["outcome"], "ok",
        "the third attempt succeeds: {flaky}"
    );
    assert_eq!(flaky["output"], "f", "{flaky}");
    assert_eq!(flaky["attempts"], 3, "{flaky}");
    let broken = out["broken"];
    assert_eq!(broken["outcome"], "failed", "{broken}");
    assert_eq!(broken["attempts"], 3, "{broken}");
    assert_eq!(
        broken["error"], "attempt 3 fails",
        "the last attempt's error: {broken}"
    );
    assert_eq!(out["fine"]["outcome"], "ok");
    assert!(out["fine"].get("attempts").is_none(), "{:?}", out["fine"]);
    assert_eq!(server.stats().jobs_admitted, 7, "1 + 3 + 3 attempts");
    assert!(
        done.stderr.contains("2 ok, 1 failed") && done.stderr.contains("4 retries"),
        "{}",
        done.stderr
    );

    // A retry waits for its backoff after the failure arrived, so at least that long after the
    // attempt before it started.
    let attempts = attempts.lock().unwrap();
    for payload in ["f", "b"] {
        let started = &attempts[&Bytes::from(payload)];
        assert_eq!(started.len(), 3, "{payload}");
        let gaps = [started[1] - started[0], started[2] - started[1]];
        assert!(
            gaps[0] >= backoff && gaps[1] >= backoff * 2,
            "{payload}: attempts {gaps:?} apart, expected at least {backoff:?} then {:?}",
            backoff * 2
        );
    }
}

#[tokio::test]
async fn a_run_past_its_deadline_stops_and_the_daemon_drops_its_jobs() {
    const DEADLINE: Duration = Duration::from_secs(1);
    let server = TestServer::start(|_| {});
    let input = [
        sleep_line("s1", 60_000),
        sleep_line("s2", 60_000),
        sleep_line("s3", 60_000),
        echo_line("quick", "x"),
    ]
    .join("\n");
    let url = server.url();
    let started = Instant::now();
    let done = Ctl::spawn(
        &["--endpoint", &url, "run", "--deadline", "1s", "-"],
        Some(input.into_bytes()),
    )
    .finish(LIVENESS)
    .await;
    let took = started.elapsed();
    assert_eq!(done.code, Some(EXIT_NOT_OK), "{done:?}");
    assert!(took >= DEADLINE, "stopped before the deadline: {took:?}");
    let lines: Vec<&str> = done.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "the summary and the reason: {}",
        done.stderr
    );
    assert!(
        lines[0].contains("(3 jobs sent had no result)"),
        "{}",
        done.stderr
    );
    assert!(
        lines[1].starts_with("batchctl: the call failed: Deadline expired")
            && lines[1].contains("deadline passed"),
        "{}",
        done.stderr
    );
    let out = assert_ran(&done, &["quick"]);
    assert_eq!(out[0]["outcome"], "ok");
    // The sleeps did not outlive the run.
    wait_until("the daemon has no job or call left", LIVENESS, || {
        server.is_idle() && finished(&server) == 4
    })
    .await;
}

#[tokio::test]
async fn timeout_ms_is_the_timeout_of_jobs_that_set_none() {
    let server = TestServer::start(|_| {});
    let input = [
        // Would sleep a minute: the default of --timeout-ms stops it.
        sleep_line("default", 60_000),
        // A line's own timeout wins, longer...
        r#"{"id":"longer","handler":"sleep","params":{"ms":400},"timeout_ms":20000}"#.to_owned(),
        // ...or shorter.
        r#"{"id":"shorter","handler":"sleep","params":{"ms":60000},"timeout_ms":50}"#.to_owned(),
        echo_line("quick", "x"),
    ]
    .join("\n");
    let url = server.url();
    let done = Ctl::spawn(
        &["--endpoint", &url, "run", "--timeout-ms", "200", "-"],
        Some(input.into_bytes()),
    )
    .finish(LIVENESS)
    .await;
    assert_eq!(done.code, Some(EXIT_NOT_OK), "{done:?}");
    let out = records(&done.stdout);
    let out = by_id(&out);
    assert_eq!(out.len(), 4, "{out:?}");
    let default = out["default"];
    assert_eq!(default["outcome"], "timed_out", "{default}");
    assert_eq!(default["error"], "timed out after 200ms", "{default}");
    let shorter = out["shorter"];
    assert_eq!(shorter["outcome"], "timed_out", "{shorter}");
    assert_eq!(shorter["error"], "timed out after 50ms", "{shorter}");
    assert_eq!(out["longer"]["outcome"], "ok", "{:?}", out["longer"]);
    assert!(
        out["longer"]["ran_ms"].as_f64().unwrap() >= 400.0,
        "it slept past --timeout-ms: {:?}",
        out["longer"]
    );
    assert_eq!(out["quick"]["outcome"], "ok");
    assert!(done.stderr.contains("2 ok, 2 timed out"), "{}", done.stderr);
}
