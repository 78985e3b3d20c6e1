//! The progress line on stderr (done/total, rate, ETA, counts per outcome), drawn by `indicatif`,
//! and messages printed above it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressFinish, ProgressStyle};

use super::Summary;

/// Redraws per second, at most.
const REDRAW_HZ: u8 = 10;
/// Least time between two updates of the line's figures (each costs indicatif's lock and the
/// counts' formatting; results may come thousands of times a second).
const UPDATE_EVERY: Duration = Duration::from_millis(50);
/// How often the line is redrawn while no result arrives (elapsed time and ETA move on).
const STEADY_TICK: Duration = Duration::from_millis(500);
/// The line when the total is known.
const WITH_TOTAL: &str = "{pos}/{len} {percent}% {per_sec:0} ETA {eta} | {wide_msg}";
/// The line when it is not (stdin, or before the count is done).
const WITHOUT_TOTAL: &str = "{pos} done {per_sec:0} | {wide_msg}";

/// Draws progress on stderr when enabled; prints messages above it. Clones draw the same line.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: ProgressBar,
    /// Whether the bar is drawn at all (read once: asking the bar takes its lock).
    drawn: bool,
    total: Arc<AtomicU64>,
    /// Whether the bar has a length (the style in use).
    sized: Arc<AtomicBool>,
    start: Instant,
    /// When the figures may be updated next, in milliseconds since `start`.
    next_update: Arc<AtomicU64>,
}

// === impl Progress ===

impl Progress {
    /// A progress line, drawn only when `enabled` (stderr is a terminal and not `--quiet`).
    pub fn new(enabled: bool) -> Self {
        let bar = if enabled {
            let bar =
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(REDRAW_HZ))
                    .with_finish(ProgressFinish::AndClear);
            bar.set_style(style(WITHOUT_TOTAL));
            bar.enable_steady_tick(STEADY_TICK);
            bar
        } else {
            ProgressBar::hidden()
        };
        Self {
            drawn: !bar.is_hidden(),
            bar,
            total: Arc::new(AtomicU64::new(0)),
            sized: Arc::new(AtomicBool::new(false)),
            start: Instant::now(),
            next_update: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether the line is drawn (so that counting the input's total is worth it).
    pub fn is_drawn(&self) -> bool {
        self.drawn
    }

    /// Where a background count stores the number of jobs in the input (0: unknown).
    pub fn total(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.total)
    }

    /// Updates the line from the run's counts, at most every [`UPDATE_EVERY`].
    pub fn tick(&self, s: &Summary) {
        if !self.drawn {
            return;
        }
        let now = self.start.elapsed().as_millis() as u64;
        if now < self.next_update.load(Ordering::Relaxed) {
            return;
        }
        self.next_update
            .store(now + UPDATE_EVERY.as_millis() as u64, Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        if total > 0 {
            if !self.sized.swap(true, Ordering::Relaxed) {
                self.bar.set_style(style(WITH_TOTAL));
            }
            self.bar
                .set_length(total.saturating_sub(s.skipped + s.bad_inputs()));
        }
        self.bar.set_position(s.done);
        self.bar.set_message(s.counts());
    }

    /// Prints `msg` on its own line on stderr, above the progress line.
    pub fn message(&self, msg: &str) {
        self.bar.suspend(|| eprintln!("{msg}"));
    }

    /// Removes the progress line.
    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_templates_parse() {
        for t in [WITH_TOTAL, WITHOUT_TOTAL] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
            // In `{key:…}`, what follows a dot is a colour: `{per_sec:.0}` drew the rate black.
            assert!(!t.contains(":."), "{t}");
        }
    }
}
