//! One line of a JSONL job file → one job, or an error naming what is wrong with the line.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

use crate::proto;

/// A job read from line `line` of the input, with the batch it goes in.
#[derive(Debug, Clone, PartialEq)]
pub struct LineJob {
    /// 1-based line number in the input.
    pub line: u64,
    /// The batch named by the line, or the run's default.
    pub batch: String,
    /// The job to send.
    pub job: proto::Job,
}

/// Defaults for fields a line may omit.
#[derive(Debug, Clone, Default)]
pub struct LineDefaults {
    /// Handler for lines without `handler`.
    pub handler: Option<String>,
    /// Timeout for lines without `timeout_ms`.
    pub timeout_ms: Option<u64>,
    /// Batch for lines without `batch`.
    pub batch: String,
}

/// Why a line is not a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct LineError {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong.
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    id: Option<IdValue>,
    handler: Option<String>,
    payload: Option<String>,
    payload_b64: Option<String>,
    #[serde(default)]
    params: HashMap<String, serde_json::Value>,
    timeout_ms: Option<u64>,
    batch: Option<String>,
}

/// Ids may be written as strings or numbers.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IdValue {
    Str(String),
    Num(serde_json::Number),
}

/// Parses line number `line` (`text` without its newline). Blank lines give `Ok(None)`.
pub fn parse(line: u64, text: &str, defaults: &LineDefaults) -> Result<Option<LineJob>, LineError> {
    let err = |reason: String| LineError { line, reason };
    if text.trim().is_empty() {
        return Ok(None);
    }
    let raw: Raw = serde_json::from_str(text).map_err(|e| err(json_error(&e)))?;
    let handler = raw
        .handler
        .or_else(|| defaults.handler.clone())
        .ok_or_else(|| err("missing \"handler\" (or pass --handler)".into()))?;
    let payload = match (raw.payload, raw.payload_b64) {
        (Some(_), Some(_)) => return Err(err("has both \"payload\" and \"payload_b64\"".into())),
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| err(format!("\"payload_b64\" is not base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    let params = raw
        .params
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k, s)),
            serde_json::Value::Number(n) => Ok((k, n.to_string())),
            serde_json::Value::Bool(b) => Ok((k, b.to_string())),
            other => Err(err(format!(
                "param {k:?} must be a string, number or boolean, not {other}"
            ))),
        })
        .collect::<Result<_, _>>()?;
    let id = match raw.id {
        Some(IdValue::Str(s)) => s,
        Some(IdValue::Num(n)) => n.to_string(),
        None => line.to_string(),
    };
    let timeout = raw
        .timeout_ms
        .or(defaults.timeout_ms)
        .map(|ms| prost_types::Duration::try_from(Duration::from_millis(ms)))
        .transpose()
        .map_err(|_| err("\"timeout_ms\" is too large".into()))?;
    Ok(Some(LineJob {
        line,
        batch: raw.batch.unwrap_or_else(|| defaults.batch.clone()),
        job: proto::Job {
            id,
            handler,
            payload: payload.into(),
            params,
            timeout,
        },
    }))
}

/// serde_json's message without its "at line 1" (always 1 here), with the column kept.
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = msg
        .rsplit_once(" at line ")
        .map_or(msg.as_str(), |(m, _)| m);
    match e.classify() {
        serde_json::error::Category::Data => format!("not a job: {msg}"),
        _ => format!("not valid JSON: {msg} (column {})", e.column()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> LineDefaults {
        LineDefaults::default()
    }

    #[test]
    fn a_full_line() {
        let j = parse(
            3,
            r#"{"id":"a","handler":"sleep","payload":"hi","params":{"ms":5},"timeout_ms":100,"batch":"x"}"#,
            &d(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(j.job.id, "a");
        assert_eq!(j.job.handler, "sleep");
        assert_eq!(&j.job.payload[..], b"hi");
        assert_eq!(j.job.params["ms"], "5");
        assert_eq!(j.job.timeout.unwrap().nanos, 100_000_000);
        assert_eq!(j.batch, "x");
    }

    #[test]
    fn defaults_and_b64() {
        let defaults = LineDefaults {
            handler: Some("echo".into()),
            timeout_ms: Some(2000),
            batch: "b".into(),
        };
        let j = parse(7, r#"{"payload_b64":"AAEC/w=="}"#, &defaults)
            .unwrap()
            .unwrap();
        assert_eq!(j.job.id, "7", "the id defaults to the line number");
        assert_eq!(j.job.handler, "echo");
        assert_eq!(&j.job.payload[..], &[0, 1, 2, 255]);
        assert_eq!(j.job.timeout.unwrap().seconds, 2);
        assert_eq!(j.batch, "b");
    }

    #[test]
    fn bad_lines_name_their_number() {
        for (text, word) in [
            ("{nope", "not valid JSON"),
            ("[1, 2]", "not a job"),
            (r#"{"payload":"x"}"#, "handler"),
            (r#"{"handler":"echo","payload_b64":"%%"}"#, "base64"),
            (
                r#"{"handler":"echo","payload":"a","payload_b64":"YQ=="}"#,
                "both",
            ),
            (r#"{"handler":"echo","params":{"a":[1]}}"#, "param"),
            (r#"{"handler":"echo","colour":"red"}"#, "colour"),
        ] {
            let e = parse(42, text, &d()).unwrap_err();
            assert_eq!(e.line, 42);
            assert!(e.to_string().starts_with("line 42: "), "{e}");
            assert!(e.reason.contains(word), "{text}: {e}");
        }
        assert_eq!(parse(1, "   ", &d()), Ok(None));
    }
}
