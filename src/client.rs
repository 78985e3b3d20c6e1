//! The client side, shared by `batchctl`, the tests and Rust users: connect, run job files, map
//! files, query; over one daemon or spread over several replicas, resubmitting what a lost
//! replica left unanswered ([`replicas`]).

pub mod call;
pub mod endpoints;
mod jobline;
mod jsonl;
mod lines;
pub mod map;
mod progress;
mod record;
pub mod replicas;
mod run;
mod template;
mod tls;
mod token;
mod traceparent;

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Code;

pub use call::{
    BadInput, BadKind, CallOptions, DEFAULT_KEEPALIVE, DEFAULT_MAX_IN_FLIGHT_BYTES,
    DEFAULT_MAX_MESSAGE, DEFAULT_RECONNECT_TIMEOUT, DEFAULT_RESOLVE_EVERY,
};
pub use endpoints::{scheme, Endpoints, Target};
pub use jobline::{parse as parse_line, LineDefaults, LineError, LineJob};
pub use jsonl::JsonlSink;
pub use lines::{Line, LineDecoder};
pub use map::{map, MapOptions};
pub use progress::Progress;
pub use record::{ok_ids, outcome_name, LogRecord, ResultRecord};
pub use run::{run, RunOptions, MAX_LINE};
pub use template::{Template, TemplateError};
pub(crate) use tls::{Alert, Transport};
pub use tls::{ClientTls, Remote, TlsSetup};
pub use token::{Token, TokenError};
pub use traceparent::{outgoing_traceparent, TraceHeaders};

use crate::outcome::Outcome;
use crate::proto::batch_service_client::BatchServiceClient;

/// Endpoint used when neither `--endpoint` nor `BATCHD_ENDPOINT` is given.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50051";

/// What went wrong on the client side; each maps to one of batchctl's exit codes.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon cannot be reached.
    #[error("cannot reach the daemon{}: {reason}", at(.endpoint))]
    Unreachable {
        /// The endpoint tried.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The endpoint is not a valid URL, or its TLS flags do not fit it.
    #[error("bad endpoint {0:?}: {1}")]
    BadEndpoint(String, String),
    /// A TLS file (`--tls-ca`, `--tls-cert`, `--tls-key`) cannot be read or used.
    #[error("{0}")]
    Tls(String),
    /// The TLS handshake failed over a certificate: the daemon's, or the one it asked for.
    #[error("{reason}{}", at_daemon(.endpoint))]
    Certificate {
        /// The endpoint tried (empty when a call failed later).
        endpoint: String,
        /// What is wrong, starting with "certificate: ".
        reason: String,
    },
    /// Every replica was lost and none came back in time (`--reconnect-timeout`, `--deadline`).
    #[error("no replica of {endpoints} reachable for {:.1}s ({reasons})", .waited.as_secs_f64())]
    NoReplica {
        /// The endpoints, as given.
        endpoints: String,
        /// How long the run waited for one.
        waited: Duration,
        /// The last error of each replica.
        reasons: String,
    },
    /// The call ended with an error status.
    #[error("the call failed: {}: {}", .0.code(), .0.message())]
    Call(tonic::Status),
    /// A bad input (a line that is not a job, a file that cannot be read or sent) under `--strict`.
    #[error("{0} (stopping: --strict)")]
    Bad(BadInput),
    /// The input could not be read.
    #[error("cannot read the input: {0}")]
    Input(std::io::Error),
    /// The output could not be written.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    /// The job log could not be read or written.
    #[error("job log: {0}")]
    JobLog(std::io::Error),
}

/// Counts of a run, for the progress line, the summary and the exit code.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    /// Jobs sent (retries not counted).
    pub sent: u64,
    /// Jobs with a final result.
    pub done: u64,
    /// Final results by outcome, in [`Outcome::ALL`] order.
    pub outcomes: [u64; 5],
    /// Input lines that were not jobs.
    pub bad_lines: u64,
    /// Files that could not be read.
    pub unreadable: u64,
    /// Files too large to send or for the daemon.
    pub too_large: u64,
    /// Files whose output (or id) another input of the run already had.
    pub duplicates: u64,
    /// Jobs skipped by `--resume` or `--skip-existing`.
    pub skipped: u64,
    /// Retries sent.
    pub retried: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Stopped by Ctrl-C.
    pub interrupted: bool,
    /// Most payload bytes held at once (taken from the input, not answered yet).
    pub peak_bytes: u64,
    /// Jobs sent again to another replica because theirs was lost or gave them back (each time
    /// counts); at least once, such a job may have run twice.
    pub resubmitted: u64,
    /// Results dropped because their job already had one (or was no longer on that call).
    pub duplicates_dropped: u64,
    /// Times a replica was lost (its call failed, its connection closed, or it drained).
    pub replicas_lost: u64,
    /// Replicas with a live call, when last counted.
    pub replicas_live: u64,
    /// Replicas known (addresses of every endpoint), when last counted.
    pub replicas_known: u64,
}

// === impl ClientError ===

impl ClientError {
    /// Classifies a failed call: transport failures mean the daemon cannot be reached.
    pub fn from_status(status: tonic::Status) -> Self {
        // A daemon that refuses a client certificate says so after the TLS 1.3 handshake is done
        // on the client's side: the first call fails, not the connection.
        // A replica's certificate failure ends a run with a status that says so.
        let said = status
            .message()
            .starts_with("certificate: ")
            .then(|| status.message().to_owned());
        if let Some(reason) = said.or_else(|| tls::certificate_problem(&source_chain(&status))) {
            return Self::Certificate {
                endpoint: String::new(),
                reason,
            };
        }
        if status.code() == Code::Unavailable
            && (status.message().contains("connect")
                || status.message().starts_with(tls::SPEAKS_TLS))
        {
            Self::Unreachable {
                endpoint: String::new(),
                reason: status.message().to_owned(),
            }
        } else {
            Self::Call(status)
        }
    }
}

// === impl Summary ===

impl Summary {
    fn record(&mut self, outcome: i32) {
        self.done += 1;
        // A result with no outcome the client knows counts with the rejected ones.
        let o = Outcome::from_proto(outcome).unwrap_or(Outcome::Rejected);
        self.outcomes[o.index()] += 1;
    }

    fn count_bad(&mut self, kind: BadKind) {
        let n = match kind {
            BadKind::Line => &mut self.bad_lines,
            BadKind::Unreadable => &mut self.unreadable,
            BadKind::TooLarge => &mut self.too_large,
            BadKind::Duplicate => &mut self.duplicates,
        };
        *n += 1;
    }

    /// Inputs that were reported and not sent: bad lines, unreadable, too large, duplicates.
    pub fn bad_inputs(&self) -> u64 {
        self.bad_lines + self.unreadable + self.too_large + self.duplicates
    }

    /// Jobs that ended ok.
    pub fn ok(&self) -> u64 {
        self.outcomes[Outcome::Ok.index()]
    }

    /// Whether every job sent ended ok and every input was a job.
    pub fn all_ok(&self) -> bool {
        self.ok() == self.sent
            && self.done == self.sent
            && self.bad_inputs() == 0
            && !self.interrupted
    }

    /// `12 ok, 1 failed, …`: the non-zero counts per outcome.
    pub fn counts(&self) -> String {
        let mut parts: Vec<String> = Outcome::ALL
            .iter()
            .zip(self.outcomes)
            .filter(|(o, c)| *c > 0 || **o == Outcome::Ok)
            .map(|(o, c)| format!("{c} {}", o.as_str().replace('_', " ")))
            .collect();
        if self.bad_lines > 0 {
            parts.push(plural(self.bad_lines, "bad line"));
        }
        if self.unreadable > 0 {
            parts.push(format!("{} unreadable", self.unreadable));
        }
        if self.too_large > 0 {
            parts.push(format!("{} too large", self.too_large));
        }
        if self.duplicates > 0 {
            parts.push(plural(self.duplicates, "duplicate"));
        }
        if self.skipped > 0 {
            parts.push(format!("{} skipped", self.skipped));
        }
        if self.retried > 0 {
            parts.push(plural(self.retried, "retry"));
        }
        if self.resubmitted > 0 {
            parts.push(format!("{} resubmitted", self.resubmitted));
        }
        if self.duplicates_dropped > 0 {
            parts.push(plural(self.duplicates_dropped, "duplicate result") + " dropped");
        }
        if self.replicas_known > 1 || self.replicas_lost > 0 {
            parts.push(format!(
                "replicas {}/{} live, {} lost",
                self.replicas_live, self.replicas_known, self.replicas_lost
            ));
        }
        parts.join(", ")
    }

    /// The one-line summary printed at the end of a run.
    pub fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.done as f64 / secs
        } else {
            0.0
        };
        let unfinished = self.sent.saturating_sub(self.done);
        let stopped = match (self.interrupted, unfinished) {
            (true, 0) => " (interrupted)".to_owned(),
            (true, n) => format!(
                " (interrupted; {} sent had no result and {} cancelled)",
                plural(n, "job"),
                if n == 1 { "was" } else { "were" }
            ),
            (false, 0) => String::new(),
            (false, n) => format!(" ({} sent had no result)", plural(n, "job")),
        };
        format!(
            "{} in {secs:.2}s ({rate:.0}/s){stopped}: {}",
            plural(self.done, "job"),
            self.counts()
        )
    }
}

/// Connects to `endpoint` (e.g. `http://127.0.0.1:50051`), failing fast when nobody listens.
pub async fn connect(endpoint: &str) -> Result<BatchServiceClient<Channel>, ClientError> {
    connect_to(&Remote::new(endpoint)).await
}

/// Connects to `remote` (plaintext or TLS), failing fast when nobody listens.
pub async fn connect_to(remote: &Remote) -> Result<BatchServiceClient<Channel>, ClientError> {
    let channel = channel_to(remote).await?;
    Ok(BatchServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// A connected channel to `endpoint`, for the service, health and reflection clients.
pub async fn channel(endpoint: &str) -> Result<Channel, ClientError> {
    channel_to(&Remote::new(endpoint)).await
}

/// A connected channel to `remote` (plaintext or TLS).
pub async fn channel_to(remote: &Remote) -> Result<Channel, ClientError> {
    let transport = remote.transport()?.map(settings);
    transport
        .connect()
        .await
        .map_err(|e| connection_error(&remote.endpoint, remote.is_tls(), &e))
}

/// What a failed connection attempt to `endpoint` says: a certificate refused, or the daemon
/// unreachable (with a hint when a TLS attempt met plaintext).
pub(crate) fn connection_error(
    endpoint: &str,
    tls: bool,
    e: &dyn std::error::Error,
) -> ClientError {
    let reason = source_chain(e);
    match tls::certificate_problem(&reason) {
        Some(reason) => ClientError::Certificate {
            endpoint: endpoint.to_owned(),
            reason,
        },
        None => ClientError::Unreachable {
            endpoint: endpoint.to_owned(),
            reason: match tls && reset_or_eof(&reason) {
                true => format!("{reason} (is TLS on at the daemon? if not, use http://)"),
                false => reason,
            },
        },
    }
}

/// The settings of every connection to a daemon (timeouts, no Nagle).
fn settings(ep: Endpoint) -> Endpoint {
    ep.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true)
}

/// How every connection to a daemon at `uri` is made: the one place, shared by [`channel`], the
/// endpoints' one-shot channels and the replicas of a run. `uri` is `http://` or `https://` (TLS
/// through `tls`, else the system's CAs); `origin` (`SCHEME://NAME:PORT`) is what the calls name
/// when `uri` is one address of a `dns:///` name: their `:authority`, and the name the daemon's
/// certificate must have (unless `--tls-server-name` says otherwise). What its connections read
/// that explains a failure is left in `alert`.
pub(crate) fn transport(
    uri: &str,
    origin: Option<&str>,
    tls: Option<&TlsSetup>,
    alert: &Alert,
) -> Result<Transport, ClientError> {
    Ok(Transport::new(uri, origin, tls, alert)?.map(settings))
}

/// Whether a TLS connection attempt ended with the peer closing or resetting it, or answering
/// with something other than TLS.
fn reset_or_eof(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    ["connection reset", "eof", "corrupt message"]
        .iter()
        .any(|s| reason.contains(s))
}

/// ` at ENDPOINT`, or nothing when the endpoint is not known.
fn at(endpoint: &str) -> String {
    if endpoint.is_empty() {
        String::new()
    } else {
        format!(" at {endpoint}")
    }
}

/// ` (daemon at ENDPOINT)`, or nothing when the endpoint is not known.
fn at_daemon(endpoint: &str) -> String {
    if endpoint.is_empty() {
        String::new()
    } else {
        format!(" (daemon at {endpoint})")
    }
}

/// `1 job`, `2 jobs`, `3 retries`.
fn plural(n: u64, noun: &str) -> String {
    match (n, noun.strip_suffix('y')) {
        (1, _) => format!("1 {noun}"),
        (_, Some(stem)) => format!("{n} {stem}ies"),
        (_, None) => format!("{n} {noun}s"),
    }
}

/// The error and its sources, joined, since tonic's transport errors hide the cause; a source that
/// only repeats what is already said is left out.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals() {
        assert_eq!(plural(1, "job"), "1 job");
        assert_eq!(plural(0, "job"), "0 jobs");
        assert_eq!(plural(2, "retry"), "2 retries");
        assert_eq!(plural(3, "bad line"), "3 bad lines");
    }
}
