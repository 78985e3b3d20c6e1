//! Percentiles of sorted samples.

use std::time::Duration;

/// Nearest-rank percentile (`p` in percent) of sorted samples; zero when there are none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The sample at index `round((n - 1) × p / 100)` of sorted samples (`p` in percent); zero when
/// there are none. The exec bench's figures have used this since issue 4 (for 20 samples its p50 is the 11th,
/// nearest rank's the 10th): kept so that BENCHMARKS.md's history stays comparable.
pub fn percentile_rounded_index(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The samples that bound a 95 % confidence interval of the `p` percentile (in percent) of sorted
/// samples, by order statistics (normal approximation of the binomial rank): two sets of samples
/// whose intervals do not overlap have different percentiles.
pub fn percentile_ci95(sorted: &[Duration], p: f64) -> (Duration, Duration) {
    if sorted.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    let n = sorted.len() as f64;
    let q = p / 100.0;
    let half = 1.96 * (n * q * (1.0 - q)).sqrt();
    let lo = (n * q - half).floor().max(1.0) as usize;
    let hi = ((n * q + half).ceil() + 1.0).min(n) as usize;
    (sorted[lo - 1], sorted[hi - 1])
}

/// p50, p99 and the largest sample, for [`crate::support::report::latency_ms`].
pub const P50_P99_MAX: [(&str, f64); 3] = [("p50", 50.0), ("p99", 99.0), ("max", 100.0)];

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
