//! Principals in tests: `[[principal]]` specs and config text, calls and clients that carry a bearer
//! token, and samples of the daemon's per-principal metrics.

use std::net::SocketAddr;

use batchd::auth::{PrincipalSpec, Tokens};
use batchd::proto::batch_service_client::BatchServiceClient;
use batchd::proto::{self, ListHandlersRequest};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::OpenCall;

/// The hex SHA-256 of `token`, as `token_sha256` holds it.
pub fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A principal named `name` identified by `token`, with every handler and weight 1.
pub fn principal(name: &str, token: &str) -> PrincipalSpec {
    PrincipalSpec {
        token_sha256: Tokens::One(digest(token)),
        ..PrincipalSpec::new(name)
    }
}

/// `[[principal]]` TOML for `name` identified by `tokens`, with `extra` lines (`weight = 2`).
pub fn principal_toml(name: &str, tokens: &[&str], extra: &str) -> String {
    let digests: Vec<String> = tokens.iter().map(|t| format!("{:?}", digest(t))).collect();
    format!(
        "[[principal]]\nname = {name:?}\ntoken_sha256 = [{}]\n{extra}\n",
        digests.join(", ")
    )
}

/// Puts `authorization: Bearer <token>` on a request.
pub fn authorize<T>(request: &mut tonic::Request<T>, token: &str) {
    let value = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
}

/// Opens a Process call carrying `token` (`None`: no credentials) on a new connection to `url`, or
/// returns the status that refuses it.
pub async fn try_open_as(url: &str, token: Option<&str>) -> Result<OpenCall, tonic::Status> {
    let mut client = BatchServiceClient::connect(url.to_owned()).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(token) = token {
        authorize(&mut request, token);
    }
    let rx = client.process(request).await?.into_inner();
    Ok(OpenCall {
        tx: Some(tx),
        rx,
        connection: Some(client),
    })
}

/// [`try_open_as`], panicking if the call is refused.
pub async fn open_as(url: &str, token: &str) -> OpenCall {
    try_open_as(url, Some(token)).await.unwrap()
}

/// The handlers `ListHandlers` names to a caller with `token`, or the status refusing it.
pub async fn list_handlers(
    client: &mut BatchServiceClient<Channel>,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let mut request = tonic::Request::new(ListHandlersRequest {});
    if let Some(token) = token {
        authorize(&mut request, token);
    }
    let list = client.list_handlers(request).await?.into_inner();
    Ok(list.handlers.into_iter().map(|h| h.name).collect())
}

/// Runs `RunBatch` with `jobs` and `token`; its results, or the status refusing it.
pub async fn run_batch_as(
    client: &mut BatchServiceClient<Channel>,
    token: Option<&str>,
    jobs: Vec<proto::Job>,
) -> Result<Vec<proto::JobResult>, tonic::Status> {
    let mut request = tonic::Request::new(proto::JobBatch {
        batch_id: "b".into(),
        jobs,
    });
    if let Some(token) = token {
        authorize(&mut request, token);
    }
    let mut stream = client.run_batch(request).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend(msg.results);
    }
    Ok(out)
}

/// One sample of `name{labels}` from the admin listener's `/metrics` (`labels` as written there,
/// `""` for none); 0 when there is no such sample.
pub fn metric(admin: SocketAddr, name: &str, labels: &str) -> f64 {
    let (code, body) = super::http_get(admin, "/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");
    let key = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}
