//! Results as JSON Lines, and the job log that `--resume` reads back.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::outcome::Outcome;
use crate::proto;

/// One output line.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ResultRecord {
    /// The job's id.
    pub id: String,
    /// The job's batch.
    pub batch: String,
    /// `ok`, `failed`, `cancelled`, `timed_out` or `rejected`.
    pub outcome: String,
    /// The output, when it is valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub output: Option<String>,
    /// The output in base64, when it is not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub output_b64: Option<String>,
    /// What went wrong (empty for ok).
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub error: String,
    /// Milliseconds between admission and start.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub queued_ms: Option<f64>,
    /// Milliseconds the job ran.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ran_ms: Option<f64>,
    /// How many times the job was sent (only when retried).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attempts: Option<u32>,
}

/// One job log line: a finished job's id and outcome.
#[derive(Debug, Serialize, Deserialize)]
pub struct LogRecord {
    /// The job's id.
    pub id: String,
    /// Its outcome name.
    pub outcome: String,
}

/// The lowercase name of a protobuf outcome ([`Outcome::as_str`]; `unspecified` for none).
pub fn outcome_name(outcome: i32) -> &'static str {
    Outcome::from_proto(outcome).map_or("unspecified", Outcome::as_str)
}

fn millis(d: Option<&prost_types::Duration>) -> Option<f64> {
    let d = Duration::try_from(*d?).ok()?;
    Some((d.as_secs_f64() * 1e6).round() / 1e3)
}

impl ResultRecord {
    /// The record of a result; `attempts` is shown when above one.
    pub fn new(r: &proto::JobResult, attempts: u32) -> Self {
        let (output, output_b64) = if r.output.is_empty() {
            (None, None)
        } else {
            match std::str::from_utf8(&r.output) {
                Ok(s) => (Some(s.to_owned()), None),
                Err(_) => (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(&r.output)),
                ),
            }
        };
        Self {
            id: r.job_id.clone(),
            batch: r.batch_id.clone(),
            outcome: outcome_name(r.outcome).to_owned(),
            output,
            output_b64,
            error: r.error.clone(),
            queued_ms: millis(r.queued.as_ref()),
            ran_ms: millis(r.ran.as_ref()),
            attempts: (attempts > 1).then_some(attempts),
        }
    }

    /// The record as one JSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// The ids a job log records as `ok`; a torn last line (an interrupted write) is ignored.
pub fn ok_ids(log: &str) -> HashSet<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<LogRecord>(l).ok())
        .filter(|r| r.outcome == Outcome::Ok.as_str())
        .map(|r| r.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_output_goes_to_base64() {
        let r = proto::JobResult {
            job_id: "1".into(),
            batch_id: "b".into(),
            outcome: proto::Outcome::Ok as i32,
            output: vec![0xff, 0x00].into(),
            ..Default::default()
        };
        let rec = ResultRecord::new(&r, 1);
        assert_eq!(rec.output, None);
        assert_eq!(rec.output_b64.as_deref(), Some("/wA="));
        let line = String::from_utf8(rec.to_line()).unwrap();
        assert!(line.ends_with("}\n") && !line.contains("error"), "{line}");
    }

    #[test]
    fn ok_ids_skips_torn_lines_and_failures() {
        let log = "{\"id\":\"a\",\"outcome\":\"ok\"}\n{\"id\":\"b\",\"outcome\":\"failed\"}\n{\"id\":\"c\",\"outc";
        let ids = ok_ids(log);
        assert!(ids.contains("a") && !ids.contains("b") && !ids.contains("c"));
    }
}
