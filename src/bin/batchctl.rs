//! batchctl: run JSON Lines job files through a batchd daemon, and query it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use batchd::client::{self, ClientError, LineDefaults, Progress, RunOptions, Summary};
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
#[command(name = "batchctl", version, about, max_term_width = 100)]
struct Cli {
    /// The daemon's address
    #[arg(long, global = true, env = "BATCHD_ENDPOINT", default_value = client::DEFAULT_ENDPOINT)]
    endpoint: String,
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
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(&cli.endpoint, args).await,
            Command::Handlers => handlers(&cli.endpoint).await,
            Command::Health => health(&cli.endpoint).await,
            Command::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "batchctl",
                    &mut std::io::stdout(),
                );
                Ok(EXIT_OK)
            }
        }
    });
    // Do not wait for a blocked stdin reader: the work is done.
    runtime.shutdown_background();
    match code {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("batchctl: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
        ClientError::BadEndpoint(..) | ClientError::BadLine(_) | ClientError::Input(_) => {
            EXIT_INPUT
        }
        ClientError::JobLog(_) | ClientError::Output(_) | ClientError::Call(_) => EXIT_NOT_OK,
    }
}

async fn run(endpoint: &str, args: RunArgs) -> Result<u8, ClientError> {
    let skip = match (&args.joblog, args.resume) {
        (Some(path), true) => match tokio::fs::read_to_string(path).await {
            Ok(text) => client::ok_ids(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(ClientError::JobLog(e)),
        },
        _ => Default::default(),
    };
    let opts = RunOptions {
        batch_size: args.batch_size as usize,
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
        ..RunOptions::default()
    };
    let file = args.file.filter(|p| p.as_os_str() != "-");
    let input: Box<dyn AsyncRead + Unpin + Send> = match &file {
        Some(path) => Box::new(
            tokio::fs::File::open(path)
                .await
                .map_err(ClientError::Input)?,
        ),
        None => Box::new(tokio::io::stdin()),
    };
    let output: Box<dyn AsyncWrite + Unpin + Send> = match &args.output {
        Some(path) => Box::new(
            tokio::fs::File::create(path)
                .await
                .map_err(ClientError::Output)?,
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
                .map_err(ClientError::JobLog)?,
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

    let mut client = client::connect(endpoint).await?;
    // First Ctrl-C cancels the call; a second one exits at once.
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
    let interrupt = async {
        if first_rx.await.is_err() {
            std::future::pending::<()>().await;
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
    drop(progress);
    watcher.abort();
    if let Some(counter) = counter {
        counter.abort();
    }
    eprintln!("batchctl: {}", summary.line());
    res?;
    Ok(code_of(&summary))
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

fn count_lines(path: &std::path::Path) -> std::io::Result<u64> {
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

async fn handlers(endpoint: &str) -> Result<u8, ClientError> {
    let mut client = client::connect(endpoint).await?;
    let list = client
        .list_handlers(batchd::proto::ListHandlersRequest {})
        .await
        .map_err(ClientError::from_status)?
        .into_inner();
    let width = list
        .handlers
        .iter()
        .map(|h| h.name.len())
        .max()
        .unwrap_or(0);
    for h in list.handlers {
        println!("{:width$}  {}", h.name, h.description);
    }
    Ok(EXIT_OK)
}

async fn health(endpoint: &str) -> Result<u8, ClientError> {
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
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        EXIT_OK
    } else {
        EXIT_NOT_OK
    })
}
