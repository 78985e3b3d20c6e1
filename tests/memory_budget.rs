//! The daemon-wide memory budget: once the bytes of jobs read and results not sent reach
//! `memory_budget`, calls stop being read (HTTP/2 flow control holds their clients back) until it
//! frees; a call holding nothing still reads, so a call whose client stopped reading cannot stop the
//! others. README "Memory budget" gives the bound these tests check.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use batchd::auth::PrincipalSpec;
use batchd::config::ByteSize;
use batchd::proto::Outcome;
use support::principals::*;
use support::{batch, gated_server, job, outcome, wait_until, OpenCall, TestServer};

/// Upper limit of every polled wait; only reached when something is wrong.
const WAIT: Duration = Duration::from_secs(30);

/// Bytes a job counts in the budget: its payload, id and handler name, and 64 of bookkeeping.
fn counted(id: &str, handler: &str, payload: usize) -> usize {
    64 + id.len() + handler.len() + payload
}

fn used(server: &TestServer) -> f64 {
    metric(server.admin, "batchd_memory_budget_used_bytes", "")
}

fn peak(server: &TestServer) -> f64 {
    metric(server.admin, "batchd_memory_budget_peak_bytes", "")
}

/// `calls` calls each send `messages` messages of one `payload`-byte echo job, while the only
/// worker is held by a gated job: nothing finishes, so what the daemon reads stays held. Returns the
/// server (gate still closed), the gate, the calls and their sender tasks.
async fn flood(
    budget: ByteSize,
    calls: usize,
    messages: usize,
    payload: usize,
) -> (
    TestServer,
    std::sync::Arc<tokio::sync::Semaphore>,
    Vec<OpenCall>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (server, gate) = gated_server(|c| {
        c.workers = 1;
        c.memory_budget = budget;
    });
    let hold = server.open_call().await;
    hold.send(batch("hold", vec![job("hold", "gate", b"", &[])]))
        .await;
    wait_until("the gated job holds the only worker", WAIT, || {
        server.stats().jobs_running == 1
    })
    .await;
    let mut open = vec![hold];
    // Each call's first message is read before the flood: a call holding nothing may always read
    // one (so that no call waits on the others for ever), and once every call holds a job, what is
    // read afterwards is up to the budget alone.
    for c in 0..calls {
        let call = server.open_call().await;
        let id = format!("c{c}m0");
        call.send(batch(
            &id,
            vec![job(&id, "echo", &vec![b'x'; payload], &[])],
        ))
        .await;
        open.push(call);
    }
    wait_until("every call holds its first job", WAIT, || {
        server.stats().jobs_admitted == 1 + calls as u64
    })
    .await;
    let mut senders = Vec::new();
    for (c, call) in open.iter().skip(1).enumerate() {
        let tx = call.tx.clone().unwrap();
        senders.push(tokio::spawn(async move {
            for m in 1..messages {
                let id = format!("c{c}m{m}");
                let job = job(&id, "echo", &vec![b'x'; payload], &[]);
                if tx.send(batch(&id, vec![job])).await.is_err() {
                    return;
                }
            }
        }));
    }
    (server, gate, open, senders)
}

/// Many calls flood the daemon while nothing finishes: the figure stops near the budget instead of
/// growing to everything the clients send, and never passes the documented bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_calls_is_held_to_the_budget() {
    const CALLS: usize = 20;
    // 768 KiB per call: more than the client's channel (16 messages) and the HTTP/2 windows take.
    const MESSAGES: usize = 48;
    const PAYLOAD: usize = 16 * 1024;
    let budget = ByteSize(512 * 1024);
    let (server, gate, calls, senders) = flood(budget, CALLS, MESSAGES, PAYLOAD).await;
    // The largest message counts this much (ids up to "c19m15").
    let m = counted("c19m15", "echo", PAYLOAD) as f64;
    wait_until("the budget is used up", WAIT, || {
        used(&server) >= budget.0 as f64
    })
    .await;
    // Not a synchronisation: however long one watches, no more is read.
    let admitted = server.stats().jobs_admitted;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            server.stats().jobs_admitted,
            admitted,
            "nothing more is read"
        );
    }
    let sent = (CALLS * MESSAGES) as u64;
    // The bound (README "Memory budget"): the budget, plus one message for each call that read
    // while the total was under it at the same instant (at most the runtime's 2 worker threads), or
    // while it held nothing (at most every call); echo results are no larger than their jobs.
    let bound = budget.0 as f64 + (2 + CALLS) as f64 * m;
    let peak = peak(&server);
    println!(
        "memory budget {} B: peak {peak} B ({:.2} × budget), bound {bound} B; {admitted} of {sent} \
         jobs read",
        budget.0,
        peak / budget.0 as f64
    );
    assert!(
        peak >= budget.0 as f64 && peak <= bound,
        "peak {peak}, bound {bound}"
    );
    assert!(metric(server.admin, "batchd_memory_budget_waits_total", "") > 0.0);
    assert!(
        admitted < sent / 8,
        "{admitted} of {sent} jobs were read: the budget holds the clients back"
    );

    // Everything is read and runs once the worker frees: nothing deadlocks.
    gate.add_permits(1);
    for s in senders {
        s.await.unwrap();
    }
    for (i, mut call) in calls.into_iter().enumerate() {
        call.half_close();
        let results = call.finish_ok(WAIT).await;
        let want = if i == 0 { 1 } else { MESSAGES };
        assert_eq!(results.len(), want);
        assert!(results.iter().all(|r| outcome(r) == Outcome::Ok));
    }
    assert!(peak <= bound);
    wait_until("every byte is given back", WAIT, || used(&server) == 0.0).await;
}

/// The same flood without a binding budget: the daemon reads everything the clients send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_budget_the_same_flood_is_read_whole() {
    const CALLS: usize = 20;
    const MESSAGES: usize = 16;
    const PAYLOAD: usize = 16 * 1024;
    let (server, gate, calls, senders) = flood(ByteSize::gib(1), CALLS, MESSAGES, PAYLOAD).await;
    let sent = (CALLS * MESSAGES + 1) as u64;
    wait_until("every job is read", WAIT, || {
        server.stats().jobs_admitted == sent
    })
    .await;
    let whole = (CALLS * MESSAGES * counted("c0m0", "echo", PAYLOAD)) as f64;
    assert!(used(&server) >= whole, "{} < {whole}", used(&server));
    gate.add_permits(1);
    for s in senders {
        s.await.unwrap();
    }
    for mut call in calls {
        call.half_close();
        call.finish_ok(WAIT).await;
    }
}

/// A call whose jobs hold the whole budget and cannot finish does not stop another call: holding
/// nothing, the other reads one message at a time and all of its jobs run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_holding_nothing_still_reads_while_another_holds_the_budget() {
    let budget = ByteSize(256 * 1024);
    let (server, gate) = gated_server(|c| {
        c.workers = 2;
        c.memory_budget = budget;
        c.principal = vec![
            PrincipalSpec {
                max_running: Some(1),
                ..principal("hog", "token-hog")
            },
            principal("guest", "token-guest"),
        ];
    });
    let url = server.url();
    // The hog's jobs wait on the gate: its first runs, the rest stay queued and hold their bytes.
    let mut hog = open_as(&url, "token-hog").await;
    let tx = hog.tx.clone().unwrap();
    let hog_sender = tokio::spawn(async move {
        // 2.5 MiB: more than the client's channel (16 messages) and the HTTP/2 windows take.
        for i in 0..40 {
            let job = job(&format!("h{i}"), "gate", &[b'h'; 64 * 1024], &[]);
            if tx.send(batch(&format!("h{i}"), vec![job])).await.is_err() {
                return;
            }
        }
    });
    wait_until("the hog holds the budget", WAIT, || {
        used(&server) >= budget.0 as f64
    })
    .await;
    let hog_read = server.stats().jobs_admitted;
    assert!(hog_read < 8, "the hog is not read past the budget");

    let mut guest = open_as(&url, "token-guest").await;
    for i in 0..10 {
        let id = format!("g{i}");
        guest
            .send(batch(&id, vec![job(&id, "echo", &[b'g'; 1024], &[])]))
            .await;
    }
    guest.half_close();
    let results = guest.finish_ok(WAIT).await;
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| outcome(r) == Outcome::Ok));
    assert_eq!(
        server.stats().jobs_admitted,
        hog_read + 10,
        "the hog was not read meanwhile"
    );
    assert!(!hog_sender.is_finished(), "the hog's client is held back");

    gate.add_permits(40);
    hog_sender.await.unwrap();
    hog.half_close();
    assert_eq!(hog.finish_ok(WAIT).await.len(), 40);
    wait_until("every byte is given back", WAIT, || used(&server) == 0.0).await;
}
