//! The gRPC listener's connections, from `accept()` to the first HTTP/2 byte tonic sees.
//!
//! [`Incoming`] is the stream `serve_with_incoming` takes. It accepts only while a connection slot
//! is free (`max_connections`: beyond it new connections wait in the kernel's listen backlog),
//! closes at once a connection from an address that already has `max_connections_per_peer`, and
//! runs each new connection's handshake as a task of its own (a [`JoinSet`] it owns, so nothing
//! outlives it) under one deadline, `handshake_timeout`:
//!
//! 1. wait for the first byte (a connection that sends nothing costs a small task and a socket);
//! 2. the TLS handshake, when TLS is on ([`Tls`]'s config in force at the ClientHello);
//! 3. the 24-byte HTTP/2 client preface, read and checked here, then replayed to tonic.
//!
//! A connection that misses the deadline or sends anything else is closed and frees its slot; only
//! then does hyper allocate its HTTP/2 state. The slot is released when tonic drops the
//! connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls::server::Acceptor;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_stream::Stream;
use tokio_util::sync::PollSemaphore;
use tonic::transport::server::Connected;

use super::tls::Tls;
use crate::config::Config;

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Connections accepted in one poll before the accept loop lets other tasks run.
const ACCEPT_BUDGET: usize = 64;

/// How long accepting pauses after an error such as EMFILE (the listener would report it again
/// at once).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait, after a failed TLS handshake, for the client to read the alert and close.
const LINGER: Duration = Duration::from_secs(1);

/// Capacity of the per-peer table beyond which it shrinks once mostly empty.
const SHRINK_PEERS_ABOVE: usize = 1024;

/// Shortest interval between two summaries of connections refused or closed early.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The connection limits of a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, handshakes included.
    pub max_connections: usize,
    /// Connections open at once from one address (IPv6: one /64).
    pub per_peer: usize,
    /// Deadline of the TLS handshake and the HTTP/2 preface together.
    pub handshake_timeout: Duration,
}

/// How a new connection becomes the stream tonic reads HTTP/2 from: as it is ([`Plain`]) or
/// through a TLS handshake ([`Tls`]).
pub trait Handshake: Clone + Unpin + Send + Sync + 'static {
    /// The stream after the handshake.
    type Io: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;
    /// Runs the handshake on a connection that has sent its first bytes.
    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// Plaintext HTTP/2 (h2c).
#[derive(Debug, Clone, Copy)]
pub struct Plain;

/// The connections of a listener, handshaken and within the limits, for `serve_with_incoming`.
pub struct Incoming<H: Handshake> {
    listener: TcpListener,
    handshake: H,
    limits: Limits,
    slots: PollSemaphore,
    /// A slot taken for the next connection accepted.
    slot: Option<OwnedSemaphorePermit>,
    peers: Arc<Peers>,
    handshakes: JoinSet<Option<Conn<H::Io>>>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    reports: Arc<Reports>,
}

/// A connection handed to tonic: the HTTP/2 preface it sent (replayed first), the stream, and its
/// slot, freed when tonic drops it.
pub struct Conn<S> {
    io: S,
    /// Bytes of [`PREFACE`] already replayed.
    replayed: usize,
    _slot: Slot,
}

/// A connection's share of the limits: its permit of `max_connections` and its count for its peer.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _peer: PeerCount,
}

/// Open connections per peer; entries go when their count reaches 0.
#[derive(Debug)]
struct Peers {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted for its peer until dropped.
struct PeerCount {
    peers: Arc<Peers>,
    ip: IpAddr,
}

/// Counts of connections refused or closed early, logged at most every [`REPORT_EVERY`] (a flood
/// must not flood the logs too).
#[derive(Debug, Default)]
struct Reports {
    state: Mutex<ReportState>,
}

#[derive(Debug, Default)]
struct ReportState {
    last: Option<Instant>,
    over_peer_limit: u64,
    timed_out: u64,
    failed: u64,
    last_failure: String,
}

// === impl Limits ===

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Self {
            max_connections: c.max_connections,
            per_peer: c.max_connections_per_peer,
            handshake_timeout: c.handshake_timeout,
        }
    }
}

// === impl Plain, Tls ===

impl Handshake for Plain {
    type Io = TcpStream;

    async fn handshake(&self, tcp: TcpStream) -> io::Result<TcpStream> {
        Ok(tcp)
    }
}

impl Handshake for Tls {
    type Io = TlsStream<TcpStream>;

    fn handshake(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send {
        let tls = self.clone();
        // Boxed: rustls's state is allocated once the client has spoken, not by every waiting task.
        Box::pin(async move {
            let mut hello = LazyConfigAcceptor::new(Acceptor::default(), tcp);
            let start = match (&mut hello).await {
                Ok(start) => start,
                Err(e) => {
                    if let Some(tcp) = hello.take_io() {
                        linger(tcp).await;
                    }
                    return Err(e);
                }
            };
            match start.into_stream(tls.config()).into_fallible().await {
                Ok(stream) => Ok(stream),
                Err((e, tcp)) => {
                    linger(tcp).await;
                    Err(e)
                }
            }
        })
    }
}

/// Closes a connection whose TLS handshake failed so that the client reads the alert rustls sent
/// (e.g. "certificate required"): shut down our side, then read and drop what the client still
/// sends for a moment. Closed at once with unread data, the socket would answer with a reset, and
/// the client would see "broken pipe" instead of the reason (a TLS 1.3 client sends its first
/// request before the server has checked its certificate).
async fn linger(mut tcp: TcpStream) {
    use tokio::io::AsyncWriteExt;
    if tcp.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(1..) = tcp.read(&mut sink).await {}
    })
    .await;
}

// === impl Incoming ===

impl<H: Handshake> Incoming<H> {
    /// The connections of `listener` within `limits`, through `handshake`.
    pub fn new(listener: TcpListener, limits: Limits, handshake: H) -> Self {
        let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            listener,
            handshake,
            limits,
            slots: PollSemaphore::new(Arc::new(Semaphore::new(max))),
            slot: None,
            peers: Arc::new(Peers {
                limit: limits.per_peer.max(1),
                open: Mutex::default(),
            }),
            handshakes: JoinSet::new(),
            backoff: None,
            reports: Arc::default(),
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Connections open or in their handshake.
    pub fn open(&self) -> usize {
        let max = self.limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let free = self.slots.available_permits() + usize::from(self.slot.is_some());
        max.saturating_sub(free)
    }

    fn start(&mut self, tcp: TcpStream, peer: SocketAddr, slot: OwnedSemaphorePermit) {
        let Some(count) = self.peers.admit(peer.ip()) else {
            self.reports
                .note(peer, Closed::OverPeerLimit(self.peers.limit));
            // The slot stays for the next connection.
            self.slot = Some(slot);
            return;
        };
        let _ = tcp.set_nodelay(true);
        let slot = Slot {
            _permit: slot,
            _peer: count,
        };
        let handshake = self.handshake.clone();
        let deadline = self.limits.handshake_timeout;
        let reports = Arc::clone(&self.reports);
        self.handshakes.spawn(async move {
            let started = tokio::time::timeout(deadline, begin(handshake, tcp)).await;
            match started {
                Ok(Ok(Some(io))) => Some(Conn {
                    io,
                    replayed: 0,
                    _slot: slot,
                }),
                Ok(Ok(None)) => None,
                Ok(Err(e)) => {
                    reports.note(peer, Closed::Failed(e));
                    None
                }
                Err(_) => {
                    reports.note(peer, Closed::TimedOut(deadline));
                    None
                }
            }
        });
    }
}

/// Waits for the first byte, runs the handshake, reads and checks the HTTP/2 preface. `None`: the
/// peer closed without sending anything (a TCP health check, a port scan).
async fn begin<H: Handshake>(handshake: H, tcp: TcpStream) -> io::Result<Option<H::Io>> {
    if tcp.peek(&mut [0u8; 1]).await? == 0 {
        return Ok(None);
    }
    let mut io = handshake.handshake(tcp).await?;
    let mut got = [0u8; PREFACE.len()];
    let mut n = 0;
    while n < got.len() {
        let read = io.read(&mut got[n..]).await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the HTTP/2 preface",
            ));
        }
        n += read;
        if got[..n] != PREFACE[..n] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 client preface (gRPC needs HTTP/2; TLS on one side only?)",
            ));
        }
    }
    Ok(Some(io))
}

impl<H: Handshake> Stream for Incoming<H> {
    type Item = io::Result<Conn<H::Io>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut accepted = 0;
        loop {
            // Handshakes that finished first: they hold slots.
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(conn)))) => return Poll::Ready(Some(Ok(conn))),
                Poll::Ready(Some(Ok(None))) => continue,
                Poll::Ready(Some(Err(e))) => {
                    tracing::error!(error = %e, "a connection's handshake task failed");
                    continue;
                }
                Poll::Ready(None) | Poll::Pending => {}
            }
            if let Some(backoff) = &mut this.backoff {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            if accepted == ACCEPT_BUDGET {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let slot = match this.slot.take() {
                Some(slot) => slot,
                None => match ready!(this.slots.poll_acquire(cx)) {
                    Some(slot) => slot,
                    // The semaphore is never closed.
                    None => return Poll::Ready(None),
                },
            };
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => {
                    accepted += 1;
                    this.start(tcp, peer, slot);
                }
                Poll::Ready(Err(e)) => {
                    this.slot = Some(slot);
                    if !is_connection_error(&e) {
                        tracing::warn!(error = %e, "accepting a connection failed; pausing for {ACCEPT_BACKOFF:?}");
                        this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    }
                }
                Poll::Pending => {
                    this.slot = Some(slot);
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<H: Handshake> std::fmt::Debug for Incoming<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("listener", &self.listener)
            .field("limits", &self.limits)
            .field("open", &self.open())
            .finish()
    }
}

/// An error of one connection, not of the listener: accept the next.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

// === impl Conn ===

impl<S: Connected> Connected for Conn<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let rest = &PREFACE[this.replayed..];
        if !rest.is_empty() {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// === impl Peers ===

impl Peers {
    /// Counts one more connection from `ip`, unless it has `limit` already.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PeerCount> {
        let ip = peer_key(ip);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            if *n == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *n += 1;
        Some(PeerCount {
            peers: Arc::clone(self),
            ip,
        })
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for PeerCount {
    fn drop(&mut self) {
        let mut open = self
            .peers
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
                // After a flood from many addresses, hand the table's memory back.
                if open.capacity() > SHRINK_PEERS_ABOVE && open.len() < SHRINK_PEERS_ABOVE / 4 {
                    open.shrink_to(SHRINK_PEERS_ABOVE / 4);
                }
            }
        }
    }
}

/// The address a peer is counted under: IPv4 (also when mapped into IPv6) as it is, IPv6 by its
/// /64, the block one host or site is given.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

// === impl Reports ===

/// Why a connection was closed before tonic saw it.
enum Closed {
    OverPeerLimit(usize),
    TimedOut(Duration),
    Failed(io::Error),
}

impl Reports {
    fn note(&self, peer: SocketAddr, why: Closed) {
        match &why {
            Closed::OverPeerLimit(limit) => {
                tracing::debug!(%peer, limit, "connection refused: max_connections_per_peer")
            }
            Closed::TimedOut(after) => {
                tracing::debug!(%peer, ?after, "connection closed: handshake_timeout passed")
            }
            Closed::Failed(e) => {
                tracing::debug!(%peer, error = %e, "connection closed: handshake failed")
            }
        }
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match why {
            Closed::OverPeerLimit(_) => s.over_peer_limit += 1,
            Closed::TimedOut(_) => s.timed_out += 1,
            Closed::Failed(e) => {
                s.failed += 1;
                s.last_failure = format!("{peer}: {e}");
            }
        }
        let now = Instant::now();
        if s.last.is_some_and(|t| now.duration_since(t) < REPORT_EVERY) {
            return;
        }
        s.last = Some(now);
        let ReportState {
            over_peer_limit,
            timed_out,
            failed,
            last_failure,
            ..
        } = std::mem::take(&mut *s);
        s.last = Some(now);
        drop(s);
        tracing::warn!(
            over_peer_limit,
            handshake_timed_out = timed_out,
            handshake_failed = failed,
            last_failure = %last_failure,
            "connections closed before HTTP/2 began (counts since the last report)"
        );
    }
}

#[cfg(test)]
mod tests;
