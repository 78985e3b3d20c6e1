//! What the client sends: batches admitted within the window (or REJECTED job by job) and cancels.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;

use super::{HandlerPick, Queued, Session, Slot};
use crate::codec::Text;
use crate::engine::job::{Command, JobRequest, JobResult, Outcome};
use crate::engine::principal::Principal;
use crate::engine::running::RunningJob;
use crate::engine::trace::{self, JobSpan};
use crate::engine::Inner;
use crate::error::Error;
use crate::handlers::quote;

impl<S> Session<S>
where
    S: Stream<Item = Result<Command, Error>> + Send + Unpin + 'static,
{
    pub(super) fn command(&mut self, cmd: Command) -> Result<(), Error> {
        match cmd {
            Command::Submit { batch_id, jobs } => {
                let limit = self.engine.limits.max_jobs_per_batch;
                if jobs.len() > limit {
                    return Err(Error::InvalidArgument(format!(
                        "batch {} has {} jobs, over max_jobs_per_batch ({limit})",
                        quote(batch_id.as_str()),
                        jobs.len()
                    )));
                }
                let span = match self.trace.is_sampled() {
                    true => {
                        let principal = self.principal.name();
                        let id = batch_id.as_str();
                        trace::batch_span(self.trace.span(), principal, id, jobs.len())
                    }
                    false => tracing::Span::none(),
                };
                // The batch counts in the memory budget from the moment it is read.
                self.pending_bytes = jobs.iter().map(JobRequest::held_size).sum();
                self.pending = Some((batch_id, jobs.into_iter(), span));
            }
            Command::Cancel { batch_id, job_ids } => {
                let ids: Vec<Text> = if job_ids.is_empty() {
                    self.jobs
                        .iter()
                        .filter(|(_, s)| s.batch_id == *batch_id.as_str())
                        .map(|(id, _)| id.clone())
                        .collect()
                } else {
                    job_ids.into_iter().map(Text::from).collect()
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

    /// Admits jobs of the pending batch while the window has room, at most `ADMIT_PER_TURN`.
    pub(super) fn admit_pending(&mut self) -> Result<(), Error> {
        let Some((batch_id, mut jobs, span)) = self.pending.take() else {
            return Ok(());
        };
        let room = self.window().saturating_sub(self.held());
        self.queue.reserve(room.min(jobs.len()));
        // Jobs admitted together share one clock reading.
        let now = Instant::now();
        let mut admitted = 0;
        for _ in 0..super::ADMIT_PER_TURN {
            if !self.has_room() {
                break;
            }
            let Some(job) = jobs.next() else {
                break;
            };
            admitted += usize::from(self.admit(&batch_id, job, now, &span));
        }
        if jobs.len() > 0 {
            self.pending = Some((batch_id, jobs, span));
        } else {
            self.pending_bytes = 0;
        }
        self.lane.want(admitted);
        Ok(())
    }

    /// Admits one job, or puts its REJECTED result in the outbox. Returns whether it was admitted.
    fn admit(
        &mut self,
        batch_id: &Text,
        job: JobRequest,
        now: Instant,
        batch_span: &tracing::Span,
    ) -> bool {
        let checked = self.check(&job);
        let bytes = job.held_size();
        // Read with its batch: from now on its bytes are the job's, or go with its rejection.
        self.pending_bytes = self.pending_bytes.saturating_sub(bytes);
        let row = match &checked {
            Ok((row, _)) => *row,
            Err(_) => self.row_of(&job.handler),
        };
        let span = match self.trace.is_sampled() {
            true => {
                let (id, handler) = (job.id.as_str(), job.handler.as_str());
                trace::job_span(batch_span, self.principal.name(), id, handler)
            }
            false => JobSpan::none(),
        };
        let vacant = match (checked.is_ok(), self.jobs.entry(job.id.clone())) {
            (true, std::collections::hash_map::Entry::Vacant(v)) => Some(v),
            _ => None,
        };
        match (checked, vacant) {
            (Err(reason), _) => {
                let result = JobResult::rejected(job.id, batch_id.clone(), reason);
                self.push_ready(result, row, span, None);
                false
            }
            (Ok(_), None) => {
                let reason = format!(
                    "job id {} is already used by an unfinished job of this call",
                    quote(job.id.as_str())
                );
                let result = JobResult::rejected(job.id, batch_id.clone(), reason);
                self.push_ready(result, row, span, None);
                false
            }
            (Ok((_, timeout)), Some(vacant)) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                vacant.insert(Slot {
                    seq,
                    batch_id: batch_id.clone(),
                    admitted: now,
                    running: None,
                    handler_row: row,
                    bytes,
                    span,
                });
                self.held_bytes = self.held_bytes.saturating_add(bytes);
                self.gauges.queued(row, 1);
                self.gauges.admitted(row, 1);
                self.queue.push_back(Queued {
                    seq,
                    id: job.id,
                    row,
                    payload: job.payload,
                    params: job.params,
                    timeout,
                });
                true
            }
        }
    }

    /// The metrics row of the handler named `name` (unknown handlers share the last row).
    fn row_of(&self, name: &Text) -> usize {
        self.engine
            .handlers
            .row(name.as_bytes())
            .unwrap_or(usize::MAX)
    }

    /// The handler named `name` as this call may use it, or `None` if there is no such handler.
    /// Jobs of the handler of the job before take it from there, without a lookup.
    fn pick(&mut self, name: &Text) -> Option<HandlerPick> {
        if let Some(last) = self.last_handler {
            if self
                .engine
                .handlers
                .get(last.row)
                .is_some_and(|(n, _)| **n == *name.as_bytes())
            {
                return Some(last);
            }
        }
        let pick = self.engine.pick(&self.principal, name)?;
        self.last_handler = Some(pick);
        Some(pick)
    }

    /// Why the job cannot be admitted, or its handler's metrics row and the job's timeout.
    fn check(&mut self, job: &JobRequest) -> Result<(usize, Duration), String> {
        let pick = self.pick(&job.handler);
        self.engine.check(&self.principal, job, pick)
    }

    /// Cancels one unfinished job of `batch_id`: a queued one ends now. Returns whether the job is
    /// running, so that the caller signals it.
    fn cancel(&mut self, id: &Text, batch_id: &str) -> bool {
        let Some(slot) = self.jobs.get(id) else {
            return false;
        };
        if slot.batch_id != *batch_id {
            return false;
        }
        if slot.running.is_some() {
            return true;
        }
        let Some((id, slot)) = self.jobs.remove_entry(id) else {
            return false;
        };
        self.held_bytes = self.held_bytes.saturating_sub(slot.bytes);
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
}

// The checks live on the engine, so that `Engine::check_job` runs the same code without a session.
impl Inner {
    /// The handler named `name` as `principal` may use it, or `None` if there is no such handler.
    pub(in crate::engine) fn pick(
        &self,
        principal: &Principal,
        name: &Text,
    ) -> Option<HandlerPick> {
        let row = self.handlers.row(name.as_bytes())?;
        let (_, handler) = self.handlers.get(row)?;
        let limits = &self.limits;
        Some(HandlerPick {
            row,
            allowed: principal.may_use(name.as_str()),
            default_timeout: handler.timeout().unwrap_or(limits.default_job_timeout),
            max_timeout: handler
                .timeout()
                .unwrap_or(limits.max_job_timeout)
                .min(limits.max_job_timeout),
        })
    }

    /// Why the job cannot be admitted, or its handler's metrics row and the job's timeout. `pick`
    /// is [`Inner::pick`] of the job's handler (a session passes the one it keeps).
    pub(in crate::engine) fn check(
        &self,
        principal: &Principal,
        job: &JobRequest,
        pick: Option<HandlerPick>,
    ) -> Result<(usize, Duration), String> {
        if job.id.is_empty() {
            return Err("job id is empty".into());
        }
        // Before the handler's existence: a principal learns nothing of handlers it may not use.
        if !pick.map_or_else(|| principal.may_use(job.handler.as_str()), |p| p.allowed) {
            return Err(format!(
                "handler {} is not allowed for principal {:?} (ListHandlers names the allowed ones)",
                quote(job.handler.as_str()),
                principal.name()
            ));
        }
        let Some(pick) = pick else {
            return Err(format!(
                "unknown handler {} (ListHandlers names the known ones)",
                quote(job.handler.as_str())
            ));
        };
        let limits = &self.limits;
        if job.payload.len() > limits.max_payload {
            return Err(format!(
                "payload of {} bytes is over max_payload ({} bytes)",
                job.payload.len(),
                limits.max_payload
            ));
        }
        let timeout = match job.timeout {
            None => pick.default_timeout,
            Some(t) if t.is_zero() => return Err("timeout must be positive".into()),
            Some(t) => t,
        };
        let timeout = timeout.min(pick.max_timeout);
        if let Some((_, handler)) = self.handlers.get(pick.row) {
            handler.check(&job.params).map_err(|e| {
                format!(
                    "bad params for handler {}: {e}",
                    quote(job.handler.as_str())
                )
            })?;
        }
        Ok((pick.row, timeout))
    }
}
