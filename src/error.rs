//! The library's errors and the one place that maps them to gRPC status codes.

use tonic::{Code, Status};

/// Why a call (not a single job) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon already runs `max_calls` calls.
    #[error("too many concurrent calls (max_calls is {limit}); retry later")]
    TooManyCalls {
        /// The configured limit.
        limit: usize,
    },
    /// Principals are configured and the call did not prove it is one of them.
    #[error("{0}")]
    Unauthenticated(String),
    /// The call's principal already has its `max_calls` calls open.
    #[error(
        "principal {principal:?} already has {limit} calls open (its max_calls quota); retry later"
    )]
    PrincipalMaxCalls {
        /// The principal.
        principal: String,
        /// Its quota.
        limit: usize,
    },
    /// The daemon is shutting down and accepts no new work.
    #[error("batchd is shutting down; jobs without a result were not run")]
    ShuttingDown,
    /// The call's deadline (grpc-timeout) passed.
    #[error("the call's deadline passed; its unfinished jobs were stopped")]
    DeadlineExceeded,
    /// A request message broke the contract.
    #[error("{0}")]
    InvalidArgument(String),
    /// A request message was larger than the daemon accepts.
    #[error("{0}")]
    MessageTooLarge(String),
    /// The request stream failed (decode error, reset); its status is passed on.
    #[error("request stream failed: {0}")]
    Inbound(Status),
    /// Serving failed (bind, transport).
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptor set.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A call's session ended without saying how (a bug in batchd, e.g. a panic).
    #[error("the call's session ended unexpectedly; jobs without a result were stopped")]
    Abandoned,
    /// An I/O error at start-up.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS files cannot be used (at start-up; the message names the config field).
    #[error("TLS: {0}")]
    Tls(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::TooManyCalls { .. }
            | Error::PrincipalMaxCalls { .. }
            | Error::MessageTooLarge(_) => Code::ResourceExhausted,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::ShuttingDown => Code::Unavailable,
            Error::DeadlineExceeded => Code::DeadlineExceeded,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Inbound(status) => return status.clone(),
            Error::Abandoned
            | Error::Transport(_)
            | Error::Reflection(_)
            | Error::Io(_)
            | Error::Tls(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<Status> for Error {
    /// Classifies a failed request stream: tonic reports an over-size message as OUT_OF_RANGE, gRPC
    /// clients expect RESOURCE_EXHAUSTED.
    fn from(status: Status) -> Self {
        if status.code() == Code::OutOfRange && status.message().contains("too large") {
            Error::MessageTooLarge(status.message().to_owned())
        } else {
            Error::Inbound(status)
        }
    }
}
