//! The `BatchService` gRPC service: converts proto ⇄ domain and hands each call to the engine.
//!
//! Its edge, [`Authenticate`], is the interceptor that finds out who a call is (from its bearer token
//! or its client certificate) and puts the typed [`Principal`] in the request: nothing past it reads
//! credentials, and handlers never see headers.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Credentials;
use crate::codec::wire;
use crate::engine::{Command, Engine, GivenBack, JobRequest, JobResult, Principal, ResultStream};
use crate::error::Error;
use crate::proto::{self, batch_service_server::BatchService};
use crate::telemetry::session_trace;

/// The stream of responses of one call.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<wire::ProcessResponse, Status>> + Send>>;

/// Serves `batchd.v1.BatchService` on top of an [`Engine`].
#[derive(Debug, Clone)]
pub struct Service {
    engine: Engine,
}

/// The interceptor in front of `BatchService` (and of reflection): with principals configured, a
/// call without valid credentials gets UNAUTHENTICATED before anything else happens.
#[derive(Debug, Clone)]
pub struct Authenticate {
    engine: Engine,
    /// In front of reflection, which is open when the operator says so (`reflection_open`).
    reflection: bool,
}

/// The principal of an authenticated call, as the interceptor leaves it in the request.
#[derive(Debug, Clone)]
struct Authenticated(Arc<Principal>);

impl Service {
    /// A service running its calls on `engine`.
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }

    /// The call's principal: from the interceptor, or found here if the service runs without it.
    fn principal<T>(&self, request: &Request<T>) -> Result<Arc<Principal>, Status> {
        match request.extensions().get::<Authenticated>() {
            Some(Authenticated(p)) => Ok(Arc::clone(p)),
            None => authenticate(&self.engine, request),
        }
    }
}

impl Authenticate {
    /// The interceptor for `BatchService` calls on `engine`.
    pub fn batch_service(engine: Engine) -> Self {
        Self {
            engine,
            reflection: false,
        }
    }

    /// The interceptor for reflection calls.
    pub fn reflection(engine: Engine) -> Self {
        Self {
            engine,
            reflection: true,
        }
    }
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if self.reflection {
            if self.engine.reflection_needs_credentials() {
                authenticate(&self.engine, &request)?;
            }
            return Ok(request);
        }
        let principal = authenticate(&self.engine, &request)?;
        request.extensions_mut().insert(Authenticated(principal));
        Ok(request)
    }
}

/// The principal a request's credentials prove (its `authorization` metadata, or its client
/// certificate on an mTLS connection), or UNAUTHENTICATED.
fn authenticate<T>(engine: &Engine, request: &Request<T>) -> Result<Arc<Principal>, Status> {
    let certs = request.peer_certs();
    let leaf = certs.as_deref().and_then(|c| c.first()).map(|c| c.as_ref());
    let token = request
        .metadata()
        .get("authorization")
        .map(|v| v.as_bytes());
    engine
        .authenticate(&Credentials::new(token, leaf))
        .map_err(|e| {
            tracing::debug!(peer = ?request.remote_addr(), error = %e, "call refused");
            Status::from(e)
        })
}

#[tonic::async_trait]
impl BatchService for Service {
    type ProcessStream = ResponseStream;
    type RunBatchStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<wire::ProcessRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let principal = self.principal(&request)?;
        let trace = session_trace("Process", request.metadata(), request.remote_addr());
        let call = self
            .engine
            .open(deadline(request.metadata()), trace, principal)?
            .giving_back(gives_back(request.metadata()));
        let inbound = request
            .into_inner()
            .map(|msg| msg.map_err(Error::from).and_then(command));
        Ok(Response::new(respond(call.start(inbound))))
    }

    async fn run_batch(
        &self,
        request: Request<wire::JobBatch>,
    ) -> Result<Response<ResponseStream>, Status> {
        let principal = self.principal(&request)?;
        let trace = session_trace("RunBatch", request.metadata(), request.remote_addr());
        let call = self
            .engine
            .open(deadline(request.metadata()), trace, principal)?;
        let inbound = futures_util::stream::iter([Ok(submit(request.into_inner()))]);
        Ok(Response::new(respond(call.start(inbound))))
    }

    async fn list_handlers(
        &self,
        request: Request<proto::ListHandlersRequest>,
    ) -> Result<Response<proto::ListHandlersResponse>, Status> {
        let principal = self.principal(&request)?;
        let handlers = self
            .engine
            .registry()
            .iter()
            .filter(|(name, _)| principal.may_use(name))
            .map(|(name, h)| proto::HandlerInfo {
                name: name.to_owned(),
                description: h.description().to_owned(),
            })
            .collect();
        Ok(Response::new(proto::ListHandlersResponse { handlers }))
    }
}

fn respond(results: ResultStream) -> ResponseStream {
    Box::pin(results.map(|r| {
        r.map(|reply| wire::ProcessResponse {
            results: reply.results.into_iter().map(to_proto).collect(),
            given_back: given_back(reply.given_back),
        })
        .map_err(Status::from)
    }))
}

/// Whether the call asked for its unstarted jobs back at drain (`batchd-drain: give-back`).
fn gives_back(metadata: &MetadataMap) -> bool {
    let (key, value) = proto::GIVE_BACK_METADATA;
    metadata
        .get(key)
        .is_some_and(|v| v.as_bytes() == value.as_bytes())
}

fn given_back(g: GivenBack) -> Option<wire::GivenBack> {
    if g.is_empty() {
        return None;
    }
    Some(wire::GivenBack {
        not_started: g.not_started,
        stopped: g.stopped,
    })
}

/// What one `ProcessRequest` of a `Process` call asks of its session: a batch to admit or a
/// cancel; a message with neither is INVALID_ARGUMENT. (Public for fuzzing: the conversion the
/// service applies to every message it reads, as the daemon decodes it.)
pub fn command(msg: wire::ProcessRequest) -> Result<Command, Error> {
    match msg.kind {
        Some(wire::Kind::Batch(batch)) => Ok(submit(batch)),
        Some(wire::Kind::Cancel(c)) => Ok(Command::Cancel {
            batch_id: c.batch_id,
            job_ids: c.job_ids,
        }),
        None => Err(Error::InvalidArgument(
            "ProcessRequest carries neither a batch nor a cancel".into(),
        )),
    }
}

fn submit(batch: wire::JobBatch) -> Command {
    Command::Submit {
        batch_id: batch.batch_id,
        jobs: batch
            .jobs
            .into_iter()
            .map(|j| JobRequest {
                id: j.id,
                handler: j.handler,
                payload: j.payload,
                params: j.params,
                // A negative or unrepresentable timeout becomes zero, which admission rejects.
                timeout: j
                    .timeout
                    .map(|d| Duration::try_from(d).unwrap_or(Duration::ZERO)),
            })
            .collect(),
    }
}

fn to_proto(r: JobResult) -> wire::JobResult {
    let outcome = proto::Outcome::from(r.outcome);
    let duration = |d: Option<Duration>| d.and_then(|d| prost_types::Duration::try_from(d).ok());
    wire::JobResult {
        job_id: r.job_id,
        batch_id: r.batch_id,
        outcome: outcome as i32,
        output: r.output,
        error: r.error,
        queued: duration(r.queued),
        ran: duration(r.ran),
    }
}

/// The call's deadline from its `grpc-timeout` header, if it has a valid one.
fn deadline(metadata: &MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    Instant::now().checked_add(parse_grpc_timeout(value)?)
}

/// Parses a gRPC timeout: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = (value.get(..split)?, value.get(split..)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "5", "5x", "123456789S", "-1S", "1.5S", "5é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
