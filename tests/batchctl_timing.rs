#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `--retry`: jobs that end timed_out are resent.
mod support;

use support::batchctl::*;
use support::TestServer;

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
