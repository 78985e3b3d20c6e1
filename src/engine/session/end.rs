//! How a call's session ends: shutdown cuts it, or its jobs are dropped at once with it.
//!
//! A call that asked for it (`batchd-drain: give-back`) gets its unstarted jobs back at drain, and
//! its running ones as stopped when the grace runs out, instead of having them run or cancelled:
//! its client sends them to another replica.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, Stream, StreamExt};

use super::{End, Session, FINAL_FLUSH};
use crate::codec::Text;
use crate::engine::job::{Command, JobResult, Outcome};
use crate::engine::metrics::EndReason;
use crate::error::Error;

impl<S> Session<S>
where
    S: Stream<Item = Result<Command, Error>> + Send + Unpin + 'static,
{
    /// Once shutdown began: takes what the client already sent, without waiting. A half-close is
    /// noted, so the call can still end OK; cancels apply; batches are not run (the call's
    /// UNAVAILABLE status tells the client that jobs without a result were not run; a call that
    /// asked gets their ids back).
    pub(super) fn take_sent(&mut self) {
        while let Some(item) = self.inbound.next().now_or_never() {
            match item {
                None => {
                    self.half_closed = true;
                    return;
                }
                Some(Ok(cmd @ Command::Cancel { .. })) => {
                    let _ = self.command(cmd);
                }
                Some(Ok(Command::Submit { jobs, .. })) => {
                    if self.give_back {
                        let ids = jobs.into_iter().map(|j| j.id.as_str().to_owned());
                        self.given_back.not_started.extend(ids);
                    }
                }
                Some(Err(_)) => return,
            }
        }
    }

    /// At drain, for a call that asked: hands back every job not started (the rest of a batch not
    /// admitted yet, and the queued jobs); the running ones finish.
    pub(super) fn give_back_unstarted(&mut self) {
        if let Some((_, rest, _)) = self.pending.take() {
            let ids = rest.map(|j| j.id.as_str().to_owned());
            self.given_back.not_started.extend(ids);
            self.pending_bytes = 0;
        }
        let queued: Vec<Text> = self
            .jobs
            .iter()
            .filter(|(_, slot)| slot.running.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if queued.is_empty() {
            return;
        }
        // Their queue entries stay, stale, as after CancelJobs: a slot already granted for one
        // is taken and given back by `start`, never left hanging.
        self.lane.unwant(queued.len());
        self.stale += queued.len();
        let engine = Arc::clone(&self.engine);
        for id in queued {
            let Some((id, slot)) = self.jobs.remove_entry(&id) else {
                continue;
            };
            self.held_bytes = self.held_bytes.saturating_sub(slot.bytes);
            self.gauges.queued(slot.handler_row, -1);
            engine
                .metrics
                .finished(slot.handler_row, Outcome::Cancelled, 1);
            self.count(slot.handler_row, Outcome::Cancelled, 1);
            slot.span
                .cancelled("given back at shutdown", slot.admitted, None);
            self.given_back.not_started.push(id.as_str().to_owned());
        }
    }
}

impl<S> Session<S> {
    /// Drops every job of the call at once and gives back its worker slots; `why` is what the job
    /// spans give as the canceller.
    pub(super) fn stop_all(&mut self, why: &str) {
        self.running.clear();
        self.queue.clear();
        self.drop_jobs(why);
        self.pending = None;
        self.pending_bytes = 0;
        self.lane.release_all();
    }

    /// The call's token fired: either the client went away or shutdown's grace period is over.
    pub(super) async fn cancelled(&mut self) -> End {
        if !self.engine.root.is_cancelled() {
            return End::Gone;
        }
        // Shutdown: stop every job, tell the client which ones, then end with UNAVAILABLE.
        self.running.clear();
        self.lane.release_all();
        let now = Instant::now();
        let from = self.engine.cancelled_at.get().copied().unwrap_or(now);
        self.observe_cancel(!self.jobs.is_empty(), EndReason::Shutdown, from);
        if self.give_back {
            // Handed back rather than CANCELLED: the client runs them elsewhere. `stop_all`
            // below counts them and ends their spans.
            for (id, slot) in &self.jobs {
                match slot.running {
                    Some(_) => self.given_back.stopped.push(id.as_str().to_owned()),
                    None => self.given_back.not_started.push(id.as_str().to_owned()),
                }
            }
        }
        let cut = match self.give_back {
            true => super::Jobs::default(),
            false => std::mem::take(&mut self.jobs),
        };
        for (id, slot) in cut {
            self.held_bytes = self.held_bytes.saturating_sub(slot.bytes);
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
            while self.has_ready() {
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

    /// Records the cancellation latency of a call ended by `why` that held jobs, from `from`.
    pub(super) fn observe_cancel(&self, held: bool, why: EndReason, from: Instant) {
        if held {
            let latency = Instant::now().saturating_duration_since(from);
            self.engine.metrics.observe_cancel(why, latency);
        }
    }

    /// Counts every unfinished job as cancelled by `why`, ends its span and forgets it.
    fn drop_jobs(&mut self, why: &str) {
        let engine = Arc::clone(&self.engine);
        let metrics = &engine.metrics;
        for (_, slot) in std::mem::take(&mut self.jobs) {
            self.held_bytes = self.held_bytes.saturating_sub(slot.bytes);
            match slot.running {
                Some(_) => self.gauges.running(slot.handler_row, -1),
                None => self.gauges.queued(slot.handler_row, -1),
            }
            metrics.finished(slot.handler_row, Outcome::Cancelled, 1);
            self.count(slot.handler_row, Outcome::Cancelled, 1);
            slot.span.cancelled(why, slot.admitted, slot.running);
        }
        metrics.fold_gauges(&mut self.gauges);
    }
}

impl<S> Drop for Session<S> {
    fn drop(&mut self) {
        // Gauges follow what the session still held when it ended, whatever the reason.
        self.drop_jobs("the call ended");
        let metrics = &self.engine.metrics;
        metrics.fold_times(&mut self.queue_times, &mut self.run_times);
        metrics.unbuffered(self.ready.len());
        metrics.call_closed();
        self.fold_outcomes();
        // Everything the call held goes with it.
        self.engine.budget.update(self.budgeted, 0);
        self.budgeted = 0;
    }
}
