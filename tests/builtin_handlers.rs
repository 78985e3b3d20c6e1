//! The built-in handlers as ListHandlers describes them: echo, sleep, sha256 (inline and on the CPU
//! pool) and spin, which burns CPU off the async runtime and stops when cancelled.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod support;

use batchd::proto::{self, Outcome};
use support::jobs::*;
use support::otlp::hex;
use support::*;

#[tokio::test]
async fn list_handlers_and_sha256_digest() {
    let server = TestServer::start(|_| {});
    let mut client = server.client().await;
    let handlers = client
        .list_handlers(proto::ListHandlersRequest {})
        .await
        .unwrap()
        .into_inner()
        .handlers;
    let names: Vec<_> = handlers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["echo", "sha256", "sleep", "spin"]);
    for h in &handlers {
        assert!(
            h.description.len() > 10,
            "{} has no real description",
            h.name
        );
    }
    let describes = |name: &str, word: &str| {
        let h = handlers.iter().find(|h| h.name == name).unwrap();
        assert!(
            h.description.contains(word),
            "{name}: {:?} should mention {word}",
            h.description
        );
    };
    describes("sleep", "ms");
    describes("spin", "ms");
    describes("sha256", "SHA-256");

    // Small payloads are hashed inline, large ones on the CPU pool: both give the raw digest.
    let large: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let results = run_batch(
        &server,
        vec![
            job("abc", "sha256", b"abc", &[]),
            job("empty", "sha256", b"", &[]),
            job("large", "sha256", &large, &[]),
        ],
        WAIT,
    )
    .await;
    for r in results.values() {
        assert_eq!(outcome(r), Outcome::Ok, "{r:?}");
        assert_eq!(r.output.len(), 32, "the raw digest, not hex");
    }
    assert_eq!(hex(&results["abc"].output), SHA256_ABC);
    assert_eq!(hex(&results["empty"].output), SHA256_EMPTY);
    use sha2::Digest;
    assert_eq!(
        results["large"].output[..],
        sha2::Sha256::digest(&large)[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_runs_off_the_async_runtime_and_is_cancellable() {
    // More spins than CPU workers (and than the server runtime's two threads).
    let server = TestServer::start(|c| c.cpu_workers = 2);
    let mut call = server.open_call().await;
    call.send(batch(
        "s",
        (0..3)
            .map(|i| job(&format!("spin{i}"), "spin", b"", &[("ms", "60000")]))
            .collect(),
    ))
    .await;
    wait_until("three spins run", WAIT, || server.stats().jobs_running == 3).await;

    // The async runtime still serves other calls while the spins burn CPU.
    let results = run_batch(&server, vec![echo_job("meanwhile", b"m")], WAIT).await;
    assert_eq!(outcome(&results["meanwhile"]), Outcome::Ok);

    call.send(cancel("s", &[])).await;
    call.half_close();
    let results = by_id(call.finish_ok(WAIT).await);
    assert_eq!(results.len(), 3);
    for r in results.values() {
        assert_eq!(outcome(r), Outcome::Cancelled, "{r:?}");
        assert_admitted_times(r);
    }
    all_idle(&server).await;
}
