#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The core that `batchctl run` and `batchctl map` share (`batchd::client::call`), driven as a
//! library with a source and a sink of the test's own against a real daemon: every job delivered
//! once with its tag, the room the call gives its source (jobs and payload bytes) respected,
//! skipped and bad inputs counted, retries, and an interrupt that stops every job on the daemon.
mod support;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use batchd::client::call::{self, Fed, Finished, Origin, Pull, Room, Sink, Source};
use batchd::client::{BadInput, BadKind, CallOptions, ClientError, Progress};
use batchd::proto;
use support::map::LIVENESS;
use support::{wait_until, TestServer};

/// Hands out `jobs` in order, checking each time that the call's room is respected: a job is
/// handed out only if it fits `room.bytes` (or the call holds nothing), else `NeedRoom`.
struct Scripted {
    items: VecDeque<Pull<usize>>,
    /// Rooms seen, for the test.
    rooms: Vec<Room>,
}

impl Source for Scripted {
    type Tag = usize;

    async fn next(&mut self, room: Room) -> Option<Result<Pull<usize>, ClientError>> {
        self.rooms.push(room);
        assert!(room.jobs > 0, "asked without room for a job: {room:?}");
        let size = match self.items.front()? {
            Pull::Job(fed) => fed.job.payload.len(),
            _ => 0,
        };
        if size > room.bytes && !room.empty {
            return Some(Ok(Pull::NeedRoom(size)));
        }
        Some(Ok(self.items.pop_front()?))
    }
}

/// Keeps what it is given: (tag, seq, attempts, outcome, output) by job id.
#[derive(Default)]
struct Collect {
    got: HashMap<String, (usize, u64, u32, i32, Vec<u8>)>,
    deliveries: usize,
}

impl Sink<usize> for Collect {
    async fn deliver(&mut self, done: &[Finished<usize>]) -> Result<(), ClientError> {
        self.deliveries += 1;
        for f in done {
            let r = &f.result;
            let old = self.got.insert(
                r.job_id.clone(),
                (f.tag, f.seq, f.attempts, r.outcome, r.output.to_vec()),
            );
            assert!(old.is_none(), "{} delivered twice", r.job_id);
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), ClientError> {
        Ok(())
    }
}

fn job(id: &str, handler: &str, payload: Vec<u8>, params: &[(&str, &str)]) -> proto::Job {
    proto::Job {
        id: id.into(),
        handler: handler.into(),
        payload: payload.into(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout: None,
    }
}

fn fed(tag: usize, job: proto::Job) -> Pull<usize> {
    Pull::Job(Fed {
        batch: "b".into(),
        job,
        origin: Origin::File,
        tag,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_source_and_sink_get_every_job_once_within_the_room() {
    const N: usize = 500;
    const SIZE: usize = 10 * 1024;
    let server = TestServer::start(|_| {});
    let mut client = batchd::client::connect(&server.url()).await.unwrap();
    let mut items: VecDeque<Pull<usize>> = (0..N)
        .map(|i| {
            // Jobs that take a moment, so that the call fills its room.
            let payload = vec![i as u8; SIZE];
            fed(i, job(&format!("j{i}"), "sleep", payload, &[("ms", "5")]))
        })
        .collect();
    items.insert(
        7,
        Pull::Bad(BadInput {
            kind: BadKind::Unreadable,
            at: "nowhere".into(),
            reason: "cannot read".into(),
        }),
    );
    items.insert(9, Pull::Skipped);
    let mut source = Scripted {
        items,
        rooms: Vec::new(),
    };
    let mut sink = Collect::default();
    let opts = CallOptions {
        batch_size: 16,
        max_in_flight: 40,
        // Room for 25 jobs and a half: the source is asked with less room than a job needs.
        max_in_flight_bytes: 25 * SIZE + SIZE / 2,
        ..CallOptions::default()
    };
    let (summary, res) = tokio::time::timeout(
        LIVENESS,
        call::drive(
            &mut client,
            &mut source,
            &mut sink,
            None::<tokio::io::Sink>,
            &opts,
            &Progress::new(false),
            std::future::pending(),
        ),
    )
    .await
    .unwrap();
    res.unwrap();
    assert_eq!(
        (summary.sent, summary.done, summary.ok()),
        (N as u64, N as u64, N as u64)
    );
    assert_eq!((summary.unreadable, summary.skipped), (1, 1), "{summary:?}");
    assert_eq!(
        summary.peak_bytes,
        25 * SIZE as u64,
        "the bound was reached, never passed"
    );
    assert_eq!(sink.got.len(), N);
    let mut seqs: Vec<u64> = sink.got.values().map(|g| g.1).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..N as u64).collect::<Vec<_>>(),
        "seq numbers the jobs taken, in order"
    );
    for (id, (tag, seq, attempts, outcome, output)) in &sink.got {
        assert_eq!(id, &format!("j{tag}"));
        assert_eq!(*seq as usize, *tag);
        assert_eq!(*attempts, 1);
        assert_eq!(*outcome, proto::Outcome::Ok as i32);
        assert_eq!(output, &vec![*tag as u8; SIZE]);
    }
    assert!(sink.deliveries < N, "results come several to a message");
    // The call never asked for more than it had room for.
    assert!(source
        .rooms
        .iter()
        .all(|r| r.jobs <= 40 && r.bytes <= 25 * SIZE + SIZE / 2));
    assert!(
        source.rooms.iter().any(|r| r.bytes < SIZE && !r.empty),
        "the source was asked with too little room, and waited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_resend_and_an_interrupt_stops_every_job() {
    let server = TestServer::start(|_| {});
    let mut client = batchd::client::connect(&server.url()).await.unwrap();

    // A job that times out is resent; the sink sees it once, with its attempts.
    let mut slow = job("slow", "sleep", b"s".to_vec(), &[("ms", "60000")]);
    slow.timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 1_000_000,
    });
    let mut source = Scripted {
        items: [
            fed(0, slow),
            fed(1, job("fine", "echo", b"f".to_vec(), &[])),
        ]
        .into(),
        rooms: Vec::new(),
    };
    let mut sink = Collect::default();
    let opts = CallOptions {
        retry: 2,
        retry_backoff: Duration::from_millis(1),
        ..CallOptions::default()
    };
    let (summary, res) = call::drive(
        &mut client,
        &mut source,
        &mut sink,
        None::<tokio::io::Sink>,
        &opts,
        &Progress::new(false),
        std::future::pending(),
    )
    .await;
    res.unwrap();
    assert_eq!(summary.retried, 2, "{summary:?}");
    assert_eq!(sink.got["slow"].2, 3, "attempts");
    assert_eq!(sink.got["slow"].3, proto::Outcome::TimedOut as i32);
    assert_eq!(sink.got["fine"].3, proto::Outcome::Ok as i32);

    // An interrupt while 20 jobs run: the call ends, the daemon stops them all.
    let mut source = Scripted {
        items: (0..20)
            .map(|i| {
                fed(
                    i,
                    job(&format!("s{i}"), "sleep", Vec::new(), &[("ms", "60000")]),
                )
            })
            .collect(),
        rooms: Vec::new(),
    };
    let mut sink = Collect::default();
    let running = || server.stats().jobs_running == 20;
    let interrupt = async {
        wait_until("the 20 jobs run", LIVENESS, running).await;
    };
    let (summary, res) = call::drive(
        &mut client,
        &mut source,
        &mut sink,
        None::<tokio::io::Sink>,
        &CallOptions::default(),
        &Progress::new(false),
        interrupt,
    )
    .await;
    res.unwrap();
    assert!(summary.interrupted);
    assert_eq!((summary.sent, summary.done), (20, 0));
    wait_until("the daemon has no job left", LIVENESS, || server.is_idle()).await;
    assert!(sink.got.is_empty());
}
