//! `batchctl run`: jobs from JSON Lines, fed to one Process call ([`super::call`]); results written
//! as JSON Lines as they come.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::FramedRead;

use super::call::{self, BadInput, BadKind, CallOptions, Fed, Origin, Pull, Room, Source};
use super::endpoints::Endpoints;
use super::jobline::{self, LineDefaults};
use super::jsonl::JsonlSink;
use super::lines::{Line, LineDecoder};
use super::progress::Progress;
use super::{ClientError, Summary, Token, TraceHeaders};

/// Longest input line read; longer lines are reported and skipped.
pub const MAX_LINE: usize = 64 * 1024 * 1024;

/// How `run` reads, sends and writes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Most jobs per JobBatch.
    pub batch_size: usize,
    /// Largest encoded request: a batch is sent before it would grow past it, and a job that does
    /// not fit alone is a bad line. Keep it at or under the daemon's `max_message_size`.
    pub max_message: usize,
    /// Jobs sent and not yet written out; bounds memory, with `--ordered` too.
    pub max_in_flight: usize,
    /// Payload bytes read and not yet answered (a larger job alone is still sent).
    pub max_in_flight_bytes: usize,
    /// Write results in input order.
    pub ordered: bool,
    /// Resend a job that ends failed or timed_out up to this many times.
    pub retry: u32,
    /// Pause before the first retry; doubles each time.
    pub retry_backoff: Duration,
    /// Stop at the first bad input line.
    pub strict: bool,
    /// Values for fields a line omits.
    pub defaults: LineDefaults,
    /// Deadline of the whole call.
    pub deadline: Option<Duration>,
    /// Ids to skip (finished ok in an earlier run, from the job log).
    pub skip: HashSet<String>,
    /// W3C trace context to send (batchctl's `batchctl.run` span); `None`: a `traceparent` made
    /// here, a child of `$TRACEPARENT` when the caller runs in a trace.
    pub trace: Option<TraceHeaders>,
    /// Credentials for a daemon with principals.
    pub token: Option<Token>,
    /// With every replica lost, how long to keep trying them before giving up.
    pub reconnect_timeout: Duration,
    /// How often `dns:///` names are resolved again.
    pub resolve_every: Duration,
    /// HTTP/2 keepalive pings on each replica's connection (a silent replica is lost after twice
    /// this).
    pub keepalive: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self::with_call(CallOptions::default())
    }
}

// === impl RunOptions ===

impl RunOptions {
    /// Options that send as `call` says, with the defaults of the rest.
    pub fn with_call(call: CallOptions) -> Self {
        Self {
            batch_size: call.batch_size,
            max_message: call.max_message,
            max_in_flight: call.max_in_flight,
            max_in_flight_bytes: call.max_in_flight_bytes,
            ordered: false,
            retry: call.retry,
            retry_backoff: call.retry_backoff,
            strict: call.strict,
            defaults: LineDefaults::default(),
            deadline: call.deadline,
            skip: HashSet::new(),
            trace: call.trace,
            token: call.token,
            reconnect_timeout: call.reconnect_timeout,
            resolve_every: call.resolve_every,
            keepalive: call.keepalive,
        }
    }

    /// How the call sends, bounds and retries.
    pub fn call(&self) -> CallOptions {
        CallOptions {
            batch_size: self.batch_size,
            max_message: self.max_message,
            max_in_flight: self.max_in_flight,
            max_in_flight_bytes: self.max_in_flight_bytes,
            retry: self.retry,
            retry_backoff: self.retry_backoff,
            strict: self.strict,
            deadline: self.deadline,
            trace: self.trace.clone(),
            token: self.token.clone(),
            reconnect_timeout: self.reconnect_timeout,
            resolve_every: self.resolve_every,
            keepalive: self.keepalive,
        }
    }
}

/// Runs every job of `input` on the replicas of `to` (one Process call each; see
/// [`call::drive`]), writing results to `output` and, if given, the job log. Returns when the
/// input is done and every result is written, when `interrupt` completes (the calls are
/// cancelled: the daemons stop all of their jobs), or on the first error.
pub async fn run<R, W, L>(
    to: impl Into<Endpoints>,
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
    let how = opts.call();
    call::drive(
        to,
        &mut source,
        &mut sink,
        joblog,
        &how,
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
