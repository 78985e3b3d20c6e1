//! batchctl's input: bytes → `LineDecoder` (cut into reads anywhere) → UTF-8 → `parse_line` with
//! the run's defaults, as `batchctl run` reads its JSONL.
//!
//! Input: a byte choosing the defaults, a byte for the line limit, a byte for the read size,
//! then the input.
//!
//! Properties:
//! - Lines come out the same however the input is cut into reads, and as an independent split
//!   finds them: the bytes between newlines, one trailing `\r` dropped, a line over the limit
//!   reported as too long (once) instead of its text.
//! - Each line is a job, a blank, or an error naming its line number, never a panic.
//! - A job round-trips: written back as a JSON line (`payload_b64`, string params,
//!   `timeout_ms`, `batch`, no defaults needed), it parses to the same job.
#![no_main]

use base64::Engine as _;
use batchd::client::{parse_line, Line, LineDecoder, LineDefaults, LineJob};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let [defaults, max, read, input @ ..] = data else {
        return;
    };
    let defaults = match defaults % 3 {
        0 => LineDefaults::default(),
        1 => LineDefaults {
            handler: Some("echo".into()),
            timeout_ms: Some(1500),
            batch: "b".into(),
        },
        _ => LineDefaults {
            handler: Some("sleep".into()),
            timeout_ms: Some(u64::MAX),
            batch: String::new(),
        },
    };
    let max = usize::from(*max) + 1;
    let read = usize::from(*read % 32) + 1;

    let lines = decode(input, max, read);
    assert_eq!(
        lines,
        decode(input, max, input.len().max(1)),
        "depends on reads"
    );
    assert_eq!(lines, split(input, max), "differs from a plain split");

    for (i, line) in lines.iter().enumerate() {
        let n = i as u64 + 1;
        let Line::Text(bytes) = line else { continue };
        let Ok(text) = std::str::from_utf8(bytes) else {
            continue;
        };
        match parse_line(n, text, &defaults) {
            Ok(None) => assert!(text.trim().is_empty(), "only blank lines are skipped"),
            Ok(Some(job)) => {
                assert_eq!(job.line, n);
                round_trip(&job);
            }
            Err(e) => {
                assert_eq!(e.line, n);
                assert!(e.to_string().starts_with(&format!("line {n}: ")), "{e}");
            }
        }
    }
}

fn decode(input: &[u8], max: usize, read: usize) -> Vec<Line> {
    let mut decoder = LineDecoder::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for part in input.chunks(read) {
        buf.extend_from_slice(part);
        while let Some(line) = decoder.decode(&mut buf).expect("decoding never fails") {
            out.push(line);
        }
    }
    while let Some(line) = decoder.decode_eof(&mut buf).expect("decoding never fails") {
        out.push(line);
    }
    out
}

fn split(input: &[u8], max: usize) -> Vec<Line> {
    let mut parts: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
    if parts.last().is_some_and(|p| p.is_empty()) {
        parts.pop(); // the input ends with a newline, or is empty
    }
    parts
        .into_iter()
        .map(|p| {
            let p = p.strip_suffix(b"\r").unwrap_or(p);
            match p.len() > max {
                true => Line::TooLong,
                false => Line::Text(bytes::Bytes::copy_from_slice(p)),
            }
        })
        .collect()
}

fn round_trip(job: &LineJob) {
    let j = &job.job;
    let mut line = serde_json::json!({
        "id": j.id,
        "handler": j.handler,
        "payload_b64": base64::engine::general_purpose::STANDARD.encode(&j.payload),
        "params": j.params,
        "batch": job.batch,
    });
    if let Some(t) = j.timeout {
        let ms = u64::try_from(t.seconds).expect("timeouts are not negative") * 1000
            + u64::try_from(t.nanos).expect("nanos are not negative") / 1_000_000;
        line["timeout_ms"] = ms.into();
    }
    let text = line.to_string();
    let again = parse_line(job.line, &text, &LineDefaults::default())
        .unwrap_or_else(|e| panic!("written back, the job is refused: {e}\n{text}"))
        .expect("a job line is not blank");
    assert_eq!(&again, job, "{text}");
}
