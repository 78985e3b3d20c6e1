//! batchctl: run JSON Lines job files and map files through a batchd daemon, and query it.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchd::client::map::MapInputs;
use batchd::client::{
    self, CallOptions, ClientError, ClientTls, Endpoints, LineDefaults, MapOptions, Progress,
    RunOptions, Summary, Template,
};
use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::telemetry::{ClientTelemetry, RunEnd, RunTrace};
use batchd::units::ByteSize;
use clap::{CommandFactory, Parser, Subcommand};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

// mimalloc: with glibc's malloc, payload buffers of a few MiB, allocated and freed on different
// threads, stay in its arenas (its mmap threshold rises to the largest block freed), so `map` over
// large files held about twice --max-in-flight-bytes in RSS; mimalloc returns them (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Every job ended ok.
const EXIT_OK: u8 = 0;
/// Some job did not end ok, or the call failed.
const EXIT_NOT_OK: u8 = 1;
/// Usage or input error.
const EXIT_INPUT: u8 = 2;
/// The daemon cannot be reached (or every replica was lost and none came back in time).
const EXIT_UNREACHABLE: u8 = 3;
/// Interrupted by Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

/// Run batches of jobs on a batchd daemon: JSON Lines in, results out.
#[derive(Debug, Parser)]
#[command(name = "batchctl", version, max_term_width = 100)]
struct Cli {
    /// The daemon's address: http://HOST:PORT, https://HOST:PORT (TLS), HOST:PORT (https:// with
    /// --tls-* options), or dns:///NAME:PORT for every address of NAME (one replica each, e.g. a
    /// headless Service). A comma-separated list, repeatable: jobs are spread over the replicas,
    /// and a lost replica's unanswered jobs go to the others
    #[arg(long, global = true, env = "BATCHD_ENDPOINT", value_name = "ENDPOINT",
          default_value = client::DEFAULT_ENDPOINT)]
    endpoint: Vec<String>,
    /// File holding the bearer token for a daemon with principals (else $BATCHD_TOKEN, the token)
    #[arg(long, global = true, env = "BATCHD_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsFlags,
    #[command(subcommand)]
    command: Command,
}

/// TLS of https:// endpoints. The variables are not BATCHD_TLS_CERT/KEY: those set the daemon's own.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "TLS (https:// endpoints)")]
struct TlsFlags {
    /// CA certificates (PEM) that sign the daemon's certificate [default: the system's]
    #[arg(long, global = true, env = "BATCHD_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a daemon that requires one (mTLS); with --tls-key
    #[arg(
        long,
        global = true,
        env = "BATCHD_TLS_CLIENT_CERT",
        value_name = "FILE"
    )]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert
    #[arg(
        long,
        global = true,
        env = "BATCHD_TLS_CLIENT_KEY",
        value_name = "FILE"
    )]
    tls_key: Option<PathBuf>,
    /// Name the daemon's certificate must hold [default: the endpoint's host]
    #[arg(
        long,
        global = true,
        env = "BATCHD_TLS_SERVER_NAME",
        value_name = "NAME"
    )]
    tls_server_name: Option<String>,
}

impl TlsFlags {
    fn settings(&self) -> ClientTls {
        ClientTls {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            server_name: self.tls_server_name.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the jobs of a JSON Lines file (or stdin) and write their results as JSON Lines
    ///
    /// Each line is a job: {"id": "…", "handler": "…", "payload": "text"} or "payload_b64": "…",
    /// optional "params": {…}, "timeout_ms": N, "batch": "…". A missing id defaults to the line number.
    Run(RunArgs),
    /// Run HANDLER on each file: files in, outputs to files (--out) or as JSON Lines
    ///
    /// Each file is one job whose payload is the file's bytes and whose id is its path. Without
    /// paths, or with "-", paths are read from stdin (one a line, or NUL-separated with -0).
    /// --param values and --out take GNU parallel's replacement strings: {} the path, {/} its
    /// basename, {//} its dirname, {.} the path without extension, {/.} the basename without
    /// extension, {#} the job number; {{ and }} write braces.
    Map(MapArgs),
    /// List the daemon's handlers
    Handlers,
    /// Check the daemon's health (exit 0 when SERVING)
    Health,
    /// Print a shell completion script
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Job file; "-" or nothing reads stdin
    file: Option<PathBuf>,
    /// Write results here instead of stdout
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<PathBuf>,
    /// Handler for lines that do not name one
    #[arg(long)]
    handler: Option<String>,
    /// Write results in input order (a bounded reorder buffer)
    #[arg(long)]
    ordered: bool,
    #[command(flatten)]
    call: CallArgs,
}

#[derive(Debug, clap::Args)]
struct MapArgs {
    /// The handler that runs on each file
    handler: String,
    /// Files (directories with -r); "-" or nothing reads paths from stdin
    paths: Vec<PathBuf>,
    /// Paths on stdin are separated by NUL, not newline (find -print0)
    #[arg(long = "null", short = '0')]
    null: bool,
    /// Walk directories: their regular files, depth first in name order
    #[arg(long, short = 'r')]
    recursive: bool,
    /// Follow symbolic links met while walking (named paths are always followed)
    #[arg(long, requires = "recursive")]
    follow: bool,
    /// A param of every job, e.g. size=100x100 or name={/.}; repeatable
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
    params: Vec<(String, Template)>,
    /// Write each ok job's output to this file (atomically; directories made), e.g. 'out/{/.}.png';
    /// without it, results are JSON Lines on stdout
    #[arg(long, value_name = "TEMPLATE", value_parser = parse_out)]
    out: Option<Template>,
    /// Skip files whose output file already exists
    #[arg(long, requires = "out")]
    skip_existing: bool,
    /// Write JSON Lines results in input order (a bounded reorder buffer)
    #[arg(long, conflicts_with = "out")]
    ordered: bool,
    #[command(flatten)]
    call: CallArgs,
}

/// What `run` and `map` share: how jobs are sent, bounded, retried and logged.
#[derive(Debug, clap::Args)]
struct CallArgs {
    /// Jobs per batch sent to the daemon
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Largest request message (e.g. 4MiB): a batch is sent before it would grow past it, and a job
    /// too large to fit alone is skipped as a bad input. Keep it at most the daemon's
    /// max_message_size
    #[arg(long, value_name = "SIZE", value_parser = parse_max_message,
          default_value_t = ByteSize(client::DEFAULT_MAX_MESSAGE as u64))]
    max_message: ByteSize,
    /// Most jobs sent and not yet written out
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,
    /// Most payload bytes read and not yet answered (a larger job alone is still sent)
    #[arg(long, value_name = "SIZE", value_parser = ByteSize::parse,
          default_value_t = ByteSize(client::DEFAULT_MAX_IN_FLIGHT_BYTES as u64))]
    max_in_flight_bytes: ByteSize,
    /// Timeout for jobs that set none, in milliseconds
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Batch name for jobs that do not name one
    #[arg(long, default_value = "")]
    batch: String,
    /// Deadline of the whole run, e.g. 10m; the daemon stops every job when it passes
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
    /// Resend jobs that end failed or timed_out up to N times, with exponential backoff
    #[arg(long, value_name = "N", default_value_t = 0)]
    retry: u32,
    /// Stop at the first bad input (a line that is not a job; a file unreadable, too large or a
    /// duplicate)
    #[arg(long)]
    strict: bool,
    /// Append each finished job's id and outcome to FILE
    #[arg(long, value_name = "FILE")]
    joblog: Option<PathBuf>,
    /// Skip jobs the job log records as ok (needs --joblog)
    #[arg(long, requires = "joblog")]
    resume: bool,
    /// With every replica lost, how long to keep trying them before exiting 3 (--deadline ends
    /// the wait earlier)
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration,
          default_value = "30s")]
    reconnect_timeout: Duration,
    /// How often dns:/// names are resolved again (and after every lost replica), so that new
    /// replicas get jobs
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration,
          default_value = "10s")]
    resolve_every: Duration,
    /// No progress line, only the summary
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("batchctl: cannot start: {e}");
            return ExitCode::from(EXIT_NOT_OK);
        }
    };
    let token = match client::Token::from_file_or_env(
        cli.token_file.as_deref(),
        std::env::var("BATCHD_TOKEN").ok(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("batchctl: {e}");
            return ExitCode::from(EXIT_INPUT);
        }
    };
    let tls = cli.tls.settings();
    let endpoints =
        match Endpoints::parse(&cli.endpoint, tls.is_set()).and_then(|e| e.with_tls(&tls)) {
            Ok(e) => e,
            Err(e) => {
                let fail = Fail::from(e);
                eprintln!("batchctl: {}", fail.message);
                return ExitCode::from(fail.code);
            }
        };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => traced(&endpoints, token, Work::Run(args)).await,
            Command::Map(args) => traced(&endpoints, token, Work::Map(args)).await,
            Command::Handlers => handlers(&endpoints, token).await,
            Command::Health => health(&endpoints).await,
            Command::Completions { shell } => {
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "batchctl", &mut script);
                print(&script)
            }
        }
    });
    // Do not wait for a blocked stdin reader: the work is done.
    runtime.shutdown_background();
    match code {
        Ok(code) => ExitCode::from(code),
        Err(fail) => {
            eprintln!("batchctl: {}", fail.message);
            ExitCode::from(fail.code)
        }
    }
}

/// Why batchctl stops early: the one line for stderr and the exit code.
#[derive(Debug)]
struct Fail {
    code: u8,
    message: String,
}

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Unreachable { .. }
            | ClientError::NoReplica { .. }
            | ClientError::Certificate { .. } => EXIT_UNREACHABLE,
            ClientError::BadEndpoint(..)
            | ClientError::Tls(_)
            | ClientError::Bad(_)
            | ClientError::Input(_) => EXIT_INPUT,
            ClientError::JobLog(_) | ClientError::Output(_) | ClientError::Call(_) => EXIT_NOT_OK,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

impl Fail {
    fn io(code: u8, what: String, e: &std::io::Error) -> Self {
        Self {
            code,
            message: format!("{what}: {e}"),
        }
    }
}

/// Writes to stdout; a reader that went away (`| head`) ends batchctl quietly.
fn print(bytes: &[u8]) -> Result<u8, Fail> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(EXIT_OK),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(EXIT_OK),
        Err(e) => Err(Fail::io(EXIT_NOT_OK, "cannot write the output".into(), &e)),
    }
}

/// A path for messages, or what stands in for it.
fn name(path: Option<&Path>, default: &str) -> String {
    path.map_or_else(|| default.to_owned(), |p| p.display().to_string())
}

/// Ctrl-C while batchctl runs jobs: the first one stops the run (the call is cancelled, so the
/// daemon stops every job of it), and a second one, at any time, exits 130 at once, as does any
/// Ctrl-C once the run is over (while the trace is exported).
struct CtrlC {
    /// Presses so far, and whether the run is over; one lock, so that a press and the end of the
    /// run are seen in one order by both sides.
    state: Arc<Mutex<(u32, bool)>>,
    presses: watch::Receiver<u32>,
    _watcher: AbortOnDropHandle<()>,
}

impl CtrlC {
    /// Starts listening; until then (and without it) Ctrl-C ends the process as usual.
    fn listen() -> Self {
        let (tx, presses) = watch::channel(0u32);
        let state = Arc::new(Mutex::new((0u32, false)));
        let shared = Arc::clone(&state);
        let mut signals =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
        let watcher = tokio::spawn(async move {
            let Some(signals) = &mut signals else {
                return;
            };
            while signals.recv().await.is_some() {
                let n = {
                    let mut state = shared.lock().unwrap_or_else(|e| e.into_inner());
                    state.0 += 1;
                    if state.0 >= 2 || state.1 {
                        exit_interrupted(state.0 >= 2);
                    }
                    state.0
                };
                let _ = tx.send(n);
            }
        });
        Self {
            state,
            presses,
            _watcher: AbortOnDropHandle::new(watcher),
        }
    }

    /// Completes at the first Ctrl-C.
    fn first(&self) -> impl std::future::Future<Output = ()> + 'static {
        let mut presses = self.presses.clone();
        async move {
            if presses.wait_for(|n| *n >= 1).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The run is over (`interrupted`: by Ctrl-C): from now on any Ctrl-C exits at once, and so
    /// does one that came after the run stopped listening.
    fn finishing(&self, interrupted: bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 = true;
        if state.0 > 0 && !interrupted {
            exit_interrupted(false);
        }
    }
}

/// Exits 130 at once (`again`: at a second Ctrl-C), never leaving a map output half-written.
fn exit_interrupted(again: bool) -> ! {
    let _held = client::map::hold_outputs();
    let again = if again { " again" } else { "" };
    eprintln!("\nbatchctl: interrupted{again}; exiting now");
    std::process::exit(i32::from(EXIT_INTERRUPTED));
}

/// The work of a traced command.
enum Work {
    Run(RunArgs),
    Map(MapArgs),
}

/// `run` or `map` inside a `batchctl.run` span when an OTLP endpoint is configured (`OTEL_*`
/// variables); the span is exported before batchctl exits, within a bounded time.
async fn traced(
    endpoints: &Endpoints,
    token: Option<client::Token>,
    work: Work,
) -> Result<u8, Fail> {
    // Listening starts before anything else, so that even a Ctrl-C while connecting ends with a
    // summary; it goes on until batchctl exits, so that a second one is never ignored.
    let ctrl_c = CtrlC::listen();
    let telemetry = ClientTelemetry::from_env().unwrap_or_else(|e| {
        eprintln!("batchctl: tracing off: {e}");
        ClientTelemetry::disabled()
    });
    let mut trace = telemetry.start_run("Process", &endpoints.names());
    let res = match work {
        Work::Run(args) => run(endpoints, args, token, &mut trace, ctrl_c.first()).await,
        Work::Map(args) => map(endpoints, args, token, &mut trace, ctrl_c.first()).await,
    };
    ctrl_c.finishing(matches!(res, Ok(EXIT_INTERRUPTED)));
    let (end, code) = match &res {
        Ok(code) if *code == EXIT_INTERRUPTED => (RunEnd::Cancelled, *code),
        Ok(code) => (RunEnd::Completed, *code),
        Err(fail) => (RunEnd::Error(&fail.message), fail.code),
    };
    trace.end(end, code);
    if let Err(e) = telemetry.shutdown().await {
        eprintln!("batchctl: the trace was not exported: {e}");
    }
    res
}

/// What a failed call or input means for the exit code, with the names of what was being read
/// and written put into the message.
struct Names {
    input: String,
    output: String,
    joblog: String,
}

impl Names {
    fn fail(&self, e: ClientError) -> Fail {
        match e {
            e @ ClientError::NoReplica { .. } => {
                let mut fail = Fail::from(e);
                if !self.joblog.is_empty() {
                    fail.message.push_str(&format!(
                        "; the job log {} has what finished: run again with --resume to finish",
                        self.joblog
                    ));
                }
                fail
            }
            ClientError::Input(e) => {
                Fail::io(EXIT_INPUT, format!("cannot read {}", self.input), &e)
            }
            ClientError::Output(e) => {
                Fail::io(EXIT_NOT_OK, format!("cannot write {}", self.output), &e)
            }
            ClientError::JobLog(e) => Fail::io(EXIT_NOT_OK, format!("job log {}", self.joblog), &e),
            e => Fail::from(e),
        }
    }
}

impl CallArgs {
    fn options(&self, trace: &RunTrace, token: Option<client::Token>) -> CallOptions {
        CallOptions {
            batch_size: self.batch_size as usize,
            max_message: self.max_message.as_usize(),
            max_in_flight: self.max_in_flight as usize,
            max_in_flight_bytes: self.max_in_flight_bytes.as_usize(),
            retry: self.retry,
            strict: self.strict,
            deadline: self.deadline,
            trace: Some(trace.headers().clone()),
            token,
            reconnect_timeout: self.reconnect_timeout,
            resolve_every: self.resolve_every,
            ..CallOptions::default()
        }
    }

    /// The ids the job log records as ok, with `--resume`.
    async fn skip(&self, joblog_name: &str) -> Result<HashSet<String>, Fail> {
        match (&self.joblog, self.resume) {
            (Some(path), true) => match tokio::fs::read_to_string(path).await {
                Ok(text) => Ok(client::ok_ids(&text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
                Err(e) => Err(Fail::io(
                    EXIT_INPUT,
                    format!("cannot read job log {joblog_name}"),
                    &e,
                )),
            },
            _ => Ok(HashSet::new()),
        }
    }

    /// The job log, opened for appending.
    async fn open_joblog(&self, joblog_name: &str) -> Result<Option<tokio::fs::File>, Fail> {
        let Some(path) = &self.joblog else {
            return Ok(None);
        };
        tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map(Some)
            .map_err(|e| {
                Fail::io(
                    EXIT_NOT_OK,
                    format!("cannot open job log {joblog_name}"),
                    &e,
                )
            })
    }

    fn progress(&self) -> Progress {
        Progress::new(!self.quiet && std::io::stderr().is_terminal())
    }
}

async fn run(
    endpoints: &Endpoints,
    args: RunArgs,
    token: Option<client::Token>,
    trace: &mut RunTrace,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<u8, Fail> {
    let file = args.file.clone().filter(|p| p.as_os_str() != "-");
    let names = Names {
        input: name(file.as_deref(), "stdin"),
        output: name(args.output.as_deref(), "stdout"),
        joblog: name(args.call.joblog.as_deref(), ""),
    };
    let opts = RunOptions {
        ordered: args.ordered,
        defaults: LineDefaults {
            handler: args.handler,
            timeout_ms: args.call.timeout_ms,
            batch: args.call.batch.clone(),
        },
        skip: args.call.skip(&names.joblog).await?,
        ..RunOptions::with_call(args.call.options(trace, token))
    };
    let input: Box<dyn AsyncRead + Unpin + Send> = match &file {
        Some(path) => Box::new(
            tokio::fs::File::open(path)
                .await
                .map_err(|e| Fail::io(EXIT_INPUT, format!("cannot read {}", names.input), &e))?,
        ),
        None => Box::new(tokio::io::stdin()),
    };
    let output: Box<dyn AsyncWrite + Unpin + Send> =
        match &args.output {
            Some(path) => Box::new(tokio::fs::File::create(path).await.map_err(|e| {
                Fail::io(EXIT_NOT_OK, format!("cannot write {}", names.output), &e)
            })?),
            None => Box::new(tokio::io::stdout()),
        };
    let joblog = args.call.open_joblog(&names.joblog).await?;

    let progress = args.call.progress();
    // The total is known for files: count their lines off the runtime while the jobs run.
    let _counter = file.clone().map(|path| {
        let total = progress.total();
        AbortOnDropHandle::new(tokio::task::spawn_blocking(move || {
            if let Ok(n) = count_lines(&path) {
                total.store(n, Ordering::Relaxed);
            }
        }))
    });
    let (summary, res) = client::run(
        endpoints, input, output, joblog, &opts, &progress, interrupt,
    )
    .await;
    finish(trace, &summary, res.map_err(|e| names.fail(e)))
}

async fn map(
    endpoints: &Endpoints,
    args: MapArgs,
    token: Option<client::Token>,
    trace: &mut RunTrace,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<u8, Fail> {
    let names = Names {
        input: "the list of paths".into(),
        output: if args.out.is_some() {
            "an output".into()
        } else {
            "stdout".into()
        },
        joblog: name(args.call.joblog.as_deref(), ""),
    };
    let opts = MapOptions {
        call: args.call.options(trace, token),
        handler: args.handler,
        params: args.params,
        out: args.out,
        skip_existing: args.skip_existing,
        ordered: args.ordered,
        timeout: args.call.timeout_ms.map(Duration::from_millis),
        batch: args.call.batch.clone(),
        skip: args.call.skip(&names.joblog).await?,
    };
    let reads_list = args.paths.is_empty() || args.paths.iter().any(|p| p.as_os_str() == "-");
    let inputs = MapInputs {
        list: reads_list.then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
        paths: args.paths,
        null: args.null,
        recursive: args.recursive,
        follow: args.follow,
    };
    let joblog = args.call.open_joblog(&names.joblog).await?;

    let progress = args.call.progress();
    // The total is known for named paths: count them (walking directories) off the runtime.
    let counting = MapInputs {
        paths: inputs.paths.clone(),
        list: None,
        null: false,
        recursive: inputs.recursive,
        follow: inputs.follow,
    };
    let total = progress.total();
    let _counter = (!reads_list && progress.is_drawn()).then(|| {
        AbortOnDropHandle::new(tokio::task::spawn_blocking(move || {
            if let Some(n) = client::map::count_inputs(&counting) {
                total.store(n, Ordering::Relaxed);
            }
        }))
    });
    let (summary, res) = client::map(
        endpoints,
        inputs,
        tokio::io::stdout(),
        joblog,
        &opts,
        &progress,
        interrupt,
    )
    .await;
    finish(trace, &summary, res.map_err(|e| names.fail(e)))
}

/// Records the run, prints its summary and turns it into the exit code. A run that never reached
/// a daemon says only that.
fn finish(trace: &mut RunTrace, summary: &Summary, res: Result<(), Fail>) -> Result<u8, Fail> {
    trace.record(summary);
    let never_connected = matches!(&res, Err(f) if f.code == EXIT_UNREACHABLE) && summary.sent == 0;
    if !never_connected {
        eprintln!("batchctl: {}", summary.line());
    }
    res?;
    Ok(code_of(summary))
}

/// A duration above zero (`--resolve-every`).
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be above zero".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `KEY=VALUE` of `--param`, the value a template.
fn parse_param(s: &str) -> Result<(String, Template), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    let value = Template::parse(value).map_err(|e| e.to_string())?;
    Ok((key.to_owned(), value))
}

/// `--out`: a template with at least one replacement string (else every file writes one output).
fn parse_out(s: &str) -> Result<Template, String> {
    let t = Template::parse(s).map_err(|e| e.to_string())?;
    if !t.varies() {
        return Err(format!(
            "{s:?} has no replacement string ({{}}, {{/.}}, …): every file would write the same output"
        ));
    }
    Ok(t)
}

/// `--max-message`: a size between 1KiB and 4GiB, the bounds of the daemon's `max_message_size`.
fn parse_max_message(s: &str) -> Result<ByteSize, String> {
    let size = ByteSize::parse(s)?;
    if size < ByteSize(1024) || size.0 > u64::from(u32::MAX) {
        return Err(format!("{s:?} is not between 1KiB and 4GiB"));
    }
    Ok(size)
}

fn code_of(s: &Summary) -> u8 {
    if s.interrupted {
        EXIT_INTERRUPTED
    } else if s.bad_inputs() > 0 {
        EXIT_INPUT
    } else if s.all_ok() {
        EXIT_OK
    } else {
        EXIT_NOT_OK
    }
}

fn count_lines(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut n, mut last) = (0u64, b'\n');
    loop {
        let read = f.read(&mut buf)?;
        if read == 0 {
            break;
        }
        n += buf[..read].iter().filter(|b| **b == b'\n').count() as u64;
        last = buf[read - 1];
    }
    Ok(n + u64::from(last != b'\n'))
}

/// The first replica that answers (in the order the endpoints name them).
async fn first_channel(endpoints: &Endpoints) -> Result<tonic::transport::Channel, ClientError> {
    let mut last = None;
    for (_, channel) in endpoints.channels().await {
        match channel {
            Ok(channel) => return Ok(channel),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Unreachable {
        endpoint: endpoints.names(),
        reason: "no replica".into(),
    }))
}

async fn handlers(endpoints: &Endpoints, token: Option<client::Token>) -> Result<u8, Fail> {
    let mut client = BatchServiceClient::new(first_channel(endpoints).await?);
    let mut request = tonic::Request::new(batchd::proto::ListHandlersRequest {});
    if let Some(token) = token {
        token.insert_into(request.metadata_mut());
    }
    let list = client
        .list_handlers(request)
        .await
        .map_err(|status| endpoints.explain(ClientError::from_status(status)))?
        .into_inner();
    let width = list
        .handlers
        .iter()
        .map(|h| h.name.len())
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for h in list.handlers {
        text.push_str(&format!("{:width$}  {}\n", h.name, h.description));
    }
    print(text.as_bytes())
}

/// One replica: `SERVING` (exit 0), another status (exit 1), unreachable (exit 3). Several:
/// a `NAME STATUS` line each, exit 0 when every one serves, 3 when none answers, else 1.
async fn health(endpoints: &Endpoints) -> Result<u8, Fail> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let channels = endpoints.channels().await;
    let (total, several) = (channels.len(), channels.len() > 1);
    let (mut serving, mut answered, mut text) = (0, 0, String::new());
    let mut unreachable = None;
    for (name, channel) in channels {
        let asked = match channel {
            Ok(channel) => HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|status| endpoints.explain(ClientError::from_status(status))),
            Err(e) => Err(e),
        };
        let status = match asked {
            Ok(r) => {
                answered += 1;
                r.into_inner().status()
            }
            Err(e) if !several => return Err(Fail::from(e)),
            Err(e) => {
                text.push_str(&format!("{name} UNREACHABLE {e}\n"));
                unreachable = Some(e);
                continue;
            }
        };
        serving += usize::from(status == ServingStatus::Serving);
        match several {
            true => text.push_str(&format!("{name} {}\n", status.as_str_name())),
            false => text.push_str(&format!("{}\n", status.as_str_name())),
        }
    }
    print(text.as_bytes())?;
    match (answered, unreachable) {
        (0, Some(e)) => Err(Fail::from(e)),
        _ if serving == total && total > 0 => Ok(EXIT_OK),
        _ => Ok(EXIT_NOT_OK),
    }
}
