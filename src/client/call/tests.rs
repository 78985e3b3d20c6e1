use prost::Message as _;

use super::*;

fn job(id: &str, payload: usize) -> proto::Job {
    proto::Job {
        id: id.into(),
        handler: "echo".into(),
        payload: vec![b'x'; payload].into(),
        ..Default::default()
    }
}

/// Payload sizes around the varint steps of the length prefixes (128, 16 Ki, 2 Mi).
const SIZES: [usize; 10] = [
    0,
    1,
    100,
    127,
    128,
    16_300,
    16_384,
    70 * 1024,
    2_097_000,
    2_097_152,
];

#[test]
fn request_sizes_are_what_prost_encodes() {
    for batch_id in ["", "b", &"n".repeat(200)] {
        for n in 0..4 {
            let jobs: Vec<proto::Job> = SIZES
                .iter()
                .cycle()
                .skip(n)
                .take(n + 1)
                .map(|s| job("i", *s))
                .collect();
            let body = batch_id_len(batch_id)
                + jobs
                    .iter()
                    .map(|j| prost::encoding::message::encoded_len(JOBS_FIELD, j))
                    .sum::<usize>();
            let req = batch(batch_id.into(), jobs);
            assert_eq!(request_len(body), req.encoded_len(), "{batch_id:?}, {n}");
        }
    }
}

#[test]
fn the_size_a_payload_will_need_is_known_before_it_is_read() {
    let mut empty = job("some/path.txt", 0);
    empty.params.insert("size".into(), "100x100".into());
    for batch_id in ["", "b"] {
        for size in SIZES {
            let mut full = empty.clone();
            full.payload = vec![7u8; size].into();
            let exact = batch(batch_id.into(), vec![full.clone()]).encoded_len();
            assert_eq!(request_size(batch_id, &full), exact, "{size}");
            assert_eq!(
                request_size_with_payload(batch_id, &empty, size),
                exact,
                "{batch_id:?} {size}"
            );
            // From a job that already has a payload, too.
            assert_eq!(request_size_with_payload(batch_id, &full, size), exact);
        }
    }
}

#[test]
fn the_daemons_payload_rejection_names_its_limit() {
    assert_eq!(
        max_payload_of("payload of 9000000 bytes is over max_payload (8388608 bytes)"),
        Some(8_388_608)
    );
    for other in [
        "",
        "unknown handler \"x\"",
        "payload of 9 bytes is over max_payload (lots)",
        "payload of 9 bytes is over max_payload (8 bytes) and more",
    ] {
        assert_eq!(max_payload_of(other), None, "{other:?}");
    }
}

#[test]
fn sizes_read_with_their_unit() {
    assert_eq!(size_text(16 << 20), "16MiB");
    assert_eq!(size_text(65_537), "65537 bytes");
}

/// A sink that keeps nothing.
struct Discard;

impl<T> Sink<T> for Discard {
    async fn deliver(&mut self, _: &[Finished<T>]) -> Result<(), ClientError> {
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), ClientError> {
        Ok(())
    }
}

fn fed(id: &str, payload: usize, origin: Origin) -> Pull<()> {
    Pull::Job(Fed {
        batch: "b".into(),
        job: job(id, payload),
        origin,
        tag: (),
    })
}

#[test]
fn batches_are_cut_to_the_budget_and_a_job_too_big_alone_is_a_bad_input() {
    let one = batch("b".into(), vec![job("fits", 3000)]).encoded_len();
    let opts = CallOptions {
        max_message: one,
        ..CallOptions::default()
    };
    let mut sink = Discard;
    let mut call = Call::new(&opts, &mut sink, None::<tokio::io::Sink>);
    let progress = Progress::new(false);
    let mut line = 0;
    let mut feed = |call: &mut Call<'_, (), Discard, tokio::io::Sink>, id: &str, size: usize| {
        line += 1;
        call.take(fed(id, size, Origin::Line(line)), &progress)
            .unwrap();
    };
    for i in 0..20 {
        feed(&mut call, &format!("s{i}"), 400 + 37 * i);
    }
    feed(&mut call, "fits", 3000);
    feed(&mut call, "over", 3001);
    feed(&mut call, "last", 10);
    call.take(fed("file", 3001, Origin::File), &progress)
        .unwrap();
    call.flush_batch();

    assert_eq!(
        call.summary.bad_lines, 1,
        "only the line over the budget alone"
    );
    assert_eq!(call.summary.too_large, 1, "and the file");
    let batches: Vec<proto::JobBatch> = call
        .batches
        .iter()
        .map(|b| proto::JobBatch {
            batch_id: b.batch_id.clone(),
            jobs: b.jobs.clone(),
        })
        .collect();
    for (i, b) in batches.iter().enumerate() {
        let len = batch(b.batch_id.clone(), b.jobs.clone()).encoded_len();
        assert!(len <= one, "batch {i}: {len} > {one}");
        // Cut only when the next job would not fit.
        if let Some(next) = batches.get(i + 1).and_then(|n| n.jobs.first()) {
            let mut with = b.jobs.clone();
            with.push(next.clone());
            assert!(
                batch(b.batch_id.clone(), with).encoded_len() > one,
                "batch {i}"
            );
        }
    }
    let sent: Vec<&str> = batches
        .iter()
        .flat_map(|b| &b.jobs)
        .map(|j| j.id.as_str())
        .collect();
    let mut expected: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    expected.extend(["fits".into(), "last".into()]);
    assert_eq!(sent, expected, "input order, the bad inputs left out");
    assert!(batches.len() > 2, "{} batches", batches.len());
    assert!(!call.inflight.contains_key("over"));
}

#[test]
fn room_counts_jobs_and_payload_bytes_held_and_what_the_source_waits_for() {
    let opts = CallOptions {
        max_in_flight: 3,
        max_in_flight_bytes: 1000,
        ..CallOptions::default()
    };
    let mut sink = Discard;
    let mut call = Call::new(&opts, &mut sink, None::<tokio::io::Sink>);
    let progress = Progress::new(false);
    let room = call.room();
    assert_eq!((room.jobs, room.bytes, room.empty), (3, 1000, true));
    assert!(call.has_room(room));

    call.take(fed("a", 600, Origin::File), &progress).unwrap();
    let room = call.room();
    assert_eq!((room.jobs, room.bytes, room.empty), (2, 400, false));
    // The source's next file needs 500 bytes: no more asking until they are free.
    call.take(Pull::NeedRoom(500), &progress).unwrap();
    assert!(!call.has_room(call.room()));
    call.wants = Some(400);
    assert!(call.has_room(call.room()));
    call.wants = None;

    call.take(fed("b", 400, Origin::File), &progress).unwrap();
    assert!(!call.has_room(call.room()), "no bytes left");
    assert_eq!(call.summary.peak_bytes, 1000);

    // The same id again while it is unfinished: a duplicate, not sent.
    call.take(fed("a", 1, Origin::File), &progress).unwrap();
    assert_eq!(call.summary.duplicates, 1);
    assert_eq!(call.held_bytes, 1000);
}
