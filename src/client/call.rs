//! One Process call fed by a [`Source`] of jobs, its results handed to a [`Sink`]: the sending and
//! receiving core that `batchctl run` (JSON Lines in) and `batchctl map` (files in) share.
//!
//! The call cuts batches to `batch_size` jobs and `max_message` bytes (exact prost sizes), keeps at
//! most `max_in_flight` jobs and `max_in_flight_bytes` of payload unanswered, resends jobs that end
//! failed or timed out (`retry`, with exponential backoff), writes the job log, counts everything
//! in a [`Summary`], and stops the whole call on an interrupt (the daemon then stops every job).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::progress::Progress;
use super::record::{outcome_name, LogRecord};
use super::{ClientError, Summary, Token, TraceHeaders};
use crate::outcome::Outcome;
use crate::proto::{self, batch_service_client::BatchServiceClient, process_request::Kind};
use crate::units::ByteSize;

/// Default of [`CallOptions::max_message`]: the daemon's default `max_message_size`, so that any
/// job a default daemon accepts can be sent.
pub const DEFAULT_MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Default of [`CallOptions::max_in_flight_bytes`].
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;
/// Field number of `ProcessRequest.batch` (proto/batchd/v1/batchd.proto).
const BATCH_FIELD: u32 = 1;
/// Field number of `JobBatch.batch_id`.
const BATCH_ID_FIELD: u32 = 1;
/// Field number of `JobBatch.jobs`.
const JOBS_FIELD: u32 = 2;
/// Field number of `Job.payload`.
const PAYLOAD_FIELD: u32 = 3;
/// Longest pause between retries of a job.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How a call sends, bounds and retries its jobs.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// Most jobs per JobBatch.
    pub batch_size: usize,
    /// Largest encoded request: a batch is sent before it would grow past it, and a job that does
    /// not fit alone is a bad input. Keep it at or under the daemon's `max_message_size`.
    pub max_message: usize,
    /// Jobs sent and not yet written out (results held back for order included).
    pub max_in_flight: usize,
    /// Payload bytes taken from the source and not yet answered; a job larger than this alone is
    /// still taken when nothing else is held.
    pub max_in_flight_bytes: usize,
    /// Resend a job that ends failed or timed_out up to this many times.
    pub retry: u32,
    /// Pause before the first retry; doubles each time.
    pub retry_backoff: Duration,
    /// Stop at the first bad input.
    pub strict: bool,
    /// Deadline of the whole call.
    pub deadline: Option<Duration>,
    /// W3C trace context to send (batchctl's `batchctl.run` span); `None`: a `traceparent` made
    /// here, a child of `$TRACEPARENT` when the caller runs in a trace.
    pub trace: Option<TraceHeaders>,
    /// Credentials for a daemon with principals (`authorization: Bearer …`).
    pub token: Option<Token>,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            batch_size: 256,
            max_message: DEFAULT_MAX_MESSAGE,
            max_in_flight: 8192,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            retry: 0,
            retry_backoff: Duration::from_millis(200),
            strict: false,
            deadline: None,
            trace: None,
            token: None,
        }
    }
}

/// Where a job came from, for what is said about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Line N of a JSON Lines input: problems are bad lines, named by number.
    Line(u64),
    /// A file, whose path is the job id: problems are named by path.
    File,
}

/// Why an input was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    /// A line that is not a job (or a job that cannot be sent).
    Line,
    /// A file that cannot be read.
    Unreadable,
    /// A file too large to send (`--max-message`) or for the daemon (`max_payload`).
    TooLarge,
    /// A file whose output or id another input of the run already has.
    Duplicate,
}

/// An input that was reported and skipped (or stopped the call under `strict`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct BadInput {
    /// What kind of problem, for the summary's counts.
    pub kind: BadKind,
    /// Where: `line 7`, or a path.
    pub at: String,
    /// What is wrong.
    pub reason: String,
}

/// A job a source hands to the call.
#[derive(Debug, Clone)]
pub struct Fed<T> {
    /// The batch it goes in.
    pub batch: String,
    /// The job.
    pub job: proto::Job,
    /// Where it came from.
    pub origin: Origin,
    /// What the sink gets back with the job's result (an output path, …).
    pub tag: T,
}

/// What a source yields.
#[derive(Debug)]
pub enum Pull<T> {
    /// A job to send.
    Job(Fed<T>),
    /// An input that is not a job.
    Bad(BadInput),
    /// An input skipped on purpose (`--resume`, `--skip-existing`).
    Skipped,
    /// The next job needs this many bytes of room: the call asks again once that much is free
    /// (or nothing is in flight).
    NeedRoom(usize),
}

/// What the call can take when it asks its source for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// Jobs.
    pub jobs: usize,
    /// Payload bytes.
    pub bytes: usize,
    /// Nothing is in flight: one job is taken whatever its size.
    pub empty: bool,
    /// The daemon's `max_payload`, once one of its rejections told it.
    pub max_payload: Option<usize>,
}

/// Where a call's jobs come from.
pub trait Source {
    /// What the sink gets back with each result.
    type Tag;

    /// The next input, or `None` at the end. Jobs should fit `room` (see [`Pull::NeedRoom`]); the
    /// call checks sizes again. Must be cancel-safe: the call drops the future when something
    /// else happens first, and asks again.
    fn next(
        &mut self,
        room: Room,
    ) -> impl Future<Output = Option<Result<Pull<Self::Tag>, ClientError>>>;
}

/// A job's final result (its retries done), as handed to the sink.
#[derive(Debug)]
pub struct Finished<T> {
    /// The result.
    pub result: proto::JobResult,
    /// The job's place in the order the call took jobs, from 0.
    pub seq: u64,
    /// How many times it was sent.
    pub attempts: u32,
    /// The source's tag.
    pub tag: T,
}

/// Where a call's results go.
pub trait Sink<T> {
    /// Writes out the final results of one response message and makes them visible (the job log
    /// records them next).
    fn deliver(&mut self, done: &[Finished<T>]) -> impl Future<Output = Result<(), ClientError>>;

    /// The job of `seq` will have no result to write (the call took it back as a bad input).
    fn skip(&mut self, _seq: u64) {}

    /// Results held back (waiting for earlier ones); they count against `max_in_flight`.
    fn held(&self) -> usize {
        0
    }

    /// The call is over, early or not: writes what is held back.
    fn finish(&mut self) -> impl Future<Output = Result<(), ClientError>>;
}

/// Runs a Process call on `client` until `source` is done and every result is delivered to
/// `sink` (and to the job log, if given), until `interrupt` completes (the call is cancelled: the
/// daemon stops all of its jobs), or until the first error.
pub async fn drive<S, K, L>(
    client: &mut BatchServiceClient<Channel>,
    source: &mut S,
    sink: &mut K,
    joblog: Option<L>,
    opts: &CallOptions,
    progress: &Progress,
    interrupt: impl Future<Output = ()>,
) -> (Summary, Result<(), ClientError>)
where
    S: Source,
    K: Sink<S::Tag>,
    L: AsyncWrite + Unpin,
{
    let mut call = Call::new(opts, sink, joblog);
    let res = call.run(client, source, progress, interrupt).await;
    // Results already received are written even when the call stops early.
    let finished = call.sink.finish().await;
    call.summary.elapsed = call.started.elapsed();
    progress.clear();
    (call.summary, res.and(finished))
}

/// Encoded size of the request that sends `job` alone in batch `batch`.
pub fn request_size(batch: &str, job: &proto::Job) -> usize {
    request_len(batch_id_len(batch) + prost::encoding::message::encoded_len(JOBS_FIELD, job))
}

/// Encoded size of the request that sends `job` alone in batch `batch` once its (empty) payload
/// is `payload` bytes: what a file of that size needs, known before it is read.
pub fn request_size_with_payload(batch: &str, job: &proto::Job, payload: usize) -> usize {
    let mut inner = prost::Message::encoded_len(job) - payload_field_len(job.payload.len());
    inner += payload_field_len(payload);
    let entry = prost::encoding::key_len(JOBS_FIELD)
        + prost::encoding::encoded_len_varint(inner as u64)
        + inner;
    request_len(batch_id_len(batch) + entry)
}

/// The `max_payload` a daemon rejection names (`payload of N bytes is over max_payload (M
/// bytes)`, src/engine/session/admit.rs), or `None` for any other error.
pub fn max_payload_of(error: &str) -> Option<usize> {
    let rest = error.strip_prefix("payload of ")?;
    let (_, limit) = rest.split_once(" bytes is over max_payload (")?;
    limit.strip_suffix(" bytes)")?.parse().ok()
}

/// `16MiB`, or `1000 bytes` when no unit divides it.
pub(super) fn size_text(n: usize) -> String {
    let text = ByteSize(n as u64).to_string();
    if text.bytes().all(|c| c.is_ascii_digit()) {
        format!("{text} bytes")
    } else {
        text
    }
}

/// The batch being filled.
struct Building {
    batch_id: String,
    jobs: Vec<proto::Job>,
    /// Encoded size of the `JobBatch` so far.
    body: usize,
}

/// A job sent and not finished.
struct Tracked<T> {
    seq: u64,
    attempts: u32,
    batch: String,
    /// Kept only when it may be retried.
    job: Option<proto::Job>,
    /// Payload bytes it holds against `max_in_flight_bytes`.
    bytes: usize,
    origin: Origin,
    tag: T,
}

struct Call<'a, T, K, L> {
    opts: &'a CallOptions,
    summary: Summary,
    sink: &'a mut K,
    joblog: Option<BufWriter<L>>,
    inflight: HashMap<String, Tracked<T>>,
    next_seq: u64,
    building: Option<Building>,
    /// Requests ready to send, with how many new (not retried) jobs each carries.
    outgoing: VecDeque<(proto::ProcessRequest, u64)>,
    retries: BinaryHeap<Reverse<(Instant, u64, String)>>,
    /// Payload bytes of the jobs in `inflight`.
    held_bytes: usize,
    /// Room the source asked for before its next job.
    wants: Option<usize>,
    max_payload: Option<usize>,
    started: Instant,
}

// === impl Call ===

impl<'a, T, K, L> Call<'a, T, K, L>
where
    K: Sink<T>,
    L: AsyncWrite + Unpin,
{
    fn new(opts: &'a CallOptions, sink: &'a mut K, joblog: Option<L>) -> Self {
        Self {
            opts,
            summary: Summary::default(),
            sink,
            joblog: joblog.map(BufWriter::new),
            inflight: HashMap::new(),
            next_seq: 0,
            building: None,
            outgoing: VecDeque::new(),
            retries: BinaryHeap::new(),
            held_bytes: 0,
            wants: None,
            max_payload: None,
            started: Instant::now(),
        }
    }

    async fn run<S: Source<Tag = T>>(
        &mut self,
        client: &mut BatchServiceClient<Channel>,
        source: &mut S,
        progress: &Progress,
        interrupt: impl Future<Output = ()>,
    ) -> Result<(), ClientError> {
        let mut input_done = false;
        let (tx, rx) = mpsc::channel(2);
        let mut tx = Some(tx);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(d) = self.opts.deadline {
            request.set_timeout(d);
        }
        if let Some(token) = &self.opts.token {
            token.insert_into(request.metadata_mut());
        }
        // The daemon's spans join this trace: a child of $TRACEPARENT when the caller runs in one.
        match &self.opts.trace {
            Some(trace) => trace.insert_into(request.metadata_mut()),
            None => {
                let parent = std::env::var("TRACEPARENT").ok();
                TraceHeaders::generated(parent.as_deref()).insert_into(request.metadata_mut());
            }
        }
        let mut responses = client
            .process(request)
            .await
            .map_err(ClientError::from_status)?
            .into_inner();
        tokio::pin!(interrupt);

        loop {
            let retry_at = self.retries.peek().map(|Reverse((at, _, _))| *at);
            let room = self.room();
            let can_read = !input_done && self.outgoing.is_empty() && self.has_room(room);
            // Half-close once nothing more can be sent: no input, no batch waiting, no retry possible.
            if input_done
                && self.outgoing.is_empty()
                && self.retries.is_empty()
                && (self.opts.retry == 0 || self.inflight.is_empty())
            {
                tx = None;
            }
            let sender = tx.clone();
            tokio::select! {
                biased;
                () = &mut interrupt => {
                    self.summary.interrupted = true;
                    return Ok(());
                }
                msg = responses.message() => match msg {
                    Ok(Some(msg)) => {
                        self.results(msg.results, progress).await?;
                        progress.tick(&self.summary);
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(ClientError::from_status(status)),
                },
                () = sleep_until(retry_at), if retry_at.is_some() => self.resend_due(),
                permit = reserve(sender.as_ref()), if !self.outgoing.is_empty() && sender.is_some() => {
                    match (permit, self.outgoing.pop_front()) {
                        (Some(permit), Some((req, new_jobs))) => {
                            permit.send(req);
                            self.summary.sent += new_jobs;
                        }
                        // The call ended; its status arrives on the response stream.
                        _ => tx = None,
                    }
                }
                pulled = source.next(room), if can_read => {
                    let mut pulled = pulled;
                    self.wants = None;
                    loop {
                        match pulled {
                            None => {
                                input_done = true;
                                break;
                            }
                            Some(pull) => self.take(pull?, progress)?,
                        }
                        let full = self
                            .building
                            .as_ref()
                            .is_some_and(|b| b.jobs.len() >= self.opts.batch_size);
                        let room = self.room();
                        if full || !self.outgoing.is_empty() || !self.has_room(room) {
                            break;
                        }
                        // Take what is already there; send a partial batch rather than wait.
                        match source.next(room).now_or_never() {
                            Some(next) => pulled = next,
                            None => break,
                        }
                    }
                    self.flush_batch();
                }
            }
        }
    }

    /// What the source may still hand over.
    fn room(&self) -> Room {
        Room {
            jobs: self.opts.max_in_flight.saturating_sub(self.outstanding()),
            bytes: self
                .opts
                .max_in_flight_bytes
                .saturating_sub(self.held_bytes),
            empty: self.inflight.is_empty(),
            max_payload: self.max_payload,
        }
    }

    /// Whether the source may be asked for more.
    fn has_room(&self, room: Room) -> bool {
        let bytes = match self.wants {
            Some(n) => n <= room.bytes,
            None => room.bytes > 0,
        };
        room.jobs > 0 && (bytes || room.empty)
    }

    /// Jobs sent or about to be, and results not written yet.
    fn outstanding(&self) -> usize {
        self.inflight.len() + self.sink.held()
    }

    fn take(&mut self, pull: Pull<T>, progress: &Progress) -> Result<(), ClientError> {
        let fed = match pull {
            Pull::Job(fed) => fed,
            Pull::Bad(e) => return self.bad(e, progress),
            Pull::Skipped => {
                self.summary.skipped += 1;
                return Ok(());
            }
            Pull::NeedRoom(n) => {
                self.wants = Some(n);
                return Ok(());
            }
        };
        let bad = |kind: BadKind, reason: String| {
            let (kind, at) = match fed.origin {
                Origin::Line(n) => (BadKind::Line, format!("line {n}")),
                Origin::File => (kind, fed.job.id.clone()),
            };
            BadInput { kind, at, reason }
        };
        if self.inflight.contains_key(&fed.job.id) {
            let e = bad(
                BadKind::Duplicate,
                format!("id {:?} is still in use by an unfinished job", fed.job.id),
            );
            return self.bad(e, progress);
        }
        // Sizes are exact: what prost will encode, which is what the daemon's limit counts.
        let entry = prost::encoding::message::encoded_len(JOBS_FIELD, &fed.job);
        let alone = request_len(batch_id_len(&fed.batch) + entry);
        if alone > self.opts.max_message {
            let reason = match fed.origin {
                Origin::Line(_) => format!(
                    "the job needs a request of {alone} bytes, more than --max-message ({}); skipped",
                    size_text(self.opts.max_message)
                ),
                Origin::File => format!(
                    "{} bytes, too large to send within --max-message ({}); skipped",
                    fed.job.payload.len(),
                    size_text(self.opts.max_message)
                ),
            };
            let e = bad(BadKind::TooLarge, reason);
            return self.bad(e, progress);
        }
        let fits = |b: &Building| {
            b.batch_id == fed.batch && request_len(b.body + entry) <= self.opts.max_message
        };
        if self.building.as_ref().is_some_and(|b| !fits(b)) {
            self.flush_batch();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let bytes = fed.job.payload.len();
        self.held_bytes += bytes;
        self.summary.peak_bytes = self.summary.peak_bytes.max(self.held_bytes as u64);
        self.inflight.insert(
            fed.job.id.clone(),
            Tracked {
                seq,
                attempts: 1,
                batch: fed.batch.clone(),
                job: (self.opts.retry > 0).then(|| fed.job.clone()),
                bytes,
                origin: fed.origin,
                tag: fed.tag,
            },
        );
        let building = self.building.get_or_insert_with(|| Building {
            body: batch_id_len(&fed.batch),
            batch_id: fed.batch,
            jobs: Vec::new(),
        });
        building.jobs.push(fed.job);
        building.body += entry;
        Ok(())
    }

    fn bad(&mut self, e: BadInput, progress: &Progress) -> Result<(), ClientError> {
        self.summary.count_bad(e.kind);
        if self.opts.strict {
            return Err(ClientError::Bad(e));
        }
        progress.message(&format!("batchctl: {e}"));
        Ok(())
    }

    fn flush_batch(&mut self) {
        if let Some(b) = self.building.take() {
            let n = b.jobs.len() as u64;
            self.outgoing.push_back((batch(b.batch_id, b.jobs), n));
        }
    }

    fn resend_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _, _))) = self.retries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, id))) = self.retries.pop() else {
                break;
            };
            if let Some(t) = self.inflight.get(&id) {
                if let Some(job) = &t.job {
                    self.outgoing
                        .push_back((batch(t.batch.clone(), vec![job.clone()]), 0));
                }
            }
        }
    }

    async fn results(
        &mut self,
        results: Vec<proto::JobResult>,
        progress: &Progress,
    ) -> Result<(), ClientError> {
        let mut done = Vec::with_capacity(results.len());
        for r in results {
            let Some(mut t) = self.inflight.remove(&r.job_id) else {
                continue;
            };
            let retryable = matches!(
                Outcome::from_proto(r.outcome),
                Some(Outcome::Failed | Outcome::TimedOut)
            );
            if retryable && t.attempts <= self.opts.retry && t.job.is_some() {
                let backoff = self
                    .opts
                    .retry_backoff
                    .saturating_mul(1 << (t.attempts - 1).min(16))
                    .min(MAX_BACKOFF);
                t.attempts += 1;
                self.summary.retried += 1;
                self.retries
                    .push(Reverse((Instant::now() + backoff, t.seq, r.job_id.clone())));
                self.inflight.insert(r.job_id, t);
                continue;
            }
            self.held_bytes -= t.bytes;
            // A file over the daemon's max_payload is a file too large, like one over
            // --max-message; later files over the limit are then skipped before being read.
            let limit = (Outcome::from_proto(r.outcome) == Some(Outcome::Rejected))
                .then(|| max_payload_of(&r.error))
                .flatten();
            if let (Origin::File, Some(limit)) = (t.origin, limit) {
                self.max_payload = Some(limit);
                self.sink.skip(t.seq);
                // Taken back: an input that was not a job, like one skipped before it was sent.
                self.summary.sent = self.summary.sent.saturating_sub(1);
                let e = BadInput {
                    kind: BadKind::TooLarge,
                    at: r.job_id,
                    reason: format!(
                        "{} bytes, over the daemon's max_payload ({}); skipped",
                        t.bytes,
                        size_text(limit)
                    ),
                };
                self.bad(e, progress)?;
                continue;
            }
            done.push(Finished {
                result: r,
                seq: t.seq,
                attempts: t.attempts,
                tag: t.tag,
            });
        }
        if done.is_empty() {
            return Ok(());
        }
        self.sink.deliver(&done).await?;
        for f in &done {
            self.summary.record(f.result.outcome);
        }
        if let Some(log) = &mut self.joblog {
            for f in &done {
                let rec = LogRecord {
                    id: f.result.job_id.clone(),
                    outcome: outcome_name(f.result.outcome).into(),
                };
                let mut line = serde_json::to_vec(&rec).unwrap_or_default();
                line.push(b'\n');
                log.write_all(&line).await.map_err(ClientError::JobLog)?;
            }
            log.flush().await.map_err(ClientError::JobLog)?;
        }
        Ok(())
    }
}

fn batch(batch_id: String, jobs: Vec<proto::Job>) -> proto::ProcessRequest {
    proto::ProcessRequest {
        kind: Some(Kind::Batch(proto::JobBatch { batch_id, jobs })),
    }
}

/// Encoded size of a `Job`'s payload field (absent when empty, as proto3 writes it).
fn payload_field_len(n: usize) -> usize {
    match n {
        0 => 0,
        n => {
            prost::encoding::key_len(PAYLOAD_FIELD)
                + prost::encoding::encoded_len_varint(n as u64)
                + n
        }
    }
}

/// Encoded size of a `JobBatch`'s `batch_id` field (absent when empty, as proto3 writes it).
fn batch_id_len(batch_id: &str) -> usize {
    match batch_id.len() {
        0 => 0,
        n => {
            prost::encoding::key_len(BATCH_ID_FIELD)
                + prost::encoding::encoded_len_varint(n as u64)
                + n
        }
    }
}

/// Encoded size of a `ProcessRequest` holding a `JobBatch` of `body` bytes.
fn request_len(body: usize) -> usize {
    prost::encoding::key_len(BATCH_FIELD) + prost::encoding::encoded_len_varint(body as u64) + body
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn reserve(
    tx: Option<&mpsc::Sender<proto::ProcessRequest>>,
) -> Option<mpsc::Permit<'_, proto::ProcessRequest>> {
    tx?.reserve().await.ok()
}

#[cfg(test)]
mod tests;
