//! The OTLP push of the engine's counters and gauges (with `otlp_metrics`), read from the same
//! family table as `/metrics`. Histograms stay on `/metrics`: the SDK has no observable histogram.

use opentelemetry::metrics::{AsyncInstrument, MeterProvider as _};
use opentelemetry::KeyValue;

use super::Telemetry;
use crate::engine::metrics::{families, Family, Kind, Value};
use crate::engine::Engine;

/// The OTLP name of a family: `batchd.` and the name with dots, e.g. `batchd.jobs.finished`.
pub fn name(family: &Family) -> String {
    format!("batchd.{}", family.name.replace('_', "."))
}

impl Telemetry {
    /// Pushes `engine`'s counters and gauges over OTLP (when `otlp_metrics` is on), read at each
    /// export. Call it on the daemon's runtime: its live task count is one of the figures.
    pub fn push_metrics(&self, engine: &Engine) {
        let Some(meters) = &self.meters else {
            return;
        };
        let meter = meters.meter("batchd");
        for family in families() {
            let observe = observer(family, engine);
            match family.kind {
                Kind::Counter => drop(
                    meter
                        .u64_observable_counter(name(family))
                        .with_description(family.help)
                        .with_callback(observe)
                        .build(),
                ),
                Kind::Gauge => drop(
                    meter
                        .u64_observable_gauge(name(family))
                        .with_description(family.help)
                        .with_callback(observe)
                        .build(),
                ),
                Kind::Histogram => {}
            }
        }
    }
}

/// A callback that reads `family`'s samples into an instrument, on the daemon's runtime (the SDK
/// calls it from its own thread).
fn observer(
    family: &'static Family,
    engine: &Engine,
) -> impl Fn(&dyn AsyncInstrument<u64>) + Send + Sync + 'static {
    let engine = engine.clone();
    let runtime = tokio::runtime::Handle::try_current().ok();
    move |o| {
        let _guard = runtime.as_ref().map(tokio::runtime::Handle::enter);
        family.read(&engine, &mut |values, value| {
            if let Value::Number(n) = value {
                let attrs: Vec<KeyValue> = family
                    .labels
                    .iter()
                    .zip(values)
                    .map(|(k, v)| KeyValue::new(*k, (*v).to_owned()))
                    .collect();
                o.observe(n, &attrs);
            }
        });
    }
}
