//! A run's Process calls fed by a [`Source`] of jobs, its results handed to a [`Sink`]: the
//! sending and receiving core that `batchctl run` (JSON Lines in) and `batchctl map` (files in)
//! share, over one daemon or several replicas ([`super::replicas`]).
//!
//! The core cuts batches to `batch_size` jobs and `max_message` bytes (exact prost sizes), sends
//! each batch to the live replica with the fewest unanswered jobs, keeps at most `max_in_flight`
//! jobs and `max_in_flight_bytes` of payload unanswered across all replicas, resends jobs that end
//! failed or timed out (`retry`, with exponential backoff), writes the job log, counts everything
//! in a [`Summary`], and stops every call on an interrupt (the daemons then stop every job).
//!
//! **Failover.** Every job is kept until its result is written. When a replica is lost (its call
//! fails: UNAVAILABLE, a reset or protocol error ending UNKNOWN, a keepalive timeout, a closed
//! connection) or drains, its jobs without a result go back in the resubmission queue and to the
//! other replicas, before any new input. So each input job gets exactly one result, and runs at
//! least once: one that a lost replica had run, or started, without its result arriving, runs
//! again (counted in [`Summary::resubmitted`]). A result for a job that has one already, or that
//! is no longer on that call, is dropped and counted. With every replica gone, jobs wait while the
//! replicas are tried again with jittered backoff, up to `reconnect_timeout` (and `deadline`).
//!
//! The resubmission queue holds ids of jobs in the in-flight table only, each at most once, so it
//! is bounded by `max_in_flight` like everything else the run holds.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

use super::endpoints::Endpoints;
use super::progress::Progress;
use super::record::{outcome_name, LogRecord};
use super::replicas::{CallId, CallSetup, Event, Pool, Timing};
use super::{plural, ClientError, Summary, Token, TraceHeaders};
use crate::outcome::Outcome;
use crate::proto::{self, process_request::Kind};
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
/// Default of [`CallOptions::reconnect_timeout`].
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`CallOptions::resolve_every`].
pub const DEFAULT_RESOLVE_EVERY: Duration = Duration::from_secs(10);
/// Default of [`CallOptions::keepalive`].
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);

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
    /// With every replica lost, how long to keep trying them before giving up
    /// ([`ClientError::NoReplica`]); `deadline` ends the wait earlier.
    pub reconnect_timeout: Duration,
    /// How often `dns:///` names are resolved again (also after every loss), so that new
    /// replicas join the run.
    pub resolve_every: Duration,
    /// HTTP/2 keepalive pings on each replica's connection, this often and answered within as
    /// long: a replica gone silent (a partition, a frozen host) is lost after at most twice this.
    pub keepalive: Duration,
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
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
            resolve_every: DEFAULT_RESOLVE_EVERY,
            keepalive: DEFAULT_KEEPALIVE,
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
    /// How many times it was sent again because its replica was lost or gave it back (it may
    /// have run that many times more).
    pub resubmissions: u32,
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

/// Runs the jobs of `source` on the replicas of `to` (one Process call each) until `source` is
/// done and every result is delivered to `sink` (and to the job log, if given), until `interrupt`
/// completes (the calls are cancelled: the daemons stop all of their jobs), or until the first
/// error. `to` may be [`Endpoints`], or a client or channel of the caller's (one replica).
pub async fn drive<S, K, L>(
    to: impl Into<Endpoints>,
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
    let setup = CallSetup {
        deadline: opts.deadline.map(|d| call.started + d),
        token: opts.token.clone(),
        // One trace for every call: the daemons' spans all join it (a child of $TRACEPARENT when
        // the caller runs in one).
        trace: opts.trace.clone().unwrap_or_else(|| {
            let parent = std::env::var("TRACEPARENT").ok();
            TraceHeaders::generated(parent.as_deref())
        }),
    };
    let timing = Timing {
        resolve_every: opts.resolve_every,
        keepalive: opts.keepalive,
    };
    let res = match Pool::new(to.into(), setup, timing) {
        Ok(mut pool) => call.run(&mut pool, source, progress, interrupt).await,
        Err(e) => Err(e),
    };
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

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In the batch being filled.
    Building,
    /// In the resubmission queue, waiting for a replica.
    Resend,
    /// Waiting for its retry (`retry`).
    Retry,
    /// Assigned to this replica's call (queued to send or sent), no result yet.
    At(usize, CallId),
}

/// A job taken from the source and not finished.
struct Tracked<T> {
    seq: u64,
    attempts: u32,
    batch: String,
    /// Kept until the job's result is written: it may have to go to another replica.
    job: proto::Job,
    /// Payload bytes it holds against `max_in_flight_bytes`.
    bytes: usize,
    origin: Origin,
    tag: T,
    place: Place,
    /// Counted in [`Summary::sent`] already.
    sent: bool,
    /// Taken from a replica that saw it (lost, drained, gave it back): its next send is a
    /// resubmission.
    displaced: bool,
    resubmissions: u32,
}

struct Call<'a, T, K, L> {
    opts: &'a CallOptions,
    summary: Summary,
    sink: &'a mut K,
    joblog: Option<BufWriter<L>>,
    inflight: HashMap<String, Tracked<T>>,
    next_seq: u64,
    building: Option<Building>,
    /// Batches cut and not handed to a replica yet (one or two: the core hands them over at once).
    batches: VecDeque<Building>,
    /// Ids of jobs (in `inflight`, place [`Place::Resend`], each once) to send again, before any
    /// new input: at most `inflight.len()`, so at most `max_in_flight`.
    resend: VecDeque<String>,
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
            batches: VecDeque::new(),
            resend: VecDeque::new(),
            retries: BinaryHeap::new(),
            held_bytes: 0,
            wants: None,
            max_payload: None,
            started: Instant::now(),
        }
    }

    async fn run<S: Source<Tag = T>>(
        &mut self,
        pool: &mut Pool,
        source: &mut S,
        progress: &Progress,
        interrupt: impl Future<Output = ()>,
    ) -> Result<(), ClientError> {
        let mut input_done = false;
        let deadline = self.opts.deadline.map(|d| self.started + d);
        // Since when no replica has been live while work waits.
        let mut lost_since: Option<Instant> = None;
        tokio::pin!(interrupt);

        loop {
            self.assign_resends(pool);
            if let Some(e) = pool.unreachable() {
                return Err(e);
            }
            let done = input_done && self.inflight.is_empty() && self.building.is_none();
            debug_assert!(
                self.batches.is_empty(),
                "batches are handed over as they are cut"
            );
            if done && pool.ever_live() {
                // Every job has its result: half-close every call and wait for their ends.
                pool.finish();
                if pool.open_calls() == 0 {
                    return Ok(());
                }
            } else {
                self.summary.replicas_live = pool.live() as u64;
                self.summary.replicas_known = pool.known() as u64;
            }
            lost_since = match (pool.live(), pool.ever_live() && !done) {
                (0, true) => Some(lost_since.unwrap_or_else(Instant::now)),
                _ => None,
            };
            let give_up_at = lost_since
                .map(|since| since + self.opts.reconnect_timeout)
                .map(|at| deadline.map_or(at, |d| d.min(at)));
            let retry_at = self.retries.peek().map(|Reverse((at, _, _))| *at);
            let room = self.room();
            let can_read = !input_done
                && self.resend.is_empty()
                && pool.pick().is_some()
                && self.has_room(room);
            tokio::select! {
                biased;
                () = &mut interrupt => {
                    self.summary.interrupted = true;
                    return Ok(());
                }
                event = poll_fn(|cx| pool.poll_event(cx)) => {
                    self.event(event, pool, progress).await?;
                }
                () = sleep_until(retry_at), if retry_at.is_some() => self.resend_due(),
                () = sleep_until(give_up_at), if give_up_at.is_some() => {
                    let waited = lost_since.map_or(Duration::ZERO, |s| s.elapsed());
                    return Err(pool.no_replica(waited));
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
                            Some(pull) => {
                                self.take(pull?, progress)?;
                                self.send_batches(pool);
                            }
                        }
                        let full = self
                            .building
                            .as_ref()
                            .is_some_and(|b| b.jobs.len() >= self.opts.batch_size);
                        let room = self.room();
                        if full || pool.pick().is_none() || !self.has_room(room) {
                            break;
                        }
                        // Take what is already there; send a partial batch rather than wait.
                        match source.next(room).now_or_never() {
                            Some(next) => pulled = next,
                            None => break,
                        }
                    }
                    self.flush_batch();
                    self.send_batches(pool);
                }
            }
        }
    }

    /// Takes in what happened to a replica.
    async fn event(
        &mut self,
        event: Event,
        pool: &mut Pool,
        progress: &Progress,
    ) -> Result<(), ClientError> {
        match event {
            Event::Reply { replica, call, msg } => {
                if let Some(back) = msg.given_back {
                    if let Some(unsent) = pool.drain(replica, call) {
                        self.drained(replica, call, unsent, pool, progress);
                    }
                    let ids = back.not_started.into_iter().chain(back.stopped);
                    self.give_back(replica, call, ids, pool);
                }
                self.results(replica, call, msg.results, pool, progress)
                    .await?;
                progress.tick(&self.summary);
            }
            Event::Draining {
                replica,
                call,
                unsent,
            } => self.drained(replica, call, unsent, pool, progress),
            Event::Ended {
                replica,
                call,
                lost,
                unsent,
            } => {
                self.unassign(&unsent);
                let n = self.requeue(replica, call);
                if let Some(why) = lost {
                    self.summary.replicas_lost += 1;
                    let resubmit = match n {
                        0 => String::new(),
                        n => format!("; {} without a result go to the others", plural(n, "job")),
                    };
                    progress.message(&format!(
                        "batchctl: lost replica {}: {why}{resubmit}",
                        pool.name(replica)
                    ));
                } else if n > 0 {
                    progress.message(&format!(
                        "batchctl: replica {} ended its call; {} without a result go to the others",
                        pool.name(replica),
                        plural(n, "job")
                    ));
                }
                progress.tick(&self.summary);
            }
            Event::Fatal(status) => return Err(ClientError::from_status(status)),
            Event::Note(note) => progress.message(&note),
            Event::Changed => {}
        }
        Ok(())
    }

    /// A replica drains: the batches it had not sent go to the others at once; its running jobs'
    /// results still come, and its daemon gives back (or, if older, leaves without result) the rest.
    fn drained(
        &mut self,
        replica: usize,
        call: CallId,
        unsent: Vec<proto::ProcessRequest>,
        pool: &mut Pool,
        progress: &Progress,
    ) {
        self.summary.replicas_lost += 1;
        let n = self.unassign(&unsent);
        pool.answered(replica, call, n);
        progress.message(&format!(
            "batchctl: replica {} is draining; it gets no more jobs",
            pool.name(replica)
        ));
    }

    /// Jobs of requests never sent go back to the resubmission queue (not counted as resubmitted:
    /// no replica saw them). Returns how many.
    fn unassign(&mut self, unsent: &[proto::ProcessRequest]) -> usize {
        let ids = unsent.iter().flat_map(|r| match &r.kind {
            Some(Kind::Batch(b)) => b.jobs.as_slice(),
            _ => &[],
        });
        let mut n = 0;
        for job in ids {
            if let Some(t) = self.inflight.get_mut(&job.id) {
                if matches!(t.place, Place::At(..)) {
                    t.place = Place::Resend;
                    self.resend.push_back(job.id.clone());
                    n += 1;
                }
            }
        }
        n
    }

    /// Jobs the replica's call gave back go to the others. Returns how many.
    fn give_back(
        &mut self,
        replica: usize,
        call: CallId,
        ids: impl Iterator<Item = String>,
        pool: &mut Pool,
    ) -> u64 {
        let mut n = 0;
        for id in ids {
            if let Some(t) = self.inflight.get_mut(&id) {
                if t.place == Place::At(replica, call) {
                    t.place = Place::Resend;
                    t.displaced = true;
                    self.resend.push_back(id);
                    n += 1;
                }
            }
        }
        pool.answered(replica, call, n as usize);
        n
    }

    /// Every job still on the replica's ended call goes to the others. Returns how many.
    fn requeue(&mut self, replica: usize, call: CallId) -> u64 {
        let mut n = 0;
        for (id, t) in &mut self.inflight {
            if t.place == Place::At(replica, call) {
                t.place = Place::Resend;
                t.displaced = true;
                self.resend.push_back(id.clone());
                n += 1;
            }
        }
        n
    }

    /// Sends the resubmission queue out in batches, while some replica can take one.
    fn assign_resends(&mut self, pool: &mut Pool) {
        debug_assert!(
            self.resend.len() <= self.inflight.len()
                && self.inflight.len() <= self.opts.max_in_flight,
            "the resubmission queue holds in-flight jobs only"
        );
        while !self.resend.is_empty() {
            let Some(replica) = pool.pick() else {
                return;
            };
            let mut batch_id: Option<String> = None;
            let mut jobs = Vec::new();
            let mut body = 0;
            while let Some(id) = self.resend.front() {
                let Some(t) = self.inflight.get(id).filter(|t| t.place == Place::Resend) else {
                    self.resend.pop_front();
                    continue;
                };
                let entry = prost::encoding::message::encoded_len(JOBS_FIELD, &t.job);
                let same = batch_id.as_ref().is_none_or(|b| *b == t.batch);
                let fits = request_len(body + entry) <= self.opts.max_message;
                if !jobs.is_empty() && (!same || !fits || jobs.len() >= self.opts.batch_size) {
                    break;
                }
                if batch_id.is_none() {
                    body = batch_id_len(&t.batch);
                    batch_id = Some(t.batch.clone());
                }
                body += entry;
                jobs.push(t.job.clone());
                self.resend.pop_front();
            }
            if let Some(batch_id) = batch_id {
                self.dispatch(replica, batch_id, jobs, pool);
            }
        }
    }

    /// Queues `jobs` on the replica's call (or, when it is not live, in the resubmission queue).
    fn dispatch(
        &mut self,
        replica: usize,
        batch_id: String,
        jobs: Vec<proto::Job>,
        pool: &mut Pool,
    ) {
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let place = match pool.send(replica, batch(batch_id, jobs), ids.len()) {
            Ok(call) => Place::At(replica, call),
            Err(_) => Place::Resend,
        };
        for id in ids {
            let Some(t) = self.inflight.get_mut(&id) else {
                continue;
            };
            t.place = place;
            if place == Place::Resend {
                self.resend.push_back(id);
            } else if !t.sent {
                t.sent = true;
                self.summary.sent += 1;
            } else if t.displaced {
                t.displaced = false;
                t.resubmissions += 1;
                self.summary.resubmitted += 1;
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

    /// Jobs taken and not answered, and results not written yet.
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
        let building = self.building.get_or_insert_with(|| Building {
            body: batch_id_len(&fed.batch),
            batch_id: fed.batch.clone(),
            jobs: Vec::new(),
        });
        building.jobs.push(fed.job.clone());
        building.body += entry;
        self.inflight.insert(
            fed.job.id.clone(),
            Tracked {
                seq,
                attempts: 1,
                batch: fed.batch,
                job: fed.job,
                bytes,
                origin: fed.origin,
                tag: fed.tag,
                place: Place::Building,
                sent: false,
                displaced: false,
                resubmissions: 0,
            },
        );
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

    /// Ends the batch being filled.
    fn flush_batch(&mut self) {
        if let Some(b) = self.building.take() {
            self.batches.push_back(b);
        }
    }

    /// Hands every batch cut to the replica that should have it.
    fn send_batches(&mut self, pool: &mut Pool) {
        while let Some(b) = self.batches.pop_front() {
            match pool.pick_any() {
                Some(replica) => self.dispatch(replica, b.batch_id, b.jobs, pool),
                None => {
                    // No replica is live: the jobs wait in the resubmission queue.
                    for job in b.jobs {
                        if let Some(t) = self.inflight.get_mut(&job.id) {
                            t.place = Place::Resend;
                            self.resend.push_back(job.id);
                        }
                    }
                }
            }
        }
    }

    /// Retries now due go to the resubmission queue.
    fn resend_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _, _))) = self.retries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, id))) = self.retries.pop() else {
                break;
            };
            if let Some(t) = self.inflight.get_mut(&id) {
                if t.place == Place::Retry {
                    t.place = Place::Resend;
                    self.resend.push_back(id);
                }
            }
        }
    }

    async fn results(
        &mut self,
        replica: usize,
        call: CallId,
        results: Vec<proto::JobResult>,
        pool: &mut Pool,
        progress: &Progress,
    ) -> Result<(), ClientError> {
        let mut done = Vec::with_capacity(results.len());
        for r in results {
            // Only the call the job is on answers it: anything else is a second result.
            let mine = self
                .inflight
                .get(&r.job_id)
                .is_some_and(|t| t.place == Place::At(replica, call));
            if !mine {
                self.summary.duplicates_dropped += 1;
                continue;
            }
            let Some(mut t) = self.inflight.remove(&r.job_id) else {
                continue;
            };
            pool.answered(replica, call, 1);
            let retryable = matches!(
                Outcome::from_proto(r.outcome),
                Some(Outcome::Failed | Outcome::TimedOut)
            );
            if retryable && t.attempts <= self.opts.retry {
                let backoff = self
                    .opts
                    .retry_backoff
                    .saturating_mul(1 << (t.attempts - 1).min(16))
                    .min(MAX_BACKOFF);
                t.attempts += 1;
                t.place = Place::Retry;
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
                resubmissions: t.resubmissions,
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

#[cfg(test)]
mod tests;
