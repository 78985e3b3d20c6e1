//! A first end-to-end check: echo jobs round-trip through a real server.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::time::Duration;

use batchd::proto::Outcome;
use support::*;

#[tokio::test]
async fn echo_round_trip_and_half_close() {
    let server = TestServer::start(|_| {});
    let jobs = (0..100)
        .map(|i| job(&format!("j{i}"), "echo", format!("p{i}").as_bytes(), &[]))
        .collect();
    // One call: the batch, then a half-close; it ends OK with every result.
    let results = run_batch(&server, jobs, Duration::from_secs(10)).await;
    assert_eq!(results.len(), 100);
    for i in 0..100 {
        let r = &results[&format!("j{i}")];
        assert_eq!(outcome(r), Outcome::Ok);
        assert_eq!(&r.output[..], format!("p{i}").as_bytes());
    }
    wait_until("the call is gone", Duration::from_secs(5), || {
        server.stats().calls_open == 0
    })
    .await;
}
