//! Starts a real batchd server on 127.0.0.1:0 in its own runtime and connects real tonic clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod batchctl;
pub mod daemon;
pub mod failover;
pub mod h2frames;
pub mod jobs;
pub mod map;
pub mod otlp;
pub mod principals;
pub mod procs;
pub mod proxy;
pub mod recovery;
pub mod scrape;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use batchd::config::Config;
use batchd::engine::Stats;
use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, process_request::Kind};
use batchd::{Engine, Registry, Server};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A daemon running on its own multi-thread runtime, so its task count is its own.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The admin HTTP listener (/metrics, /healthz, /readyz).
    pub admin: SocketAddr,
    pub engine: Engine,
    /// The server runtime's handle, for `metrics().num_alive_tasks()`.
    pub runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<Result<(), batchd::Error>>>,
}

impl TestServer {
    /// A server with the default config changed by `edit` (listen address is always 127.0.0.1:0).
    pub fn start(edit: impl FnOnce(&mut Config)) -> Self {
        Self::start_with(edit, Registry::builtin())
    }

    /// Like [`TestServer::start`] with a custom registry.
    pub fn start_with(edit: impl FnOnce(&mut Config), registry: Registry) -> Self {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        edit(&mut config);
        config.validate().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        let listener = std::net::TcpListener::bind(config.listen).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        config.listen = addr;
        let admin_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        admin_listener.set_nonblocking(true).unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let server = Server::new(config, registry);
        let engine = server.engine().clone();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let res = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let admin = tokio::net::TcpListener::from_std(admin_listener)?;
                let server = server.with_admin(admin);
                server.serve(listener, stop.cancelled_owned()).await
            });
            runtime.shutdown_timeout(Duration::from_secs(5));
            res
        });
        Self {
            addr,
            admin,
            engine,
            runtime: handle,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new client on a new connection.
    pub async fn client(&self) -> BatchServiceClient<Channel> {
        BatchServiceClient::connect(self.url()).await.unwrap()
    }

    /// A new client on a new connection that sends and receives messages of up to `max` bytes.
    pub async fn client_with_limit(&self, max: usize) -> BatchServiceClient<Channel> {
        self.client()
            .await
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    /// Opens a Process call on a new connection of its own ([`OpenCall::open_at`]).
    pub async fn open_call(&self) -> OpenCall {
        OpenCall::open_at(self.url()).await
    }

    /// A plain channel on a new connection, for the other gRPC services (health, reflection).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn stats(&self) -> Stats {
        self.engine.stats()
    }

    /// No call, queued or running job, or buffered result is left.
    pub fn is_idle(&self) -> bool {
        let s = self.stats();
        s.calls_open == 0 && s.jobs_running == 0 && s.jobs_queued == 0 && s.results_buffered == 0
    }

    pub fn alive_tasks(&self) -> usize {
        self.runtime.metrics().num_alive_tasks()
    }

    /// Starts graceful shutdown (like SIGTERM).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Starts shutdown and waits for `serve` to return.
    pub fn stop(mut self) -> Result<(), batchd::Error> {
        self.shutdown.cancel();
        self.thread.take().unwrap().join().unwrap()
    }

    /// Waits, off the async runtime, for `serve` to return after [`TestServer::begin_shutdown`].
    pub async fn join(mut self) -> Result<(), batchd::Error> {
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap()
    }
}

/// A plain HTTP/1.1 GET on the admin listener: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.engine.cancel_all();
    }
}

/// Awaits `fut`, panicking with `what` if it has not completed after `limit`.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("gave up after {limit:?} waiting until {what}"))
}

/// Polls `cond` every 2 ms until it holds, or panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A job for `handler` with `params`.
pub fn job(id: &str, handler: &str, payload: &[u8], params: &[(&str, &str)]) -> proto::Job {
    proto::Job {
        id: id.into(),
        handler: handler.into(),
        payload: payload.to_vec().into(),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout: None,
    }
}

pub fn batch(batch_id: &str, jobs: Vec<proto::Job>) -> proto::ProcessRequest {
    proto::ProcessRequest {
        kind: Some(Kind::Batch(proto::JobBatch {
            batch_id: batch_id.into(),
            jobs,
        })),
    }
}

pub fn cancel(batch_id: &str, job_ids: &[&str]) -> proto::ProcessRequest {
    proto::ProcessRequest {
        kind: Some(Kind::Cancel(proto::CancelJobs {
            batch_id: batch_id.into(),
            job_ids: job_ids.iter().map(|s| s.to_string()).collect(),
        })),
    }
}

/// An open Process call: a sender for requests and the response stream.
pub struct OpenCall {
    pub tx: Option<mpsc::Sender<proto::ProcessRequest>>,
    pub rx: tonic::Streaming<proto::ProcessResponse>,
    /// The client of a call from [`OpenCall::open_at`], kept so that its connection stays up.
    connection: Option<BatchServiceClient<Channel>>,
}

impl OpenCall {
    pub async fn open(client: &mut BatchServiceClient<Channel>) -> Self {
        Self::open_request(client, |_| {}).await
    }

    /// Opens a call on a new connection to `url`, which lives as long as the call.
    pub async fn open_at(url: String) -> Self {
        let mut client = BatchServiceClient::connect(url).await.unwrap();
        let mut call = Self::open(&mut client).await;
        call.connection = Some(client);
        call
    }

    /// Opens a call after `edit` changes the request (metadata, timeout).
    pub async fn open_request(
        client: &mut BatchServiceClient<Channel>,
        edit: impl FnOnce(
            &mut tonic::Request<tokio_stream::wrappers::ReceiverStream<proto::ProcessRequest>>,
        ),
    ) -> Self {
        Self::try_open_request(client, edit).await.unwrap()
    }

    /// Opens a call, or returns the status the server refuses it with.
    pub async fn try_open(client: &mut BatchServiceClient<Channel>) -> Result<Self, tonic::Status> {
        Self::try_open_request(client, |_| {}).await
    }

    /// Like [`OpenCall::try_open`] after `edit` changes the request.
    async fn try_open_request(
        client: &mut BatchServiceClient<Channel>,
        edit: impl FnOnce(
            &mut tonic::Request<tokio_stream::wrappers::ReceiverStream<proto::ProcessRequest>>,
        ),
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        edit(&mut request);
        let rx = client.process(request).await?.into_inner();
        Ok(Self {
            tx: Some(tx),
            rx,
            connection: None,
        })
    }

    pub async fn send(&self, req: proto::ProcessRequest) {
        self.tx.as_ref().unwrap().send(req).await.unwrap();
    }

    /// Closes the send side (half-close).
    pub fn half_close(&mut self) {
        self.tx = None;
    }

    /// Reads results until `n` arrived (or the stream ends / fails); returns them by job id.
    pub async fn collect(&mut self, n: usize) -> Result<Vec<proto::JobResult>, tonic::Status> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.rx.message().await? {
                Some(msg) => out.extend(msg.results),
                None => break,
            }
        }
        Ok(out)
    }

    /// Like [`OpenCall::collect`] within `limit`; panics on a timeout or an error status.
    pub async fn results(&mut self, n: usize, limit: Duration) -> Vec<proto::JobResult> {
        let what = format!("{n} results arrive");
        within(limit, &what, self.collect(n)).await.unwrap()
    }

    /// The next response within `limit`, or None once the call ended OK; panics on an error status.
    pub async fn next_message(&mut self, limit: Duration) -> Option<proto::ProcessResponse> {
        within(limit, "a message or the end", self.rx.message())
            .await
            .unwrap()
    }

    /// Reads until the stream ends; returns every result and the final status.
    pub async fn finish(&mut self) -> (Vec<proto::JobResult>, Result<(), tonic::Status>) {
        let mut out = Vec::new();
        loop {
            match self.rx.message().await {
                Ok(Some(msg)) => out.extend(msg.results),
                Ok(None) => return (out, Ok(())),
                Err(s) => return (out, Err(s)),
            }
        }
    }

    /// [`OpenCall::finish`] within `limit`; panics unless the call ends OK. Returns every result.
    pub async fn finish_ok(&mut self, limit: Duration) -> Vec<proto::JobResult> {
        let (results, status) = within(limit, "the call ends", self.finish()).await;
        if let Err(status) = status {
            panic!("the call should end OK, but ended with {status:?}");
        }
        results
    }

    /// [`OpenCall::finish`] within `limit`; panics unless the call ends with `code`.
    pub async fn finish_err(
        &mut self,
        code: tonic::Code,
        limit: Duration,
    ) -> (Vec<proto::JobResult>, tonic::Status) {
        let (results, status) = within(limit, "the call ends", self.finish()).await;
        match status {
            Err(status) if status.code() == code => (results, status),
            other => panic!("the call should end with {code:?}, but ended with {other:?}"),
        }
    }
}

/// Like [`run_batch_on`], on a new connection to `server`.
pub async fn run_batch(
    server: &TestServer,
    jobs: Vec<proto::Job>,
    limit: Duration,
) -> HashMap<String, proto::JobResult> {
    run_batch_on(&mut server.client().await, jobs, limit).await
}

/// Runs `jobs` as batch "b" in a new half-closed call on `client`; results by id once it ends OK.
pub async fn run_batch_on(
    client: &mut BatchServiceClient<Channel>,
    jobs: Vec<proto::Job>,
    limit: Duration,
) -> HashMap<String, proto::JobResult> {
    let mut call = OpenCall::open(client).await;
    call.send(batch("b", jobs)).await;
    call.half_close();
    by_id(call.finish_ok(limit).await)
}

/// Results keyed by job id; panics on a duplicate.
pub fn by_id(results: Vec<proto::JobResult>) -> HashMap<String, proto::JobResult> {
    let mut map = HashMap::new();
    for r in results {
        let id = r.job_id.clone();
        assert!(
            map.insert(id.clone(), r).is_none(),
            "two results for job {id}"
        );
    }
    map
}

pub fn outcome(r: &proto::JobResult) -> proto::Outcome {
    proto::Outcome::try_from(r.outcome).unwrap()
}

/// A handler that waits until the test adds a permit to its gate, then returns the payload.
pub struct Gate(pub std::sync::Arc<tokio::sync::Semaphore>);

#[async_trait::async_trait]
impl batchd::handlers::Handler for Gate {
    fn description(&self) -> &str {
        "test: waits until the test opens the gate, then returns the payload"
    }

    async fn run(
        self: std::sync::Arc<Self>,
        input: batchd::handlers::JobInput,
        _ctx: batchd::handlers::JobContext,
    ) -> Result<bytes::Bytes, batchd::handlers::HandlerError> {
        if let Ok(permit) = self.0.acquire().await {
            permit.forget();
        }
        Ok(input.payload)
    }
}

/// A server with the builtin handlers and `gate` (closed until the test adds permits), configured
/// by `edit`.
pub fn gated_server(
    edit: impl FnOnce(&mut Config),
) -> (TestServer, std::sync::Arc<tokio::sync::Semaphore>) {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut registry = Registry::builtin();
    registry.register("gate", Gate(std::sync::Arc::clone(&gate)));
    (TestServer::start_with(edit, registry), gate)
}
