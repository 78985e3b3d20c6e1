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
