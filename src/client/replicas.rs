//! The replicas of a run: one channel, one health watch and one `Process` call per live daemon.
//!
//! tonic's `balance_list` is not used: it never drops a dead endpoint (calls keep failing on it)
//! and a stream on a killed server ends UNKNOWN, not UNAVAILABLE. Here each replica has its own
//! channel and call, and its own state:
//!
//! - **connecting**: connect, ask `grpc.health.v1` (SERVING, or no health service), open the call
//!   with the metadata `batchd-drain: give-back`, and watch health on the same connection;
//! - **live**: it gets batches ([`Pool::pick`]: fewest unanswered jobs);
//! - **draining**: its health said NOT_SERVING or it gave jobs back: no more batches, its send
//!   side is closed, its running jobs' results are still read;
//! - **down**: its call failed (any status but those no other replica would answer differently,
//!   see [`is_fatal`]), or ended: tried again after a jittered exponential backoff;
//! - **gone**: its address left its name's DNS answer, or the run is over.
//!
//! A `dns:///host:port` endpoint gives one replica per address, resolved again every
//! `resolve_every` and after each loss, so that new replicas join a running call. The [`Pool`]
//! reports what happened as [`Event`]s; the call core moves jobs accordingly.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::PollSender;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::endpoints::{self, Endpoints, Target};
use super::tls::Problem;
use super::{
    connection_error, transport, Alert, ClientError, TlsSetup, Token, TraceHeaders, Transport,
};
use crate::proto::{self, batch_service_client::BatchServiceClient};

/// The health service name a replica must serve (what Kubernetes' readiness probe asks too).
const SERVICE: &str = "batchd.v1.BatchService";
/// Longest a connection attempt (connect, health check, opening the call) may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// First pause before trying a lost replica again; doubles per failed attempt, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Least time between two resolutions of a name (a burst of losses resolves it once).
const RESOLVE_MIN_GAP: Duration = Duration::from_secs(1);
/// Requests waiting in a call's channel to the transport (the rest wait in its `outgoing`).
const CALL_BUFFER: usize = 2;

/// Identifies one `Process` call (a replica opens a new one each time it comes back).
pub type CallId = u64;

/// What every `Process` call of a run carries.
#[derive(Clone)]
pub(super) struct CallSetup {
    /// When the run's `--deadline` passes: each call gets what is left as its `grpc-timeout`.
    pub(super) deadline: Option<Instant>,
    /// Credentials.
    pub(super) token: Option<Token>,
    /// The run's trace context (one trace for every replica's spans).
    pub(super) trace: TraceHeaders,
}

/// How often names are resolved again, and how silent connections are found out.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    /// Period of `dns:///` resolution.
    pub(super) resolve_every: Duration,
    /// HTTP/2 pings on every replica's connection, this often, each answered within as long: a
    /// replica that vanished without closing it (a partition, a frozen host) is lost after at
    /// most twice this.
    pub(super) keepalive: Duration,
}

/// What happened to the replicas, for the call core.
#[derive(Debug)]
pub(super) enum Event {
    /// A response on a call.
    Reply {
        /// The replica.
        replica: usize,
        /// Its call.
        call: CallId,
        /// Results, and jobs given back.
        msg: proto::ProcessResponse,
    },
    /// A call gets no more jobs (its daemon drains); `unsent` are the requests it had not sent.
    Draining {
        /// The replica.
        replica: usize,
        /// Its call.
        call: CallId,
        /// Requests never sent on the call.
        unsent: Vec<proto::ProcessRequest>,
    },
    /// A call ended: OK (`lost` is `None`) or failed; none of its jobs without a result gets one.
    Ended {
        /// The replica.
        replica: usize,
        /// Its call.
        call: CallId,
        /// Why it was lost.
        lost: Option<String>,
        /// Requests never sent on the call.
        unsent: Vec<proto::ProcessRequest>,
    },
    /// A call was refused or failed in a way no other replica would change (credentials, the
    /// deadline, a request the daemon rejects).
    Fatal(Status),
    /// Something to say on stderr (a replica joined, or cannot be reached).
    Note(String),
    /// Something changed (a batch went out, a replica came up or went down): look again.
    Changed,
}

/// The replicas of a run; see the module doc.
pub(super) struct Pool {
    targets: Vec<TargetState>,
    replicas: Vec<Replica>,
    /// Connection attempts and resolutions under way, owned here (dropped with the pool).
    tasks: FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send>>>,
    setup: CallSetup,
    timing: Timing,
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
    next_call: CallId,
    /// Numbers connection attempts, so that an attempt's end is matched to its replica even
    /// after the replica's slot was reused.
    next_attempt: u64,
    /// Where the next scan of the replicas starts, so none is always served first.
    turn: usize,
    ever_live: bool,
    finishing: bool,
    /// The TLS of `https://` replicas (`None`: the system's CAs).
    tls: Option<TlsSetup>,
    /// What the replicas' connections read that explains a failure (a certificate refused).
    alert: Alert,
}

struct TargetState {
    target: Target,
    /// `dns:///`: when to resolve next (`None` while a resolution is under way).
    next_resolve: Option<Instant>,
    resolved_once: bool,
    error: Option<String>,
}

struct Replica {
    target: usize,
    /// How it is named in messages.
    name: String,
    /// Its address, for a `dns:///` target.
    addr: Option<SocketAddr>,
    how: How,
    state: State,
    /// Jobs assigned to its current call without a result yet.
    unanswered: usize,
    /// Connection attempts failed in a row.
    failures: u32,
    /// Why it is not live (the last failure).
    error: Option<String>,
    /// Whether its being down was said on stderr already (so its coming back is said too).
    noted: bool,
    /// Found by a resolution after the first one: its joining is said.
    announce: bool,
    /// The number of its latest connection attempt (0: none yet).
    attempt: u64,
}

#[derive(Clone)]
enum How {
    Endpoint(Box<Transport>),
    Client(BatchServiceClient<Channel>),
    Channel(Channel),
}

enum State {
    Connecting,
    Live(Conn),
    Draining(Conn),
    Down { retry_at: Instant },
    Gone,
}

struct Conn {
    call: CallId,
    /// The request side; `None` once closed (drained, or the run is over).
    tx: Option<PollSender<proto::ProcessRequest>>,
    responses: Streaming<proto::ProcessResponse>,
    health: Option<Streaming<HealthCheckResponse>>,
    /// Requests assigned to the call and not handed to its channel yet.
    outgoing: VecDeque<proto::ProcessRequest>,
}

/// What a task of the pool ends with.
enum Done {
    Connected {
        replica: usize,
        attempt: u64,
        res: Result<Box<Opened>, Failure>,
    },
    Resolved {
        target: usize,
        res: std::io::Result<Vec<SocketAddr>>,
    },
}

struct Opened {
    tx: PollSender<proto::ProcessRequest>,
    responses: Streaming<proto::ProcessResponse>,
    health: Option<Streaming<HealthCheckResponse>>,
}

enum Failure {
    /// Try again later.
    Retry(String),
    /// Give up the run.
    Fatal(Status),
}

// === impl Pool ===

impl Pool {
    /// Starts connecting to every endpoint (resolving `dns:///` names first).
    pub(super) fn new(
        endpoints: Endpoints,
        setup: CallSetup,
        timing: Timing,
    ) -> Result<Self, ClientError> {
        let mut pool = Self {
            targets: Vec::new(),
            replicas: Vec::new(),
            tasks: FuturesUnordered::new(),
            setup,
            timing,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            timer_at: None,
            next_call: 0,
            next_attempt: 0,
            turn: 0,
            ever_live: false,
            finishing: false,
            tls: endpoints.tls,
            alert: endpoints.alert,
        };
        let now = Instant::now();
        for target in endpoints.targets {
            let t = pool.targets.len();
            let how = match &target {
                Target::Url(url) => {
                    let ep = endpoint(url, None, &pool, timing.keepalive)?;
                    Some((url.clone(), How::Endpoint(Box::new(ep))))
                }
                Target::Client(c) => Some((target.name(), How::Client(c.clone()))),
                Target::Channel(c) => Some((target.name(), How::Channel(c.clone()))),
                Target::Dns { .. } => None,
            };
            let is_dns = how.is_none();
            pool.targets.push(TargetState {
                target,
                next_resolve: is_dns.then_some(now),
                resolved_once: !is_dns,
                error: None,
            });
            if let Some((name, how)) = how {
                pool.add_replica(t, name, None, how, false);
            }
        }
        Ok(pool)
    }

    /// Whether some replica was live at some point.
    pub(super) fn ever_live(&self) -> bool {
        self.ever_live
    }

    /// Replicas that take jobs now.
    pub(super) fn live(&self) -> usize {
        self.replicas
            .iter()
            .filter(|r| matches!(r.state, State::Live(_)))
            .count()
    }

    /// Replicas known and not gone.
    pub(super) fn known(&self) -> usize {
        self.replicas
            .iter()
            .filter(|r| !matches!(r.state, State::Gone))
            .count()
    }

    /// Calls still open (live or draining).
    pub(super) fn open_calls(&self) -> usize {
        self.replicas
            .iter()
            .filter(|r| matches!(r.state, State::Live(_) | State::Draining(_)))
            .count()
    }

    /// The replica's name, for messages.
    pub(super) fn name(&self, replica: usize) -> &str {
        self.replicas.get(replica).map_or("?", |r| r.name.as_str())
    }

    /// The live replica that should get the next batch: among those with nothing waiting to be
    /// sent, the one with the fewest unanswered jobs (a slow or stuck replica, whose daemon stops
    /// reading when its window is full, has a queue and gets nothing more).
    pub(super) fn pick(&self) -> Option<usize> {
        self.best(|c| c.outgoing.is_empty())
    }

    /// The live replica that should get a batch that must go somewhere: [`Pool::pick`], else the
    /// one with the fewest unanswered jobs.
    pub(super) fn pick_any(&self) -> Option<usize> {
        self.pick().or_else(|| self.best(|_| true))
    }

    fn best(&self, eligible: impl Fn(&Conn) -> bool) -> Option<usize> {
        let n = self.replicas.len();
        (0..n)
            .map(|k| (self.turn + k) % n)
            .filter(|&i| match &self.replicas[i].state {
                State::Live(c) => eligible(c),
                _ => false,
            })
            .min_by_key(|&i| self.replicas[i].unanswered)
    }

    /// Queues `request` (holding `jobs` jobs) on the live replica's call; returns the call, or
    /// `None` (and the request back) when the replica is not live.
    pub(super) fn send(
        &mut self,
        replica: usize,
        request: proto::ProcessRequest,
        jobs: usize,
    ) -> Result<CallId, proto::ProcessRequest> {
        let Some(r) = self.replicas.get_mut(replica) else {
            return Err(request);
        };
        match &mut r.state {
            State::Live(c) => {
                c.outgoing.push_back(request);
                r.unanswered += jobs;
                self.turn = replica + 1;
                Ok(c.call)
            }
            _ => Err(request),
        }
    }

    /// `n` jobs of the replica's `call` got their answer (a result, or given back).
    pub(super) fn answered(&mut self, replica: usize, call: CallId, n: usize) {
        if let Some(r) = self.replicas.get_mut(replica) {
            if r.call() == Some(call) {
                r.unanswered = r.unanswered.saturating_sub(n);
            }
        }
    }

    /// The replica's daemon drains (it gave jobs back): no more batches for its call, whose send
    /// side is closed. Returns the requests it had not sent, or `None` if the call was not live.
    pub(super) fn drain(
        &mut self,
        replica: usize,
        call: CallId,
    ) -> Option<Vec<proto::ProcessRequest>> {
        let r = self.replicas.get_mut(replica)?;
        if r.call() != Some(call) {
            return None;
        }
        match std::mem::replace(&mut r.state, State::Gone) {
            State::Live(mut conn) => {
                let unsent = conn.close();
                // The watch would hold the draining daemon's connection open.
                conn.health = None;
                r.state = State::Draining(conn);
                Some(unsent)
            }
            other => {
                r.state = other;
                None
            }
        }
    }

    /// The run is over: closes every call's send side (each ends OK once its daemon sees it) and
    /// stops connecting.
    pub(super) fn finish(&mut self) {
        if self.finishing {
            return;
        }
        self.finishing = true;
        for r in &mut self.replicas {
            match &mut r.state {
                State::Live(c) | State::Draining(c) => {
                    c.close();
                }
                _ => r.state = State::Gone,
            }
        }
    }

    /// The error for a run that never reached any replica: every endpoint was tried once and
    /// failed (refused, unresolvable, not serving). `None` while that is not so.
    pub(super) fn unreachable(&self) -> Option<ClientError> {
        if self.ever_live
            || !self.tasks.is_empty()
            || self.targets.iter().any(|t| !t.resolved_once)
            || self.replicas.iter().any(|r| {
                matches!(
                    r.state,
                    State::Connecting | State::Live(_) | State::Draining(_)
                )
            })
        {
            return None;
        }
        let endpoint = self
            .targets
            .iter()
            .map(|t| t.target.name())
            .collect::<Vec<_>>()
            .join(", ");
        Some(ClientError::Unreachable {
            endpoint,
            reason: self.reasons(),
        })
    }

    /// The error of a run whose replicas were all lost for `waited`.
    pub(super) fn no_replica(&self, waited: Duration) -> ClientError {
        ClientError::NoReplica {
            endpoints: self
                .targets
                .iter()
                .map(|t| t.target.name())
                .collect::<Vec<_>>()
                .join(", "),
            waited,
            reasons: self.reasons(),
        }
    }

    /// Why each replica (and each name that resolves to none) is not live.
    fn reasons(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let mut any = false;
            for r in self.replicas.iter().filter(|r| r.target == i) {
                if matches!(r.state, State::Gone) {
                    continue;
                }
                any = true;
                if let Some(e) = &r.error {
                    parts.push(if self.replicas.len() == 1 {
                        e.clone()
                    } else {
                        format!("{}: {e}", r.name)
                    });
                }
            }
            if !any {
                let why = t.error.as_deref().unwrap_or("resolves to no address");
                parts.push(format!("{}: {why}", t.target.name()));
            }
        }
        parts.join("; ")
    }

    /// The next thing that happened to a replica.
    pub(super) fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        loop {
            if let Poll::Ready(Some(done)) = self.tasks.poll_next_unpin(cx) {
                match self.done(done) {
                    Some(event) => return Poll::Ready(event),
                    None => continue,
                }
            }
            if let Some(at) = self.next_wake() {
                if self.timer_at != Some(at) {
                    self.timer.as_mut().reset(at.into());
                    self.timer_at = Some(at);
                }
                if self.timer.as_mut().poll(cx).is_ready() {
                    self.timer_at = None;
                    self.start_due(Instant::now().max(at));
                    continue;
                }
            }
            let n = self.replicas.len();
            for k in 0..n {
                let i = (self.turn + k) % n;
                if let Poll::Ready(event) = self.poll_replica(i, cx) {
                    self.turn = i + 1;
                    return Poll::Ready(event);
                }
            }
            return Poll::Pending;
        }
    }

    fn poll_replica(&mut self, i: usize, cx: &mut Context<'_>) -> Poll<Event> {
        let r = &mut self.replicas[i];
        let (conn, draining) = match &mut r.state {
            State::Live(c) => (c, false),
            State::Draining(c) => (c, true),
            _ => return Poll::Pending,
        };
        let call = conn.call;
        match conn.responses.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(msg))) => {
                return Poll::Ready(Event::Reply {
                    replica: i,
                    call,
                    msg,
                })
            }
            Poll::Ready(Some(Err(status))) => {
                if is_fatal(&status) && !self.finishing {
                    return Poll::Ready(Event::Fatal(status));
                }
                let why = describe(&status);
                return Poll::Ready(self.down(i, Some(why)));
            }
            Poll::Ready(None) => return Poll::Ready(self.down(i, None)),
            Poll::Pending => {}
        }
        if let Some(health) = &mut conn.health {
            loop {
                match health.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(m))) if m.status() == ServingStatus::Serving => continue,
                    Poll::Ready(Some(Ok(m))) if m.status() == ServingStatus::NotServing => {
                        conn.health = None;
                        if draining {
                            break;
                        }
                        let unsent = conn.close();
                        if let State::Live(conn) = std::mem::replace(&mut r.state, State::Gone) {
                            r.state = State::Draining(conn);
                        }
                        return Poll::Ready(Event::Draining {
                            replica: i,
                            call,
                            unsent,
                        });
                    }
                    // Unknown statuses are not a drain; a watch that fails or ends says
                    // nothing the call itself will not say.
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(Some(Err(_)) | None) => {
                        conn.health = None;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        if !conn.outgoing.is_empty() {
            if let Some(tx) = &mut conn.tx {
                match tx.poll_reserve(cx) {
                    Poll::Ready(Ok(())) => {
                        if let Some(request) = conn.outgoing.pop_front() {
                            // Cannot fail after a successful reserve; if the call ended
                            // meanwhile, its end comes on the response stream.
                            let _ = tx.send_item(request);
                        }
                        return Poll::Ready(Event::Changed);
                    }
                    // The call is over; its status comes on the response stream.
                    Poll::Ready(Err(_)) => conn.tx = None,
                    Poll::Pending => {}
                }
            }
        }
        Poll::Pending
    }

    /// The replica's call ended (`why`: lost); it is tried again later unless the run is over.
    fn down(&mut self, i: usize, why: Option<String>) -> Event {
        let finishing = self.finishing;
        let r = &mut self.replicas[i];
        let state = std::mem::replace(&mut r.state, State::Gone);
        let (call, unsent) = match state {
            State::Live(mut c) | State::Draining(mut c) => (c.call, c.close()),
            other => {
                r.state = other;
                return Event::Changed;
            }
        };
        r.unanswered = 0;
        if !finishing {
            r.error = Some(why.clone().unwrap_or_else(|| "its call ended".into()));
            r.state = State::Down {
                retry_at: Instant::now() + backoff(0),
            };
            r.noted = true;
            let t = r.target;
            self.resolve_soon(t);
        }
        Event::Ended {
            replica: i,
            call,
            lost: why,
            unsent,
        }
    }

    /// Resolves the target's name again soon (after a loss), at most every [`RESOLVE_MIN_GAP`].
    fn resolve_soon(&mut self, t: usize) {
        if let Some(target) = self.targets.get_mut(t) {
            if let Some(at) = &mut target.next_resolve {
                let soon = Instant::now() + RESOLVE_MIN_GAP;
                *at = (*at).min(soon);
            }
        }
    }

    /// When a reconnection or a resolution is due next.
    fn next_wake(&self) -> Option<Instant> {
        if self.finishing {
            return None;
        }
        let retries = self.replicas.iter().filter_map(|r| match r.state {
            State::Down { retry_at } => Some(retry_at),
            _ => None,
        });
        let resolves = self.targets.iter().filter_map(|t| t.next_resolve);
        retries.chain(resolves).min()
    }

    /// Starts the reconnections and resolutions due at `now`.
    fn start_due(&mut self, now: Instant) {
        for i in 0..self.replicas.len() {
            if matches!(self.replicas[i].state, State::Down { retry_at } if retry_at <= now) {
                self.connect(i);
            }
        }
        for t in 0..self.targets.len() {
            let target = &mut self.targets[t];
            let Target::Dns { host, port, .. } = &target.target else {
                continue;
            };
            if target.next_resolve.is_some_and(|at| at <= now) {
                target.next_resolve = None;
                let (host, port) = (host.clone(), *port);
                self.tasks.push(Box::pin(async move {
                    Done::Resolved {
                        target: t,
                        res: endpoints::resolve(&host, port).await,
                    }
                }));
            }
        }
    }

    fn add_replica(
        &mut self,
        target: usize,
        name: String,
        addr: Option<SocketAddr>,
        how: How,
        announce: bool,
    ) {
        let replica = Replica {
            target,
            name,
            addr,
            how,
            state: State::Gone,
            unanswered: 0,
            failures: 0,
            error: None,
            noted: false,
            announce,
            attempt: 0,
        };
        // A slot of a replica gone for good is reused: no job refers to it any more (its calls'
        // ids are never reused).
        let i = match self
            .replicas
            .iter()
            .position(|r| matches!(r.state, State::Gone))
        {
            Some(i) => {
                self.replicas[i] = replica;
                i
            }
            None => {
                self.replicas.push(replica);
                self.replicas.len() - 1
            }
        };
        self.connect(i);
    }

    fn connect(&mut self, i: usize) {
        self.next_attempt += 1;
        let attempt = self.next_attempt;
        let r = &mut self.replicas[i];
        r.state = State::Connecting;
        r.attempt = attempt;
        let how = r.how.clone();
        let setup = self.setup.clone();
        self.tasks.push(Box::pin(async move {
            let res = match tokio::time::timeout(CONNECT_LIMIT, open(how, setup)).await {
                Ok(res) => res,
                Err(_) => Err(Failure::Retry(format!(
                    "no answer within {}",
                    humantime::format_duration(CONNECT_LIMIT)
                ))),
            };
            Done::Connected {
                replica: i,
                attempt,
                res,
            }
        }));
    }

    /// Takes in a finished task; returns what the call core should hear of it.
    fn done(&mut self, done: Done) -> Option<Event> {
        match done {
            Done::Connected {
                replica,
                attempt,
                res,
            } => self.connected(replica, attempt, res),
            Done::Resolved { target, res } => {
                self.resolved(target, res);
                Some(Event::Changed)
            }
        }
    }

    fn connected(
        &mut self,
        i: usize,
        attempt: u64,
        res: Result<Box<Opened>, Failure>,
    ) -> Option<Event> {
        let finishing = self.finishing;
        let call = self.next_call;
        let r = self.replicas.get_mut(i)?;
        if !matches!(r.state, State::Connecting) || r.attempt != attempt || finishing {
            // Gone meanwhile (its address left the name, or the run is over), or the attempt
            // was of an earlier replica whose slot this one reused: the connection is dropped.
            return Some(Event::Changed);
        }
        match res {
            Ok(opened) => {
                self.next_call += 1;
                let rejoined = r.noted || r.announce;
                r.state = State::Live(Conn {
                    call,
                    tx: Some(opened.tx),
                    responses: opened.responses,
                    health: opened.health,
                    outgoing: VecDeque::new(),
                });
                r.failures = 0;
                r.error = None;
                r.noted = false;
                r.announce = false;
                self.ever_live = true;
                Some(match rejoined {
                    true => Event::Note(format!("batchctl: replica {} is live", r.name)),
                    false => Event::Changed,
                })
            }
            Err(Failure::Fatal(status)) => Some(Event::Fatal(status)),
            Err(Failure::Retry(why)) => {
                r.failures = r.failures.saturating_add(1);
                r.state = State::Down {
                    retry_at: Instant::now() + backoff(r.failures),
                };
                let note = (self.ever_live && !r.noted)
                    .then(|| format!("batchctl: replica {} unreachable ({why}); retrying", r.name));
                r.noted |= self.ever_live;
                r.error = Some(why);
                Some(note.map_or(Event::Changed, Event::Note))
            }
        }
    }

    fn resolved(&mut self, t: usize, res: std::io::Result<Vec<SocketAddr>>) {
        let now = Instant::now();
        let every = self.timing.resolve_every;
        let Some(target) = self.targets.get_mut(t) else {
            return;
        };
        let announce = target.resolved_once;
        target.resolved_once = true;
        let Target::Dns { host, port, scheme } = &target.target else {
            return;
        };
        let (host, port, scheme) = (host.clone(), *port, *scheme);
        let addrs = match res {
            Ok(addrs) if !addrs.is_empty() => addrs,
            Ok(_) | Err(_) => {
                let why = match res {
                    Err(e) => format!("cannot resolve {host}: {e}"),
                    Ok(_) => format!("{host} resolves to no address"),
                };
                target.error = Some(why);
                // Nothing to run on: look again soon rather than at the next period.
                let alive = self.replicas.iter().any(|r| {
                    r.target == t && matches!(r.state, State::Live(_) | State::Draining(_))
                });
                let wait = if alive {
                    every
                } else {
                    every.min(RESOLVE_MIN_GAP)
                };
                self.targets[t].next_resolve = Some(now + wait);
                return;
            }
        };
        target.error = None;
        target.next_resolve = Some(now + every);
        // Addresses that left the answer: not tried again (a live call goes on until it ends).
        for r in &mut self.replicas {
            if r.target == t
                && r.addr.is_some_and(|a| !addrs.contains(&a))
                && matches!(r.state, State::Down { .. } | State::Connecting)
            {
                r.state = State::Gone;
            }
        }
        for addr in addrs {
            let known = self
                .replicas
                .iter()
                .any(|r| r.target == t && r.addr == Some(addr) && !matches!(r.state, State::Gone));
            if known || self.finishing {
                continue;
            }
            let (url, origin) = endpoints::address_urls(scheme, &host, port, addr);
            let Ok(ep) = endpoint(&url, Some(&origin), self, self.timing.keepalive) else {
                continue;
            };
            let name = format!("{url} (dns:///{host}:{port})");
            self.add_replica(t, name, Some(addr), How::Endpoint(Box::new(ep)), announce);
        }
    }
}

// === impl Replica ===

impl Replica {
    /// Its current call, if it has one.
    fn call(&self) -> Option<CallId> {
        match &self.state {
            State::Live(c) | State::Draining(c) => Some(c.call),
            _ => None,
        }
    }
}

// === impl Conn ===

impl Conn {
    /// Closes the send side (the daemon sees a half-close) and returns the requests not sent.
    fn close(&mut self) -> Vec<proto::ProcessRequest> {
        if let Some(mut tx) = self.tx.take() {
            tx.close();
        }
        self.outgoing.drain(..).collect()
    }
}

/// The transport to `url` with keepalive pings (and the pool's TLS); `origin` is the authority
/// its calls name.
fn endpoint(
    url: &str,
    origin: Option<&str>,
    pool: &Pool,
    keepalive: Duration,
) -> Result<Transport, ClientError> {
    Ok(
        transport(url, origin, pool.tls.as_ref(), &pool.alert)?.map(|ep| {
            ep.http2_keep_alive_interval(keepalive)
                .keep_alive_timeout(keepalive)
                .keep_alive_while_idle(true)
        }),
    )
}

/// Connects, checks health and opens the call.
async fn open(how: How, setup: CallSetup) -> Result<Box<Opened>, Failure> {
    let transport = match &how {
        How::Endpoint(t) => Some(t.clone()),
        How::Client(_) | How::Channel(_) => None,
    };
    match (open_call(how, setup).await, transport) {
        // A daemon refuses a client certificate after the client's side of a TLS 1.3 handshake
        // is done: the first call fails, and what the connection read says why.
        (Err(Failure::Retry(why)), Some(t)) => Err(recorded(&t).unwrap_or(Failure::Retry(why))),
        (res, _) => res,
    }
}

/// What a replica's connections recorded, as a failure no other replica would change: a
/// certificate refused (the same settings go to every replica), TLS where plaintext was expected.
fn recorded(transport: &Transport) -> Option<Failure> {
    match transport.problem()? {
        Problem::Certificate(reason) | Problem::SpeaksTls(reason) => {
            Some(Failure::Fatal(Status::unavailable(reason)))
        }
    }
}

async fn open_call(how: How, setup: CallSetup) -> Result<Box<Opened>, Failure> {
    let (client, channel) = match how {
        How::Endpoint(t) => {
            let channel =
                t.connect()
                    .await
                    .map_err(|e| match connection_error("", t.is_tls(), &e) {
                        ClientError::Certificate { reason, .. } => {
                            Failure::Fatal(Status::unavailable(reason))
                        }
                        ClientError::Unreachable { reason, .. } => Failure::Retry(reason),
                        other => Failure::Retry(other.to_string()),
                    })?;
            (BatchServiceClient::new(channel.clone()), Some(channel))
        }
        How::Channel(channel) => (BatchServiceClient::new(channel.clone()), Some(channel)),
        How::Client(client) => (client, None),
    };
    let mut client = client
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let health = match channel {
        Some(channel) => check_health(channel).await?,
        None => None,
    };
    let (tx, rx) = mpsc::channel(CALL_BUFFER);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(at) = setup.deadline {
        let left = at
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Failure::Fatal(Status::deadline_exceeded("the run's deadline passed"))
            })?;
        request.set_timeout(left);
    }
    if let Some(token) = &setup.token {
        token.insert_into(request.metadata_mut());
    }
    setup.trace.insert_into(request.metadata_mut());
    let (key, value) = proto::GIVE_BACK_METADATA;
    request
        .metadata_mut()
        .insert(key, MetadataValue::from_static(value));
    let responses = client
        .process(request)
        .await
        .map_err(|status| match is_fatal(&status) {
            true => Failure::Fatal(status),
            false => Failure::Retry(describe(&status)),
        })?
        .into_inner();
    Ok(Box::new(Opened {
        tx: PollSender::new(tx),
        responses,
        health,
    }))
}

/// Asks whether the daemon serves BatchService, then watches it on the same connection. A
/// daemon without a health service is taken as serving (and not watched).
async fn check_health(channel: Channel) -> Result<Option<Streaming<HealthCheckResponse>>, Failure> {
    let mut health = HealthClient::new(channel);
    let ask = || HealthCheckRequest {
        service: SERVICE.into(),
    };
    match health.check(ask()).await {
        Ok(r) if r.get_ref().status() == ServingStatus::Serving => {}
        Ok(r) => {
            return Err(Failure::Retry(format!(
                "health is {} (draining or starting)",
                r.get_ref().status().as_str_name()
            )))
        }
        Err(s) if s.code() == Code::Unimplemented => return Ok(None),
        Err(s) => return Err(Failure::Retry(describe(&s))),
    }
    Ok(health
        .watch(ask())
        .await
        .ok()
        .map(tonic::Response::into_inner))
}

/// Whether a failed call would fail alike on every replica, so that moving its jobs is no use:
/// credentials, the deadline, a request the daemon refuses. Everything else (UNAVAILABLE, a
/// reset or a protocol error ending UNKNOWN, CANCELLED, INTERNAL, too many calls) loses the
/// replica, and its jobs without a result go to the others.
pub(super) fn is_fatal(status: &Status) -> bool {
    match status.code() {
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::DeadlineExceeded
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::NotFound
        | Code::AlreadyExists => true,
        // Too many calls open (`max_calls`, a principal's quota) is that replica's; a message over
        // the daemon's limit would be refused everywhere.
        Code::ResourceExhausted => !status.message().contains("calls"),
        _ => false,
    }
}

/// `UNAVAILABLE: batchd is shutting down…`, with the transport's causes.
fn describe(status: &Status) -> String {
    let code = format!("{:?}", status.code()).to_uppercase();
    let mut text = format!("{code}: {}", status.message());
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The pause before attempt `failures + 1`: exponential from [`BACKOFF_FIRST`] to
/// [`BACKOFF_MAX`], times a random factor in [0.5, 1.5) so that clients do not come back in step.
fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_FIRST
        .saturating_mul(1 << failures.min(10))
        .min(BACKOFF_MAX);
    base.mul_f64(0.5 + unit_random())
}

/// A number in [0, 1) from the process's random hash keys (no RNG dependency for jitter).
fn unit_random() -> f64 {
    use std::hash::BuildHasher;
    let h = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        for failures in 0..20 {
            let base = BACKOFF_FIRST
                .saturating_mul(1 << failures.min(10))
                .min(BACKOFF_MAX);
            let d = backoff(failures);
            assert!(d >= base / 2 && d < base * 3 / 2, "{failures}: {d:?}");
        }
        let spread: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(3)).collect();
        assert!(spread.len() > 10, "jittered: {spread:?}");
    }

    /// A pool over one `dns:///` name whose first address is connecting; nothing is polled, so
    /// attempts end only when the test says so.
    fn dns_pool(first: SocketAddr) -> Pool {
        let endpoints = Endpoints::parse(&["dns:///replicas.invalid:50051"], false).unwrap();
        let timing = Timing {
            resolve_every: Duration::from_secs(60),
            keepalive: Duration::from_secs(60),
        };
        let setup = CallSetup {
            deadline: None,
            token: None,
            trace: TraceHeaders {
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                tracestate: None,
            },
        };
        let mut pool = Pool::new(endpoints, setup, timing).unwrap();
        pool.resolved(0, Ok(vec![first]));
        assert_eq!((pool.replicas.len(), pool.replicas[0].attempt), (1, 1));
        pool
    }

    #[tokio::test]
    async fn a_stale_attempt_does_not_touch_the_replica_that_reused_its_slot() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:50051".parse().unwrap(),
            "10.0.0.2:50051".parse().unwrap(),
        );
        let mut pool = dns_pool(a);
        // `a` leaves the name while connecting and `b` joins: `b` takes slot 0.
        pool.resolved(0, Ok(vec![b]));
        assert_eq!(pool.replicas.len(), 1);
        assert_eq!(pool.replicas[0].addr, Some(b));
        assert!(matches!(pool.replicas[0].state, State::Connecting));
        // `a`'s attempt (number 1) ends now: it must neither mark `b` down nor end the run.
        let stale = Done::Connected {
            replica: 0,
            attempt: 1,
            res: Err(Failure::Retry("connection refused".into())),
        };
        assert!(matches!(pool.done(stale), Some(Event::Changed)));
        assert!(matches!(pool.replicas[0].state, State::Connecting));
        assert_eq!(pool.replicas[0].failures, 0);
        let stale = Done::Connected {
            replica: 0,
            attempt: 1,
            res: Err(Failure::Fatal(Status::unauthenticated("stale"))),
        };
        assert!(matches!(pool.done(stale), Some(Event::Changed)));
        // `b`'s own attempt is still heard.
        let own = Done::Connected {
            replica: 0,
            attempt: pool.replicas[0].attempt,
            res: Err(Failure::Retry("connection refused".into())),
        };
        assert!(pool.done(own).is_some());
        assert!(matches!(pool.replicas[0].state, State::Down { .. }));
        assert_eq!(pool.replicas[0].failures, 1);
    }

    #[test]
    fn fatal_statuses_are_the_ones_no_replica_would_change() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Cancelled,
            Code::Internal,
        ] {
            assert!(!is_fatal(&Status::new(code, "x")), "{code:?}");
        }
        for code in [
            Code::Unauthenticated,
            Code::DeadlineExceeded,
            Code::InvalidArgument,
        ] {
            assert!(is_fatal(&Status::new(code, "x")), "{code:?}");
        }
        let quota = Status::resource_exhausted("too many concurrent calls (max_calls is 4)");
        assert!(!is_fatal(&quota));
        assert!(is_fatal(&Status::resource_exhausted("message too large")));
    }
}
