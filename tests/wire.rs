//! The daemon's hand-written messages (`batchd::codec::wire`) against the generated ones: the same
//! bytes both ways, unknown fields skipped, strings that are not UTF-8 refused as prost refuses them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use batchd::codec::wire;
use batchd::proto::{self, process_request::Kind};
use bytes::Bytes;
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn text(rng: &mut StdRng) -> String {
    let n = rng.random_range(0..12);
    (0..n)
        .map(|_| match rng.random_range(0..4) {
            0 => 'é',
            1 => '🦀',
            _ => char::from(rng.random_range(b'a'..=b'z')),
        })
        .collect()
}

fn duration(rng: &mut StdRng) -> Option<prost_types::Duration> {
    rng.random_bool(0.5).then(|| prost_types::Duration {
        seconds: rng.random_range(-5..100_000),
        nanos: rng.random_range(0..1_000_000_000),
    })
}

fn job(rng: &mut StdRng) -> proto::Job {
    let params: HashMap<String, String> = (0..rng.random_range(0..3))
        .map(|_| (text(rng), text(rng)))
        .collect();
    let payload: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
    proto::Job {
        id: text(rng),
        handler: text(rng),
        payload: Bytes::from(payload),
        params,
        timeout: duration(rng),
    }
}

fn request(rng: &mut StdRng) -> proto::ProcessRequest {
    let kind = match rng.random_range(0..3) {
        0 => None,
        1 => Some(Kind::Cancel(proto::CancelJobs {
            batch_id: text(rng),
            job_ids: (0..rng.random_range(0..4)).map(|_| text(rng)).collect(),
        })),
        _ => Some(Kind::Batch(proto::JobBatch {
            batch_id: text(rng),
            jobs: (0..rng.random_range(0..5)).map(|_| job(rng)).collect(),
        })),
    };
    proto::ProcessRequest { kind }
}

fn result(rng: &mut StdRng) -> proto::JobResult {
    let output: Vec<u8> = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
    proto::JobResult {
        job_id: text(rng),
        batch_id: text(rng),
        outcome: rng.random_range(0..6),
        output: Bytes::from(output),
        error: text(rng),
        queued: duration(rng),
        ran: duration(rng),
    }
}

/// No field (a call that did not ask), an empty `GivenBack`, or ids of either list or both.
fn given_back(rng: &mut StdRng) -> Option<proto::GivenBack> {
    rng.random_bool(0.5).then(|| proto::GivenBack {
        not_started: (0..rng.random_range(0..4)).map(|_| text(rng)).collect(),
        stopped: (0..rng.random_range(0..3)).map(|_| text(rng)).collect(),
    })
}

/// The hand-written form of a generated request.
fn to_wire(r: &proto::ProcessRequest) -> wire::ProcessRequest {
    let kind = r.kind.as_ref().map(|k| match k {
        Kind::Batch(b) => wire::Kind::Batch(wire::JobBatch {
            batch_id: b.batch_id.as_str().into(),
            jobs: b
                .jobs
                .iter()
                .map(|j| wire::Job {
                    id: j.id.as_str().into(),
                    handler: j.handler.as_str().into(),
                    payload: j.payload.clone(),
                    params: j.params.clone(),
                    timeout: j.timeout,
                })
                .collect(),
        }),
        Kind::Cancel(c) => wire::Kind::Cancel(wire::CancelJobs {
            batch_id: c.batch_id.clone(),
            job_ids: c.job_ids.clone(),
        }),
    });
    wire::ProcessRequest { kind }
}

fn result_to_wire(r: &proto::JobResult) -> wire::JobResult {
    wire::JobResult {
        job_id: r.job_id.as_str().into(),
        batch_id: r.batch_id.as_str().into(),
        outcome: r.outcome,
        output: r.output.clone(),
        error: r.error.clone(),
        queued: r.queued,
        ran: r.ran,
    }
}

#[test]
fn requests_decode_and_encode_as_the_generated_code_does() {
    let mut rng = StdRng::seed_from_u64(15);
    for _ in 0..2_000 {
        let generated = request(&mut rng);
        let bytes = generated.encode_to_vec();
        let decoded = wire::ProcessRequest::decode(Bytes::from(bytes.clone())).unwrap();
        assert_eq!(decoded, to_wire(&generated));
        assert_eq!(decoded.encoded_len(), bytes.len());
        // Params are a map: its entries may come out in another order, so compare decoded.
        let back = proto::ProcessRequest::decode(decoded.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, generated);
    }
}

#[test]
fn responses_encode_and_decode_as_the_generated_code_does() {
    let mut rng = StdRng::seed_from_u64(16);
    for _ in 0..500 {
        let generated = proto::ProcessResponse {
            results: (0..rng.random_range(0..6))
                .map(|_| result(&mut rng))
                .collect(),
            given_back: given_back(&mut rng),
        };
        let ours = wire::ProcessResponse {
            results: generated.results.iter().map(result_to_wire).collect(),
            given_back: generated.given_back.as_ref().map(|g| wire::GivenBack {
                not_started: g.not_started.clone(),
                stopped: g.stopped.clone(),
            }),
        };
        let bytes = ours.encode_to_vec();
        assert_eq!(bytes, generated.encode_to_vec(), "the same bytes");
        assert_eq!(ours.encoded_len(), bytes.len());
        assert_eq!(
            wire::ProcessResponse::decode(bytes.as_slice()).unwrap(),
            ours
        );
    }
}

#[test]
fn a_response_that_gives_jobs_back_is_the_bytes_prost_writes() {
    let generated = proto::ProcessResponse {
        results: vec![proto::JobResult {
            job_id: "done".into(),
            batch_id: "b".into(),
            outcome: proto::Outcome::Ok as i32,
            ..Default::default()
        }],
        given_back: Some(proto::GivenBack {
            not_started: vec!["a".into(), "".into(), "🦀".repeat(20)],
            stopped: vec!["s".into()],
        }),
    };
    let ours = wire::ProcessResponse {
        results: vec![wire::JobResult {
            job_id: "done".into(),
            batch_id: "b".into(),
            outcome: proto::Outcome::Ok as i32,
            ..Default::default()
        }],
        given_back: Some(wire::GivenBack {
            not_started: vec!["a".into(), "".into(), "🦀".repeat(20)],
            stopped: vec!["s".into()],
        }),
    };
    let bytes = ours.encode_to_vec();
    assert_eq!(bytes, generated.encode_to_vec());
    assert_eq!(ours.encoded_len(), bytes.len());
    assert_eq!(
        proto::ProcessResponse::decode(bytes.as_slice()).unwrap(),
        generated
    );
    assert_eq!(
        wire::ProcessResponse::decode(bytes.as_slice()).unwrap(),
        ours
    );
    // Present but empty is not absent: field 2 with a zero length.
    let empty = wire::ProcessResponse {
        results: Vec::new(),
        given_back: Some(wire::GivenBack::default()),
    };
    assert_eq!(empty.encode_to_vec(), [0x12, 0]);
    let theirs = proto::ProcessResponse {
        results: Vec::new(),
        given_back: Some(proto::GivenBack::default()),
    };
    assert_eq!(empty.encode_to_vec(), theirs.encode_to_vec());
}

#[test]
fn a_field_repeated_or_unknown_is_handled_as_protobuf_says() {
    // Job { id: "a", id: "b", 99: varint 7, handler: "echo" }: the last id wins, 99 is skipped.
    let job = [
        0x0a, 1, b'a', 0x0a, 1, b'b', 0x98, 0x06, 7, 0x12, 4, b'e', b'c', b'h', b'o',
    ];
    let decoded = wire::Job::decode(job.as_slice()).unwrap();
    assert_eq!(decoded.id, "b");
    assert_eq!(decoded.handler, "echo");
    // Two batch fields of one request merge: their jobs add up.
    let one = proto::ProcessRequest {
        kind: Some(Kind::Batch(proto::JobBatch {
            batch_id: "x".into(),
            jobs: vec![proto::Job {
                id: "1".into(),
                ..Default::default()
            }],
        })),
    };
    let mut bytes = one.encode_to_vec();
    bytes.extend(one.encode_to_vec());
    let merged = wire::ProcessRequest::decode(bytes.as_slice()).unwrap();
    let Some(wire::Kind::Batch(b)) = merged.kind else {
        panic!("{merged:?}")
    };
    assert_eq!(b.jobs.len(), 2);
}

#[test]
fn strings_that_are_not_utf8_are_refused_like_prost_refuses_them() {
    for (field, tag) in [("id", 0x0a), ("handler", 0x12)] {
        let job = [tag, 2, 0xff, 0xfe];
        let ours = wire::Job::decode(job.as_slice()).unwrap_err();
        let theirs = proto::Job::decode(job.as_slice()).unwrap_err();
        assert_eq!(ours.to_string(), theirs.to_string(), "{field}");
    }
    let batch = [0x0a, 1, 0x80];
    let ours = wire::JobBatch::decode(batch.as_slice()).unwrap_err();
    let theirs = proto::JobBatch::decode(batch.as_slice()).unwrap_err();
    assert_eq!(ours.to_string(), theirs.to_string());
}
