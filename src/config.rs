//! Typed configuration: embedded defaults < TOML file < `BATCHD_*` environment < command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::auth::{PrincipalError, PrincipalSpec};
pub use crate::handlers::exec::{ExecSpec, SpecError};
use crate::units;
pub use crate::units::ByteSize;

/// Prefix of the environment variables that set config fields (`BATCHD_WORKERS=8`).
pub const ENV_PREFIX: &str = "BATCHD_";

/// Longest value of a duration field: one (Julian) year, written `1year`.
///
/// Timeouts and graces are added to `Instant`s and to other durations, which panics on overflow;
/// a year is far from that and far beyond any useful wait. (Exec handlers' `timeout` is capped by
/// `max_job_timeout`, their `kill_grace` by [`crate::handlers::exec::MAX_KILL_GRACE`].)
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// Default port of the gRPC listener: gRPC's customary one.
pub const DEFAULT_GRPC_PORT: u16 = 50051;

/// Default port of the admin HTTP listener (`/metrics`, `/healthz`, `/readyz`): next to the gRPC
/// port, and outside 9090-9999, the range Prometheus gave out (9090 is Prometheus itself) and has
/// no free port left in, and outside other well-known ports.
pub const DEFAULT_ADMIN_PORT: u16 = 50052;

/// Shortest `stall_timeout`: the health probe takes a turn every quarter of it, at most every 10 ms.
pub const MIN_STALL_TIMEOUT: Duration = Duration::from_millis(100);

/// Most `workers`, `session_window`, `max_calls` and `max_jobs_per_batch`: 2^20.
///
/// Far beyond what one process runs or buffers at once, and it keeps the engine's arithmetic exact:
/// a session's per-handler gauge deltas are `i32` (a session holds at most `session_window` jobs,
/// a batch at most `max_jobs_per_batch`), and semaphores take at most `Semaphore::MAX_PERMITS`.
pub const MAX_COUNT: usize = 1 << 20;

/// Most `cpu_workers`: the size of tokio's blocking thread pool, which CPU work runs on (more could
/// not run at once; `Semaphore::new` would panic beyond `Semaphore::MAX_PERMITS`).
pub const MAX_CPU_WORKERS: usize = 512;

/// Every setting of the daemon; `Config::default()` is what runs with no file, env or flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Jobs running at once, across all calls (at most [`MAX_COUNT`]).
    pub workers: usize,
    /// Of `workers`, the slots that only calls running no job may take, so that a small call starts
    /// at once while a bulk call holds every other slot; unset means `workers / 64` (less than
    /// `workers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved_workers: Option<usize>,
    /// CPU-bound pieces of work running at once; 0 means the number of cores (at most
    /// [`MAX_CPU_WORKERS`]).
    pub cpu_workers: usize,
    /// Admitted jobs per call whose result is not sent yet; beyond it the call's stream is not read
    /// (at most [`MAX_COUNT`]).
    pub session_window: usize,
    /// Bytes per call held in admitted jobs (payload, id, params) and in results not sent yet;
    /// beyond it the call's stream is not read (a call holding nothing always takes one more job).
    pub session_bytes: ByteSize,
    /// Calls open at once; more are refused with RESOURCE_EXHAUSTED (at most [`MAX_COUNT`]).
    pub max_calls: usize,
    /// Bytes held across all calls in jobs read and results not sent yet; once reached, calls stop
    /// being read until it frees (a call holding nothing still reads; README "Memory budget").
    pub memory_budget: ByteSize,
    /// Largest request message accepted; larger ends the call with RESOURCE_EXHAUSTED.
    pub max_message_size: ByteSize,
    /// Most jobs in one batch; more ends the call with INVALID_ARGUMENT (at most [`MAX_COUNT`]).
    pub max_jobs_per_batch: usize,
    /// Largest job payload; larger makes the job REJECTED.
    pub max_payload: ByteSize,
    /// Largest job output; larger makes the job FAILED (under 4 GiB).
    pub max_output: ByteSize,
    /// Timeout of a job that sets none.
    #[serde(with = "units::duration")]
    pub default_job_timeout: Duration,
    /// Cap on a job's own timeout.
    #[serde(with = "units::duration")]
    pub max_job_timeout: Duration,
    /// HTTP/2 streams (calls) per client connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow-control window of one call: request bytes buffered before the client must wait.
    pub http2_stream_window: ByteSize,
    /// HTTP/2 flow-control window of one connection, shared by its calls.
    pub http2_connection_window: ByteSize,
    /// Interval of HTTP/2 keepalive pings that catch vanished peers; 0s turns them off.
    #[serde(with = "units::duration")]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[serde(with = "units::duration")]
    pub keepalive_timeout: Duration,
    /// How long shutdown lets running jobs finish before it cancels them.
    #[serde(with = "units::duration")]
    pub shutdown_grace: Duration,
    /// How long the engine may go without progress (a worker slot granted and not taken, the
    /// health probe not run) before it counts as wedged: `/healthz` fails, systemd's watchdog
    /// pings stop.
    #[serde(with = "units::duration")]
    pub stall_timeout: Duration,
    /// Log format: `text` or `json`.
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax, e.g. `info` or `batchd=debug,info`.
    pub log: String,
    /// Address of the admin HTTP listener: `/metrics`, `/healthz`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// OTLP/gRPC endpoint spans are exported to, e.g. `http://127.0.0.1:4317`; empty: the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` variable decides, and with neither, tracing is off.
    pub otlp_endpoint: String,
    /// Also push the counters and gauges over OTLP/gRPC to the same endpoint (every
    /// `OTEL_METRIC_EXPORT_INTERVAL`, 60 s by default); only while traces are exported.
    pub otlp_metrics: bool,
    /// How long exporting a batch of spans, and flushing them at exit, may take.
    #[serde(with = "units::duration")]
    pub trace_flush_timeout: Duration,
    /// PEM certificate chain the daemon serves TLS with (with `tls_key`; empty: plaintext). Read
    /// again on SIGHUP and when the file changes.
    pub tls_cert: PathBuf,
    /// PEM private key of `tls_cert`.
    pub tls_key: PathBuf,
    /// PEM file of one or more CA certificates: clients must present a certificate one of them
    /// signed (mTLS). Empty: no client certificate is asked for. Needs `tls_cert`.
    pub tls_client_ca: PathBuf,
    /// How long a new connection has to finish its TLS handshake and send the HTTP/2 preface;
    /// then it is closed (a slowloris does not hold a connection slot).
    #[serde(with = "units::duration")]
    pub handshake_timeout: Duration,
    /// Client connections open at once, handshakes included; beyond it new connections wait in
    /// the listen backlog until one closes (at most [`MAX_COUNT`]).
    pub max_connections: usize,
    /// Client connections open at once from one IP address; more from it are closed at once
    /// (at most [`MAX_COUNT`]).
    pub max_connections_per_peer: usize,
    /// Largest HTTP/2 header list (a call's metadata) accepted; a larger one is refused by the
    /// HTTP/2 layer before it is decoded in full.
    pub http2_max_header_list_size: ByteSize,
    /// Serve gRPC reflection without credentials even when principals are configured.
    pub reflection_open: bool,
    /// Exec handlers: commands run once per job (`[[exec]]` tables in the file; none by default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exec: Vec<ExecSpec>,
    /// Principals: who may call, with which handlers, quotas and share of the pool (`[[principal]]`
    /// tables in the file; none by default: every call is anonymous).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principal: Vec<PrincipalSpec>,
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The daemon's command-line flags; each overrides the file and the environment.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Flags {
    /// TOML config file (see deploy/batchd.toml)
    #[arg(long, short = 'c', value_name = "FILE", env = "BATCHD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Jobs running at once across all calls [default: 256]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Log format [default: text]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz) [default: 127.0.0.1:50052]
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Any other config field, e.g. --set session_window=4096 (repeatable)
    #[arg(long = "set", short = 's', value_name = "FIELD=VALUE")]
    pub set: Vec<String>,
}

/// A configuration that cannot be used; the message names the field and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A value could not be parsed.
    #[error("invalid config in {origin}: {message}")]
    Parse {
        /// File, variable or flag.
        origin: String,
        /// What is wrong, with the field's name.
        message: String,
    },
    /// A field has a value outside its range.
    #[error("invalid config: {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An `[[exec]]` table is invalid; the message names the handler and the field.
    #[error("invalid config: {0}")]
    Exec(#[from] SpecError),
    /// A `[[principal]]` table is invalid; the message names the principal and the field.
    #[error("invalid config: {0}")]
    Principal(#[from] PrincipalError),
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_GRPC_PORT)),
            workers: 256,
            reserved_workers: None,
            cpu_workers: 0,
            session_window: 1024,
            session_bytes: ByteSize::mib(64),
            max_calls: 10_000,
            memory_budget: ByteSize::gib(1),
            max_message_size: ByteSize::mib(16),
            max_jobs_per_batch: 10_000,
            max_payload: ByteSize::mib(8),
            max_output: ByteSize::mib(8),
            default_job_timeout: Duration::from_secs(60),
            max_job_timeout: Duration::from_secs(3600),
            max_concurrent_streams: 1024,
            http2_stream_window: ByteSize(256 * 1024),
            http2_connection_window: ByteSize::mib(1),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10),
            log_format: LogFormat::Text,
            log: "info".into(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_ADMIN_PORT)),
            otlp_endpoint: String::new(),
            otlp_metrics: false,
            trace_flush_timeout: Duration::from_secs(5),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            tls_client_ca: PathBuf::new(),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_connections_per_peer: 1024,
            http2_max_header_list_size: ByteSize(16 * 1024),
            reflection_open: false,
            exec: Vec::new(),
            principal: Vec::new(),
        }
    }
}

impl Config {
    /// Builds the config from the file named by `flags` (if any), `env` and `flags`, then validates it.
    pub fn load<I>(flags: &Flags, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let table = match &flags.config {
            Some(path) => {
                let origin = format!("config file {}", path.display());
                Some((read_file(path)?, origin))
            }
            None => None,
        };
        Self::layered(table, flags, env)
    }

    /// The config of a TOML text alone (no environment, no flags), parsed and validated as
    /// [`Config::load`] does a config file: for checking a file's text, and for fuzzing.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let origin = "config text".to_owned();
        let table = parse_table(text, &origin)?;
        Self::layered(Some((table, origin)), &Flags::default(), std::iter::empty())
    }

    /// The defaults, overlaid with the file's table (with its origin), `env` and `flags`, then
    /// validated.
    fn layered<I>(
        file: Option<(toml::Table, String)>,
        flags: &Flags,
        env: I,
    ) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let (mut table, origin) = file.unwrap_or_else(|| (toml::Table::new(), "defaults".into()));
        check(&table, || origin)?;

        let fields = field_names();
        let mut env: Vec<_> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let field = k.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
                fields.contains(&field).then_some((k, field, v))
            })
            .collect();
        env.sort();
        for (var, field, value) in env {
            table.insert(field, typed(&value));
            check(&table, || format!("environment variable {var}"))?;
        }

        let mut set = Vec::new();
        if let Some(v) = &flags.listen {
            set.push((
                "--listen".to_owned(),
                "listen".to_owned(),
                toml::Value::String(v.clone()),
            ));
        }
        if let Some(v) = &flags.admin_listen {
            set.push((
                "--admin-listen".to_owned(),
                "admin_listen".to_owned(),
                toml::Value::String(v.clone()),
            ));
        }
        if let Some(v) = flags.workers {
            let v = i64::try_from(v).unwrap_or(i64::MAX);
            set.push((
                "--workers".into(),
                "workers".into(),
                toml::Value::Integer(v),
            ));
        }
        if let Some(v) = flags.log_format {
            let v = match v {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            };
            set.push((
                "--log-format".into(),
                "log_format".into(),
                toml::Value::String(v.into()),
            ));
        }
        for kv in &flags.set {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(ConfigError::Parse {
                    origin: format!("--set {kv}"),
                    message: "expected FIELD=VALUE".into(),
                });
            };
            set.push((format!("--set {kv}"), k.trim().to_owned(), typed(v.trim())));
        }
        for (origin, field, value) in set {
            table.insert(field, value);
            check(&table, || origin.clone())?;
        }

        let config = from_table(table).map_err(|message| ConfigError::Parse {
            origin: "config".into(),
            message,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field's range, so a bad value stops the daemon before it binds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        for (field, n) in [
            ("workers", self.workers),
            ("session_window", self.session_window),
            ("max_calls", self.max_calls),
            ("max_jobs_per_batch", self.max_jobs_per_batch),
            ("max_connections", self.max_connections),
            ("max_connections_per_peer", self.max_connections_per_peer),
        ] {
            if n == 0 {
                return invalid(field, "must be at least 1");
            }
            if n > MAX_COUNT {
                return invalid(field, &format!("must be at most {MAX_COUNT}"));
            }
        }
        if self.reserved_workers.is_some_and(|r| r >= self.workers) {
            return invalid(
                "reserved_workers",
                "must be less than workers (the other calls need at least one slot)",
            );
        }
        if self.cpu_workers > MAX_CPU_WORKERS {
            return invalid(
                "cpu_workers",
                &format!(
                    "must be at most {MAX_CPU_WORKERS} (the blocking threads CPU work runs on), \
                     or 0 for the number of cores"
                ),
            );
        }
        if self.max_message_size < ByteSize(1024) || self.max_message_size.0 > u64::from(u32::MAX) {
            return invalid("max_message_size", "must be between 1KiB and 4GiB");
        }
        if self.session_bytes < ByteSize(64 * 1024) {
            return invalid("session_bytes", "must be at least 64KiB");
        }
        if self.memory_budget < ByteSize(64 * 1024) || self.memory_budget.0 > usize::MAX as u64 {
            return invalid("memory_budget", "must be at least 64KiB");
        }
        if self.max_payload > self.max_message_size {
            return invalid("max_payload", "must not be larger than max_message_size");
        }
        // A job's result travels in one gRPC message, whose length prefix is 32 bits.
        if self.max_output.0 > u64::from(u32::MAX) {
            return invalid("max_output", "must be under 4GiB");
        }
        for (field, d) in [
            ("default_job_timeout", self.default_job_timeout),
            ("max_job_timeout", self.max_job_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
            ("shutdown_grace", self.shutdown_grace),
            ("stall_timeout", self.stall_timeout),
            ("trace_flush_timeout", self.trace_flush_timeout),
            ("handshake_timeout", self.handshake_timeout),
        ] {
            if d > MAX_DURATION {
                let max = humantime::format_duration(MAX_DURATION);
                return invalid(field, &format!("must be at most {max}"));
            }
        }
        if self.default_job_timeout.is_zero() {
            return invalid("default_job_timeout", "must be positive");
        }
        if self.max_job_timeout < self.default_job_timeout {
            return invalid(
                "max_job_timeout",
                "must not be shorter than default_job_timeout",
            );
        }
        if self.max_concurrent_streams == 0 {
            return invalid("max_concurrent_streams", "must be at least 1");
        }
        for (field, window) in [
            ("http2_stream_window", self.http2_stream_window),
            ("http2_connection_window", self.http2_connection_window),
        ] {
            // RFC 9113: at least the initial 64 KiB - 1, at most 2^31 - 1.
            if window < ByteSize(65_535) || window.0 > (1 << 31) - 1 {
                return invalid(field, "must be between 65535 and 2147483647 bytes");
            }
        }
        if !self.keepalive_interval.is_zero() && self.keepalive_timeout.is_zero() {
            return invalid(
                "keepalive_timeout",
                "must be positive while keepalive is on",
            );
        }
        if self.stall_timeout < MIN_STALL_TIMEOUT {
            return invalid("stall_timeout", "must be at least 100ms");
        }
        if self.handshake_timeout.is_zero() {
            return invalid("handshake_timeout", "must be positive");
        }
        // RFC 9113 sets no bound; h2 takes a u32, and a header list must hold at least a request's
        // pseudo-headers and gRPC's own (content-type, te, grpc-timeout, traceparent).
        if self.http2_max_header_list_size < ByteSize(1024)
            || self.http2_max_header_list_size.0 > u64::from(u32::MAX)
        {
            return invalid(
                "http2_max_header_list_size",
                "must be between 1KiB and 4GiB",
            );
        }
        self.validate_tls()?;
        if self.trace_flush_timeout.is_zero() {
            return invalid("trace_flush_timeout", "must be positive");
        }
        let endpoint = &self.otlp_endpoint;
        if !(endpoint.is_empty()
            || endpoint.starts_with("http://")
            || endpoint.starts_with("https://"))
        {
            return invalid(
                "otlp_endpoint",
                "must be an http:// or https:// URL, or empty",
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log) {
            return invalid("log", &format!("{:?} is not a log filter: {e}", self.log));
        }
        crate::handlers::exec::validate(&self.exec, self.max_output, self.max_job_timeout)?;
        crate::auth::validate(&self.principal)?;
        Ok(())
    }

    /// Whether the daemon serves TLS (`tls_cert` and `tls_key` are set); plaintext otherwise.
    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert.as_os_str().is_empty()
    }

    /// Whether clients must present a certificate (`tls_client_ca` is set).
    pub fn mtls_enabled(&self) -> bool {
        self.tls_enabled() && !self.tls_client_ca.as_os_str().is_empty()
    }

    /// The TLS fields go together: a certificate with its key, client CAs only with both. (The
    /// files themselves are read by `server::tls` before the daemon binds.)
    fn validate_tls(&self) -> Result<(), ConfigError> {
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        match (set(&self.tls_cert), set(&self.tls_key)) {
            (true, false) => return invalid("tls_key", "must be set with tls_cert"),
            (false, true) => return invalid("tls_cert", "must be set with tls_key"),
            _ => {}
        }
        if set(&self.tls_client_ca) && !set(&self.tls_cert) {
            return invalid(
                "tls_client_ca",
                "needs tls_cert and tls_key (client certificates are asked for over TLS)",
            );
        }
        Ok(())
    }

    /// `reserved_workers`, with unset resolved to `workers / 64`.
    pub fn effective_reserved_workers(&self) -> usize {
        self.reserved_workers.unwrap_or(self.workers / 64)
    }

    /// `cpu_workers`, with 0 resolved to the number of cores (at most [`MAX_CPU_WORKERS`]).
    pub fn effective_cpu_workers(&self) -> usize {
        match self.cpu_workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
        .min(MAX_CPU_WORKERS)
    }
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_table(&text, &format!("config file {}", path.display()))
}

fn parse_table(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
        origin: origin.to_owned(),
        message: e.to_string(),
    })
}

/// Tries the table so far, so that an error is blamed on the layer that caused it.
fn check(table: &toml::Table, origin: impl FnOnce() -> String) -> Result<(), ConfigError> {
    from_table(table.clone())
        .map(drop)
        .map_err(|message| ConfigError::Parse {
            origin: origin(),
            message,
        })
}

fn from_table(table: toml::Table) -> Result<Config, String> {
    let exec = table.get("exec").cloned();
    let principal = table.get("principal").cloned();
    Config::deserialize(toml::Value::Table(table)).map_err(|e| {
        let exec = exec.and_then(|t| table_error::<ExecSpec>(&t, "exec"));
        exec.or_else(|| principal.and_then(|t| table_error::<PrincipalSpec>(&t, "principal")))
            .unwrap_or_else(|| e.to_string().trim().to_owned())
    })
}

/// The first `[[kind]]` table that does not deserialize, as an error naming it: serde's own message
/// names the field but not which of the tables it is in.
fn table_error<T: serde::de::DeserializeOwned>(tables: &toml::Value, kind: &str) -> Option<String> {
    let tables = tables.as_array()?;
    tables.iter().enumerate().find_map(|(i, table)| {
        let e = T::deserialize(table.clone()).err()?;
        let name = match table.get("name").and_then(toml::Value::as_str) {
            Some(name) => format!("{kind} {name:?}"),
            None => format!("{kind} table #{}", i + 1),
        };
        Some(format!("{name}: {}", e.to_string().trim()))
    })
}

/// An environment or flag value as TOML: numbers and booleans typed, anything else a string.
fn typed(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::Integer(_) | toml::Value::Boolean(_) | toml::Value::Float(_)),
            ) => v,
            _ => toml::Value::String(raw.to_owned()),
        },
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

/// The names of every config field, as written in TOML.
fn field_names() -> Vec<String> {
    toml::Table::try_from(Config::default())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
