//! The engine's health, which `/healthz` serves and the systemd watchdog pings on: a handler that
//! blocks its runtime thread (the classic async bug) wedges the engine for real, and the health
//! check must see it, then see it recover. A busy pool is not wedged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

use batchd::handlers::{Handler, HandlerError, JobContext, JobInput};
use batchd::Registry;
use bytes::Bytes;
use support::{batch, http_get, job, wait_until, OpenCall, TestServer};

/// Far beyond what the health check needs to notice a stall (busy CI machines).
const LIMIT: Duration = Duration::from_secs(30);

/// Blocks the thread that runs the job until the test says so: a handler doing blocking I/O
/// inside async code.
struct Blocking(Mutex<Receiver<()>>);

#[async_trait::async_trait]
impl Handler for Blocking {
    fn description(&self) -> &str {
        "test: blocks its thread until the test releases it"
    }

    fn run_now(&self, input: JobInput) -> Result<Result<Bytes, HandlerError>, JobInput> {
        let _ = self.0.lock().unwrap().recv_timeout(LIMIT * 2);
        Ok(Ok(input.payload))
    }

    async fn run(
        self: std::sync::Arc<Self>,
        input: JobInput,
        _ctx: JobContext,
    ) -> Result<Bytes, HandlerError> {
        Ok(input.payload)
    }
}

/// A GET on the admin listener, or `None` when it does not answer within a second.
fn try_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: batchd\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

fn server(workers: usize) -> (TestServer, SyncSender<()>) {
    let (tx, rx) = sync_channel(1);
    let mut registry = Registry::builtin();
    registry.register("block", Blocking(Mutex::new(rx)));
    let server = TestServer::start_with(
        |c| {
            c.stall_timeout = Duration::from_millis(300);
            c.workers = workers;
        },
        registry,
    );
    (server, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_its_thread_wedges_the_engine_until_it_lets_go() {
    let (server, release) = server(256);
    wait_until("the probe ran", LIMIT, || server.engine.probed()).await;
    assert_eq!(http_get(server.admin, "/healthz").0, 200);

    let mut client = server.client().await;
    let mut call = OpenCall::open(&mut client).await;
    call.send(batch(
        "b",
        vec![
            job("blocks", "block", b"x", &[]),
            job("after", "sleep", b"y", &[("ms", "1")]),
        ],
    ))
    .await;
    wait_until("the health check sees the stall", LIMIT, || {
        server.engine.health().is_err()
    })
    .await;
    let stall = server.engine.health().unwrap_err().to_string();
    // A liveness probe fails either way: a 503, or no answer at all when the admin listener's own
    // task waits on the blocked thread.
    if let Some((code, body)) = try_get(server.admin, "/healthz") {
        assert_eq!(code, 503, "{body}");
        assert!(body.starts_with("stalled: "), "{body}");
    }
    // Which symptom shows first depends on where tokio had put the tasks: the blocked thread itself,
    // the call's grant of a slot for "after" left untaken, or the probe stuck behind that thread.
    assert!(
        ["runtime thread", "worker slot", "probe has not run"]
            .iter()
            .any(|s| stall.contains(s)),
        "{stall}"
    );

    release.send(()).unwrap();
    call.half_close();
    let results = call.finish_ok(LIMIT).await;
    assert_eq!(results.len(), 2);
    wait_until("the engine is healthy again", LIMIT, || {
        server.engine.health().is_ok()
    })
    .await;
    assert_eq!(http_get(server.admin, "/healthz").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_slot_busy_for_longer_than_the_stall_timeout_is_not_a_stall() {
    let (server, _release) = server(2);
    let mut client = server.client().await;
    let mut call = OpenCall::open(&mut client).await;
    // Two slots, both held for 1.5 s (five stall timeouts), more jobs waiting behind them.
    let jobs = (0..4)
        .map(|i| job(&i.to_string(), "sleep", b"", &[("ms", "1500")]))
        .collect();
    call.send(batch("busy", jobs)).await;
    wait_until("both slots are taken", LIMIT, || {
        server.stats().jobs_running == 2
    })
    .await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(server.engine.health(), Ok(()));
        assert_eq!(http_get(server.admin, "/healthz").0, 200);
    }
    call.half_close();
    assert_eq!(call.finish_ok(LIMIT).await.len(), 4);
}
