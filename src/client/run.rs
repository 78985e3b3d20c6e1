//! `batchctl run`: streams jobs from JSON Lines over one Process call and writes results as they come.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::codec::FramedRead;
use tonic::transport::Channel;

use super::jobline::{self, LineDefaults, LineError};
use super::lines::{Line, LineDecoder};
use super::progress::Progress;
use super::record::{LogRecord, ResultRecord};
use super::{ClientError, Summary, TraceHeaders};
use crate::outcome::Outcome;
use crate::proto::{self, batch_service_client::BatchServiceClient, process_request::Kind};
use crate::units::ByteSize;

/// Longest input line read; longer lines are reported and skipped.
pub const MAX_LINE: usize = 64 * 1024 * 1024;
/// Default of [`RunOptions::max_message`]: the daemon's default `max_message_size`, so that any job
/// a default daemon accepts can be sent.
pub const DEFAULT_MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Field number of `ProcessRequest.batch` (proto/batchd/v1/batchd.proto).
const BATCH_FIELD: u32 = 1;
/// Field number of `JobBatch.batch_id`.
const BATCH_ID_FIELD: u32 = 1;
/// Field number of `JobBatch.jobs`.
const JOBS_FIELD: u32 = 2;
/// Longest pause between retries of a job.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How `run` reads, sends and writes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Most jobs per JobBatch.
    pub batch_size: usize,
    /// Largest encoded request: a batch is sent before it would grow past it, and a job that does
    /// not fit alone is a bad line. Keep it at or under the daemon's `max_message_size`.
    pub max_message: usize,
    /// Jobs sent and not yet written out; bounds memory, with `--ordered` too.
    pub max_in_flight: usize,
    /// Write results in input order.
    pub ordered: bool,
    /// Resend a job that ends failed or timed_out up to this many times.
    pub retry: u32,
    /// Pause before the first retry; doubles each time.
    pub retry_backoff: Duration,
    /// Stop at the first bad input line.
    pub strict: bool,
    /// Values for fields a line omits.
    pub defaults: LineDefaults,
    /// Deadline of the whole call.
    pub deadline: Option<Duration>,
    /// Ids to skip (finished ok in an earlier run, from the job log).
    pub skip: HashSet<String>,
    /// W3C trace context to send (batchctl's `batchctl.run` span); `None`: a `traceparent` made
    /// here, a child of `$TRACEPARENT` when the caller runs in a trace.
    pub trace: Option<TraceHeaders>,
    /// The bearer token to send, for a daemon with principals.
    pub token: Option<super::Token>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            batch_size: 256,
            max_message: DEFAULT_MAX_MESSAGE,
            max_in_flight: 8192,
            ordered: false,
            retry: 0,
            retry_backoff: Duration::from_millis(200),
            strict: false,
            defaults: LineDefaults::default(),
            deadline: None,
            skip: HashSet::new(),
            trace: None,
            token: None,
        }
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
struct Tracked {
    seq: u64,
    attempts: u32,
    batch: String,
    /// Kept only when it may be retried.
    job: Option<proto::Job>,
}

/// Runs every job of `input` over one Process call, writing results to `output` and, if given, the
/// job log. Returns when the input is done and every result is written, when `interrupt` completes
/// (the call is cancelled: the daemon stops all of its jobs), or on the first error.
pub async fn run<R, W, L>(
    client: &mut BatchServiceClient<Channel>,
    input: R,
    output: W,
    joblog: Option<L>,
    opts: &RunOptions,
    progress: &mut Progress,
    interrupt: impl Future<Output = ()>,
) -> (Summary, Result<(), ClientError>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    L: AsyncWrite + Unpin,
{
    let mut state = State::new(opts, output, joblog);
    let res = state.run(client, input, progress, interrupt).await;
    // Results already received are written even when the run stops early.
    let flushed = state.drain_reorder().await;
    state.summary.elapsed = state.started.elapsed();
    progress.clear();
    (state.summary, res.and(flushed))
}

struct State<'a, W, L> {
    opts: &'a RunOptions,
    summary: Summary,
    out: BufWriter<W>,
    joblog: Option<BufWriter<L>>,
    inflight: HashMap<String, Tracked>,
    /// Results waiting for earlier ones (`--ordered`), by input sequence.
    reorder: BTreeMap<u64, Vec<u8>>,
    next_seq: u64,
    next_out: u64,
    building: Option<Building>,
    /// Requests ready to send, with how many new (not retried) jobs each carries.
    outgoing: VecDeque<(proto::ProcessRequest, u64)>,
    retries: BinaryHeap<Reverse<(Instant, u64, String)>>,
    started: Instant,
}

impl<'a, W, L> State<'a, W, L>
where
    W: AsyncWrite + Unpin,
    L: AsyncWrite + Unpin,
{
    fn new(opts: &'a RunOptions, output: W, joblog: Option<L>) -> Self {
        Self {
            opts,
            summary: Summary::default(),
            out: BufWriter::new(output),
            joblog: joblog.map(BufWriter::new),
            inflight: HashMap::new(),
            reorder: BTreeMap::new(),
            next_seq: 0,
            next_out: 0,
            building: None,
            outgoing: VecDeque::new(),
            retries: BinaryHeap::new(),
            started: Instant::now(),
        }
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        client: &mut BatchServiceClient<Channel>,
        input: R,
        progress: &mut Progress,
        interrupt: impl Future<Output = ()>,
    ) -> Result<(), ClientError> {
        let mut lines = FramedRead::new(input, LineDecoder::new(MAX_LINE));
        let mut input_done = false;
        let mut line_no = 0u64;

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
            let can_read = !input_done
                && self.outgoing.is_empty()
                && self.outstanding() < self.opts.max_in_flight;
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
                        self.results(msg.results).await?;
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
                frame = lines.next(), if can_read => {
                    let mut frame = frame;
                    loop {
                        match frame {
                            None => {
                                input_done = true;
                                break;
                            }
                            Some(frame) => {
                                line_no += 1;
                                self.line(line_no, frame, progress)?;
                            }
                        }
                        let full = self
                            .building
                            .as_ref()
                            .is_some_and(|b| b.jobs.len() >= self.opts.batch_size);
                        if full || !self.outgoing.is_empty() || self.outstanding() >= self.opts.max_in_flight {
                            break;
                        }
                        // Take what is already buffered; send a partial batch rather than wait.
                        match lines.next().now_or_never() {
                            Some(next) => frame = next,
                            None => break,
                        }
                    }
                    self.flush_batch();
                }
            }
        }
    }

    /// Jobs sent or about to be, and results not written yet.
    fn outstanding(&self) -> usize {
        self.inflight.len()
            + self.reorder.len()
            + self.building.as_ref().map_or(0, |b| b.jobs.len())
    }

    fn line(
        &mut self,
        line_no: u64,
        frame: Result<Line, std::io::Error>,
        progress: &mut Progress,
    ) -> Result<(), ClientError> {
        let parsed = match frame.map_err(ClientError::Input)? {
            Line::Text(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => jobline::parse(line_no, text, &self.opts.defaults),
                Err(_) => Err(LineError {
                    line: line_no,
                    reason: "not valid UTF-8".into(),
                }),
            },
            Line::TooLong => Err(LineError {
                line: line_no,
                reason: format!("longer than {MAX_LINE} bytes; skipped"),
            }),
        };
        let job = match parsed {
            Ok(Some(job)) => job,
            Ok(None) => return Ok(()),
            Err(e) => return self.bad_line(e, progress),
        };
        if self.opts.skip.contains(&job.job.id) {
            self.summary.skipped += 1;
            return Ok(());
        }
        if self.inflight.contains_key(&job.job.id) {
            let e = LineError {
                line: line_no,
                reason: format!("id {:?} is still in use by an unfinished job", job.job.id),
            };
            return self.bad_line(e, progress);
        }
        // Sizes are exact: what prost will encode, which is what the daemon's limit counts.
        let entry = prost::encoding::message::encoded_len(JOBS_FIELD, &job.job);
        let alone = request_len(batch_id_len(&job.batch) + entry);
        if alone > self.opts.max_message {
            let e = LineError {
                line: line_no,
                reason: format!(
                    "the job needs a request of {alone} bytes, more than --max-message ({}); skipped",
                    size_text(self.opts.max_message)
                ),
            };
            return self.bad_line(e, progress);
        }
        let fits = |b: &Building| {
            b.batch_id == job.batch && request_len(b.body + entry) <= self.opts.max_message
        };
        if self.building.as_ref().is_some_and(|b| !fits(b)) {
            self.flush_batch();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight.insert(
            job.job.id.clone(),
            Tracked {
                seq,
                attempts: 1,
                batch: job.batch.clone(),
                job: (self.opts.retry > 0).then(|| job.job.clone()),
            },
        );
        let building = self.building.get_or_insert_with(|| Building {
            body: batch_id_len(&job.batch),
            batch_id: job.batch,
            jobs: Vec::new(),
        });
        building.jobs.push(job.job);
        building.body += entry;
        Ok(())
    }

    fn bad_line(&mut self, e: LineError, progress: &mut Progress) -> Result<(), ClientError> {
        self.summary.bad_lines += 1;
        if self.opts.strict {
            return Err(ClientError::BadLine(e));
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

    async fn results(&mut self, results: Vec<proto::JobResult>) -> Result<(), ClientError> {
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
            self.summary.record(r.outcome);
            if let Some(log) = &mut self.joblog {
                let rec = LogRecord {
                    id: r.job_id.clone(),
                    outcome: super::record::outcome_name(r.outcome).into(),
                };
                let mut line = serde_json::to_vec(&rec).unwrap_or_default();
                line.push(b'\n');
                log.write_all(&line).await.map_err(ClientError::JobLog)?;
            }
            let line = ResultRecord::new(&r, t.attempts).to_line();
            if self.opts.ordered {
                self.reorder.insert(t.seq, line);
                while let Some(line) = self.reorder.remove(&self.next_out) {
                    self.write(&line).await?;
                    self.next_out += 1;
                }
            } else {
                self.write(&line).await?;
            }
        }
        self.flush().await
    }

    /// Writes the results still waiting for earlier ones (the run stopped early).
    async fn drain_reorder(&mut self) -> Result<(), ClientError> {
        for line in std::mem::take(&mut self.reorder).into_values() {
            self.write(&line).await?;
        }
        self.flush().await
    }

    async fn write(&mut self, line: &[u8]) -> Result<(), ClientError> {
        self.out.write_all(line).await.map_err(ClientError::Output)
    }

    /// Pushes results and job log lines out, so an interrupted run keeps what it reported.
    async fn flush(&mut self) -> Result<(), ClientError> {
        self.out.flush().await.map_err(ClientError::Output)?;
        if let Some(log) = &mut self.joblog {
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

/// `16MiB`, or `1000 bytes` when no unit divides it.
fn size_text(n: usize) -> String {
    let text = ByteSize(n as u64).to_string();
    if text.bytes().all(|c| c.is_ascii_digit()) {
        format!("{text} bytes")
    } else {
        text
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
mod tests {
    use prost::Message as _;

    use super::*;

    fn job(id: &str, payload: usize) -> proto::Job {
        proto::Job {
            id: id.into(),
            handler: "echo".into(),
            payload: vec![b'x'; payload].into(),
            ..Default::default()
        }
    }

    #[test]
    fn request_sizes_are_what_prost_encodes() {
        // Payload sizes around the varint steps of the length prefixes (128, 16 Ki, 2 Mi).
        let sizes = [
            0,
            1,
            100,
            127,
            128,
            16_300,
            16_384,
            70 * 1024,
            2_097_000,
            2_097_152,
        ];
        for batch_id in ["", "b", &"n".repeat(200)] {
            for n in 0..4 {
                let jobs: Vec<proto::Job> = sizes
                    .iter()
                    .cycle()
                    .skip(n)
                    .take(n + 1)
                    .map(|s| job("i", *s))
                    .collect();
                let body = batch_id_len(batch_id)
                    + jobs
                        .iter()
                        .map(|j| prost::encoding::message::encoded_len(JOBS_FIELD, j))
                        .sum::<usize>();
                let req = batch(batch_id.into(), jobs);
                assert_eq!(request_len(body), req.encoded_len(), "{batch_id:?}, {n}");
            }
        }
    }

    #[test]
    fn sizes_read_with_their_unit() {
        assert_eq!(size_text(16 << 20), "16MiB");
        assert_eq!(size_text(65_537), "65537 bytes");
    }

    #[test]
    fn batches_are_cut_to_the_budget_and_a_job_too_big_alone_is_a_bad_line() {
        let one = batch("b".into(), vec![job("fits", 3000)]).encoded_len();
        let opts = RunOptions {
            max_message: one,
            ..RunOptions::default()
        };
        let mut state = State::new(&opts, tokio::io::sink(), None::<tokio::io::Sink>);
        let mut progress = Progress::new(false);
        let mut line_no = 0;
        let mut feed = |state: &mut State<'_, _, _>, id: &str, size: usize| {
            line_no += 1;
            let text = format!(
                r#"{{"id":"{id}","handler":"echo","payload":"{}","batch":"b"}}"#,
                "x".repeat(size)
            );
            state
                .line(line_no, Ok(Line::Text(text.into())), &mut progress)
                .unwrap();
        };
        for i in 0..20 {
            feed(&mut state, &format!("s{i}"), 400 + 37 * i);
        }
        feed(&mut state, "fits", 3000);
        feed(&mut state, "over", 3001);
        feed(&mut state, "last", 10);
        state.flush_batch();

        assert_eq!(
            state.summary.bad_lines, 1,
            "only the job over the budget alone"
        );
        let batches: Vec<proto::JobBatch> = state
            .outgoing
            .iter()
            .map(|(req, _)| match &req.kind {
                Some(Kind::Batch(b)) => b.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        for (i, b) in batches.iter().enumerate() {
            let len = batch(b.batch_id.clone(), b.jobs.clone()).encoded_len();
            assert!(len <= one, "batch {i}: {len} > {one}");
            // Cut only when the next job would not fit.
            if let Some(next) = batches.get(i + 1).and_then(|n| n.jobs.first()) {
                let mut with = b.jobs.clone();
                with.push(next.clone());
                assert!(
                    batch(b.batch_id.clone(), with).encoded_len() > one,
                    "batch {i}"
                );
            }
        }
        let sent: Vec<&str> = batches
            .iter()
            .flat_map(|b| &b.jobs)
            .map(|j| j.id.as_str())
            .collect();
        let mut expected: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
        expected.extend(["fits".into(), "last".into()]);
        assert_eq!(sent, expected, "input order, the bad line left out");
        assert!(batches.len() > 2, "{} batches", batches.len());
        assert!(!state.inflight.contains_key("over"));
    }
}
