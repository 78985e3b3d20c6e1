//! A call kept busy the way `batchctl` keeps one busy: a credit of jobs in flight, a batch sent
//! whenever a batch's worth of results came back, results counted as they arrive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use batchd::proto;
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::{batch, is_ok, job, Call};

/// The two tasks of a busy call (sender and reader) and what they counted.
pub struct Flow {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    sent: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    not_ok: Arc<AtomicU64>,
}

impl Flow {
    /// Keeps up to `in_flight` jobs of `call` sent and unanswered, in batches of `per_batch` jobs,
    /// the `n`-th made by `make(n)` (its id and jobs); the tasks run on `rt`. `keep` (the client
    /// whose connection the call uses) lives until the sender stops.
    pub fn start<K, M>(
        rt: &tokio::runtime::Handle,
        call: Call,
        keep: K,
        in_flight: usize,
        per_batch: usize,
        mut make: M,
    ) -> Self
    where
        K: Send + 'static,
        M: FnMut(u64) -> (String, Vec<proto::Job>) + Send + 'static,
    {
        let Call { tx, mut rx } = call;
        let stop = CancellationToken::new();
        let credit = Arc::new(Semaphore::new(in_flight));
        let (sent, done, not_ok): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>) =
            Default::default();
        let sender = {
            let (stop, credit, sent) = (stop.clone(), Arc::clone(&credit), Arc::clone(&sent));
            rt.spawn(async move {
                for n in 0.. {
                    let permit = tokio::select! {
                        p = credit.acquire_many(per_batch as u32) => p.unwrap(),
                        () = stop.cancelled() => break,
                    };
                    permit.forget();
                    let (id, jobs) = make(n);
                    if tx.send(batch(id, jobs)).await.is_err() {
                        break;
                    }
                    sent.fetch_add(per_batch as u64, Ordering::Relaxed);
                }
                drop(keep);
            })
        };
        let reader = {
            let (stop, done, not_ok) = (stop.clone(), Arc::clone(&done), Arc::clone(&not_ok));
            rt.spawn(async move {
                loop {
                    let msg = tokio::select! {
                        m = rx.message() => m,
                        () = stop.cancelled() => break,
                    };
                    let Ok(Some(msg)) = msg else { break };
                    let n = msg.results.len();
                    let bad = msg.results.iter().filter(|r| !is_ok(r)).count();
                    done.fetch_add(n as u64, Ordering::Relaxed);
                    not_ok.fetch_add(bad as u64, Ordering::Relaxed);
                    credit.add_permits(n);
                }
            })
        };
        Self {
            stop,
            tasks: vec![sender, reader],
            sent,
            done,
            not_ok,
        }
    }

    /// Results received so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Results received so far that were not OK.
    pub fn not_ok(&self) -> u64 {
        self.not_ok.load(Ordering::Relaxed)
    }

    /// Jobs sent and not answered yet.
    pub fn outstanding(&self) -> u64 {
        let done = self.done();
        self.sent.load(Ordering::Relaxed).saturating_sub(done)
    }

    /// Stops both tasks and waits for them.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// Batches of `per_batch` echo jobs of `payload` bytes for [`Flow::start`]: job ids count up, the
/// `n`-th batch of call `c` is `c{c}b{n}`.
pub fn echo_batches(
    c: usize,
    payload: usize,
    per_batch: usize,
) -> impl FnMut(u64) -> (String, Vec<proto::Job>) + Send + 'static {
    let payload = Bytes::from(vec![b'x'; payload]);
    let mut seq = 0u64;
    move |n| {
        let jobs = (0..per_batch)
            .map(|_| {
                seq += 1;
                job(seq.to_string(), "echo", payload.clone(), &[])
            })
            .collect();
        (format!("c{c}b{n}"), jobs)
    }
}
