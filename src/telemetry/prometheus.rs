//! The Prometheus text exposition (version 0.0.4) of the engine's metric families.

use std::fmt::Write as _;

use crate::engine::metrics::{families, Family, Histogram, Kind, Value};
use crate::engine::Engine;

/// Prefix of every metric name.
const PREFIX: &str = "batchd_";

/// The Prometheus name of a family: `batchd_` and the name, plus `_total` for counters.
pub fn name(family: &Family) -> String {
    match family.kind {
        Kind::Counter => format!("{PREFIX}{}_total", family.name),
        Kind::Gauge | Kind::Histogram => format!("{PREFIX}{}", family.name),
    }
}

/// Renders every metric family of `engine` in the Prometheus text exposition format.
pub fn render(engine: &Engine) -> String {
    let mut out = String::with_capacity(8 * 1024);
    for family in families() {
        let name = name(family);
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let mut head = Some(format!(
            "# HELP {name} {}\n# TYPE {name} {kind}\n",
            family.help
        ));
        family.read(engine, &mut |values, value| {
            // A family with no sample (RSS where /proc does not tell) is left out whole.
            if let Some(head) = head.take() {
                out.push_str(&head);
            }
            let labels = labels(family.labels, values);
            match value {
                Value::Number(n) => {
                    let _ = writeln!(out, "{name}{} {n}", braces(&labels));
                }
                Value::Histogram(h) => histogram(&mut out, &name, &labels, h),
            }
        });
    }
    out
}

/// `handler="echo",outcome="ok"`, values escaped as the format asks.
fn labels(names: &[&str], values: &[&str]) -> String {
    let mut s = String::new();
    for (n, v) in names.iter().zip(values) {
        if !s.is_empty() {
            s.push(',');
        }
        let _ = write!(s, "{n}=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// A histogram's cumulative `_bucket` lines, `_sum` and `_count`.
fn histogram(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut count = 0;
    for (bound, cumulative) in h.buckets() {
        count = cumulative;
        let le = if bound.is_infinite() {
            "+Inf".to_owned()
        } else {
            bound.to_string()
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
        );
    }
    let _ = writeln!(out, "{name}_sum{} {}", braces(labels), h.sum());
    let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Limits;
    use crate::handlers::Registry;

    #[test]
    fn every_family_is_exposed_with_help_type_and_samples() {
        let engine = Engine::new(
            Limits::from(&crate::config::Config::default()),
            Registry::builtin(),
        );
        let text = render(&engine);
        for family in families() {
            let name = name(family);
            if family.name == "process_resident_memory_bytes" {
                continue;
            }
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}\n{text}");
        }
        assert!(text.contains("batchd_calls_open 0\n"), "{text}");
        assert!(
            text.contains(
                "batchd_jobs_finished_total{handler=\"_unknown\",outcome=\"rejected\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "batchd_cancel_latency_seconds_bucket{reason=\"deadline\",le=\"+Inf\"} 0\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("batchd_job_queue_seconds_bucket{le=\"0.00001\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("batchd_job_run_seconds_count 0\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&["a", "b"], &["x\"y", "\\\n"]),
            r#"a="x\"y",b="\\\n""#
        );
    }
}
