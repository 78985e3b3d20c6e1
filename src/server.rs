//! Runs the daemon: the gRPC server with its limits, health, reflection and shutdown with a deadline.
//!
//! [`systemd`]: socket activation and the sd_notify protocol, for the daemon under systemd.
//! [`incoming`]: the listener's connections: limits, handshake deadline, HTTP/2 preface.
//! [`tls`]: TLS and mTLS, with certificates reloaded without a restart.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::engine::{Engine, Limits};
use crate::error::Error;
use crate::handlers::Registry;
use crate::proto::{batch_service_server::BatchServiceServer, FILE_DESCRIPTOR_SET};
use crate::service::{Authenticate, Service};
use crate::telemetry::admin;

pub mod incoming;
pub mod systemd;
pub mod tls;

use incoming::{Incoming, Limits as ConnectionLimits, Plain};
use systemd::{Notifier, Systemd};
use tls::Tls;

/// How long, after the grace period, calls get to deliver their last results and close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A flow-control window as h2 takes it (validated to fit in 31 bits).
fn window(size: crate::config::ByteSize) -> u32 {
    u32::try_from(size.0).unwrap_or(u32::MAX >> 1)
}

/// A header list limit as h2 takes it (validated to fit in 32 bits).
fn header_list(size: crate::config::ByteSize) -> u32 {
    u32::try_from(size.0).unwrap_or(u32::MAX)
}

/// The daemon, built from a config and the handlers it runs.
#[derive(Debug)]
pub struct Server {
    config: Config,
    engine: Engine,
    admin: Option<TcpListener>,
    systemd: Option<Systemd>,
    tls: Option<Tls>,
}

impl Server {
    /// A daemon with `config`'s limits running `registry`'s handlers.
    ///
    /// Its principals are `config`'s (validated by [`Config::validate`]); if they do not validate,
    /// every call is refused (UNAUTHENTICATED) rather than served without them.
    pub fn new(config: Config, registry: Registry) -> Self {
        let engine = Engine::refusing(Limits::from(&config), registry);
        if let Err(e) = engine.set_principals(&config.principal, config.reflection_open) {
            tracing::error!(error = %e, "invalid principals: refusing every call");
        }
        Self {
            config,
            engine,
            admin: None,
            systemd: None,
            tls: None,
        }
    }

    /// Serves TLS with `tls` (loaded by [`Tls::from_config`] from this config's files, and kept by
    /// the caller to reload it). Without it, [`Server::serve`] loads the files itself.
    pub fn with_tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Keeps `systemd` informed over sd_notify: ready, status, watchdog pings while the engine is
    /// healthy, stopping (see [`systemd`]).
    pub fn with_systemd(mut self, systemd: Systemd) -> Self {
        self.systemd = Some(systemd);
        self
    }

    /// Also serves the admin endpoints (`/metrics`, `/healthz`, `/readyz`) on `listener`, for as
    /// long as the daemon serves.
    pub fn with_admin(mut self, listener: TcpListener) -> Self {
        self.admin = Some(listener);
        self
    }

    /// The engine, for its live counters.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Serves on `listener` until `shutdown` completes, then shuts down within `shutdown_grace`.
    ///
    /// Shutdown: health turns NOT_SERVING, new calls are refused, open calls stop reading and finish
    /// their jobs; when the grace period ends, every job still unfinished is cancelled.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        let Self {
            config,
            engine,
            admin,
            systemd,
            tls,
        } = self;
        let tls = match tls {
            Some(tls) => Some(tls),
            None => Tls::from_config(&config).map_err(|e| Error::Tls(e.to_string()))?,
        };
        // Owned here: certificates reload when their files change, for as long as the daemon serves.
        let _watch = tls
            .clone()
            .map(|tls| AbortOnDropHandle::new(tokio::spawn(tls.watch())));
        // Owned here like the admin task: the engine's health probe, read by /healthz and the
        // systemd watchdog.
        let _probe = AbortOnDropHandle::new(tokio::spawn(engine.clone().probe()));
        let admin_stop = CancellationToken::new();
        // Owned here: stopped and awaited when serving ends, aborted if this future is dropped.
        let admin_task = admin.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "admin listener (/metrics, /healthz, /readyz)");
            }
            let stop = admin_stop.clone().cancelled_owned();
            AbortOnDropHandle::new(tokio::spawn(admin::serve(listener, engine.clone(), stop)))
        });
        let res = serve_grpc(config, engine, listener, tls, shutdown, systemd).await;
        admin_stop.cancel();
        if let Some(task) = admin_task {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "the admin listener failed");
            }
        }
        res
    }
}

/// Waits until the engine's health probe has taken its first turn: the engine runs.
async fn engine_runs(engine: &Engine) {
    while !engine.probed() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The transport's serve future, plaintext or TLS.
type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

async fn serve_grpc(
    config: Config,
    engine: Engine,
    listener: TcpListener,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
    mut systemd: Option<Systemd>,
) -> Result<(), Error> {
    {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<BatchServiceServer<Service>>().await;
        health.set_service_status("", ServingStatus::Serving).await;
        // v1 and v1alpha (grpcurl ≤ 1.8, grpc_cli, Postman and older Evans ask v1alpha only), with
        // the health service's descriptors, so `grpc.health.v1.Health/Check` resolves too.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        // Health stays open (probes carry no credentials); reflection and BatchService need them
        // once principals are configured (reflection unless `reflection_open`).
        let reflection_v1 =
            InterceptedService::new(reflection_v1, Authenticate::reflection(engine.clone()));
        let reflection_v1alpha =
            InterceptedService::new(reflection_v1alpha, Authenticate::reflection(engine.clone()));
        let max_message = config.max_message_size.as_usize();
        let service = BatchServiceServer::new(Service::new(engine.clone()))
            .max_decoding_message_size(max_message)
            // One result holds at most a request's strings (id, batch id), an output and a short error.
            .max_encoding_message_size(
                max_message
                    .saturating_add(config.max_output.as_usize())
                    .saturating_add(64 * 1024),
            );
        let service = InterceptedService::new(service, Authenticate::batch_service(engine.clone()));
        let keepalive = (!config.keepalive_interval.is_zero()).then_some(config.keepalive_interval);
        let addr = listener.local_addr()?;
        let limits = ConnectionLimits::from(&config);
        match &tls {
            Some(tls) => tracing::info!(
                %addr,
                workers = config.workers,
                tls = if tls.mutual() { "mtls" } else { "tls" },
                sha256 = %tls.fingerprint(),
                max_connections = limits.max_connections,
                "serving"
            ),
            None => tracing::info!(
                %addr,
                workers = config.workers,
                tls = "off",
                max_connections = limits.max_connections,
                "serving"
            ),
        }
        warn_plaintext_tokens(&config, addr, tls.is_some());
        let stop_accepting = CancellationToken::new();

        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .max_concurrent_streams(Some(config.max_concurrent_streams))
            .initial_stream_window_size(window(config.http2_stream_window))
            .initial_connection_window_size(window(config.http2_connection_window))
            .http2_max_header_list_size(header_list(config.http2_max_header_list_size))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(service);
        let stop = stop_accepting.clone().cancelled_owned();
        // TLS is terminated by `Incoming` (never also by tonic's `tls_config`).
        let serve: Serving = match tls {
            Some(tls) => Box::pin(
                router.serve_with_incoming_shutdown(Incoming::new(listener, limits, tls), stop),
            ),
            None => Box::pin(
                router.serve_with_incoming_shutdown(Incoming::new(listener, limits, Plain), stop),
            ),
        };
        tokio::pin!(serve, shutdown);

        // Dropped when this function returns: the notifier thread stops with the server.
        let mut notifier: Option<Notifier> = None;
        loop {
            tokio::select! {
                // Biased: the transport is polled (accepting) before systemd hears it is ready.
                biased;
                res = &mut serve => return res.map_err(Error::from),
                () = &mut shutdown => break,
                () = engine_runs(&engine), if systemd.is_some() => {
                    notifier = systemd.take().map(|sd| sd.ready(engine.clone()));
                }
            }
        }

        let stats = engine.stats();
        tracing::info!(
            calls = stats.calls_open,
            running = stats.jobs_running,
            queued = stats.jobs_queued,
            grace = %humantime::format_duration(config.shutdown_grace),
            "shutting down"
        );
        if let Some(notifier) = &notifier {
            notifier.draining();
        }
        health
            .set_not_serving::<BatchServiceServer<Service>>()
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        engine.drain();
        stop_accepting.cancel();

        // Calls drain while the transport keeps running, so that it closes its listener and answers
        // the connections already open (new calls get UNAVAILABLE) instead of leaving them hanging.
        let drain = async {
            if tokio::time::timeout(config.shutdown_grace, engine.wait_idle())
                .await
                .is_err()
            {
                let stats = engine.stats();
                tracing::warn!(
                    calls = stats.calls_open,
                    running = stats.jobs_running,
                    queued = stats.jobs_queued,
                    "grace period over; cancelling unfinished jobs"
                );
                engine.cancel_all();
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, engine.wait_idle()).await;
            }
        };
        tokio::pin!(drain);
        let served = tokio::select! {
            res = &mut serve => Some(res),
            () = &mut drain => None,
        };
        match served {
            Some(res) => {
                drain.await;
                res?;
            }
            // Every call has ended (or was cut off); give the transport a moment to send trailers.
            None => match tokio::time::timeout(CLOSE_TIMEOUT, serve).await {
                Ok(res) => res?,
                Err(_) => tracing::warn!("connections still open after shutdown; closing them"),
            },
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Bearer tokens on a plaintext listener that others can reach travel in the clear: say so at start
/// (and at reload, from the binary).
pub fn warn_plaintext_tokens(config: &Config, addr: std::net::SocketAddr, tls: bool) {
    let tokens = config.principal.iter().any(|p| !p.token_sha256.is_empty());
    if tokens && !tls && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "bearer tokens are accepted over plaintext on a non-loopback address: anyone on the path \
             can read and replay them; serve TLS or keep the listener on loopback"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Instant;

    use super::*;

    /// Whether something accepts connections on `addr` (a closed listener refuses them).
    async fn listening(addr: std::net::SocketAddr) -> bool {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    }

    async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done().await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_serve_closes_the_admin_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let server = Server::new(Config::default(), Registry::builtin()).with_admin(admin);
        let serving = tokio::spawn(server.serve(listener, std::future::pending()));
        assert!(listening(admin_addr).await);

        // Dropped mid-serve, not shut down: the admin task must not outlive it.
        serving.abort();
        assert!(serving.await.unwrap_err().is_cancelled());
        wait_for("the admin listener is closed", async || {
            !listening(admin_addr).await
        })
        .await;
    }
}
