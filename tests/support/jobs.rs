//! Jobs for the built-in handlers, assertions on their results, and a gate handler that records the
//! order in which its jobs start.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchd::handlers::{Handler, HandlerError, JobContext, JobInput};
use batchd::proto::{self, Outcome};
use batchd::Registry;
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{job, outcome, wait_until, OpenCall, TestServer};

/// Upper limit of every polled wait of the call-semantics tests; only reached when something is
/// wrong.
pub const WAIT: Duration = Duration::from_secs(20);

/// SHA-256("abc"), FIPS 180-2 appendix B.1.
pub const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
/// SHA-256 of the empty string.
pub const SHA256_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

// === jobs ===

/// `job` with its own timeout of `seconds` + `nanos` (either may be negative, to test rejection).
pub fn with_timeout(mut job: proto::Job, seconds: i64, nanos: i32) -> proto::Job {
    job.timeout = Some(prost_types::Duration { seconds, nanos });
    job
}

/// A `sleep` job of `ms` milliseconds whose payload (and so its output) is its id.
pub fn sleep_job(id: &str, ms: u64) -> proto::Job {
    job(id, "sleep", id.as_bytes(), &[("ms", &ms.to_string())])
}

/// An `echo` job.
pub fn echo_job(id: &str, payload: &[u8]) -> proto::Job {
    job(id, "echo", payload, &[])
}

/// `n` sleep jobs of `ms` milliseconds with empty payloads, ids `{prefix}{i}`.
pub fn sleeps(prefix: &str, n: usize, ms: u64) -> Vec<proto::Job> {
    let ms = ms.to_string();
    (0..n)
        .map(|i| job(&format!("{prefix}{i}"), "sleep", b"", &[("ms", &ms)]))
        .collect()
}

// === results ===

/// Reads messages until every id in `ids` has a result; returns every result read, in order.
pub async fn read_until_ids(call: &mut OpenCall, ids: &[&str]) -> Vec<proto::JobResult> {
    let mut missing: HashSet<&str> = ids.iter().copied().collect();
    let mut out = Vec::new();
    while !missing.is_empty() {
        let msg = call
            .next_message(WAIT)
            .await
            .unwrap_or_else(|| panic!("stream ended while waiting for {missing:?}"));
        for r in msg.results {
            missing.remove(r.job_id.as_str());
            out.push(r);
        }
    }
    out
}

/// Asserts that `r` is REJECTED with an error mentioning `keyword`, no output and no times.
pub fn assert_rejected(r: &proto::JobResult, keyword: &str) {
    assert_eq!(outcome(r), Outcome::Rejected, "{r:?}");
    assert!(
        r.error.contains(keyword),
        "job {:?}: error {:?} should mention {keyword:?}",
        r.job_id,
        r.error
    );
    assert!(r.output.is_empty(), "{r:?}");
    assert!(
        r.queued.is_none() && r.ran.is_none(),
        "a REJECTED job has no queued/ran: {r:?}"
    );
}

/// Asserts that an admitted job's result has both its `queued` and `ran` times.
pub fn assert_admitted_times(r: &proto::JobResult) {
    assert!(r.queued.is_some(), "queued unset for admitted job {r:?}");
    assert!(r.ran.is_some(), "ran unset for admitted job {r:?}");
}

/// Whether `d` is set and zero.
pub fn is_zero(d: &Option<prost_types::Duration>) -> bool {
    matches!(d, Some(d) if d.seconds == 0 && d.nanos == 0)
}

/// Waits until the server holds no call, running, queued or buffered job.
pub async fn all_idle(server: &TestServer) {
    wait_until(
        "no call, running, queued or buffered job is left",
        WAIT,
        || server.is_idle(),
    )
    .await;
}

// === a gate that records its starts ===

/// Payloads of the jobs of a [`RecordingGate`], in the order they started.
pub type Started = Arc<Mutex<Vec<Bytes>>>;

/// A handler that logs each job's payload when it starts, then waits for a permit.
pub struct RecordingGate {
    permits: Arc<Semaphore>,
    started: Started,
}

#[async_trait::async_trait]
impl Handler for RecordingGate {
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

/// A server configured by `edit` with the built-in handlers and a [`RecordingGate`] named `gate`,
/// closed until the test adds permits.
pub fn recording_gated_server(
    edit: impl FnOnce(&mut batchd::config::Config),
) -> (TestServer, Arc<Semaphore>, Started) {
    let permits = Arc::new(Semaphore::new(0));
    let started = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::builtin();
    registry.register(
        "gate",
        RecordingGate {
            permits: Arc::clone(&permits),
            started: Arc::clone(&started),
        },
    );
    (TestServer::start_with(edit, registry), permits, started)
}
