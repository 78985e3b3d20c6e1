//! What the client sends: batches admitted within the window (or REJECTED job by job) and cancels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;

use super::{Queued, Session, Slot};
use crate::engine::job::{Command, JobRequest, JobResult, Outcome};
use crate::engine::principal::Principal;
use crate::engine::running::RunningJob;
use crate::engine::trace::{self, JobSpan};
use crate::engine::Inner;
use crate::error::Error;
use crate::handlers::{quote, Handler};

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
                        quote(&batch_id),
                        jobs.len()
                    )));
                }
                let span = match self.trace.is_sampled() {
                    true => {
                        let principal = self.principal.name();
                        trace::batch_span(self.trace.span(), principal, &batch_id, jobs.len())
                    }
                    false => tracing::Span::none(),
                };
                // The batch counts in the memory budget from the moment it is read.
                self.pending_bytes = jobs.iter().map(JobRequest::held_size).sum();
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
    pub(super) fn admit_pending(&mut self) -> Result<(), Error> {
        let Some((batch_id, mut jobs, span)) = self.pending.take() else {
            return Ok(());
        };
        let room = self.window().saturating_sub(self.held());
        self.queue.reserve(room.min(jobs.len()));
        // Jobs admitted together share one clock reading.
        let now = Instant::now();
        let mut admitted = 0;
        while self.has_room() {
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
        batch_id: &Arc<str>,
        job: JobRequest,
        now: Instant,
        batch_span: &tracing::Span,
    ) -> bool {
        let checked = self.check(&job);
        let bytes = job.held_size();
        // Read with its batch: from now on its bytes are the job's, or go with its rejection.
        self.pending_bytes = self.pending_bytes.saturating_sub(bytes);
        let row = match &checked {
            Ok((row, _, _)) => *row,
            Err(_) => self.row_of(&job.handler),
        };
        let span = match self.trace.is_sampled() {
            true => trace::job_span(batch_span, self.principal.name(), &job.id, &job.handler),
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
                    bytes,
                    span,
                });
                self.held_bytes = self.held_bytes.saturating_add(bytes);
                self.gauges.queued(row, 1);
                self.gauges.admitted(row, 1);
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
        self.engine.check(&self.principal, job)
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
    /// Why the job cannot be admitted, or its handler's metrics row, the handler and the timeout.
    pub(in crate::engine) fn check(
        &self,
        principal: &Principal,
        job: &JobRequest,
    ) -> Result<(usize, Arc<dyn Handler>, Duration), String> {
        let limits = &self.limits;
        if job.id.is_empty() {
            return Err("job id is empty".into());
        }
        // Before the handler's existence: a principal learns nothing of handlers it may not use.
        if !principal.may_use(&job.handler) {
            return Err(format!(
                "handler {} is not allowed for principal {:?} (ListHandlers names the allowed ones)",
                quote(&job.handler),
                principal.name()
            ));
        }
        let Some((row, handler)) = self.handlers.0.get(&job.handler) else {
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
}
