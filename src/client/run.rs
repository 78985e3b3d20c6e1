//! `batchctl run`: jobs from JSON Lines, fed to one Process call ([`super::call`]); results written
//! as JSON Lines as they come.

use std::collections::HashSet;
use std::future::Future;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::FramedRead;
use tonic::transport::Channel;

use super::call::{self, BadInput, BadKind, CallOptions, Fed, Origin, Pull, Room, Source};
use super::jobline::{self, LineDefaults};
use super::jsonl::JsonlSink;
use super::lines::{Line, LineDecoder};
use super::progress::Progress;
use super::{ClientError, Summary};
use crate::proto::batch_service_client::BatchServiceClient;

/// Longest input line read; longer lines are reported and skipped.
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// How `run` reads, sends and writes.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Batching, bounds, retries, deadline, tracing.
    pub call: CallOptions,
    /// Write results in input order.
    pub ordered: bool,
    /// Values for fields a line omits.
    pub defaults: LineDefaults,
    /// Ids to skip (finished ok in an earlier run, from the job log).
    pub skip: HashSet<String>,
}

/// Runs every job of `input` over one Process call, writing results to `output` and, if given, the
/// job log. Returns when the input is done and every result is written, when `interrupt` completes
/// (the call is cancelled: the daemon stops all of its jobs), or on the first error.
pub async fn run<R, W, L>(
    client: &mut BatchServiceClient<Channel>,
    input: R,
    output: W,
    joblog: Option<L>,
    opts: &RunOptions,
    progress: &Progress,
    interrupt: impl Future<Output = ()>,
) -> (Summary, Result<(), ClientError>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    L: AsyncWrite + Unpin,
{
    let mut source = LineSource::new(input, opts);
    let mut sink = JsonlSink::new(output, opts.ordered);
    call::drive(
        client,
        &mut source,
        &mut sink,
        joblog,
        &opts.call,
        progress,
        interrupt,
    )
    .await
}

/// Jobs from the lines of a JSON Lines input.
struct LineSource<'a, R> {
    lines: FramedRead<R, LineDecoder>,
    line_no: u64,
    opts: &'a RunOptions,
}

impl<'a, R: AsyncRead + Unpin> LineSource<'a, R> {
    fn new(input: R, opts: &'a RunOptions) -> Self {
        Self {
            lines: FramedRead::new(input, LineDecoder::new(MAX_LINE)),
            line_no: 0,
            opts,
        }
    }

    /// What line `line_no` holds; `None` for a blank line (nothing to send, nothing to report).
    fn parse(&self, line: Line) -> Option<Pull<()>> {
        let line_no = self.line_no;
        let bad = |reason: String| {
            Some(Pull::Bad(BadInput {
                kind: BadKind::Line,
                at: format!("line {line_no}"),
                reason,
            }))
        };
        let parsed = match line {
            Line::Text(bytes) => match std::str::from_utf8(&bytes) {
                Ok(text) => jobline::parse(line_no, text, &self.opts.defaults),
                Err(_) => return bad("not valid UTF-8".into()),
            },
            Line::TooLong => return bad(format!("longer than {MAX_LINE} bytes; skipped")),
        };
        match parsed {
            Ok(None) => None,
            Ok(Some(job)) if self.opts.skip.contains(&job.job.id) => Some(Pull::Skipped),
            Ok(Some(job)) => Some(Pull::Job(Fed {
                batch: job.batch,
                job: job.job,
                origin: Origin::Line(line_no),
                tag: (),
            })),
            Err(e) => bad(e.reason),
        }
    }
}

impl<R: AsyncRead + Unpin> Source for LineSource<'_, R> {
    type Tag = ();

    async fn next(&mut self, _room: Room) -> Option<Result<Pull<()>, ClientError>> {
        loop {
            let frame = self.lines.next().await?;
            self.line_no += 1;
            let line = match frame {
                Ok(line) => line,
                Err(e) => return Some(Err(ClientError::Input(e))),
            };
            if let Some(pull) = self.parse(line) {
                return Some(Ok(pull));
            }
        }
    }
}
