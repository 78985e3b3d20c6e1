//! The admin HTTP listener: `/metrics` (Prometheus text format), `/healthz` (the engine is not
//! wedged) and `/readyz` (not draining).
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

use super::prometheus::render;
use crate::engine::Engine;

/// Admin connections served at once; more wait in the listener's backlog.
const MAX_CONNECTIONS: usize = 64;

/// How long one admin connection may stay open (scrapes and probes are short).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves the admin endpoints for `engine` on `listener` until `stop` completes.
pub async fn serve(listener: TcpListener, engine: Engine, stop: impl Future<Output = ()>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    serve_limited(listener, engine, stop, permits).await;
}

/// [`serve`], holding one of `permits` per open connection.
async fn serve_limited(
    listener: TcpListener,
    engine: Engine,
    stop: impl Future<Output = ()>,
    permits: Arc<Semaphore>,
) {
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
            let body = render(engine);
            let mut res = Response::new(Full::new(Bytes::from(body)));
            if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
                res.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            res
        }
        "/healthz" => match engine.health() {
            Ok(()) => text(StatusCode::OK, "ok\n"),
            // Liveness: a wedged engine is worth a restart, a busy one is not.
            Err(stall) => {
                let mut res = Response::new(Full::new(Bytes::from(format!("stalled: {stall}\n"))));
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                res
            }
        },
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::Config;
    use crate::engine::Limits;
    use crate::handlers::Registry;

    const WAIT: Duration = Duration::from_secs(20);

    async fn get(stream: &mut TcpStream) -> std::io::Result<String> {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: batchd\r\n\r\n")
            .await?;
        let mut buf = vec![0; 1024];
        let n = stream.read(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_limit_wait_for_a_free_one() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let engine = Engine::new(Limits::from(&Config::default()), Registry::builtin());
        let permits = Arc::new(Semaphore::new(2));
        let stop = CancellationToken::new();
        let served = tokio::spawn(serve_limited(
            listener,
            engine,
            stop.clone().cancelled_owned(),
            Arc::clone(&permits),
        ));
        let mut a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut a).await.unwrap().starts_with("HTTP/1.1 200"));
        let deadline = tokio::time::Instant::now() + WAIT;
        while permits.available_permits() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "two connections held"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A third connection waits in the backlog, unserved, while both slots are held.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), get(&mut c)).await;
        assert!(early.is_err(), "served beyond the limit: {early:?}");
        drop(a);
        let mut buf = vec![0; 1024];
        let n = tokio::time::timeout(WAIT, c.read(&mut buf))
            .await
            .expect("served once a slot is free")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        stop.cancel();
        served.await.unwrap();
    }
}
