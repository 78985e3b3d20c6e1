//! One call's session: admits its jobs within the window, runs them on granted slots, sends results.
//!
//! The session is a single task that owns everything of the call: the queue, the running job futures,
//! the results not yet sent and the call's claim on the worker pool. When the call's token is cancelled
//! the task returns and drops all of it; there is nothing else to clean up.
//!
//! Here: the session's state, its loop, and jobs starting and finishing. [`admit`] turns what the
//! client sends into admitted jobs, REJECTED results and cancels; [`end`] is how a call ends.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::budget::Wait;
use super::job::{Command, GivenBack, JobRequest, JobResult, Outcome, Reply};
use super::metrics::{EndReason, GaugeDeltas, LocalHistogram};
use super::outbox::Sender;
use super::principal::{CallSlot, Principal};
use super::running::{conclude, Finished, RunningJob};
use super::scheduler::Lane;
use super::trace::{JobSpan, SessionTrace};
use super::{Inner, MAX_RESPONSE_BYTES};
use crate::codec::Text;
use crate::error::Error;
use crate::handlers::{HandlerError, JobContext, JobInput, Params};

mod admit;
mod end;

/// How long a session cut off by shutdown tries to hand over its last results.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// Jobs of a batch a session admits (or rejects) in one turn before it lets other tasks run: a
/// call that sends 10,000-job batches to a large window does not hold a worker thread for
/// milliseconds while small calls wait behind it.
const ADMIT_PER_TURN: usize = 512;

/// What the session hands to the response stream: results (and jobs given back), or the status
/// that ends the call.
pub(super) type Outgoing = Result<Reply, Error>;

/// Unfinished jobs by id; foldhash is several times faster than SipHash and still seeded per process.
type Jobs = HashMap<Text, Slot, foldhash::fast::RandomState>;

/// The state of one call.
pub(super) struct Session<S> {
    engine: Arc<Inner>,
    token: CancellationToken,
    inbound: S,
    /// Still reading the inbound stream (false after half-close, drain or an error).
    reading: bool,
    half_closed: bool,
    /// The rest of a batch not admitted yet because the window was full, with the batch's span.
    pending: Option<(Text, std::vec::IntoIter<JobRequest>, tracing::Span)>,
    /// Admitted jobs waiting for a slot, in order; entries of cancelled jobs are skipped.
    queue: VecDeque<Queued>,
    stale: usize,
    /// Every unfinished job by id.
    jobs: Jobs,
    /// Bytes held in unfinished jobs' inputs and in `ready`'s results (bounded by `session_bytes`).
    held_bytes: usize,
    /// Bytes of the jobs of `pending` (read, not admitted yet).
    pending_bytes: usize,
    /// What the call counts in the daemon's memory budget: `held_bytes + pending_bytes` as of the
    /// last fold.
    budgeted: usize,
    /// The call's place in the queue for the memory budget, while it waits to read.
    budget_wait: Wait,
    running: FuturesUnordered<RunningJob>,
    /// Results waiting for the transport.
    ready: VecDeque<JobResult>,
    /// At drain, hand back the jobs not started (the client asked: it can send them elsewhere).
    give_back: bool,
    /// Jobs handed back and not sent yet.
    given_back: GivenBack,
    out: Sender<Outgoing>,
    deadline: Option<Instant>,
    lane: Lane,
    next_seq: u64,
    /// The window is full and the stream is not read (counted once per stall).
    stalled: bool,
    /// The call's span; job spans are made only when it is sampled.
    trace: SessionTrace,
    /// Jobs of the call by outcome, and a bit per handler row used, for the session span.
    outcomes: [u32; 5],
    /// `outcomes` as last added to the principal's figures.
    outcomes_folded: [u32; 5],
    handler_mix: u64,
    /// When the call's result stream was dropped.
    dropped_at: Arc<OnceLock<Instant>>,
    /// Queue and run times, folded into the engine's histograms once per response message.
    queue_times: LocalHistogram,
    run_times: LocalHistogram,
    /// Queued and running jobs by handler, folded into the engine's gauges before each wait.
    gauges: GaugeDeltas,
    /// The handler the call's last admitted job named, as admission found it: jobs of one handler
    /// in a row are checked without a lookup.
    last_handler: Option<HandlerPick>,
    /// Who the call is: the handlers it may use, its scheduler group and figures.
    principal: Arc<Principal>,
    _slot: CallSlot,
    _permit: OwnedSemaphorePermit,
}

struct Queued {
    seq: u64,
    id: Text,
    /// The handler's row (see `Inner::handlers`).
    row: usize,
    payload: Bytes,
    params: Params,
    timeout: Duration,
}

struct Slot {
    seq: u64,
    batch_id: Text,
    admitted: Instant,
    /// When the job started, once it runs.
    running: Option<Instant>,
    /// The handler's row in the metrics.
    handler_row: usize,
    /// What the job's input counts in `held_bytes`.
    bytes: usize,
    /// The job's span, when the call is sampled.
    span: JobSpan,
}

/// A known handler as a call may use it: its row, whether the call's principal may use it, and
/// its timeouts.
#[derive(Debug, Clone, Copy)]
pub(in crate::engine) struct HandlerPick {
    row: usize,
    allowed: bool,
    /// The timeout of a job that sets none, and the longest one may ask for.
    default_timeout: Duration,
    max_timeout: Duration,
}

/// What a session takes over from its [`super::Call`].
pub(super) struct CallParts {
    pub(super) deadline: Option<Instant>,
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) principal: Arc<Principal>,
    pub(super) slot: CallSlot,
    pub(super) trace: SessionTrace,
    pub(super) dropped_at: Arc<OnceLock<Instant>>,
    pub(super) give_back: bool,
}

/// How the call ends.
enum End {
    /// Every job is done and the client half-closed: the stream ends with OK.
    Ok,
    /// The stream ends with this status.
    Status(Error),
    /// The client is gone; nobody is listening.
    Gone,
}

impl<S> Session<S>
where
    S: Stream<Item = Result<Command, Error>> + Send + Unpin + 'static,
{
    pub(super) fn new(
        engine: Arc<Inner>,
        token: CancellationToken,
        inbound: S,
        out: Sender<Outgoing>,
        call: CallParts,
    ) -> Self {
        let CallParts {
            deadline,
            permit,
            principal,
            slot,
            trace,
            dropped_at,
            give_back,
        } = call;
        engine.metrics.call_opened();
        let lane = engine.scheduler.lane(principal.group());
        let gauges = engine.metrics.gauge_deltas();
        Self {
            engine,
            token,
            inbound,
            reading: true,
            half_closed: false,
            pending: None,
            queue: VecDeque::new(),
            stale: 0,
            jobs: Jobs::default(),
            held_bytes: 0,
            pending_bytes: 0,
            budgeted: 0,
            budget_wait: None,
            running: FuturesUnordered::new(),
            ready: VecDeque::new(),
            give_back,
            given_back: GivenBack::default(),
            out,
            deadline,
            lane,
            next_seq: 0,
            stalled: false,
            trace,
            outcomes: [0; 5],
            outcomes_folded: [0; 5],
            handler_mix: 0,
            dropped_at,
            queue_times: LocalHistogram::default(),
            run_times: LocalHistogram::default(),
            gauges,
            last_handler: None,
            principal,
            _slot: slot,
            _permit: permit,
        }
    }

    /// Runs the call to its end.
    pub(super) async fn run(mut self) {
        let end = self.drive().await;
        let reason = match &end {
            End::Ok => EndReason::HalfClose,
            End::Gone => EndReason::Disconnect,
            End::Status(Error::DeadlineExceeded) => EndReason::Deadline,
            End::Status(Error::ShuttingDown) => EndReason::Shutdown,
            End::Status(_) => EndReason::Error,
        };
        self.engine.metrics.ended(reason);
        let detected = Instant::now();
        let held = !self.jobs.is_empty();
        match end {
            End::Ok => self.out.close(None),
            End::Gone => {
                self.stop_all(reason.as_str());
                let from = self.dropped_at.get().copied().unwrap_or(detected);
                self.observe_cancel(held, reason, from);
            }
            End::Status(e) => {
                tracing::debug!(error = %e, principal = self.principal.name(), "call ended");
                self.stop_all(reason.as_str());
                // A deadline is known in advance: its jobs are late from the deadline on.
                let from = match (reason, self.deadline) {
                    (EndReason::Deadline, Some(at)) => at.min(detected),
                    _ => detected,
                };
                self.observe_cancel(held, reason, from);
                // After the message the transport may still hold: a full slot never loses it.
                self.out.close(Some(Err(e)));
            }
        }
        if self.trace.is_sampled() {
            let metrics = &self.engine.metrics;
            let mix: Vec<&str> = (0..64)
                .filter(|i| self.handler_mix & (1 << i) != 0)
                .map(|i| metrics.handler_name(i))
                .collect();
            self.trace.end(reason, self.outcomes, &mix.join(","));
        }
    }

    async fn drive(&mut self) -> End {
        let cancelled = self.token.clone().cancelled_owned();
        let draining = self.engine.drain.clone().cancelled_owned();
        let at = self.deadline;
        let deadline = async move {
            match at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(cancelled, draining, deadline);
        loop {
            let admitted = self.admit_pending();
            // Every change of the last turn and this admission reaches the shared gauges and the
            // memory budget before the session waits (after the claim on the pool: whoever sees
            // the jobs admitted also finds them waiting for their turn).
            self.engine.metrics.fold_gauges(&mut self.gauges);
            self.fold_budget();
            if let Err(e) = admitted {
                return End::Status(e);
            }
            // More of a batch to admit: others get a turn first, then the loop comes back to it.
            let more = self.pending.is_some() && self.has_room();
            if more {
                tokio::task::yield_now().await;
            }
            if !self.reading
                && self.pending.is_none()
                && self.jobs.is_empty()
                && self.ready.is_empty()
                && self.given_back.is_empty()
            {
                if !self.half_closed {
                    // Shutdown: a client that half-closed meanwhile still gets its OK.
                    self.take_sent();
                    if !self.given_back.is_empty() {
                        // What it sent meanwhile is handed back before the status.
                        continue;
                    }
                }
                return if self.half_closed {
                    End::Ok
                } else {
                    End::Status(Error::ShuttingDown)
                };
            }
            let can_read = self.reading && self.pending.is_none() && self.has_room();
            let stalled = self.reading && !can_read && !more;
            if stalled && !self.stalled {
                self.engine.metrics.stalled();
            }
            self.stalled = stalled;
            // A call holding nothing reads whatever the budget says, so none waits on the others
            // forever (README, "Memory budget").
            let exempt = self.held() == 0;
            if !can_read || exempt {
                // Not waiting for the budget this turn: a turn it was handed goes to the next call.
                self.budget_wait = None;
            }
            tokio::select! {
                biased;
                _ = &mut cancelled => return self.cancelled().await,
                _ = &mut deadline => return End::Status(Error::DeadlineExceeded),
                _ = &mut draining, if self.reading => {
                    self.reading = false;
                    self.take_sent();
                    if self.give_back {
                        self.give_back_unstarted();
                    }
                }
                Some(done) = self.running.next(), if !self.running.is_empty() => self.finished_all(done),
                n = poll_fn(|cx| self.lane.poll_take(cx)), if !self.queue.is_empty() => self.start(n),
                ready = poll_fn(|cx| self.out.poll_ready(cx)), if self.has_ready() => match ready {
                    Ok(()) => {
                        let results = self.take_ready();
                        self.out.send(Ok(results));
                    }
                    Err(_) => return End::Gone,
                },
                msg = poll_fn(|cx| {
                    if !exempt {
                        std::task::ready!(self.engine.budget.poll_room(&mut self.budget_wait, cx));
                    }
                    self.inbound.poll_next_unpin(cx)
                }), if can_read => match msg {
                    None => {
                        self.reading = false;
                        self.half_closed = true;
                    }
                    Some(Ok(cmd)) => {
                        if let Err(e) = self.command(cmd) {
                            return End::Status(e);
                        }
                    }
                    Some(Err(e)) => return End::Status(e),
                },
                // Back to admitting the rest of the batch.
                () = std::future::ready(()), if more => {}
            }
        }
    }

    fn window(&self) -> usize {
        self.engine.limits.session_window
    }

    /// Jobs admitted and not finished, plus results not handed to the transport.
    fn held(&self) -> usize {
        self.jobs.len() + self.ready.len()
    }

    /// Whether the call may take another job: under its window and its byte budget (a call that
    /// holds nothing always may, so one job of any admissible size gets through).
    fn has_room(&self) -> bool {
        self.held() < self.window() && self.held_bytes < self.engine.limits.session_bytes
    }

    /// Starts up to `n` queued jobs on freshly granted slots; gives back the slots it cannot use.
    ///
    /// A handler that can run the job at once ([`Handler::run_now`]) does; any other is polled once
    /// right away: a job that finishes on that poll (a handler that fails fast) is recorded at once
    /// and never becomes a future to track.
    fn start(&mut self, mut n: usize) {
        let engine = Arc::clone(&self.engine);
        let now = Instant::now();
        let max_output = self.engine.limits.max_output;
        let mut done = 0;
        // Most started jobs finish at once: room for their results in one allocation, rather than
        // the queue doubling its way up (and copying) after every response took it whole.
        self.ready.reserve(n.min(self.queue.len()));
        while n > 0 {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            let span = match self.jobs.get_mut(&q.id) {
                Some(slot) if slot.seq == q.seq && slot.running.is_none() => {
                    slot.running = Some(now);
                    self.gauges.queued(slot.handler_row, -1);
                    self.gauges.running(slot.handler_row, 1);
                    self.engine
                        .metrics
                        .queued_for(&mut self.queue_times, now - slot.admitted);
                    slot.span.handle()
                }
                _ => {
                    // Cancelled while queued.
                    self.stale = self.stale.saturating_sub(1);
                    continue;
                }
            };
            n -= 1;
            let input = JobInput {
                payload: q.payload,
                params: q.params,
            };
            let Some((_, handler)) = engine.handlers.get(q.row) else {
                // Rows come from admission, so this cannot happen; end the job rather than lose it.
                let res = Err(HandlerError(format!("no handler in row {}", q.row)));
                done += usize::from(self.finished(conclude(q.id, res, max_output), now));
                continue;
            };
            let res = match handler.run_now(input) {
                Ok(res) => res,
                Err(input) => {
                    let ctx = JobContext::new(self.engine.cpu.clone(), span);
                    let mut work = Arc::clone(handler).run(input, ctx);
                    match (&mut work).now_or_never() {
                        Some(res) => res,
                        None => {
                            let job = RunningJob::new(q.id, work, now, q.timeout, max_output);
                            self.running.push(job);
                            continue;
                        }
                    }
                }
            };
            done += usize::from(self.finished(conclude(q.id, res, max_output), now));
        }
        if self.queue.is_empty() {
            // An idle call keeps no queue memory; admission reserves again per batch.
            self.queue = VecDeque::new();
            self.stale = 0;
        }
        self.lane.release(n + done);
    }

    /// Records `first` and every other job that has already finished, so their results coalesce.
    fn finished_all(&mut self, first: Finished) {
        let now = Instant::now();
        let mut freed = usize::from(self.finished(first, now));
        while let Some(Some(done)) = self.running.next().now_or_never() {
            freed += usize::from(self.finished(done, now));
        }
        self.lane.release(freed);
    }

    /// Records one finished job; returns whether it held a worker slot.
    fn finished(&mut self, done: Finished, now: Instant) -> bool {
        let Some(slot) = self.jobs.remove(&done.id) else {
            return false;
        };
        self.held_bytes = self.held_bytes.saturating_sub(slot.bytes);
        self.gauges.running(slot.handler_row, -1);
        let started = slot.running.unwrap_or(now);
        // A job that finished as it started (echo) ran for no time: no clock arithmetic.
        let ran = match started == now {
            true => Duration::ZERO,
            false => now - started,
        };
        self.engine.metrics.ran_for(&mut self.run_times, ran);
        let cancelled_by = (done.outcome == Outcome::Cancelled).then_some("CancelJobs");
        let result = JobResult {
            job_id: done.id,
            batch_id: slot.batch_id,
            outcome: done.outcome,
            output: done.output,
            error: done.error,
            queued: Some(started - slot.admitted),
            ran: Some(ran),
        };
        self.push_ready(result, slot.handler_row, slot.span, cancelled_by);
        true
    }
}

impl<S> Session<S> {
    /// Whether something waits for the transport: results, or jobs given back.
    fn has_ready(&self) -> bool {
        !self.ready.is_empty() || !self.given_back.is_empty()
    }

    /// Counts a finished job, ends its span and queues its result.
    fn push_ready(
        &mut self,
        result: JobResult,
        row: usize,
        span: JobSpan,
        cancelled_by: Option<&str>,
    ) {
        let metrics = &self.engine.metrics;
        metrics.finished(row, result.outcome, 1);
        metrics.buffered(1);
        self.count(row, result.outcome, 1);
        span.end(&result, cancelled_by);
        self.held_bytes = self.held_bytes.saturating_add(result.wire_size());
        self.ready.push_back(result);
    }

    /// The results that fit in one response (at least one, unless only jobs given back wait), with
    /// the jobs given back that fit beside them.
    fn take_ready(&mut self) -> Reply {
        let results = self.take_results();
        let room =
            MAX_RESPONSE_BYTES.saturating_sub(results.iter().map(JobResult::wire_size).sum());
        let given_back = match self.given_back.is_empty() {
            true => GivenBack::default(),
            false => self.given_back.take_up_to(room.max(1)),
        };
        Reply {
            results,
            given_back,
        }
    }

    /// The results that fit in one response (at least one when any waits).
    fn take_results(&mut self) -> Vec<JobResult> {
        if self.ready.is_empty() {
            return Vec::new();
        }
        let mut size = 0;
        let mut n = 0;
        for r in &self.ready {
            let bytes = r.wire_size();
            if n > 0 && size + bytes > MAX_RESPONSE_BYTES {
                break;
            }
            size += bytes;
            n += 1;
        }
        self.held_bytes = self.held_bytes.saturating_sub(size);
        let metrics = &self.engine.metrics;
        metrics.unbuffered(n);
        metrics.coalesced(n);
        metrics.fold_times(&mut self.queue_times, &mut self.run_times);
        self.fold_outcomes();
        if n == self.ready.len() {
            // Usually everything fits: hand over the buffer itself and keep none.
            return Vec::from(std::mem::take(&mut self.ready));
        }
        self.ready.drain(..n).collect()
    }

    /// Brings what the call counts in the memory budget up to date (one atomic add when it changed).
    pub(super) fn fold_budget(&mut self) {
        let now = self.held_bytes + self.pending_bytes;
        if now != self.budgeted {
            self.engine.budget.update(self.budgeted, now);
            self.budgeted = now;
        }
    }

    /// Adds the jobs finished since the last fold to the principal's figures.
    pub(super) fn fold_outcomes(&mut self) {
        let stats = self.principal.stats();
        for (i, (now, folded)) in self
            .outcomes
            .iter()
            .zip(&mut self.outcomes_folded)
            .enumerate()
        {
            if *now != *folded {
                let n = now.wrapping_sub(*folded);
                stats.finished[i].fetch_add(u64::from(n), std::sync::atomic::Ordering::Relaxed);
                *folded = *now;
            }
        }
    }

    /// Counts `n` jobs of handler `row` ending with `outcome`, for the session span.
    fn count(&mut self, row: usize, outcome: Outcome, n: usize) {
        let i = outcome.index();
        self.outcomes[i] = self.outcomes[i].saturating_add(n as u32);
        self.handler_mix |= 1u64.checked_shl(row as u32).unwrap_or(0);
    }
}
