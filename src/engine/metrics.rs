//! The engine's own instruments: counters, gauges and fixed-bucket histograms over plain atomics
//! (the hot path pays one relaxed add each, or nothing when a session tallies locally).
//!
//! Exporters never touch the atomics: [`families`] is the one table of what the engine measures
//! (name, kind, help, labels) and [`Engine::read`] gives a family's current samples. The Prometheus
//! text and the OTLP push in `telemetry` are both written from it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::job::Outcome;

mod family;
mod histogram;
mod process;

pub use family::{families, Family, Kind, Value};
pub use histogram::Histogram;
pub(crate) use histogram::LocalHistogram;
pub use process::ProcessFigures;

#[cfg(doc)]
use super::Engine;

/// Upper bounds of the job queue-time and run-time buckets, in nanoseconds.
const TIME_BUCKETS: &[u64] = &[
    10_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
    30_000_000_000,
    120_000_000_000,
];

/// Upper bounds of the cancellation-latency buckets, in nanoseconds.
const CANCEL_BUCKETS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    50_000_000,
    250_000_000,
    1_000_000_000,
];

/// Upper bounds of the results-per-message buckets.
const COUNT_BUCKETS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

/// Nanoseconds per second: histograms of durations count nanoseconds and export seconds.
const NANOS: f64 = 1e9;

/// Why a call was refused before its stream was read (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `max_calls` calls are open.
    TooManyCalls,
    /// The daemon is shutting down.
    ShuttingDown,
    /// No valid credentials while principals are configured.
    Unauthenticated,
    /// Its principal already has `max_calls` calls open.
    PrincipalMaxCalls,
}

/// How a call ended (the `reason` label of `batchd_calls_ended_total`, and the session span's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The client half-closed and every job was answered.
    HalfClose,
    /// The client went away (reset, disconnect, dropped call).
    Disconnect,
    /// The call's gRPC deadline passed.
    Deadline,
    /// The daemon shut down.
    Shutdown,
    /// The call ended with an error status (invalid request, transport error).
    Error,
}

/// The reasons that stop a call's jobs, in the order of `cancel_latency`.
const CANCEL_REASONS: [EndReason; 4] = [
    EndReason::Disconnect,
    EndReason::Deadline,
    EndReason::Shutdown,
    EndReason::Error,
];

/// The jobs of one handler waiting for a worker slot and holding one (gauges), and admitted since
/// start (a counter), in that order.
#[derive(Debug, Default)]
struct HandlerGauges([AtomicU64; 3]);

/// A session's changes to the per-handler gauges, folded in by [`Metrics::fold_gauges`] before the
/// session yields: the gauges are exact whenever anyone can look, and a job's start touches no
/// shared cache line.
#[derive(Debug)]
pub(crate) struct GaugeDeltas {
    /// Queued, running and admitted deltas by handler row; allocated when the session admits a job.
    rows: Vec<[i32; 3]>,
    /// Handler rows of the engine.
    len: usize,
    dirty: bool,
}

/// The engine's live counters, gauges and histograms; exporters read them through [`families`].
#[derive(Debug)]
pub struct Metrics {
    /// Calls whose session is alive.
    calls_open: AtomicU64,
    /// Queued, running and admitted jobs by handler row (same rows as `finished`).
    gauges: Box<[HandlerGauges]>,
    /// Results held by sessions, not yet handed to the transport.
    results_buffered: AtomicU64,
    /// Handler names, in the order of `finished`'s rows; one more row counts unknown handlers.
    handlers: Vec<String>,
    /// Jobs finished, by handler row and outcome in [`Outcome::ALL`] order.
    finished: Box<[[AtomicU64; 5]]>,
    /// Time from admission to start.
    queue_time: Histogram,
    /// Time from start to end.
    run_time: Histogram,
    /// From the moment the daemon learns a call is over to its last job dropped, by the
    /// [`EndReason`] that stopped the jobs.
    cancel_latency: [Histogram; 4],
    /// Results per response message.
    coalesced: Histogram,
    /// Times a session stopped reading its stream because its window was full.
    backpressure: AtomicU64,
    /// Calls refused, by [`Rejection`].
    rejected_calls: [AtomicU64; Rejection::COUNT],
    /// Calls ended, by [`EndReason`].
    calls_ended: [AtomicU64; 5],
}

// === impl Rejection, EndReason ===

impl Rejection {
    /// How many reasons there are.
    pub(crate) const COUNT: usize = 4;
    pub(crate) const ALL: [Self; Self::COUNT] = [
        Self::TooManyCalls,
        Self::ShuttingDown,
        Self::Unauthenticated,
        Self::PrincipalMaxCalls,
    ];

    /// The label value: `too_many_calls`, `shutting_down`, `unauthenticated` or
    /// `principal_max_calls`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooManyCalls => "too_many_calls",
            Self::ShuttingDown => "shutting_down",
            Self::Unauthenticated => "unauthenticated",
            Self::PrincipalMaxCalls => "principal_max_calls",
        }
    }

    /// Its place in [`Rejection::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl EndReason {
    const ALL: [Self; 5] = [
        Self::HalfClose,
        Self::Disconnect,
        Self::Deadline,
        Self::Shutdown,
        Self::Error,
    ];

    /// The label value: `half_close`, `disconnect`, `deadline`, `shutdown` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HalfClose => "half_close",
            Self::Disconnect => "disconnect",
            Self::Deadline => "deadline",
            Self::Shutdown => "shutdown",
            Self::Error => "error",
        }
    }
}

// === impl GaugeDeltas ===

impl GaugeDeltas {
    /// Adds `n` (possibly negative) to the queued jobs of handler `row`.
    pub(crate) fn queued(&mut self, row: usize, n: i32) {
        self.add(row, 0, n);
    }

    /// Adds `n` (possibly negative) to the running jobs of handler `row`.
    pub(crate) fn running(&mut self, row: usize, n: i32) {
        self.add(row, 1, n);
    }

    /// Counts `n` more admitted jobs of handler `row`.
    pub(crate) fn admitted(&mut self, row: usize, n: i32) {
        self.add(row, 2, n);
    }

    fn add(&mut self, row: usize, which: usize, n: i32) {
        if self.rows.is_empty() {
            self.rows = vec![[0; 3]; self.len.max(1)];
        }
        let last = self.rows.len() - 1;
        let d = &mut self.rows[row.min(last)][which];
        // A session holds at most its window of jobs: a turn's delta is far inside i32.
        *d = d.saturating_add(n);
        self.dirty = true;
    }
}

// === impl Metrics ===

impl Metrics {
    /// Metrics for an engine running these handlers (by name, in a fixed order).
    pub(crate) fn new(handlers: Vec<String>) -> Self {
        let rows = handlers.len() + 1;
        Self {
            calls_open: AtomicU64::new(0),
            gauges: (0..rows).map(|_| HandlerGauges::default()).collect(),
            results_buffered: AtomicU64::new(0),
            handlers,
            finished: (0..rows)
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            queue_time: Histogram::new(TIME_BUCKETS, NANOS),
            run_time: Histogram::new(TIME_BUCKETS, NANOS),
            cancel_latency: std::array::from_fn(|_| Histogram::new(CANCEL_BUCKETS, NANOS)),
            coalesced: Histogram::new(COUNT_BUCKETS, 1.0),
            backpressure: AtomicU64::new(0),
            rejected_calls: std::array::from_fn(|_| AtomicU64::new(0)),
            calls_ended: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The name of the handler at metrics row `row` (`_unknown` past the known ones).
    pub(crate) fn handler_name(&self, row: usize) -> &str {
        self.handlers.get(row).map_or("_unknown", String::as_str)
    }

    /// Counts a call whose session started.
    pub(crate) fn call_opened(&self) {
        self.calls_open.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call whose session is gone.
    pub(crate) fn call_closed(&self) {
        self.calls_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a refused call.
    pub(crate) fn rejected(&self, why: Rejection) {
        self.rejected_calls[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an ended call.
    pub(crate) fn ended(&self, why: EndReason) {
        let i = EndReason::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.calls_ended[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a call that stopped being read because its window or byte budget was full.
    pub(crate) fn stalled(&self) {
        self.backpressure.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` more results wait for the transport.
    pub(crate) fn buffered(&self, n: usize) {
        self.results_buffered.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` results were handed to the transport or dropped with their call.
    pub(crate) fn unbuffered(&self, n: usize) {
        self.results_buffered.fetch_sub(n as u64, Ordering::Relaxed);
    }

    /// Counts `n` jobs of handler `row` that finished with `outcome`.
    pub(crate) fn finished(&self, row: usize, outcome: Outcome, n: usize) {
        let last = self.finished.len() - 1;
        self.finished[row.min(last)][outcome.index()].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records that one response message carried `n` results.
    pub(crate) fn coalesced(&self, n: usize) {
        self.coalesced.observe(n as u64);
    }

    /// Records how long the jobs of a call ended by `why` kept going after the daemon knew.
    pub(crate) fn observe_cancel(&self, why: EndReason, latency: Duration) {
        if let Some(i) = CANCEL_REASONS.iter().position(|r| *r == why) {
            self.cancel_latency[i].observe_duration(latency);
        }
    }

    /// Records a job's queue time in a session's own tally.
    pub(crate) fn queued_for(&self, local: &mut LocalHistogram, d: Duration) {
        self.queue_time.observe_local(local, d);
    }

    /// Records a job's run time in a session's own tally.
    pub(crate) fn ran_for(&self, local: &mut LocalHistogram, d: Duration) {
        self.run_time.observe_local(local, d);
    }

    /// Adds a session's queue and run times since its last fold, and clears them.
    pub(crate) fn fold_times(&self, queued: &mut LocalHistogram, ran: &mut LocalHistogram) {
        self.queue_time.fold(queued);
        self.run_time.fold(ran);
    }

    /// An empty tally of gauge changes for one session.
    pub(crate) fn gauge_deltas(&self) -> GaugeDeltas {
        GaugeDeltas {
            rows: Vec::new(),
            len: self.gauges.len(),
            dirty: false,
        }
    }

    /// Adds a session's gauge changes since its last fold, and clears them.
    pub(crate) fn fold_gauges(&self, local: &mut GaugeDeltas) {
        if !std::mem::take(&mut local.dirty) {
            return;
        }
        let last = self.gauges.len() - 1;
        for (row, d) in local.rows.iter_mut().enumerate() {
            let g = &self.gauges[row.min(last)];
            for (shared, n) in g.0.iter().zip(d.iter_mut()) {
                let n = std::mem::take(n);
                if n != 0 {
                    // Two's complement: adding the wrapped negative delta subtracts.
                    shared.fetch_add(i64::from(n) as u64, Ordering::Relaxed);
                }
            }
        }
    }

    /// Calls whose session is alive.
    pub(crate) fn calls_open(&self) -> u64 {
        self.calls_open.load(Ordering::Relaxed)
    }

    /// Results held by sessions, not yet handed to the transport.
    pub(crate) fn results_buffered(&self) -> u64 {
        self.results_buffered.load(Ordering::Relaxed)
    }

    /// Queued, running and admitted jobs over all handlers.
    pub(crate) fn jobs_by_state(&self) -> [u64; 3] {
        let mut sums = [0u64; 3];
        for g in self.gauges.iter() {
            for (s, a) in sums.iter_mut().zip(&g.0) {
                *s = s.wrapping_add(a.load(Ordering::Relaxed));
            }
        }
        sums
    }

    /// Jobs finished with each outcome, over all handlers.
    pub(crate) fn finished_by_outcome(&self) -> [u64; 5] {
        let mut sums = [0; 5];
        for row in self.finished.iter() {
            for (s, c) in sums.iter_mut().zip(row) {
                *s += c.load(Ordering::Relaxed);
            }
        }
        sums
    }

    /// Every handler's queued, running and admitted jobs (the unknown-handler row never has one).
    fn handler_gauges(&self) -> impl Iterator<Item = (&str, [u64; 3])> + '_ {
        self.handlers
            .iter()
            .zip(self.gauges.iter())
            .map(|(name, g)| {
                let figures = std::array::from_fn(|i| g.0[i].load(Ordering::Relaxed));
                (name.as_str(), figures)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_deltas_fold_into_the_handler_rows() {
        let m = Metrics::new(vec!["a".into(), "b".into()]);
        let mut d = m.gauge_deltas();
        d.queued(0, 3);
        d.queued(1, 1);
        m.fold_gauges(&mut d);
        assert_eq!(m.jobs_by_state(), [4, 0, 0]);
        d.queued(0, -2);
        d.running(0, 2);
        d.running(0, -1);
        // A row past the table lands on the last one instead of panicking.
        d.running(usize::MAX, 1);
        assert_eq!(
            m.jobs_by_state(),
            [4, 0, 0],
            "nothing shows before the fold"
        );
        m.fold_gauges(&mut d);
        assert_eq!(m.jobs_by_state(), [2, 2, 0]);
        d.admitted(1, 5);
        m.fold_gauges(&mut d);
        let rows: Vec<_> = m.handler_gauges().collect();
        assert_eq!(rows, [("a", [1, 1, 0]), ("b", [1, 0, 5])]);
        d.queued(0, -1);
        d.queued(1, -1);
        d.running(0, -1);
        d.running(2, -1);
        m.fold_gauges(&mut d);
        assert_eq!(m.jobs_by_state(), [0, 0, 5]);
    }

    #[test]
    fn a_row_past_the_table_counts_as_unknown() {
        let m = Metrics::new(vec!["a".into()]);
        m.finished(7, Outcome::Rejected, 2);
        m.finished(0, Outcome::Ok, 1);
        assert_eq!(m.finished_by_outcome(), [1, 0, 0, 0, 2]);
        assert_eq!(m.handler_name(0), "a");
        assert_eq!(m.handler_name(1), "_unknown");
    }
}
