//! Jobs and results as the engine sees them, free of protobuf types.

use std::time::Duration;

use bytes::Bytes;

use crate::codec::Text;
use crate::handlers::Params;
pub use crate::outcome::Outcome;

/// A job as the client sent it, before admission.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// The client's id; unique among the call's unfinished jobs.
    pub id: Text,
    /// The handler's name.
    pub handler: Text,
    /// The handler's input.
    pub payload: Bytes,
    /// The handler's params.
    pub params: Params,
    /// How long the job may run; `None` means the configured default.
    pub timeout: Option<Duration>,
}

impl JobRequest {
    /// The bytes this job holds while admitted, for the call's byte budget.
    pub(crate) fn held_size(&self) -> usize {
        let params: usize = self.params.iter().map(|(k, v)| k.len() + v.len()).sum();
        // A few dozen bytes of bookkeeping besides the strings and the payload.
        64 + self.id.len() + self.handler.len() + self.payload.len() + params
    }
}

/// What a client asks of its call.
#[derive(Debug, Clone)]
pub enum Command {
    /// Admit and run these jobs.
    Submit {
        /// The client's name for the batch.
        batch_id: Text,
        /// The jobs, in order.
        jobs: Vec<JobRequest>,
    },
    /// Stop these jobs of a batch, or all of its unfinished jobs when `job_ids` is empty.
    Cancel {
        /// The batch the jobs came in.
        batch_id: String,
        /// The jobs to stop.
        job_ids: Vec<String>,
    },
}

/// The one result of a job.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The job's id.
    pub job_id: Text,
    /// The batch the job came in.
    pub batch_id: Text,
    /// How it ended.
    pub outcome: Outcome,
    /// The handler's output (OK only).
    pub output: Bytes,
    /// What went wrong (every outcome but OK).
    pub error: String,
    /// Time between admission and start; `None` for rejected jobs.
    pub queued: Option<Duration>,
    /// Time the job ran; `None` for rejected jobs.
    pub ran: Option<Duration>,
}

impl JobResult {
    /// A REJECTED result naming the problem.
    pub(crate) fn rejected(job_id: Text, batch_id: Text, error: String) -> Self {
        Self {
            job_id,
            batch_id,
            outcome: Outcome::Rejected,
            output: Bytes::new(),
            error,
            queued: None,
            ran: None,
        }
    }

    /// Bytes this result takes on the wire, roughly (for coalescing under the message limit).
    pub(crate) fn wire_size(&self) -> usize {
        // Field tags, lengths, outcome and the two durations take well under 64 bytes.
        64 + self.job_id.len() + self.batch_id.len() + self.output.len() + self.error.len()
    }
}

/// One message of a call's response stream: results that were ready together, and the jobs a
/// draining daemon gives back (only to calls that asked, see [`crate::engine::Call::giving_back`]).
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// Results of finished jobs, in order of completion.
    pub results: Vec<JobResult>,
    /// Jobs handed back without a result.
    pub given_back: GivenBack,
}

/// Jobs of a call handed back at shutdown, so that the client can run them elsewhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GivenBack {
    /// Never started.
    pub not_started: Vec<String>,
    /// Stopped unfinished when the shutdown grace ran out.
    pub stopped: Vec<String>,
}

impl GivenBack {
    /// Whether no job is listed.
    pub fn is_empty(&self) -> bool {
        self.not_started.is_empty() && self.stopped.is_empty()
    }

    /// Takes ids from the front whose lengths add up to about `max_bytes` (at least one), so that
    /// one message stays under the response limit whatever the ids.
    pub(crate) fn take_up_to(&mut self, max_bytes: usize) -> Self {
        let mut size = 0;
        let mut cut = |ids: &mut Vec<String>| {
            let n = ids
                .iter()
                .take_while(|id| {
                    let fits = size == 0 || size + id.len() + 8 <= max_bytes;
                    if fits {
                        size += id.len() + 8;
                    }
                    fits
                })
                .count();
            if n == ids.len() {
                std::mem::take(ids)
            } else {
                ids.drain(..n).collect()
            }
        };
        let not_started = cut(&mut self.not_started);
        let stopped = cut(&mut self.stopped);
        Self {
            not_started,
            stopped,
        }
    }
}
