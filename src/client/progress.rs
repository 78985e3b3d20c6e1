//! The progress line on stderr (done/total, rate, ETA, counts per outcome) and the final summary.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Summary;

/// How often the progress line is redrawn.
const REDRAW: Duration = Duration::from_millis(100);

/// Draws progress on stderr when enabled; prints messages above it.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    total: Arc<AtomicU64>,
    start: Instant,
    last: Option<Instant>,
    drawn: bool,
}

impl Progress {
    /// A progress line, drawn only when `enabled` (stderr is a terminal and not `--quiet`).
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            total: Arc::new(AtomicU64::new(0)),
            start: Instant::now(),
            last: None,
            drawn: false,
        }
    }

    /// Where a background count stores the number of jobs in the input (0: unknown).
    pub fn total(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.total)
    }

    /// Redraws the line if it is due.
    pub fn tick(&mut self, s: &Summary) {
        if !self.enabled || self.last.is_some_and(|t| t.elapsed() < REDRAW) {
            return;
        }
        self.last = Some(Instant::now());
        let line = self.line(s);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        self.drawn = true;
    }

    /// Prints `msg` on its own line, above the progress line.
    pub fn message(&mut self, msg: &str) {
        self.clear();
        eprintln!("{msg}");
    }

    /// Removes the progress line.
    pub fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
            self.drawn = false;
        }
    }

    fn line(&self, s: &Summary) -> String {
        let elapsed = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = s.done as f64 / elapsed;
        let total = self
            .total
            .load(Ordering::Relaxed)
            .saturating_sub(s.skipped + s.bad_lines);
        let mut line = if total > 0 {
            let pct = 100.0 * s.done as f64 / total as f64;
            let eta = if rate > 0.0 && total > s.done {
                format_secs((total - s.done) as f64 / rate)
            } else {
                "-".into()
            };
            format!("{}/{} {pct:.0}% {rate:.0}/s ETA {eta}", s.done, total)
        } else {
            format!("{} done {rate:.0}/s", s.done)
        };
        line.push_str(&format!(" | {}", s.counts()));
        line
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

fn format_secs(secs: f64) -> String {
    let secs = secs.round() as u64;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_formats() {
        assert_eq!(format_secs(5.2), "5s");
        assert_eq!(format_secs(125.0), "2m05s");
        assert_eq!(format_secs(7300.0), "2h01m");
    }
}
