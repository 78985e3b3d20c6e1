//! The daemon's side of `Process` and `RunBatch`, hand-written: requests decode ids, handler names
//! and batch ids into [`Text`]s (short ones inline, without an allocation), and responses encode
//! them from there.
//!
//! prost decodes a `string` only into a `String` (an allocation and a copy per field), so the
//! messages on the daemon's hot path are written here and the generated server uses them
//! (`build.rs` maps them with `extern_path`); clients keep the generated types. The wire format is
//! the one of `proto/batchd/v1/batchd.proto`: tests check both ways against the generated code.

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{
    self, encode_key, encode_varint, encoded_len_varint, key_len, skip_field, DecodeContext,
    WireType,
};
use prost::{DecodeError, Message};

use super::text::Text;

/// `batchd.v1.ProcessRequest`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessRequest {
    /// The `kind` oneof.
    pub kind: Option<Kind>,
}

/// The `kind` oneof of [`ProcessRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Jobs to run.
    Batch(JobBatch),
    /// Jobs to stop.
    Cancel(CancelJobs),
}

/// `batchd.v1.JobBatch`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobBatch {
    /// The client's name for the batch.
    pub batch_id: Text,
    /// The jobs.
    pub jobs: Vec<Job>,
}

/// `batchd.v1.Job`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Job {
    /// The client's id for the job.
    pub id: Text,
    /// The handler's name.
    pub handler: Text,
    /// The handler's input.
    pub payload: Bytes,
    /// The handler's params.
    pub params: HashMap<String, String>,
    /// How long the job may run.
    pub timeout: Option<prost_types::Duration>,
}

/// `batchd.v1.CancelJobs`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CancelJobs {
    /// The batch whose jobs to stop.
    pub batch_id: String,
    /// The jobs to stop; empty: all of the batch's.
    pub job_ids: Vec<String>,
}

/// `batchd.v1.ProcessResponse`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessResponse {
    /// Results of finished jobs.
    pub results: Vec<JobResult>,
    /// Jobs a draining daemon gives back without a result; `None` unless the call asked for it.
    pub given_back: Option<GivenBack>,
}

/// `batchd.v1.GivenBack`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GivenBack {
    /// Ids of jobs that were never started.
    pub not_started: Vec<String>,
    /// Ids of jobs stopped unfinished when the shutdown grace period ran out.
    pub stopped: Vec<String>,
}

/// `batchd.v1.JobResult`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobResult {
    /// The job's id.
    pub job_id: Text,
    /// The batch the job came in.
    pub batch_id: Text,
    /// `batchd.v1.Outcome` as a number.
    pub outcome: i32,
    /// The handler's output.
    pub output: Bytes,
    /// What went wrong.
    pub error: String,
    /// Time from admission to start.
    pub queued: Option<prost_types::Duration>,
    /// Time the job ran.
    pub ran: Option<prost_types::Duration>,
}

// === field helpers ===

/// The error prost's generated code gives for a `string` field that is not UTF-8.
#[cold]
fn not_utf8(message: &'static str, field: &'static str) -> DecodeError {
    // `DecodeError::new` is meant for hand-written `Message` implementations such as these.
    #[allow(deprecated)]
    let mut e = DecodeError::new("invalid string value: data is not UTF-8 encoded");
    e.push(message, field);
    e
}

/// Adds the message and field names to an error, as generated code does.
fn within(message: &'static str, field: &'static str) -> impl FnOnce(DecodeError) -> DecodeError {
    move |mut e| {
        e.push(message, field);
        e
    }
}

/// Decodes a `string` field into a [`Text`]: no allocation for a short one.
fn merge_text(
    wire_type: WireType,
    value: &mut Text,
    buf: &mut impl Buf,
    _ctx: DecodeContext,
    names: (&'static str, &'static str),
) -> Result<(), DecodeError> {
    let (message, field) = names;
    encoding::check_wire_type(WireType::LengthDelimited, wire_type)
        .map_err(within(message, field))?;
    let len = encoding::decode_varint(buf).map_err(within(message, field))?;
    let len = match usize::try_from(len) {
        Ok(len) if len <= buf.remaining() => len,
        _ => return Err(underflow(message, field)),
    };
    let chunk = buf.chunk();
    let text = if chunk.len() >= len {
        let t = Text::from_utf8(&chunk[..len]);
        buf.advance(len);
        t
    } else {
        let mut bytes = vec![0; len];
        buf.copy_to_slice(&mut bytes);
        Text::from_utf8(&bytes)
    };
    *value = text.map_err(|_| not_utf8(message, field))?;
    Ok(())
}

/// The error prost gives for a length beyond the message's end.
#[cold]
fn underflow(message: &'static str, field: &'static str) -> DecodeError {
    #[allow(deprecated)]
    let mut e = DecodeError::new("buffer underflow");
    e.push(message, field);
    e
}

/// Most jobs room is made for before a batch's first job is decoded: beyond it, the vector grows.
const RESERVE_JOBS: usize = 1024;

/// Makes room for the jobs of a batch whose first job is next in `buf`, guessing that the others
/// are about its size: one allocation where growing by doubling copied the jobs over and over.
fn reserve_jobs(jobs: &mut Vec<Job>, buf: &impl Buf) {
    // The first job's length (the varint its key was followed by), if the chunk holds it.
    let Ok(first) = encoding::decode_varint(&mut buf.chunk()) else {
        return;
    };
    // Each job takes its key (one byte), its length and its body. Rounded up: a batch of equal jobs
    // fits exactly (rounding down left the vector one short, and it doubled for the last job).
    let each = usize::try_from(first)
        .unwrap_or(usize::MAX)
        .saturating_add(1 + encoding::encoded_len_varint(first));
    jobs.reserve(buf.remaining().div_ceil(each).clamp(1, RESERVE_JOBS));
}

fn encode_text(tag: u32, value: &Text, buf: &mut impl BufMut) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value.as_bytes());
    }
}

fn text_len(tag: u32, value: &Text) -> usize {
    match value.len() {
        0 => 0,
        n => key_len(tag) + encoded_len_varint(n as u64) + n,
    }
}

// === impl Message ===

impl Message for ProcessRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.kind {
            Some(Kind::Batch(b)) => encoding::message::encode(1, b, buf),
            Some(Kind::Cancel(c)) => encoding::message::encode(2, c, buf),
            None => {}
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const NAME: &str = "ProcessRequest";
        match tag {
            1 => {
                if !matches!(self.kind, Some(Kind::Batch(_))) {
                    self.kind = Some(Kind::Batch(JobBatch::default()));
                }
                let Some(Kind::Batch(b)) = &mut self.kind else {
                    return Ok(());
                };
                encoding::message::merge(wire_type, b, buf, ctx).map_err(within(NAME, "kind"))
            }
            2 => {
                if !matches!(self.kind, Some(Kind::Cancel(_))) {
                    self.kind = Some(Kind::Cancel(CancelJobs::default()));
                }
                let Some(Kind::Cancel(c)) = &mut self.kind else {
                    return Ok(());
                };
                encoding::message::merge(wire_type, c, buf, ctx).map_err(within(NAME, "kind"))
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        match &self.kind {
            Some(Kind::Batch(b)) => encoding::message::encoded_len(1, b),
            Some(Kind::Cancel(c)) => encoding::message::encoded_len(2, c),
            None => 0,
        }
    }

    fn clear(&mut self) {
        self.kind = None;
    }
}

impl Message for JobBatch {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_text(1, &self.batch_id, buf);
        encoding::message::encode_repeated(2, &self.jobs, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const NAME: &str = "JobBatch";
        match tag {
            1 => merge_text(wire_type, &mut self.batch_id, buf, ctx, (NAME, "batch_id")),
            2 => {
                if self.jobs.is_empty() {
                    reserve_jobs(&mut self.jobs, buf);
                }
                encoding::message::merge_repeated(wire_type, &mut self.jobs, buf, ctx)
                    .map_err(within(NAME, "jobs"))
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        text_len(1, &self.batch_id) + encoding::message::encoded_len_repeated(2, &self.jobs)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Message for Job {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_text(1, &self.id, buf);
        encode_text(2, &self.handler, buf);
        if !self.payload.is_empty() {
            encoding::bytes::encode(3, &self.payload, buf);
        }
        encoding::hash_map::encode(
            encoding::string::encode,
            encoding::string::encoded_len,
            encoding::string::encode,
            encoding::string::encoded_len,
            4,
            &self.params,
            buf,
        );
        if let Some(t) = &self.timeout {
            encoding::message::encode(5, t, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const NAME: &str = "Job";
        match tag {
            1 => merge_text(wire_type, &mut self.id, buf, ctx, (NAME, "id")),
            2 => merge_text(wire_type, &mut self.handler, buf, ctx, (NAME, "handler")),
            3 => encoding::bytes::merge(wire_type, &mut self.payload, buf, ctx)
                .map_err(within(NAME, "payload")),
            4 => encoding::check_wire_type(WireType::LengthDelimited, wire_type)
                .and_then(|()| {
                    encoding::hash_map::merge(
                        encoding::string::merge,
                        encoding::string::merge,
                        &mut self.params,
                        buf,
                        ctx,
                    )
                })
                .map_err(within(NAME, "params")),
            5 => {
                let t = self.timeout.get_or_insert_with(Default::default);
                encoding::message::merge(wire_type, t, buf, ctx).map_err(within(NAME, "timeout"))
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        text_len(1, &self.id)
            + text_len(2, &self.handler)
            + match self.payload.len() {
                0 => 0,
                _ => encoding::bytes::encoded_len(3, &self.payload),
            }
            + encoding::hash_map::encoded_len(
                encoding::string::encoded_len,
                encoding::string::encoded_len,
                4,
                &self.params,
            )
            + self
                .timeout
                .as_ref()
                .map_or(0, |t| encoding::message::encoded_len(5, t))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Message for CancelJobs {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.batch_id.is_empty() {
            encoding::string::encode(1, &self.batch_id, buf);
        }
        encoding::string::encode_repeated(2, &self.job_ids, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const NAME: &str = "CancelJobs";
        match tag {
            1 => encoding::string::merge(wire_type, &mut self.batch_id, buf, ctx)
                .map_err(within(NAME, "batch_id")),
            2 => encoding::string::merge_repeated(wire_type, &mut self.job_ids, buf, ctx)
                .map_err(within(NAME, "job_ids")),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let id = match self.batch_id.is_empty() {
            true => 0,
            false => encoding::string::encoded_len(1, &self.batch_id),
        };
        id + encoding::string::encoded_len_repeated(2, &self.job_ids)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl Message for ProcessResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(1, &self.results, buf);
        if let Some(g) = &self.given_back {
            encoding::message::encode(2, g, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const NAME: &str = "ProcessResponse";
        match tag {
            1 => encoding::message::merge_repeated(wire_type, &mut self.results, buf, ctx)
                .map_err(within(NAME, "results")),
            2 => {
                let g = self.given_back.get_or_insert_with(Default::default);
                encoding::message::merge(wire_type, g, buf, ctx).map_err(within(NAME, "given_back"))
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        encoding::message::encoded_len_repeated(1, &self.results)
            + self
                .given_back
                .as_ref()
                .map_or(0, |g| encoding::message::encoded_len(2, g))
    }

    fn clear(&mut self) {
        self.results.clear();
        self.given_back = None;
    }
}

impl Message for GivenBack {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::string::encode_repeated(1, &self.not_started, buf);
        encoding::string::encode_repeated(2, &self.stopped, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const NAME: &str = "GivenBack";
        match tag {
            1 => encoding::string::merge_repeated(wire_type, &mut self.not_started, buf, ctx)
                .map_err(within(NAME, "not_started")),
            2 => encoding::string::merge_repeated(wire_type, &mut self.stopped, buf, ctx)
                .map_err(within(NAME, "stopped")),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        encoding::string::encoded_len_repeated(1, &self.not_started)
            + encoding::string::encoded_len_repeated(2, &self.stopped)
    }

    fn clear(&mut self) {
        self.not_started.clear();
        self.stopped.clear();
    }
}

impl Message for JobResult {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_text(1, &self.job_id, buf);
        encode_text(2, &self.batch_id, buf);
        if self.outcome != 0 {
            encoding::int32::encode(3, &self.outcome, buf);
        }
        if !self.output.is_empty() {
            // `bytes::encode` would clone the `Bytes` to put it; a slice is the same bytes.
            encode_key(4, WireType::LengthDelimited, buf);
            encode_varint(self.output.len() as u64, buf);
            buf.put_slice(&self.output);
        }
        if !self.error.is_empty() {
            encoding::string::encode(5, &self.error, buf);
        }
        if let Some(d) = &self.queued {
            encoding::message::encode(6, d, buf);
        }
        if let Some(d) = &self.ran {
            encoding::message::encode(7, d, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        const NAME: &str = "JobResult";
        match tag {
            1 => merge_text(wire_type, &mut self.job_id, buf, ctx, (NAME, "job_id")),
            2 => merge_text(wire_type, &mut self.batch_id, buf, ctx, (NAME, "batch_id")),
            3 => encoding::int32::merge(wire_type, &mut self.outcome, buf, ctx)
                .map_err(within(NAME, "outcome")),
            4 => encoding::bytes::merge(wire_type, &mut self.output, buf, ctx)
                .map_err(within(NAME, "output")),
            5 => encoding::string::merge(wire_type, &mut self.error, buf, ctx)
                .map_err(within(NAME, "error")),
            6 => {
                let d = self.queued.get_or_insert_with(Default::default);
                encoding::message::merge(wire_type, d, buf, ctx).map_err(within(NAME, "queued"))
            }
            7 => {
                let d = self.ran.get_or_insert_with(Default::default);
                encoding::message::merge(wire_type, d, buf, ctx).map_err(within(NAME, "ran"))
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let output = match self.output.len() {
            0 => 0,
            n => key_len(4) + encoded_len_varint(n as u64) + n,
        };
        let error = match self.error.is_empty() {
            true => 0,
            false => encoding::string::encoded_len(5, &self.error),
        };
        let outcome = match self.outcome {
            0 => 0,
            o => encoding::int32::encoded_len(3, &o),
        };
        let duration = |tag, d: &Option<prost_types::Duration>| {
            d.as_ref()
                .map_or(0, |d| encoding::message::encoded_len(tag, d))
        };
        text_len(1, &self.job_id)
            + text_len(2, &self.batch_id)
            + outcome
            + output
            + error
            + duration(6, &self.queued)
            + duration(7, &self.ran)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of `n` jobs with ids of one length and `payload`-byte payloads, decoded.
    fn decoded(n: usize, payload: usize) -> JobBatch {
        let jobs = (0..n)
            .map(|i| Job {
                id: Text::from(format!("j{i:06}").as_str()),
                handler: Text::from("echo"),
                payload: Bytes::from(vec![b'x'; payload]),
                ..Job::default()
            })
            .collect();
        let request = ProcessRequest {
            kind: Some(Kind::Batch(JobBatch {
                batch_id: Text::from("b"),
                jobs,
            })),
        };
        match ProcessRequest::decode(request.encode_to_vec().as_slice()) {
            Ok(ProcessRequest {
                kind: Some(Kind::Batch(b)),
            }) => b,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_batch_of_equal_jobs_is_decoded_into_one_allocation() {
        // Bodies under 128 bytes (a one-byte length) and over (two bytes).
        for payload in [0, 64, 100, 200, 20_000] {
            for n in [1, 2, 72, 73, 256, 1000] {
                let b = decoded(n, payload);
                assert_eq!(b.jobs.len(), n);
                // (A vector's first allocation holds at least 4.)
                assert!(
                    b.jobs.capacity() <= (n + 1).max(4),
                    "{n} jobs of {payload} bytes: room for {}, the vector grew",
                    b.jobs.capacity()
                );
            }
        }
    }
}
