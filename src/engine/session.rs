//! One call's session: admits its jobs within the window, runs them on granted slots, sends results.
//!
//! The session is a single task that owns everything of the call: the queue, the running job futures,
//! the results not yet sent and the call's claim on the worker pool. When the call's token is cancelled
//! the task returns and drops all of it; there is nothing else to clean up.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::job::{Command, JobRequest, JobResult, Outcome};
use super::outbox::Sender;
use super::running::{conclude, Finished, RunningJob};
use super::scheduler::Lane;
use super::{Counters, Inner, MAX_RESPONSE_BYTES};
use crate::error::Error;
use crate::handlers::{quote, Handler, JobContext, JobInput, Params};
use crate::telemetry::metrics::{outcome_index, EndReason, GaugeDeltas, LocalHistogram};
use crate::telemetry::{self, JobSpan, SessionTrace};

/// How long a session cut off by shutdown tries to hand over its last results.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

/// What the session hands to the response stream: results, or the status that ends the call.
pub(super) type Outgoing = Result<Vec<JobResult>, Error>;

/// Unfinished jobs by id; foldhash is several times faster than SipHash and still seeded per process.
type Jobs = HashMap<String, Slot, foldhash::fast::RandomState>;

/// The state of one call.
pub(super) struct Session<S> {
    engine: Arc<Inner>,
    token: CancellationToken,
    inbound: S,
    /// Still reading the inbound stream (false after half-close, drain or an error).
    reading: bool,
    half_closed: bool,
    /// The rest of a batch not admitted yet because the window was full, with the batch's span.
    pending: Option<(Arc<str>, std::vec::IntoIter<JobRequest>, tracing::Span)>,
    /// Admitted jobs waiting for a slot, in order; entries of cancelled jobs are skipped.
    queue: VecDeque<Queued>,
    stale: usize,
    /// Every unfinished job by id.
    jobs: Jobs,
    running: FuturesUnordered<RunningJob>,
    /// Results waiting for the transport.
    ready: VecDeque<JobResult>,
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
    handler_mix: u64,
    /// When the call's result stream was dropped.
    dropped_at: Arc<OnceLock<Instant>>,
    /// Queue and run times, folded into the engine's histograms once per response message.
    queue_times: LocalHistogram,
    run_times: LocalHistogram,
    /// Queued and running jobs by handler, folded into the engine's gauges before each wait.
    gauges: GaugeDeltas,
    _permit: OwnedSemaphorePermit,
}

struct Queued {
    seq: u64,
    id: String,
    handler: Arc<dyn Handler>,
    payload: Bytes,
    params: Params,
    timeout: Duration,
}

struct Slot {
    seq: u64,
    batch_id: Arc<str>,
    admitted: Instant,
    /// When the job started, once it runs.
    running: Option<Instant>,
    /// The handler's row in the metrics.
    handler_row: usize,
    /// The job's span, when the call is sampled.
    span: JobSpan,
}

/// What a session takes over from its [`super::Call`].
pub(super) struct CallParts {
    pub(super) deadline: Option<Instant>,
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) trace: SessionTrace,
    pub(super) dropped_at: Arc<OnceLock<Instant>>,
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
            trace,
            dropped_at,
        } = call;
        engine.stats.calls_open.fetch_add(1, Ordering::Relaxed);
        let lane = engine.scheduler.lane();
        let gauges = engine.stats.gauge_deltas();
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
            running: FuturesUnordered::new(),
            ready: VecDeque::new(),
            out,
            deadline,
            lane,
            next_seq: 0,
            stalled: false,
            trace,
            outcomes: [0; 5],
            handler_mix: 0,
            dropped_at,
            queue_times: LocalHistogram::default(),
            run_times: LocalHistogram::default(),
            gauges,
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
        self.engine.stats.ended(reason);
        let detected = Instant::now();
        let held = !self.jobs.is_empty();
        match end {
            End::Ok => {}
            End::Gone => {
                self.stop_all("the client went away");
                let from = self.dropped_at.get().copied().unwrap_or(detected);
                self.observe_cancel(held, reason, from);
            }
            End::Status(e) => {
                tracing::debug!(error = %e, "call ended");
                self.stop_all(reason.label());
                // A deadline is known in advance: its jobs are late from the deadline on.
                let from = match (reason, self.deadline) {
                    (EndReason::Deadline, Some(at)) => at.min(detected),
                    _ => detected,
                };
                self.observe_cancel(held, reason, from);
                if let Ok(Ok(())) = tokio::time::timeout(FINAL_FLUSH, self.out.ready()).await {
                    self.out.send(Err(e));
                }
            }
        }
        if self.trace.is_sampled() {
            let names = &self.engine.stats.handlers;
            let mix: Vec<&str> = (0..names.len().min(64))
                .filter(|i| self.handler_mix & (1 << i) != 0)
                .map(|i| names[i].as_str())
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
            // Every change of the last turn reaches the shared gauges before the session waits.
            self.engine.stats.fold_gauges(&mut self.gauges);
            if let Err(e) = self.admit_pending() {
                return End::Status(e);
            }
            if !self.reading
                && self.pending.is_none()
                && self.jobs.is_empty()
                && self.ready.is_empty()
            {
                if !self.half_closed {
                    // Shutdown: a client that half-closed meanwhile still gets its OK.
                    self.take_sent();
                }
                return if self.half_closed {
                    End::Ok
                } else {
                    End::Status(Error::ShuttingDown)
                };
            }
            let can_read = self.reading && self.pending.is_none() && self.held() < self.window();
            let stalled = self.reading && !can_read;
            if stalled && !self.stalled {
                Counters::add(&self.engine.stats.backpressure, 1);
            }
            self.stalled = stalled;
            tokio::select! {
                biased;
                _ = &mut cancelled => return self.cancelled().await,
                _ = &mut deadline => return End::Status(Error::DeadlineExceeded),
                _ = &mut draining, if self.reading => {
                    self.reading = false;
                    self.take_sent();
                }
                Some(done) = self.running.next(), if !self.running.is_empty() => self.finished_all(done),
                n = poll_fn(|cx| self.lane.poll_take(cx)), if !self.queue.is_empty() => self.start(n),
                ready = poll_fn(|cx| self.out.poll_ready(cx)), if !self.ready.is_empty() => match ready {
                    Ok(()) => {
                        let results = self.take_ready();
                        self.out.send(Ok(results));
                    }
                    Err(_) => return End::Gone,
                },
                msg = self.inbound.next(), if can_read => match msg {
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
            }
        }
    }

    /// Once shutdown began: takes what the client already sent, without waiting. A half-close is
    /// noted, so the call can still end OK; cancels apply; batches are not run (the call's
    /// UNAVAILABLE status tells the client that jobs without a result were not run).
    fn take_sent(&mut self) {
        while let Some(item) = self.inbound.next().now_or_never() {
            match item {
                None => {
                    self.half_closed = true;
                    return;
                }
                Some(Ok(cmd @ Command::Cancel { .. })) => {
                    let _ = self.command(cmd);
                }
                Some(Ok(Command::Submit { .. })) => {}
                Some(Err(_)) => return,
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

    fn command(&mut self, cmd: Command) -> Result<(), Error> {
        match cmd {
            Command::Submit { batch_id, jobs } => {
                let limit = self.engine.limits.max_jobs_per_batch;
                if jobs.len() > limit {
                    return Err(Error::InvalidArgument(format!(
                        "batch {} has {} jobs, over max_jobs_per_batch ({limit})",
                        quote(&batch_id),
                        jobs.len()
                    )));
                }
                let span = match self.trace.is_sampled() {
                    true => telemetry::batch_span(self.trace.span(), &batch_id, jobs.len()),
                    false => tracing::Span::none(),
                };
                self.pending = Some((batch_id, jobs.into_iter(), span));
            }
            Command::Cancel { batch_id, job_ids } => {
                let ids: Vec<String> = if job_ids.is_empty() {
                    self.jobs
                        .iter()
                        .filter(|(_, s)| *s.batch_id == *batch_id)
                        .map(|(id, _)| id.clone())
                        .collect()
                } else {
                    job_ids
                };
                let mut signal = std::collections::HashSet::new();
                for id in ids {
                    if self.cancel(&id, &batch_id) {
                        signal.insert(id);
                    }
                }
                if !signal.is_empty() {
                    self.running
                        .iter_mut()
                        .filter(|job| signal.contains(job.id()))
                        .for_each(RunningJob::cancel);
                }
            }
        }
        Ok(())
    }

    /// Admits jobs of the pending batch while the window has room.
    fn admit_pending(&mut self) -> Result<(), Error> {
        let Some((batch_id, mut jobs, span)) = self.pending.take() else {
            return Ok(());
        };
        let room = self.window().saturating_sub(self.held());
        self.queue.reserve(room.min(jobs.len()));
        // Jobs admitted together share one clock reading.
        let now = Instant::now();
        let mut admitted = 0;
        while self.held() < self.window() {
            let Some(job) = jobs.next() else {
                break;
            };
            admitted += usize::from(self.admit(&batch_id, job, now, &span));
        }
        if jobs.len() > 0 {
            self.pending = Some((batch_id, jobs, span));
        }
        self.lane.want(admitted);
        // Counted after the claim on the pool, so that whoever sees the jobs admitted also finds
        // them waiting for their turn.
        let stats = &self.engine.stats;
        stats.fold_gauges(&mut self.gauges);
        Counters::add(&stats.jobs_admitted, admitted);
        Ok(())
    }

    /// Admits one job, or puts its REJECTED result in the outbox. Returns whether it was admitted.
    fn admit(
        &mut self,
        batch_id: &Arc<str>,
        job: JobRequest,
        now: Instant,
        batch_span: &tracing::Span,
    ) -> bool {
        let checked = self.check(&job);
        let row = match &checked {
            Ok((row, _, _)) => *row,
            Err(_) => self.row_of(&job.handler),
        };
        let span = match self.trace.is_sampled() {
            true => telemetry::job_span(batch_span, &job.id, &job.handler),
            false => JobSpan::none(),
        };
        let vacant = match (checked.is_ok(), self.jobs.entry(job.id.clone())) {
            (true, std::collections::hash_map::Entry::Vacant(v)) => Some(v),
            _ => None,
        };
        match (checked, vacant) {
            (Err(reason), _) => {
                let result = JobResult::rejected(job.id, Arc::clone(batch_id), reason);
                self.push_ready(result, row, span, None);
                false
            }
            (Ok(_), None) => {
                let reason = format!(
                    "job id {} is already used by an unfinished job of this call",
                    quote(&job.id)
                );
                let result = JobResult::rejected(job.id, Arc::clone(batch_id), reason);
                self.push_ready(result, row, span, None);
                false
            }
            (Ok((_, handler, timeout)), Some(vacant)) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                vacant.insert(Slot {
                    seq,
                    batch_id: Arc::clone(batch_id),
                    admitted: now,
                    running: None,
                    handler_row: row,
                    span,
                });
                self.gauges.queued(row, 1);
                self.queue.push_back(Queued {
                    seq,
                    id: job.id,
                    handler,
                    payload: job.payload,
                    params: job.params,
                    timeout,
                });
                true
            }
        }
    }

    /// The metrics row of the handler named `name` (unknown handlers share the last row).
    fn row_of(&self, name: &str) -> usize {
        self.engine
            .handlers
            .0
            .get(name)
            .map_or(usize::MAX, |(row, _)| *row)
    }

    /// Why the job cannot be admitted, or its handler's metrics row, the handler and the timeout.
    fn check(&self, job: &JobRequest) -> Result<(usize, Arc<dyn Handler>, Duration), String> {
        let limits = &self.engine.limits;
        if job.id.is_empty() {
            return Err("job id is empty".into());
        }
        let Some((row, handler)) = self.engine.handlers.0.get(&job.handler) else {
            return Err(format!(
                "unknown handler {} (ListHandlers names the known ones)",
                quote(&job.handler)
            ));
        };
        if job.payload.len() > limits.max_payload {
            return Err(format!(
                "payload of {} bytes is over max_payload ({} bytes)",
                job.payload.len(),
                limits.max_payload
            ));
        }
        let cap = handler.timeout().unwrap_or(limits.max_job_timeout);
        let timeout = match job.timeout {
            None => handler.timeout().unwrap_or(limits.default_job_timeout),
            Some(t) if t.is_zero() => return Err("timeout must be positive".into()),
            Some(t) => t,
        };
        let timeout = timeout.min(cap).min(limits.max_job_timeout);
        handler
            .check(&job.params)
            .map_err(|e| format!("bad params for handler {}: {e}", quote(&job.handler)))?;
        Ok((*row, Arc::clone(handler), timeout))
    }

    /// Starts up to `n` queued jobs on freshly granted slots; gives back the slots it cannot use.
    ///
    /// Each handler is polled once right away: a job that finishes on that poll (echo, a small hash,
    /// a handler that fails fast) is recorded at once and never becomes a future to track.
    fn start(&mut self, mut n: usize) {
        let now = Instant::now();
        let max_output = self.engine.limits.max_output;
        let mut done = 0;
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
                        .stats
                        .queue_time
                        .observe_local(&mut self.queue_times, now - slot.admitted);
                    slot.span.handle()
                }
                _ => {
                    // Cancelled while queued.
                    self.stale = self.stale.saturating_sub(1);
                    continue;
                }
            };
            n -= 1;
            let ctx = JobContext::new(self.engine.cpu.clone(), span);
            let input = JobInput {
                payload: q.payload,
                params: q.params,
            };
            let mut work = Arc::clone(&q.handler).run(input, ctx);
            match (&mut work).now_or_never() {
                Some(res) => {
                    done += usize::from(self.finished(conclude(q.id, res, max_output), now));
                }
                None => {
                    let job = RunningJob::new(q.id, work, now, q.timeout, max_output);
                    self.running.push(job);
                }
            }
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
        self.gauges.running(slot.handler_row, -1);
        let started = slot.running.unwrap_or(now);
        self.engine
            .stats
            .run_time
            .observe_local(&mut self.run_times, now - started);
        let cancelled_by = (done.outcome == Outcome::Cancelled).then_some("CancelJobs");
        let result = JobResult {
            job_id: done.id,
            batch_id: slot.batch_id,
            outcome: done.outcome,
            output: done.output,
            error: done.error,
            queued: Some(started - slot.admitted),
            ran: Some(now - started),
        };
        self.push_ready(result, slot.handler_row, slot.span, cancelled_by);
        true
    }

    /// Cancels one unfinished job of `batch_id`: a queued one ends now. Returns whether the job is
    /// running, so that the caller signals it.
    fn cancel(&mut self, id: &str, batch_id: &str) -> bool {
        let Some(slot) = self.jobs.get(id) else {
            return false;
        };
        if *slot.batch_id != *batch_id {
            return false;
        }
        if slot.running.is_some() {
            return true;
        }
        let Some((id, slot)) = self.jobs.remove_entry(id) else {
            return false;
        };
        self.gauges.queued(slot.handler_row, -1);
        self.lane.unwant(1);
        self.stale += 1;
        if self.stale > 64 && self.stale > self.queue.len() / 2 {
            let jobs = &self.jobs;
            self.queue
                .retain(|q| jobs.get(&q.id).is_some_and(|s| s.seq == q.seq));
            self.stale = 0;
        }
        let result = JobResult {
            job_id: id,
            batch_id: slot.batch_id,
            outcome: Outcome::Cancelled,
            output: Bytes::new(),
            error: "cancelled by CancelJobs before it started".into(),
            queued: Some(slot.admitted.elapsed()),
            ran: Some(Duration::ZERO),
        };
        self.push_ready(result, slot.handler_row, slot.span, Some("CancelJobs"));
        false
    }

    /// Counts a finished job, ends its span and queues its result.
    fn push_ready(
        &mut self,
        result: JobResult,
        row: usize,
        span: JobSpan,
        cancelled_by: Option<&str>,
    ) {
        let stats = &self.engine.stats;
        stats.add_finished(row, result.outcome, 1);
        Counters::add(&stats.results_buffered, 1);
        self.count(row, result.outcome, 1);
        span.end(&result, cancelled_by);
        self.ready.push_back(result);
    }

    /// The results that fit in one response (at least one).
    fn take_ready(&mut self) -> Vec<JobResult> {
        let mut size = 0;
        let mut n = 0;
        for r in &self.ready {
            size += r.wire_size();
            if n > 0 && size > MAX_RESPONSE_BYTES {
                break;
            }
            n += 1;
        }
        let stats = &self.engine.stats;
        Counters::sub(&stats.results_buffered, n);
        stats.coalesced.observe(n as u64);
        stats.queue_time.fold(&mut self.queue_times);
        stats.run_time.fold(&mut self.run_times);
        if n == self.ready.len() {
            // Usually everything fits: hand over the buffer itself and keep none.
            return Vec::from(std::mem::take(&mut self.ready));
        }
        self.ready.drain(..n).collect()
    }

    /// Drops every job of the call at once and gives back its worker slots; `why` is what the job
    /// spans give as the canceller.
    fn stop_all(&mut self, why: &str) {
        self.running.clear();
        self.queue.clear();
        self.drop_jobs(why);
        self.pending = None;
        self.lane.release_all();
    }

    /// The call's token fired: either the client went away or shutdown's grace period is over.
    async fn cancelled(&mut self) -> End {
        if !self.engine.root.is_cancelled() {
            return End::Gone;
        }
        // Shutdown: stop every job, tell the client which ones, then end with UNAVAILABLE.
        self.running.clear();
        self.lane.release_all();
        let now = Instant::now();
        let from = self.engine.cancelled_at.get().copied().unwrap_or(now);
        self.observe_cancel(!self.jobs.is_empty(), EndReason::Shutdown, from);
        let jobs: Vec<_> = self.jobs.drain().collect();
        for (id, slot) in jobs {
            let (queued, ran) = match slot.running {
                Some(started) => {
                    self.gauges.running(slot.handler_row, -1);
                    (started - slot.admitted, now - started)
                }
                None => {
                    self.gauges.queued(slot.handler_row, -1);
                    (now - slot.admitted, Duration::ZERO)
                }
            };
            let result = JobResult {
                job_id: id,
                batch_id: slot.batch_id,
                outcome: Outcome::Cancelled,
                output: Bytes::new(),
                error: "batchd shut down before the job finished".into(),
                queued: Some(queued),
                ran: Some(ran),
            };
            self.push_ready(result, slot.handler_row, slot.span, Some("shutdown"));
        }
        self.stop_all("shutdown");
        let flush = async {
            while !self.ready.is_empty() {
                if self.out.ready().await.is_err() {
                    return;
                }
                let results = self.take_ready();
                self.out.send(Ok(results));
            }
        };
        let _ = tokio::time::timeout(FINAL_FLUSH, flush).await;
        End::Status(Error::ShuttingDown)
    }
}

impl<S> Session<S> {
    /// Records the cancellation latency of a call ended by `why` that held jobs, from `from`.
    fn observe_cancel(&self, held: bool, why: EndReason, from: Instant) {
        if held {
            let latency = Instant::now().saturating_duration_since(from);
            self.engine.stats.observe_cancel(why, latency);
        }
    }

    /// Counts `n` jobs of handler `row` ending with `outcome`, for the session span.
    fn count(&mut self, row: usize, outcome: Outcome, n: usize) {
        let i = outcome_index(outcome);
        self.outcomes[i] = self.outcomes[i].saturating_add(n as u32);
        self.handler_mix |= 1u64.checked_shl(row as u32).unwrap_or(0);
    }

    /// Counts every unfinished job as cancelled by `why`, ends its span and forgets it.
    fn drop_jobs(&mut self, why: &str) {
        let engine = Arc::clone(&self.engine);
        let stats = &engine.stats;
        let jobs = std::mem::take(&mut self.jobs);
        for (_, slot) in jobs {
            match slot.running {
                Some(_) => self.gauges.running(slot.handler_row, -1),
                None => self.gauges.queued(slot.handler_row, -1),
            }
            stats.add_finished(slot.handler_row, Outcome::Cancelled, 1);
            self.count(slot.handler_row, Outcome::Cancelled, 1);
            slot.span.cancelled(why);
        }
        stats.fold_gauges(&mut self.gauges);
    }
}

impl<S> Drop for Session<S> {
    fn drop(&mut self) {
        // Gauges follow what the session still held when it ended, whatever the reason.
        self.drop_jobs("the call ended");
        let stats = &self.engine.stats;
        stats.queue_time.fold(&mut self.queue_times);
        stats.run_time.fold(&mut self.run_times);
        Counters::sub(&stats.results_buffered, self.ready.len());
        Counters::sub(&stats.calls_open, 1);
    }
}
