//! The client side: connections, open `Process` calls, requests.

use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, process_request::Kind};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// A client on its own HTTP/2 connection to `url`.
pub async fn connect(url: &str) -> BatchServiceClient<Channel> {
    let channel = Endpoint::from_shared(url.to_owned())
        .expect("a valid URL")
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    BatchServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

/// An open Process call: the request sender and the response stream. Dropping both resets the
/// call (a tonic client that keeps its sender does not).
pub struct Call {
    pub tx: mpsc::Sender<proto::ProcessRequest>,
    pub rx: tonic::Streaming<proto::ProcessResponse>,
}

/// Opens a call whose request channel holds `buffer` messages; panics if the server refuses it.
pub async fn open_call(client: &BatchServiceClient<Channel>, buffer: usize) -> Call {
    try_open_call(client, buffer)
        .await
        .unwrap_or_else(|s| panic!("the call was refused: {s:?}"))
}

/// Opens a call, or returns the status the server refuses it with.
pub async fn try_open_call(
    client: &BatchServiceClient<Channel>,
    buffer: usize,
) -> Result<Call, tonic::Status> {
    try_open_call_as(client, buffer, None).await
}

/// [`open_call`] with `authorization: Bearer TOKEN` when `token` is given.
pub async fn open_call_as(
    client: &BatchServiceClient<Channel>,
    buffer: usize,
    token: Option<&str>,
) -> Call {
    try_open_call_as(client, buffer, token)
        .await
        .unwrap_or_else(|s| panic!("the call was refused: {s:?}"))
}

/// [`try_open_call`] with `authorization: Bearer TOKEN` when `token` is given.
pub async fn try_open_call_as(
    client: &BatchServiceClient<Channel>,
    buffer: usize,
    token: Option<&str>,
) -> Result<Call, tonic::Status> {
    let (tx, rx) = mpsc::channel(buffer);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .expect("a token is header-safe");
        request.metadata_mut().insert("authorization", value);
    }
    let rx = client.clone().process(request).await?.into_inner();
    Ok(Call { tx, rx })
}

/// A job for `handler`. The payload is shared, not copied.
pub fn job(id: String, handler: &str, payload: Bytes, params: &[(&str, &str)]) -> proto::Job {
    proto::Job {
        id,
        handler: handler.into(),
        payload,
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        timeout: None,
    }
}

/// A request carrying one batch.
pub fn batch(batch_id: String, jobs: Vec<proto::Job>) -> proto::ProcessRequest {
    proto::ProcessRequest {
        kind: Some(Kind::Batch(proto::JobBatch { batch_id, jobs })),
    }
}

/// `n` sleep jobs of `ms` milliseconds, with ids `{prefix}0…`.
pub fn sleep_jobs(prefix: &str, n: usize, ms: &str) -> Vec<proto::Job> {
    (0..n)
        .map(|i| job(format!("{prefix}{i}"), "sleep", Bytes::new(), &[("ms", ms)]))
        .collect()
}

pub fn is_ok(r: &proto::JobResult) -> bool {
    r.outcome == proto::Outcome::Ok as i32
}
