//! The W3C trace context a client call sends (`traceparent`, `tracestate`), made without the
//! OpenTelemetry SDK: batchctl's call joins the caller's trace even when nothing is exported.

/// The W3C trace context sent with an outgoing call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    /// The `traceparent` value.
    pub traceparent: String,
    /// The `tracestate` value, when there is one.
    pub tracestate: Option<String>,
}

// === impl TraceHeaders ===

impl TraceHeaders {
    /// A `traceparent` of no exported span ([`outgoing_traceparent`]): a child of `parent` when
    /// valid, else a new sampled trace.
    pub fn generated(parent: Option<&str>) -> Self {
        Self {
            traceparent: outgoing_traceparent(parent),
            tracestate: None,
        }
    }

    /// Adds `traceparent` (and `tracestate`) to a call's metadata; a value that is not valid
    /// metadata is left out.
    pub fn insert_into(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if let Ok(v) = self.traceparent.parse() {
            metadata.insert("traceparent", v);
        }
        if let Some(Ok(v)) = self.tracestate.as_deref().map(str::parse) {
            metadata.insert("tracestate", v);
        }
    }
}

/// A W3C `traceparent` for an outgoing call: a child of `parent` (a `traceparent` value, e.g. the
/// `TRACEPARENT` variable) when it is valid, else a new sampled trace.
pub fn outgoing_traceparent(parent: Option<&str>) -> String {
    let span_id = random_u64().max(1);
    let inherited = parent.and_then(|p| {
        let mut parts = p.trim().split('-');
        let (version, trace, _span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        (version == "00" && hex(trace, 32) && hex(flags, 2) && trace != "0".repeat(32))
            .then(|| (trace.to_ascii_lowercase(), flags.to_ascii_lowercase()))
    });
    let (trace, flags) = inherited.unwrap_or_else(|| {
        let t = (u128::from(random_u64()) << 64) | u128::from(random_u64().max(1));
        (format!("{t:032x}"), "01".into())
    });
    format!("00-{trace}-{span_id:016x}-{flags}")
}

/// 64 random bits from the standard library's per-process seeded hasher (ids, not secrets).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_traceparent_keeps_the_parent_trace() {
        let p = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = outgoing_traceparent(Some(p));
        assert!(
            out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{out}"
        );
        assert!(out.ends_with("-01"));
        assert_ne!(out, p);
        let fresh = outgoing_traceparent(Some("garbage"));
        assert_eq!(fresh.len(), 55, "{fresh}");
        assert_ne!(fresh, outgoing_traceparent(None));
    }
}
