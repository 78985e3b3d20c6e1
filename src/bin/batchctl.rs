//! batchctl: run JSON Lines job files through a batchd daemon, and query it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use batchd::client::{self, ClientError, LineDefaults, Progress, RunOptions, Summary};
use batchd::telemetry::{ClientTelemetry, RunEnd, RunTrace};
use batchd::units::ByteSize;
use clap::{CommandFactory, Parser, Subcommand};
use std::io::IsTerminal;
use tokio::io::{AsyncRead, AsyncWrite};

/// Every job ended ok.
const EXIT_OK: u8 = 0;
/// Some job did not end ok, or the call failed.
const EXIT_NOT_OK: u8 = 1;
/// Usage or input error.
const EXIT_INPUT: u8 = 2;
/// The daemon cannot be reached.
const EXIT_UNREACHABLE: u8 = 3;
/// Interrupted by Ctrl-C.
const EXIT_INTERRUPTED: u8 = 130;

/// Run batches of jobs on a batchd daemon: JSON Lines in, results out.
#[derive(Debug, Parser)]
#[command(name = "batchctl", version, max_term_width = 100)]
struct Cli {
    /// The daemon's address
    #[arg(long, global = true, env = "BATCHD_ENDPOINT", default_value = client::DEFAULT_ENDPOINT)]
    endpoint: String,
    /// File holding the bearer token for a daemon with principals (else $BATCHD_TOKEN, the token)
    #[arg(long, global = true, env = "BATCHD_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the jobs of a JSON Lines file (or stdin) and write their results as JSON Lines
    ///
    /// Each line is a job: {"id": "…", "handler": "…", "payload": "text"} or "payload_b64": "…",
    /// optional "params": {…}, "timeout_ms": N, "batch": "…". A missing id defaults to the line number.
    Run(RunArgs),
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
    /// Jobs per batch sent to the daemon
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Largest request message (e.g. 4MiB): a batch is sent before it would grow past it, and a job
    /// too large to fit alone is a bad line. Keep it at most the daemon's max_message_size
    #[arg(long, value_name = "SIZE", value_parser = parse_max_message,
          default_value_t = ByteSize(client::DEFAULT_MAX_MESSAGE as u64))]
    max_message: ByteSize,
    /// Write results in input order (a bounded reorder buffer)
    #[arg(long)]
    ordered: bool,
    /// Most jobs sent and not yet written out
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,
    /// Handler for lines that do not name one
    #[arg(long)]
    handler: Option<String>,
    /// Timeout for jobs that set none, in milliseconds
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Batch name for lines that do not name one
    #[arg(long, default_value = "")]
    batch: String,
    /// Deadline of the whole run, e.g. 10m; the daemon stops every job when it passes
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
    /// Resend jobs that end failed or timed_out up to N times, with exponential backoff
    #[arg(long, value_name = "N", default_value_t = 0)]
    retry: u32,
    /// Stop at the first bad input line
    #[arg(long)]
    strict: bool,
    /// Append each finished job's id and outcome to FILE
    #[arg(long, value_name = "FILE")]
    joblog: Option<PathBuf>,
    /// Skip jobs the job log records as ok (needs --joblog)
    #[arg(long, requires = "joblog")]
    resume: bool,
    /// No progress line, only the summary
    #[arg(long, short = 'q')]
    quiet: bool,
    /// The bearer token (from --token-file or BATCHD_TOKEN)
    #[arg(skip)]
    token: Option<client::Token>,
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
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => traced_run(&cli.endpoint, RunArgs { token, ..args }).await,
            Command::Handlers => handlers(&cli.endpoint, token).await,
            Command::Health => health(&cli.endpoint).await,
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
            ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
            ClientError::BadEndpoint(..) | ClientError::BadLine(_) | ClientError::Input(_) => {
                EXIT_INPUT
            }
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

/// `run` inside a `batchctl.run` span when an OTLP endpoint is configured (`OTEL_*` variables);
/// the span is exported before batchctl exits, within a bounded time.
async fn traced_run(endpoint: &str, args: RunArgs) -> Result<u8, Fail> {
    let telemetry = ClientTelemetry::from_env().unwrap_or_else(|e| {
        eprintln!("batchctl: tracing off: {e}");
        ClientTelemetry::disabled()
    });
    let mut trace = telemetry.start_run("Process", endpoint);
    let res = run(endpoint, args, &mut trace).await;
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

async fn run(endpoint: &str, args: RunArgs, trace: &mut RunTrace) -> Result<u8, Fail> {
    let file = args.file.clone().filter(|p| p.as_os_str() != "-");
    let input_name = name(file.as_deref(), "stdin");
    let output_name = name(args.output.as_deref(), "stdout");
    let joblog_name = name(args.joblog.as_deref(), "");

    // First Ctrl-C cancels the run; a second one exits at once. Listening starts before anything
    // else, so that even a Ctrl-C while connecting ends with a summary.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = first_tx.send(());
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nbatchctl: interrupted again; exiting now");
                std::process::exit(i32::from(EXIT_INTERRUPTED));
            }
        }
    });
    let res = run_jobs(
        endpoint,
        args,
        file,
        first_rx,
        trace,
        [&input_name, &output_name, &joblog_name],
    )
    .await;
    watcher.abort();
    res.map_err(|e| match e {
        RunFail::Fail(f) => f,
        RunFail::Client(ClientError::Input(e)) => {
            Fail::io(EXIT_INPUT, format!("cannot read {input_name}"), &e)
        }
        RunFail::Client(ClientError::Output(e)) => {
            Fail::io(EXIT_NOT_OK, format!("cannot write {output_name}"), &e)
        }
        RunFail::Client(ClientError::JobLog(e)) => {
            Fail::io(EXIT_NOT_OK, format!("job log {joblog_name}"), &e)
        }
        RunFail::Client(e) => Fail::from(e),
    })
}

/// A failure of `run_jobs`, before the paths are put into the message.
enum RunFail {
    Fail(Fail),
    Client(ClientError),
}

impl From<ClientError> for RunFail {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

async fn run_jobs(
    endpoint: &str,
    args: RunArgs,
    file: Option<PathBuf>,
    interrupted: tokio::sync::oneshot::Receiver<()>,
    trace: &mut RunTrace,
    [input_name, output_name, joblog_name]: [&String; 3],
) -> Result<u8, RunFail> {
    let io = |code, what: String| move |e: std::io::Error| RunFail::Fail(Fail::io(code, what, &e));
    let skip = match (&args.joblog, args.resume) {
        (Some(path), true) => match tokio::fs::read_to_string(path).await {
            Ok(text) => client::ok_ids(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(io(EXIT_INPUT, format!("cannot read job log {joblog_name}"))(e)),
        },
        _ => Default::default(),
    };
    let opts = RunOptions {
        batch_size: args.batch_size as usize,
        max_message: args.max_message.as_usize(),
        max_in_flight: args.max_in_flight as usize,
        ordered: args.ordered,
        retry: args.retry,
        strict: args.strict,
        defaults: LineDefaults {
            handler: args.handler,
            timeout_ms: args.timeout_ms,
            batch: args.batch,
        },
        deadline: args.deadline,
        skip,
        trace: Some(trace.headers().clone()),
        token: args.token,
        ..RunOptions::default()
    };
    let input: Box<dyn AsyncRead + Unpin + Send> = match &file {
        Some(path) => Box::new(
            tokio::fs::File::open(path)
                .await
                .map_err(io(EXIT_INPUT, format!("cannot read {input_name}")))?,
        ),
        None => Box::new(tokio::io::stdin()),
    };
    let output: Box<dyn AsyncWrite + Unpin + Send> = match &args.output {
        Some(path) => Box::new(
            tokio::fs::File::create(path)
                .await
                .map_err(io(EXIT_NOT_OK, format!("cannot write {output_name}")))?,
        ),
        None => Box::new(tokio::io::stdout()),
    };
    let joblog = match &args.joblog {
        Some(path) => Some(
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .map_err(io(
                    EXIT_NOT_OK,
                    format!("cannot open job log {joblog_name}"),
                ))?,
        ),
        None => None,
    };

    let mut progress = Progress::new(!args.quiet && std::io::stderr().is_terminal());
    // The total is known for files: count their lines off the runtime while the jobs run.
    let counter = file.clone().map(|path| {
        let total = progress.total();
        tokio::task::spawn_blocking(move || {
            if let Ok(n) = count_lines(&path) {
                total.store(n, Ordering::Relaxed);
            }
        })
    });
    let interrupt = async {
        if interrupted.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(interrupt);

    let mut client = tokio::select! {
        c = client::connect(endpoint) => c?,
        () = &mut interrupt => {
            eprintln!("batchctl: interrupted before any job was sent");
            return Ok(EXIT_INTERRUPTED);
        }
    };
    let (summary, res) = client::run(
        &mut client,
        input,
        output,
        joblog,
        &opts,
        &mut progress,
        interrupt,
    )
    .await;
    trace.record(&summary);
    drop(progress);
    if let Some(counter) = counter {
        counter.abort();
    }
    eprintln!("batchctl: {}", summary.line());
    res?;
    Ok(code_of(&summary))
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
    } else if s.bad_lines > 0 {
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

async fn handlers(endpoint: &str, token: Option<client::Token>) -> Result<u8, Fail> {
    let mut client = client::connect(endpoint).await?;
    let mut request = tonic::Request::new(batchd::proto::ListHandlersRequest {});
    if let Some(token) = token {
        token.insert_into(request.metadata_mut());
    }
    let list = client
        .list_handlers(request)
        .await
        .map_err(ClientError::from_status)?
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

async fn health(endpoint: &str) -> Result<u8, Fail> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let channel = client::channel(endpoint).await?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(ClientError::from_status)?
        .into_inner()
        .status();
    print(format!("{}\n", status.as_str_name()).as_bytes())?;
    Ok(if status == ServingStatus::Serving {
        EXIT_OK
    } else {
        EXIT_NOT_OK
    })
}
