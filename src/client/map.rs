//! `batchctl map HANDLER [PATH…]`: each file is one job (payload: its bytes, id: its path), fed to
//! one Process call ([`super::call`]); outputs written to files (`--out`) or as JSON Lines.
//!
//! Files are read lazily off the runtime, a chunk at a time, within the room the call has: at most
//! `max_in_flight` jobs and `max_in_flight_bytes` of payload are held (a file larger than that alone
//! is read only when nothing else is held). Files too large to send are skipped before they are
//! read, by their size.

mod inputs;
mod output;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio_util::task::AbortOnDropHandle;

pub use inputs::MapInputs;
pub use output::hold_outputs;

use super::call::{
    self, size_text, BadInput, BadKind, CallOptions, Fed, Origin, Pull, Room, Source,
};
use super::endpoints::Endpoints;
use super::jsonl::JsonlSink;
use super::progress::Progress;
use super::template::Template;
use super::{ClientError, Summary};
use crate::proto;
use inputs::{Found, Next, Walker};
use output::FileSink;

/// Most inputs one read-ahead chunk looks at.
const CHUNK_INPUTS: usize = 256;
/// A chunk stops reading once it holds this many bytes, so the call can send them.
const CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// How `map` makes and sends jobs and where outputs go.
#[derive(Debug, Clone, Default)]
pub struct MapOptions {
    /// Batching, bounds, retries, deadline, tracing.
    pub call: CallOptions,
    /// The handler of every job.
    pub handler: String,
    /// Params, each value a template.
    pub params: Vec<(String, Template)>,
    /// Where each ok job's output goes; `None`: results as JSON Lines.
    pub out: Option<Template>,
    /// Skip inputs whose output file exists.
    pub skip_existing: bool,
    /// JSON Lines in input order.
    pub ordered: bool,
    /// Each job's timeout.
    pub timeout: Option<Duration>,
    /// The batch name of every job.
    pub batch: String,
    /// Ids (paths) to skip: finished ok in an earlier run, from the job log.
    pub skip: HashSet<String>,
}

/// What a job carries to its result: where its output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapTag {
    /// The output file (`--out`).
    pub out: Option<PathBuf>,
}

/// Maps every input file through `opts.handler` on the replicas of `to` (see [`call::drive`]):
/// outputs to `--out` files, or JSON Lines on `results`; the job log, if given, records each
/// finished job. Returns when every input is done, when `interrupt` completes (the daemons stop
/// every job of the calls), or on the first error.
pub async fn map<W, L>(
    to: impl Into<Endpoints>,
    inputs: MapInputs,
    results: W,
    joblog: Option<L>,
    opts: &MapOptions,
    progress: &Progress,
    interrupt: impl Future<Output = ()>,
) -> (Summary, Result<(), ClientError>)
where
    W: AsyncWrite + Unpin,
    L: AsyncWrite + Unpin,
{
    let mut source = FileSource::new(Reader::new(inputs, opts));
    let how = &opts.call;
    match &opts.out {
        Some(_) => {
            let mut sink = FileSink::new(progress.clone());
            call::drive(to, &mut source, &mut sink, joblog, how, progress, interrupt).await
        }
        None => {
            let mut sink = JsonlSink::new(results, opts.ordered);
            call::drive(to, &mut source, &mut sink, joblog, how, progress, interrupt).await
        }
    }
}

/// How many inputs `inputs` names, walking directories with `-r`; `None` when they come from a
/// list (stdin). Blocking: for a background count.
pub fn count_inputs(inputs: &MapInputs) -> Option<u64> {
    if inputs.paths.is_empty() || inputs.paths.iter().any(|p| p.as_os_str() == "-") {
        return None;
    }
    if !inputs.recursive {
        return Some(inputs.paths.len() as u64);
    }
    let mut walker = Walker::new(MapInputs {
        paths: inputs.paths.clone(),
        list: None,
        null: false,
        recursive: true,
        follow: inputs.follow,
    });
    let mut n = 0;
    while let Next::Found(_) = walker.next(true) {
        n += 1;
    }
    Some(n)
}

// === the source ===

/// What a read-ahead chunk returns: the reader back, what it found, whether the inputs ended.
type Chunk = (Box<Reader>, Vec<Pull<MapTag>>, bool);

/// Jobs from files, read a chunk at a time on the blocking pool while the call goes on.
struct FileSource {
    /// `None` while a chunk has it.
    reader: Option<Box<Reader>>,
    task: Option<AbortOnDropHandle<Chunk>>,
    ready: VecDeque<Pull<MapTag>>,
    ended: bool,
}

impl FileSource {
    fn new(reader: Reader) -> Self {
        Self {
            reader: Some(Box::new(reader)),
            task: None,
            ready: VecDeque::new(),
            ended: false,
        }
    }
}

impl Source for FileSource {
    type Tag = MapTag;

    async fn next(&mut self, room: Room) -> Option<Result<Pull<MapTag>, ClientError>> {
        loop {
            if let Some(pull) = self.ready.pop_front() {
                return Some(Ok(pull));
            }
            // Awaiting the handle, not the chunk, keeps this cancel-safe.
            if let Some(task) = &mut self.task {
                let chunk = task.await;
                self.task = None;
                match chunk {
                    Ok((reader, found, ended)) => {
                        self.reader = Some(reader);
                        self.ready.extend(found);
                        self.ended = ended;
                        continue;
                    }
                    Err(e) => return Some(Err(ClientError::Input(std::io::Error::other(e)))),
                }
            }
            if self.ended {
                return None;
            }
            let mut reader = self.reader.take()?;
            self.task = Some(AbortOnDropHandle::new(tokio::task::spawn_blocking(
                move || {
                    let (found, ended) = reader.chunk(room);
                    (reader, found, ended)
                },
            )));
        }
    }
}

// === the reader ===

/// A file opened and checked, waiting for room to be read.
struct Opened {
    file: std::fs::File,
    size: usize,
    regular: bool,
    /// The most payload bytes a request of `--max-message` carries for this job.
    by_message: usize,
    job: proto::Job,
    tag: MapTag,
}

/// The limit that a file's size passes.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// `--max-message` (its size).
    Message(usize),
    /// The daemon's `max_payload`.
    Payload(usize),
}

/// Turns inputs into jobs: numbering, templates, skips, checks, reading. Blocking.
struct Reader {
    walker: Walker,
    /// Inputs met so far: `{#}`.
    number: u64,
    handler: String,
    params: Vec<(String, Template)>,
    out: Option<Template>,
    skip_existing: bool,
    timeout: Option<prost_types::Duration>,
    batch: String,
    skip: HashSet<String>,
    max_message: usize,
    /// Outputs claimed in this run, and by which input.
    claimed: HashMap<PathBuf, String>,
    /// A file that did not fit the room of the last chunk.
    pending: Option<Opened>,
}

/// What became of one input.
enum Step {
    Pull(Pull<MapTag>),
    /// Opened, waiting for room.
    Opened(Opened),
}

impl Reader {
    fn new(inputs: MapInputs, opts: &MapOptions) -> Self {
        Self {
            walker: Walker::new(inputs),
            number: 0,
            handler: opts.handler.clone(),
            params: opts.params.clone(),
            out: opts.out.clone(),
            skip_existing: opts.skip_existing,
            timeout: opts
                .timeout
                .and_then(|t| prost_types::Duration::try_from(t).ok()),
            batch: opts.batch.clone(),
            skip: opts.skip.clone(),
            max_message: opts.call.max_message,
            claimed: HashMap::new(),
            pending: None,
        }
    }

    /// Reads ahead within `room`: what was found, and whether the inputs ended.
    fn chunk(&mut self, room: Room) -> (Vec<Pull<MapTag>>, bool) {
        let mut out = Vec::new();
        let (mut jobs, mut bytes) = (0usize, 0usize);
        loop {
            if jobs >= room.jobs || out.len() >= CHUNK_INPUTS || bytes >= CHUNK_BYTES {
                return (out, false);
            }
            let opened = match self.pending.take() {
                Some(opened) => opened,
                None => match self.walker.next(out.is_empty()) {
                    Next::Found(found) => match self.step(found, room) {
                        Step::Pull(pull) => {
                            out.push(pull);
                            continue;
                        }
                        Step::Opened(opened) => opened,
                    },
                    Next::WouldBlock => return (out, false),
                    Next::End => return (out, true),
                },
            };
            // The daemon's payload limit may have been learnt since the file was opened.
            if let Some(pull) = self.too_large(&opened, room) {
                out.push(pull);
                continue;
            }
            let alone = room.empty && jobs == 0;
            if bytes + opened.size > room.bytes && !alone {
                let size = opened.size;
                self.pending = Some(opened);
                if out.is_empty() {
                    out.push(Pull::NeedRoom(size));
                }
                return (out, false);
            }
            let pull = self.read(opened, room);
            if let Pull::Job(fed) = &pull {
                jobs += 1;
                bytes += fed.job.payload.len();
            }
            out.push(pull);
        }
    }

    /// Checks an input, and opens it when it is to be read.
    fn step(&mut self, found: Found, room: Room) -> Step {
        self.number += 1;
        let (path, unreadable) = match found {
            Found::File(path) => (path, None),
            Found::Unreadable(path, why) => (path, Some(why)),
        };
        let bad = |kind, at: &Path, reason: String| {
            Step::Pull(Pull::Bad(BadInput {
                kind,
                at: at.display().to_string(),
                reason,
            }))
        };
        if let Some(why) = unreadable {
            return bad(BadKind::Unreadable, &path, why);
        }
        let Some(id) = path.to_str().map(str::to_owned) else {
            let why = "the name is not valid UTF-8 (job ids are text); skipped".into();
            return bad(BadKind::Unreadable, &path, why);
        };
        let out = self
            .out
            .as_ref()
            .map(|t| PathBuf::from(t.render(&id, self.number)));
        if let Some(out) = &out {
            if let Some(first) = self.claimed.get(out) {
                let why = format!(
                    "its output {} is that of {first} already; skipped",
                    out.display()
                );
                return bad(BadKind::Duplicate, &path, why);
            }
            self.claimed.insert(out.clone(), id.clone());
        }
        if self.skip.contains(&id) {
            return Step::Pull(Pull::Skipped);
        }
        if let (true, Some(out)) = (self.skip_existing, &out) {
            if std::fs::symlink_metadata(out).is_ok() {
                return Step::Pull(Pull::Skipped);
            }
        }
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => return bad(BadKind::Unreadable, &path, format!("cannot read: {e}")),
        };
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => return bad(BadKind::Unreadable, &path, format!("cannot read: {e}")),
        };
        if meta.is_dir() {
            let why = "is a directory (-r walks directories); skipped".into();
            return bad(BadKind::Unreadable, &path, why);
        }
        let params = self
            .params
            .iter()
            .map(|(k, t)| (k.clone(), t.render(&id, self.number)))
            .collect();
        let job = proto::Job {
            id,
            handler: self.handler.clone(),
            payload: Default::default(),
            params,
            timeout: self.timeout,
        };
        let opened = Opened {
            file,
            size: usize::try_from(meta.len()).unwrap_or(usize::MAX),
            regular: meta.is_file(),
            by_message: self.by_message(&job),
            job,
            tag: MapTag { out },
        };
        match self.too_large(&opened, room) {
            Some(pull) => Step::Pull(pull),
            None => Step::Opened(opened),
        }
    }

    /// The most payload bytes a request of `--max-message` carries for `job` (its payload empty).
    fn by_message(&self, job: &proto::Job) -> usize {
        let need = |n| call::request_size_with_payload(&self.batch, job, n);
        // The largest n with need(n) <= max_message; need grows by at least 1 per byte, and by a
        // few more where the length prefixes grow.
        let mut n = self.max_message.saturating_sub(need(0));
        while n > 0 && need(n) > self.max_message {
            n -= 1;
        }
        n
    }

    /// The most payload bytes `opened` may carry, and which limit says so.
    fn limit(&self, opened: &Opened, room: Room) -> (usize, Limit) {
        match room.max_payload {
            Some(p) if p < opened.by_message => (p, Limit::Payload(p)),
            _ => (opened.by_message, Limit::Message(self.max_message)),
        }
    }

    /// A report when a regular file is larger than it may be.
    fn too_large(&self, opened: &Opened, room: Room) -> Option<Pull<MapTag>> {
        let (limit, why) = self.limit(opened, room);
        (opened.regular && opened.size > limit)
            .then(|| too_large(&opened.job.id, &format!("{} bytes", opened.size), why))
    }

    /// Reads an opened file into its job (at most one byte over its limit, to notice growth).
    fn read(&mut self, opened: Opened, room: Room) -> Pull<MapTag> {
        let (limit, why) = self.limit(&opened, room);
        let Opened {
            file,
            size,
            mut job,
            tag,
            ..
        } = opened;
        let mut buf = Vec::with_capacity(size.min(limit).saturating_add(1));
        let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
        if let Err(e) = file.take(cap).read_to_end(&mut buf) {
            return Pull::Bad(BadInput {
                kind: BadKind::Unreadable,
                at: job.id,
                reason: format!("cannot read: {e}"),
            });
        }
        if buf.len() > limit {
            return too_large(&job.id, &format!("more than {limit} bytes"), why);
        }
        job.payload = buf.into();
        Pull::Job(Fed {
            batch: self.batch.clone(),
            job,
            origin: Origin::File,
            tag,
        })
    }
}

/// The report of a file too large: `PATH: SIZE, too large to send within --max-message (16MiB)`.
fn too_large(path: &str, size: &str, why: Limit) -> Pull<MapTag> {
    let why = match why {
        Limit::Message(m) => format!("too large to send within --max-message ({})", size_text(m)),
        Limit::Payload(p) => format!("over the daemon's max_payload ({})", size_text(p)),
    };
    Pull::Bad(BadInput {
        kind: BadKind::TooLarge,
        at: path.to_owned(),
        reason: format!("{size}, {why}; skipped"),
    })
}
