//! The daemon's counters, gauges and fixed-bucket histograms (plain atomics: the hot path pays one
//! relaxed add each). [`exposition`] writes them in the Prometheus text format; [`process`] reads the
//! process-wide figures (tasks, RSS, exec groups) at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::engine::Outcome;

mod exposition;
mod process;

pub use exposition::render;
pub use process::ProcessFigures;

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

/// Most bucket bounds of one histogram.
const MAX_BUCKETS: usize = 16;

/// Why a call was refused before its stream was read (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `max_calls` calls are open.
    TooManyCalls,
    /// The daemon is shutting down.
    ShuttingDown,
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

/// A histogram with fixed buckets: one relaxed add per bucket hit, another for the sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// Hits per bucket (not cumulative); the last one is `+Inf`.
    counts: [AtomicU64; MAX_BUCKETS + 1],
    sum: AtomicU64,
}

/// A task's own tally for a [`Histogram`], folded into it now and then: a per-job observation then
/// touches no shared cache line.
#[derive(Debug, Default)]
pub(crate) struct LocalHistogram {
    counts: [u32; MAX_BUCKETS + 1],
    sum: u64,
    pending: bool,
}

/// The jobs of one handler waiting for a worker slot and holding one (gauges), and admitted since
/// start (a counter), in that order.
#[derive(Debug, Default)]
pub(crate) struct HandlerGauges([AtomicU64; 3]);

/// A session's changes to the per-handler gauges, folded in by [`EngineMetrics::fold_gauges`]
/// before the session yields: the gauges are exact whenever anyone can look, and a job's start
/// touches no shared cache line.
#[derive(Debug)]
pub(crate) struct GaugeDeltas {
    /// Queued, running and admitted deltas by handler row; allocated when the session admits a job.
    rows: Vec<[i32; 3]>,
    /// Handler rows of the engine.
    len: usize,
    dirty: bool,
}

/// The engine's live counters, gauges and histograms.
#[derive(Debug)]
pub struct EngineMetrics {
    /// Calls whose session is alive.
    pub(crate) calls_open: AtomicU64,
    /// Queued, running and admitted jobs by handler row (same rows as `finished`).
    pub(crate) gauges: Box<[HandlerGauges]>,
    /// Results held by sessions, not yet handed to the transport.
    pub(crate) results_buffered: AtomicU64,
    /// Handler names, in the order of `finished`'s rows; one more row counts unknown handlers.
    pub(crate) handlers: Vec<String>,
    /// Jobs finished, by handler row and outcome in [`Outcome::ALL`] order.
    pub(crate) finished: Box<[[AtomicU64; 5]]>,
    /// Time from admission to start.
    pub(crate) queue_time: Histogram,
    /// Time from start to end.
    pub(crate) run_time: Histogram,
    /// From the moment the daemon learns a call is over to its last job dropped, by the
    /// [`EndReason`] that stopped the jobs.
    pub(crate) cancel_latency: [Histogram; 4],
    /// Results per response message.
    pub(crate) coalesced: Histogram,
    /// Times a session stopped reading its stream because its window was full.
    pub(crate) backpressure: AtomicU64,
    /// Calls refused, by [`Rejection`].
    pub(crate) rejected_calls: [AtomicU64; 2],
    /// Calls ended, by [`EndReason`].
    pub(crate) calls_ended: [AtomicU64; 5],
}

// === impl Histogram ===

impl Histogram {
    /// A histogram with these upper bounds (at most 16, increasing).
    fn new(bounds: &'static [u64]) -> Self {
        Self {
            bounds: &bounds[..bounds.len().min(MAX_BUCKETS)],
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
        }
    }

    /// Records one value (nanoseconds, or a count).
    pub fn observe(&self, v: u64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Records a duration.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records a duration in `local`, to be folded in by [`Histogram::fold`].
    pub(crate) fn observe_local(&self, local: &mut LocalHistogram, d: Duration) {
        let v = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        local.counts[i] = local.counts[i].saturating_add(1);
        local.sum = local.sum.saturating_add(v);
        local.pending = true;
    }

    /// Adds what `local` recorded since the last fold, and clears it.
    pub(crate) fn fold(&self, local: &mut LocalHistogram) {
        if !local.pending {
            return;
        }
        for (shared, n) in self.counts.iter().zip(&mut local.counts) {
            if *n > 0 {
                shared.fetch_add(u64::from(std::mem::take(n)), Ordering::Relaxed);
            }
        }
        self.sum
            .fetch_add(std::mem::take(&mut local.sum), Ordering::Relaxed);
        local.pending = false;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts[..=self.bounds.len()]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
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

// === impl Rejection, EndReason ===

impl Rejection {
    const ALL: [Self; 2] = [Self::TooManyCalls, Self::ShuttingDown];

    fn label(self) -> &'static str {
        match self {
            Self::TooManyCalls => "too_many_calls",
            Self::ShuttingDown => "shutting_down",
        }
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
    pub fn label(self) -> &'static str {
        match self {
            Self::HalfClose => "half_close",
            Self::Disconnect => "disconnect",
            Self::Deadline => "deadline",
            Self::Shutdown => "shutdown",
            Self::Error => "error",
        }
    }
}

/// The label value of an outcome: `ok`, `failed`, `cancelled`, `timed_out` or `rejected`.
pub fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Failed => "failed",
        Outcome::Cancelled => "cancelled",
        Outcome::TimedOut => "timed_out",
        Outcome::Rejected => "rejected",
    }
}

/// The index of `o` in [`Outcome::ALL`].
pub(crate) fn outcome_index(o: Outcome) -> usize {
    Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0)
}

// === impl EngineMetrics ===

impl EngineMetrics {
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
            queue_time: Histogram::new(TIME_BUCKETS),
            run_time: Histogram::new(TIME_BUCKETS),
            cancel_latency: std::array::from_fn(|_| Histogram::new(CANCEL_BUCKETS)),
            coalesced: Histogram::new(COUNT_BUCKETS),
            backpressure: AtomicU64::new(0),
            rejected_calls: std::array::from_fn(|_| AtomicU64::new(0)),
            calls_ended: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// The row of `finished` for the handler at `index` (unknown handlers share the last one).
    pub(crate) fn finished_row(&self, index: usize) -> &[AtomicU64; 5] {
        let last = self.finished.len() - 1;
        &self.finished[index.min(last)]
    }

    /// Counts `n` jobs of handler `index` that finished with `outcome`.
    pub(crate) fn add_finished(&self, index: usize, outcome: Outcome, n: usize) {
        self.finished_row(index)[outcome_index(outcome)].fetch_add(n as u64, Ordering::Relaxed);
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

    /// Records how long the jobs of a call ended by `why` kept going after the daemon knew.
    pub(crate) fn observe_cancel(&self, why: EndReason, latency: Duration) {
        if let Some(i) = CANCEL_REASONS.iter().position(|r| *r == why) {
            self.cancel_latency[i].observe_duration(latency);
        }
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

    /// Adds `n` to a counter or gauge.
    pub(crate) fn add(a: &AtomicU64, n: usize) {
        a.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Takes `n` from a gauge.
    pub(crate) fn sub(a: &AtomicU64, n: usize) {
        a.fetch_sub(n as u64, Ordering::Relaxed);
    }

    /// Counts a refused call.
    pub(crate) fn rejected(&self, why: Rejection) {
        let i = Rejection::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.rejected_calls[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an ended call.
    pub(crate) fn ended(&self, why: EndReason) {
        let i = EndReason::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.calls_ended[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Every handler row of `finished`: the handler's name and its count per outcome label.
pub(crate) fn handler_rows(
    m: &EngineMetrics,
) -> impl Iterator<Item = (&str, impl Iterator<Item = (&'static str, u64)> + '_)> + '_ {
    let names = m.handlers.iter().map(String::as_str).chain(["_unknown"]);
    names.zip(m.finished.iter()).map(|(name, row)| {
        let counts = Outcome::ALL
            .iter()
            .zip(row)
            .map(|(o, c)| (outcome_label(*o), c.load(Ordering::Relaxed)));
        (name, counts)
    })
}

/// Every handler's queued, running and admitted jobs (the unknown-handler row never has one).
pub(crate) fn handler_gauges(m: &EngineMetrics) -> impl Iterator<Item = (&str, [u64; 3])> + '_ {
    m.handlers.iter().zip(m.gauges.iter()).map(|(name, g)| {
        let figures = std::array::from_fn(|i| g.0[i].load(Ordering::Relaxed));
        (name.as_str(), figures)
    })
}

/// Calls ended by reason, then calls refused as `refused:<reason>`.
pub(crate) fn call_counts(m: &EngineMetrics) -> Vec<(String, u64)> {
    let ended = EndReason::ALL
        .iter()
        .zip(&m.calls_ended)
        .map(|(r, c)| (r.label().to_owned(), c.load(Ordering::Relaxed)));
    let refused = Rejection::ALL
        .iter()
        .zip(&m.rejected_calls)
        .map(|(r, c)| (format!("refused:{}", r.label()), c.load(Ordering::Relaxed)));
    ended.chain(refused).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_deltas_fold_into_the_handler_rows() {
        let m = EngineMetrics::new(vec!["a".into(), "b".into()]);
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
        let rows: Vec<_> = handler_gauges(&m).collect();
        assert_eq!(rows, [("a", [1, 1, 0]), ("b", [1, 0, 5])]);
        d.queued(0, -1);
        d.queued(1, -1);
        d.running(0, -1);
        d.running(2, -1);
        m.fold_gauges(&mut d);
        assert_eq!(m.jobs_by_state(), [0, 0, 5]);
    }
}
