//! Running under systemd: the sockets of socket activation, and the sd_notify protocol.
//!
//! - [`activated_sockets`] takes the listening sockets systemd passed (`LISTEN_FDS`), so a restart
//!   of the daemon loses no connection attempt: they wait in the socket's backlog meanwhile.
//! - [`Systemd`] speaks sd_notify: `READY=1` once the gRPC listener accepts and the engine runs;
//!   `STATUS=` with live figures; `WATCHDOG=1` at half the watchdog interval **only while the
//!   engine is healthy** ([`Engine::health`]); `STOPPING=1` when the drain starts and
//!   `EXTEND_TIMEOUT_USEC=` while a drain still makes progress.
//!
//! The notifications come from a thread of their own, not from the runtime: a runtime whose
//! threads are all stuck cannot run the engine's probe, and the thread then sees the engine stall
//! and stops the pings, where a task on that runtime would merely fall silent. Without
//! `NOTIFY_SOCKET` none of it exists.

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::engine::{Engine, Stats};

/// Longest pause between two status lines (and checks of a drain's progress).
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// How long the notifier thread may take to stop before the daemon goes on without it.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// The `FileDescriptorName=` of the gRPC socket in `batchd.socket`.
pub const GRPC_FD_NAME: &str = "grpc";

/// The `FileDescriptorName=` of the admin socket in `batchd.socket`.
pub const ADMIN_FD_NAME: &str = "admin";

/// Set once the sockets of socket activation are taken: they are owned once.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Listening sockets passed by systemd socket activation; the daemon binds what is missing.
#[derive(Debug, Default)]
pub struct Activated {
    /// The gRPC listener (`FileDescriptorName=grpc`, or the first socket when unnamed).
    pub grpc: Option<TcpListener>,
    /// The admin listener (`FileDescriptorName=admin`, or the second socket when unnamed).
    pub admin: Option<TcpListener>,
}

/// A socket passed by systemd that batchd cannot serve on.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS`/`LISTEN_PID` are malformed.
    #[error("LISTEN_FDS or LISTEN_PID is malformed")]
    Env,
    /// A socket is not a listening TCP socket (e.g. `Accept=yes`, or a datagram or Unix socket).
    #[error("socket {name:?} (fd {fd}) is not a listening TCP socket: {why}")]
    NotTcpListener {
        /// Its `FileDescriptorName=`.
        name: String,
        /// Its number.
        fd: usize,
        /// What it is instead.
        why: String,
    },
    /// Names other than `grpc` and `admin`, the same name twice, or more than two sockets.
    #[error("unexpected sockets {names:?}: batchd takes one named \"grpc\" and optionally one named \"admin\" (or one or two unnamed, in that order)")]
    Unexpected {
        /// The names as systemd passed them.
        names: Vec<String>,
    },
    /// A system call on a passed socket failed.
    #[error("socket {name:?}: {source}")]
    Io {
        /// Its `FileDescriptorName=`.
        name: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Takes the listening sockets systemd passed to this process (`LISTEN_PID` is ours): by
/// `FileDescriptorName=` (`grpc`, `admin`) when named so, else the first is gRPC and the second
/// admin. They become close-on-exec, so exec handlers' commands do not inherit them. Later calls
/// return nothing: the sockets are taken once.
pub fn activated_sockets() -> Result<Activated, ActivationError> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Activated::default());
    }
    let fds = sd_listen_fds::get().map_err(|_| ActivationError::Env)?;
    let names: Vec<String> = fds
        .iter()
        .map(|(name, _)| name.clone().unwrap_or_default())
        .collect();
    let unexpected = || ActivationError::Unexpected {
        names: names.clone(),
    };
    let by_name = names
        .iter()
        .any(|n| n == GRPC_FD_NAME || n == ADMIN_FD_NAME);
    let mut out = Activated::default();
    for (i, (name, fd)) in fds.into_iter().enumerate() {
        let name = name.unwrap_or_default();
        let slot = match (by_name, name.as_str(), i) {
            (true, GRPC_FD_NAME, _) | (false, _, 0) => &mut out.grpc,
            (true, ADMIN_FD_NAME, _) | (false, _, 1) => &mut out.admin,
            _ => return Err(unexpected()),
        };
        if slot.is_some() {
            return Err(unexpected());
        }
        *slot = Some(tcp_listener(&name, i + 3, fd.into_std())?);
    }
    if out.grpc.is_none() && out.admin.is_some() {
        return Err(unexpected());
    }
    Ok(out)
}

/// Checks that `fd` is a listening TCP socket and makes it a non-blocking, close-on-exec listener.
fn tcp_listener(name: &str, number: usize, fd: OwnedFd) -> Result<TcpListener, ActivationError> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let io = |source: std::io::Error| ActivationError::Io {
        name: name.to_owned(),
        source,
    };
    let not = |why: String| ActivationError::NotTcpListener {
        name: name.to_owned(),
        fd: number,
        why,
    };
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).map_err(|e| io(e.into()))?;
    let kind = sockopt::socket_type(&fd).map_err(|e| not(format!("not a socket ({e})")))?;
    if kind != SocketType::STREAM {
        return Err(not(format!("socket type {kind:?}")));
    }
    let family = rustix::net::getsockname(&fd)
        .map_err(|e| io(e.into()))?
        .address_family();
    if family != AddressFamily::INET && family != AddressFamily::INET6 {
        return Err(not(format!("address family {family:?}")));
    }
    if !sockopt::socket_acceptconn(&fd).map_err(|e| io(e.into()))? {
        return Err(not(
            "not listening (a connection? Accept=yes is not supported)".into(),
        ));
    }
    let listener = TcpListener::from(fd);
    listener.set_nonblocking(true).map_err(io)?;
    Ok(listener)
}

/// The service manager that started the daemon, as `NOTIFY_SOCKET` names it.
#[derive(Debug, Clone)]
pub struct Systemd {
    /// The watchdog interval, when systemd expects pings from this process.
    watchdog: Option<Duration>,
}

impl Systemd {
    /// The service manager named by `NOTIFY_SOCKET`, with the watchdog of `WATCHDOG_USEC` when
    /// `WATCHDOG_PID` is unset or this process; `None` outside systemd.
    pub fn from_env() -> Option<Self> {
        let socket = std::env::var_os("NOTIFY_SOCKET")?;
        if socket.is_empty() {
            return None;
        }
        Some(Self {
            watchdog: sd_notify::watchdog_enabled().filter(|d| !d.is_zero()),
        })
    }

    /// The watchdog interval systemd expects pings within, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Tells systemd the daemon is ready and starts the thread that keeps it informed.
    pub(crate) fn ready(self, engine: Engine) -> Notifier {
        let (tx, rx) = mpsc::sync_channel(4);
        let thread = std::thread::Builder::new()
            .name("batchd-sd-notify".into())
            .spawn(move || run(&self, &engine, &rx));
        match thread {
            Ok(thread) => Notifier {
                tx,
                thread: Some(thread),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the sd_notify thread; systemd is not told the daemon is ready");
                Notifier { tx, thread: None }
            }
        }
    }
}

/// What the server tells the notifier thread.
enum Phase {
    /// Shutdown has begun: the drain runs.
    Draining,
}

/// The running notifier; dropping it stops its thread.
#[derive(Debug)]
pub(crate) struct Notifier {
    tx: SyncSender<Phase>,
    thread: Option<JoinHandle<()>>,
}

impl Notifier {
    /// Shutdown has begun: `STOPPING=1`, and the drain's progress from now on.
    pub(crate) fn draining(&self) {
        let _ = self.tx.try_send(Phase::Draining);
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        // Disconnecting the channel wakes the thread, which returns.
        let (tx, _) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.tx, tx));
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + STOP_WAIT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            // Stuck on the engine it watches (a deadlocked scheduler): nothing left to tell.
            tracing::warn!("the sd_notify thread does not stop; leaving it");
        }
    }
}

/// The notifier thread: pings while healthy, status lines, then the drain's progress.
fn run(systemd: &Systemd, engine: &Engine, rx: &mpsc::Receiver<Phase>) {
    let mut sender = Sender::default();
    let start = Instant::now();
    let ping_every = systemd.watchdog.map(|w| w / 2);
    let status_every = ping_every.map_or(STATUS_EVERY, |p| p.min(STATUS_EVERY));
    let mut status = status_line(&engine.stats(), "serving");
    sender.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    let mut next_ping = ping_every.map(|p| start + p);
    let mut next_status = start + status_every;
    let mut stalled = false;
    let mut draining: Option<Progress> = None;
    loop {
        let now = Instant::now();
        let wake = next_ping.map_or(next_status, |p| p.min(next_status));
        match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(Phase::Draining) => {
                let stats = engine.stats();
                status = status_line(&stats, "draining");
                sender.send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
                draining = Some(Progress::of(&stats));
                next_ping = None;
                next_status = Instant::now() + status_every;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if let Some(at) = next_ping.filter(|at| *at <= now) {
            match engine.health() {
                Ok(()) => {
                    sender.send(&[NotifyState::Watchdog]);
                    if stalled {
                        stalled = false;
                        status = status_line(&engine.stats(), "serving");
                        sender.send(&[NotifyState::Status(&status)]);
                        tracing::info!("the engine makes progress again; watchdog pings resume");
                    }
                }
                Err(stall) => {
                    if !stalled {
                        stalled = true;
                        status = format!("wedged: {stall}; watchdog pings stopped");
                        // Told before logged: logging may be what is stuck.
                        sender.send(&[NotifyState::Status(&status)]);
                        tracing::warn!(%stall, "the engine is wedged; no more watchdog pings");
                    }
                }
            }
            // From now: the checks above may have waited (on a stuck log, say).
            next_ping = ping_every.map(|p| (at + p).max(Instant::now() + p / 2));
        }
        if next_status <= now {
            next_status = now + status_every;
            let stats = engine.stats();
            match &mut draining {
                Some(progress) => {
                    let line = status_line(&stats, "draining");
                    // Still making progress: ask for more time than the next check is away.
                    if progress.advanced(&stats) {
                        let extend =
                            u32::try_from((status_every * 3).as_micros()).unwrap_or(u32::MAX);
                        sender.send(&[
                            NotifyState::ExtendTimeoutUsec(extend),
                            NotifyState::Status(&line),
                        ]);
                    } else if line != status {
                        sender.send(&[NotifyState::Status(&line)]);
                    }
                    status = line;
                }
                None if !stalled => {
                    let line = status_line(&stats, "serving");
                    if line != status {
                        sender.send(&[NotifyState::Status(&line)]);
                        status = line;
                    }
                }
                None => {}
            }
        }
    }
}

/// `serving: 3 calls, 12 jobs running, 40 queued, 244 workers free; 1234 jobs done`.
fn status_line(s: &Stats, state: &str) -> String {
    let done: u64 = s.finished.iter().sum();
    format!(
        "{state}: {} calls, {} jobs running, {} queued, {} workers free; {done} jobs done",
        s.calls_open, s.jobs_running, s.jobs_queued, s.free_workers
    )
}

/// What a drain has left, to tell whether it still advances.
struct Progress {
    done: u64,
    calls: u64,
    held: u64,
}

impl Progress {
    fn of(s: &Stats) -> Self {
        Self {
            done: s.finished.iter().sum(),
            calls: s.calls_open,
            held: s.jobs_running + s.jobs_queued + s.results_buffered,
        }
    }

    /// Whether jobs finished, calls ended or buffered work shrank since the last look; updates it.
    fn advanced(&mut self, s: &Stats) -> bool {
        let now = Self::of(s);
        let advanced = now.done > self.done || now.calls < self.calls || now.held < self.held;
        *self = now;
        advanced
    }
}

/// Sends notifications; a failure is logged once, and the daemon goes on.
#[derive(Default)]
struct Sender {
    failed: bool,
}

impl Sender {
    fn send(&mut self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            if !std::mem::replace(&mut self.failed, true) {
                tracing::warn!(error = %e, "sd_notify failed; systemd may not see this daemon's state");
            }
        }
    }
}
