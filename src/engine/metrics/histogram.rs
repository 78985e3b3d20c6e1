//! Fixed-bucket histograms: one relaxed add per observation, or a task's own tally folded in now
//! and then.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Most bucket bounds of one histogram.
const MAX_BUCKETS: usize = 16;

/// A histogram with fixed buckets: one relaxed add per bucket hit, another for the sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// What one unit of the exported value is worth in recorded units (1e9: nanoseconds recorded,
    /// seconds exported).
    scale: f64,
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

impl Histogram {
    /// A histogram with these upper bounds (at most 16, increasing), exported divided by `scale`.
    pub(super) fn new(bounds: &'static [u64], scale: f64) -> Self {
        Self {
            bounds: &bounds[..bounds.len().min(MAX_BUCKETS)],
            scale,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0),
        }
    }

    fn bucket(&self, v: u64) -> usize {
        self.bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len())
    }

    /// Records one value (nanoseconds, or a count).
    pub(super) fn observe(&self, v: u64) {
        self.counts[self.bucket(v)].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Records a duration.
    pub(super) fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records a duration in `local`, to be folded in by [`Histogram::fold`].
    pub(super) fn observe_local(&self, local: &mut LocalHistogram, d: Duration) {
        let v = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bucket(v);
        local.counts[i] = local.counts[i].saturating_add(1);
        local.sum = local.sum.saturating_add(v);
        local.pending = true;
    }

    /// Adds what `local` recorded since the last fold, and clears it.
    pub(super) fn fold(&self, local: &mut LocalHistogram) {
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

    /// Each bucket's upper bound in exported units with the observations at or below it
    /// (cumulative), then `+Inf` as `f64::INFINITY` with every observation.
    pub fn buckets(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let bounds = self
            .bounds
            .iter()
            .map(|&b| b as f64 / self.scale)
            .chain([f64::INFINITY]);
        let mut cumulative = 0;
        bounds.zip(&self.counts).map(move |(bound, c)| {
            cumulative += c.load(Ordering::Relaxed);
            (bound, cumulative)
        })
    }

    /// The sum of every observation, in exported units.
    pub fn sum(&self) -> f64 {
        self.sum.load(Ordering::Relaxed) as f64 / self.scale
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts[..=self.bounds.len()]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_scaled() {
        let h = Histogram::new(&[1, 4, 4096], 1.0);
        for v in [1, 1, 3, 5000] {
            h.observe(v);
        }
        assert_eq!(h.count(), 4);
        let b: Vec<_> = h.buckets().collect();
        assert_eq!(b, [(1.0, 2), (4.0, 3), (4096.0, 3), (f64::INFINITY, 4)]);
        assert_eq!(h.sum(), 5005.0);

        let t = Histogram::new(&[1_000_000], 1e9);
        let mut local = LocalHistogram::default();
        t.observe_local(&mut local, Duration::from_micros(500));
        t.observe_local(&mut local, Duration::from_secs(2));
        assert_eq!(t.count(), 0, "nothing shows before the fold");
        t.fold(&mut local);
        let b: Vec<_> = t.buckets().collect();
        assert_eq!(b, [(0.001, 1), (f64::INFINITY, 2)]);
        assert!((t.sum() - 2.0005).abs() < 1e-9, "{}", t.sum());
    }
}
