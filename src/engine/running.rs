//! A started job: its handler's future under the job's timeout, stoppable by CancelJobs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Sleep};

use super::job::Outcome;
use crate::codec::Text;
use crate::handlers::HandlerError;

/// A handler's future.
pub(super) type Work = Pin<Box<dyn Future<Output = Result<Bytes, HandlerError>> + Send>>;

/// How a job ended, as its session records it.
pub(super) struct Finished {
    pub(super) id: Text,
    pub(super) outcome: Outcome,
    pub(super) output: Bytes,
    pub(super) error: String,
}

/// The future of one running job. Its timer is armed only when the handler does not finish on its
/// first poll, so instant jobs never touch the timer wheel. Dropping it drops the handler's future
/// and with it the job's context, whose token stops any work that outlives the future.
pub(super) struct RunningJob {
    id: Text,
    work: Work,
    deadline: Instant,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    max_output: usize,
    /// Set by CancelJobs; the next poll ends the job.
    cancel_requested: bool,
    /// The waker of the last poll, to get polled again after CancelJobs.
    waker: Option<Waker>,
}

impl RunningJob {
    /// A job started at `started` that may run for `timeout`.
    pub(super) fn new(
        id: Text,
        work: Work,
        started: std::time::Instant,
        timeout: Duration,
        max_output: usize,
    ) -> Self {
        Self {
            id,
            work,
            deadline: Instant::from_std(started) + timeout,
            timeout,
            timer: None,
            max_output,
            cancel_requested: false,
            waker: None,
        }
    }

    /// The job's id.
    pub(super) fn id(&self) -> &Text {
        &self.id
    }

    /// Asks the job to stop (CancelJobs): it ends CANCELLED on its next poll.
    pub(super) fn cancel(&mut self) {
        self.cancel_requested = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn finish(&mut self, outcome: Outcome, error: String) -> Finished {
        Finished {
            id: std::mem::take(&mut self.id),
            outcome,
            output: Bytes::new(),
            error,
        }
    }
}

/// The outcome of a handler that returned `res`.
pub(super) fn conclude(id: Text, res: Result<Bytes, HandlerError>, max_output: usize) -> Finished {
    let (outcome, output, error) = match res {
        Ok(out) if out.len() > max_output => {
            let error = format!(
                "output of {} bytes is over max_output ({max_output} bytes)",
                out.len()
            );
            (Outcome::Failed, Bytes::new(), error)
        }
        Ok(out) => (Outcome::Ok, out, String::new()),
        Err(e) => (Outcome::Failed, Bytes::new(), e.0),
    };
    Finished {
        id,
        outcome,
        output,
        error,
    }
}

impl Future for RunningJob {
    type Output = Finished;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Finished> {
        let this = &mut *self;
        if this.cancel_requested {
            return Poll::Ready(this.finish(Outcome::Cancelled, "cancelled by CancelJobs".into()));
        }
        if let Poll::Ready(res) = this.work.as_mut().poll(cx) {
            let id = std::mem::take(&mut this.id);
            return Poll::Ready(conclude(id, res, this.max_output));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            let error = format!(
                "timed out after {}",
                humantime::format_duration(this.timeout)
            );
            return Poll::Ready(this.finish(Outcome::TimedOut, error));
        }
        match &this.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => this.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}
