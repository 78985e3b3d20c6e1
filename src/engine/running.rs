//! A started job: its handler's future under the job's timeout and cancellation token.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::job::Outcome;
use crate::handlers::HandlerError;

/// A handler's future.
pub(super) type Work = Pin<Box<dyn Future<Output = Result<Bytes, HandlerError>> + Send>>;

const CANCELLED: &str = "cancelled by CancelJobs";

/// How a job ended, as its session records it.
pub(super) struct Finished {
    pub(super) id: String,
    pub(super) outcome: Outcome,
    pub(super) output: Bytes,
    pub(super) error: String,
}

/// The future of one running job. The timer and the cancellation wait are armed only when the
/// handler does not finish on its first poll, so instant jobs cost neither. Dropping it before it
/// finished cancels the job's token, which CPU-pool work watches.
pub(super) struct RunningJob {
    id: String,
    work: Work,
    deadline: Instant,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    cancel: CancellationToken,
    cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    max_output: usize,
    done: bool,
}

impl RunningJob {
    /// A job started at `started` that may run for `timeout`.
    pub(super) fn new(
        id: String,
        work: Work,
        started: std::time::Instant,
        timeout: Duration,
        cancel: CancellationToken,
        max_output: usize,
    ) -> Self {
        Self {
            id,
            work,
            deadline: Instant::from_std(started) + timeout,
            timeout,
            timer: None,
            cancel,
            cancelled: None,
            max_output,
            done: false,
        }
    }

    fn finish(&mut self, outcome: Outcome, output: Bytes, error: String) -> Finished {
        self.done = true;
        Finished {
            id: std::mem::take(&mut self.id),
            outcome,
            output,
            error,
        }
    }

    fn handler_returned(&mut self, res: Result<Bytes, HandlerError>) -> Finished {
        self.done = true;
        conclude(
            std::mem::take(&mut self.id),
            res,
            &self.cancel,
            self.max_output,
        )
    }

    /// The job's id.
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// Asks the job to stop (CancelJobs); it ends CANCELLED on its next poll unless already done.
    pub(super) fn cancel(&self) {
        self.cancel.cancel();
    }

    fn cancelled(&mut self) -> Finished {
        self.finish(Outcome::Cancelled, Bytes::new(), CANCELLED.into())
    }
}

/// The outcome of a handler that returned `res`.
pub(super) fn conclude(
    id: String,
    res: Result<Bytes, HandlerError>,
    cancel: &CancellationToken,
    max_output: usize,
) -> Finished {
    let (outcome, output, error) = match res {
        Ok(out) if out.len() > max_output => {
            let error = format!(
                "output of {} bytes is over max_output ({max_output} bytes)",
                out.len()
            );
            (Outcome::Failed, Bytes::new(), error)
        }
        Ok(out) => (Outcome::Ok, out, String::new()),
        // A handler that noticed the cancellation and gave up was cancelled, not failed.
        Err(_) if cancel.is_cancelled() => (Outcome::Cancelled, Bytes::new(), CANCELLED.into()),
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
        if let Poll::Ready(res) = this.work.as_mut().poll(cx) {
            return Poll::Ready(this.handler_returned(res));
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
            return Poll::Ready(this.finish(Outcome::TimedOut, Bytes::new(), error));
        }
        let token = &this.cancel;
        let cancelled = this
            .cancelled
            .get_or_insert_with(|| Box::pin(token.clone().cancelled_owned()));
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(this.cancelled());
        }
        Poll::Pending
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        if !self.done {
            self.cancel.cancel();
        }
    }
}
