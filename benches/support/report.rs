//! The lines a bench prints: one `name: value` line per figure, and `target_check:` lines that
//! compare the figures measured in this run with the targets of their issue.

use std::sync::Mutex;
use std::time::Duration;

use super::stats::ms;

/// Every figure printed so far, for [`check_targets`].
static FIGURES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Prints a figure line `name: value` and records it.
pub fn figure(name: &str, value: impl std::fmt::Display) {
    let value = value.to_string();
    println!("{name}: {value}");
    FIGURES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push((name.to_owned(), value));
}

/// Prints `{prefix}_{label}_ms` (3 decimals) for each `(label, p)` of `points`, `pick` choosing
/// the percentile `p` of the sorted samples.
pub fn latency_ms(
    prefix: &str,
    sorted: &[Duration],
    points: &[(&str, f64)],
    pick: fn(&[Duration], f64) -> Duration,
) {
    for (label, p) in points {
        figure(
            &format!("{prefix}_{label}_ms"),
            format!("{:.3}", ms(pick(sorted, *p))),
        );
    }
}

/// A figure's target.
pub struct Target {
    /// The figure's name.
    pub figure: &'static str,
    /// The word naming the number in a figure of several (`best` in `best 1.18, median 1.61`);
    /// `None`: the figure is one number.
    pub part: Option<&'static str>,
    /// At least (`true`) or at most (`false`) `value`.
    pub at_least: bool,
    pub value: f64,
    /// What the issue asks, in words.
    pub what: &'static str,
}

impl Target {
    /// `figure` ≥ `value`.
    pub const fn at_least(figure: &'static str, value: f64, what: &'static str) -> Self {
        Self {
            figure,
            part: None,
            at_least: true,
            value,
            what,
        }
    }

    /// `figure` ≤ `value`.
    pub const fn at_most(figure: &'static str, value: f64, what: &'static str) -> Self {
        Self {
            figure,
            part: None,
            at_least: false,
            value,
            what,
        }
    }

    /// The target applies to the number after the word `part` in the figure's value.
    pub const fn part(self, part: &'static str) -> Self {
        Self {
            part: Some(part),
            ..self
        }
    }

    /// The number this target checks in a figure's value, if it has one.
    fn read(&self, value: &str) -> Option<f64> {
        let number = |w: &str| w.trim_start_matches('+').parse::<f64>().ok();
        let Some(part) = self.part else {
            return number(value);
        };
        let mut words = value.split([' ', ',']).filter(|w| !w.is_empty());
        words.find(|w| *w == part)?;
        number(words.next()?)
    }
}

/// Prints a `target_check:` line for each target whose figure was measured in this run (a leading
/// `+` is ignored; a figure without the number is skipped).
pub fn check_targets(targets: &[Target]) {
    let figures = FIGURES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    println!();
    for t in targets {
        let Some(value) = figures
            .iter()
            .find(|(n, _)| n == t.figure)
            .and_then(|(_, v)| t.read(v))
        else {
            continue;
        };
        let (cmp, met) = if t.at_least {
            (">=", value >= t.value)
        } else {
            ("<=", value <= t.value)
        };
        let name = match t.part {
            Some(part) => format!("{} ({part})", t.figure),
            None => t.figure.to_owned(),
        };
        println!(
            "target_check: {name} = {value} (target {cmp} {}; {}): {}",
            t.value,
            t.what,
            if met { "met" } else { "NOT MET" }
        );
    }
}
