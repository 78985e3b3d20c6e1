//! The admin HTTP listener: `/metrics` (Prometheus text format), `/healthz` and `/readyz`.
//!
//! A small HTTP/1 server on hyper, run inside the daemon's serve future: it stops with the daemon
//! and owns every connection task it spawns.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::metrics::{render, ProcessFigures};
use crate::engine::Engine;

/// Admin connections served at once; more wait in the listener's backlog.
const MAX_CONNECTIONS: usize = 64;

/// How long one admin connection may stay open (scrapes and probes are short).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the admin endpoints for `engine` on `listener` until `stop` completes.
pub async fn serve(listener: TcpListener, engine: Engine, stop: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            () = &mut stop => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = &mut stop => break,
            a = listener.accept() => a,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                continue;
            }
        };
        let engine = engine.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let engine = engine.clone();
                async move { Ok::<_, Infallible>(respond(&req, &engine)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
        while connections.try_join_next().is_some() {}
    }
    // Dropping the set aborts the connections still open.
    connections.shutdown().await;
}

fn respond(req: &Request<Incoming>, engine: &Engine) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let body = render(
                engine.metrics(),
                engine.stats().free_workers,
                ProcessFigures::read(),
            );
            let mut res = Response::new(Full::new(Bytes::from(body)));
            if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
                res.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            res
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if engine.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" => text(StatusCode::OK, "ready\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res
}
