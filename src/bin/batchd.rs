//! The batchd daemon: flags → config → telemetry → bind → serve until a signal.

use std::convert::Infallible;
use std::process::ExitCode;

use anyhow::Context;
use batchd::config::{Config, ConfigError, Flags};
use batchd::handlers::exec::{self, Reaper};
use batchd::server::systemd::{self, Systemd};
use batchd::server::tls::Tls;
use batchd::{Engine, Registry, Server};
use clap::Parser;
use tokio::signal::unix::{signal, Signal, SignalKind};

#[path = "batchd/hand_back.rs"]
mod hand_back;

// mimalloc: per-job allocations are a large share of the daemon's CPU, and it hands memory freed by
// ended calls back to the OS instead of keeping it like glibc's arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration error (EX_CONFIG is 78, but batchd documents EX_USAGE, 64).
const EXIT_CONFIG: u8 = 64;

/// Exit code when a signal during shutdown stops the daemon at once (128 + SIGINT, as shells do).
const EXIT_STOPPED: i32 = 130;

/// A gRPC batch-processing daemon: a bounded, fair, cancellable worker pool for job batches.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.flags, std::env::vars()) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let mut registry = Registry::builtin();
    let reaper = match exec::register(&mut registry, &config.exec) {
        Ok(r) => r,
        Err(e) => return config_error(&ConfigError::from(e)),
    };
    if let Err(e) = batchd::auth::check_handlers(&config.principal, |h| registry.get(h).is_some()) {
        return config_error(&ConfigError::from(e));
    }
    // The TLS files are read before anything binds: a bad one is a config error (exit 64).
    let tls = match Tls::from_config(&config) {
        Ok(tls) => tls,
        Err(e) => return config_error(&e),
    };
    match run(config, registry, reaper, &cli.flags, tls) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("batchd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("batchd: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn run(
    config: Config,
    registry: Registry,
    reaper: Reaper,
    flags: &Flags,
    tls: Option<Tls>,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // An idle worker hands back the memory a burst left in its heap (hand_back.rs).
        .on_thread_park(hand_back::on_park)
        .build()
        .context("starting the runtime")?
        .block_on(run_on_runtime(config, registry, reaper, flags, tls))
}

async fn run_on_runtime(
    config: Config,
    registry: Registry,
    reaper: Reaper,
    flags: &Flags,
    tls: Option<Tls>,
) -> anyhow::Result<()> {
    // Installed first and kept to the end: tokio's handler stays installed once a signal is
    // listened for, so a signal nobody listens for would be swallowed.
    let mut signals = Signals::install()?;
    // On the runtime: the OTLP exporter's channel lives there.
    let telemetry = batchd::telemetry::init(&config).context("setting up telemetry")?;
    // Subreaper, clean-up after a crashed instance, isolation logged: before serving.
    exec::start_up(&reaper);
    let res = serve(
        config,
        registry,
        &reaper,
        &telemetry,
        &mut signals,
        flags,
        tls,
    )
    .await;
    let finish = async {
        // Jobs stopped by shutdown left their commands' process groups to the reaper: wait for it
        // (bounded by the longest kill_grace) while the runtime that runs its tasks is still here.
        if reaper.pending_kills() > 0 {
            tracing::info!(
                groups = reaper.live_groups(),
                "waiting for the process groups of stopped jobs (send the signal again to kill them at once)"
            );
        }
        let killed = reaper.shutdown().await;
        if killed > 0 {
            tracing::warn!(
                groups = killed,
                "process groups still there after kill_grace; sent SIGKILL"
            );
        }
        telemetry.shutdown().await;
    };
    tokio::select! {
        () = finish => res,
        // Exits inside the future: `finish` is not dropped (dropping the telemetry would flush it).
        never = signals.stop_at_once(&reaper) => match never {},
    }
}

async fn serve(
    config: Config,
    registry: Registry,
    reaper: &Reaper,
    telemetry: &batchd::telemetry::Telemetry,
    signals: &mut Signals,
    flags: &Flags,
    tls: Option<Tls>,
) -> anyhow::Result<()> {
    // Socket activation: systemd's sockets, bound before the daemon starts, replace `listen` and
    // `admin_listen`; whatever it did not pass is bound here.
    let activated = systemd::activated_sockets().context("taking the sockets systemd passed")?;
    let listener = match activated.grpc {
        Some(l) => {
            tracing::info!(addr = ?l.local_addr().ok(), "socket activation: serving gRPC on the socket systemd passed");
            tokio::net::TcpListener::from_std(l).context("the gRPC socket systemd passed")?
        }
        None => tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?,
    };
    let admin = match activated.admin {
        Some(l) => {
            tokio::net::TcpListener::from_std(l).context("the admin socket systemd passed")?
        }
        None => tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("binding the admin listener {}", config.admin_listen))?,
    };
    let listen = listener.local_addr()?;
    let mut server = Server::new(config, registry).with_admin(admin);
    if let Some(tls) = &tls {
        server = server.with_tls(tls.clone());
    }
    if let Some(systemd) = Systemd::from_env() {
        tracing::info!(
            watchdog = ?systemd.watchdog(),
            "under systemd: sd_notify on (ready, status, watchdog while the engine is healthy)"
        );
        server = server.with_systemd(systemd);
    }
    let engine = server.engine().clone();
    telemetry.push_metrics(&engine);
    let stop = tokio_util::sync::CancellationToken::new();
    let serve = server.serve(listener, stop.clone().cancelled_owned());
    let hand_back = hand_back::run(engine.clone());
    tokio::pin!(serve, hand_back);
    loop {
        tokio::select! {
            res = &mut serve => return res.context("serving"),
            never = &mut hand_back => match never {},
            signal = signals.next_or_hangup() => match signal {
                Some(name) => {
                    tracing::info!(signal = name, "graceful shutdown (send it again to stop at once)");
                    break;
                }
                None => reload(flags, &engine, listen, tls.as_ref()),
            },
        }
    }
    stop.cancel();
    tokio::select! {
        res = &mut serve => res.context("shutting down"),
        never = signals.stop_at_once(reaper) => match never {},
    }
}

/// SIGHUP: reads again what changes without a restart. The TLS certificate, key and client CAs
/// (their files also reload by themselves when they change; a file that does not load leaves the
/// one in force, and `Tls::reload` logs either outcome). Then the principals (tokens, quotas,
/// weights, handlers) and `reflection_open` of the config as it is now, for calls opened from now
/// on: a config that would not start is refused with the same message, and the principals in force
/// stay. Other fields, the TLS file paths included, take effect at the next start.
fn reload(flags: &Flags, engine: &Engine, listen: std::net::SocketAddr, tls: Option<&Tls>) {
    if let Some(tls) = tls {
        tracing::info!("SIGHUP: reloading the TLS files");
        let _ = tls.reload();
    }
    let loaded = Config::load(flags, std::env::vars()).and_then(|c| {
        let known = |h: &str| engine.registry().get(h).is_some();
        batchd::auth::check_handlers(&c.principal, known)?;
        Ok(c)
    });
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: reload refused, the principals in force stay: {e}");
            return;
        }
    };
    match engine.set_principals(&config.principal, config.reflection_open) {
        Ok(n) => {
            tracing::info!(
                principals = n,
                "SIGHUP: principals reloaded (other fields take effect at the next start)"
            );
            batchd::server::warn_plaintext_tokens(&config, listen, tls.is_some());
        }
        Err(e) => tracing::error!(
            "SIGHUP: reload refused, the principals in force stay: {}",
            ConfigError::from(e)
        ),
    }
}

/// SIGTERM and SIGINT, listened for from start-up to exit, and SIGHUP (reload).
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT (its name) or SIGHUP (`None`).
    async fn next_or_hangup(&mut self) -> Option<&'static str> {
        tokio::select! {
            _ = self.term.recv() => Some("SIGTERM"),
            _ = self.int.recv() => Some("SIGINT"),
            _ = self.hup.recv() => None,
        }
    }

    /// Waits for the next SIGTERM or SIGINT; returns its name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    /// Once shutdown has begun, a signal stops the daemon at once: every exec process group gets
    /// SIGKILL (no grace, but no command is left running either), then the process exits 130.
    async fn stop_at_once(&mut self, reaper: &Reaper) -> Infallible {
        let name = self.next().await;
        let groups = reaper.kill_all();
        tracing::warn!(signal = name, groups, "stopping at once");
        std::process::exit(EXIT_STOPPED);
    }
}
