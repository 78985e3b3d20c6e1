//! The one table of what the engine measures: each family's name, kind, help and label names, and
//! how to read its samples. The Prometheus text and the OTLP push are both written from it, so a
//! metric is named and described once.

use std::sync::atomic::Ordering;

use super::{EndReason, Histogram, ProcessFigures, Rejection, CANCEL_REASONS};
use crate::engine::principal::group_of;
use crate::engine::{Engine, Outcome};
use crate::handlers::exec::Isolation;

/// What a family's samples are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows (until the process restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in fixed buckets, with their sum and count.
    Histogram,
}

/// One sample's value.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// A counter's or a gauge's current value.
    Number(u64),
    /// A histogram, read at the time of the call.
    Histogram(&'a Histogram),
}

/// Receives the samples of one family: label values (in the family's label order) and the value.
pub type Sink<'s> = dyn FnMut(&[&str], Value<'_>) + 's;

/// A metric family: its name, kind, help and labels, and how to read it from an [`Engine`].
#[derive(Debug)]
pub struct Family {
    /// The name without the daemon's prefix or a counter's `_total`, e.g. `jobs_finished`:
    /// exporters add their own conventions (`batchd_jobs_finished_total`, `batchd.jobs.finished`).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// One sentence for humans.
    pub help: &'static str,
    /// Label names; each has a bounded set of values (handlers come from config, never from
    /// clients).
    pub labels: &'static [&'static str],
    read: fn(&Engine, &mut Sink<'_>),
}

impl Family {
    /// Hands every current sample of this family to `sink`.
    pub fn read(&self, engine: &Engine, sink: &mut Sink<'_>) {
        (self.read)(engine, sink);
    }
}

/// Every metric family of the engine, in exposition order.
pub fn families() -> &'static [Family] {
    FAMILIES
}

const FAMILIES: &[Family] = &[
    Family {
        name: "calls_open",
        kind: Kind::Gauge,
        help: "Calls whose session is alive.",
        labels: &[],
        read: |e, sink| sink(&[], Value::Number(e.metrics().calls_open())),
    },
    Family {
        name: "results_buffered",
        kind: Kind::Gauge,
        help: "Results held by sessions, not yet sent.",
        labels: &[],
        read: |e, sink| sink(&[], Value::Number(e.metrics().results_buffered())),
    },
    Family {
        name: "workers_free",
        kind: Kind::Gauge,
        help: "Worker slots nobody holds.",
        labels: &[],
        read: |e, sink| sink(&[], Value::Number(e.inner.scheduler.free() as u64)),
    },
    Family {
        name: "jobs_queued",
        kind: Kind::Gauge,
        help: "Admitted jobs waiting for a worker slot, by handler.",
        labels: &["handler"],
        read: |e, sink| handler_gauge(e, 0, sink),
    },
    Family {
        name: "jobs_running",
        kind: Kind::Gauge,
        help: "Jobs holding a worker slot, by handler.",
        labels: &["handler"],
        read: |e, sink| handler_gauge(e, 1, sink),
    },
    Family {
        name: "jobs_admitted",
        kind: Kind::Counter,
        help: "Jobs admitted since start, by handler.",
        labels: &["handler"],
        read: |e, sink| handler_gauge(e, 2, sink),
    },
    Family {
        name: "jobs_finished",
        kind: Kind::Counter,
        help: "Jobs finished (rejected ones included), by handler and outcome.",
        labels: &["handler", "outcome"],
        read: |e, sink| {
            let m = e.metrics();
            for (row, counts) in m.finished.iter().enumerate() {
                for (o, c) in Outcome::ALL.iter().zip(counts) {
                    let n = c.load(Ordering::Relaxed);
                    sink(&[m.handler_name(row), o.as_str()], Value::Number(n));
                }
            }
        },
    },
    Family {
        name: "job_queue_seconds",
        kind: Kind::Histogram,
        help: "Time from a job's admission to its start.",
        labels: &[],
        read: |e, sink| sink(&[], Value::Histogram(&e.metrics().queue_time)),
    },
    Family {
        name: "job_run_seconds",
        kind: Kind::Histogram,
        help: "Time from a job's start to its end.",
        labels: &[],
        read: |e, sink| sink(&[], Value::Histogram(&e.metrics().run_time)),
    },
    Family {
        name: "results_per_message",
        kind: Kind::Histogram,
        help: "Results coalesced into one response message.",
        labels: &[],
        read: |e, sink| sink(&[], Value::Histogram(&e.metrics().coalesced)),
    },
    Family {
        name: "cancel_latency_seconds",
        kind: Kind::Histogram,
        help:
            "From the moment the daemon learns a call is over (client gone, deadline, shutdown's \
               grace over, stream error) to its last job stopped, by reason.",
        labels: &["reason"],
        read: |e, sink| {
            for (r, h) in CANCEL_REASONS.iter().zip(&e.metrics().cancel_latency) {
                sink(&[r.as_str()], Value::Histogram(h));
            }
        },
    },
    Family {
        name: "backpressure",
        kind: Kind::Counter,
        help: "Times a call's stream stopped being read because its session window was full.",
        labels: &[],
        read: |e, sink| {
            let n = e.metrics().backpressure.load(Ordering::Relaxed);
            sink(&[], Value::Number(n));
        },
    },
    Family {
        name: "calls_rejected",
        kind: Kind::Counter,
        help: "Calls refused, by reason.",
        labels: &["reason"],
        read: |e, sink| {
            for (r, c) in Rejection::ALL.iter().zip(&e.metrics().rejected_calls) {
                sink(&[r.as_str()], Value::Number(c.load(Ordering::Relaxed)));
            }
        },
    },
    Family {
        name: "calls_ended",
        kind: Kind::Counter,
        help: "Calls ended, by reason.",
        labels: &["reason"],
        read: |e, sink| {
            for (r, c) in EndReason::ALL.iter().zip(&e.metrics().calls_ended) {
                sink(&[r.as_str()], Value::Number(c.load(Ordering::Relaxed)));
            }
        },
    },
    Family {
        name: "principal_calls_open",
        kind: Kind::Gauge,
        help: "Calls open, by principal (what its max_calls counts).",
        labels: &["principal"],
        read: |e, sink| {
            for (name, stats) in e.inner.principals.rows() {
                let n = stats.calls_open.load(Ordering::Relaxed);
                sink(&[&name], Value::Number(n));
            }
        },
    },
    Family {
        name: "principal_calls",
        kind: Kind::Counter,
        help: "Calls admitted since start, by principal.",
        labels: &["principal"],
        read: |e, sink| {
            for (name, stats) in e.inner.principals.rows() {
                sink(&[&name], Value::Number(stats.calls.load(Ordering::Relaxed)));
            }
        },
    },
    Family {
        name: "principal_calls_rejected",
        kind: Kind::Counter,
        help: "Calls of an authenticated principal refused, by principal and reason.",
        labels: &["principal", "reason"],
        read: |e, sink| {
            for (name, stats) in e.inner.principals.rows() {
                for r in Rejection::ALL {
                    if r != Rejection::Unauthenticated {
                        let n = stats.rejected[r.index()].load(Ordering::Relaxed);
                        sink(&[&name, r.as_str()], Value::Number(n));
                    }
                }
            }
        },
    },
    Family {
        name: "principal_jobs_finished",
        kind: Kind::Counter,
        help: "Jobs finished (rejected ones included), by principal and outcome; a call adds its \
               jobs each time it hands results over.",
        labels: &["principal", "outcome"],
        read: |e, sink| {
            for (name, stats) in e.inner.principals.rows() {
                for (o, c) in Outcome::ALL.iter().zip(&stats.finished) {
                    sink(
                        &[&name, o.as_str()],
                        Value::Number(c.load(Ordering::Relaxed)),
                    );
                }
            }
        },
    },
    Family {
        name: "principal_workers_held",
        kind: Kind::Gauge,
        help: "Worker slots held by a principal's calls (what its max_running caps).",
        labels: &["principal"],
        read: |e, sink| {
            for (row, (name, _)) in e.inner.principals.rows().iter().enumerate() {
                let n = e.inner.scheduler.held(group_of(row)) as u64;
                sink(&[name], Value::Number(n));
            }
        },
    },
    Family {
        name: "memory_budget_bytes",
        kind: Kind::Gauge,
        help: "The daemon-wide memory budget (memory_budget).",
        labels: &[],
        read: |e, sink| sink(&[], Value::Number(e.inner.budget.limit() as u64)),
    },
    Family {
        name: "memory_budget_used_bytes",
        kind: Kind::Gauge,
        help: "Bytes held in jobs read (queued or running) and results not sent yet, all calls.",
        labels: &[],
        read: |e, sink| sink(&[], Value::Number(e.inner.budget.used() as u64)),
    },
    Family {
        name: "memory_budget_peak_bytes",
        kind: Kind::Gauge,
        help: "The most memory_budget_used_bytes since start.",
        labels: &[],
        read: |e, sink| sink(&[], Value::Number(e.inner.budget.peak() as u64)),
    },
    Family {
        name: "memory_budget_waits",
        kind: Kind::Counter,
        help: "Times a call stopped being read because the memory budget was used up.",
        labels: &[],
        read: |e, sink| sink(&[], Value::Number(e.inner.budget.waits())),
    },
    Family {
        name: "exec_groups_alive",
        kind: Kind::Gauge,
        help: "Exec commands' process trees (process group or cgroup) that may still have processes.",
        labels: &[],
        read: |_, sink| sink(&[], Value::Number(ProcessFigures::exec().exec_groups)),
    },
    Family {
        name: "exec_isolation",
        kind: Kind::Gauge,
        help: "1 for the isolation exec jobs get (cgroup: a cgroup v2 each; process-group: where \
               batchd cannot write a cgroup v2 subtree), 0 for the other.",
        labels: &["mode"],
        read: |_, sink| {
            if let Some(mode) = ProcessFigures::exec().exec_isolation {
                for m in Isolation::ALL {
                    sink(&[m.as_str()], Value::Number(u64::from(m == mode)));
                }
            }
        },
    },
    Family {
        name: "exec_started",
        kind: Kind::Counter,
        help: "Exec commands started, by isolation mode.",
        labels: &["mode"],
        read: |_, sink| {
            let f = ProcessFigures::exec().exec;
            sink(&[Isolation::Cgroup.as_str()], Value::Number(f.started_in_cgroup));
            let process_group = Isolation::ProcessGroup.as_str();
            sink(&[process_group], Value::Number(f.started_in_process_group));
        },
    },
    Family {
        name: "exec_stale_cgroups_killed",
        kind: Kind::Counter,
        help: "Job cgroups a crashed batchd instance left with processes, killed at start-up.",
        labels: &[],
        read: |_, sink| {
            sink(&[], Value::Number(ProcessFigures::exec().exec.stale_cgroups_killed));
        },
    },
    Family {
        name: "exec_stale_processes_killed",
        kind: Kind::Counter,
        help: "Processes in those cgroups, killed at start-up.",
        labels: &[],
        read: |_, sink| {
            sink(&[], Value::Number(ProcessFigures::exec().exec.stale_processes_killed));
        },
    },
    Family {
        name: "exec_orphans_reaped",
        kind: Kind::Counter,
        help: "Orphaned descendants of exec commands re-parented to batchd (its subreaper) and reaped.",
        labels: &[],
        read: |_, sink| sink(&[], Value::Number(ProcessFigures::exec().exec.orphans_reaped)),
    },
    Family {
        name: "tokio_tasks_alive",
        kind: Kind::Gauge,
        help: "Live tasks of the daemon's tokio runtime.",
        labels: &[],
        read: |_, sink| sink(&[], Value::Number(ProcessFigures::read().tasks_alive)),
    },
    Family {
        name: "process_resident_memory_bytes",
        kind: Kind::Gauge,
        help: "Resident set size of the daemon.",
        labels: &[],
        read: |_, sink| {
            if let Some(rss) = ProcessFigures::read().rss_bytes {
                sink(&[], Value::Number(rss));
            }
        },
    },
];

/// Column `which` (queued, running, admitted) of every handler's gauges.
fn handler_gauge(e: &Engine, which: usize, sink: &mut Sink<'_>) {
    for (name, figures) in e.metrics().handler_gauges() {
        sink(&[name], Value::Number(figures[which]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Limits;
    use crate::handlers::Registry;

    #[test]
    fn names_are_unique_and_samples_carry_one_value_per_label() {
        let engine = Engine::new(
            Limits::from(&crate::config::Config::default()),
            Registry::builtin(),
        );
        let mut names = std::collections::HashSet::new();
        for f in families() {
            assert!(names.insert(f.name), "{} twice", f.name);
            assert!(!f.help.is_empty(), "{}", f.name);
            f.read(&engine, &mut |labels, value| {
                assert_eq!(labels.len(), f.labels.len(), "{}", f.name);
                let histogram = matches!(value, Value::Histogram(_));
                assert_eq!(histogram, f.kind == Kind::Histogram, "{}", f.name);
            });
        }
    }
}
