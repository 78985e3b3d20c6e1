//! The Prometheus text exposition (version 0.0.4) of the engine's metrics.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    handler_gauges, outcome_label, EndReason, EngineMetrics, Histogram, ProcessFigures, Rejection,
    CANCEL_REASONS,
};
use crate::engine::Outcome;

impl Histogram {
    /// Writes the histogram's lines; `scale` divides bounds and sum (1e9 for nanoseconds).
    fn render(&self, out: &mut String, name: &str, labels: &str, scale: f64) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let le = *bound as f64 / scale;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum.load(Ordering::Relaxed) as f64 / scale;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// Renders every metric in the Prometheus text exposition format (version 0.0.4).
pub fn render(m: &EngineMetrics, free_workers: u64, process: ProcessFigures) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let gauges: [(&str, &str, u64); 3] = [
        (
            "batchd_calls_open",
            "Calls whose session is alive.",
            load(&m.calls_open),
        ),
        (
            "batchd_results_buffered",
            "Results held by sessions, not yet sent.",
            load(&m.results_buffered),
        ),
        (
            "batchd_workers_free",
            "Worker slots nobody holds.",
            free_workers,
        ),
    ];
    for (name, help, v) in gauges {
        head(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    let by_handler = [
        (
            "batchd_jobs_queued",
            "gauge",
            "Admitted jobs waiting for a worker slot, by handler.",
        ),
        (
            "batchd_jobs_running",
            "gauge",
            "Jobs holding a worker slot, by handler.",
        ),
        (
            "batchd_jobs_admitted_total",
            "counter",
            "Jobs admitted since start, by handler.",
        ),
    ];
    for (i, (name, kind, help)) in by_handler.into_iter().enumerate() {
        head(&mut out, name, kind, help);
        for (handler, figures) in handler_gauges(m) {
            let _ = writeln!(out, "{name}{{handler=\"{handler}\"}} {}", figures[i]);
        }
    }

    head(
        &mut out,
        "batchd_jobs_finished_total",
        "counter",
        "Jobs finished (rejected ones included), by handler and outcome.",
    );
    let names = m.handlers.iter().map(String::as_str).chain(["_unknown"]);
    for (name, row) in names.zip(m.finished.iter()) {
        for (o, c) in Outcome::ALL.iter().zip(row) {
            let _ = writeln!(
                out,
                "batchd_jobs_finished_total{{handler=\"{name}\",outcome=\"{}\"}} {}",
                outcome_label(*o),
                load(c)
            );
        }
    }

    let hists: [(&str, &str, &Histogram, f64); 3] = [
        (
            "batchd_job_queue_seconds",
            "Time from a job's admission to its start.",
            &m.queue_time,
            1e9,
        ),
        (
            "batchd_job_run_seconds",
            "Time from a job's start to its end.",
            &m.run_time,
            1e9,
        ),
        (
            "batchd_results_per_message",
            "Results coalesced into one response message.",
            &m.coalesced,
            1.0,
        ),
    ];
    for (name, help, h, scale) in hists {
        head(&mut out, name, "histogram", help);
        h.render(&mut out, name, "", scale);
    }
    let name = "batchd_cancel_latency_seconds";
    head(
        &mut out,
        name,
        "histogram",
        "From the moment the daemon learns a call is over (client gone, deadline, shutdown's grace \
         over, stream error) to its last job stopped, by reason.",
    );
    for (r, h) in CANCEL_REASONS.iter().zip(&m.cancel_latency) {
        h.render(&mut out, name, &format!("reason=\"{}\"", r.label()), 1e9);
    }

    head(
        &mut out,
        "batchd_backpressure_total",
        "counter",
        "Times a call's stream stopped being read because its session window was full.",
    );
    let _ = writeln!(out, "batchd_backpressure_total {}", load(&m.backpressure));
    head(
        &mut out,
        "batchd_calls_rejected_total",
        "counter",
        "Calls refused, by reason.",
    );
    for (r, c) in Rejection::ALL.iter().zip(&m.rejected_calls) {
        let _ = writeln!(
            out,
            "batchd_calls_rejected_total{{reason=\"{}\"}} {}",
            r.label(),
            load(c)
        );
    }
    head(
        &mut out,
        "batchd_calls_ended_total",
        "counter",
        "Calls ended, by reason.",
    );
    for (r, c) in EndReason::ALL.iter().zip(&m.calls_ended) {
        let _ = writeln!(
            out,
            "batchd_calls_ended_total{{reason=\"{}\"}} {}",
            r.label(),
            load(c)
        );
    }

    head(
        &mut out,
        "batchd_exec_groups_alive",
        "gauge",
        "Exec commands' process groups that may still have members.",
    );
    let _ = writeln!(out, "batchd_exec_groups_alive {}", process.exec_groups);
    head(
        &mut out,
        "batchd_tokio_tasks_alive",
        "gauge",
        "Live tasks of the daemon's tokio runtime.",
    );
    let _ = writeln!(out, "batchd_tokio_tasks_alive {}", process.tasks_alive);
    if let Some(rss) = process.rss_bytes {
        head(
            &mut out,
            "batchd_process_resident_memory_bytes",
            "gauge",
            "Resident set size of the daemon.",
        );
        let _ = writeln!(out, "batchd_process_resident_memory_bytes {rss}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::COUNT_BUCKETS;
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(COUNT_BUCKETS);
        for v in [1, 1, 3, 5000] {
            h.observe(v);
        }
        assert_eq!(h.count(), 4);
        let mut out = String::new();
        h.render(&mut out, "x", "", 1.0);
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"4096\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 5005\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }
}
